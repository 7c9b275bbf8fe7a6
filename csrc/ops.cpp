// Every lowrank op schema, one line each: this file is the API table. Backends register in their
// family's files (quant/quant_cpu.cpp, quant/quant_cuda.cpp); Python wrappers, fake kernels and
// docs live in lowrank/ops.py, the math in lowrank/reference.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lowrank, m) {
  // x [n] fp32/fp16/bf16 -> (packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)])
  m.def("quantize_4bit(Tensor x, Tensor thresholds, Tensor code_of_rank, int blocksize, bool sign_magnitude) -> (Tensor, Tensor)");
  // packed uint8 [ceil(numel/2)], absmax fp32 [n_blocks], values fp32 [16] -> [numel] dtype
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, Tensor values, int blocksize, int numel, ScalarType dtype) -> Tensor");
  // as dequantize_4bit, absmax rebuilt in the same launch from its double quantization
  m.def("dequantize_4bit_nested(Tensor packed, Tensor absmax_codes, Tensor nested_absmax, Tensor nested_qmap, Tensor offset, Tensor values, int blocksize, int nested_blocksize, int numel, ScalarType dtype) -> Tensor");
  // x fp32 [n], qmap fp32 [256] sorted, offset fp32 scalar -> blockwise codes of (x - offset):
  // (codes uint8 [n], absmax fp32 [ceil(n/blocksize)])
  m.def("quantize_8bit_blockwise(Tensor x, Tensor qmap, Tensor offset, int blocksize) -> (Tensor, Tensor)");
  // absmax fp32 [n] -> fp32 scalar: the mean, summed in float64 and rounded once (the double-quant offset)
  m.def("absmax_mean(Tensor absmax) -> Tensor");
  // codes uint8 [n] -> fp32 [n] = qmap[codes] * absmax[i // blocksize] + offset (offset: fp32 scalar tensor)
  m.def("dequantize_8bit_blockwise(Tensor codes, Tensor absmax, Tensor qmap, Tensor offset, int blocksize) -> Tensor");
  // x [..., in_features] fp32/fp16/bf16 @ W^T (+ bias [out_features]) -> [..., out_features] in x's
  // dtype, W 4-bit [out_features, in_features]: absmax fp32, or (double quant) its uint8 codes with
  // nested_absmax / nested_qmap / offset. path: 'auto' (the dispatch rule), 'skinny' (CUDA, M <= 16)
  // or 'dequantize' (dequantize + the backend's matmul).
  // x [M, K] fp32/fp16/bf16, a fp32 [r, K] -> x a^T fp32 [M, r]: the adapter's h = x A^T and g = dY B
  // with float32 adapters and float32 sums, the 16-bit x read once (no float32 copy of x)
  m.def("lora_project(Tensor x, Tensor a) -> Tensor");
  // b fp32 [K, n] -> bf16 [K, 3n] = [hi | mid | lo] with hi + mid + lo == b exactly: the float32 side
  // of an adapter product as three bf16 tensor-core operands
  m.def("split_bf16x3(Tensor b) -> Tensor");
  // parts fp32 [M, 3n] (a 16-bit operand times split_bf16x3's [hi | mid | lo]) -> scale * ((hi part +
  // mid part) + lo part) fp32 [M, n], or its transpose [n, M] (contiguous): the float32 product
  m.def("split_bf16x3_sum(Tensor parts, float scale=1.0, bool transpose=False) -> Tensor");
  // The LoRA/DoRA backward's dY products in one read of dY, float32, b and h float32, with
  // b_v = b * col_scale[:, None] (b without col_scale):
  //   (dy b_v [M, r],  (dy^T h) * col_scale[:, None] * dh_scaling [N, r],
  //    sum over rows of dy * y [N], divided by dot_divisor where it is nonzero and 0 where it is 0,
  //    or an empty [0] without y).
  // For DoRA col_scale = v, dh_scaling = s, dot_divisor = m: (g, dB, dm) as the backward needs them.
  // CUDA: bf16, N % 64 == 0, r <= 16 on the tensor cores (else PyTorch ops).
  m.def("lora_dy_products(Tensor dy, Tensor b, Tensor h, Tensor? y, Tensor? col_scale=None, float dh_scaling=1.0, Tensor? dot_divisor=None) -> (Tensor, Tensor, Tensor)");
  // LoRA/DoRA backward on CUDA cores: dy [M, N], h [M, r] (dy's dtype or fp32), y [M, N] or None ->
  // (dy^T h fp32 [N, r], sum over rows of dy * y fp32 [N], or [0] without y)
  m.def("lora_column_reduce(Tensor dy, Tensor h, Tensor? y) -> (Tensor, Tensor)");
  // DoRA's cross term: W0 A^T float32 [out_features, r] from the packed 4-bit W0 (absmax forms as
  // matmul_4bit) and a = lora_A float32 [r, in_features]; float32 products of the exact dequantized
  // values, no [out, in] tensor
  m.def("dora_cross_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_qmap, Tensor? offset, Tensor values, int blocksize, int nested_blocksize, int out_features, int in_features, Tensor a) -> Tensor");
  // The merged LoRA/DoRA weight round(v (W0 + s B A)) [out_features, in_features] in dtype, straight
  // from the packed 4-bit W0: a = lora_A float32 [r, in_features], b = lora_B float32
  // [out_features, r], row_scale = DoRA's v float32 [out_features] or None, scaling = s
  m.def("lora_merge_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_qmap, Tensor? offset, Tensor values, int blocksize, int nested_blocksize, int out_features, int in_features, Tensor a, Tensor b, Tensor? row_scale, float scaling, ScalarType dtype) -> Tensor");
  // The same merged weight from a float W0 (a bf16/fp16/fp32 nn.Linear base) [out_features,
  // in_features], in W0's dtype: a, b, row_scale and scaling as above. CUDA: float16/bfloat16,
  // in_features % 64 == 0, r <= 16 (tensor cores)
  m.def("lora_merge_dense(Tensor weight, Tensor a, Tensor b, Tensor? row_scale, float scaling) -> Tensor");
  // DoRA's row norm from its expansion (lowrank/dora.py): w2 = ||W0||^2 per row float64 [out], p =
  // W0 A^T float32 [out, r], a = lora_A float32 [r, in], b = lora_B float32 [out, r] -> (n float32
  // [out], flagged bool [out]: rows whose error bound exceeds rtol)
  // DoRA's row norm n = ||W0 + s B A|| per output row straight from the packed 4-bit W0 (no [out, in]
  // tensor): a = lora_A float32 [r, in], b = lora_B float32 [out, r] -> (n float32 [out], flagged
  // bool [out]: rows whose error bound unit (t / n + 1) exceeds rtol, t = |s| sum_j |b_j| ||a_j||).
  // CUDA: r <= 16, in_features % 64 == 0 (tensor cores); CPU: float64.
  m.def("dora_row_norm_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_qmap, Tensor? offset, Tensor values, int blocksize, int nested_blocksize, int out_features, int in_features, Tensor a, Tensor b, float scaling, float unit, float rtol, Tensor? magnitude=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dora_norm(Tensor w2, Tensor p, Tensor a, Tensor b, float scaling, float unit_cross, float unit_fp64, float rtol) -> (Tensor, Tensor)");
  m.def("matmul_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_qmap, Tensor? offset, Tensor values, int blocksize, int nested_blocksize, int out_features, int in_features, Tensor? bias, str path) -> Tensor");
  // The backward of matmul_4bit: dy [..., out_features] @ W -> [..., in_features] in dy's dtype.
  // path: "auto" (the fused skinny kernel for bf16 dy of at most 16 rows on CUDA, else dequantize +
  // matmul), "skinny" or "dequantize".
  // a [..., K] @ b^T (transpose_b, b [N, K]) or @ b (b [K, N]) (+ bias [N]) -> [..., N] in a's dtype,
  // fp32 accumulation. CUDA, float16/bfloat16, large problems: the cuBLASLt algorithm that measured
  // fastest for this shape on its first call (csrc/gemm/mm_tuned_cuda.cpp); otherwise the backend's matmul.
  m.def("mm_tuned(Tensor a, Tensor b, bool transpose_b, Tensor? bias=None) -> Tensor");
  m.def("matmul_4bit_grad_x(Tensor dy, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_qmap, Tensor? offset, Tensor values, int blocksize, int nested_blocksize, int out_features, int in_features, str path) -> Tensor");
}

// The extension is imported as lowrank._C only to run the registrations above; it has no
// Python-level functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
