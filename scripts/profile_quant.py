"""The quantization kernels on 28672 x 8192 bf16: a torch.profiler table of every GPU kernel in one
quantize_4bit (NF4 + double quant, no host sync) and one dequantize, then one more call of each
hot kernel for ncu (gpu_check.sh 'profile' reads the second launch of each)."""
import torch
from torch.profiler import ProfilerActivity, profile

import lowrank

w = torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
values, thr, cor = lowrank.NF4.tensors("cuda")
for _ in range(3):  # warm-up: module loading, allocator
    q = lowrank.quantize_4bit(w, check_finite=False)
    q.dequantize()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    q = lowrank.quantize_4bit(w, check_finite=False)
    q.dequantize()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
for _ in range(2):
    lowrank.ops.quantize_4bit(w, thr, cor, 64, False)
    q.dequantize()
torch.cuda.synchronize()
