// Pieces shared by the two fused wgmma GEMMs (sm_90a): gemm_4bit_wgmma.cu, which dequantizes the
// weight into wgmma's register A operand, and gemm_4bit_wgmma_ss.cu, whose dequantizing warpgroup
// writes it to shared memory. The scaled code table and its byte-permute lookup, the tile
// descriptor, and the wgmma group fences.
#pragma once
#include <cstdint>

#include "common/cuda_float.cuh"

namespace lowrank::gemm {

constexpr int kOutPitch = 72;  // elements per token row of the staging tile (64 + 8: 144 bytes)
constexpr int kTokenGroup = 8;  // token tiles per raster group (CTAs that share a weight row tile)

// Raster: groups of kTokenGroup token tiles; inside a group the token tile varies fastest, so the
// CTAs resident together share weight row tiles (codes read from DRAM once per group).
__device__ __forceinline__ void raster_origin(int tile, int row_tiles, int token_tiles, int rows, int tokens,
                                              int& row0, int& token0) {
  const int group_ctas = kTokenGroup * row_tiles;
  const int group = tile / group_ctas;
  const int first_token_tile = group * kTokenGroup;
  const int group_size = min(kTokenGroup, token_tiles - first_token_tile);
  const int in_group = tile - group * group_ctas;
  row0 = (in_group / group_size) * rows;
  token0 = (first_token_tile + in_group % group_size) * tokens;
}

// Epilogue, step 1: one 64-row block's accumulators (wgmma's D layout for this thread: rows
// r_in_block and + 8 of the block, tokens 8 j + 2 t and + 1) + bias in fp32, rounded to T, into a
// shared staging tile [token][row] with rows padded to kOutPitch elements (a warp's 2-byte stores
// land in distinct banks). block_row0: the block's first weight row; bias may be nullptr.
template <typename T, int BT>
__device__ __forceinline__ void stage_accumulators(T* stage, const float (&acc)[BT / 2], const T* bias,
                                                   int block_row0, int r_in_block, int t, int n) {
  const int row_lo = block_row0 + r_in_block, row_hi = row_lo + 8;
  float bias_lo = 0.0f, bias_hi = 0.0f;
  if (bias != nullptr) {
    if (row_lo < n) bias_lo = to_float(bias[row_lo]);
    if (row_hi < n) bias_hi = to_float(bias[row_hi]);
  }
#pragma unroll
  for (int j = 0; j < BT / 8; ++j) {
    const int tok = 8 * j + 2 * t;
    stage[tok * kOutPitch + r_in_block] = from_float<T>(acc[4 * j] + bias_lo);
    stage[(tok + 1) * kOutPitch + r_in_block] = from_float<T>(acc[4 * j + 1] + bias_lo);
    stage[tok * kOutPitch + r_in_block + 8] = from_float<T>(acc[4 * j + 2] + bias_hi);
    stage[(tok + 1) * kOutPitch + r_in_block + 8] = from_float<T>(acc[4 * j + 3] + bias_hi);
  }
}

// Epilogue, step 2 (after a barrier of the staging threads): `count` staged 64-row blocks from
// first_block on, block_bytes apart, stored by 128 threads as 16-byte pieces of y's rows
// (N % 8 == 0), tokens past m and rows past n skipped.
template <typename T, int BT>
__device__ __forceinline__ void store_staged(const uint8_t* stages, int block_bytes, int first_block, int count,
                                             int tid, int row0, int token0, int m, int n, T* out) {
  for (int idx = tid; idx < count * BT * 8; idx += 128) {
    const int block = first_block + idx / (BT * 8);
    const int tk = (idx / 8) % BT, c = idx % 8;
    const T* stage = reinterpret_cast<const T*>(stages + block * block_bytes);
    const int token = token0 + tk;
    const int row = row0 + 64 * block + 8 * c;
    if (token < m && row < n) {
      const uint4 v = *reinterpret_cast<const uint4*>(stage + tk * kOutPitch + 8 * c);
      *reinterpret_cast<uint4*>(out + int64_t(token) * n + row) = v;
    }
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int R>
__device__ __forceinline__ void fence_registers(float (&r)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
#endif

// Descriptor of a K-major 128-byte-swizzled tile: 8-row atoms of 128-byte rows, 1024 bytes apart
// (stride byte offset), layout type 1 = 128-byte swizzle; the leading byte offset is unused for
// this layout (the k16 step stays within one 128-byte row). Start address in 16-byte units.
[[maybe_unused]] __device__ __forceinline__ uint64_t swizzle128_desc(uint32_t smem_byte_addr) {
  return uint64_t((smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// The scaled table of one weight row for one k step, built by a producer thread: entry i is
// values[i] * absmax in fp32 rounded once to T (the dequantize kernel's operations), stored as
// 4 words of low bytes (entries 4q..4q+3 in word q) and 4 words of high bytes.
template <typename T>
__device__ __forceinline__ void build_table(const float (&values)[16], float absmax, uint4& lo, uint4& hi) {
  uint32_t w[8];  // entries 2p (low half) and 2p + 1
#pragma unroll
  for (int p = 0; p < 8; ++p) w[p] = Pack2<T>::pack(__fmul_rn(values[2 * p], absmax), __fmul_rn(values[2 * p + 1], absmax));
  lo = make_uint4(__byte_perm(w[0], w[1], 0x6420), __byte_perm(w[2], w[3], 0x6420), __byte_perm(w[4], w[5], 0x6420),
                  __byte_perm(w[6], w[7], 0x6420));
  hi = make_uint4(__byte_perm(w[0], w[1], 0x7531), __byte_perm(w[2], w[3], 0x7531), __byte_perm(w[4], w[5], 0x7531),
                  __byte_perm(w[6], w[7], 0x7531));
}

// Four table lookups in registers, no shared memory: `codes` holds two code bytes in its low 16
// bits (nibbles n0..n3: byte A's low and high nibble, then byte B's). A byte permute selects among
// 8 bytes by a 3-bit index, so the low bytes of entries 0-7 and of entries 8-15 are picked by
// two permutes, merged by a third whose selector comes from the codes' bit 3; the same for the
// high bytes; two more permutes interleave them into the pairs (A's first element = its high
// nibble, in the low half). 12 instructions per 4 elements; every selector nibble is <= 7.
[[maybe_unused]] __device__ __forceinline__ void lookup4(uint32_t codes, const uint4& lo, const uint4& hi, uint32_t& pair_a,
                                        uint32_t& pair_b) {
  const uint32_t sel = codes & 0x7777u;
  const uint32_t merge = ((codes >> 1) & 0x4444u) | 0x3210u;
  const uint32_t lo_bytes = __byte_perm(__byte_perm(lo.x, lo.y, sel), __byte_perm(lo.z, lo.w, sel), merge);
  const uint32_t hi_bytes = __byte_perm(__byte_perm(hi.x, hi.y, sel), __byte_perm(hi.z, hi.w, sel), merge);
  pair_a = __byte_perm(lo_bytes, hi_bytes, 0x4051);
  pair_b = __byte_perm(lo_bytes, hi_bytes, 0x6273);
}

}  // namespace lowrank::gemm
