// The merged weight W' = round_T(v (W0 + s B A)) with the rank-r product on the tensor cores
// (work in progress on branch wip/merge-mma). merge.cu computes sum_j (s v_o B_oj) A_ji with
// float32 FMAs on the CUDA cores and ncu found it bound by instruction issue (~49 instructions
// per weight, 16 of them FMAs; 158 us at 14336 x 4096 against 55-78 us for the plain dequantize).
// Here one mma.sync m16n8k16 computes a 16 x 8 block of the product with K = r <= 16; the bf16
// operands are split in two (x = hi + lo, hi = bf16(x), lo = bf16(x - hi)) and the product is
// hi*hi + hi*lo + lo*hi in the fp32 accumulator: relative error ~2^-15 of sum_j |s v B_oj| |A_ji|,
// far under the final 16-bit rounding (2^-9 bf16, 2^-12 fp16) of the usual |W'| >> |s B A|. So the
// result is not bit-identical to the CPU op (merge.cu stays the float32 path and the reference
// of the arithmetic); 16-bit outputs only.
//
// Work split: a CTA owns a strip of 64 columns and kRowsPerCta rows; its 4 warps take 16-row
// tiles in turn. A warp keeps A's fragments for the strip in registers (8 n-tiles x hi/lo x 2
// registers), builds the tile's (s v B) fragments from 8 floats per lane, runs 24 mma, stages the
// 16 x 64 fp32 product in shared memory and re-reads it row-wise: each lane then dequantizes 8
// consecutive weights (one 4-byte word of codes, 8 lanes per 32-byte row segment), adds, rounds
// and writes 16 bytes (8 lanes write a row's 128 contiguous bytes).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_float.cuh"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStrip = 64;          // columns per CTA: 8 n-tiles of 8
constexpr int kRowsPerCta = 256;    // 16 tiles of 16 rows, 4 per warp
constexpr int kTileStride = kStrip + 8;  // padded fp32 row of the staged tile (bank spread)

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x = hi + lo (bf16 each, hi the nearest bf16 to x): the pair packed as two 32-bit words of two
// elements (the lower k index in the low half), for the fragments.
struct Split2 {
  uint32_t hi, lo;
};
__device__ __forceinline__ Split2 split_pair(float x0, float x1) {
  const __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
  const __nv_bfloat16 l0 = __float2bfloat16_rn(__fsub_rn(x0, __bfloat162float(h0)));
  const __nv_bfloat16 l1 = __float2bfloat16_rn(__fsub_rn(x1, __bfloat162float(h1)));
  Split2 s;
  s.hi = uint32_t(__bfloat16_as_ushort(h0)) | (uint32_t(__bfloat16_as_ushort(h1)) << 16);
  s.lo = uint32_t(__bfloat16_as_ushort(l0)) | (uint32_t(__bfloat16_as_ushort(l1)) << 16);
  return s;
}

template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads) lora_merge_4bit_mma(LoraMerge4bitParams p) {
  __shared__ __align__(16) float s_tile[kWarps][16][kTileStride];  // float4 reads
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t col0 = int64_t(blockIdx.x) * kStrip;
  const int64_t row_cta = int64_t(blockIdx.y) * kRowsPerCta;

  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }

  // A's fragments (the mma's B operand, K = j x N = column): b0 holds k = 2t, 2t + 1 and b1
  // k = 2t + 8, 2t + 9, both at column n = g of the n-tile
  uint32_t a_hi[8][2], a_lo[8][2];
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const int64_t c = col0 + 8 * n + g;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * t + 8 * h;
      const float x0 = j < p.r ? p.a[int64_t(j) * p.k + c] : 0.0f;
      const float x1 = j + 1 < p.r ? p.a[int64_t(j + 1) * p.k + c] : 0.0f;
      const Split2 s = split_pair(x0, x1);
      a_hi[n][h] = s.hi;
      a_lo[n][h] = s.lo;
    }
  }
  __syncthreads();  // the tables

  const int block_shift = 31 - __clz(p.blocksize);
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;
  const float offset = NESTED ? *p.offset : 0.0f;
  T* out = static_cast<T*>(p.out);
  float (*tile)[kTileStride] = s_tile[warp];

#pragma unroll 1
  for (int tile_i = warp; tile_i < kRowsPerCta / 16; tile_i += kWarps) {
    const int64_t r0 = row_cta + 16 * tile_i;
    if (r0 >= p.n) break;
    // (s v_o) B[o, :] fragments (the mma's A operand, M = row x K = j): a0 (row g, k 2t..),
    // a1 (row g + 8, k 2t..), a2 (row g, k 2t + 8..), a3 (row g + 8, k 2t + 8..)
    uint32_t b_hi[4], b_lo[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t o = r0 + g + 8 * (q & 1);
      const int j = 2 * t + 8 * (q >> 1);
      float x0 = 0.0f, x1 = 0.0f;
      if (o < p.n) {
        const float sv = p.row_scale != nullptr ? __fmul_rn(p.scaling, p.row_scale[o]) : p.scaling;
        if (j < p.r) x0 = __fmul_rn(sv, p.b[o * p.r + j]);
        if (j + 1 < p.r) x1 = __fmul_rn(sv, p.b[o * p.r + j + 1]);
      }
      const Split2 s = split_pair(x0, x1);
      b_hi[q] = s.hi;
      b_lo[q] = s.lo;
    }
    __syncwarp();  // the previous tile's reads of s_tile are done
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_bf16_16816(d, b_lo, a_hi[n][0], a_hi[n][1]);  // small terms first
      mma_bf16_16816(d, b_hi, a_lo[n][0], a_lo[n][1]);
      mma_bf16_16816(d, b_hi, a_hi[n][0], a_hi[n][1]);
      *reinterpret_cast<float2*>(&tile[g][8 * n + 2 * t]) = make_float2(d[0], d[1]);
      *reinterpret_cast<float2*>(&tile[g + 8][8 * n + 2 * t]) = make_float2(d[2], d[3]);
    }
    __syncwarp();
    // epilogue: lane (row 4 step + lane / 8, columns 8 (lane % 8) ..) dequantizes 8 weights
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const int row = 4 * step + (lane >> 3);
      const int64_t o = r0 + row;
      if (o < p.n) {
        const int cc = 8 * (lane & 7);
        const int64_t flat = o * p.k + col0 + cc;  // a multiple of 8: one block, one code word
        const uint32_t codes = *reinterpret_cast<const uint32_t*>(p.packed + flat / 2);
        const int64_t block = flat >> block_shift;
        float absmax;
        if constexpr (NESTED) {
          absmax = __fadd_rn(__fmul_rn(s_qmap[p.absmax_codes[block]], p.nested_absmax[block >> nested_shift]), offset);
        } else {
          absmax = p.absmax[block];
        }
        const float scale = p.row_scale != nullptr ? __fmul_rn(absmax, p.row_scale[o]) : absmax;
        const float4 lr0 = *reinterpret_cast<const float4*>(&tile[row][cc]);
        const float4 lr1 = *reinterpret_cast<const float4*>(&tile[row][cc + 4]);
        const float low_rank[8] = {lr0.x, lr0.y, lr0.z, lr0.w, lr1.x, lr1.y, lr1.z, lr1.w};
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          // element e: byte e / 2 of the word (bytes in address order), the first in the high nibble
          const uint32_t byte = (codes >> (8 * (e >> 1))) & 0xffu;
          const uint32_t code = (e & 1) ? (byte & 15u) : (byte >> 4);
          v[e] = __fadd_rn(__fmul_rn(s_values[code], scale), low_rank[e]);
        }
        *reinterpret_cast<uint4*>(out + flat) =
            make_uint4(Pack2<T>::pack(v[0], v[1]), Pack2<T>::pack(v[2], v[3]), Pack2<T>::pack(v[4], v[5]),
                       Pack2<T>::pack(v[6], v[7]));
      }
    }
  }
}

}  // namespace

bool lora_merge_4bit_mma_takes(const LoraMerge4bitParams& p) {
  return p.out_kind != FloatKind::kFloat32 && p.r <= 16 && p.k % kStrip == 0 &&
         reinterpret_cast<uintptr_t>(p.packed) % 4 == 0;  // one 4-byte code word per lane
}

void launch_lora_merge_4bit_mma(const LoraMerge4bitParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.k / kStrip), unsigned((p.n + kRowsPerCta - 1) / kRowsPerCta));
  const bool nested = p.absmax == nullptr;
  if (p.out_kind == FloatKind::kBFloat16) {
    if (nested) lora_merge_4bit_mma<__nv_bfloat16, true><<<grid, kThreads, 0, stream>>>(p);
    else lora_merge_4bit_mma<__nv_bfloat16, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    if (nested) lora_merge_4bit_mma<__half, true><<<grid, kThreads, 0, stream>>>(p);
    else lora_merge_4bit_mma<__half, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

}  // namespace lowrank::lora
