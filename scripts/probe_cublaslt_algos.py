"""How fast is each GEMM algorithm cuBLASLt's heuristic offers for the big GEMMs of the LoRA layer
and of matmul_4bit's dequantize path, against torch.mm on the same operands?

Why: the layer's step is its two big bf16 GEMMs plus the passes (QLoRA at 1.108x the frozen floor
against a 1.104x target, csrc 9c4a1df). torch.mm takes cuBLAS's first choice; the heuristic ranks
up to 32 algorithms (tile, stages, cluster shape, split-K / stream-K reduction) and its order is a
model, not a measurement. If one of them runs the same GEMM faster on the H100, the layer can call
it. Each algorithm's output is compared with torch.mm's (bf16 ulps), so a wrong one is reported,
not timed as a win.

ctypes only (no header, no build):
    python scripts/probe_cublaslt_algos.py [--cases lora_fwd,lora_bwd] [--count 32] [--json out.json]
Timing: each case's algorithms and torch.mm in shuffled order per round, --reps back-to-back calls
between two events per (round, algorithm); an algorithm's figure is the median over rounds of its
time over torch.mm's in the same round (the clock drifts with power between rounds).
"""
import argparse
import ctypes
import json
import random
import statistics
import os
import sys

import torch

from probe_cublaslt_alpha_vector import HeuristicResult, check, open_cublaslt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import harness  # noqa: E402

CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
# cublasLtMatmulAlgoConfigAttributes_t: (id, name, bytes)
CONFIG_ATTRS = ((0, "algo_id", 4), (1, "tile", 4), (2, "split_k", 4), (3, "reduction", 4), (4, "swizzle", 4),
                (5, "custom", 4), (6, "stages", 4), (7, "inner_shape", 2), (8, "cluster_shape", 2))

# name: (M, N, K, which): "fwd" is y[M, N] = x[M, K] W[N, K]^T (torch.mm(x, w.t())), "bwd" is
# dX[M, K] = dY[M, N] W[N, K] (torch.mm(dy, w)).
CASES = {
    "lora_fwd": (8192, 14336, 4096, "fwd"),
    "lora_bwd": (8192, 14336, 4096, "bwd"),
    "lora4k_fwd": (8192, 4096, 4096, "fwd"),
    "lora4k_bwd": (8192, 4096, 4096, "bwd"),
    "mm28672_m2048_fwd": (2048, 28672, 8192, "fwd"),
    "mm28672_m2048_bwd": (2048, 28672, 8192, "bwd"),
    "mm14336_m2048_fwd": (2048, 14336, 4096, "fwd"),
    "mm28672_m8192_fwd": (8192, 28672, 8192, "fwd"),
}


class LtGemm:
    """One row-major torch GEMM as cuBLASLt's column-major D = op(A) op(B)."""

    def __init__(self, lib, handle, m, n, k, which, count, workspace_bytes):
        self.lib, self.handle, self.which = lib, handle, which
        self.desc = ctypes.c_void_p()
        check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc")
        u64, i64 = ctypes.c_uint64, ctypes.c_int64
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        if which == "fwd":  # y^T [N, M] = (W stored [K, N])^T x^T [K, M]
            trans_a, (ar, ac, lda), (br, bc, ldb), (dr, dc, ldd) = CUBLAS_OP_T, (k, n, k), (k, m, k), (n, m, n)
        else:  # dX^T [K, M] = (W stored [K, N]) (dY stored [N, M])
            trans_a, (ar, ac, lda), (br, bc, ldb), (dr, dc, ldd) = CUBLAS_OP_N, (k, n, k), (n, m, n), (k, m, k)
        for attr, value in ((DESC_TRANSA, trans_a), (DESC_TRANSB, CUBLAS_OP_N)):
            v = ctypes.c_int32(value)
            check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), f"desc attr {attr}")
        for lay, (r, c, ld) in ((self.a, (ar, ac, lda)), (self.b, (br, bc, ldb)), (self.d, (dr, dc, ldd))):
            check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), CUDA_R_16BF, u64(r), u64(c), i64(ld)), "layout")
        self.pref = ctypes.c_void_p()
        check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)), "pref")
        ws = ctypes.c_uint64(workspace_bytes)
        check(lib.cublasLtMatmulPreferenceSetAttribute(self.pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8), "ws")
        self.results = (HeuristicResult * count)()
        self.count = ctypes.c_int(0)
        self.status = lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.a, self.b, self.d, self.d, self.pref,
                                                          count, self.results, ctypes.byref(self.count))

    def config(self, i):
        out = {"workspace": int(self.results[i].workspace_size), "waves": round(float(self.results[i].waves_count), 3)}
        for attr, name, size in CONFIG_ATTRS:
            buf = (ctypes.c_uint16 if size == 2 else ctypes.c_uint32)()
            written = ctypes.c_size_t()
            st = self.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(self.results[i].algo), attr,
                                                               ctypes.byref(buf), ctypes.c_size_t(size),
                                                               ctypes.byref(written))
            out[name] = int(buf.value) if st == 0 else None
        return out

    def run(self, i, w, act, out, workspace):
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(one), ctypes.c_void_p(w.data_ptr()), self.a,
            ctypes.c_void_p(act.data_ptr()), self.b, ctypes.byref(zero), ctypes.c_void_p(out.data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(self.results[i].algo),
            ctypes.c_void_p(workspace.data_ptr()), ctypes.c_size_t(workspace.numel()), stream), "matmul")


def probe_case(lib, handle, name, m, n, k, which, args, workspace):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    act = torch.randn(m, n if which == "bwd" else k, generator=g, device="cuda", dtype=torch.bfloat16)
    ref = torch.mm(act, w) if which == "bwd" else torch.mm(act, w.t())
    out = torch.empty_like(ref)
    gemm = LtGemm(lib, handle, m, n, k, which, args.count, workspace.numel())
    def torch_mm():
        return torch.mm(act, w) if which == "bwd" else torch.mm(act, w.t())

    def torch_mm_lt():  # torch.mm through its cuBLASLt backend (its default on CUDA is cuBLAS)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return torch_mm()
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")

    entries = {"torch.mm": torch_mm, "torch.mm[lt]": torch_mm_lt}
    configs, errors = {}, {}
    scale = ref.float().abs().max().item()
    for i in range(gemm.count.value):
        key = f"algo{i}"
        out.zero_()
        gemm.run(i, w, act, out, workspace)
        torch.cuda.synchronize()
        errors[key] = (out.float() - ref.float()).abs().max().item() / scale
        configs[key] = gemm.config(i)
        entries[key] = (lambda i=i: gemm.run(i, w, act, out, workspace))
    for fn in entries.values():  # warm-up
        fn()
    torch.cuda.synchronize()
    times = {key: [] for key in entries}
    order = list(entries)
    rng = random.Random(1)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for key in order:
            times[key].append(harness.time_calls_us(entries[key], args.reps))
    med = {key: statistics.median(v) for key, v in times.items()}
    base = med["torch.mm"]
    # each round's time over torch.mm's in the same round: the clock drifts between rounds (power)
    paired = {key: statistics.median(t / b for t, b in zip(v, times["torch.mm"])) for key, v in times.items()}
    rows = []
    for key in sorted(paired, key=paired.get):
        row = {"name": key, "us": round(med[key], 2), "vs_torch_mm": round(paired[key], 4),
               "min_us": round(min(times[key]), 2)}
        if key in configs:
            row.update(configs[key], max_rel_err_vs_torch_mm=errors[key])
        rows.append(row)
    flops = 2.0 * m * n * k
    print(f"{name}: M={m} N={n} K={k} {which}, heuristic status {gemm.status}, {gemm.count.value} algorithms; "
          f"torch.mm {base:.1f} us ({flops / base / 1e6:.0f} TFLOP/s)")
    for row in rows[:args.show]:
        cfg = " ".join(f"{a}={row.get(a)}" for a in ("algo_id", "tile", "stages", "split_k", "reduction", "swizzle",
                                                      "cluster_shape", "waves") if a in row)
        print(f"  {row['name']:>9} {row['us']:9.1f} us  {row['vs_torch_mm']:.4f}x  min {row['min_us']:.1f}  {cfg}"
              + (f"  err {row['max_rel_err_vs_torch_mm']:.1e}" if "max_rel_err_vs_torch_mm" in row else ""))
    return {"m": m, "n": n, "k": k, "which": which, "heuristic_status": gemm.status, "algorithms": gemm.count.value,
            "torch_mm_us": round(base, 2), "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="lora_fwd,lora_bwd")
    ap.add_argument("--count", type=int, default=32, help="algorithms asked of the heuristic")
    ap.add_argument("--workspace-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--show", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lib, where, handle = open_cublaslt()
    workspace = torch.empty(args.workspace_mib << 20, dtype=torch.uint8, device="cuda")
    report = {"library": where, "version": int(lib.cublasLtGetVersion()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rounds": args.rounds, "reps": args.reps, "cases": {}}
    for name in args.cases.split(","):
        m, n, k, which = CASES[name]
        report["cases"][name] = probe_case(lib, handle, name, m, n, k, which, args, workspace)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
