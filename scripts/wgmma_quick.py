"""Quick look at the wgmma matmul path (one GPU call): its error against fp32 and the dequantize
path, and graph-timed device time beside bf16 F.linear and the dequantize path, per shape and M;
--variants adds the kernel under env settings (a forced CTA tile, the per-thread stage release).

    python scripts/wgmma_quick.py [--shapes 28672x8192,...] [--ms 17,128,2048]
"""
import argparse
import os
import sys
import pathlib

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402

import lowrank  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="28672x8192,14336x4096,4096x14336,4096x4096")
    ap.add_argument("--ms", default="17,64,128,256,512,2048,8192")
    ap.add_argument("--variants", default="",
                    help="also time the kernel under these env settings (read at each launch), comma-separated, "
                         "several at once joined by +: LOWRANK_WGMMA_TILE=128x128+LOWRANK_WGMMA_KERNEL=ss")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qs = [lowrank.quantize_4bit(w) for _ in range(harness.copies_for(n * k // 2))]
        ws = [w] + [w.clone() for _ in range(harness.copies_for(2 * n * k) - 1)]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ qs[0].dequantize(torch.float32).t()
            yw = lowrank.matmul_4bit(x, qs[0], path="wgmma")
            yd = lowrank.matmul_4bit(x, qs[0], path="dequantize")
            torch.cuda.synchronize()
            ew = ((yw.float() - ref).norm() / ref.norm()).item()
            ed = ((yd.float() - ref).norm() / ref.norm()).item()
            times = {}
            for name, fn, inputs in (("bf16", lambda ww: F.linear(x, ww), [(wi,) for wi in ws]),
                                     ("wgmma", lambda q: lowrank.matmul_4bit(x, q, path="wgmma"), [(q,) for q in qs]),
                                     ("dequant", lambda q: lowrank.matmul_4bit(x, q, path="dequantize"),
                                      [(q,) for q in qs])):
                t = harness.time_cuda_graph(fn, inputs) if m <= 512 else harness.time_cuda(fn, inputs, reps=30)
                times[name] = t["median_ms"] * 1e3
            forced = []
            for variant in filter(None, args.variants.split(",")):
                settings = dict(item.split("=") for item in variant.split("+"))
                os.environ.update(settings)  # read at each launch (at capture for the graph)
                try:
                    fn = lambda q: lowrank.matmul_4bit(x, q, path="wgmma")  # noqa: E731
                    inputs = [(q,) for q in qs]
                    yv = fn(qs[0]).float()
                    ev = ((yv - ref).norm() / ref.norm()).item()
                    t = harness.time_cuda_graph(fn, inputs) if m <= 512 else harness.time_cuda(fn, inputs, reps=30)
                except RuntimeError as error:  # a setting this shape cannot take
                    t = {"median_ms": float("nan")}
                    ev = float("nan")
                    print(f"  {variant}: {str(error).splitlines()[0]}")
                finally:
                    for key in settings:
                        del os.environ[key]
                forced.append(f"{variant.replace('LOWRANK_WGMMA_', '')} {t['median_ms'] * 1e3:7.1f} (err {ev:.2e})")
            tf = 2 * m * n * k / (times["wgmma"] * 1e-6) / 1e12
            print(f"{n:6d}x{k:<6d} M={m:<5d} bf16 {times['bf16']:8.1f}  wgmma {times['wgmma']:8.1f} "
                  f"({times['wgmma'] / times['bf16']:5.2f}x bf16, {tf:5.0f} TFLOP/s)  dequant {times['dequant']:8.1f} "
                  f"| err wgmma {ew:.2e} dequant {ed:.2e}" + (" | " + "  ".join(forced) if forced else ""), flush=True)
            del x, ref, yw, yd
        del w, ws, qs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
