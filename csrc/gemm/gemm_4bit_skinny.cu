// Fused 4-bit matmul for few rows of x (M <= 16): y = x W^T with W read as packed codes and
// dequantized in registers straight into tensor-core fragments. Math: lowrank/reference.py
// matmul_4bit (x times the dequantized weight, fp32 accumulation).
//
// Why this shape of kernel (counts for 28672 x 8192 NF4, M = 1, H100):
// - The floor is the 4-bit bytes: 117 MB of codes + 3.7 MB of absmax codes, 40 us at 3.0 TB/s.
// - Per weight element there is one table lookup. A 16-entry float table in shared memory costs
//   one load per element: 235 M lookups = 7.3 M warp loads, 32 us of the load/store unit at one
//   per clock per SM, on top of the loads of the codes and of x: the LSU, not DRAM, would bound
//   it. So the table here is indexed by a whole byte (two codes) and holds the pair of 16-bit
//   values the mma wants in one register: half the lookups. It is replicated once per lane
//   ([256][32] words, 32 KB) so that lane l always reads bank l: conflict-free whatever the codes.
// - The multiply by absmax is left out of the inner loop: each 64-wide k chunk (one quantization
//   block per row, blocksize >= 64) is accumulated by 4 mma into fresh fp32 registers, which are
//   then scaled by the row's absmax and added to the running sum: 4 fp32 FMA per chunk instead of
//   one product per element, and the code value times absmax product stays in fp32.
// - The code value enters the mma rounded to x's 16-bit type (bf16: 2^-9 relative), the error the
//   dequantize-then-F.linear path makes when it rounds values * absmax to bf16.
// - M <= 16 pads to 8 or 16 mma columns: the tensor cores have ~30x headroom at this size, so the
//   padding costs nothing that shows; CUDA-core FMAs would cost 16 FMA per element at M = 16.
//
// Work split: a CTA owns 16 * ROW_TILES weight rows for the whole K; its 8 warps split K in
// contiguous ranges of 64-wide chunks and their partial sums are added in shared memory in warp
// order (deterministic). The grid is persistent (the table is built once per CTA).
//
// Fragment mapping (mma.m16n8k16, A = 16 weight rows x 16 k, B = 16 k x 8 x rows): lane
// (g = lane / 4, t = lane % 4) loads 8 packed bytes of weight rows g and g + 8 at byte offset
// 32 c + 8 t of chunk c, i.e. elements 64 c + 16 t + [0, 16), and the same 16 elements of x row
// g. In k-step s it feeds bytes 2s and 2s+1 (elements 4s .. 4s+3) as its A registers and x words
// 2s and 2s+1 as its B registers: the mma's k order is a permutation of the chunk's 64 elements,
// the same one for A and B, so the sum is the same dot product.
#include <cstdlib>

#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "gemm/gemm_launch.h"

namespace lowrank::gemm {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerTile = 16;

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                  uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Byte j (0..7) of 8 packed bytes, as a table row offset (byte * 32 words).
__device__ __forceinline__ uint32_t pair_row(const uint2& w, int j) {
  const uint32_t word = j < 4 ? w.x : w.y;
  return ((word >> (8 * (j & 3))) & 0xffu) << 5;
}

// Word j (0..7) of 16 x elements held as two uint4.
__device__ __forceinline__ uint32_t x_word(const uint4 (&v)[2], int j) {
  const uint4& h = v[j >> 2];
  switch (j & 3) {
    case 0: return h.x;
    case 1: return h.y;
    case 2: return h.z;
    default: return h.w;
  }
}

// Chunks (of 64 k) whose loads one warp issues before it uses any: ROWS_IN_FLIGHT weight-row
// tiles' worth (4 x 256 bytes per warp) whatever ROW_TILES is.
template <int ROW_TILES, int TILES_M>
struct ChunksPerStep {
  static constexpr int value = (4 / ROW_TILES / TILES_M) > 0 ? 4 / ROW_TILES / TILES_M : 1;
};

template <typename T, int TILES_M, int ROW_TILES, bool NESTED>
__global__ void __launch_bounds__(kThreads, 2) gemm_4bit_skinny(Gemm4bitParams p) {
  constexpr int kSteps = ChunksPerStep<ROW_TILES, TILES_M>::value;
  __shared__ uint32_t s_pairs[256 * 32];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  __shared__ float s_partial[kWarps][TILES_M * 4][32];

  // The pair table, one copy per lane: word [byte][lane] = (value[byte >> 4], value[byte & 15]) in
  // T, the first element (high nibble) in the low half as the mma reads it.
  for (int i = threadIdx.x; i < 256 * 32; i += kThreads) {
    const int byte = i >> 5;
    s_pairs[i] = Pack2<T>::pack(p.values[byte >> 4], p.values[byte & 15]);
  }
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t row_bytes = K / 2;
  const int block_shift = 31 - __clz(p.blocksize);
  const int64_t blocks_per_row = K >> block_shift;
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
  const float offset = NESTED ? *p.offset : 0.0f;
  const int64_t n_chunks = K / kSkinnyChunk;
  const int64_t c_begin = n_chunks * warp / kWarps, c_end = n_chunks * (warp + 1) / kWarps;
  const T* x = static_cast<const T*>(p.x);
  const int64_t n_tiles = (N + kRowsPerTile * ROW_TILES - 1) / (kRowsPerTile * ROW_TILES);

  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kRowsPerTile * ROW_TILES;
    float acc[ROW_TILES][TILES_M][4];
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
      for (int j = 0; j < TILES_M; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.0f;

    for (int64_t c0 = c_begin; c0 < c_end; c0 += kSteps) {
      // Every load of kSteps chunks first (codes, absmax or its code and scale, x), then the math.
      uint2 w[kSteps][ROW_TILES][2];
      float scale[kSteps][ROW_TILES][2];
      uint32_t code[kSteps][ROW_TILES][2];
      uint4 xv[kSteps][TILES_M][2];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        const int64_t c = c0 + u;
        const bool chunk_ok = c < c_end;
#pragma unroll
        for (int r = 0; r < ROW_TILES; ++r) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = row0 + r * kRowsPerTile + g + 8 * h;
            const bool ok = chunk_ok && row < N;
            const int64_t block = ok ? row * blocks_per_row + ((c * kSkinnyChunk) >> block_shift) : 0;
            w[u][r][h] = ok ? *reinterpret_cast<const uint2*>(p.packed + row * row_bytes + c * 32 + t * 8)
                            : make_uint2(0u, 0u);
            if constexpr (NESTED) {
              code[u][r][h] = ok ? p.absmax_codes[block] : 0u;
              scale[u][r][h] = ok ? p.nested_absmax[block >> nested_shift] : 0.0f;
            } else {
              code[u][r][h] = 0u;
              scale[u][r][h] = ok ? p.absmax[block] : 0.0f;
            }
          }
        }
#pragma unroll
        for (int j = 0; j < TILES_M; ++j) {
          const int64_t m = j * 8 + g;
          const bool ok = chunk_ok && m < M;
          const uint4* src = reinterpret_cast<const uint4*>(x + m * K + c * kSkinnyChunk + t * 16);
          xv[u][j][0] = ok ? src[0] : make_uint4(0u, 0u, 0u, 0u);
          xv[u][j][1] = ok ? src[1] : make_uint4(0u, 0u, 0u, 0u);
        }
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (c0 + u >= c_end) break;
#pragma unroll
        for (int r = 0; r < ROW_TILES; ++r) {
          float absmax[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // Nested: a rounded product, then a rounded sum, exactly as dequantize_4bit_nested.
            absmax[h] = NESTED ? __fadd_rn(__fmul_rn(s_qmap[code[u][r][h]], scale[u][r][h]), offset)
                               : scale[u][r][h];
          }
          float chunk[TILES_M][4];
#pragma unroll
          for (int j = 0; j < TILES_M; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) chunk[j][i] = 0.0f;
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const uint32_t a0 = s_pairs[pair_row(w[u][r][0], 2 * s) + lane];
            const uint32_t a1 = s_pairs[pair_row(w[u][r][1], 2 * s) + lane];
            const uint32_t a2 = s_pairs[pair_row(w[u][r][0], 2 * s + 1) + lane];
            const uint32_t a3 = s_pairs[pair_row(w[u][r][1], 2 * s + 1) + lane];
#pragma unroll
            for (int j = 0; j < TILES_M; ++j) {
              mma_16816<T>(chunk[j], a0, a1, a2, a3, x_word(xv[u][j], 2 * s), x_word(xv[u][j], 2 * s + 1));
            }
          }
#pragma unroll
          for (int j = 0; j < TILES_M; ++j) {
            acc[r][j][0] = fmaf(chunk[j][0], absmax[0], acc[r][j][0]);
            acc[r][j][1] = fmaf(chunk[j][1], absmax[0], acc[r][j][1]);
            acc[r][j][2] = fmaf(chunk[j][2], absmax[1], acc[r][j][2]);
            acc[r][j][3] = fmaf(chunk[j][3], absmax[1], acc[r][j][3]);
          }
        }
      }
    }

    // The warps' partial sums, added in warp order, then bias, one rounding, store. Accumulator i
    // of lane (g, t) in x tile j is y[m = 8 j + 2 t + (i & 1)][n = row tile + g + 8 (i >> 1)].
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r) {
#pragma unroll
      for (int j = 0; j < TILES_M; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) s_partial[warp][j * 4 + i][lane] = acc[r][j][i];
      __syncthreads();
      if (threadIdx.x < TILES_M * 4 * 32) {
        const int idx = threadIdx.x >> 5, ln = threadIdx.x & 31;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += s_partial[w][idx][ln];
        const int j = idx >> 2, i = idx & 3;
        const int64_t n = row0 + r * kRowsPerTile + (ln >> 2) + 8 * (i >> 1);
        const int64_t m = j * 8 + 2 * (ln & 3) + (i & 1);
        if (n < N && m < M) {
          if (p.bias != nullptr) sum += to_float(static_cast<const T*>(p.bias)[n]);
          static_cast<T*>(p.out)[m * N + n] = from_float<T>(sum);
        }
      }
      __syncthreads();
    }
  }
}

int multiprocessor_count() {
  // Cached per device: the attribute query costs host time on every launch (M = 1 calls are
  // ~10 us of device time, so the host side is on the critical path of eager decoding).
  static int counts[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) device = 0;
  if (counts[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    counts[device] = count > 0 ? count : 132;
  }
  return counts[device];
}

// CTAs per SM of one kernel instantiation, queried once (same value on every GPU of a process
// with one architecture; the build targets one architecture per binary image).
template <typename Kernel>
int ctas_per_sm(Kernel kernel) {
  static int per_sm = 0;
  if (per_sm == 0) {
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
    if (per_sm <= 0) per_sm = 1;
  }
  return per_sm;
}

template <typename T, int TILES_M, int ROW_TILES, bool NESTED>
void launch_tiles(const Gemm4bitParams& p, cudaStream_t stream) {
  auto kernel = gemm_4bit_skinny<T, TILES_M, ROW_TILES, NESTED>;
  const int64_t slots = int64_t(ctas_per_sm(kernel)) * multiprocessor_count();
  const int64_t n_tiles = (p.n + kRowsPerTile * ROW_TILES - 1) / (kRowsPerTile * ROW_TILES);
  kernel<<<unsigned(n_tiles < slots ? n_tiles : slots), kThreads, 0, stream>>>(p);
}

// How well a persistent grid of n_tiles uses the SMs: CTA b takes tiles b, b + G, ...; the first
// SM-count CTAs land one per SM, the next ones in the second slots. Returns (mean SM load / max
// SM load) times the fraction of CTA slots filled (a half-empty SM has half the bytes in flight).
double grid_score(int64_t n_tiles, int64_t sms, int64_t per_sm) {
  const int64_t slots = sms * per_sm;
  const int64_t grid = n_tiles < slots ? n_tiles : slots;
  const int64_t base = n_tiles / grid, extra = n_tiles % grid;
  int64_t worst = 0;
  for (int64_t s = 0; s < sms; ++s) {
    int64_t load = 0;
    for (int64_t b = s; b < grid; b += sms) load += base + (b < extra ? 1 : 0);
    worst = load > worst ? load : worst;
  }
  if (worst == 0) return 0.0;
  return double(n_tiles) / double(sms) / double(worst) * double(grid) / double(slots);
}

// LOWRANK_SKINNY_ROW_TILES = 1, 2 or 4 forces the tile height (benchmark sweeps); 0 or unset:
// the rule below.
int row_tiles_override() {
  const char* env = std::getenv("LOWRANK_SKINNY_ROW_TILES");
  const int v = env != nullptr ? std::atoi(env) : 0;
  return (v == 1 || v == 2 || v == 4) ? v : 0;
}

template <typename T, int TILES_M, bool NESTED>
void launch_rows(const Gemm4bitParams& p, cudaStream_t stream) {
  // Taller tiles reuse each x fragment over more rows (fewer x loads per weight byte) but cut the
  // work into fewer pieces: 28672 rows in 64-row tiles are 448 tiles on 264 CTA slots, so some
  // SMs do 4 tiles and others 3 (score 0.85); 32-row tiles: 0.97. 14336 rows: 0.85 / 0.85 / 0.97
  // for 64 / 32 / 16 rows; 4096 rows in 32-row tiles fill half the slots (0.48), 16-row: 0.97.
  // The rule: the tallest tile whose score is within 2% of the best.
  int rows = row_tiles_override();
  if (rows == 0) {
    const int64_t sms = multiprocessor_count();
    const int64_t per_sm = 2;  // __launch_bounds__(kThreads, 2)
    const double b4 = grid_score((p.n + 63) / 64, sms, per_sm), b2 = grid_score((p.n + 31) / 32, sms, per_sm),
                 b1 = grid_score((p.n + 15) / 16, sms, per_sm);
    const double best = b4 > b2 ? (b4 > b1 ? b4 : b1) : (b2 > b1 ? b2 : b1);
    rows = b4 >= best - 0.02 ? 4 : (b2 >= best - 0.02 ? 2 : 1);
  }
  if (rows == 4) launch_tiles<T, TILES_M, 4, NESTED>(p, stream);
  else if (rows == 2) launch_tiles<T, TILES_M, 2, NESTED>(p, stream);
  else launch_tiles<T, TILES_M, 1, NESTED>(p, stream);
}

template <typename T>
void launch_typed(const Gemm4bitParams& p, cudaStream_t stream) {
  const bool nested = p.absmax == nullptr;
  if (p.m <= 8) {
    if (nested) launch_rows<T, 1, true>(p, stream);
    else launch_rows<T, 1, false>(p, stream);
  } else {
    if (nested) launch_rows<T, 2, true>(p, stream);
    else launch_rows<T, 2, false>(p, stream);
  }
}

}  // namespace

void launch_gemm_4bit_skinny(const Gemm4bitParams& p, cudaStream_t stream) {
  if (p.kind == FloatKind::kBFloat16) launch_typed<__nv_bfloat16>(p, stream);
  else launch_typed<__half>(p, stream);
}

}  // namespace lowrank::gemm
