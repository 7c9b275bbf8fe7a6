// Fused 4-bit matmul on Hopper's warpgroup tensor cores (sm_90a), for M from 17 rows of x up to
// training batches: y = x W^T with W read as packed codes, dequantized in registers and fed to
// wgmma as its A operand; no dequantized weight in global or shared memory. Math:
// lowrank/reference.py matmul_4bit.
//
// Shape of the kernel, and the counts that chose it (28672 x 8192 NF4, H100):
// - Operands swapped: the kernel computes y^T = W x^T. wgmma takes A (64 rows x 16 k) from
//   registers, so the weight, which has to pass through registers anyway to be dequantized, is A
//   and never touches shared memory on its way to the tensor cores; x is B, from shared memory,
//   loaded by the copy engine (TMA) in the 128-byte swizzle wgmma reads. The tokens are wgmma's N
//   (64, 128 or 256 per CTA by M), the weight rows its M: one or two 64-row blocks per consumer
//   warpgroup, 128 or 256 rows per CTA (the rule is wgmma_rows_per_cta in gemm_launch.h).
// - Numerics: each element is values[code] rounded to x's 16-bit type (the skinny kernels' pair
//   table), times the absmax in fp32, rounded once to that type, then accumulated in fp32 by the
//   tensor cores. That is the dequantize path's weight except for the first rounding (error 2.70e-3
//   against 2.32e-3 relative to fp32 on 28672 x 8192; the rule's bound is 2x). Where values and
//   absmax are exact in the type the two weights are the same bits (tests: _exactly_scaled).
// - Warp roles: warpgroup 0 produces: per 64-wide k step, one thread issues the TMA copies of the
//   x tile and the codes tile, and each of its 128 threads decodes one weight row's absmax (loads
//   issued 4 steps ahead) into the stage as two T2 words, hi = T(absmax) and lo = T(absmax - hi);
//   with 256-row tiles each thread does two rows. Warpgroups 1 and 2 consume: dequantize their
//   rows one 64-row block at a time, issue wgmma. They first build the pair table (64 KB).
//   Registers move to the consumers with setmaxnreg (56 / 224: 128 x 56 + 256 x 224 = 384 x 168).
// - Lookups (build_fragments): a fragment register is two elements of one row, i.e. one code byte,
//   i.e. one word of the pair table: a byte permute puts the byte beside the lane's offset, one
//   shared load reads it (the table has a column per lane: no bank conflicts), and two packed
//   multiply-adds scale it (pair * hi + pair * lo). That is 4 instructions per 2 elements, on three
//   pipes (ALU, LSU, FMA). The kernel before (2026-11-24) built per-row scaled 16-entry tables in
//   the producer and looked them up by byte permutes, 12 ALU instructions per 4 elements: ncu at
//   M = 128 showed the ALU pipe 53% and the tensor pipe 52% busy, not overlapping. 28672 x 8192,
//   H100, graph-timed, before -> after: M = 17 106 -> 88 us, M = 64 107 -> 89, M = 128 141 -> 131;
//   14336 x 4096 M = 17 / 64 / 128: 35 / 33 / 39 -> 30 / 28 / 33; eager at M = 2048: 1632-1687 ->
//   1371-1549 (bf16 1205-1484 in the same runs). A version with unscaled fragments and the absmax
//   applied in fp32 to per-k-step fresh accumulators (the skinny kernels' numerics) was tried
//   first: its FFMA per accumulator and step (64 per thread at 128 tokens) and 128 fresh registers
//   made it slower from M = 128 on and limited tiles to 128 tokens (experiments file of the day).
// - The fragments of step s + 1 are built while step s's wgmma group is in flight; wgmma reads
//   its register A operand asynchronously, so the two steps' fragments are kept apart (`keep`).
// - The consumer loop is latency-bound, not memory-bound (ncu, 28672 x 8192, M = 128, also at
//   boost clocks: the consumers almost never wait on a full stage, the producer mostly waits for
//   free ones; 2 consumer warps per scheduler issue once every ~6-8 cycles). So (2026-11-25) the
//   lookups take the table's window offset as an immediate (no IADD per lookup), the codes tile
//   comes in the 32-byte swizzle (conflict-free 16-byte loads), each group's codes are read one
//   group ahead by volatile loads placed after the previous group's wgmma, and the stage index
//   stays in uniform registers (the first two alone: 250 -> 208 instructions per consumer warp and
//   k step at 256 x 128 tiles). Same-run A/B against the kernel before, graph-timed, us: 14336 x 4096 M = 17 / 64 / 128
//   / 256 26.1 / 24.8 / 31.0 / 52.3 against 27.9-30.1 / 27.5-27.8 / 32.5-32.9 / 56.4-59.3; 28672 x
//   8192 M = 128 / 256 122.6-129.9 / 216-224 against 130.2-132.0 / 227-233, M = 17 / 64 unchanged
//   (88-94); 4096 x 14336 M = 128 / 256 49.4 / 65.2 against 50.6-51.0 / 68.8-69.5
//   (benchmarks/results/experiments/wgmma_latency_2026-11-25.txt).
// - Earlier findings that still shape it (the byte-permute kernel, 28672 x 8192): 256-row CTAs
//   read each x tile for twice the rows (M = 17 / 64: 112.6 / 114.3 us against ~124 for 128
//   rows); 256-token tiles win above M = 128 because each fragment feeds 256 tokens (M = 2048:
//   1459 against 2049 us for 256 rows x 128 tokens); sharing x tiles between two CTAs of a
//   cluster by TMA multicast gained nothing (branch wip/cluster-multicast).
// Epilogue: the accumulators (+ bias in fp32) are rounded to x's type into a shared staging tile
// per consumer ([tokens][64 rows], rows padded to 72 elements: the 2-byte stores of a warp land in
// distinct banks) placed in the x stages once both consumers' groups are done, then stored as
// 16-byte rows of y (N % 8 == 0).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include "common/cuda_float.cuh"
#include "gemm/gemm_launch.h"
#include "gemm/hopper.cuh"
#include "gemm/skinny_common.cuh"
#include "gemm/wgmma_common.cuh"
#include "gemm/wgmma_rs.cuh"

namespace lowrank::gemm {
namespace {

constexpr int kTileK = kWgmmaTileK;
constexpr int kCodeRowBytes = kTileK / 2;  // 32
constexpr int kThreads = 384;
// A weight row's absmax for one k step as the fragments' multipliers: T2 (hi, hi) and T2 (lo, lo)
// with hi = T(absmax), lo = T(absmax - hi) (scale_pair).
constexpr int kAbsRowBytes = 8;
[[maybe_unused]] constexpr int kAbsmaxLookahead = 4;  // k steps between the producer's absmax loads and their use
// float4 partial sums per thread in flight when a stream-K CTA adds the other CTAs' sums: 8 (32
// registers), 4 beside the 128 accumulators of a 256-token tile (8 spilled 20 bytes there)
template <int BT>
constexpr int kPartialBatch = BT == 256 ? 4 : 8;

// A CTA tile: ROWS weight rows (2 consumer warpgroups x ROWS / 128 blocks of 64 rows) x BT tokens.
template <int ROWS, int BT>
struct Tile {
  static constexpr int kBlocks = ROWS / 128;  // 64-row blocks per consumer warpgroup (its wgmma M)
  static constexpr int kXBytes = BT * kTileK * 2;  // one TMA box, 128-byte rows
  static constexpr int kCodeBytes = ROWS * kCodeRowBytes;
  static constexpr int kAbsBytes = ROWS * kAbsRowBytes;
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kAbsBytes;
  // what the pair table, the nested qmap and the barriers leave for stages
  static constexpr int kRingBytes = 227 * 1024 - skinny::kPairTableBytes - 1024 - 1024;
  static constexpr int kStages = kRingBytes / (kStageBytes + 16) < 8 ? kRingBytes / (kStageBytes + 16) : 8;
  static constexpr int kOutBytes = BT * kOutPitch * 2;  // per 64-row block, in the x stages once they are done
  static constexpr int kPairOff = 0;  // the skinny kernels' unscaled pair table (skinny_common.cuh), 64 KB
  static constexpr int kXOff = kPairOff + skinny::kPairTableBytes;  // 1024-aligned: the swizzle repeats every 1024 bytes
  static constexpr int kCodeOff = kXOff + kStages * kXBytes;
  static constexpr int kAbsOff = kCodeOff + kStages * kCodeBytes;
  static constexpr int kBarOff = kAbsOff + kStages * kAbsBytes;
  static constexpr int kQmapOff = kBarOff + 2 * kStages * 8;  // the nested absmax's 256 code values (fp32)
  static constexpr int kBytes = kQmapOff + 256 * 4;
  // No static shared arrays: the dynamic base is the start of the CTA's shared window after the
  // 1 KB the system reserves (window offset 0x400, 1024-aligned), where the pair table's lookups
  // expect it (build_fragments; checked in the kernel).
  static constexpr int kAlloc = kBytes;
  static_assert(ROWS == 128 || ROWS == 256, "one or two 64-row blocks per consumer");
  static_assert(2 * kBlocks * kOutBytes <= kStages * kXBytes, "the output staging reuses the x stages");
  static_assert(kAlloc <= 227 * 1024, "shared memory per CTA");
  static_assert(kPairOff == 0 && skinny::kTableWindowOffset == kWgmmaReservedSmem,
                "the table at the window offset the lookups take as an immediate");
  static_assert(kXOff % 1024 == 0, "x stages on the swizzle's 1024-byte period");
};

struct KernelArgs {
  const float* values;
  const float* absmax;        // non-nested
  const uint8_t* absmax_codes;  // nested
  const float* nested_absmax;
  const float* nested_qmap;
  const float* offset;
  int blocksize_log2, nested_blocksize_log2;
  int n, k, m;
  int row_tiles, token_tiles;
  // The work: tiles x k steps = iters, cut into `ctas` contiguous ranges (stream-K when ctas > tiles,
  // else one whole tile per CTA); partials [ctas][ROWS * BT] fp32 and flags [ctas] for the cut tiles.
  int ctas, iters;
  float* partials;
  unsigned* flags;
  bool thread_release;  // every consumer thread arrives on the stage's empty barrier (else lane 0 per warp)
  const void* bias;
  void* out;
};

// --- PTX wrappers (sm_90a) -----------------------------------------------------------------------

using hopper::smem_addr;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using hopper::mbar_arrive;
using hopper::mbar_expect_tx;
using hopper::mbar_init;
using hopper::mbar_wait;
using hopper::tma_load_2d;
// An empty use of each register: what is passed stays live (unmoved, unreused) up to here.
__device__ __forceinline__ void keep(const uint32_t (&r)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" ::"r"(r[j][i]) : "memory");
}
#endif



// Where one CTA's work lies. The grid walks tiles x k steps as one sequence of `iters`
// iterations, cut into `ctas` contiguous ranges of base or base + 1 (stream-K when there are
// fewer tiles than SMs: 28672 x 8192 at M = 128 is 112 tiles of 256 rows, which left 20 of 132
// SMs idle for the whole kernel). A range shorter than a tile ends in the middle of one, so
// with ctas > tiles a CTA has at most two segments: the end of one tile (k from the middle to
// the end) and the start of the next (k from 0 to the middle). The CTA holding a tile's k = 0
// reaches it last in its range and finishes the tile: it adds the fp32 partial sums that the
// other CTAs of that tile wrote, in CTA order (deterministic), then stores y.
struct WorkRange {
  int base, rem;
  __device__ __forceinline__ int first(int cta) const { return cta * base + min(cta, rem); }
  __device__ __forceinline__ int count(int cta) const { return base + (cta < rem ? 1 : 0); }
  __device__ __forceinline__ int cta_of(int g) const {
    const int split = rem * (base + 1);
    return g < split ? g / (base + 1) : rem + (g - split) / base;
  }
};

// A position in the sequence: tile, k step and the tile's first weight row and token.
struct Cursor {
  int tile, kt, row0, token0;
};
// The tile's origin by the raster (raster_origin, wgmma_common.cuh).
template <int ROWS, int BT>
__device__ __forceinline__ void tile_origin(const KernelArgs& p, Cursor& c) {
  if (c.tile >= p.row_tiles * p.token_tiles) return;  // past the last tile: never used
  raster_origin(c.tile, p.row_tiles, p.token_tiles, ROWS, BT, c.row0, c.token0);
}
template <int ROWS, int BT>
__device__ __forceinline__ Cursor cursor_at(const KernelArgs& p, int g, int k_tiles) {
  Cursor c{g / k_tiles, g % k_tiles, 0, 0};
  tile_origin<ROWS, BT>(p, c);
  return c;
}
template <int ROWS, int BT>
__device__ __forceinline__ void advance(Cursor& c, const KernelArgs& p, int k_tiles) {
  if (++c.kt == k_tiles) {
    c.kt = 0;
    ++c.tile;
    tile_origin<ROWS, BT>(p, c);
  }
}

// A value that is a bool or std::true_type / std::false_type, as a bool (its `value` read
// directly: integral_constant's conversion is a host function without --expt-relaxed-constexpr).
__device__ __forceinline__ bool truth(bool b) { return b; }
template <bool V>
__device__ __forceinline__ constexpr bool truth(std::integral_constant<bool, V>) { return V; }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void flag_release(unsigned* flag) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(flag), "r"(1u) : "memory");
}
__device__ __forceinline__ unsigned flag_acquire(const unsigned* flag) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
  return v;
}
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// pair * scale.x + (pair * scale.y) on packed T2: values[code] in T times the absmax in fp32 (hi +
// lo carries 16 of its bits), rounded once to T by the fused multiply-add.
template <typename T>
__device__ __forceinline__ uint32_t scale_pair(uint32_t pair, uint2 scale) {
  using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
  const T2 v = *reinterpret_cast<const T2*>(&pair);
  const T2 hi = *reinterpret_cast<const T2*>(&scale.x);
  const T2 lo = *reinterpret_cast<const T2*>(&scale.y);
  const T2 r = __hfma2(v, hi, __hmul2(v, lo));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// One 64-row block's codes and absmax words for one k step, as a consumer thread reads them: the
// 32 code bytes of its rows lo and hi = lo + 8 and their absmax multipliers.
// Read one group ahead of their use (load_codes after the previous group's fragments are built,
// before its wgmma wait), so that the shared loads' latency hides behind that wait: the profile
// of 2026-11-25 (28672 x 8192, M = 128) had the first byte permute of each group waiting on its
// code loads in ~6% of the consumers' samples.
struct GroupCodes {
  uint4 lo_a, lo_b, hi_a, hi_b;
  uint2 scale_lo, scale_hi;
};

// The codes tile arrives in the 32-byte swizzle (address bit 4 ^= bit 7): rows 4-7 of every 8 have
// their 16-byte halves swapped, so that the 8 rows a warp's LDS.128 reads (rows g, 32 bytes
// apart) fall in distinct banks: unswizzled, rows g and g + 4 shared banks (2 wavefronts per
// load). `swap` = bit 2 of the thread's rows (g >> 2 & 1; the same for r_lo and r_hi = r_lo + 8).
template <typename Cfg>
__device__ __forceinline__ void load_codes(const uint8_t* smem, int s, int r_lo, uint32_t swap, GroupCodes& c) {
  const uint8_t* codes = smem + Cfg::kCodeOff + s * Cfg::kCodeBytes;
  const uint2* absmax = reinterpret_cast<const uint2*>(smem + Cfg::kAbsOff + s * Cfg::kAbsBytes);
  const uint32_t first = 16u * swap, second = 16u - first;
  // volatile: kept after the wgmma issue that precedes them in the source. As plain loads, ptxas
  // hoisted them, and the byte permutes waiting on them, between a group's four wgmma: the permutes
  // stalled on the loads' latency with three wgmma of the group not yet issued.
  auto load16 = [](const uint8_t* ptr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(smem_addr(ptr)));
    return v;
  };
  auto load8 = [](const uint2* ptr) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(smem_addr(ptr)));
    return v;
  };
  c.lo_a = load16(codes + r_lo * kCodeRowBytes + first);
  c.lo_b = load16(codes + r_lo * kCodeRowBytes + second);
  c.hi_a = load16(codes + (r_lo + 8) * kCodeRowBytes + first);
  c.hi_b = load16(codes + (r_lo + 8) * kCodeRowBytes + second);
  c.scale_lo = load8(absmax + r_lo);
  c.scale_hi = load8(absmax + r_lo + 8);
}

// A consumer thread's A fragments for one 64-row block and one k step: k16 step j holds code
// bytes 8 j + t (a[j][0] row lo, a[j][1] row hi) and 8 j + t + 4 (a[j][2], a[j][3]) of the rows'
// 32 bytes, i.e. byte t of words 2 j and 2 j + 1. Each byte is one word of the pair table (the two
// elements' values in T): one byte permute makes its offset in this lane's column (the byte
// beside lane * 4; `sel` = 0x5504 | t << 4), one shared load reads it at that offset + the
// table's window offset as an immediate (bank = lane: no conflicts; the table sits at the start
// of the CTA's shared window, checked at the kernel's start), then scale_pair by the row's absmax
// words. Through a register base the SASS added one IADD per lookup (32 of ~250 instructions per
// consumer warp and k step at 256 x 128 tiles). Shared by the per-tile and the stream-K kernel.
template <typename T>
__device__ __forceinline__ void build_fragments(const GroupCodes& c, uint32_t lane4, uint32_t sel,
                                                uint32_t (&cur)[4][4]) {
  const uint32_t wl[8] = {c.lo_a.x, c.lo_a.y, c.lo_a.z, c.lo_a.w, c.lo_b.x, c.lo_b.y, c.lo_b.z, c.lo_b.w};
  const uint32_t wh[8] = {c.hi_a.x, c.hi_a.y, c.hi_a.z, c.hi_a.w, c.hi_b.x, c.hi_b.y, c.hi_b.z, c.hi_b.w};
  auto pair = [&](uint32_t word) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1+%2];"
                 : "=r"(v)
                 : "r"(__byte_perm(word, lane4, sel)), "n"(skinny::kTableWindowOffset));
    return v;
  };
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    cur[j][0] = pair(wl[2 * j]);
    cur[j][1] = pair(wh[2 * j]);
    cur[j][2] = pair(wl[2 * j + 1]);
    cur[j][3] = pair(wh[2 * j + 1]);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    cur[j][0] = scale_pair<T>(cur[j][0], c.scale_lo);
    cur[j][2] = scale_pair<T>(cur[j][2], c.scale_lo);
    cur[j][1] = scale_pair<T>(cur[j][1], c.scale_hi);
    cur[j][3] = scale_pair<T>(cur[j][3], c.scale_hi);
  }
}

#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The copies of one stage, by thread 0: x (tokens from token0) and the codes (rows from row0) at
// k step kt, the bytes announced on the stage's full barrier (thread 0 arrives after, with the
// other producer threads).
template <typename Cfg>
__device__ __forceinline__ void issue_copies(uint32_t smem_base, int s, uint32_t full_bar, const CUtensorMap* x_map,
                                             const CUtensorMap* code_map, int kt, int token0, int row0) {
  mbar_expect_tx(full_bar + 8 * s, Cfg::kXBytes + Cfg::kCodeBytes);
  tma_load_2d(smem_base + Cfg::kXOff + s * Cfg::kXBytes, x_map, kt * kTileK, token0, full_bar + 8 * s);
  tma_load_2d(smem_base + Cfg::kCodeOff + s * Cfg::kCodeBytes, code_map, kt * kCodeRowBytes, row0, full_bar + 8 * s);
}

// One producer step, the same in the per-tile and the stream-K kernel: the absmax words of
// thread r's rows (r + 128 b) from the step's absmax (codes c[b][0], scales f[b][0]), written once
// stage s (of the CTA's step `step`) is free; thread 0 issues the stage's copies, then every
// thread arrives. Tried on 2026-11-25 and slower at M <= 64 (28672 x 8192 M = 17, same run): the
// copies issued before the absmax decode, the decode after the wait for the free stage (96.7
// against 89.4 us); the first kStages stages' copies all issued at the kernel's start (91.8
// against 87.8).
template <typename T, typename Cfg, bool NESTED>
__device__ __forceinline__ void produce_step(uint8_t* smem, uint32_t smem_base, int s, int step,
                                             const uint32_t (&c)[Cfg::kBlocks][4], const float (&f)[Cfg::kBlocks][4],
                                             const float* s_qmap, float offset, int r,
                                             uint32_t full_bar, uint32_t empty_bar, const CUtensorMap* x_map,
                                             const CUtensorMap* code_map, int kt, int token0, int row0) {
  constexpr int B = Cfg::kBlocks;
  uint2 words[B];
#pragma unroll
  for (int b = 0; b < B; ++b) {
    // a rounded product, then a rounded sum, exactly as dequantize_4bit_nested
    const float absmax = NESTED ? __fadd_rn(__fmul_rn(s_qmap[c[b][0]], f[b][0]), offset) : f[b][0];
    const float hi = to_float(from_float<T>(absmax));
    const float lo = to_float(from_float<T>(absmax - hi));
    words[b] = make_uint2(Pack2<T>::pack(hi, hi), Pack2<T>::pack(lo, lo));
  }
  mbar_wait(empty_bar + 8 * s, ((step / Cfg::kStages) & 1) ^ 1);
#pragma unroll
  for (int b = 0; b < B; ++b)
    reinterpret_cast<uint2*>(smem + Cfg::kAbsOff + s * Cfg::kAbsBytes)[r + 128 * b] = words[b];
  if (r == 0) issue_copies<Cfg>(smem_base, s, full_bar, x_map, code_map, kt, token0, row0);
  mbar_arrive(full_bar + 8 * s);
}
#endif

template <typename T, int ROWS, int BT, bool NESTED>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_4bit_wgmma_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap code_map,
                           const KernelArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Tile<ROWS, BT>;
  constexpr int S = Cfg::kStages;
  constexpr int B = Cfg::kBlocks;
  extern __shared__ __align__(1024) uint8_t smem[];
  float* s_qmap = reinterpret_cast<float*>(smem + Cfg::kQmapOff);
  const uint32_t smem_base = smem_addr(smem);
  // The lookups take the pair table's window offset as an immediate (build_fragments); the
  // launcher checks that the device reserves 1 KB, so this holds unless the layout rules change.
  if (smem_base != skinny::kTableWindowOffset + Cfg::kPairOff) __trap();
  const uint32_t full_bar = smem_base + Cfg::kBarOff;  // + 8 s
  const uint32_t empty_bar = full_bar + 8 * S;

  int row0, token0;
  raster_origin(blockIdx.x, p.row_tiles, p.token_tiles, ROWS, BT, row0, token0);
  const int k_tiles = p.k / kTileK;

  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + 8 * s, 128);  // the 128 producer threads (one with the tx bytes)
      mbar_init(empty_bar + 8 * s, p.thread_release ? 256 : 8);  // the consumer threads, or lane 0 of each warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // ---- producer: per k step, the TMA copies (thread 0) and each row's scaled code table ----
    // Thread r builds the tables of rows r and (with 256-row tiles) r + 128.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n");
    const int r = threadIdx.x;
    const float offset = NESTED ? *p.offset : 0.0f;
    // absmax of (row r + 128 b, k step kt), in two halves: the loads (issued kAbsmaxLookahead
    // steps ahead) and the decode at use.
    auto load = [&](int b, int kt, uint32_t& code, float& scale) {
      code = 0;
      scale = 0.0f;
      const int row = row0 + r + 128 * b;
      if (row < p.n && kt < k_tiles) {
        const int64_t block = (int64_t(row) * p.k + int64_t(kt) * kTileK) >> p.blocksize_log2;
        if (NESTED) {
          code = __ldg(p.absmax_codes + block);
          scale = __ldg(p.nested_absmax + (block >> p.nested_blocksize_log2));
        } else {
          scale = __ldg(p.absmax + block);
        }
      }
    };
    static_assert(kAbsmaxLookahead == 4, "the load queue below holds 4 steps");
    uint32_t c[B][4];
    float f[B][4];
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) load(b, i, c[b][i], f[b][i]);
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % S;
      produce_step<T, Cfg, NESTED>(smem, smem_base, s, kt, c, f, s_qmap, offset, r, full_bar,
                                   empty_bar, &x_map, &code_map, kt, token0, row0);
#pragma unroll
      for (int b = 0; b < B; ++b) {
        c[b][0] = c[b][1], f[b][0] = f[b][1];
        c[b][1] = c[b][2], f[b][1] = f[b][2];
        c[b][2] = c[b][3], f[b][2] = f[b][3];
        load(b, kt + kAbsmaxLookahead, c[b][3], f[b][3]);
      }
    }
  } else {
    // ---- consumers: warpgroup cw owns the 64-row blocks cw * B + h, h < B ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n");
    const int cw = warpgroup - 1;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int r_in_block = 16 * warp + g;  // this thread's rows within each 64-row block: + 0 and + 8
    // (lane * 4, byte t of a code word, 0, 0): the pair of byte t in this lane's column of the table
    const uint32_t sel = 0x5504u | (uint32_t(t) << 4);
    const uint32_t lane4 = uint32_t(lane) * 4u;
    const uint32_t swap = (uint32_t(g) >> 2) & 1u;  // load_codes
    const uint64_t desc0 = swizzle128_desc(smem_base + Cfg::kXOff);
    skinny::build_pair_table<T>(reinterpret_cast<uint32_t*>(smem + Cfg::kPairOff), p.values, threadIdx.x - 128, 256);
    asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both consumers' part of the table is written

    float acc[B][BT / 2];
#pragma unroll
    for (int h = 0; h < B; ++h)
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) acc[h][i] = 0.0f;

    // One wgmma group = one k step of one 64-row block h: build the fragments into `cur` from the
    // codes read one group ahead, issue this group, read the next group's codes, wait for the
    // previous group (reading `prev`); the first group of a step gives the previous step's stage
    // back (every group of that step is done). wgmma reads its A registers asynchronously, after
    // the issuing instruction, and the compiler does not know that: it reused the registers of an
    // in-flight group's fragments for the next group's (wrong sums on the H100 whenever K > 64).
    // `keep` makes `prev` live until its group is known to be done, so the two groups' fragments
    // sit in different registers.
    GroupCodes codes;
    mbar_wait(full_bar, 0);  // the first group's codes
    load_codes<Cfg>(smem, 0, 64 * (cw * B) + r_in_block, swap, codes);
    auto group = [&](int kt, int h, uint32_t(&cur)[4][4], uint32_t(&prev)[4][4]) {
      build_fragments<T>(codes, lane4, sel, cur);
#pragma unroll
      for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
      wgmma_fence();
      const int s = kt % S;  // the stage index in uniform registers (as is kt)
      const uint64_t desc = desc0 + uint64_t((s * Cfg::kXBytes) >> 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs<BT, T>(acc[h], cur[j], desc + uint64_t((32 * j) >> 4), 1u);
      wgmma_commit();
#pragma unroll
      for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
      // the next group's codes: block h + 1 of this step, or block 0 of the next step
      if (h + 1 < B) {
        load_codes<Cfg>(smem, s, 64 * (cw * B + h + 1) + r_in_block, swap, codes);
      } else if (kt + 1 < p.k / kTileK) {
        const int next = (kt + 1) % S;
        mbar_wait(full_bar + 8 * next, ((kt + 1) / S) & 1);
        load_codes<Cfg>(smem, next, 64 * (cw * B) + r_in_block, swap, codes);
      }
      wgmma_wait<1>();  // the previous group is done: its fragments (and, for h == 0, its stage) are free
      keep(prev);
#pragma unroll
      for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
      if (h == 0 && kt > 0) {
        // the address computed outside the lane-0 branch, in uniform registers
        const uint32_t released = empty_bar + 8 * ((kt - 1) % S);
        if (p.thread_release) {
          mbar_arrive(released);
        } else {
          __syncwarp();
          if (lane == 0) mbar_arrive(released);
        }
      }
    };
    uint32_t frag_a[4][4], frag_b[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) frag_b[j][i] = 0u;
    // groups alternate between the two fragment buffers: (kt, h) uses buffer (kt * B + h) % 2
    int kt = 0;
    if constexpr (B == 2) {
      for (; kt < k_tiles; ++kt) {
        group(kt, 0, frag_a, frag_b);
        group(kt, 1, frag_b, frag_a);
      }
      wgmma_wait<0>();
      keep(frag_b);
    } else {
      for (; kt + 1 < k_tiles; kt += 2) {
        group(kt, 0, frag_a, frag_b);
        group(kt + 1, 0, frag_b, frag_a);
      }
      if (kt < k_tiles) {
        group(kt, 0, frag_a, frag_b);
        wgmma_wait<0>();
        keep(frag_a);
      } else {
        wgmma_wait<0>();
        keep(frag_b);
      }
    }
#pragma unroll
    for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);

    // ---- epilogue: + bias, round, stage [token][row] per 64-row block in the x stages, 16-byte stores ----
    // Both consumers' groups are done before either overwrites the x stages.
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
    for (int h = 0; h < B; ++h) {
      const int block = cw * B + h;
      stage_accumulators<T, BT>(reinterpret_cast<T*>(smem + Cfg::kXOff + block * Cfg::kOutBytes), acc[h],
                                static_cast<const T*>(p.bias), row0 + 64 * block, r_in_block, t, p.n);
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory");
    store_staged<T, BT>(smem + Cfg::kXOff, Cfg::kOutBytes, cw * B, B, threadIdx.x - 128 * warpgroup, row0, token0,
                        p.m, p.n, static_cast<T*>(p.out));
  }
#else
  __trap();  // built for a target without wgmma: the launcher refuses before getting here
#endif
}

// The same GEMM over a grid cut by k (stream-K), for grids of fewer tiles than half the SMs, which
// the kernel above would leave mostly idle (4096 x 14336 at M = 128: 16 tiles of 256 rows x 224
// k steps). Kept apart from the kernel above: written as one kernel, the segment loop made ptxas
// keep the stage index in vector registers (an R2UR per wgmma descriptor, 374 against 334
// instructions per two k steps) and 28672 x 8192 at M = 2048 ran 1899 against 1664 us.
template <typename T, int ROWS, int BT, bool NESTED>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_4bit_wgmma_stream_k_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap code_map,
                           const KernelArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Tile<ROWS, BT>;
  constexpr int S = Cfg::kStages;
  constexpr int B = Cfg::kBlocks;
  extern __shared__ __align__(1024) uint8_t smem[];
  float* s_qmap = reinterpret_cast<float*>(smem + Cfg::kQmapOff);
  const uint32_t smem_base = smem_addr(smem);
  // The lookups take the pair table's window offset as an immediate (build_fragments); the
  // launcher checks that the device reserves 1 KB, so this holds unless the layout rules change.
  if (smem_base != skinny::kTableWindowOffset + Cfg::kPairOff) __trap();
  const uint32_t full_bar = smem_base + Cfg::kBarOff;  // + 8 s
  const uint32_t empty_bar = full_bar + 8 * S;

  const int k_tiles = p.k / kTileK;
  const WorkRange range{p.iters / p.ctas, p.iters % p.ctas};
  const int g0 = range.first(blockIdx.x);
  const int n_iter = range.count(blockIdx.x);  // iteration i of this CTA is g0 + i; stage i % S

  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + 8 * s, 128);  // the 128 producer threads (one with the tx bytes)
      mbar_init(empty_bar + 8 * s, p.thread_release ? 256 : 8);  // the consumer threads, or lane 0 of each warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // ---- producer: per k step, the TMA copies (thread 0) and each row's scaled code table ----
    // Thread r builds the tables of rows r and (with 256-row tiles) r + 128.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n");
    const int r = threadIdx.x;
    const float offset = NESTED ? *p.offset : 0.0f;
    // absmax of (row r + 128 b, the k step at `at`), in two halves: the loads (issued
    // kAbsmaxLookahead iterations ahead) and the decode at use.
    auto load = [&](const Cursor& at, bool valid, int b, uint32_t& code, float& scale) {
      code = 0;
      scale = 0.0f;
      const int row = at.row0 + r + 128 * b;
      if (valid && row < p.n) {
        const int64_t block = (int64_t(row) * p.k + int64_t(at.kt) * kTileK) >> p.blocksize_log2;
        if (NESTED) {
          code = __ldg(p.absmax_codes + block);
          scale = __ldg(p.nested_absmax + (block >> p.nested_blocksize_log2));
        } else {
          scale = __ldg(p.absmax + block);
        }
      }
    };
    static_assert(kAbsmaxLookahead == 4, "the load queue below holds 4 steps");
    uint32_t c[B][4];
    float f[B][4];
    Cursor ahead = cursor_at<ROWS, BT>(p, g0, k_tiles);  // the absmax loads' position
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int b = 0; b < B; ++b) load(ahead, i < n_iter, b, c[b][i], f[b][i]);
      advance<ROWS, BT>(ahead, p, k_tiles);
    }
    Cursor at = cursor_at<ROWS, BT>(p, g0, k_tiles);  // the copies' position
    for (int i = 0; i < n_iter; ++i) {
      const int s = i % S;
      produce_step<T, Cfg, NESTED>(smem, smem_base, s, i, c, f, s_qmap, offset, r, full_bar,
                                   empty_bar, &x_map, &code_map, at.kt, at.token0, at.row0);
      advance<ROWS, BT>(at, p, k_tiles);
#pragma unroll
      for (int b = 0; b < B; ++b) {
        c[b][0] = c[b][1], f[b][0] = f[b][1];
        c[b][1] = c[b][2], f[b][1] = f[b][2];
        c[b][2] = c[b][3], f[b][2] = f[b][3];
        load(ahead, i + kAbsmaxLookahead < n_iter, b, c[b][3], f[b][3]);
      }
      advance<ROWS, BT>(ahead, p, k_tiles);
    }
  } else {
    // ---- consumers: warpgroup cw owns the 64-row blocks cw * B + h, h < B ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n");
    const int cw = warpgroup - 1;
    const int tid = threadIdx.x - 128 * warpgroup;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int r_in_block = 16 * warp + g;  // this thread's rows within each 64-row block: + 0 and + 8
    // (lane * 4, byte t of a code word, 0, 0): the pair of byte t in this lane's column of the table
    const uint32_t sel = 0x5504u | (uint32_t(t) << 4);
    const uint32_t lane4 = uint32_t(lane) * 4u;
    const uint32_t swap = (uint32_t(g) >> 2) & 1u;  // load_codes
    const uint64_t desc0 = swizzle128_desc(smem_base + Cfg::kXOff);
    skinny::build_pair_table<T>(reinterpret_cast<uint32_t*>(smem + Cfg::kPairOff), p.values, threadIdx.x - 128, 256);
    asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both consumers' part of the table is written

    // Written only by wgmma (see store_tile): a segment's first product overwrites them
    // (accumulate = 0).
    float acc[B][BT / 2];
#pragma unroll
    for (int h = 0; h < B; ++h)
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) acc[h][i] = 0.0f;

    // One wgmma group = one k step (iteration i) of one 64-row block h: build the fragments into
    // `cur` from the codes read one group ahead, issue this group, read the next group's codes
    // (the ring's stages run on across segments), wait for the previous group (reading `prev`);
    // the first group of an iteration gives the previous iteration's stage back (every group of
    // it is done). wgmma reads its A registers asynchronously, after the issuing instruction, and
    // the compiler does not know that: it reused the registers of an in-flight group's fragments
    // for the next group's (wrong sums on the H100 whenever K > 64). `keep` makes `prev` live
    // until its group is known to be done, so the two groups' fragments sit in different
    // registers.
    // `first`: a segment's first k step, whose first product overwrites the accumulators. With
    // 256-row tiles it is a compile-time constant (std::true_type / std::false_type, the first
    // step peeled out of the loop): computed at run time, the predicate kept the iteration
    // counter in vector registers, an R2UR pair before every wgmma to move its descriptor to
    // uniform registers. 128-row tiles pass a bool: peeled, the 128 x 256 kernel spilled 20 bytes.
    GroupCodes codes;
    mbar_wait(full_bar, 0);  // the first group's codes
    load_codes<Cfg>(smem, 0, 64 * (cw * B) + r_in_block, swap, codes);
    auto group = [&](int i, int h, auto first, uint32_t(&cur)[4][4], uint32_t(&prev)[4][4]) {
      build_fragments<T>(codes, lane4, sel, cur);
#pragma unroll
      for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
      wgmma_fence();
      const int s = i % S;  // the stage index in uniform registers (as is i)
      const uint64_t desc = desc0 + uint64_t((s * Cfg::kXBytes) >> 4);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wgmma_rs<BT, T>(acc[h], cur[j], desc + uint64_t((32 * j) >> 4), truth(first) && j == 0 ? 0u : 1u);
      wgmma_commit();
#pragma unroll
      for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
      // the next group's codes: block h + 1 of this iteration, or block 0 of the next one
      if (h + 1 < B) {
        load_codes<Cfg>(smem, s, 64 * (cw * B + h + 1) + r_in_block, swap, codes);
      } else if (i + 1 < n_iter) {
        const int next = (i + 1) % S;
        mbar_wait(full_bar + 8 * next, ((i + 1) / S) & 1);
        load_codes<Cfg>(smem, next, 64 * (cw * B) + r_in_block, swap, codes);
      }
      wgmma_wait<1>();  // the previous group is done: its fragments (and, for h == 0, its stage) are free
      keep(prev);
#pragma unroll
      for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
      if (h == 0 && i > 0) {
        // the address computed outside the lane-0 branch, in uniform registers
        const uint32_t released = empty_bar + 8 * ((i - 1) % S);
        if (p.thread_release) {
          mbar_arrive(released);
        } else {
          __syncwarp();
          if (lane == 0) mbar_arrive(released);
        }
      }
    };

    // A CTA's partial sums of a cut tile, in its slot: float4 v of 64-row block `block` of thread
    // tid at [(block * BT / 8 + v) * 128 + tid], so that a warp's stores are 512 contiguous bytes
    // and the finishing CTA's thread with the same index reads back the same fragment elements.
    auto slot = [&](int cta) {
      return reinterpret_cast<float4*>(p.partials) + int64_t(cta) * (ROWS * BT / 4);
    };
    // The epilogue of a finished tile: + bias, round, stage [token][row] per 64-row block in the x
    // stages, 16-byte stores. Only at the CTA's last segment: the producer has nothing more to
    // copy into the stages, and both consumers' groups are done before either overwrites them.
    // The partial sums of CTAs first..last (none when first > last) are added here, read from
    // the workspace rather than added into acc: an ordinary instruction writing wgmma's
    // accumulator registers anywhere in the kernel makes ptxas serialize every wgmma (C7515).
    auto store_tile = [&](const Cursor& at, int first, int last) {
      for (int cta = first; cta <= last; ++cta)
        while (flag_acquire(p.flags + cta) == 0u) {
        }
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
      for (int h = 0; h < B; ++h) {
        const int block = cw * B + h;
        T* stage = reinterpret_cast<T*>(smem + Cfg::kXOff + block * Cfg::kOutBytes);
        const int row_lo = at.row0 + 64 * block + r_in_block, row_hi = row_lo + 8;
        float bias_lo = 0.0f, bias_hi = 0.0f;
        if (p.bias != nullptr) {
          const T* bias = static_cast<const T*>(p.bias);
          if (row_lo < p.n) bias_lo = to_float(bias[row_lo]);
          if (row_hi < p.n) bias_hi = to_float(bias[row_hi]);
        }
        // The other CTAs' sums, in CTA order, kPartialBatch float4 per thread in flight: one load
        // at a time put an L2 round trip per float4 and CTA on the finishing CTA's tail (BT / 8
        // x (CTAs - 1) of them, 96 on 4096 x 14336 at M = 128).
#pragma unroll
        for (int j0 = 0; j0 < BT / 8; j0 += kPartialBatch<BT>) {
          float4 others[kPartialBatch<BT>];
#pragma unroll
          for (int u = 0; u < kPartialBatch<BT>; ++u) others[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          for (int cta = first; cta <= last; ++cta) {
            const float4* src = slot(cta) + ((cw * B + h) * (BT / 8) + j0) * 128 + tid;
            float4 v[kPartialBatch<BT>];
#pragma unroll
            for (int u = 0; u < kPartialBatch<BT>; ++u) v[u] = __ldcg(src + u * 128);
#pragma unroll
            for (int u = 0; u < kPartialBatch<BT>; ++u)
              others[u].x += v[u].x, others[u].y += v[u].y, others[u].z += v[u].z, others[u].w += v[u].w;
          }
#pragma unroll
          for (int u = 0; u < kPartialBatch<BT>; ++u) {
            const int j = j0 + u;
            const int tok = 8 * j + 2 * t;
            stage[tok * kOutPitch + r_in_block] = from_float<T>(acc[h][4 * j] + others[u].x + bias_lo);
            stage[(tok + 1) * kOutPitch + r_in_block] = from_float<T>(acc[h][4 * j + 1] + others[u].y + bias_lo);
            stage[tok * kOutPitch + r_in_block + 8] = from_float<T>(acc[h][4 * j + 2] + others[u].z + bias_hi);
            stage[(tok + 1) * kOutPitch + r_in_block + 8] = from_float<T>(acc[h][4 * j + 3] + others[u].w + bias_hi);
          }
        }
      }
      asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory");
      T* out = static_cast<T*>(p.out);
      for (int idx = tid; idx < B * BT * 8; idx += 128) {
        const int block = cw * B + idx / (BT * 8);
        const int tk = (idx / 8) % BT, c = idx % 8;
        const T* stage = reinterpret_cast<const T*>(smem + Cfg::kXOff + block * Cfg::kOutBytes);
        const int token = at.token0 + tk;
        const int row = at.row0 + 64 * block + 8 * c;
        if (token < p.m && row < p.n) {
          const uint4 v = *reinterpret_cast<const uint4*>(stage + tk * kOutPitch + 8 * c);
          *reinterpret_cast<uint4*>(out + int64_t(token) * p.n + row) = v;
        }
      }
    };
    auto store_partial = [&] {
      float4* dst = slot(blockIdx.x);
#pragma unroll
      for (int h = 0; h < B; ++h)
#pragma unroll
        for (int v = 0; v < BT / 8; ++v)
          __stcg(dst + ((cw * B + h) * (BT / 8) + v) * 128 + tid,
                 make_float4(acc[h][4 * v], acc[h][4 * v + 1], acc[h][4 * v + 2], acc[h][4 * v + 3]));
      __threadfence();
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      if (threadIdx.x == 128) flag_release(p.flags + blockIdx.x);
    };
    uint32_t frag_a[4][4], frag_b[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) frag_b[j][i] = 0u;
    // groups alternate between the two fragment buffers
    // Segments: runs of iterations within one tile. A segment that ends before the CTA's last
    // iteration is its first one, which began in the middle of a tile (ranges are at most a tile
    // long): partial sums for the CTA that finishes that tile. The wait between segments sits
    // outside the loop over k steps: a conditional wait inside it made ptxas serialize every
    // wgmma (C7515), 2172 against 1664 us at 28672 x 8192, M = 2048.
    int i = 0;
    for (int kt = g0 % k_tiles;; kt = 0) {
      const int end = min(n_iter, i + (k_tiles - kt));  // a segment has at least one k step
      constexpr std::true_type kFirst{};
      constexpr std::false_type kLater{};
      if constexpr (B == 2) {
        group(i, 0, kFirst, frag_a, frag_b);
        group(i, 1, kFirst, frag_b, frag_a);
        for (++i; i < end; ++i) {
          group(i, 0, kLater, frag_a, frag_b);
          group(i, 1, kLater, frag_b, frag_a);
        }
      } else {
        // two k steps per trip, one buffer each, as straight-line code (a branch between the
        // buffers cost 22% at 28672 x 8192, M = 2048); after the wait below both are free again
        const int begin = i;
        for (; i + 1 < end; i += 2) {
          group(i, 0, i == begin, frag_a, frag_b);
          group(i + 1, 0, kLater, frag_b, frag_a);
        }
        if (i < end) {
          group(i, 0, i == begin, frag_a, frag_b);
          ++i;
        }
      }
      wgmma_wait<0>();
      keep(frag_a);
      keep(frag_b);
      if (i == n_iter) break;
      store_partial();
    }
#pragma unroll
    for (int hh = 0; hh < B; ++hh) fence_registers(acc[hh]);
    // The last segment: [kt0, kt_end] of one tile.
    const Cursor last = cursor_at<ROWS, BT>(p, g0 + n_iter - 1, k_tiles);
    const int kt0 = max(0, g0 - last.tile * k_tiles);
    if (kt0 > 0) {
      store_partial();  // the tile's k = 0 lies in an earlier CTA's range, which finishes it
    } else {
      // this CTA finishes the tile: add the partial sums of the later CTAs that hold the rest of
      // its k steps, in CTA order, then store
      const int tile_g0 = last.tile * k_tiles;
      if (last.kt < k_tiles - 1)
        store_tile(last, range.cta_of(tile_g0 + last.kt + 1), range.cta_of(tile_g0 + k_tiles - 1));
      else
        store_tile(last, 0, -1);
    }
  }
#else
  __trap();  // built for a target without wgmma: the launcher refuses before getting here
#endif
}

template <typename T, int ROWS, int BT, bool NESTED>
const char* launch_tile(const Gemm4bitParams& p, const KernelArgs& args, cudaStream_t stream) {
  using Cfg = Tile<ROWS, BT>;
  PFN_cuTensorMapEncodeTiled_v12000 encode = hopper::tensor_map_encoder();
  if (encode == nullptr) return "the driver does not provide cuTensorMapEncodeTiled";
  CUtensorMap x_map, code_map;
  const CUtensorMapDataType x_type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t x_dims[2] = {cuuint64_t(p.k), cuuint64_t(p.m)};
  const cuuint64_t x_strides[1] = {cuuint64_t(p.k) * 2};
  const cuuint32_t x_box[2] = {kTileK, BT};
  const cuuint32_t unit[2] = {1, 1};
  if (encode(&x_map, x_type, 2, const_cast<void*>(p.x), x_dims, x_strides, x_box, unit,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return "cuTensorMapEncodeTiled rejected x's tensor map";
  const cuuint64_t code_dims[2] = {cuuint64_t(p.k / 2), cuuint64_t(p.n)};
  const cuuint64_t code_strides[1] = {cuuint64_t(p.k / 2)};
  const cuuint32_t code_box[2] = {kCodeRowBytes, ROWS};
  if (encode(&code_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(p.packed), code_dims, code_strides,
             code_box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_32B,  // load_codes
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return "cuTensorMapEncodeTiled rejected the codes' tensor map";

  const bool stream_k = args.ctas > args.iters / (p.k / kTileK);  // more CTAs than tiles
  auto kernel = stream_k ? gemm_4bit_wgmma_stream_k_kernel<T, ROWS, BT, NESTED> : gemm_4bit_wgmma_kernel<T, ROWS, BT, NESTED>;
  static std::once_flag attr_once;
  static cudaError_t attr_error = cudaSuccess;
  std::call_once(attr_once, [&] {
    attr_error = cudaFuncSetAttribute(gemm_4bit_wgmma_kernel<T, ROWS, BT, NESTED>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kAlloc);
    if (attr_error == cudaSuccess)
      attr_error = cudaFuncSetAttribute(gemm_4bit_wgmma_stream_k_kernel<T, ROWS, BT, NESTED>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kAlloc);
  });
  if (attr_error != cudaSuccess) return "cudaFuncSetAttribute refused the kernel's shared memory";
  KernelArgs a = args;
  a.row_tiles = int((p.n + ROWS - 1) / ROWS);
  a.token_tiles = int((p.m + BT - 1) / BT);
  kernel<<<a.ctas, kThreads, Cfg::kAlloc, stream>>>(x_map, code_map, a);
  return nullptr;
}

template <typename T, bool NESTED>
const char* launch_typed(const Gemm4bitParams& p, const KernelArgs& args, int rows, int tokens,
                         cudaStream_t stream) {
  if (rows == 256 && tokens == 64) return launch_tile<T, 256, 64, NESTED>(p, args, stream);
  if (rows == 256 && tokens == 128) return launch_tile<T, 256, 128, NESTED>(p, args, stream);
  if (rows == 128 && tokens == 64) return launch_tile<T, 128, 64, NESTED>(p, args, stream);
  if (rows == 128 && tokens == 128) return launch_tile<T, 128, 128, NESTED>(p, args, stream);
  if (rows == 128 && tokens == 256) return launch_tile<T, 128, 256, NESTED>(p, args, stream);
  return "LOWRANK_WGMMA_TILE must be one of 128x64, 128x128, 128x256, 256x64, 256x128 (rows x tokens)";
}

int log2_exact(int v) { return __builtin_ctz(unsigned(v)); }

}  // namespace

WgmmaPlan plan_gemm_4bit_wgmma(const Gemm4bitParams& p) {
  WgmmaPlan plan;
  plan.rows = int(wgmma_rows_per_cta(p.m, p.n, p.sms));
  plan.tokens = int(wgmma_token_tile(p.m));
  bool forced_tile = false;
  // LOWRANK_WGMMA_TILE=<rows>x<tokens> forces a tile (A/B in one process; read per launch)
  if (const char* env = std::getenv("LOWRANK_WGMMA_TILE"); env != nullptr && env[0] != '\0') {
    char* end = nullptr;
    plan.rows = int(std::strtol(env, &end, 10));
    plan.tokens = (end != nullptr && *end == 'x') ? int(std::strtol(end + 1, nullptr, 10)) : 0;
    forced_tile = true;
    const bool known = (plan.rows == 128 && (plan.tokens == 64 || plan.tokens == 128 || plan.tokens == 256)) ||
                       (plan.rows == 256 && (plan.tokens == 64 || plan.tokens == 128));
    if (!known) {
      plan.error = "LOWRANK_WGMMA_TILE must be one of 128x64, 128x128, 128x256, 256x64, 256x128 (rows x tokens)";
      return plan;
    }
  }
  const int64_t k_tiles = p.k / kWgmmaTileK;
  auto tiles_of = [&] { return ((p.n + plan.rows - 1) / plan.rows) * ((p.m + plan.tokens - 1) / plan.tokens); };
  int64_t tiles = tiles_of();
  // A grid of fewer tiles than half the SMs is cut by k (stream-K), with 256-row tiles where the
  // token tile allows (each x tile then feeds twice the rows).
  const bool short_grid = 2 * tiles < p.sms;
  if (short_grid && !forced_tile && plan.tokens <= 128) {
    plan.rows = 256;
    tiles = tiles_of();
  }
  int64_t ctas = short_grid ? wgmma_stream_k_ctas(tiles, k_tiles, p.sms, plan.tokens) : wgmma_medium_grid_ctas(tiles, k_tiles, p.sms);
  // A short grid of 128-token tiles still under half the SMs once cut (4096 x 4096 at M = 65-128)
  // takes two 64-token tiles per 128 rows instead (wgmma_short_grid_64_ctas).
  if (short_grid && !forced_tile && plan.tokens == 128 && 2 * ctas < p.sms) {
    const int64_t tiles_64 = ((p.n + 127) / 128) * ((p.m + 63) / 64);
    const int64_t ctas_64 = wgmma_short_grid_64_ctas(tiles_64, k_tiles, p.sms);
    if (2 * ctas_64 >= p.sms) {
      plan.rows = 128;
      plan.tokens = 64;
      tiles = tiles_64;
      ctas = ctas_64;
    }
  }
  const int64_t iters = tiles * k_tiles;
  // LOWRANK_WGMMA_STREAM_K=0 turns the cut off, =<n> cuts into n CTAs (tests, A/B; read per launch)
  if (const char* env = std::getenv("LOWRANK_WGMMA_STREAM_K"); env != nullptr && env[0] != '\0') {
    const int64_t forced = std::strtoll(env, nullptr, 10);
    if (forced == 0) {
      ctas = tiles;
    } else if (forced > tiles && forced <= iters && tiles < p.sms) {
      // fewer tiles than SMs: fewer finishing CTAs than SMs, so one resident CTA at least never
      // waits, and the grid cannot stall on CTAs that have no SM yet
      ctas = forced;
    } else {
      plan.error = "LOWRANK_WGMMA_STREAM_K must be 0 (off) or a CTA count above the tile count and at most "
                   "tiles x k steps, for a grid of fewer tiles than SMs";
      return plan;
    }
  }
  if (iters >= (int64_t(1) << 31)) {
    plan.error = "it takes fewer than 2^31 tiles x k steps";
    return plan;
  }
  plan.tiles = int(tiles);
  plan.iters = int(iters);
  plan.ctas = int(ctas);
  // The kernel with dequantizing warpgroups (gemm_4bit_wgmma_ss.cu) takes 128-row tiles of 128 or
  // 256 tokens one CTA per tile; LOWRANK_WGMMA_KERNEL=ss picks it, =rs this one (A/B, tests; read
  // per launch). Default: this one.
  const bool ss_fits = plan.rows == 128 && plan.tokens >= 128 && ctas == tiles;
  plan.ss = false;
  if (const char* env = std::getenv("LOWRANK_WGMMA_KERNEL"); env != nullptr && env[0] != '\0') {
    const std::string kernel(env);
    if (kernel == "rs") {
      plan.ss = false;
    } else if (kernel != "ss") {
      plan.error = "LOWRANK_WGMMA_KERNEL must be 'rs' or 'ss'";
      return plan;
    } else if (!ss_fits) {
      plan.error = "LOWRANK_WGMMA_KERNEL=ss takes 128 x 128 or 128 x 256 tiles, one CTA per tile (not cut by k)";
      return plan;
    } else {
      plan.ss = true;
    }
  }
  if (ctas > tiles) plan.workspace_bytes = ctas * (int64_t(plan.rows) * plan.tokens * 4 + 4);
  return plan;
}

const char* launch_gemm_4bit_wgmma(const Gemm4bitParams& p, const WgmmaPlan& plan, void* workspace,
                                   cudaStream_t stream) {
  if (plan.error != nullptr) return plan.error;
  KernelArgs a{};
  a.values = p.values;
  a.absmax = p.absmax;
  a.absmax_codes = p.absmax_codes;
  a.nested_absmax = p.nested_absmax;
  a.nested_qmap = p.nested_qmap;
  a.offset = p.offset;
  a.blocksize_log2 = log2_exact(p.blocksize);
  a.nested_blocksize_log2 = p.absmax_codes != nullptr ? log2_exact(p.nested_blocksize) : 0;
  a.n = int(p.n);
  a.k = int(p.k);
  a.m = int(p.m);
  a.bias = p.bias;
  a.out = p.out;
  a.ctas = plan.ctas;
  a.iters = plan.iters;
  if (plan.workspace_bytes > 0) {
    if (workspace == nullptr) return "the stream-K grid needs a workspace";
    a.partials = static_cast<float*>(workspace);
    a.flags = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(workspace) +
                                          int64_t(plan.ctas) * plan.rows * plan.tokens * 4);
    // the flags start at 0 at every call: a CTA sets its flag once its partial sums are written
    if (cudaMemsetAsync(a.flags, 0, size_t(plan.ctas) * 4, stream) != cudaSuccess)
      return "cudaMemsetAsync of the stream-K flags failed";
  }
  const char* release = std::getenv("LOWRANK_WGMMA_THREAD_RELEASE");  // A/B, read per launch
  a.thread_release = release != nullptr && release[0] == '1';
  if (plan.ss) return launch_gemm_4bit_wgmma_ss(p, plan.tokens, stream);
  const bool nested = p.absmax_codes != nullptr;
  if (p.kind == FloatKind::kBFloat16)
    return nested ? launch_typed<__nv_bfloat16, true>(p, a, plan.rows, plan.tokens, stream)
                  : launch_typed<__nv_bfloat16, false>(p, a, plan.rows, plan.tokens, stream);
  return nested ? launch_typed<__half, true>(p, a, plan.rows, plan.tokens, stream)
                : launch_typed<__half, false>(p, a, plan.rows, plan.tokens, stream);
}

}  // namespace lowrank::gemm
