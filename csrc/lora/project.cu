// P = W A^T in float32 for a tall W [N, K] and a short float32 A [r, K] (r <= 64), on CUDA cores,
// W read once. Two row sources share the kernel:
// - dora_cross_4bit: W = the packed 4-bit W0, dequantized to its exact float32 values (value *
//   absmax, as dequantize_4bit): DoRA's cross term, the one pass over W0 that the row norm
//   ||W0 + s B A|| needs at every step (lowrank/dora.py expands the norm; this is its P);
// - lora_project: W = a 16-bit activation matrix (x [M, K] for h = x A^T, dY [M, N] for g = dY B):
//   the adapter's small products with float32 adapters and float32 sums, reading the 16-bit
//   activations once (cuBLAS would need both operands in one type: a float32 copy of x, or A
//   rounded to 16 bits).
//
// Why CUDA cores and not the tensor cores: the norm's error model (lowrank/dora.py, U_CROSS =
// 2^-18) needs P to float32 accuracy; bf16/fp16/tf32 operands would round W0 or A to 8..11 bits.
// Counts at 14336 x 4096, r = 16: 940 M FMA = 28 us of the FMA pipe; 29 MB of codes = 10 us of
// DRAM; so the design keeps the FMA pipe fed: A is staged in shared memory one 128-wide k chunk at
// a time and each thread applies a float4 of A to ROWS weight rows (A read once per ROWS rows),
// which puts the shared-memory traffic at ~1 wavefront per 8 FMA.
//
// Work split: a CTA owns 8 * ROWS rows of W for the whole K; warp w owns rows [w * ROWS, ..), lane
// l the 4 consecutive k at 4 l of each chunk (a warp reads 64 contiguous bytes of a 4-bit row, 256
// of a 16-bit one). The lanes' partial sums are added by a fixed xor-shuffle tree: deterministic.
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 128;  // k per shared-memory stage of A: 32 lanes x 4

// Rows of the packed 4-bit W0 as exact float32 values: 4 elements per lane per chunk.
template <bool NESTED>
struct Packed4bitRows {
  const DoraCrossParams& p;
  const float* s_values;
  const float* s_qmap;
  int block_shift, nested_shift;
  float offset;
  struct Raw {
    uint32_t codes;
    float absmax;
  };
  __device__ __forceinline__ Raw load(int64_t row, int64_t k, bool ok) const {
    const int64_t flat = row * p.k + k;  // a multiple of 4: the 4 elements share one block
    Raw raw{ok ? *reinterpret_cast<const uint16_t*>(p.packed + flat / 2) : 0u, 0.0f};
    const int64_t block = ok ? flat >> block_shift : 0;
    if constexpr (NESTED) {
      // the float absmax exactly as dequantize_4bit_nested: a rounded product, then a rounded sum
      raw.absmax = ok ? __fadd_rn(__fmul_rn(s_qmap[p.absmax_codes[block]], p.nested_absmax[block >> nested_shift]),
                                  offset)
                      : 0.0f;
    } else {
      raw.absmax = ok ? p.absmax[block] : 0.0f;
    }
    return raw;
  }
  __device__ __forceinline__ void values(const Raw& raw, float (&w)[4]) const {
    const uint32_t b0 = raw.codes & 0xffu, b1 = (raw.codes >> 8) & 0xffu;  // first element: high nibble
    w[0] = __fmul_rn(s_values[b0 >> 4], raw.absmax);
    w[1] = __fmul_rn(s_values[b0 & 15u], raw.absmax);
    w[2] = __fmul_rn(s_values[b1 >> 4], raw.absmax);
    w[3] = __fmul_rn(s_values[b1 & 15u], raw.absmax);
  }
};

// Rows of a 16-bit matrix: 4 elements (8 bytes) per lane per chunk.
template <typename T>
struct DenseRows {
  const T* w;
  int64_t k;
  using Raw = uint2;
  __device__ __forceinline__ Raw load(int64_t row, int64_t kk, bool ok) const {
    return ok ? *reinterpret_cast<const uint2*>(w + row * k + kk) : make_uint2(0u, 0u);
  }
  __device__ __forceinline__ void values(const Raw& raw, float (&v)[4]) const {
    const float2 lo = pair_to_float2<T>(raw.x), hi = pair_to_float2<T>(raw.y);
    v[0] = lo.x;
    v[1] = lo.y;
    v[2] = hi.x;
    v[3] = hi.y;
  }
};

template <int R_PAD, int ROWS, typename Rows>
__device__ __forceinline__ void project_rows(const Rows& rows, int64_t n, int64_t k, const float* a, int r,
                                             float* out, float4 (*s_a)[kChunk / 4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarps + warp) * ROWS;
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const int64_t a4_per_row = k / 4;

  float acc[ROWS][R_PAD];
#pragma unroll
  for (int q = 0; q < ROWS; ++q)
#pragma unroll
    for (int j = 0; j < R_PAD; ++j) acc[q][j] = 0.0f;

  for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
    const int64_t kk = k0 + 4 * lane;
    const bool k_ok = kk < k;  // K % 4 == 0: the 4 elements exist together
    typename Rows::Raw raw[ROWS];  // this chunk's loads, issued before the barrier
#pragma unroll
    for (int q = 0; q < ROWS; ++q) raw[q] = rows.load(row0 + q, kk, k_ok && row0 + q < n);
    __syncthreads();  // the previous chunk's A is no longer read
    for (int i = threadIdx.x; i < R_PAD * (kChunk / 4); i += kThreads) {
      const int j = i / (kChunk / 4), c = i % (kChunk / 4);
      const int64_t kk4 = k0 / 4 + c;
      s_a[j][c] = (j < r && kk4 < a4_per_row) ? a4[j * a4_per_row + kk4] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    __syncthreads();
    float w[ROWS][4];
#pragma unroll
    for (int q = 0; q < ROWS; ++q) rows.values(raw[q], w[q]);
#pragma unroll
    for (int j = 0; j < R_PAD; ++j) {
      const float4 av = s_a[j][lane];
#pragma unroll
      for (int q = 0; q < ROWS; ++q) {
        float t = acc[q][j];
        t = fmaf(w[q][0], av.x, t);
        t = fmaf(w[q][1], av.y, t);
        t = fmaf(w[q][2], av.z, t);
        t = fmaf(w[q][3], av.w, t);
        acc[q][j] = t;
      }
    }
  }
  // Sum the 32 lanes' partial dot products (fixed tree), then lane j % 32 stores out[row][j].
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
#pragma unroll
    for (int j = 0; j < R_PAD; ++j) {
      float v = acc[q][j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[q][j] = v;
    }
    const int64_t row = row0 + q;
    if (row < n) {
#pragma unroll
      for (int j = 0; j < R_PAD; ++j) {
        if (j % 32 == lane && j < r) out[row * r + j] = acc[q][j];
      }
    }
  }
}

template <int R_PAD, int ROWS, bool NESTED>
__global__ void __launch_bounds__(kThreads) dora_cross(DoraCrossParams p) {
  __shared__ float4 s_a[R_PAD][kChunk / 4];  // A[j][chunk k .. k + 128) (r = 64: 32 KB)
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  __syncthreads();  // the nested absmax reads s_qmap in the first chunk's loads, before any other barrier
  const Packed4bitRows<NESTED> rows{p, s_values, s_qmap, 31 - __clz(p.blocksize),
                                    NESTED ? 31 - __clz(p.nested_blocksize) : 0, NESTED ? *p.offset : 0.0f};
  project_rows<R_PAD, ROWS>(rows, p.n, p.k, p.a, p.r, p.p, s_a);
}

template <int R_PAD, int ROWS, typename T>
__global__ void __launch_bounds__(kThreads) lora_project(LoraProjectParams p) {
  __shared__ float4 s_a[R_PAD][kChunk / 4];
  const DenseRows<T> rows{static_cast<const T*>(p.x), p.k};
  project_rows<R_PAD, ROWS>(rows, p.m, p.k, p.a, p.r, p.out, s_a);
}

template <int R_PAD, int ROWS>
void launch_cross_rank(const DoraCrossParams& p, cudaStream_t stream) {
  const int64_t rows_per_cta = int64_t(kWarps) * ROWS;
  const unsigned blocks = unsigned((p.n + rows_per_cta - 1) / rows_per_cta);
  if (p.absmax == nullptr) dora_cross<R_PAD, ROWS, true><<<blocks, kThreads, 0, stream>>>(p);
  else dora_cross<R_PAD, ROWS, false><<<blocks, kThreads, 0, stream>>>(p);
}

template <int R_PAD, int ROWS>
void launch_project_rank(const LoraProjectParams& p, cudaStream_t stream) {
  const int64_t rows_per_cta = int64_t(kWarps) * ROWS;
  const unsigned blocks = unsigned((p.m + rows_per_cta - 1) / rows_per_cta);
  if (p.kind == FloatKind::kBFloat16) lora_project<R_PAD, ROWS, __nv_bfloat16><<<blocks, kThreads, 0, stream>>>(p);
  else lora_project<R_PAD, ROWS, __half><<<blocks, kThreads, 0, stream>>>(p);
}

}  // namespace

// ROWS * R_PAD accumulators per thread: 64 at most (registers).
void launch_dora_cross(const DoraCrossParams& p, cudaStream_t stream) {
  if (p.r <= 8) launch_cross_rank<8, 4>(p, stream);
  else if (p.r <= 16) launch_cross_rank<16, 4>(p, stream);
  else if (p.r <= 32) launch_cross_rank<32, 2>(p, stream);
  else launch_cross_rank<64, 1>(p, stream);
}

void launch_lora_project(const LoraProjectParams& p, cudaStream_t stream) {
  if (p.r <= 8) launch_project_rank<8, 4>(p, stream);
  else if (p.r <= 16) launch_project_rank<16, 4>(p, stream);
  else if (p.r <= 32) launch_project_rank<32, 2>(p, stream);
  else launch_project_rank<64, 1>(p, stream);
}

}  // namespace lowrank::lora
