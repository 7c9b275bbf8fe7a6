"""The split-bf16 adapter products of bench_lora's layer (M = 8192, K = 4096, r = 16) in both
orientations, cuBLAS through torch.mm(out_dtype=float32): h = x [hi|mid|lo](A^T) as [M, 48] or as
its transpose [48, M], and dA's x^T [hi|mid|lo](g) as [K, 48] (cuBLAS picks split-K) or as
[48, K]. Median of CUDA-event timed calls, inputs as the layer has them.

    PYTHONPATH=$PWD python3 scripts/time_split_products.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import harness  # noqa: E402

M, K, R = 8192, 4096, 16


def median_us(fn):
    return harness.time_cuda(fn, [()], warmup=5, reps=50)["median_ms"] * 1e3


x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
s_a = torch.randn(K, 3 * R, device="cuda", dtype=torch.bfloat16)   # split(A^T)
s_g = torch.randn(M, 3 * R, device="cuda", dtype=torch.bfloat16)   # split(g)
f32 = torch.float32
cases = {
    "h  = x @ S        [M, 48]": lambda: torch.mm(x, s_a, out_dtype=f32),
    "h^T = S^T @ x^T   [48, M]": lambda: torch.mm(s_a.t(), x.t(), out_dtype=f32),
    "dA = x^T @ G      [K, 48]": lambda: torch.mm(x.t(), s_g, out_dtype=f32),
    "dA^T = G^T @ x    [48, K]": lambda: torch.mm(s_g.t(), x, out_dtype=f32),
}
print(torch.cuda.get_device_name())
for name, fn in cases.items():
    print(f"{name}  {median_us(fn):7.1f} us")
