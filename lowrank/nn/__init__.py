"""Drop-in modules: ``Linear4bit`` (a 4-bit ``nn.Linear`` in bitsandbytes' state-dict layout) and
``quantize_model`` to swap every ``nn.Linear`` of a module tree."""
from .linear4bit import Linear4bit, quantize_model

__all__ = ["Linear4bit", "quantize_model"]
