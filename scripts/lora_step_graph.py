"""How much of a QLoRA layer step (bench_lora's 14336 x 4096, M = 8192, r = 16, forward + backward)
is host time: the eager step (as bench_lora times it) against the same step captured in a CUDA graph
(device work only, no launch gaps), beside the bf16 frozen layer (the floor) timed both ways.
Rounds interleave the four timings so the GPU's clock drift is shared.

    PYTHONPATH=$PWD python3 scripts/lora_step_graph.py
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_lora  # noqa: E402
import harness  # noqa: E402


def zero(layer, x):
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def graphed_step(layer, x, dy):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (allocator, cuBLAS workspaces)
        for _ in range(3):
            zero(layer, x)
            layer(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    zero(layer, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x).backward(dy)
    return graph


def main(rounds=4, reps=20):
    layers, x, dy = bench_lora.bench_layers_ours(("bf16-frozen", "lowrank-qlora"))
    graphs = {name: graphed_step(layer, x, dy) for name, layer in layers.items()}
    times = {(name, how): [] for name in layers for how in ("eager", "graph")}
    for _ in range(rounds):
        for name, layer in layers.items():
            def eager(layer=layer):
                zero(layer, x)
                layer(x).backward(dy)
            times[(name, "eager")].append(harness.time_cuda(eager, [()], warmup=3, reps=reps)["median_ms"])
            times[(name, "graph")].append(harness.time_cuda(graphs[name].replay, [()], warmup=3, reps=reps)["median_ms"])
    print(torch.cuda.get_device_name())
    for (name, how), ts in times.items():
        print(f"{name:14s} {how:5s} median {statistics.median(ts):.3f} ms  rounds {' '.join(f'{t:.3f}' for t in ts)}")


if __name__ == "__main__":
    main()
