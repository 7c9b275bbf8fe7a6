"""python -m lowrank: the command line.

    python -m lowrank demo                         # QLoRA fine-tuning of a small Llama vs float LoRA (lowrank/demo.py)
    python -m lowrank demo --dora --device cuda    # QDoRA vs DoRA on a GPU
    python -m lowrank report                       # quantize a weight: error, bytes, speed (4096 x 4096 bf16, NF4, CPU)
    python -m lowrank report --device cuda --shape 28672 8192 --quant-type fp4
"""
from __future__ import annotations

import argparse
import time

import torch

import lowrank
from lowrank import demo


def _time(fn, device, reps):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps, out


def report(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(*args.shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
    n = w.numel()
    t_q, q = _time(lambda: lowrank.quantize_4bit(w, args.quant_type, args.blocksize, not args.no_double_quant),
                   device, args.reps)
    t_d, d = _time(lambda: q.dequantize(), device, args.reps)
    err = ((d.float() - w.float()).norm() / w.float().norm()).item()
    gb = (n * w.element_size() + n / 2) / 1e9
    print(f"weight      {list(w.shape)} {args.dtype} on {device} ({n * w.element_size() / 2**20:.1f} MiB)")
    print(f"quantized   {q.quant_type}, blocksize {q.blocksize}, double quant {q.double_quant}: "
          f"{q.nbytes / 2**20:.2f} MiB = {8 * q.nbytes / n:.3f} bits/weight")
    print(f"error       relative Frobenius {err:.4f} (bitsandbytes NF4 on randn: 0.0920)")
    print(f"quantize    {t_q * 1e3:8.3f} ms  {gb / t_q:8.1f} GB/s (input + 4-bit output)")
    print(f"dequantize  {t_d * 1e3:8.3f} ms  {gb / t_d:8.1f} GB/s (4-bit input + output)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lowrank", description="lowrank command line")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fine-tune a small Llama with QLoRA/QDoRA (NF4) next to float LoRA/DoRA",
                       description="Build a small Llama (random init, no download), quantize it to NF4, add "
                                   "LoRA (or DoRA), fine-tune it on a built-in Markov-chain task and print loss, "
                                   "tokens/s, peak memory and adapter size next to the same run with a float base.")
    demo.add_arguments(d)
    r = sub.add_parser("report", help="quantize a model-sized weight: error, bytes, speed")
    r.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"))
    r.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    r.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    r.add_argument("--blocksize", type=int, default=64)
    r.add_argument("--no-double-quant", action="store_true")
    r.add_argument("--device", default="cpu")
    r.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.command == "demo":
        demo.check_arguments(d, args)
        result = demo.run_demo(args)
        demo.print_summary(result)
        return result
    if args.command == "report":
        report(args)


if __name__ == "__main__":
    main()
