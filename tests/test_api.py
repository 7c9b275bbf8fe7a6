"""The Python API: QuantizedTensor, quantize/dequantize, state dicts, opcheck and torch.compile."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank import ops
from lowrank.quantized import QuantizedTensor

from strategies import FLOAT_DTYPES, codebooks, make_weight


@given(st.lists(st.integers(1, 70), min_size=1, max_size=3), st.sampled_from(FLOAT_DTYPES),
       st.sampled_from([32, 64, 256]), st.booleans(), codebooks(), st.integers(0, 2**31 - 1))
def test_quantize_dequantize_round_trip(device, shape, dtype, blocksize, double_quant, codebook, seed):
    n = 1
    for s in shape:
        n *= s
    w = make_weight(n, dtype, "normal", seed).reshape(shape).to(device)
    q = lowrank.quantize_4bit(w, codebook, blocksize=blocksize, double_quant=double_quant)
    assert q.shape == w.shape and q.dtype == dtype and q.device == w.device and q.double_quant == double_quant
    d = q.dequantize()
    assert d.dtype == dtype and d.shape == w.shape
    assert torch.equal(lowrank.dequantize_4bit(q, torch.float32), q.dequantize(torch.float32))
    # every element lies within the block's absmax (error bounded by the absmax itself)
    flat_abs = q.float_absmax().repeat_interleave(blocksize)[:n].reshape(shape)
    assert torch.all(d.float().abs() <= flat_abs * (1 + 2 ** -7) + 1e-30)


def test_memory_footprint_nf4_double_quant():
    q = lowrank.quantize_4bit(torch.randn(4096, 4096, dtype=torch.bfloat16))
    n = 4096 * 4096
    expected = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 256 + 4 * 16 + 4
    assert q.nbytes == expected  # 0.5 B/weight + 1 B per 64 + small tables: 4.127 bits/weight
    q1 = lowrank.quantize_4bit(torch.randn(4096, 4096, dtype=torch.bfloat16), double_quant=False)
    assert q1.nbytes == n // 2 + 4 * (n // 64) + 4 * 16


def test_non_contiguous_input_is_handled(device):
    w = torch.randn(96, 130, device=device).t()  # a transposed view
    assert not w.is_contiguous()
    q = lowrank.quantize_4bit(w)
    qc = lowrank.quantize_4bit(w.contiguous())
    assert torch.equal(q.packed, qc.packed) and torch.equal(q.absmax, qc.absmax)
    assert torch.equal(q.dequantize(), qc.dequantize())


def test_op_rejects_non_contiguous(device):
    w = torch.randn(64, 128, device=device).t()
    _, thr, cor = lowrank.NF4.tensors(device)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.quantize_4bit(w, thr, cor, 64, False)


def test_to_moves_without_requantizing(cuda_device):
    q = lowrank.quantize_4bit(torch.randn(300, 70))
    g = q.to(cuda_device)
    assert g.device.type == "cuda" and g.nested_offset.device.type == "cuda"
    assert torch.equal(g.packed.cpu(), q.packed) and torch.equal(g.dequantize().cpu(), q.dequantize())
    assert torch.equal(g.cpu().packed, q.packed)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_bnb_state_dict_round_trip(device, quant_type, double_quant, quant_storage):
    w = torch.randn(130, 256, dtype=torch.bfloat16, device=device)
    q = lowrank.quantize_4bit(w, quant_type, double_quant=double_quant, quant_storage=quant_storage)
    sd = q.to_bnb_state_dict("layer.weight")
    assert sd["layer.weight"].dtype == quant_storage
    q2 = QuantizedTensor.from_bnb_state_dict(sd, "layer.weight")
    assert torch.equal(q2.dequantize(), q.dequantize())
    sd2 = q2.to_bnb_state_dict("layer.weight")
    assert list(sd2) == list(sd) and all(_same_bytes(sd2[k], sd[k]) for k in sd)


def _same_bytes(a, b):
    # bytes, not values: a bf16 storage of packed codes holds NaN patterns, and NaN != NaN
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --- rejected inputs: each with a test --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.uint8])
def test_rejects_wrong_dtype(dtype):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        lowrank.quantize_4bit(torch.ones(64, dtype=dtype))


def test_rejects_wrong_device():
    with pytest.raises(ValueError, match="cpu or cuda device"):
        lowrank.quantize_4bit(torch.ones(64, device="meta"))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        lowrank.quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, 64.0, True])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two in \\[32, 4096\\]"):
        lowrank.quantize_4bit(torch.ones(64), blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_weights(device, bad):
    w = torch.randn(1000, device=device)
    w[777] = bad
    with pytest.raises(ValueError, match="block 12 .*NaN or inf"):
        lowrank.quantize_4bit(w)


def test_rejects_empty():
    with pytest.raises(ValueError, match="must not be empty"):
        lowrank.quantize_4bit(torch.ones(0, 64))


@pytest.mark.parametrize("values,match", [
    ([0.1] * 15, "exactly 16"), ([0.1] * 17, "exactly 16"), ([float("nan")] + [0.0] * 15, "finite"),
    ([float("inf")] + [0.0] * 15, "finite"), (["a"] * 16, "sequence of floats")])
def test_rejects_bad_codebook(values, match):
    with pytest.raises(ValueError, match=match):
        lowrank.Codebook.from_values(values)


def test_rejects_inconsistent_codebook():
    with pytest.raises(ValueError, match="non-decreasing"):
        lowrank.Codebook("x", tuple(range(16)), tuple(reversed(range(15))), tuple(range(16)))
    with pytest.raises(ValueError, match="code_of_rank"):
        lowrank.Codebook("x", tuple(v / 16 for v in range(16)), tuple(range(15)), (16,) * 16)


def test_rejects_unknown_quant_type():
    with pytest.raises(ValueError, match="'nf4', 'fp4' or a lowrank.Codebook"):
        lowrank.quantize_4bit(torch.ones(64), quant_type="int4")


def test_rejects_bad_dequantize_dtype():
    q = lowrank.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="dtype must be"):
        q.dequantize(torch.int8)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        lowrank.dequantize_4bit(torch.randn(3))


def test_custom_codebook_cannot_pose_as_bnb():
    q = lowrank.quantize_4bit(torch.randn(64), lowrank.Codebook.from_values([i / 15 for i in range(16)]))
    with pytest.raises(ValueError, match="names only nf4 and fp4"):
        q.to_bnb_state_dict()


def _good_sd():
    return lowrank.quantize_4bit(torch.randn(64, 96, dtype=torch.bfloat16)).to_bnb_state_dict()


def _json_blob(text):
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("weight.absmax"), "missing key 'weight.absmax'"),
    (lambda sd: sd.pop("weight"), "missing key 'weight'"),
    (lambda sd: sd.pop("weight.nested_absmax"), "missing key 'weight.nested_absmax'"),
    (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "expected one key"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob("{not json")), "valid JSON"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob("[1, 2]")), "valid JSON"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob('{"quant_type": "nf4"}')),
     "lacks 'blocksize'"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob(
        '{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 96]}')), "match the key"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob(
        '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 97], "nested_blocksize": 256, '
        '"nested_dtype": "float32", "nested_offset": 0.01}')), "holds 3072 bytes but shape"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob(
        '{"quant_type": "nf4", "blocksize": 60, "dtype": "bfloat16", "shape": [64, 96]}')), "power of two"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _json_blob(
        '{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [64, 96]}')), "dtype must be one of"),
    (lambda sd: sd.__setitem__("weight", sd["weight"][:-1]), "holds 3071 bytes"),
    (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:-1]), "weight.absmax must be torch.uint8 with 96"),
    (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"].float()), "weight.absmax must be torch.uint8"),
    (lambda sd: sd.__setitem__("weight.quant_map", sd["weight.quant_map"] * 2), "not the nf4 table"),
    (lambda sd: sd.__setitem__("weight.nested_quant_map", sd["weight.nested_quant_map"][:10]),
     "nested_quant_map must be torch.float32 with 256"),
])
def test_rejects_malformed_bnb_state_dict(mutate, match):
    sd = _good_sd()
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        QuantizedTensor.from_bnb_state_dict(sd)


# --- op-level checks (the C++ TORCH_CHECKs) ---------------------------------------------------

def test_ops_reject_tables_on_another_device(cuda_device):
    x = torch.randn(256, device=cuda_device)
    _, thr, cor = lowrank.NF4.tensors("cpu")
    with pytest.raises(RuntimeError, match="thresholds must be on cuda"):
        ops.quantize_4bit(x, thr, cor, 64, False)


def test_ops_reject_mismatched_sizes(device):
    values, thr, cor = lowrank.NF4.tensors(device)
    packed = torch.zeros(32, dtype=torch.uint8, device=device)
    absmax = torch.ones(1, device=device)
    with pytest.raises(RuntimeError, match="packed holds 32 bytes but 65 elements need 33"):
        ops.dequantize_4bit(packed, absmax, values, 64, 65, torch.bfloat16)
    with pytest.raises(RuntimeError, match="absmax must be Float of shape \\[2\\]"):
        ops.dequantize_4bit(packed, absmax, values, 32, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="thresholds must be Float of shape \\[15\\]"):
        ops.quantize_4bit(torch.randn(64, device=device), values, cor, 64, False)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.quantize_8bit_blockwise(torch.randn(64, device=device).half(), lowrank.dynamic_map(device),
                                    torch.tensor(0.0, device=device), 256)
    with pytest.raises(RuntimeError, match="offset must be a float32 tensor of one element"):
        ops.dequantize_8bit_blockwise(packed, absmax, lowrank.dynamic_map(device), torch.ones(2, device=device), 64)


# --- opcheck and torch.compile ----------------------------------------------------------------

def _op_samples(device):
    values, thr, cor = lowrank.NF4.tensors(device)
    fvalues, fthr, fcor = lowrank.FP4.tensors(device)
    x = torch.randn(1000, dtype=torch.bfloat16, device=device)
    packed, absmax = ops.quantize_4bit(x, thr, cor, 64, False)
    qmap = lowrank.dynamic_map(device)
    off = torch.tensor(0.5, device=device)
    codes, nested = ops.quantize_8bit_blockwise(absmax, qmap, off, 256)
    return [
        (torch.ops.lowrank.quantize_4bit.default, (x, thr, cor, 64, False)),
        (torch.ops.lowrank.quantize_4bit.default, (x.float()[:999], fthr, fcor, 32, True)),
        (torch.ops.lowrank.dequantize_4bit.default, (packed, absmax, values, 64, 1000, torch.float16)),
        (torch.ops.lowrank.dequantize_4bit_nested.default,
         (packed, codes, nested, qmap, off, values, 64, 256, 1000, torch.bfloat16)),
        (torch.ops.lowrank.quantize_8bit_blockwise.default, (absmax, qmap, off, 256)),
        (torch.ops.lowrank.dequantize_8bit_blockwise.default, (codes, nested, qmap, off, 256)),
        (torch.ops.lowrank.absmax_mean.default, (absmax,)),
    ]


def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_traces_quantize_and_dequantize(device):
    w = torch.randn(128, 192, dtype=torch.bfloat16, device=device)
    q = lowrank.quantize_4bit(w)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(q, w):
        values, thr, cor = q.codebook.tensors(w.device)
        packed, absmax = ops.quantize_4bit(w, thr, cor, 64, False)
        a = ops.dequantize_4bit(packed, absmax, values, 64, w.numel(), torch.float32)
        b = q.dequantize(torch.float32)
        return a.view(w.shape), b

    a, b = roundtrip(q, w)
    assert torch.equal(b, q.dequantize(torch.float32))
    assert torch.equal(a, lowrank.quantize_4bit(w, double_quant=False).dequantize(torch.float32))


def test_check_finite_false_skips_the_check_but_not_the_work():
    w = torch.randn(4096)
    a = lowrank.quantize_4bit(w, check_finite=False)
    b = lowrank.quantize_4bit(w)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


def test_report_command(capsys):
    from lowrank.__main__ import main
    main(["report", "--shape", "256", "512", "--reps", "1"])
    out = capsys.readouterr().out
    assert "nf4, blocksize 64, double quant True" in out
    err = float(out.split("relative Frobenius ")[1].split()[0])
    assert 0.08 < err < 0.10
