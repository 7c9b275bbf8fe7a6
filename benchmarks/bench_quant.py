"""Quantize / dequantize throughput on Llama weight shapes, beside plain PyTorch and bitsandbytes.

GB/s counts the bytes a perfect kernel must move: bf16 in + 4-bit out for quantize, the reverse for
dequantize (2.5 bytes per weight; absmax and tables are left out of the count, as in
../shared/anchors/H100_PEERS.md). Targets on an H100 (issue 2): quantize NF4 + double quant
>= 2000 GB/s (bitsandbytes 214), dequantize to bf16 >= 2500 GB/s (bitsandbytes 1419; copy 2938).

    python benchmarks/bench_quant.py --out benchmarks/results/bench_quant.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import lowrank  # noqa: E402
from lowrank import reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
TARGETS = {"quantize": 2000.0, "dequantize": 2500.0}


def torch_quantize(w):
    """Plain PyTorch (the reference's math, run as torch ops on the GPU)."""
    values, thr, cor = lowrank.NF4.tensors(w.device)
    packed, absmax = reference.quantize_4bit(w, thr, cor, 64, False)
    offset = float(reference.absmax_mean(absmax))
    codes, nested = reference.quantize_8bit_blockwise(absmax, lowrank.dynamic_map(w.device), 256, offset)
    return packed, codes, nested


def torch_dequantize(q):
    values = q.quant_map
    absmax = reference.dequantize_8bit_blockwise(q.absmax, q.nested_absmax, q.nested_quant_map, 256, 0.0) \
        + q.nested_offset
    return reference.dequantize_4bit(q.packed, absmax, values, 64, q.numel(), torch.bfloat16)


def load_bnb():
    try:
        import bitsandbytes.functional as F  # benchmark-only peer; the library never imports it
        return F
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes not importable ({type(e).__name__}: {e}); peer column left empty")
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_quant.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--skip-torch", action="store_true", help="skip the slow plain-PyTorch baseline")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_quant.py needs a CUDA device")
    bnb = load_bnb()
    env = harness.environment()
    ceiling = harness.copy_ceiling_gbs()
    print(f"{env['gpu']}  torch {env['torch']}  copy ceiling {ceiling:.0f} GB/s")
    rows = []
    for (n_out, k_in) in SHAPES:
        n = n_out * k_in
        gb = 2.5 * n / 1e9
        copies = harness.copies_for(int(2.5 * n))
        ws = [torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [lowrank.quantize_4bit(w) for w in ws]
        impls = {
            "quantize": {
                "lowrank": (lambda w: lowrank.quantize_4bit(w), [(w,) for w in ws]),
                # the same GPU work without the finiteness check's host sync
                "lowrank-nosync": (lambda w: lowrank.quantize_4bit(w, check_finite=False), [(w,) for w in ws]),
                # the 4-bit kernel alone (no absmax mean, no 8-bit pass): where the time goes
                "lowrank-4bit-kernel": (lambda w: lowrank.ops.quantize_4bit(w, *lowrank.NF4.tensors("cuda")[1:], 64,
                                                                            False), [(w,) for w in ws]),
                "torch": (torch_quantize, [(w,) for w in ws[:1]]),
            },
            "dequantize": {
                "lowrank": (lambda q: q.dequantize(), [(q,) for q in qs]),
                "torch": (torch_dequantize, [(q,) for q in qs[:1]]),
            },
        }
        if bnb is not None:
            bqs = [bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in ws]
            impls["quantize"]["bitsandbytes"] = (
                lambda w: bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                [(w,) for w in ws])
            impls["dequantize"]["bitsandbytes"] = (lambda p, s: bnb.dequantize_4bit(p, s), list(bqs))
        for op, by_impl in impls.items():
            for impl, (fn, inputs) in by_impl.items():
                if impl == "torch" and args.skip_torch:
                    continue
                reps = args.reps if impl != "torch" else 5
                t = harness.time_cuda(fn, inputs, warmup=3, reps=reps)
                gbs = gb / (t["median_ms"] * 1e-3)
                row = {"op": op, "impl": impl, "shape": [n_out, k_in], "gb_moved": gb, **t, "gbs": gbs,
                       "fraction_of_copy": gbs / ceiling}
                if impl.startswith("lowrank"):
                    row["target_gbs"] = TARGETS[op]
                    row["meets_target"] = gbs >= TARGETS[op]
                rows.append(row)
                print(f"{op:10s} {impl:12s} {n_out:6d}x{k_in:<6d} {t['median_ms']:8.3f} ms  {gbs:7.0f} GB/s"
                      f"  ({100 * gbs / ceiling:4.1f}% of copy)")
        del ws, qs
        torch.cuda.empty_cache()
    payload = {"benchmark": "quant", "env": env, "copy_ceiling_gbs": ceiling, "targets_gbs": TARGETS, "rows": rows}
    harness.write_results(args.out, payload, plot)


def plot(payload, path):
    plt = harness.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    impls = ["lowrank", "lowrank-nosync", "lowrank-4bit-kernel", "bitsandbytes", "torch"]
    for ax, op in zip(axes, ["quantize", "dequantize"]):
        shapes = [tuple(s) for s in dict.fromkeys(tuple(r["shape"]) for r in payload["rows"])]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ys = []
            for s in shapes:
                r = [r for r in payload["rows"] if r["op"] == op and r["impl"] == impl and tuple(r["shape"]) == s]
                ys.append(r[0]["gbs"] if r else 0)
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=impl)
        ax.axhline(payload["copy_ceiling_gbs"], color="k", ls="--", lw=1, label="copy ceiling")
        ax.axhline(payload["targets_gbs"][op], color="r", ls=":", lw=1, label="target")
        ax.set_xticks([j + width for j in range(len(shapes))], [f"{a}x{b}" for a, b in shapes])
        ax.set_ylabel("GB/s (bf16 + 4-bit bytes)")
        ax.set_title(f"NF4 {op}, blocksize 64, double quant")
        ax.legend(fontsize=8)
    env = payload["env"]
    fig.suptitle(f"{env['gpu']} | torch {env['torch']} | commit {str(env['commit'])[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
