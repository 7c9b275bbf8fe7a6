"""One call of the wgmma matmul path per (shape, M) of interest, for ncu (-k regex:gemm_4bit_wgmma);
--bf16 adds one bf16 F.linear call of the same shape (cuBLAS, for a side-by-side profile)."""
import sys

import torch
import torch.nn.functional as F

import lowrank

args = [a for a in sys.argv[1:] if not a.startswith("--")]
cases = [(28672, 8192, 128), (28672, 8192, 2048), (4096, 14336, 128)]
if args:
    cases = [tuple(int(v) for v in c.split("x")) for c in args[0].split(",")]
for n, k, m in cases:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = lowrank.quantize_4bit(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lowrank.matmul_4bit(x, q, path="wgmma")
    if "--bf16" in sys.argv:
        F.linear(x, w)
    torch.cuda.synchronize()
