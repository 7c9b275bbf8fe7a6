// CUDA entries of the LoRA/DoRA ops: validate, pick the kernel or the PyTorch-op fallback, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lora/lora_checks.h"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

int multiprocessor_count(const at::Device& device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index());
  return count > 0 ? count : 132;
}

std::tuple<at::Tensor, at::Tensor> column_reduce_cuda(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                      const std::optional<at::Tensor>& y_in) {
  check_column_reduce(dy_in, h_in, y_in);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const int64_t m = dy_in.size(0), n = dy_in.size(1), r = h_in.size(1);
  const bool half = dy_in.scalar_type() == at::kHalf || dy_in.scalar_type() == at::kBFloat16;
  // The kernel: 16-bit types, an even width, rank <= 32; anything else is rare: PyTorch ops.
  if (!half || n % 2 != 0 || r == 0 || r > kColumnReduceMaxRank || m == 0) return column_reduce_reference(dy_in, h_in, y_in);
  at::Tensor dy = dy_in.contiguous();
  std::optional<at::Tensor> y;
  if (y_in.has_value()) y = y_in->contiguous();
  // h rows padded to a multiple of 8 elements (16-byte vector loads); a copy of [M, r] at most.
  const int64_t h_stride = (r + 7) / 8 * 8;
  at::Tensor h = h_in.contiguous();
  if (h_stride != r || reinterpret_cast<uintptr_t>(h.const_data_ptr()) % 16 != 0) {
    at::Tensor padded = at::zeros({m, h_stride}, h.options());
    padded.narrow(1, 0, r).copy_(h);
    h = padded;
  }
  if (reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % 4 != 0 ||
      (y.has_value() && reinterpret_cast<uintptr_t>(y->const_data_ptr()) % 4 != 0)) {
    return column_reduce_reference(dy_in, h_in, y_in);
  }
  // Row splits: enough CTAs for ~4 per SM, each split at least 64 rows.
  const int64_t col_blocks = (n + 63) / 64;
  const int64_t want = 4 * int64_t(multiprocessor_count(dy.device()));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((want + col_blocks - 1) / col_blocks, m / 64));
  at::Tensor dh_parts = at::empty({splits, n, r}, dy.options().dtype(at::kFloat));
  at::Tensor dot_parts = at::empty({y.has_value() ? splits : 0, n}, dy.options().dtype(at::kFloat));
  ColumnReduceParams p{};
  p.dy = dy.const_data_ptr();
  p.h = h.const_data_ptr();
  p.y = y.has_value() ? y->const_data_ptr() : nullptr;
  p.kind = dy.scalar_type() == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat16;
  p.m = m;
  p.n = n;
  p.r = int(r);
  p.h_stride = int(h_stride);
  p.splits = int(splits);
  p.dh = dh_parts.mutable_data_ptr<float>();
  p.dot = y.has_value() ? dot_parts.mutable_data_ptr<float>() : nullptr;
  launch_column_reduce(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dot = y.has_value() ? dot_parts.sum(0) : at::empty({0}, dy.options().dtype(at::kFloat));
  return {dh_parts.sum(0), dot};
}

}  // namespace
}  // namespace lowrank::lora

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("lora_column_reduce", &lowrank::lora::column_reduce_cuda);
}
