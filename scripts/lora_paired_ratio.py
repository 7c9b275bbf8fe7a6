"""Layer time relative to the floor, robust to the GPU's clock drift: bench_lora's layer (14336 x
4096, M = 8192, r = 16, forward + backward) for the bf16 frozen layer (the floor), lowrank QLoRA and
QDoRA, one call of each in turn (all 6 orders in turn), each call timed with CUDA events; the ratio
of each call to the floor call of the same round, summarised by quantiles; then each layer's kernel
time per step (torch.profiler) and its ratio to the floor's. (bench_lora
times each implementation in one block of calls: the floor drifted 2.36-2.79 ms between and within
runs on one H100, more than the distance to the targets.)

    PYTHONPATH=$PWD python3 scripts/lora_paired_ratio.py [--rounds 60]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_lora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    result = bench_lora.paired_ratios(args.rounds)
    print(torch.cuda.get_device_name(), f"{args.rounds} rounds")

    def line(q):
        return f"p10 {q['p10']:.3f}  median {q['median']:.3f}  p90 {q['p90']:.3f}"
    for name in bench_lora.PAIRED:
        print(f"{name:14s} ms     {line(result[name]['ms'])}")
    for name in bench_lora.PAIRED[1:]:
        print(f"{name:14s} / floor {line(result[name]['ratio'])}")
    for name in bench_lora.PAIRED:
        extra = f" = {result[name]['kernel_ratio']:.3f}x the floor's" if "kernel_ratio" in result[name] else ""
        print(f"{name:14s} kernels {result[name]['kernel_us']:.1f} us per step{extra}")


if __name__ == "__main__":
    main()
