"""Probe: does torch's SM carveout (torch._C._set_sm_carveout_experimental) reach the bf16 GEMMs
of the LoRA layer (dX = dY W', y = x W'^T at M = 8192, 14336 x 4096), and what does it cost?
Median of 20 timings of 5 back-to-back GEMMs each, us per GEMM, H100.

    PYTHONPATH=$PWD python3 scripts/probe_carveout.py
"""
import ctypes
import glob
import json
import os
import statistics
import tempfile

import torch


def timed(fn, reps=20, inner=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        out.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(x.elapsed_time(y) * 1000 / inner for x, y in out)


def libcublas():
    root = os.path.dirname(os.path.dirname(torch.__file__))
    paths = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcublas.so*"), recursive=True))
    return ctypes.CDLL(paths[0]) if paths else ctypes.CDLL("libcublas.so")


def grids(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        return [(e["name"][:40], e["args"].get("grid"), e["args"].get("block"))
                for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    print(torch.cuda.get_device_name(), torch.__version__, "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
    for carve in [None, 4, 8, 16]:
        torch._C._set_sm_carveout_experimental(carve)
        t_dx = timed(lambda: torch.mm(dy, w))
        t_y = timed(lambda: torch.mm(x, w.t()))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.mm(dy, w)
            torch.mm(x, w.t())
            torch.cuda.synchronize()
        names = [e.key[:60] for e in prof.key_averages() if e.device_time_total > 0]
        print(f"carveout {carve}: dX {t_dx:7.1f} us  y {t_y:7.1f} us  kernels {names}", flush=True)
    torch._C._set_sm_carveout_experimental(None)
    lib = libcublas()
    print("libcublas", lib._name, flush=True)
    for target in [0, 128, 124, 132]:
        handle = ctypes.c_void_p(torch.cuda.current_blas_handle())
        status = lib.cublasSetSmCountTarget(handle, ctypes.c_int(target))
        t_dx = timed(lambda: torch.mm(dy, w))
        t_y = timed(lambda: torch.mm(x, w.t()))
        print(f"cublasSetSmCountTarget({target}) -> {status}: dX {t_dx:7.1f} us  y {t_y:7.1f} us  grids "
              f"{grids(lambda: (torch.mm(dy, w), torch.mm(x, w.t())))}", flush=True)
    lib.cublasSetSmCountTarget(ctypes.c_void_p(torch.cuda.current_blas_handle()), ctypes.c_int(0))
    for carve in [None, 4]:
        torch._C._set_sm_carveout_experimental(carve)
        print(f"torch carveout {carve}: grids {grids(lambda: (torch.mm(dy, w), torch.mm(x, w.t())))}", flush=True)
    torch._C._set_sm_carveout_experimental(None)


if __name__ == "__main__":
    main()
