// The skinny kernel (M <= 16) on Hopper: the same pair-table lookups and mma as
// gemm_4bit_skinny.cu, but the packed codes reach shared memory by the TMA engine (tensor copies
// of 32 rows x 128 bytes) instead of through the warps' registers.
//
// Why (28672 x 8192 NF4, M = 1, H100): the register kernel ran 61.9 us, 65% of the copy ceiling,
// with the L1/shared-memory pipe the busiest unit (ncu L1/TEX 76%). Each of its 8-byte code loads
// touches 8 rows, 8 L1 tag requests per 256 bytes; a diagnostic that halved those requests ran
// 11% faster. A TMA copy writes shared memory without any L1 tag request or load instruction;
// the consumers read the codes back with conflict-free 8-byte shared loads (2 wavefronts per warp
// load where the global load took 8 tag requests).
//
// Shape: one CTA per SM (the 64 KB table is built once per SM): a producer warp and 16 consumer
// warps around a ring of stages. A stage is one tile of 16 * RT weight rows times a slab of 512
// code bytes per row (1024 k, 16 chunks of 64): the producer waits for the stage to be free,
// issues its copies (4 boxes of 128 bytes x 16 * RT rows, one thread) and decodes the stage's
// absmax into shared memory, then arrives on the stage's full barrier. Consumer warp w takes chunk
// w of every slab for all the stage's row tiles (its x fragment serves them all), so over a
// tile's slabs it accumulates partial sums over a fixed set of k; after a tile's last slab the
// consumers add their partials in warp order (deterministic).
// The first version copied each row's 512 bytes with its own 1D bulk copy (cp.async.bulk, 32 per
// stage): the copy instruction takes uniform operands, so the producer issued them one lane at a
// time, ~60 cycles each, and the consumers waited on their stages: 117-132 us at M = 1 against
// 62 for the register kernel (ncu: 64% of the consumers' samples on the full barrier).
// Bank conflicts: the boxes land in the 128-byte swizzle (16-byte unit u of row r at u ^ (r % 8)).
// A half warp's 8-byte loads read 4 rows x 2 units; with lane g on weight row g, rows g and g ^ 1
// would share units (2-way conflicts). So lane g takes weight rows perm(g) and perm(g) + 8, perm =
// 0 2 4 6 1 3 5 7 (the mma's row order is free; the epilogue maps back): the 4 rows of a half warp
// XOR by 0, 2, 4, 6 (or 1, 3, 5, 7), 8 distinct units, 32 banks.
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "gemm/capture_chain.h"
#include "gemm/gemm_launch.h"
#include "gemm/hopper.cuh"
#include "gemm/skinny_common.cuh"

namespace lowrank::gemm {
namespace {

using skinny::kRowsPerTile;

constexpr int kConsumerWarps = 16;
// Producer warps: each decodes a quarter of a stage's absmax. With one, 28672 x 8192 at M = 1 ran
// 90.9 us (register kernel 62.0): ncu put that warp busy ~86% of the kernel at ~0.1 instructions
// per cycle (its 16 decodes per lane and stage are a chain of dependent loads and lookups) and
// the consumers' samples half on their full barriers. 20 warps cost no registers over 17: both
// put 5 warps on some scheduler, 96 registers each.
constexpr int kProducerWarps = 4;
constexpr int kThreads = 32 * (kConsumerWarps + kProducerWarps);
constexpr int kSlabChunks = 16;                      // 64-wide chunks per stage and row
constexpr int kSlabBytes = kSlabChunks * kSkinnyChunk / 2;  // 512 code bytes per row
constexpr int kBoxBytes = 128;                            // inner size of a copy box: the 128-byte swizzle's row
constexpr int kBoxesPerSlab = kSlabBytes / kBoxBytes;
constexpr int kAbsPitch = kSlabChunks + 1;                 // floats: rows g and g + 8 in distinct banks
[[maybe_unused]] constexpr int kAbsmaxLag = 2;  // producer iterations between a stage's absmax loads and their decode

template <int RT, int TILES_M>
struct TmaLayout {
  static constexpr int kRows = kRowsPerTile * RT;  // weight rows per tile (and per stage)
  // 96 KB of codes in flight per SM either way: 6 stages of 32 rows or 12 of 16.
  static constexpr int kStages = RT == 1 ? 12 : 6;
  static constexpr int kBoxStride = kRows * kBoxBytes;   // one box: kRows rows of 128 bytes
  static constexpr int kCodeBytes = kBoxesPerSlab * kBoxStride;  // per stage
  static constexpr int kAbsBytes = kRows * kAbsPitch * 4;
  static constexpr int kQmapOff = skinny::kPairTableBytes;  // the table first: the window offset check
  static constexpr int kCodeOff = kQmapOff + 256 * 4;
  static constexpr int kAbsOff = kCodeOff + kStages * kCodeBytes;
  static constexpr int kPartialOff = kAbsOff + kStages * kAbsBytes;
  static constexpr int kPartialBytes = kConsumerWarps * TILES_M * 4 * 32 * 4;
  static constexpr int kBarOff = kPartialOff + kPartialBytes;
  static constexpr int kBytes = kBarOff + 2 * kStages * 8;
  static_assert(kCodeOff % 1024 == 0 && kBoxStride % 1024 == 0, "the 128-byte swizzle repeats every 1024 bytes");
  static_assert(kBarOff % 8 == 0, "mbarriers are 8-byte aligned");
  static_assert(kBytes <= 227 * 1024, "shared memory per CTA");
  static_assert(kConsumerWarps == kSlabChunks, "a consumer warp per chunk of the slab");
};

using hopper::smem_addr;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
using hopper::allow_dependents;
using hopper::dependency_wait;
using hopper::mbar_arrive;
using hopper::mbar_expect_tx;
using hopper::mbar_init;
using hopper::mbar_wait;
using hopper::tma_load_2d;

// A CTA's tiles: `whole` tiles of the kernel's height, blockIdx.x + i * gridDim.x, then, when the
// last round is split (split_last), one of its tiles' 16-row halves from half_row0. 448 32-row
// tiles over 132 CTAs (14336 rows) run 3.39 rounds of work in 4; 104 halves make the last round
// half as long.
struct Schedule {
  int whole;
  bool half;
  int64_t half_row0;
};
template <int kRows>
__device__ __forceinline__ Schedule cta_schedule(int64_t n, int64_t n_tiles, bool split_last) {
  const int64_t rounds = n_tiles / gridDim.x, rest = n_tiles - rounds * gridDim.x;
  if (!split_last) return Schedule{int(rounds + (blockIdx.x < rest)), false, 0};
  const int64_t half_row0 = rounds * gridDim.x * kRows + int64_t(blockIdx.x) * kRowsPerTile;
  return Schedule{int(rounds), blockIdx.x < 2 * rest && half_row0 < n, half_row0};
}
#endif

template <typename T, int RT, int TILES_M, bool NESTED>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_4bit_skinny_tma(const __grid_constant__ CUtensorMap code_map, const __grid_constant__ CUtensorMap half_map,
                         const Gemm4bitParams p, const bool split_last, const bool early_weights) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using L = TmaLayout<RT, TILES_M>;
  constexpr int S = L::kStages;
  constexpr int kRows = L::kRows;
  // All of it dynamic, the table first: nothing static precedes it, so it sits at the window
  // offset pair_word takes as an immediate (checked below).
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* s_pairs = reinterpret_cast<uint32_t*>(smem);
  float* s_qmap = reinterpret_cast<float*>(smem + L::kQmapOff);
  const uint32_t full_bar = smem_addr(smem + L::kBarOff);  // + 8 s
  const uint32_t empty_bar = full_bar + 8 * S;

  // Launched with programmatic dependent launch (launch_gemm_4bit_skinny_tma), this grid may start
  // while the previous kernel of the stream still runs. It reads nothing of x before
  // dependency_wait(), and nothing at all unless early_weights, which the launcher sets only when
  // the previous kernel is a skinny launch that does not write the weight (capture_chain.h): then
  // the producers copy codes and absmax and the consumers build the pair table from the code
  // values before the wait. Every thread lets dependents launch only after its own wait, so when
  // the next grid starts, every kernel before this one has finished: that is what makes the next
  // call's early reads safe. An L2 prefetch of each CTA's first tile before the wait was slower
  // than none (docs/design.md).
  if (!early_weights) {
    dependency_wait();
    allow_dependents();
  }

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + 8 * s, 32 * kProducerWarps);  // the producers' lanes (absmax writes)
      mbar_init(empty_bar + 8 * s, kConsumerWarps);     // lane 0 of each consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // The consumers build the pair table while the producers build the absmax map and start the
  // first copies: the table build then overlaps the first DRAM round trip. Each side waits on its
  // own named barrier (1: consumers, 2: producers).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp < kConsumerWarps) {
    skinny::build_pair_table<T>(s_pairs, p.values, threadIdx.x, 32 * kConsumerWarps);
    if (early_weights) {  // x and the output only after the previous kernel
      dependency_wait();
      allow_dependents();
    }
    asm volatile("bar.sync 1, %0;" ::"n"(32 * kConsumerWarps) : "memory");
  } else {
    if constexpr (NESTED) {
      for (int i = threadIdx.x - 32 * kConsumerWarps; i < 256; i += 32 * kProducerWarps) s_qmap[i] = p.nested_qmap[i];
    }
    asm volatile("bar.sync 2, %0;" ::"n"(32 * kProducerWarps) : "memory");
  }

  const int64_t N = p.n;
  const uint32_t K = uint32_t(p.k);
  const uint32_t row_bytes = K / 2;
  const int n_chunks = int(K / kSkinnyChunk);
  const int n_slabs = (n_chunks + kSlabChunks - 1) / kSlabChunks;
  const int64_t n_tiles = (N + kRows - 1) / kRows;
  const Schedule sched = cta_schedule<kRows>(N, n_tiles, RT == 2 && split_last);
  // first row of the CTA's tile i (i == sched.whole: its half tile)
  auto tile_row0 = [&](int i) {
    return i < sched.whole ? (int64_t(blockIdx.x) + int64_t(i) * gridDim.x) * kRows : sched.half_row0;
  };

  if (warp >= kConsumerWarps) {
    const int pw = warp - kConsumerWarps;  // this producer warp's rows: kRows / 4 from pw * kRows / 4
    // ---- producer: per (tile, slab), the copies of the codes and the decoded absmax ----
    const int block_shift = 31 - __clz(p.blocksize);
    const int chunk_block_shift = block_shift - 6;  // chunks of 64 per absmax block, as a shift
    const uint32_t blocks_per_row = K >> block_shift;
    const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
    const float offset = NESTED ? *p.offset : 0.0f;
    // The stage's absmax: lane covers chunk cc = lane % 16 of rows row0 + 2 i + lane / 16 (i <
    // kPerLane), so a warp load reads 16 consecutive absmax (codes) of two rows. A stage's absmax
    // loads are issued with its copies and decoded kAbsmaxLag iterations later: with a lag of one
    // (loads issued right after the previous stage's decode) each stage waited a whole DRAM round
    // trip in the producer (one producer warp then: 117 us at M = 1 on 28672 x 8192, DRAM 22%).
    constexpr int kPerLane = kRows / 2 / kProducerWarps;
    const int row0 = pw * (kRows / kProducerWarps);
    const int cc = lane % kSlabChunks;
    struct AbsmaxLoads {
      uint32_t codes[kPerLane];
      float scales[kPerLane];
    };
    auto load_absmax = [&](int64_t tile_row, int slab, AbsmaxLoads& a) {
      const int chunk = min(slab * kSlabChunks + cc, n_chunks - 1);  // past K: any valid block, unused
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t row_raw = tile_row + row0 + 2 * i + lane / kSlabChunks;  // a half tile: rows past it unused
        const uint32_t row = uint32_t(row_raw < N ? row_raw : N - 1);
        const uint32_t block = row * blocks_per_row + (uint32_t(chunk) >> chunk_block_shift);
        if constexpr (NESTED) {
          a.codes[i] = __ldg(p.absmax_codes + block);
          a.scales[i] = __ldg(p.nested_absmax + (block >> nested_shift));
        } else {
          a.codes[i] = 0;
          a.scales[i] = __ldg(p.absmax + block);
        }
      }
    };
    static_assert(kAbsmaxLag == 2 && kAbsmaxLag < S, "the queue below holds two stages' loads");
    AbsmaxLoads older, newer;  // stages it - 2 and it - 1
    const uint32_t items = uint32_t(sched.whole + sched.half) * uint32_t(n_slabs);
    int tile = 0, slab = 0;  // the CTA's tile i and its slab
    int64_t tile_row = tile_row0(0);
    int s_copy = 0, s_decode = 0;  // ring slots of stages it and it - 2
    uint32_t empty_parity = 1;     // a fresh barrier's previous phase counts as complete
    // With early_weights the producers copy the first S stages before the wait (they never read
    // what the previous kernel writes), then wait only to let dependents launch after it.
    const uint32_t early_stages = early_weights ? min(items, uint32_t(S)) : ~0u;
    for (uint32_t it = 0; it < items + kAbsmaxLag; ++it) {
      if (it == early_stages) {
        dependency_wait();
        allow_dependents();
      }
      // Stage it - 2 first: its absmax, decoded from the loads issued two iterations ago, into the
      // slot taken then. (Decoding after the wait for stage it's slot held every stage's full
      // barrier back until the consumers had freed the slot two stages later.)
      if (it >= kAbsmaxLag) {
        float* s_abs = reinterpret_cast<float*>(smem + L::kAbsOff + s_decode * L::kAbsBytes);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          // a rounded product, then a rounded sum, exactly as dequantize_4bit_nested
          const float absmax =
              NESTED ? __fadd_rn(__fmul_rn(s_qmap[older.codes[i]], older.scales[i]), offset) : older.scales[i];
          s_abs[(row0 + 2 * i + lane / kSlabChunks) * kAbsPitch + cc] = absmax;
        }
        mbar_arrive(full_bar + 8 * s_decode);  // release: this lane's absmax writes
        if (++s_decode == S) s_decode = 0;
      }
      older = newer;
      if (it < items) {
        // stage it: its absmax loads (into registers: no slot needed), then wait for its slot and
        // copy its codes
        load_absmax(tile_row, slab, newer);
        mbar_wait(empty_bar + 8 * s_copy, empty_parity);
        if (pw == 0 && lane == 0) {
          // the slab's boxes that start inside the row (a part-full last slab: K % 1024 != 0); a
          // box's bytes past the row or rows past N arrive as zeros and count in full
          // A half tile: 16-row boxes, each at the start of its box's place in the stage
          const int boxes = min(kBoxesPerSlab, int((row_bytes - uint32_t(slab) * kSlabBytes + kBoxBytes - 1) / kBoxBytes));
          const bool half = tile == sched.whole;
          mbar_expect_tx(full_bar + 8 * s_copy, uint32_t(boxes * (half ? kRowsPerTile * kBoxBytes : L::kBoxStride)));
          for (int b = 0; b < boxes; ++b)
            tma_load_2d(smem_addr(smem + L::kCodeOff + s_copy * L::kCodeBytes + b * L::kBoxStride),
                        half ? &half_map : &code_map, slab * kSlabBytes + b * kBoxBytes, int(tile_row),
                        full_bar + 8 * s_copy);
        }
        if (++s_copy == S) s_copy = 0, empty_parity ^= 1;
        if (++slab == n_slabs) slab = 0, tile_row = tile_row0(++tile);
      }
    }
    return;
  }

  // ---- consumers: warp w takes chunk w of every slab, for all RT row tiles of the stage ----
  // (one x fragment per stage feeds RT row tiles; with warps on one row tile and two chunks each,
  // every warp loaded x for both of its chunks: 28672 x 8192 at M = 16 ran 82.7 us against 71.2
  // for the register kernel, whose 32-row tiles share x across two row tiles)
  const int g = lane >> 2, t = lane & 3;
  const int cs = warp;  // the warp's chunk of every slab
  const uint32_t lane4 = uint32_t(lane) * 4u;
  const char* table = reinterpret_cast<const char*>(s_pairs);
  const int M = int(p.m);
  // x rows past M read row M - 1: their mma columns are never stored
  const T* x = static_cast<const T*>(p.x);
  uint32_t x_off[TILES_M];
#pragma unroll
  for (int j = 0; j < TILES_M; ++j) x_off[j] = uint32_t(min(j * 8 + g, M - 1)) * K + uint32_t(t) * 16u;
  const int perm_g = (g & 3) * 2 + (g >> 2);  // see the top of the file: 0 2 4 6 1 3 5 7
  // Row tile r: rows r * 16 + perm_g (lo) and + 8 (hi). Their codes of chunk cs: box cs / 4, 16-byte
  // unit 2 (cs % 4) + t / 2 of the row, XORed by address bits 7..9 of the row (the 128-byte swizzle;
  // = perm_g as the stages are 1024-aligned; the same for every r and for hi, 1024 bytes on).
  const uint32_t row_xor = (smem_addr(smem + L::kCodeOff + perm_g * kBoxBytes) >> 7) & 7u;
  const int code_off = perm_g * kBoxBytes + (cs >> 2) * L::kBoxStride +
                       int(((uint32_t(cs & 3) * 2 + uint32_t(t >> 1)) ^ row_xor) * 16) + (t & 1) * 8;
  const int abs_off = perm_g * kAbsPitch + cs;
  auto consumer_sync = [&]() {
    asm volatile("bar.sync 1, %0;" ::"n"(32 * kConsumerWarps) : "memory");
  };

  auto tiles = [&](auto imm) {
    constexpr bool kImm = decltype(imm)::value;
    // the warp's chunk of a slab for x (past K in a part-full last slab: the last chunk, unused)
    auto x_chunk = [&](int slab) { return min(slab * kSlabChunks + cs, n_chunks - 1); };
    // x of the warp's chunk, by halves: half h (x words 4h..4h+3 of each x tile) is reloaded with
    // the next slab's chunk as soon as this slab's lookups and mma of that half have been issued,
    // so no second buffer is held across a slab. With a buffer for the next chunk copied forward
    // after each slab: 16 register moves per slab at M = 16; two buffers taken in turn (the slab
    // loop unrolled by two) spilled at 96 registers.
    auto load_x_half = [&](int slab, int h, uint4(&v)[TILES_M]) {
#pragma unroll
      for (int j = 0; j < TILES_M; ++j) v[j] = skinny::load_x16(x + x_off[j] + uint32_t(x_chunk(slab)) * 64u + 8u * h);
    };
    uint4 x_half[2][TILES_M];
    load_x_half(0, 0, x_half[0]);
    load_x_half(0, 1, x_half[1]);
    int s = 0;                 // ring slot of the next stage
    uint32_t full_parity = 0;  // and the phase to wait for
    // one tile: RA (<= RT) row tiles of 16 from tile_row (RA = 1: a half tile)
    auto run_tile = [&](int64_t tile_row, auto ra) {
      constexpr int RA = decltype(ra)::value;
      float acc[RA][TILES_M][4];
#pragma unroll
      for (int r = 0; r < RA; ++r)
#pragma unroll
        for (int j = 0; j < TILES_M; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.0f;
      for (int slab = 0; slab < n_slabs; ++slab) {
        mbar_wait(full_bar + 8 * s, full_parity);
        // every row tile's codes and absmax first (shared loads; a chunk past K reads stale bytes
        // it does not use), then the lookups
        const uint8_t* codes = smem + L::kCodeOff + s * L::kCodeBytes + code_off;
        const float* s_abs = reinterpret_cast<const float*>(smem + L::kAbsOff + s * L::kAbsBytes) + abs_off;
        uint2 lo[RA], hi[RA];
        float abs_lo[RA], abs_hi[RA];
#pragma unroll
        for (int r = 0; r < RA; ++r) {
          lo[r] = *reinterpret_cast<const uint2*>(codes + r * kRowsPerTile * kBoxBytes);
          hi[r] = *reinterpret_cast<const uint2*>(codes + (r * kRowsPerTile + 8) * kBoxBytes);
          abs_lo[r] = s_abs[r * kRowsPerTile * kAbsPitch];
          abs_hi[r] = s_abs[(r * kRowsPerTile + 8) * kAbsPitch];
        }
        // per half: every row tile's lookups and mma, then that half of x for the warp's next chunk
        // (next slab, or slab 0 of the next tile), whose L1/L2 latency the other half hides
        const int next = slab + 1 < n_slabs ? slab + 1 : 0;
        const bool live = slab * kSlabChunks + cs < n_chunks;
        float chunk[RA][TILES_M][4];
#pragma unroll
        for (int r = 0; r < RA; ++r)
#pragma unroll
          for (int j = 0; j < TILES_M; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) chunk[r][j][i] = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (live) {
#pragma unroll
            for (int r = 0; r < RA; ++r)
              skinny::half_chunk_mma<T, TILES_M, kImm>(chunk[r], h == 0 ? lo[r].x : lo[r].y, h == 0 ? hi[r].x : hi[r].y,
                                                       x_half[h], table, lane4);
          }
          load_x_half(next, h, x_half[h]);
        }
        if (live) {
#pragma unroll
          for (int r = 0; r < RA; ++r) skinny::scale_add<TILES_M>(acc[r], chunk[r], abs_lo[r], abs_hi[r]);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty_bar + 8 * s);
        if (++s == S) s = 0, full_parity ^= 1;
      }

      // Per row tile: the warps' partial sums, added in warp order, then bias, one rounding,
      // store. Accumulator i of lane (g, t) in x tile j is y[m = 8 j + 2 t + (i & 1)][n = row
      // tile + perm(g) + 8 (i >> 1)]. The first barrier: every warp is done reading the previous
      // partials.
      float(*s_partial)[TILES_M * 4][32] = reinterpret_cast<float(*)[TILES_M * 4][32]>(smem + L::kPartialOff);
#pragma unroll
      for (int r = 0; r < RA; ++r) {
        consumer_sync();
#pragma unroll
        for (int j = 0; j < TILES_M; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) s_partial[warp][j * 4 + i][lane] = acc[r][j][i];
        consumer_sync();
        if (threadIdx.x < TILES_M * 4 * 32) {
          const int idx = threadIdx.x / 32, ln = threadIdx.x % 32;
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kConsumerWarps; ++w) sum += s_partial[w][idx][ln];
          const int j = idx >> 2, i = idx & 3, gg = ln >> 2;
          const int64_t n = tile_row + r * kRowsPerTile + (gg & 3) * 2 + (gg >> 2) + 8 * (i >> 1);
          const int64_t m = j * 8 + 2 * (ln & 3) + (i & 1);
          if (n < N && m < M) {
            if (p.bias != nullptr) sum += to_float(static_cast<const T*>(p.bias)[n]);
            static_cast<T*>(p.out)[m * N + n] = from_float<T>(sum);
          }
        }
      }
    };
    for (int i = 0; i < sched.whole; ++i) run_tile(tile_row0(i), std::integral_constant<int, RT>{});
    if (sched.half) run_tile(sched.half_row0, std::integral_constant<int, 1>{});
  };
  const bool imm = !p.generic_lookup && (smem_addr(s_pairs) == skinny::kTableWindowOffset);
  if (imm) tiles(std::true_type{});
  else tiles(std::false_type{});
#endif
}

// Launches, or returns false having launched nothing when the loaded binary of the kernel is not
// for sm_90 or later (a build without a 9.0 target runs its sm_8x code on Hopper, where the
// kernel's body is empty) or the driver cannot describe the codes as a tensor map.
template <typename T, int RT, int TILES_M, bool NESTED>
bool launch(const Gemm4bitParams& p, cudaStream_t stream) {
  using L = TmaLayout<RT, TILES_M>;
  auto kernel = gemm_4bit_skinny_tma<T, RT, TILES_M, NESTED>;
  static int usable = -1;  // per template instance: 1 when the body is there and may take the smem
  if (usable < 0) {
    cudaFuncAttributes attributes{};
    usable = cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.binaryVersion >= 90 &&
             cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes) == cudaSuccess;
    (void)cudaGetLastError();  // a refusal above is an answer, not an error for the next check
  }
  PFN_cuTensorMapEncodeTiled_v12000 encode = hopper::tensor_map_encoder();
  if (usable == 0 || encode == nullptr) return false;
  // The codes as a 2D array of bytes [N][K / 2]; boxes of 128 bytes x `rows` rows, 128-byte swizzle.
  auto encode_codes = [&](CUtensorMap* map, cuuint32_t rows) {
    const cuuint64_t dims[2] = {cuuint64_t(p.k / 2), cuuint64_t(p.n)};
    const cuuint64_t strides[1] = {cuuint64_t(p.k / 2)};
    const cuuint32_t box[2] = {kBoxBytes, rows};
    const cuuint32_t unit[2] = {1, 1};
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(p.packed), dims, strides, box, unit,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  CUtensorMap code_map, half_map;
  if (!encode_codes(&code_map, L::kRows)) return false;
  const int64_t n_tiles = (p.n + L::kRows - 1) / L::kRows;
  const int64_t sms = skinny::multiprocessor_count();
  const int64_t ctas = n_tiles < sms ? n_tiles : sms;
  // The last round of 32-row tiles in 16-row halves (cta_schedule) when they fit in one round,
  // unless LOWRANK_SKINNY_SPLIT_LAST=0 (A/B).
  const int64_t rest = n_tiles % ctas;
  const char* split_env = std::getenv("LOWRANK_SKINNY_SPLIT_LAST");
  const bool split_last = RT == 2 && rest > 0 && 2 * rest <= ctas && (split_env == nullptr || split_env[0] != '0') &&
                          encode_codes(&half_map, kRowsPerTile);
  if (!split_last) half_map = code_map;  // not read
  // Programmatic dependent launch unless LOWRANK_SKINNY_PDL=0 (A/B): the kernel waits for the
  // previous one before its first global read, so this changes when it starts, not what it reads.
  const char* pdl_env = std::getenv("LOWRANK_SKINNY_PDL");
  const bool pdl = pdl_env == nullptr || pdl_env[0] != '0';
  // The weight read before the wait when the previous kernel is known not to write it (capture_chain.h),
  // unless LOWRANK_SKINNY_EARLY=0 (A/B). LOWRANK_SKINNY_TRACE=1 prints the choice per launch (tests).
  const char* early_env = std::getenv("LOWRANK_SKINNY_EARLY");
  bool early = false;
  if (pdl && (early_env == nullptr || early_env[0] != '0')) {
    const int64_t n_blocks = p.n * p.k / p.blocksize;
    const bool nested = p.absmax == nullptr;
    const capture_chain::ByteRange reads[] = {
        {p.packed, size_t(p.n * p.k / 2)},
        {p.values, 16 * sizeof(float)},
        {p.absmax, size_t(n_blocks) * sizeof(float)},
        {p.absmax_codes, size_t(n_blocks)},
        {p.nested_absmax, nested ? size_t((n_blocks + p.nested_blocksize - 1) / p.nested_blocksize) * sizeof(float) : 0},
        {p.nested_qmap, nested ? 256 * sizeof(float) : 0},
        {p.offset, nested ? sizeof(float) : 0},
    };
    early = capture_chain::follows_own_launch(stream, reads);
  }
  const char* trace_env = std::getenv("LOWRANK_SKINNY_TRACE");
  if (trace_env != nullptr && trace_env[0] == '1') std::fprintf(stderr, "lowrank skinny_tma: early_weights=%d\n", int(early));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = L::kBytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  const capture_chain::ByteRange written(p.out, size_t(p.m * p.n) * 2);  // fp16 or bf16
  if (cudaLaunchKernelEx(&config, kernel, code_map, half_map, p, split_last, early) == cudaSuccess || !pdl) {
    if (pdl) capture_chain::record_launch(stream, written);
    return true;
  }
  // a runtime that refuses the attribute: launch as any kernel (an error here is the caller's check)
  (void)cudaGetLastError();
  config.numAttrs = 0;
  cudaLaunchKernelEx(&config, kernel, code_map, half_map, p, split_last, false);
  return true;  // not recorded: a later launch that depends on this one reads after its wait
}

template <typename T, int RT>
bool launch_m(const Gemm4bitParams& p, cudaStream_t stream) {
  const bool nested = p.absmax == nullptr;
  if (p.m <= 8) return nested ? launch<T, RT, 1, true>(p, stream) : launch<T, RT, 1, false>(p, stream);
  return nested ? launch<T, RT, 2, true>(p, stream) : launch<T, RT, 2, false>(p, stream);
}

}  // namespace

bool launch_gemm_4bit_skinny_tma(const Gemm4bitParams& p, int row_tiles, cudaStream_t stream) {
  if (p.kind == FloatKind::kBFloat16)
    return row_tiles == 2 ? launch_m<__nv_bfloat16, 2>(p, stream) : launch_m<__nv_bfloat16, 1>(p, stream);
  return row_tiles == 2 ? launch_m<__half, 2>(p, stream) : launch_m<__half, 1>(p, stream);
}

}  // namespace lowrank::gemm
