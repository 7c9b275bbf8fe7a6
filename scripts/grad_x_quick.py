"""Quick look at the backward's dX = dY @ W (one GPU call): lowrank.ops.matmul_4bit_grad_x by path
('wgmma', 'dequantize', and 'auto') beside bf16 dY @ W, graph-timed device time per shape and M,
with the wgmma path's error against fp32 next to the dequantize path's.

    python scripts/grad_x_quick.py [--shapes 28672x8192,...] [--ms 17,128,256]
"""
import argparse
import sys
import pathlib

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402

import lowrank  # noqa: E402
from lowrank import ops  # noqa: E402


def grad_x(dy, q, path):
    return ops.matmul_4bit_grad_x(dy, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_quant_map,
                                  q.nested_offset, q.quant_map, q.blocksize, q.nested_blocksize, q.shape[0],
                                  q.shape[1], path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="28672x8192,14336x4096,4096x14336,4096x4096")
    ap.add_argument("--ms", default="17,64,128,256,512,1024")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qs = [lowrank.quantize_4bit(w) for _ in range(harness.copies_for(n * k // 2))]
        ws = [w] + [w.clone() for _ in range(harness.copies_for(2 * n * k) - 1)]
        for m in (int(v) for v in args.ms.split(",")):
            dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            ref = dy.float() @ qs[0].dequantize(torch.float32)
            err = {p: ((grad_x(dy, qs[0], p).float() - ref).norm() / ref.norm()).item() for p in ("wgmma", "dequantize")}
            times = {"bf16": harness.time_cuda_graph(lambda ww: dy @ ww, [(wi,) for wi in ws])["median_ms"] * 1e3}
            for path in ("wgmma", "dequantize", "auto"):
                t = harness.time_cuda_graph(lambda q: grad_x(dy, q, path), [(q,) for q in qs])  # noqa: B023
                times[path] = t["median_ms"] * 1e3
            tf = 2 * m * n * k / (times["wgmma"] * 1e-6) / 1e12
            print(f"{n:6d}x{k:<6d} M={m:<5d} bf16 dY@W {times['bf16']:8.1f}  wgmma {times['wgmma']:8.1f} "
                  f"({times['wgmma'] / times['bf16']:5.2f}x bf16, {tf:4.0f} TFLOP/s)  dequantize {times['dequantize']:8.1f}"
                  f"  auto {times['auto']:8.1f} | err wgmma {err['wgmma']:.2e} dequantize {err['dequantize']:.2e}",
                  flush=True)
            del dy, ref
        del w, ws, qs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
