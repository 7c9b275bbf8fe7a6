"""DoRA's weight norm n = ||W0 + s B A|| per output row, with no [out, in] temporary (issue 5).

DoRA (arXiv 2402.09353) rescales each output row of the adapted weight V = W0 + s B A to a trained
magnitude m: W' = m * V / ||V||_row, and treats n = ||V||_row as a constant in backward. The
obvious way to get n builds V, an [out, in] float32 tensor, at every forward. This module expands
the square instead, per output row o (W0_o, B_o rows of W0 and B, A_k rows of A):

    n_o^2 = ||W0_o||^2 + 2 s (W0_o . (B_o A)) + s^2 ||B_o A||^2
          = w2_o       + 2 s sum_k B_ok P_ok  + s^2 B_o (A A^T) B_o^T,      P = W0 A^T  [out, r]

- w2 = ||W0||^2 per row: W0 is frozen, so it is computed once (``base_row_sq_norm``) and cached by
  the caller; in float64, from row chunks of the weight (a 4-bit weight is dequantized a slice of
  rows at a time, never whole).
- P = W0 A^T: one pass over the weight, the only term that needs one at every call. For a 4-bit
  weight on CUDA it is the fused op ``lowrank::dora_cross_4bit`` (float32, straight from the packed
  codes), elsewhere row chunks of the dequantized weight; for a float weight ``F.linear``. Float32.
- the rest is small: the Gram matrix A A^T [r, r] and the [out, r] products, all in float64.

Cancellation. The expansion is a sum of terms each of size up to (||W0_o|| + t_o)^2, where
t_o = |s| sum_k |B_ok| ||A_k|| bounds s ||B_o A||; when V_o is much shorter than that (B A undoes
W0 on the row), n_o^2 is a small difference of large terms, and the rounding errors of the terms
survive while n_o^2 shrinks. Term by term:

- P_ok comes from a float32 pass: |error| <= U ||W0_o|| ||A_k|| with U = 2^-18 (see U_CROSS), so
  the cross term 2 s sum_k B_ok P_ok is off by at most 2 U ||W0_o|| t_o;
- w2, the Gram form and the sums are float64 over float32/bf16/4-bit inputs that float64 holds
  exactly: off by at most ~2^-40 (||W0_o|| + t_o)^2 (see U_FP64), a bound with a wide margin.

So err(n_o^2) <= E_o = 2 U ||W0_o|| t_o + U_FP64 (||W0_o|| + t_o)^2, and since n = sqrt(n^2), the
relative error of n_o is at most E_o / (2 n_o^2). Rows where that exceeds ``rtol`` (default 1e-4)
are recomputed exactly: their rows of W0 are dequantized (in row windows, never the whole weight),
V_o is formed in float64 and its norm taken. With rtol = 1e-4 and U = 2^-18 a row falls back when
n_o^2 < ||W0_o|| t_o U / rtol ~ 0.038 ||W0_o|| t_o, i.e. only under real cancellation; for
B = 0 (DoRA at init) t = 0 and nothing ever falls back. Checking for flagged rows costs one host
synchronisation per call (``fallback=False`` skips the check and the fallback).

Why rtol = 1e-4: n enters the forward as the scale m / n on every output of the row. PEFT builds V
in float32 and takes its norm, so its n is itself only float32-accurate (~1e-7) where V is
well-conditioned and *its* error grows as ~2^-24 ||W0_o|| / n_o under cancellation (the float32
sum W0 + sBA loses the same digits); 1e-4 is far below the bf16 resolution (2^-8 ~ 4e-3) of the
activations that the scale multiplies, so a 1e-4 error in n is invisible in a bf16 forward and
small next to the noise of training, while the threshold flags only rows with real cancellation.

Why U = 2^-18 = 64 float32 rounding units (2^-24): P_ok = W0_o . A_k is a float32 dot product of
length ``in``. Its worst-case bound (in * 2^-24 relative to ||W0_o|| ||A_k||) is never approached
by real data; a sequential float32 accumulation of correlated products (partial sums growing
linearly) errs by ~ sqrt(in) / 3 units, 64 units up to in ~ 36k, and the CPU GEMM measured for
in = 256..16384 stays under 7 units even for strongly correlated operands (under 2 units on random
DoRA-like inputs). So U is an estimate with a wide margin, not a proof, and it assumes the pass is
true float32 arithmetic. TF32 (CUDA with ``torch.backends.cuda.matmul.allow_tf32``, which
``torch.set_float32_matmul_precision("high")`` sets) rounds both operands to 10 mantissa bits: each
product is then off by <= 2^-10 relative, so |error of P_ok| <= 2^-10 ||W0_o|| ||A_k|| by
Cauchy-Schwarz whatever the data, and U_TF32 = 2^-9 (with the float32 accumulation on top) is used
instead. Rows then fall back ~500x more readily (whenever n_o^2 < ~20 ||W0_o|| t_o, i.e. as soon as
the adapter is a few percent of W0): exact still, but slower; turn TF32 off for this pass, or pass
a larger rtol, to keep the expansion. A fused matmul_4bit that rounds A to bf16 would need
``cross_unit_roundoff`` ~2^-7.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import ops
from .quantized import QuantizedTensor

# Temporaries of one chunk of rows (all of them together) stay under this many bytes. 64 MiB: a
# chunk of a 4096-wide weight is then ~800 rows (for the float64 norms) to ~4000 rows (float32),
# enough for full-size launches on a GPU, while staying small next to any GPU's memory and no more
# than one float32 copy of a 4096 x 4096 weight.
CHUNK_BYTES = 64 * 2**20

RTOL = 1e-4           # target relative error of n (see the module docstring)
U_CROSS = 2.0 ** -18  # error of the float32 pass P = W0 A^T, relative to ||W0_o|| ||A_k||
U_TF32 = 2.0 ** -9    # the same when CUDA float32 matmuls run in TF32
U_FP64 = 2.0 ** -40   # error of the float64 terms, relative to (||W0_o|| + t_o)^2; generous
# The direct norm (ops.dora_row_norm_4bit, CUDA): V_o = W0_o + s B_o A formed per element in float32
# with s B A from 3-way split bf16 tensor-core products (each operand split into three bf16 parts,
# ~2^-24 left over; the products of total order <= 2^-16 kept, the rest ~2^-23 relative; fp32
# accumulation in the tensor cores, ~2^-23 per add), squared and summed in float32 per 64 columns,
# then in float64. Per element |error of (s B A)_ok| <= U_ROW_NORM sum_j |s B_oj| |A_jk| with
# U_ROW_NORM = 2^-19 (a margin of ~8x over those terms), so by Cauchy-Schwarz the relative error
# of n_o is <= U_ROW_NORM (t_o / n_o + 1) (the + 1 covers the float32 sums); rows where that
# exceeds rtol (t_o > ~50 n_o: the adapter undoes W0 on the row) are flagged and recomputed
# exactly, as for the expansion. No cancellation between large terms happens here: V is formed
# first, then squared.
U_ROW_NORM = 2.0 ** -19
# Up to this rank, on CUDA, for a 4-bit weight with in_features % 64 == 0: the direct norm (one
# pass over the packed weight on the tensor cores; ncu 86 us at 14336 x 4096 r = 16 on the H100
# against 218 us for dora_cross_4bit + dora_norm). Tests set ROW_NORM_ON_CPU to take the op on CPU.
ROW_NORM_MAX_RANK = 16
ROW_NORM_MAX_ELEMENTS = 2**31  # its kernel's index math is 32-bit
ROW_NORM_ON_CPU = False


def _shape(weight) -> tuple[int, int]:
    if isinstance(weight, QuantizedTensor):
        if len(weight.shape) != 2:
            raise ValueError(f"dora: the 4-bit weight must be 2-D [out, in], got shape {list(weight.shape)}")
        return tuple(weight.shape)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("dora: the base weight must be a 2-D float tensor [out, in] or a 2-D QuantizedTensor, "
                         f"got {type(weight).__name__} {getattr(weight, 'shape', '')}")
    return tuple(weight.shape)


def default_cross_unit_roundoff(device: torch.device) -> float:
    """U for the pass P = W0 A^T on ``device``: U_TF32 where CUDA float32 matmuls may use TF32,
    U_CROSS otherwise (see the module docstring)."""
    if torch.device(device).type != "cuda":
        return U_CROSS
    try:
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses to answer when its legacy and new precision APIs were mixed
        tf32 = True
    return U_TF32 if tf32 else U_CROSS


def _rows_per_chunk(in_features: int, bytes_per_element: int, chunk_bytes: int | None) -> int:
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, budget // (bytes_per_element * in_features))


def dequantize_rows(q: QuantizedTensor, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, stop) of a 2-D 4-bit weight, dequantized to ``dtype`` ([stop - start, in]),
    equal bit for bit to ``q.dequantize(dtype)[start:stop]``, without dequantizing the rest.

    The weight is quantized as its flat row-major array, in blocks of ``blocksize`` elements that
    may straddle rows (when in % blocksize != 0), and a double-quantized absmax is itself coded in
    blocks of ``nested_blocksize`` absmax values. So the kernel is run on the smallest flat range
    that starts on a block boundary (on a nested-block boundary with double quantization: at most
    blocksize * nested_blocksize - 1 extra elements before the rows, 16383 for 64 x 256) and ends
    on a block boundary or the end, and the rows are cut out of it."""
    out_features, in_features = q.shape
    if not 0 <= start < stop <= out_features:
        raise ValueError(f"dequantize_rows: need 0 <= start < stop <= {out_features}, got [{start}, {stop})")
    n, bs = q.numel(), q.blocksize
    align = bs * q.nested_blocksize if q.double_quant else bs
    first = start * in_features // align * align           # flat index where the kernel starts
    last = min(-(-stop * in_features // bs) * bs, n)         # and ends (exclusive)
    numel = last - first
    packed = q.packed.reshape(-1)[first // 2: first // 2 + (numel + 1) // 2]  # first is even
    block0, block1 = first // bs, -(-last // bs)                               # absmax [block0, block1)
    absmax = q.absmax[block0:block1]
    if q.double_quant:
        nbs = q.nested_blocksize
        nested_absmax = q.nested_absmax[block0 // nbs: -(-block1 // nbs)]      # block0 % nbs == 0
        flat = ops.dequantize_4bit_nested(packed, absmax, nested_absmax, q.nested_quant_map, q.nested_offset,
                                          q.quant_map, bs, nbs, numel, dtype)
    else:
        flat = ops.dequantize_4bit(packed, absmax, q.quant_map, bs, numel, dtype)
    return flat[start * in_features - first: stop * in_features - first].view(stop - start, in_features)


def _rows_float64(weight, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of W0 in float64 (a 4-bit weight dequantized to float32 first, as
    ``LoraLinear.base_weight_fp32``; float64 holds float32, fp16 and bf16 values exactly)."""
    if isinstance(weight, QuantizedTensor):
        return dequantize_rows(weight, start, stop, torch.float32).double()
    return weight.detach()[start:stop].double()


@torch.no_grad()
def base_row_sq_norm(weight, chunk_bytes: int | None = None) -> torch.Tensor:
    """||W0||^2 per output row, float64 [out], for a float weight [out, in] or a 2-D QuantizedTensor
    (dequantized to float32, as ``LoraLinear.base_weight_fp32``). Computed over chunks of rows whose
    temporaries (float32 slice, its float64 copy and the squares: 20 bytes per element) stay under
    ``chunk_bytes`` (default CHUNK_BYTES), so no [out, in] tensor is ever built."""
    out_features, in_features = _shape(weight)
    device = weight.device
    rows = _rows_per_chunk(in_features, 20, chunk_bytes)
    result = torch.empty(out_features, dtype=torch.float64, device=device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        w = _rows_float64(weight, start, stop)
        result[start:stop] = (w * w).sum(dim=1)
    return result


@torch.no_grad()
def _split_cross_applies(weight) -> bool:
    """Whether the pass P = W0 A^T over a float base runs as a bf16 GEMM against a 3-way bf16 split of
    A (lora_function._mm_f32: float32-exact products, float32 accumulation): a bf16 W0 on CUDA.
    Its error is float32 accumulation's whatever TF32 says, so U_CROSS holds."""
    from .lora_function import _split_mm_enabled
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.bfloat16
            and _split_mm_enabled(weight))


def base_times_adapter(weight, lora_A: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """P^T = A W0^T, float32 [r, out]: the one pass over the base weight.

    4-bit weight: on CUDA the fused op ``lowrank::dora_cross_4bit`` (float32 straight from the packed
    codes, one read of W0); elsewhere float32 row chunks dequantized by ``dequantize_rows``
    (matmul_4bit's float32 path would dequantize the whole weight into one [out, in] float32
    temporary, and its fused kernel rounds the code values to 16 bits, too coarse for the cross term:
    see U_CROSS).
    float32/float64 weight: ``F.linear`` on the weight as it is. bf16 weight on CUDA: one bf16 GEMM
    against A split into three bf16 parts (float32-exact products, ``_split_cross_applies``).
    Other fp16/bf16 weights: float32 row chunks of W0 (a [chunk, in] copy under ``chunk_bytes``),
    since rounding A to the weight's dtype would cost the cross term its accuracy."""
    out_features, in_features = _shape(weight)
    a = lora_A.detach()
    if isinstance(weight, QuantizedTensor):
        a = a.float()
        if weight.device.type == "cuda" and in_features % 4 == 0 and a.shape[0] <= 64:
            q = weight  # the fused kernel: straight from the packed codes, float32, one read of W0
            return ops.dora_cross_4bit(q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                       q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize,
                                       out_features, in_features, a).t()
        rows = _rows_per_chunk(in_features, 4, chunk_bytes)
        result = torch.empty(a.shape[0], out_features, dtype=torch.float32, device=a.device)
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            result[:, start:stop] = F.linear(a, dequantize_rows(weight, start, stop))
        return result
    w = weight.detach()
    if w.dtype in (torch.float32, torch.float64):
        return F.linear(a.to(w.dtype), w).float()
    a = a.float()
    if _split_cross_applies(w):
        # W0 A^T against A split into three bf16 parts: each product exact, accumulated in float32
        # on the tensor cores, one read of W0 (H100, 14336 x 4096, r = 16: the float32 row chunks
        # took 193 us to copy W0 to float32 and 217 us for the float32 GEMM)
        from .lora_function import _mm_f32
        return _mm_f32(w, a.t(), transpose=True)
    rows = _rows_per_chunk(in_features, 4, chunk_bytes)
    if rows >= out_features:
        return F.linear(a, w.float())
    result = torch.empty(a.shape[0], out_features, dtype=torch.float32, device=w.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        result[:, start:stop] = F.linear(a, w[start:stop].float())
    return result


@torch.no_grad()
def expanded_row_sq_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                         base_sq_norm: torch.Tensor | None = None, chunk_bytes: int | None = None,
                         cross_unit_roundoff: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The expansion alone: (n^2, E), both float64 [out]: n^2 = ||W0 + s B A||^2 per row from the
    expansion, and E a bound on its error (see the module docstring), computed with U =
    ``cross_unit_roundoff`` (default: ``default_cross_unit_roundoff(weight.device)``). No fallback."""
    out_features, in_features = _shape(weight)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != in_features or \
            lora_B.shape[0] != out_features or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"dora: lora_A must be [r, {in_features}] and lora_B [{out_features}, r], got "
                         f"{list(lora_A.shape)} and {list(lora_B.shape)}")
    if base_sq_norm is None:
        base_sq_norm = base_row_sq_norm(weight, chunk_bytes)
    w2 = base_sq_norm.to(torch.float64)
    a = lora_A.detach().double()
    b = lora_B.detach().double()
    s = float(scaling)
    cross = (b * base_times_adapter(weight, lora_A, chunk_bytes).t().double()).sum(dim=1)  # W0_o . (B_o A)
    gram = a @ a.t()                                                                       # A A^T [r, r]
    delta2 = ((b @ gram) * b).sum(dim=1).clamp_min(0)                                      # ||B_o A||^2
    n2 = w2 + 2 * s * cross + s * s * delta2
    w = w2.sqrt()
    t = abs(s) * (b.abs() @ a.norm(dim=1))                                                 # >= |s| ||B_o A||
    if cross_unit_roundoff is None:
        cross_unit_roundoff = default_cross_unit_roundoff(weight.device)
    bound = 2 * cross_unit_roundoff * w * t + U_FP64 * (w + t) ** 2
    return n2, bound


def _flagged_windows(rows: list[int], max_rows: int, max_gap: int):
    """Group sorted row indices into windows [start, stop) of at most ``max_rows`` rows, bridging
    gaps of at most ``max_gap`` unflagged rows (cheaper to dequantize than another launch)."""
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] - rows[j] <= max_gap + 1 and rows[j + 1] < rows[i] + max_rows:
            j += 1
        yield rows[i], rows[j] + 1, rows[i:j + 1]
        i = j + 1


@torch.no_grad()
def exact_row_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, rows,
                   chunk_bytes: int | None = None) -> torch.Tensor:
    """||W0_o + s B_o A|| for the given rows o only, float64 [len(rows)], by forming those rows of V
    in float64 (W0's rows dequantized in windows of rows: never the whole weight)."""
    out_features, in_features = _shape(weight)
    rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).tolist()
    device = weight.device
    result = torch.empty(len(rows), dtype=torch.float64, device=device)
    if not rows:
        return result
    order = sorted(range(len(rows)), key=rows.__getitem__)
    sorted_rows = [rows[i] for i in order]
    a = lora_A.detach().double()
    b = lora_B.detach().double()
    s = float(scaling)
    # a window's temporaries: its float32 slice (4 bytes per element), then per flagged row the
    # float64 row of W0 and of s B A (16 bytes)
    max_rows = _rows_per_chunk(in_features, 20, chunk_bytes)
    pos = 0
    for start, stop, group in _flagged_windows(sorted_rows, max_rows, max_gap=16):
        index = torch.tensor(group, device=device)
        if isinstance(weight, QuantizedTensor):
            v = dequantize_rows(weight, start, stop, torch.float32).index_select(0, index - start).double()
        else:
            v = weight.detach().index_select(0, index).double()
        v += s * (b[index] @ a)
        norms = torch.linalg.vector_norm(v, dim=1)
        idx = torch.tensor(order[pos: pos + len(group)], device=device)
        result[idx] = norms
        pos += len(group)
    return result


@torch.no_grad()
def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     base_sq_norm: torch.Tensor | None = None, rtol: float = RTOL, fallback: bool = True,
                     chunk_bytes: int | None = None, cross_unit_roundoff: float | None = None) -> torch.Tensor:
    """n = ||W0 + s B A|| per output row, float32 [out], detached, with no [out, in] temporary.

    weight: the base weight W0, a float tensor [out, in] (nn.Linear's weight) or a 2-D
    QuantizedTensor; lora_A [r, in], lora_B [out, r]; scaling s. base_sq_norm: ||W0||^2 per row
    (``base_row_sq_norm(weight)``), to pass when cached; computed here otherwise.
    Rows whose expansion may be off by more than ``rtol`` (relative) are recomputed exactly
    (``fallback=False`` skips that, and the host synchronisation it needs). See the module docstring."""
    n, flagged = dora_weight_norm_flagged(weight, lora_A, lora_B, scaling, base_sq_norm, rtol, chunk_bytes,
                                          cross_unit_roundoff)
    if fallback and bool(flagged.any()):
        n = fix_flagged_rows(n, flagged, weight, lora_A, lora_B, scaling, chunk_bytes)
    return n


def _row_norm_applies(weight, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether ``dora_weight_norm_flagged`` takes the direct norm (ops.dora_row_norm_4bit): a 2-D
    4-bit weight on CUDA (or ROW_NORM_ON_CPU), r <= ROW_NORM_MAX_RANK, in_features % 64 == 0,
    blocksize >= 16, fewer than 2^31 weights. LOWRANK_ROW_NORM=0 turns it off (the expansion then)."""
    if not isinstance(weight, QuantizedTensor) or len(weight.shape) != 2:
        return False
    if weight.device.type != "cuda" and not ROW_NORM_ON_CPU:
        return False
    if os.environ.get("LOWRANK_ROW_NORM", "1") == "0":
        return False
    out_features, in_features = weight.shape
    return (lora_A.dim() == 2 and lora_B.dim() == 2 and lora_A.shape[1] == in_features and
            lora_B.shape == (out_features, lora_A.shape[0]) and 1 <= lora_A.shape[0] <= ROW_NORM_MAX_RANK and
            in_features % 64 == 0 and weight.blocksize >= 16 and out_features * in_features < ROW_NORM_MAX_ELEMENTS)


def _row_norm_op(q: QuantizedTensor, lora_A, lora_B, scaling: float, rtol: float, magnitude=None):
    out_features, in_features = q.shape
    return ops.dora_row_norm_4bit(q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                  q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize, out_features,
                                  in_features, lora_A.detach().float(), lora_B.detach().float(), scaling,
                                  U_ROW_NORM, rtol, magnitude)


@torch.no_grad()
def dora_weight_norm_flagged(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             base_sq_norm: torch.Tensor | None = None, rtol: float = RTOL,
                             chunk_bytes: int | None = None,
                             cross_unit_roundoff: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The expansion's n (float32 [out]) and the rows it may get wrong by more than ``rtol``
    (bool [out]), with no host synchronisation: the caller decides when to look at the flags
    (``LoraLinear`` looks after the layer's GEMMs are queued) and fixes them with
    ``fix_flagged_rows``."""
    out_features, in_features = _shape(weight)
    r = lora_A.shape[0] if lora_A.dim() == 2 else 0
    if _row_norm_applies(weight, lora_A, lora_B):
        return _row_norm_op(weight, lora_A, lora_B, scaling, rtol)[:2]
    if (lora_A.dim() == 2 and lora_B.dim() == 2 and lora_A.shape[1] == in_features and
            lora_B.shape == (out_features, r) and (weight.device.type != "cuda" or r <= 64)):
        # the per-row steps of expanded_row_sq_norm in one op (ops.dora_norm: the same float64
        # formulas, one launch instead of ~30)
        if base_sq_norm is None:
            base_sq_norm = base_row_sq_norm(weight, chunk_bytes)
        if cross_unit_roundoff is None:
            cross_unit_roundoff = U_CROSS if _split_cross_applies(weight) else default_cross_unit_roundoff(weight.device)
        p = base_times_adapter(weight, lora_A, chunk_bytes).t()
        return ops.dora_norm(base_sq_norm.to(torch.float64), p, lora_A.detach().float(), lora_B.detach().float(),
                             scaling, cross_unit_roundoff, U_FP64, rtol)
    n2, bound = expanded_row_sq_norm(weight, lora_A, lora_B, scaling, base_sq_norm, chunk_bytes,
                                     cross_unit_roundoff)
    flagged = bound > (2 * rtol) * n2  # also every row with n2 <= 0 unless it is exactly 0
    return n2.clamp_min(0).sqrt().float(), flagged


@torch.no_grad()
def fix_flagged_rows(n: torch.Tensor, flagged: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, chunk_bytes: int | None = None) -> torch.Tensor:
    """n with its flagged rows recomputed exactly (``exact_row_norm``); a new tensor."""
    rows = flagged.nonzero().reshape(-1)
    n = n.clone()
    n[rows] = exact_row_norm(weight, lora_A, lora_B, scaling, rows.cpu(), chunk_bytes).float()
    return n


@torch.no_grad()
def dora_row_scale(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor,
                   base_sq_norm: torch.Tensor | None = None, rtol: float = RTOL, chunk_bytes: int | None = None,
                   cross_unit_roundoff: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a DoRA forward needs before its GEMM, with no host synchronisation: (n, flagged, v,
    status). n and flagged as ``dora_weight_norm_flagged``; v = m / n float32 [out] (m = ``magnitude``
    detached, in float32); status int32 [1] on n's device: bit ``ops.ROW_NORM_STATUS_FLAGGED`` set when
    some row is flagged, bit ``ops.ROW_NORM_STATUS_ZERO_MAGNITUDE`` when some m is 0. The direct norm
    (ops.dora_row_norm_4bit) computes v and status in its finishing launch (on the H100 the flags'
    any(), m / n and m == 0's test were five more launches, ~11 us); elsewhere they are PyTorch ops."""
    m = magnitude.detach().float()
    if _row_norm_applies(weight, lora_A, lora_B):
        return _row_norm_op(weight, lora_A, lora_B, scaling, rtol, m)
    n, flagged = dora_weight_norm_flagged(weight, lora_A, lora_B, scaling, base_sq_norm, rtol, chunk_bytes,
                                          cross_unit_roundoff)
    status = (flagged.any().int() * ops.ROW_NORM_STATUS_FLAGGED +
              (m == 0).any().int() * ops.ROW_NORM_STATUS_ZERO_MAGNITUDE).reshape(1)
    return n, flagged, m / n, status
