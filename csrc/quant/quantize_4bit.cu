// Blockwise 4-bit quantization (absmax + codes) on CUDA. Math: lowrank/reference.py quantize_4bit.
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "quant/codes.h"
#include "quant/quant_launch.h"

namespace lowrank::quant {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_max_over(float m, int group) {
  for (int o = group / 2; o > 0; o >>= 1) m = max_propagate_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}

__device__ __forceinline__ void load_tables(const Quantize4bitParams& p, float* s_thr, uint8_t* s_cor) {
  if (threadIdx.x < 15) s_thr[threadIdx.x] = p.thresholds[threadIdx.x];
  if (threadIdx.x < 16) s_cor[threadIdx.x] = p.code_of_rank[threadIdx.x];
  __syncthreads();
}

// Magnitude max as integers: for |x| (sign bit cleared) the IEEE order is the unsigned order, and
// every NaN pattern sorts above inf, so NaN propagates as torch.amax does, in 2 instructions per
// element (a compare-and-select max with an explicit NaN test costs 3).
__device__ __forceinline__ uint32_t magnitude_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// The rank search of codes.h with its first levels in registers: thresholds 3, 7, 11 (or 1, 3, 5
// in sign-magnitude mode) are held per thread and chosen by select, the last levels and the code
// come from shared memory: 2-3 shared loads per element instead of 4, since shared-load issue
// (one warp-wide load per clock per SM) bounds this kernel after DRAM.
struct RegisterThresholds {
  float t1, t3, t5, t7, t11;
};

template <bool SIGN_MAGNITUDE>
__device__ __forceinline__ uint32_t code_4bit_fast(float xn, const RegisterThresholds& r, const float* s_thr,
                                                   const uint8_t* s_cor) {
  if constexpr (SIGN_MAGNITUDE) {
    const float m = fabsf(xn);
    const bool c1 = m > r.t3;
    int k = c1 ? 4 : 0;
    k += (m > (c1 ? r.t5 : r.t1)) ? 2 : 0;
    k += (m > s_thr[k]) ? 1 : 0;
    return s_cor[k] | (xn < 0.0f ? 8u : 0u);
  } else {
    const bool c1 = xn > r.t7;
    int k = c1 ? 8 : 0;
    k += (xn > (c1 ? r.t11 : r.t3)) ? 4 : 0;
    k += (xn > s_thr[k + 1]) ? 2 : 0;
    k += (xn > s_thr[k]) ? 1 : 0;
    return s_cor[k];
  }
}

// Full quantization blocks, x 16-byte aligned. GROUP threads share one quantization block; each
// owns CHUNKS runs of 8 elements, run c * GROUP + member, so that every load instruction of a
// warp reads whole 16-byte pieces side by side and every store writes 4-byte words side by side.
// CHUNKS >= 2 keeps 32 B of bf16 in flight per thread.
template <typename T, int GROUP, int CHUNKS, bool SIGN_MAGNITUDE>
__global__ void __launch_bounds__(kThreads) quantize_4bit_full_blocks(Quantize4bitParams p,
                                                                     int64_t n_full_blocks) {
  __shared__ float s_thr[16];
  __shared__ uint8_t s_cor[16];
  load_tables(p, s_thr, s_cor);
  const RegisterThresholds reg{s_thr[1], s_thr[3], s_thr[5], s_thr[7], s_thr[11]};

  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t block = tid / GROUP;
  const int member = int(tid % GROUP);
  const bool active = block < n_full_blocks;  // inactive lanes still join the shuffles
  const int64_t block_start = block * int64_t(GROUP * CHUNKS * 8);

  float v[CHUNKS][8];
  uint32_t m = 0;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (active) {
      load8_as_float(static_cast<const T*>(p.x) + block_start + (c * GROUP + member) * 8, v[c]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[c][k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) m = max(m, magnitude_bits(v[c][k]));
  }
#pragma unroll
  for (int o = GROUP / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!active) return;
  const float absmax = __uint_as_float(m);
  if (member == 0) p.absmax[block] = absmax;
  const float inverse = __frcp_rn(absmax);  // IEEE reciprocal, then a multiply: bitsandbytes' rule

  uint32_t* out = reinterpret_cast<uint32_t*>(p.packed + block_start / 2);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    uint32_t w = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t hi = code_4bit_fast<SIGN_MAGNITUDE>(__fmul_rn(v[c][2 * k], inverse), reg, s_thr, s_cor);
      const uint32_t lo = code_4bit_fast<SIGN_MAGNITUDE>(__fmul_rn(v[c][2 * k + 1], inverse), reg, s_thr, s_cor);
      w |= ((hi << 4) | lo) << (8 * k);  // first element in the high nibble, bytes in order
    }
    out[c * GROUP + member] = w;
  }
}

// Any block, any alignment: one warp per quantization block. Serves the partial last block and
// inputs whose address is not 16-byte aligned.
template <typename T, bool SIGN_MAGNITUDE>
__global__ void __launch_bounds__(kThreads) quantize_4bit_warp_per_block(Quantize4bitParams p,
                                                                        int64_t first_block,
                                                                        int64_t end_block) {
  __shared__ float s_thr[16];
  __shared__ uint8_t s_cor[16];
  load_tables(p, s_thr, s_cor);

  const int64_t block = first_block + (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (block >= end_block) return;  // whole warps leave together
  const T* x = static_cast<const T*>(p.x);
  const int64_t start = block * p.blocksize;
  const int64_t remaining = p.numel - start;
  const int len = remaining < p.blocksize ? int(remaining) : p.blocksize;

  float m = 0.0f;
  for (int i = lane; i < len; i += 32) m = max_propagate_nan(m, fabsf(to_float(x[start + i])));
  m = warp_max_over(m, 32);
  if (lane == 0) p.absmax[block] = m;
  const float inverse = __frcp_rn(m);

  const int n_bytes = (len + 1) / 2;
  for (int b = lane; b < n_bytes; b += 32) {
    const float x0 = to_float(x[start + 2 * b]);
    const float x1 = (2 * b + 1 < len) ? to_float(x[start + 2 * b + 1]) : 0.0f;  // odd n: pad 0
    const uint32_t hi = code_4bit(__fmul_rn(x0, inverse), s_thr, s_cor, SIGN_MAGNITUDE);
    const uint32_t lo = code_4bit(__fmul_rn(x1, inverse), s_thr, s_cor, SIGN_MAGNITUDE);
    p.packed[start / 2 + b] = uint8_t((hi << 4) | lo);
  }
}

template <typename T, bool SIGN_MAGNITUDE>
void launch_typed(const Quantize4bitParams& p, cudaStream_t stream) {
  const int64_t n_blocks = (p.numel + p.blocksize - 1) / p.blocksize;
  const bool aligned = (reinterpret_cast<uintptr_t>(p.x) % 16) == 0;
  int64_t n_full = aligned ? p.numel / p.blocksize : 0;
  if (n_full > 0) {
    // chunks of 8 per quantization block = blocksize / 8; CHUNKS = max(2, blocksize / 256).
    auto go = [&](auto kernel, int group) {
      const int64_t threads = n_full * group;
      kernel<<<unsigned((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, n_full);
    };
    switch (p.blocksize) {
      case 32: go(quantize_4bit_full_blocks<T, 2, 2, SIGN_MAGNITUDE>, 2); break;
      case 64: go(quantize_4bit_full_blocks<T, 4, 2, SIGN_MAGNITUDE>, 4); break;
      case 128: go(quantize_4bit_full_blocks<T, 8, 2, SIGN_MAGNITUDE>, 8); break;
      case 256: go(quantize_4bit_full_blocks<T, 16, 2, SIGN_MAGNITUDE>, 16); break;
      case 512: go(quantize_4bit_full_blocks<T, 32, 2, SIGN_MAGNITUDE>, 32); break;
      case 1024: go(quantize_4bit_full_blocks<T, 32, 4, SIGN_MAGNITUDE>, 32); break;
      default: n_full = 0; break;  // 2048, 4096: rare; the warp-per-block kernel serves them
    }
  }
  if (n_blocks > n_full) {
    const int64_t threads = (n_blocks - n_full) * 32;
    quantize_4bit_warp_per_block<T, SIGN_MAGNITUDE>
        <<<unsigned((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, n_full, n_blocks);
  }
}

template <typename T>
void launch_mode(const Quantize4bitParams& p, cudaStream_t stream) {
  if (p.sign_magnitude) launch_typed<T, true>(p, stream);
  else launch_typed<T, false>(p, stream);
}

}  // namespace

void launch_quantize_4bit(const Quantize4bitParams& p, cudaStream_t stream) {
  switch (p.x_kind) {
    case FloatKind::kFloat32: launch_mode<float>(p, stream); break;
    case FloatKind::kFloat16: launch_mode<__half>(p, stream); break;
    case FloatKind::kBFloat16: launch_mode<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace lowrank::quant
