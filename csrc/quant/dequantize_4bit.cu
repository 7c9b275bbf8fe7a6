// 4-bit dequantization on CUDA, with a float32 absmax or fused with the double-quantized one.
// Math: lowrank/reference.py dequantize_4bit / dequantize_4bit_nested.
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "quant/quant_launch.h"

namespace lowrank::quant {
namespace {

constexpr int kThreads = 256;

int multiprocessor_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 132;
}

template <bool NESTED>
__device__ __forceinline__ float block_absmax(const Dequantize4bitParams& p, const float* s_qmap,
                                              int64_t block, int nested_shift) {
  if constexpr (NESTED) {
    // Two roundings (product, then sum), never a fused multiply-add: bitsandbytes dequantizes
    // the nested absmax in one kernel and adds the offset in another.
    const float scale = p.nested_absmax[block >> nested_shift];  // nested_blocksize = 1 << nested_shift
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

// One thread per 4 packed bytes = 8 elements per step (a blocksize is at least 32, so one absmax
// per step): a warp's load instruction reads 128 contiguous bytes and each store instruction
// writes 512 (bf16/fp16) contiguous bytes. The first version gave each thread 16 packed bytes
// and four 16-byte stores 64 bytes apart: 1594 GB/s on 28672 x 8192 (H100), under bitsandbytes'
// 1787. UNROLL steps per thread issue all their loads first. A 16-entry shared table is
// conflict-free: 16 words in 16 distinct banks.
constexpr int kUnroll = 8;

template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(kThreads) dequantize_4bit_words(Dequantize4bitParams p, int64_t n_words) {
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  load_tables<NESTED>(p, s_values, s_qmap);
  const int block_shift = 31 - __clz(p.blocksize);  // blocksizes are powers of two
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
  const uint32_t* in = reinterpret_cast<const uint32_t*>(p.packed);
  const int64_t stride = int64_t(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n_words; base += stride) {
    // Every global load of the UNROLL steps (codes, and the absmax or its 8-bit code and scale)
    // is issued before any is used: the absmax loads depend only on the index, and left inside
    // the compute loop their latency was paid once per step.
    uint32_t w[kUnroll];
    float absmax_or_scale[kUnroll];
    uint32_t absmax_code[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      const bool ok = i < n_words;
      const int64_t block = ((ok ? i : 0) * 8) >> block_shift;
      w[u] = ok ? in[i] : 0u;
      if constexpr (NESTED) {
        absmax_code[u] = p.absmax_codes[block];
        absmax_or_scale[u] = p.nested_absmax[block >> nested_shift];
      } else {
        absmax_code[u] = 0;
        absmax_or_scale[u] = p.absmax[block];
      }
    }
    const float offset = NESTED ? *p.offset : 0.0f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i >= n_words) break;
      // Nested: two roundings (product, then sum), never a fused multiply-add, as bitsandbytes.
      const float a = NESTED ? __fadd_rn(__fmul_rn(s_qmap[absmax_code[u]], absmax_or_scale[u]), offset)
                             : absmax_or_scale[u];
      float f[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (w[u] >> (8 * b)) & 0xffu;
        f[2 * b] = __fmul_rn(s_values[byte >> 4], a);
        f[2 * b + 1] = __fmul_rn(s_values[byte & 15u], a);
      }
      if constexpr (sizeof(OutT) == 4) {
        float4* out = reinterpret_cast<float4*>(static_cast<float*>(p.out) + i * 8);
        out[0] = make_float4(f[0], f[1], f[2], f[3]);
        out[1] = make_float4(f[4], f[5], f[6], f[7]);
      } else {
        reinterpret_cast<uint4*>(static_cast<OutT*>(p.out))[i] =
            make_uint4(Pack2<OutT>::pack(f[0], f[1]), Pack2<OutT>::pack(f[2], f[3]), Pack2<OutT>::pack(f[4], f[5]),
                       Pack2<OutT>::pack(f[6], f[7]));
      }
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
  const float a = block_absmax<NESTED>(p, s_qmap, i / p.blocksize, NESTED ? 31 - __clz(p.nested_blocksize) : 0);
  static_cast<OutT*>(p.out)[i] = from_float<OutT>(__fmul_rn(s_values[code], a));
}

template <typename OutT, bool NESTED>
void launch_typed(const Dequantize4bitParams& p, cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(p.packed) % 4) == 0;
  const int64_t n_words = aligned ? p.numel / 8 : 0;
  if (n_words > 0) {
    // Enough blocks to fill every SM at full occupancy (8 x 256 threads), then grid-stride.
    const int64_t needed = (n_words + kThreads * kUnroll - 1) / (kThreads * kUnroll);
    const int64_t blocks = needed < 8 * multiprocessor_count() ? needed : 8 * multiprocessor_count();
    dequantize_4bit_words<OutT, NESTED><<<unsigned(blocks), kThreads, 0, stream>>>(p, n_words);
  }
  const int64_t first = n_words * 8;
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
