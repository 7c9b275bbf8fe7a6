// CPU kernels of the quantization family. Math: lowrank/reference.py. Built with
// -ffp-contract=off (setup.py) so that no product and sum fuse into one rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant/codes.h"
#include "quant/quant_checks.h"

namespace lowrank::quant {
namespace {

// Quantization blocks per parallel task: about 64 K elements, enough to amortize task start.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

// Codes of 16 normalized values at a time. Counting the thresholds each value exceeds (instead
// of the CUDA kernel's binary search) is branch-free over fixed-size arrays, which the compiler
// turns into SIMD compares; for a non-decreasing table the count equals the search's rank.
constexpr int kLanes = 16;

void codes_16(const float* xs, float inverse, const float* thr, const uint8_t* code_of_rank,
              bool sign_magnitude, uint8_t* codes) {
  float xn[kLanes];
  int32_t rank[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    xn[k] = xs[k] * inverse;
    rank[k] = 0;
  }
  if (sign_magnitude) {
    float mag[kLanes];
    for (int k = 0; k < kLanes; ++k) mag[k] = std::fabs(xn[k]);
    for (int j = 0; j < 7; ++j) {
      const float t = thr[j];
      for (int k = 0; k < kLanes; ++k) rank[k] += mag[k] > t ? 1 : 0;
    }
    for (int k = 0; k < kLanes; ++k) codes[k] = uint8_t(code_of_rank[rank[k]] | (xn[k] < 0.0f ? 8 : 0));
  } else {
    for (int j = 0; j < 15; ++j) {
      const float t = thr[j];
      for (int k = 0; k < kLanes; ++k) rank[k] += xn[k] > t ? 1 : 0;
    }
    for (int k = 0; k < kLanes; ++k) codes[k] = code_of_rank[rank[k]];
  }
}

template <typename T>
void quantize_4bit_kernel(const T* x, int64_t n, int64_t blocksize, const float* thr, const uint8_t* code_of_rank,
                          bool sign_magnitude, uint8_t* packed, float* absmax) {
  const int64_t n_blocks = ceil_div(n, blocksize);
  at::parallel_for(0, n_blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(blocksize);  // a multiple of kLanes: blocksize >= 32
    std::vector<uint8_t> codes(blocksize);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      float m = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        buf[i] = static_cast<float>(x[start + i]);
        m = max_propagate_nan(m, std::fabs(buf[i]));
      }
      std::fill(buf.begin() + len, buf.end(), 0.0f);  // odd n: the missing element counts as 0
      absmax[b] = m;
      const float inverse = 1.0f / m;  // IEEE division: the correctly rounded reciprocal
      const int64_t n_bytes = (len + 1) / 2;
      for (int64_t i = 0; i < 2 * n_bytes; i += kLanes)
        codes_16(buf.data() + i, inverse, thr, code_of_rank, sign_magnitude, codes.data() + i);
      uint8_t* out = packed + start / 2;
      for (int64_t j = 0; j < n_bytes; ++j) out[j] = uint8_t((codes[2 * j] << 4) | codes[2 * j + 1]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& x, const at::Tensor& thresholds,
                                                     const at::Tensor& code_of_rank, int64_t blocksize,
                                                     bool sign_magnitude) {
  check_quantize_4bit(x, thresholds, code_of_rank, blocksize);
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({ceil_div(n, 2)}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_4bit_cpu", [&] {
    quantize_4bit_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), n, blocksize, thresholds.const_data_ptr<float>(),
                                   code_of_rank.const_data_ptr<uint8_t>(), sign_magnitude,
                                   packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>());
  });
  return {packed, absmax};
}

// Dequantize with a per-block absmax given by `absmax_of(block)`: each block scales the 16-entry
// table once (16 products instead of one per element; the same float32 products).
template <typename T, typename AbsmaxOf>
void dequantize_4bit_kernel(const uint8_t* packed, const float* values, int64_t numel, int64_t blocksize,
                            AbsmaxOf absmax_of, T* out) {
  const int64_t n_blocks = ceil_div(numel, blocksize);
  at::parallel_for(0, n_blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float a = absmax_of(b);
      T scaled[16];
      for (int c = 0; c < 16; ++c) scaled[c] = static_cast<T>(values[c] * a);
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, numel - start);
      const uint8_t* in = packed + start / 2;
      T* o = out + start;
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        o[2 * j] = scaled[in[j] >> 4];
        o[2 * j + 1] = scaled[in[j] & 15];
      }
      if (len & 1) o[len - 1] = scaled[in[pairs] >> 4];
    }
  });
}

// The reconstruction of a double-quantized absmax: a rounded product, then a rounded sum.
struct NestedAbsmax {
  const uint8_t* codes;
  const float* nested_absmax;
  const float* qmap;
  float offset;
  int64_t nested_blocksize;
  float operator()(int64_t block) const {
    const float product = qmap[codes[block]] * nested_absmax[block / nested_blocksize];
    return product + offset;
  }
};

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& values,
                               int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  check_dequantize_4bit(packed, absmax, values, blocksize, numel, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const float* a = absmax.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit_cpu", [&] {
    dequantize_4bit_kernel<scalar_t>(packed.const_data_ptr<uint8_t>(), values.const_data_ptr<float>(), numel,
                                     blocksize, [a](int64_t b) { return a[b]; }, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor dequantize_4bit_nested_cpu(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                      const at::Tensor& nested_absmax, const at::Tensor& nested_qmap,
                                      const at::Tensor& offset, const at::Tensor& values, int64_t blocksize,
                                      int64_t nested_blocksize, int64_t numel, at::ScalarType dtype) {
  check_dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_qmap, offset, values, blocksize,
                               nested_blocksize, numel, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const NestedAbsmax absmax_of{absmax_codes.const_data_ptr<uint8_t>(), nested_absmax.const_data_ptr<float>(),
                               nested_qmap.const_data_ptr<float>(), offset.item<float>(), nested_blocksize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit_nested_cpu", [&] {
    dequantize_4bit_kernel<scalar_t>(packed.const_data_ptr<uint8_t>(), values.const_data_ptr<float>(), numel,
                                     blocksize, absmax_of, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_blockwise_cpu(const at::Tensor& x, const at::Tensor& qmap,
                                                               const at::Tensor& offset, int64_t blocksize) {
  check_quantize_8bit(x, qmap, offset, blocksize);
  const float off = offset.item<float>();
  const int64_t n = x.numel();
  const int64_t n_blocks = ceil_div(n, blocksize);
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({n_blocks}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* map = qmap.const_data_ptr<float>();
  uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
  float* ap = absmax.mutable_data_ptr<float>();
  at::parallel_for(0, n_blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      float m = 0.0f;
      for (int64_t i = 0; i < len; ++i) m = max_propagate_nan(m, std::fabs(xp[start + i] - off));
      ap[b] = m;
      const float inverse = 1.0f / m;
      for (int64_t i = 0; i < len; ++i) cp[start + i] = uint8_t(code_8bit((xp[start + i] - off) * inverse, map));
    }
  });
  return {codes, absmax};
}

at::Tensor dequantize_8bit_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                         const at::Tensor& offset, int64_t blocksize) {
  check_dequantize_8bit(codes, absmax, qmap, offset, blocksize);
  const int64_t n = codes.numel();
  at::Tensor out = at::empty({n}, codes.options().dtype(at::kFloat));
  const NestedAbsmax rebuild{codes.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                             qmap.const_data_ptr<float>(), offset.item<float>(), blocksize};
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, n, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) op[i] = rebuild(i);
  });
  return out;
}

// The reference's own arithmetic (torch's float64 sum), so CPU results equal it exactly.
at::Tensor absmax_mean_cpu(const at::Tensor& absmax) {
  check_absmax_mean(absmax);
  return (at::sum(absmax, at::kDouble) / double(absmax.numel())).to(at::kFloat);
}

}  // namespace
}  // namespace lowrank::quant

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("quantize_4bit", &lowrank::quant::quantize_4bit_cpu);
  m.impl("dequantize_4bit", &lowrank::quant::dequantize_4bit_cpu);
  m.impl("dequantize_4bit_nested", &lowrank::quant::dequantize_4bit_nested_cpu);
  m.impl("quantize_8bit_blockwise", &lowrank::quant::quantize_8bit_blockwise_cpu);
  m.impl("dequantize_8bit_blockwise", &lowrank::quant::dequantize_8bit_blockwise_cpu);
  m.impl("absmax_mean", &lowrank::quant::absmax_mean_cpu);
}
