// CPU entries of the LoRA/DoRA ops: the math as PyTorch ops (lora_checks.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "lora/lora_checks.h"
#include "lora/row_norm_status.h"

namespace lowrank::lora {
namespace {

std::tuple<at::Tensor, at::Tensor> column_reduce_cpu(const at::Tensor& dy, const at::Tensor& h,
                                                     const std::optional<at::Tensor>& y) {
  check_column_reduce(dy, h, y);
  return column_reduce_reference(dy, h, y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dy_products_cpu(const at::Tensor& dy, const at::Tensor& b,
                                                                const at::Tensor& h, const std::optional<at::Tensor>& y,
                                                                const std::optional<at::Tensor>& col_scale,
                                                                double dh_scaling,
                                                                const std::optional<at::Tensor>& dot_divisor) {
  check_dy_products(dy, b, h, y, col_scale, dot_divisor);
  return dy_products_reference(dy, b, h, y, col_scale, dh_scaling, dot_divisor);
}

at::Tensor split_bf16x3_cpu(const at::Tensor& b) {
  check_split_bf16x3(b);
  return split_bf16x3_reference(b);
}

at::Tensor split_bf16x3_sum_cpu(const at::Tensor& parts, double scale, bool transpose) {
  check_split_bf16x3_sum(parts);
  return split_bf16x3_sum_reference(parts.contiguous(), scale, transpose);
}

at::Tensor lora_project_cpu(const at::Tensor& x, const at::Tensor& a) {
  check_lora_project(x, a);
  return at::matmul(x.to(at::kFloat), a.t());
}

// The 4-bit weight's float32 elements exactly as dequantize_4bit rebuilds them (this file is built
// with -ffp-contract=off: the nested absmax is a rounded product, then a rounded sum).
struct Packed4bitReader {
  explicit Packed4bitReader(const gemm::Weight4bit& w)
      : codes(w.packed.const_data_ptr<uint8_t>()),
        values(w.values.const_data_ptr<float>()),
        absmax_f(w.nested() ? nullptr : w.absmax.const_data_ptr<float>()),
        absmax_c(w.nested() ? w.absmax.const_data_ptr<uint8_t>() : nullptr),
        nested_absmax(w.nested() ? w.nested_absmax->const_data_ptr<float>() : nullptr),
        nested_qmap(w.nested() ? w.nested_qmap->const_data_ptr<float>() : nullptr),
        offset(w.nested() ? w.offset->item<float>() : 0.0f),
        blocksize(w.blocksize),
        nested_blocksize(w.nested_blocksize) {}

  float absmax(int64_t flat) const {
    const int64_t block = flat / blocksize;
    if (absmax_f != nullptr) return absmax_f[block];
    const float product = nested_qmap[absmax_c[block]] * nested_absmax[block / nested_blocksize];
    return product + offset;
  }
  float value(int64_t flat) const {
    const uint8_t byte = codes[flat / 2];
    return values[(flat & 1) ? (byte & 15) : (byte >> 4)];
  }

  const uint8_t* codes;
  const float* values;
  const float* absmax_f;
  const uint8_t* absmax_c;
  const float* nested_absmax;
  const float* nested_qmap;
  float offset;
  int64_t blocksize, nested_blocksize;
};

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
  const Packed4bitReader reader(w);
  const float* av = a.const_data_ptr<float>();
  float* pv = out.mutable_data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(k_in);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < k_in; ++k) {
        const int64_t flat = n * k_in + k;
        row[k] = reader.value(flat) * reader.absmax(flat);
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
  const int64_t k_in = w.in_features;
  const Packed4bitReader reader(w);
  at::parallel_for(0, w.out_features, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> bs_row(r);
    for (int64_t o = n0; o < n1; ++o) {
      const float sv = v != nullptr ? s * v[o] : s;
      for (int64_t j = 0; j < r; ++j) bs_row[j] = sv * bv[o * r + j];
      for (int64_t i = 0; i < k_in; ++i) {
        const int64_t flat = o * k_in + i;
        const float absmax = reader.absmax(flat);
        const float scale = v != nullptr ? absmax * v[o] : absmax;
        const float w0 = reader.value(flat) * scale;
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

// W' = round(v (W0 + s B A)) from a float W0: per element fma(w0, v, acc) (v = 1 without a row
// scale: w0 + acc), acc the float32 fma chain over j of (s v_o B[o, j]) A[j, i] from +0, rounded once
// to float32 and once to T. The CUDA kernel (merge_mma.cu) computes acc with split-bf16 mma (~2^-15
// of sum |s v B| |A|) and is not bit-identical to this.
template <typename T>
void lora_merge_dense_rows(const T* w, int64_t n_out, int64_t k_in, const float* av, const float* bv, const float* v,
                           float s, int64_t r, T* out) {
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> bs_row(r);
    for (int64_t o = n0; o < n1; ++o) {
      const float vo = v != nullptr ? v[o] : 1.0f;
      const float sv = v != nullptr ? s * vo : s;
      for (int64_t j = 0; j < r; ++j) bs_row[j] = sv * bv[o * r + j];
      for (int64_t i = 0; i < k_in; ++i) {
        float acc = 0.0f;
        for (int64_t j = 0; j < r; ++j) acc = std::fma(bs_row[j], av[j * k_in + i], acc);
        out[o * k_in + i] = static_cast<T>(std::fma(static_cast<float>(w[o * k_in + i]), vo, acc));
      }
    }
  });
}

at::Tensor lora_merge_dense_cpu(const at::Tensor& weight_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                const std::optional<at::Tensor>& row_scale, double scaling) {
  check_lora_merge_dense(weight_in, a_in, b_in, row_scale);
  const at::Tensor w = weight_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor v = row_scale.has_value() ? row_scale->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(w);
  const float* vp = v.defined() ? v.const_data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scaling);
  const int64_t n = w.size(0), k = w.size(1), r = a.size(0);
  switch (w.scalar_type()) {
    case at::kFloat:
      lora_merge_dense_rows<float>(w.const_data_ptr<float>(), n, k, a.const_data_ptr<float>(),
                                   b.const_data_ptr<float>(), vp, s, r, out.mutable_data_ptr<float>());
      break;
    case at::kHalf:
      lora_merge_dense_rows<c10::Half>(w.const_data_ptr<c10::Half>(), n, k, a.const_data_ptr<float>(),
                                       b.const_data_ptr<float>(), vp, s, r, out.mutable_data_ptr<c10::Half>());
      break;
    default:
      lora_merge_dense_rows<c10::BFloat16>(w.const_data_ptr<c10::BFloat16>(), n, k, a.const_data_ptr<float>(),
                                           b.const_data_ptr<float>(), vp, s, r,
                                           out.mutable_data_ptr<c10::BFloat16>());
      break;
  }
  return out;
}

// n_o = ||W0_o + s B_o A|| with every term and sum in float64 (W0 as dequantize_4bit's float32
// values), one row at a time; flagged by the CUDA kernel's bound (the caller's unit), so the CPU op
// flags the same rows for the same unit.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_row_norm_4bit_cpu(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_qmap, const std::optional<at::Tensor>& offset, const at::Tensor& values,
    int64_t blocksize, int64_t nested_blocksize, int64_t out_features, int64_t in_features, const at::Tensor& a_in,
    const at::Tensor& b_in, double scaling, double unit, double rtol, const std::optional<at::Tensor>& magnitude) {
  const gemm::Weight4bit w{packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize,
                           out_features, in_features};
  check_dora_row_norm(w, a_in, b_in, unit, rtol, magnitude);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t r = a.size(0), k_in = in_features;
  at::Tensor norm = at::empty({out_features}, a.options());
  at::Tensor flagged = at::empty({out_features}, a.options().dtype(at::kBool));
  const Packed4bitReader reader(w);
  const float* av = a.const_data_ptr<float>();
  const float* bv = b.const_data_ptr<float>();
  std::vector<double> a_norm(r, 0.0);
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < k_in; ++k) a_norm[j] += double(av[j * k_in + k]) * double(av[j * k_in + k]);
    a_norm[j] = std::sqrt(a_norm[j]);
  }
  float* nv = norm.mutable_data_ptr<float>();
  bool* fv = flagged.mutable_data_ptr<bool>();
  at::parallel_for(0, out_features, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      double n2 = 0.0, t = 0.0;
      for (int64_t k = 0; k < k_in; ++k) {
        const int64_t flat = o * k_in + k;
        double low_rank = 0.0;
        for (int64_t j = 0; j < r; ++j) low_rank += double(bv[o * r + j]) * double(av[j * k_in + k]);
        const double v = double(reader.value(flat) * reader.absmax(flat)) + scaling * low_rank;
        n2 += v * v;
      }
      for (int64_t j = 0; j < r; ++j) t += std::fabs(double(bv[o * r + j])) * a_norm[j];
      t *= std::fabs(scaling);
      const double n = std::sqrt(n2);
      nv[o] = float(n);
      fv[o] = unit * (t + n) > rtol * n;
    }
  });
  // DoRA's v = m / n in float32 (as m / n in PyTorch) and the status word of DoraRowNormParams
  at::Tensor row_scale = magnitude.has_value() ? magnitude->div(norm) : at::empty({0}, a.options());
  int status = flagged.any().item<bool>() ? kRowNormStatusFlagged : 0;
  if (magnitude.has_value() && magnitude->eq(0).any().item<bool>()) status |= kRowNormStatusZeroMagnitude;
  return {norm, flagged, row_scale, at::full({1}, status, a.options().dtype(at::kInt))};
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
  m.impl("lora_dy_products", &lowrank::lora::dy_products_cpu);
  m.impl("dora_row_norm_4bit", &lowrank::lora::dora_row_norm_4bit_cpu);
  m.impl("lora_merge_4bit", &lowrank::lora::lora_merge_4bit_cpu);
  m.impl("lora_merge_dense", &lowrank::lora::lora_merge_dense_cpu);
  m.impl("lora_column_reduce", &lowrank::lora::column_reduce_cpu);
  m.impl("dora_cross_4bit", &lowrank::lora::dora_cross_4bit_cpu);
  m.impl("split_bf16x3", &lowrank::lora::split_bf16x3_cpu);
  m.impl("split_bf16x3_sum", &lowrank::lora::split_bf16x3_sum_cpu);
  m.impl("lora_project", &lowrank::lora::lora_project_cpu);
}
