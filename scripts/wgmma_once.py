"""One call of the wgmma matmul path per (shape, M) of interest, for ncu (-k regex:gemm_4bit_wgmma)."""
import sys

import torch

import lowrank

cases = [(28672, 8192, 128), (28672, 8192, 2048), (4096, 14336, 128)]
if len(sys.argv) > 1:
    cases = [tuple(int(v) for v in c.split("x")) for c in sys.argv[1].split(",")]
for n, k, m in cases:
    q = lowrank.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lowrank.matmul_4bit(x, q, path="wgmma")
    torch.cuda.synchronize()
