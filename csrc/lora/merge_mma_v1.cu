// EXPERIMENT: the merge/row-norm kernels of 6fdea23 for an in-process A/B (LOWRANK_LORA_V1=1)
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
// column c <-> strip column 16 (c / 2) + 2 nt + c % 2) so that lane (g, t)'s accumulators over the
// 8 n-tiles are strip columns 16t .. 16t + 15 of rows g and g + 8: one 8-byte load of codes per
// row, dequantized and added straight from the accumulators, and two 16-byte stores per row (4
// lanes write a row's 128 bytes). The first version staged the product through shared memory:
// L1-bound (ncu L1/TEX 88%, stalls on L1TEX 55%), 129.5 us at 14336 x 4096 r = 16. A tile's codes,
// absmax and B are loaded a tile before its math (two tiles ahead, 128 registers:
// 168 us against 94 us).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace v1 {
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

// What a lane loads for one 16-row tile: rows g and g + 8 (clamped to the last row past N).
template <bool NESTED>
struct TileLoads {
  uint2 codes[2];          // the lane's 16 strip columns: 8 bytes per row
  float absmax_or_nested[2];
  uint32_t absmax_code[2];  // NESTED
  float v[2];               // row_scale, or 1
  float b[2][4];            // B[o][4t .. 4t + 3] (0 past r): the k index is permuted, see below

  __device__ __forceinline__ void load(const LoraMerge4bitParams& p, int64_t r0, int64_t col, int block_shift,
                                       int nested_shift, int g, int t) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      int64_t o = r0 + g + 8 * rr;
      o = o < p.n ? o : p.n - 1;
      const int64_t flat = o * p.k + col;  // a multiple of 16: one block (blocksize >= 16)
      codes[rr] = *reinterpret_cast<const uint2*>(p.packed + flat / 2);
      const int64_t block = flat >> block_shift;
      if constexpr (NESTED) {
        absmax_code[rr] = p.absmax_codes[block];
        absmax_or_nested[rr] = p.nested_absmax[block >> nested_shift];
      } else {
        absmax_or_nested[rr] = p.absmax[block];
      }
      v[rr] = p.row_scale != nullptr ? p.row_scale[o] : 1.0f;
      if (p.r == 16) {  // one 16-byte load (b 16-byte aligned: the launcher checks)
        const float4 v4 = *reinterpret_cast<const float4*>(p.b + o * 16 + 4 * t);
        b[rr][0] = v4.x;
        b[rr][1] = v4.y;
        b[rr][2] = v4.z;
        b[rr][3] = v4.w;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) b[rr][q] = 4 * t + q < p.r ? p.b[o * p.r + 4 * t + q] : 0.0f;
      }
    }
  }
};

// NORM = false: W' rows written in T. NORM = true: per row, the sum over the strip of
// (W0 + s B A)^2 into norm_partial[strip][row], and after those [strips][16] the strip's
// sum_k A_jk^2 (row_scale must be null).
template <typename T, bool NESTED, int SPLIT, bool NORM, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) lora_merge_4bit_mma(LoraMerge4bitParams p, float* norm_partial,
                                                                 int64_t rows_per_cta) {
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  __shared__ __align__(16) float s_a[16][kStrip + 4];  // A's strip, rows past r zero (row pad: fewer bank conflicts)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t col0 = int64_t(blockIdx.x) * kStrip;
  const int64_t row_cta = int64_t(blockIdx.y) * rows_per_cta;
  const int64_t row_end = row_cta + rows_per_cta < p.n ? row_cta + rows_per_cta : p.n;
  const int block_shift = 31 - __clz(p.blocksize);
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;

  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  // A's strip through shared memory in coalesced 16-byte loads (gathered straight into fragments,
  // each warp load touched 32 sectors: ncu had L1/TEX at 74%)
  for (int i = threadIdx.x; i < 16 * (kStrip / 4); i += kThreads) {
    const int j = i / (kStrip / 4), c4 = i % (kStrip / 4);
    const float4 v4 = j < p.r ? *reinterpret_cast<const float4*>(p.a + int64_t(j) * p.k + col0 + 4 * c4)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    *reinterpret_cast<float4*>(&s_a[j][4 * c4]) = v4;
  }
  const int64_t first = row_cta + 16 * warp;
  TileLoads<NESTED> cur;
  if (first < row_end) cur.load(p, first, col0 + 16 * t, block_shift, nested_shift, g, t);
  __syncthreads();  // the tables and A's strip
  if constexpr (NORM) {  // ||A_j||^2 over the strip, once per strip, for the finish's error bound
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
  uint32_t a_b0[8][SPLIT], a_b1[8][SPLIT];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int c = 16 * (g >> 1) + 2 * nt + (g & 1);
    split_pair<SPLIT>(s_a[4 * t][c], s_a[4 * t + 1][c], a_b0[nt]);
    split_pair<SPLIT>(s_a[4 * t + 2][c], s_a[4 * t + 3][c], a_b1[nt]);
  }

  const float offset = NESTED ? *p.offset : 0.0f;
  T* out = static_cast<T*>(p.out);

#pragma unroll 1
  for (int64_t r0 = first; r0 < row_end; r0 += kRowsPerRound) {
    TileLoads<NESTED> next;
    const int64_t r_next = r0 + kRowsPerRound;
    if (r_next < row_end) next.load(p, r_next, col0 + 16 * t, block_shift, nested_shift, g, t);

    float scale[2], sv[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      // the block's float absmax as dequantize_4bit rebuilds it: a rounded product, a rounded sum
      const float absmax = NESTED ? __fadd_rn(__fmul_rn(s_qmap[cur.absmax_code[rr]], cur.absmax_or_nested[rr]), offset)
                                  : cur.absmax_or_nested[rr];
      scale[rr] = p.row_scale != nullptr ? __fmul_rn(absmax, cur.v[rr]) : absmax;
      sv[rr] = p.row_scale != nullptr ? __fmul_rn(p.scaling, cur.v[rr]) : p.scaling;
    }
    // (s v_o) B[o, :] fragments (the mma's A operand, M = row x K = j): a0 (row g, k 2t..: j 4t..),
    // a1 (row g + 8, k 2t..), a2 (row g, k 2t + 8..: j 4t + 2..), a3 (row g + 8, k 2t + 8..)
    uint32_t bs[SPLIT][4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int rr = q & 1, half = q >> 1;
      uint32_t parts[SPLIT];
      split_pair<SPLIT>(__fmul_rn(sv[rr], cur.b[rr][2 * half]), __fmul_rn(sv[rr], cur.b[rr][2 * half + 1]), parts);
#pragma unroll
      for (int s = 0; s < SPLIT; ++s) bs[s][q] = parts[s];
    }

    uint32_t packed_out[2][8];
    float sq[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_split<SPLIT>(d, bs, a_b0[nt], a_b1[nt]);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        // strip columns 16t + 2nt (high nibble) and 16t + 2nt + 1 (low nibble): byte nt of the row's 8
        const uint32_t word = nt < 4 ? cur.codes[rr].x : cur.codes[rr].y;
        const uint32_t byte = (word >> (8 * (nt & 3))) & 0xffu;
        const float w0 = __fadd_rn(__fmul_rn(s_values[byte >> 4], scale[rr]), d[2 * rr]);
        const float w1 = __fadd_rn(__fmul_rn(s_values[byte & 15u], scale[rr]), d[2 * rr + 1]);
        if constexpr (NORM) {
          sq[rr] = __fmaf_rn(w0, w0, sq[rr]);
          sq[rr] = __fmaf_rn(w1, w1, sq[rr]);
        } else {
          packed_out[rr][nt] = Pack2<T>::pack(w0, w1);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t o = r0 + g + 8 * rr;
      if constexpr (NORM) {
        float total = sq[rr];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        if (t == 0 && o < p.n) norm_partial[int64_t(blockIdx.x) * p.n + o] = total;
      } else if (o < p.n) {
        uint4* dst = reinterpret_cast<uint4*>(out + o * p.k + col0 + 16 * t);
        dst[0] = make_uint4(packed_out[rr][0], packed_out[rr][1], packed_out[rr][2], packed_out[rr][3]);
        dst[1] = make_uint4(packed_out[rr][4], packed_out[rr][5], packed_out[rr][6], packed_out[rr][7]);
      }
    }
    cur = next;
  }
}

// n_o = sqrt(sum over strips of the partial sums) in float64, and the rows whose error bound
// unit (t_o / n_o + 1) exceeds rtol, t_o = |s| sum_j |B_oj| ||A_j||.
// (||A_j|| from the strips' float sums of 64 squares, added in float64: ~2^-18 relative, inside
// the bound's margin. As at::linalg_vector_norm it took 9.6 us and two launches on the H100.)
__global__ void dora_row_norm_finish(DoraRowNormParams q, const float* partial, int strips) {
  __shared__ double s_a_norm[16];
  if (threadIdx.x < 16) {
    double a2 = 0.0;
    for (int s = 0; s < strips; ++s) a2 += double(partial[int64_t(strips) * q.merge.n + 16 * s + threadIdx.x]);
    s_a_norm[threadIdx.x] = sqrt(a2);
  }
  __syncthreads();
  const int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= q.merge.n) return;
  double n2 = 0.0;
  for (int s = 0; s < strips; ++s) n2 += double(partial[int64_t(s) * q.merge.n + o]);
  double t = 0.0;
  for (int j = 0; j < q.merge.r; ++j) t += fabs(double(q.merge.b[o * q.merge.r + j])) * s_a_norm[j];
  t *= fabs(double(q.merge.scaling));
  const double n = sqrt(n2);
  q.norm[o] = float(n);
  q.flagged[o] = q.unit * (t + n) > q.rtol * n;
}

// Rows per CTA: one wave of CTAs (every SM's slots filled once, the column strips fixed by K), so a
// CTA's prologue (tables, A's strip and its split fragments: about two memory latencies) is paid
// once per SM slot rather than per 256 rows. (With 256 rows per CTA, 4 tiles per warp, the
// prologue was ~1/3 of a CTA's life; ncu: 91 us at 14336 x 4096, 6.8 waves.)
int64_t rows_per_cta_for(int ctas_per_sm, const LoraMerge4bitParams& p) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t slots = int64_t(ctas_per_sm) * (sms > 0 ? sms : 1);
  const int64_t strips = p.k / kStrip;
  const int64_t chunks = slots / strips > 1 ? slots / strips : 1;
  const int64_t rows = (p.n + chunks - 1) / chunks;
  return (rows + kRowsPerRound - 1) / kRowsPerRound * kRowsPerRound;
}

template <typename T, bool NESTED, int SPLIT, bool NORM, int MIN_BLOCKS>
void launch_kernel(const LoraMerge4bitParams& p, float* norm_partial, cudaStream_t stream) {
  const auto kernel = lora_merge_4bit_mma<T, NESTED, SPLIT, NORM, MIN_BLOCKS>;
  static const int ctas_per_sm = [kernel] {  // one per instantiation (its registers decide)
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0);
    return blocks > 0 ? blocks : 1;
  }();
  const int64_t rows = rows_per_cta_for(ctas_per_sm, p);
  const dim3 grid(unsigned(p.k / kStrip), unsigned((p.n + rows - 1) / rows));
  kernel<<<grid, kThreads, 0, stream>>>(p, norm_partial, rows);
}

// CTAs per SM the register cap allows: the merge 5 (96 registers, a word spilled; ncu 81 us at 14336 x 4096 against
// 91 us for 256-row CTAs at 110 registers; a cap at 80 registers spilled and ran slower), the
// norm's 3-way split 4 (126 registers, none spilled; at 96 it spilled and ran ~10% slower).
template <typename T, int SPLIT, bool NORM>
void launch_shaped(const LoraMerge4bitParams& p, float* norm_partial, cudaStream_t stream) {
  constexpr int kMinBlocks = NORM ? 4 : 5;
  if (p.absmax == nullptr) launch_kernel<T, true, SPLIT, NORM, kMinBlocks>(p, norm_partial, stream);
  else launch_kernel<T, false, SPLIT, NORM, kMinBlocks>(p, norm_partial, stream);
}

}  // namespace

bool lora_merge_4bit_mma_takes_unused(const LoraMerge4bitParams& p) {
  return p.r <= kMergeMmaMaxRank && p.k % kStrip == 0 && p.blocksize >= 16 &&
         reinterpret_cast<uintptr_t>(p.packed) % 8 == 0 &&  // one 8-byte code load per lane and row
         reinterpret_cast<uintptr_t>(p.a) % 16 == 0 && reinterpret_cast<uintptr_t>(p.b) % 16 == 0;
}

void launch_lora_merge_4bit_mma_v1(const LoraMerge4bitParams& p, cudaStream_t stream) {
  if (p.out_kind == FloatKind::kBFloat16) launch_shaped<__nv_bfloat16, 2, false>(p, nullptr, stream);
  else launch_shaped<__half, 2, false>(p, nullptr, stream);
}



void launch_dora_row_norm_v1(const DoraRowNormParams& q, float* partial, cudaStream_t stream) {
  launch_shaped<float, 3, true>(q.merge, partial, stream);
  const int threads = 256;
  dora_row_norm_finish<<<unsigned((q.merge.n + threads - 1) / threads), threads, 0, stream>>>(
      q, partial, int(q.merge.k / kStrip));
}

}  // namespace v1
}  // namespace lowrank::lora
