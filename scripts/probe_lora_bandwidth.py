"""What the QLoRA backward's memory-bound passes reach against the H100's DRAM ceilings, graph-timed
(20 calls per CUDA graph, median of 15 replays; 14336 x 4096 NF4 double quant, M = 8192, r = 16).

Ceilings: a bf16 fill of the merged weight's 117 MB (writes only), a copy of it (reads + writes),
a float32 column sum of dY's 235 MB (reads only). Passes: the plain dequantize, the merge of W'
(29 MB of codes in, 117 MB out), the dY products (235 MB in), and the merge beside the dY products
on two streams as the backward runs them (and one after the other).

    python scripts/probe_lora_bandwidth.py          # the table
    python scripts/probe_lora_bandwidth.py --once   # each pass once (for ncu)
"""
import argparse
import os
import sys

import torch

import lowrank
from lowrank import ops
from lowrank.lora_function import _merged

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import harness  # noqa: E402

N, K, M, R = 14336, 4096, 8192, 16


def graph_us(fn) -> float:
    """Device time per call in us: 20 calls per CUDA graph, median of 15 replays (harness.py)."""
    return harness.time_cuda_graph(fn, [()], warmup=1, reps=15, min_calls=20)["median_ms"] * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    q = lowrank.quantize_4bit(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    a = torch.randn(R, K, device="cuda") * 0.01
    b = torch.randn(N, R, device="cuda") * 0.01
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(M, R, device="cuda")
    w_buf = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    w_src = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    col = torch.empty(N, device="cuda", dtype=torch.float32)
    code_mb = q.packed.numel() / 1e6

    def merge():
        return _merged(q, a, b, 2.0, None, torch.bfloat16)

    def products():
        return ops.lora_dy_products(dy, b, h, None, None, 2.0, None)

    side = torch.cuda.Stream()

    def both():  # as the backward: the dY products on a side stream, the merge on the current one
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            products()
        w = merge()
        cur.wait_stream(side)
        return w

    def both_merge_first():
        cur = torch.cuda.current_stream()
        w = merge()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            products()
        cur.wait_stream(side)
        return w

    cases = [
        ("fill bf16 W-sized", lambda: w_buf.fill_(1.0), N * K * 2 / 1e6),
        ("copy bf16 W-sized", lambda: w_buf.copy_(w_src), N * K * 4 / 1e6),
        ("column sum of dY (f32)", lambda: torch.sum(dy, dim=0, dtype=torch.float32, out=col), M * N * 2 / 1e6),
        ("dequantize bf16", lambda: q.dequantize(torch.bfloat16), code_mb + N * K * 2 / 1e6),
        ("merge r=16", merge, code_mb + N * K * 2 / 1e6),
        ("dY products (LoRA)", products, M * N * 2 / 1e6),
        ("merge + dY products, 2 streams", both, code_mb + N * K * 2 / 1e6 + M * N * 2 / 1e6),
        ("merge first, then dY products", both_merge_first, code_mb + N * K * 2 / 1e6 + M * N * 2 / 1e6),
        ("merge, dY products serial", lambda: (merge(), products()), code_mb + N * K * 2 / 1e6 + M * N * 2 / 1e6),
    ]
    if args.once:  # dequantize, merge, dY products once each (for ncu)
        for _, fn, _ in cases[3:6]:
            fn()
        torch.cuda.synchronize()
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, fn, mb in cases:
        us = graph_us(fn)
        print(f"{name:34s} {us:8.1f} us  {mb:7.1f} MB  {mb / us:6.3f} TB/s")


if __name__ == "__main__":
    main()
