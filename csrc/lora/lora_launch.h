// Parameter struct and launcher of the LoRA/DoRA backward's column reduction: the interface between
// lora_cuda.cpp and lora_reduce.cu (no torch header in the .cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "lora/row_norm_status.h"
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

// The backward's dY products in one read of dY (dy_products.cu): g = dY b_v [M, r] (b_v = b
// col_scale), dh = (dY^T h) col_scale dh_scaling [N, r], dot = sum_M(dY * y) [N] (divided by
// dot_divisor where it is nonzero, 0 where it is 0) when y is given; bf16 dY and y (16-byte
// aligned rows, N % 64 == 0), b and h float32 row-major, r <= kDyProductsMaxRank. The kernel
// writes partial sums (g over column strips of lora_dy_products_strip_cols(y != nullptr), dh and
// dot over row chunks) and a second launch adds them in a fixed order and applies the scales.
struct LoraDyProductsParams {
  const void* dy;           // [M, N] bf16
  const void* y;            // [M, N] bf16 or nullptr
  const float* b;           // [N, r]
  const float* h;           // [M, r]
  const float* col_scale;   // [N] or nullptr
  float dh_scaling;
  const float* dot_divisor; // [N] or nullptr
  int64_t m, n;
  int r;
  int row_chunks;           // grid.y
  int64_t chunk_rows;       // a multiple of 16; row_chunks * chunk_rows >= M
  float* g_part;            // [strips, M, r]
  float* dh_part;           // [row_chunks, N, r]
  float* dot_part;          // [row_chunks, N] or nullptr
  float* g;                 // [M, r]
  float* dh;                // [N, r]
  float* dot;               // [N] or nullptr
  uint4* h_frag;            // scratch: lora_dy_products_h_frag_bytes(M), 16-byte aligned
};

constexpr int kDyProductsMaxRank = 16;

int64_t lora_dy_products_strip_cols(bool dot);
inline int64_t lora_dy_products_h_frag_bytes(int64_t m) { return (m + 15) / 16 * 32 * 2 * 16; }
int lora_dy_products_ctas_per_sm(bool dot);
void launch_lora_dy_products(const LoraDyProductsParams& p, cudaStream_t stream);

// DoRA's cross term P = W0 A^T [N, r] in float32 straight from the packed 4-bit W0 [N, K]: each
// weight is the exact float32 dequantized value (value * absmax, as dequantize_4bit), products and
// sums in float32 (no 16-bit rounding anywhere: the norm's error model needs float32 accuracy).
struct DoraCrossParams : quant::Packed4bitWeight {  // K % 4 == 0, packed 2-byte aligned
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
struct LoraMerge4bitParams : quant::Packed4bitWeight {  // K % 4 == 0, packed 2-byte aligned
  const float* a;               // [r, K] float32, row-major
  const float* b;               // [N, r] float32, row-major
  const float* row_scale;       // [N] float32 (DoRA's v) or nullptr
  float scaling;
  int r;                        // 1 .. kLoraMergeMaxRank
  FloatKind out_kind;
  void* out;                    // [N, K] row-major
  void* fragments;              // merge_mma.cu's scratch: lora_merge_4bit_mma_fragment_bytes(N), 16-byte aligned
};

constexpr int kLoraMergeMaxRank = 32;

void launch_lora_merge_4bit(const LoraMerge4bitParams& p, cudaStream_t stream);

// The tensor-core variant (merge_mma.cu): 16-bit outputs, r <= kMergeMmaMaxRank, K % 64 == 0,
// blocksize >= 16, packed 4-byte aligned, N K < 2^31; the rank-r product from split-bf16 mma (error ~2^-15 of
// sum |s v B| |A|, not bit-identical to the CPU op). launch_lora_merge_4bit takes it where it
// applies unless LOWRANK_MERGE_MMA=0.
constexpr int kMergeMmaMaxRank = 16;
constexpr int64_t kMergeMmaMaxElements = (int64_t(1) << 31) - 1;  // N K: its index math is int
bool lora_merge_4bit_mma_takes(const LoraMerge4bitParams& p);
int64_t lora_merge_4bit_mma_fragment_bytes(int64_t n);  // the (s v) B fragments, any split up to 3
void launch_lora_merge_4bit_mma(const LoraMerge4bitParams& p, cudaStream_t stream);

// The merged weight W' = round_T(v (W0 + s B A)) [N, K] from a 16-bit W0 of the same type T (a float
// base: the LoRA/DoRA layer's bf16 or fp16 nn.Linear), merge_mma.cu's tiles with W0's elements where
// the 4-bit kernel dequantizes codes: per element fma(w0, v, (s v B) A) rounded once, the rank-r
// product from 2-way split-bf16 mma (~2^-15 of sum |s v B| |A|, as the 4-bit mma kernel). Needs
// r <= kMergeMmaMaxRank, K % 64 == 0, N K < 2^31 and w, a and b 16-byte aligned (the CUDA op checks).
struct LoraMergeDenseParams {
  const void* w;                // [N, K] T, row-major
  int64_t n, k;
  const float* a;               // [r, K] float32, row-major
  const float* b;               // [N, r] float32, row-major
  const float* row_scale;       // [N] float32 (DoRA's v) or nullptr
  float scaling;
  int r;
  FloatKind kind;               // of w and out: fp16 or bf16
  void* out;                    // [N, K] row-major
  void* fragments;              // lora_merge_4bit_mma_fragment_bytes(N), 16-byte aligned
};

void launch_lora_merge_dense(const LoraMergeDenseParams& p, cudaStream_t stream);

// DoRA's row norm n_o = ||W0_o + s B_o A|| straight from the packed weight (merge_mma.cu: the
// merge's tiles with 3-way split mma, squared and summed per 64-column strip into `partial`
// (dora_row_norm_partial_size floats: [K / 64, N], then [K / 64, 16] of A's squares), then added
// in float64), and the rows whose bound unit (t_o / n_o + 1) exceeds rtol (t_o = |s| sum_j |B_oj|
// ||A_j||). merge.row_scale must be null and lora_merge_4bit_mma_takes true of merge (any out_kind).
// With a magnitude m (DoRA's), also DoRA's row scale v = m / n (float32, rounded once, as m / n in
// PyTorch). status: bit 0 set when a row is flagged, bit 1 when some m_o == 0 (the caller's two
// questions in one word, read back with one copy).
struct DoraRowNormParams {
  LoraMerge4bitParams merge;
  double unit, rtol;
  float* norm;              // [N]
  bool* flagged;            // [N]
  const float* magnitude;   // [N] or nullptr
  float* row_scale;         // [N] when magnitude is given
  int* status;              // [1]
};

int64_t dora_row_norm_partial_size(int64_t n, int64_t k);
void launch_dora_row_norm(const DoraRowNormParams& q, float* partial, cudaStream_t stream);

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

// The other end of a split product: parts float32 [rows, 3 cols] (a 16-bit operand times
// [hi | mid | lo]) -> out = scale * ((hi part + mid part) + lo part), float32 [rows, cols], or its
// transpose [cols, rows] (row-major either way).
struct SplitSumParams {
  const float* parts;
  int64_t rows, cols;
  float scale;
  bool transpose;
  float* out;
};

void launch_split_bf16x3_sum(const SplitSumParams& p, cudaStream_t stream);

}  // namespace lowrank::lora
