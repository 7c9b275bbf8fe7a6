"""The kernels of one bench_lora layer step on a timeline (torch.profiler): start and end relative to
the step's first kernel, the stream, the name; per environment variant (as ab_qdora_env.py's
--variant name=KEY=VALUE[,KEY=VALUE]). Shows which launches overlap when work runs on two streams.

    PYTHONPATH=$PWD python3 scripts/lora_timeline.py --layer lowrank-qlora --variant base= \
        --variant hbwd=LOWRANK_LORA_STREAMS=hbwd
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_lora  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    env = dict(item.partition("=")[::2] for item in filter(None, rest.split(",")))
    return name, env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--layer", default="lowrank-qlora")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--shape", default="14336,4096", help="out,in of the layer")
    args = ap.parse_args()
    n_out, n_in = (int(v) for v in args.shape.split(","))
    layers, x, dy = bench_lora.bench_layers_ours([args.layer], n=n_out, k=n_in)
    layer = layers[args.layer]

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)

    keys = set()
    variants = [parse_variant(v) for v in args.variant]
    for _, env in variants:
        keys |= set(env)
    for name, env in variants:
        for key in keys:
            os.environ.pop(key, None)
        os.environ.update(env)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        marker = torch.zeros(1, device="cuda")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):  # back to back, as the benchmarks run them; a fill between steps
                marker.fill_(1.0)
                step()
            marker.fill_(1.0)
            torch.cuda.synchronize()
        path = tempfile.mktemp(suffix=".json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"]
                      if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
        events.sort(key=lambda e: e["ts"])
        # the last step: the kernels between the last two fills
        fills = [i for i, e in enumerate(events) if "FillFunctor" in e["name"]]
        last = events[fills[-2] + 1:fills[-1]]
        t0 = last[0]["ts"]
        end = max(e["ts"] + e["dur"] for e in last)
        print(f"-- {name}: step span {end - t0:.1f} us, {len(last)} kernels", flush=True)
        for e in last:
            print(f"  {e['ts'] - t0:8.1f} {e['ts'] + e['dur'] - t0:8.1f} {e['dur']:7.1f}  s{e['args'].get('stream', '?'):<3} "
                  f"{e['name'][:70]}")


if __name__ == "__main__":
    main()
