// The LoRA/DoRA backward's column reduction over the rows of dY: dB's dY^T h and DoRA's
// sum_M(dY * y) in one read of dY (and y). Math: lowrank/lora_function.py (backward).
//
// Why a kernel: at M = 8192 tokens of a 14336-wide output, dY and y are 235 MB each. As PyTorch ops,
// dB = dY^T h is one read of dY (a GEMM with a 16-wide side, memory-bound) and DoRA's dm is a
// product and a sum over [M, out] (at least two more passes, with a float32 temporary): here both
// come from one pass over dY and y, 470 MB, ~160 us at 3 TB/s, 17 FMA per element of dY at r = 16
// (60 us of the FMA pipe): bound by memory.
//
// Work split: a CTA owns 64 columns (each lane two adjacent ones, 4-byte loads: a warp reads 128
// contiguous bytes of a row) and one of `splits` row ranges (grid.y, so that narrow outputs still
// fill the GPU); its warps split that range, each issuing the loads of kRows rows before using
// them, accumulate in fp32 registers, and add their partial sums in shared memory in warp order.
// The split partials go to a workspace the caller sums: deterministic throughout.
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kColumns = 64;  // per CTA: 32 lanes x 2
constexpr int kRows = 4;      // rows whose loads a warp issues before their math

template <typename T, int R_PAD, int WARPS, bool WITH_Y, bool H_FLOAT>
__global__ void __launch_bounds__(32 * WARPS) column_reduce(ColumnReduceParams p) {
  extern __shared__ float s_partial[];  // [WARPS][kColumns][R_PAD + 1]
  constexpr int kSlots = R_PAD + 1;
  constexpr int kPerVec = H_FLOAT ? 4 : 8;  // elements of h per 16-byte vector
  constexpr int kVecs = R_PAD / kPerVec;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.x) * kColumns + 2 * lane;
  const bool col_ok = col < p.n;  // n is even: both columns exist or neither
  const int64_t split_rows = (p.m + p.splits - 1) / p.splits;
  const int64_t split_begin = int64_t(blockIdx.y) * split_rows;
  const int64_t split_end = split_begin + split_rows < p.m ? split_begin + split_rows : p.m;
  const int64_t warp_rows = (split_rows + WARPS - 1) / WARPS;
  const int64_t row_begin = split_begin + warp * warp_rows;
  const int64_t row_end = row_begin + warp_rows < split_end ? row_begin + warp_rows : split_end;
  const uint32_t* dy = static_cast<const uint32_t*>(p.dy);  // two elements per word
  const uint32_t* y = static_cast<const uint32_t*>(p.y);
  const uint4* h = static_cast<const uint4*>(p.h);
  const int64_t words_per_row = p.n / 2, h_vecs_per_row = p.h_stride / kPerVec;

  float acc[2][kSlots];
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int k = 0; k < kSlots; ++k) acc[c][k] = 0.0f;

  if (col_ok) {
    for (int64_t i0 = row_begin; i0 < row_end; i0 += kRows) {
      uint32_t g_bits[kRows], y_bits[kRows];
      uint4 h_raw[kRows][kVecs];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t i = i0 + u;
        const bool ok = i < row_end;
        g_bits[u] = ok ? dy[i * words_per_row + col / 2] : 0u;  // 0 bits = +0.0: adds nothing
        y_bits[u] = (WITH_Y && ok) ? y[i * words_per_row + col / 2] : 0u;
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {  // the same 16 bytes for every lane: a broadcast load
          h_raw[u][v] = (ok && v < h_vecs_per_row) ? h[i * h_vecs_per_row + v] : make_uint4(0u, 0u, 0u, 0u);
        }
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const float2 g = pair_to_float2<T>(g_bits[u]);
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          const uint32_t words[4] = {h_raw[u][v].x, h_raw[u][v].y, h_raw[u][v].z, h_raw[u][v].w};
          if constexpr (H_FLOAT) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float hv = __uint_as_float(words[e]);
              const int k = v * 4 + e;
              acc[0][k] = fmaf(g.x, hv, acc[0][k]);
              acc[1][k] = fmaf(g.y, hv, acc[1][k]);
            }
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 hv = pair_to_float2<T>(words[e]);
              const int k = v * 8 + 2 * e;
              acc[0][k] = fmaf(g.x, hv.x, acc[0][k]);
              acc[1][k] = fmaf(g.y, hv.x, acc[1][k]);
              acc[0][k + 1] = fmaf(g.x, hv.y, acc[0][k + 1]);
              acc[1][k + 1] = fmaf(g.y, hv.y, acc[1][k + 1]);
            }
          }
        }
        if constexpr (WITH_Y) {
          const float2 yv = pair_to_float2<T>(y_bits[u]);
          acc[0][R_PAD] = fmaf(g.x, yv.x, acc[0][R_PAD]);
          acc[1][R_PAD] = fmaf(g.y, yv.y, acc[1][R_PAD]);
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int k = 0; k < kSlots; ++k) s_partial[(warp * kColumns + 2 * lane + c) * kSlots + k] = acc[c][k];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kColumns * kSlots; idx += 32 * WARPS) {
    const int c = idx / kSlots, k = idx % kSlots;
    const int64_t j = int64_t(blockIdx.x) * kColumns + c;
    const bool is_dot = k == R_PAD;
    if (j >= p.n || (!is_dot && k >= p.r) || (is_dot && !WITH_Y)) continue;
    float sum = 0.0f;
    for (int w = 0; w < WARPS; ++w) sum += s_partial[(w * kColumns + c) * kSlots + k];
    if (is_dot) p.dot[int64_t(blockIdx.y) * p.n + j] = sum;
    else p.dh[(int64_t(blockIdx.y) * p.n + j) * p.r + k] = sum;
  }
}

// DoRA's sum_M(dY * y) alone (the caller passes r = 0: dY^T h then comes from cuBLAS, see
// lowrank/lora_function.py). Pure streaming: 470 MB at M = 8192, N = 14336, ~160 us at 3 TB/s; the
// fused column_reduce above spent 724 us on the H100 with r = 16 (its h broadcast loads and 34 FMA
// per pair of dY elements, not the bytes, bound it). Each lane owns 8 adjacent columns (16-byte
// loads: a warp reads 512 contiguous bytes of a row of dY and of y), a CTA 256 columns and one row
// split; its warps split the rows and add their sums in shared memory in warp order.
constexpr int kDotWarps = 8;
constexpr int kDotColumns = 32 * 8;
constexpr int kDotRows = 4;  // rows whose loads a warp issues before their math

template <typename T>
__global__ void __launch_bounds__(32 * kDotWarps) column_dot(ColumnReduceParams p) {
  __shared__ float s_partial[kDotWarps][kDotColumns + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.x) * kDotColumns + 8 * lane;
  const bool col_ok = col < p.n;  // n % 8 == 0: all 8 columns exist or none
  const int64_t split_rows = (p.m + p.splits - 1) / p.splits;
  const int64_t split_begin = int64_t(blockIdx.y) * split_rows;
  const int64_t split_end = split_begin + split_rows < p.m ? split_begin + split_rows : p.m;
  const int64_t warp_rows = (split_rows + kDotWarps - 1) / kDotWarps;
  const int64_t row_begin = split_begin + warp * warp_rows;
  const int64_t row_end = row_begin + warp_rows < split_end ? row_begin + warp_rows : split_end;
  const uint4* dy = static_cast<const uint4*>(p.dy);
  const uint4* y = static_cast<const uint4*>(p.y);
  const int64_t vecs_per_row = p.n / 8;

  float acc[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) acc[c] = 0.0f;
  if (col_ok) {
    for (int64_t i0 = row_begin; i0 < row_end; i0 += kDotRows) {
      uint4 g[kDotRows], v[kDotRows];
#pragma unroll
      for (int u = 0; u < kDotRows; ++u) {
        const int64_t i = i0 + u;
        const bool ok = i < row_end;
        g[u] = ok ? dy[i * vecs_per_row + col / 8] : make_uint4(0u, 0u, 0u, 0u);  // 0 bits: +0.0
        v[u] = ok ? y[i * vecs_per_row + col / 8] : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < kDotRows; ++u) {
        const uint32_t gw[4] = {g[u].x, g[u].y, g[u].z, g[u].w};
        const uint32_t vw[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 a = pair_to_float2<T>(gw[e]), b = pair_to_float2<T>(vw[e]);
          acc[2 * e] = fmaf(a.x, b.x, acc[2 * e]);
          acc[2 * e + 1] = fmaf(a.y, b.y, acc[2 * e + 1]);
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) s_partial[warp][8 * lane + c] = acc[c];
  __syncthreads();
  const int c = threadIdx.x;  // one column per thread: 256 threads, 256 columns
  const int64_t j = int64_t(blockIdx.x) * kDotColumns + c;
  if (j < p.n) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kDotWarps; ++w) sum += s_partial[w][c];
    p.dot[int64_t(blockIdx.y) * p.n + j] = sum;
  }
}

template <typename T, int R_PAD, bool WITH_Y, bool H_FLOAT>
void launch_rank(const ColumnReduceParams& p, cudaStream_t stream) {
  // 8 warps split the rows; at r = 32 four, to keep the partials under 48 KB of shared memory.
  constexpr int kWarps = R_PAD <= 16 ? 8 : 4;
  const size_t smem = size_t(kWarps) * kColumns * (R_PAD + 1) * sizeof(float);
  const dim3 grid(unsigned((p.n + kColumns - 1) / kColumns), unsigned(p.splits));
  column_reduce<T, R_PAD, kWarps, WITH_Y, H_FLOAT><<<grid, 32 * kWarps, smem, stream>>>(p);
}

template <typename T, bool WITH_Y, bool H_FLOAT>
void launch_y(const ColumnReduceParams& p, cudaStream_t stream) {
  if (p.r <= 8) launch_rank<T, 8, WITH_Y, H_FLOAT>(p, stream);
  else if (p.r <= 16) launch_rank<T, 16, WITH_Y, H_FLOAT>(p, stream);
  else launch_rank<T, 32, WITH_Y, H_FLOAT>(p, stream);
}

template <typename T, bool H_FLOAT>
void launch_h(const ColumnReduceParams& p, cudaStream_t stream) {
  if (p.y != nullptr) launch_y<T, true, H_FLOAT>(p, stream);
  else launch_y<T, false, H_FLOAT>(p, stream);
}

template <typename T>
void launch_typed(const ColumnReduceParams& p, cudaStream_t stream) {
  if (p.h_float) launch_h<T, true>(p, stream);
  else launch_h<T, false>(p, stream);
}

}  // namespace

void launch_column_reduce(const ColumnReduceParams& p, cudaStream_t stream) {
  if (p.r == 0) {  // the dot alone
    const dim3 grid(unsigned((p.n + kDotColumns - 1) / kDotColumns), unsigned(p.splits));
    if (p.kind == FloatKind::kBFloat16) column_dot<__nv_bfloat16><<<grid, 32 * kDotWarps, 0, stream>>>(p);
    else column_dot<__half><<<grid, 32 * kDotWarps, 0, stream>>>(p);
    return;
  }
  if (p.kind == FloatKind::kBFloat16) launch_typed<__nv_bfloat16>(p, stream);
  else launch_typed<__half>(p, stream);
}

}  // namespace lowrank::lora
