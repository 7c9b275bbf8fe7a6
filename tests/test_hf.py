"""transformers checkpoints: bnb 4-bit layout saved and loaded without bitsandbytes."""
import json
import os

import pytest
import torch

import lowrank
from lowrank.nn import Linear4bit

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_float_checkpoint_quantized_on_load_then_saved_in_bnb_layout(tmp_path, ids, quant_type, double_quant):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "float")
    loaded = lowrank.from_pretrained(str(tmp_path / "float"), dtype=torch.float32, quant_type=quant_type,
                                     double_quant=double_quant)
    n4 = sum(isinstance(m, Linear4bit) for m in loaded.modules())
    assert n4 == 14 and type(loaded.lm_head) is torch.nn.Linear  # 7 projections x 2 layers; lm_head kept
    expected = lowrank.quantize_model(_tiny_llama(), quant_type, double_quant, compute_dtype=torch.float32)
    assert torch.equal(_logits(loaded, ids), _logits(expected, ids))

    lowrank.save_pretrained(loaded, str(tmp_path / "q"))
    cfg = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] is True
    assert cfg["bnb_4bit_quant_type"] == quant_type and cfg["bnb_4bit_use_double_quant"] == double_quant
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    p = "model.layers.0.self_attn.q_proj.weight"
    assert sd[p].dtype == torch.uint8 and sd[p].shape == (64 * 64 // 2, 1)
    assert f"{p}.quant_state.bitsandbytes__{quant_type}" in sd
    assert (f"{p}.nested_absmax" in sd) == double_quant
    assert sd["model.embed_tokens.weight"].dtype == torch.float32

    again = lowrank.from_pretrained(str(tmp_path / "q"))
    assert torch.equal(_logits(again, ids), _logits(loaded, ids))


def test_rejects_checkpoint_whose_quant_state_does_not_match(tmp_path):
    model = lowrank.quantize_model(_tiny_llama(), compute_dtype=torch.float32)
    lowrank.save_pretrained(model, str(tmp_path))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta["shape"] = [64, 128]  # up_proj is [128, 64]: same element count, wrong shape
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj: the checkpoint's weight is \\[64, 128\\]"):
        lowrank.from_pretrained(str(tmp_path))


def test_rejects_other_quantization_methods(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="only bitsandbytes 4-bit checkpoints"):
        lowrank.from_pretrained(str(tmp_path))


def test_save_needs_linear4bit_layers(tmp_path):
    with pytest.raises(ValueError, match="no lowrank.nn.Linear4bit layer"):
        lowrank.save_pretrained(_tiny_llama(), str(tmp_path))


# -- checkpoints made by transformers + bitsandbytes themselves (scripts/make_bnb_checkpoint.py,
# run on the H100 with bitsandbytes 0.50.2 and transformers 5.17: tests/data/*/made_by.json) -------

DATA = os.path.join(os.path.dirname(__file__), "data")
BNB_MADE = [("bnb_tiny_llama_nf4_dq", "nf4", True), ("bnb_tiny_llama_fp4", "fp4", False)]


@pytest.mark.parametrize("name,quant_type,double_quant", BNB_MADE)
def test_bnb_made_checkpoint_logits_match_bitsandbytes(device, name, quant_type, double_quant):
    """lowrank.from_pretrained on a checkpoint that transformers + bitsandbytes wrote, without
    bitsandbytes: the logits equal the ones bitsandbytes computed on the H100 when it made the
    checkpoint, to float32 summation noise (both compute in float32; measured 4e-7 relative)."""
    from safetensors.torch import load_file
    path = os.path.join(DATA, name)
    recorded = load_file(os.path.join(path, "bnb_logits.safetensors"))
    model = lowrank.from_pretrained(path, device=device)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.quant.quant_type == quant_type for m in layers)
    assert all(m.quant.double_quant == double_quant for m in layers)
    logits = _logits(model, recorded["input_ids"].to(device)).float().cpu()
    ref = recorded["logits"]
    assert logits.shape == ref.shape
    assert float((logits - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("name,quant_type,double_quant", BNB_MADE)
def test_bnb_made_checkpoint_bytes(tmp_path, name, quant_type, double_quant):
    """Every 4-bit tensor bitsandbytes wrote survives lowrank's load -> save byte for byte, and
    equals lowrank's own quantization of the same float weights (the tiny model's seeded init)."""
    from safetensors.torch import load_file
    path = os.path.join(DATA, name)
    theirs = load_file(os.path.join(path, "model.safetensors"))
    lowrank.save_pretrained(lowrank.from_pretrained(path), str(tmp_path))
    ours = load_file(str(tmp_path / "model.safetensors"))
    quant_keys = [k for k in theirs if ".weight." in k or k.endswith("_proj.weight")]
    assert len(quant_keys) == 14 * (6 if double_quant else 4)
    for k in quant_keys:
        assert torch.equal(ours[k], theirs[k]), k
    float_model = _tiny_llama()
    if not torch.equal(float_model.model.embed_tokens.weight, theirs["model.embed_tokens.weight"]):
        pytest.skip("this transformers version initialises the tiny model differently from the one that made it")
    mine = lowrank.quantize_model(float_model, quant_type, double_quant, compute_dtype=torch.float32).state_dict()
    ulp_apart = 0
    for k in quant_keys:
        if k.endswith(f"quant_state.bitsandbytes__{quant_type}"):  # the JSON blob: its offset, below
            continue
        if k.endswith(".nested_absmax") and not torch.equal(mine[k], theirs[k]):
            # bitsandbytes' offset is a float32 mean in its CUDA reduction's order, ours the float64
            # mean rounded once (docs/format.md): up to one ulp of the offset apart, which moves
            # nested_absmax = max |absmax - offset| by as much (2 to 4 of its own ulps here)
            blob = json.loads(bytes(theirs[k.replace(".nested_absmax", f".quant_state.bitsandbytes__{quant_type}")]
                                    .tolist()))
            offset = torch.tensor(blob["nested_offset"], dtype=torch.float32)
            ulp = lambda t: (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).abs()  # noqa: E731
            assert bool(((mine[k] - theirs[k]).abs() <= ulp(offset) + ulp(theirs[k])).all()), k
            ulp_apart += 1
            continue
        assert torch.equal(mine[k].cpu(), theirs[k]), k  # packed codes, absmax (or its 8-bit codes), maps
    assert ulp_apart <= 14 if double_quant else ulp_apart == 0
