// CPU entries of the LoRA/DoRA ops: the math as PyTorch ops (lora_checks.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

}  // namespace
}  // namespace lowrank::lora

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_column_reduce", &lowrank::lora::column_reduce_cpu);
  m.impl("dora_cross_4bit", &lowrank::lora::dora_cross_4bit_cpu);
  m.impl("split_bf16x3", &lowrank::lora::split_bf16x3_cpu);
  m.impl("lora_project", &lowrank::lora::lora_project_cpu);
}
