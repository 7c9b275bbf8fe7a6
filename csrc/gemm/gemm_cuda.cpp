// lowrank::matmul_4bit on CUDA: the dispatch rule between the fused skinny kernel (M <= 16), the
// fused wgmma GEMM (Hopper) and the dequantize-then-cuBLAS path (docs/design.md, "Dispatch rule").
#include <ATen/ATen.h>
#include <cstdlib>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gemm/gemm_checks.h"
#include "gemm/gemm_launch.h"
#include "gemm/weight_params.h"

namespace lowrank::gemm {
namespace {

// Why the skinny kernel cannot take this call, or nullptr when it can.
const char* skinny_refusal(const at::Tensor& x, const Weight4bit& w, int64_t m) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return "it takes float16 or bfloat16 x (float32 x goes through dequantize + matmul)";
  if (m > kSkinnyMaxM) return "it takes at most 16 rows of x";
  if (w.blocksize < kSkinnyChunk) return "it needs blocksize >= 64";
  if (w.in_features % w.blocksize != 0) return "it needs in_features to be a multiple of blocksize";
  if (w.out_features * w.in_features / 2 >= (int64_t(1) << 31))
    return "it indexes the packed weight with 32-bit offsets (fewer than 2^31 packed bytes)";
  if (reinterpret_cast<uintptr_t>(w.packed.const_data_ptr()) % 8 != 0)
    return "it needs the packed weight 8-byte aligned";
  return nullptr;
}

// Compute capability major and SM count of a device, read once (the dispatch runs at every call).
struct DeviceFacts {
  int major = 0;
  int sms = 0;
  int reserved_smem = 0;  // shared memory per block the system reserves (where a CTA's window starts)
};
const DeviceFacts& device_facts(int index) {
  static DeviceFacts cached[64];
  TORCH_CHECK(index >= 0 && index < 64, "lowrank::matmul_4bit: CUDA device index out of range");
  DeviceFacts& f = cached[index];
  if (f.sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.reserved_smem, cudaDevAttrReservedSharedMemoryPerBlock, index));
  }
  return f;
}
bool is_hopper(const at::Device& device) { return device_facts(device.index()).major == 9; }

// Why the wgmma kernel cannot take this call, or nullptr when it can.
const char* wgmma_refusal(const at::Tensor& x, const Weight4bit& w) {
  if (!is_hopper(x.device())) return "it runs on compute capability 9.0 (Hopper) only";
  if (device_facts(x.device().index()).reserved_smem != kWgmmaReservedSmem)
    return "it addresses its lookup table at the shared-window offset of 1 KB reserved per block, and this "
           "device reserves another amount";
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return "it takes float16 or bfloat16 x (float32 x goes through dequantize + matmul)";
  if (w.in_features % kWgmmaTileK != 0) return "it needs in_features to be a multiple of 64";
  if (w.blocksize < kWgmmaTileK) return "it needs blocksize >= 64";
  if (w.out_features % 8 != 0) return "it needs out_features to be a multiple of 8 (16-byte stores of y)";
  if (w.in_features >= (int64_t(1) << 31) || w.out_features >= (int64_t(1) << 31))
    return "it takes weight dimensions below 2^31";
  if (reinterpret_cast<uintptr_t>(w.packed.const_data_ptr()) % 16 != 0)
    return "it needs the packed weight 16-byte aligned (TMA)";
  return nullptr;
}

at::Tensor matmul_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset,
                            const at::Tensor& values, int64_t blocksize, int64_t nested_blocksize,
                            int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias,
                            c10::string_view path) {
  const Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                     out_features, in_features};
  check_matmul_4bit(x, w, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  MatmulPath chosen = parse_path(std::string(path));
  const int64_t m = x.numel() / in_features;
  const char* skinny_no = skinny_refusal(x, w, m);
  TORCH_CHECK(chosen != MatmulPath::kSkinny || skinny_no == nullptr,
              "lowrank::matmul_4bit: path 'skinny' cannot take this call: ", skinny_no);
  const char* wgmma_no = chosen != MatmulPath::kSkinny && chosen != MatmulPath::kDequantize ? wgmma_refusal(x, w)
                                                                                            : "not asked for";
  TORCH_CHECK(chosen != MatmulPath::kWgmma || wgmma_no == nullptr,
              "lowrank::matmul_4bit: path 'wgmma' cannot take this call: ", wgmma_no);
  Gemm4bitParams p{};
  p.kind = x.scalar_type() == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat16;
  p.m = m;
  set_packed_weight(p, w);
  p.sms = device_facts(x.device().index()).sms;
  p.cc_major = device_facts(x.device().index()).major;
  WgmmaPlan plan;
  if (wgmma_no == nullptr && m > 0) {
    plan = plan_gemm_4bit_wgmma(p);
    TORCH_CHECK(plan.error == nullptr, "lowrank::matmul_4bit: ", plan.error);
  }
  if (chosen == MatmulPath::kAuto) {
    // The rule (docs/design.md): skinny for M <= 16; the wgmma GEMM for 16 < M <= 2048 when its
    // grid (cut by k when there are fewer tiles than SMs) fills at least half the SMs; otherwise
    // dequantize + cuBLAS.
    if (skinny_no == nullptr)
      chosen = MatmulPath::kSkinny;
    else if (wgmma_no == nullptr && m <= wgmma_max_auto_m(out_features, in_features) && 2 * plan.ctas >= p.sms)
      chosen = MatmulPath::kWgmma;
    else
      chosen = MatmulPath::kDequantize;
  }
  if (chosen == MatmulPath::kDequantize || m == 0) return matmul_4bit_dequantize(x, w, bias);

  // x as a contiguous [M, K] whose rows start 16-byte aligned (a copy only for an odd view).
  at::Tensor x2 = x.reshape({m, in_features}).contiguous();
  if (reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 != 0) x2 = x2.clone();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor out = at::empty(out_shape, x.options());
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();

  p.x = x2.const_data_ptr();
  p.bias = bias_c.has_value() ? bias_c->const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  if (chosen == MatmulPath::kSkinny) {
    launch_gemm_4bit_skinny(p, c10::cuda::getCurrentCUDAStream());
  } else {
    // a stream-K grid's partial sums and flags: from the caching allocator, per call
    at::Tensor workspace;
    if (plan.workspace_bytes > 0) workspace = at::empty({plan.workspace_bytes}, x.options().dtype(at::kByte));
    const char* error = launch_gemm_4bit_wgmma(
        p, plan, plan.workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == nullptr, "lowrank::matmul_4bit: the wgmma kernel could not launch: ", error);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Why the backward's skinny kernel cannot take this call, or nullptr when it can.
const char* skinny_grad_refusal(const at::Tensor& dy, const Weight4bit& w, int64_t m) {
  if (dy.scalar_type() != at::kBFloat16)
    return "it takes bfloat16 dy (dy * absmax is split into two bfloat16 halves; float16's range could not hold it)";
  if (m > kSkinnyMaxM) return "it takes at most 16 rows of dy";
  if (w.blocksize < kSkinnyChunk) return "it needs blocksize >= 64";
  if (w.in_features % w.blocksize != 0) return "it needs in_features to be a multiple of blocksize";
  if (w.out_features * w.in_features / 2 >= (int64_t(1) << 31))
    return "it indexes the packed weight with 32-bit offsets (fewer than 2^31 packed bytes)";
  if (reinterpret_cast<uintptr_t>(w.packed.const_data_ptr()) % 16 != 0)
    return "it needs the packed weight 16-byte aligned (16-byte copies)";
  return nullptr;
}

// Why the backward's wgmma kernel cannot take this call, or nullptr when it can.
const char* grad_wgmma_refusal(const at::Tensor& dy, const Weight4bit& w) {
  if (!is_hopper(dy.device())) return "it runs on compute capability 9.0 (Hopper) only";
  if (dy.scalar_type() != at::kHalf && dy.scalar_type() != at::kBFloat16)
    return "it takes float16 or bfloat16 dy (float32 dy goes through dequantize + matmul)";
  if (w.in_features % kWgmmaTileK != 0) return "it needs in_features to be a multiple of 64";
  if (w.blocksize < kWgmmaTileK) return "it needs blocksize >= 64";
  if (w.out_features % 8 != 0) return "it needs out_features to be a multiple of 8 (dy's rows are copied by TMA)";
  if (w.in_features >= (int64_t(1) << 31) || w.out_features >= (int64_t(1) << 31))
    return "it takes weight dimensions below 2^31";
  if (reinterpret_cast<uintptr_t>(w.packed.const_data_ptr()) % 16 != 0)
    return "it needs the packed weight 16-byte aligned";
  return nullptr;
}

at::Tensor matmul_4bit_grad_x_cuda(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_qmap,
                                   const std::optional<at::Tensor>& offset, const at::Tensor& values,
                                   int64_t blocksize, int64_t nested_blocksize, int64_t out_features,
                                   int64_t in_features, c10::string_view path) {
  const Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                     out_features, in_features};
  MatmulPath chosen = parse_path(std::string(path), "lowrank::matmul_4bit_grad_x");
  check_matmul_4bit_grad_x(dy, w);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t m = dy.numel() / out_features;
  const char* skinny_no = skinny_grad_refusal(dy, w, m);
  TORCH_CHECK(chosen != MatmulPath::kSkinny || skinny_no == nullptr,
              "lowrank::matmul_4bit_grad_x: path 'skinny' cannot take this call: ", skinny_no);
  const char* wgmma_no = grad_wgmma_refusal(dy, w);
  TORCH_CHECK(chosen != MatmulPath::kWgmma || wgmma_no == nullptr,
              "lowrank::matmul_4bit_grad_x: path 'wgmma' cannot take this call: ", wgmma_no);
  if (chosen == MatmulPath::kAuto) {
    // The rule (docs/design.md): the skinny kernel for bf16 dY of at most 16 rows; the wgmma kernel
    // for M up to kGradWgmmaMaxAutoM; otherwise dequantize + cuBLAS.
    if (skinny_no == nullptr)
      chosen = MatmulPath::kSkinny;
    else if (wgmma_no == nullptr && m <= kGradWgmmaMaxAutoM)
      chosen = MatmulPath::kWgmma;
    else
      chosen = MatmulPath::kDequantize;
  }
  if (chosen == MatmulPath::kDequantize || m == 0) return matmul_4bit_grad_x_dequantize(dy, w);
  if (chosen == MatmulPath::kWgmma) {
    // dY as a contiguous [M, N] whose rows start 16-byte aligned (a copy only for an odd view)
    at::Tensor dy2 = dy.reshape({m, out_features}).contiguous();
    if (reinterpret_cast<uintptr_t>(dy2.const_data_ptr()) % 16 != 0) dy2 = dy2.clone();
    std::vector<int64_t> out_shape(dy.sizes().begin(), dy.sizes().end());
    out_shape.back() = in_features;
    at::Tensor out = at::empty(out_shape, dy.options());
    const GradWgmmaPlan plan =
        plan_gemm_4bit_grad_x_wgmma(m, out_features, in_features, device_facts(dy.device().index()).sms);
    at::Tensor workspace;  // the ranges' partial sums, from the caching allocator, per call
    if (plan.workspace_bytes > 0) workspace = at::empty({plan.workspace_bytes / 4}, dy.options().dtype(at::kFloat));
    Gemm4bitGradParams p{};
    set_packed_weight(p, w);
    p.dy = dy2.const_data_ptr();
    p.kind = dy.scalar_type() == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat16;
    p.m = m;
    p.out = out.mutable_data_ptr();
    p.partial = plan.workspace_bytes > 0 ? workspace.mutable_data_ptr<float>() : nullptr;
    const char* error = launch_gemm_4bit_grad_x_wgmma(p, plan, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == nullptr, "lowrank::matmul_4bit_grad_x: the wgmma kernel could not launch: ", error);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  const at::Tensor dy2 = dy.reshape({m, out_features}).contiguous();
  std::vector<int64_t> out_shape(dy.sizes().begin(), dy.sizes().end());
  out_shape.back() = in_features;
  at::Tensor out = at::empty(out_shape, dy.options());
  const int sms = device_facts(dy.device().index()).sms;
  const SkinnyGradPlan plan = plan_gemm_4bit_skinny_grad_x(m, out_features, in_features, sms);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) workspace = at::empty({plan.workspace_bytes / 4}, dy.options().dtype(at::kFloat));
  Gemm4bitGradParams p{};
  set_packed_weight(p, w);
  p.dy = dy2.const_data_ptr();
  p.kind = FloatKind::kBFloat16;
  p.m = m;
  p.out = out.mutable_data_ptr();
  p.partial = plan.workspace_bytes > 0 ? workspace.mutable_data_ptr<float>() : nullptr;
  p.rows_per_split = int(plan.rows_per_split);
  const char* generic = std::getenv("LOWRANK_SKINNY_GENERIC_LOOKUP");
  p.generic_lookup = generic != nullptr && generic[0] == '1';
  launch_gemm_4bit_skinny_grad_x(p, plan, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace lowrank::gemm

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("matmul_4bit", &lowrank::gemm::matmul_4bit_cuda);
  m.impl("matmul_4bit_grad_x", &lowrank::gemm::matmul_4bit_grad_x_cuda);
}
