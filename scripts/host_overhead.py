"""Host time per eager call at M = 1 (decoding without CUDA graphs), where the host, not the GPU,
sets the pace: a loop of calls on a small weight (device time ~6 us), timed on the host, then one
synchronize. Prints us per call for bf16 F.linear / nn.Linear, lowrank.matmul_4bit, the raw op and
the Linear4bit module, and a cProfile of the module's calls.

    PYTHONPATH=$PWD python3 scripts/host_overhead.py [--n 4096] [--calls 3000]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

import lowrank


def host_us(fn, calls):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / calls * 1e6
    return host, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    n = args.n
    lin = torch.nn.Linear(n, n, bias=True, device="cuda", dtype=torch.bfloat16)
    mod = lowrank.nn.Linear4bit.from_linear(lin)
    q = mod.quant
    x = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    w, b = lin.weight.detach(), lin.bias.detach()
    rows = {
        "F.linear": lambda: F.linear(x, w, b),
        "nn.Linear": lambda: lin(x),
        "lowrank.matmul_4bit": lambda: lowrank.matmul_4bit(x, q, b),
        "torch.ops.lowrank.matmul_4bit": lambda: torch.ops.lowrank.matmul_4bit(
            x, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset, q.quant_map,
            q.blocksize, q.nested_blocksize, n, n, b, "auto"),
        "Linear4bit": lambda: mod(x),
    }
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  weight {n} x {n}, M = 1, bf16")
    for mode in ("inference_mode", "grad enabled"):
        ctx = torch.inference_mode() if mode == "inference_mode" else torch.enable_grad()
        with ctx:
            for name, fn in rows.items():
                host, wall = host_us(fn, args.calls)
                print(f"  {mode:15s} {name:32s} host {host:6.1f} us/call  wall {wall:6.1f}")
    with torch.inference_mode():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            mod(x)
        prof.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue())


if __name__ == "__main__":
    main()
