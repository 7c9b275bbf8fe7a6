// lowrank::matmul_4bit on CPU, and the dequantize-then-matmul path that the CUDA entry also takes
// when the skinny kernel does not apply (large M, fp32 x, blocksize 32, K not a multiple of 64).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "gemm/gemm_checks.h"

namespace lowrank::gemm {

namespace {

// The dequantize ops, called through the dispatcher so that each backend runs its own kernel.
at::Tensor dequantize_weight(const Weight4bit& w, at::ScalarType dtype) {
  const int64_t numel = w.out_features * w.in_features;
  if (w.nested()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lowrank::dequantize_4bit_nested", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                                           at::ScalarType)>();
    return op.call(w.packed, w.absmax, *w.nested_absmax, *w.nested_qmap, *w.offset, w.values, w.blocksize,
                   w.nested_blocksize, numel, dtype);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowrank::dequantize_4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         at::ScalarType)>();
  return op.call(w.packed, w.absmax, w.values, w.blocksize, numel, dtype);
}

// lowrank::mm_tuned through the dispatcher: on CUDA its tuned cuBLASLt path, on CPU the plain matmul.
at::Tensor mm_tuned_call(const at::Tensor& a, const at::Tensor& b, bool transpose_b,
                         const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowrank::mm_tuned", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool, const std::optional<at::Tensor>&)>();
  return op.call(a, b, transpose_b, bias);
}

at::Tensor mm_tuned_cpu(const at::Tensor& a, const at::Tensor& b, bool transpose_b,
                        const std::optional<at::Tensor>& bias) {
  check_mm_tuned(a, b, transpose_b, bias);
  return mm_plain(a, b, transpose_b, bias);
}

at::Tensor matmul_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_qmap,
                           const std::optional<at::Tensor>& offset, const at::Tensor& values, int64_t blocksize,
                           int64_t nested_blocksize, int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& bias, c10::string_view path) {
  const Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                     out_features, in_features};
  check_matmul_4bit(x, w, bias);
  const MatmulPath chosen = parse_path(std::string(path));
  TORCH_CHECK(chosen != MatmulPath::kSkinny && chosen != MatmulPath::kWgmma, "lowrank::matmul_4bit: path '",
              std::string(path), "' is a CUDA kernel; on CPU use 'auto' or 'dequantize'");
  return matmul_4bit_dequantize(x, w, bias);
}

at::Tensor matmul_4bit_grad_x_cpu(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset,
                                  const at::Tensor& values, int64_t blocksize, int64_t nested_blocksize,
                                  int64_t out_features, int64_t in_features, c10::string_view path) {
  const Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                     out_features, in_features};
  const MatmulPath chosen = parse_path(std::string(path), "lowrank::matmul_4bit_grad_x");
  check_matmul_4bit_grad_x(dy, w);
  TORCH_CHECK(chosen != MatmulPath::kSkinny && chosen != MatmulPath::kWgmma, "lowrank::matmul_4bit_grad_x: path '",
              std::string(path), "' is a CUDA kernel; on CPU use 'auto' or 'dequantize'");
  return matmul_4bit_grad_x_dequantize(dy, w);
}

}  // namespace

at::Tensor matmul_4bit_grad_x_dequantize(const at::Tensor& dy, const Weight4bit& w) {
  const at::Tensor weight = dequantize_weight(w, dy.scalar_type()).view({w.out_features, w.in_features});
  return mm_tuned_call(dy, weight, /*transpose_b=*/false, std::nullopt);
}

at::Tensor matmul_4bit_dequantize(const at::Tensor& x, const Weight4bit& w, const std::optional<at::Tensor>& bias) {
  const at::Tensor weight = dequantize_weight(w, x.scalar_type()).view({w.out_features, w.in_features});
  return mm_tuned_call(x, weight, /*transpose_b=*/true, bias);
}

}  // namespace lowrank::gemm

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("matmul_4bit", &lowrank::gemm::matmul_4bit_cpu);
  m.impl("matmul_4bit_grad_x", &lowrank::gemm::matmul_4bit_grad_x_cpu);
  m.impl("mm_tuned", &lowrank::gemm::mm_tuned_cpu);
}
