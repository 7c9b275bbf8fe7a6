"""A/B of kernel variants that environment switches select at launch, on bench_lora's QDoRA layer
(14336 x 4096, M = 8192, r = 16, forward + backward), in one process: each round runs the floor
(bf16 frozen layer) and the QDoRA layer once under every variant, in a shuffled order, each call
timed with CUDA events; the ratio of each call to the floor call of its round, summarised by
quantiles (a clock step moves the floor and the variants together). Then torch.profiler's device
time per kernel name for each variant (10 steps).

    PYTHONPATH=$PWD python3 scripts/ab_qdora_env.py --variant base= \
        --variant w7=LOWRANK_DY_PRODUCTS_WARPS=7 --variant noflags=FREE_FLAGS=1 --rounds 40
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lora  # noqa: E402
import trace_gaps  # noqa: E402
from qdora_block_timing import _FreeFlag  # noqa: E402

import lowrank.lora_function as lora_function  # noqa: E402
import lowrank.nn.lora as nn_lora  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    env = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    return name, env


_FLAG_CLASS = (nn_lora._AsyncFlag, lora_function._AsyncFlag)


def apply_env(env: dict, keys: set):
    """Sets the variant's environment; the pseudo-variable FREE_FLAGS=1 swaps the layer's host flag
    reads for _FreeFlag (a diagnostic that skips the cancellation and m == 0 checks)."""
    for key in keys:
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in env.items() if k != "FREE_FLAGS"})
    free = env.get("FREE_FLAGS") == "1"
    nn_lora._AsyncFlag = lora_function._AsyncFlag = _FreeFlag if free else _FLAG_CLASS[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True, help="name=KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--layer", default="lowrank-qdora")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shape", default="14336,4096", help="out,in of the layer (bench_lora's two: 14336,4096 4096,4096)")
    args = ap.parse_args()
    n_out, n_in = (int(v) for v in args.shape.split(","))
    variants = [parse_variant(v) for v in args.variant]
    keys = {k for _, env in variants for k in env}
    layers, x, dy = bench_lora.bench_layers_ours(("bf16-frozen", args.layer), n=n_out, k=n_in)
    floor, layer = layers["bf16-frozen"], layers[args.layer]

    def step(mod):
        x.grad = None
        for p in mod.parameters():
            p.grad = None
        mod(x).backward(dy)

    names = ["floor"] + [name for name, _ in variants]
    runs = {"floor": (floor, {})}
    runs.update({name: (layer, env) for name, env in variants})
    for name in names:
        apply_env(runs[name][1], keys)
        for _ in range(3):
            step(runs[name][0])
    torch.cuda.synchronize()
    rows = []
    shuffle = random.Random(0)  # a fresh order every round: no layer always follows the same one
    for r in range(args.rounds):
        order = list(names)
        shuffle.shuffle(order)
        row = {}
        for name in order:
            mod, env = runs[name]
            apply_env(env, keys)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(mod)
            end.record()
            row[name] = (start, end)
        rows.append(row)
    torch.cuda.synchronize()
    times = {name: [row[name][0].elapsed_time(row[name][1]) for row in rows] for name in names}
    result = {"gpu": torch.cuda.get_device_name(), "rounds": args.rounds, "variants": dict(variants),
              "shape": [n_out, n_in]}
    print(result["gpu"], f"{args.rounds} rounds, layer {args.layer} {n_out} x {n_in}")
    for name in names:
        q = bench_lora._quantiles(times[name])
        result[name] = {"ms": q}
        line = f"{name:10s} ms p10 {q['p10']:.3f} median {q['median']:.3f} p90 {q['p90']:.3f}"
        if name != "floor":
            qr = bench_lora._quantiles([a / b for a, b in zip(times[name], times["floor"])])
            result[name]["ratio"] = qr
            line += f" | / floor p10 {qr['p10']:.4f} median {qr['median']:.4f} p90 {qr['p90']:.4f}"
        print(line)

    for name, env in [("floor", {})] + variants:
        apply_env(env, keys)
        mod = runs[name][0]
        step(mod)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step(mod)
            torch.cuda.synchronize()
        per_kernel = collections.defaultdict(float)
        for evt in prof.key_averages():
            if evt.device_time_total > 0:
                per_kernel[evt.key[:90]] += evt.device_time_total / 10
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:14]
        result[name]["kernels_us"] = dict(top)
        result[name]["kernels_total_us"] = sum(per_kernel.values())
        print(f"-- {name}: device us per step, top kernels (all kernels: {sum(per_kernel.values()):.1f} us)")
        for key, us in top:
            print(f"   {us:9.1f}  {key}")
        # the GPU's idle time between those kernels (CUDA activity only: little host overhead added)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        print(trace_gaps.report(trace, top=8, min_us=3.0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
