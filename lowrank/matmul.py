"""matmul_4bit: x @ W^T with W a QuantizedTensor, differentiable in x and bias.

This is the first, generic path of issue 3 (fused 4-bit GEMV/GEMM kernels are still to come):
the weight is dequantized by the lowrank kernels (one fused launch on CUDA, 2600 GB/s on an H100)
into a temporary in x's dtype and multiplied by the backend's matmul (cuBLAS on CUDA, fp32
accumulation). The backward dequantizes again rather than keeping the dequantized weight alive
between forward and backward: only the packed weight is saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantized import QuantizedTensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class _MatMul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, q):
        w = q.dequantize(x.dtype)
        ctx.q = q  # the packed weight only: no dequantized copy outlives this call
        ctx.has_bias = bias is not None
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.q.dequantize(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def matmul_4bit(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` for a 4-bit ``W [N, K]``; output [..., N] in x's dtype.

    x: fp32/fp16/bf16 on W's device; bias: [N] or None. Gradients flow to x and bias (W is frozen)."""
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
    return _MatMul4bit.apply(x, bias, q)
