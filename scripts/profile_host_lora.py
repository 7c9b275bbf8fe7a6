"""Where the host's time goes in a LoRA / DoRA layer step (bench_lora's layer, forward + backward):
per layer the host's wall time per step and the GPU's (CUDA events) over a block of steps, then
cProfile of the host over the same steps, largest cumulative and own times first. bench_lora's
4096 x 4096 QDoRA step took 1.59 ms against 0.85 for QLoRA and 0.68 for the floor (H100): the host.

    PYTHONPATH=$PWD python3 scripts/profile_host_lora.py [--n 4096 --k 4096 --steps 50]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_lora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", default="bf16-frozen,lowrank-qlora,lowrank-qdora")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    names = args.layers.split(",")
    layers, x, dy = bench_lora.bench_layers_ours(names, n=args.n, k=args.k)

    def step(layer):
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)

    print(torch.cuda.get_device_name(), f"{args.n}x{args.k}, M = {bench_lora.M}")
    for name in names:
        layer = layers[name]
        for _ in range(5):
            step(layer)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(args.steps):
            step(layer)
        end.record()
        host = (time.perf_counter() - t0) / args.steps * 1e3
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / args.steps
        print(f"{name:14s} host {host:.3f} ms/step, GPU {gpu:.3f} ms/step")
    for name in names[1:]:
        layer = layers[name]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step(layer)
        torch.cuda.synchronize()
        prof.disable()
        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
            text = buf.getvalue()
            print(f"-- {name}: cProfile over {args.steps} steps, by {key}")
            print(text[text.find("ncalls"):])


if __name__ == "__main__":
    main()
