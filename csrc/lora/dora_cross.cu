// DoRA's cross term P = W0 A^T in float32, straight from the packed 4-bit weight: the one pass
// over W0 that DoRA's row norm ||W0 + s B A|| needs at every step (lowrank/dora.py expands the
// norm; this is its P). Math: dequantize_4bit's float32 values times A, float32 sums.
//
// Why CUDA cores and not the tensor cores: the norm's error model (lowrank/dora.py, U_CROSS =
// 2^-18) needs P to float32 accuracy; bf16/fp16/tf32 operands would round W0 or A to 8..11 bits.
// Counts at 14336 x 4096, r = 16: 940 M FMA = 28 us of the FMA pipe; 29 MB of codes = 10 us of
// DRAM; so the design keeps the FMA pipe fed: A is staged in shared memory one 128-wide k chunk at
// a time and each thread applies a float4 of A to ROWS weight rows (A read once per ROWS rows),
// which puts the shared-memory traffic at ~1 wavefront per 8 FMA.
//
// Work split: a CTA owns 8 * ROWS weight rows for the whole K; warp w owns rows [w * ROWS, ..),
// lane l the 4 consecutive k at 4 l of each chunk (a warp reads 64 contiguous bytes per row). The
// lanes' partial sums are added by a fixed xor-shuffle tree: deterministic.
#include <cuda_runtime.h>

#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 128;  // k per shared-memory stage of A: 32 lanes x 4

template <int R_PAD, int ROWS, bool NESTED>
__global__ void __launch_bounds__(kThreads) dora_cross(DoraCrossParams p) {
  __shared__ float4 s_a[R_PAD][kChunk / 4];  // A[j][chunk k .. k + 128) as float4 (r = 64: 32 KB)
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarps + warp) * ROWS;
  const int block_shift = 31 - __clz(p.blocksize);
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
  const float offset = NESTED ? *p.offset : 0.0f;
  const float4* a4 = reinterpret_cast<const float4*>(p.a);
  const int64_t a4_per_row = p.k / 4;

  float acc[ROWS][R_PAD];
#pragma unroll
  for (int q = 0; q < ROWS; ++q)
#pragma unroll
    for (int j = 0; j < R_PAD; ++j) acc[q][j] = 0.0f;

  for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
    const int64_t k = k0 + 4 * lane;
    const bool k_ok = k < p.k;  // K % 4 == 0: the 4 elements exist together
    // This chunk's codes and absmax for the warp's rows, loaded before the barrier.
    uint32_t codes[ROWS];
    float absmax[ROWS];
#pragma unroll
    for (int q = 0; q < ROWS; ++q) {
      const int64_t row = row0 + q;
      const bool ok = k_ok && row < p.n;
      const int64_t flat = row * p.k + k;  // a multiple of 4: the 4 elements share one block
      codes[q] = ok ? *reinterpret_cast<const uint16_t*>(p.packed + flat / 2) : 0u;
      const int64_t block = ok ? flat >> block_shift : 0;
      if constexpr (NESTED) {
        // the float absmax exactly as dequantize_4bit_nested: a rounded product, then a rounded sum
        absmax[q] = ok ? __fadd_rn(__fmul_rn(s_qmap[p.absmax_codes[block]], p.nested_absmax[block >> nested_shift]),
                                   offset)
                       : 0.0f;
      } else {
        absmax[q] = ok ? p.absmax[block] : 0.0f;
      }
    }
    __syncthreads();  // the previous chunk's A is no longer read (and, first time, the tables are in)
    for (int i = threadIdx.x; i < R_PAD * (kChunk / 4); i += kThreads) {
      const int j = i / (kChunk / 4), c = i % (kChunk / 4);
      const int64_t kk4 = k0 / 4 + c;
      s_a[j][c] = (j < p.r && kk4 < a4_per_row) ? a4[j * a4_per_row + kk4] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    __syncthreads();
    // The 4 weights of each row, as float32 dequantized values (codes: first element high nibble).
    float w[ROWS][4];
#pragma unroll
    for (int q = 0; q < ROWS; ++q) {
      const uint32_t b0 = codes[q] & 0xffu, b1 = (codes[q] >> 8) & 0xffu;
      w[q][0] = __fmul_rn(s_values[b0 >> 4], absmax[q]);
      w[q][1] = __fmul_rn(s_values[b0 & 15u], absmax[q]);
      w[q][2] = __fmul_rn(s_values[b1 >> 4], absmax[q]);
      w[q][3] = __fmul_rn(s_values[b1 & 15u], absmax[q]);
    }
#pragma unroll
    for (int j = 0; j < R_PAD; ++j) {
      const float4 a = s_a[j][lane];
#pragma unroll
      for (int q = 0; q < ROWS; ++q) {
        float t = acc[q][j];
        t = fmaf(w[q][0], a.x, t);
        t = fmaf(w[q][1], a.y, t);
        t = fmaf(w[q][2], a.z, t);
        t = fmaf(w[q][3], a.w, t);
        acc[q][j] = t;
      }
    }
  }
  // Sum the 32 lanes' partial dot products (fixed tree), then lane j % 32 stores P[row][j].
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
    if (row < p.n) {
#pragma unroll
      for (int j = 0; j < R_PAD; ++j) {
        if (j % 32 == lane && j < p.r) p.p[row * p.r + j] = acc[q][j];
      }
    }
  }
}

template <int R_PAD, int ROWS>
void launch_rank(const DoraCrossParams& p, cudaStream_t stream) {
  const int64_t rows_per_cta = int64_t(kWarps) * ROWS;
  const unsigned blocks = unsigned((p.n + rows_per_cta - 1) / rows_per_cta);
  if (p.absmax == nullptr) dora_cross<R_PAD, ROWS, true><<<blocks, kThreads, 0, stream>>>(p);
  else dora_cross<R_PAD, ROWS, false><<<blocks, kThreads, 0, stream>>>(p);
}

}  // namespace

void launch_dora_cross(const DoraCrossParams& p, cudaStream_t stream) {
  // ROWS * R_PAD accumulators per thread: 64 at most (registers)
  if (p.r <= 8) launch_rank<8, 4>(p, stream);
  else if (p.r <= 16) launch_rank<16, 4>(p, stream);
  else if (p.r <= 32) launch_rank<32, 2>(p, stream);
  else launch_rank<64, 1>(p, stream);
}

}  // namespace lowrank::lora
