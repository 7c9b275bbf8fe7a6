"""The lean LoRA/DoRA autograd function against the formula evaluated in float64 by autograd."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank.lora_function import dropout_keep_mask, lora_forward


def _problem(seed, m, k, n, r, four_bit, with_bias, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q = lowrank.quantize_4bit(w.to(device)) if four_bit else None
    w_base = q.dequantize(torch.float32).cpu() if four_bit else w
    x = torch.randn(m, k, generator=g)
    a = torch.randn(r, k, generator=g) * 0.1
    b = torch.randn(n, r, generator=g) * 0.1
    bias = torch.randn(n, generator=g) if with_bias else None
    mag = (w_base + 0.5 * b @ a).norm(dim=1) * (1 + 0.1 * torch.rand(n, generator=g))
    return w, q, w_base, x, a, b, bias, mag


def _reference(x, w_base, a, b, bias, s, keep=None, p=0.0, mag=None):
    """float64 autograd of the formula; returns output and grads of x, A, B (, m)."""
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, b))
    xd = x64 if keep is None else x64 * keep.double() / (1 - p)
    y = x64 @ w_base.double().t() + s * (xd @ a64.t()) @ b64.t()
    leaves = [x64, a64, b64]
    if mag is not None:
        m64 = mag.double().requires_grad_()
        n = (w_base.double() + s * b64 @ a64).norm(dim=1).detach()
        y = (m64 / n) * y
        leaves.append(m64)
    if bias is not None:
        y = y + bias.double()
    return y, leaves


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.sampled_from([64, 128]), st.sampled_from([16, 48]),
       st.sampled_from([1, 4, 16]), st.booleans(), st.booleans(), st.booleans())
def test_lora_and_dora_match_float64(device, seed, m, k, n, r, four_bit, with_bias, dora):
    w, q, w_base, x, a, b, bias, mag = _problem(seed, m, k, n, r, four_bit, with_bias, device)
    s = 0.5
    ref, leaves = _reference(x, w_base, a, b, bias, s, mag=mag if dora else None)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xs, as_, bs = (t.to(device).requires_grad_() for t in (x, a, b))
    ms = mag.to(device).requires_grad_() if dora else None
    norm = (w_base + s * b @ a).norm(dim=1).to(device) if dora else None
    y = lora_forward(xs, as_, bs, s, weight=None if four_bit else w.to(device), quant=q,
                     bias=None if bias is None else bias.to(device), magnitude=ms, weight_norm=norm)
    y.backward(dy.float().to(device))
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.cpu().double(), ref.detach(), **tol)
    grads = [xs.grad, as_.grad, bs.grad] + ([ms.grad] if dora else [])
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.cpu().double(), leaf.grad, **tol)


@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_dropout_regenerates_the_mask(device, four_bit):
    w, q, w_base, x, a, b, bias, _ = _problem(1, 64, 128, 48, 8, four_bit, True, device)
    p, seed, s = 0.25, 1234, 2.0
    keep = dropout_keep_mask(seed, x.shape, p, device).cpu()
    assert 0.70 < keep.float().mean() < 0.80  # P(keep) = 0.75 over 8192 draws
    ref, leaves = _reference(x, w_base, a, b, bias, s, keep=keep, p=p)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xs, as_, bs = (t.to(device).requires_grad_() for t in (x, a, b))
    y = lora_forward(xs, as_, bs, s, weight=None if four_bit else w.to(device), quant=q, bias=bias.to(device),
                     dropout_p=p, seed=seed)
    y.backward(dy.float().to(device))
    torch.testing.assert_close(y.cpu().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    for got, leaf in zip([xs.grad, as_.grad, bs.grad], leaves):
        torch.testing.assert_close(got.cpu().double(), leaf.grad, rtol=2e-5, atol=2e-5)
    # another seed, another mask: the output changes
    assert not torch.allclose(lora_forward(xs, as_, bs, s, weight=None if four_bit else w.to(device), quant=q,
                                           dropout_p=p, seed=seed + 1), y)


def test_dora_gradient_of_a_zero_magnitude(device):
    w, q, w_base, x, a, b, bias, mag = _problem(2, 8, 64, 16, 4, False, True, device)
    mag[3] = 0.0
    s = 1.0
    ref, leaves = _reference(x, w_base, a, b, bias, s, mag=mag)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xs, as_, bs, ms = (t.to(device).requires_grad_() for t in (x, a, b, mag))
    norm = (w_base + s * b @ a).norm(dim=1).to(device)
    y = lora_forward(xs, as_, bs, s, weight=w.to(device), bias=bias.to(device), magnitude=ms, weight_norm=norm)
    y.backward(dy.float().to(device))
    torch.testing.assert_close(ms.grad.cpu().double(), leaves[3].grad, rtol=2e-5, atol=2e-5)
    assert ms.grad[3] != 0


def test_lora_forward_rejects_bad_arguments():
    w, q, _, x, a, b, _, mag = _problem(3, 4, 64, 16, 4, True, False, "cpu")
    with pytest.raises(ValueError, match="exactly one of weight and quant"):
        lora_forward(x, a, b, 1.0, weight=w, quant=q)
    with pytest.raises(ValueError, match="exactly one of weight and quant"):
        lora_forward(x, a, b, 1.0)
    with pytest.raises(ValueError, match="DoRA with dropout"):
        lora_forward(x, a, b, 1.0, weight=w, magnitude=mag, weight_norm=mag, dropout_p=0.1)


def test_lora_forward_keeps_no_float32_out_sized_temporary():
    """The low-rank term goes into y in place: no [M, out] float32 tensor is made in the forward."""
    w, q, _, x, a, b, _, _ = _problem(4, 256, 128, 512, 8, False, False, "cpu")
    x, w = x.bfloat16().requires_grad_(), w.bfloat16()
    big = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= 256 * 512:
                    big.append((func, tuple(t.shape)))
            return out

    with Watch():
        y = lora_forward(x, a.requires_grad_(), b.requires_grad_(), 2.0, weight=w)
    assert y.dtype == torch.bfloat16 and y.shape == (256, 512)
    assert big == []
