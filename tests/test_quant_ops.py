"""Kernels (CPU, and CUDA where present) equal the reference bit for bit."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import ops, reference
from lowrank.quantized import dynamic_map

from strategies import BLOCKSIZES, codebooks, make_weight, weights


def _on(device, n, dtype, kind, seed, misalign):
    """A contiguous weight whose data pointer is `misalign` elements past an aligned start."""
    w = make_weight(n + misalign, dtype, kind, seed).to(device)
    return w[misalign:]


def _bits(t):
    """Compare floats by their bits (torch.equal would call -0.0 == 0.0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@given(weights(), st.sampled_from(BLOCKSIZES), codebooks())
def test_quantize_4bit_matches_reference(device, w, blocksize, codebook):
    x = _on(device, *w)
    values, thr, cor = codebook.tensors(device)
    packed, absmax = ops.quantize_4bit(x, thr, cor, blocksize, codebook.sign_magnitude)
    ref_packed, ref_absmax = reference.quantize_4bit(x, thr, cor, blocksize, codebook.sign_magnitude)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(_bits(absmax), _bits(ref_absmax))


@given(weights(), st.sampled_from(BLOCKSIZES), codebooks(), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_dequantize_4bit_matches_reference(device, w, blocksize, codebook, out_dtype):
    n = w[0]
    x = _on(device, *w)
    values, thr, cor = codebook.tensors(device)
    packed, absmax = reference.quantize_4bit(x, thr, cor, blocksize, codebook.sign_magnitude)
    dtype = getattr(torch, out_dtype)
    # a packed buffer at an odd address takes the unaligned path of the CUDA kernel
    misalign = w[4]
    buf = torch.empty(packed.numel() + misalign, dtype=torch.uint8, device=device)
    buf[misalign:] = packed
    out = ops.dequantize_4bit(buf[misalign:], absmax, values, blocksize, n, dtype)
    ref = reference.dequantize_4bit(packed, absmax, values, blocksize, n, dtype)
    assert out.shape == (n,) and out.dtype == dtype
    assert torch.equal(_bits(out), _bits(ref))


@given(weights(), st.sampled_from(BLOCKSIZES), st.sampled_from([32, 64, 256, 1024]), codebooks(),
       st.sampled_from(["float32", "float16", "bfloat16"]))
def test_dequantize_4bit_nested_matches_reference(device, w, blocksize, nested_blocksize, codebook, out_dtype):
    n = w[0]
    x = _on(device, *w)
    values, thr, cor = codebook.tensors(device)
    packed, absmax = reference.quantize_4bit(x, thr, cor, blocksize, codebook.sign_magnitude)
    qmap = dynamic_map(device)
    codes, nested_absmax, offset = reference.double_quantize(absmax, qmap, nested_blocksize)
    offset_t = torch.tensor(offset, dtype=torch.float32, device=device)
    dtype = getattr(torch, out_dtype)
    out = ops.dequantize_4bit_nested(packed, codes, nested_absmax, qmap, offset_t, values, blocksize,
                                     nested_blocksize, n, dtype)
    ref = reference.dequantize_4bit_nested(packed, codes, nested_absmax, qmap, offset, values, blocksize,
                                           nested_blocksize, n, dtype)
    assert torch.equal(_bits(out), _bits(ref))


@given(st.integers(1, 5000), st.sampled_from(BLOCKSIZES), st.integers(0, 2**31 - 1),
       st.sampled_from(["normal", "ties", "constant"]))
def test_8bit_blockwise_matches_reference(device, n, blocksize, seed, kind):
    g = torch.Generator().manual_seed(seed)
    qmap = dynamic_map(device)
    if kind == "ties":  # values on the map's entries and midpoints exercise the search's tie rule
        m = reference.dynamic_map_signed()
        mids = (m[1:] + m[:-1]) / 2
        pool = torch.cat([m, mids])
        x = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
    elif kind == "constant":  # a block of equal values centres to zero: absmax 0, 0 * inf = NaN
        x = torch.full((n,), 0.25)
    else:
        x = torch.randn(n, generator=g) * 0.01
    x = x.to(device)
    centre = float(torch.randn(1, generator=g)) * 0.01 if kind == "normal" else 0.0
    codes, absmax = ops.quantize_8bit_blockwise(x, qmap, torch.tensor(centre, device=device), blocksize)
    ref_codes, ref_absmax = reference.quantize_8bit_blockwise(x, qmap, blocksize, centre)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    offset = float(torch.randn(1, generator=g))
    out = ops.dequantize_8bit_blockwise(codes, absmax, qmap, torch.tensor(offset, device=device), blocksize)
    ref = reference.dequantize_8bit_blockwise(codes, absmax, qmap, blocksize, offset)
    assert torch.equal(_bits(out), _bits(ref))


def test_large_weight_all_paths_agree(device):
    """One model-sized weight (vector paths with many thread blocks) against the reference."""
    w = make_weight(4096 * 1024 + 37, torch.bfloat16, "normal", 7).to(device)
    codebook_tensors = __import__("lowrank").NF4.tensors(device)
    values, thr, cor = codebook_tensors
    packed, absmax = ops.quantize_4bit(w, thr, cor, 64, False)
    ref_packed, ref_absmax = reference.quantize_4bit(w, thr, cor, 64, False)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    out = ops.dequantize_4bit(packed, absmax, values, 64, w.numel(), torch.bfloat16)
    assert torch.equal(_bits(out), _bits(reference.dequantize_4bit(packed, absmax, values, 64, w.numel(),
                                                                   torch.bfloat16)))


@given(st.integers(1, 200000), st.integers(0, 2**31 - 1))
def test_absmax_mean_matches_reference(device, n, seed):
    g = torch.Generator().manual_seed(seed)
    absmax = (torch.rand(n, generator=g) * torch.exp(torch.randn(n, generator=g))).to(device)
    got = ops.absmax_mean(absmax)
    assert got.shape == () and got.dtype == torch.float32
    assert torch.equal(got, reference.absmax_mean(absmax))
