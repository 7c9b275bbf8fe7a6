"""Debug: where the wgmma path differs from the dequantized weight (x = identity rows)."""
import torch
import lowrank

torch.manual_seed(0)
for m, k, n in [(64, 64, 128), (128, 64, 128), (128, 128, 128), (65, 64, 128), (256, 64, 128), (256, 256, 256)]:
    w = torch.randn(n, k, device="cuda") * 0.05
    q = lowrank.quantize_4bit(w, "nf4", 64, False)
    x = torch.eye(m, k, device="cuda", dtype=torch.bfloat16)
    y = lowrank.matmul_4bit(x, q, path="wgmma").float()
    ref = x.float() @ q.dequantize(torch.bfloat16).float().t()
    bad = ~(y == ref)
    print(f"M={m} K={k} N={n}: bad {bad.sum().item()} of {bad.numel()}, nan {torch.isnan(y).sum().item()}")
    if bad.any():
        toks = bad.any(1).nonzero().flatten().tolist()
        rows = bad.any(0).nonzero().flatten().tolist()
        print("  bad tokens", toks[:20], "...", len(toks), " bad rows", rows[:20], "...", len(rows))
        t0 = toks[0]
        print("  y[t0, :16]", y[t0, :16].tolist())
        print("  ref[t0,:16]", ref[t0, :16].tolist())
    # random x
    xr = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    yr = lowrank.matmul_4bit(xr, q, path="wgmma").float()
    rr = xr.float() @ q.dequantize(torch.float32).t()
    print("  random x rel err", ((yr - rr).norm() / rr.norm()).item())
