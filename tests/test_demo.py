"""python -m lowrank demo: the tiny model on the CPU (the whole file takes well under a minute on 2 cores)."""
import argparse
import math
import os

import pytest
import torch

import lowrank
from lowrank.__main__ import main

pytest.importorskip("transformers")
from lowrank import demo  # noqa: E402

# Enough for the tiny model to learn: final loss 0.38-0.41 x initial over seeds 0-7, LoRA and DoRA;
# the bound is 0.6 x (lr = 0 gives 1.0 x: test_bound_fails_without_learning; a model that learned only
# the token frequencies, not the transitions, would reach 4.65 / 5.3 = 0.87 x).
TINY = ["--size", "tiny", "--steps", "40", "--seq-len", "64", "--lr", "1e-2"]


def _args(*argv):
    parser = demo.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(list(argv))
    demo.check_arguments(parser, args)
    return args


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_demo_learns_and_its_adapter_loads_back(tmp_path, dora):
    args = _args(*TINY, "--no-baseline", "--output-dir", str(tmp_path), *(["--dora"] if dora else []))
    result = demo.run_demo(args, return_models=True)
    (run,) = result["runs"]
    assert run["label"] == ("QDoRA NF4 (lowrank)" if dora else "QLoRA NF4 (lowrank)")
    assert run["final_loss"] < 0.6 * run["initial_loss"]
    assert run["final_loss"] < result["task"]["unigram_entropy"] - 1.0  # it uses the context
    assert run["loss_fell"] and result["loss_fell"]
    assert run["final_loss"] > result["task"]["entropy_floor"] - 0.05  # nothing beats the chain's entropy
    assert len(run["losses"]) == 40 and all(math.isfinite(x) for x in run["losses"])
    assert run["tokens_per_s"] > 0 and run["peak_memory_bytes"] > 0

    # the adapter on disk, loaded into a fresh quantized model, gives the trained model's outputs
    adapter_dir = tmp_path / ("qdora" if dora else "qlora")
    assert run["adapter_dir"] == str(adapter_dir)
    assert run["adapter_bytes"] == os.path.getsize(adapter_dir / "adapter_model.safetensors") > 0
    fresh = lowrank.quantize_model(demo.build_model("tiny", args.seed), compute_dtype=torch.float32)
    task = demo.MarkovTask(demo.CONFIGS["tiny"]["vocab_size"], args.seed)
    ids = demo.eval_batch(task, args.seq_len, args.seed)
    assert demo.eval_loss(fresh, ids) == pytest.approx(run["initial_loss"], rel=1e-6)
    lowrank.load_adapter(fresh, str(adapter_dir))
    assert fresh._lowrank_lora_config["use_dora"] == dora
    trained = run["model"].eval()
    assert torch.equal(_logits(fresh, ids), _logits(trained, ids))
    assert demo.eval_loss(fresh, ids) == pytest.approx(run["final_loss"], rel=1e-6)


def test_bound_fails_without_learning():
    """lr = 0: the adapters stay at B = 0, so the loss cannot fall; the bound above and the demo's
    own check must both say so (the test above would fail for a demo that did not train)."""
    result = demo.run_demo(_args(*TINY[:2], "--steps", "5", "--seq-len", "64", "--lr", "0", "--no-baseline"))
    (run,) = result["runs"]
    assert run["final_loss"] == pytest.approx(run["initial_loss"], abs=1e-6)
    assert not run["final_loss"] < 0.6 * run["initial_loss"]
    assert not run["loss_fell"] and not result["loss_fell"]
    assert run["adapter_dir"] is None  # a temporary directory, removed after measuring the adapter
    assert "WARNING: QLoRA NF4 (lowrank): the loss did not clearly fall" in demo.format_summary(result)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_command_line_prints_the_table(capsys, dora):
    result = main(["demo", "--size", "tiny", "--steps", "3", "--seq-len", "16", *(["--dora"] if dora else [])])
    out, err = capsys.readouterr()
    method = "DoRA" if dora else "LoRA"
    for text in ["initial loss", "final loss", "tokens/s", "peak memory", "base weights", "adapter",
                 f"Q{method} NF4 (lowrank)", f"{method} fp32 (baseline)", "peak RSS of the process"]:
        assert text in out
    assert f"Q{method} NF4 (lowrank)" in err and "3/3" in err  # the progress lines (stderr is no TTY here)
    q, base = result["runs"]
    # the same model, weights, adapter init and batches: the 4-bit base is the only difference
    assert q["initial_loss"] != base["initial_loss"] and abs(q["initial_loss"] - base["initial_loss"]) < 0.05
    assert q["adapter_bytes"] == base["adapter_bytes"] and q["trainable_params"] == base["trainable_params"]
    # NF4 + double quant: 4 bits per weight plus the absmax and code tables (the 1 KiB nested code
    # table per layer weighs in these tiny layers: 5.5 bits per weight) against 32
    assert 1 / 8 < q["proj_bytes"] / base["proj_bytes"] < 6 / 32
    assert q["base_bytes"] < base["base_bytes"]


@pytest.mark.parametrize("flag,value,message", [
    ("--rank", "0", "must be a positive integer"),
    ("--steps", "0", "must be a positive integer"),
    ("--steps", "ten", "expected a positive integer"),
    ("--lr", "-1e-3", "must be a number >= 0"),
    ("--alpha", "0", "must be a positive number"),
    ("--seq-len", "1", "must be at least 2"),
    ("--size", "huge", "invalid choice"),
])
def test_bad_flags_are_argparse_errors(capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["demo", f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err


def test_cuda_device_without_cuda_is_an_argparse_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_markov_task_floor_is_the_chains_entropy():
    task = demo.MarkovTask(64, seed=3)
    P = torch.zeros(64, 64, dtype=torch.float64).scatter_(1, task.successors, task.probs)
    assert torch.allclose(task.stationary @ P, task.stationary, atol=1e-12)  # stationary
    assert torch.allclose(P.sum(1), torch.ones(64, dtype=torch.float64))
    ids = task.sample(256, 64, torch.Generator().manual_seed(0))
    assert torch.equal(ids, task.sample(256, 64, torch.Generator().manual_seed(0)))  # deterministic
    # the true transition probabilities score the samples at the floor (the best any model can do)
    nll = -P[ids[:, :-1], ids[:, 1:]].log().mean().item()
    assert nll == pytest.approx(task.entropy_floor, abs=0.03)
    assert task.entropy_floor < task.unigram_entropy <= math.log(64)


def test_configs_build_and_count():
    for size in demo.CONFIGS:
        cfg = demo.llama_config(size)
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
        assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    model = demo.build_model("tiny", seed=5)
    assert demo.count_parameters("tiny") == sum(p.numel() for p in model.parameters())
    again = demo.build_model("tiny", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_default_learning_rate_depends_on_the_size():
    """No --lr: 1e-2 for the CPU sizes, 3e-3 for base (1e-2 stalled its bf16 LoRA baseline on the
    H100); an explicit --lr, 0 included, wins."""
    assert demo._lr(_args("--size", "small")) == 1e-2
    assert demo._lr(_args("--size", "base")) == 3e-3
    assert demo._lr(_args("--size", "base", "--lr", "0")) == 0.0
    assert demo._lr(_args("--size", "tiny", "--lr", "5e-4")) == 5e-4
