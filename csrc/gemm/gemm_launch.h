// Parameter struct and launcher of the fused 4-bit matmul kernels: the whole interface between
// the torch-facing C++ (gemm_cuda.cpp) and the .cu files, which include no torch header.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "quant/quant_launch.h"  // FloatKind

namespace lowrank::gemm {

using quant::FloatKind;

// y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] 4-bit in bitsandbytes' layout (row n is the
// packed bytes [n K/2, (n+1) K/2), codes of element pairs high nibble first).
struct Gemm4bitParams : quant::Packed4bitWeight {  // packed 8-byte aligned; blocksize >= kSkinnyChunk divides K
  const void* x;        // [M, K] row-major, 16-byte aligned; fp16 or bf16 (kind)
  FloatKind kind;       // of x, bias and out
  int64_t m;
  const void* bias;     // [N] in kind, or nullptr
  void* out;            // [M, N] in kind
  bool generic_lookup;  // the skinny kernel's table lookups through generic addresses (A/B; default off)
};

// The skinny kernel: weights dequantized in registers straight into tensor-core fragments
// (mma.sync m16n8k16, fp32 accumulation), x rows as the 8-wide N side of the mma. One fragment
// column block of 8 x rows per TILES_M, so M <= 16 costs at most two mma per weight fragment.
constexpr int kSkinnyMaxM = 16;
// k per mma chunk: 4 mma k-steps of 16 that share one absmax per weight row, hence the
// requirement blocksize >= 64 and K % blocksize == 0 (a block never straddles a row or a chunk).
constexpr int kSkinnyChunk = 64;

void launch_gemm_4bit_skinny(const Gemm4bitParams& p, cudaStream_t stream);

// The wgmma kernel (sm_90a): the dequantized weight as wgmma's register A operand, x tiles brought
// by TMA as its shared-memory B operand (gemm_4bit_wgmma.cu). Takes fp16/bf16 x with K % 64 == 0
// (one 128-byte swizzle row per k step), blocksize >= 64, N % 8 == 0 (16-byte stores of y), x
// and the packed codes 16-byte aligned (TMA). Returns nullptr, or why it could not launch.
constexpr int kWgmmaTileK = 64;
constexpr int kWgmmaRowsPerCta = 128;
// Tokens per CTA by M (the wgmma's N): 64, 128, or 256.
constexpr int64_t wgmma_token_tile(int64_t m) { return m <= 64 ? 64 : (m <= 128 ? 128 : 256); }
constexpr int64_t wgmma_ctas(int64_t m, int64_t n) {
  return ((n + kWgmmaRowsPerCta - 1) / kWgmmaRowsPerCta) * ((m + wgmma_token_tile(m) - 1) / wgmma_token_tile(m));
}
// The dispatch rule's bounds (docs/design.md): above this M cuBLAS on a dequantized weight is
// faster (28672 x 8192: M = 8192 6.50 ms against 5.56 ms), and a grid of fewer CTAs than half the
// SMs leaves too much of the GPU idle (4096 x 14336, M = 128: 32 CTAs, 117 us against 112 us).
constexpr int64_t kWgmmaMaxAutoM = 2048;
const char* launch_gemm_4bit_wgmma(const Gemm4bitParams& p, cudaStream_t stream);

}  // namespace lowrank::gemm
