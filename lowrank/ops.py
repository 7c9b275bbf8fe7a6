"""Typed Python wrappers of the lowrank ops, with their fake (meta) kernels.

Per op, in order: the wrapper (shapes and dtypes in its docstring), then the
``register_fake`` kernel, which mirrors the C++ checks of csrc/quant/quant_checks.h with
``torch._check`` so that ``torch.compile`` traces the op and rejects the same inputs. The math of
each op is in lowrank/reference.py.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the extension: registers every schema and backend)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _ceil_div(a, b):
    return (a + b - 1) // b


def _check_blocksize(blocksize: int, name: str = "blocksize"):
    torch._check(32 <= blocksize <= 4096 and (blocksize & (blocksize - 1)) == 0,
                 lambda: f"{name} must be a power of two in [32, 4096], got {blocksize}")


def _check_table(t: torch.Tensor, ref: torch.Tensor, n, dtype, name: str):
    torch._check(t.dtype == dtype and t.dim() == 1 and t.shape[0] == n,
                 lambda: f"{name} must be {dtype} of shape [{n}], got {t.dtype} {tuple(t.shape)}")
    torch._check(t.device == ref.device, lambda: f"{name} must be on {ref.device} like the data, got {t.device}")


def _check_offset(offset: torch.Tensor, ref: torch.Tensor):
    torch._check(offset.dtype == torch.float32 and offset.numel() == 1,
                 lambda: f"offset must be a float32 tensor of one element, got {offset.dtype} {tuple(offset.shape)}")
    torch._check(offset.device == ref.device, lambda: f"offset must be on {ref.device} like the data")


# --- quantize_4bit -----------------------------------------------------------------------------

def quantize_4bit(x: torch.Tensor, thresholds: torch.Tensor, code_of_rank: torch.Tensor,
                  blocksize: int, sign_magnitude: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of a contiguous tensor, read flat.

    x: [n] (any shape, contiguous) fp32/fp16/bf16; thresholds: fp32 [15]; code_of_rank: uint8 [16]
    (a Codebook's tensors). Returns (packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]).
    """
    return torch.ops.lowrank.quantize_4bit(x, thresholds, code_of_rank, blocksize, sign_magnitude)


@torch.library.register_fake("lowrank::quantize_4bit")
def _(x, thresholds, code_of_rank, blocksize, sign_magnitude):
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.numel() > 0, lambda: "x must not be empty")
    torch._check(x.is_contiguous(), lambda: "x must be contiguous")
    _check_blocksize(blocksize)
    _check_table(thresholds, x, 15, torch.float32, "thresholds")
    _check_table(code_of_rank, x, 16, torch.uint8, "code_of_rank")
    n = x.numel()
    return (x.new_empty((_ceil_div(n, 2),), dtype=torch.uint8),
            x.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32))


# --- dequantize_4bit ---------------------------------------------------------------------------

def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, values: torch.Tensor, blocksize: int,
                    numel: int, dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [ceil(numel/2)], absmax fp32 [ceil(numel/blocksize)], values fp32 [16]
    -> [numel] in dtype (fp32/fp16/bf16)."""
    return torch.ops.lowrank.dequantize_4bit(packed, absmax, values, blocksize, numel, dtype)


def _check_dequantize_common(packed, values, blocksize, numel, dtype):
    torch._check(numel > 0, lambda: f"numel must be positive, got {numel}")
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.is_contiguous(), lambda: "packed must be contiguous")
    torch._check(packed.numel() == _ceil_div(numel, 2),
                 lambda: f"packed holds {packed.numel()} bytes but {numel} elements need {_ceil_div(numel, 2)}")
    _check_blocksize(blocksize)
    torch._check(dtype in _FLOATS, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_table(values, packed, 16, torch.float32, "values")


@torch.library.register_fake("lowrank::dequantize_4bit")
def _(packed, absmax, values, blocksize, numel, dtype):
    _check_dequantize_common(packed, values, blocksize, numel, dtype)
    _check_table(absmax, packed, _ceil_div(numel, blocksize), torch.float32, "absmax")
    return packed.new_empty((numel,), dtype=dtype)


# --- dequantize_4bit_nested --------------------------------------------------------------------

def dequantize_4bit_nested(packed: torch.Tensor, absmax_codes: torch.Tensor, nested_absmax: torch.Tensor,
                           nested_qmap: torch.Tensor, offset: torch.Tensor, values: torch.Tensor,
                           blocksize: int, nested_blocksize: int, numel: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """As dequantize_4bit, with the double-quantized absmax read directly (one launch on CUDA):
    absmax = nested_qmap[absmax_codes] * nested_absmax[block // nested_blocksize] + offset.

    absmax_codes uint8 [n_blocks]; nested_absmax fp32 [ceil(n_blocks/nested_blocksize)];
    nested_qmap fp32 [256]; offset fp32 scalar tensor -> [numel] in dtype."""
    return torch.ops.lowrank.dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_qmap, offset,
                                                    values, blocksize, nested_blocksize, numel, dtype)


@torch.library.register_fake("lowrank::dequantize_4bit_nested")
def _(packed, absmax_codes, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize, numel,
      dtype):
    _check_dequantize_common(packed, values, blocksize, numel, dtype)
    _check_blocksize(nested_blocksize, "nested_blocksize")
    n_blocks = _ceil_div(numel, blocksize)
    _check_table(absmax_codes, packed, n_blocks, torch.uint8, "absmax_codes")
    _check_table(nested_absmax, packed, _ceil_div(n_blocks, nested_blocksize), torch.float32, "nested_absmax")
    _check_table(nested_qmap, packed, 256, torch.float32, "nested_qmap")
    _check_offset(offset, packed)
    return packed.new_empty((numel,), dtype=dtype)


# --- quantize_8bit_blockwise -------------------------------------------------------------------

def quantize_8bit_blockwise(x: torch.Tensor, qmap: torch.Tensor, offset: torch.Tensor,
                            blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes of ``x - offset`` (float32 subtraction; the double quantization centres
    the absmax on its mean in the same launch). x fp32 [n] (contiguous), qmap fp32 [256] sorted,
    offset fp32 scalar tensor -> (codes uint8 [n], absmax fp32 [ceil(n/blocksize)])."""
    return torch.ops.lowrank.quantize_8bit_blockwise(x, qmap, offset, blocksize)


@torch.library.register_fake("lowrank::quantize_8bit_blockwise")
def _(x, qmap, offset, blocksize):
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    torch._check(x.numel() > 0, lambda: "x must not be empty")
    torch._check(x.is_contiguous(), lambda: "x must be contiguous")
    _check_blocksize(blocksize)
    _check_table(qmap, x, 256, torch.float32, "qmap")
    _check_offset(offset, x)
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)


# --- dequantize_8bit_blockwise -----------------------------------------------------------------

def dequantize_8bit_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor,
                              offset: torch.Tensor, blocksize: int) -> torch.Tensor:
    """codes uint8 [n] -> fp32 [n] = qmap[codes] * absmax[i // blocksize] + offset, rounded after
    the product and after the sum (no fused multiply-add). offset: fp32 scalar tensor."""
    return torch.ops.lowrank.dequantize_8bit_blockwise(codes, absmax, qmap, offset, blocksize)


@torch.library.register_fake("lowrank::dequantize_8bit_blockwise")
def _(codes, absmax, qmap, offset, blocksize):
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")
    torch._check(codes.numel() > 0, lambda: "codes must not be empty")
    torch._check(codes.is_contiguous(), lambda: "codes must be contiguous")
    _check_blocksize(blocksize)
    _check_table(absmax, codes, _ceil_div(codes.numel(), blocksize), torch.float32, "absmax")
    _check_table(qmap, codes, 256, torch.float32, "qmap")
    _check_offset(offset, codes)
    return codes.new_empty((codes.numel(),), dtype=torch.float32)


# --- absmax_mean -------------------------------------------------------------------------------

def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """absmax fp32 [n] (contiguous) -> fp32 scalar tensor: the mean, summed in float64 and rounded to
    float32 once (the double-quantization offset; reference.absmax_mean). On CUDA the float64 sum
    runs in a fixed order (deterministic); its float32 result equals torch's unless the exact mean
    lies within ~1e-15 (relative) of a float32 rounding boundary."""
    return torch.ops.lowrank.absmax_mean(absmax)


@torch.library.register_fake("lowrank::absmax_mean")
def _(absmax):
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    torch._check(absmax.numel() > 0, lambda: "absmax must not be empty")
    torch._check(absmax.is_contiguous(), lambda: "absmax must be contiguous")
    return absmax.new_empty(())


# --- matmul_4bit -------------------------------------------------------------------------------

MATMUL_PATHS = ("auto", "skinny", "wgmma", "dequantize")


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                nested_qmap: torch.Tensor | None, offset: torch.Tensor | None, values: torch.Tensor,
                blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """``x [..., in_features] @ W^T (+ bias)`` for a 4-bit ``W [out_features, in_features]``, output
    [..., out_features] in x's dtype, fp32 accumulation. Not differentiable (lowrank.matmul_4bit is).

    absmax: fp32 [n_blocks], or with double quantization the uint8 codes of the absmax plus
    nested_absmax fp32 / nested_qmap fp32 [256] / offset fp32 scalar. bias: [out_features] in x's
    dtype. path: "auto" (docs/design.md's dispatch rule), "skinny" (the fused CUDA kernel: fp16/bf16
    x with at most 16 rows, blocksize >= 64 dividing in_features), "wgmma" (the fused tensor-core
    GEMM of sm_90: fp16/bf16 x, in_features % 64 == 0, blocksize >= 64, out_features % 8 == 0) or
    "dequantize" (dequantize + the backend's matmul)."""
    return torch.ops.lowrank.matmul_4bit(x, packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                                         nested_blocksize, out_features, in_features, bias, path)


def _matmul_4bit_fake_checks(x, packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                             nested_blocksize, out_features, in_features):
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(out_features > 0 and in_features > 0,
                 lambda: f"the weight shape must be positive, got [{out_features}, {in_features}]")
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"x's last dimension must be in_features = {in_features}, got x of shape {tuple(x.shape)}")
    numel = out_features * in_features
    torch._check(packed.dtype == torch.uint8 and packed.numel() == _ceil_div(numel, 2),
                 lambda: f"packed must be uint8 with {_ceil_div(numel, 2)} bytes, got {packed.dtype} "
                         f"with {packed.numel()}")
    torch._check(x.device == packed.device, lambda: f"x must be on {packed.device} like the data, got {x.device}")
    _check_blocksize(blocksize)
    _check_table(values, packed, 16, torch.float32, "values")
    n_blocks = _ceil_div(numel, blocksize)
    nested = nested_absmax is not None
    torch._check(nested == (nested_qmap is not None) == (offset is not None),
                 lambda: "nested_absmax, nested_qmap and offset must be given together or not at all")
    if nested:
        _check_blocksize(nested_blocksize, "nested_blocksize")
        _check_table(absmax, packed, n_blocks, torch.uint8, "absmax")
        _check_table(nested_absmax, packed, _ceil_div(n_blocks, nested_blocksize), torch.float32, "nested_absmax")
        _check_table(nested_qmap, packed, 256, torch.float32, "nested_qmap")
        _check_offset(offset, packed)
    else:
        _check_table(absmax, packed, n_blocks, torch.float32, "absmax")


@torch.library.register_fake("lowrank::matmul_4bit")
def _(x, packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize, out_features,
      in_features, bias, path):
    _matmul_4bit_fake_checks(x, packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                             nested_blocksize, out_features, in_features)
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features and bias.dtype == x.dtype,
                     lambda: f"bias must be [{out_features}] in x's dtype {x.dtype}, got {bias.dtype} "
                             f"{tuple(bias.shape)}")
    torch._check(path in MATMUL_PATHS, lambda: f"path must be one of {MATMUL_PATHS}, got {path!r}")
    return x.new_empty((*x.shape[:-1], out_features))


def matmul_4bit_grad_x(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                       nested_absmax: torch.Tensor | None, nested_qmap: torch.Tensor | None,
                       offset: torch.Tensor | None, values: torch.Tensor, blocksize: int, nested_blocksize: int,
                       out_features: int, in_features: int, path: str = "auto") -> torch.Tensor:
    """The backward of matmul_4bit: ``dy [..., out_features] @ W`` -> [..., in_features] in dy's
    dtype, fp32 accumulation; the weight's forms as matmul_4bit. path: "auto" (on CUDA the fused
    skinny kernel for bf16 dy with at most 16 rows, blocksize >= 64 dividing in_features; on Hopper
    the fused wgmma kernel for fp16/bf16 dy of up to 256 rows; else dequantize + matmul), "skinny" or
    "wgmma" (that kernel, or an error saying why not) or "dequantize"."""
    return torch.ops.lowrank.matmul_4bit_grad_x(dy, packed, absmax, nested_absmax, nested_qmap, offset, values,
                                                blocksize, nested_blocksize, out_features, in_features, path)


@torch.library.register_fake("lowrank::matmul_4bit_grad_x")
def _(dy, packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize, out_features,
      in_features, path):
    torch._check(path in MATMUL_PATHS, lambda: f"path must be one of {MATMUL_PATHS}, got {path!r}")
    torch._check(dy.dim() >= 1 and dy.shape[-1] == out_features,
                 lambda: f"dy's last dimension must be out_features = {out_features}, got dy of shape "
                         f"{tuple(dy.shape)}")
    # the weight's checks are matmul_4bit's with x standing in for dy
    x = dy.new_empty((*dy.shape[:-1], in_features))
    _matmul_4bit_fake_checks(x, packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                             nested_blocksize, out_features, in_features)
    return x


# --- mm_tuned ----------------------------------------------------------------------------------

def mm_tuned(a: torch.Tensor, b: torch.Tensor, transpose_b: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a [..., K] @ b^T`` (transpose_b, b [N, K]: a linear layer's weight) or ``a @ b`` (b [K, N]),
    plus ``bias [N]``, -> [..., N] in a's dtype, fp32 accumulation. No autograd formula: the layers
    call it inside their own backward.

    On CUDA, for float16/bfloat16 problems of M N K >= 2^34 with contiguous, 256-byte aligned
    operands, the cuBLASLt algorithm that measured fastest for the shape on its first call (timed
    once per shape against the plain matmul; csrc/gemm/mm_tuned_cuda.cpp has the rule and its
    switches LOWRANK_GEMM_TUNE=0, LOWRANK_GEMM_ALGO=i, LOWRANK_GEMM_TUNE_TRACE=1); otherwise, and on
    CPU, the backend's matmul (torch.nn.functional.linear / torch.matmul)."""
    return torch.ops.lowrank.mm_tuned(a, b, transpose_b, bias)


@torch.library.register_fake("lowrank::mm_tuned")
def _(a, b, transpose_b, bias=None):
    torch._check(a.dtype in _FLOATS, lambda: f"a must be float32, float16 or bfloat16, got {a.dtype}")
    torch._check(b.dtype == a.dtype, lambda: f"b must have a's dtype {a.dtype}, got {b.dtype}")
    torch._check(b.dim() == 2, lambda: f"b must be 2-D ({'[N, K]' if transpose_b else '[K, N]'}), got {tuple(b.shape)}")
    k, n = (b.shape[1], b.shape[0]) if transpose_b else (b.shape[0], b.shape[1])
    torch._check(a.dim() >= 1 and a.shape[-1] == k,
                 lambda: f"a's last dimension must be K = {k}, got a of shape {tuple(a.shape)}")
    torch._check(a.device == b.device, lambda: f"a must be on {b.device} like b, got {a.device}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n and bias.dtype == a.dtype,
                     lambda: f"bias must be [{n}] in a's dtype {a.dtype}, got {bias.dtype} {tuple(bias.shape)}")
        torch._check(bias.device == b.device, lambda: f"bias must be on {b.device} like b, got {bias.device}")
    return a.new_empty((*a.shape[:-1], n))


# --- lora_column_reduce ------------------------------------------------------------------------

def lora_column_reduce(dy: torch.Tensor, h: torch.Tensor,
                       y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA/DoRA backward's reductions over the rows of dy, in one read of dy (and y) on CUDA:
    (dy^T h float32 [N, r], sum over rows of dy * y float32 [N], or an empty [0] without y).

    dy [M, N] (and y [M, N]) in one float dtype, h [M, r] in it or float32. Deterministic (fixed
    summation order)."""
    return torch.ops.lowrank.lora_column_reduce(dy, h, y)


@torch.library.register_fake("lowrank::lora_column_reduce")
def _(dy, h, y):
    torch._check(dy.dtype in _FLOATS, lambda: f"dy must be float32, float16 or bfloat16, got {dy.dtype}")
    torch._check(dy.dim() == 2 and h.dim() == 2 and h.shape[0] == dy.shape[0],
                 lambda: f"dy must be [M, N] and h [M, r] with the same M, got {tuple(dy.shape)} and {tuple(h.shape)}")
    torch._check(h.dtype in (dy.dtype, torch.float32), lambda: f"h must have dy's dtype {dy.dtype} or be float32, got {h.dtype}")
    if y is not None:
        torch._check(y.shape == dy.shape and y.dtype == dy.dtype, lambda: "y must match dy")
    n = dy.shape[1]
    return (dy.new_empty((n, h.shape[1]), dtype=torch.float32),
            dy.new_empty((n,) if y is not None else (0,), dtype=torch.float32))


# --- lora_dy_products --------------------------------------------------------------------------

def lora_dy_products(dy: torch.Tensor, b: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None,
                     col_scale: torch.Tensor | None = None, dh_scaling: float = 1.0,
                     dot_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LoRA/DoRA backward's products of ``dy`` [M, N] in one read of it (and of ``y``), float32:

        g   = dy @ b_v                           [M, r]   b_v = b * col_scale[:, None] (or b)
        dh  = (dy^T @ h) * col_scale[:, None] * dh_scaling   [N, r]
        dot = sum over rows of dy * y            [N], divided by dot_divisor where it is nonzero
                                                     and 0 where it is 0; an empty [0] when y is None

    ``b`` float32 [N, r], ``h`` float32 [M, r], ``col_scale`` / ``dot_divisor`` float32 [N]. For
    DoRA col_scale = v, dh_scaling = s, dot_divisor = m gives (g, dB, dm) in one op. CUDA: bf16,
    N % 64 == 0, r <= 16 on the tensor cores with b_v and h split into two bf16 parts (2^-16
    relative), the partial sums added by a second launch in a fixed order; else PyTorch ops."""
    return torch.ops.lowrank.lora_dy_products(dy, b, h, y, col_scale, float(dh_scaling), dot_divisor)


@torch.library.register_fake("lowrank::lora_dy_products")
def _(dy, b, h, y, col_scale=None, dh_scaling=1.0, dot_divisor=None):
    torch._check(dy.dtype in (torch.float32, torch.float16, torch.bfloat16) and dy.dim() == 2,
                 lambda: f"dy must be a 2-D float32, float16 or bfloat16 tensor [M, N], got {dy.dtype} {tuple(dy.shape)}")
    m, n = dy.shape
    torch._check(b.dtype == torch.float32 and b.dim() == 2 and b.shape[0] == n,
                 lambda: f"b must be float32 [N = {n}, r], got {b.dtype} {tuple(b.shape)}")
    torch._check(h.dtype == torch.float32 and h.dim() == 2 and h.shape[0] == m and h.shape[1] == b.shape[1],
                 lambda: f"h must be float32 [M = {m}, r], got {h.dtype} {tuple(h.shape)}")
    if y is not None:
        torch._check(y.shape == dy.shape and y.dtype == dy.dtype, lambda: "y must match dy")
    for t, name in ((col_scale, "col_scale"), (dot_divisor, "dot_divisor")):
        if t is not None:
            torch._check(t.dtype == torch.float32 and t.dim() == 1 and t.shape[0] == n,
                         lambda: f"{name} must be float32 [N = {n}], got {t.dtype} {tuple(t.shape)}")
    torch._check(dot_divisor is None or y is not None, lambda: "dot_divisor divides sum(dy * y), so it needs y")
    r = b.shape[1]
    return (dy.new_empty((m, r), dtype=torch.float32), dy.new_empty((n, r), dtype=torch.float32),
            dy.new_empty((n,) if y is not None else (0,), dtype=torch.float32))


def _check_packed_weight_and_a(packed, values, blocksize, out_features, in_features, a):
    """The fake kernels' checks of a packed 4-bit weight and lora_A (dora_cross_4bit, lora_merge_4bit)."""
    torch._check(out_features > 0 and in_features > 0,
                 lambda: f"the weight shape must be positive, got [{out_features}, {in_features}]")
    torch._check(packed.dtype == torch.uint8 and packed.numel() == _ceil_div(out_features * in_features, 2),
                 lambda: "packed must be uint8 with ceil(out_features * in_features / 2) bytes")
    _check_blocksize(blocksize)
    _check_table(values, packed, 16, torch.float32, "values")
    torch._check(a.dtype == torch.float32 and a.dim() == 2 and a.shape[1] == in_features,
                 lambda: f"a (lora_A) must be float32 [r, in_features = {in_features}], got {a.dtype} {tuple(a.shape)}")


def _check_lora_b(b, out_features, a):
    torch._check(b.dtype == torch.float32 and b.dim() == 2 and b.shape[0] == out_features and b.shape[1] == a.shape[0],
                 lambda: f"b (lora_B) must be float32 [out_features = {out_features}, r], got {b.dtype} {tuple(b.shape)}")


# --- dora_cross_4bit ---------------------------------------------------------------------------

def dora_cross_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                    nested_qmap: torch.Tensor | None, offset: torch.Tensor | None, values: torch.Tensor,
                    blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                    a: torch.Tensor) -> torch.Tensor:
    """DoRA's cross term P = W0 A^T, float32 [out_features, r], straight from the packed 4-bit W0
    (absmax forms as matmul_4bit) and ``a`` = lora_A float32 [r, in_features]: float32 products of
    the exact dequantized values (no 16-bit rounding), no [out, in] tensor. CUDA: in_features % 4 == 0
    and r <= 64 (lowrank.dora takes row chunks otherwise)."""
    return torch.ops.lowrank.dora_cross_4bit(packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                                             nested_blocksize, out_features, in_features, a)


@torch.library.register_fake("lowrank::dora_cross_4bit")
def _(packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize, out_features,
      in_features, a):
    _check_packed_weight_and_a(packed, values, blocksize, out_features, in_features, a)
    return a.new_empty((out_features, a.shape[0]), dtype=torch.float32)


# --- lora_merge_4bit ---------------------------------------------------------------------------

def lora_merge_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                    nested_qmap: torch.Tensor | None, offset: torch.Tensor | None, values: torch.Tensor,
                    blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                    a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor | None, scaling: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """The merged weight round(v (W0 + s B A)) [out_features, in_features] in ``dtype``, straight
    from the packed 4-bit W0 (absmax forms as matmul_4bit): ``a`` = lora_A float32 [r, in_features],
    ``b`` = lora_B float32 [out_features, r], ``row_scale`` = DoRA's v float32 [out_features] or
    None. Per element: w0 = value * (absmax * v) and the low-rank sum as a float32 fma chain over
    r terms of (s v B) * A, added once and rounded once (CPU and CUDA agree bit for bit). CUDA:
    in_features % 4 == 0 and r <= 32."""
    return torch.ops.lowrank.lora_merge_4bit(packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                                             nested_blocksize, out_features, in_features, a, b, row_scale,
                                             float(scaling), dtype)


@torch.library.register_fake("lowrank::lora_merge_4bit")
def _(packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize, out_features,
      in_features, a, b, row_scale, scaling, dtype):
    _check_packed_weight_and_a(packed, values, blocksize, out_features, in_features, a)
    _check_lora_b(b, out_features, a)
    torch._check(dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return packed.new_empty((out_features, in_features), dtype=dtype)


# --- lora_merge_dense --------------------------------------------------------------------------

def lora_merge_dense(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """The merged weight round(v (W0 + s B A)) [out_features, in_features] in ``weight``'s dtype from
    a float W0 = ``weight`` (float32, float16 or bfloat16): ``a`` = lora_A float32 [r, in_features],
    ``b`` = lora_B float32 [out_features, r], ``row_scale`` = DoRA's v float32 [out_features] or None.
    Per element fma(w0, v, acc) rounded once, acc the low-rank sum (CPU: a float32 fma chain over
    r terms of (s v B) * A; CUDA: split-bf16 tensor-core products, ~2^-15 of sum |s v B| |A|).
    CUDA: float16/bfloat16, in_features % 64 == 0, r <= 16."""
    return torch.ops.lowrank.lora_merge_dense(weight, a, b, row_scale, float(scaling))


@torch.library.register_fake("lowrank::lora_merge_dense")
def _(weight, a, b, row_scale, scaling):
    torch._check(weight.dim() == 2 and weight.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"weight must be a float32, float16 or bfloat16 matrix, got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    torch._check(a.dtype == torch.float32 and a.dim() == 2 and a.shape[1] == in_features,
                 lambda: f"a (lora_A) must be float32 [r, in_features = {in_features}], got {a.dtype} {tuple(a.shape)}")
    _check_lora_b(b, out_features, a)
    if row_scale is not None:
        torch._check(row_scale.dtype == torch.float32 and row_scale.shape == (out_features,),
                     lambda: f"row_scale must be float32 [out_features = {out_features}]")
    return weight.new_empty((out_features, in_features))


# --- dora_row_norm_4bit ------------------------------------------------------------------------

def dora_row_norm_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                       nested_qmap: torch.Tensor | None, offset: torch.Tensor | None, values: torch.Tensor,
                       blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                       a: torch.Tensor, b: torch.Tensor, scaling: float, unit: float, rtol: float,
                       magnitude: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoRA's row norm n = ||W0 + s B A|| per output row straight from the packed 4-bit W0 (absmax
    forms as matmul_4bit), no [out, in] tensor: ``a`` = lora_A float32 [r, in_features], ``b`` =
    lora_B float32 [out_features, r]. Returns (n float32 [out], flagged bool [out], v, status):
    flagged rows are those where unit (t / n + 1) > rtol, t = |s| sum_j |b_j| ||a_j|| (``unit`` is the
    relative error of the CUDA kernel's low-rank product, lowrank.dora.U_ROW_NORM); v = magnitude / n
    float32 [out] (DoRA's row scale, one IEEE division as in PyTorch) when ``magnitude`` (float32
    [out]) is given, else empty; status int32 [1]: bit 0 (1) set when some row is flagged, bit 1 (2)
    when some magnitude is 0. CUDA: the tensor-core kernel, r <= 16, in_features % 64 == 0,
    blocksize >= 16; CPU: float64."""
    return torch.ops.lowrank.dora_row_norm_4bit(packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize,
                                                nested_blocksize, out_features, in_features, a, b, float(scaling),
                                                float(unit), float(rtol), magnitude)


ROW_NORM_STATUS_FLAGGED = 1          # dora_row_norm_4bit's status bits
ROW_NORM_STATUS_ZERO_MAGNITUDE = 2


@torch.library.register_fake("lowrank::dora_row_norm_4bit")
def _(packed, absmax, nested_absmax, nested_qmap, offset, values, blocksize, nested_blocksize, out_features,
      in_features, a, b, scaling, unit, rtol, magnitude=None):
    _check_packed_weight_and_a(packed, values, blocksize, out_features, in_features, a)
    _check_lora_b(b, out_features, a)
    torch._check(unit >= 0 and rtol > 0, lambda: f"unit must be >= 0 and rtol > 0, got unit {unit} and rtol {rtol}")
    if magnitude is not None:
        torch._check(magnitude.dtype == torch.float32 and magnitude.dim() == 1 and magnitude.shape[0] == out_features,
                     lambda: f"magnitude must be float32 [out_features = {out_features}], got {magnitude.dtype} "
                             f"{list(magnitude.shape)}")
    return (a.new_empty((out_features,)), a.new_empty((out_features,), dtype=torch.bool),
            a.new_empty((out_features if magnitude is not None else 0,)), a.new_empty((1,), dtype=torch.int32))


# --- dora_norm ---------------------------------------------------------------------------------

def dora_norm(w2: torch.Tensor, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
              unit_cross: float, unit_fp64: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA's row norm n = ||W0 + s B A|| from the expansion of lowrank/dora.py, in one launch:
    ``w2`` = ||W0||^2 per row float64 [out], ``p`` = W0 A^T float32 [out, r], ``a`` = lora_A float32
    [r, in], ``b`` = lora_B float32 [out, r]. Returns (n float32 [out], flagged bool [out]): flagged
    rows are those whose error bound (``unit_cross``, ``unit_fp64``) exceeds ``rtol``. float64
    throughout. CUDA: r <= 64."""
    return torch.ops.lowrank.dora_norm(w2, p, a, b, float(scaling), float(unit_cross), float(unit_fp64), float(rtol))


@torch.library.register_fake("lowrank::dora_norm")
def _(w2, p, a, b, scaling, unit_cross, unit_fp64, rtol):
    torch._check(w2.dtype == torch.float64 and w2.dim() == 1,
                 lambda: f"w2 must be float64 [out_features], got {w2.dtype} {tuple(w2.shape)}")
    torch._check(a.dtype == torch.float32 and a.dim() == 2,
                 lambda: f"a (lora_A) must be float32 [r, in_features], got {a.dtype} {tuple(a.shape)}")
    shape = (w2.shape[0], a.shape[0])
    torch._check(p.dtype == torch.float32 and tuple(p.shape) == shape,
                 lambda: f"p (W0 A^T) must be float32 {list(shape)}, got {p.dtype} {tuple(p.shape)}")
    torch._check(b.dtype == torch.float32 and tuple(b.shape) == shape,
                 lambda: f"b (lora_B) must be float32 {list(shape)}, got {b.dtype} {tuple(b.shape)}")
    return w2.new_empty(w2.shape, dtype=torch.float32), w2.new_empty(w2.shape, dtype=torch.bool)


# --- lora_project ------------------------------------------------------------------------------

def lora_project(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x @ a^T`` in float32 [M, r] for x [M, K] (fp32/fp16/bf16) and a float32 [r, K]: the adapter's
    h = x A^T and g = dY B with float32 adapters, reading a 16-bit x once (no float32 copy of x)."""
    return torch.ops.lowrank.lora_project(x, a)


@torch.library.register_fake("lowrank::lora_project")
def _(x, a):
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() == 2 and a.dim() == 2 and a.shape[1] == x.shape[1] and a.dtype == torch.float32,
                 lambda: f"x must be [M, K] and a float32 [r, K], got x {tuple(x.shape)} and a {a.dtype} {tuple(a.shape)}")
    return x.new_empty((x.shape[0], a.shape[0]), dtype=torch.float32)


# --- split_bf16x3 ------------------------------------------------------------------------------

def split_bf16x3(b: torch.Tensor) -> torch.Tensor:
    """float32 ``b`` [K, n] (any strides) as bf16 [K, 3n] = [hi | mid | lo] with hi + mid + lo == b
    exactly: hi = bf16(b), mid = bf16(b - hi), lo = bf16(b - hi - mid) (each difference exact in
    float32, lo exact in bf16). One launch on CUDA."""
    return torch.ops.lowrank.split_bf16x3(b)


@torch.library.register_fake("lowrank::split_bf16x3")
def _(b):
    torch._check(b.dim() == 2 and b.dtype == torch.float32,
                 lambda: f"b must be a 2-D float32 tensor, got {b.dtype} {tuple(b.shape)}")
    return b.new_empty((b.shape[0], 3 * b.shape[1]), dtype=torch.bfloat16)


def split_bf16x3_sum(parts: torch.Tensor, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """The other end of a split product: ``parts`` float32 [M, 3n] = a @ split_bf16x3(b) ->
    scale * ((hi part + mid part) + lo part), float32 [M, n], or its transpose [n, M] (contiguous)
    with ``transpose``. One launch on CUDA (what was a reduction, a multiply and a copy)."""
    return torch.ops.lowrank.split_bf16x3_sum(parts, float(scale), bool(transpose))


@torch.library.register_fake("lowrank::split_bf16x3_sum")
def _(parts, scale=1.0, transpose=False):
    torch._check(parts.dim() == 2 and parts.dtype == torch.float32 and parts.shape[1] % 3 == 0,
                 lambda: f"parts must be a 2-D float32 tensor [M, 3 n], got {parts.dtype} {tuple(parts.shape)}")
    m, n = parts.shape[0], parts.shape[1] // 3
    return parts.new_empty((n, m) if transpose else (m, n))
