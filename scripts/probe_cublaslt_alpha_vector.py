"""Does cuBLASLt offer a per-row alpha vector (CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO)
for bf16 GEMMs on this GPU, and at what speed?

Why: DoRA's forward is y = v * (x U^T) with U = W0 + s B A and v = m / n per output column. If
the GEMM could scale its output rows by v in the epilogue, the forward would not need to write
the merged weight v * U (the merge, ~60 us at 14336 x 4096): the row norm, which forms U anyway,
could write it instead. This script asks cuBLASLt's heuristic for such algorithms, and if it
returns any, times one against torch.mm on the same operands and checks its result.

ctypes only (no header, no build): python scripts/probe_cublaslt_alpha_vector.py
"""
import argparse
import ctypes
import glob
import json
import os
import sys

import torch

CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_POINTER_MODE, DESC_TRANSA, DESC_TRANSB = 2, 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
POINTER_MODE_HOST, POINTER_MODE_ALPHA_VECTOR_BETA_ZERO = 0, 3


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt():
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    for name in names:
        try:
            return ctypes.CDLL(name), name
        except OSError:
            pass
    roots = [os.path.dirname(torch.__file__), os.path.join(os.path.dirname(torch.__file__), "..", "nvidia")]
    for root in roots:
        for path in glob.glob(os.path.join(root, "**", "libcublasLt.so*"), recursive=True):
            try:
                return ctypes.CDLL(path), path
            except OSError:
                pass
    raise RuntimeError("libcublasLt not found")


def open_cublaslt():
    """(library, its path, a cuBLASLt handle), with the return types of the functions used here set."""
    torch.cuda.init()
    torch.mm(torch.ones(8, 8, device="cuda"), torch.ones(8, 8, device="cuda"))  # loads cuBLAS(Lt)
    lib, where = load_cublaslt()
    for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
               "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate", "cublasLtMatmulPreferenceSetAttribute",
               "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul", "cublasLtMatmulAlgoConfigGetAttribute"):
        getattr(lib, fn).restype = ctypes.c_int
    lib.cublasLtGetVersion.restype = ctypes.c_size_t
    handle = ctypes.c_void_p()
    check(lib.cublasLtCreate(ctypes.byref(handle)), "create")
    return lib, where, handle


def check(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: cublas status {status}")


class Gemm:
    """D [N, M] (column-major, i.e. y [M, N] row-major) = op(A)^T B with A = U [N, K], B = x [M, K]."""

    def __init__(self, lib, handle, m, n, k, pointer_mode, workspace_bytes):
        self.lib, self.handle = lib, handle
        self.desc = ctypes.c_void_p()
        check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc")
        for attr, value in ((DESC_TRANSA, CUBLAS_OP_T), (DESC_TRANSB, CUBLAS_OP_N), (DESC_POINTER_MODE, pointer_mode)):
            v = ctypes.c_int32(value)
            check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), f"desc attr {attr}")
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), CUDA_R_16BF, ctypes.c_uint64(k), ctypes.c_uint64(n),
                                             ctypes.c_int64(k)), "layout A")
        check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), CUDA_R_16BF, ctypes.c_uint64(k), ctypes.c_uint64(m),
                                             ctypes.c_int64(k)), "layout B")
        check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), CUDA_R_16BF, ctypes.c_uint64(n), ctypes.c_uint64(m),
                                             ctypes.c_int64(n)), "layout D")
        self.pref = ctypes.c_void_p()
        check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)), "pref")
        ws = ctypes.c_uint64(workspace_bytes)
        check(lib.cublasLtMatmulPreferenceSetAttribute(self.pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8), "pref ws")
        self.results = (HeuristicResult * 16)()
        self.count = ctypes.c_int(0)
        self.heuristic_status = lib.cublasLtMatmulAlgoGetHeuristic(
            handle, self.desc, self.a, self.b, self.d, self.d, self.pref, 16, self.results, ctypes.byref(self.count))

    def run(self, alpha_ptr, u, x, out, workspace, algo_index=0):
        beta = ctypes.c_float(0.0)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        r = self.results[algo_index]
        check(self.lib.cublasLtMatmul(
            self.handle, self.desc, alpha_ptr, ctypes.c_void_p(u.data_ptr()), self.a, ctypes.c_void_p(x.data_ptr()),
            self.b, ctypes.byref(beta), ctypes.c_void_p(out.data_ptr()), self.d, ctypes.c_void_p(out.data_ptr()),
            self.d, ctypes.byref(r.algo), ctypes.c_void_p(workspace.data_ptr()), ctypes.c_size_t(workspace.numel()),
            stream), "matmul")


def time_us(fn, reps=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lib, where, handle = open_cublaslt()
    m, n, k = args.m, args.n, args.k
    workspace = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    report = {"library": where, "version": int(lib.cublasLtGetVersion()), "gpu": torch.cuda.get_device_name(),
              "m": m, "n": n, "k": k}
    vec = Gemm(lib, handle, m, n, k, POINTER_MODE_ALPHA_VECTOR_BETA_ZERO, workspace.numel())
    host = Gemm(lib, handle, m, n, k, POINTER_MODE_HOST, workspace.numel())
    report["alpha_vector"] = {"heuristic_status": vec.heuristic_status, "algorithms": vec.count.value}
    report["host_alpha"] = {"heuristic_status": host.heuristic_status, "algorithms": host.count.value}
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.rand(n, generator=g, device="cuda", dtype=torch.float32) + 0.5
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    one = ctypes.c_float(1.0)
    report["torch_mm_us"] = time_us(lambda: torch.mm(x, u.t()))
    if host.count.value > 0:
        report["host_alpha"]["us"] = time_us(lambda: host.run(ctypes.byref(one), u, x, out, workspace))
    if vec.count.value > 0:
        alpha = ctypes.c_void_p(v.data_ptr())
        vec.run(alpha, u, x, out, workspace)
        torch.cuda.synchronize()
        want = (x.float() @ u.float().t()) * v
        err = ((out.float() - want).abs().max() / want.abs().max()).item()
        report["alpha_vector"]["max_rel_err_vs_fp32"] = err
        report["alpha_vector"]["us"] = [time_us(lambda i=i: vec.run(alpha, u, x, out, workspace, i))
                                        for i in range(min(vec.count.value, 4))]
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
