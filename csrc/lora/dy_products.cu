// The LoRA/DoRA backward's products of dY in one read of dY (and of y for DoRA):
//   g = dY B_v [M, r],  dh = dY^T h [N, r],  dot = sum_M(dY * y) [N]   (float32 out)
// Why: as three launches they read dY three times (cuBLAS g 89 us, cuBLAS dh 82 us, the streaming
// dot 157 us with y, on the H100 at M = 8192, N = 14336, r = 16; one read of dY is ~78 us).
//
// bf16 only. All three run on the tensor cores (mma.sync m16n8k16) with dY as loaded: lane
// (g, t) of a warp loads 16 bytes of rows g and g + 8 of a 16-row block in each 32-column half of
// the warp's 64 columns (columns 8t .. 8t + 7), by cp.async into its own slots of a shared-memory
// ring several blocks ahead, and reads them back into registers. As they are, those registers are the A operand of
// g = dY B_v once the k index (a column) is permuted to match (B_v's fragments are built with the
// same permutation, once per CTA, into shared memory). Transposed by movmatrix (an 8 x 8 b16 tile
// per register), they are the B operand of dh^T = h^T dY, whose n index (a column) is permuted
// the same way. The float32 sides (B_v, h) are split into two bf16 parts, hi + lo, two mma each:
// products of bf16 values are exact in the float32 accumulator and hi + lo holds B_v to 2^-16
// relative, far more than the bf16 dY carries. DoRA's dot is the diagonal of y^T dY: y's registers
// transposed the same way are the A operand against dh's B operand (see ddot in the kernel).
//
// Reductions: a CTA owns a strip of WARPS x 64 columns and a chunk of rows. dh and dot are summed
// over the chunk's rows in registers and written once as the chunk's partial sums; g is summed over
// the warps' columns through shared memory per 16-row block and written as the strip's partial
// sums. A second launch (dy_products_finish) adds the partials in a fixed order (deterministic) and
// applies the LoRA/DoRA scales (it replaced three aten::sum launches and up to four small scaling
// kernels). Tried and not kept (branch wip/dy-cluster): the g partials (56 strips x 8192 x 16
// floats = 29 MB at M = 8192, N = 14336) summed first over clusters of 8 strips through
// distributed shared memory, one cluster barrier per 16-row block: the H100 ran the QLoRA layer
// 1.162x its floor against 1.140x without (the barrier's cluster-scope release in every block).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kWarpCols = 64;

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// (x0, x1) -> hi pair and lo pair of bf16 (the lower k in the low half)
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
  const __nv_bfloat16 l0 = __float2bfloat16_rn(__fsub_rn(x0, __bfloat162float(h0)));
  const __nv_bfloat16 l1 = __float2bfloat16_rn(__fsub_rn(x1, __bfloat162float(h1)));
  hi = uint32_t(__bfloat16_as_ushort(h0)) | (uint32_t(__bfloat16_as_ushort(h1)) << 16);
  lo = uint32_t(__bfloat16_as_ushort(l0)) | (uint32_t(__bfloat16_as_ushort(l1)) << 16);
}

// Blocks in flight per warp: a ring of kStages 16-row blocks in shared memory filled by cp.async,
// kStages - 1 blocks ahead of the math. ncu on the H100 at M = 8192, N = 14336, r = 16 (LoRA / with
// y): one block ahead in registers 137 us / -, a 3-stage ring with 8 warps 132 us (DRAM 57%) / 4
// warps 182 us (DRAM 82%), 5 stages with 4 warps 124 us (DRAM 63%). With y now 4 stages of 8 warps
// (see kWarpsDot). LoRA: 4 stages, not 5 (2026-11-24; 4 warps then): 56 KB of shared memory per
// CTA instead of 64, so 4 CTAs fit an SM (4 x 57 KB = 228 KB; 126 registers, 4 x 128 x 128 = the
// whole register file) where 3 did: the same 96 KB of dY in flight per SM, 16 warps instead of 12
// to hide the latency of each block's mma chains. torch.profiler in a QLoRA step: 104.1 us against
// 109.8; paired ratio 1.1343x against 1.1367x (scripts/ab_qdora_env.py, 40 rounds). Then 8 warps
// (see kWarpsNoDot).
constexpr int kStages = 4;

// One 16-row block of a warp's 64 columns as a lane holds it: [row group (g, g + 8)][32-column
// half], 8 bf16 each.
template <bool DOT>
struct BlockRegs {
  uint4 dy[2][2];
  uint4 y[DOT ? 2 : 1][DOT ? 2 : 1];
};

// The ring's slot of one lane: what it copies is what it reads back (no other lane touches it, so
// cp.async.wait_group alone orders the copy and the read).
template <bool DOT>
struct BlockSlot {
  uint4 dy[4][32];  // [2 rg + hf][lane]
  uint4 y[4][32];
};
template <>
struct BlockSlot<false> {
  uint4 dy[4][32];
};

// h^T's fragments for every 16-row block of h, split into hi + lo bf16 once per call rather than
// by every warp of every column strip (56 strips at N = 14336 split the same block: ~40 of the
// ~380 instructions a warp spent on a block, ncu on the H100): [block][lane][hi, lo] uint4 of the
// A operand a0 (r g, m 2t, 2t + 1), a1 (r g + 8, m 2t..), a2 (r g, m 2t + 8..), a3 (r g + 8,
// m 2t + 8..); rows past M and columns past r zero.
__global__ void h_fragments(const float* h, int64_t m, int r, uint4* frag) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= (m + 15) / 16 * 32) return;
  const int64_t m0 = (i >> 5) * 16;
  const int lane = int(i & 31), g = lane >> 2, t = lane & 3;
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int j = g + 8 * (q & 1);
    const int64_t row = m0 + 2 * t + 8 * (q >> 1);
    const float x0 = j < r && row < m ? h[row * r + j] : 0.0f;
    const float x1 = j < r && row + 1 < m ? h[(row + 1) * r + j] : 0.0f;
    split2(x0, x1, hi[q], lo[q]);
  }
  frag[2 * i] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  frag[2 * i + 1] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
}

__device__ __forceinline__ void copy16_async(void* smem, const void* gmem, bool ok) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // src-size 0: nothing read, the 16 bytes zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// Starts the copy of block m0 (rows m0 .. m0 + 15) into a lane's slot and commits it as one group
// (an empty group past the chunk: one group per block keeps wait_group's count). dy_lane / y_lane:
// the lane's first element of row m0 + g (column col + 8t); rows g + 8 are 8 rows further.
template <bool DOT>
__device__ __forceinline__ void issue_block(const LoraDyProductsParams& p, BlockSlot<DOT>& slot, int64_t m0,
                                            int64_t row_end, const __nv_bfloat16* dy_lane,
                                            const __nv_bfloat16* y_lane, bool active, int g, int lane) {
  if (m0 < row_end) {
#pragma unroll
    for (int rg = 0; rg < 2; ++rg) {
      const bool ok = active && m0 + g + 8 * rg < p.m;
      const int64_t off = ok ? 8 * rg * p.n : 0;  // an address inside dY even when nothing is read
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        copy16_async(&slot.dy[2 * rg + hf][lane], (ok ? dy_lane : static_cast<const __nv_bfloat16*>(p.dy)) + off + 32 * hf, ok);
        if constexpr (DOT) copy16_async(&slot.y[2 * rg + hf][lane], (ok ? y_lane : static_cast<const __nv_bfloat16*>(p.y)) + off + 32 * hf, ok);
      }
    }
  }
  copy_commit();
}

template <bool DOT>
__device__ __forceinline__ void read_block(const BlockSlot<DOT>& slot, int lane, BlockRegs<DOT>& regs) {
#pragma unroll
  for (int rg = 0; rg < 2; ++rg) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      regs.dy[rg][hf] = slot.dy[2 * rg + hf][lane];
      if constexpr (DOT) regs.y[rg][hf] = slot.y[2 * rg + hf][lane];
    }
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// Shared memory (dynamic: 176 KB for 8 warps and 4 stages with y, 112 KB without; static shared
// memory stops at 48)
template <int WARPS, bool DOT, int STAGES>
struct DyProductsShared {
  uint2 b[WARPS][4][2][2][32];  // B_v's fragments: a warp's 4 k-chunks x 2 n-tiles x (hi, lo), per lane (b0, b1)
  float g[2][WARPS][16][16];    // the warps' g of a block, double-buffered
  BlockSlot<DOT> ring[STAGES][WARPS];
};

template <int WARPS, bool DOT, int STAGES>
__global__ void __launch_bounds__(32 * WARPS) lora_dy_products(LoraDyProductsParams p) {
  extern __shared__ __align__(16) unsigned char dy_products_smem[];
  auto& shared = *reinterpret_cast<DyProductsShared<WARPS, DOT, STAGES>*>(dy_products_smem);
  auto& s_b = shared.b;
  auto& s_g = shared.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t col = (int64_t(blockIdx.x) * WARPS + warp) * kWarpCols;
  const bool active = col < p.n;  // N % 64 == 0: a warp's columns are all in or all out
  const int64_t row_begin = int64_t(blockIdx.y) * p.chunk_rows;
  const int64_t row_end = row_begin + p.chunk_rows < p.m ? row_begin + p.chunk_rows : p.m;

  auto& ring = shared.ring;
  // the lane's first dY (and y) element of the chunk: row row_begin + g, column col + 8t
  const int64_t lane_off = active ? (row_begin + g) * p.n + col + 8 * t : 0;
  const int64_t block_step = 16 * p.n;
  const __nv_bfloat16* dy_lane = static_cast<const __nv_bfloat16*>(p.dy) + lane_off;
  const __nv_bfloat16* y_lane = DOT ? static_cast<const __nv_bfloat16*>(p.y) + lane_off : nullptr;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    issue_block<DOT>(p, ring[st][warp], row_begin + 16 * st, row_end, dy_lane + st * block_step,
                     DOT ? y_lane + st * block_step : nullptr, active, g, lane);
  }

  // k-chunk c = (half hf, word pair wp): fragment k = 2t' + e is column 32 hf + 8 t' + 4 wp + e,
  // k = 2t' + 8 + e is column 32 hf + 8 t' + 4 wp + 2 + e (t' the lane's t for the A operand, and
  // for the B operand below too: the same function of k)
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int hf = c >> 1, wp = c & 1;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int j = 8 * nt + g;
      float x[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // q: (e, second half of k)
        const int64_t cc = col + 32 * hf + 8 * t + 4 * wp + (q & 1) + 2 * (q >> 1);
        // b_v = b * col_scale, the float32 product (as b * v[:, None] in PyTorch)
        x[q] = (active && j < p.r) ? (p.col_scale != nullptr ? __fmul_rn(p.b[cc * p.r + j], p.col_scale[cc])
                                                              : p.b[cc * p.r + j])
                                   : 0.0f;
      }
      uint32_t hi0, lo0, hi1, lo1;
      split2(x[0], x[1], hi0, lo0);
      split2(x[2], x[3], hi1, lo1);
      s_b[warp][c][nt][0][lane] = make_uint2(hi0, hi1);
      s_b[warp][c][nt][1][lane] = make_uint2(lo0, lo1);
    }
  }

  // dh^T accumulators: n-tile (hf, w) holds rows r = g, g + 8 of columns 32 hf + 8t + 2w + (0, 1)
  float dh[2][4][4];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf)
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
      for (int e = 0; e < 4; ++e) dh[hf][w][e] = 0.0f;
  // DOT: sum_M(dY * y) as the diagonal of y^T dY on the tensor cores (bf16 products exact in the
  // float32 accumulator, as the other two products). Per half hf and word pair q (words w = 2q,
  // w' = 2q + 1 of a lane's 16 bytes): A = y^T over the 16 columns of words w (rows 0..7) and w'
  // (rows 8..15), k = the block's 16 rows; B = dY^T of word w (n = its 8 columns: the B operand
  // dh builds anyway) into accumulator [0], of word w' into [1]. The diagonals, D[j][j] of [0] and
  // D[8 + j][j] of [1], are held by lane (g = j, t = j / 2); the rest of each tile is thrown away.
  // 16 movmatrix and 8 mma per block where the float32 FMAs took ~96 instructions (unpacking
  // included): the kernel 183.7 us against 189.4 (torch.profiler, H100, M = 8192, N = 14336).
  float ddot[DOT ? 2 : 1][DOT ? 2 : 1][DOT ? 2 : 1][4] = {};
  // a block's h^T fragments, per lane, one block ahead in registers (at the point of use an L2
  // round trip sat in every block's critical path; loaded once per CTA through shared memory
  // instead, the kernel ran 125 us against 110)
  uint4 h_cur[2] = {p.h_frag[((row_begin >> 4) * 32 + lane) * 2], p.h_frag[((row_begin >> 4) * 32 + lane) * 2 + 1]};
  __syncthreads();  // s_b
  // DOT: B_v's fragments held in registers through the loop (16 shared loads per block fewer; the
  // kernel has one CTA per SM and registers to spare: 200 per thread. LoRA's CTAs (3 per SM then)
  // went from 126 to 156 registers for no gain: 107.5 us against 107.6)
  uint2 breg[DOT ? 4 : 1][2][2];
  if constexpr (DOT) {
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int u = 0; u < 2; ++u) breg[c][nt][u] = s_b[warp][c][nt][u][lane];
  }
  // the lane's pointers for the block kStages - 1 ahead of the one being read
  const __nv_bfloat16* dy_ahead = dy_lane + (STAGES - 1) * block_step;
  const __nv_bfloat16* y_ahead = DOT ? y_lane + (STAGES - 1) * block_step : nullptr;

  int buf = 0, stage = 0;
#pragma unroll 1
  for (int64_t m0 = row_begin; m0 < row_end; m0 += 16, buf ^= 1) {
    copy_wait<STAGES - 2>();  // this block's group is done (kStages - 2 later ones may be pending)
    BlockRegs<DOT> cur;
    read_block<DOT>(ring[stage][warp], lane, cur);
    // refill the slot read one block ago (this lane's own reads of it are done: their values fed
    // the previous block's math)
    const int refill = stage == 0 ? STAGES - 1 : stage - 1;
    issue_block<DOT>(p, ring[refill][warp], m0 + 16 * (STAGES - 1), row_end, dy_ahead, y_ahead, active, g, lane);
    // this block's h^T fragments; the next block's loaded now, stored before the block's barrier
    const uint4 h_hi = h_cur[0], h_lo = h_cur[1];
    if (m0 + 16 < row_end) {
      const uint4* src = p.h_frag + (((m0 + 16) >> 4) * 32 + lane) * 2;
      h_cur[0] = src[0];
      h_cur[1] = src[1];
    }
    dy_ahead += block_step;
    if constexpr (DOT) y_ahead += block_step;
    stage = stage == STAGES - 1 ? 0 : stage + 1;

    // g = dY B_v over the warp's 64 columns: A = dY as loaded
    // (hi and lo parts in separate accumulators: four chains of 4 dependent mma instead of two of 8)
    float gacc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float gacc_lo[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int hf = c >> 1, wp = c & 1;
      const uint32_t a0 = word(cur.dy[0][hf], 2 * wp), a1 = word(cur.dy[1][hf], 2 * wp);
      const uint32_t a2 = word(cur.dy[0][hf], 2 * wp + 1), a3 = word(cur.dy[1][hf], 2 * wp + 1);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint2 lo = DOT ? breg[DOT ? c : 0][nt][1] : s_b[warp][c][nt][1][lane];
        const uint2 hi = DOT ? breg[DOT ? c : 0][nt][0] : s_b[warp][c][nt][0][lane];
        mma_bf16_16816(gacc_lo[nt], a0, a1, a2, a3, lo.x, lo.y);
        mma_bf16_16816(gacc[nt], a0, a1, a2, a3, hi.x, hi.y);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) gacc[nt][e] += gacc_lo[nt][e];

    // dh^T += h^T dY: A = h^T (r = g, g + 8; m = 2t, 2t + 1, 2t + 8, 2t + 9), split hi + lo
    const uint32_t ah[4] = {h_hi.x, h_hi.y, h_hi.z, h_hi.w}, al[4] = {h_lo.x, h_lo.y, h_lo.z, h_lo.w};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      uint32_t bt[4][2];  // dY^T of word w: the B operand (k = the block's rows, n = the word's columns)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        bt[w][0] = transpose8x8(word(cur.dy[0][hf], w));
        bt[w][1] = transpose8x8(word(cur.dy[1][hf], w));
        mma_bf16_16816(dh[hf][w], al[0], al[1], al[2], al[3], bt[w][0], bt[w][1]);
        mma_bf16_16816(dh[hf][w], ah[0], ah[1], ah[2], ah[3], bt[w][0], bt[w][1]);
      }
      if constexpr (DOT) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int w = 2 * q, w2 = 2 * q + 1;
          const uint32_t a0 = transpose8x8(word(cur.y[0][hf], w)), a1 = transpose8x8(word(cur.y[0][hf], w2));
          const uint32_t a2 = transpose8x8(word(cur.y[1][hf], w)), a3 = transpose8x8(word(cur.y[1][hf], w2));
          mma_bf16_16816(ddot[hf][q][0], a0, a1, a2, a3, bt[w][0], bt[w][1]);
          mma_bf16_16816(ddot[hf][q][1], a0, a1, a2, a3, bt[w2][0], bt[w2][1]);
        }
      }
    }

    // g over the CTA's columns: the warps' sums through shared memory, added in warp order
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s_g[buf][warp][g][8 * nt + 2 * t] = gacc[nt][0];
      s_g[buf][warp][g][8 * nt + 2 * t + 1] = gacc[nt][1];
      s_g[buf][warp][g + 8][8 * nt + 2 * t] = gacc[nt][2];
      s_g[buf][warp][g + 8][8 * nt + 2 * t + 1] = gacc[nt][3];
    }
    __syncthreads();  // also: every reader of s_g[buf] two blocks ago is past it
    for (int i = threadIdx.x; i < 256; i += 32 * WARPS) {
      const int row = i >> 4, j = i & 15;
      if (j < p.r && m0 + row < p.m) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += s_g[buf][w][row][j];
        p.g_part[(int64_t(blockIdx.x) * p.m + m0 + row) * p.r + j] = sum;
      }
    }
  }
  copy_wait<0>();  // no copy outlives the CTA

  if (!active) return;
  // this chunk's partial sums: dh [N, r] (rows g, g + 8 of dh^T), dot [N] (summed over the 8 g)
  float* dh_out = p.dh_part + int64_t(blockIdx.y) * p.n * p.r;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = g + 8 * (e >> 1);
        const int64_t cc = col + 32 * hf + 8 * t + 2 * w + (e & 1);
        if (j < p.r) dh_out[cc * p.r + j] = dh[hf][w][e];
      }
    }
  }
  if constexpr (DOT) {
    // the diagonals (see ddot): lane (g, g / 2) holds column 8 (g / 2) + 2 w + g % 2 of each word w
    if (t == (g >> 1)) {
      float* dot_out = p.dot_part + int64_t(blockIdx.y) * p.n + col + 8 * (g >> 1) + (g & 1);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          dot_out[32 * hf + 2 * (2 * q)] = (g & 1) ? ddot[hf][q][0][1] : ddot[hf][q][0][0];
          dot_out[32 * hf + 2 * (2 * q + 1)] = (g & 1) ? ddot[hf][q][1][3] : ddot[hf][q][1][2];
        }
      }
    }
  }
}

// The partial sums added in a fixed order (planes in index order), then the scales: g, dh * col_scale
// * dh_scaling, dot / dot_divisor (0 where it is 0). One launch for what were three aten::sum
// launches and the caller's four small scaling kernels.
__global__ void dy_products_finish(LoraDyProductsParams p, int g_planes) {
  const int64_t n_g = p.m * p.r, n_dh = p.n * p.r, n_dot = p.dot != nullptr ? p.n : 0;
  const int64_t total = n_g + n_dh + n_dot, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i < n_g) {
      float sum = 0.0f;
#pragma unroll 8
      for (int q = 0; q < g_planes; ++q) sum += p.g_part[q * n_g + i];
      p.g[i] = sum;
    } else if (i < n_g + n_dh) {
      const int64_t k = i - n_g;
      float sum = 0.0f;
#pragma unroll 8
      for (int q = 0; q < p.row_chunks; ++q) sum += p.dh_part[q * n_dh + k];
      if (p.col_scale != nullptr) sum = __fmul_rn(sum, p.col_scale[k / p.r]);
      p.dh[k] = __fmul_rn(sum, p.dh_scaling);
    } else {
      const int64_t k = i - n_g - n_dh;
      float sum = 0.0f;
#pragma unroll 8
      for (int q = 0; q < p.row_chunks; ++q) sum += p.dot_part[q * p.n + k];
      if (p.dot_divisor != nullptr) {
        const float d = p.dot_divisor[k];
        sum = d != 0.0f ? __fdiv_rn(sum, d) : 0.0f;
      }
      p.dot[k] = sum;
    }
  }
}

// With y: 8 warps (512-column strips) and 4 stages, one CTA per SM (176 KB of shared memory): half
// the g partials (14.7 MB instead of 29.4 at N = 14336, M = 8192) for the same blocks in flight per
// SM; torch.profiler on the H100, two runs each: the kernel 190.8 / 185.5 us and its finish 8.6 /
// 8.2 against 194.5 / 193.4 and 14.0 / 14.2 with 4 warps and 3 stages (3 CTAs per SM).
// LoRA: 8 warps and 4 stages too (2026-11-24): 112 KB, 2 CTAs per SM (126 registers: the whole
// register file), 16 warps per SM as with 4 warps x 4 CTAs, half the g partials. In a QLoRA step
// (scripts/ab_qdora_env.py, 40 rounds) the kernel 101.6 us and its finish 8.5 against 104.9 and
// 13.8 with 4 warps x 4 stages (and 109.8 + 13.9 with 4 warps x 5 stages, 3 CTAs per SM: see
// kStages). 8 warps had lost before (132 us against 124) when 3 stages was all that fit beside
// B_v's fragments at 2 CTAs per SM.
constexpr int kWarpsNoDot = 8;
constexpr int kWarpsDot = 8;

}  // namespace

int64_t lora_dy_products_strip_cols(bool dot) { return int64_t(dot ? kWarpsDot : kWarpsNoDot) * kWarpCols; }

namespace {

// The kernel with its dynamic shared memory allowed (once per device).
template <int WARPS, bool DOT, int STAGES>
auto dy_products_kernel() {
  const auto kernel = lora_dy_products<WARPS, DOT, STAGES>;
  static std::atomic<uint64_t> devices_set{0};
  int device = 0;
  cudaGetDevice(&device);
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit == 0 || (devices_set.load() & bit) == 0) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         int(sizeof(DyProductsShared<WARPS, DOT, STAGES>)));
    devices_set.fetch_or(bit);
  }
  return kernel;
}

template <int WARPS, bool DOT, int STAGES>
int ctas_per_sm() {
  int blocks = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, dy_products_kernel<WARPS, DOT, STAGES>(), 32 * WARPS,
                                                sizeof(DyProductsShared<WARPS, DOT, STAGES>));
  return blocks > 0 ? blocks : 1;
}

template <int WARPS, bool DOT, int STAGES>
void launch(const LoraDyProductsParams& p, cudaStream_t stream) {
  const int64_t frag_threads = (p.m + 15) / 16 * 32;
  h_fragments<<<unsigned((frag_threads + 255) / 256), 256, 0, stream>>>(p.h, p.m, p.r, p.h_frag);
  const dim3 grid(unsigned((p.n + WARPS * kWarpCols - 1) / (WARPS * kWarpCols)), unsigned(p.row_chunks));
  const auto kernel = dy_products_kernel<WARPS, DOT, STAGES>();
  kernel<<<grid, 32 * WARPS, sizeof(DyProductsShared<WARPS, DOT, STAGES>), stream>>>(p);
  const int64_t total = p.m * p.r + p.n * p.r + (p.dot != nullptr ? p.n : 0);
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535);
  dy_products_finish<<<unsigned(blocks), 256, 0, stream>>>(p, int(grid.x));
}

}  // namespace

int lora_dy_products_ctas_per_sm(bool dot) {
  return dot ? ctas_per_sm<kWarpsDot, true, kStages>() : ctas_per_sm<kWarpsNoDot, false, kStages>();
}

void launch_lora_dy_products(const LoraDyProductsParams& p, cudaStream_t stream) {
  if (p.y != nullptr) launch<kWarpsDot, true, kStages>(p, stream);
  else launch<kWarpsNoDot, false, kStages>(p, stream);
}

}  // namespace lowrank::lora
