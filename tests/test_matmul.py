"""The matmul_4bit op on every dispatch path: accuracy against an fp32 reference on the same
dequantized weight (flash-attention's rule: at most 2x the error of plain PyTorch F.linear in the
same precision), determinism, opcheck, and the errors of a path forced where it cannot run."""
import contextlib
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank import ops

ERROR_FACTOR = 2.0


def _quantized(n, k, quant_type, blocksize, double_quant, device, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return lowrank.quantize_4bit(w.to(device), quant_type, blocksize, double_quant)


def _assert_within_rule(y, x, q, bias):
    _assert_product_within_rule(y, x, q.dequantize(torch.float32), bias)


def _assert_product_within_rule(y, x, w_hat, bias):
    """y = x @ w_hat^T (+ bias) for an fp32 w_hat [N, K], by the rule above."""
    b32 = None if bias is None else bias.float()
    ref = torch.nn.functional.linear(x.float(), w_hat, b32)
    plain = torch.nn.functional.linear(x, w_hat.to(x.dtype), bias)
    # The rounding-noise scale of each output: the unit roundoff of x's dtype times the root sum
    # of squares of its K products (what K independent roundings of the weight add up to). On a
    # few outputs the 2x ratio alone is a coin toss: the H100 run drew M = N = 1, K = 128, where
    # plain F.linear happened to land 1e-4 from the reference and the kernel 4e-4, both well
    # inside that scale (~2e-3). The norm rule gets the RMS of that scale as a floor: one
    # element's worth, which decides at M = N = 1 and vanishes against the ratio on many outputs.
    # Each output is also rounded once to x's dtype, up to half an ulp of |y| whatever the kernel
    # does: the H100 run of 2026-11-24 drew M = N = 1, K = 1024, fp16, y = -1.075 (half an ulp
    # 4.9e-4), kernel error 1.1e-3 against F.linear's 2e-4 and a product-noise scale of 8e-4. So
    # the scale is the products' noise plus that rounding.
    unit = torch.finfo(x.dtype).eps / 2
    noise = ((x.float() ** 2) @ (w_hat ** 2).t()).sqrt() * unit + ref.abs() * unit
    err, plain_err = (y.float() - ref).norm(), (plain.float() - ref).norm()
    assert torch.isfinite(y).all()
    noise_rms = noise.norm() / noise.numel() ** 0.5
    assert err <= ERROR_FACTOR * plain_err + noise_rms, (err, plain_err, noise_rms)
    # a localised indexing error hides in a norm over many elements: bound the worst element too
    worst, plain_worst = (y.float() - ref).abs().max(), (plain.float() - ref).abs().max()
    assert worst <= 4 * plain_worst + 2 * noise.max(), (worst, plain_worst, noise.max())


# --- the skinny kernel (CUDA) ------------------------------------------------------------------

@given(m=st.integers(1, 16), n=st.sampled_from([1, 15, 16, 17, 64, 100, 256, 1040]),
       k=st.sampled_from([64, 128, 192, 512, 1024, 1088, 4096, 4160]), quant_type=st.sampled_from(["nf4", "fp4"]),
       blocksize=st.sampled_from([64, 128, 256]), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), with_bias=st.booleans(),
       lead=st.sampled_from([(), (1,)]), seed=st.integers(0, 2**31 - 1))
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_skinny_kernel_matches_reference(m, n, k, quant_type, blocksize, double_quant, dtype, with_bias, lead,
                                              seed):
    cuda_device = "cuda"  # not the fixture: hypothesis refuses function-scoped fixtures
    if k % blocksize:
        blocksize = 64
    q = _quantized(n, k, quant_type, blocksize, double_quant, cuda_device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(cuda_device, dtype)
    bias = torch.randn(n, generator=g).to(cuda_device, dtype) if with_bias else None
    y = lowrank.matmul_4bit(x, q, bias, path="skinny")
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    _assert_within_rule(y, x, q, bias)
    # deterministic: the split-K partial sums are added in a fixed order
    assert torch.equal(y, lowrank.matmul_4bit(x, q, bias, path="skinny"))
    # "auto" takes the skinny kernel for this call: same bits
    assert torch.equal(y, lowrank.matmul_4bit(x, q, bias))


def test_cuda_skinny_kernel_model_shape(cuda_device):
    """A model-sized weight (split-K over 8 warps with many chunks each, several tiles per CTA)."""
    q = _quantized(4096, 4096, "nf4", 64, True, cuda_device, 0)
    for m in (1, 7, 16):
        x = torch.randn(m, 4096, device=cuda_device, dtype=torch.bfloat16)
        _assert_within_rule(lowrank.matmul_4bit(x, q, path="skinny"), x, q, None)


@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("row_tiles", ["1", "2"])
def test_cuda_skinny_kernel_lookup_paths_agree(cuda_device, monkeypatch, row_tiles, tma):
    """The table lookups through ld.shared with the table's window offset as an immediate (the
    default on sm_90) and through generic addresses (LOWRANK_SKINNY_GENERIC_LOOKUP=1) read the same
    table words: bit-identical outputs, in both kernels (LOWRANK_SKINNY_TMA)."""
    monkeypatch.setenv("LOWRANK_SKINNY_ROW_TILES", row_tiles)
    monkeypatch.setenv("LOWRANK_SKINNY_TMA", tma)
    q = _quantized(1040, 1024, "nf4", 64, True, cuda_device, 11)
    for m in (1, 9):
        x = torch.randn(m, 1024, device=cuda_device, dtype=torch.bfloat16)
        fast = lowrank.matmul_4bit(x, q, path="skinny")
        monkeypatch.setenv("LOWRANK_SKINNY_GENERIC_LOOKUP", "1")
        generic = lowrank.matmul_4bit(x, q, path="skinny")
        monkeypatch.delenv("LOWRANK_SKINNY_GENERIC_LOOKUP")
        assert torch.equal(fast, generic)
        _assert_within_rule(fast, x, q, None)


@pytest.mark.parametrize("row_tiles", ["1", "2"])
def test_cuda_skinny_kernel_groups_cover_every_tile(cuda_device, monkeypatch, row_tiles):
    """Tiles reach the CTAs' groups of warps gridDim apart: with more tiles than groups every group
    does several (13000 rows: 813 or 407 tiles over one CTA per SM), with fewer some groups have
    none; every row is written and right either way."""
    monkeypatch.setenv("LOWRANK_SKINNY_ROW_TILES", row_tiles)
    for n in (13000, 70):
        q = _quantized(n, 128, "nf4", 64, True, cuda_device, 13)
        x = torch.randn(3, 128, device=cuda_device, dtype=torch.bfloat16)
        y = lowrank.matmul_4bit(x, q, path="skinny")
        _assert_within_rule(y, x, q, None)
        assert torch.equal(y, lowrank.matmul_4bit(x, q, path="skinny"))


@pytest.mark.parametrize("m", [1, 9, 16])
@pytest.mark.parametrize("n, k", [(1040, 64), (300, 1088), (64, 4160), (4096, 4096)])
@pytest.mark.parametrize("row_tiles", ["1", "2"])
def test_cuda_skinny_register_kernel_matches_reference(cuda_device, monkeypatch, m, n, k, row_tiles):
    """LOWRANK_SKINNY_TMA=0 takes the kernel that loads the codes into registers (the only one off
    Hopper); on Hopper the default is the bulk-copy kernel, whose stages of 1024 k end part-full
    at K = 64, 1088 and 4160. Both within the rule, each deterministic."""
    monkeypatch.setenv("LOWRANK_SKINNY_ROW_TILES", row_tiles)
    q = _quantized(n, k, "nf4", 64, True, cuda_device, 17)
    bias = torch.randn(n, device=cuda_device, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=cuda_device, dtype=torch.bfloat16)
    default = lowrank.matmul_4bit(x, q, bias, path="skinny")
    monkeypatch.setenv("LOWRANK_SKINNY_TMA", "0")
    registers = lowrank.matmul_4bit(x, q, bias, path="skinny")
    assert torch.equal(registers, lowrank.matmul_4bit(x, q, bias, path="skinny"))
    monkeypatch.delenv("LOWRANK_SKINNY_TMA")
    _assert_within_rule(registers, x, q, bias)
    _assert_within_rule(default, x, q, bias)


@pytest.mark.parametrize("m", [1, 9, 16])
@pytest.mark.parametrize("n, k", [(14336, 1024), (4552, 1088), (4564, 4096), (4200, 64)])
def test_cuda_skinny_kernel_split_last_round_is_bit_identical(cuda_device, monkeypatch, m, n, k):
    """With 32-row tiles, a last round of at most half the CTAs runs as 16-row halves (14336 rows
    on 132 SMs: 52 tiles as 104 halves). A row's sums do not depend on the height of its tile, so
    the outputs equal those of LOWRANK_SKINNY_SPLIT_LAST=0 bit for bit. 4552 and 4564 rows end in
    a tile of 8 and 20 rows (one half past N, one part-full); K = 1088 ends in a part-full slab."""
    monkeypatch.setenv("LOWRANK_SKINNY_ROW_TILES", "2")
    q = _quantized(n, k, "nf4", 64, True, cuda_device, 31)
    bias = torch.randn(n, device=cuda_device, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=cuda_device, dtype=torch.bfloat16)
    y = lowrank.matmul_4bit(x, q, bias, path="skinny")
    monkeypatch.setenv("LOWRANK_SKINNY_SPLIT_LAST", "0")
    assert torch.equal(y, lowrank.matmul_4bit(x, q, bias, path="skinny"))
    _assert_within_rule(y, x, q, bias)


def _capture(fn):
    """fn() captured into a CUDA graph (after one warm-up call), replayed once; its output."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("graph", [False, True])
def test_cuda_skinny_kernel_chain_reads_each_previous_output(cuda_device, monkeypatch, graph):
    """On Hopper the bulk-copy kernel is launched with programmatic dependent launch: it may start
    before the previous kernel ends and must read nothing of it before the wait. A chain of calls,
    each x the previous call's output, the weights swapped between calls by copies: the same bits
    as the calls one at a time with a synchronize between (and as LOWRANK_SKINNY_PDL=0), eagerly
    and replayed from a CUDA graph."""
    k = 2048
    qs = [_quantized(k, k, "nf4", 64, True, cuda_device, 29 + i) for i in range(3)]
    q = _quantized(k, k, "nf4", 64, True, cuda_device, 28)  # rewritten before each call
    x0 = torch.randn(1, k, device=cuda_device, dtype=torch.bfloat16)

    def chain():
        y = x0
        for i in range(6):
            for field in ("packed", "absmax", "nested_absmax", "nested_quant_map", "nested_offset"):
                getattr(q, field).copy_(getattr(qs[i % 3], field))
            y = lowrank.matmul_4bit(y, q, path="skinny") * 0.4  # the weights scale by 0.05 sqrt(K) = 2.3
        return y

    expected = x0
    for i in range(6):
        torch.cuda.synchronize()
        expected = lowrank.matmul_4bit(expected, qs[i % 3], path="skinny") * 0.4
        torch.cuda.synchronize()
    out = _capture(chain) if graph else chain()
    assert torch.equal(out, expected)
    monkeypatch.setenv("LOWRANK_SKINNY_PDL", "0")
    assert torch.equal(chain(), expected)
    assert expected.abs().max() > 0.1  # the chain did not fade to zeros


def _skinny_trace(capfd) -> list[int]:
    """The early_weights choices LOWRANK_SKINNY_TRACE=1 printed since the last call."""
    lines = capfd.readouterr().err.splitlines()
    return [int(line.rsplit("=", 1)[1]) for line in lines if line.startswith("lowrank skinny_tma: early_weights=")]


@pytest.mark.parametrize("k", [2048, 8192])
def test_cuda_skinny_kernel_reads_weights_early_only_after_its_own_launch(cuda_device, monkeypatch, capfd, k):
    """In a captured graph, a skinny call whose one dependency is the previous skinny call (which
    does not write its weight) copies its weight before the previous kernel has finished
    (capture_chain.h); x, the previous output, only after. A chain of back-to-back calls: the
    calls after the first take the early reads, and the outputs are the bits of the calls one at a
    time with a synchronize between, and of LOWRANK_SKINNY_EARLY=0. 2048 rows are 64 CTAs (SMs
    left free for the next call's CTAs while the previous runs), 8192 rows 256 tiles. Eager
    calls, and calls after a foreign kernel in the graph, never read early."""
    if torch.cuda.get_device_capability(cuda_device)[0] != 9:
        pytest.skip("the bulk-copy kernel (and its programmatic launch) is Hopper's")
    qs = [_quantized(k, k, "nf4", 64, True, cuda_device, 41 + i) for i in range(3)]
    x0 = torch.randn(1, k, device=cuda_device, dtype=torch.bfloat16)
    scale = 1.0 / (0.05 * k**0.5 * 0.8)  # keeps the chain's values near 1

    def chain(foreign=False):
        y = x0
        for i in range(6):
            y = lowrank.matmul_4bit(y, qs[i % 3], path="skinny")
            if foreign:
                y = y * scale
        return y

    expected = x0
    for i in range(6):
        torch.cuda.synchronize()
        expected = lowrank.matmul_4bit(expected, qs[i % 3], path="skinny")
        torch.cuda.synchronize()
    assert expected.isfinite().all() and expected.abs().max() > 0.1

    monkeypatch.setenv("LOWRANK_SKINNY_TRACE", "1")
    capfd.readouterr()
    assert torch.equal(chain(), expected)
    assert _skinny_trace(capfd) == [0] * 6  # eager: never
    out = _capture(chain)
    assert _skinny_trace(capfd) == [0] * 6 + [0] + [1] * 5  # warm-up (eager), then the captured chain
    assert torch.equal(out, expected)
    _capture(lambda: chain(foreign=True))
    assert _skinny_trace(capfd) == [0] * 12  # a multiply between every two calls
    monkeypatch.setenv("LOWRANK_SKINNY_EARLY", "0")
    assert torch.equal(_capture(chain), expected)
    assert _skinny_trace(capfd) == [0] * 12


def test_cuda_skinny_kernel_reads_a_weight_written_by_the_previous_call_after_the_wait(cuda_device, monkeypatch,
                                                                                      capfd):
    """A weight whose codes are the previous skinny call's output (its only global write) is read
    after the wait even when that call is the one dependency: the same bits as one call at a
    time with a synchronize between."""
    if torch.cuda.get_device_capability(cuda_device)[0] != 9:
        pytest.skip("the bulk-copy kernel (and its programmatic launch) is Hopper's")
    n2, k2 = 64, 2048
    q1 = _quantized(n2 * k2 // 4, 64, "nf4", 64, True, cuda_device, 51)  # y1: [1, n2 k2 / 4] bf16 = the codes' bytes
    q2 = _quantized(n2, k2, "nf4", 64, True, cuda_device, 52)
    x1 = torch.randn(1, 64, device=cuda_device, dtype=torch.bfloat16)
    x2 = torch.randn(1, k2, device=cuda_device, dtype=torch.bfloat16)

    def calls():
        y1 = lowrank.matmul_4bit(x1, q1, path="skinny")
        codes = y1.view(torch.uint8).reshape(-1)
        return ops.matmul_4bit(x2, codes, q2.absmax, q2.nested_absmax, q2.nested_quant_map, q2.nested_offset,
                               q2.quant_map, q2.blocksize, q2.nested_blocksize, n2, k2, None, "skinny")

    torch.cuda.synchronize()
    y1 = lowrank.matmul_4bit(x1, q1, path="skinny")
    torch.cuda.synchronize()
    expected = ops.matmul_4bit(x2, y1.view(torch.uint8).reshape(-1), q2.absmax, q2.nested_absmax,
                               q2.nested_quant_map, q2.nested_offset, q2.quant_map, q2.blocksize,
                               q2.nested_blocksize, n2, k2, None, "skinny")
    monkeypatch.setenv("LOWRANK_SKINNY_TRACE", "1")
    capfd.readouterr()
    out = _capture(calls)
    assert _skinny_trace(capfd) == [0, 0, 0, 0]  # warm-up, then the captured pair: the second reads after the wait
    assert torch.equal(out, expected)


def test_cuda_skinny_kernel_takes_a_packed_weight_8_byte_aligned(cuda_device, monkeypatch):
    """Bulk copies need 16-byte aligned codes: an 8-byte aligned packed weight goes to the
    register kernel (the same bits as LOWRANK_SKINNY_TMA=0 on the aligned weight)."""
    q = _quantized(64, 1024, "nf4", 64, True, cuda_device, 19)
    buf = torch.empty(q.packed.numel() + 16, dtype=torch.uint8, device=cuda_device)
    base = (16 - buf.data_ptr() % 16) % 16
    packed8 = buf[base + 8: base + 8 + q.packed.numel()]
    packed8.copy_(q.packed.reshape(-1))
    x = torch.randn(3, 1024, device=cuda_device, dtype=torch.bfloat16)
    y = ops.matmul_4bit(x, packed8, q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map, 64,
                        q.nested_blocksize, 64, 1024, None, "skinny")
    monkeypatch.setenv("LOWRANK_SKINNY_TMA", "0")
    assert torch.equal(y, lowrank.matmul_4bit(x, q, path="skinny"))
    _assert_within_rule(y, x, q, None)


def test_cuda_skinny_kernel_propagates_nan_and_inf(cuda_device):
    q = _quantized(32, 128, "nf4", 64, True, cuda_device, 1)
    x = torch.randn(3, 128, device=cuda_device, dtype=torch.float16)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = lowrank.matmul_4bit(x, q, path="skinny")
    ref = lowrank.matmul_4bit(x, q, path="dequantize")
    assert torch.isfinite(y[0]).all()
    assert torch.isnan(y[1]).all()
    assert torch.equal(torch.isnan(y[2]), torch.isnan(ref[2])) and torch.equal(torch.isinf(y[2]), torch.isinf(ref[2]))


def test_cuda_skinny_kernel_reads_a_strided_x(cuda_device):
    q = _quantized(48, 256, "nf4", 64, False, cuda_device, 2)
    big = torch.randn(5, 512, device=cuda_device, dtype=torch.bfloat16)
    x = big[:, 1:257]  # not contiguous, not 16-byte aligned
    _assert_within_rule(lowrank.matmul_4bit(x, q, path="skinny"), x.contiguous(), q, None)


@pytest.mark.parametrize("make_call, message", [
    (lambda d: (torch.randn(17, 64, device=d, dtype=torch.float16), 64), "at most 16 rows"),
    (lambda d: (torch.randn(2, 64, device=d), 64), "float16 or bfloat16"),
    (lambda d: (torch.randn(2, 64, device=d, dtype=torch.float16), 32), "blocksize >= 64"),
    (lambda d: (torch.randn(2, 96, device=d, dtype=torch.float16), 64), "multiple of blocksize"),
])
def test_cuda_skinny_path_refuses_what_it_cannot_take(cuda_device, make_call, message):
    x, blocksize = make_call(cuda_device)
    q = _quantized(32, x.shape[-1], "nf4", blocksize, True, cuda_device, 3)
    with pytest.raises(RuntimeError, match=message):
        lowrank.matmul_4bit(x, q, path="skinny")
    _assert_within_rule(lowrank.matmul_4bit(x, q), x, q, None)  # "auto" falls back


# --- the wgmma kernel (CUDA, Hopper) -------------------------------------------------------------

_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU (wgmma)")


WGMMA_TILES = ["128x64", "128x128", "128x256", "256x64", "256x128"]  # rows x tokens per CTA


@contextlib.contextmanager
def _env(name, value):
    """Set one of the wgmma kernel's switches (read at each launch); None leaves it unset. An env
    variable rather than monkeypatch: hypothesis tests cannot take that fixture."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _wgmma_tile(tile):
    """Force the wgmma kernel's CTA tile (LOWRANK_WGMMA_TILE); None = its own choice."""
    return _env("LOWRANK_WGMMA_TILE", tile)


def _stream_k(ctas):
    """LOWRANK_WGMMA_STREAM_K: None = the kernel's rule (a grid of fewer tiles than SMs is cut by
    k), "0" = one CTA per tile, "<n>" = cut into n CTAs."""
    return _env("LOWRANK_WGMMA_STREAM_K", ctas)


def _wgmma_kernel(kernel):
    """LOWRANK_WGMMA_KERNEL: None = the plan's choice (the register-operand kernel), "rs" = that
    one, "ss" = the kernel with dequantizing warpgroups (128 x 128 or 128 x 256 tiles, one CTA per
    tile)."""
    return _env("LOWRANK_WGMMA_KERNEL", kernel)


EIGHTHS = lowrank.Codebook.from_values([i / 8 for i in range(-8, 8)], name="eighths")


def _exactly_scaled(n, k, device, seed):
    """A weight the register wgmma kernel reproduces exactly: values in eighths (exact in fp16 and
    bf16, so its unscaled pair table holds them exactly) and one -1 per 64-block times a power of
    two from 2^-4 to 2^3 that varies by block, so each block's absmax is that power (exact in
    T, no low part) and values * absmax round once, as the dequantize kernel's do."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-8, 8, (n, k // 64, 64), generator=g).float() / 8
    v[:, :, 0] = -1.0
    scale = 2.0 ** torch.randint(-4, 4, (n, k // 64, 1), generator=g).float()
    return lowrank.quantize_4bit((v * scale).reshape(n, k).to(device), EIGHTHS, 64, False)


@given(m=st.sampled_from([1, 17, 63, 64, 65, 100, 128, 129, 255, 256, 257, 300, 600]),
       n=st.sampled_from([8, 120, 128, 136, 264, 520, 1040]), k=st.sampled_from([64, 128, 192, 512, 1024, 4096]),
       quant_type=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([64, 128, 256]),
       double_quant=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16]), with_bias=st.booleans(),
       tile=st.sampled_from([None] + WGMMA_TILES), stream_k=st.sampled_from([None, "0"]),
       kernel=st.sampled_from([None, "rs"]), seed=st.integers(0, 2**31 - 1))
@needs_hopper
def test_cuda_wgmma_kernel_matches_reference(m, n, k, quant_type, blocksize, double_quant, dtype, with_bias, tile,
                                             stream_k, kernel, seed):
    """Every CTA tile (128 or 256 weight rows x 64, 128 or 256 tokens), partial token and
    weight-row tiles, pipelines shorter and longer than the stage ring, both absmax forms; these
    grids have fewer tiles than SMs, so by the rule they are cut by k (stream-K), and "0" runs
    them one CTA per tile."""
    if k % blocksize:
        blocksize = 64
    q = _quantized(n, k, quant_type, blocksize, double_quant, "cuda", seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype) if with_bias else None
    with _wgmma_tile(tile), _stream_k(stream_k), _wgmma_kernel(kernel):
        y = lowrank.matmul_4bit(x, q, bias, path="wgmma")
        assert y.shape == (m, n) and y.dtype == dtype
        _assert_within_rule(y, x, q, bias)
        assert torch.equal(y, lowrank.matmul_4bit(x, q, bias, path="wgmma"))  # deterministic


@given(m=st.sampled_from([17, 64, 65, 100, 128, 129, 200, 255, 256, 257, 300, 512, 600, 1000]),
       n=st.sampled_from([8, 120, 128, 136, 264, 520, 1040]), k=st.sampled_from([64, 128, 192, 320, 512, 1024, 4096]),
       quant_type=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([64, 128, 256]),
       double_quant=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16]), with_bias=st.booleans(),
       tokens=st.sampled_from([128, 256]), seed=st.integers(0, 2**31 - 1))
@needs_hopper
def test_cuda_wgmma_ss_kernel_matches_reference_and_the_register_kernel(m, n, k, quant_type, blocksize, double_quant,
                                                                        dtype, with_bias, tokens, seed):
    """The kernel with dequantizing warpgroups, 128 x 128 tiles (three of them taking the k steps
    in turn, 6 stages) and 128 x 256 (one, 4 stages): partial token and row tiles, pipelines
    shorter and longer than the ring (1 to 64 k steps), both absmax forms. Its wgmma are the
    register kernel's for the same tile (m64nNk16 over the same k steps), so on a weight whose
    values and absmax are exact in T (where both kernels' A values are the dequantized weight's)
    the outputs are the same bits."""
    if k % blocksize:
        blocksize = 64
    q = _quantized(n, k, quant_type, blocksize, double_quant, "cuda", seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype) if with_bias else None
    with _stream_k("0"), _wgmma_tile(f"128x{tokens}"):
        with _wgmma_kernel("ss"):
            y = lowrank.matmul_4bit(x, q, bias, path="wgmma")
            assert torch.equal(y, lowrank.matmul_4bit(x, q, bias, path="wgmma"))  # deterministic
        with _wgmma_kernel("rs"):
            y_rs = lowrank.matmul_4bit(x, q, bias, path="wgmma")
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_within_rule(y, x, q, bias)
    _assert_within_rule(y_rs, x, q, bias)
    exact = _exactly_scaled(n, k, "cuda", seed)
    with _stream_k("0"), _wgmma_tile(f"128x{tokens}"):
        with _wgmma_kernel("ss"):
            y = lowrank.matmul_4bit(x, exact, bias, path="wgmma")
        with _wgmma_kernel("rs"):
            assert torch.equal(y, lowrank.matmul_4bit(x, exact, bias, path="wgmma"))


# the register kernel's exact case has an unnested absmax (a nested one is decoded to any fp32)
@pytest.mark.parametrize("tile, kernel, double_quant", [(t, "rs", False) for t in WGMMA_TILES]
                         + [(t, "ss", dq) for t in ("128x128", "128x256") for dq in (False, True)])
@pytest.mark.parametrize("m, k", [(64, 64), (128, 128), (256, 256), (256, 1024)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@needs_hopper
def test_cuda_wgmma_kernel_reproduces_the_dequantized_weight_exactly(m, k, dtype, double_quant, tile, kernel):
    """x = rows of the identity: y[i, n] = W[n, i] is one product with 1.0, exact in fp32, so y must
    equal the dequantize kernel's weight bit for bit. This pins every element's place in the
    fragments (or the swizzled A tile), the swizzled x tile and the staged output for every CTA
    tile and both kernels. The ss kernel dequantizes as the dequantize kernel does (any weight);
    the register kernel rounds values[code] to T before scaling, so its weight is one whose values
    and absmax are exact in T (_exactly_scaled; the absmax unnested), which also pins each row's
    and k step's absmax."""
    n = 392  # 128-row tiles: three full and one of 8 rows; 256-row tiles: one full, one partial
    if kernel == "rs":
        q = _exactly_scaled(n, k, "cuda", 21)
    else:
        q = _quantized(n, k, "nf4", 64, double_quant, "cuda", 21)
    x = torch.eye(m, k, device="cuda", dtype=dtype)
    # the ss kernel takes whole tiles only (these small grids are otherwise cut by k)
    with _wgmma_tile(tile), _wgmma_kernel(kernel), _stream_k("0" if kernel == "ss" else None):
        y = lowrank.matmul_4bit(x, q, path="wgmma")
    assert torch.equal(y, q.dequantize(dtype)[:, :m].t())


@pytest.mark.parametrize("extra", [1, 3, 5, 15, "all"])
@pytest.mark.parametrize("m", [40, 100, 300])
@needs_hopper
def test_cuda_wgmma_stream_k_cuts_match_one_cta_per_tile(m, extra):
    """Tiles x 16 k steps cut among a few more CTAs than tiles up to one CTA per k step (392 rows:
    2 tiles of 256 rows at M <= 128, 4 x 2 of 128 rows x 256 tokens at M = 300), so that ranges
    start and end inside tiles and on their edges and a tile gathers the partial sums of up to 15
    other CTAs: within the error rule, deterministic, and exact where the sums are (x = rows of
    the identity)."""
    k = 1024
    q = _quantized(392, k, "nf4", 64, True, "cuda", 23)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    tiles = 2 if m <= 128 else 8
    ctas = str(16 * tiles if extra == "all" else tiles + extra)
    with _stream_k(ctas):
        y = lowrank.matmul_4bit(x, q, path="wgmma")
        assert torch.equal(y, lowrank.matmul_4bit(x, q, path="wgmma"))
        eye = torch.eye(m, k, device="cuda", dtype=torch.bfloat16)
        exact = _exactly_scaled(392, k, "cuda", 23)
        assert torch.equal(lowrank.matmul_4bit(eye, exact, path="wgmma"), exact.dequantize(torch.bfloat16)[:, :m].t())
    _assert_within_rule(y, x, q, None)
    with _stream_k("0"):
        one_per_tile = lowrank.matmul_4bit(x, q, path="wgmma")
    torch.testing.assert_close(y, one_per_tile, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("value", ["1", "2", "100000", "-3"])
@needs_hopper
def test_cuda_wgmma_stream_k_override_says_what_it_takes(value):
    q = _quantized(392, 1024, "nf4", 64, True, "cuda", 24)  # 2 tiles x 16 k steps at M = 100
    x = torch.randn(100, 1024, device="cuda", dtype=torch.bfloat16)
    with _stream_k(value), pytest.raises(RuntimeError, match="LOWRANK_WGMMA_STREAM_K must be 0"):
        lowrank.matmul_4bit(x, q, path="wgmma")


@needs_hopper
def test_cuda_wgmma_tile_override_names_the_tiles():
    q = _quantized(128, 128, "nf4", 64, True, "cuda", 22)
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    with _wgmma_tile("96x64"), pytest.raises(RuntimeError, match="LOWRANK_WGMMA_TILE must be one of 128x64"):
        lowrank.matmul_4bit(x, q, path="wgmma")


@pytest.mark.parametrize("kernel, tile, stream_k, message", [
    ("bogus", None, None, "LOWRANK_WGMMA_KERNEL must be 'rs' or 'ss'"),
    ("ss", "256x128", "0", "LOWRANK_WGMMA_KERNEL=ss takes 128 x 128 or 128 x 256 tiles, one CTA per tile"),
    ("ss", None, None, "LOWRANK_WGMMA_KERNEL=ss takes 128 x 128 or 128 x 256 tiles, one CTA per tile"),  # cut by k
])
@needs_hopper
def test_cuda_wgmma_kernel_override_says_what_it_takes(kernel, tile, stream_k, message):
    q = _quantized(392, 4096, "nf4", 64, True, "cuda", 25)  # 4 x 2 tiles x 64 k steps at M = 300: cut by k
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    with _wgmma_kernel(kernel), _wgmma_tile(tile), _stream_k(stream_k), pytest.raises(RuntimeError, match=message):
        lowrank.matmul_4bit(x, q, path="wgmma")


@needs_hopper
def test_cuda_wgmma_kernel_model_shape():
    """A model-sized weight with many k steps (the stage ring wraps 16-32 times) and a raster with
    more token tiles than one group."""
    q = _quantized(4096, 4096, "nf4", 64, True, "cuda", 0)
    exact = _exactly_scaled(4096, 4096, "cuda", 0)
    for m in (17, 128, 2304):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        _assert_within_rule(lowrank.matmul_4bit(x, q, path="wgmma"), x, q, None)
        if m >= 128:  # the kernel with dequantizing warpgroups: the register kernel's bits for its tile
            with _wgmma_tile("128x128" if m == 128 else "128x256"), _stream_k("0"):
                with _wgmma_kernel("ss"):
                    y = lowrank.matmul_4bit(x, q, path="wgmma")
                    y_exact = lowrank.matmul_4bit(x, exact, path="wgmma")
                _assert_within_rule(y, x, q, None)
                with _wgmma_kernel("rs"):
                    assert torch.equal(y_exact, lowrank.matmul_4bit(x, exact, path="wgmma"))


@needs_hopper
def test_cuda_auto_cuts_64_token_tiles_for_short_grids_at_medium_m():
    """4096 x 4096 at M = 65-128: 128-token tiles, even cut by k, make 42 CTAs (under half the
    SMs), so the rule takes 128 x 64 tiles cut into up to one CTA per SM (the wgmma path: the same
    bits as path="wgmma"); 1024 x 4096 (42 CTAs that way too) stays on the dequantize path."""
    for n, m, wgmma in ((4096, 65, True), (4096, 128, True), (1024, 128, False)):
        q = _quantized(n, 4096, "nf4", 64, True, "cuda", 41)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        y = lowrank.matmul_4bit(x, q)
        assert torch.equal(y, lowrank.matmul_4bit(x, q, path="wgmma" if wgmma else "dequantize"))
        _assert_within_rule(y, x, q, None)


@needs_hopper
def test_cuda_wgmma_kernel_reads_a_strided_x():
    q = _quantized(48, 256, "nf4", 64, False, "cuda", 2)
    big = torch.randn(40, 512, device="cuda", dtype=torch.bfloat16)
    x = big[:, 1:257]  # not contiguous, not 16-byte aligned: copied
    _assert_within_rule(lowrank.matmul_4bit(x, q, path="wgmma"), x.contiguous(), q, None)


def _misaligned(t):
    """t's values in a buffer whose data pointer is 1 byte past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    base = (16 - buf.data_ptr() % 16) % 16
    view = buf[base + 1: base + 1 + t.numel()]
    view.copy_(t.reshape(-1))
    return view


@pytest.mark.parametrize("make_call, message", [
    (lambda d: (torch.randn(32, 64, device=d), 64, 32), "float16 or bfloat16"),
    (lambda d: (torch.randn(32, 96, device=d, dtype=torch.float16), 32, 32), "multiple of 64"),
    (lambda d: (torch.randn(32, 128, device=d, dtype=torch.float16), 32, 32), "blocksize >= 64"),
    (lambda d: (torch.randn(32, 128, device=d, dtype=torch.float16), 64, 12), "out_features to be a multiple of 8"),
])
@needs_hopper
def test_cuda_wgmma_path_refuses_what_it_cannot_take(make_call, message):
    x, blocksize, n = make_call("cuda")
    q = _quantized(n, x.shape[-1], "nf4", blocksize, True, "cuda", 3)
    with pytest.raises(RuntimeError, match=message):
        lowrank.matmul_4bit(x, q, path="wgmma")
    _assert_within_rule(lowrank.matmul_4bit(x, q), x, q, None)  # "auto" falls back


@needs_hopper
def test_cuda_wgmma_path_refuses_a_misaligned_packed_weight():
    q = _quantized(32, 128, "nf4", 64, True, "cuda", 4)
    x = torch.randn(20, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ops.matmul_4bit(x, _misaligned(q.packed), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset,
                        q.quant_map, 64, q.nested_blocksize, 32, 128, None, "wgmma")


@pytest.mark.skipif(not torch.cuda.is_available() or _HOPPER, reason="needs a CUDA GPU that is not Hopper")
def test_cuda_wgmma_path_refuses_other_gpus():
    q = _quantized(32, 128, "nf4", 64, True, "cuda", 5)
    with pytest.raises(RuntimeError, match="Hopper"):
        lowrank.matmul_4bit(torch.randn(20, 128, device="cuda", dtype=torch.bfloat16), q, path="wgmma")


@needs_hopper
def test_cuda_auto_takes_the_wgmma_kernel_by_the_rule():
    """docs/design.md's rule: wgmma for 16 < M <= 2048 when its grid (cut by k when there are fewer
    tiles than SMs) fills half the SMs, else dequantize + cuBLAS (the same bits as the forced path
    in each case)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = 128 * sms  # one row tile per SM: any M up to 2048 fills the GPU
    q = _quantized(n, 256, "nf4", 64, True, "cuda", 7)
    for m, expected in ((17, "wgmma"), (300, "wgmma"), (2048, "wgmma"), (2049, "dequantize"), (16, "skinny")):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(lowrank.matmul_4bit(x, q), lowrank.matmul_4bit(x, q, path=expected)), (m, expected)
    large = _quantized(n, 1024, "nf4", 64, True, "cuda", 10)  # the same bound for a larger weight
    for m, expected in ((2048, "wgmma"), (2049, "dequantize")):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(lowrank.matmul_4bit(x, large), lowrank.matmul_4bit(x, large, path=expected)), (m, expected)
    small = _quantized(1024, 256, "nf4", 64, True, "cuda", 8)  # 4 tiles x 4 k steps: too little to cut
    x = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(lowrank.matmul_4bit(x, small), lowrank.matmul_4bit(x, small, path="dequantize"))
    long_k = _quantized(4096, 16384, "nf4", 64, True, "cuda", 9)  # 16 tiles x 256 k steps: cut among 128 CTAs
    x = torch.randn(100, 16384, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(lowrank.matmul_4bit(x, long_k), lowrank.matmul_4bit(x, long_k, path="wgmma"))
    assert not torch.equal(lowrank.matmul_4bit(x, long_k), lowrank.matmul_4bit(x, long_k, path="dequantize"))


@needs_hopper
def test_cuda_graph_capture_wgmma():
    """The wgmma path builds its tensor maps on the host at each call and passes them by value:
    a captured call replays on new contents of the same x buffer."""
    q = _quantized(256, 512, "nf4", 64, True, "cuda", 6)
    x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
    expected = lowrank.matmul_4bit(x, q, path="wgmma")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lowrank.matmul_4bit(x, q, path="wgmma")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lowrank.matmul_4bit(x, q, path="wgmma")
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, lowrank.matmul_4bit(x, q, path="wgmma"))
    assert not torch.equal(out, expected)


# --- the backward: dX = dY @ W (matmul_4bit_grad_x) -------------------------------------------

def _grad_x(dy, q, path="auto"):
    return ops.matmul_4bit_grad_x(dy, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                  q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize, q.shape[0],
                                  q.shape[1], path)


@pytest.mark.parametrize("m", [1, 5, 9, 16])
@pytest.mark.parametrize("n, k, blocksize, double_quant",
                         [(1000, 64, 64, True), (300, 1152, 128, False), (4096, 512, 64, True),
                          (28672, 1024, 64, True), (13, 4096, 256, True)])
def test_cuda_grad_x_skinny_kernel_matches_reference(cuda_device, m, n, k, blocksize, double_quant):
    """dY @ W straight from the packed weight for bf16 dY of at most 16 rows. N = 1000, 300 and 13
    end inside a 16-row step (rows past N weigh zero); K = 64 is one k block (a CTA of one busy
    warp), 1152 a last CTA with 2 of its 8 warps busy; N is cut into ranges whose fp32 partial
    sums a second kernel adds (28672: ranges of several 128-row chunks), except N = 13, one range
    written directly. Within the rule against an fp32 reference, deterministic, and what 'auto'
    takes."""
    q = _quantized(n, k, "nf4", blocksize, double_quant, cuda_device, 41)
    dy = torch.randn(m, n, device=cuda_device, dtype=torch.bfloat16)
    dx = _grad_x(dy, q, "skinny")
    assert dx.shape == (m, k) and dx.dtype == torch.bfloat16
    _assert_product_within_rule(dx, dy, q.dequantize(torch.float32).t(), None)
    assert torch.equal(dx, _grad_x(dy, q, "skinny"))
    assert torch.equal(dx, _grad_x(dy, q))


def test_cuda_grad_x_skinny_kernel_takes_leading_dims_and_a_strided_dy(cuda_device):
    q = _quantized(640, 256, "nf4", 64, True, cuda_device, 42)
    dy = torch.randn(2, 3, 640, device=cuda_device, dtype=torch.bfloat16)
    dx = _grad_x(dy, q, "skinny")
    assert dx.shape == (2, 3, 256)
    assert torch.equal(dx.reshape(6, 256), _grad_x(dy.reshape(6, 640), q, "skinny"))
    strided = torch.randn(6, 1280, device=cuda_device, dtype=torch.bfloat16)[:, ::2]
    _assert_product_within_rule(_grad_x(strided, q, "skinny"), strided, q.dequantize(torch.float32).t(), None)


@given(m=st.sampled_from([1, 17, 100, 128, 129, 256, 300]), n=st.sampled_from([8, 64, 136, 520, 1040, 4096]),
       k=st.sampled_from([64, 128, 192, 1024]), quant_type=st.sampled_from(["nf4", "fp4"]),
       blocksize=st.sampled_from([64, 128, 256]), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
@needs_hopper
def test_cuda_grad_x_wgmma_kernel_matches_reference(m, n, k, quant_type, blocksize, double_quant, dtype, seed):
    """dY @ W by the wgmma kernel (the dequantized tile is W^T, wgmma's transposed A): 128- and
    256-token tiles, partial token tiles, K ending inside a 128-row tile (K = 64, 192), N ending
    inside a 64-row step (N = 8, 136, 520), ranges of the reduction over N (N = 1040 and 4096 on
    few row tiles: 2-4 ranges whose partial sums a second kernel adds), both absmax forms. Within
    the rule against an fp32 reference, and deterministic."""
    if k % blocksize:
        blocksize = 64
    q = _quantized(n, k, quant_type, blocksize, double_quant, "cuda", seed)
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(m, n, generator=g).to("cuda", dtype)
    dx = _grad_x(dy, q, "wgmma")
    assert dx.shape == (m, k) and dx.dtype == dtype
    _assert_product_within_rule(dx, dy, q.dequantize(torch.float32).t(), None)
    assert torch.equal(dx, _grad_x(dy, q, "wgmma"))


@pytest.mark.parametrize("m, n, k", [(64, 392, 256), (200, 392, 1024), (300, 4096, 128), (17, 2048, 1024)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@needs_hopper
def test_cuda_grad_x_wgmma_kernel_reproduces_the_dequantized_weight_exactly(m, n, k, dtype):
    """dY = rows of the identity: dX[i, k] = W[i, k] is one product with 1.0 (the other products
    and the other ranges' partial sums add zeros), so dX must equal the dequantize kernel's rows
    bit for bit: every element's place in the transposed A tile, the copied dY tile and the
    output, and the dequantization's rounding (4096 x 128 and 2048 x 1024: the reduction cut in
    4 ranges)."""
    q = _quantized(n, k, "nf4", 64, True, "cuda", 47)
    dy = torch.eye(m, n, device="cuda", dtype=dtype)
    assert torch.equal(_grad_x(dy, q, "wgmma"), q.dequantize(dtype)[:m])


@needs_hopper
def test_cuda_grad_x_wgmma_kernel_takes_leading_dims_and_a_strided_dy():
    q = _quantized(640, 256, "nf4", 64, True, "cuda", 48)
    dy = torch.randn(4, 30, 640, device="cuda", dtype=torch.bfloat16)
    dx = _grad_x(dy, q, "wgmma")
    assert dx.shape == (4, 30, 256)
    assert torch.equal(dx.reshape(120, 256), _grad_x(dy.reshape(120, 640), q, "wgmma"))
    strided = torch.randn(40, 1280, device="cuda", dtype=torch.bfloat16)[:, ::2]
    _assert_product_within_rule(_grad_x(strided, q, "wgmma"), strided, q.dequantize(torch.float32).t(), None)


def test_cuda_grad_x_paths(cuda_device):
    """'auto' takes the skinny kernel for bf16 dY of at most 16 rows, on Hopper the wgmma kernel
    for other fp16/bf16 dY up to 256 rows (fp16 is not the skinny kernel's: dY * absmax split in
    two halves could overflow float16), and dequantize + matmul otherwise; a forced 'skinny' or
    'wgmma' says why it cannot take a call."""
    hopper = torch.cuda.get_device_capability()[0] == 9
    fused = "wgmma" if hopper else "dequantize"
    q = _quantized(256, 512, "nf4", 64, True, cuda_device, 43)
    dy16 = torch.randn(4, 256, device=cuda_device, dtype=torch.float16)
    assert torch.equal(_grad_x(dy16, q), _grad_x(dy16, q, fused))
    with pytest.raises(RuntimeError, match="path 'skinny' cannot take this call: it takes bfloat16 dy"):
        _grad_x(dy16, q, "skinny")
    dy = torch.randn(17, 256, device=cuda_device, dtype=torch.bfloat16)
    assert torch.equal(_grad_x(dy, q), _grad_x(dy, q, fused))
    assert torch.equal(_grad_x(dy, q, "dequantize"), dy @ q.dequantize(torch.bfloat16))
    dy_many = torch.randn(257, 256, device=cuda_device, dtype=torch.bfloat16)
    assert torch.equal(_grad_x(dy_many, q), _grad_x(dy_many, q, "dequantize"))
    if hopper:
        with pytest.raises(RuntimeError, match="path 'wgmma' cannot take this call: it takes float16 or bfloat16 dy"):
            _grad_x(dy.float(), q, "wgmma")
        q12 = _quantized(12, 128, "nf4", 64, True, cuda_device, 50)
        with pytest.raises(RuntimeError, match="it needs out_features to be a multiple of 8"):
            _grad_x(torch.randn(20, 12, device=cuda_device, dtype=torch.bfloat16), q12, "wgmma")
        q_odd_k = _quantized(16, 96, "nf4", 32, True, cuda_device, 51)
        with pytest.raises(RuntimeError, match="it needs in_features to be a multiple of 64"):
            _grad_x(torch.randn(20, 16, device=cuda_device, dtype=torch.bfloat16), q_odd_k, "wgmma")
    with pytest.raises(RuntimeError, match="it takes at most 16 rows of dy"):
        _grad_x(dy, q, "skinny")
    q32 = _quantized(256, 512, "nf4", 32, True, cuda_device, 44)
    with pytest.raises(RuntimeError, match="it needs blocksize >= 64"):
        _grad_x(dy[:4], q32, "skinny")
    if hopper:
        with pytest.raises(RuntimeError, match="path 'wgmma' cannot take this call: it needs blocksize >= 64"):
            _grad_x(dy, q32, "wgmma")
    assert torch.equal(_grad_x(dy[:4], q32), dy[:4] @ q32.dequantize(torch.bfloat16))
    # the codes are staged by 16-byte copies: an 8-byte aligned packed weight takes dequantize + matmul
    buf = torch.empty(q.packed.numel() + 16, dtype=torch.uint8, device=cuda_device)
    base = (16 - buf.data_ptr() % 16) % 16
    packed8 = buf[base + 8: base + 8 + q.packed.numel()]
    packed8.copy_(q.packed.reshape(-1))
    args = (q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map, 64, q.nested_blocksize,
            256, 512)
    with pytest.raises(RuntimeError, match="it needs the packed weight 16-byte aligned"):
        ops.matmul_4bit_grad_x(dy[:4], packed8, *args, "skinny")
    assert torch.equal(ops.matmul_4bit_grad_x(dy[:4], packed8, *args, "auto"), _grad_x(dy[:4], q, "dequantize"))
    if hopper:
        with pytest.raises(RuntimeError, match="path 'wgmma' cannot take this call: it needs the packed weight 16-byte"):
            ops.matmul_4bit_grad_x(dy, packed8, *args, "wgmma")
        assert torch.equal(ops.matmul_4bit_grad_x(dy, packed8, *args, "auto"), _grad_x(dy, q, "dequantize"))


@pytest.mark.parametrize("dtype, m", [(torch.bfloat16, 3), (torch.float16, 3), (torch.float32, 5),
                                      (torch.bfloat16, 40)])
def test_matmul_4bit_backward_is_the_grad_x_op(device, dtype, m):
    """The autograd backward of matmul_4bit computes dX with matmul_4bit_grad_x (the rule's path,
    or 'dequantize' when the forward was forced there), from the packed weight only."""
    q = _quantized(96, 256, "nf4", 64, True, device, 45)
    x = torch.randn(m, 256, device=device, dtype=dtype, requires_grad=True)
    y = lowrank.matmul_4bit(x, q)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, _grad_x(dy, q))
    x.grad = None
    lowrank.matmul_4bit(x, q, path="dequantize").backward(dy)
    assert torch.equal(x.grad, dy @ q.dequantize(dtype))


def test_grad_x_op_rejects_bad_input(device):
    q = _quantized(32, 64, "nf4", 64, True, device, 46)
    dy = torch.randn(2, 32, device=device)
    with pytest.raises(RuntimeError, match="dy's last dimension must be out_features = 32"):
        _grad_x(torch.randn(2, 64, device=device), q)
    with pytest.raises(RuntimeError, match="lowrank::matmul_4bit_grad_x: path must be 'auto'"):
        _grad_x(dy, q, "fast")

    with pytest.raises(RuntimeError, match="dy must be float32, float16 or bfloat16"):
        _grad_x(dy.double(), q)
    with pytest.raises(RuntimeError, match="1024 bytes for a \\[32, 64\\] weight"):
        ops.matmul_4bit_grad_x(dy, q.packed.reshape(-1)[:-1], q.absmax, q.nested_absmax, q.nested_quant_map,
                               q.nested_offset, q.quant_map, 64, 256, 32, 64, "auto")
    if device == "cpu":
        for path in ("skinny", "wgmma"):
            with pytest.raises(RuntimeError, match=f"path '{path}' is a CUDA kernel"):
                _grad_x(dy.bfloat16(), q, path)
    else:
        with pytest.raises(RuntimeError, match="dy must be on cuda"):
            _grad_x(dy.cpu(), q)


def test_opcheck_matmul_4bit_grad_x(device):
    for double_quant in (False, True):
        q = _quantized(48, 128, "nf4", 64, double_quant, device, 47)
        for dtype, m in ((torch.bfloat16, 3), (torch.float16, 20), (torch.float32, 2)):
            dy = torch.randn(m, 48, device=device).to(dtype)
            torch.library.opcheck(torch.ops.lowrank.matmul_4bit_grad_x.default,
                                  (dy, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                   q.nested_offset, q.quant_map, 64, 256, 48, 128, "auto"))


# --- the dequantize path and the op's contract (every device) ----------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_path(device, dtype, double_quant):
    q = _quantized(40, 192, "nf4", 64, double_quant, device, 4)
    x = torch.randn(2, 33, 192, device=device).to(dtype)
    bias = torch.randn(40, device=device).to(dtype)
    y = lowrank.matmul_4bit(x, q, bias, path="dequantize")
    assert torch.equal(y, torch.nn.functional.linear(x, q.dequantize(dtype), bias))


@pytest.mark.parametrize("path", ["skinny", "wgmma"])
def test_fused_paths_are_cuda_only(path):
    q = _quantized(32, 64, "nf4", 64, True, "cpu", 5)
    with pytest.raises(RuntimeError, match=f"'{path}' is a CUDA kernel"):
        lowrank.matmul_4bit(torch.randn(2, 64, dtype=torch.bfloat16), q, path=path)


def test_op_rejects_bad_input(device):
    q = _quantized(32, 64, "nf4", 64, True, device, 6)
    x = torch.randn(2, 64, device=device)
    args = [x, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map,
            64, 256, 32, 64, None, "auto"]

    def call(**changes):
        a = list(args)
        names = ["x", "packed", "absmax", "nested_absmax", "nested_qmap", "offset", "values", "blocksize",
                 "nested_blocksize", "out_features", "in_features", "bias", "path"]
        for key, v in changes.items():
            a[names.index(key)] = v
        return ops.matmul_4bit(*a)

    with pytest.raises(RuntimeError, match="path must be 'auto', 'skinny', 'wgmma' or 'dequantize'"):
        call(path="fast")
    with pytest.raises(RuntimeError, match="last dimension must be in_features = 64"):
        call(x=torch.randn(2, 65, device=device))
    with pytest.raises(RuntimeError, match="1024 bytes for a \\[32, 64\\] weight"):
        call(packed=q.packed.reshape(-1)[:-1])
    with pytest.raises(RuntimeError, match="given together"):
        call(offset=None)
    with pytest.raises(RuntimeError, match="8-bit codes of a double-quantized absmax"):
        call(absmax=q.absmax.float())
    with pytest.raises(RuntimeError, match="absmax must be Float"):
        call(absmax=q.absmax, nested_absmax=None, nested_qmap=None, offset=None)
    with pytest.raises(RuntimeError, match="bias must be \\[32\\] in x's dtype"):
        call(bias=torch.zeros(32, device=device, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        call(x=torch.randn(2, 64, device=device).double())
    with pytest.raises(RuntimeError, match="weight shape must be positive"):
        call(out_features=0)


def test_matmul_4bit_rejects_unknown_path():
    q = _quantized(32, 64, "nf4", 64, True, "cpu", 7)
    with pytest.raises(ValueError, match="path must be one of"):
        lowrank.matmul_4bit(torch.randn(2, 64), q, path="fast")


def test_opcheck_matmul_4bit(device):
    for double_quant in (False, True):
        q = _quantized(48, 128, "nf4", 64, double_quant, device, 8)
        for dtype, m in ((torch.bfloat16, 3), (torch.float16, 20), (torch.float32, 2)):
            x = torch.randn(m, 128, device=device).to(dtype)
            bias = torch.randn(48, device=device).to(dtype)
            torch.library.opcheck(torch.ops.lowrank.matmul_4bit.default,
                                  (x, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                   q.nested_offset, q.quant_map, 64, 256, 48, 128, bias, "auto"))


def test_cuda_graph_capture_linear4bit(cuda_device):
    """The skinny and the dequantize paths allocate only through the caching allocator and launch on
    the current stream: a captured forward replays to the same result."""
    layer = lowrank.nn.Linear4bit.from_linear(torch.nn.Linear(256, 96), compute_dtype=torch.bfloat16).to(cuda_device)
    for m in (4, 64):  # skinny, dequantize
        x = torch.randn(m, 256, device=cuda_device, dtype=torch.bfloat16)
        expected = layer(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up on the side stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, layer(x))
        assert not torch.equal(out, expected)
