"""LoRA and DoRA forward + backward as one autograd function that keeps memory lean.

The reference path (LoraLinear.forward_reference, PEFT's formulation) casts x to float32 for the
adapter branch and builds the low-rank term as [M, out] float32 temporaries: at M = 8192 tokens of a
14336 x 4096 projection that is 1.4 GB of temporaries (PEFT measures 1410 MB above the inputs). This
function computes the same math in x's compute dtype with fp32 accumulation (cuBLAS / the backend's
matmul) and keeps only what the backward needs:

    forward   h = x' A^T                      [M, r]      x' = dropout(x), mask from a seed
              4-bit base, no dropout (or DoRA's u of x'), M > 16 on CUDA: y = x W'^T (+ bias),
                one cuBLAS GEMM against the merged weight W' = v (W0 + s B A) that
                ops.lora_merge_4bit builds from the packed codes in one launch (each element
                rounded once to x's dtype)
              DoRA on a 16-bit float base, M > 16 on CUDA: the same with W' built from W0 by
                ops.lora_merge_dense (no y *= v, no W v in backward)
              otherwise y = s h B^T (+ bias), then y += x W^T by cuBLAS with y as its C operand
                (beta = 1); M <= 16 on a 4-bit base: the fused skinny kernel first, then
                y += s h B^T
    DoRA      y = v * (x W^T + s h B^T) + bias, v = m / n (n detached), v in float32: for a 4-bit
              base folded into the weight (W', or each block's absmax) and into B; for a float
              base y is scaled in place. (v rounded to bf16 on its own would put one relative
              error on a whole output column, and dm sums that column.)
    DoRA under dropout (PEFT: the scaled base term sees x')
              y = x W^T + (v - 1) (x' W^T) + v s h B^T + bias = u + (x - x') W^T + bias,
              u = v (x' W^T + s h B^T): the paths above with x' as input, then one GEMM more
    saved     x, h (not with the merged weight: the backward forms it), the dropout seed (the
              mask is regenerated), and for DoRA the output y (u under dropout; for dm) and v; for a
              4-bit base only the packed weight
    backward  g  = dY B_v                      [M, r] fp32 B_v = v * B for DoRA, B for LoRA
              (bf16 on CUDA, out % 64 == 0, r <= 16: g, dY^T h and DoRA's sum_M(dY * y) from one
              read of dY and y, ops.lora_dy_products)
              dX = dY W' (merged), or s g A first and the big GEMM adds (v dY) W into it
              dB = s v * (dY^T h),  dA = s g^T x',  DoRA: dm = sum_M(dY * y) / m, y bias-free.
              DoRA under dropout: dX = k (dY W'') + (1 - k) (dY W) with k = keep / (1 - p) and
              dY W'' the dX above (y = u, no mask); dY W by matmul_4bit's backward op.
    merged weight on CUDA: the backward runs h, the dY products and dA on a second stream
              while the merge and dX's GEMM (on a high-priority stream) run on theirs (see
              _side_stream_applies)
    bf16 on CUDA: the adapter products (h, g, dY^T h, x'^T g) are cuBLAS GEMMs against a 3-way bf16
    split of their float32 side (float32-exact, ``_mm_f32``), and sum_M(dY * y) one streaming
    kernel; elsewhere the CUDA-core kernels lora_project / lora_column_reduce (one read of dY and y
    for both reductions) and on CPU PyTorch ops.

Why the merged weight (H100, M = 8192, 14336 x 4096, r = 16): writing y = s h B^T first and reading
it back as the GEMM's C operand cost ~140 us in the forward and ~60 us in dX; the merge adds ~16
FMA per weight to the dequantization the GEMMs need anyway. Rounding W' once puts the same
relative error (2^-9 in bf16) on v (W0 + s B A) that the dequantization puts on W0.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import ops
from .quantized import QuantizedTensor


def draw_seed() -> int:
    """A dropout seed from torch's global generator (so torch.manual_seed makes runs repeatable)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def dropout_keep_mask(seed: int, shape, p: float, device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The dropout keep-mask drawn from ``seed``, 1 (kept) or 0 in ``dtype``: the same mask in forward
    and backward (and the same for a given seed, shape, device and dtype). The layer draws it in
    x's dtype, straight from bernoulli_: its products with x and dX are then one vectorized kernel
    each (a bool mask times bf16 took 119 us for [8192, 4096] on the H100, an unvectorized
    mixed-dtype kernel; uniform floats and a compare moved 9 bytes per element)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=g)


# Rows of x up to which the 4-bit base's GEMM goes through matmul_4bit's op (its fused skinny
# kernel takes M <= 16 on CUDA); above, the weight is dequantized here and the low-rank term enters
# cuBLAS's GEMM as its C operand (beta = 1) instead of a second pass over y (H100, M = 8192,
# 14336 x 4096: 1.36 ms vs 1.58 ms for y = x W^T then y += s h B^T; the bare GEMM 1.22 ms).
SKINNY_MAX_M = 16


def _split_mm_enabled(t: torch.Tensor) -> bool:
    """Whether the adapter products of ``t`` (a bf16 CUDA operand) go through cuBLAS with a 3-way
    split of their float32 side (``_mm_f32``); LOWRANK_SPLIT_MM=0 turns it off (the CUDA-core kernels
    lora_project / lora_column_reduce then do them)."""
    global _SPLIT_MM
    if t.device.type != "cuda" or t.dtype != torch.bfloat16:
        return False
    if _SPLIT_MM is None:
        if os.environ.get("LOWRANK_SPLIT_MM", "1") == "0":
            _SPLIT_MM = False
        else:
            try:  # torch.mm(..., out_dtype=float32) with bf16 operands (aten::mm.dtype, CUDA)
                probe = torch.ones(16, 16, device=t.device, dtype=torch.bfloat16)
                _SPLIT_MM = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError, NotImplementedError):
                _SPLIT_MM = False
    return _SPLIT_MM


_SPLIT_MM = None


def _mm_f32(a16: torch.Tensor, b32: torch.Tensor, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """a16 [M, K] (bf16) @ b32 [K, n] (float32) -> float32 [M, n], to float32 accuracy on the tensor
    cores: b32 = hi + mid + lo exactly (three bf16 parts of 8 significant bits each hold float32's
    24), each product of bf16 values is exact in the float32 accumulator, so one cuBLAS GEMM against
    [hi | mid | lo] and the sum of its three column blocks is the float32 product. Why: the adapter
    products are memory-bound reads of x or dY with a 16-wide other side; on the H100 the CUDA-core
    kernels took 246 us for dY B and 438 us for dY^T h at M = 8192, N = 14336 where one read of dY
    is 78 us (cuBLAS at 3 x 16 columns reads it once too). The three column blocks are added (and
    times ``scale``, transposed with ``transpose``) by ops.split_bf16x3_sum in one launch."""
    out = torch.mm(a16, ops.split_bf16x3(b32), out_dtype=torch.float32)
    return ops.split_bf16x3_sum(out, scale, transpose)


def _project(x16: torch.Tensor, b32: torch.Tensor) -> torch.Tensor:
    """x16 [M, K] @ b32 [K, r] in float32: h = x' A^T, g = dY B_v."""
    if _split_mm_enabled(x16):
        return _mm_f32(x16, b32)
    return ops.lora_project(x16, b32.t().contiguous())


def _dy_products_applies(dy2: torch.Tensor, r: int) -> bool:
    """Whether the backward takes g, dY^T h and sum_M(dY * y) from one op (ops.lora_dy_products, one
    read of dY): bf16 on CUDA, out_features % 64 == 0, r <= 16 (its tensor-core kernel; elsewhere
    the op is PyTorch ops, no better than the separate products). LOWRANK_DY_FUSED=0 turns it off."""
    return (dy2.is_cuda and dy2.dtype == torch.bfloat16 and dy2.shape[1] % 64 == 0 and 1 <= r <= 16
            and os.environ.get("LOWRANK_DY_FUSED", "1") != "0")


def _reduce_rows(a16: torch.Tensor, b32: torch.Tensor, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """scale * a16 [M, N]^T @ b32 [M, r] in float32 [N, r], or its transpose [r, N] (contiguous):
    dY^T h (dB), s (x'^T g)^T (dA)."""
    if _split_mm_enabled(a16):
        return _mm_f32(a16.t(), b32, scale, transpose)
    out = ops.lora_column_reduce(a16, b32, None)[0]
    out = out * scale if scale != 1.0 else out
    return out.t().contiguous() if transpose else out


def _dequantized(quant: QuantizedTensor, dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit base weight [out, in] in ``dtype`` (a temporary). With ``row_scale`` (DoRA's v,
    float32 [out]): v folded into each block's float32 absmax, so an element is value * (absmax v)
    rounded once to ``dtype``, in the one dequantize launch the weight costs anyway (an in-place
    W *= v took 386 us on the H100 at 14336 x 4096, a non-vectorized mixed-dtype kernel). Blocks
    must not straddle rows (in % blocksize == 0; else a float32 temporary does it)."""
    if row_scale is None:
        return quant.dequantize(dtype)
    n_out, n_in = quant.shape
    if n_in % quant.blocksize != 0:
        return (quant.dequantize(torch.float32) * row_scale[:, None]).to(dtype)
    absmax = (quant.float_absmax().view(n_out, n_in // quant.blocksize) * row_scale[:, None]).reshape(-1)
    return ops.dequantize_4bit(quant.packed.reshape(-1), absmax, quant.quant_map, quant.blocksize, quant.numel(),
                               dtype).view(n_out, n_in)


# The merged weight (ops.lora_merge_4bit) runs on CUDA only: the CPU op is a scalar loop (the
# exact arithmetic, for tests), slower there than the unmerged PyTorch path. Tests set this True to
# run the merged path on CPU.
MERGE_ON_CPU = False
# Up to this rank: a 16-bit merge takes the tensor-core kernel (merge_mma.cu, r <= 16: ncu 81 us at
# 14336 x 4096 on the H100; the plain dequantize writes the same 117 MB). Above it the float32-FMA
# kernel (instruction-bound: 294-311 us at r = 32) costs more than the merge saves (y's first write
# and C read, dX's too: ~0.2 ms a step; at r = 16 the FMA kernel's 158 us about cancelled it).
MERGE_MAX_RANK = 16


def _merge_applies(x2: torch.Tensor, quant, lora_A: torch.Tensor, dropout_p: float) -> bool:
    """Whether both big GEMMs take the merged weight W' = v (W0 + s B A) (``_merged``): a 4-bit
    base, no dropout (x' = x, so x W^T + s x' A^T B^T = x W'^T), M > SKINNY_MAX_M on CUDA, and
    in_features % 4 == 0 and r <= MERGE_MAX_RANK. LOWRANK_MERGE=0 turns it off."""
    if quant is None or dropout_p > 0 or os.environ.get("LOWRANK_MERGE", "1") == "0":
        return False
    if x2.is_cuda:
        if x2.shape[0] <= SKINNY_MAX_M:
            return False
    elif not MERGE_ON_CPU:
        return False
    return quant.shape[1] % 4 == 0 and lora_A.shape[0] <= MERGE_MAX_RANK and len(quant.shape) == 2


# A float base (a bf16/fp16 nn.Linear) takes the merged weight too (ops.lora_merge_dense) under DoRA:
# without it the forward ends in y *= v and the backward forms W v for dX, both mixed-dtype
# products with the float32 v (a [14336, 4096] W *= v took 386 us on the H100; the DoRA layer on a
# bf16 base ran 4.10 ms against QDoRA's 2.92 at M = 8192, 14336 x 4096). LoRA on a float base keeps
# y = s h B^T + x W^T (C operand): the merge writes and reads an [out, in] copy it does not need.
# LOWRANK_MERGE_DENSE=all merges for LoRA too (A/B), =0 never.
def _dense_merge_applies(x2: torch.Tensor, weight, lora_A: torch.Tensor, dropout_p: float, dora: bool,
                         backward: bool) -> bool:
    """Whether both big GEMMs take W' = v (W0 + s B A) built from a float base ``weight`` by
    ops.lora_merge_dense: DoRA (see LOWRANK_MERGE_DENSE), no dropout, W0 in x's dtype, on CUDA
    float16/bfloat16 with in_features % 64 == 0, r <= 16 and M > SKINNY_MAX_M; without a backward
    only from M >= in_features / 4 (below, y *= v costs less than writing and reading W')."""
    if weight is None or dropout_p > 0 or os.environ.get("LOWRANK_MERGE", "1") == "0":
        return False
    mode = os.environ.get("LOWRANK_MERGE_DENSE", "dora")
    if mode == "0" or (mode != "all" and not dora) or weight.dim() != 2 or weight.dtype != x2.dtype:
        return False
    n_out, k_in = weight.shape
    r, m_rows = lora_A.shape[0], x2.shape[0]
    if not backward and 4 * m_rows < k_in:
        return False
    if x2.is_cuda:
        return (m_rows > SKINNY_MAX_M and x2.dtype in (torch.float16, torch.bfloat16) and k_in % 64 == 0
                and r <= MERGE_MAX_RANK and n_out * k_in < 2**31)
    return MERGE_ON_CPU and r <= MERGE_MAX_RANK


def _merged_dense(weight: torch.Tensor, lora_A, lora_B, scaling: float, v) -> torch.Tensor:
    """W' = round(v (W0 + s B A)) [out, in] in W0's dtype from a float W0, one launch on CUDA."""
    return ops.lora_merge_dense(weight.detach(), lora_A.detach().float(), lora_B.detach().float(), v, scaling)


def _merged(quant: QuantizedTensor, lora_A, lora_B, scaling: float, v, dtype) -> torch.Tensor:
    """W' = round(v (W0 + s B A)) [out, in] in ``dtype`` from the packed weight in one launch:
    each element rounded once (the low-rank sum is float32; v, when given, in float32 before the
    rounding, as ``_dequantized``)."""
    q = quant
    return ops.lora_merge_4bit(q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset,
                               q.quant_map, q.blocksize, q.nested_blocksize, q.shape[0], q.shape[1],
                               lora_A.detach().float(), lora_B.detach().float(), v, scaling, dtype)


# The merged weight's two big GEMMs go through ops.mm_tuned: on CUDA the cuBLASLt algorithm that
# measured fastest for the shape (H100, M = 8192, 14336 x 4096: the forward's x W'^T 0.94x torch.mm's
# time, the QLoRA step 1.085x the floor against 1.105x; csrc/gemm/mm_tuned_cuda.cpp).
def _gemm_x_wt(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The forward's big GEMM against the merged weight: x W'^T (+ bias) [M, out]."""
    return ops.mm_tuned(x2, w, True, bias)


def _gemm_dy_w(dy2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The backward's big GEMM against the merged weight: dY W' [M, in]."""
    return ops.mm_tuned(dy2, w, False)


def _base_weight(weight, quant, dtype):
    """The base weight [out, in] in ``dtype`` (a temporary for a 4-bit base)."""
    if quant is not None:
        return quant.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _base_matmul(x2, weight, quant, bias):
    if quant is not None:
        return ops.matmul_4bit(x2, quant.packed.reshape(-1), quant.absmax, quant.nested_absmax,
                               quant.nested_quant_map, quant.nested_offset, quant.quant_map, quant.blocksize,
                               quant.nested_blocksize, quant.shape[0], quant.shape[1], bias, "auto")
    return F.linear(x2, weight, bias)


def _grad_input_operands(dy2, v, weight, quant, cd):
    """(lhs, rhs) with lhs @ rhs = dY diag(v) W in x's dtype (v = None: dY W), v in float32 with one
    rounding of the scaled operand and no float32 temporary: a 4-bit base's weight is dequantized
    with v folded in (``_dequantized``); a float base puts v into whichever of W [out, in] and
    dY [M, out] is smaller. (The H100 bench measured 898 MB above inputs for QDoRA at M = 8192,
    14336 x 4096 when dY v was built in float32: [M, out] x 4 bytes = 470 MB of it.)"""
    if quant is not None:
        return dy2, _dequantized(quant, cd, v)
    w = _base_weight(weight, None, cd)
    if v is None:
        return dy2, w
    if w.shape[1] <= dy2.shape[0]:  # in <= M: the weight is the smaller operand
        return dy2, torch.mul(w, v[:, None], out=torch.empty_like(w))
    return torch.mul(dy2, v, out=torch.empty_like(dy2)), w


def _add_base_term(u, c, weight, quant, cd):
    """u + c W0^T as a new tensor (u [M, out] is kept): cuBLAS with u as its C operand (one
    rounding of the sum) against the base weight, dequantized into a temporary for a 4-bit base
    with many rows on CUDA; a 4-bit base with few rows on CUDA (the fused skinny kernel: no
    [out, in] copy), or on CPU, goes through matmul_4bit's op and one add."""
    if quant is not None and (not c.is_cuda or c.shape[0] <= SKINNY_MAX_M):
        return torch.add(u, _base_matmul(c, None, quant, None))
    w = _base_weight(weight, quant, cd)
    return torch.addmm(u, c, w.t())


def _base_grad_input(dy2, weight, quant, cd):
    """dY W0 [M, in] in x's dtype: matmul_4bit's backward op for a 4-bit base (its dispatch rule:
    fused kernels for few rows, else the weight dequantized again), the weight as it is otherwise."""
    if quant is not None:
        return ops.matmul_4bit_grad_x(dy2, quant.packed.reshape(-1), quant.absmax, quant.nested_absmax,
                                      quant.nested_quant_map, quant.nested_offset, quant.quant_map, quant.blocksize,
                                      quant.nested_blocksize, quant.shape[0], quant.shape[1], "auto")
    return dy2 @ _base_weight(weight, None, cd)


# The smallest M * out * in whose merged-weight GEMMs take the streams below: 2^38, a GEMM of
# ~0.7 ms on the H100 (bench_lora's 14336 x 4096 layer at M = 8192: 4.8e11). The streams cost host
# time (stream switches, cuBLAS's handle moved between streams, the joins: a QLoRA step 1.46-1.51
# ms of host time against 0.99-1.09 on one stream), which a 4096 x 4096 layer at M = 8192 (two
# GEMMs of ~0.34 ms, host-bound already) pays in full: 1.65 ms per back-to-back step against 0.94.
SIDE_STREAM_MIN_MNK = 2**38


def _side_stream_applies(t: torch.Tensor, n_out: int, k_in: int) -> bool:
    """Whether the merged weight's GEMMs run on a high-priority stream with the adapter products on
    a second stream queued behind them: on CUDA, not while torch.compile traces, for M * n_out *
    k_in >= SIDE_STREAM_MIN_MNK (M = t's rows). LOWRANK_LORA_STREAMS (read per call): 0 never,
    all at every size. Forward: h = x A^T after the GEMM. Backward: the dY
    products beside the merge (h formed first when the forward did not), dA after dX's GEMM and
    the merge. A kernel queued behind a GEMM on a lower-priority stream gets only the SMs the
    GEMM's CTAs leave, i.e. its last round of tiles: the forward's (2912 tiles of 320 x 128 on
    132 SMs at M = 8192, 14336 x 4096: the 23rd round 6% full) takes all of h, dX's (1024 tiles,
    the 8th round 76% full) takes dA.

    Why (H100, bench_lora's QLoRA layer, M = 8192, 14336 x 4096, r = 16; scripts/ab_qdora_env.py,
    one process, each call's ratio to a floor call of its round;
    benchmarks/results/experiments/lora_streams_2026-11-24.txt): one stream 1.1385x the floor,
    h, dY products and dA on the side stream in the backward 1.1157x (means of 4 runs; QDoRA
    1.1930x -> 1.1817x); h in the forward's last round and dA waiting for the merge 1.1129x
    against 1.1221x in one run (QDoRA 1.1632x against 1.1744x). Tried and not kept: the side
    chain on the 4 SMs that cuBLAS leaves at cublasSetSmCountTarget(128) through all of the GEMM
    (there the dY products ran at ~12 GB/s per SM against ~18 with the whole GPU), the merge and
    the dY products capped to share every SM, the GEMM waiting for the dY products, dA beside the
    merge (it slowed the merge, which gates dX's GEMM), dA through the dY products kernel on x."""
    mode = os.environ.get("LOWRANK_LORA_STREAMS", "1")
    if not t.is_cuda or mode == "0":
        return False
    if mode != "all" and t.shape[0] * n_out * k_in < SIDE_STREAM_MIN_MNK:
        return False
    return not torch.compiler.is_compiling()


_STREAMS: dict = {}


class _OnStream:
    """``torch.cuda.stream(stream)`` for a stream of the current device, ``back`` the current
    stream to return to: two set_stream calls (~1 us each on the H100 machine's host, against
    ~13 us for torch.cuda.stream's context, which looks the current stream up again). ``stream``
    None is a no-op."""

    __slots__ = ("stream", "back")

    def __init__(self, stream, back):
        self.stream, self.back = stream, back

    def __enter__(self):
        if self.stream is not None:
            torch.cuda.set_stream(self.stream)

    def __exit__(self, *exc):
        if self.stream is not None:
            torch.cuda.set_stream(self.back)
        return False


def _stream(device: torch.device, high_priority: bool):
    """The side stream (default priority) or the GEMM's high-priority stream of ``device``, made once."""
    key = (device.index, high_priority)
    stream = _STREAMS.get(key)
    if stream is None:
        priority = min(torch.cuda.Stream.priority_range()) if high_priority else 0
        stream = _STREAMS[key] = torch.cuda.Stream(device, priority=priority)
    return stream


class _AsyncFlag:
    """A device scalar (a bool, or an int of flag bits) read on the host later without draining the
    stream: copied to pinned memory when made and read after the long work queued since (the
    GEMMs), so the host waits for the flag's own kernel, not for the queue. (A plain bool() at the
    point of use stalled the GPU while the host queued the next kernels: the QDoRA layer step
    measured 6.6 ms against 5.0 ms of kernel time on the H100.) bool() is value != 0; ``bits(mask)``
    is one question about an int of flags."""

    def __init__(self, flag: torch.Tensor):
        self._event = None
        flag = flag.reshape(())
        if flag.is_cuda:
            stream = torch.cuda.current_stream(flag.device)  # the copy's stream, whatever the current device
            self._host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        else:
            self._host = flag

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host)

    def __bool__(self) -> bool:
        return self.value() != 0

    def bits(self, mask: int) -> "_FlagBits":
        return _FlagBits(self, mask)


class _FlagBits:
    """Whether any of ``mask``'s bits is set in an _AsyncFlag's value (read when asked)."""

    def __init__(self, flag: _AsyncFlag, mask: int):
        self._flag, self._mask = flag, mask

    def __bool__(self) -> bool:
        return bool(self._flag.value() & self._mask)


class LoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, weight_norm, weight, quant, bias, scaling, dropout_p, seed,
                row_scale, magnitude_has_zero):
        cd = x.dtype  # the compute dtype (the caller casts x)
        n_out, k_in = lora_B.shape[0], lora_A.shape[1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k_in)
        m_rows = x2.shape[0]
        # Dropout: x' = x keep / (1 - p). The products take the masked x keep (exact in x's dtype)
        # and 1 / (1 - p) in float32 afterwards, so x' is never rounded to x's dtype (PEFT drops the
        # adapters' float32 copy of x; a bf16 x' put 2^-9 of error on dA).
        keep = dropout_keep_mask(seed, x2.shape, dropout_p, x2.device, cd) if dropout_p > 0 else None
        inv_keep = 1.0 / (1.0 - dropout_p)
        xm = x2 * keep if keep is not None else x2  # times 0 or 1: exact
        dora = magnitude is not None
        dora_dropout = dora and keep is not None
        merge_p = 0.0 if dora_dropout else dropout_p
        if quant is not None:
            merged = _merge_applies(x2, quant, lora_A, merge_p)
        else:
            merged = _dense_merge_applies(x2, weight, lora_A, merge_p, dora, any(ctx.needs_input_grad[:4]))
        if merged and keep is None:
            # the merged weight's GEMM needs no h: an inference call skips it (x read once less);
            # with a backward to come, h is formed beside the GEMM below (or in the backward)
            h_masked = h = None
        else:
            h_masked = _project(xm, lora_A.float().t())  # [M, r] float32: float32 adapters, x read once
            h = h_masked * inv_keep if keep is not None else h_masked  # x' A^T
        bias_c = None if bias is None else bias.to(cd)
        # DoRA: v = m / n with n detached (DoRA section 4.3), float32. y = v (x W^T + s h B^T): v
        # rounded to bf16 and folded into W would put one relative error on a whole column of y,
        # and dm = sum_M(dY y) / m adds that error coherently over M (the H100 run's dm error at 3x
        # PEFT's, 4-bit base); v applied in float32 to each element before its one rounding does not.
        if dora and row_scale is None:
            row_scale = magnitude.detach().float() / weight_norm
        v = row_scale if dora else None
        # DoRA under dropout, PEFT's rule: y = x W0^T + (v - 1) (x' W0^T) + v s h B^T + bias
        # = u + (x - x') W0^T + bias with u = v (x' W0^T + s h B^T) = v / (1 - p) (x keep W0^T +
        # s (x keep A^T) B^T): the DoRA output without dropout of the masked x with v / (1 - p),
        # on the paths below (the merged weight included), saved for dm; then one GEMM more.
        x_in, h_in, v_in = (xm, h_masked, v * inv_keep) if dora_dropout else (x2, h, v)
        if merged:
            # one GEMM against W' = v (W0 + s B A): the low-rank term and DoRA's v are in the weight
            w = (_merged(quant, lora_A, lora_B, scaling, v_in, cd) if quant is not None
                 else _merged_dense(weight, lora_A, lora_B, scaling, v_in))
            # with a backward to come (and the streams), the GEMM on the high-priority stream and
            # h = x A^T (for dB) queued behind it on the side stream: h's CTAs wait for the SMs that
            # the GEMM's last round leaves (see _side_stream_applies)
            want_h = h is None and (ctx.needs_input_grad[2] or (dora and ctx.needs_input_grad[3]))
            main = gemm = side = None
            if want_h and _side_stream_applies(x2, n_out, k_in):
                main, gemm, side = (torch.cuda.current_stream(x2.device), _stream(x2.device, True),
                                    _stream(x2.device, False))
                gemm.wait_stream(main)
                side.wait_stream(main)
            with _OnStream(gemm, main):
                y = _gemm_x_wt(x_in, w, bias_c if not dora else None)
            if side is not None:
                with _OnStream(side, main):
                    h = _project(x2, lora_A.float().t())
                main.wait_stream(gemm)
                main.wait_stream(side)
                y.record_stream(main)
                h.record_stream(main)
            del w
        elif quant is not None and x2.is_cuda and m_rows <= SKINNY_MAX_M:
            # few rows: the fused 4-bit kernel, then the small [M, out] updates
            y = _base_matmul(x_in, weight, quant, None if dora else bias_c)
            y.addmm_(h_in.to(cd), lora_B.to(cd).t(), alpha=scaling)
            if dora:
                y.mul_(v_in)  # y = v * (x W^T + s h B^T), no bias yet
        else:
            # y = s h B^T first, then the big GEMM adds x W^T into it (cuBLAS's C operand, beta = 1).
            # A 4-bit base is dequantized here (matmul_4bit's own path for M > 16 does the same)
            # with DoRA's v folded into the weight's absmax, and into B: y = x (v W)^T + s h (v B)^T.
            fold_v = dora and quant is not None
            b_c = (lora_B.float() * v_in[:, None]).to(cd) if fold_v else lora_B.to(cd)
            hs_c = (h_in * scaling).to(cd)
            if bias_c is not None and not dora:
                y = torch.addmm(bias_c, hs_c, b_c.t())
            else:
                y = torch.mm(hs_c, b_c.t())
            w = (_dequantized(quant, cd, v_in if fold_v else None) if quant is not None
                 else _base_weight(weight, None, cd))
            y.addmm_(x_in, w.t())
            del w
            if dora and not fold_v:
                y.mul_(v_in)  # a float base: y = v * (x W^T + s h B^T), no bias yet
        del keep, h_masked
        if not dora_dropout:
            xm = None
        ctx.save_for_backward(x2, h, lora_A, lora_B, magnitude, weight_norm if dora else None, v,
                              y if dora else None)
        ctx.weight, ctx.quant, ctx.scaling, ctx.dropout_p, ctx.seed = weight, quant, scaling, dropout_p, seed
        ctx.lead, ctx.cd, ctx.merged, ctx.dora_dropout = lead, cd, merged, dora_dropout
        # m == 0 loses z in y = v z (dm needs it): known now, read in backward without a stall
        if dora and magnitude_has_zero is None:
            magnitude_has_zero = _AsyncFlag((magnitude.detach() == 0).any())
        ctx.magnitude_has_zero = magnitude_has_zero if dora else None
        if dora_dropout:  # y = u + (x - x') W0^T (+ bias): a new tensor, the saved u stays as it is
            # x - x' = x - x keep / (1 - p): x where dropped, -x p / (1 - p) where kept (one rounding)
            c = torch.add(x2, xm, alpha=-inv_keep)
            xm = None
            y = _add_base_term(y, c, weight, quant, cd)
            del c
            if bias_c is not None:
                y.add_(bias_c)
        elif dora and bias_c is not None:
            y = y + bias_c  # a new tensor: the saved y stays bias-free
        return y.view(*lead, n_out)

    @staticmethod
    def backward(ctx, dy):
        x2, h, lora_A, lora_B, magnitude, weight_norm, v, y_saved = ctx.saved_tensors
        cd, s, p = ctx.cd, ctx.scaling, ctx.dropout_p
        n_out = lora_B.shape[0]
        dy2 = dy.reshape(-1, n_out).to(cd)
        keep = dropout_keep_mask(ctx.seed, x2.shape, p, x2.device, cd) if p > 0 else None
        dora = v is not None
        want_b, want_m = ctx.needs_input_grad[2], dora and ctx.needs_input_grad[3]
        # dY B_v [M, r] float32, dY read once: for dA, and for dX unless the weight is merged
        need_g = ctx.needs_input_grad[1] or (ctx.needs_input_grad[0] and not ctx.merged)
        g = dh = dot = None
        b32 = None
        m32 = magnitude.detach().float() if want_m else None
        fused = need_g and (want_b or want_m) and _dy_products_applies(dy2, lora_A.shape[0])
        grad_a = None
        side = None
        main = None
        if (fused and ctx.merged and ctx.needs_input_grad[0] and p == 0
                and _side_stream_applies(dy2, n_out, x2.shape[1])):
            # h (unless the forward formed it) and the dY products on the side stream beside the
            # merge (below, on the current one), dX's GEMM on a high-priority one, dA behind both
            # on the side stream (in what the GEMM's last round leaves); joined after the GEMM
            main, side = torch.cuda.current_stream(dy2.device), _stream(dy2.device, False)
            side.wait_stream(main)
        with _OnStream(side, main):
            if h is None and (want_b or want_m):  # the merged weight's forward left h to the backward
                h = _project(x2, lora_A.float().t())
            if fused:
                # g = dY (v B), dB = s v (dY^T h) and dm = sum_M(dY * y) / m in one read of dY (and
                # y), the partial sums and the scales in one more launch
                g, grad_b, grad_m = ops.lora_dy_products(dy2, lora_B.float(), h, y_saved if want_m else None,
                                                         v, s, m32)
                grad_m = grad_m if want_m else None
            else:
                grad_b = grad_m = None
        if not fused and (need_g or want_b):
            b32 = lora_B.float() if v is None else lora_B.float() * v[:, None]
        if not fused and need_g:
            g = _project(dy2, b32)
        grad_x = None
        # DoRA under dropout: y = u(x') + (x - x') W0^T, so dX = k (dY W'') + (1 - k) (dY W0) with
        # k = keep / (1 - p) and dY W'' = dY diag(v) W0 + s g A the dX of u without dropout
        lora_keep = None if ctx.dora_dropout else keep  # where the low-rank term alone is masked
        if ctx.needs_input_grad[0] and ctx.merged:  # dX = dY W', W' = v (W0 + s B A) rebuilt
            w = (_merged(ctx.quant, lora_A, lora_B, s, v, cd) if ctx.quant is not None
                 else _merged_dense(ctx.weight, lora_A, lora_B, s, v))
            if side is not None:
                gemm = _stream(dy2.device, True)
                gemm.wait_stream(main)
                with _OnStream(gemm, main):
                    grad_x = _gemm_dy_w(dy2, w)
                if ctx.needs_input_grad[1]:
                    # dA = s g^T x on the side stream once the merge is done too: queued behind dX's
                    # GEMM, it runs in the GEMM's last round (beside the merge it slowed the merge,
                    # and so the GEMM's start)
                    side.wait_stream(main)
                    with _OnStream(side, main):
                        grad_a = _reduce_rows(x2, g, scale=s, transpose=True).to(lora_A.dtype)
                main.wait_stream(gemm)
                main.wait_stream(side)
                # made on other streams, used on this one (and every input of theirs is still
                # referenced here, past the join: its memory is reused only after it)
                for t in (grad_x, g, h, grad_b, grad_m, grad_a):
                    if t is not None:
                        t.record_stream(main)
            else:
                grad_x = _gemm_dy_w(dy2, w)
            del w
        elif ctx.needs_input_grad[0]:
            a_c = lora_A.to(cd)
            lhs, rhs = _grad_input_operands(dy2, v, ctx.weight, ctx.quant, cd)
            # s g A first (masked, times 1 / (1 - p), under LoRA's dropout), then the big GEMM adds
            # dY W into it (beta = 1)
            grad_x = torch.mm((g * (s if lora_keep is None else s / (1.0 - p))).to(cd), a_c)
            if lora_keep is not None:
                grad_x.mul_(lora_keep)
            grad_x.addmm_(lhs, rhs)
            del lhs, rhs
        if grad_x is not None and ctx.dora_dropout:
            base = _base_grad_input(dy2, ctx.weight, ctx.quant, cd)
            # kept elements: (dY W'') / (1 - p) - (p / (1 - p)) dY W0, dropped ones: dY W0; lerp with
            # weight 0 or 1 returns an end exactly (where() would want a bool mask)
            grad_x.mul_(1.0 / (1.0 - p)).add_(base, alpha=-p / (1.0 - p))
            grad_x = torch.lerp(base, grad_x, keep, out=base)
        if grad_x is not None:
            grad_x = grad_x.view(*ctx.lead, x2.shape[1])
        if not fused and _split_mm_enabled(dy2):  # dY^T h on the tensor cores, sum_M(dY * y) streamed
            if want_b:
                dh = _reduce_rows(dy2, h)
            if want_m:
                dot = ops.lora_column_reduce(dy2, h.new_empty(h.shape[0], 0), y_saved)[1]
        elif not fused and (want_b or want_m):  # dY^T h and sum_M(dY * y): one read of dY (and y)
            dh, dot = ops.lora_column_reduce(dy2, h, y_saved if want_m else None)
        if want_b and not fused:
            grad_b = dh * v[:, None] if dora else dh
            grad_b = grad_b * s
        grad_b = grad_b.to(lora_B.dtype) if want_b else None
        if ctx.needs_input_grad[1] and grad_a is None:  # dA = s g^T x'
            # x' = x keep / (1 - p): the masked x (exact) and 1 / (1 - p) in the float32 scale
            xm = x2 if keep is None else x2 * keep
            grad_a = _reduce_rows(xm, g, scale=s if keep is None else s / (1.0 - p), transpose=True).to(lora_A.dtype)
            del xm
        if want_m:
            # y = (m / n) z  =>  dL/dm = sum_M(dY * z) / n = sum_M(dY * y) / m (y saved bias-free);
            # the fused op has divided already (0 where m = 0)
            has_zero = bool(ctx.magnitude_has_zero)  # (known since the forward: no stall)
            if not fused and not has_zero:
                grad_m = dot / m32
            elif not fused:
                grad_m = torch.where(m32 == 0, torch.zeros_like(dot), dot / torch.where(m32 == 0, 1.0, m32))
            if has_zero:  # y = 0 where m = 0, z is lost: rebuild those columns' z
                zero = m32 == 0
                cols = zero.nonzero().flatten()
                w_cols = _base_weight(ctx.weight, ctx.quant, torch.float32)[cols]
                xz = x2.float() if not ctx.dora_dropout else x2.float() * keep.float() * (1.0 / (1.0 - p))  # u's x'
                z = xz @ w_cols.t() + s * (h @ lora_B.float()[cols].t())
                grad_m[cols] = (dy2.float()[:, cols] * z).sum(0) / weight_norm[cols]
            grad_m = grad_m.to(magnitude.dtype)
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None, None, None, None, None, None


def lora_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                 weight: torch.Tensor | None = None, quant: QuantizedTensor | None = None,
                 bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int | None = None,
                 magnitude: torch.Tensor | None = None, weight_norm: torch.Tensor | None = None,
                 row_scale: torch.Tensor | None = None, magnitude_has_zero=None) -> torch.Tensor:
    """y = base(x) + s * dropout(x) A^T B^T (LoRA), or DoRA's y = (m / n) (x W^T + s x A^T B^T) + bias
    with ``magnitude`` m and the detached row norm ``weight_norm`` n. Exactly one of ``weight``
    ([out, in], x's dtype) or ``quant`` (4-bit). x is in the compute dtype; the output too.
    ``seed`` draws the dropout mask (from torch's global generator when None).
    DoRA, when the caller has them already (lowrank.dora.dora_row_scale): ``row_scale`` = m / n
    (float32 [out], detached, exactly magnitude.float() / weight_norm) and ``magnitude_has_zero``
    (anything whose bool() says whether some m is 0, read in backward only)."""
    if (weight is None) == (quant is None):
        raise ValueError("lora_forward: give exactly one of weight and quant")
    if row_scale is not None and (magnitude is None or row_scale.dtype != torch.float32 or
                                  row_scale.shape != (lora_B.shape[0],) or row_scale.requires_grad):
        raise ValueError(f"lora_forward: row_scale must be DoRA's detached float32 m / n [{lora_B.shape[0]}] and "
                         f"comes with magnitude, got {row_scale.dtype} {list(row_scale.shape)}"
                         f"{' requiring grad' if row_scale.requires_grad else ''}"
                         f"{' without magnitude' if magnitude is None else ''}")
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    return LoraFunction.apply(x, lora_A, lora_B, magnitude, weight_norm, weight, quant, bias, float(scaling),
                              float(dropout_p), seed or 0, row_scale, magnitude_has_zero)
