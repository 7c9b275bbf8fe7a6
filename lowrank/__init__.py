"""lowrank: QLoRA and DoRA kernels for PyTorch, without bitsandbytes.

The quantization core: ``quantize_4bit`` / ``dequantize_4bit`` / ``QuantizedTensor`` (NF4, FP4 or a
``Codebook`` of your own; bitsandbytes-compatible bytes and state dicts). Ops live under
``torch.ops.lowrank`` (typed wrappers in ``lowrank.ops``), their math in ``lowrank.reference``.
"""
from . import ops, reference
from .codebook import FP4, NF4, Codebook, get_codebook
from .quantized import QuantizedTensor, dequantize_4bit, dynamic_map, quantize_4bit
from .matmul import matmul_4bit
from . import nn
from .nn import add_lora, merge_lora, quantize_model, unmerge_lora
from .adapters import load_adapter, save_adapter
from .hf import from_pretrained, save_pretrained

__all__ = ["Codebook", "NF4", "FP4", "get_codebook", "QuantizedTensor", "quantize_4bit", "dequantize_4bit",
           "dynamic_map", "matmul_4bit", "nn", "quantize_model", "add_lora", "merge_lora", "unmerge_lora", "save_adapter", "load_adapter", "from_pretrained", "save_pretrained", "ops", "reference"]
__version__ = "0.1.0"
