// Parameter struct and launcher of the LoRA/DoRA backward's column reduction: the interface between
// lora_cuda.cpp and lora_reduce.cu (no torch header in the .cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "quant/quant_launch.h"  // FloatKind

namespace lowrank::lora {

using quant::FloatKind;

// For each column j of dy [M, N]:  dh[j, k] = sum_i dy[i, j] h[i, k]  (k < r; = (dy^T h)[j, k])
//                                  dot[j]   = sum_i dy[i, j] y[i, j]   (when y is given)
// in fp32, the rows of a column added in a fixed order (deterministic): each of `splits` row ranges
// writes its partial sums, which the caller adds (at::sum over the split dimension). r = 0 (with y):
// the dot alone, by a streaming kernel that needs N % 8 == 0 and 16-byte aligned dy and y.
struct ColumnReduceParams {
  const void* dy;   // [M, N] row-major, kind; N even, 4-byte aligned rows
  const void* h;    // [M, r] row-major, kind or float32 (h_float), 16-byte aligned rows (padded by the caller)
  bool h_float;
  const void* y;    // [M, N] like dy, or nullptr
  FloatKind kind;   // fp16 or bf16
  int64_t m, n;
  int r;            // rank (<= 32), or 0: the dot alone
  int h_stride;     // elements per row of h (>= r; 16 bytes: a multiple of 8, of 4 for float32)
  int splits;       // row ranges handled by separate CTAs (grid.y); the caller adds the partials
  float* dh;        // [splits, N, r] fp32 partial sums
  float* dot;       // [splits, N] fp32 partial sums, or nullptr when y is nullptr
};

constexpr int kColumnReduceMaxRank = 32;

void launch_column_reduce(const ColumnReduceParams& p, cudaStream_t stream);

// DoRA's cross term P = W0 A^T [N, r] in float32 straight from the packed 4-bit W0 [N, K]: each
// weight is the exact float32 dequantized value (value * absmax, as dequantize_4bit), products and
// sums in float32 (no 16-bit rounding anywhere: the norm's error model needs float32 accuracy).
struct DoraCrossParams {
  const uint8_t* packed;        // [N K / 2], 2-byte aligned
  int64_t n, k;                 // K % 4 == 0
  int blocksize;
  const float* values;          // [16]
  const float* absmax;          // [n_blocks] or nullptr when nested
  const uint8_t* absmax_codes;  // nested
  const float* nested_absmax;
  const float* nested_qmap;
  const float* offset;
  int nested_blocksize;
  const float* a;               // [r, K] float32, 16-byte aligned rows (K % 4 == 0)
  int r;                        // <= kDoraCrossMaxRank
  float* p;                     // [N, r] float32
};

constexpr int kDoraCrossMaxRank = 64;

void launch_dora_cross(const DoraCrossParams& p, cudaStream_t stream);

// out = x a^T in float32: x [M, K] fp16/bf16 row-major (8-byte aligned rows, K % 4 == 0), a float32
// [r, K] (16-byte aligned rows), r <= kDoraCrossMaxRank. The adapter's h = x A^T and g = dY B.
struct LoraProjectParams {
  const void* x;
  FloatKind kind;
  int64_t m, k;
  const float* a;
  int r;
  float* out;  // [M, r]
};

void launch_lora_project(const LoraProjectParams& p, cudaStream_t stream);

// The merged weight W' = round_T(v (W0 + s B A)) [N, K] straight from the packed 4-bit W0 (merge.cu
// gives the exact arithmetic): the LoRA/DoRA layer's two big GEMMs then take it as their weight.
struct LoraMerge4bitParams {
  const uint8_t* packed;        // [N K / 2], 2-byte aligned
  int64_t n, k;                 // K % 4 == 0
  int blocksize;
  const float* values;          // [16]
  const float* absmax;          // [n_blocks] or nullptr when nested
  const uint8_t* absmax_codes;  // nested
  const float* nested_absmax;
  const float* nested_qmap;
  const float* offset;
  int nested_blocksize;
  const float* a;               // [r, K] float32, row-major
  const float* b;               // [N, r] float32, row-major
  const float* row_scale;       // [N] float32 (DoRA's v) or nullptr
  float scaling;
  int r;                        // 1 .. kLoraMergeMaxRank
  FloatKind out_kind;
  void* out;                    // [N, K] row-major
};

constexpr int kLoraMergeMaxRank = 32;

void launch_lora_merge_4bit(const LoraMerge4bitParams& p, cudaStream_t stream);

// The tensor-core variant (merge_mma.cu, branch wip/merge-mma): 16-bit outputs, r <= 16,
// K % 64 == 0; the rank-r product from split-bf16 mma (error ~2^-15 of sum |s v B| |A|, not bit-
// identical to the CPU op). launch_lora_merge_4bit takes it where it applies unless
// LOWRANK_MERGE_MMA=0.
bool lora_merge_4bit_mma_takes(const LoraMerge4bitParams& p);
void launch_lora_merge_4bit_mma(const LoraMerge4bitParams& p, cudaStream_t stream);

// DoRA's row norm from the expansion (dora_norm.cu): n float32 [N] and the rows whose bound says
// the expansion may be off by more than rtol, bool [N].
struct DoraNormParams {
  const double* w2;    // [N] ||W0_o||^2
  const float* p;      // [N, r] P = W0 A^T, row-major
  const float* b;      // [N, r] lora_B, row-major
  const double* gram;  // [r, r] A A^T
  int64_t n;
  int r;               // <= kDoraNormMaxRank (the Gram matrix in shared memory)
  double scaling, unit_cross, unit_fp64, rtol;
  float* norm;
  bool* flagged;
};

constexpr int kDoraNormMaxRank = 64;  // the Gram matrix and its diagonal: 33 KB of shared memory

void launch_dora_norm(const DoraNormParams& p, cudaStream_t stream);

// b float32 [rows, cols] (strided) -> out bf16 [rows, 3 cols] = [hi | mid | lo], hi + mid + lo == b.
struct SplitParams {
  const float* b;
  int64_t rows, cols, row_stride, col_stride;
  void* out;
};

void launch_split_bf16x3(const SplitParams& p, cudaStream_t stream);

}  // namespace lowrank::lora
