"""Only the backward's skinny grad kernel (and its split-sum launch), no cuBLAS, for
compute-sanitizer racecheck: the CUDA tests of it also call cuBLAS, whose nvjet kernels fill the
report (PYTHONPATH=$PWD compute-sanitizer --tool racecheck python3 scripts/racecheck_grad_x.py)."""
import torch

import lowrank
from lowrank import ops

for n, k, bs, m in ((1000, 64, 64, 1), (300, 1152, 128, 9), (4096, 512, 64, 16), (28672, 1024, 64, 5), (13, 4096, 256, 16)):
    q = lowrank.quantize_4bit((torch.randn(n, k) * 0.05).cuda(), "nf4", bs, True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    dx = ops.matmul_4bit_grad_x(dy, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize, n, k, "skinny")
    torch.cuda.synchronize()
    print(n, k, m, tuple(dx.shape), bool(torch.isfinite(dx).all()))
