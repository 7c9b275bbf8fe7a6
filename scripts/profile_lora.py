"""Where a LoRA / DoRA layer step spends its GPU time: a torch.profiler table of every kernel in
one forward + backward of LoraLinear over a 4-bit 14336 x 4096 base, M = 8192 tokens, r = 16, for
QLoRA and QDoRA (gpu_check.sh step "profile_lora"). The H100 bench put QLoRA at 3.72 ms and QDoRA
at 7.56 ms against a frozen-layer floor of 2.41 ms; the table says which kernels make the gap.
After the table: the GPU's idle gaps in the step and the CPU op that launched the kernel after
each (scripts/trace_gaps.py): the bench's QDoRA time (4.07 ms) exceeds its kernels' (3.40 ms).
LOWRANK_PROFILE_DROPOUT=p profiles the layers with lora_dropout = p in training mode."""
import json
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import lowrank

sys.path.insert(0, os.path.dirname(__file__))
import trace_gaps  # noqa: E402

torch.manual_seed(0)
N, K, M, R = 14336, 4096, 8192, 16
DROPOUT = float(os.environ.get("LOWRANK_PROFILE_DROPOUT", "0"))
linear = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
for dora in (False, True):
    base = lowrank.nn.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    layer = lowrank.nn.LoraLinear(base, r=R, lora_alpha=2 * R, lora_dropout=DROPOUT, use_dora=dora).train()
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
    print(f"== {'QDoRA' if dora else 'QLoRA'} layer, forward + backward, lora_dropout {DROPOUT}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    # idle gaps in the steady state: three steps back to back, as the bench runs them (a lone step
    # starts on an empty queue, so its host-bound start would count as idle)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof3:
        for _ in range(3):
            x.grad = None
            layer(x).backward(dy)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof3.export_chrome_trace(path)
        with open(path) as f:
            print(f"-- {'QDoRA' if dora else 'QLoRA'}, 3 steps back to back:")
            print(trace_gaps.report(json.load(f)))
