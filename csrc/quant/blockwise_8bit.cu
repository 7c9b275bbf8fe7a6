// Blockwise 8-bit quantization with a 256-entry map, on CUDA: the nested absmax of double
// quantization. Math: lowrank/reference.py quantize_8bit_blockwise / dequantize_8bit_blockwise.
// The data is small (n / blocksize of the weight: 3.7 M floats for 28672 x 8192 at blocksize 64),
// but the code search is a chain of 8 dependent shared loads, so latency rules. Measured there on
// the H100: one warp per block with each lane searching its 8 elements in turn, 19.6 us; one CTA
// per block with a thread per element, 34 us (14 K CTAs each loading the map: waves of latency);
// so: one warp per block, the block in registers, the searches unrolled.
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

// One warp per block with the block in registers (PER_LANE = blocksize / 32 values per lane, a
// compile-time count): the PER_LANE code searches of a lane are independent, so unrolled their
// dependent shared-load chains overlap instead of running one after another.
template <int PER_LANE>
__global__ void __launch_bounds__(kThreads) quantize_8bit_warp_registers(Quantize8bitParams p, int64_t n_blocks) {
  __shared__ float s_qmap[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.qmap[i];
  __syncthreads();
  const int64_t block = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (block >= n_blocks) return;  // whole warps leave together
  const int64_t start = block * (32 * PER_LANE);
  const float offset = *p.offset;
  float v[PER_LANE];
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int64_t i = start + k * 32 + lane;
    v[k] = i < p.numel ? __fsub_rn(p.x[i], offset) : 0.0f;
    m = max_propagate_nan(m, fabsf(v[k]));
  }
  for (int o = 16; o > 0; o >>= 1) m = max_propagate_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) p.absmax[block] = m;
  const float inverse = __frcp_rn(m);
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int64_t i = start + k * 32 + lane;
    const uint8_t code = uint8_t(code_8bit(__fmul_rn(v[k], inverse), s_qmap));
    if (i < p.numel) p.codes[i] = code;
  }
}

__device__ __forceinline__ double block_sum(double v, double* s_warp) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) total += s_warp[w];  // fixed order
  return total;
}

// Mean in two fixed-order passes: kAbsmaxMeanPartials CTAs each sum a strided share in float64,
// then one CTA sums the partials. The order depends on the element count alone (deterministic).
__global__ void __launch_bounds__(kThreads) absmax_partial_sums(AbsmaxMeanParams p) {
  __shared__ double s_warp[kThreads / 32];
  double v = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.numel;
       i += int64_t(kAbsmaxMeanPartials) * kThreads)
    v += double(p.absmax[i]);
  const double total = block_sum(v, s_warp);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kThreads) absmax_mean_final(AbsmaxMeanParams p) {
  __shared__ double s_warp[kThreads / 32];
  double v = 0.0;
  for (int j = threadIdx.x; j < kAbsmaxMeanPartials; j += kThreads) v += p.partials[j];
  const double total = block_sum(v, s_warp);
  if (threadIdx.x == 0) *p.mean = float(total / double(p.numel));  // one rounding to float32
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
  const unsigned grid = unsigned((n_blocks * 32 + kThreads - 1) / kThreads);
  switch (p.blocksize) {
    case 32: quantize_8bit_warp_registers<1><<<grid, kThreads, 0, stream>>>(p, n_blocks); return;
    case 64: quantize_8bit_warp_registers<2><<<grid, kThreads, 0, stream>>>(p, n_blocks); return;
    case 128: quantize_8bit_warp_registers<4><<<grid, kThreads, 0, stream>>>(p, n_blocks); return;
    case 256: quantize_8bit_warp_registers<8><<<grid, kThreads, 0, stream>>>(p, n_blocks); return;
    case 512: quantize_8bit_warp_registers<16><<<grid, kThreads, 0, stream>>>(p, n_blocks); return;
    default: break;  // 1024 .. 4096: the looping kernel below
  }
  const int64_t threads = n_blocks * 32;
  quantize_8bit_warp_per_block<<<unsigned((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, n_blocks);
}

void launch_dequantize_8bit_blockwise(const Dequantize8bitParams& p, cudaStream_t stream) {
  dequantize_8bit_elements<<<unsigned((p.numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
}

void launch_absmax_mean(const AbsmaxMeanParams& p, cudaStream_t stream) {
  absmax_partial_sums<<<kAbsmaxMeanPartials, kThreads, 0, stream>>>(p);
  absmax_mean_final<<<1, kThreads, 0, stream>>>(p);
}

}  // namespace lowrank::quant
