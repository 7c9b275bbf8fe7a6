// What the two skinny kernels (M <= 16) share: the pair table and its lookup, the x loads, and the
// 16 lookups + mma of one (16 weight rows x 64 k) chunk. gemm_4bit_skinny.cu holds the kernel that
// loads its codes into registers (any GPU from sm_80); gemm_4bit_skinny_tma.cu the Hopper kernel
// whose codes arrive in shared memory by bulk copies. The reasoning behind the table, the fragment
// mapping and the chunk's k permutation is at the top of gemm_4bit_skinny.cu.
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "common/cuda_float.cuh"

namespace lowrank::gemm::skinny {

constexpr int kRowsPerTile = 16;  // weight rows of one mma (its M)

// d += A B: mma.sync m16n8k16, A (16 x 16) and B (16 x 8) in T (bf16 or fp16), fp32 accumulators.
#define LOWRANK_MMA_16816(TYPE)                                                                               \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
      "{%0, %1, %2, %3};\n"                                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                         \
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) LOWRANK_MMA_16816("bf16");
  else LOWRANK_MMA_16816("f16");
}
#undef LOWRANK_MMA_16816

// The pair table: word [byte][lane] = (value[byte >> 4], value[byte & 15]) in T, the first element
// (high nibble) in the low half as the mma reads it; one copy per lane so that lane l always reads
// bank l, in rows of 256 bytes (the upper 128 unused) so that one byte permute addresses it.
constexpr int kPairRowWords = 64;
constexpr int kPairTableBytes = 256 * kPairRowWords * 4;  // 64 KB

// A row's 32 copies are one value: a thread packs it once and writes 8 copies with one 16-byte store.
template <typename T>
__device__ __forceinline__ void build_pair_table(uint32_t* s_pairs, const float* values, int tid, int threads) {
  for (int i = tid; i < 256 * 8; i += threads) {
    const int byte = i >> 3;
    const uint32_t pair = Pack2<T>::pack(values[byte >> 4], values[byte & 15]);
    reinterpret_cast<uint4*>(s_pairs + byte * kPairRowWords)[i & 7] = make_uint4(pair, pair, pair, pair);
  }
}

// Where the table sits in the CTA's shared window on sm_90: the first dynamic shared bytes (the
// kernels have no static shared arrays), after the 1 KB the system reserves. The kernels check
// it (cvta of the table) and take the generic path when it differs (another architecture, a
// cluster launch, another layout).
constexpr uint32_t kTableWindowOffset = 0x400;

// The table word of byte J (0..3) of a packed word, for this lane. A table row is 256 bytes (the
// lane's word at lane * 4, the upper 128 bytes unused), so one byte permute builds the offset:
// bytes (lane4.b0, word.bJ, 0, 0), i.e. byte J at bits 8..15 beside the lane's bits 2..6 (lane4 <
// 128, so its byte 1 is the zero); then the shared load, 2 instructions per lookup. With 128-byte
// rows (32 KB) the byte has to be shifted to bits 7..14 and masked in beside the lane: 3
// instructions (the kernel before 2026-11-24). Through a generic pointer the SASS adds one IADD
// of the table's shared-window address: on sm_90 a shared address carries the CTA's cluster rank
// in bits 24 and up (S2R SR_CgaCtaId), so ptxas cannot fold the window offset into the LDS.
// Outside a cluster that rank is 0 and the address is offset + 0x400, so ld.shared takes the
// offset as an immediate (IMM, bit-identical).
template <int J, bool IMM>
__device__ __forceinline__ uint32_t pair_word(const char* table, uint32_t word, uint32_t lane4) {
  const uint32_t offset = __byte_perm(word, lane4, 0x5504u | (uint32_t(J) << 4));
  if constexpr (IMM) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1+%2];" : "=r"(v) : "r"(offset), "n"(kTableWindowOffset));
    return v;
  } else {
    return *reinterpret_cast<const uint32_t*>(table + offset);
  }
}

// 16 bytes of x, cached in L1 (every tile and warp of the CTA reads the same x).
__device__ __forceinline__ uint4 load_x16(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}

// 16 elements of each of the lane's x rows at chunk c: offsets x_off[j] (row 8 j + g, clamped to
// M - 1: the mma columns of rows past M are never stored, t * 16 elements into the chunk).
template <typename T, int TILES_M>
__device__ __forceinline__ void load_x_chunk(const T* x, const uint32_t (&x_off)[TILES_M], int c,
                                             uint4 (&v)[TILES_M][2]) {
#pragma unroll
  for (int j = 0; j < TILES_M; ++j) {
    const T* src = x + x_off[j] + uint32_t(c) * 64u;
    v[j][0] = load_x16(src);
    v[j][1] = load_x16(src + 8);
  }
}

// Half of one chunk of 16 weight rows x 64 k: lane (g, t) holds 8 packed bytes of rows g and g + 8
// at byte 8 t of the chunk, of which this half takes word `lo` / `hi` (4 bytes each); xv[j] =
// the x words of the half for x tile j. chunk[j] += the unscaled products (2 k-steps of 16: step
// s feeds bytes 2s and 2s + 1 of the word, the same k permutation for the weight and x).
template <typename T, int TILES_M, bool IMM>
__device__ __forceinline__ void half_chunk_mma(float (&chunk)[TILES_M][4], uint32_t lo, uint32_t hi,
                                               const uint4 (&xv)[TILES_M], const char* table, uint32_t lane4) {
  const uint32_t a00 = pair_word<0, IMM>(table, lo, lane4), a01 = pair_word<0, IMM>(table, hi, lane4);
  const uint32_t a02 = pair_word<1, IMM>(table, lo, lane4), a03 = pair_word<1, IMM>(table, hi, lane4);
  const uint32_t a10 = pair_word<2, IMM>(table, lo, lane4), a11 = pair_word<2, IMM>(table, hi, lane4);
  const uint32_t a12 = pair_word<3, IMM>(table, lo, lane4), a13 = pair_word<3, IMM>(table, hi, lane4);
#pragma unroll
  for (int j = 0; j < TILES_M; ++j) {
    mma_16816<T>(chunk[j], a00, a01, a02, a03, xv[j].x, xv[j].y);
    mma_16816<T>(chunk[j], a10, a11, a12, a13, xv[j].z, xv[j].w);
  }
}

// One whole chunk (both halves; x as two uint4 per x tile) into fresh sums.
template <typename T, int TILES_M, bool IMM>
__device__ __forceinline__ void chunk_mma(float (&chunk)[TILES_M][4], uint2 lo_row, uint2 hi_row,
                                          const uint4 (&xv)[TILES_M][2], const char* table, uint32_t lane4) {
#pragma unroll
  for (int j = 0; j < TILES_M; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) chunk[j][i] = 0.0f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint4 xh[TILES_M];
#pragma unroll
    for (int j = 0; j < TILES_M; ++j) xh[j] = xv[j][half];
    half_chunk_mma<T, TILES_M, IMM>(chunk, half == 0 ? lo_row.x : lo_row.y, half == 0 ? hi_row.x : hi_row.y, xh,
                                    table, lane4);
  }
}

// acc += chunk * absmax of the lane's two rows (accumulators 0, 1: row g; 2, 3: row g + 8).
template <int TILES_M>
__device__ __forceinline__ void scale_add(float (&acc)[TILES_M][4], const float (&chunk)[TILES_M][4], float absmax_lo,
                                          float absmax_hi) {
#pragma unroll
  for (int j = 0; j < TILES_M; ++j) {
    acc[j][0] = fmaf(chunk[j][0], absmax_lo, acc[j][0]);
    acc[j][1] = fmaf(chunk[j][1], absmax_lo, acc[j][1]);
    acc[j][2] = fmaf(chunk[j][2], absmax_hi, acc[j][2]);
    acc[j][3] = fmaf(chunk[j][3], absmax_hi, acc[j][3]);
  }
}

// SMs of the current device, cached per device: the attribute query costs host time on every
// launch (M = 1 calls are ~10 us of device time, so the host side is on the critical path of
// eager decoding).
inline int multiprocessor_count() {
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

}  // namespace lowrank::gemm::skinny
