"""Shared benchmark harness: CUDA-event timing over rotating inputs, environment tags, JSON output.

Timing rule (see /work/.library/device/METHOD.md): warm up, then the median of many CUDA-event
timed calls; inputs rotate through enough copies that the L2 cache (50 MB on H100) cannot serve
them between calls. Two clocks: time_cuda (eager calls, host overhead included when the host is
slower than the device) and time_cuda_graph (the calls captured in a CUDA graph: device time).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

import torch

L2_ROTATION_BYTES = 256 * 2**20  # > 5x the H100's 50 MB L2


def copies_for(nbytes: int) -> int:
    return max(1, -(-L2_ROTATION_BYTES // max(nbytes, 1)))


def time_calls_us(fn, reps: int) -> float:
    """Microseconds per call of fn(), reps calls queued between two CUDA events (one round of an
    interleaved A/B: the caller rotates the variants and takes medians)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


def time_cuda(fn, inputs: list, warmup: int = 5, reps: int = 50) -> dict:
    """Median / min milliseconds of fn(*inputs[i % len(inputs)]) timed with CUDA events.

    Calls are queued back to back (one synchronize at the end, as triton's do_bench), so the
    Python time before a call's first launch overlaps the previous call's GPU work instead of
    being counted as idle GPU time; a function that synchronizes inside still pays for it."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in events]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def time_cuda_graph(fn, inputs: list, warmup: int = 3, reps: int = 30, min_calls: int = 24) -> dict:
    """Device time per call: fn(*inputs[i]) over the rotation (repeated to at least ``min_calls``
    calls) captured into one CUDA graph, replayed ``reps`` times, each replay timed with events
    and divided by its call count. No host time: what a kernel costs in a captured decode step
    (or any stream where the host runs ahead). Raises whatever capture raises (the caller falls
    back to time_cuda and says so)."""
    calls = [inputs[i % len(inputs)] for i in range(max(min_calls, len(inputs)))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: lazy init, cuBLAS handles, workspaces
        for args in calls[:len(inputs)]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in calls:
            fn(*args)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / len(calls) for s, e in events]
    del graph
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps, "calls_per_graph": len(calls)}


class _TunedLinear(torch.autograd.Function):
    """x W^T with a frozen W, both GEMMs (forward, and dX = dY W) through lowrank.ops.mm_tuned."""

    @staticmethod
    def forward(ctx, x, w):
        from lowrank import ops
        ctx.save_for_backward(w)
        return ops.mm_tuned(x, w, True)

    @staticmethod
    def backward(ctx, dy):
        from lowrank import ops
        (w,) = ctx.saved_tensors
        return ops.mm_tuned(dy.contiguous(), w, False), None


def tuned_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for a frozen 16-bit w with both GEMMs on the cuBLASLt algorithm that lowrank's
    layers get for the shape (lowrank.ops.mm_tuned): the bf16 baseline with the same algorithm
    choice, beside F.linear's, so that a ratio can be read with and without it."""
    return _TunedLinear.apply(x, w)


def copy_ceiling_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), [()], warmup=3, reps=20)["median_ms"]
    return 2 * nbytes / (t * 1e-3) / 1e9


def git(*args) -> str | None:
    try:
        return subprocess.check_output(["git", *args], stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return None


def environment() -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("LOWRANK_COMMIT") or git("rev-parse", "HEAD"),
        "csrc_tree": os.environ.get("LOWRANK_CSRC_TREE") or git("rev-parse", "HEAD:csrc"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str, payload: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def write_results(out: str, payload: dict, plot) -> None:
    """The benchmark's JSON at ``out`` and ``plot(payload, png_path)`` beside it (same name, .png)."""
    write_json(out, payload)
    plot(payload, os.path.splitext(out)[0] + ".png")
