// b (float32 [K, n], any strides) -> [hi | mid | lo] (bf16 [K, 3n], row-major) with hi + mid + lo
// == b exactly: the float32 side of the adapter products as three bf16 operands of one tensor-core
// GEMM (lowrank/lora_function.py _mm_f32). One launch: as six PyTorch ops per product, the
// split's launches made a 4096 x 4096 LoRA layer step host-bound on the H100 (2.2 ms vs 1.3 ms).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

__global__ void split_bf16x3(SplitParams p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.cols, col = i % p.cols;
    const float b = p.b[row * p.row_stride + col * p.col_stride];
    const __nv_bfloat16 hi = __float2bfloat16_rn(b);
    const float rest = __fsub_rn(b, __bfloat162float(hi));  // exact: b and hi agree in their top bits
    const __nv_bfloat16 mid = __float2bfloat16_rn(rest);
    const __nv_bfloat16 lo = __float2bfloat16_rn(__fsub_rn(rest, __bfloat162float(mid)));  // exact in bf16
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + row * 3 * p.cols + col;
    out[0] = hi;
    out[p.cols] = mid;
    out[2 * p.cols] = lo;
  }
}

// One thread per output element, in the output's order (its writes coalesced; a transposed
// output's reads stride by 3 cols floats, from L2: the parts are 1.5 MB at M = 8192, r = 16).
// Replaces .view(M, 3, n).sum(1) (5.2 us on the H100 at M = 8192, n = 16: a reduction kernel for
// a 3-term sum) and for dA the * s and the copy of the transpose that followed (1.3 + 2.0 us).
__global__ void split_bf16x3_sum(SplitSumParams p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = p.transpose ? i % p.rows : i / p.cols, col = p.transpose ? i / p.rows : i % p.cols;
    const float* part = p.parts + row * 3 * p.cols + col;
    p.out[i] = __fmul_rn(__fadd_rn(__fadd_rn(part[0], part[p.cols]), part[2 * p.cols]), p.scale);
  }
}

}  // namespace

void launch_split_bf16x3_sum(const SplitSumParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.cols;
  const int64_t blocks = (total + 255) / 256;
  split_bf16x3_sum<<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(p);
}

void launch_split_bf16x3(const SplitParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.cols;
  const int64_t blocks = (total + 255) / 256;
  split_bf16x3<<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(p);
}

}  // namespace lowrank::lora
