"""One wgmma-path call at 28672 x 8192, M = 2048, twice (for ncu: -k regex:wgmma -s 1 -c 1)."""
import torch, lowrank
w = torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
q = lowrank.quantize_4bit(w)
x = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(2):
    lowrank.matmul_4bit(x, q, path="wgmma")
torch.cuda.synchronize()
