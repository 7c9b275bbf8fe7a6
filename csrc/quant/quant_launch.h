// Parameter structs and launchers of the quantization kernels. This header is the whole
// interface between the torch-facing C++ (quant_cuda.cpp) and the .cu files, which include no
// torch header (a .cu with torch/extension.h took 58 s to compile on the GPU machine, 2 s without).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace lowrank::quant {

enum class FloatKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Quantize4bitParams {
  const void* x;                 // [numel] in x_kind, contiguous
  FloatKind x_kind;
  int64_t numel;
  int blocksize;                 // power of two, 32..4096
  const float* thresholds;       // [15] ascending (first 7 used in sign-magnitude mode)
  const uint8_t* code_of_rank;   // [16]
  bool sign_magnitude;
  uint8_t* packed;               // [(numel + 1) / 2]
  float* absmax;                 // [ceil(numel / blocksize)]
};

// Dequantize 4-bit codes. Exactly one absmax source: `absmax` (float32), or the double-quantized
// triple `absmax_codes` / `nested_absmax` / `nested_qmap` with `offset` (fused: no float absmax
// tensor is made).
struct Dequantize4bitParams {
  const uint8_t* packed;
  int64_t numel;
  int blocksize;
  const float* values;           // [16]
  const float* absmax;           // [n_blocks] or nullptr when nested
  const uint8_t* absmax_codes;   // [n_blocks] (nested only)
  const float* nested_absmax;    // [ceil(n_blocks / nested_blocksize)]
  const float* nested_qmap;      // [256]
  const float* offset;           // scalar on the device
  int nested_blocksize;
  void* out;                     // [numel] in out_kind
  FloatKind out_kind;
};

// A packed 4-bit weight [n, k] in bitsandbytes' layout (row o is the bytes [o k / 2, (o + 1) k / 2),
// the first element of a pair in the high nibble) as the fused kernels read it: the base of their
// parameter structs. Exactly one absmax form: float32 `absmax`, or (nested) the 8-bit codes with
// nested_absmax / nested_qmap / offset.
struct Packed4bitWeight {
  const uint8_t* packed;        // [n k / 2]
  int64_t n, k;
  int blocksize;                // a power of two
  const float* values;          // [16] code values
  const float* absmax;          // [n k / blocksize] float32, or nullptr when nested
  const uint8_t* absmax_codes;  // nested: [n k / blocksize] 8-bit codes of the absmax
  const float* nested_absmax;   // nested: [ceil(n_blocks / nested_blocksize)]
  const float* nested_qmap;     // nested: [256]
  const float* offset;          // nested: scalar on the device
  int nested_blocksize;
};

struct Quantize8bitParams {
  const float* x;       // quantized as x - *offset (float32 subtraction)
  const float* offset;  // scalar on the device
  int64_t numel;
  int blocksize;
  const float* qmap;  // [256] sorted
  uint8_t* codes;     // [numel]
  float* absmax;      // [ceil(numel / blocksize)]
};

struct Dequantize8bitParams {
  const uint8_t* codes;
  const float* absmax;
  const float* qmap;
  const float* offset;  // scalar on the device
  int64_t numel;
  int blocksize;
  float* out;
};

struct AbsmaxMeanParams {
  const float* absmax;
  int64_t numel;
  double* partials;  // [kAbsmaxMeanPartials] scratch
  float* mean;       // scalar out
};
// Partial sums of the mean: a fixed count, so the summation order (and so the result) depends on
// the element count alone, never on the device or the scheduling.
constexpr int kAbsmaxMeanPartials = 512;

void launch_quantize_4bit(const Quantize4bitParams& p, cudaStream_t stream);
void launch_dequantize_4bit(const Dequantize4bitParams& p, cudaStream_t stream);
void launch_quantize_8bit_blockwise(const Quantize8bitParams& p, cudaStream_t stream);
void launch_dequantize_8bit_blockwise(const Dequantize8bitParams& p, cudaStream_t stream);
void launch_absmax_mean(const AbsmaxMeanParams& p, cudaStream_t stream);

}  // namespace lowrank::quant
