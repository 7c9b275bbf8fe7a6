"""Drop-in modules: ``Linear4bit`` (a 4-bit ``nn.Linear`` in bitsandbytes' state-dict layout),
``quantize_model`` to swap every ``nn.Linear`` of a module tree, and ``LoraLinear`` / ``add_lora``."""
from .linear4bit import Linear4bit, quantize_model
from .lora import LoraLinear, add_lora, merge_lora, unmerge_lora

__all__ = ["Linear4bit", "quantize_model", "LoraLinear", "add_lora", "merge_lora", "unmerge_lora"]
