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

inline void check_split_bf16x3(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat, "lowrank::split_bf16x3: b must be a 2-D float32 tensor, got ",
              b.scalar_type(), " ", quant::shape(b));
}

// The math in PyTorch ops (the CPU backend): hi = bf16(b), mid = bf16(b - hi), lo = bf16(b - hi - mid).
inline at::Tensor split_bf16x3_reference(const at::Tensor& b) {
  const at::Tensor hi = b.to(at::kBFloat16);
  const at::Tensor rest = b - hi.to(at::kFloat);
  const at::Tensor mid = rest.to(at::kBFloat16);
  return at::cat({hi, mid, (rest - mid.to(at::kFloat)).to(at::kBFloat16)}, 1);
}

}  // namespace lowrank::lora
