// The merged weight W' = round_T(v (W0 + s B A)) with the rank-r product on the tensor cores, and
// DoRA's row norm ||W0 + s B A|| from the same tiles (no [out, in] tensor written).
//
// Why: merge.cu computes sum_j (s v_o B_oj) A_ji with float32 FMAs on the CUDA cores and ncu found
// it bound by instruction issue (~49 instructions per weight, 16 of them FMAs; 158 us at 14336 x
// 4096 against 55-78 us for the plain dequantize). Here one mma.sync m16n8k16 computes a 16 x 8
// block of the product with K = r <= 16 on float32 operands split into bf16 parts
// (x = hi + lo [+ mid]): SPLIT = 2 keeps hi*hi + hi*lo + lo*hi (relative error ~2^-15 of
// sum_j |s v B_oj| |A_ji|, far under the 16-bit rounding of W' that follows); SPLIT = 3 keeps
// every product of total order <= 2^-16 (~2^-21: the norm needs float32 accuracy). So the merge is
// not bit-identical to the CPU op (merge.cu stays the float32 path and the reference of the
// arithmetic); 16-bit outputs only.
//
// Layout: a CTA owns a strip of 64 columns and a chunk of rows (chunks sized for one wave of
// CTAs); its 4 warps take 16-row tiles in turn. The mma's n index is permuted (n-tile nt, in-tile
// column c <-> strip column 32 (nt / 4) + 8 (c / 2) + 2 (nt % 4) + c % 2) so that lane (g, t)'s
// accumulators over the 8 n-tiles are strip columns 8t .. 8t + 7 and 32 + 8t .. 32 + 8t + 7 of
// rows g and g + 8: two 4-byte loads of codes per row, dequantized and added straight from the
// accumulators, and two 16-byte stores per row, after n-tiles 3 and 7, each 4 lanes' stores
// covering whole 32-byte sectors (with 16t .. 16t + 15, half-sector stores: 106-109 us against
// 69.7 us, L2 71%). The first version staged the product through shared memory:
// L1-bound (ncu L1/TEX 88%, stalls on L1TEX 55%), 129.5 us at 14336 x 4096 r = 16. A tile's codes,
// absmax and B are loaded a tile before its math (two tiles ahead, 128 registers:
// 168 us against 94 us).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "common/cuda_float.cuh"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStrip = 64;                // columns per CTA: 8 n-tiles of 8
constexpr int kRowsPerRound = 16 * kWarps;  // a CTA's rows per round of its warps' tiles

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bf16_pair(__nv_bfloat16 lo_k, __nv_bfloat16 hi_k) {
  return uint32_t(__bfloat16_as_ushort(lo_k)) | (uint32_t(__bfloat16_as_ushort(hi_k)) << 16);
}

// x0, x1 (consecutive k) split into SPLIT bf16 parts, part 0 the nearest bf16, each next part the
// nearest bf16 to what is left; returned as packed pairs (the lower k in the low half).
template <int SPLIT>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t (&parts)[SPLIT]) {
#pragma unroll
  for (int s = 0; s < SPLIT; ++s) {
    const __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
    parts[s] = bf16_pair(h0, h1);
    x0 = __fsub_rn(x0, __bfloat162float(h0));
    x1 = __fsub_rn(x1, __bfloat162float(h1));
  }
}

// d += sum of the products of parts whose orders add up to at most SPLIT - 1, smallest first.
template <int SPLIT>
__device__ __forceinline__ void mma_split(float (&d)[4], const uint32_t (&a)[SPLIT][4], const uint32_t (&b0)[SPLIT],
                                          const uint32_t (&b1)[SPLIT]) {
  if constexpr (SPLIT == 3) {
    mma_bf16_16816(d, a[2], b0[0], b1[0]);
    mma_bf16_16816(d, a[0], b0[2], b1[2]);
    mma_bf16_16816(d, a[1], b0[1], b1[1]);
  }
  mma_bf16_16816(d, a[1], b0[0], b1[0]);
  mma_bf16_16816(d, a[0], b0[1], b1[1]);
  mma_bf16_16816(d, a[0], b0[0], b1[0]);
}

// A's strip [16][kStrip] (rows j past r zero) into shared memory in coalesced 16-byte loads
// (gathered straight into fragments, each warp load touched 32 sectors: ncu had L1/TEX at 74%).
__device__ __forceinline__ void load_a_strip(float (&s_a)[16][kStrip + 4], const float* a, int r, int64_t k,
                                             int col0) {
  for (int i = threadIdx.x; i < 16 * (kStrip / 4); i += kThreads) {
    const int j = i / (kStrip / 4), c4 = i % (kStrip / 4);
    const float4 v4 = j < r ? *reinterpret_cast<const float4*>(a + int64_t(j) * k + col0 + 4 * c4)
                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    *reinterpret_cast<float4*>(&s_a[j][4 * c4]) = v4;
  }
}

// Lane (g, t)'s fragments of A for n-tile nt (the mma's B operand, K = j x N = column, the k index
// permuted as below): b0 holds j = 4t, 4t + 1 and b1 j = 4t + 2, 4t + 3, both at in-tile column
// g, i.e. strip column 32 (nt / 4) + 8 (g / 2) + 2 (nt % 4) + g % 2, split into SPLIT parts.
template <int SPLIT>
__device__ __forceinline__ void a_fragments(const float (&s_a)[16][kStrip + 4], int nt, int g, int t,
                                            uint32_t (&b0)[SPLIT], uint32_t (&b1)[SPLIT]) {
  const int c = 32 * (nt >> 2) + 8 * (g >> 1) + 2 * (nt & 3) + (g & 1);
  split_pair<SPLIT>(s_a[4 * t][c], s_a[4 * t + 1][c], b0);
  split_pair<SPLIT>(s_a[4 * t + 2][c], s_a[4 * t + 3][c], b1);
}

// A tile's (s v) B fragments as the mma's A registers: bs[part][word].
template <int SPLIT>
__device__ __forceinline__ void unpack_bfrag(const uint4 (&bfrag)[SPLIT], uint32_t (&bs)[SPLIT][4]) {
#pragma unroll
  for (int s = 0; s < SPLIT; ++s) {
    bs[s][0] = bfrag[s].x;
    bs[s][1] = bfrag[s].y;
    bs[s][2] = bfrag[s].z;
    bs[s][3] = bfrag[s].w;
  }
}

// The mma's A operand (s v_o) B[o, :] for every 16-row tile, split into SPLIT bf16 parts once per
// call (lora_b_fragments) instead of per tile in every column strip's CTA: 64 strips at K = 4096
// each split the same rows (4 split_pairs and 8 products per lane and tile, ~45 of the ~466
// instructions a tile took; ncu, H100, 14336 x 4096). Layout: [tile][SPLIT][lane] uint4 (one
// warp load of 512 contiguous bytes per part), the
// fragment words a0..a3 of part s (a0 row g, j 4t, 4t + 1; a1 row g + 8; a2 row g, j 4t + 2, 4t + 3;
// a3 row g + 8), the k index permuted as below; rows past N and j past r zero.
// Params: LoraMerge4bitParams or LoraMergeDenseParams (n, r, b, row_scale, scaling).
template <int SPLIT, typename Params>
__global__ void lora_b_fragments(Params p, uint4* frag) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tiles = (p.n + 15) / 16;
  if (i >= tiles * 32) return;
  const int64_t tile = i >> 5;
  const int lane = int(i & 31), g = lane >> 2, t = lane & 3;
  float x[2][4];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t o = tile * 16 + g + 8 * rr;
    const bool row_in = o < p.n;
    const float sv = row_in && p.row_scale != nullptr ? __fmul_rn(p.scaling, p.row_scale[o]) : p.scaling;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = 4 * t + q;
      x[rr][q] = row_in && j < p.r ? __fmul_rn(sv, p.b[o * p.r + j]) : 0.0f;
    }
  }
  uint32_t bs[SPLIT][4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int rr = q & 1, half = q >> 1;
    uint32_t parts[SPLIT];
    split_pair<SPLIT>(x[rr][2 * half], x[rr][2 * half + 1], parts);
#pragma unroll
    for (int s = 0; s < SPLIT; ++s) bs[s][q] = parts[s];
  }
#pragma unroll
  for (int s = 0; s < SPLIT; ++s) frag[(tile * SPLIT + s) * 32 + lane] = make_uint4(bs[s][0], bs[s][1], bs[s][2], bs[s][3]);
}

// One 16-byte store. (Written as *uint4_ptr = ..., the first half-row store of the tile loop came
// out of nvcc 13 as four 4-byte stores: 4x the L2 write transactions, ncu L2 at 79%, 125 us.)
__device__ __forceinline__ void store16(void* dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// What a lane loads for one 16-row tile: rows g and g + 8 (clamped to the last row past N), strip
// columns 8t .. 8t + 7 (half 0) and 32 + 8t .. 32 + 8t + 7 (half 1): 4 bytes of codes each.
template <bool NESTED, int SPLIT>
struct TileLoads {
  uint2 codes[2];                // per row: .x half 0, .y half 1
  float absmax_or_nested[2][2];  // [row][half]: the halves share a block when blocksize >= 64
  uint32_t absmax_code[2][2];    // NESTED
  float v[2];                    // row_scale, or 1
  uint4 bfrag[SPLIT];            // the tile's (s v) B fragments, see lora_b_fragments

  // 32-bit index math (N K < 2^31, lora_merge_4bit_mma_takes): with int64 offsets, clamps and
  // shifts this load took ~60 of the ~400 instructions of a tile (SASS of the norm, H100 build)
  __device__ __forceinline__ void load(const LoraMerge4bitParams& p, const uint4* frag, int r0, int col,
                                       int block_shift, int nested_shift, int g, int lane) {
    const int last_row = int(p.n) - 1, k = int(p.k);
    const uint32_t* code_words = reinterpret_cast<const uint32_t*>(p.packed);  // 4-byte aligned
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int o = min(r0 + g + 8 * rr, last_row);
      const int flat = o * k + col;  // a multiple of 8: its 8 codes are one word
      const uint32_t* word = code_words + (flat >> 3);
      codes[rr].x = word[0];
      codes[rr].y = word[4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (half == 1 && p.blocksize >= 64) {  // the strip is inside one block
          absmax_or_nested[rr][1] = absmax_or_nested[rr][0];
          absmax_code[rr][1] = absmax_code[rr][0];
          continue;
        }
        const int block = (flat + 32 * half) >> block_shift;
        if constexpr (NESTED) {
          absmax_code[rr][half] = p.absmax_codes[block];
          absmax_or_nested[rr][half] = p.nested_absmax[block >> nested_shift];
        } else {
          absmax_code[rr][half] = 0;
          absmax_or_nested[rr][half] = p.absmax[block];
        }
      }
      v[rr] = p.row_scale != nullptr ? p.row_scale[o] : 1.0f;
    }
    const uint4* f = frag + (r0 >> 4) * 32 * SPLIT + lane;  // r0: a multiple of 16
#pragma unroll
    for (int s = 0; s < SPLIT; ++s) bfrag[s] = f[32 * s];
  }
};

// NORM = false: W' rows written in T. NORM = true: per row, the sum over the strip of
// (W0 + s B A)^2 into norm_partial[strip][row], and after those [strips][16] the strip's
// sum_k A_jk^2 (row_scale must be null).
template <typename T, bool NESTED, int SPLIT, bool NORM, int MIN_BLOCKS, bool A_SMEM>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) lora_merge_4bit_mma(LoraMerge4bitParams p, const uint4* frag,
                                                                 float* norm_partial, int* status,
                                                                 int64_t rows_per_cta) {
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  __shared__ __align__(16) float s_a[16][kStrip + 4];  // A's strip, rows past r zero (row pad: fewer bank conflicts)
  // per n-tile and lane: b0's parts, then b1's, padded to whole 16-byte words (conflict-free reads)
  constexpr int kFragWords = SPLIT == 3 ? 8 : 4;
  __shared__ __align__(16) uint32_t s_afrag[A_SMEM ? 8 : 1][32][kFragWords];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // int indices: N K < 2^31 (lora_merge_4bit_mma_takes)
  const int col0 = int(blockIdx.x) * kStrip;
  const int row_cta = int(blockIdx.y) * int(rows_per_cta);
  const int row_end = int(row_cta + rows_per_cta < p.n ? row_cta + rows_per_cta : p.n);
  const int block_shift = 31 - __clz(p.blocksize);
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;

  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  // A's strip through shared memory (load_a_strip's loop, written out here: as a call, ptxas
  // spilled a word of this 80-register kernel)
  for (int i = threadIdx.x; i < 16 * (kStrip / 4); i += kThreads) {
    const int j = i / (kStrip / 4), c4 = i % (kStrip / 4);
    const float4 v4 = j < p.r ? *reinterpret_cast<const float4*>(p.a + int64_t(j) * p.k + col0 + 4 * c4)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    *reinterpret_cast<float4*>(&s_a[j][4 * c4]) = v4;
  }
  const int first = row_cta + 16 * warp;
  TileLoads<NESTED, SPLIT> cur;
  if (first < row_end) cur.load(p, frag, first, col0 + 8 * t, block_shift, nested_shift, g, lane);
  __syncthreads();  // the tables and A's strip
  if constexpr (NORM) {  // ||A_j||^2 over the strip, once per strip, for the finish's error bound
    // the finish or's its answers into status (it runs after this kernel, in stream order)
    if (status != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *status = 0;
    if (blockIdx.y == 0 && threadIdx.x < 16) {
      float sum = 0.0f;
      for (int c = 0; c < kStrip; ++c) sum = __fmaf_rn(s_a[threadIdx.x][c], s_a[threadIdx.x][c], sum);
      norm_partial[int64_t(gridDim.x) * p.n + 16 * blockIdx.x + threadIdx.x] = sum;
    }
  }

  // The k index (j, the rank) is permuted so that a lane's four j are consecutive (one 16-byte
  // load of B per row): k = 2t + e <-> j = 4t + e, k = 2t + 8 + e <-> j = 4t + 2 + e.
  // A's fragments (the mma's B operand, K = j x N = column): b0 holds k = 2t, 2t + 1 and b1
  // k = 2t + 8, 2t + 9, both at in-tile column g, i.e. strip column 16 (g / 2) + 2 nt + g % 2
  // A_SMEM: built once by warp 0 into shared memory (the same for every warp) and read back per
  // n-tile (registers: 8 x 2 x SPLIT of them held through the loop).
  uint32_t a_reg[A_SMEM ? 1 : 8][2 * SPLIT];
  if (!A_SMEM) {
#pragma unroll
    for (int nt = 0; nt < (A_SMEM ? 1 : 8); ++nt) {
      uint32_t b0[SPLIT], b1[SPLIT];
      a_fragments<SPLIT>(s_a, nt, g, t, b0, b1);
#pragma unroll
      for (int s = 0; s < SPLIT; ++s) {
        a_reg[nt][s] = b0[s];
        a_reg[nt][SPLIT + s] = b1[s];
      }
    }
  } else if (warp == 0) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t b0[SPLIT], b1[SPLIT];
      a_fragments<SPLIT>(s_a, nt, g, t, b0, b1);
#pragma unroll
      for (int s = 0; s < SPLIT; ++s) {
        s_afrag[nt][lane][s] = b0[s];
        s_afrag[nt][lane][SPLIT + s] = b1[s];
      }
#pragma unroll
      for (int w = 2 * SPLIT; w < kFragWords; ++w) s_afrag[nt][lane][w] = 0u;
    }
  }
  __syncthreads();

  const float offset = NESTED ? *p.offset : 0.0f;
  T* out = static_cast<T*>(p.out);

#pragma unroll 1
  for (int r0 = first; r0 < row_end; r0 += kRowsPerRound) {
    TileLoads<NESTED, SPLIT> next;
    const int r_next = r0 + kRowsPerRound;
    if (r_next < row_end) next.load(p, frag, r_next, col0 + 8 * t, block_shift, nested_shift, g, lane);

    float scale[2][2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // the block's float absmax as dequantize_4bit rebuilds it: a rounded product, a rounded sum
        const float absmax =
            NESTED ? __fadd_rn(__fmul_rn(s_qmap[cur.absmax_code[rr][half]], cur.absmax_or_nested[rr][half]), offset)
                   : cur.absmax_or_nested[rr][half];
        scale[rr][half] = p.row_scale != nullptr ? __fmul_rn(absmax, cur.v[rr]) : absmax;
      }
    }
    uint32_t bs[SPLIT][4];
    unpack_bfrag<SPLIT>(cur.bfrag, bs);
    // each code byte's nibbles as byte offsets into s_values (value index * 4), one per byte of
    // the word: byte nt of the row's 8 is then one PRMT away from a lookup address
    uint32_t hi4[2][2], lo4[2][2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      hi4[rr][0] = (cur.codes[rr].x >> 2) & 0x3c3c3c3cu;
      lo4[rr][0] = (cur.codes[rr].x << 2) & 0x3c3c3c3cu;
      hi4[rr][1] = (cur.codes[rr].y >> 2) & 0x3c3c3c3cu;
      lo4[rr][1] = (cur.codes[rr].y << 2) & 0x3c3c3c3cu;
    }
    const char* values_bytes = reinterpret_cast<const char*>(s_values);

    uint32_t packed_out[2][4];  // half a row's 16 columns, stored after n-tiles 3 and 7
    float sq[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      uint32_t words[kFragWords];
      if constexpr (A_SMEM) {
#pragma unroll
        for (int w4 = 0; w4 < kFragWords; w4 += 4) {
          const uint4 v4 = *reinterpret_cast<const uint4*>(&s_afrag[nt][lane][w4]);
          words[w4] = v4.x;
          words[w4 + 1] = v4.y;
          words[w4 + 2] = v4.z;
          words[w4 + 3] = v4.w;
        }
      } else {
#pragma unroll
        for (int w = 0; w < 2 * SPLIT; ++w) words[w] = a_reg[A_SMEM ? 0 : nt][w];
      }
      uint32_t a_b0[SPLIT], a_b1[SPLIT];
#pragma unroll
      for (int s = 0; s < SPLIT; ++s) {
        a_b0[s] = words[s];
        a_b1[s] = words[SPLIT + s];
      }
      mma_split<SPLIT>(d, bs, a_b0, a_b1);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        // strip columns 32 (nt / 4) + 8t + 2 (nt % 4) (high nibble) and the next (low nibble): byte
        // nt % 4 of the half's word.
        // value * scale + d in one fma: with B = 0 (d = +0) the dequantized weight's one rounding
        const uint32_t sel = 0x4440u | uint32_t(nt & 3);  // byte nt & 3, zero-extended
        const float value_hi = *reinterpret_cast<const float*>(values_bytes + __byte_perm(hi4[rr][nt >> 2], 0u, sel));
        const float value_lo = *reinterpret_cast<const float*>(values_bytes + __byte_perm(lo4[rr][nt >> 2], 0u, sel));
        const float w0 = __fmaf_rn(value_hi, scale[rr][nt >> 2], d[2 * rr]);
        const float w1 = __fmaf_rn(value_lo, scale[rr][nt >> 2], d[2 * rr + 1]);
        if constexpr (NORM) {
          sq[rr] = __fmaf_rn(w0, w0, sq[rr]);
          sq[rr] = __fmaf_rn(w1, w1, sq[rr]);
        } else {
          packed_out[rr][nt & 3] = Pack2<T>::pack(w0, w1);
        }
      }
      if constexpr (!NORM) {
        if ((nt & 3) == 3) {
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int64_t o = r0 + g + 8 * rr;
            if (o < p.n) {
              // the 4 lanes of a row write 64 contiguous bytes: whole 32-byte sectors
              store16(out + o * p.k + col0 + 32 * (nt >> 2) + 8 * t, packed_out[rr][0], packed_out[rr][1],
                      packed_out[rr][2], packed_out[rr][3]);
            }
          }
        }
      }
    }
    if constexpr (NORM) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int o = r0 + g + 8 * rr;
        float total = sq[rr];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        if (t == 0 && o < p.n) norm_partial[int(blockIdx.x) * int(p.n) + o] = total;
      }
    }
    cur = next;
  }
}

// The dense base (a float nn.Linear): the same tiles, mma and stores as lora_merge_4bit_mma with
// W0's elements loaded where that kernel dequantizes codes. Lane (g, t) loads 16 bytes (8 elements)
// of rows g and g + 8 at strip columns 8t and 32 + 8t: word q of a load holds columns 2q (low half)
// and 2q + 1, the columns of accumulators d[2 rr] and d[2 rr + 1] at n-tile 4 half + q. Per element
// fma(w0, v, d) rounded once to float32 and once to T (v = 1 without a row scale: w0 + d).
// Why: DoRA on a bf16 base ran its forward as y = s h B^T, y += x W^T (C operand), y *= v and its
// backward with W v formed for dX; the two products with the float32 v are mixed-dtype PyTorch
// kernels (a [14336, 4096] W *= v took 386 us on the H100), and the layer took 4.10 ms against
// QDoRA's 2.92 on the same H100 (bench_lora, csrc de2e8e7).
template <typename T>
__device__ __forceinline__ float low_element(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(w << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
template <typename T>
__device__ __forceinline__ float high_element(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(w & 0xffff0000u);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

constexpr int kDenseSplit = 2;

template <typename T, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) lora_merge_dense_mma(LoraMergeDenseParams p, const uint4* frag,
                                                                             int64_t rows_per_cta) {
  constexpr int SPLIT = kDenseSplit;
  __shared__ __align__(16) float s_a[16][kStrip + 4];
  __shared__ __align__(16) uint32_t s_afrag[8][32][4];  // per n-tile and lane: b0's two parts, b1's two
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // int indices: N K < 2^31 (the CUDA op checks)
  const int col0 = int(blockIdx.x) * kStrip;
  const int row_cta = int(blockIdx.y) * int(rows_per_cta);
  const int row_end = int(row_cta + rows_per_cta < p.n ? row_cta + rows_per_cta : p.n);
  const int k = int(p.k), last_row = int(p.n) - 1;
  const T* w = static_cast<const T*>(p.w);

  load_a_strip(s_a, p.a, p.r, p.k, col0);
  struct Loads {
    uint4 w[2][2];  // [row][half]
    float v[2];
    uint4 bfrag[SPLIT];
  };
  auto load = [&](int r0, Loads& l) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int o = min(r0 + g + 8 * rr, last_row);
      const uint4* src = reinterpret_cast<const uint4*>(w + o * k + col0 + 8 * t);  // 16-byte aligned
      l.w[rr][0] = __ldg(src);
      l.w[rr][1] = __ldg(src + 4);  // 32 columns on
      l.v[rr] = p.row_scale != nullptr ? p.row_scale[o] : 1.0f;
    }
    const uint4* f = frag + (r0 >> 4) * 32 * SPLIT + lane;  // r0: a multiple of 16
#pragma unroll
    for (int s = 0; s < SPLIT; ++s) l.bfrag[s] = f[32 * s];
  };
  const int first = row_cta + 16 * warp;
  Loads cur;
  if (first < row_end) load(first, cur);
  __syncthreads();  // A's strip
  if (warp == 0) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t b0[SPLIT], b1[SPLIT];
      a_fragments<SPLIT>(s_a, nt, g, t, b0, b1);
#pragma unroll
      for (int s = 0; s < SPLIT; ++s) {
        s_afrag[nt][lane][s] = b0[s];
        s_afrag[nt][lane][SPLIT + s] = b1[s];
      }
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);

#pragma unroll 1
  for (int r0 = first; r0 < row_end; r0 += kRowsPerRound) {
    Loads next;
    const int r_next = r0 + kRowsPerRound;
    if (r_next < row_end) load(r_next, next);
    uint32_t bs[SPLIT][4];
    unpack_bfrag<SPLIT>(cur.bfrag, bs);
    uint32_t packed_out[2][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint4 words = *reinterpret_cast<const uint4*>(&s_afrag[nt][lane][0]);
      const uint32_t a_b0[SPLIT] = {words.x, words.y}, a_b1[SPLIT] = {words.z, words.w};
      mma_split<SPLIT>(d, bs, a_b0, a_b1);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const uint32_t pair = word_of(cur.w[rr][nt >> 2], nt & 3);
        const float w0 = __fmaf_rn(low_element<T>(pair), cur.v[rr], d[2 * rr]);
        const float w1 = __fmaf_rn(high_element<T>(pair), cur.v[rr], d[2 * rr + 1]);
        packed_out[rr][nt & 3] = Pack2<T>::pack(w0, w1);
      }
      if ((nt & 3) == 3) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int o = r0 + g + 8 * rr;
          if (o < p.n) {
            store16(out + int64_t(o) * p.k + col0 + 32 * (nt >> 2) + 8 * t, packed_out[rr][0], packed_out[rr][1],
                    packed_out[rr][2], packed_out[rr][3]);
          }
        }
      }
    }
    cur = next;
  }
}

// n_o = sqrt(sum over strips of the partial sums) in float64, and the rows whose error bound
// unit (t_o / n_o + 1) exceeds rtol, t_o = |s| sum_j |B_oj| ||A_j||; with a magnitude, v_o = m_o / n_o
// and the status word (see DoraRowNormParams).
// (||A_j|| from the strips' float sums of 64 squares, added in float64: ~2^-18 relative, inside
// the bound's margin. As at::linalg_vector_norm it took 9.6 us and two launches on the H100.)
// A CTA of 8 warps takes 32 rows: warp w adds strips w, w + 8, ... of row 32 b + lane (a warp's
// loads are 32 consecutive floats of one strip), and warp 0 adds the 8 warps' sums in warp order.
// (One thread per row adding all 64 strips: 7.0 us on the H100 at 14336 x 4096, 56 CTAs for 132
// SMs, each thread's loads a chain of 4 L2 round trips. The flags' any() and m / n were three more
// launches and m == 0's test two, ~11 us.)
constexpr int kFinishWarps = 8;
constexpr int kFinishRows = 32;
constexpr int kFinishANormParts = 32 * kFinishWarps / 16;

__global__ void __launch_bounds__(32 * kFinishWarps) dora_row_norm_finish(DoraRowNormParams q, const float* partial,
                                                                         int strips) {
  __shared__ double s_rows[kFinishWarps][kFinishRows];
  __shared__ double s_a_parts[kFinishANormParts][16];
  __shared__ double s_a_norm[16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = q.merge.n;
  {  // ||A_j||^2: thread (part, j) adds strips part, part + kFinishANormParts, ...
    const int j = threadIdx.x & 15, part = threadIdx.x >> 4;
    const float* a_sq = partial + int64_t(strips) * n + j;
    double sum = 0.0;
#pragma unroll 4
    for (int s = part; s < strips; s += kFinishANormParts) sum += double(a_sq[16 * s]);
    s_a_parts[part][j] = sum;
  }
  const int64_t o = int64_t(blockIdx.x) * kFinishRows + lane;
  {
    double sum = 0.0;
    if (o < n) {
#pragma unroll 8
      for (int s = warp; s < strips; s += kFinishWarps) sum += double(partial[int64_t(s) * n + o]);
    }
    s_rows[warp][lane] = sum;
  }
  __syncthreads();
  if (warp != 0) return;
  if (lane < 16) {
    double sum = 0.0;
    for (int part = 0; part < kFinishANormParts; ++part) sum += s_a_parts[part][lane];
    s_a_norm[lane] = sqrt(sum);
  }
  __syncwarp();
  bool flag = false, zero = false;
  if (o < n) {
    double n2 = 0.0;
#pragma unroll
    for (int w = 0; w < kFinishWarps; ++w) n2 += s_rows[w][lane];
    double t = 0.0;
    for (int j = 0; j < q.merge.r; ++j) t += fabs(double(q.merge.b[o * q.merge.r + j])) * s_a_norm[j];
    t *= fabs(double(q.merge.scaling));
    const double norm = sqrt(n2);
    const float norm_f = float(norm);
    q.norm[o] = norm_f;
    flag = q.unit * (t + norm) > q.rtol * norm;
    q.flagged[o] = flag;
    if (q.magnitude != nullptr) {
      const float m = q.magnitude[o];
      q.row_scale[o] = __fdiv_rn(m, norm_f);  // as m / n in PyTorch: one IEEE division
      zero = m == 0.0f;
    }
  }
  const bool any_flag = __any_sync(0xffffffffu, flag), any_zero = __any_sync(0xffffffffu, zero);
  if (lane == 0 && q.status != nullptr && (any_flag || any_zero)) {
    atomicOr(q.status, (any_flag ? kRowNormStatusFlagged : 0) | (any_zero ? kRowNormStatusZeroMagnitude : 0));
  }
}

// Rows per CTA: one wave of CTAs (every SM's slots filled once, the column strips fixed by K), so a
// CTA's prologue (tables, A's strip and its split fragments: about two memory latencies) is paid
// once per SM slot rather than per 256 rows. (With 256 rows per CTA, 4 tiles per warp, the
// prologue was ~1/3 of a CTA's life; ncu: 91 us at 14336 x 4096, 6.8 waves.)
template <typename Params>
int64_t rows_per_cta_for(int ctas_per_sm, const Params& p) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t slots = int64_t(ctas_per_sm) * (sms > 0 ? sms : 1);
  const int64_t strips = p.k / kStrip;
  const int64_t chunks = slots / strips > 1 ? slots / strips : 1;
  const int64_t rows = (p.n + chunks - 1) / chunks;
  return (rows + kRowsPerRound - 1) / kRowsPerRound * kRowsPerRound;
}

// CTAs of `Kernel` per SM, asked once per instantiation (its registers decide).
template <auto Kernel>
int cached_ctas_per_sm() {
  static const int ctas = [] {
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, 0);
    return blocks > 0 ? blocks : 1;
  }();
  return ctas;
}

// The (s v) B fragments (one small launch), then `Kernel` over one wave of column strips x row
// chunks: Kernel(p, fragments, tail..., rows per CTA).
template <int SPLIT, auto Kernel, typename Params, typename... Tail>
void launch_with_fragments(const Params& p, cudaStream_t stream, Tail... tail) {
  uint4* frag = static_cast<uint4*>(p.fragments);
  const int64_t frag_threads = (p.n + 15) / 16 * 32;
  lora_b_fragments<SPLIT><<<unsigned((frag_threads + 255) / 256), 256, 0, stream>>>(p, frag);
  const int64_t rows = rows_per_cta_for(cached_ctas_per_sm<Kernel>(), p);
  const dim3 grid(unsigned(p.k / kStrip), unsigned((p.n + rows - 1) / rows));
  Kernel<<<grid, kThreads, 0, stream>>>(p, frag, tail..., rows);
}

template <typename T, bool NESTED, int SPLIT, bool NORM, int MIN_BLOCKS>
void launch_kernel(const LoraMerge4bitParams& p, float* norm_partial, int* status, cudaStream_t stream) {
  constexpr bool kASmem = !NORM;  // see launch_shaped
  launch_with_fragments<SPLIT, lora_merge_4bit_mma<T, NESTED, SPLIT, NORM, MIN_BLOCKS, kASmem>>(p, stream, norm_partial,
                                                                                               status);
}

// CTAs per SM the register cap allows: the merge 5 (96 registers, a word spilled; ncu 81 us at 14336 x 4096 against
// 91 us for 256-row CTAs at 110 registers; a cap at 80 registers spilled and ran slower), the
// norm's 3-way split 4 (126 registers, none spilled; at 96 it spilled and ran ~10% slower).
// CTAs per SM (the register cap): the merge 6 (80 registers, A's fragments in shared memory; ncu
// at 14336 x 4096: 69.7 us, and 73.5 us at 5 CTAs with A's fragments in 96 registers), the norm's
// 3-way split 4 (127 registers, A's fragments in registers: 65 us; at 5 CTAs with them in shared
// memory 81 us, L1/TEX 91% busy).
template <typename T, int SPLIT, bool NORM>
void launch_shaped(const LoraMerge4bitParams& p, float* norm_partial, int* status, cudaStream_t stream) {
  constexpr int kMinBlocks = NORM ? 4 : 6;
  if (p.absmax == nullptr) launch_kernel<T, true, SPLIT, NORM, kMinBlocks>(p, norm_partial, status, stream);
  else launch_kernel<T, false, SPLIT, NORM, kMinBlocks>(p, norm_partial, status, stream);
}

// 5 CTAs per SM (lora_merge_dense_mma<T, 5>): the dense kernel holds two tiles' loads of W0 (16
// registers each) where the 4-bit one holds 2 words of codes.
template <typename T>
void launch_dense(const LoraMergeDenseParams& p, cudaStream_t stream) {
  launch_with_fragments<kDenseSplit, lora_merge_dense_mma<T, 5>>(p, stream);
}

}  // namespace

bool lora_merge_4bit_mma_takes(const LoraMerge4bitParams& p) {
  return p.r <= kMergeMmaMaxRank && p.k % kStrip == 0 && p.blocksize >= 16 &&
         p.n * p.k <= kMergeMmaMaxElements &&  // int index math
         reinterpret_cast<uintptr_t>(p.packed) % 4 == 0 &&  // 4-byte code loads
         reinterpret_cast<uintptr_t>(p.a) % 16 == 0 && p.fragments != nullptr &&
         reinterpret_cast<uintptr_t>(p.fragments) % 16 == 0;
}

int64_t lora_merge_4bit_mma_fragment_bytes(int64_t n) { return (n + 15) / 16 * 32 * 3 * 16; }

void launch_lora_merge_4bit_mma(const LoraMerge4bitParams& p, cudaStream_t stream) {
  if (p.out_kind == FloatKind::kBFloat16) launch_shaped<__nv_bfloat16, 2, false>(p, nullptr, nullptr, stream);
  else launch_shaped<__half, 2, false>(p, nullptr, nullptr, stream);
}

void launch_lora_merge_dense(const LoraMergeDenseParams& p, cudaStream_t stream) {
  if (p.kind == FloatKind::kBFloat16) launch_dense<__nv_bfloat16>(p, stream);
  else launch_dense<__half>(p, stream);
}

int64_t dora_row_norm_partial_size(int64_t n, int64_t k) { return k / kStrip * (n + 16); }

void launch_dora_row_norm(const DoraRowNormParams& q, float* partial, cudaStream_t stream) {
  launch_shaped<float, 3, true>(q.merge, partial, q.status, stream);
  dora_row_norm_finish<<<unsigned((q.merge.n + kFinishRows - 1) / kFinishRows), 32 * kFinishWarps, 0, stream>>>(
      q, partial, int(q.merge.k / kStrip));
}

}  // namespace lowrank::lora
