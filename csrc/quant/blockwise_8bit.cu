// Blockwise 8-bit quantization with a 256-entry map, on CUDA: the nested absmax of double
// quantization. Math: lowrank/reference.py quantize_8bit_blockwise / dequantize_8bit_blockwise.
// The data is small (n / blocksize of the weight: 3.7 M floats for 28672 x 8192 at blocksize 64),
// so the kernels stay simple: one warp per block, one thread per element.
#include <cuda_runtime.h>

#include "quant/codes.h"
#include "quant/quant_launch.h"

namespace lowrank::quant {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) quantize_8bit_warp_per_block(Quantize8bitParams p, int64_t n_blocks) {
  __shared__ float s_qmap[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.qmap[i];
  __syncthreads();
  const int64_t block = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (block >= n_blocks) return;
  const int64_t start = block * p.blocksize;
  const int64_t remaining = p.numel - start;
  const int len = remaining < p.blocksize ? int(remaining) : p.blocksize;
  const float offset = *p.offset;
  float m = 0.0f;
  for (int i = lane; i < len; i += 32) m = max_propagate_nan(m, fabsf(__fsub_rn(p.x[start + i], offset)));
  for (int o = 16; o > 0; o >>= 1) m = max_propagate_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) p.absmax[block] = m;
  const float inverse = __frcp_rn(m);
  for (int i = lane; i < len; i += 32) p.codes[start + i] = uint8_t(code_8bit(__fmul_rn(__fsub_rn(p.x[start + i], offset), inverse), s_qmap));
}

__global__ void __launch_bounds__(kThreads) dequantize_8bit_elements(Dequantize8bitParams p) {
  __shared__ float s_qmap[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.qmap[i];
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.numel) return;
  p.out[i] = __fadd_rn(__fmul_rn(s_qmap[p.codes[i]], p.absmax[i / p.blocksize]), *p.offset);
}

}  // namespace

void launch_quantize_8bit_blockwise(const Quantize8bitParams& p, cudaStream_t stream) {
  const int64_t n_blocks = (p.numel + p.blocksize - 1) / p.blocksize;
  const int64_t threads = n_blocks * 32;
  quantize_8bit_warp_per_block<<<unsigned((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, n_blocks);
}

void launch_dequantize_8bit_blockwise(const Dequantize8bitParams& p, cudaStream_t stream) {
  dequantize_8bit_elements<<<unsigned((p.numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
}

}  // namespace lowrank::quant
