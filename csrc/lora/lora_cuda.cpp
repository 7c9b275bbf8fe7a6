// CUDA entries of the LoRA/DoRA ops: validate, pick the kernel or the PyTorch-op fallback, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lora/lora_checks.h"
#include "gemm/weight_params.h"
#include "lora/lora_launch.h"

namespace lowrank::lora {
namespace {

int multiprocessor_count(const at::Device& device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index());
  return count > 0 ? count : 132;
}

std::tuple<at::Tensor, at::Tensor> column_reduce_cuda(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                      const std::optional<at::Tensor>& y_in) {
  check_column_reduce(dy_in, h_in, y_in);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const int64_t m = dy_in.size(0), n = dy_in.size(1), r = h_in.size(1);
  const bool half = dy_in.scalar_type() == at::kHalf || dy_in.scalar_type() == at::kBFloat16;
  if (r == 0 && y_in.has_value() && half && n % 8 == 0 && m > 0) {  // DoRA's dot alone: the streaming kernel
    at::Tensor dy = dy_in.contiguous(), y = y_in->contiguous();
    if (reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(y.const_data_ptr()) % 16 == 0) {
      // Row splits: ~4 CTAs per SM (56 column blocks of 256 at N = 14336), each split >= 64 rows.
      const int64_t col_blocks = (n + 255) / 256;
      const int64_t want = 4 * int64_t(multiprocessor_count(dy.device()));
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((want + col_blocks - 1) / col_blocks, m / 64));
      at::Tensor dot_parts = at::empty({splits, n}, dy.options().dtype(at::kFloat));
      ColumnReduceParams p{};
      p.dy = dy.const_data_ptr();
      p.y = y.const_data_ptr();
      p.kind = dy.scalar_type() == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat16;
      p.m = m;
      p.n = n;
      p.r = 0;
      p.splits = int(splits);
      p.dot = dot_parts.mutable_data_ptr<float>();
      launch_column_reduce(p, c10::cuda::getCurrentCUDAStream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return {at::zeros({n, 0}, dy.options().dtype(at::kFloat)), dot_parts.sum(0)};
    }
  }
  // The kernel: 16-bit types, an even width, rank <= 32; anything else is rare: PyTorch ops.
  if (!half || n % 2 != 0 || r == 0 || r > kColumnReduceMaxRank || m == 0) return column_reduce_reference(dy_in, h_in, y_in);
  at::Tensor dy = dy_in.contiguous();
  std::optional<at::Tensor> y;
  if (y_in.has_value()) y = y_in->contiguous();
  // h rows padded to 16 bytes (vector loads); a copy of [M, r] at most.
  const bool h_float = h_in.scalar_type() == at::kFloat;
  const int64_t per_vec = h_float ? 4 : 8;
  const int64_t h_stride = (r + per_vec - 1) / per_vec * per_vec;
  at::Tensor h = h_in.contiguous();
  if (h_stride != r || reinterpret_cast<uintptr_t>(h.const_data_ptr()) % 16 != 0) {
    at::Tensor padded = at::zeros({m, h_stride}, h.options());
    padded.narrow(1, 0, r).copy_(h);
    h = padded;
  }
  if (reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % 4 != 0 ||
      (y.has_value() && reinterpret_cast<uintptr_t>(y->const_data_ptr()) % 4 != 0)) {
    return column_reduce_reference(dy_in, h_in, y_in);
  }
  // Row splits: enough CTAs for ~4 per SM, each split at least 64 rows.
  const int64_t col_blocks = (n + 63) / 64;
  const int64_t want = 4 * int64_t(multiprocessor_count(dy.device()));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((want + col_blocks - 1) / col_blocks, m / 64));
  at::Tensor dh_parts = at::empty({splits, n, r}, dy.options().dtype(at::kFloat));
  at::Tensor dot_parts = at::empty({y.has_value() ? splits : 0, n}, dy.options().dtype(at::kFloat));
  ColumnReduceParams p{};
  p.dy = dy.const_data_ptr();
  p.h = h.const_data_ptr();
  p.h_float = h_float;
  p.y = y.has_value() ? y->const_data_ptr() : nullptr;
  p.kind = dy.scalar_type() == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat16;
  p.m = m;
  p.n = n;
  p.r = int(r);
  p.h_stride = int(h_stride);
  p.splits = int(splits);
  p.dh = dh_parts.mutable_data_ptr<float>();
  p.dot = y.has_value() ? dot_parts.mutable_data_ptr<float>() : nullptr;
  launch_column_reduce(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dot = y.has_value() ? dot_parts.sum(0) : at::empty({0}, dy.options().dtype(at::kFloat));
  return {dh_parts.sum(0), dot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dy_products_cuda(const at::Tensor& dy_in, const at::Tensor& b_in,
                                                                 const at::Tensor& h_in,
                                                                 const std::optional<at::Tensor>& y_in,
                                                                 const std::optional<at::Tensor>& col_scale_in,
                                                                 double dh_scaling,
                                                                 const std::optional<at::Tensor>& dot_divisor_in) {
  check_dy_products(dy_in, b_in, h_in, y_in, col_scale_in, dot_divisor_in);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const int64_t m = dy_in.size(0), n = dy_in.size(1), r = b_in.size(1);
  const auto reference = [&] {
    return dy_products_reference(dy_in, b_in, h_in, y_in, col_scale_in, dh_scaling, dot_divisor_in);
  };
  // The kernel: bf16, N % 64 == 0 (whole warps of columns), 1 <= r <= 16, 16-byte aligned rows;
  // anything else: PyTorch ops.
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  if (dy_in.scalar_type() != at::kBFloat16 || n % 64 != 0 || r < 1 || r > kDyProductsMaxRank || m == 0) {
    return reference();
  }
  const at::Tensor dy = dy_in.contiguous(), b = b_in.contiguous(), h = h_in.contiguous();
  std::optional<at::Tensor> y;
  if (y_in.has_value()) y = y_in->contiguous();
  if (!aligned(dy) || (y.has_value() && !aligned(*y))) return reference();
  const bool with_dot = y.has_value();
  // Row chunks: enough CTAs to fill every SM's slots once (the column strips are fixed by N).
  const int64_t strips = (n + lora_dy_products_strip_cols(with_dot) - 1) / lora_dy_products_strip_cols(with_dot);
  static const int ctas_dot = lora_dy_products_ctas_per_sm(true), ctas_no_dot = lora_dy_products_ctas_per_sm(false);
  const int64_t slots = int64_t(multiprocessor_count(dy.device())) * (with_dot ? ctas_dot : ctas_no_dot);
  const int64_t want_chunks = std::max<int64_t>(1, slots / strips);
  const int64_t chunk_rows = ((m + want_chunks - 1) / want_chunks + 15) / 16 * 16;
  const int64_t row_chunks = (m + chunk_rows - 1) / chunk_rows;
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor g_part = at::empty({strips, m, r}, f32);
  at::Tensor dh_part = at::empty({row_chunks, n, r}, f32);
  at::Tensor dot_part = at::empty({with_dot ? row_chunks : 0, n}, f32);
  at::Tensor g = at::empty({m, r}, f32), dh = at::empty({n, r}, f32), dot = at::empty({with_dot ? n : 0}, f32);
  std::optional<at::Tensor> col_scale, dot_divisor;
  if (col_scale_in.has_value()) col_scale = col_scale_in->contiguous();
  if (dot_divisor_in.has_value()) dot_divisor = dot_divisor_in->contiguous();
  LoraDyProductsParams p{};
  p.dy = dy.const_data_ptr();
  p.y = with_dot ? y->const_data_ptr() : nullptr;
  p.b = b.const_data_ptr<float>();
  p.h = h.const_data_ptr<float>();
  p.col_scale = col_scale.has_value() ? col_scale->const_data_ptr<float>() : nullptr;
  p.dh_scaling = static_cast<float>(dh_scaling);
  p.dot_divisor = dot_divisor.has_value() ? dot_divisor->const_data_ptr<float>() : nullptr;
  p.m = m;
  p.n = n;
  p.r = int(r);
  p.row_chunks = int(row_chunks);
  p.chunk_rows = chunk_rows;
  p.g_part = g_part.mutable_data_ptr<float>();
  p.dh_part = dh_part.mutable_data_ptr<float>();
  p.dot_part = with_dot ? dot_part.mutable_data_ptr<float>() : nullptr;
  p.g = g.mutable_data_ptr<float>();
  p.dh = dh.mutable_data_ptr<float>();
  p.dot = with_dot ? dot.mutable_data_ptr<float>() : nullptr;
  const at::Tensor h_frag = at::empty({lora_dy_products_h_frag_bytes(m)}, dy.options().dtype(at::kByte));
  p.h_frag = static_cast<uint4*>(h_frag.mutable_data_ptr());  // the caching allocator's blocks: 512-byte aligned
  launch_lora_dy_products(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g, dh, dot};
}

at::Tensor split_bf16x3_cuda(const at::Tensor& b) {
  check_split_bf16x3(b);
  const c10::cuda::CUDAGuard guard(b.device());
  at::Tensor out = at::empty({b.size(0), 3 * b.size(1)}, b.options().dtype(at::kBFloat16));
  if (b.numel() == 0) return out;
  SplitParams p{};
  p.b = b.const_data_ptr<float>();
  p.rows = b.size(0);
  p.cols = b.size(1);
  p.row_stride = b.stride(0);
  p.col_stride = b.stride(1);
  p.out = out.mutable_data_ptr();
  launch_split_bf16x3(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor split_bf16x3_sum_cuda(const at::Tensor& parts_in, double scale, bool transpose) {
  check_split_bf16x3_sum(parts_in);
  const c10::cuda::CUDAGuard guard(parts_in.device());
  const at::Tensor parts = parts_in.contiguous();
  const int64_t rows = parts.size(0), cols = parts.size(1) / 3;
  at::Tensor out = transpose ? at::empty({cols, rows}, parts.options()) : at::empty({rows, cols}, parts.options());
  if (out.numel() == 0) return out;
  SplitSumParams p{};
  p.parts = parts.const_data_ptr<float>();
  p.rows = rows;
  p.cols = cols;
  p.scale = static_cast<float>(scale);
  p.transpose = transpose;
  p.out = out.mutable_data_ptr<float>();
  launch_split_bf16x3_sum(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor lora_project_cuda(const at::Tensor& x_in, const at::Tensor& a_in) {
  check_lora_project(x_in, a_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t m = x_in.size(0), k = x_in.size(1), r = a_in.size(0);
  const bool half = x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16;
  if (!half || k % 4 != 0 || r == 0 || r > kDoraCrossMaxRank || m == 0) return at::matmul(x_in.to(at::kFloat), a_in.t());
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 8 != 0) x = x.clone();
  at::Tensor a = a_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 != 0) a = a.clone();
  at::Tensor out = at::empty({m, r}, a.options());
  LoraProjectParams p{};
  p.x = x.const_data_ptr();
  p.kind = x.scalar_type() == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat16;
  p.m = m;
  p.k = k;
  p.a = a.const_data_ptr<float>();
  p.r = int(r);
  p.out = out.mutable_data_ptr<float>();
  launch_lora_project(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dora_cross_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset,
                                const at::Tensor& values, int64_t blocksize, int64_t nested_blocksize,
                                int64_t out_features, int64_t in_features, const at::Tensor& a_in) {
  const gemm::Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                           out_features, in_features};
  check_dora_cross(w, a_in);
  TORCH_CHECK(in_features % 4 == 0 && a_in.size(0) <= kDoraCrossMaxRank,
              "lowrank::dora_cross_4bit: the CUDA kernel needs in_features % 4 == 0 and r <= 64, got in_features ",
              quant::num(in_features), " and r ", quant::num(a_in.size(0)), " (lowrank.dora falls back to row chunks)");
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor a = a_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 != 0) a = a.clone();
  at::Tensor out = at::empty({out_features, a.size(0)}, a.options());
  DoraCrossParams p{};
  gemm::set_packed_weight(p, w);
  p.a = a.const_data_ptr<float>();
  p.r = int(a.size(0));
  p.p = out.mutable_data_ptr<float>();
  launch_dora_cross(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

static_assert(kLoraMergeMaxRank == 32 && kDoraNormMaxRank == 64, "the error messages below name the limits");

at::Tensor lora_merge_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset,
                                const at::Tensor& values, int64_t blocksize, int64_t nested_blocksize,
                                int64_t out_features, int64_t in_features, const at::Tensor& a_in,
                                const at::Tensor& b_in, const std::optional<at::Tensor>& row_scale, double scaling,
                                at::ScalarType dtype) {
  const gemm::Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                           out_features, in_features};
  check_lora_merge(w, a_in, b_in, row_scale, dtype);
  TORCH_CHECK(in_features % 4 == 0 && a_in.size(0) <= kLoraMergeMaxRank,
              "lowrank::lora_merge_4bit: the CUDA kernel needs in_features % 4 == 0 and r <= 32, got in_features ", quant::num(in_features), " and r ", quant::num(a_in.size(0)),
              " (lowrank.lora_function keeps the unmerged path there)");
  const c10::cuda::CUDAGuard guard(packed.device());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 2 == 0,
              "lowrank::lora_merge_4bit: packed must be 2-byte aligned");
  at::Tensor a = a_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 != 0) a = a.clone();  // float4 loads of A
  at::Tensor b = b_in.contiguous();
  if (reinterpret_cast<uintptr_t>(b.const_data_ptr()) % 16 != 0) b = b.clone();  // float4 loads of B
  const at::Tensor v = row_scale.has_value() ? row_scale->contiguous() : at::Tensor();
  at::Tensor out = at::empty({out_features, in_features}, a.options().dtype(dtype));
  LoraMerge4bitParams p{};
  gemm::set_packed_weight(p, w);
  p.a = a.const_data_ptr<float>();
  p.b = b.const_data_ptr<float>();
  p.row_scale = v.defined() ? v.const_data_ptr<float>() : nullptr;
  p.scaling = static_cast<float>(scaling);
  p.r = int(a.size(0));
  p.out_kind = dtype == at::kFloat ? FloatKind::kFloat32 : dtype == at::kHalf ? FloatKind::kFloat16
                                                                               : FloatKind::kBFloat16;
  p.out = out.mutable_data_ptr();
  const at::Tensor fragments = at::empty({lora_merge_4bit_mma_fragment_bytes(out_features)}, a.options().dtype(at::kByte));
  p.fragments = fragments.mutable_data_ptr();  // the caching allocator's blocks are 512-byte aligned
  launch_lora_merge_4bit(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

static_assert(kMergeMmaMaxRank == 16, "the error message below names the limit");

at::Tensor lora_merge_dense_cuda(const at::Tensor& weight_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                 const std::optional<at::Tensor>& row_scale, double scaling) {
  check_lora_merge_dense(weight_in, a_in, b_in, row_scale);
  const int64_t n = weight_in.size(0), k = weight_in.size(1), r = a_in.size(0);
  TORCH_CHECK((weight_in.scalar_type() == at::kHalf || weight_in.scalar_type() == at::kBFloat16) && k % 64 == 0 &&
                  r <= kMergeMmaMaxRank && n * k <= kMergeMmaMaxElements,
              "lowrank::lora_merge_dense: the CUDA kernel needs a float16 or bfloat16 weight, in_features % 64 == 0, "
              "r <= 16 and out_features * in_features < 2^31, got ", weight_in.scalar_type(), ", in_features ",
              quant::num(k), ", r ", quant::num(r), " and out_features ", quant::num(n),
              " (lowrank.lora_function keeps the unmerged path there)");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  at::Tensor w = weight_in.contiguous();
  if (reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 != 0) w = w.clone();  // 16-byte loads of W0
  at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 != 0) a = a.clone();
  if (reinterpret_cast<uintptr_t>(b.const_data_ptr()) % 16 != 0) b = b.clone();
  const at::Tensor v = row_scale.has_value() ? row_scale->contiguous() : at::Tensor();
  at::Tensor out = at::empty({n, k}, w.options());
  const at::Tensor fragments = at::empty({lora_merge_4bit_mma_fragment_bytes(n)}, a.options().dtype(at::kByte));
  LoraMergeDenseParams p{};
  p.w = w.const_data_ptr();
  p.n = n;
  p.k = k;
  p.a = a.const_data_ptr<float>();
  p.b = b.const_data_ptr<float>();
  p.row_scale = v.defined() ? v.const_data_ptr<float>() : nullptr;
  p.scaling = static_cast<float>(scaling);
  p.r = int(r);
  p.kind = w.scalar_type() == at::kHalf ? FloatKind::kFloat16 : FloatKind::kBFloat16;
  p.out = out.mutable_data_ptr();
  p.fragments = fragments.mutable_data_ptr();  // the caching allocator's blocks are 512-byte aligned
  launch_lora_merge_dense(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_row_norm_4bit_cuda(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset, const at::Tensor& values,
    int64_t blocksize, int64_t nested_blocksize, int64_t out_features, int64_t in_features, const at::Tensor& a_in,
    const at::Tensor& b_in, double scaling, double unit, double rtol, const std::optional<at::Tensor>& magnitude_in) {
  const gemm::Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                           out_features, in_features};
  check_dora_row_norm(w, a_in, b_in, unit, rtol, magnitude_in);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 != 0) a = a.clone();  // 16-byte loads
  if (reinterpret_cast<uintptr_t>(b.const_data_ptr()) % 16 != 0) b = b.clone();
  LoraMerge4bitParams p{};
  gemm::set_packed_weight(p, w);
  p.a = a.const_data_ptr<float>();
  p.b = b.const_data_ptr<float>();
  p.scaling = static_cast<float>(scaling);
  p.r = int(a.size(0));
  p.out_kind = FloatKind::kFloat32;
  const at::Tensor fragments = at::empty({lora_merge_4bit_mma_fragment_bytes(out_features)}, a.options().dtype(at::kByte));
  p.fragments = fragments.mutable_data_ptr();
  TORCH_CHECK(lora_merge_4bit_mma_takes(p),
              "lowrank::dora_row_norm_4bit: the CUDA kernel needs r <= 16, in_features % 64 == 0, blocksize >= 16, "
              "out_features * in_features < 2^31 and packed 4-byte aligned, got r ", quant::num(a.size(0)),
              ", in_features ", quant::num(in_features), ", blocksize ", quant::num(blocksize), ", out_features ",
              quant::num(out_features), " (lowrank.dora uses the expansion there)");
  at::Tensor partial = at::empty({dora_row_norm_partial_size(out_features, in_features)}, a.options());
  at::Tensor norm = at::empty({out_features}, a.options());
  at::Tensor flagged = at::empty({out_features}, a.options().dtype(at::kBool));
  const std::optional<at::Tensor> magnitude =
      magnitude_in.has_value() ? std::optional<at::Tensor>(magnitude_in->contiguous()) : std::nullopt;
  at::Tensor row_scale = at::empty({magnitude.has_value() ? out_features : 0}, a.options());
  at::Tensor status = at::empty({1}, a.options().dtype(at::kInt));
  DoraRowNormParams q{};
  q.merge = p;
  q.unit = unit;
  q.rtol = rtol;
  q.norm = norm.mutable_data_ptr<float>();
  q.flagged = flagged.mutable_data_ptr<bool>();
  q.magnitude = magnitude.has_value() ? magnitude->const_data_ptr<float>() : nullptr;
  q.row_scale = row_scale.mutable_data_ptr<float>();
  q.status = status.mutable_data_ptr<int>();
  launch_dora_row_norm(q, partial.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norm, flagged, row_scale, status};
}

std::tuple<at::Tensor, at::Tensor> dora_norm_cuda(const at::Tensor& w2_in, const at::Tensor& p_in,
                                                  const at::Tensor& a_in, const at::Tensor& b_in, double scaling,
                                                  double unit_cross, double unit_fp64, double rtol) {
  check_dora_norm(w2_in, p_in, a_in, b_in);
  TORCH_CHECK(a_in.size(0) <= kDoraNormMaxRank, "lowrank::dora_norm: the CUDA kernel takes r <= 64, got r ", quant::num(a_in.size(0)), " (lowrank.dora computes the expansion with PyTorch ops there)");
  const c10::cuda::CUDAGuard guard(w2_in.device());
  const at::Tensor a64 = a_in.to(at::kDouble);
  const at::Tensor gram = at::mm(a64, a64.t()).contiguous();
  const at::Tensor w2 = w2_in.contiguous(), p = p_in.contiguous(), b = b_in.contiguous();
  const int64_t n = w2.size(0);
  at::Tensor norm = at::empty({n}, w2.options().dtype(at::kFloat));
  at::Tensor flagged = at::empty({n}, w2.options().dtype(at::kBool));
  DoraNormParams prm{};
  prm.w2 = w2.const_data_ptr<double>();
  prm.p = p.const_data_ptr<float>();
  prm.b = b.const_data_ptr<float>();
  prm.gram = gram.const_data_ptr<double>();
  prm.n = n;
  prm.r = int(a_in.size(0));
  prm.scaling = scaling;
  prm.unit_cross = unit_cross;
  prm.unit_fp64 = unit_fp64;
  prm.rtol = rtol;
  prm.norm = norm.mutable_data_ptr<float>();
  prm.flagged = flagged.mutable_data_ptr<bool>();
  launch_dora_norm(prm, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norm, flagged};
}

}  // namespace
}  // namespace lowrank::lora

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("dora_norm", &lowrank::lora::dora_norm_cuda);
  m.impl("lora_dy_products", &lowrank::lora::dy_products_cuda);
  m.impl("dora_row_norm_4bit", &lowrank::lora::dora_row_norm_4bit_cuda);
  m.impl("lora_merge_4bit", &lowrank::lora::lora_merge_4bit_cuda);
  m.impl("lora_merge_dense", &lowrank::lora::lora_merge_dense_cuda);
  m.impl("lora_column_reduce", &lowrank::lora::column_reduce_cuda);
  m.impl("dora_cross_4bit", &lowrank::lora::dora_cross_4bit_cuda);
  m.impl("split_bf16x3", &lowrank::lora::split_bf16x3_cuda);
  m.impl("split_bf16x3_sum", &lowrank::lora::split_bf16x3_sum_cuda);
  m.impl("lora_project", &lowrank::lora::lora_project_cuda);
}
