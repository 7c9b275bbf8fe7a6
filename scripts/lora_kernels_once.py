"""Each of the LoRA/DoRA layer's own kernels, twice, at the benchmark's shape (14336 x 4096 NF4,
r = 16, M = 8192): a small process for ncu to profile them, e.g.

  ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \\
      -k regex:"lora_merge_4bit_mma|lora_dy_products" python3 scripts/lora_kernels_once.py

Launch order: merge (bf16) x2, row norm x2, dY products LoRA x2, DoRA x2."""
import torch

import lowrank
from lowrank import dora, ops
from lowrank.lora_function import _merged

torch.manual_seed(0)
q = lowrank.quantize_4bit(torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
a = torch.randn(16, 4096, device="cuda") * 0.01
b = torch.randn(14336, 16, device="cuda") * 0.01
w2 = dora.base_row_sq_norm(q)
dy = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16)
y = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16)
h = torch.randn(8192, 16, device="cuda")
for _ in range(2):
    _merged(q, a, b, 2.0, None, torch.bfloat16)
for _ in range(2):
    dora.dora_weight_norm_flagged(q, a, b, 2.0, w2)
for _ in range(2):
    ops.lora_dy_products(dy, b, h, None)
for _ in range(2):
    ops.lora_dy_products(dy, b, h, y)
torch.cuda.synchronize()
print("done")
