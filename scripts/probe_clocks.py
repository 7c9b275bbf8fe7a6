"""SM clock and power while a matmul runs back to back (one GPU call): does a call's time move with
the clock the GPU holds under its load? Each phase replays a CUDA graph of calls over rotated
weights for a few seconds while nvidia-smi samples the SM clock, power and throttle reasons.

    python scripts/probe_clocks.py [--shape 28672x8192] [--ms 128,2048] [--seconds 3]

Prints, per phase: us per call (from the replays' CUDA events), and the median SM clock (MHz),
power (W) and the throttle reasons seen in that phase's samples.
"""
import argparse
import collections
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402

import lowrank  # noqa: E402

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def graph_of(fn, inputs, calls):
    torch.cuda.synchronize()
    for args in inputs[:2]:
        fn(*args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
    return graph


def run_phase(name, graph, calls, seconds, log):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.time()
    replays = 0
    start.record()
    while time.time() - t0 < seconds:
        graph.replay()
        replays += 1
        if replays % 8 == 0:
            torch.cuda.current_stream().synchronize()  # keep the host within a few replays
    end.record()
    end.synchronize()
    t1 = time.time()
    us = start.elapsed_time(end) * 1000.0 / (replays * calls)
    log.append((name, t0 + 0.5, t1, us))  # the first half second: the clock settling


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--ms", default="128,2048")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qs = [lowrank.quantize_4bit(w) for _ in range(harness.copies_for(n * k // 2))]
    ws = [w] + [w.clone() for _ in range(harness.copies_for(2 * n * k) - 1)]
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    log = []
    time.sleep(1.0)
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        calls = 24
        phases = [("bf16", lambda ww: F.linear(x, ww), [(wi,) for wi in ws], {}),
                  ("lowrank", lambda q: lowrank.matmul_4bit(x, q), [(q,) for q in qs], {}),
                  ("lowrank one CTA per tile", lambda q: lowrank.matmul_4bit(x, q, path="wgmma"), [(q,) for q in qs],
                   {"LOWRANK_WGMMA_STREAM_K": "0"})]
        for name, fn, inputs, env in phases[:2] if m <= 16 else phases:
            os.environ.update(env)
            try:
                graph = graph_of(fn, inputs, calls)
            finally:
                for key in env:
                    del os.environ[key]
            run_phase(f"M={m} {name}", graph, calls, args.seconds, log)
            del graph
            time.sleep(1.0)  # idle between phases: the clock recovers
    time.sleep(0.3)
    smi.terminate()
    samples = []
    for line in smi.stdout.read().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            stamp = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float(
                "0." + parts[0].split(".")[1])
            samples.append((stamp, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
        except (ValueError, IndexError):
            continue
    print(f"{n}x{k}, {len(samples)} samples; phase: us per call | SM MHz median (min-max) | W median | deg C | "
          "throttle reasons (count)")
    for name, t0, t1, us in log:
        inside = [s for s in samples if t0 <= s[0] <= t1]
        if not inside:
            print(f"{name:32s} {us:8.1f} us | no samples")
            continue
        clocks = [s[1] for s in inside]
        power = [s[2] for s in inside]
        reasons = collections.Counter(s[4] for s in inside)
        print(f"{name:32s} {us:8.1f} us | {statistics.median(clocks):6.0f} ({min(clocks):.0f}-{max(clocks):.0f}) | "
              f"{statistics.median(power):5.0f} W | {statistics.median(s[3] for s in inside):3.0f} C | "
              + ", ".join(f"{r} x{c}" for r, c in reasons.most_common()), flush=True)


if __name__ == "__main__":
    main()
