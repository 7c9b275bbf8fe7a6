// Input validation shared by the CPU and CUDA entries of the quantization ops. Every message says
// what was expected; lowrank/ops.py mirrors these checks in the fake kernels.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace lowrank::quant {

// Integers and shapes reach TORCH_CHECK messages as std::string. Streaming an int64_t into the
// message (std::ostream << long) crashed the process on the GPU machine (torch 2.11 + its gcc 13
// toolchain: SIGSEGV in basic_ostream::_M_insert<long> inside our .so), so nothing here streams
// a number.
inline std::string num(int64_t v) { return std::to_string(v); }
// The same for a double (streaming one crashed there too: test_row_norm_op_rejects_bad_input).
inline std::string real_num(double v) { return std::to_string(v); }

inline std::string shape(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + num(t.size(d));
  return s + "]";
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_blocksize(int64_t blocksize, const char* op, const char* name = "blocksize") {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op, ": ",
              name, " must be a power of two in [32, 4096], got ", num(blocksize));
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " must not be empty");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_float_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_input(x, op, "x");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like the data, got ",
              t.device());
}

inline void check_table(const at::Tensor& t, const at::Tensor& ref, int64_t n, at::ScalarType dtype,
                        const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be ", dtype,
              " of shape [", num(n), "], got ", t.scalar_type(), " ", shape(t));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  check_same_device(t, ref, op, name);
}

inline void check_scalar_offset(const at::Tensor& offset, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.numel() == 1, op,
              ": offset must be a float32 tensor of one element, got ", offset.scalar_type(), " ", shape(offset));
  check_same_device(offset, ref, op, "offset");
}

inline void check_quantize_4bit(const at::Tensor& x, const at::Tensor& thresholds, const at::Tensor& code_of_rank,
                                int64_t blocksize) {
  constexpr const char* op = "lowrank::quantize_4bit";
  check_float_input(x, op);
  check_blocksize(blocksize, op);
  check_table(thresholds, x, 15, at::kFloat, op, "thresholds");
  check_table(code_of_rank, x, 16, at::kByte, op, "code_of_rank");
}

inline void check_dequantize_4bit_common(const at::Tensor& packed, const at::Tensor& values, int64_t blocksize,
                                         int64_t numel, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(numel > 0, op, ": numel must be positive, got ", num(numel));
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  check_input(packed, op, "packed");
  TORCH_CHECK(packed.numel() == ceil_div(numel, 2), op, ": packed holds ", num(packed.numel()), " bytes but ",
              num(numel), " elements need ", num(ceil_div(numel, 2)));
  check_blocksize(blocksize, op);
  TORCH_CHECK(is_supported_float(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  check_table(values, packed, 16, at::kFloat, op, "values");
}

inline void check_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& values,
                                  int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  constexpr const char* op = "lowrank::dequantize_4bit";
  check_dequantize_4bit_common(packed, values, blocksize, numel, dtype, op);
  check_table(absmax, packed, ceil_div(numel, blocksize), at::kFloat, op, "absmax");
}

inline void check_dequantize_4bit_nested(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                         const at::Tensor& nested_absmax, const at::Tensor& nested_qmap,
                                         const at::Tensor& offset, const at::Tensor& values, int64_t blocksize,
                                         int64_t nested_blocksize, int64_t numel, at::ScalarType dtype) {
  constexpr const char* op = "lowrank::dequantize_4bit_nested";
  check_dequantize_4bit_common(packed, values, blocksize, numel, dtype, op);
  check_blocksize(nested_blocksize, op, "nested_blocksize");
  const int64_t n_blocks = ceil_div(numel, blocksize);
  check_table(absmax_codes, packed, n_blocks, at::kByte, op, "absmax_codes");
  check_table(nested_absmax, packed, ceil_div(n_blocks, nested_blocksize), at::kFloat, op, "nested_absmax");
  check_table(nested_qmap, packed, 256, at::kFloat, op, "nested_qmap");
  check_scalar_offset(offset, packed, op);
}

inline void check_quantize_8bit(const at::Tensor& x, const at::Tensor& qmap, const at::Tensor& offset,
                                int64_t blocksize) {
  constexpr const char* op = "lowrank::quantize_8bit_blockwise";
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  check_input(x, op, "x");
  check_blocksize(blocksize, op);
  check_table(qmap, x, 256, at::kFloat, op, "qmap");
  check_scalar_offset(offset, x, op);
}

inline void check_dequantize_8bit(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                  const at::Tensor& offset, int64_t blocksize) {
  constexpr const char* op = "lowrank::dequantize_8bit_blockwise";
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  check_input(codes, op, "codes");
  check_blocksize(blocksize, op);
  check_table(absmax, codes, ceil_div(codes.numel(), blocksize), at::kFloat, op, "absmax");
  check_table(qmap, codes, 256, at::kFloat, op, "qmap");
  check_scalar_offset(offset, codes, op);
}

inline void check_absmax_mean(const at::Tensor& absmax) {
  constexpr const char* op = "lowrank::absmax_mean";
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ", absmax.scalar_type());
  check_input(absmax, op, "absmax");
}

}  // namespace lowrank::quant
