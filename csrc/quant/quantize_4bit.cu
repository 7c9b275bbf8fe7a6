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

// Full quantization blocks, x 16-byte aligned. GROUP threads share one quantization block, each
// owning CHUNKS consecutive runs of 8 elements held in registers: at least 2 runs (32 B of bf16
// in flight per thread) so that the loads in flight cover HBM latency at full occupancy.
template <typename T, int GROUP, int CHUNKS, bool SIGN_MAGNITUDE>
__global__ void __launch_bounds__(kThreads) quantize_4bit_full_blocks(Quantize4bitParams p,
                                                                     int64_t n_full_blocks) {
  __shared__ float s_thr[16];
  __shared__ uint8_t s_cor[16];
  load_tables(p, s_thr, s_cor);

  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t block = tid / GROUP;
  const int member = int(tid % GROUP);
  const bool active = block < n_full_blocks;  // inactive lanes still join the shuffles
  const int64_t first = block * int64_t(GROUP * CHUNKS * 8) + int64_t(member) * CHUNKS * 8;

  float v[CHUNKS][8];
  float m = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (active) {
      load8_as_float(static_cast<const T*>(p.x) + first + c * 8, v[c]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[c][k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) m = max_propagate_nan(m, fabsf(v[c][k]));
  }
  m = warp_max_over(m, GROUP);
  if (!active) return;
  if (member == 0) p.absmax[block] = m;
  const float inverse = __frcp_rn(m);  // IEEE reciprocal, then a multiply: bitsandbytes' rule

  uint32_t words[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    uint32_t w = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t hi = code_4bit(__fmul_rn(v[c][2 * k], inverse), s_thr, s_cor, SIGN_MAGNITUDE);
      const uint32_t lo = code_4bit(__fmul_rn(v[c][2 * k + 1], inverse), s_thr, s_cor, SIGN_MAGNITUDE);
      w |= ((hi << 4) | lo) << (8 * k);  // first element in the high nibble, bytes in order
    }
    words[c] = w;
  }
  uint8_t* out = p.packed + first / 2;
  if constexpr (CHUNKS == 2) {
    *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
  } else {
#pragma unroll
    for (int c = 0; c < CHUNKS; c += 4)
      reinterpret_cast<uint4*>(out)[c / 4] = make_uint4(words[c], words[c + 1], words[c + 2], words[c + 3]);
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
