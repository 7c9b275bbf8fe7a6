// 4-bit dequantization on CUDA, with a float32 absmax or fused with the double-quantized one.
// Math: lowrank/reference.py dequantize_4bit / dequantize_4bit_nested.
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "quant/quant_launch.h"

namespace lowrank::quant {
namespace {

constexpr int kThreads = 256;

template <bool NESTED>
__device__ __forceinline__ float block_absmax(const Dequantize4bitParams& p, const float* s_qmap,
                                              int64_t block) {
  if constexpr (NESTED) {
    // Two roundings (product, then sum), never a fused multiply-add: bitsandbytes dequantizes
    // the nested absmax in one kernel and adds the offset in another.
    const float scale = p.nested_absmax[block / p.nested_blocksize];
    return __fadd_rn(__fmul_rn(s_qmap[p.absmax_codes[block]], scale), *p.offset);
  } else {
    return p.absmax[block];
  }
}

template <bool NESTED>
__device__ __forceinline__ void load_tables(const Dequantize4bitParams& p, float* s_values, float* s_qmap) {
  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  __syncthreads();
}

// One thread per 16 packed bytes = 32 elements (a blocksize is at least 32, so one absmax):
// one 16-byte load, then 16-byte stores (4 for bf16/fp16, 8 for fp32). A lookup in a 16-entry
// shared table is conflict-free: 16 words sit in 16 distinct banks.
template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(kThreads) dequantize_4bit_runs32(Dequantize4bitParams p, int64_t n_runs) {
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  load_tables<NESTED>(p, s_values, s_qmap);
  const int64_t run = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (run >= n_runs) return;

  const uint4 raw = reinterpret_cast<const uint4*>(p.packed)[run];
  const float a = block_absmax<NESTED>(p, s_qmap, (run * 32) / p.blocksize);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  float f[32];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (words[w] >> (8 * b)) & 0xffu;
      f[8 * w + 2 * b] = __fmul_rn(s_values[byte >> 4], a);
      f[8 * w + 2 * b + 1] = __fmul_rn(s_values[byte & 15u], a);
    }
  }
  if constexpr (sizeof(OutT) == 4) {
    float4* out = reinterpret_cast<float4*>(static_cast<float*>(p.out) + run * 32);
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = make_float4(f[4 * k], f[4 * k + 1], f[4 * k + 2], f[4 * k + 3]);
  } else {
    uint4* out = reinterpret_cast<uint4*>(static_cast<OutT*>(p.out) + run * 32);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[k] = make_uint4(Pack2<OutT>::pack(f[8 * k], f[8 * k + 1]), Pack2<OutT>::pack(f[8 * k + 2], f[8 * k + 3]),
                          Pack2<OutT>::pack(f[8 * k + 4], f[8 * k + 5]), Pack2<OutT>::pack(f[8 * k + 6], f[8 * k + 7]));
    }
  }
}

// One thread per element from `first`: the tail past the last whole run of 32, or everything
// when the packed bytes are not 16-byte aligned (a view into a larger buffer).
template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(kThreads) dequantize_4bit_elements(Dequantize4bitParams p, int64_t first) {
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  load_tables<NESTED>(p, s_values, s_qmap);
  const int64_t i = first + int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.numel) return;
  const uint32_t byte = p.packed[i / 2];
  const uint32_t code = (i & 1) ? (byte & 15u) : (byte >> 4);
  const float a = block_absmax<NESTED>(p, s_qmap, i / p.blocksize);
  static_cast<OutT*>(p.out)[i] = from_float<OutT>(__fmul_rn(s_values[code], a));
}

template <typename OutT, bool NESTED>
void launch_typed(const Dequantize4bitParams& p, cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(p.packed) % 16) == 0;
  const int64_t n_runs = aligned ? p.numel / 32 : 0;
  if (n_runs > 0) {
    dequantize_4bit_runs32<OutT, NESTED>
        <<<unsigned((n_runs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, n_runs);
  }
  const int64_t first = n_runs * 32;
  if (p.numel > first) {
    const int64_t n = p.numel - first;
    dequantize_4bit_elements<OutT, NESTED>
        <<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, first);
  }
}

template <typename OutT>
void launch_nested(const Dequantize4bitParams& p, cudaStream_t stream) {
  if (p.absmax != nullptr) launch_typed<OutT, false>(p, stream);
  else launch_typed<OutT, true>(p, stream);
}

}  // namespace

void launch_dequantize_4bit(const Dequantize4bitParams& p, cudaStream_t stream) {
  switch (p.out_kind) {
    case FloatKind::kFloat32: launch_nested<float>(p, stream); break;
    case FloatKind::kFloat16: launch_nested<__half>(p, stream); break;
    case FloatKind::kBFloat16: launch_nested<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace lowrank::quant
