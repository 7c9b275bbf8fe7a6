"""python -m lowrank demo: QLoRA (or QDoRA) fine-tuning of a small Llama, next to the same run with a float base.

    python -m lowrank demo                         # "small" Llama on the CPU, NF4 + LoRA vs float LoRA
    python -m lowrank demo --dora                  # DoRA instead of LoRA
    python -m lowrank demo --device cuda --size base  # bf16, 76M parameters

What it does, all built in (nothing is downloaded):
  1. builds a Llama-architecture model (transformers' ``LlamaForCausalLM``) from one of the configs in
     ``CONFIGS``, randomly initialised from ``--seed``;
  2. quantizes every projection to NF4 with double quantization (``lowrank.quantize_model``; the
     embeddings, norms and ``lm_head`` stay in the compute dtype) and adds LoRA (or DoRA) adapters to
     the 7 projections of every layer (``lowrank.add_lora``, which freezes everything else);
  3. fine-tunes the adapters with AdamW on sequences from a fixed random first-order Markov chain over
     the vocabulary (``MarkovTask``), whose conditional entropy is the lowest loss any model can reach;
  4. saves the adapter with ``lowrank.save_adapter`` and measures it;
  5. repeats 2-4 with the same weights, adapters initialisation and batches but an unquantized base
     (plain LoRA in the compute dtype: the baseline), unless ``--no-baseline``.

``run_demo(args)`` returns every figure as a dict (tests assert on it); ``print_summary`` prints the
table. The progress bar goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from .adapters import save_adapter
from .nn import Linear4bit, add_lora, quantize_model
from .nn.lora import LoraLinear

# transformers.LlamaConfig keyword arguments, shared by every size; max_position_embeddings bounds --seq-len.
BASE_CONFIG = dict(
    model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False,
    mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=2048,
)
# The sizes: tiny for tests (seconds), small the CPU default (under a minute per run on 2 cores), base
# for a GPU (~76M parameters; small's vocabulary, so its task too is learned in the default 200 steps).
# initializer_range is 1/sqrt(hidden_size) rather than Llama's 0.02: lm_head and the final norm stay
# frozen, and with 0.02 a small random model's logits span too little for any adapter to get near
# the task's floor (measured, small model, 200 steps: loss 6.3 -> 3.5 with 0.02, 6.7 -> 1.4 with 0.0625).
CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, initializer_range=0.125),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, initializer_range=0.0625),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=512, initializer_range=0.036),
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLEAR_FALL = 0.2  # the loss "clearly fell": by at least this fraction of the way from the initial loss to the floor
EVAL_SEQUENCES = 16
_DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# AdamW learning rate per size when --lr is not given. 1e-2 suits the CPU sizes; on the H100 the
# base size (12 layers) at 1e-2 left the bf16 LoRA baseline stuck at the context-free loss with
# seed 0 (5.91 after 200 steps, QLoRA 1.75), while 3e-3 took both to 1.23-1.24 (floor 1.117).
DEFAULT_LR = {"tiny": 1e-2, "small": 1e-2, "base": 3e-3}


def llama_config(size: str) -> dict:
    """The LlamaConfig keyword arguments of a size ("tiny", "small" or "base")."""
    return {**BASE_CONFIG, **CONFIGS[size]}


def _lr(args) -> float:
    """--lr, or the size's default (DEFAULT_LR)."""
    lr = getattr(args, "lr", None)
    return DEFAULT_LR[args.size] if lr is None else lr


def build_model(size: str, seed: int, dtype: torch.dtype = torch.float32, device="cpu"):
    """The randomly initialised Llama of ``size``: the same weights for the same seed, in ``dtype`` on
    ``device``. The token embeddings are drawn with std 1 rather than initializer_range: in a random
    model every layer adds about as much as a unit-scale input to the residual stream, which buries
    small embeddings, and the current token (all this task needs) is lost (measured: with std 0.036
    the 12-layer base model's loss stalled at the context-free best, 5.9, for 100 steps; with std 1
    it fell to 1.5 in 60)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise RuntimeError("python -m lowrank demo needs transformers: pip install transformers") from e
    cfg = {k: v for k, v in llama_config(size).items() if k != "model_type"}
    torch.manual_seed(seed)  # initialised on the CPU in float32, whatever the device: the same model everywhere
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model.to(device=device, dtype=dtype)


def count_parameters(size: str) -> int:
    """The parameter count of the float model of ``size`` (built on the meta device: no memory, no time)."""
    import transformers

    cfg = {k: v for k, v in llama_config(size).items() if k != "model_type"}
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    return sum(p.numel() for p in model.parameters())


class MarkovTask:
    """A fixed random first-order Markov chain over ``vocab_size`` tokens: every token has ``fanout``
    distinct successors with random probabilities. Sequences start in the stationary distribution pi,
    so every position is distributed as pi and the best possible next-token loss is the conditional
    entropy  floor = sum_i pi_i H(P_i)  (nats). ``unigram_entropy`` H(pi) is the best loss of a model
    that ignores the context: a loss below it means the transitions were learned."""

    def __init__(self, vocab_size: int, seed: int, fanout: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.fanout = vocab_size, fanout
        self.successors = torch.rand(vocab_size, vocab_size, generator=g).argsort(dim=1)[:, :fanout]
        self.probs = torch.softmax(torch.randn(vocab_size, fanout, generator=g, dtype=torch.float64), dim=1)
        self.stationary = self._stationary()
        row_entropy = -(self.probs * self.probs.log()).sum(1)
        self.entropy_floor = float(self.stationary @ row_entropy)
        pi = self.stationary[self.stationary > 0]
        self.unigram_entropy = float(-(pi * pi.log()).sum())

    def _stationary(self) -> torch.Tensor:
        # power iteration of the lazy chain (P + I) / 2: same stationary distributions as P, and it
        # converges for periodic chains too. The chain is sparse: one step is a scatter-add.
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        flat = self.successors.reshape(-1)
        for _ in range(100_000):
            step = torch.zeros_like(pi).index_add_(0, flat, (pi[:, None] * self.probs).reshape(-1))
            new = 0.5 * (pi + step)
            if (new - pi).abs().sum() < 1e-13:
                return new / new.sum()
            pi = new
        return pi / pi.sum()

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """int64 [batch, length] token ids (CPU)."""
        x = torch.multinomial(self.stationary, batch, replacement=True, generator=generator)
        out = [x]
        for _ in range(length - 1):
            choice = torch.multinomial(self.probs[x], 1, generator=generator).squeeze(1)
            x = self.successors[x, choice]
            out.append(x)
        return torch.stack(out, dim=1)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats), computed in float32."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, chunk: int = 8) -> float:
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, ids[i:i + chunk]).item() * len(ids[i:i + chunk]) for i in range(0, len(ids), chunk))
    model.train(was_training)
    return total / len(ids)


def eval_batch(task: MarkovTask, seq_len: int, seed: int) -> torch.Tensor:
    """The held-out sequences the initial and final losses are measured on (a generator of their own)."""
    return task.sample(EVAL_SEQUENCES, seq_len, torch.Generator().manual_seed(seed + 1))


class Progress:
    """A one-line progress bar on a terminal (redrawn at most 10 times a second); elsewhere (a log, a
    pipe, pytest) a plain line at every fifth of the run."""

    def __init__(self, total: int, label: str, stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.last_draw, self.next_line = time.perf_counter(), 0.0, 1

    def update(self, step: int, loss: float, tokens_per_s: float):
        now = time.perf_counter()
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        text = f"{step:>{len(str(self.total))}}/{self.total}  loss {loss:6.3f}  {tokens_per_s:8,.0f} tok/s  "
        if self.tty:
            if now - self.last_draw < 0.1 and step < self.total:
                return
            self.last_draw = now
            done = int(self.width * step / self.total)
            bar = "#" * done + "." * (self.width - done)
            tail = f"{elapsed:5.1f}s elapsed, {eta:5.1f}s left" if step < self.total else f"{elapsed:5.1f}s"
            self.stream.write(f"\r{self.label:<22} [{bar}] {text}{tail}\x1b[K")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step == self.total or step >= self.next_line * self.total / 5:
            self.next_line = int(step * 5 / self.total) + 1
            self.stream.write(f"{self.label:<22} {text}{elapsed:5.1f}s\n")
            self.stream.flush()


def _reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak; False where it cannot be reset (then the peak is the process's since start)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the process's peak RSS (VmHWM), which getrusage's ru_maxrss reports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory(device: torch.device, was_reset: bool) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated during training"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    since = "during training" if was_reset else "since the process started (could not be reset)"
    return (kib if sys.platform == "darwin" else kib * 1024), f"peak RSS of the process {since}, torch included"


def _base_bytes(model) -> tuple[int, int]:
    """(bytes of every frozen base weight, bytes of the projections' weights alone)."""
    lora_params = {id(p) for m in model.modules() if isinstance(m, LoraLinear)
                   for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]
                   + ([m.lora_magnitude_vector] if m.use_dora else [])}
    proj = total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            proj += m.quant.nbytes
        elif isinstance(m, LoraLinear) and isinstance(m.base_layer, torch.nn.Linear):
            proj += m.base_layer.weight.numel() * m.base_layer.weight.element_size()
    for p in model.parameters():
        if id(p) not in lora_params:
            total += p.numel() * p.element_size()
    # Linear4bit's packed weight is no Parameter; a float projection's weight is one (already counted)
    total += sum(m.quant.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    return total, proj


def _lr_lambda(steps: int):
    warmup = max(1, steps // 20)

    def f(step):  # linear warm-up over 5% of the steps, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return f


def train_one(args, task: MarkovTask, eval_ids: torch.Tensor, quantized: bool, adapter_dir: str,
              return_model: bool = False) -> dict:
    """One run: build, (quantize,) add adapters, fine-tune, save the adapter. Returns its figures."""
    device, dtype = torch.device(args.device), args.compute_dtype
    method = "DoRA" if args.dora else "LoRA"
    label = f"Q{method} NF4 (lowrank)" if quantized else f"{method} {_DTYPE_SHORT[dtype]} (baseline)"
    model = build_model(args.size, args.seed, dtype, device)
    if quantized:
        quantize_model(model, "nf4", double_quant=True, compute_dtype=dtype)
    torch.manual_seed(args.seed + 3)  # the same adapter initialisation in both runs
    add_lora(model, args.rank, args.alpha, TARGET_MODULES, use_dora=args.dora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    base_bytes, proj_bytes = _base_bytes(model)
    opt = torch.optim.AdamW(params, lr=_lr(args), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps))
    eval_on_device = eval_ids.to(device)
    initial = eval_loss(model, eval_on_device)

    data = torch.Generator().manual_seed(args.seed + 2)  # the same batches in both runs
    tokens_per_step = args.batch_size * args.seq_len
    progress = Progress(args.steps, label)
    losses = []
    was_reset = _reset_peak_memory(device)
    t_start = t_first = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = task.sample(args.batch_size, args.seq_len, data).to(device, non_blocking=True)
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes: the timings below are of finished work
        now = time.perf_counter()
        if step == 1:
            t_first = now  # the first step (allocations, kernel loads) is left out of tokens/s
        timed_steps, timed_s = (step - 1, now - t_first) if step > 1 else (1, now - t_start)
        progress.update(step, losses[-1], timed_steps * tokens_per_step / max(timed_s, 1e-9))
    train_s = time.perf_counter() - t_start
    peak, peak_kind = _peak_memory(device, was_reset)
    timed_steps, timed_s = (args.steps - 1, time.perf_counter() - t_first) if args.steps > 1 else (1, train_s)
    final = eval_loss(model, eval_on_device)

    save_adapter(model, adapter_dir)
    adapter_file = os.path.join(adapter_dir, "adapter_model.safetensors")
    gap = initial - task.entropy_floor
    run = {
        "label": label, "quantized": quantized, "method": method, "initial_loss": initial, "final_loss": final,
        "losses": losses, "tokens_per_s": timed_steps * tokens_per_step / max(timed_s, 1e-9), "train_s": train_s,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "base_bytes": base_bytes, "proj_bytes": proj_bytes,
        "trainable_params": trainable, "adapter_dir": adapter_dir, "adapter_bytes": os.path.getsize(adapter_file),
        "loss_fell": bool(initial - final >= CLEAR_FALL * gap and gap > 0),
    }
    if return_model:
        run["model"] = model
    return run


def run_demo(args, return_models: bool = False) -> dict:
    """Run the demo described by ``args`` (parsed by a parser ``add_arguments`` set up) and return its
    figures: {"runs": [QLoRA run, baseline run], "task": ..., "loss_fell": ...}. ``return_models`` keeps
    each trained model under run["model"]."""
    args = argparse.Namespace(**vars(args))
    device = torch.device(args.device)
    args.compute_dtype = resolve_dtype(args.dtype, device)
    cfg = llama_config(args.size)
    task = MarkovTask(cfg["vocab_size"], args.seed)
    eval_ids = eval_batch(task, args.seq_len, args.seed)
    n_params = count_parameters(args.size)
    result = {
        "size": args.size, "config": cfg, "n_params": n_params, "device": str(device),
        "dtype": str(args.compute_dtype).removeprefix("torch."), "steps": args.steps, "rank": args.rank,
        "alpha": args.alpha, "lr": _lr(args), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "dora": args.dora, "seed": args.seed,
        "task": {"vocab_size": task.vocab_size, "fanout": task.fanout, "entropy_floor": task.entropy_floor,
                 "unigram_entropy": task.unigram_entropy, "uniform_loss": math.log(task.vocab_size)},
        "runs": [],
    }
    print(_header(result), file=sys.stderr, flush=True)
    tmp = None
    if args.output_dir:
        root = args.output_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lowrank-demo-")
        root = tmp.name
    try:
        variants = [True] if args.no_baseline else [True, False]
        for quantized in variants:
            name = ("q" if quantized else "") + ("dora" if args.dora else "lora")
            result["runs"].append(train_one(args, task, eval_ids, quantized, os.path.join(root, name),
                                            return_model=return_models))
            gc.collect()
    finally:
        if tmp is not None:  # the adapters were measured; nothing asked to keep them
            tmp.cleanup()
            for run in result["runs"]:
                run["adapter_dir"] = None
    result["loss_fell"] = all(run["loss_fell"] for run in result["runs"])
    return result


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _header(r: dict) -> str:
    c, t = r["config"], r["task"]
    method = "DoRA" if r["dora"] else "LoRA"
    return (f"model  Llama '{r['size']}': {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads ({c['num_key_value_heads']} KV), MLP {c['intermediate_size']}, "
            f"vocab {c['vocab_size']}: {r['n_params'] / 1e6:.2f}M parameters, random init (seed {r['seed']})\n"
            f"task   next token of a random Markov chain ({t['fanout']} successors per token); loss floor "
            f"{t['entropy_floor']:.3f}, context-free best {t['unigram_entropy']:.3f}, uniform {t['uniform_loss']:.3f}\n"
            f"train  {method} r={r['rank']} alpha={r['alpha']:g} on q,k,v,o,gate,up,down; AdamW lr {r['lr']:g}, "
            f"{r['steps']} steps x {r['batch_size']} x {r['seq_len']} tokens; {r['dtype']} on {r['device']}")


def format_summary(r: dict) -> str:
    head = ["", "initial loss", "final loss", "tokens/s", "peak memory", "base weights", "adapter"]
    rows = [[run["label"], f"{run['initial_loss']:.3f}", f"{run['final_loss']:.3f}", f"{run['tokens_per_s']:,.0f}",
             _mib(run["peak_memory_bytes"]), _mib(run["base_bytes"]), _mib(run["adapter_bytes"])]
            for run in r["runs"]]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    t, first = r["task"], r["runs"][0]
    lines.append("")
    lines.append(f"loss: next-token cross-entropy (nats) on {EVAL_SEQUENCES} held-out sequences; floor "
                 f"{t['entropy_floor']:.3f} (the chain's entropy), {t['unigram_entropy']:.3f} without context")
    lines.append(f"peak memory: {first['peak_memory_kind']} (getrusage ru_maxrss)"
                 if "RSS" in first["peak_memory_kind"] else f"peak memory: {first['peak_memory_kind']}")
    proj = ", ".join(f"{_mib(run['proj_bytes'])} ({run['label'].split(' (')[0]})" for run in r["runs"])
    lines.append(f"base weights: every frozen weight; of which the projections: {proj}")
    lines.append(f"adapter: adapter_model.safetensors written by lowrank.save_adapter "
                 f"({first['trainable_params']:,} trainable parameters, fp32)")
    tokens_note = "first step left out" if r["steps"] > 1 else "one step"
    lines.append(f"tokens/s: training tokens per second ({tokens_note})")
    for run in r["runs"]:
        if not run["loss_fell"]:
            lines.append(f"WARNING: {run['label']}: the loss did not clearly fall ({run['initial_loss']:.3f} -> "
                         f"{run['final_loss']:.3f}; wanted at least {CLEAR_FALL:.0%} of the way to the floor "
                         f"{t['entropy_floor']:.3f}). More --steps or another --lr?")
    return "\n".join(lines)


def print_summary(result: dict, file=None):
    print(format_summary(result), file=file if file is not None else sys.stdout)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _finite_float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}" if allow_zero else
                                         f"must be a positive number, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, allow_zero=False)


def _learning_rate(text: str) -> float:
    return _finite_float(text, allow_zero=True)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--size", default="small", choices=sorted(CONFIGS, key=list(CONFIGS).index),
                   help="model preset: tiny (tests, seconds), small (default: ~45 s per run on a "
                        "2-core CPU), base (~76M parameters, for a GPU)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="compute dtype of the base model. Default: bfloat16 on CUDA, float32 on the CPU, "
                        "because CPUs without native bf16 instructions (AVX2-only x86) multiply bf16 about "
                        "20x slower than fp32 (measured: 5 s vs 0.25 s per step of the small model on 2 cores)")
    p.add_argument("--steps", type=_positive_int, default=200, help="training steps per run (default 200)")
    p.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--alpha", type=_positive_float, default=32.0, help="LoRA alpha; scaling alpha/r (default 32)")
    p.add_argument("--lr", type=_learning_rate, default=None, help="AdamW peak learning rate (default 1e-2 for "
                   "tiny and small, 3e-3 for base; 5%% warm-up, cosine decay to 10%%)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--dora", action="store_true", help="DoRA instead of LoRA (QDoRA vs DoRA)")
    p.add_argument("--seed", type=int, default=0, help="model, task, data and adapter seed (default 0)")
    p.add_argument("--no-baseline", action="store_true", help="skip the comparison run with an unquantized base")
    p.add_argument("--output-dir", default=None,
                   help="keep the adapters here (<dir>/qlora, <dir>/lora; qdora/dora with --dora); "
                        "default: a temporary directory, removed")
    return p


def check_arguments(parser: argparse.ArgumentParser, args):
    """Errors argparse's types cannot see (they depend on two flags or on the machine)."""
    if args.seq_len < 2:
        parser.error("argument --seq-len: must be at least 2 (a next token to predict)")
    max_len = BASE_CONFIG["max_position_embeddings"]
    if args.seq_len > max_len:
        parser.error(f"argument --seq-len: at most {max_len} (the model's max_position_embeddings)")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"argument --device: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available here (torch.cuda.is_available() is False)")
