"""matmul_4bit and Linear4bit on the generic path (dequantize kernel + backend matmul)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lowrank
from lowrank.nn import Linear4bit, quantize_model

# flash-attention's rule: error against an fp32 reference on the same dequantized weight at most
# 2x the error of plain PyTorch F.linear in the same low precision (+ a floor for exact zeros).
ERROR_FACTOR = 2.0


@given(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(1, 3), st.integers(1, 40),
       st.sampled_from([32, 64, 96, 256]), st.sampled_from([16, 48, 128]), st.booleans(), st.integers(0, 2**31 - 1))
def test_matmul_4bit_forward_backward(device, dtype, lead, m, k, n, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(device)
    q = lowrank.quantize_4bit(w)
    x = torch.randn(lead, m, k, generator=g).to(device, dtype).requires_grad_()
    bias = torch.randn(n, generator=g).to(device, dtype).requires_grad_() if with_bias else None
    y = lowrank.matmul_4bit(x, q, bias)
    assert y.shape == (lead, m, n) and y.dtype == dtype
    w_hat = q.dequantize(torch.float32)
    ref = torch.nn.functional.linear(x.detach().float(), w_hat, None if bias is None else bias.detach().float())
    plain = torch.nn.functional.linear(x.detach(), w_hat.to(dtype), None if bias is None else bias.detach())
    err, plain_err = (y.detach().float() - ref).norm(), (plain.float() - ref).norm()
    assert err <= ERROR_FACTOR * plain_err + 1e-6 * ref.norm()
    gy = torch.randn(lead, m, n, generator=g).to(device, dtype)
    y.backward(gy)
    ref_gx = gy.float() @ w_hat
    plain_gx = (gy @ w_hat.to(dtype)).float()
    assert (x.grad.float() - ref_gx).norm() <= ERROR_FACTOR * (plain_gx - ref_gx).norm() + 1e-6 * ref_gx.norm()
    if with_bias:
        assert torch.allclose(bias.grad.float(), gy.float().sum((0, 1)), rtol=1e-2, atol=1e-2)


def test_matmul_4bit_rejects_bad_input(device):
    q = lowrank.quantize_4bit(torch.randn(32, 64, device=device))
    with pytest.raises(ValueError, match="last dimension must be K = 64"):
        lowrank.matmul_4bit(torch.randn(3, 65, device=device), q)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        lowrank.matmul_4bit(torch.randn(3, 64, device=device).double(), q)
    with pytest.raises(ValueError, match="bias must have shape \\[32\\]"):
        lowrank.matmul_4bit(torch.randn(3, 64, device=device), q, torch.zeros(31, device=device))
    with pytest.raises(ValueError, match="must be 2-D"):
        lowrank.matmul_4bit(torch.randn(3, 64, device=device), lowrank.quantize_4bit(torch.randn(2, 32, 64)))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        lowrank.matmul_4bit(torch.randn(3, 64), torch.randn(32, 64))


def test_matmul_4bit_rejects_other_device(cuda_device):
    q = lowrank.quantize_4bit(torch.randn(32, 64, device=cuda_device))
    with pytest.raises(ValueError, match="x is on cpu but the weight is on cuda"):
        lowrank.matmul_4bit(torch.randn(3, 64), q)


def test_linear4bit_state_dict_round_trip_and_bnb_keys(device):
    lin = nn.Linear(96, 40).to(device)
    m = Linear4bit.from_linear(lin)
    sd = m.state_dict()
    assert list(sd) == ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"]
    fresh = Linear4bit(96, 40, device=device)
    x = torch.randn(5, 96, device=device)
    assert not torch.equal(fresh(x), m(x))
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(x), m(x))
    # and inside a bigger model, with a prefix
    outer = nn.Sequential(nn.Linear(8, 96), Linear4bit.from_linear(nn.Linear(96, 40))).to(device)
    outer2 = nn.Sequential(nn.Linear(8, 96), Linear4bit(96, 40)).to(device)
    outer2.load_state_dict(outer.state_dict())
    z = torch.randn(2, 8, device=device)
    assert torch.equal(outer(z), outer2(z))


def test_linear4bit_load_rejects_mismatch():
    m = Linear4bit.from_linear(nn.Linear(96, 40))
    other = Linear4bit(64, 40)
    with pytest.raises(RuntimeError, match="does not match this layer's \\[40, 64\\]"):
        other.load_state_dict(m.state_dict())
    sd = m.state_dict()
    sd.pop("weight.absmax")
    with pytest.raises(RuntimeError, match="missing key 'weight.absmax'"):
        Linear4bit(96, 40).load_state_dict(sd)


def test_linear4bit_casts_touch_only_the_bias():
    m = Linear4bit.from_linear(nn.Linear(64, 32)).half()
    assert m.bias.dtype == torch.float16 and m.quant.absmax.dtype == torch.uint8
    assert m.quant.nested_absmax.dtype == torch.float32 and m.quant.dtype == torch.float32
    y = m(torch.randn(3, 64, dtype=torch.float16))
    assert y.dtype == torch.float16


def test_linear4bit_moves_without_requantizing(cuda_device):
    m = Linear4bit.from_linear(nn.Linear(64, 32))
    packed = m.quant.packed.clone()
    m.cuda()
    assert m.quant.device.type == "cuda" and m.bias.device.type == "cuda"
    assert torch.equal(m.quant.packed.cpu(), packed)


def test_linear4bit_compute_dtype():
    m = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = m(x)
    assert y.dtype == torch.float32
    expected = lowrank.matmul_4bit(x.bfloat16(), m.quant, m.bias.bfloat16()).float()
    assert torch.equal(y, expected)


def test_linear4bit_compiles_fullgraph(device):
    m = Linear4bit.from_linear(nn.Linear(64, 32)).to(device)
    x = torch.randn(4, 64, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert torch.equal(y, m(x))
    assert x.grad is not None and x.grad.shape == x.shape


def test_quantize_model_replaces_linears_and_skips():
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    model.lm_head = nn.Linear(16, 10)
    out = quantize_model(model, compute_dtype=None)
    assert out is model
    assert isinstance(model.body[0], Linear4bit) and isinstance(model.body[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear
    x = torch.randn(3, 16)
    y = model.lm_head(model.body(x))
    assert y.shape == (3, 10) and torch.isfinite(y).all()
