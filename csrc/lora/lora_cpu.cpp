// CPU entries of the LoRA/DoRA ops: the math as PyTorch ops (lora_checks.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "lora/lora_checks.h"

namespace lowrank::lora {
namespace {

std::tuple<at::Tensor, at::Tensor> column_reduce_cpu(const at::Tensor& dy, const at::Tensor& h,
                                                     const std::optional<at::Tensor>& y) {
  check_column_reduce(dy, h, y);
  return column_reduce_reference(dy, h, y);
}

at::Tensor split_bf16x3_cpu(const at::Tensor& b) {
  check_split_bf16x3(b);
  return split_bf16x3_reference(b);
}

at::Tensor lora_project_cpu(const at::Tensor& x, const at::Tensor& a) {
  check_lora_project(x, a);
  return at::matmul(x.to(at::kFloat), a.t());
}

// P = W0 A^T, W0 dequantized to float32 exactly as dequantize_4bit (this file is built with
// -ffp-contract=off: the nested absmax is a rounded product, then a rounded sum), the dot products
// accumulated in float64: one row of W0 at a time, so no [out, in] tensor.
at::Tensor dora_cross_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset,
                               const at::Tensor& values, int64_t blocksize, int64_t nested_blocksize,
                               int64_t out_features, int64_t in_features, const at::Tensor& a_in) {
  const gemm::Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                           out_features, in_features};
  check_dora_cross(w, a_in);
  const at::Tensor a = a_in.contiguous();
  const int64_t r = a.size(0), k_in = in_features;
  at::Tensor out = at::empty({out_features, r}, a.options());
  const uint8_t* codes = packed.const_data_ptr<uint8_t>();
  const float* vals = values.const_data_ptr<float>();
  const float* av = a.const_data_ptr<float>();
  float* pv = out.mutable_data_ptr<float>();
  const bool nested = w.nested();
  const float* absmax_f = nested ? nullptr : absmax.const_data_ptr<float>();
  const uint8_t* absmax_c = nested ? absmax.const_data_ptr<uint8_t>() : nullptr;
  const float* nabs = nested ? nested_absmax->const_data_ptr<float>() : nullptr;
  const float* nqmap = nested ? nested_qmap->const_data_ptr<float>() : nullptr;
  const float off = nested ? offset->item<float>() : 0.0f;
  at::parallel_for(0, out_features, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(k_in);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < k_in; ++k) {
        const int64_t flat = n * k_in + k;
        const int64_t block = flat / blocksize;
        float scale;
        if (nested) {
          const float product = nqmap[absmax_c[block]] * nabs[block / nested_blocksize];
          scale = product + off;
        } else {
          scale = absmax_f[block];
        }
        const uint8_t byte = codes[flat / 2];
        row[k] = vals[(flat & 1) ? (byte & 15) : (byte >> 4)] * scale;
      }
      for (int64_t j = 0; j < r; ++j) {
        const float* aj = av + j * k_in;
        double sum = 0.0;
        for (int64_t k = 0; k < k_in; ++k) sum += double(row[k]) * double(aj[k]);
        pv[n * r + j] = float(sum);
      }
    }
  });
  return out;
}

// W' = round(v (W0 + s B A)) with merge.cu's operations in merge.cu's order (this file is built
// with -ffp-contract=off; the one fused multiply-add per term is explicit), so CPU and CUDA agree
// bit for bit.
template <typename T>
void lora_merge_rows(const gemm::Weight4bit& w, const float* av, const float* bv, const float* v, float s, int64_t r,
                     T* out) {
  const int64_t k_in = w.in_features, bs = w.blocksize;
  const uint8_t* codes = w.packed.const_data_ptr<uint8_t>();
  const float* vals = w.values.const_data_ptr<float>();
  const bool nested = w.nested();
  const float* absmax_f = nested ? nullptr : w.absmax.const_data_ptr<float>();
  const uint8_t* absmax_c = nested ? w.absmax.const_data_ptr<uint8_t>() : nullptr;
  const float* nabs = nested ? w.nested_absmax->const_data_ptr<float>() : nullptr;
  const float* nqmap = nested ? w.nested_qmap->const_data_ptr<float>() : nullptr;
  const float off = nested ? w.offset->item<float>() : 0.0f;
  at::parallel_for(0, w.out_features, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> bs_row(r);
    for (int64_t o = n0; o < n1; ++o) {
      const float sv = v != nullptr ? s * v[o] : s;
      for (int64_t j = 0; j < r; ++j) bs_row[j] = sv * bv[o * r + j];
      for (int64_t i = 0; i < k_in; ++i) {
        const int64_t flat = o * k_in + i;
        const int64_t block = flat / bs;
        float absmax;
        if (nested) {
          const float product = nqmap[absmax_c[block]] * nabs[block / w.nested_blocksize];
          absmax = product + off;
        } else {
          absmax = absmax_f[block];
        }
        const float scale = v != nullptr ? absmax * v[o] : absmax;
        const uint8_t byte = codes[flat / 2];
        const float w0 = vals[(flat & 1) ? (byte & 15) : (byte >> 4)] * scale;
        float acc = 0.0f;
        for (int64_t j = 0; j < r; ++j) acc = std::fma(bs_row[j], av[j * k_in + i], acc);
        const float sum = w0 + acc;
        out[flat] = static_cast<T>(sum);  // c10::Half / c10::BFloat16: round to nearest even
      }
    }
  });
}

at::Tensor lora_merge_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset,
                               const at::Tensor& values, int64_t blocksize, int64_t nested_blocksize,
                               int64_t out_features, int64_t in_features, const at::Tensor& a_in, const at::Tensor& b_in,
                               const std::optional<at::Tensor>& row_scale, double scaling, at::ScalarType dtype) {
  const gemm::Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                           out_features, in_features};
  check_lora_merge(w, a_in, b_in, row_scale, dtype);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor v = row_scale.has_value() ? row_scale->contiguous() : at::Tensor();
  at::Tensor out = at::empty({out_features, in_features}, a.options().dtype(dtype));
  const float* vp = v.defined() ? v.const_data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scaling);
  const int64_t r = a.size(0);
  switch (dtype) {
    case at::kFloat:
      lora_merge_rows<float>(w, a.const_data_ptr<float>(), b.const_data_ptr<float>(), vp, s, r,
                             out.mutable_data_ptr<float>());
      break;
    case at::kHalf:
      lora_merge_rows<c10::Half>(w, a.const_data_ptr<float>(), b.const_data_ptr<float>(), vp, s, r,
                                 out.mutable_data_ptr<c10::Half>());
      break;
    default:
      lora_merge_rows<c10::BFloat16>(w, a.const_data_ptr<float>(), b.const_data_ptr<float>(), vp, s, r,
                                     out.mutable_data_ptr<c10::BFloat16>());
      break;
  }
  return out;
}

// dora_norm.cu's loop, row by row (the Gram matrix from the same float64 matmul).
std::tuple<at::Tensor, at::Tensor> dora_norm_cpu(const at::Tensor& w2_in, const at::Tensor& p_in,
                                                 const at::Tensor& a_in, const at::Tensor& b_in, double scaling,
                                                 double unit_cross, double unit_fp64, double rtol) {
  check_dora_norm(w2_in, p_in, a_in, b_in);
  const at::Tensor a64 = a_in.to(at::kDouble);
  const at::Tensor gram = at::mm(a64, a64.t()).contiguous();
  const at::Tensor w2 = w2_in.contiguous(), p = p_in.contiguous(), b = b_in.contiguous();
  const int64_t n = w2.size(0), r = a_in.size(0);
  at::Tensor norm = at::empty({n}, w2.options().dtype(at::kFloat));
  at::Tensor flagged = at::empty({n}, w2.options().dtype(at::kBool));
  const double* g = gram.const_data_ptr<double>();
  const double* w2v = w2.const_data_ptr<double>();
  const float* pv = p.const_data_ptr<float>();
  const float* bv = b.const_data_ptr<float>();
  float* nv = norm.mutable_data_ptr<float>();
  bool* fv = flagged.mutable_data_ptr<bool>();
  std::vector<double> anorm(r);
  for (int64_t j = 0; j < r; ++j) anorm[j] = std::sqrt(g[j * r + j]);
  at::parallel_for(0, n, 256, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const float* bo = bv + o * r;
      double cross = 0.0, delta2 = 0.0, t = 0.0;
      for (int64_t j = 0; j < r; ++j) {
        const double bj = bo[j];
        cross = std::fma(bj, double(pv[o * r + j]), cross);
        double gb = 0.0;
        for (int64_t k = 0; k < r; ++k) gb = std::fma(double(bo[k]), g[k * r + j], gb);
        delta2 = std::fma(gb, bj, delta2);
        t = std::fma(std::fabs(bj), anorm[j], t);
      }
      delta2 = std::fmax(delta2, 0.0);
      const double s = scaling;
      const double n2 = w2v[o] + 2.0 * s * cross + s * s * delta2;
      t *= std::fabs(s);
      const double w = std::sqrt(w2v[o]);
      const double bound = 2.0 * unit_cross * w * t + unit_fp64 * (w + t) * (w + t);
      fv[o] = bound > 2.0 * rtol * n2;
      nv[o] = float(std::sqrt(std::fmax(n2, 0.0)));
    }
  });
  return {norm, flagged};
}

}  // namespace
}  // namespace lowrank::lora

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("dora_norm", &lowrank::lora::dora_norm_cpu);
  m.impl("lora_merge_4bit", &lowrank::lora::lora_merge_4bit_cpu);
  m.impl("lora_column_reduce", &lowrank::lora::column_reduce_cpu);
  m.impl("dora_cross_4bit", &lowrank::lora::dora_cross_4bit_cpu);
  m.impl("split_bf16x3", &lowrank::lora::split_bf16x3_cpu);
  m.impl("lora_project", &lowrank::lora::lora_project_cpu);
}
