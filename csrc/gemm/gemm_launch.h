// Parameter struct and launcher of the fused 4-bit matmul kernels: the whole interface between
// the torch-facing C++ (gemm_cuda.cpp) and the .cu files, which include no torch header.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "quant/quant_launch.h"  // FloatKind

namespace lowrank::gemm {

using quant::FloatKind;

// y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] 4-bit in bitsandbytes' layout (row n is the
// packed bytes [n K/2, (n+1) K/2), codes of element pairs high nibble first).
struct Gemm4bitParams : quant::Packed4bitWeight {  // packed 8-byte aligned; blocksize >= kSkinnyChunk divides K
  const void* x;        // [M, K] row-major, 16-byte aligned; fp16 or bf16 (kind)
  FloatKind kind;       // of x, bias and out
  int64_t m;
  const void* bias;     // [N] in kind, or nullptr
  void* out;            // [M, N] in kind
  bool generic_lookup;  // the skinny kernel's table lookups through generic addresses (A/B; default off)
  int sms;              // of the device: the wgmma kernel's tile choice
  int cc_major;         // of the device: 9 lets the skinny call take its bulk-copy kernel
};

// The skinny kernel: weights dequantized in registers straight into tensor-core fragments
// (mma.sync m16n8k16, fp32 accumulation), x rows as the 8-wide N side of the mma. One fragment
// column block of 8 x rows per TILES_M, so M <= 16 costs at most two mma per weight fragment.
constexpr int kSkinnyMaxM = 16;
// k per mma chunk: 4 mma k-steps of 16 that share one absmax per weight row, hence the
// requirement blocksize >= 64 and K % blocksize == 0 (a block never straddles a row or a chunk).
constexpr int kSkinnyChunk = 64;

// Picks the kernel: on Hopper (cc_major 9) with the packed weight 16-byte aligned, the one whose
// codes arrive in shared memory by bulk copies (gemm_4bit_skinny_tma.cu); elsewhere the one that
// loads them into registers (gemm_4bit_skinny.cu). LOWRANK_SKINNY_TMA=0 forces the latter (A/B).
void launch_gemm_4bit_skinny(const Gemm4bitParams& p, cudaStream_t stream);
// row_tiles: 1 or 2 (16 or 32 weight rows per tile). Returns false, having launched nothing, when
// the build has no sm_90 code for it.
bool launch_gemm_4bit_skinny_tma(const Gemm4bitParams& p, int row_tiles, cudaStream_t stream);

// The backward's dX [M, K] = dY [M, N] @ W for M <= 16 (gemm_4bit_skinny_t.cu): bf16 dY (the
// scaled dY is split into two bf16 halves; float16's range could not hold dY * absmax), the
// forward skinny kernel's blocksize rule, the packed weight 16-byte aligned (its codes are staged
// by 16-byte copies). A grid of (K / 512) x splits of N; with more than one split, fp32 partial
// sums in a workspace added by a second kernel in split order.
struct Gemm4bitGradParams : quant::Packed4bitWeight {
  const void* dy;       // [M, N] row-major, bf16 (kind)
  FloatKind kind;
  int64_t m;
  void* out;            // [M, K] in kind
  float* partial;       // [splits][M][K] workspace, or nullptr with one split
  int rows_per_split;   // a multiple of 16
  bool generic_lookup;  // the table lookups through generic addresses (A/B)
};
struct SkinnyGradPlan {
  int64_t k_groups = 0, splits = 0, rows_per_split = 0;
  int64_t workspace_bytes = 0;  // 0 with one split
};
SkinnyGradPlan plan_gemm_4bit_skinny_grad_x(int64_t m, int64_t n, int64_t k, int sms);
void launch_gemm_4bit_skinny_grad_x(const Gemm4bitGradParams& p, const SkinnyGradPlan& plan, cudaStream_t stream);

// The wgmma kernel (sm_90a): the dequantized weight as wgmma's register A operand, x tiles brought
// by TMA as its shared-memory B operand (gemm_4bit_wgmma.cu). Takes fp16/bf16 x with K % 64 == 0
// (one 128-byte swizzle row per k step), blocksize >= 64, N % 8 == 0 (16-byte stores of y), x
// and the packed codes 16-byte aligned (TMA). Returns nullptr, or why it could not launch.
constexpr int kWgmmaTileK = 64;
// The kernel has no static shared arrays and expects its dynamic shared memory, whose first 64 KB
// are the pair table, to start after this much reserved per block (sm_90: 1 KB), because its
// lookups take the table's window offset as an immediate (it traps otherwise); the dispatch
// checks cudaDevAttrReservedSharedMemoryPerBlock.
constexpr int kWgmmaReservedSmem = 1024;
// Tokens per CTA by M (the wgmma's N): 64, 128, or 256. Above M = 128 the widest tile wins: each
// dequantized weight fragment feeds 256 tokens, so the lookups per multiply-add are halved
// (28672 x 8192, M = 2048: 1459 us against 2049 us for 256 rows x 128 tokens, same run).
constexpr int64_t wgmma_token_tile(int64_t m) { return m <= 64 ? 64 : (m <= 128 ? 128 : 256); }
constexpr int64_t wgmma_ctas(int64_t m, int64_t n, int64_t rows_per_cta = 128) {
  return ((n + rows_per_cta - 1) / rows_per_cta) * ((m + wgmma_token_tile(m) - 1) / wgmma_token_tile(m));
}
// Weight rows per CTA: 128, or 256 (two 64-row blocks per consumer warpgroup) for token tiles of
// 64 and 128 when that grid needs no more time in waves than the 128-row grid (a 256-row CTA
// takes about twice as long). 256-row CTAs read each x tile for twice the rows and run in one
// wave where 128-row ones need two: 28672 x 8192 at M = 17 / 64 112.6 / 114.3 us against
// 154 / 142 (128 x 128) and ~134 (128 x 64) before; at M = 128 145-155 us against 157. 14336 x
// 4096 at M <= 128 stays at 128 rows (56 CTAs of 256 rows would leave 76 SMs idle).
constexpr int64_t wgmma_rows_per_cta(int64_t m, int64_t n, int64_t sms) {
  if (wgmma_token_tile(m) == 256) return 128;  // 256 x 256 would need 256 accumulators per thread
  const int64_t waves_256 = (wgmma_ctas(m, n, 256) + sms - 1) / sms;
  const int64_t waves_128 = (wgmma_ctas(m, n, 128) + sms - 1) / sms;
  return 2 * waves_256 <= waves_128 ? 256 : 128;
}
// The dispatch rule's bound on M (docs/design.md): above it cuBLAS on a dequantized weight is
// faster. H100, wgmma kernel with pair-table lookups (2026-11-25), eager, wgmma against dequantize
// + cuBLAS, us: M = 1024: 28672 x 8192 886 / 966, 14336 x 4096 213 / 218, 4096 x 14336 167 / 209,
// 4096 x 4096 66 / 88; M = 2048: 1371-1549 / 1541-1552, 357-449 / 400-423, 332-370 / 388-399,
// 103 / 109 (two runs; the one loss, 14336 x 4096 in the second, within eager timing's spread at
// this size); M = 4096: 3072 / 2932, 897 / 749, 803 / 760, 224 / 211. So 2048 for every weight.
constexpr int64_t kWgmmaMaxAutoM = 2048;
constexpr int64_t wgmma_max_auto_m(int64_t /*n*/, int64_t /*k*/) { return kWgmmaMaxAutoM; }
// CTAs of a short wgmma grid (fewer tiles than half the SMs): up to one per SM with the tiles x
// k steps cut evenly among them (stream-K; gemm_4bit_wgmma.cu), each CTA at least
// kWgmmaMinStepsPerCta k steps; when that leaves no more CTAs than tiles, one per tile. 4096 x
// 14336 at M = 17 / 64 / 128 / 256 (H100, graph-timed, 2026-11-25): 39.9 / 40.0 / 52.4 / 66.0 us
// with 132 CTAs (27-54 steps each) against 42.5 / 42.0 / 53.5 / 75.3 with 112 (32 steps, the
// bound before). 64-token tiles (M <= 64) take 8 steps per CTA at least: 4096 x 4096 (16 tiles
// x 64 steps) then gets 128 CTAs and the wgmma path, 23.0 / 22.7 / 22.6 us at M = 17 / 32 / 64
// against 25.6 / 25.3 / 25.7 for the dequantize path. With 128- and 256-token tiles the cut did
// not pay there (132 CTAs at M = 128 / 256: 32.2 / 33.6 against 28.7 / 32.5), so 24 steps give it
// 42 CTAs, under the dispatch rule's half of the SMs: the dequantize path at M = 129-256, 64-token
// tiles at M = 65-128 (wgmma_short_grid_64_ctas). A weight of 1024 x
// 4096 (4 tiles, 256 steps: 32 CTAs) keeps the dequantize path at every M.
constexpr int64_t kWgmmaMinStepsPerCta = 24;
constexpr int64_t kWgmmaMinStepsPerCta64 = 8;  // 64-token tiles
// Up to one CTA per SM, each with min_steps k steps at least, and never fewer CTAs than tiles.
constexpr int64_t stream_k_ctas_of(int64_t tiles, int64_t k_tiles, int64_t sms, int64_t min_steps) {
  const int64_t by_steps = tiles * k_tiles / min_steps;
  const int64_t ctas = by_steps < sms ? by_steps : sms;
  return ctas > tiles ? ctas : tiles;
}
constexpr int64_t wgmma_stream_k_ctas(int64_t tiles, int64_t k_tiles, int64_t sms, int64_t tokens) {
  return stream_k_ctas_of(tiles, k_tiles, sms, tokens <= 64 ? kWgmmaMinStepsPerCta64 : kWgmmaMinStepsPerCta);
}
// M = 65-128 where 128-token tiles, even cut by k, leave more than half the SMs idle (4096 x 4096:
// 16 tiles of 256 rows x 64 steps make 42 CTAs of 24 steps): 128 x 64 tiles (two token tiles), cut
// into up to one CTA per SM of kWgmmaMinStepsPerCta steps at least, which gives 4096 x 4096 132
// CTAs of 31 steps: 26.3 / 25.4 / 25.6 us at M = 65 / 96 / 128 against 26.8 / 26.3 / 28.9 for the
// dequantize path (H100, graph-timed, 2026-11-25; 256 x 64 tiles 26.3 / 26.4 / 26.6). 1024 x 4096
// (16 tiles: 42 CTAs) stays on the dequantize path, which was faster there (13.4-13.6 us against
// 16.7 with 128 CTAs of 8 steps).
constexpr int64_t wgmma_short_grid_64_ctas(int64_t tiles, int64_t k_tiles, int64_t sms) {
  return stream_k_ctas_of(tiles, k_tiles, sms, kWgmmaMinStepsPerCta);
}
// CTAs of a grid of at least half but at most 90% as many tiles as SMs: one per SM (stream-K)
// when each CTA still gets at least kWgmmaMinStepsPerCtaMedium k steps, else one per tile (with
// more tiles the even cut saves too little to pay for itself: 128 tiles on 132 SMs, 3%). A CTA whose range
// cuts a tile pays a fixed cost (its partial sums out, or the other CTAs' sums in), which a long
// range hides: 28672 x 8192 at M = 17 / 64 (112 tiles, 108.6 steps per CTA) 106.6 / 108.5 us
// against 114.4 / 114.2 one CTA per tile, M = 128 146.8 against 146.2; 14336 x 4096 at M = 17 /
// 64 / 128 (112 tiles, 54 steps) 39.1 / 37.5 / 45.0 against 33.0-34.3 / 33.1-33.5 / 38.5-39.0.
constexpr int64_t kWgmmaMinStepsPerCtaMedium = 64;
constexpr int64_t wgmma_medium_grid_ctas(int64_t tiles, int64_t k_tiles, int64_t sms) {
  if (10 * tiles > 9 * sms) return tiles;
  return tiles * k_tiles >= sms * kWgmmaMinStepsPerCtaMedium ? sms : tiles;
}
// How a call runs: the CTA tile, the grid, and the workspace a stream-K grid needs (fp32 partial
// sums and a flag per CTA); error says why it cannot (a bad LOWRANK_WGMMA_* setting).
struct WgmmaPlan {
  int rows = 0, tokens = 0;  // per CTA tile
  int tiles = 0, iters = 0, ctas = 0;
  int64_t workspace_bytes = 0;  // 0 without stream-K
  bool ss = false;  // the 128 x 256 tiles by the shared-memory-operand kernel (gemm_4bit_wgmma_ss.cu)
  const char* error = nullptr;
};
WgmmaPlan plan_gemm_4bit_wgmma(const Gemm4bitParams& p);
// workspace: plan.workspace_bytes of device memory, or nullptr when that is 0.
const char* launch_gemm_4bit_wgmma(const Gemm4bitParams& p, const WgmmaPlan& plan, void* workspace,
                                   cudaStream_t stream);
// The same product with the weight dequantized into shared memory by a warpgroup of its own and
// both wgmma operands read from shared memory (gemm_4bit_wgmma_ss.cu): 128 weight rows x 256 tokens
// per CTA, one CTA per tile. The plan picks it for those tiles (LOWRANK_WGMMA_KERNEL=rs|ss forces
// one kernel; read per launch). Returns nullptr, or why it could not launch.
const char* launch_gemm_4bit_wgmma_ss(const Gemm4bitParams& p, int tokens, cudaStream_t stream);

// The backward's dX [M, K] = dY [M, N] @ W on Hopper for M > 16 by the same kernel (transposed A:
// the dequantized tile is W^T in W's own layout), 128 k x 128 or 256 tokens per CTA, the reduction
// over N cut into ranges when the K / 128 row tiles leave SMs idle; fp16/bf16 dY with N % 8 == 0
// (its TMA rows), K % 64 == 0, blocksize >= 64, the packed weight 16-byte aligned.
// kGradMinStepsPerRange: steps of 64 rows of W per range at least (shorter ranges mostly fill and
// drain the stage ring).
constexpr int64_t kGradMinStepsPerRange = 16;
// The backward's rule takes this kernel up to this M (above it, dequantize + cuBLAS; docs/design.md).
constexpr int64_t kGradWgmmaMaxAutoM = 256;
struct GradWgmmaPlan {
  int64_t tokens = 0, splits = 0, steps_per_split = 0, ctas = 0;
  int64_t workspace_bytes = 0;  // fp32 partial sums [splits][M][K] when splits > 1
};
GradWgmmaPlan plan_gemm_4bit_grad_x_wgmma(int64_t m, int64_t n, int64_t k, int sms);
// p.partial: plan.workspace_bytes of device memory when that is > 0. Returns nullptr, or why it
// could not launch.
const char* launch_gemm_4bit_grad_x_wgmma(const Gemm4bitGradParams& p, const GradWgmmaPlan& plan,
                                          cudaStream_t stream);
// out [count] in kind = the sum of partial [splits][count] fp32 in split order (gemm_4bit_skinny_t.cu).
void launch_sum_splits(const float* partial, void* out, FloatKind kind, int64_t count, int splits,
                       cudaStream_t stream);

}  // namespace lowrank::gemm
