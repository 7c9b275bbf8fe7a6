"""DoRA's weight norm without [out, in] temporaries (lowrank.dora, issue 5): exactness against the
direct float64 norm, the cancellation fallback (and that it is needed), memory, and LoraLinear's
cache of ||W0||^2."""
import copy
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lowrank
from lowrank import dora, ops, reference
from lowrank.lora_function import draw_seed, dropout_keep_mask
from lowrank.nn import Linear4bit, LoraLinear
from lowrank.quantized import QuantizedTensor, dynamic_map

from strategies import make_weight

BASES = ["float32", "bfloat16", "float16", "nf4", "nf4-dq", "fp4", "fp4-dq"]


def _base(w: torch.Tensor, kind: str, blocksize: int = 64):
    """(the base weight as the norm functions take it, W0 as float64 for the direct reference)."""
    if kind in ("float32", "bfloat16", "float16"):
        w = w.to(getattr(torch, kind))
        return w, w.double()
    q = lowrank.quantize_4bit(w, kind[:3], blocksize, double_quant=kind.endswith("-dq"))
    return q, q.dequantize(torch.float32).double()


def _direct(w0_64, A, B, s):
    """The definition: ||W0 + s B A|| per row, in float64 from the same float32 A and B."""
    return (w0_64 + s * (B.detach().double() @ A.detach().double())).norm(dim=1)


def _rel_err(n, ref):
    n = n.double()
    return torch.where(ref > 0, (n - ref).abs() / ref.clamp_min(1e-300), n.abs())


# -- exact against the direct norm ------------------------------------------------------------------

@given(st.sampled_from(BASES), st.one_of(st.sampled_from([64, 128, 192]), st.integers(1, 160)),
       st.one_of(st.sampled_from([64, 128, 256]), st.integers(1, 300)), st.integers(1, 32),
       st.sampled_from([0.01, 0.5, 1.0, 2.0, 16.0, -1.0]), st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]),
       st.sampled_from(["normal", "zero_blocks", "decades", "small_ints"]), st.sampled_from([32, 64, 256]),
       st.sampled_from([None, 4096, 1]), st.integers(0, 2**31 - 1))
def test_norm_matches_direct(device, kind, out, inp, r, s, b_scale, w_kind, blocksize, chunk_bytes, seed):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(out * inp, torch.float32, w_kind, seed).view(out, inp).to(device)
    base, w0 = _base(w, kind, blocksize)
    A = (torch.randn(r, inp, generator=g) / math.sqrt(inp)).to(device)
    B = (torch.randn(out, r, generator=g) * b_scale * float(w.abs().max().clamp_min(1e-3))).to(device)
    n = dora.dora_weight_norm(base, A, B, s, chunk_bytes=chunk_bytes)
    assert n.shape == (out,) and n.dtype == torch.float32 and n.device == w.device
    ref = _direct(w0, A, B, s)
    err = _rel_err(n, ref)
    # the error model of lowrank/dora.py: a float32 rounding of n, plus U * ||W0|| t / n^2 on rows
    # that keep the expansion (those are the rows where that is <= rtol; the rest are exact)
    t = abs(s) * (B.double().abs() @ A.double().norm(dim=1))
    cond = w0.norm(dim=1) * t / ref.square().clamp_min(1e-300)
    allowed = 1e-6 + torch.clamp(dora.U_CROSS * cond, max=dora.RTOL)
    if dora._row_norm_applies(base, A, B):  # the direct norm's bound (lowrank/dora.py, U_ROW_NORM)
        allowed = 1e-6 + torch.clamp(dora.U_ROW_NORM * (t / ref.clamp_min(1e-300) + 1), max=dora.RTOL)
    assert bool((err <= allowed).all()), (float(err.max()), float(cond[err.argmax()]))
    # and the cached-||W0||^2 route gives the same numbers
    torch.testing.assert_close(dora.dora_weight_norm(base, A, B, s, base_sq_norm=dora.base_row_sq_norm(base)), n)


@given(st.integers(1, 120), st.integers(1, 300), st.sampled_from([32, 64, 128, 4096]),
       st.sampled_from([None, 32, 256, 1024]), st.sampled_from(["nf4", "fp4"]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.data())
def test_dequantize_rows_is_a_slice_of_dequantize(device, out, inp, blocksize, nested_blocksize, quant_type,
                                                   dtype, data):
    w = make_weight(out * inp, torch.float32, "normal", out * 1000 + inp).view(out, inp).to(device)
    q = lowrank.quantize_4bit(w, quant_type, blocksize, double_quant=False)
    if nested_blocksize is not None:  # any nested blocksize (bitsandbytes' files may use others than 256)
        codes, nested_absmax, offset = reference.double_quantize(q.absmax, dynamic_map(device), nested_blocksize)
        q = QuantizedTensor(q.packed, codes, q.shape, q.dtype, blocksize, q.codebook, nested_absmax,
                            dynamic_map(device), torch.tensor(offset, dtype=torch.float32, device=device),
                            nested_blocksize)
    start = data.draw(st.integers(0, out - 1))
    stop = data.draw(st.integers(start + 1, out))
    assert torch.equal(dora.dequantize_rows(q, start, stop, dtype), q.dequantize(dtype)[start:stop])


# -- cancellation ---------------------------------------------------------------------------------

CANCEL_ROWS = [3, 17, 40, 41, 90, 95]                  # adjacent and isolated rows
CANCEL_EPS = [1e-3, 1e-4, 1e-5, 1e-6, 1e-3, 1e-6]      # n / ||W0|| on them, by construction


def _cancelling_adapter(w0_64, r=8, s=2.0, seed=0):
    """A, B (float32) with s B A = -(1 - eps) W0 on CANCEL_ROWS: A's first rows are an orthonormal
    basis of those rows of W0, so n there is eps ||W0|| (plus the float32 rounding of A and B,
    ~1e-7 ||W0||, which the reference sees too); other rows get a small random B."""
    g = torch.Generator().manual_seed(seed)
    out, inp = w0_64.shape
    rows = torch.tensor(CANCEL_ROWS)
    basis, _ = torch.linalg.qr(w0_64[rows].t())  # [in, 6]
    A = torch.cat([basis, torch.randn(inp, r - len(rows), generator=g, dtype=torch.float64)], 1).t()
    B = torch.randn(out, r, generator=g, dtype=torch.float64) * 0.01
    B[rows] = 0
    eps = torch.tensor(CANCEL_EPS, dtype=torch.float64)[:, None]
    B[rows, :len(rows)] = -(1 - eps) * (w0_64[rows] @ basis) / s
    return A.float().contiguous(), B.float(), s


@pytest.mark.parametrize("kind", BASES)
def test_cancellation_falls_back_to_exact_rows(device, kind):
    torch.manual_seed(0)
    w = (torch.randn(96, 200) * 0.02).to(device)  # 200 % 64 != 0: quantization blocks straddle rows
    base, w0 = _base(w, kind)
    A, B, s = _cancelling_adapter(w0.cpu())
    A, B = A.to(device), B.to(device)
    ref = _direct(w0, A, B, s)
    rows = torch.tensor(CANCEL_ROWS, device=device)
    ratio = ref[rows] / w0[rows].norm(dim=1)
    assert bool((ratio < 2e-3).all() and (ratio > 1e-7).all())  # the construction cancels as intended

    plain = dora.dora_weight_norm(base, A, B, s, fallback=False)
    fixed = dora.dora_weight_norm(base, A, B, s)
    # the plain expansion is wrong on those rows by far more than the tolerance: the fallback matters
    assert float(_rel_err(plain, ref)[rows].max()) > 100 * dora.RTOL
    # with the fallback every row is within the tolerance (the recomputed rows are exact to float32)
    assert float(_rel_err(fixed, ref).max()) <= dora.RTOL
    assert float(_rel_err(fixed, ref)[rows].max()) <= 1e-6
    # and exactly the cancelling rows were flagged (the others kept the expansion)
    n2, bound = dora.expanded_row_sq_norm(base, A, B, s)
    assert (bound > 2 * dora.RTOL * n2).nonzero().reshape(-1).tolist() == CANCEL_ROWS


def _cancelling_dora_layer(device, in_features: int, seed: int):
    """A QDoRA LoraLinear (96 outputs, r = 8) whose adapter cancels W0 on CANCEL_ROWS: (layer, W0
    float64, s)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, 96).to(device)
    layer = LoraLinear(Linear4bit.from_linear(linear), r=8, lora_alpha=16, use_dora=True)
    w0 = layer.base_weight_fp32().double()
    A, B, s = _cancelling_adapter(w0.cpu(), r=8, s=layer.scaling)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    return layer, w0, s


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cancellation_in_lora_layer(device, dropout):
    layer, w0, s = _cancelling_dora_layer(device, 200, seed=1)
    ref = _direct(w0, layer.lora_A.weight, layer.lora_B.weight, s)
    n_fixed = layer.dora_weight_norm()
    assert float(_rel_err(n_fixed, ref).max()) <= 1e-6
    # the layer's forward looks at the flags after queuing its GEMMs and re-runs with the fixed n:
    # its output is the one with the fixed n, not the one with the plain expansion; under dropout
    # the re-run drops the same elements (one seed per call)
    from lowrank.lora_function import lora_forward
    if dropout:
        layer.lora_dropout = nn.Dropout(dropout)
    layer.train()
    x = torch.randn(5, 200, device=device)
    args = (x, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    kw = dict(quant=layer.base_layer.quant, bias=layer.base_layer.bias, magnitude=layer.lora_magnitude_vector,
              dropout_p=dropout)
    n_plain = dora.dora_weight_norm(layer.base_layer.quant, *args[1:], fallback=False)
    with torch.no_grad():
        torch.manual_seed(21)
        y = layer(x)
        torch.manual_seed(21)
        seed = draw_seed() if dropout else None
        y_fixed = lora_forward(*args, weight_norm=n_fixed, seed=seed, **kw)
        y_plain = lora_forward(*args, weight_norm=n_plain, seed=seed, **kw)
    assert torch.equal(y, y_fixed)
    assert not torch.equal(y, y_plain)


# -- memory: no [out, in] float tensor ------------------------------------------------------------

class _Allocations(TorchDispatchMode):
    """Records the bytes of every tensor an op allocates (outputs that share no storage with an
    input: views are not counted). ``paused`` skips ops run inside the fused-kernel stand-ins."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.paused = 0, None, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    if t.untyped_storage().nbytes() > self.largest:
                        self.largest, self.op = t.untyped_storage().nbytes(), str(func)
        return out


def _pause_inside(monkeypatch, rec, module, name="matmul_4bit"):
    """Replace module.<name> (matmul_4bit) by itself with recording paused: the one pass over the
    4-bit weight is that kernel's business (it becomes fused without this code changing; today it
    dequantizes internally). Returns the list of calls, to check that the pass went through it."""
    real, calls = getattr(module, name), []

    def paused(*args, **kwargs):
        calls.append(args[0].shape)
        rec.paused = True
        try:
            return real(*args, **kwargs)
        finally:
            rec.paused = False
    monkeypatch.setattr(module, name, paused)
    return calls


OUT, IN = 2048, 256  # [OUT, IN] float32 is 2 MiB; the chunks below are 64 KiB
FULL = OUT * IN * 4


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "bfloat16", "float32"])
def test_norm_allocates_no_out_by_in_tensor(device, monkeypatch, kind):
    torch.manual_seed(2)
    w = (torch.randn(OUT, IN) * 0.02).to(device)
    base, w0 = _base(w, kind)
    A, B, s = _cancelling_adapter(w0.cpu())  # some rows fall back: that path is measured too
    A, B = A.to(device), B.to(device)
    chunk = 64 * 1024

    rec = _Allocations()
    with rec:  # the instrument sees an [out, in] float tensor when there is one
        (base.dequantize(torch.float32) if isinstance(base, QuantizedTensor) else base.float() * 1.0).sum()
    assert rec.largest >= FULL

    rec = _Allocations()  # nothing is exempt from the measurement (on CUDA the 4-bit pass is one fused op)
    with rec:
        w2 = dora.base_row_sq_norm(base, chunk_bytes=chunk)
        n = dora.dora_weight_norm(base, A, B, s, base_sq_norm=w2, chunk_bytes=chunk)
    # nested double quantization dequantizes up to 64 * 256 elements before a chunk's first row;
    # the [out, r] float64 terms of the expansion are allowed too (r = 8), and a bf16 base's
    # split-bf16 cross term on CUDA makes its [out, 3 r] float32 product
    slack = 64 * 256 * 4 if kind.endswith("-dq") else 0
    allowed = max(chunk + slack, OUT * A.shape[0] * 12)
    assert allowed < FULL // 8 and rec.largest <= allowed, (rec.largest, rec.op)
    assert float(_rel_err(n, _direct(w0, A, B, s)).max()) <= 1e-6


@pytest.mark.parametrize("four_bit", [False, True])
def test_dora_forward_allocates_no_out_by_in_float_weight(device, monkeypatch, four_bit):
    """A DoRA layer's training forward (dropout active: u of x' plus the base term of x - x') over a
    bf16 nn.Linear or a 4-bit base: no [out, in] float32 copy of W0, neither for n nor for the base
    terms; on CUDA (few rows) not even a bf16 one: both passes over the 4-bit weight are the fused
    kernel's. On CPU the lean path dequantizes the 4-bit weight to x's dtype for u's GEMM, the
    temporary matmul_4bit's CPU op makes inside itself too."""
    torch.manual_seed(3)
    linear = nn.Linear(IN, OUT, dtype=torch.bfloat16).to(device)
    base = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16) if four_bit else linear
    layer = LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True).train()
    nn.init.normal_(layer.lora_B.weight, std=0.01)
    monkeypatch.setattr(dora, "CHUNK_BYTES", 64 * 1024)
    x = torch.randn(8, IN, device=device, dtype=torch.bfloat16)
    # (the ||W0||^2 cache was filled in __init__; that chunked pass is measured in the test above)
    rec = _Allocations()
    calls = _pause_inside(monkeypatch, rec, lowrank.lora_function, "_base_matmul")
    with rec:
        y = layer(x)
    assert y.shape == (8, OUT)
    cuda = torch.device(device).type == "cuda"
    if four_bit:  # through matmul_4bit's op: u's GEMM and the base term on CUDA, the base term on CPU
        assert len(calls) == (2 if cuda else 1)
    if cuda or not four_bit:
        assert rec.largest < OUT * IN * 2, (rec.largest, rec.op)  # not even a bf16 copy
    else:
        assert rec.largest <= OUT * IN * 2, (rec.largest, rec.op)  # a bf16 copy, no float32 one


# -- LoraLinear: the cache of ||W0||^2 and the forward under dropout --------------------------------

def _count_base_norms(monkeypatch):
    real, calls = dora.base_row_sq_norm, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(dora, "base_row_sq_norm", counted)
    return calls


def _assert_norm_is_direct(layer):
    ref = _direct(layer.base_weight_fp32().double(), layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    assert float(_rel_err(layer.dora_weight_norm(), ref).max()) <= 1e-6


@pytest.mark.parametrize("four_bit", [False, True])
def test_base_norm_cache_is_used_and_invalidated(monkeypatch, four_bit):
    torch.manual_seed(4)
    linear = nn.Linear(40, 24)
    layer = LoraLinear(Linear4bit.from_linear(linear) if four_bit else linear, r=4, lora_alpha=8, use_dora=True)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    calls = _count_base_norms(monkeypatch)
    x = torch.randn(3, 40)
    for _ in range(3):
        layer(x)
    _assert_norm_is_direct(layer)
    assert len(calls) == 0  # computed once, in __init__ (for m), and reused since

    layer.merge()
    layer.unmerge()
    _assert_norm_is_direct(layer)
    assert len(calls) == 1  # merge/unmerge dropped it

    layer.to("cpu")
    _assert_norm_is_direct(layer)
    assert len(calls) == 2  # so does .to()

    other = nn.Linear(40, 24)
    if four_bit:  # a new weight loaded into the 4-bit layer: a new QuantizedTensor
        layer.base_layer.load_state_dict(Linear4bit.from_linear(other).state_dict())
    else:  # load_state_dict copies in place: the version counter moves
        layer.base_layer.load_state_dict(other.state_dict())
    _assert_norm_is_direct(layer)
    assert len(calls) == 3

    if not four_bit:  # a write through .data is invisible to the check: reset_norm_cache() is the way
        layer.base_layer.weight.data.mul_(2)
        stale = layer.dora_weight_norm()
        layer.reset_norm_cache()
        _assert_norm_is_direct(layer)
        assert not torch.allclose(stale, layer.dora_weight_norm())


def test_base_norm_cache_survives_deepcopy_and_pickling(tmp_path):
    torch.manual_seed(5)
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(40, 24)), r=4, lora_alpha=8, use_dora=True)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    n = layer.dora_weight_norm()
    twin = copy.deepcopy(layer)
    assert twin._w0_sq_norm is None and torch.equal(twin.dora_weight_norm(), n)
    torch.save(layer, tmp_path / "layer.pt")
    again = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert torch.equal(again.dora_weight_norm(), n)
    assert "_w0_sq_norm" not in "".join(layer.state_dict())


def test_dora_dropout_over_4bit_base_matches_the_formula():
    """Under dropout the base term is x' W0^T with x' the dropped input (PEFT's rule), now computed
    by matmul_4bit instead of a float32 copy of W0: the same numbers as the formula."""
    torch.manual_seed(6)
    base = Linear4bit.from_linear(nn.Linear(64, 48), compute_dtype=None)
    layer = LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True).train()
    with torch.no_grad():
        for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector):
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 64)
    torch.manual_seed(9)
    y = layer(x)
    torch.manual_seed(9)  # the layer draws one seed per call and the mask from it
    xd = x * dropout_keep_mask(draw_seed(), x.shape, 0.3, x.device, x.dtype) / 0.7
    w0 = layer.base_weight_fp32()
    n = (w0 + layer.delta_weight()).norm(dim=1)
    scale = layer.lora_magnitude_vector / n
    lora = (xd @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    expected = base(x) + (scale - 1) * (xd @ w0.T) + scale * layer.scaling * lora
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_rejects_bad_shapes():
    q = lowrank.quantize_4bit(torch.randn(8, 16))
    with pytest.raises(ValueError, match="lora_A must be"):
        dora.dora_weight_norm(q, torch.randn(2, 15), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        dora.dora_weight_norm(torch.randn(8), torch.randn(2, 8), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="start < stop"):
        dora.dequantize_rows(q, 3, 3)


def test_tf32_widens_the_error_model():
    """Where CUDA float32 matmuls may run in TF32, the pass W0 A^T is only ~2^-10 accurate: the
    error bound (and so the fallback) uses U_TF32 there; elsewhere the float32 U_CROSS."""
    assert dora.default_cross_unit_roundoff(torch.device("cpu")) == dora.U_CROSS
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dora.default_cross_unit_roundoff(torch.device("cuda")) == dora.U_CROSS
        matmul.allow_tf32 = True
        assert dora.default_cross_unit_roundoff(torch.device("cuda")) == dora.U_TF32
    finally:
        matmul.allow_tf32 = saved


# -- ops.dora_norm: the expansion's per-row steps in one op -------------------------------------------

@given(st.sampled_from(BASES), st.integers(1, 300), st.sampled_from([64, 100, 256]), st.integers(1, 64),
       st.sampled_from([0.5, 2.0, -1.0]), st.integers(0, 2**31 - 1))
def test_dora_norm_op_matches_the_expansion(device, kind, out_features, in_features, r, s, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    base, w0 = _base(w.to(device), kind)
    A = torch.randn(r, in_features, generator=g) * 0.1
    B = torch.randn(out_features, r, generator=g) * 0.1
    A, B = A.float().to(device), B.float().to(device)
    with mock.patch.dict(os.environ, {"LOWRANK_ROW_NORM": "0"}):  # the expansion's op, not the direct norm
        n, flagged = dora.dora_weight_norm_flagged(base, A, B, s)
    n2, bound = dora.expanded_row_sq_norm(base, A, B, s)
    # the same float64 formulas in another order: equal to float64 rounding, then rounded to float32
    ref = n2.clamp_min(0).sqrt()
    assert n.dtype == torch.float32 and flagged.dtype == torch.bool and n.shape == flagged.shape == (out_features,)
    assert ((n.double() - ref).abs() <= 2.0 ** -23 * ref + 1e-30).all()
    margin = ((bound - 2 * dora.RTOL * n2).abs() > 1e-12 * (bound.abs() + n2.abs()))  # rows not on the edge
    assert torch.equal(flagged[margin], (bound > 2 * dora.RTOL * n2)[margin])


def test_dora_norm_op_flags_cancelling_rows(device):
    torch.manual_seed(0)
    w = (torch.randn(96, 200) * 0.02).to(device)
    base, w0 = _base(w, "nf4-dq")
    A, B, s = _cancelling_adapter(w0.cpu())
    _, flagged = dora.dora_weight_norm_flagged(base, A.to(device), B.to(device), s)
    assert flagged.nonzero().reshape(-1).tolist() == CANCEL_ROWS


def test_dora_norm_op_rejects_bad_input(device):
    from lowrank import ops
    w2 = torch.rand(8, device=device, dtype=torch.float64)
    p, a, b = torch.randn(8, 4, device=device), torch.randn(4, 32, device=device), torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="w2 .* must be float64 \\[out_features\\]"):
        ops.dora_norm(w2.float(), p, a, b, 1.0, 2.0 ** -18, 2.0 ** -40, 1e-4)
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32 \\[r, in_features\\]"):
        ops.dora_norm(w2, p, a.double(), b, 1.0, 2.0 ** -18, 2.0 ** -40, 1e-4)
    with pytest.raises(RuntimeError, match="p \\(W0 A\\^T\\) must be float32 \\[out_features = 8, r = 4\\]"):
        ops.dora_norm(w2, p[:, :3], a, b, 1.0, 2.0 ** -18, 2.0 ** -40, 1e-4)
    with pytest.raises(RuntimeError, match="b \\(lora_B\\) must be float32 \\[out_features = 8, r = 4\\]"):
        ops.dora_norm(w2, p, a, b[:7], 1.0, 2.0 ** -18, 2.0 ** -40, 1e-4)


def test_dora_norm_cuda_rank_limit(cuda_device):
    from lowrank import ops
    w2 = torch.rand(8, device=cuda_device, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="r <= 64"):
        ops.dora_norm(w2, torch.randn(8, 65, device=cuda_device), torch.randn(65, 16, device=cuda_device),
                      torch.randn(8, 65, device=cuda_device), 1.0, 2.0 ** -18, 2.0 ** -40, 1e-4)
    # lowrank.dora keeps the PyTorch expansion for such ranks
    q = lowrank.quantize_4bit(torch.randn(8, 64, device=cuda_device))
    n, _ = dora.dora_weight_norm_flagged(q, torch.randn(65, 64, device=cuda_device) * 0.01,
                                         torch.randn(8, 65, device=cuda_device) * 0.01, 1.0)
    assert n.shape == (8,)


def test_opcheck_dora_norm(device):
    from lowrank import ops
    args = (torch.rand(24, device=device, dtype=torch.float64) + 0.1, torch.randn(24, 16, device=device),
            torch.randn(16, 64, device=device), torch.randn(24, 16, device=device), 0.5, 2.0 ** -18, 2.0 ** -40, 1e-4)
    torch.library.opcheck(torch.ops.lowrank.dora_norm.default, args)


# -- the direct norm from the packed weight (ops.dora_row_norm_4bit) --------------------------------

def _row_norm_op(q, A, B, s, unit=dora.U_ROW_NORM, rtol=dora.RTOL, magnitude=None):
    return ops.dora_row_norm_4bit(q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                  q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize, q.shape[0], q.shape[1],
                                  A, B, s, unit, rtol, magnitude)


def _row_norm(q, A, B, s, unit=dora.U_ROW_NORM, rtol=dora.RTOL):
    n, flagged, v, status = _row_norm_op(q, A, B, s, unit, rtol)
    assert v.numel() == 0 and status.dtype == torch.int32 and status.shape == (1,)
    assert int(status) == (ops.ROW_NORM_STATUS_FLAGGED if bool(flagged.any()) else 0)
    return n, flagged


@given(st.sampled_from(["nf4", "nf4-dq", "fp4", "fp4-dq"]), st.integers(1, 300), st.sampled_from([64, 128, 256, 512]),
       st.integers(1, 16), st.sampled_from([0.5, 2.0, -1.0]), st.sampled_from([0.0, 0.1, 1.0, 30.0]),
       st.sampled_from([32, 64, 256]), st.integers(0, 2**31 - 1))
def test_row_norm_op_matches_direct(device, kind, out_features, in_features, r, s, b_scale, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    base, w0 = _base(w.to(device), kind, blocksize)
    A = (torch.randn(r, in_features, generator=g) / math.sqrt(in_features)).to(device)
    B = (torch.randn(out_features, r, generator=g) * 0.05 * b_scale).to(device)
    n, flagged = _row_norm(base, A, B, s)
    assert n.shape == flagged.shape == (out_features,) and n.dtype == torch.float32 and flagged.dtype == torch.bool
    ref = _direct(w0, A, B, s)
    t = abs(s) * (B.double().abs() @ A.double().norm(dim=1))
    rel = dora.U_ROW_NORM * (t / ref.clamp_min(1e-300) + 1)
    # CPU: float64 throughout, then one float32 rounding; CUDA: the bound of lowrank/dora.py
    allowed = 2.0 ** -23 + (rel if device == "cuda" else 0.0)
    assert bool((_rel_err(n, ref) <= allowed).all())
    edge = ((rel - dora.RTOL).abs() > 1e-3 * dora.RTOL)  # rows not on the flag's edge
    assert torch.equal(flagged[edge], (rel > dora.RTOL)[edge])
    # with DoRA's magnitude: the same n and flags, v = m / n as PyTorch divides, the status bits
    m = (torch.rand(out_features, generator=g) + 0.5).to(device)
    m[torch.randint(0, out_features, (seed % 3,), generator=g).to(device)] = 0.0  # some zeros, or none
    n_m, flagged_m, v, status = _row_norm_op(base, A, B, s, magnitude=m)
    assert torch.equal(n_m, n) and torch.equal(flagged_m, flagged)
    assert v.dtype == torch.float32 and torch.equal(v, m / n)
    want = (ops.ROW_NORM_STATUS_FLAGGED if bool(flagged.any()) else 0) | \
        (ops.ROW_NORM_STATUS_ZERO_MAGNITUDE if bool((m == 0).any()) else 0)
    assert status.shape == (1,) and int(status) == want


def _row_norm_cancelling_problem(device):
    """A 96 x 256 NF4 weight (in % 64 == 0: the direct norm applies) and a cancelling adapter:
    (base, W0 float64, A, B, s) on ``device``."""
    torch.manual_seed(0)
    w = (torch.randn(96, 256) * 0.02).to(device)
    base, w0 = _base(w, "nf4-dq")
    A, B, s = _cancelling_adapter(w0.cpu())
    return base, w0, A.to(device), B.to(device), s


def test_row_norm_flags_cancelling_rows_and_the_fallback_fixes_them(device, monkeypatch):
    monkeypatch.setattr(dora, "ROW_NORM_ON_CPU", True)
    base, w0, A, B, s = _row_norm_cancelling_problem(device)
    assert dora._row_norm_applies(base, A, B)
    _, flagged = dora.dora_weight_norm_flagged(base, A, B, s)
    assert flagged.nonzero().reshape(-1).tolist() == CANCEL_ROWS
    ref = _direct(w0, A, B, s)
    assert float(_rel_err(dora.dora_weight_norm(base, A, B, s), ref).max()) <= dora.RTOL


def test_row_norm_applies_only_where_its_kernel_runs(monkeypatch):
    q = lowrank.quantize_4bit(torch.randn(8, 128))
    A, B = torch.randn(16, 128), torch.randn(8, 16)
    assert not dora._row_norm_applies(q, A, B)  # CPU: the expansion (the CPU op is a float64 loop)
    monkeypatch.setattr(dora, "ROW_NORM_ON_CPU", True)
    assert dora._row_norm_applies(q, A, B)
    assert not dora._row_norm_applies(q, torch.randn(17, 128), torch.randn(8, 17))  # r > 16
    assert not dora._row_norm_applies(lowrank.quantize_4bit(torch.randn(8, 96)), A[:, :96], B)  # in % 64
    monkeypatch.setattr(dora, "ROW_NORM_MAX_ELEMENTS", 8 * 128)  # the kernel's 32-bit index limit, scaled down
    assert not dora._row_norm_applies(q, A, B)
    monkeypatch.setattr(dora, "ROW_NORM_MAX_ELEMENTS", 8 * 128 + 1)
    assert dora._row_norm_applies(q, A, B)
    assert not dora._row_norm_applies(torch.randn(8, 128), A, B)  # a float weight
    monkeypatch.setenv("LOWRANK_ROW_NORM", "0")
    assert not dora._row_norm_applies(q, A, B)


def test_row_norm_op_rejects_bad_input(device):
    q = lowrank.quantize_4bit(torch.randn(8, 64, device=device))
    A, B = torch.randn(4, 64, device=device), torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32 \\[r, in_features = 64\\]"):
        _row_norm(q, A.double(), B, 1.0)
    with pytest.raises(RuntimeError, match="a \\(lora_A\\) must be float32 \\[r, in_features = 64\\]"):
        _row_norm(q, A[:, :32], B, 1.0)
    with pytest.raises(RuntimeError, match="b \\(lora_B\\) must be float32 \\[out_features = 8, r = 4\\]"):
        _row_norm(q, A, B[:, :3], 1.0)
    with pytest.raises(RuntimeError, match="unit must be >= 0 and rtol > 0"):
        _row_norm(q, A, B, 1.0, unit=-1.0)
    with pytest.raises(RuntimeError, match="unit must be >= 0 and rtol > 0"):
        _row_norm(q, A, B, 1.0, rtol=0.0)
    m = torch.ones(8, device=device)
    with pytest.raises(RuntimeError, match="magnitude must be float32 \\[out_features = 8\\], got Double"):
        _row_norm_op(q, A, B, 1.0, magnitude=m.double())
    with pytest.raises(RuntimeError, match="magnitude must be float32 \\[out_features = 8\\], got Float \\[7\\]"):
        _row_norm_op(q, A, B, 1.0, magnitude=m[:7])
    with pytest.raises(RuntimeError, match="magnitude must be float32 \\[out_features = 8\\], got Float \\[8, 1\\]"):
        _row_norm_op(q, A, B, 1.0, magnitude=m[:, None])


def test_row_norm_cuda_limits(cuda_device):
    q = lowrank.quantize_4bit(torch.randn(8, 128, device=cuda_device))
    with pytest.raises(RuntimeError, match="r <= 16, in_features % 64 == 0"):
        _row_norm(q, torch.randn(17, 128, device=cuda_device), torch.randn(8, 17, device=cuda_device), 1.0)
    q = lowrank.quantize_4bit(torch.randn(8, 96, device=cuda_device))
    with pytest.raises(RuntimeError, match="r <= 16, in_features % 64 == 0"):
        _row_norm(q, torch.randn(4, 96, device=cuda_device), torch.randn(8, 4, device=cuda_device), 1.0)


def test_opcheck_dora_row_norm(device):
    q = lowrank.quantize_4bit(torch.randn(24, 128, device=device))
    args = (q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map,
            q.blocksize, q.nested_blocksize, 24, 128, torch.randn(16, 128, device=device),
            torch.randn(24, 16, device=device), 0.5, dora.U_ROW_NORM, dora.RTOL)
    torch.library.opcheck(torch.ops.lowrank.dora_row_norm_4bit.default, args)
    torch.library.opcheck(torch.ops.lowrank.dora_row_norm_4bit.default, args + (torch.rand(24, device=device),))


@pytest.mark.parametrize("row_norm", [False, True])
def test_dora_row_scale(device, monkeypatch, row_norm):
    """dora_row_scale's (n, flagged, v, status) on both paths: the direct norm's op (its finishing
    launch computes v and status) and the expansion with PyTorch ops; flagged rows and a zero
    magnitude set their status bits."""
    monkeypatch.setattr(dora, "ROW_NORM_ON_CPU", True)
    base, w0, A, B, s = _row_norm_cancelling_problem(device)
    if not row_norm:
        monkeypatch.setenv("LOWRANK_ROW_NORM", "0")
    assert dora._row_norm_applies(base, A, B) == row_norm
    m = torch.rand(96, device=device) + 0.5
    for cancel, zero in [(True, False), (True, True), (False, True), (False, False)]:
        b = B if cancel else B * 1e-3
        mm = m.clone()
        if zero:
            mm[5] = 0.0
        n, flagged = dora.dora_weight_norm_flagged(base, A, b, s)
        n2, flagged2, v, status = dora.dora_row_scale(base, A, b, s, mm)
        assert torch.equal(n2, n) and torch.equal(flagged2, flagged)
        assert bool(flagged.any()) == cancel
        assert torch.equal(v, mm / n)
        assert status.dtype == torch.int32 and status.shape == (1,) and status.device == n.device
        assert int(status) == (ops.ROW_NORM_STATUS_FLAGGED * cancel) | (ops.ROW_NORM_STATUS_ZERO_MAGNITUDE * zero)


def test_lora_layer_over_row_norm_status(device, monkeypatch):
    """LoraLinear's DoRA forward over the direct norm's status word: a cancelling adapter re-runs
    the forward with the exact n, a zero magnitude still gets its gradient (the backward reads the
    word's other bit); both against the layer's reference path."""
    monkeypatch.setattr(dora, "ROW_NORM_ON_CPU", True)
    layer, _, _ = _cancelling_dora_layer(device, 256, seed=3)
    with torch.no_grad():
        layer.lora_magnitude_vector[7] = 0.0
    assert dora._row_norm_applies(layer.base_layer.quant, layer.lora_A.weight, layer.lora_B.weight)
    x = torch.randn(6, 256, device=device)
    dy = torch.randn(6, 96, device=device)
    grads = []
    for forward in (layer.forward, layer.forward_reference):
        for p in layer.parameters():
            p.grad = None
        y = forward(x)
        y.backward(dy)
        grads.append((y.detach(), [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight,
                                                            layer.lora_magnitude_vector)]))
    (y, g), (y_ref, g_ref) = grads
    # the output is the one with the exact n (the forward re-ran)
    from lowrank.lora_function import lora_forward
    with torch.no_grad():
        y_fixed = lora_forward(x, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                               quant=layer.base_layer.quant, bias=layer.base_layer.bias,
                               magnitude=layer.lora_magnitude_vector, weight_norm=layer.dora_weight_norm())
    assert torch.equal(y, y_fixed)
    # against the reference away from the cancelling columns (there y = v z with z ~1e-6 of its
    # terms: float32 keeps ~10% of it, in either order of the sums) and for dA, dB everywhere
    keep = torch.ones(96, dtype=torch.bool, device=device)
    keep[CANCEL_ROWS] = False
    torch.testing.assert_close(y[:, keep], y_ref[:, keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[1], g_ref[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[2][keep], g_ref[2][keep], rtol=1e-4, atol=1e-5)
    assert g[2][7] != 0


def test_bf16_cross_term_on_cuda_is_float32_accurate(cuda_device, monkeypatch):
    """P = W0 A^T over a bf16 base on CUDA: one bf16 GEMM against A split into three bf16 parts,
    within U_CROSS of ||W0_o|| ||A_k|| like a float32 pass, and the expansion keeps U_CROSS with
    TF32 allowed (the split's products are exact whatever TF32 says)."""
    torch.manual_seed(0)
    w = (torch.randn(300, 512, device=cuda_device) * 0.05).bfloat16()
    a = torch.randn(16, 512, device=cuda_device) * 0.1
    b = torch.randn(300, 16, device=cuda_device) * 0.1
    assert dora._split_cross_applies(w) and not dora._split_cross_applies(w.half())
    p = dora.base_times_adapter(w, a)
    assert p.shape == (16, 300) and p.dtype == torch.float32
    ref = a.double() @ w.double().t()
    bound = dora.U_CROSS * a.double().norm(dim=1)[:, None] * w.double().norm(dim=1)[None, :]
    assert ((p.double() - ref).abs() <= bound).all()
    units = []
    real = ops.dora_norm
    monkeypatch.setattr(ops, "dora_norm", lambda *args: units.append(args[5]) or real(*args))
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        n, flagged = dora.dora_weight_norm_flagged(w, a, b, 0.5)
    finally:
        matmul.allow_tf32 = saved
    assert units == [dora.U_CROSS]
    assert float(_rel_err(n, _direct(w.double(), a, b, 0.5)).max()) <= 1e-6 and not bool(flagged.any())
