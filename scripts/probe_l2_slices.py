"""Probe: does dequantizing the weight in row slices into a buffer that stays in L2 make the
dequantize-then-cuBLAS path cheaper at large M?

The dequantize path writes the whole bf16 weight (470 MB on 28672 x 8192: ~225 us at DRAM speed)
before cuBLAS reads it. Cut into slices of S rows, each slice's dequantize writes S * K * 2 bytes
into the block the caching allocator hands back for every slice (the same addresses), and the GEMM
of that slice writes its columns of y in place (torch.mm out= a column block, ld = N). If the
slice's lines are still in L2 when the next slice overwrites them, those writes never reach DRAM.

Prints, per shape and M: the full path, the sliced path at each S (event-timed, eager: every call
here is >= 50 us of device time), the bf16 GEMM alone, and the summed kernel times of one call of
each from torch.profiler (dequantize vs GEMM).

    PYTHONPATH=$PWD python3 scripts/probe_l2_slices.py [--shapes 28672x8192,14336x4096] [--ms 2048,8192]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import harness  # noqa: E402

import lowrank  # noqa: E402
from lowrank import ops  # noqa: E402


def slice_dequantizer(q, rows):
    """fn(n0) -> the bf16 rows [n0, n0 + rows) of q, dequantized by the nested op on the slices of
    the packed codes and absmax tables (rows * K must be a multiple of blocksize * nested_blocksize)."""
    n, k = q.shape
    per_nested = q.blocksize * q.nested_blocksize
    assert rows * k % per_nested == 0 and n % rows == 0
    packed = q.packed.reshape(-1)
    values = q.quant_map

    def dequant(n0):
        e0, e1 = n0 * k, (n0 + rows) * k
        return ops.dequantize_4bit_nested(
            packed[e0 // 2:e1 // 2], q.absmax[e0 // q.blocksize:e1 // q.blocksize],
            q.nested_absmax[e0 // per_nested:e1 // per_nested], q.nested_quant_map, q.nested_offset, values,
            q.blocksize, q.nested_blocksize, rows * k, torch.bfloat16).view(rows, k)
    return dequant


def full_path(x, q, y):
    w = q.dequantize(torch.bfloat16)
    torch.mm(x, w.t(), out=y)


def sliced_path(x, q, y, rows, dequant):
    n = q.shape[0]
    for n0 in range(0, n, rows):
        w = dequant(n0)
        torch.mm(x, w.t(), out=y[:, n0:n0 + rows])
        del w


def kernel_sums(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    sums = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            key = "dequant" if "dequant" in e.name else ("gemm" if ("nvjet" in e.name or "gemm" in e.name.lower()
                                                                     or "sm90" in e.name) else e.name[:40])
            sums[key] = sums.get(key, 0.0) + e.device_time
    return {k: round(v, 1) for k, v in sums.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="28672x8192,14336x4096")
    ap.add_argument("--ms", default="2048,8192")
    ap.add_argument("--rows", default="1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qs = [lowrank.quantize_4bit(w) for _ in range(2)]
        wd = [w, w.clone()]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            variants = {"bf16": lambda q, i: torch.mm(x, wd[i].t(), out=y),
                        "full": lambda q, i: full_path(x, q, y)}
            for rows in (int(v) for v in args.rows.split(",")):
                if n % rows or rows * k % (64 * 256):
                    continue
                deqs = [slice_dequantizer(q, rows) for q in qs]
                variants[f"slice{rows}"] = (lambda q, i, rows=rows, deqs=deqs: sliced_path(x, q, y, rows, deqs[i]))
            ref = None
            for name, fn in variants.items():
                if name == "bf16":
                    continue
                fn(qs[0], 0)
                out = y.clone()
                if ref is None:
                    ref = out
                else:
                    assert torch.equal(out, ref), f"{name} differs from the full path"
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    r = harness.time_cuda(fn, [(q, i) for i, q in enumerate(qs)], warmup=3, reps=10)
                    times[name].append(r["median_ms"] * 1e3)
            base = statistics.median(times["bf16"])
            for name in variants:
                med = statistics.median(times[name])
                sums = kernel_sums(lambda: variants[name](qs[0], 0))
                print(f"{shape:>11} M={m:<5} {name:>10} {med:9.1f} us  {med / base:6.3f}x bf16   kernels {sums}")


if __name__ == "__main__":
    main()
