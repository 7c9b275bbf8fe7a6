"""One skinny-kernel launch per variant (env settings, read at each launch) on one shape, for ncu:

    ncu --set full -k regex:gemm_4bit_skinny -o $OUT/skinny python3 scripts/ncu_skinny_variants.py \
        [--shape 28672x8192] [--m 1] [VARIANT ...]

A variant is "NAME=VALUE[,NAME=VALUE]" or "" (the defaults); without any: the register kernel
(LOWRANK_SKINNY_TMA=0), then the defaults. NF4, blocksize 64, double quant.
"""
import argparse
import os

import torch

import lowrank

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="28672x8192")
ap.add_argument("--m", type=int, default=1)
ap.add_argument("variants", nargs="*")
args = ap.parse_args()
n, k = (int(v) for v in args.shape.split("x"))
torch.manual_seed(0)
q = lowrank.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
for variant in args.variants or ["LOWRANK_SKINNY_TMA=0", ""]:
    env = dict(kv.split("=") for kv in variant.split(",") if kv)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    lowrank.matmul_4bit(x, q, path="skinny")
    torch.cuda.synchronize()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
