// Input validation of the LoRA/DoRA ops, shared by their CPU and CUDA entries (lowrank/ops.py
// mirrors it in the fake kernels).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "gemm/gemm_checks.h"
#include "quant/quant_checks.h"

namespace lowrank::lora {

inline void check_column_reduce(const at::Tensor& dy, const at::Tensor& h, const std::optional<at::Tensor>& y) {
  constexpr const char* op = "lowrank::lora_column_reduce";
  using quant::shape;
  TORCH_CHECK(quant::is_supported_float(dy.scalar_type()), op, ": dy must be float32, float16 or bfloat16, got ",
              dy.scalar_type());
  TORCH_CHECK(dy.dim() == 2 && h.dim() == 2 && h.size(0) == dy.size(0), op,
              ": dy must be [M, N] and h [M, r] with the same M, got dy ", shape(dy), " and h ", shape(h));
  TORCH_CHECK(h.scalar_type() == dy.scalar_type() || h.scalar_type() == at::kFloat, op,
              ": h must have dy's dtype ", dy.scalar_type(), " or be float32, got ", h.scalar_type());
  quant::check_same_device(h, dy, op, "h");
  if (y.has_value()) {
    TORCH_CHECK(y->sizes() == dy.sizes() && y->scalar_type() == dy.scalar_type(), op,
                ": y must match dy (", shape(dy), ", ", dy.scalar_type(), "), got ", shape(*y), ", ", y->scalar_type());
    quant::check_same_device(*y, dy, op, "y");
  }
}

// The math, in PyTorch ops: (dy^T h, sum over rows of dy * y) in float32. The CPU backend, and the
// CUDA fallback for what the kernel does not take.
inline std::tuple<at::Tensor, at::Tensor> column_reduce_reference(const at::Tensor& dy, const at::Tensor& h,
                                                                  const std::optional<at::Tensor>& y) {
  at::Tensor dh = at::matmul(dy.t().to(at::kFloat), h.to(at::kFloat));
  at::Tensor dot = y.has_value() ? (dy.to(at::kFloat) * y->to(at::kFloat)).sum(0)
                                 : at::empty({0}, dy.options().dtype(at::kFloat));
  return {dh, dot};
}

// lora_dy_products: dy [M, N] 16-bit or float32, b float32 [N, r], h float32 [M, r], y like dy,
// col_scale and dot_divisor float32 [N] (dot_divisor only with y)
inline void check_dy_products(const at::Tensor& dy, const at::Tensor& b, const at::Tensor& h,
                              const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& col_scale,
                              const std::optional<at::Tensor>& dot_divisor) {
  constexpr const char* op = "lowrank::lora_dy_products";
  using quant::shape;
  TORCH_CHECK(quant::is_supported_float(dy.scalar_type()) && dy.dim() == 2, op,
              ": dy must be a 2-D float32, float16 or bfloat16 tensor [M, N], got ", dy.scalar_type(), " ", shape(dy));
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == dy.size(1), op,
              ": b must be float32 [N = ", quant::num(dy.size(1)), ", r], got ", b.scalar_type(), " ", shape(b));
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(0) == dy.size(0) && h.size(1) == b.size(1), op,
              ": h must be float32 [M = ", quant::num(dy.size(0)), ", r = ", quant::num(b.size(1)), "], got ",
              h.scalar_type(), " ", shape(h));
  quant::check_same_device(b, dy, op, "b");
  quant::check_same_device(h, dy, op, "h");
  if (y.has_value()) {
    TORCH_CHECK(y->sizes() == dy.sizes() && y->scalar_type() == dy.scalar_type(), op,
                ": y must match dy (", shape(dy), ", ", dy.scalar_type(), "), got ", shape(*y), ", ", y->scalar_type());
    quant::check_same_device(*y, dy, op, "y");
  }
  for (const auto& [t, name] : {std::pair{&col_scale, "col_scale"}, std::pair{&dot_divisor, "dot_divisor"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == dy.size(1), op, ": ", name,
                " must be float32 [N = ", quant::num(dy.size(1)), "], got ", v.scalar_type(), " ", shape(v));
    quant::check_same_device(v, dy, op, name);
  }
  TORCH_CHECK(!dot_divisor.has_value() || y.has_value(), op,
              ": dot_divisor divides sum(dy * y), so it needs y; got y = None");
}

// The math in PyTorch ops (float32): (dy b_v, (dy^T h) col_scale dh_scaling, sum over rows of
// dy * y divided by dot_divisor where nonzero, else 0; or an empty [0]), b_v = b col_scale.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dy_products_reference(
    const at::Tensor& dy, const at::Tensor& b, const at::Tensor& h, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& col_scale, double dh_scaling, const std::optional<at::Tensor>& dot_divisor) {
  const at::Tensor dy32 = dy.to(at::kFloat);
  at::Tensor dot = y.has_value() ? (dy32 * y->to(at::kFloat)).sum(0) : at::empty({0}, dy.options().dtype(at::kFloat));
  if (dot_divisor.has_value()) {
    const at::Tensor zero = dot_divisor->eq(0);
    dot = at::where(zero, at::zeros_like(dot), dot / at::where(zero, at::ones_like(*dot_divisor), *dot_divisor));
  }
  const at::Tensor b_v = col_scale.has_value() ? b * col_scale->unsqueeze(1) : b;
  at::Tensor dh = at::matmul(dy32.t(), h);
  if (col_scale.has_value()) dh = dh * col_scale->unsqueeze(1);
  if (dh_scaling != 1.0) dh = dh * static_cast<float>(dh_scaling);
  return {at::matmul(dy32, b_v), dh, dot};
}

inline void check_lora_project(const at::Tensor& x, const at::Tensor& a) {
  constexpr const char* op = "lowrank::lora_project";
  TORCH_CHECK(quant::is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && a.size(1) == x.size(1) && a.scalar_type() == at::kFloat, op,
              ": x must be [M, K] and a float32 [r, K], got x ", quant::shape(x), " and a ", a.scalar_type(), " ",
              quant::shape(a));
  quant::check_same_device(a, x, op, "a");
}

inline void check_dora_cross(const gemm::Weight4bit& w, const at::Tensor& a) {
  constexpr const char* op = "lowrank::dora_cross_4bit";
  gemm::check_weight_4bit(w, op);
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(1) == w.in_features && a.size(0) >= 1, op,
              ": a (lora_A) must be float32 [r, in_features = ", quant::num(w.in_features), "], got ", a.scalar_type(),
              " ", quant::shape(a));
  quant::check_same_device(a, w.packed, op, "a");
}

// The 4-bit weight, a (lora_A) float32 [r, in], b (lora_B) float32 [out, r], all on one device.
inline void check_weight_and_adapter(const gemm::Weight4bit& w, const at::Tensor& a, const at::Tensor& b,
                                     const char* op) {
  gemm::check_weight_4bit(w, op);
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(1) == w.in_features && a.size(0) >= 1, op,
              ": a (lora_A) must be float32 [r, in_features = ", quant::num(w.in_features), "], got ", a.scalar_type(),
              " ", quant::shape(a));
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == w.out_features && b.size(1) == a.size(0),
              op, ": b (lora_B) must be float32 [out_features = ", quant::num(w.out_features), ", r = ",
              quant::num(a.size(0)), "], got ", b.scalar_type(), " ", quant::shape(b));
  quant::check_same_device(a, w.packed, op, "a");
  quant::check_same_device(b, w.packed, op, "b");
}

// lora_merge_4bit: the 4-bit weight and adapter, row_scale float32 [out]
inline void check_lora_merge(const gemm::Weight4bit& w, const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& row_scale, at::ScalarType dtype) {
  constexpr const char* op = "lowrank::lora_merge_4bit";
  check_weight_and_adapter(w, a, b, op);
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->dim() == 1 &&
                    row_scale->size(0) == w.out_features,
                op, ": row_scale must be float32 [out_features = ", quant::num(w.out_features), "], got ",
                row_scale->scalar_type(), " ", quant::shape(*row_scale));
    quant::check_same_device(*row_scale, w.packed, op, "row_scale");
  }
  TORCH_CHECK(quant::is_supported_float(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

// lora_merge_dense: weight float [out, in] (float32, float16 or bfloat16), a float32 [r, in], b
// float32 [out, r], row_scale float32 [out]
inline void check_lora_merge_dense(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                                   const std::optional<at::Tensor>& row_scale) {
  constexpr const char* op = "lowrank::lora_merge_dense";
  TORCH_CHECK(weight.dim() == 2 && quant::is_supported_float(weight.scalar_type()) && weight.size(0) >= 1 &&
                  weight.size(1) >= 1,
              op, ": weight must be a float32, float16 or bfloat16 matrix [out_features, in_features], got ",
              weight.scalar_type(), " ", quant::shape(weight));
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(1) == k && a.size(0) >= 1, op,
              ": a (lora_A) must be float32 [r, in_features = ", quant::num(k), "], got ", a.scalar_type(), " ",
              quant::shape(a));
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == n && b.size(1) == a.size(0), op,
              ": b (lora_B) must be float32 [out_features = ", quant::num(n), ", r = ", quant::num(a.size(0)),
              "], got ", b.scalar_type(), " ", quant::shape(b));
  quant::check_same_device(a, weight, op, "a");
  quant::check_same_device(b, weight, op, "b");
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->dim() == 1 && row_scale->size(0) == n, op,
                ": row_scale must be float32 [out_features = ", quant::num(n), "], got ", row_scale->scalar_type(),
                " ", quant::shape(*row_scale));
    quant::check_same_device(*row_scale, weight, op, "row_scale");
  }
}

// dora_row_norm_4bit: the 4-bit weight and adapter; unit >= 0 and rtol > 0; magnitude float32 [out]
inline void check_dora_row_norm(const gemm::Weight4bit& w, const at::Tensor& a, const at::Tensor& b, double unit,
                                double rtol, const std::optional<at::Tensor>& magnitude) {
  constexpr const char* op = "lowrank::dora_row_norm_4bit";
  check_weight_and_adapter(w, a, b, op);
  TORCH_CHECK(unit >= 0.0 && rtol > 0.0, op, ": unit must be >= 0 and rtol > 0, got unit ", quant::real_num(unit),
              " and rtol ", quant::real_num(rtol));
  if (magnitude.has_value()) {
    TORCH_CHECK(magnitude->scalar_type() == at::kFloat && magnitude->dim() == 1 &&
                    magnitude->size(0) == w.out_features,
                op, ": magnitude must be float32 [out_features = ", quant::num(w.out_features), "], got ",
                magnitude->scalar_type(), " ", quant::shape(*magnitude));
    quant::check_same_device(*magnitude, w.packed, op, "magnitude");
  }
}

// dora_norm: w2 float64 [N], p float32 [N, r], a float32 [r, K], b float32 [N, r]
inline void check_dora_norm(const at::Tensor& w2, const at::Tensor& p, const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "lowrank::dora_norm";
  TORCH_CHECK(w2.scalar_type() == at::kDouble && w2.dim() == 1 && w2.size(0) >= 1, op,
              ": w2 (the base's squared row norms) must be float64 [out_features], got ", w2.scalar_type(), " ",
              quant::shape(w2));
  const int64_t n = w2.size(0);
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(0) >= 1, op,
              ": a (lora_A) must be float32 [r, in_features], got ", a.scalar_type(), " ", quant::shape(a));
  const int64_t r = a.size(0);
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.dim() == 2 && p.size(0) == n && p.size(1) == r, op,
              ": p (W0 A^T) must be float32 [out_features = ", quant::num(n), ", r = ", quant::num(r), "], got ",
              p.scalar_type(), " ", quant::shape(p));
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == n && b.size(1) == r, op,
              ": b (lora_B) must be float32 [out_features = ", quant::num(n), ", r = ", quant::num(r), "], got ",
              b.scalar_type(), " ", quant::shape(b));
  quant::check_same_device(p, w2, op, "p");
  quant::check_same_device(a, w2, op, "a");
  quant::check_same_device(b, w2, op, "b");
}

inline void check_split_bf16x3(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat, "lowrank::split_bf16x3: b must be a 2-D float32 tensor, got ",
              b.scalar_type(), " ", quant::shape(b));
}

inline void check_split_bf16x3_sum(const at::Tensor& parts) {
  TORCH_CHECK(parts.dim() == 2 && parts.scalar_type() == at::kFloat && parts.size(1) % 3 == 0,
              "lowrank::split_bf16x3_sum: parts must be a 2-D float32 tensor [M, 3 n], got ", parts.scalar_type(), " ",
              quant::shape(parts));
}

// The math in PyTorch ops (the CPU backend): scale * ((hi part + mid part) + lo part), or its transpose.
inline at::Tensor split_bf16x3_sum_reference(const at::Tensor& parts, double scale, bool transpose) {
  const int64_t n = parts.size(1) / 3;
  at::Tensor out = (parts.narrow(1, 0, n) + parts.narrow(1, n, n) + parts.narrow(1, 2 * n, n)).mul_(scale);
  return transpose ? out.t().contiguous() : out;
}

// The math in PyTorch ops (the CPU backend): hi = bf16(b), mid = bf16(b - hi), lo = bf16(b - hi - mid).
inline at::Tensor split_bf16x3_reference(const at::Tensor& b) {
  const at::Tensor hi = b.to(at::kBFloat16);
  const at::Tensor rest = b - hi.to(at::kFloat);
  const at::Tensor mid = rest.to(at::kBFloat16);
  return at::cat({hi, mid, (rest - mid.to(at::kFloat)).to(at::kBFloat16)}, 1);
}

}  // namespace lowrank::lora
