// The backward of matmul_4bit for M <= 16: dX [M, K] = dY [M, N] @ W [N, K], W 4-bit, read from
// the packed codes and the (nested) absmax directly; no dequantized weight in memory.
//
// The reduction runs over N, across the weight's rows, so the forward's scheme (the absmax of a
// row applied to a chunk's sums after the mma) does not carry over: the rows of one mma have
// different absmax. They are folded into dY instead: B = dY[m][n] * absmax[n][k block], in fp32,
// split into a 16-bit high part and the 16-bit rounding of the rest, two mma (so B carries ~16
// bits more than T). The weight side is the pair table of the forward (code values rounded to T),
// so the products carry the forward skinny kernel's one rounding, not two.
//
// The mma (m16n8k16): A = W^T, 16 k x 16 n; B = the scaled dY^T, 16 n x 8 rows of dY; C = dX^T.
// Its k side (our n) pairs two weight rows in each A register, so the table is indexed by a byte
// made of one nibble of row n and one of row n + 1 at the same k: for 32-bit words wa, wb of the
// two rows, (wa & 0xF0F0F0F0) | ((wb >> 4) & 0x0F0F0F0F) holds the pairs of the even k and
// ((wa << 4) & 0xF0F0F0F0) | (wb & 0x0F0F0F0F) those of the odd k. Lane (g, t) loads word g of
// a 64-k block of rows n0 + 2t, 2t + 1, 2t + 8, 2t + 9; the A row order is free (the epilogue maps
// back): mma j of the block, row g is k = 8 g + 2 j, row g + 8 is k + 1 (byte j of word g).
//
// Grid: CTA (x, y) takes k blocks 8 x .. 8 x + 7 (one warp each: 256 contiguous code bytes per
// row and CTA) and the y-th range of rows. With one range the CTA writes dX; with more, fp32
// partial sums go to a workspace and a second kernel adds them in range order (deterministic).
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "gemm/gemm_launch.h"
#include "gemm/skinny_common.cuh"

namespace lowrank::gemm {
namespace {

constexpr int kWarpsT = 8;
constexpr int kThreadsT = 32 * kWarpsT;
// Rows staged per chunk: dY of the chunk's rows and the decoded absmax of each warp's k block,
// shared by the CTA's 8 warps (per lane and 16-row step that was 4 code loads plus 8 absmax and
// 4-8 dY loads, every absmax decoded by 8 lanes: 28672 x 8192 M = 1 103 us, 40% of copy).
// The codes too: 256 contiguous bytes per row and chunk by cp.async, 16 per thread and copy (each
// warp's own 4-byte loads took 4 rows x 32 bytes per instruction: 97 us at M = 1 on 28672 x 8192
// with dY and absmax staged). 64 rows keep two buffers of everything and the table within
// 113 KB: two CTAs per SM.
constexpr int kChunkRows = 64;
constexpr int kDyPitch = kChunkRows + 8;  // bf16: lanes g of a step read rows m = g, banks 4 g + t apart
// bytes per staged code row: lane (g, t) reads word g of warp w's 32 bytes in rows 2t (+1, +8, +9)
// of a step; 68 words put rows 2t at banks 8t apart, so the 32 lanes read 32 banks
constexpr int kCodePitch = 272;
constexpr int kCodeRowBytes = kWarpsT * kSkinnyChunk / 2;  // 256
struct ChunkLayout {
  static constexpr int kDyBytes = 16 * kDyPitch * 2;             // [16 m][pitch] bf16
  static constexpr int kAbsBytes = kWarpsT * kChunkRows * 4;     // [warp][row] fp32
  static constexpr int kCodeBytes = kChunkRows * kCodePitch;     // [row][pitch] codes
  static constexpr int kQmapOff = skinny::kPairTableBytes;       // the pair table first (window offset)
  static constexpr int kCodeOff = kQmapOff + 256 * 4;            // two buffers of each
  static constexpr int kDyOff = kCodeOff + 2 * kCodeBytes;
  static constexpr int kAbsOff = kDyOff + 2 * kDyBytes;
  static constexpr int kBytes = kAbsOff + 2 * kAbsBytes;
  static_assert(kCodeOff % 16 == 0 && kCodePitch % 16 == 0, "16-byte copies");
};
constexpr int kSmemT = ChunkLayout::kBytes;

// One thread's share of a chunk's staging: dY elements and absmax (codes and nested scales).
template <int TILES_M>
struct ChunkLoads {
  static constexpr int kDy = 8 * TILES_M * kChunkRows / kThreadsT;  // 4 or 8
  static constexpr int kAbs = kWarpsT * kChunkRows / kThreadsT;     // 4
  uint16_t dy[kDy];
  uint32_t codes[kAbs];
  float scales[kAbs];
};

template <typename T, int TILES_M, bool NESTED>
struct GradCta {
  const Gemm4bitGradParams& p;
  uint8_t* smem;
  int N, K, M, row_begin, row_end, kb0;
  uint32_t blocks_per_row;
  int block_shift, nested_shift;

  // thread i stages dY element (m, r) = (e / 64, e % 64) for e = i + 256 j, and the absmax of row
  // r = i % 64 for warps w = i / 64 + 4 j
  __device__ __forceinline__ void load(int chunk_row0, ChunkLoads<TILES_M>& c) const {
    const uint16_t* dy = static_cast<const uint16_t*>(p.dy);
#pragma unroll
    for (int j = 0; j < ChunkLoads<TILES_M>::kDy; ++j) {
      const int e = threadIdx.x + kThreadsT * j, m = e / kChunkRows, n = chunk_row0 + e % kChunkRows;
      c.dy[j] = n < row_end ? dy[size_t(min(m, M - 1)) * size_t(N) + size_t(n)] : uint16_t(0);
    }
    const int n = min(chunk_row0 + int(threadIdx.x) % kChunkRows, N - 1);
#pragma unroll
    for (int j = 0; j < ChunkLoads<TILES_M>::kAbs; ++j) {
      const int w = int(threadIdx.x) / kChunkRows + (kThreadsT / kChunkRows) * j;
      const int kb = min(kb0 + w, K / kSkinnyChunk - 1);  // a warp past K: any valid block, unused
      const uint32_t block = uint32_t(n) * blocks_per_row + ((uint32_t(kb) * kSkinnyChunk) >> block_shift);
      if constexpr (NESTED) {
        c.codes[j] = __ldg(p.absmax_codes + block);
        c.scales[j] = __ldg(p.nested_absmax + (block >> nested_shift));
      } else {
        c.codes[j] = 0;
        c.scales[j] = __ldg(p.absmax + block);
      }
    }
  }
  // the chunk's codes: thread i copies 16 bytes e = i + 256 j, row e / 16, bytes 16 (e % 16) of the
  // CTA's 256 (zeros past the row's end or past N)
  __device__ __forceinline__ void copy_codes(int chunk_row0, int buf) const {
    const uint32_t row_bytes = uint32_t(K) / 2;
    const uint32_t dst0 = uint32_t(__cvta_generic_to_shared(smem + ChunkLayout::kCodeOff + buf * ChunkLayout::kCodeBytes));
#pragma unroll
    for (int j = 0; j < kChunkRows * kCodeRowBytes / 16 / kThreadsT; ++j) {
      const int e = threadIdx.x + kThreadsT * j, r = e / 16, col = (e % 16) * 16;
      const int n = chunk_row0 + r;
      const uint32_t byte = uint32_t(kb0) * 32u + uint32_t(col);
      const bool ok = n < N && byte < row_bytes;
      const uint8_t* src = p.packed + (ok ? uint32_t(n) * row_bytes + byte : 0u);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst0 + uint32_t(r * kCodePitch + col)),
                   "l"(src), "r"(ok ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  __device__ __forceinline__ void store(int chunk_row0, int buf, const ChunkLoads<TILES_M>& c, const float* s_qmap,
                                        float offset) const {
    uint16_t* s_dy = reinterpret_cast<uint16_t*>(smem + ChunkLayout::kDyOff + buf * ChunkLayout::kDyBytes);
    float* s_abs = reinterpret_cast<float*>(smem + ChunkLayout::kAbsOff + buf * ChunkLayout::kAbsBytes);
#pragma unroll
    for (int j = 0; j < ChunkLoads<TILES_M>::kDy; ++j) {
      const int e = threadIdx.x + kThreadsT * j;
      s_dy[(e / kChunkRows) * kDyPitch + e % kChunkRows] = c.dy[j];
    }
    const int r = int(threadIdx.x) % kChunkRows;
    const bool valid = chunk_row0 + r < row_end;  // rows past the range weigh zero
#pragma unroll
    for (int j = 0; j < ChunkLoads<TILES_M>::kAbs; ++j) {
      const int w = int(threadIdx.x) / kChunkRows + (kThreadsT / kChunkRows) * j;
      // a rounded product, then a rounded sum, exactly as dequantize_4bit_nested
      const float absmax = NESTED ? __fadd_rn(__fmul_rn(s_qmap[c.codes[j]], c.scales[j]), offset) : c.scales[j];
      s_abs[w * kChunkRows + r] = valid ? absmax : 0.0f;
    }
  }
};

template <typename T, int TILES_M, bool NESTED, bool IMM>
__device__ __forceinline__ void grad_x_cta(const Gemm4bitGradParams& p, uint8_t* smem, const float* s_qmap) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const uint32_t lane4 = uint32_t(lane) * 4u;
  const char* table = reinterpret_cast<const char*>(smem);
  GradCta<T, TILES_M, NESTED> cta{p, smem, int(p.n), int(p.k), int(p.m), 0, 0, int(blockIdx.x) * kWarpsT, 0, 0, 0};
  cta.row_begin = int(blockIdx.y) * p.rows_per_split;
  cta.row_end = min(cta.N, cta.row_begin + p.rows_per_split);
  cta.block_shift = 31 - __clz(p.blocksize);
  cta.blocks_per_row = uint32_t(cta.K) >> cta.block_shift;
  cta.nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
  const float offset = NESTED ? *p.offset : 0.0f;
  const int kb = cta.kb0 + warp;
  const bool busy = kb * kSkinnyChunk < cta.K;  // a warp past K stages with the others, computes nothing
  float acc[4][TILES_M][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int jm = 0; jm < TILES_M; ++jm)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][jm][i] = 0.0f;

  const int n_chunks = (cta.row_end - cta.row_begin + kChunkRows - 1) / kChunkRows;
  ChunkLoads<TILES_M> staged;
  if (n_chunks > 0) {
    cta.copy_codes(cta.row_begin, 0);
    cta.load(cta.row_begin, staged);
    cta.store(cta.row_begin, 0, staged, s_qmap, offset);
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();
  for (int c = 0; c < n_chunks; ++c) {
    const int chunk_row0 = cta.row_begin + c * kChunkRows;
    const int buf = c & 1;
    if (c + 1 < n_chunks) {  // in flight during this chunk: its codes by cp.async, dY and absmax in registers
      cta.copy_codes(chunk_row0 + kChunkRows, buf ^ 1);
      cta.load(chunk_row0 + kChunkRows, staged);
    }
    const uint8_t* s_codes = smem + ChunkLayout::kCodeOff + buf * ChunkLayout::kCodeBytes + warp * 32 + g * 4;
    const uint16_t* s_dy = reinterpret_cast<const uint16_t*>(smem + ChunkLayout::kDyOff + buf * ChunkLayout::kDyBytes);
    const float* s_abs =
        reinterpret_cast<const float*>(smem + ChunkLayout::kAbsOff + buf * ChunkLayout::kAbsBytes) + warp * kChunkRows;
    const int steps = min(kChunkRows, cta.row_end - chunk_row0 + 15) / 16;
    for (int step = 0; step < steps; ++step) {
      if (busy) {
        const int r = 16 * step + 2 * t;
        // the lane's 4 weight rows of the step: 2t, 2t + 1, 2t + 8, 2t + 9 (zeros past N)
        uint32_t w_cur[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          w_cur[i] = *reinterpret_cast<const uint32_t*>(s_codes + (r + (i & 1) + 8 * (i >> 1)) * kCodePitch);
        const float2 abs01 = *reinterpret_cast<const float2*>(s_abs + r);
        const float2 abs89 = *reinterpret_cast<const float2*>(s_abs + r + 8);
        const float absmax[4] = {abs01.x, abs01.y, abs89.x, abs89.y};
        // B: dY * absmax of each row (zero past the range), high and low 16-bit parts
        uint32_t b_hi[TILES_M][2], b_lo[TILES_M][2];
#pragma unroll
        for (int jm = 0; jm < TILES_M; ++jm) {
          const uint16_t* row = s_dy + (jm * 8 + g) * kDyPitch + r;
          const uint32_t d01 = *reinterpret_cast<const uint32_t*>(row);
          const uint32_t d89 = *reinterpret_cast<const uint32_t*>(row + 8);
          const float dyv[4] = {__uint_as_float(d01 << 16), __uint_as_float(d01 & 0xFFFF0000u),
                                __uint_as_float(d89 << 16), __uint_as_float(d89 & 0xFFFF0000u)};
          float hi[4], lo[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float v = dyv[i] * absmax[i];
            hi[i] = to_float(from_float<T>(v));
            lo[i] = v - hi[i];
          }
          b_hi[jm][0] = Pack2<T>::pack(hi[0], hi[1]);
          b_hi[jm][1] = Pack2<T>::pack(hi[2], hi[3]);
          b_lo[jm][0] = Pack2<T>::pack(lo[0], lo[1]);
          b_lo[jm][1] = Pack2<T>::pack(lo[2], lo[3]);
        }
        // A: table indices pairing rows (2t, 2t + 1) and (2t + 8, 2t + 9) at the even and odd k
        const uint32_t hi01 = (w_cur[0] & 0xF0F0F0F0u) | ((w_cur[1] >> 4) & 0x0F0F0F0Fu);
        const uint32_t lo01 = ((w_cur[0] << 4) & 0xF0F0F0F0u) | (w_cur[1] & 0x0F0F0F0Fu);
        const uint32_t hi89 = (w_cur[2] & 0xF0F0F0F0u) | ((w_cur[3] >> 4) & 0x0F0F0F0Fu);
        const uint32_t lo89 = ((w_cur[2] << 4) & 0xF0F0F0F0u) | (w_cur[3] & 0x0F0F0F0Fu);
        auto mma_j = [&](auto jc) {
          constexpr int J = decltype(jc)::value;
          const uint32_t a0 = skinny::pair_word<J, IMM>(table, hi01, lane4);
          const uint32_t a1 = skinny::pair_word<J, IMM>(table, lo01, lane4);
          const uint32_t a2 = skinny::pair_word<J, IMM>(table, hi89, lane4);
          const uint32_t a3 = skinny::pair_word<J, IMM>(table, lo89, lane4);
#pragma unroll
          for (int jm = 0; jm < TILES_M; ++jm) {
            skinny::mma_16816<T>(acc[J][jm], a0, a1, a2, a3, b_hi[jm][0], b_hi[jm][1]);
            skinny::mma_16816<T>(acc[J][jm], a0, a1, a2, a3, b_lo[jm][0], b_lo[jm][1]);
          }
        };
        mma_j(std::integral_constant<int, 0>{});
        mma_j(std::integral_constant<int, 1>{});
        mma_j(std::integral_constant<int, 2>{});
        mma_j(std::integral_constant<int, 3>{});
      }
    }
    if (c + 1 < n_chunks) cta.store(chunk_row0 + kChunkRows, buf ^ 1, staged, s_qmap, offset);
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();  // the next chunk staged; this chunk's buffers free for the one after
  }
  if (!busy) return;

  // acc[j][jm]: c0, c1 = dX^T[k][m], dX^T[k][m + 1] and c2, c3 the same at k + 1, where k = kb *
  // 64 + 8 g + 2 j, m = 8 jm + 2 t. A pair (k, k + 1) of one m row is 4 (8) contiguous bytes.
  const int M = cta.M, K = cta.K;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = kb * kSkinnyChunk + 8 * g + 2 * j;
#pragma unroll
    for (int jm = 0; jm < TILES_M; ++jm)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = jm * 8 + 2 * t + h;
        if (m >= M) continue;
        const size_t at = size_t(m) * size_t(K) + size_t(k);
        if (p.partial != nullptr) {
          *reinterpret_cast<float2*>(p.partial + size_t(blockIdx.y) * size_t(M) * size_t(K) + at) =
              make_float2(acc[j][jm][h], acc[j][jm][2 + h]);
        } else {
          *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + at) = Pack2<T>::pack(acc[j][jm][h], acc[j][jm][2 + h]);
        }
      }
  }
}

template <typename T, int TILES_M, bool NESTED>
__global__ void __launch_bounds__(kThreadsT, 2) gemm_4bit_skinny_grad_x(const Gemm4bitGradParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* s_pairs = reinterpret_cast<uint32_t*>(smem);
  float* s_qmap = reinterpret_cast<float*>(smem + ChunkLayout::kQmapOff);
  skinny::build_pair_table<T>(s_pairs, p.values, threadIdx.x, kThreadsT);
  if constexpr (NESTED) s_qmap[threadIdx.x] = p.nested_qmap[threadIdx.x];  // kThreadsT == 256
  __syncthreads();
  // the table at the shared window offset pair_word takes as an immediate (as the forward checks)
  if (!p.generic_lookup && uint32_t(__cvta_generic_to_shared(s_pairs)) == skinny::kTableWindowOffset)
    grad_x_cta<T, TILES_M, NESTED, true>(p, smem, s_qmap);
  else
    grad_x_cta<T, TILES_M, NESTED, false>(p, smem, s_qmap);
}

// out [M, K] = the sum of the splits' partial sums [S][M][K], in split order, rounded once.
template <typename T>
__global__ void sum_splits(const float* partial, T* out, int64_t mk, int splits) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < mk; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[int64_t(s) * mk + i];
    out[i] = from_float<T>(sum);
  }
}

template <typename T, int TILES_M, bool NESTED>
void launch_t(const Gemm4bitGradParams& p, const SkinnyGradPlan& plan, cudaStream_t stream) {
  auto kernel = gemm_4bit_skinny_grad_x<T, TILES_M, NESTED>;
  static bool attribute_set = false;
  if (!attribute_set) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemT);
    attribute_set = true;
  }
  kernel<<<dim3(unsigned(plan.k_groups), unsigned(plan.splits)), kThreadsT, kSmemT, stream>>>(p);
}

template <typename T>
void launch_kind(const Gemm4bitGradParams& p, const SkinnyGradPlan& plan, cudaStream_t stream) {
  const bool nested = p.absmax == nullptr;
  if (p.m <= 8) nested ? launch_t<T, 1, true>(p, plan, stream) : launch_t<T, 1, false>(p, plan, stream);
  else nested ? launch_t<T, 2, true>(p, plan, stream) : launch_t<T, 2, false>(p, plan, stream);
  if (plan.splits > 1) launch_sum_splits(p.partial, p.out, p.kind, p.m * p.k, int(plan.splits), stream);
}

}  // namespace

void launch_sum_splits(const float* partial, void* out, FloatKind kind, int64_t count, int splits,
                       cudaStream_t stream) {
  const int64_t blocks = (count + 255) / 256 < 4096 ? (count + 255) / 256 : 4096;
  if (kind == FloatKind::kBFloat16)
    sum_splits<__nv_bfloat16><<<unsigned(blocks), 256, 0, stream>>>(partial, static_cast<__nv_bfloat16*>(out), count,
                                                                     splits);
  else
    sum_splits<__half><<<unsigned(blocks), 256, 0, stream>>>(partial, static_cast<__half*>(out), count, splits);
}

SkinnyGradPlan plan_gemm_4bit_skinny_grad_x(int64_t m, int64_t n, int64_t k, int sms) {
  SkinnyGradPlan plan;
  plan.k_groups = (k + kWarpsT * kSkinnyChunk - 1) / (kWarpsT * kSkinnyChunk);
  // Splits of N: enough for 2 resident CTAs per SM (128 registers x 256 threads) in one wave; each
  // range at least 32 x 8 TILES_M rows, so that its partial sums (M x 512 fp32 per CTA) stay at
  // most a quarter of its code bytes (rows x 256), unless that leaves fewer CTAs than SMs (4096 x
  // 4096 at M = 16: 64 CTAs by the bytes, 128 by this).
  const int64_t m_pad = m <= 8 ? 8 : 16;
  const int64_t by_bytes = n / (32 * m_pad) > 1 ? n / (32 * m_pad) : 1;
  const int64_t by_sms = (2 * int64_t(sms)) / plan.k_groups > 1 ? (2 * int64_t(sms)) / plan.k_groups : 1;
  const int64_t one_per_sm = (int64_t(sms) + plan.k_groups - 1) / plan.k_groups;
  const int64_t wanted = by_bytes > one_per_sm ? by_bytes : one_per_sm;
  int64_t splits = by_sms < wanted ? by_sms : wanted;
  if (splits > (n + 15) / 16) splits = (n + 15) / 16;
  int64_t rows = (n + splits - 1) / splits;
  rows = (rows + 15) / 16 * 16;
  plan.rows_per_split = rows;
  plan.splits = (n + rows - 1) / rows;
  plan.workspace_bytes = plan.splits > 1 ? plan.splits * m * k * int64_t(sizeof(float)) : 0;
  return plan;
}

void launch_gemm_4bit_skinny_grad_x(const Gemm4bitGradParams& p, const SkinnyGradPlan& plan, cudaStream_t stream) {
  launch_kind<__nv_bfloat16>(p, plan, stream);  // bf16 only (gemm_launch.h)
}

}  // namespace lowrank::gemm
