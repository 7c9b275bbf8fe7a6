"""A/B of skinny-kernel variants in one process (device time per call from captured CUDA graphs,
weights rotated past L2), interleaved over rounds so the GPU's clock drift is shared:
  tma       the bulk-copy kernel (the default on Hopper), lookups with the immediate window offset
  generic   the same, table lookups through generic shared addresses (LOWRANK_SKINNY_GENERIC_LOOKUP=1)
  reg       the kernel that loads the codes into registers (LOWRANK_SKINNY_TMA=0)
  -r1/-r2   at forced 16 / 32-row tiles (LOWRANK_SKINNY_ROW_TILES); without: the tile-height rule
  nopdl     the bulk-copy kernel launched without programmatic dependent launch (LOWRANK_SKINNY_PDL=0)
  nosplit   the bulk-copy kernel with its last round of 32-row tiles kept whole (LOWRANK_SKINNY_SPLIT_LAST=0)
  noearly   the bulk-copy kernel reading its weight only after the wait in a chain of calls (LOWRANK_SKINNY_EARLY=0)
Prints one table (median us of the rounds' medians) and the largest relative difference from the
register kernel's output (tma and generic: bit-identical to each other; against reg, the k order
of the partial sums differs).

    PYTHONPATH=$PWD python3 scripts/ab_skinny.py [--shapes 28672x8192,14336x4096] [--ms 1,16]
        [--variants tma,nopdl,reg]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import harness  # noqa: E402

import lowrank  # noqa: E402

VARIANTS = {
    "tma": {},
    "generic": {"LOWRANK_SKINNY_GENERIC_LOOKUP": "1"},
    "tma-r1": {"LOWRANK_SKINNY_ROW_TILES": "1"},
    "tma-r2": {"LOWRANK_SKINNY_ROW_TILES": "2"},
    "reg": {"LOWRANK_SKINNY_TMA": "0"},
    "reg-r1": {"LOWRANK_SKINNY_TMA": "0", "LOWRANK_SKINNY_ROW_TILES": "1"},
    "nopdl": {"LOWRANK_SKINNY_PDL": "0"},
    "nosplit": {"LOWRANK_SKINNY_SPLIT_LAST": "0"},
    "noearly": {"LOWRANK_SKINNY_EARLY": "0"},
}
REFERENCE = "reg"


def with_env(env, fn):
    def run(*args):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="28672x8192,14336x4096,4096x14336,4096x4096")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; reg is always run")
    args = ap.parse_args()
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    chosen.setdefault(REFERENCE, VARIANTS[REFERENCE])
    copy = harness.copy_ceiling_gbs()
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qs = [lowrank.quantize_4bit(w) for _ in range(harness.copies_for(n * k // 2))]
        q_bytes = n * k / 2 + qs[0].absmax.numel()
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            outs = {name: with_env(env, lambda q: lowrank.matmul_4bit(x, q, path="skinny"))(qs[0])
                    for name, env in chosen.items()}
            ref = outs[REFERENCE].float()
            diff = max(((outs[v].float() - ref).norm() / ref.norm()).item() for v in outs)
            if "tma" in outs and "generic" in outs:
                assert torch.equal(outs["tma"], outs["generic"]), "the two lookup forms must agree bit for bit"
            times = {name: [] for name in chosen}
            for _ in range(args.rounds):
                for name, env in chosen.items():
                    fn = with_env(env, lambda q: lowrank.matmul_4bit(x, q, path="skinny"))
                    times[name].append(harness.time_cuda_graph(fn, [(q,) for q in qs])["median_ms"] * 1e3)
            med = {name: statistics.median(v) for name, v in times.items()}
            rows.append((shape, m, med, diff, q_bytes))
    print(f"{'shape':>12} {'M':>3} " + " ".join(f"{v:>9}" for v in chosen) + "   best GB/s  rel.diff vs reg")
    for shape, m, med, diff, q_bytes in rows:
        best = min(med.values())
        print(f"{shape:>12} {m:>3} " + " ".join(f"{med[v]:9.1f}" for v in chosen)
              + f"   {q_bytes / best / 1e3:9.0f}  {diff:.1e}")


if __name__ == "__main__":
    main()
