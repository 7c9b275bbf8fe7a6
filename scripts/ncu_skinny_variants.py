"""One skinny-kernel launch per variant (generic lookups, no absmax prefetch; immediate-offset
lookups, no absmax prefetch; the default: with the L2 prefetch of the next segment's absmax) at M = 1 on
28672 x 8192 NF4 (blocksize 64, double quant), for ncu."""
import os

import torch

import lowrank

torch.manual_seed(0)
q = lowrank.quantize_4bit(torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02)
x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
for generic, no_prefetch in (("1", "1"), ("0", "1"), ("0", "0")):
    os.environ["LOWRANK_SKINNY_GENERIC_LOOKUP"] = generic
    os.environ["LOWRANK_SKINNY_NO_ABSMAX_PREFETCH"] = no_prefetch
    lowrank.matmul_4bit(x, q, path="skinny")
    torch.cuda.synchronize()
