"""Why bench_lora's block-timed QDoRA step (calls back to back, as harness.time_cuda runs them) is
slower and noisier than the same step timed call by call between other layers' calls: the H100 run
at 18a1a83 had QDoRA 3.012 ms median, 2.897 ms min in the block, against ~2.88 ms from
lora_paired_ratio.py (QLoRA agreed in both, 2.710 / 2.70 ms). Prints, for the floor, QLoRA and QDoRA:
every call's time in a block of back-to-back calls, the host's wall time per call, and for QDoRA the
same block with the host's two flag reads (the cancellation flags and m == 0) made free (a
diagnostic only: it skips the checks), then the GPU's idle gaps over 5 back-to-back QDoRA steps.

    PYTHONPATH=$PWD python3 scripts/qdora_block_timing.py [--reps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lora  # noqa: E402
import trace_gaps  # noqa: E402

import lowrank.lora_function as lora_function  # noqa: E402
import lowrank.nn.lora as nn_lora  # noqa: E402

NAMES = ("bf16-frozen", "lowrank-qlora", "lowrank-qdora")


class _FreeFlag:
    """A flag read that never waits and says False (diagnostic: what the reads cost)."""

    def __init__(self, flag):
        pass

    def __bool__(self):
        return False

    def value(self):
        return 0

    def bits(self, mask):
        return self


def block(step, reps):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    events = []
    t0 = time.perf_counter()
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        events.append((s, e))
    host = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    return [s.elapsed_time(e) for s, e in events], host * 1e3, wall * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    layers, x, dy = bench_lora.bench_layers_ours(NAMES)

    def stepper(layer):
        def step():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            layer(x).backward(dy)
        return step

    print(torch.cuda.get_device_name())
    for round_ in range(2):
        for name in NAMES:
            times, host, wall = block(stepper(layers[name]), args.reps)
            print(f"round {round_} {name:14s} median {statistics.median(times):.3f} min {min(times):.3f} "
                  f"max {max(times):.3f} ms; host {host:.3f} ms/call, wall {wall:.3f} ms/call")
            print("   ", " ".join(f"{t:.3f}" for t in times))
        saved = nn_lora._AsyncFlag, lora_function._AsyncFlag
        nn_lora._AsyncFlag = lora_function._AsyncFlag = _FreeFlag
        try:
            times, host, wall = block(stepper(layers["lowrank-qdora"]), args.reps)
        finally:
            nn_lora._AsyncFlag, lora_function._AsyncFlag = saved
        print(f"round {round_} qdora, no flag reads median {statistics.median(times):.3f} min {min(times):.3f} "
              f"max {max(times):.3f} ms; host {host:.3f} ms/call, wall {wall:.3f} ms/call")
        print("   ", " ".join(f"{t:.3f}" for t in times))

    step = stepper(layers["lowrank-qdora"])
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    print("-- QDoRA, 5 steps back to back (profiler on):")
    print(trace_gaps.report(trace, top=16, min_us=3.0))
    kernels = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    print("-- one step's kernels (the 3rd), us:")
    per_step = len(kernels) // 5
    for e in kernels[2 * per_step: 3 * per_step]:
        print(f"  {e['dur']:8.1f}  {e['name'][:90]}")


if __name__ == "__main__":
    main()
