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
//   values the mma wants in one register: half the lookups. It is replicated once per lane so
//   that lane l always reads bank l, conflict-free whatever the codes, in rows of 256 bytes (64
//   KB, the upper half of each row unused) so that one byte permute addresses it (pair_word).
// - The multiply by absmax is left out of the inner loop: each 64-wide k chunk (one quantization
//   block per row, blocksize >= 64) is accumulated by 4 mma into fresh fp32 registers, which are
//   then scaled by the row's absmax and added to the running sum: 4 fp32 FMA per chunk instead of
//   one product per element, and the code value times absmax product stays in fp32.
// - The code value enters the mma rounded to x's 16-bit type (bf16: 2^-9 relative), the error the
//   dequantize-then-F.linear path makes when it rounds values * absmax to bf16.
// - M <= 16 pads to 8 or 16 mma columns: the tensor cores have ~30x headroom at this size, so the
//   padding costs nothing that shows; CUDA-core FMAs would cost 16 FMA per element at M = 16.
//
// Work split: a group of 8 warps owns 16 * ROW_TILES weight rows for the whole K; its warps split
// K in contiguous ranges of 64-wide chunks and their partial sums are added in shared memory in
// warp order (deterministic). A CTA is 3 (or 2) such groups sharing one table; the grid is
// persistent, one CTA per SM (the table is built once per SM).
//
// Instruction budget: the first version issued ~160 instructions per 512 packed bytes per warp
// and ncu (H100, 28672 x 8192, M = 1) showed the schedulers issuing 0.56 per cycle with 44% of
// cycles having no eligible warp, DRAM at 36%: issue-bound at 16 warps per SM. Half of those
// instructions were the lookup index arithmetic (6 per lookup), 64-bit address math and
// branches around predicated loads. Now a lookup is 3 instructions in the sm_90a SASS (pair_word),
// rows past N and x rows past M read a clamped valid row instead of being predicated (their mma
// rows/columns are never stored), offsets are 32-bit, and the streamed codes bypass L1. With
// 4-instruction lookups the loop was ~81 instructions per 64-wide chunk per warp, 64 of them the
// 16 lookups (ncu: 33.5-34.0 M instructions, issue slots 54% busy, DRAM 39% at base clocks);
// with 3, ncu counts 30.0 M and 91.2 us against 98.5 us in the same run (graph-timed at boost
// clocks the gain is 1-3%: 70.6 vs 72.7 us). What the warps wait on most now is their global
// loads (long scoreboard ~3-4 cycles per issued instruction): x is loaded one chunk ahead of
// its use (28672 x 8192: M = 1 69.2 vs 70.6 us, M = 16 86.3 vs 91.6 us, same run), and an L2
// prefetch of the next segment's absmax codes took ncu from 90.7 to 88.9 us but did not show in
// graph timing (70.1 vs 69.8), so it is not in. 2-instruction lookups from a 64 KB table shared
// per SM (2026-11-24; A/B in one run, 28672 x 8192): 19.9 M instructions against 31.6 M, ncu
// 77.2 against 93.6 us, graph-timed M = 1 62.1 against 71.0 us and M = 16 72.4 against 78.9.
// What bounds it now (ncu source view): the shared-memory pipe, L1/TEX 76% busy; stalls on the
// lookups' results (short scoreboard 20%), fixed latency (18%), the MIO queue (16%), global
// loads (15%), with 16 warps per SM (128 registers for 32-row tiles).
//
// Fragment mapping (mma.m16n8k16, A = 16 weight rows x 16 k, B = 16 k x 8 x rows): lane
// (g = lane / 4, t = lane % 4) loads 8 packed bytes of weight rows g and g + 8 at byte offset
// 32 c + 8 t of chunk c, i.e. elements 64 c + 16 t + [0, 16), and the same 16 elements of x row
// g. In k-step s it feeds bytes 2s and 2s+1 (elements 4s .. 4s+3) as its A registers and x words
// 2s and 2s+1 as its B registers: the mma's k order is a permutation of the chunk's 64 elements,
// the same one for A and B, so the sum is the same dot product.
#include <cstdlib>
#include <type_traits>

#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "gemm/gemm_launch.h"
#include "gemm/skinny_common.cuh"

namespace lowrank::gemm {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
using skinny::kRowsPerTile;

// 8 packed bytes read once: no L1 allocation, so L1 keeps x and the absmax codes (the ncu run
// put L1 throughput at 76% with the codes allocating).
__device__ __forceinline__ uint2 load_stream_u2(const uint8_t* ptr) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}

// Chunks (of 64 k) whose loads one warp issues before it uses any: 4 row tiles' worth (4 x 512
// bytes of codes per warp) whatever ROW_TILES is.
template <int ROW_TILES, int TILES_M>
struct ChunksPerStep {
  static constexpr int value = (4 / ROW_TILES / TILES_M) > 0 ? 4 / ROW_TILES / TILES_M : 1;
};

// A CTA per SM, shaped by the tile height: the 64 KB table (256-byte rows) is shared by 3 groups
// of 8 warps (16-row tiles fit 80 registers) or 2 (taller tiles need ~100-128), each group working
// on its own tiles with its own scratch and a named barrier. That is the warps and registers per
// SM of the earlier 3 (or 2) CTAs of 8 warps with a 32 KB table each, in 85-93 KB of shared
// memory instead of 126 (ncu: a 100 KB carveout instead of 132, so L1 keeps ~30 KB more).
template <int ROW_TILES>
struct SkinnyLayout {
  static constexpr int kGroups = ROW_TILES == 1 ? 3 : 2;
  static constexpr int kThreadsPerCta = kThreads * kGroups;
  static constexpr int kTableBytes = skinny::kPairTableBytes;
};

template <int TILES_M, int ROW_TILES, bool NESTED>
struct SkinnySmem {
  static constexpr int kTileRows = kRowsPerTile * ROW_TILES;
  static constexpr int kSegment = 16 / ROW_TILES;  // chunks per absmax segment (16 x 16 decoded values)
  // Per warp: the decoded absmax of its tile rows for one segment of its k range (padded rows:
  // the 8 rows a load touches fall in 8 banks); reused after the k loop for the warps' partial sums.
  static constexpr int kAbsmaxFloats = kWarps * kTileRows * (kSegment + 1);
  static constexpr int kPartialFloats = kWarps * TILES_M * 4 * 32;
  static constexpr int kScratchFloats = kAbsmaxFloats > kPartialFloats ? kAbsmaxFloats : kPartialFloats;
  static constexpr int kQmapOff = SkinnyLayout<ROW_TILES>::kTableBytes;
  static constexpr int kScratchOff = kQmapOff + (NESTED ? 256 : 4) * 4;
  static constexpr int kBytes = kScratchOff + SkinnyLayout<ROW_TILES>::kGroups * kScratchFloats * 4;
};

template <typename T, int TILES_M, int ROW_TILES, bool NESTED>
__global__ void __launch_bounds__(SkinnyLayout<ROW_TILES>::kThreadsPerCta, 1) gemm_4bit_skinny(Gemm4bitParams p) {
  using Layout = SkinnyLayout<ROW_TILES>;
  using Smem = SkinnySmem<TILES_M, ROW_TILES, NESTED>;
  constexpr int kSteps = ChunksPerStep<ROW_TILES, TILES_M>::value;
  constexpr int kTileRows = Smem::kTileRows;
  constexpr int kSegment = Smem::kSegment;
  // All of it dynamic, the table first: nothing static precedes it, so it sits at the window
  // offset pair_word takes as an immediate (checked below).
  extern __shared__ __align__(16) uint8_t smem_dyn[];
  uint32_t* s_pairs = reinterpret_cast<uint32_t*>(smem_dyn);
  float* s_qmap = reinterpret_cast<float*>(smem_dyn + Smem::kQmapOff);
  const int group = threadIdx.x / kThreads;  // 8-warp group: its own tiles, scratch and barrier
  float* s_scratch = reinterpret_cast<float*>(smem_dyn + Smem::kScratchOff) + group * Smem::kScratchFloats;
  float(*s_partial)[TILES_M * 4][32] = reinterpret_cast<float(*)[TILES_M * 4][32]>(s_scratch);
  float(*s_absmax)[kSegment + 1] = reinterpret_cast<float(*)[kSegment + 1]>(s_scratch);

  skinny::build_pair_table<T>(s_pairs, p.values, threadIdx.x, Layout::kThreadsPerCta);
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += Layout::kThreadsPerCta) s_qmap[i] = p.nested_qmap[i];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) % kWarps;
  const int group_thread = threadIdx.x % kThreads;
  // this group's tiles: the grid's groups 0 take tiles 0 .. gridDim - 1, its groups 1 the next
  // gridDim, ...: with fewer tiles than groups the tiles spread over all SMs
  const int64_t tile_first = int64_t(group) * gridDim.x + blockIdx.x;
  const int64_t tile_stride = int64_t(gridDim.x) * Layout::kGroups;
  auto group_sync = [&]() {
    asm volatile("bar.sync %0, %1;" ::"r"(1 + group), "n"(kThreads) : "memory");
  };
  const int g = lane >> 2, t = lane & 3;
  const char* table = reinterpret_cast<const char*>(s_pairs);
  const uint32_t lane4 = uint32_t(lane) * 4u;
  // 32-bit offsets: the launcher refuses weights of 2^31 packed bytes or more.
  const int M = int(p.m);
  const int64_t N = p.n;
  const uint32_t K = uint32_t(p.k);
  const uint32_t row_bytes = K / 2;
  const int block_shift = 31 - __clz(p.blocksize);
  const int chunk_block_shift = block_shift - 6;  // chunks of 64 per absmax block, as a shift
  const uint32_t blocks_per_row = K >> block_shift;
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
  const float offset = NESTED ? *p.offset : 0.0f;
  const int n_chunks = int(K / kSkinnyChunk);
  const int c_begin = n_chunks * warp / kWarps, c_end = n_chunks * (warp + 1) / kWarps;
  const T* x = static_cast<const T*>(p.x);
  const int64_t n_tiles = (N + kRowsPerTile * ROW_TILES - 1) / (kRowsPerTile * ROW_TILES);
  // x rows past M read row M - 1 (their mma columns are never stored): no predicated loads.
  uint32_t x_off[TILES_M];
#pragma unroll
  for (int j = 0; j < TILES_M; ++j) x_off[j] = uint32_t(min(j * 8 + g, M - 1)) * K + uint32_t(t) * 16u;

  // This warp's chunks of a tile come in groups of kSteps; the codes of the next group (the next
  // tile's first group after a tile's last) are loaded while the current one is computed, so the
  // DRAM stream never waits on the math (the ncu run of the load-then-compute loop showed warps
  // stalled on those loads 46% of the time and DRAM at 37%).
  const int n_groups = (c_end - c_begin + kSteps - 1) / kSteps;
  float(*my_absmax)[kSegment + 1] = s_absmax + warp * kTileRows;
  auto load_group = [&](int64_t tile, int c0, uint2(&w)[kSteps][ROW_TILES][2]) {
    const int64_t row0 = tile * kTileRows;
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Rows past N read row N - 1 (their mma rows are never stored): no predicated loads.
        const int64_t row_raw = row0 + r * kRowsPerTile + g + 8 * h;
        const uint8_t* row_codes = p.packed + uint32_t(row_raw < N ? row_raw : N - 1) * row_bytes + t * 8;
#pragma unroll
        for (int u = 0; u < kSteps; ++u) w[u][r][h] = load_stream_u2(row_codes + uint32_t(min(c0 + u, c_end - 1)) * 32u);
      }
  };
  uint2 w_next[kSteps][ROW_TILES][2];
  if (n_groups > 0 && tile_first < n_tiles) load_group(tile_first, c_begin, w_next);

  // The tile loop twice: table lookups through ld.shared with the table's window offset as an
  // immediate (kImm, see pair_word), or through the generic shared address (any other layout).
  // 16 elements of each of the lane's x rows at chunk c (x rows past M read row M - 1: their mma
  // columns are never stored). asm volatile keeps the load where it is written: one chunk ahead.
  auto load_x = [&](int c, uint4(&v)[TILES_M][2]) { skinny::load_x_chunk<T, TILES_M>(x, x_off, c, v); };
  auto tiles = [&](auto imm) {
    constexpr bool kImm = decltype(imm)::value;
    uint4 x_cur[TILES_M][2];  // x of the chunk being computed
    if (c_begin < c_end) load_x(c_begin, x_cur);
    for (int64_t tile = tile_first; tile < n_tiles; tile += tile_stride) {
      const int64_t row0 = tile * kTileRows;
      float acc[ROW_TILES][TILES_M][4];
  #pragma unroll
      for (int r = 0; r < ROW_TILES; ++r)
  #pragma unroll
        for (int j = 0; j < TILES_M; ++j)
  #pragma unroll
          for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.0f;

      for (int gi = 0; gi < n_groups; ++gi) {
        const int c0 = c_begin + gi * kSteps;
        uint2 w[kSteps][ROW_TILES][2];
  #pragma unroll
        for (int u = 0; u < kSteps; ++u)
  #pragma unroll
          for (int r = 0; r < ROW_TILES; ++r) w[u][r][0] = w_next[u][r][0], w[u][r][1] = w_next[u][r][1];
        if (gi + 1 < n_groups) load_group(tile, c0 + kSteps, w_next);
        else if (tile + tile_stride < n_tiles) load_group(tile + tile_stride, c_begin, w_next);

        // A segment's absmax, decoded once per (row, chunk) with coalesced loads: the codes of a
        // row's consecutive blocks are consecutive bytes. (Loading them with the weight codes, 8
        // rows per warp load, was a third of the L1 wavefronts in the ncu run.) Groups never
        // straddle segments: kSegment is a multiple of kSteps.
        const int seg = c_begin + ((c0 - c_begin) / kSegment) * kSegment;
        if (c0 == seg) {
          const int seg_len = min(kSegment, c_end - seg);
          __syncwarp();
  #pragma unroll
          for (int i = lane; i < kTileRows * kSegment; i += 32) {
            const int rr = i / kSegment, cc = i % kSegment;
            if (cc < seg_len) {
              const int64_t row_raw = row0 + rr;
              const uint32_t row = uint32_t(row_raw < N ? row_raw : N - 1);
              const uint32_t block = row * blocks_per_row + (uint32_t(seg + cc) >> chunk_block_shift);
              if constexpr (NESTED) {
                // a rounded product, then a rounded sum, exactly as dequantize_4bit_nested
                my_absmax[rr][cc] = __fadd_rn(__fmul_rn(s_qmap[__ldg(p.absmax_codes + block)],
                                                        __ldg(p.nested_absmax + (block >> nested_shift))), offset);
              } else {
                my_absmax[rr][cc] = __ldg(p.absmax + block);
              }
            }
          }
          __syncwarp();
        }

  #pragma unroll
        for (int u = 0; u < kSteps; ++u) {
          if (c0 + u >= c_end) break;
          // x of the chunk after this one (the range's first for the next tile after its last),
          // loaded before this chunk's lookups so its L1 latency is hidden behind them
          uint4 x_next[TILES_M][2];
          load_x(c0 + u + 1 < c_end ? c0 + u + 1 : c_begin, x_next);
  #pragma unroll
          for (int r = 0; r < ROW_TILES; ++r) {
            const float absmax[2] = {my_absmax[r * kRowsPerTile + g][c0 + u - seg],
                                     my_absmax[r * kRowsPerTile + g + 8][c0 + u - seg]};
            float chunk[TILES_M][4];
            skinny::chunk_mma<T, TILES_M, kImm>(chunk, w[u][r][0], w[u][r][1], x_cur, table, lane4);
            skinny::scale_add<TILES_M>(acc[r], chunk, absmax[0], absmax[1]);
          }
  #pragma unroll
          for (int j = 0; j < TILES_M; ++j) x_cur[j][0] = x_next[j][0], x_cur[j][1] = x_next[j][1];
        }
      }

      // The warps' partial sums, added in warp order, then bias, one rounding, store. Accumulator i
      // of lane (g, t) in x tile j is y[m = 8 j + 2 t + (i & 1)][n = row tile + g + 8 (i >> 1)].
      // The partial sums reuse the absmax scratch: every warp must be past its last absmax read.
      group_sync();
  #pragma unroll
      for (int r = 0; r < ROW_TILES; ++r) {
  #pragma unroll
        for (int j = 0; j < TILES_M; ++j)
  #pragma unroll
          for (int i = 0; i < 4; ++i) s_partial[warp][j * 4 + i][lane] = acc[r][j][i];
        group_sync();
        if (group_thread < TILES_M * 4 * 32) {
          const int idx = group_thread >> 5, ln = group_thread & 31;
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
        group_sync();
      }
    }
  };
  const bool imm = !p.generic_lookup && (uint32_t(__cvta_generic_to_shared(s_pairs)) == skinny::kTableWindowOffset);
  if (imm) tiles(std::true_type{});
  else tiles(std::false_type{});
}

template <typename T, int TILES_M, int ROW_TILES, bool NESTED>
void launch_tiles(const Gemm4bitParams& p, cudaStream_t stream) {
  using Layout = SkinnyLayout<ROW_TILES>;
  constexpr int kSmemBytes = SkinnySmem<TILES_M, ROW_TILES, NESTED>::kBytes;
  auto kernel = gemm_4bit_skinny<T, TILES_M, ROW_TILES, NESTED>;
  // CTAs per SM of this instantiation, queried once (a static per template instance: every
  // instantiation has the same function-pointer type, so a static keyed on that type would be
  // shared, as it was in the first version: every kernel ran with the first one's count).
  static int per_sm = 0;
  if (per_sm == 0) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Layout::kThreadsPerCta, kSmemBytes);
    if (per_sm <= 0) per_sm = 1;
  }
  const int64_t slots = int64_t(per_sm) * skinny::multiprocessor_count();
  const int64_t n_tiles = (p.n + kRowsPerTile * ROW_TILES - 1) / (kRowsPerTile * ROW_TILES);
  kernel<<<unsigned(n_tiles < slots ? n_tiles : slots), Layout::kThreadsPerCta, kSmemBytes, stream>>>(p);
}

// LOWRANK_SKINNY_ROW_TILES = 1, 2 or 4 forces the tile height (benchmark sweeps); 0 or unset:
// the rule below.
int row_tiles_override() {
  const char* env = std::getenv("LOWRANK_SKINNY_ROW_TILES");
  const int v = env != nullptr ? std::atoi(env) : 0;
  return (v == 1 || v == 2 || v == 4) ? v : 0;
}

// Taller tiles reuse each x fragment over more rows (fewer x loads per weight byte) but cut the
// work into fewer pieces. The rule is the H100 A/B of scripts/ab_skinny.py (graph-timed device
// time, us, 16- / 32-row tiles, M = 1 and 16): 28672 x 8192 67.2 / 62.1, 90.5 / 72.4; 14336 x
// 4096 25.5 / 20.2, 31.1 / 23.1; 4096 x 14336 21.3 / 21.1, 26.8 / 24.4; 4096 x 4096 9.8 / 8.5,
// 11.6 / 9.6; 2048 x 4096 8.0 / 7.7, 9.5 / 8.8; 1024 x 8192 10.4 / 11.6, 12.8 / 13.8. 32-row
// tiles unless they number fewer than a third of the SMs (the sweep of the 3-CTA kernel before
// the shared table had favoured 16-row tiles at M = 1 on 28672 x 8192: 71.5 / 76.8).
int skinny_row_tiles(const Gemm4bitParams& p) {
  const int rows = row_tiles_override();
  if (rows != 0) return rows;
  return 3 * ((p.n + 31) / 32) >= skinny::multiprocessor_count() ? 2 : 1;
}

template <typename T, int TILES_M, bool NESTED>
void launch_rows(const Gemm4bitParams& p, int rows, cudaStream_t stream) {
  if (rows == 4) launch_tiles<T, TILES_M, 4, NESTED>(p, stream);
  else if (rows == 2) launch_tiles<T, TILES_M, 2, NESTED>(p, stream);
  else launch_tiles<T, TILES_M, 1, NESTED>(p, stream);
}

template <typename T>
void launch_typed(const Gemm4bitParams& p, int rows, cudaStream_t stream) {
  const bool nested = p.absmax == nullptr;
  if (p.m <= 8) {
    if (nested) launch_rows<T, 1, true>(p, rows, stream);
    else launch_rows<T, 1, false>(p, rows, stream);
  } else {
    if (nested) launch_rows<T, 2, true>(p, rows, stream);
    else launch_rows<T, 2, false>(p, rows, stream);
  }
}

// The bulk-copy kernel unless LOWRANK_SKINNY_TMA=0 (A/B against this file's kernel).
bool tma_allowed() {
  const char* env = std::getenv("LOWRANK_SKINNY_TMA");
  return env == nullptr || env[0] != '0';
}

}  // namespace

void launch_gemm_4bit_skinny(const Gemm4bitParams& params, cudaStream_t stream) {
  Gemm4bitParams p = params;
  // LOWRANK_SKINNY_GENERIC_LOOKUP=1: the lookups through generic addresses (benchmark A/B)
  const char* generic = std::getenv("LOWRANK_SKINNY_GENERIC_LOOKUP");
  p.generic_lookup = generic != nullptr && generic[0] == '1';
  const int rows = skinny_row_tiles(p);
  // bulk copies need 16-byte aligned sources: rows start K / 2 bytes apart, a multiple of 32
  if (p.cc_major == 9 && rows <= 2 && reinterpret_cast<uintptr_t>(p.packed) % 16 == 0 && tma_allowed() &&
      launch_gemm_4bit_skinny_tma(p, rows, stream))
    return;
  if (p.kind == FloatKind::kBFloat16) launch_typed<__nv_bfloat16>(p, rows, stream);
  else launch_typed<__half>(p, rows, stream);
}

}  // namespace lowrank::gemm
