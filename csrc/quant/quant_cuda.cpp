// CUDA entries of the quantization family: validate, guard the device, take the current stream,
// fill the parameter struct, launch (kernels in the .cu files beside this), check the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "quant/quant_checks.h"
#include "quant/quant_launch.h"

namespace lowrank::quant {
namespace {

FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::kFloat32;
    case at::kHalf: return FloatKind::kFloat16;
    case at::kBFloat16: return FloatKind::kBFloat16;
    default: TORCH_CHECK(false, "lowrank: unsupported float dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x, const at::Tensor& thresholds,
                                                      const at::Tensor& code_of_rank, int64_t blocksize,
                                                      bool sign_magnitude) {
  check_quantize_4bit(x, thresholds, code_of_rank, blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({ceil_div(n, 2)}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  Quantize4bitParams p{x.const_data_ptr(), float_kind(x.scalar_type()), n, int(blocksize),
                       thresholds.const_data_ptr<float>(), code_of_rank.const_data_ptr<uint8_t>(), sign_magnitude,
                       packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>()};
  launch_quantize_4bit(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, absmax};
}

Dequantize4bitParams dequantize_params(const at::Tensor& packed, const at::Tensor& values, int64_t blocksize,
                                       int64_t numel, at::Tensor& out) {
  Dequantize4bitParams p{};
  p.packed = packed.const_data_ptr<uint8_t>();
  p.numel = numel;
  p.blocksize = int(blocksize);
  p.values = values.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  p.out_kind = float_kind(out.scalar_type());
  return p;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& values,
                                int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  check_dequantize_4bit(packed, absmax, values, blocksize, numel, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  Dequantize4bitParams p = dequantize_params(packed, values, blocksize, numel, out);
  p.absmax = absmax.const_data_ptr<float>();
  launch_dequantize_4bit(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_4bit_nested_cuda(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                       const at::Tensor& nested_absmax, const at::Tensor& nested_qmap,
                                       const at::Tensor& offset, const at::Tensor& values, int64_t blocksize,
                                       int64_t nested_blocksize, int64_t numel, at::ScalarType dtype) {
  check_dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_qmap, offset, values, blocksize,
                               nested_blocksize, numel, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  Dequantize4bitParams p = dequantize_params(packed, values, blocksize, numel, out);
  p.absmax_codes = absmax_codes.const_data_ptr<uint8_t>();
  p.nested_absmax = nested_absmax.const_data_ptr<float>();
  p.nested_qmap = nested_qmap.const_data_ptr<float>();
  p.offset = offset.const_data_ptr<float>();
  p.nested_blocksize = int(nested_blocksize);
  launch_dequantize_4bit(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_blockwise_cuda(const at::Tensor& x, const at::Tensor& qmap,
                                                                const at::Tensor& offset, int64_t blocksize) {
  check_quantize_8bit(x, qmap, offset, blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options());
  Quantize8bitParams p{x.const_data_ptr<float>(), offset.const_data_ptr<float>(), n, int(blocksize), qmap.const_data_ptr<float>(),
                       codes.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>()};
  launch_quantize_8bit_blockwise(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor dequantize_8bit_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                          const at::Tensor& offset, int64_t blocksize) {
  check_dequantize_8bit(codes, absmax, qmap, offset, blocksize);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty({codes.numel()}, codes.options().dtype(at::kFloat));
  Dequantize8bitParams p{codes.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                         qmap.const_data_ptr<float>(),  offset.const_data_ptr<float>(),
                         codes.numel(), int(blocksize), out.mutable_data_ptr<float>()};
  launch_dequantize_8bit_blockwise(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor absmax_mean_cuda(const at::Tensor& absmax) {
  check_absmax_mean(absmax);
  const c10::cuda::CUDAGuard guard(absmax.device());
  at::Tensor partials = at::empty({kAbsmaxMeanPartials}, absmax.options().dtype(at::kDouble));
  at::Tensor mean = at::empty({}, absmax.options());
  AbsmaxMeanParams p{absmax.const_data_ptr<float>(), absmax.numel(), partials.mutable_data_ptr<double>(),
                     mean.mutable_data_ptr<float>()};
  launch_absmax_mean(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mean;
}

}  // namespace
}  // namespace lowrank::quant

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("quantize_4bit", &lowrank::quant::quantize_4bit_cuda);
  m.impl("dequantize_4bit", &lowrank::quant::dequantize_4bit_cuda);
  m.impl("dequantize_4bit_nested", &lowrank::quant::dequantize_4bit_nested_cuda);
  m.impl("quantize_8bit_blockwise", &lowrank::quant::quantize_8bit_blockwise_cuda);
  m.impl("dequantize_8bit_blockwise", &lowrank::quant::dequantize_8bit_blockwise_cuda);
  m.impl("absmax_mean", &lowrank::quant::absmax_mean_cuda);
}
