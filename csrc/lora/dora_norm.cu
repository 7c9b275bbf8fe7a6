// DoRA's row norm n = ||W0 + s B A|| from the expansion (lowrank/dora.py gives the math and the
// error model), every per-row step in one launch: one thread per output row, float64,
//   cross = sum_k B_ok P_ok,  delta2 = max(B_o G B_o^T, 0)  (G = A A^T, [r, r] in shared memory),
//   n2 = w2 + 2 s cross + s^2 delta2,  t = |s| sum_k |B_ok| sqrt(G_kk),  w = sqrt(w2),
//   bound = 2 U w t + U64 (w + t)^2,   flagged = bound > 2 rtol n2,  n = float(sqrt(max(n2, 0))).
// Why a kernel: as PyTorch ops these were ~30 launches per DoRA layer call, and the H100 QDoRA
// layer step was host-bound (4.07 ms against 3.40 ms of kernels; torch.profiler showed the GPU idle
// before the norm's launches). The work itself is tiny (r^2 + 4 r float64 FMA per row).
#include <cuda_runtime.h>

#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) dora_norm(DoraNormParams p) {
  extern __shared__ double s_gram[];  // [r, r], then sqrt of its diagonal [r]
  const int r = p.r;
  for (int i = threadIdx.x; i < r * r; i += kThreads) s_gram[i] = p.gram[i];
  __syncthreads();
  double* s_anorm = s_gram + r * r;
  for (int i = threadIdx.x; i < r; i += kThreads) s_anorm[i] = sqrt(s_gram[i * r + i]);
  __syncthreads();
  const int64_t o = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= p.n) return;
  const float* b = p.b + o * r;
  const float* pr = p.p + o * r;
  double cross = 0.0, delta2 = 0.0, t = 0.0;
  for (int j = 0; j < r; ++j) {
    const double bj = b[j];
    cross = fma(bj, double(pr[j]), cross);
    double gb = 0.0;  // (B_o G)_j = sum_k B_ok G_kj
    for (int k = 0; k < r; ++k) gb = fma(double(b[k]), s_gram[k * r + j], gb);
    delta2 = fma(gb, bj, delta2);
    t = fma(fabs(bj), s_anorm[j], t);
  }
  delta2 = fmax(delta2, 0.0);
  const double s = p.scaling;
  const double w2 = p.w2[o];
  const double n2 = w2 + 2.0 * s * cross + s * s * delta2;
  t *= fabs(s);
  const double w = sqrt(w2);
  const double bound = 2.0 * p.unit_cross * w * t + p.unit_fp64 * (w + t) * (w + t);
  p.flagged[o] = bound > 2.0 * p.rtol * n2;
  p.norm[o] = float(sqrt(fmax(n2, 0.0)));
}

}  // namespace

void launch_dora_norm(const DoraNormParams& p, cudaStream_t stream) {
  const unsigned blocks = unsigned((p.n + kThreads - 1) / kThreads);
  const size_t smem = sizeof(double) * size_t(p.r) * size_t(p.r + 1);
  dora_norm<<<blocks, kThreads, smem, stream>>>(p);
}

}  // namespace lowrank::lora
