"""LoRA and DoRA forward + backward as one autograd function that keeps memory lean.

The unfused path (LoraLinear.forward_unfused, PEFT's formulation) casts x to float32 for the
adapter branch and builds the low-rank term as [M, out] float32 temporaries: at M = 8192 tokens of a
14336 x 4096 projection that is 1.4 GB of temporaries (PEFT measures 1410 MB above the inputs). This
function computes the same math in x's compute dtype with fp32 accumulation (cuBLAS / the backend's
matmul) and keeps only what the backward needs:

    forward   h = x' A^T                      [M, r]      x' = dropout(x), mask from a seed
              y = x W^T + s h B^T (+ bias)     the low-rank term added in place into y by one
                                               addmm (beta = 1): no [M, out] temporary
    DoRA      y = v * (x W^T + s h B^T) + bias, v = m / n (n detached): z built as above, then
              scaled in place by v in float32 (v rounded to bf16 would put one relative error
              on a whole output column, and dm sums that column)
    saved     x, h, the dropout seed (the mask is regenerated), and for DoRA the output y (for
              dm) and v; for a 4-bit base only the packed weight
    backward  g  = dY B_v                      [M, r] fp32 B_v = v * B for DoRA, B for LoRA
              dX = (v dY) W + s (g A) * mask   one GEMM over the (dequantized) weight, the
                                               low-rank term added in place
              dB = s v * (dY^T h),  dA = s g^T x',  DoRA: dm = sum_M(dY * y) / m, y bias-free;
              dY^T h and sum_M(dY * y) come from one op (lora_column_reduce: one read of dY and y),
              g^T x' from the same op over x'. The low-rank terms enter y and dX through cuBLAS
              with h, g and B, A rounded to the compute dtype (their contribution to a 16-bit output)

A 4-bit base goes through lowrank.matmul_4bit's op (the fused skinny kernel for M <= 16, else
dequantize + cuBLAS). What is not here yet (issue 4/5): the low-rank term inside the base GEMM's
epilogue, v folded into the dequantize kernel, and DoRA with dropout (it takes the unfused path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .quantized import QuantizedTensor


def draw_seed() -> int:
    """A dropout seed from torch's global generator (so torch.manual_seed makes runs repeatable)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def dropout_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The dropout keep-mask (bool) drawn from ``seed``: the same mask in forward and backward."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device, dtype=torch.float32) >= p


def _dropped(x2, seed, p):
    keep = dropout_keep_mask(seed, x2.shape, p, x2.device)
    return x2 * keep.to(x2.dtype) * (1.0 / (1.0 - p))


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


def _scaled_grad_input(dy2, v, weight, quant, cd):
    """dY diag(v) W in x's dtype (v = None: dY W), v in float32 with one rounding of the scaled
    operand and no float32 temporary: v goes into whichever of W [out, in] and dY [M, out] is
    smaller (a 4-bit base's dequantized weight is a temporary anyway: scaled in place). The H100
    bench measured 898 MB above inputs for QDoRA at M = 8192, 14336 x 4096 when dY v was built
    in float32 ([M, out] x 4 bytes = 470 MB of it)."""
    if v is None:
        return dy2 @ _base_weight(weight, quant, cd)
    if quant is not None:
        return dy2 @ quant.dequantize(cd).mul_(v[:, None])
    w = weight if weight.dtype == cd else weight.to(cd)
    if w.shape[1] <= dy2.shape[0]:  # in <= M: the weight is the smaller operand
        return dy2 @ torch.mul(w, v[:, None], out=torch.empty_like(w))
    return torch.mul(dy2, v, out=torch.empty_like(dy2)) @ w


class LoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, weight_norm, weight, quant, bias, scaling, dropout_p, seed):
        cd = x.dtype  # the compute dtype (the caller casts x)
        n_out, k_in = lora_B.shape[0], lora_A.shape[1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k_in)
        m_rows = x2.shape[0]
        xd = _dropped(x2, seed, dropout_p) if dropout_p > 0 else x2
        b_c = lora_B.to(cd)
        h = ops.lora_project(xd, lora_A.float())  # [M, r] float32: float32 adapters, x read once
        h_c = h.to(cd)
        bias_c = None if bias is None else bias.to(cd)
        dora = magnitude is not None
        if not dora:
            y = _base_matmul(x2, weight, quant, bias_c)
            y.addmm_(h_c, b_c.t(), alpha=scaling)
            v = None
        else:
            v = magnitude.detach().float() / weight_norm  # n is detached (DoRA section 4.3)
            # z = x W^T + s h B^T in x's dtype, then y = v z with v in float32: one rounding of
            # each of z and y. Folding v into W (or into y) in bf16 rounds v itself, the same
            # relative error on a whole column of y, and dm = sum_M(dY y) / m adds that error
            # coherently over M (my reading of the H100 run's dm error at 3x PEFT's, 4-bit base).
            y = _base_matmul(x2, weight, quant, None)
            y.addmm_(h_c, b_c.t(), alpha=scaling)
            y.mul_(v)  # y = v * (x W^T + s h B^T), no bias yet
        ctx.save_for_backward(x2, h, lora_A, lora_B, magnitude, weight_norm if dora else None, v,
                              y if dora else None)
        ctx.weight, ctx.quant, ctx.scaling, ctx.dropout_p, ctx.seed = weight, quant, scaling, dropout_p, seed
        ctx.lead, ctx.cd = lead, cd
        if dora and bias_c is not None:
            y = y + bias_c  # a new tensor: the saved y stays bias-free
        return y.view(*lead, n_out)

    @staticmethod
    def backward(ctx, dy):
        x2, h, lora_A, lora_B, magnitude, weight_norm, v, y_saved = ctx.saved_tensors
        cd, s, p = ctx.cd, ctx.scaling, ctx.dropout_p
        n_out = lora_B.shape[0]
        dy2 = dy.reshape(-1, n_out).to(cd)
        a_c = lora_A.to(cd)
        b32 = lora_B.float() if v is None else lora_B.float() * v[:, None]
        keep = dropout_keep_mask(ctx.seed, x2.shape, p, x2.device) if p > 0 else None
        g = ops.lora_project(dy2, b32.t().contiguous())  # dY B_v [M, r] float32, dY read once
        grad_x = grad_a = grad_b = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = _scaled_grad_input(dy2, v, ctx.weight, ctx.quant, cd)
            if keep is None:
                grad_x.addmm_(g.to(cd), a_c, alpha=s)
            else:
                grad_x.add_((g.to(cd) @ a_c) * keep.to(cd), alpha=s / (1.0 - p))
            grad_x = grad_x.view(*ctx.lead, x2.shape[1])
        dora = v is not None
        want_b, want_m = ctx.needs_input_grad[2], dora and ctx.needs_input_grad[3]
        if want_b or want_m:  # dY^T h and DoRA's sum_M(dY * y): one read of dY (and y) on CUDA
            dh, dot = ops.lora_column_reduce(dy2, h, y_saved if want_m else None)
        if want_b:
            grad_b = dh * v[:, None] if dora else dh
            grad_b = (grad_b * s).to(lora_B.dtype)
        if ctx.needs_input_grad[1]:  # dA = s g^T x': the same column reduction, over x' [M, in]
            xd = x2 if keep is None else x2 * keep.to(cd) * (1.0 / (1.0 - p))
            grad_a = (ops.lora_column_reduce(xd, g, None)[0].t() * s).to(lora_A.dtype)
        if want_m:
            # y = (m / n) z  =>  dL/dm = sum_M(dY * z) / n = sum_M(dY * y) / m (y saved bias-free)
            m32 = magnitude.detach().float()
            grad_m = dot
            zero = m32 == 0
            grad_m = torch.where(zero, torch.zeros_like(grad_m), grad_m / torch.where(zero, 1.0, m32))
            if bool(zero.any()):  # y = 0 there, z is lost: rebuild those columns' z = x W^T + s h B^T
                cols = zero.nonzero().flatten()
                w_cols = _base_weight(ctx.weight, ctx.quant, torch.float32)[cols]
                z = x2.float() @ w_cols.t() + s * (h @ lora_B.float()[cols].t())
                grad_m[cols] = (dy2.float()[:, cols] * z).sum(0) / weight_norm[cols]
            grad_m = grad_m.to(magnitude.dtype)
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None, None, None, None


def lora_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                 weight: torch.Tensor | None = None, quant: QuantizedTensor | None = None,
                 bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int | None = None,
                 magnitude: torch.Tensor | None = None, weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """y = base(x) + s * dropout(x) A^T B^T (LoRA), or DoRA's y = (m / n) (x W^T + s x A^T B^T) + bias
    with ``magnitude`` m and the detached row norm ``weight_norm`` n. Exactly one of ``weight``
    ([out, in], x's dtype) or ``quant`` (4-bit). x is in the compute dtype; the output too.
    ``seed`` draws the dropout mask (from torch's global generator when None)."""
    if (weight is None) == (quant is None):
        raise ValueError("lora_forward: give exactly one of weight and quant")
    if magnitude is not None and dropout_p > 0:
        raise ValueError("lora_forward: DoRA with dropout takes the unfused path (LoraLinear does this)")
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    return LoraFunction.apply(x, lora_A, lora_B, magnitude, weight_norm, weight, quant, bias, float(scaling),
                              float(dropout_p), seed or 0)
