"""Probe: can the dequantize path at M >= 2048 hide part of its dequantization by cutting the
weight into row chunks (dequantize chunk i + 1 while chunk i's GEMM runs, or into a buffer small
enough to stay in L2)? An upper bound: each chunk's GEMM writes its own output (no assembly into
y), so a variant that does not beat `full` here cannot beat it in a real kernel either.

Variants, interleaved over rounds (CUDA events, median us):
  bf16        torch.mm(x, W^T) on the bf16 weight
  full        dequantize the whole weight, then one torch.mm (today's dequantize path)
  dq          the dequantization alone;   gemm  the torch.mm alone on a dequantized weight
  serial-c    c chunks: dequantize chunk i, then its torch.mm, one stream
  overlap-c   c chunks: the dequantizations on a second stream, one chunk ahead, two buffers

    PYTHONPATH=$PWD python3 scripts/probe_chunked_dequant.py [--shapes 4096x4096,4096x14336] [--ms 2048,8192]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,28672x8192")
    ap.add_argument("--ms", default="2048,8192")
    ap.add_argument("--chunks", default="2,4")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    side = torch.cuda.Stream()
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q = lowrank.quantize_4bit(w)
        chunk_qs = {}
        for c in (int(v) for v in args.chunks.split(",")):
            rows = n // c
            chunk_qs[c] = [lowrank.quantize_4bit(w[i * rows:(i + 1) * rows]) for i in range(c)]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            wd = q.dequantize(torch.bfloat16)
            variants = {
                "bf16": lambda: torch.mm(x, w.t(), out=y),
                "full": lambda: torch.mm(x, q.dequantize(torch.bfloat16).t(), out=y),
                "dq": lambda: q.dequantize(torch.bfloat16),
                "gemm": lambda: torch.mm(x, wd.t(), out=y),
            }
            for c, qs in chunk_qs.items():
                outs = [torch.empty(m, n // c, device="cuda", dtype=torch.bfloat16) for _ in range(c)]

                def serial(qs=qs, outs=outs):
                    for qi, yi in zip(qs, outs):
                        torch.mm(x, qi.dequantize(torch.bfloat16).t(), out=yi)

                def overlap(qs=qs, outs=outs):
                    main = torch.cuda.current_stream()
                    bufs = [None, None]
                    ready = [torch.cuda.Event(), torch.cuda.Event()]
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        bufs[0] = qs[0].dequantize(torch.bfloat16)
                        ready[0].record(side)
                    for i, yi in enumerate(outs):
                        if i + 1 < len(qs):
                            with torch.cuda.stream(side):
                                bufs[(i + 1) % 2] = qs[i + 1].dequantize(torch.bfloat16)
                                ready[(i + 1) % 2].record(side)
                        main.wait_event(ready[i % 2])
                        buf = bufs[i % 2]
                        torch.mm(x, buf.t(), out=yi)
                        buf.record_stream(main)
                    main.wait_stream(side)

                variants[f"serial-{c}"] = serial
                variants[f"overlap-{c}"] = overlap
            for fn in variants.values():  # warm-up (allocator, cuBLAS heuristics, clocks)
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            times = {name: [] for name in variants}
            for r in range(args.rounds):
                names = list(variants)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    times[name].append(harness.time_calls_us(variants[name], 3))
            med = {name: statistics.median(v) for name, v in times.items()}
            line = " ".join(f"{name} {t:7.1f}" for name, t in med.items())
            print(f"{n}x{k} M={m}: {line} | full/bf16 {med['full'] / med['bf16']:.3f} "
                  + " ".join(f"{nm}/bf16 {med[nm] / med['bf16']:.3f}" for nm in med if "-" in nm), flush=True)


if __name__ == "__main__":
    main()
