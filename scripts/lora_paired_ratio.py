"""Layer time relative to the floor, robust to the GPU's clock drift: bench_lora's layer (14336 x
4096, M = 8192, r = 16, forward + backward) for the bf16 frozen layer (the floor), lowrank QLoRA and
QDoRA, one call of each in turn (the order rotating every round), each call timed with CUDA events;
the ratio of each call to the floor call of the same round, summarised by quantiles. (bench_lora
times each implementation in one block of calls: the floor drifted 2.36-2.79 ms between and within
runs on one H100, more than the distance to the targets.)

    PYTHONPATH=$PWD python3 scripts/lora_paired_ratio.py [--rounds 60]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_lora  # noqa: E402

NAMES = ("bf16-frozen", "lowrank-qlora", "lowrank-qdora")


def quantiles(v):
    q = statistics.quantiles(v, n=10)
    return f"p10 {q[0]:.3f}  median {statistics.median(v):.3f}  p90 {q[-1]:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    layers, x, dy = bench_lora.bench_layers_ours(NAMES)

    def step(layer):
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)

    for layer in layers.values():  # warm-up
        for _ in range(3):
            step(layer)
    torch.cuda.synchronize()
    events = []
    for r in range(args.rounds):
        order = NAMES[r % 3:] + NAMES[:r % 3]
        row = {}
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(layers[name])
            end.record()
            row[name] = (start, end)
        events.append(row)
    torch.cuda.synchronize()
    times = {name: [row[name][0].elapsed_time(row[name][1]) for row in events] for name in NAMES}
    print(torch.cuda.get_device_name(), f"{args.rounds} rounds")
    for name in NAMES:
        print(f"{name:14s} ms     {quantiles(times[name])}")
    for name in NAMES[1:]:
        ratios = [a / b for a, b in zip(times[name], times["bf16-frozen"])]
        print(f"{name:14s} / floor {quantiles(ratios)}")


if __name__ == "__main__":
    main()
