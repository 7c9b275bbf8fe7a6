"""Where a LoRA / DoRA layer step spends its GPU time: a torch.profiler table of every kernel in
one forward + backward of LoraLinear over a 4-bit 14336 x 4096 base, M = 8192 tokens, r = 16, for
QLoRA and QDoRA (gpu_check.sh step "profile_lora"). The H100 bench put QLoRA at 3.72 ms and QDoRA
at 7.56 ms against a frozen-layer floor of 2.41 ms; the table says which kernels make the gap."""
import torch
from torch.profiler import ProfilerActivity, profile

import lowrank

torch.manual_seed(0)
N, K, M, R = 14336, 4096, 8192, 16
linear = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
for dora in (False, True):
    base = lowrank.nn.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    layer = lowrank.nn.LoraLinear(base, r=R, lora_alpha=2 * R, use_dora=dora)
    with torch.no_grad():  # B = 0 at init would hide work: random adapters
        layer.lora_A.weight.normal_(std=0.01)
        layer.lora_B.weight.normal_(std=0.01)
    for _ in range(3):
        x.grad = None
        layer(x).backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        x.grad = None
        layer(x).backward(dy)
        torch.cuda.synchronize()
    print(f"== {'QDoRA' if dora else 'QLoRA'} layer, forward + backward")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
