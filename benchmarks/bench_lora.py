"""LoRA / DoRA layer and model-step benchmarks (issues 4 and 5), beside PEFT (+ bitsandbytes), one run.

Layer: M = 8192 tokens of bf16 x through one projection (14336x4096 and 4096x4096, no bias),
r = 16, alpha = 32, forward + backward (dX, and the adapter's gradients), dY given. Time: median
of CUDA-event timed calls; memory: the peak allocated during one forward + backward minus what was
allocated before it (inputs, weights, dY), in MB. Rows:
  bf16-frozen        F.linear with a frozen bf16 weight (dX only): the floor
  bf16-frozen-tuned  the same with both GEMMs through lowrank.ops.mm_tuned (the cuBLASLt algorithm
                     lowrank's layers get for the shape): what the algorithm choice alone gives
  lowrank-lora       lowrank.nn.LoraLinear over nn.Linear (bf16)
  lowrank-qlora      lowrank.nn.LoraLinear over lowrank.nn.Linear4bit (NF4, bs 64, double quant)
  lowrank-dora / lowrank-qdora     the same with use_dora=True
  peft-lora / peft-dora            PEFT over nn.Linear (bf16)
  peft-bnb-qlora / peft-bnb-qdora  PEFT over bitsandbytes' Linear4bit
  ...-dropout        (14336x4096) lowrank QLoRA / QDoRA and peft+bnb with lora_dropout = 0.05, in
                     training mode (DoRA under dropout runs the base GEMM of x - x' too, both ways)
Targets (H100): QLoRA 14336x4096 <= 2.75 ms (floor 2.49, peft+bnb 6.01) and <= 420 MB (peft 1410);
QDoRA <= 3.0 ms (peft+bnb 11.09) and <= 450 MB (peft 3112). Judged three ways: by the block median
("meets_target"), by the paired ratio to the floor (``paired_ratios``: floor, QLoRA and QDoRA
calls interleaved round by round) times the 2.49 ms floor the targets were set against
("meets_target_paired": the GPU's clock steps within a block of calls), and by the ratio of the
step's kernel busy time (the union of its kernels' intervals) to the floor's (``kernel_times``,
torch.profiler) times that floor ("meets_target_kernels").

Model step (--model): 4 Llama-3-8B-shaped decoder layers (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocab 32000), batch 4 x 2048, adapters r = 16 on all 7 projections, forward + backward of
the causal-LM loss: tokens/s and peak GB, lowrank QLoRA / QDoRA beside peft+bnb and the frozen
bf16 model (measured, no target yet).

    python benchmarks/bench_lora.py --out benchmarks/results/bench_lora.json
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import lowrank  # noqa: E402
from lowrank.nn import Linear4bit, LoraLinear  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096)]
M = 8192
R, ALPHA = 16, 32
DROPOUT = 0.05  # the -dropout rows (QLoRA's recipes use 0.05-0.1)
TARGETS = {("lowrank-qlora", (14336, 4096)): {"ms": 2.75, "mb": 420},
           ("lowrank-qdora", (14336, 4096)): {"ms": 3.0, "mb": 450}}
# The floor the targets were set against (../shared/anchors/H100_PEERS.md): 2.75 ms = 1.104x it,
# 3.0 ms = 1.205x. The H100's clock steps by ~15% under sustained GEMMs, within one block of calls
# too, so the targets are also judged by the paired ratio (``paired_ratios``) times this floor.
ANCHOR_FLOOR_MS = 2.49
PAIRED = ("bf16-frozen", "bf16-frozen-tuned", "lowrank-qlora", "lowrank-qdora")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def try_import(name):
    try:
        return __import__(name)
    except Exception as e:  # noqa: BLE001
        print(f"{name} not importable ({type(e).__name__}: {e}); its rows are left out")
        return None


class TunedFrozenLinear(nn.Module):
    """A frozen bf16 projection whose GEMMs go through lowrank.ops.mm_tuned (harness.tuned_linear)."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x):
        return harness.tuned_linear(x, self.weight)


class One(nn.Module):
    """One projection, so that PEFT can target it by name."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def randomize_adapters(module, seed=0):
    """B is zero at init; random A and B make the timed work the real one (no zero shortcuts). DoRA's
    magnitude keeps its initialisation (the row norms of W0)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype) * 0.01)


def bnb_linear4bit(bnb, w):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     blocksize=64)
    return layer.cuda()


def bench_layers_ours(names, n=14336, k=4096):
    """(layers, x, dy) for scripts that time bench_lora's layer outside the benchmark: the weight,
    x and dY drawn as bench_layers draws them, and the named lowrank / bf16 setups (no peers)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(M, k, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(M, n, generator=g, device="cuda", dtype=torch.bfloat16)
    setups = layer_setups(w, None, None)
    return {name: setups[name]() for name in names}, x, dy


def layer_setups(w, peft, bnb):
    n, k = w.shape

    def linear():
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        lin.weight.requires_grad_(False)
        return lin

    def ours(base, dora, dropout=0.0):
        layer = LoraLinear(base, r=R, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=dora).train()
        randomize_adapters(layer)
        return layer

    def theirs(base, dora, dropout=0.0):
        model = peft.get_peft_model(One(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                               lora_dropout=dropout, use_dora=dora)).train()
        randomize_adapters(model)
        return model

    def q4():
        return Linear4bit.from_linear(linear(), compute_dtype=torch.bfloat16)

    setups = {"bf16-frozen": linear,
              "bf16-frozen-tuned": lambda: TunedFrozenLinear(w.clone()),
              "lowrank-lora": lambda: ours(linear(), False),
              "lowrank-qlora": lambda: ours(q4(), False),
              "lowrank-dora": lambda: ours(linear(), True),
              "lowrank-qdora": lambda: ours(q4(), True)}
    if peft is not None:
        setups["peft-lora"] = lambda: theirs(linear(), False)
        setups["peft-dora"] = lambda: theirs(linear(), True)
        if bnb is not None:
            setups["peft-bnb-qlora"] = lambda: theirs(bnb_linear4bit(bnb, w), False)
            setups["peft-bnb-qdora"] = lambda: theirs(bnb_linear4bit(bnb, w), True)
    if (n, k) == SHAPES[0]:
        setups["lowrank-qlora-dropout"] = lambda: ours(q4(), False, DROPOUT)
        setups["lowrank-qdora-dropout"] = lambda: ours(q4(), True, DROPOUT)
        if peft is not None and bnb is not None:
            setups["peft-bnb-qlora-dropout"] = lambda: theirs(bnb_linear4bit(bnb, w), False, DROPOUT)
            setups["peft-bnb-qdora-dropout"] = lambda: theirs(bnb_linear4bit(bnb, w), True, DROPOUT)
    return setups


def fwd_bwd_peak_mb(layer, x, dy):
    x.grad = None
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer(x).backward(dy)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _quantiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=10)
    return {"p10": q[0], "median": statistics.median(values), "p90": q[-1]}


def paired_ratios(rounds: int) -> dict:
    """The target rows timed call by call against a floor call of the same round (14336 x 4096): each
    round runs the floor, QLoRA and QDoRA once each, each call timed with CUDA events; per
    implementation the quantiles of its calls' ms and of each call's ratio to the floor call of its
    round. A clock step then moves the floor and the layer together. (Block timing measured the
    floor 2.39 -> 2.76 ms within 30 calls; QLoRA's block median 1.13x in one run and 1.20x in the
    next with the same kernels.) The rounds go through all 6 orders in turn, so that every layer
    follows every other equally often: with the 3 rotations of one order, two QDoRA variants with
    the same kernels (profiler: 184.7 / 185.5 us for the one that differed) came out 1.202x and
    1.192x (scripts/ab_qdora_env.py, H100, three runs), an order bias of ~1%."""
    layers, x, dy = bench_layers_ours(PAIRED)

    def step(layer):
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)

    for layer in layers.values():  # warm-up
        for _ in range(3):
            step(layer)
    torch.cuda.synchronize()
    orders = list(itertools.permutations(PAIRED))
    events = []
    for r in range(rounds):
        row = {}
        for name in orders[r % len(orders)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(layers[name])
            end.record()
            row[name] = (start, end)
        events.append(row)
    torch.cuda.synchronize()
    times = {name: [row[name][0].elapsed_time(row[name][1]) for row in events] for name in PAIRED}
    result = {"rounds": rounds}
    for name in PAIRED:
        result[name] = {"ms": _quantiles(times[name])}
        if name != "bf16-frozen":
            result[name]["ratio"] = _quantiles([a / b for a, b in zip(times[name], times["bf16-frozen"])])
        if name.startswith("lowrank"):  # over the floor with the same GEMM algorithms as the layer's
            result[name]["ratio_to_tuned_floor"] = _quantiles(
                [a / b for a, b in zip(times[name], times["bf16-frozen-tuned"])])
    kernels = kernel_times(layers, step)
    for name in PAIRED:
        result[name]["kernel_us"] = kernels[name]["total_us"]
        result[name]["kernels_sum_us"] = kernels[name]["kernels_sum_us"]
        result[name]["kernels"] = kernels[name]["kernels"]
        if name != "bf16-frozen":
            result[name]["kernel_ratio"] = kernels[name]["total_us"] / kernels["bf16-frozen"]["total_us"]
    del layers, x, dy
    gc.collect()
    torch.cuda.empty_cache()
    return result


def busy_us(intervals) -> float:
    """The length of the union of (start, end) intervals: the time some kernel ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def kernel_times(layers: dict, step, steps: int = 10) -> dict:
    """Per layer: the device time of its kernels per step (torch.profiler, CUDA activity only, over
    ``steps`` back-to-back steps): the time at least one of its kernels ran (``total_us``; with the
    merged weight's backward on two streams kernels overlap, and a sum of their durations would
    count the overlap twice), and the kernels' own durations by name, largest first (these do
    overlap). A view that neither the host nor the order of calls moves (only the clock, and the
    steps of all layers run within a second of each other); the idle time between kernels is left
    out (scripts/ab_qdora_env.py: ~1-4% of a QDoRA step, most of it the first step's launches after
    the synchronize)."""
    out = {}
    for name, layer in layers.items():
        step(layer)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(layer)
            torch.cuda.synchronize()
        per_kernel = {}
        for evt in prof.key_averages():
            if evt.device_time_total > 0:
                per_kernel[evt.key[:100]] = per_kernel.get(evt.key[:100], 0.0) + evt.device_time_total / steps
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            with open(trace) as f:
                intervals = [(e["ts"], e["ts"] + e["dur"]) for e in json.load(f)["traceEvents"]
                             if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
        out[name] = {"total_us": busy_us(intervals) / steps,
                     "kernels_sum_us": sum(per_kernel.values()),
                     "kernels": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))}
    return out


def bench_layers(args, peft, bnb):
    rows = []
    for n, k in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, k, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn(M, n, generator=g, device="cuda", dtype=torch.bfloat16)
        floor_ms = None
        for impl, make in layer_setups(w, peft, bnb).items():
            layer = make()
            fwd_bwd_peak_mb(layer, x, dy)  # warm-up (allocator, cuBLAS handles, caches)
            peak = fwd_bwd_peak_mb(layer, x, dy)

            def step(layer=layer):
                x.grad = None
                for p in layer.parameters():
                    p.grad = None
                layer(x).backward(dy)
            t = harness.time_cuda(step, [()], warmup=3, reps=args.reps)
            floor_ms = t["median_ms"] if impl == "bf16-frozen" else floor_ms
            row = {"shape": [n, k], "m": M, "r": R, "impl": impl, **t, "peak_mb_above_inputs": peak,
                   "vs_bf16_frozen": t["median_ms"] / floor_ms}
            target = TARGETS.get((impl, (n, k)))
            if target:
                row["target"] = target
                row["meets_target"] = t["median_ms"] <= target["ms"] and peak <= target["mb"]
            rows.append(row)
            print(f"layer {n:5d}x{k:<5d} {impl:16s} {t['median_ms']:7.3f} ms ({row['vs_bf16_frozen']:.2f}x floor) "
                  f"{peak:7.0f} MB" + (f"  target {'met' if row['meets_target'] else 'MISSED'} "
                                       f"({target['ms']} ms, {target['mb']} MB)" if target else ""))
            del layer
            gc.collect()
            torch.cuda.empty_cache()
        del w, x, dy
    return rows


def llama_config(transformers):
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                    max_position_embeddings=4096,
                                    attn_implementation="sdpa")


def model_setups(transformers, peft, bnb):
    def base():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(llama_config(transformers)).to(torch.bfloat16)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def ours(dora):
        model = lowrank.quantize_model(base(), compute_dtype=torch.bfloat16)
        return lowrank.add_lora(model, r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS, use_dora=dora)

    def theirs(dora):
        model = base()
        for name, module in list(model.named_modules()):
            if name.split(".")[-1] in PROJECTIONS:
                parent = model.get_submodule(name.rpartition(".")[0])
                setattr(parent, name.rpartition(".")[2], bnb_linear4bit(bnb, module.weight.data))
        model.is_loaded_in_4bit = True
        return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS,
                                                          use_dora=dora))

    setups = {"bf16-frozen": base, "lowrank-qlora": lambda: ours(False), "lowrank-qdora": lambda: ours(True)}
    if peft is not None and bnb is not None:
        setups["peft-bnb-qlora"] = lambda: theirs(False)
        setups["peft-bnb-qdora"] = lambda: theirs(True)
    return setups


def bench_model(args, transformers, peft, bnb):
    rows = []
    batch, seq = 4, 2048
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    for impl, make in model_setups(transformers, peft, bnb).items():
        model = make()
        randomize_adapters(model)
        frozen = not any(p.requires_grad for p in model.parameters())
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(frozen)

        def step():
            model.zero_grad(set_to_none=True)
            out = model(inputs_embeds=embeds, labels=ids)  # frozen: the loss still backpropagates to embeds
            out.loss.backward()
        step()
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
        t0 = time.perf_counter()
        t = harness.time_cuda(lambda: step(), [()], warmup=1, reps=args.model_reps)
        tokens_per_s = batch * seq / (t["median_ms"] * 1e-3)
        rows.append({"impl": impl, **t, "tokens_per_s": tokens_per_s, "peak_gb": peak_gb,
                     "wall_s": time.perf_counter() - t0})
        print(f"model step {impl:16s} {t['median_ms']:8.1f} ms  {tokens_per_s:9.0f} tokens/s  peak {peak_gb:6.2f} GB")
        del model, embeds
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_lora.json")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model-reps", type=int, default=5)
    ap.add_argument("--no-model", action="store_true", help="layer benchmark only")
    ap.add_argument("--paired-rounds", type=int, default=60)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora.py needs a CUDA device")
    peft, bnb = try_import("peft"), try_import("bitsandbytes")
    env = harness.environment()
    print(f"{env['gpu']}  torch {env['torch']}")
    payload = {"benchmark": "lora", "env": env, "targets": {f"{k[0]} {k[1][0]}x{k[1][1]}": v for k, v in TARGETS.items()},
               "anchor_floor_ms": ANCHOR_FLOOR_MS, "rows": bench_layers(args, peft, bnb)}
    if args.paired_rounds > 0:
        paired = payload["paired"] = paired_ratios(args.paired_rounds)
        for row in payload["rows"]:
            if "target" in row and row["impl"] in paired:
                ratio = paired[row["impl"]]["ratio"]["median"]
                row["paired_ratio"] = ratio
                row["meets_target_paired"] = ratio * ANCHOR_FLOOR_MS <= row["target"]["ms"] and \
                    row["peak_mb_above_inputs"] <= row["target"]["mb"]
                kernel_ratio = paired[row["impl"]]["kernel_ratio"]
                row["kernel_ratio"] = kernel_ratio
                row["meets_target_kernels"] = kernel_ratio * ANCHOR_FLOOR_MS <= row["target"]["ms"] and \
                    row["peak_mb_above_inputs"] <= row["target"]["mb"]
                print(f"paired {row['impl']:14s} {ratio:.3f}x the floor (p10 {paired[row['impl']]['ratio']['p10']:.3f}, "
                      f"p90 {paired[row['impl']]['ratio']['p90']:.3f}, {args.paired_rounds} rounds) = "
                      f"{ratio * ANCHOR_FLOOR_MS:.3f} ms at the anchor's {ANCHOR_FLOOR_MS} ms floor: target "
                      f"{'met' if row['meets_target_paired'] else 'MISSED'} ({row['target']['ms']} ms)")
                print(f"  ({paired[row['impl']]['ratio_to_tuned_floor']['median']:.3f}x the floor whose GEMMs take "
                      f"the same algorithms (bf16-frozen-tuned, itself "
                      f"{paired['bf16-frozen-tuned']['ratio']['median']:.3f}x the floor))")
                print(f"kernels {row['impl']:13s} {paired[row['impl']]['kernel_us']:.1f} us busy per step against the "
                      f"floor's {paired['bf16-frozen']['kernel_us']:.1f}: {kernel_ratio:.3f}x = "
                      f"{kernel_ratio * ANCHOR_FLOOR_MS:.3f} ms at the anchor floor: target "
                      f"{'met' if row['meets_target_kernels'] else 'MISSED'}")
    harness.write_json(args.out, payload)  # the layer rows survive a failure in the model step
    transformers = None if args.no_model else try_import("transformers")
    if transformers is not None:
        try:
            payload["model_rows"] = bench_model(args, transformers, peft, bnb)
        except Exception as e:  # noqa: BLE001  (recorded, not hidden)
            payload["model_error"] = f"{type(e).__name__}: {e}"
            print("model step failed:", payload["model_error"])
    harness.write_results(args.out, payload, plot)


def plot(payload, path):
    plt = harness.pyplot()
    if plt is None:
        return
    shapes = [tuple(s) for s in dict.fromkeys(tuple(r["shape"]) for r in payload["rows"])]
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for col, s in enumerate(shapes):
        pts = [r for r in payload["rows"] if tuple(r["shape"]) == s]
        names = [r["impl"] for r in pts]
        colors = ["tab:blue" if n.startswith("lowrank") else "tab:gray" if n.startswith("bf16") else "tab:orange"
                  for n in names]
        for row_i, (key, label) in enumerate([("median_ms", "ms, forward + backward"),
                                              ("peak_mb_above_inputs", "peak MB above inputs")]):
            ax = axes[row_i][col]
            ax.barh(names, [r[key] for r in pts], color=colors)
            ax.set_xlabel(label)
            ax.set_title(f"{s[0]}x{s[1]}, M={M}, r={R}", fontsize=9)
            for r in pts:
                if "target" in r:
                    ax.axvline(r["target"]["ms" if key == "median_ms" else "mb"], color="r", ls=":", lw=1)
    env = payload["env"]
    fig.suptitle(f"LoRA/DoRA layer | {env['gpu']} | torch {env['torch']} | commit {str(env['commit'])[:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
