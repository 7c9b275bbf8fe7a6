"""matmul_4bit: x @ W^T with W a QuantizedTensor, differentiable in x and bias.

The forward is one op, ``torch.ops.lowrank.matmul_4bit``, whose CUDA entry picks a kernel by
the dispatch rule of docs/design.md: the fused skinny kernel (codes dequantized in registers into
tensor-core fragments, no dequantized weight in memory) for fp16/bf16 x with at most 16 rows,
otherwise the weight dequantized into a temporary (one launch) and multiplied by cuBLAS. The
backward (dX = dY @ W) is ``torch.ops.lowrank.matmul_4bit_grad_x``: on CUDA a fused skinny kernel
for bf16 dY with at most 16 rows, on Hopper a fused wgmma kernel up to 256 rows, otherwise the
weight dequantized again; no dequantized weight is kept alive between forward and backward, only
the packed weight is saved.
"""
from __future__ import annotations

import torch

from . import ops
from .quantized import QuantizedTensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _forward(x, q, bias, path):
    return ops.matmul_4bit(x, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset,
                           q.quant_map, q.blocksize, q.nested_blocksize, q.shape[0], q.shape[1], bias, path)


class _MatMul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, q, path):
        ctx.q = q  # the packed weight only: no dequantized copy outlives this call
        ctx.has_bias = bias is not None
        ctx.path = path
        return _forward(x, q, None if bias is None else bias.to(x.dtype), path)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            q = ctx.q
            # the forward's path where the backward has it ("dequantize"), else the rule
            path = "dequantize" if ctx.path == "dequantize" else "auto"
            grad_x = ops.matmul_4bit_grad_x(grad_out, q.packed.reshape(-1), q.absmax, q.nested_absmax,
                                            q.nested_quant_map, q.nested_offset, q.quant_map, q.blocksize,
                                            q.nested_blocksize, q.shape[0], q.shape[1], path)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def matmul_4bit(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None, *,
                path: str = "auto") -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` for a 4-bit ``W [N, K]``; output [..., N] in x's dtype, fp32
    accumulation.

    x: fp32/fp16/bf16 on W's device; bias: [N] or None. Gradients flow to x and bias (W is frozen).
    path: "auto" (the dispatch rule), or force "skinny" (CUDA fused kernel for M <= 16), "wgmma"
    (CUDA fused tensor-core GEMM, Hopper) — an error says why when one cannot take the call — or
    "dequantize" (dequantize + matmul): for tests and benchmarks."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"matmul_4bit: q must be a lowrank.QuantizedTensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"matmul_4bit: the weight must be 2-D [N, K], got shape {list(q.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"matmul_4bit: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"matmul_4bit: x's last dimension must be K = {q.shape[1]} (weight {list(q.shape)}), "
                         f"got x of shape {list(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"matmul_4bit: x is on {x.device} but the weight is on {q.device}")
    if bias is not None and (bias.shape != (q.shape[0],) or bias.device != q.device):
        raise ValueError(f"matmul_4bit: bias must have shape [{q.shape[0]}] on {q.device}, got "
                         f"{list(bias.shape)} on {bias.device}")
    if path not in ops.MATMUL_PATHS:
        raise ValueError(f"matmul_4bit: path must be one of {ops.MATMUL_PATHS}, got {path!r}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _MatMul4bit.apply(x, bias, q, path)
    # inference: the op alone, no autograd node (at M = 1 the host side is on the critical path)
    return _forward(x, q, None if bias is None else bias.to(x.dtype), path)
