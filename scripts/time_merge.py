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

# DoRA's row norm: the direct op against the expansion (dora_cross_4bit + dora_norm)
import os
from lowrank import dora
w2 = dora.base_row_sq_norm(q)
print(f"dora norm, direct (row_norm)   {median_us(lambda: dora.dora_weight_norm_flagged(q, a, b, 2.0, w2)):7.1f} us")
os.environ["LOWRANK_ROW_NORM"] = "0"
print(f"dora norm, expansion           {median_us(lambda: dora.dora_weight_norm_flagged(q, a, b, 2.0, w2)):7.1f} us")
del os.environ["LOWRANK_ROW_NORM"]

# The backward's dY products, M = 8192: one op against the separate products
from lowrank.lora_function import _project, _reduce_rows
dy = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16)
y = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16)
h = torch.randn(8192, 16, device="cuda")
print(f"dy products fused, LoRA        {median_us(lambda: ops.lora_dy_products(dy, b, h, None)):7.1f} us")
print(f"dy products fused, DoRA (y)    {median_us(lambda: ops.lora_dy_products(dy, b, h, y)):7.1f} us")
print(f"g + dh separate                {median_us(lambda: (_project(dy, b), _reduce_rows(dy, h))):7.1f} us")
print(f"g + dh + dot separate          {median_us(lambda: (_project(dy, b), _reduce_rows(dy, h), ops.lora_column_reduce(dy, h.new_empty(8192, 0), y))):7.1f} us")
