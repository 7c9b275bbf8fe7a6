// The merged LoRA weight straight from the packed 4-bit base, in one pass:
//   W'[o, i] = round_T( w0[o, i] * v_o + sum_j (s v_o B[o, j]) A[j, i] )
// (v = DoRA's row scale m / n, or 1). With it the layer's two big GEMMs are bare cuBLAS GEMMs,
// y = x W'^T and dX = dY W', instead of a GEMM that adds into a low-rank term written first
// (lowrank/lora_function.py): on the H100 at M = 8192, 14336 x 4096 that first write of y
// (s h B^T, 235 MB) took 87 us and reading it back as the GEMM's C operand ~50 us more, against
// the ~16 FMA per weight this kernel adds to the dequantization it replaces.
//
// Arithmetic (lora_cpu.cpp does the same operations in the same order, so the backends agree bit
// for bit): the block's float absmax as dequantize_4bit rebuilds it; scale = absmax * v_o and
// w0 = value * scale, each rounded once (the row scale in the absmax, as lora_function's
// _dequantized); bs_j = (s * v_o) * B[o, j]; acc = fma chain over j = 0 .. r-1 from +0; the result
// w0 + acc rounded once to float32, then to T.
//
// Work split: a thread owns COLS consecutive columns of the weight and keeps A[:, those columns]
// in registers (R_PAD * COLS <= 64 floats), so the inner loop is register FMAs with one broadcast
// shared load of bs (all lanes of a warp work on the same row) per 4 FMA columns. A warp covers
// 32 * COLS contiguous columns (loads of 2 codes bytes per lane: 64 contiguous bytes; stores of
// 4 x 16 bits: 256 contiguous bytes); a CTA's 8 warps take 256 rows of one column strip, 32 rows
// each, their code loads issued kBatch rows ahead. A is read from L2 once per CTA (8 KB at r =
// 16), ~29 MB in all at 14336 x 4096: small next to the 117 MB the kernel writes.
#include <cuda_runtime.h>

#include <cstdlib>

#include "common/cuda_float.cuh"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 32;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kBatch = 4;  // rows per batch; two batches' loads are in flight (double buffering)

template <typename T, int COLS> struct OutVec;
template <> struct OutVec<float, 4> {
  static __device__ __forceinline__ void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <> struct OutVec<float, 2> {
  static __device__ __forceinline__ void store(float* p, const float (&v)[2]) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  }
};
template <typename T> struct OutVec<T, 4> {
  static __device__ __forceinline__ void store(T* p, const float (&v)[4]) {
    *reinterpret_cast<uint2*>(p) = make_uint2(Pack2<T>::pack(v[0], v[1]), Pack2<T>::pack(v[2], v[3]));
  }
};
template <typename T> struct OutVec<T, 2> {
  static __device__ __forceinline__ void store(T* p, const float (&v)[2]) {
    *reinterpret_cast<uint32_t*>(p) = Pack2<T>::pack(v[0], v[1]);
  }
};

template <int COLS> __device__ __forceinline__ uint32_t load_codes(const uint8_t* p);
template <> __device__ __forceinline__ uint32_t load_codes<4>(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
template <> __device__ __forceinline__ uint32_t load_codes<2>(const uint8_t* p) { return *p; }

template <int COLS> __device__ __forceinline__ void load_a(const float* p, float (&v)[COLS]);
template <> __device__ __forceinline__ void load_a<4>(const float* p, float (&v)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
template <> __device__ __forceinline__ void load_a<2>(const float* p, float (&v)[2]) {
  const float2 a = *reinterpret_cast<const float2*>(p);
  v[0] = a.x; v[1] = a.y;
}

// The global loads of kBatch rows: codes, and the absmax or its 8-bit code and scale.
template <int COLS, bool NESTED>
struct RowBatch {
  uint32_t codes[kBatch];
  float absmax_or_scale[kBatch];
  uint32_t absmax_code[kBatch];
  __device__ __forceinline__ void load(const LoraMerge4bitParams& p, int64_t first_row, int64_t col,
                                       int block_shift, int nested_shift) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t o = first_row + u;
      const bool ok = o < p.n;
      const int64_t flat = (ok ? o : 0) * p.k + col;  // a multiple of COLS: one block holds the COLS
      const int64_t block = flat >> block_shift;
      codes[u] = ok ? load_codes<COLS>(p.packed + flat / 2) : 0u;
      if constexpr (NESTED) {
        absmax_code[u] = p.absmax_codes[block];
        absmax_or_scale[u] = p.nested_absmax[block >> nested_shift];
      } else {
        absmax_code[u] = 0u;
        absmax_or_scale[u] = p.absmax[block];
      }
    }
  }
};

// 2 CTAs of 256 threads per SM: at most 128 registers (A takes 64 of them).
template <int R_PAD, int COLS, typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads, 2) lora_merge_4bit(LoraMerge4bitParams p) {
  static_assert(R_PAD % 4 == 0 && R_PAD * COLS <= 64, "A's registers");
  __shared__ float4 s_bs[kRowsPerCta][R_PAD / 4];  // (s v_o) B[o, :], zero past r
  __shared__ float s_v[kRowsPerCta];
  __shared__ float s_values[16];
  __shared__ float s_qmap[NESTED ? 256 : 1];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = int64_t(blockIdx.y) * kRowsPerCta;
  const int64_t warp_row0 = row0 + warp * kRowsPerWarp;
  const int64_t col = (int64_t(blockIdx.x) * 32 + lane) * COLS;
  const bool col_ok = col < p.k;  // k % 4 == 0: a thread's columns are all in or all out
  const int block_shift = 31 - __clz(p.blocksize);
  const int nested_shift = NESTED ? 31 - __clz(p.nested_blocksize) : 0;

  // the first batch's loads go out before the set-up below, whose loads and barrier they overlap
  RowBatch<COLS, NESTED> cur;
  if (col_ok) cur.load(p, warp_row0, col, block_shift, nested_shift);
  float a[R_PAD][COLS];
#pragma unroll
  for (int j = 0; j < R_PAD; ++j) {
    if (col_ok && j < p.r) {
      load_a<COLS>(p.a + int64_t(j) * p.k + col, a[j]);
    } else {
#pragma unroll
      for (int c = 0; c < COLS; ++c) a[j][c] = 0.0f;
    }
  }
  if (threadIdx.x < 16) s_values[threadIdx.x] = p.values[threadIdx.x];
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_qmap[i] = p.nested_qmap[i];
  }
  static_assert(kRowsPerCta == kThreads, "one row's v per thread");
  {
    const int64_t o = row0 + threadIdx.x;
    s_v[threadIdx.x] = (p.row_scale != nullptr && o < p.n) ? p.row_scale[o] : 1.0f;
  }
  // (s v_o) B[o, j]: a fixed count per thread, unrolled, so every load is in flight at once (a loop
  // with one load per trip paid the L2 latency 16 times per CTA: the first version's 143 us)
  constexpr int kFill = kRowsPerCta * R_PAD / kThreads;
  float bs_fill[kFill];
#pragma unroll
  for (int it = 0; it < kFill; ++it) {
    const int i = it * kThreads + threadIdx.x;
    const int row = i / R_PAD, j = i % R_PAD;
    const int64_t o = row0 + row;
    const bool ok = o < p.n && j < p.r;
    const float b = ok ? p.b[o * p.r + j] : 0.0f;
    const float v = (ok && p.row_scale != nullptr) ? p.row_scale[o] : 1.0f;
    const float sv = p.row_scale != nullptr ? __fmul_rn(p.scaling, v) : p.scaling;
    bs_fill[it] = ok ? __fmul_rn(sv, b) : 0.0f;
  }
  float* s_bs_flat = reinterpret_cast<float*>(s_bs);
#pragma unroll
  for (int it = 0; it < kFill; ++it) s_bs_flat[it * kThreads + threadIdx.x] = bs_fill[it];
  __syncthreads();
  if (!col_ok) return;  // no barrier below

  const float offset = NESTED ? *p.offset : 0.0f;
  T* out = static_cast<T*>(p.out);

#pragma unroll 1
  for (int b0 = 0; b0 < kRowsPerWarp; b0 += kBatch) {
    // the next batch's loads in flight while this one computes (double buffering)
    RowBatch<COLS, NESTED> next;
    if (b0 + kBatch < kRowsPerWarp) next.load(p, warp_row0 + b0 + kBatch, col, block_shift, nested_shift);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int row = warp * kRowsPerWarp + b0 + u;
      const int64_t o = row0 + row;
      if (o < p.n) {  // the same for every lane of the warp
        // the block's float absmax as dequantize_4bit rebuilds it: a rounded product, a rounded sum
        const float absmax = NESTED ? __fadd_rn(__fmul_rn(s_qmap[cur.absmax_code[u]], cur.absmax_or_scale[u]), offset)
                                    : cur.absmax_or_scale[u];
        const float scale = p.row_scale != nullptr ? __fmul_rn(absmax, s_v[row]) : absmax;
        float acc[COLS];
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[c] = 0.0f;
#pragma unroll
        for (int j4 = 0; j4 < R_PAD / 4; ++j4) {
          const float4 bs = s_bs[row][j4];
          const float bsv[4] = {bs.x, bs.y, bs.z, bs.w};
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
            for (int c = 0; c < COLS; ++c) acc[c] = __fmaf_rn(bsv[jj], a[4 * j4 + jj][c], acc[c]);
          }
        }
        float result[COLS];
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          // element c of the thread's run: byte c / 2, the first element in the high nibble
          const uint32_t byte = (cur.codes[u] >> (8 * (c / 2))) & 0xffu;
          const uint32_t code = (c & 1) ? (byte & 15u) : (byte >> 4);
          result[c] = __fadd_rn(__fmul_rn(s_values[code], scale), acc[c]);
        }
        OutVec<T, COLS>::store(out + o * p.k + col, result);
      }
    }
    cur = next;
  }
}

template <int R_PAD, int COLS, typename T>
void launch_shaped(const LoraMerge4bitParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned((p.k + 32 * COLS - 1) / (32 * COLS)), unsigned((p.n + kRowsPerCta - 1) / kRowsPerCta));
  if (p.absmax == nullptr) lora_merge_4bit<R_PAD, COLS, T, true><<<grid, kThreads, 0, stream>>>(p);
  else lora_merge_4bit<R_PAD, COLS, T, false><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_typed(const LoraMerge4bitParams& p, cudaStream_t stream) {
  if (p.r <= 8) launch_shaped<8, 4, T>(p, stream);
  else if (p.r <= 16) launch_shaped<16, 4, T>(p, stream);
  else launch_shaped<32, 2, T>(p, stream);
}

}  // namespace

void launch_lora_merge_4bit(const LoraMerge4bitParams& p, cudaStream_t stream) {
  const char* env = std::getenv("LOWRANK_MERGE_MMA");  // read per launch: tests and benchmarks compare
  if ((env == nullptr || env[0] != '0') && p.out_kind != FloatKind::kFloat32 && lora_merge_4bit_mma_takes(p)) {
    launch_lora_merge_4bit_mma(p, stream);
    return;
  }
  switch (p.out_kind) {
    case FloatKind::kFloat32: launch_typed<float>(p, stream); break;
    case FloatKind::kFloat16: launch_typed<__half>(p, stream); break;
    case FloatKind::kBFloat16: launch_typed<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace lowrank::lora
