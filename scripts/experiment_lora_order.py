"""Where the low-rank term of a LoRA layer should enter the big GEMMs (gpu_check.sh step
"experiment_lora"): device time of each way of building y = x W^T + s h B^T and
dX = dY W + s g A at M = 8192 tokens, 14336 x 4096, r = 16, bf16, beside the plain GEMMs (the
floor) and the adapter's small kernels. Printed as a table; nothing is recorded."""
import sys

import torch

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402

import lowrank  # noqa: E402
from lowrank import ops  # noqa: E402

torch.manual_seed(0)
N, K, M, R, S = 14336, 4096, 8192, 16, 2.0
dev, bf = "cuda", torch.bfloat16
w = torch.randn(N, K, device=dev, dtype=bf) * 0.02
q = lowrank.quantize_4bit(w)
x = torch.randn(M, K, device=dev, dtype=bf)
dy = torch.randn(M, N, device=dev, dtype=bf)
a32 = torch.randn(R, K, device=dev) * 0.01
b32 = torch.randn(N, R, device=dev) * 0.01
a, b = a32.to(bf), b32.to(bf)
h = (x.float() @ a32.t())
g = (dy.float() @ b32)
hs, gs = (h * S).to(bf), (g * S).to(bf)
w_aug = torch.cat([w, b], 1).contiguous()  # [N, K + r]
y_buf = torch.empty(M, N, device=dev, dtype=bf)
dx_buf = torch.empty(M, K, device=dev, dtype=bf)


def fwd_floor():
    return x @ w.t()


def fwd_addmm_after():  # today: y = x W^T, then y += s h B^T (one more read + write of y)
    y = x @ w.t()
    return y.addmm_(hs, b.t())


def fwd_c_first():  # y = s h B^T first (one write of y), then the big GEMM with beta = 1
    y = hs @ b.t()
    return y.addmm_(x, w.t())


def fwd_aug_k():  # [x | s h] [W | B]^T: one GEMM with K + r, x copied once
    return torch.cat([x, hs], 1) @ w_aug.t()


def fwd_dequant_into():  # the 4-bit case: the dequantize a 4-bit base costs anyway
    return q.dequantize(bf)


def bwd_floor():
    return dy @ w


def bwd_addmm_after():
    d = dy @ w
    return d.addmm_(gs, a)


def bwd_c_first():
    d = gs @ a
    return d.addmm_(dy, w)


def proj_x():
    return ops.lora_project(x, a32)


def proj_dy():
    return ops.lora_project(dy, b32.t().contiguous())


def proj_x_cublas():
    return x @ a.t()


def proj_dy_cublas():
    return dy @ b


def reduce_dy_h():
    return ops.lora_column_reduce(dy, h, None)


def reduce_dy_h_y():
    return ops.lora_column_reduce(dy, h, y_buf)


def reduce_x_g():
    return ops.lora_column_reduce(x, g, None)


def reduce_cublas_dy_h():
    return dy.t() @ hs


print(f"{'variant':28s} {'ms':>8s}")
for fn in (fwd_floor, fwd_addmm_after, fwd_c_first, fwd_aug_k, fwd_dequant_into, bwd_floor, bwd_addmm_after,
           bwd_c_first, proj_x, proj_dy, proj_x_cublas, proj_dy_cublas, reduce_dy_h, reduce_dy_h_y, reduce_x_g,
           reduce_cublas_dy_h):
    t = harness.time_cuda(fn, [()], warmup=5, reps=30)
    print(f"{fn.__name__:28s} {t['median_ms']:8.3f}")
