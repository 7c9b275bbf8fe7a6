"""lowrank.ops.mm_tuned: the layers' big 16-bit GEMMs through the cuBLASLt algorithm timed fastest for
the shape (csrc/gemm/mm_tuned_cuda.cpp). CPU and small problems are the plain matmul, bit for bit;
every algorithm the CUDA path can take is checked against an fp32 reference by the 2x rule."""
import pytest
import torch
import torch.nn.functional as F

from lowrank import ops

# M N K = 2^34: the smallest problem that the CUDA path times (kTuneMinMnk)
TUNED_SHAPE = (2048, 4096, 2048)


def _operands(m, n, k, dtype, device, transpose_b, bias, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*(lead or (m,)), k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = w if transpose_b else w.t().contiguous()
    c = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return a, b, c


def _plain(a, b, transpose_b, bias):
    if transpose_b:
        return F.linear(a, b, bias)
    if bias is None:
        return a @ b
    return torch.addmm(bias, a.reshape(-1, a.shape[-1]), b).view(*a.shape[:-1], b.shape[1])


@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mm_tuned_is_the_plain_matmul_on_cpu(transpose_b, bias, dtype):
    a, b, c = _operands(6, 10, 12, dtype, "cpu", transpose_b, bias, lead=(2, 3))
    out = ops.mm_tuned(a, b, transpose_b, c)
    assert out.shape == (2, 3, 10) and out.dtype == dtype
    assert torch.equal(out, _plain(a, b, transpose_b, c))


@pytest.mark.parametrize("make_call, message", [
    (lambda: ops.mm_tuned(torch.ones(4, 8, dtype=torch.int32), torch.ones(3, 8, dtype=torch.int32), True),
     "a must be float32, float16 or bfloat16"),
    (lambda: ops.mm_tuned(torch.ones(4, 8), torch.ones(3, 8, dtype=torch.bfloat16), True), "b must have a's dtype"),
    (lambda: ops.mm_tuned(torch.ones(4, 8), torch.ones(2, 3, 8), True), "b must be 2-D"),
    (lambda: ops.mm_tuned(torch.ones(4, 8), torch.ones(3, 7), True), "a's last dimension must be K = 7"),
    (lambda: ops.mm_tuned(torch.ones(4, 8), torch.ones(3, 8), False), "a's last dimension must be K = 3"),
    (lambda: ops.mm_tuned(torch.ones(4, 8), torch.ones(3, 8), True, torch.ones(4)), "bias must be [3]"),
    (lambda: ops.mm_tuned(torch.ones(4, 8), torch.ones(3, 8), True, torch.ones(3, dtype=torch.float16)),
     "bias must be [3] in a's dtype"),
])
def test_mm_tuned_rejects_bad_input(make_call, message):
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_call()


def test_mm_tuned_compiles_without_graph_breaks():
    a, b, c = _operands(8, 16, 32, torch.float32, "cpu", True, True)
    fn = torch.compile(lambda a, b, c: ops.mm_tuned(a, b, True, c) * 2, fullgraph=True, backend="eager")
    assert torch.equal(fn(a, b, c), F.linear(a, b, c) * 2)


def _err(out, ref):
    return (out.float() - ref).abs().max().item()


def _check_2x(out, a, b, transpose_b, bias):
    """Within 2x the error of the plain 16-bit matmul against an fp32 reference on the same operands."""
    ref = _plain(a.float(), b.float(), transpose_b, None if bias is None else bias.float())
    plain = _plain(a, b, transpose_b, bias)
    assert _err(out, ref) <= 2 * _err(plain, ref) + 1e-6, (_err(out, ref), _err(plain, ref))


def _algorithm_count(a, b, transpose_b, bias, monkeypatch):
    """How many algorithms the CUDA path offers for this shape: the forced index's error says."""
    monkeypatch.setenv("LOWRANK_GEMM_ALGO", "999")
    with pytest.raises(RuntimeError, match=r"LOWRANK_GEMM_ALGO=999 but cuBLASLt offers (\d+) algorithms") as info:
        ops.mm_tuned(a, b, transpose_b, bias)
    import re
    return int(re.search(r"offers (\d+) algorithms", str(info.value)).group(1))


@pytest.mark.parametrize("transpose_b, bias, dtype", [(True, False, torch.bfloat16), (False, False, torch.bfloat16),
                                                      (True, True, torch.float16), (False, True, torch.bfloat16)])
def test_cuda_mm_tuned_every_algorithm_matches_the_reference(cuda_device, monkeypatch, transpose_b, bias, dtype):
    m, n, k = 384, 1024, 768
    a, b, c = _operands(m, n, k, dtype, cuda_device, transpose_b, bias, lead=(3, 128))
    count = _algorithm_count(a, b, transpose_b, c, monkeypatch)
    assert count >= 1
    for i in range(count):
        monkeypatch.setenv("LOWRANK_GEMM_ALGO", str(i))
        out = ops.mm_tuned(a, b, transpose_b, c)
        assert out.shape == (3, 128, n) and out.dtype == dtype
        _check_2x(out, a, b, transpose_b, c)


def test_cuda_mm_tuned_times_a_large_shape_once_and_keeps_its_choice(cuda_device, monkeypatch, capfd):
    monkeypatch.delenv("LOWRANK_GEMM_ALGO", raising=False)
    monkeypatch.setenv("LOWRANK_GEMM_TUNE_TRACE", "1")
    m, n, k = TUNED_SHAPE
    a, b, c = _operands(m, n, k, torch.bfloat16, cuda_device, True, False, seed=1)
    first = ops.mm_tuned(a, b, True)
    torch.cuda.synchronize()
    timed = capfd.readouterr().err
    assert f"lowrank::mm_tuned: M={m} N={n} K={k} a b^T: us per call" in timed and "plain0=" in timed
    second = ops.mm_tuned(a, b, True)
    torch.cuda.synchronize()
    assert "lowrank::mm_tuned" not in capfd.readouterr().err  # the choice is kept: no second timing
    assert torch.equal(first, second)
    _check_2x(first, a, b, True, None)


def test_cuda_mm_tuned_timing_adds_no_memory(cuda_device, monkeypatch):
    # the timing writes every candidate into the call's own output: a shape's first call (timed)
    # peaks no higher than a later one, up to a cuBLASLt workspace (at most 1 MiB)
    monkeypatch.delenv("LOWRANK_GEMM_ALGO", raising=False)
    m, n, k = TUNED_SHAPE
    a, b, c = _operands(m + 128, n, k, torch.bfloat16, cuda_device, True, True, seed=5)

    def peak_mb(fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    plain = peak_mb(lambda: F.linear(a, b, c))  # (also makes cuBLAS's workspace for this stream first)
    first, later = peak_mb(lambda: ops.mm_tuned(a, b, True, c)), peak_mb(lambda: ops.mm_tuned(a, b, True, c))
    assert plain >= (m + 128) * n * 2 / 2**20  # the output itself
    # and whichever the kept choice is, a call holds no more than the plain matmul's output
    assert first <= later + 1.0 and later <= plain + 1.0, (first, later, plain)


def test_cuda_mm_tuned_off_is_the_plain_matmul(cuda_device, monkeypatch):
    monkeypatch.delenv("LOWRANK_GEMM_ALGO", raising=False)
    monkeypatch.setenv("LOWRANK_GEMM_TUNE", "0")
    m, n, k = TUNED_SHAPE
    a, b, c = _operands(m, n, k, torch.bfloat16, cuda_device, False, True, seed=2)
    assert torch.equal(ops.mm_tuned(a, b, False, c), _plain(a, b, False, c))


def test_cuda_mm_tuned_takes_misaligned_and_strided_operands(cuda_device, monkeypatch):
    # a view that starts 2 bytes in, and a transposed (non-contiguous) a: the plain matmul takes them
    monkeypatch.setenv("LOWRANK_GEMM_ALGO", "0")  # would force the tuned path if the operands allowed it
    m, n, k = 256, 512, 256
    base = torch.randn(m * k + 1, device=cuda_device, dtype=torch.bfloat16)
    a = base[1:].view(m, k)
    b = torch.randn(n, k, device=cuda_device, dtype=torch.bfloat16)
    assert torch.equal(ops.mm_tuned(a, b, True), F.linear(a, b))
    at = torch.randn(k, m, device=cuda_device, dtype=torch.bfloat16).t()
    assert torch.equal(ops.mm_tuned(at, b, True), F.linear(at, b))


def test_cuda_mm_tuned_in_a_cuda_graph(cuda_device, monkeypatch):
    # a shape first seen under capture takes the plain matmul (no timing there); a tuned shape replays
    monkeypatch.delenv("LOWRANK_GEMM_ALGO", raising=False)
    m, n, k = TUNED_SHAPE
    a, b, _ = _operands(m, n, k, torch.bfloat16, cuda_device, False, False, seed=3)
    ops.mm_tuned(a, b, False)  # times the shape (outside capture)
    a_new, b_new, _ = _operands(m + 64, n, k, torch.bfloat16, cuda_device, True, False, seed=4)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.mm_tuned(a, b, False)
        out_new = ops.mm_tuned(a_new, b_new, True)
    a.copy_(torch.randn_like(a))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.mm_tuned(a, b, False))
    assert torch.equal(out_new, F.linear(a_new, b_new))


def test_cuda_mm_tuned_rejects_operands_on_two_devices(cuda_device):
    with pytest.raises(RuntimeError, match="a must be on|like b"):
        ops.mm_tuned(torch.ones(4, 8, device=cuda_device), torch.ones(3, 8), True)
