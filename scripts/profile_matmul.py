"""One skinny-kernel call per (shape, M) for ncu (scripts/gpu_check.sh, step profile_matmul):
28672 x 8192 and 14336 x 4096 NF4 (blocksize 64, double quant), bf16 x, M = 1 and 16."""
import torch

import lowrank

torch.manual_seed(0)
for n, k in ((28672, 8192), (14336, 4096)):
    q = lowrank.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lowrank.matmul_4bit(x, q, path="skinny")
    torch.cuda.synchronize()
