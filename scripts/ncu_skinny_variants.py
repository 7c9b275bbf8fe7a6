"""One skinny-kernel launch per lookup path (generic shared addresses, then the immediate window
offset) at M = 1 on 28672 x 8192 NF4 (blocksize 64, double quant), for ncu:

    ncu --metrics gpu__time_duration.sum,smsp__inst_executed.sum -k regex:gemm_4bit_skinny \
        python3 scripts/ncu_skinny_variants.py
"""
import os

import torch

import lowrank

torch.manual_seed(0)
q = lowrank.quantize_4bit(torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02)
x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
for generic in ("1", "0"):
    os.environ["LOWRANK_SKINNY_GENERIC_LOOKUP"] = generic
    lowrank.matmul_4bit(x, q, path="skinny")
    torch.cuda.synchronize()
