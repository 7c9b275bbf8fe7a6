"""transformers checkpoints in bitsandbytes' 4-bit layout, loaded and saved without bitsandbytes.

    model = lowrank.from_pretrained("path/to/checkpoint")     # bnb 4-bit or plain float
    lowrank.save_pretrained(model, "path/to/out")              # bnb 4-bit layout + config

A checkpoint saved with a bitsandbytes 4-bit ``quantization_config`` (nf4 or fp4, double quant or
not) is read through ``QuantizedTensor.from_bnb_state_dict``: each Linear whose weight carries a
``quant_state.bitsandbytes__*`` entry becomes a ``lowrank.nn.Linear4bit``; the rest (embeddings,
norms, lm_head) load as the float tensors they are. A checkpoint without a quantization config is
quantized on load. transformers is needed for these two functions only.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .nn.linear4bit import Linear4bit, quantize_model
from .quantized import QuantizedTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    raise FileNotFoundError(f"from_pretrained: no model.safetensors (or index) in {path}")


def _bnb_config(raw: dict) -> dict | None:
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"from_pretrained: only bitsandbytes 4-bit checkpoints are supported, got "
                         f"quantization_config {qc}")
    return qc


def from_pretrained(path: str, device="cpu", dtype: torch.dtype | None = None, quant_type: str = "nf4",
                    double_quant: bool = True) -> nn.Module:
    """Build a transformers causal LM from ``path`` with ``lowrank.nn.Linear4bit`` layers.

    dtype: the float dtype of the non-quantized weights and the compute dtype (default: the
    checkpoint's ``bnb_4bit_compute_dtype``, else its ``torch_dtype``, else float32). A float
    checkpoint is quantized on load with ``quant_type`` / ``double_quant``."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    qc = _bnb_config(raw)
    if dtype is None:
        name = (qc or {}).get("bnb_4bit_compute_dtype") or raw.get("torch_dtype") or raw.get("dtype") or "float32"
        dtype = _DTYPES.get(str(name).replace("torch.", ""), torch.float32)
    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we are the quantizer; transformers would look for bitsandbytes
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    state = _load_state_dict(path)

    if qc is None:
        model.load_state_dict(state, strict=False)
        _check_loaded(model, state)
        quantize_model(model, quant_type, double_quant, compute_dtype=dtype)
        return model.to(device).eval()

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and any(k.startswith(f"{full}.weight.quant_state.bitsandbytes__")
                                               for k in state):
                sub = {k: v for k, v in state.items() if k == f"{full}.weight" or k.startswith(f"{full}.weight.")}
                try:
                    q = QuantizedTensor.from_bnb_state_dict(sub, f"{full}.weight")
                except ValueError as e:
                    raise ValueError(f"from_pretrained: {full}: {e}") from None
                if tuple(q.shape) != (child.out_features, child.in_features):
                    raise ValueError(f"from_pretrained: {full}: the checkpoint's weight is {list(q.shape)} but the "
                                     f"model's layer is [{child.out_features}, {child.in_features}]")
                setattr(module, child_name, Linear4bit.from_quantized(q, child.bias, compute_dtype=dtype))
    model.load_state_dict(state, strict=False)
    _check_loaded(model, state)
    return model.to(device).eval()


def _check_loaded(model: nn.Module, state: dict):
    """Every model tensor must come from the checkpoint, except a tied output embedding."""
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"from_pretrained: checkpoint does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")


def save_pretrained(model: nn.Module, path: str):
    """Write ``config.json`` (with bitsandbytes' 4-bit ``quantization_config``) and
    ``model.safetensors`` (bitsandbytes' key layout) for a model holding ``Linear4bit`` layers."""
    from safetensors.torch import save_file

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("save_pretrained: the model has no lowrank.nn.Linear4bit layer")
    kinds = {(m.quant.quant_type, m.quant.double_quant, str(m.quant.quant_storage)) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"save_pretrained: one quant_type / double_quant / storage for all layers, got {kinds}")
    quant_type, double_quant, _ = kinds.pop()
    storage = next(iter(layers.values())).quant.quant_storage
    compute = next(iter(layers.values())).compute_dtype or torch.float32
    skipped = sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m) is nn.Linear})
    os.makedirs(path, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute).replace("torch.", ""),
        "bnb_4bit_quant_storage": str(storage).replace("torch.", ""),
        "llm_int8_skip_modules": skipped or None,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    seen, out = set(), {}
    for k, v in state.items():  # safetensors stores no shared memory (the dynamic map is shared)
        v = v.detach().contiguous().cpu()
        key = v.untyped_storage().data_ptr()
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
