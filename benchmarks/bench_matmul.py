"""4-bit matmul (x @ W^T) on Llama weight shapes, beside bf16 F.linear and bitsandbytes, one run.

For each weight N x K and each M it times the forward (and for M >= 2048 forward + backward, dX
only: the weight is frozen; for M <= 128 also the backward's dX = dY @ W alone, pass "backward dX":
bf16 dY @ W, lowrank.ops.matmul_4bit_grad_x by its rule, i.e. the skinny grad kernel at M <= 16 and
the wgmma grad kernel above, and forced through dequantize + cuBLAS) of
  bf16            F.linear on a bf16 weight (the floor the 4-bit path is measured against)
  bf16-tuned      M >= 2048: the same bf16 GEMMs through lowrank.ops.mm_tuned, the cuBLASLt
                  algorithm timed fastest for the shape, which lowrank's dequantize path uses too:
                  lowrank / bf16-tuned is the ratio without the algorithm choice
  lowrank         lowrank.matmul_4bit, dispatch rule "auto"
  lowrank-dequantize   the same, forced through dequantize + cuBLAS (M <= 16: what the fused
                  kernel saves)
  lowrank-no-early     M <= 16: the same with LOWRANK_SKINNY_EARLY=0. In the captured graph the
                  calls run back to back, and on Hopper each call after the first copies its
                  weight while the previous call's last CTAs finish (csrc/gemm/capture_chain.h);
                  this row is the time without that overlap
  bitsandbytes    bitsandbytes.matmul_4bit over the same weight quantized by bitsandbytes
with NF4, blocksize 64, double quantization, bf16 x; every impl's weights rotate through enough
copies that the 50 MB L2 cannot serve them. Targets (issue 3, H100): M=1 28672x8192 <= 50 us and
14336x4096 <= 16 us; M=16 >= 3x faster than bf16 on 28672x8192 and 14336x4096; M=128 <= 0.7x bf16
on 28672x8192; M >= 2048 forward and forward+backward <= 1.03x bf16.

Times: forward passes at M <= 128 are device time per call from a captured CUDA graph ("timing":
"graph"; the eager time, host overhead included, is beside it as eager_us); larger M, where the
device time dwarfs the host's, and forward+backward passes are eager, in interleaved rounds: every
round times each impl once (reps / rounds calls), the order rotating by one per round, and a row's
time is the median of its round medians and its vs_bf16 the median of its per-round ratios to
bf16 (the GPU's clock drifts by several percent over a block of heavy calls: timed one impl after
another, two names for the same kernel came out 1729 and 1550 us at 28672 x 8192, M = 2048). GB/s counts the bytes a perfect kernel moves (4-bit codes + absmax codes + x + y; bf16: weight +
x + y); TFLOP/s is 2 M N K per forward (x2 with the backward's dX). Ceilings measured in the same
run: the copy bandwidth and a large bf16 cuBLAS GEMM.

    python benchmarks/bench_matmul.py --out benchmarks/results/bench_matmul.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import lowrank  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
MS = [1, 16, 128, 2048, 8192]
BACKWARD_FROM_M = 2048
GRAD_X_ALONE_UP_TO_M = 128


def targets_for(n, k, m):
    """(kind, value) of the issue's target for this point, or None. kind: 'us' = absolute time,
    'ratio' = lowrank / bf16 time at most value."""
    if m == 1 and (n, k) == (28672, 8192):
        return ("us", 50.0)
    if m == 1 and (n, k) == (14336, 4096):
        return ("us", 16.0)
    if m == 16 and (n, k) in ((28672, 8192), (14336, 4096)):
        return ("ratio", 1 / 3)
    if m == 128 and (n, k) == (28672, 8192):
        return ("ratio", 0.7)
    if m >= 2048:
        return ("ratio", 1.03)
    return None


def load_bnb():
    try:
        import bitsandbytes as bnb  # benchmark-only peer; the library never imports it
        return bnb
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes not importable ({type(e).__name__}: {e}); peer column left empty")
        return None


def gemm_ceiling_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = harness.time_cuda(lambda: a @ b, [()], warmup=3, reps=20)["median_ms"]
    return 2 * 8192**3 / (t * 1e-3) / 1e12


def _forced_row_tiles(tiles, x, q):
    os.environ["LOWRANK_SKINNY_ROW_TILES"] = str(tiles)  # read by the launcher at each launch
    try:
        return lowrank.matmul_4bit(x, q, path="skinny")
    finally:
        os.environ.pop("LOWRANK_SKINNY_ROW_TILES", None)


def _without_early_weights(x, q):
    os.environ["LOWRANK_SKINNY_EARLY"] = "0"  # read by the launcher at each launch (and capture)
    try:
        return lowrank.matmul_4bit(x, q)
    finally:
        os.environ.pop("LOWRANK_SKINNY_EARLY", None)


def fwd_bwd(fn, x, gy):
    def run(*a):
        x.grad = None
        fn(x, *a).backward(gy)
    return run


def _grad_x(dy, q, path):
    return lowrank.ops.matmul_4bit_grad_x(dy, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                          q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize, q.shape[0],
                                          q.shape[1], path)


def _grad_x_rows(n, k, m, ws, qs, q4_bytes):
    """dX = dY @ W for M <= 128: bf16 dY @ W (cuBLAS), lowrank's rule (the skinny grad kernel at
    M <= 16, the wgmma kernel above on Hopper) and its dequantize path, each from a captured graph
    over the rotated weights."""
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    ref = dy.float() @ qs[0].dequantize(torch.float32)
    err = ((_grad_x(dy, qs[0], "auto").float() - ref).norm() / ref.norm()).item()
    plain_err = ((dy @ qs[0].dequantize(torch.bfloat16)).float() - ref).norm().item() / ref.norm().item()
    impls = {"bf16": (lambda ww: dy @ ww, [(wi,) for wi in ws], 2 * n * k),
             "lowrank": (lambda q: _grad_x(dy, q, "auto"), [(q,) for q in qs], q4_bytes),
             "lowrank-dequantize": (lambda q: _grad_x(dy, q, "dequantize"), [(q,) for q in qs], q4_bytes)}
    out = []
    io_bytes = 2 * (m * k + m * n)
    for impl, (fn, inputs, weight_bytes) in impls.items():
        t = harness.time_cuda_graph(fn, inputs)
        sec = t["median_ms"] * 1e-3
        out.append({"shape": [n, k], "m": m, "pass": "backward dX", "impl": impl, **t, "timing": "graph",
                    "us": t["median_ms"] * 1e3, "gbs": (weight_bytes + io_bytes) / sec / 1e9,
                    "tflops": 2 * m * n * k / sec / 1e12})
    for row in out:
        row["vs_bf16"] = row["median_ms"] / out[0]["median_ms"]
        if row["impl"] == "lowrank":
            row["rel_error"], row["bf16_linear_rel_error"] = err, plain_err
        print(f"{n:6d}x{k:<6d} M={m:<5d} {'backward dX':16s} {row['impl']:18s} {row['us']:10.1f} us (graph) "
              f"{row['vs_bf16']:6.2f}x bf16 {row['gbs']:7.0f} GB/s")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_matmul.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the eager-timed rows")
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096,28672x8192")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep-row-tiles", action="store_true",
                    help="also time the skinny kernel at each forced tile height (LOWRANK_SKINNY_ROW_TILES)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_matmul.py needs a CUDA device")
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    bnb = load_bnb()
    env = harness.environment()
    copy_gbs, gemm_tflops = harness.copy_ceiling_gbs(), gemm_ceiling_tflops()
    print(f"{env['gpu']}  torch {env['torch']}  copy {copy_gbs:.0f} GB/s  bf16 GEMM {gemm_tflops:.0f} TFLOP/s")
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qs = [lowrank.quantize_4bit(w) for _ in range(harness.copies_for(n * k // 2))]
        ws = [w] + [w.clone() for _ in range(harness.copies_for(2 * n * k) - 1)]
        bnb_ws = []
        if bnb is not None:
            for _ in range(len(qs)):
                packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                bnb_ws.append((packed, state))
        q4_bytes = n * k / 2 + qs[0].absmax.numel()
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            io_bytes = 2 * (m * k + m * n)
            flops = 2 * m * n * k
            # correctness of what is timed: lowrank's error against fp32 on the dequantized weight,
            # beside bf16 F.linear's on the same weight
            w_hat = qs[0].dequantize(torch.float32)
            ref = x.float() @ w_hat.t()
            err = ((lowrank.matmul_4bit(x, qs[0]).float() - ref).norm() / ref.norm()).item()
            wgmma_err = None
            if m > 16:
                wgmma_err = ((lowrank.matmul_4bit(x, qs[0], path="wgmma").float() - ref).norm() / ref.norm()).item()
            plain_err = ((F.linear(x, w_hat.bfloat16()).float() - ref).norm() / ref.norm()).item()
            del w_hat, ref
            passes = [("forward", False)] + ([("forward+backward", True)] if m >= BACKWARD_FROM_M else [])
            for pass_name, backward in passes:
                gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) if backward else None
                xg = x.clone().requires_grad_() if backward else x
                impls = {
                    "bf16": (lambda xx, ww: F.linear(xx, ww), [(wi,) for wi in ws], 2 * n * k),
                    "lowrank": (lambda xx, q: lowrank.matmul_4bit(xx, q), [(q,) for q in qs], q4_bytes),
                }
                if m >= 2048:  # the bf16 GEMM with the algorithm choice lowrank's dequantize path gets
                    impls["bf16-tuned"] = (harness.tuned_linear, [(wi,) for wi in ws], 2 * n * k)
                if m > 16:  # the fused GEMM forced (the backward's dY @ W dequantizes either way)
                    impls["lowrank-wgmma"] = (lambda xx, q: lowrank.matmul_4bit(xx, q, path="wgmma"),
                                              [(q,) for q in qs], q4_bytes)
                impls["lowrank-dequantize"] = (lambda xx, q: lowrank.matmul_4bit(xx, q, path="dequantize"),
                                               [(q,) for q in qs], q4_bytes)
                if m <= 16:  # the graph's back-to-back calls without the early weight reads
                    impls["lowrank-no-early"] = (_without_early_weights, [(q,) for q in qs], q4_bytes)
                if m <= 16 and args.sweep_row_tiles:
                    for tiles in (1, 2, 4):
                        impls[f"skinny-rows{16 * tiles}"] = (
                            lambda xx, q, tiles=tiles: _forced_row_tiles(tiles, xx, q), [(q,) for q in qs], q4_bytes)
                if bnb is not None:
                    impls["bitsandbytes"] = (lambda xx, p, s: bnb.matmul_4bit(xx, p.t(), quant_state=s),
                                             bnb_ws, q4_bytes)
                runs = {impl: (fwd_bwd(fn, xg, gy) if backward else (lambda *a, fn=fn: fn(x, *a)))
                        for impl, (fn, _, _) in impls.items()}
                interleaved = backward or m > 128
                round_ms = {impl: [] for impl in impls}
                if interleaved:
                    names = list(impls)
                    per_round = max(5, args.reps // args.rounds)
                    for r in range(args.rounds):
                        for impl in names[r % len(names):] + names[:r % len(names)]:
                            t_r = harness.time_cuda(runs[impl], impls[impl][1], warmup=2, reps=per_round)
                            round_ms[impl].append(t_r)
                for impl, (fn, inputs, weight_bytes) in impls.items():
                    run = runs[impl]
                    if interleaved:
                        ts = round_ms[impl]
                        eager = {"median_ms": statistics.median(t_r["median_ms"] for t_r in ts),
                                 "min_ms": min(t_r["min_ms"] for t_r in ts), "reps": sum(t_r["reps"] for t_r in ts),
                                 "rounds": len(ts)}
                    else:
                        eager = harness.time_cuda(run, inputs, warmup=3, reps=args.reps)
                    t, timing = eager, ("eager-interleaved" if interleaved else "eager")
                    if not backward and m <= 128:  # device time from a captured graph; eager beside it
                        try:
                            t, timing = harness.time_cuda_graph(run, inputs), "graph"
                        except Exception as e:  # noqa: BLE001
                            print(f"  {impl}: graph capture failed ({type(e).__name__}: {e}); eager time only")
                    sec = t["median_ms"] * 1e-3
                    mult = 2 if backward else 1
                    row = {"shape": [n, k], "m": m, "pass": pass_name, "impl": impl, **t, "timing": timing,
                           "us": t["median_ms"] * 1e3, "eager_us": eager["median_ms"] * 1e3,
                           "gbs": mult * (weight_bytes + io_bytes) / sec / 1e9,
                           "tflops": mult * flops / sec / 1e12}
                    rows.append(row)
                for row in rows[-len(impls):]:
                    base = next(r for r in rows[-len(impls):] if r["impl"] == "bf16")
                    if round_ms[row["impl"]]:  # paired: the ratio within each round, then the median
                        row["vs_bf16"] = statistics.median(
                            a["median_ms"] / b["median_ms"] for a, b in zip(round_ms[row["impl"]], round_ms["bf16"]))
                    else:
                        row["vs_bf16"] = row["median_ms"] / base["median_ms"]
                    if round_ms.get("bf16-tuned") and row["impl"] != "bf16-tuned":
                        row["vs_bf16_tuned"] = statistics.median(
                            a["median_ms"] / b["median_ms"]
                            for a, b in zip(round_ms[row["impl"]], round_ms["bf16-tuned"]))
                    if row["impl"] == "lowrank-wgmma":
                        row["rel_error"], row["bf16_linear_rel_error"] = wgmma_err, plain_err
                    if row["impl"] == "lowrank":
                        row["rel_error"], row["bf16_linear_rel_error"] = err, plain_err
                        target = targets_for(n, k, m)
                        if target is not None:
                            kind, value = target
                            row["target"] = {"kind": kind, "value": value}
                            row["meets_target"] = (row["us"] <= value) if kind == "us" else (row["vs_bf16"] <= value)
                    print(f"{n:6d}x{k:<6d} M={m:<5d} {pass_name:16s} {row['impl']:18s} {row['us']:10.1f} us "
                          f"({row['timing']}; eager {row['eager_us']:.1f}) "
                          f"{row['vs_bf16']:6.2f}x bf16 {row['gbs']:7.0f} GB/s {row['tflops']:6.1f} TFLOP/s"
                          + (f" ({row['vs_bf16_tuned']:.3f}x bf16-tuned)" if "vs_bf16_tuned" in row else "")
                          + (f"  target {'met' if row['meets_target'] else 'MISSED'}" if "meets_target" in row else ""))
            if m <= GRAD_X_ALONE_UP_TO_M:  # the backward's dX = dY @ W alone (graph-timed): its fused kernels
                rows.extend(_grad_x_rows(n, k, m, ws, qs, q4_bytes))
            del x
        del w, ws, qs, bnb_ws
        torch.cuda.empty_cache()
    payload = {"benchmark": "matmul", "env": env, "copy_ceiling_gbs": copy_gbs, "gemm_ceiling_tflops": gemm_tflops,
               "rows": rows}
    harness.write_results(args.out, payload, plot)


def plot(payload, path):
    plt = harness.pyplot()
    if plt is None:
        return
    shapes = [tuple(s) for s in dict.fromkeys(tuple(r["shape"]) for r in payload["rows"])]
    impls = list(dict.fromkeys(r["impl"] for r in payload["rows"]))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}  # one colour per impl in every panel
    passes = ["forward", "forward+backward", "backward dX"]
    fig, axes = plt.subplots(len(passes), len(shapes), figsize=(4.2 * len(shapes), 12), squeeze=False)
    for col, s in enumerate(shapes):
        for row_i, pass_name in enumerate(passes):
            ax = axes[row_i][col]
            pts = [r for r in payload["rows"] if tuple(r["shape"]) == s and r["pass"] == pass_name]
            for impl in dict.fromkeys(r["impl"] for r in pts):
                xs = [r["m"] for r in pts if r["impl"] == impl]
                ys = [r["vs_bf16"] for r in pts if r["impl"] == impl]
                ax.plot(xs, ys, marker="o", label=impl, color=colors[impl])
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{s[0]}x{s[1]} {pass_name}", fontsize=9)
            ax.set_xlabel("M (rows of x)")
            ax.set_ylabel("time / bf16 time (F.linear; dY @ W)")
            if pts:
                ax.legend(fontsize=7)
    env = payload["env"]
    fig.suptitle(f"NF4 bs64 double quant, bf16 x | {env['gpu']} | torch {env['torch']} | commit "
                 f"{str(env['commit'])[:10]} | copy {payload['copy_ceiling_gbs']:.0f} GB/s, bf16 GEMM "
                 f"{payload['gemm_ceiling_tflops']:.0f} TFLOP/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
