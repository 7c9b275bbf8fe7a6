"""LoRA adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors with
PEFT's key names (``base_model.model.<module>.lora_A.weight``), so that
``peft.PeftModel.from_pretrained`` loads what ``save_adapter`` writes and ``load_adapter`` loads
what PEFT saves. peft itself is never imported."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .nn.lora import add_lora, lora_layers

_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None):
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layer (use lowrank.add_lora first)")
    cfg = getattr(model, "_lowrank_lora_config", None)
    if cfg is None:
        any_layer = next(iter(layers.values()))
        cfg = {"r": any_layer.r, "lora_alpha": any_layer.lora_alpha, "lora_dropout": 0.0,
               "use_rslora": any_layer.use_rslora, "use_dora": any_layer.use_dora,
               "target_modules": sorted({n.split(".")[-1] for n in layers})}
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "use_rslora": cfg["use_rslora"], "use_dora": cfg["use_dora"], "target_modules": cfg["target_modules"],
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
        if layer.use_dora:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().contiguous().cpu()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a LoRA adapter saved by PEFT (or save_adapter) into ``model``; adds the LoRA layers the
    adapter's config names if the model has none yet. Returns the model."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: only LoRA adapters are supported, got peft_type {cfg.get('peft_type')!r}")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if cfg.get(unsupported):
            raise NotImplementedError(f"load_adapter: per-module {unsupported} is not supported yet")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save") or cfg.get("fan_in_fan_out"):
        raise NotImplementedError("load_adapter: bias training, modules_to_save and fan_in_fan_out are not "
                                  "supported yet")
    if not lora_layers(model):
        add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg.get("lora_dropout", 0.0),
                 cfg.get("use_rslora", False), cfg.get("use_dora", False))
    layers = lora_layers(model)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    expected = {f"{_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    expected |= {f"{_PREFIX}{n}.lora_magnitude_vector" for n, m in layers.items() if m.use_dora}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"load_adapter: adapter does not match the model: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    with torch.no_grad():
        for name, layer in layers.items():
            for ab in "AB":
                dst = getattr(layer, f"lora_{ab}").weight
                src = tensors[f"{_PREFIX}{name}.lora_{ab}.weight"]
                if src.shape != dst.shape:
                    raise ValueError(f"load_adapter: {name}.lora_{ab} has shape {list(src.shape)}, the model's is "
                                     f"{list(dst.shape)}")
                dst.copy_(src)
            if layer.use_dora:
                src = tensors[f"{_PREFIX}{name}.lora_magnitude_vector"]
                if src.shape != layer.lora_magnitude_vector.shape:
                    raise ValueError(f"load_adapter: {name}.lora_magnitude_vector has shape {list(src.shape)}")
                layer.lora_magnitude_vector.copy_(src)
    return model
