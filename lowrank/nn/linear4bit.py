"""Linear4bit: a frozen 4-bit weight with bitsandbytes' state-dict keys, and quantize_model."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..matmul import matmul_4bit
from ..quantized import QuantizedTensor, quantize_4bit


class Linear4bit(nn.Module):
    """``nn.Linear`` with a frozen 4-bit weight (NF4/FP4/codebook, blockwise, double-quantized).

    The state dict is bitsandbytes' (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``,
    ``bias``), and ``load_state_dict`` reads it back (also one saved by bitsandbytes).
    ``.to()`` / ``.cuda()`` move the packed weight without re-quantizing; dtype casts touch only the
    bias. compute_dtype: the dtype of the matmul (default: the input's)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type="nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # nn.Linear's initialization, then quantization (a real model loads weights afterwards).
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype or torch.float32)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.quant: QuantizedTensor = quantize_4bit(weight, quant_type, blocksize, double_quant)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type="nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize an existing ``nn.Linear`` (its weight and dtype; the bias is kept as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.compute_dtype = compute_dtype
        module.quant = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            module.register_parameter("bias", None)
        return module

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Wrap an existing 4-bit weight [out, in] (e.g. loaded from a checkpoint) as a layer."""
        if len(q.shape) != 2:
            raise ValueError(f"from_quantized: the weight must be 2-D [out, in], got {list(q.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = q.shape
        module.compute_dtype = compute_dtype
        module.quant = q
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            module.register_parameter("bias", None)
        return module

    @property
    def weight(self) -> QuantizedTensor:
        return self.quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(cd)
        return matmul_4bit(x.to(cd), self.quant, bias).to(x.dtype)

    def extra_repr(self) -> str:
        q = self.quant
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}, "
                f"compute_dtype={self.compute_dtype}")

    # -- device moves: the packed weight follows the device, never a dtype cast --------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.quant.device)).device  # casts skip uint8
        if device != self.quant.device:
            self.quant = self.quant.to(device)
        return self

    # -- bitsandbytes' state-dict layout ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in self.quant.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = value
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if not ours:
            missing_keys.append(prefix + "weight")
        else:
            sub = {k: state_dict.pop(k) for k in ours}  # load_state_dict passes its own copy
            try:
                q = QuantizedTensor.from_bnb_state_dict(sub, prefix + "weight")
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"weight shape {list(q.shape)} does not match this layer's "
                                     f"[{self.out_features}, {self.in_features}]")
                self.quant = q.to(self.quant.device)
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def quantize_model(model: nn.Module, quant_type="nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = torch.bfloat16, skip_modules=("lm_head",),
                   blocksize: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (any module tree) by a ``Linear4bit``, in place.

    A module is skipped when any component of its dotted name is in ``skip_modules``. Returns the model."""
    skip = set(skip_modules or ())
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not (skip & set(full.split("."))):
                setattr(module, child_name, Linear4bit.from_linear(child, quant_type, blocksize, double_quant,
                                                                   compute_dtype))
    return model
