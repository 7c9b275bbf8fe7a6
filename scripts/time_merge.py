"""Kernel time of the merged LoRA weight (ops.lora_merge_4bit) beside the plain 4-bit dequantize it
replaces, 14336 x 4096 NF4 (blocksize 64, double quant), bf16 out, r = 16, CUDA events, median of
50. The floor of both: 29 MB of codes read + 117 MB of bf16 written."""
import torch

import lowrank
from lowrank import ops
from lowrank.lora_function import _merged


def median_us(fn, reps=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


torch.manual_seed(0)
q = lowrank.quantize_4bit(torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
a = torch.randn(16, 4096, device="cuda") * 0.01
b = torch.randn(14336, 16, device="cuda") * 0.01
v = torch.rand(14336, device="cuda") + 0.5
print(f"dequantize bf16                {median_us(lambda: q.dequantize(torch.bfloat16)):7.1f} us")
print(f"lora_merge_4bit bf16 r=16      {median_us(lambda: _merged(q, a, b, 2.0, None, torch.bfloat16)):7.1f} us")
print(f"lora_merge_4bit bf16 r=16 + v  {median_us(lambda: _merged(q, a, b, 2.0, v, torch.bfloat16)):7.1f} us")
a32, b32 = torch.randn(32, 4096, device="cuda") * 0.01, torch.randn(14336, 32, device="cuda") * 0.01
print(f"lora_merge_4bit bf16 r=32      {median_us(lambda: _merged(q, a32, b32, 2.0, None, torch.bfloat16)):7.1f} us")
