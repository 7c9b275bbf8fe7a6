"""A/B of the wgmma kernel's experiment switch (LOWRANK_WGMMA_EXPERIMENT: 0 normal, 1 no lookups,
2 no wgmma), graph-timed, same process."""
import os
import sys
import pathlib

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402

import lowrank  # noqa: E402

for n, k, m in [(28672, 8192, 128), (28672, 8192, 2048), (14336, 4096, 8192)]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qs = [lowrank.quantize_4bit(w) for _ in range(harness.copies_for(n * k // 2))]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    line = f"{n}x{k} M={m}:"
    for mode in ("0", "1", "2", "0"):
        os.environ["LOWRANK_WGMMA_EXPERIMENT"] = mode
        fn = lambda q: lowrank.matmul_4bit(x, q, path="wgmma")  # noqa: E731
        t = harness.time_cuda_graph(fn, [(q,) for q in qs]) if m <= 512 else harness.time_cuda(fn, [(q,) for q in qs], reps=20)
        line += f"  mode{mode} {t['median_ms'] * 1e3:8.1f} us"
    print(line, flush=True)
