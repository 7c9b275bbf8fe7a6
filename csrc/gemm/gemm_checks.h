// Input validation of lowrank::matmul_4bit, shared by its CPU and CUDA entries; lowrank/ops.py
// mirrors it in the fake kernel. Every message says what was expected.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "quant/quant_checks.h"

namespace lowrank::gemm {

using quant::ceil_div;
using quant::num;
using quant::shape;

// The weight's quantization data. Exactly one absmax form: float32 `absmax`, or (nested) the 8-bit
// `absmax` codes with nested_absmax / nested_qmap / offset.
struct Weight4bit {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  const std::optional<at::Tensor>& nested_absmax;
  const std::optional<at::Tensor>& nested_qmap;
  const std::optional<at::Tensor>& offset;
  const at::Tensor& values;
  int64_t blocksize;
  int64_t nested_blocksize;
  int64_t out_features;
  int64_t in_features;
  bool nested() const { return nested_absmax.has_value(); }
};

enum class MatmulPath { kAuto, kSkinny, kWgmma, kDequantize };

inline MatmulPath parse_path(const std::string& path, const char* op = "lowrank::matmul_4bit") {
  if (path == "auto") return MatmulPath::kAuto;
  if (path == "skinny") return MatmulPath::kSkinny;
  if (path == "wgmma") return MatmulPath::kWgmma;
  if (path == "dequantize") return MatmulPath::kDequantize;
  TORCH_CHECK(false, op, ": path must be 'auto', 'skinny', 'wgmma' or 'dequantize', got '", path, "'");
}

// The weight's tensors: shapes, dtypes, devices, and exactly one absmax form.
inline void check_weight_4bit(const Weight4bit& w, const char* op) {
  TORCH_CHECK(w.out_features > 0 && w.in_features > 0, op, ": the weight shape must be positive, got [",
              num(w.out_features), ", ", num(w.in_features), "]");
  const int64_t numel = w.out_features * w.in_features;
  TORCH_CHECK(w.packed.scalar_type() == at::kByte && w.packed.is_contiguous() && w.packed.numel() == ceil_div(numel, 2),
              op, ": packed must be contiguous uint8 with ", num(ceil_div(numel, 2)), " bytes for a [",
              num(w.out_features), ", ", num(w.in_features), "] weight, got ", w.packed.scalar_type(), " with ",
              num(w.packed.numel()));
  quant::check_blocksize(w.blocksize, op);
  quant::check_table(w.values, w.packed, 16, at::kFloat, op, "values");
  const int64_t n_blocks = ceil_div(numel, w.blocksize);
  TORCH_CHECK(w.nested_absmax.has_value() == w.nested_qmap.has_value() &&
                  w.nested_absmax.has_value() == w.offset.has_value(),
              op, ": nested_absmax, nested_qmap and offset must be given together (double quantization) or not at all");
  if (w.nested()) {
    quant::check_blocksize(w.nested_blocksize, op, "nested_blocksize");
    quant::check_table(w.absmax, w.packed, n_blocks, at::kByte, op, "absmax (the 8-bit codes of a double-quantized absmax)");
    quant::check_table(*w.nested_absmax, w.packed, ceil_div(n_blocks, w.nested_blocksize), at::kFloat, op, "nested_absmax");
    quant::check_table(*w.nested_qmap, w.packed, 256, at::kFloat, op, "nested_qmap");
    quant::check_scalar_offset(*w.offset, w.packed, op);
  } else {
    quant::check_table(w.absmax, w.packed, n_blocks, at::kFloat, op, "absmax");
  }
}

inline void check_matmul_4bit(const at::Tensor& x, const Weight4bit& w, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lowrank::matmul_4bit";
  TORCH_CHECK(quant::is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_weight_4bit(w, op);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.in_features, op, ": x's last dimension must be in_features = ",
              num(w.in_features), " (weight [", num(w.out_features), ", ", num(w.in_features), "]), got x of shape ",
              shape(x));
  quant::check_same_device(x, w.packed, op, "x");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.out_features && b.scalar_type() == x.scalar_type(), op,
                ": bias must be [", num(w.out_features), "] in x's dtype ", x.scalar_type(), ", got ",
                b.scalar_type(), " ", shape(b));
    quant::check_same_device(b, w.packed, op, "bias");
  }
}

inline void check_matmul_4bit_grad_x(const at::Tensor& dy, const Weight4bit& w) {
  constexpr const char* op = "lowrank::matmul_4bit_grad_x";
  TORCH_CHECK(quant::is_supported_float(dy.scalar_type()), op, ": dy must be float32, float16 or bfloat16, got ",
              dy.scalar_type());
  check_weight_4bit(w, op);
  TORCH_CHECK(dy.dim() >= 1 && dy.size(-1) == w.out_features, op, ": dy's last dimension must be out_features = ",
              num(w.out_features), " (weight [", num(w.out_features), ", ", num(w.in_features), "]), got dy of shape ",
              shape(dy));
  quant::check_same_device(dy, w.packed, op, "dy");
}

// lowrank::mm_tuned: a [..., K] times b [N, K]^T (transpose_b) or b [K, N], plus bias [N] -> [..., N]
// in a's dtype. a, b and bias share one float dtype and one device.
inline void check_mm_tuned(const at::Tensor& a, const at::Tensor& b, bool transpose_b,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lowrank::mm_tuned";
  TORCH_CHECK(quant::is_supported_float(a.scalar_type()), op, ": a must be float32, float16 or bfloat16, got ",
              a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  TORCH_CHECK(b.dim() == 2, op, ": b must be 2-D (", transpose_b ? "[N, K]" : "[K, N]", "), got ", shape(b));
  const int64_t k = transpose_b ? b.size(1) : b.size(0);
  const int64_t n = transpose_b ? b.size(0) : b.size(1);
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) == k, op, ": a's last dimension must be K = ", num(k), " (b ",
              shape(b), transpose_b ? " is [N, K]" : " is [K, N]", "), got a of shape ", shape(a));
  quant::check_same_device(a, b, op, "a");
  if (bias.has_value()) {
    const at::Tensor& c = *bias;
    TORCH_CHECK(c.dim() == 1 && c.size(0) == n && c.scalar_type() == a.scalar_type(), op, ": bias must be [",
                num(n), "] in a's dtype ", a.scalar_type(), ", got ", c.scalar_type(), " ", shape(c));
    quant::check_same_device(c, b, op, "bias");
  }
}

// mm_tuned's plain form (CPU, and CUDA calls the tuned path does not take): the backend's matmul.
inline at::Tensor mm_plain(const at::Tensor& a, const at::Tensor& b, bool transpose_b,
                           const std::optional<at::Tensor>& bias) {
  if (transpose_b) return at::linear(a, b, bias);
  if (!bias.has_value()) return at::matmul(a, b);
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end());
  out_shape.back() = b.size(1);
  return at::addmm(*bias, a.reshape({-1, a.size(-1)}), b).view(out_shape);
}

// dx = dy @ dequantize(W): the weight dequantized in dy's dtype, then the backend's matmul.
at::Tensor matmul_4bit_grad_x_dequantize(const at::Tensor& dy, const Weight4bit& w);

// y = x @ dequantize(W)^T (+ bias): the weight dequantized in x's dtype by the lowrank dequantize
// ops (one launch on CUDA), then the backend's matmul (cuBLAS on CUDA, fp32 accumulation).
at::Tensor matmul_4bit_dequantize(const at::Tensor& x, const Weight4bit& w, const std::optional<at::Tensor>& bias);

}  // namespace lowrank::gemm
