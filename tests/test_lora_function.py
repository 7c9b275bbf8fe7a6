"""The lean LoRA/DoRA autograd function against the formula evaluated in float64 by autograd."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank import ops
from lowrank.lora_function import dropout_keep_mask, lora_forward

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.sampled_from([64, 96, 128]), st.sampled_from([16, 48]),
       st.sampled_from([1, 4, 16]), st.booleans(), st.booleans(), st.booleans())
def test_lora_and_dora_match_float64(device, seed, m, k, n, r, four_bit, with_bias, dora):
    _check_against_float64(device, seed, m, k, n, r, four_bit, with_bias, dora)


@given(st.integers(0, 2**31 - 1), st.integers(17, 40), st.sampled_from([64, 96, 128]), st.sampled_from([16, 48]),
       st.sampled_from([1, 4, 16]), st.booleans(), st.booleans())
def test_merged_weight_path_matches_float64(device, seed, m, k, n, r, with_bias, dora):
    """The 4-bit base's merged path (both GEMMs against W' = v (W0 + s B A), ops.lora_merge_4bit),
    which CUDA takes for M > 16, forced on CPU too."""
    import lowrank.lora_function as lf
    lf.MERGE_ON_CPU = True
    try:
        _check_against_float64(device, seed, m, k, n, r, True, with_bias, dora, expect_merged=True)
    finally:
        lf.MERGE_ON_CPU = False


def _check_against_float64(device, seed, m, k, n, r, four_bit, with_bias, dora, expect_merged=None):
    import lowrank.lora_function as lf
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
    if expect_merged is not None:
        assert lf._merge_applies(xs.reshape(-1, k), q, as_, 0.0) == expect_merged
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
    keep = dropout_keep_mask(seed, x.shape, p, device, x.dtype).cpu()
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


def _reference_dora_dropout(x, w_base, a, b, bias, s, keep, p, mag):
    """float64 autograd of PEFT's DoRA under dropout: y = x W0^T + (v - 1) (x' W0^T) + v s x' A^T B^T
    + bias, v = m / n, n = ||W0 + s B A|| detached, x' = x keep / (1 - p)."""
    x64, a64, b64, m64 = (t.double().requires_grad_() for t in (x, a, b, mag))
    w64 = w_base.double()
    xd = x64 * keep.double() / (1 - p)
    v = m64 / (w64 + s * b64 @ a64).norm(dim=1).detach()
    y = x64 @ w64.t() + (v - 1) * (xd @ w64.t()) + v * (s * (xd @ a64.t()) @ b64.t())
    if bias is not None:
        y = y + bias.double()
    return y, [x64, a64, b64, m64]


def _run_dora_dropout(device, problem, four_bit, s, p, mask_seed):
    """lora_forward + backward of DoRA under dropout on ``problem`` (_problem's tuple) beside the
    float64 reference: ((y, dX, dA, dB, dm) ours, (y, leaves) of the reference)."""
    w, q, w_base, x, a, b, bias, mag = problem
    keep = dropout_keep_mask(mask_seed, x.shape, p, device, x.dtype).cpu()
    ref, leaves = _reference_dora_dropout(x, w_base, a, b, bias, s, keep, p, mag)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xs, as_, bs, ms = (t.to(device).requires_grad_() for t in (x, a, b, mag))
    norm = (w_base + s * b @ a).norm(dim=1).to(device)
    y = lora_forward(xs, as_, bs, s, weight=None if four_bit else w.to(device), quant=q,
                     bias=None if bias is None else bias.to(device), magnitude=ms, weight_norm=norm,
                     dropout_p=p, seed=mask_seed)
    y.backward(dy.float().to(device))
    return (y, xs.grad, as_.grad, bs.grad, ms.grad), (ref, leaves)


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.sampled_from([64, 128]), st.sampled_from([16, 48]),
       st.sampled_from([1, 4, 16]), st.booleans(), st.booleans(), st.sampled_from([0.1, 0.5]), st.booleans())
def test_dora_dropout_matches_float64(device, seed, m, k, n, r, four_bit, with_bias, p, merge_on_cpu):
    """DoRA under dropout (u of x' plus the base term of x - x', the backward's two dX products
    combined by the mask) against PEFT's formula in float64, on every path: float and 4-bit bases,
    few rows (the fused skinny kernel on CUDA) and many (the merged weight, forced on CPU too)."""
    import lowrank.lora_function as lf
    problem = _problem(seed, m, k, n, r, four_bit, with_bias, device)
    lf.MERGE_ON_CPU = merge_on_cpu
    try:
        ours, (ref, leaves) = _run_dora_dropout(device, problem, four_bit, 0.5, p, seed + 1)
    finally:
        lf.MERGE_ON_CPU = False
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours[0].cpu().double(), ref.detach(), **tol)
    for got, leaf in zip(ours[1:], leaves):
        torch.testing.assert_close(got.cpu().double(), leaf.grad, **tol)


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


@pytest.mark.parametrize("four_bit", [False, True])
def test_dora_dropout_gradient_of_a_zero_magnitude(device, four_bit):
    """m = 0 zeroes its column of u; dm there is rebuilt from x' (the masked x) and the base weight."""
    problem = _problem(5, 8, 64, 16, 4, four_bit, True, device)
    problem[-1][3] = 0.0  # mag
    ours, (_, leaves) = _run_dora_dropout(device, problem, four_bit, 1.0, 0.25, 77)
    torch.testing.assert_close(ours[4].cpu().double(), leaves[3].grad, rtol=2e-5, atol=2e-5)
    assert ours[4][3] != 0


def test_lora_forward_rejects_bad_arguments():
    w, q, _, x, a, b, _, mag = _problem(3, 4, 64, 16, 4, True, False, "cpu")
    with pytest.raises(ValueError, match="exactly one of weight and quant"):
        lora_forward(x, a, b, 1.0, weight=w, quant=q)
    with pytest.raises(ValueError, match="exactly one of weight and quant"):
        lora_forward(x, a, b, 1.0)


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


# --- lora_column_reduce: dY^T h and DoRA's sum_M(dY * y), one read of dY ----------------------------

@given(st.integers(1, 300), st.sampled_from([2, 6, 64, 66, 130, 333]), st.integers(1, 40), st.booleans(),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(0, 2**31 - 1))
def test_column_reduce_matches_float64(device, m, n, r, with_y, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(m, n, generator=g).to(dtype)
    h = torch.randn(m, r, generator=g).to(dtype)
    y = torch.randn(m, n, generator=g).to(dtype) if with_y else None
    dh, dot = ops.lora_column_reduce(dy.to(device), h.to(device), None if y is None else y.to(device))
    ref_dh = dy.double().t() @ h.double()
    # fp32 accumulation of exact 16-bit products over M <= 300 rows: <= M u |terms| in the worst case (u = 2^-24)
    scale = dy.double().abs().t() @ h.double().abs()
    assert dh.shape == (n, r) and dh.dtype == torch.float32
    assert ((dh.cpu().double() - ref_dh).abs() <= 4e-5 * scale + 1e-30).all()
    if with_y:
        ref_dot = (dy.double() * y.double()).sum(0)
        dot_scale = (dy.double() * y.double()).abs().sum(0)
        assert dot.shape == (n,) and ((dot.cpu().double() - ref_dot).abs() <= 4e-5 * dot_scale + 1e-30).all()
    else:
        assert dot.numel() == 0
    # deterministic
    again = ops.lora_column_reduce(dy.to(device), h.to(device), None if y is None else y.to(device))
    assert torch.equal(again[0], dh) and torch.equal(again[1], dot)


def test_column_reduce_model_shape(cuda_device):
    """A training-sized call: many row splits, both column paths of a CTA, r = 16 and 32."""
    for r in (16, 32):
        dy = torch.randn(8192, 4096, device=cuda_device, dtype=torch.bfloat16)
        h = torch.randn(8192, r, device=cuda_device, dtype=torch.bfloat16)
        y = torch.randn_like(dy)
        dh, dot = ops.lora_column_reduce(dy, h, y)
        torch.testing.assert_close(dh, dy.float().t() @ h.float(), rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(dot, (dy.float() * y.float()).sum(0), rtol=1e-4, atol=1e-2)


def test_column_reduce_rejects_bad_input(device):
    dy = torch.randn(8, 6, device=device)
    with pytest.raises(RuntimeError, match="same M"):
        ops.lora_column_reduce(dy, torch.randn(7, 2, device=device))
    with pytest.raises(RuntimeError, match="h must have dy's dtype"):
        ops.lora_column_reduce(dy, torch.randn(8, 2, device=device).double())
    with pytest.raises(RuntimeError, match="y must match dy"):
        ops.lora_column_reduce(dy, torch.randn(8, 2, device=device), torch.randn(8, 5, device=device))
    with pytest.raises(RuntimeError, match="dy must be float32, float16 or bfloat16"):
        ops.lora_column_reduce(dy.int(), torch.randn(8, 2, device=device).int())


def test_opcheck_column_reduce(device):
    for dtype in (torch.bfloat16, torch.float32):
        dy = torch.randn(70, 66, device=device, dtype=dtype)
        h = torch.randn(70, 16, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.lowrank.lora_column_reduce.default, (dy, h, torch.randn_like(dy)))
        torch.library.opcheck(torch.ops.lowrank.lora_column_reduce.default, (dy, h, None))


# --- dora_cross_4bit: DoRA's W0 A^T in float32 from the packed weight --------------------------------

def _cross_args(q, a):
    return (q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map,
            q.blocksize, q.nested_blocksize, q.shape[0], q.shape[1], a)


@given(st.integers(1, 70), st.sampled_from([4, 64, 100, 128, 200, 1024]), st.integers(1, 64),
       st.sampled_from(["nf4", "fp4"]), st.sampled_from([32, 64, 256]), st.booleans(), st.integers(0, 2**31 - 1))
def test_dora_cross_matches_float64(device, n, k, r, quant_type, blocksize, double_quant, seed):
    g = torch.Generator().manual_seed(seed)
    q = lowrank.quantize_4bit((torch.randn(n, k, generator=g) * 0.05).to(device), quant_type, blocksize, double_quant)
    a = torch.randn(r, k, generator=g).to(device)
    p = ops.dora_cross_4bit(*_cross_args(q, a))
    w0 = q.dequantize(torch.float32).double().cpu()
    ref = w0 @ a.double().cpu().t()
    scale = w0.abs() @ a.double().cpu().abs().t()
    assert p.shape == (n, r) and p.dtype == torch.float32
    # float32 products of exact float32 values, float32 sums (CUDA) or float64 (CPU): within
    # 2^-18 of the magnitudes (lowrank.dora's U_CROSS, the bound its error model assumes)
    assert ((p.cpu().double() - ref).abs() <= 2.0 ** -18 * scale + 1e-30).all()
    assert torch.equal(p, ops.dora_cross_4bit(*_cross_args(q, a)))  # deterministic


def test_dora_cross_rejects_bad_input(device):
    q = lowrank.quantize_4bit(torch.randn(8, 64, device=device))
    with pytest.raises(RuntimeError, match="float32 \\[r, in_features = 64\\]"):
        ops.dora_cross_4bit(*_cross_args(q, torch.randn(4, 63, device=device)))
    with pytest.raises(RuntimeError, match="float32 \\[r, in_features = 64\\]"):
        ops.dora_cross_4bit(*_cross_args(q, torch.randn(4, 64, device=device).double()))


def test_dora_cross_cuda_limits(cuda_device):
    q = lowrank.quantize_4bit(torch.randn(8, 66, device=cuda_device), blocksize=32)
    with pytest.raises(RuntimeError, match="in_features % 4 == 0 and r <= 64"):
        ops.dora_cross_4bit(*_cross_args(q, torch.randn(4, 66, device=cuda_device)))


def test_opcheck_dora_cross(device):
    for double_quant in (False, True):
        q = lowrank.quantize_4bit(torch.randn(24, 128, device=device), double_quant=double_quant)
        torch.library.opcheck(torch.ops.lowrank.dora_cross_4bit.default, _cross_args(q, torch.randn(16, 128, device=device)))


# --- lora_merge_4bit: W' = v (W0 + s B A) from the packed weight -----------------------------------

def _merge_args(q, a, b, v, s, dtype):
    return (q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map,
            q.blocksize, q.nested_blocksize, q.shape[0], q.shape[1], a, b, v, s, dtype)


@given(st.integers(1, 300), st.sampled_from([4, 64, 100, 128, 192, 260, 1024]), st.integers(1, 32),
       st.sampled_from(["nf4", "fp4"]), st.sampled_from([32, 64, 256]), st.booleans(), st.booleans(),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2**31 - 1))
def test_lora_merge_matches_float64(device, n, k, r, quant_type, blocksize, double_quant, row_scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = lowrank.quantize_4bit((torch.randn(n, k, generator=g) * 0.05).to(device), quant_type, blocksize, double_quant)
    a = torch.randn(r, k, generator=g).to(device) * 0.1
    b = torch.randn(n, r, generator=g).to(device) * 0.1
    v = (torch.rand(n, generator=g) + 0.5).to(device) if row_scale else None
    s = 0.75
    out = ops.lora_merge_4bit(*_merge_args(q, a, b, v, s, dtype))
    assert out.shape == (n, k) and out.dtype == dtype
    w0 = q.dequantize(torch.float32).double().cpu()
    a64, b64 = a.double().cpu(), b.double().cpu()
    v64 = v.double().cpu()[:, None] if row_scale else torch.ones(n, 1, dtype=torch.float64)
    ref = v64 * (w0 + s * b64 @ a64)
    # float32 steps: w0 * v (2 roundings), the r-term fma chain (<= r + 1 roundings of its partial
    # sums), the sum; then one rounding to dtype (half its ulp: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32)
    low_rank = s * (v64 * b64.abs()) @ a64.abs()
    f32 = 2.0 ** -24 * (3 * (v64 * w0).abs() + (r + 2) * low_rank)
    # CUDA, 16-bit out, r <= 16, k % 64 == 0: the rank-r product from split-bf16 mma (merge_mma.cu), ~2^-15
    mma = device == "cuda" and dtype != torch.float32 and r <= 16 and k % 64 == 0
    if mma:
        f32 = f32 + 2.0 ** -14 * low_rank
    unit = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    err = (out.cpu().double() - ref).abs()
    assert (err <= f32 + unit * (ref.abs() + f32) + (2.0 ** -24 if dtype == torch.float16 else 0.0)).all()
    if device == "cuda" and not mma:  # the same operations in the same order: the CPU op is bit-identical
        q_cpu = q.to("cpu")
        assert torch.equal(out.cpu(), ops.lora_merge_4bit(*_merge_args(q_cpu, a.cpu(), b.cpu(),
                                                                        None if v is None else v.cpu(), s, dtype)))


def test_lora_merge_without_adapter_is_the_dequantized_weight(device):
    q = lowrank.quantize_4bit(torch.randn(40, 256, device=device) * 0.05)
    a, b = torch.randn(16, 256, device=device), torch.zeros(40, 16, device=device)
    v = torch.rand(40, device=device) + 0.5
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(ops.lora_merge_4bit(*_merge_args(q, a, b, None, 2.0, dtype)), q.dequantize(dtype))
        # with DoRA's v: v folded into each block's absmax, as lora_function._dequantized
        from lowrank.lora_function import _dequantized
        assert torch.equal(ops.lora_merge_4bit(*_merge_args(q, a, b, v, 2.0, dtype)), _dequantized(q, dtype, v))


def test_lora_merge_rejects_bad_input(device):
    q = lowrank.quantize_4bit(torch.randn(8, 64, device=device))
    a, b = torch.randn(4, 64, device=device), torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32 \\[r, in_features = 64\\]"):
        ops.lora_merge_4bit(*_merge_args(q, torch.randn(4, 63, device=device), b, None, 1.0, torch.bfloat16))
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32"):
        ops.lora_merge_4bit(*_merge_args(q, a.double(), b, None, 1.0, torch.bfloat16))
    with pytest.raises(RuntimeError, match="b \\(lora_B\\) must be float32 \\[out_features = 8, r = 4\\]"):
        ops.lora_merge_4bit(*_merge_args(q, a, torch.randn(8, 5, device=device), None, 1.0, torch.bfloat16))
    with pytest.raises(RuntimeError, match="b \\(lora_B\\) must be float32"):
        ops.lora_merge_4bit(*_merge_args(q, a, b.half(), None, 1.0, torch.bfloat16))
    with pytest.raises(RuntimeError, match="row_scale must be float32 \\[out_features = 8\\]"):
        ops.lora_merge_4bit(*_merge_args(q, a, b, torch.ones(7, device=device), 1.0, torch.bfloat16))
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        ops.lora_merge_4bit(*_merge_args(q, a, b, None, 1.0, torch.int32))
    with pytest.raises(RuntimeError, match="packed must be contiguous uint8"):
        ops.lora_merge_4bit(q.packed.reshape(-1)[:-1], *_merge_args(q, a, b, None, 1.0, torch.bfloat16)[1:])


def test_lora_merge_cuda_limits(cuda_device):
    q = lowrank.quantize_4bit(torch.randn(8, 66, device=cuda_device), blocksize=32)
    with pytest.raises(RuntimeError, match="in_features % 4 == 0 and r <= 32"):
        ops.lora_merge_4bit(*_merge_args(q, torch.randn(4, 66, device=cuda_device), torch.randn(8, 4, device=cuda_device),
                                         None, 1.0, torch.bfloat16))
    q = lowrank.quantize_4bit(torch.randn(8, 64, device=cuda_device))
    with pytest.raises(RuntimeError, match="in_features % 4 == 0 and r <= 32"):
        ops.lora_merge_4bit(*_merge_args(q, torch.randn(33, 64, device=cuda_device),
                                         torch.randn(8, 33, device=cuda_device), None, 1.0, torch.bfloat16))


def test_opcheck_lora_merge(device):
    for double_quant in (False, True):
        q = lowrank.quantize_4bit(torch.randn(24, 128, device=device), double_quant=double_quant)
        a, b = torch.randn(16, 128, device=device), torch.randn(24, 16, device=device)
        for v in (None, torch.rand(24, device=device)):
            torch.library.opcheck(torch.ops.lowrank.lora_merge_4bit.default,
                                  _merge_args(q, a, b, v, 0.5, torch.bfloat16))


# --- lora_merge_dense: W' = v (W0 + s B A) from a float base -------------------------------------

@given(st.integers(1, 300), st.sampled_from([4, 64, 100, 128, 192, 1024]), st.integers(1, 32), st.booleans(),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2**31 - 1))
def test_lora_merge_dense_matches_float64(device, n, k, r, row_scale, dtype, seed):
    mma = device == "cuda"  # the CUDA op is the split-bf16 kernel, for the shapes it takes
    if mma and (dtype == torch.float32 or k % 64 or r > 16):
        return  # refused on CUDA: test_lora_merge_dense_cuda_limits
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(device)
    a = torch.randn(r, k, generator=g).to(device) * 0.1
    b = torch.randn(n, r, generator=g).to(device) * 0.1
    v = (torch.rand(n, generator=g) + 0.5).to(device) if row_scale else None
    s = 0.75
    out = ops.lora_merge_dense(w, a, b, v, s)
    assert out.shape == (n, k) and out.dtype == dtype
    w0, a64, b64 = w.double().cpu(), a.double().cpu(), b.double().cpu()
    v64 = v.double().cpu()[:, None] if row_scale else torch.ones(n, 1, dtype=torch.float64)
    ref = v64 * (w0 + s * b64 @ a64)
    # float32 steps: s v and (s v) B (2 roundings of the terms), the r-term fma chain (<= r
    # roundings of its partial sums), the fma with w0 v; then one rounding to dtype
    low_rank = s * (v64 * b64.abs()) @ a64.abs()
    f32 = 2.0 ** -24 * ((v64 * w0).abs() + (r + 3) * low_rank)
    if mma:  # the rank-r product from 2-way split-bf16 mma (merge_mma.cu), ~2^-15
        f32 = f32 + 2.0 ** -14 * low_rank
    unit = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    err = (out.cpu().double() - ref).abs()
    assert (err <= f32 + unit * (ref.abs() + f32) + (2.0 ** -24 if dtype == torch.float16 else 0.0)).all()


def test_lora_merge_dense_without_adapter_is_the_weight_times_v(device):
    """B = 0: W' is W0 itself, and with DoRA's v each element w0 v rounded once (to float32, then to
    the weight's dtype), on every backend: the low-rank sum is exactly +0."""
    w = torch.randn(40, 256, device=device) * 0.05
    a, b = torch.randn(16, 256, device=device), torch.zeros(40, 16, device=device)
    v = torch.rand(40, device=device) + 0.5
    for dtype in (torch.bfloat16, torch.float16) + ((torch.float32,) if device == "cpu" else ()):
        wd = w.to(dtype)
        assert torch.equal(ops.lora_merge_dense(wd, a, b, None, 2.0), wd)
        assert torch.equal(ops.lora_merge_dense(wd, a, b, v, 2.0), (wd.float() * v[:, None]).to(dtype))


def test_lora_merge_dense_rejects_bad_input(device):
    w = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    a, b = torch.randn(4, 64, device=device), torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="weight must be a float32, float16 or bfloat16 matrix"):
        ops.lora_merge_dense(w.to(torch.int32), a, b, None, 1.0)
    with pytest.raises(RuntimeError, match="weight must be a float32, float16 or bfloat16 matrix"):
        ops.lora_merge_dense(w.reshape(-1), a, b, None, 1.0)
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32 \\[r, in_features = 64\\]"):
        ops.lora_merge_dense(w, torch.randn(4, 63, device=device), b, None, 1.0)
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32"):
        ops.lora_merge_dense(w, a.double(), b, None, 1.0)
    with pytest.raises(RuntimeError, match="b \\(lora_B\\) must be float32 \\[out_features = 8, r = 4\\]"):
        ops.lora_merge_dense(w, a, torch.randn(8, 5, device=device), None, 1.0)
    with pytest.raises(RuntimeError, match="row_scale must be float32 \\[out_features = 8\\]"):
        ops.lora_merge_dense(w, a, b, torch.ones(7, device=device), 1.0)
    with pytest.raises(RuntimeError, match="row_scale must be float32"):
        ops.lora_merge_dense(w, a, b, torch.ones(8, device=device, dtype=torch.float64), 1.0)


def test_lora_merge_dense_rejects_another_device(cuda_device):
    w = torch.randn(8, 64, device=cuda_device, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="a must be on"):
        ops.lora_merge_dense(w, torch.randn(4, 64), torch.randn(8, 4, device=cuda_device), None, 1.0)


def test_lora_merge_dense_cuda_limits(cuda_device):
    a, b = torch.randn(4, 64, device=cuda_device), torch.randn(8, 4, device=cuda_device)
    limits = "float16 or bfloat16 weight, in_features % 64 == 0, r <= 16"
    with pytest.raises(RuntimeError, match=limits):
        ops.lora_merge_dense(torch.randn(8, 64, device=cuda_device), a, b, None, 1.0)  # float32
    with pytest.raises(RuntimeError, match=limits):
        ops.lora_merge_dense(torch.randn(8, 96, device=cuda_device).bfloat16(), torch.randn(4, 96, device=cuda_device),
                             b, None, 1.0)
    with pytest.raises(RuntimeError, match=limits):
        ops.lora_merge_dense(torch.randn(8, 64, device=cuda_device).half(), torch.randn(17, 64, device=cuda_device),
                             torch.randn(8, 17, device=cuda_device), None, 1.0)


def test_lora_merge_dense_reads_strided_and_misaligned_weights(device):
    """A non-contiguous W0 (a transposed view) and one at an odd element offset give the contiguous
    weight's W'."""
    w = torch.randn(64, 48, device=device).bfloat16()
    a, b = torch.randn(8, 64, device=device) * 0.1, torch.randn(48, 8, device=device) * 0.1
    ref = ops.lora_merge_dense(w.t().contiguous(), a, b, None, 0.5)
    assert torch.equal(ops.lora_merge_dense(w.t(), a, b, None, 0.5), ref)
    flat = torch.empty(48 * 64 + 1, device=device, dtype=torch.bfloat16)
    shifted = flat[1:].view(48, 64)
    shifted.copy_(w.t())
    assert torch.equal(ops.lora_merge_dense(shifted, a, b, None, 0.5), ref)


def test_opcheck_lora_merge_dense(device):
    w = torch.randn(24, 128, device=device, dtype=torch.bfloat16)
    a, b = torch.randn(16, 128, device=device), torch.randn(24, 16, device=device)
    for v in (None, torch.rand(24, device=device)):
        torch.library.opcheck(torch.ops.lowrank.lora_merge_dense.default, (w, a, b, v, 0.5))


def test_dense_merge_applies_where_it_pays(monkeypatch):
    import lowrank.lora_function as lf
    w = torch.randn(8, 64).bfloat16()
    x, a = torch.randn(32, 64).bfloat16(), torch.randn(4, 64)
    assert not lf._dense_merge_applies(x, w, a, 0.0, True, True)  # CPU: off unless forced
    monkeypatch.setattr(lf, "MERGE_ON_CPU", True)
    assert lf._dense_merge_applies(x, w, a, 0.0, True, True)
    assert not lf._dense_merge_applies(x, w, a, 0.0, False, True)     # LoRA: the C operand path
    assert not lf._dense_merge_applies(x, w, a, 0.1, True, True)      # dropout: x' != x
    assert not lf._dense_merge_applies(x, None, a, 0.0, True, True)   # a 4-bit base: _merge_applies
    assert not lf._dense_merge_applies(x.float(), w, a, 0.0, True, True)  # W0 not in x's dtype
    assert not lf._dense_merge_applies(x, w, torch.randn(17, 64), 0.0, True, True)  # r > MERGE_MAX_RANK
    assert not lf._dense_merge_applies(x[:8], w, a, 0.0, True, False)  # no backward, M < in / 4
    assert lf._dense_merge_applies(x[:16], w, a, 0.0, True, False)
    monkeypatch.setenv("LOWRANK_MERGE_DENSE", "all")
    assert lf._dense_merge_applies(x, w, a, 0.0, False, True)
    monkeypatch.setenv("LOWRANK_MERGE_DENSE", "0")
    assert not lf._dense_merge_applies(x, w, a, 0.0, True, True)
    monkeypatch.setenv("LOWRANK_MERGE_DENSE", "dora")
    monkeypatch.setenv("LOWRANK_MERGE", "0")
    assert not lf._dense_merge_applies(x, w, a, 0.0, True, True)


def test_dense_merge_applies_on_cuda(cuda_device):
    import lowrank.lora_function as lf
    w = torch.randn(8, 64, device=cuda_device).bfloat16()
    a = torch.randn(4, 64, device=cuda_device)
    x = torch.randn(32, 64, device=cuda_device).bfloat16()
    assert lf._dense_merge_applies(x, w, a, 0.0, True, True)
    assert not lf._dense_merge_applies(x[:16], w, a, 0.0, True, True)  # M <= 16
    assert not lf._dense_merge_applies(x.float(), w.float(), a, 0.0, True, True)  # float32: no kernel
    w96, a96 = torch.randn(8, 96, device=cuda_device).bfloat16(), torch.randn(4, 96, device=cuda_device)
    assert not lf._dense_merge_applies(torch.randn(32, 96, device=cuda_device).bfloat16(), w96, a96, 0.0, True, True)


@given(st.integers(0, 2**31 - 1), st.integers(17, 40), st.sampled_from([64, 128]), st.sampled_from([16, 48]),
       st.sampled_from([1, 4, 16]), st.booleans(), st.booleans())
def test_dense_merged_path_matches_float64(device, seed, m, k, n, r, with_bias, dora):
    """A float base's merged path (both GEMMs against W' = v (W0 + s B A) from ops.lora_merge_dense),
    for LoRA and DoRA, forced on CPU (float32 here, which the CUDA kernel does not take: there the
    unmerged path runs and is checked the same way)."""
    import os
    import lowrank.lora_function as lf
    lf.MERGE_ON_CPU = True
    old = os.environ.get("LOWRANK_MERGE_DENSE")
    os.environ["LOWRANK_MERGE_DENSE"] = "all"
    calls = []
    real = lf._merged_dense
    lf._merged_dense = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        _check_against_float64(device, seed, m, k, n, r, False, with_bias, dora)
    finally:
        lf.MERGE_ON_CPU = False
        lf._merged_dense = real
        if old is None:
            os.environ.pop("LOWRANK_MERGE_DENSE")
        else:
            os.environ["LOWRANK_MERGE_DENSE"] = old
    assert len(calls) == (2 if device == "cpu" else 0)


def test_merge_applies_only_where_it_is_exact(monkeypatch):
    import lowrank.lora_function as lf
    q = lowrank.quantize_4bit(torch.randn(8, 64))
    x, a = torch.randn(32, 64), torch.randn(4, 64)
    assert not lf._merge_applies(x, q, a, 0.0)  # CPU: off unless forced
    monkeypatch.setattr(lf, "MERGE_ON_CPU", True)
    assert lf._merge_applies(x, q, a, 0.0)
    assert not lf._merge_applies(x, q, a, 0.1)                      # dropout: x' != x
    assert not lf._merge_applies(x, None, a, 0.0)                   # a float base
    assert lf._merge_applies(x, q, torch.randn(16, 64), 0.0)
    assert not lf._merge_applies(x, q, torch.randn(17, 64), 0.0)    # r > MERGE_MAX_RANK: costs more than it saves
    monkeypatch.setenv("LOWRANK_MERGE", "0")
    assert not lf._merge_applies(x, q, a, 0.0)


# --- lora_project: x A^T in float32 with float32 adapters ------------------------------------------

@given(st.integers(1, 80), st.sampled_from([4, 64, 100, 256, 1030]), st.integers(1, 64),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(0, 2**31 - 1))
def test_lora_project_matches_float64(device, m, k, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = torch.randn(r, k, generator=g)
    out = ops.lora_project(x.to(device), a.to(device))
    ref = x.double() @ a.double().t()
    scale = x.double().abs() @ a.double().abs().t()
    assert out.shape == (m, r) and out.dtype == torch.float32
    assert ((out.cpu().double() - ref).abs() <= 2.0 ** -18 * scale + 1e-30).all()
    assert torch.equal(out, ops.lora_project(x.to(device), a.to(device)))  # deterministic


def test_column_reduce_takes_a_float32_h(device):
    g = torch.Generator().manual_seed(11)
    dy = torch.randn(300, 130, generator=g).bfloat16()
    for r in (3, 16, 29):
        h = torch.randn(300, r, generator=g)
        dh, _ = ops.lora_column_reduce(dy.to(device), h.to(device))
        ref = dy.double().t() @ h.double()
        assert ((dh.cpu().double() - ref).abs() <= 4e-5 * (dy.double().abs().t() @ h.double().abs())).all()


def test_lora_project_rejects_bad_input(device):
    with pytest.raises(RuntimeError, match="x must be \\[M, K\\] and a float32 \\[r, K\\]"):
        ops.lora_project(torch.randn(4, 8, device=device), torch.randn(2, 9, device=device))
    with pytest.raises(RuntimeError, match="x must be \\[M, K\\] and a float32 \\[r, K\\]"):
        ops.lora_project(torch.randn(4, 8, device=device), torch.randn(2, 8, device=device).double())
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.lora_project(torch.randn(4, 8, device=device).double(), torch.randn(2, 8, device=device))


def test_opcheck_lora_project(device):
    for dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(torch.ops.lowrank.lora_project.default,
                              (torch.randn(70, 132, device=device, dtype=dtype), torch.randn(16, 132, device=device)))


# --- the layer in bf16 (CPU and CUDA), against PEFT by the 2x rule ----------------------------------------

class _SeededDropout(torch.nn.Module):
    """Dropout drawing its mask as lowrank's layer does (one seed from the global generator)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        from lowrank.lora_function import draw_seed
        return x * dropout_keep_mask(draw_seed(), x.shape, self.p, x.device, x.dtype) / (1 - self.p)


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_layer_within_twice_peft_error(device, four_bit, use_dora, dropout):
    """Outputs and gradients (x, A, B, m) of LoraLinear in bf16 against a float64 evaluation of the
    same formula, within 2x the error of PEFT's layer (bf16 base, float32 adapters) on the same
    weights (+ a floor of 1e-3 of the reference's scale for exactly-zero errors); with dropout both
    layers drop the same elements (PEFT's DoRA rule: the scaled base term sees x' too). On CUDA
    (M = 96) DoRA over the bf16 base takes the merged weight of ops.lora_merge_dense."""
    _check_bf16_layer(device, four_bit, use_dora, dropout)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_dense_merged_layer_within_twice_peft_error(device, use_dora, monkeypatch):
    """The same check with the merged weight built from the bf16 base for LoRA and DoRA
    (LOWRANK_MERGE_DENSE=all), forced on CPU too."""
    import lowrank.lora_function as lf
    monkeypatch.setattr(lf, "MERGE_ON_CPU", True)
    monkeypatch.setenv("LOWRANK_MERGE_DENSE", "all")
    calls = []
    real = lf._merged_dense
    monkeypatch.setattr(lf, "_merged_dense", lambda *a, **k: calls.append(1) or real(*a, **k))
    _check_bf16_layer(device, False, use_dora, 0.0)
    assert len(calls) == 2  # the forward's W' and the backward's


def _check_bf16_layer(device, four_bit, use_dora, dropout):
    peft = pytest.importorskip("peft")
    import copy
    from lowrank.lora_function import draw_seed
    torch.manual_seed(0)
    k, n, m = 512, 384, 96
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
    base = lowrank.nn.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16) if four_bit else linear
    ours = lowrank.nn.LoraLinear(base, r=16, lora_alpha=32, lora_dropout=dropout, use_dora=use_dora).train()
    with torch.no_grad():
        ours.lora_A.weight.normal_(std=0.05)
        ours.lora_B.weight.normal_(std=0.05)
    w0 = ours.base_weight_fp32()
    if four_bit:  # PEFT gets the same (dequantized) base in bf16
        linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            linear.weight.copy_(w0)
        w0 = linear.weight.float()

    class One(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    twin = peft.get_peft_model(One(copy.deepcopy(linear)), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"],
                                                                           lora_dropout=dropout, use_dora=use_dora))
    twin.train()
    t = twin.base_model.model.proj
    if dropout:
        t.lora_dropout["default"] = _SeededDropout(dropout)
    with torch.no_grad():
        t.lora_A["default"].weight.copy_(ours.lora_A.weight)
        t.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if use_dora:
            t.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    leaves64 = [x.double().requires_grad_(), ours.lora_A.weight.double().detach().requires_grad_(),
                ours.lora_B.weight.double().detach().requires_grad_()]
    x64, a64, b64 = leaves64
    torch.manual_seed(11)  # each run below draws its mask's seed right after this
    xd64 = x64 * dropout_keep_mask(draw_seed(), x.shape, dropout, device, x.dtype).double() / (1 - dropout) if dropout \
        else x64
    w64 = w0.double()
    lora64 = ours.scaling * (xd64 @ a64.t()) @ b64.t()
    if use_dora:
        m64 = ours.lora_magnitude_vector.double().detach().requires_grad_()
        v = m64 / (w64 + ours.scaling * b64 @ a64).norm(dim=1).detach()
        y64 = x64 @ w64.t() + (v - 1) * (xd64 @ w64.t()) + v * lora64
        leaves64.append(m64)
    else:
        y64 = x64 @ w64.t() + lora64
    y64.backward(dy.double())

    def run(layer, params):
        xx = x.clone().requires_grad_()
        torch.manual_seed(11)
        y = layer(xx)
        y.backward(dy)
        return [y.float()] + [xx.grad.float()] + [p.grad.float() for p in params]
    ours_out = run(ours, [ours.lora_A.weight, ours.lora_B.weight] + ([ours.lora_magnitude_vector] if use_dora else []))
    peft_params = [t.lora_A["default"].weight, t.lora_B["default"].weight] + (
        [t.lora_magnitude_vector["default"].weight] if use_dora else [])
    peft_out = run(twin, peft_params)
    if use_dora and dropout:
        # PEFT's DoRA branch under dropout runs in float32 (x cast to the adapters' float32, W0
        # dequantized to float32; what makes it 3 GB at the bench's shape), so its dm is
        # float32-accurate, while dm of any bf16 evaluation carries the bf16 rounding of the term
        # it sums (ours, and PEFT's own without dropout). For dm under dropout the yardstick is
        # the same formula in bf16 PyTorch ops (two bf16 F.linear, float32 adapters and v).
        m_bf = ours.lora_magnitude_vector.detach().clone().requires_grad_()
        torch.manual_seed(11)
        keep = dropout_keep_mask(draw_seed(), x.shape, dropout, device, x.dtype)
        xd_bf = x * keep / (1 - dropout)
        w_bf = w0.to(torch.bfloat16)
        a32, b32 = ours.lora_A.weight.detach(), ours.lora_B.weight.detach()
        v_bf = m_bf / (w0 + ours.scaling * b32 @ a32).norm(dim=1)
        term = torch.nn.functional.linear(xd_bf, w_bf).float() * (v_bf - 1) + v_bf * (
            ours.scaling * (xd_bf.float() @ a32.t()) @ b32.t())
        (torch.nn.functional.linear(x, w_bf) + term.to(torch.bfloat16)).backward(dy)
        peft_out[4] = m_bf.grad.float()
    refs = [y64.detach()] + [leaf.grad for leaf in leaves64]
    names = ["y", "dx", "dA", "dB", "dm"]
    for name, o, p, ref in zip(names, ours_out, peft_out, refs):
        err, peft_err = (o.double() - ref).norm(), (p.double() - ref).norm()
        assert err <= 2 * peft_err + 1e-3 * ref.norm(), (name, float(err), float(peft_err))


@pytest.mark.parametrize("m, k", [(96, 64), (32, 128)])  # v into W (in <= M), v into dY (in > M)
def test_dora_grad_input_scaling_either_operand(device, m, k):
    """dY diag(v) W with v in float32 folded into the smaller operand: within 2x the error of
    rounding dY v once to bf16 and multiplying, on both branches."""
    from lowrank.lora_function import _grad_input_operands
    torch.manual_seed(3)
    n = 80
    dy = torch.randn(m, n, device=device).bfloat16()
    w = torch.randn(n, k, device=device).bfloat16()
    v = torch.rand(n, device=device) + 0.5
    ref = (dy.double() * v.double()) @ w.double()
    plain = ((dy.float() * v).bfloat16() @ w).double()
    lhs, rhs = _grad_input_operands(dy, v, w, None, torch.bfloat16)
    got = lhs @ rhs
    assert got.dtype == torch.bfloat16 and got.shape == (m, k)
    assert (got.double() - ref).norm() <= 2 * (plain - ref).norm()


# -- the pieces of the fast CUDA path (split-precision products, the dot, v folded into W) -------

@given(st.integers(0, 2**31 - 1))
def test_split3_is_exact(seed):
    """hi + mid + lo == b exactly for float32 b over a wide range of magnitudes (so the tensor-core
    product against [hi | mid | lo] is a float32 product); the CUDA kernel equals the CPU ops bit
    for bit, strided input (a transposed view) included."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(64, 7, generator=g) * torch.exp2(torch.randint(-60, 60, (64, 7), generator=g).float())
    for device in DEVICES:
        for src in (b, b.t()):
            out = ops.split_bf16x3(src.to(device))
            assert out.dtype == torch.bfloat16 and out.shape == (src.shape[0], 3 * src.shape[1])
            hi, mid, lo = out.cpu().double().chunk(3, dim=1)
            assert torch.equal(hi + mid + lo, src.double())
            if device != "cpu":
                assert torch.equal(out.cpu(), ops.split_bf16x3(src))


def test_split_bf16x3_rejects_bad_input():
    with pytest.raises(RuntimeError, match="2-D float32"):
        ops.split_bf16x3(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="2-D float32"):
        ops.split_bf16x3(torch.zeros(4))


def test_split_bf16x3_opcheck(device):
    torch.library.opcheck(torch.ops.lowrank.split_bf16x3.default, (torch.randn(5, 3, device=device),))


@given(st.integers(1, 70), st.integers(1, 20), st.sampled_from([1.0, 0.5, -3.0]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_split_bf16x3_sum(m, n, scale, transpose, seed):
    """scale * ((hi + mid) + lo part) in float32, [M, n] or its transpose, contiguous; the CUDA kernel
    equals the CPU ops bit for bit, strided input included; a split product comes back as float32."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.randn(m, 3 * n, generator=g) * torch.exp2(torch.randint(-30, 30, (m, 3 * n), generator=g).float())
    hi, mid, lo = parts.chunk(3, dim=1)
    want = ((hi + mid) + lo) * scale
    want = want.t() if transpose else want
    for device in DEVICES:
        for src in (parts, parts.t().contiguous().t()):
            out = ops.split_bf16x3_sum(src.to(device), scale, transpose)
            assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == want.shape
            assert torch.equal(out.cpu(), want)
    # the round trip: a16 @ split(b) summed is the float32-exact product of bf16 a and float32 b
    a = torch.randn(m, 24, generator=g).bfloat16()
    b = torch.randn(24, n, generator=g)
    prod = ops.split_bf16x3_sum(a.double().float() @ ops.split_bf16x3(b).float(), 1.0, transpose)
    exact = a.double() @ b.double()
    bound = 2.0 ** -20 * (a.double().abs() @ b.double().abs())  # float32 sums of exact products
    exact, bound = (exact.t(), bound.t()) if transpose else (exact, bound)
    assert bool(((prod.double() - exact).abs() <= bound).all())


def test_split_bf16x3_sum_rejects_bad_input():
    with pytest.raises(RuntimeError, match="parts must be a 2-D float32 tensor \\[M, 3 n\\], got Float \\[4, 4\\]"):
        ops.split_bf16x3_sum(torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="parts must be a 2-D float32 tensor \\[M, 3 n\\], got Double"):
        ops.split_bf16x3_sum(torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="parts must be a 2-D float32 tensor \\[M, 3 n\\], got Float \\[6\\]"):
        ops.split_bf16x3_sum(torch.zeros(6))


def test_split_bf16x3_sum_opcheck(device):
    for transpose in (False, True):
        torch.library.opcheck(torch.ops.lowrank.split_bf16x3_sum.default,
                              (torch.randn(5, 6, device=device), 0.5, transpose))


def test_mm_f32_matches_float64(cuda_device):
    from lowrank.lora_function import _mm_f32, _split_mm_enabled
    torch.manual_seed(0)
    a = torch.randn(300, 1000, device=cuda_device).bfloat16()
    if not _split_mm_enabled(a):
        pytest.skip("torch.mm(out_dtype=float32) is not available: the CUDA-core kernels are used")
    b = torch.randn(1000, 16, device=cuda_device)
    ref = a.double() @ b.double()
    got = _mm_f32(a, b)
    assert got.dtype == torch.float32
    # float32-level: a float32 GEMM errs by ~sqrt(K) 2^-24 |a||b|; a bf16-rounded b by 2^-9
    scale = a.double().abs() @ b.double().abs()
    assert float(((got.double() - ref).abs() / scale).max()) <= 2.0 ** -18
    got_t = _mm_f32(a.t(), torch.randn(300, 8, device=cuda_device))  # a transposed view
    assert got_t.shape == (1000, 8)


@pytest.mark.parametrize("n", [8, 264, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_column_dot_alone(device, n, dtype):
    """lora_column_reduce with r = 0: DoRA's sum_M(dY * y) alone (the streaming kernel on CUDA)."""
    torch.manual_seed(1)
    m = 333
    dy = torch.randn(m, n, device=device).to(dtype)
    y = torch.randn(m, n, device=device).to(dtype)
    dh, dot = ops.lora_column_reduce(dy, dy.new_empty(m, 0), y)
    assert dh.shape == (n, 0) and dot.shape == (n,) and dot.dtype == torch.float32
    ref = (dy.double() * y.double()).sum(0)
    scale = (dy.double() * y.double()).abs().sum(0)
    assert float(((dot.double() - ref).abs() / scale).max()) <= 1e-5
    # odd widths (n % 8 != 0) take the generic path and agree
    dh2, dot2 = ops.lora_column_reduce(dy[:, :n - 2], dy.new_empty(m, 0), y[:, :n - 2])
    assert float(((dot2.double() - ref[:n - 2]).abs() / scale[:n - 2]).max()) <= 1e-5


@pytest.mark.parametrize("k", [128, 96])  # k % blocksize == 0 (v into the absmax) and not (float32 path)
def test_dequantized_with_row_scale(device, k):
    """W' = value * absmax * v, one rounding to bf16: within half an ulp of bf16 (plus float32 noise)
    of the float64 product, and equal to the plain dequantize where v = 1."""
    from lowrank.lora_function import _dequantized
    torch.manual_seed(2)
    n = 40
    q = lowrank.quantize_4bit(torch.randn(n, k, device=device), blocksize=64)
    v = torch.rand(n, device=device) + 0.5
    got = _dequantized(q, torch.bfloat16, v)
    assert got.dtype == torch.bfloat16 and got.shape == (n, k)
    exact = q.dequantize(torch.float32).double() * v.double()[:, None]
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all())
    ones = _dequantized(q, torch.bfloat16, torch.ones(n, device=device))
    assert torch.equal(ones, q.dequantize(torch.bfloat16))


def test_async_flag(device):
    from lowrank.lora_function import _AsyncFlag
    assert bool(_AsyncFlag(torch.tensor([0.0, 1.0], device=device).eq(0).any()))
    assert not bool(_AsyncFlag(torch.tensor([2.0, 1.0], device=device).eq(0).any()))
    word = _AsyncFlag(torch.tensor([2], dtype=torch.int32, device=device))
    assert word.value() == 2 and bool(word) and bool(word.bits(2)) and bool(word.bits(3)) and not bool(word.bits(1))
    assert not bool(_AsyncFlag(torch.tensor([0], dtype=torch.int32, device=device)))


def test_lora_forward_rejects_a_bad_row_scale():
    w, q, _, x, a, b, _, mag = _problem(3, 4, 64, 16, 4, True, False, "cpu")
    norm = torch.ones(16)
    with pytest.raises(ValueError, match="row_scale must be DoRA's detached float32 m / n \\[16\\].*float64"):
        lora_forward(x, a, b, 1.0, weight=w, magnitude=mag, weight_norm=norm, row_scale=norm.double())
    with pytest.raises(ValueError, match="row_scale must be DoRA's detached float32 m / n \\[16\\].*\\[15\\]"):
        lora_forward(x, a, b, 1.0, weight=w, magnitude=mag, weight_norm=norm, row_scale=norm[:15])
    with pytest.raises(ValueError, match="requiring grad"):
        lora_forward(x, a, b, 1.0, weight=w, magnitude=mag, weight_norm=norm, row_scale=norm.requires_grad_())
    with pytest.raises(ValueError, match="without magnitude"):
        lora_forward(x, a, b, 1.0, weight=w, row_scale=torch.ones(16))
    # given, it is what the forward uses: the same output as computing m / n there
    m = mag.detach().abs() + 0.5
    n = torch.rand(16) + 0.5
    torch.testing.assert_close(lora_forward(x, a, b, 1.0, weight=w, magnitude=m, weight_norm=n, row_scale=m / n),
                               lora_forward(x, a, b, 1.0, weight=w, magnitude=m, weight_norm=n), rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_split_and_kernel_paths_agree(cuda_device, use_dora, monkeypatch):
    """The CUDA path with the split-precision cuBLAS products and the one with the CUDA-core kernels
    (LOWRANK_SPLIT_MM=0) compute the same layer: outputs and every gradient within bf16 noise of
    each other and of the float64 reference, at an M above the skinny kernel's (M = 80)."""
    import lowrank.lora_function as lf
    w, q, w_base, x, a, b, bias, mag = _problem(5, 80, 256, 192, 16, True, True, "cpu")
    q = q.to(cuda_device)
    results = []
    # the fused dY products (LOWRANK_DY_FUSED, out % 64 == 0 here), the split cuBLAS products, the
    # CUDA-core kernels
    for split, fused in ((None, "1"), (None, "0"), (False, "0")):
        monkeypatch.setattr(lf, "_SPLIT_MM", split)
        monkeypatch.setenv("LOWRANK_DY_FUSED", fused)
        xx = x.to(cuda_device).bfloat16().requires_grad_()
        aa, bb = a.to(cuda_device).requires_grad_(), b.to(cuda_device).requires_grad_()
        mm = mag.to(cuda_device).requires_grad_() if use_dora else None
        dora = dict(magnitude=mm, weight_norm=(w_base + 2.0 * b @ a).norm(dim=1).to(cuda_device)) if use_dora else {}
        y = lora_forward(xx, aa, bb, 2.0, quant=q, bias=bias.to(cuda_device), **dora)
        torch.manual_seed(9)
        dy = torch.randn(y.shape, device=cuda_device).bfloat16()
        y.backward(dy)
        results.append([y.float(), xx.grad.float(), aa.grad, bb.grad] + ([mm.grad] if use_dora else []))
    for name, s_, k_ in zip(["y", "dx", "dA", "dB", "dm"], results[0], results[2]):
        rel = float((s_.double() - k_.double()).norm() / k_.double().norm())
        assert rel <= 1e-2, (name, rel)
    for name, s_, k_ in zip(["y", "dx", "dA", "dB", "dm"], results[1], results[2]):
        rel = float((s_.double() - k_.double()).norm() / k_.double().norm())
        assert rel <= 1e-2, (name, rel)  # both are bf16 computations of the same math (v off: ~5%)


# --- lora_dy_products: g = dY B, dY^T h, sum_M(dY * y) in one read of dY -----------------------------

def _check_dy_products(device, m, n, r, with_y, dtype, seed, scaled=False):
    """Against float64. ``scaled``: DoRA's form, col_scale = v, dh_scaling = s, dot_divisor = m
    with some m = 0 (those columns' dot must come back 0)."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(m, n, generator=g).to(dtype)
    y = torch.randn(m, n, generator=g).to(dtype) if with_y else None
    b = torch.randn(n, r, generator=g) * 0.05
    h = torch.randn(m, r, generator=g)
    col_scale = dot_divisor = None
    dh_scaling = 1.0
    if scaled:
        col_scale = torch.rand(n, generator=g) + 0.5
        dh_scaling = 0.75
        if with_y:
            dot_divisor = torch.randn(n, generator=g)
            dot_divisor[::7] = 0.0
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = ops.lora_dy_products(dev(dy), dev(b), dev(h), dev(y), dev(col_scale), dh_scaling, dev(dot_divisor))
    g_out, dh, dot = (t.cpu().double() for t in out)
    assert g_out.shape == (m, r) and dh.shape == (n, r) and dot.shape == ((n,) if with_y else (0,))
    assert all(t.dtype == torch.float32 for t in out)
    dy64, h64 = dy.double(), h.double()
    b64 = b.double() if col_scale is None else (b * col_scale[:, None]).double()  # b_v: a float32 product
    cs64 = torch.ones(n, dtype=torch.float64) if col_scale is None else col_scale.double()
    # float32 sums of K terms (<= (K + 2) roundings of partial sums), and on CUDA the float32 side
    # split into two bf16 parts (2^-16 relative each, 2^-15 in all with the accumulation's order);
    # the scales add two roundings
    split = 2.0 ** -15
    assert ((g_out - dy64 @ b64).abs() <= (split + (n + 2) * 2.0 ** -24) * (dy64.abs() @ b64.abs())).all()
    dh_ref = (dy64.t() @ h64) * cs64[:, None] * dh_scaling
    dh_bound = (split + (m + 4) * 2.0 ** -24) * (dy64.abs().t() @ h64.abs()) * cs64[:, None] * dh_scaling
    assert ((dh - dh_ref).abs() <= dh_bound).all()
    if with_y:
        y64 = y.double()
        dot_ref, dot_bound = (dy64 * y64).sum(0), (m + 3) * 2.0 ** -24 * (dy64 * y64).abs().sum(0)
        if dot_divisor is not None:
            zero = dot_divisor == 0
            d64 = torch.where(zero, 1.0, dot_divisor.double())
            dot_ref, dot_bound = torch.where(zero, 0.0, dot_ref / d64), dot_bound / d64.abs()
            assert (dot[zero] == 0).all()
        assert ((dot - dot_ref).abs() <= dot_bound).all()


@given(st.integers(1, 200), st.sampled_from([64, 100, 128, 576, 1024, 2048]), st.integers(1, 20), st.booleans(),
       st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.integers(0, 2**31 - 1), st.booleans())
def test_dy_products_match_float64(device, m, n, r, with_y, dtype, seed, scaled):
    _check_dy_products(device, m, n, r, with_y, dtype, seed, scaled)


# 512-column strips (8 warps of 64): N = 256 / 320 a strip with 4 / 5 active warps, 768 one and a
# half strips, 2048 four; scaled: DoRA's scales
@pytest.mark.parametrize("m, n, r, with_y, scaled", [
    (1024, 256, 16, False, False), (1024, 768, 16, False, True), (1024, 2048, 16, True, True),
    (1000, 320, 8, False, False), (1000, 512, 16, True, True), (3000, 1024, 16, True, False),
    (3000, 768, 16, True, True), (8192, 4096, 16, False, True), (8192, 4096, 16, True, True)])
def test_dy_products_model_shapes(cuda_device, m, n, r, with_y, scaled):
    """Row chunks long enough that every warp's shared-memory ring wraps around many times (the
    property test above stays at M <= 200: one or two blocks per CTA)."""
    _check_dy_products(cuda_device, m, n, r, with_y, torch.bfloat16, m + n + r, scaled)


def test_dy_products_are_repeatable(cuda_device):
    """Partial sums added in a fixed order: the same inputs give the same bits."""
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(2048, 4096, generator=g).bfloat16().to(cuda_device)
    y = torch.randn(2048, 4096, generator=g).bfloat16().to(cuda_device)
    b, h = torch.randn(4096, 16, generator=g).to(cuda_device), torch.randn(2048, 16, generator=g).to(cuda_device)
    v, m = torch.rand(4096, generator=g).to(cuda_device) + 0.5, torch.randn(4096, generator=g).to(cuda_device)
    first = ops.lora_dy_products(dy, b, h, y, v, 0.5, m)
    again = ops.lora_dy_products(dy, b, h, y, v, 0.5, m)
    for a, c in zip(first, again):
        assert torch.equal(a.view(torch.int32), c.view(torch.int32))


def test_dy_products_rejects_bad_input(device):
    dy = torch.randn(8, 64, device=device).bfloat16()
    b, h = torch.randn(64, 4, device=device), torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="dy must be a 2-D float32, float16 or bfloat16 tensor"):
        ops.lora_dy_products(dy.view(-1), b, h, None)
    with pytest.raises(RuntimeError, match="dy must be a 2-D float32, float16 or bfloat16 tensor"):
        ops.lora_dy_products(dy.to(torch.int32), b, h, None)
    with pytest.raises(RuntimeError, match="b must be float32 \\[N = 64, r\\]"):
        ops.lora_dy_products(dy, b[:63], h, None)
    with pytest.raises(RuntimeError, match="b must be float32 \\[N = 64, r\\]"):
        ops.lora_dy_products(dy, b.bfloat16(), h, None)
    with pytest.raises(RuntimeError, match="h must be float32 \\[M = 8, r = 4\\]"):
        ops.lora_dy_products(dy, b, h[:, :3], None)
    with pytest.raises(RuntimeError, match="y must match dy"):
        ops.lora_dy_products(dy, b, h, dy[:7])
    with pytest.raises(RuntimeError, match="y must match dy"):
        ops.lora_dy_products(dy, b, h, dy.float())
    v = torch.ones(64, device=device)
    with pytest.raises(RuntimeError, match="col_scale must be float32 \\[N = 64\\]"):
        ops.lora_dy_products(dy, b, h, None, v[:63])
    with pytest.raises(RuntimeError, match="col_scale must be float32 \\[N = 64\\]"):
        ops.lora_dy_products(dy, b, h, None, v.double())
    with pytest.raises(RuntimeError, match="dot_divisor must be float32 \\[N = 64\\]"):
        ops.lora_dy_products(dy, b, h, dy, None, 1.0, v[None])
    with pytest.raises(RuntimeError, match="dot_divisor divides sum\\(dy \\* y\\), so it needs y"):
        ops.lora_dy_products(dy, b, h, None, None, 1.0, v)


def test_opcheck_lora_dy_products(device):
    dy = torch.randn(40, 128, device=device).bfloat16()
    args = (dy, torch.randn(128, 16, device=device), torch.randn(40, 16, device=device), dy.clone())
    torch.library.opcheck(torch.ops.lowrank.lora_dy_products.default, args)
    torch.library.opcheck(torch.ops.lowrank.lora_dy_products.default, args[:3] + (None,))
    scales = (torch.rand(128, device=device) + 0.5, 0.5, torch.randn(128, device=device))
    torch.library.opcheck(torch.ops.lowrank.lora_dy_products.default, args + scales)


def test_dy_products_applies_where_its_kernel_runs():
    from lowrank.lora_function import _dy_products_applies
    dy = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert not _dy_products_applies(dy, 16)  # CPU: PyTorch ops, no better than the separate products
    if torch.cuda.is_available():
        assert _dy_products_applies(dy.cuda(), 16)
        assert not _dy_products_applies(dy.cuda()[:, :100], 16)   # out % 64 != 0
        assert not _dy_products_applies(dy.cuda(), 32)  # r = 32
        assert not _dy_products_applies(dy.cuda().half(), 16)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("train_magnitude", [True, False])
def test_backward_through_the_fused_dy_products_matches_the_separate_products(monkeypatch, dora, train_magnitude):
    """The backward's fused path (ops.lora_dy_products with DoRA's scales, CUDA-only by
    _dy_products_applies) forced on CPU, where the op is PyTorch ops: every gradient equal to the
    separate products' up to float32 rounding, and None where no gradient is wanted."""
    import lowrank.lora_function as lf
    torch.manual_seed(11)
    linear = torch.nn.Linear(64, 128, bias=True)
    layer = lowrank.nn.LoraLinear(linear, r=4, lora_alpha=8, use_dora=dora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        if dora:
            layer.lora_magnitude_vector[::9] = 0.0  # m = 0 columns: dm rebuilt from z
            layer.lora_magnitude_vector.requires_grad_(train_magnitude)
    x = torch.randn(2, 24, 64, requires_grad=True)
    dy = torch.randn(2, 24, 128)
    grads = {}
    for fused in (False, True):
        monkeypatch.setattr(lf, "_dy_products_applies", lambda dy2, h, fused=fused: fused)
        params = [p for p in layer.parameters() if p.requires_grad]
        for p in params + [x]:
            p.grad = None
        layer(x).backward(dy)
        grads[fused] = {name: p.grad.clone() for name, p in list(layer.named_parameters()) + [("x", x)]
                        if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    assert ("lora_magnitude_vector" in grads[True]) == (dora and train_magnitude)
    for name, ref in grads[False].items():
        # float32 sums in another order: ~1e-7 of the largest term
        err = float((grads[True][name] - ref).abs().max())
        assert err <= 1e-6 * float(ref.abs().max()) + 1e-30, (name, err)


# --- the merged weight's backward: h formed there, adapter products on a side stream -------------------

def test_merged_forward_leaves_h_to_the_backward(monkeypatch):
    """With the merged weight (forced on CPU) the forward forms no h = x A^T: under no_grad none at
    all (an inference call reads x once less), with grad once, in the backward; the gradients are
    the float64 formula's (test_merged_weight_path_matches_float64 checks them over shapes)."""
    import lowrank.lora_function as lf
    monkeypatch.setattr(lf, "MERGE_ON_CPU", True)
    calls = []
    project = lf._project
    monkeypatch.setattr(lf, "_project", lambda a, b: calls.append(tuple(a.shape)) or project(a, b))
    _, q, w_base, x, a, b, _, _ = _problem(3, 24, 64, 48, 4, True, False, "cpu")
    with torch.no_grad():
        y0 = lora_forward(x, a, b, 2.0, quant=q)
    assert calls == []
    xx, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
    y = lora_forward(xx, aa, bb, 2.0, quant=q)
    assert calls == [] and torch.equal(y.detach(), y0)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(dy)
    assert calls.count((24, 64)) == 1  # h once (the CPU backward projects dY too: g = dY B)
    y64, leaves = _reference(x, w_base, a, b, None, 2.0)
    y64.backward(dy.double())
    for got, ref in zip((xx.grad, aa.grad, bb.grad), leaves):
        assert float((got.double() - ref.grad).abs().max()) <= 1e-4 * float(ref.grad.abs().max())


def test_side_stream_applies_on_cuda_to_large_layers(monkeypatch):
    """The streams' rule: CUDA only, M * out * in >= SIDE_STREAM_MIN_MNK (bench_lora's 14336 x 4096
    layer at M = 8192 yes, its 4096 x 4096 one no), LOWRANK_LORA_STREAMS=all at any size, =0 never."""
    import lowrank.lora_function as lf
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    t = torch.zeros(8192, 0)  # rows are all the rule reads of it
    assert not lf._side_stream_applies(t, 14336, 4096)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert 8192 * 14336 * 4096 >= lf.SIDE_STREAM_MIN_MNK > 8192 * 4096 * 4096
    assert lf._side_stream_applies(t, 14336, 4096)
    assert not lf._side_stream_applies(t, 4096, 4096)
    monkeypatch.setenv("LOWRANK_LORA_STREAMS", "all")
    assert lf._side_stream_applies(t, 4096, 4096) and lf._side_stream_applies(t[:4], 64, 64)
    monkeypatch.setenv("LOWRANK_LORA_STREAMS", "0")
    assert not lf._side_stream_applies(t, 14336, 4096)


def _merged_cuda_layer(device, four_bit, use_dora):
    torch.manual_seed(21)
    linear = torch.nn.Linear(256, 192, bias=True, device=device, dtype=torch.bfloat16)
    base = lowrank.nn.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16) if four_bit else linear
    base.requires_grad_(False)
    layer = lowrank.nn.LoraLinear(base, r=16, lora_alpha=32, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.05)
    return layer


@pytest.mark.parametrize("four_bit, use_dora", [(True, False), (True, True), (False, True)])
def test_merged_backward_on_side_streams_is_bit_identical(cuda_device, four_bit, use_dora, monkeypatch):
    """The merged weight's GEMMs on a high-priority stream with the adapter products on a side
    stream (the CUDA default: h after the forward's GEMM, the dY products and dA in the backward)
    give the same bits as one stream (LOWRANK_LORA_STREAMS=0), where h is formed in the backward:
    the same kernels on the same inputs, ordered by the joins. h is formed once either way."""
    import lowrank.lora_function as lf
    layer = _merged_cuda_layer(cuda_device, four_bit, use_dora)
    g = torch.Generator(device=cuda_device).manual_seed(5)
    x0 = torch.randn(3, 48, 256, device=cuda_device, generator=g).bfloat16()
    dy = torch.randn(3, 48, 192, device=cuda_device, generator=g).bfloat16()
    streams = []
    make_stream = lf._stream
    monkeypatch.setattr(lf, "_stream", lambda dev, hi: streams.append(hi) or make_stream(dev, hi))
    projections = []
    project = lf._project
    monkeypatch.setattr(lf, "_project", lambda a, b: projections.append(tuple(a.shape)) or project(a, b))
    results = {}
    for on in ("0", "all"):  # a small layer: the streams forced
        monkeypatch.setenv("LOWRANK_LORA_STREAMS", on)
        streams.clear()
        projections.clear()
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = layer(x)
        assert projections == ([] if on == "0" else [(144, 256)])  # h beside the forward's GEMM
        y.backward(dy)
        torch.cuda.synchronize()
        assert projections == [(144, 256)]
        # forward: the GEMM's and h's streams; backward: the side stream's and the GEMM's
        assert sorted(streams) == ([] if on == "0" else [False, False, True, True])
        results[on] = [y, x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    assert len(results["all"]) == (5 if use_dora else 4)
    for got, ref in zip(results["all"], results["0"]):
        assert torch.equal(got, ref)


def test_merged_backward_on_side_streams_in_a_cuda_graph(cuda_device, monkeypatch):
    """A QLoRA layer's forward + backward captured in a CUDA graph with the side streams (they fork
    from and join the capturing stream) replays to the eager step's bits."""
    monkeypatch.setenv("LOWRANK_LORA_STREAMS", "all")  # a small layer: the streams forced
    layer = _merged_cuda_layer(cuda_device, True, False)
    g = torch.Generator(device=cuda_device).manual_seed(6)
    x = torch.randn(96, 256, device=cuda_device, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(96, 192, device=cuda_device, generator=g).bfloat16()
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for t in params + [x]:
            t.grad = None
        layer(x).backward(dy)

    step()
    eager = [x.grad.clone()] + [p.grad.clone() for p in params]
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    for t in params + [x]:
        t.grad = None
    with torch.cuda.graph(graph):
        layer(x).backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip([x.grad] + [p.grad for p in params], eager):
        assert torch.equal(got, ref)
