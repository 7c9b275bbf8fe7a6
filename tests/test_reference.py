"""The reference's tables against their published derivations."""
import pytest
import torch

import lowrank
from lowrank import reference


def test_nf4_table_reproduced_from_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    derived = lowrank.Codebook.from_distribution(scipy_stats.norm, name="nf4-from-scipy")
    table = torch.tensor(reference.NF4_VALUES, dtype=torch.float64)
    got = torch.tensor(derived.values, dtype=torch.float64)
    assert (got - table).abs().max().item() < 2e-7
    # and the derived codebook quantizes like NF4 on random data (ties aside, same thresholds)
    w = torch.randn(4096) * 0.02
    a = lowrank.quantize_4bit(w, derived, double_quant=False)
    b = lowrank.quantize_4bit(w, "nf4", double_quant=False)
    same = (a.packed == b.packed).float().mean().item()
    assert same > 0.999


def test_quantile_codebook_of_other_distribution_is_valid_and_used():
    scipy_stats = pytest.importorskip("scipy.stats")
    cb = lowrank.Codebook.from_distribution(scipy_stats.t(df=3), name="t3")
    vals = torch.tensor(cb.values)
    assert vals.numel() == 16 and vals.abs().max() == 1.0 and (vals == 0).sum() == 1
    assert torch.all(vals[1:] >= vals[:-1])
    assert not torch.allclose(vals, torch.tensor(reference.NF4_VALUES))  # heavier tails: a different table
    w = torch.distributions.StudentT(3.0).sample((8192,))
    err_t = (lowrank.quantize_4bit(w, cb).dequantize() - w).norm()
    err_nf4 = (lowrank.quantize_4bit(w, "nf4").dequantize() - w).norm()
    assert err_t < err_nf4  # the matched codebook wins on its own distribution


def test_fp4_table():
    assert torch.tensor(reference.FP4_VALUES).mul(12).tolist() == [
        0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]
    # magnitude codes ordered by value
    mags = [abs(reference.FP4_VALUES[c]) for c in reference.FP4_MAGNITUDE_CODE_OF_RANK]
    assert mags == sorted(mags)


def test_dynamic_map_shape():
    m = reference.dynamic_map_signed()
    assert m.shape == (256,) and m[127] == 0 and m[255] == 1.0 and (m == -1.0).sum() == 0
    assert torch.all(m[1:] >= m[:-1])


def test_code_8bit_is_nearest_entry():
    m = reference.dynamic_map_signed()
    x = torch.rand(20000) * 2 - 1
    idx = reference.code_8bit(x, m)
    dist = (x - m[idx]).abs()
    best = (x[:, None] - m[None, :]).abs().min(dim=1).values
    assert torch.all(dist <= best + 1e-7)


def test_nf4_error_on_randn_matches_published_figure():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    q = lowrank.quantize_4bit(w.bfloat16())
    err = ((q.dequantize().float() - w).norm() / w.norm()).item()
    assert 0.090 < err < 0.094  # H100_PEERS.md: bitsandbytes 0.0920
