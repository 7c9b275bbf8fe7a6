"""LoRA and DoRA over a frozen base layer (nn.Linear or lowrank.nn.Linear4bit), PEFT-compatible.

    LoRA: y = base(x) + s * B(A(dropout(x))),  A [r, in] kaiming-uniform, B [out, r] zeros,
          s = lora_alpha / r  (or lora_alpha / sqrt(r) with rsLoRA)
    DoRA: y = base(x) + (m / n - 1) * (x' W0^T) + (m / n) * s * B(A(x')),  x' = dropout(x),
          n = ||W0 + s B A|| per output row, detached (DoRA section 4.3, as PEFT); m [out] trainable,
          initialised to ||W0|| per row. Without dropout: y = (m / n) (x W0^T + s x A^T B^T) + bias.

The forward goes through the lean autograd function of ``lowrank.lora_function`` (fused ops on
CUDA; with or without dropout, LoRA and DoRA alike); ``forward_reference`` is PEFT's formulation
in PyTorch ops, the reference it is tested against and the path for a trainable base or an x
whose dtype differs from an nn.Linear base's weight. Parameter names contain ``lora_A`` /
``lora_B`` (and ``lora_magnitude_vector`` for DoRA) as in PEFT.

DoRA's n comes from ``lowrank.dora`` (``dora_row_scale``): on CUDA one pass over the packed 4-bit
weight (the direct norm), else expanded from ||W0||^2 (cached, see ``base_row_sq_norm``), one pass
A W0^T over the base weight and small float64 terms; rows that suffer cancellation are recomputed
exactly. No [out, in] float tensor is built for it, nor for the base term under dropout.
"""
from __future__ import annotations

import math
import re
import weakref

import torch
from torch import nn

from .. import dora as _dora
from .. import ops
from ..lora_function import _AsyncFlag, draw_seed, lora_forward
from ..matmul import matmul_4bit
from ..quantized import quantize_4bit
from .linear4bit import Linear4bit


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise TypeError(f"LoraLinear: base_layer must be nn.Linear or lowrank.nn.Linear4bit, got "
                            f"{type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoraLinear: r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraLinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = base_layer.bias.device if base_layer.bias is not None else (
            base_layer.weight.device if isinstance(base_layer, nn.Linear) else base_layer.quant.device)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        # fp32 adapters (PEFT keeps them in float32 over a bf16/4-bit base as well)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.use_dora = use_dora
        self._w0_sq_norm: torch.Tensor | None = None  # cache of base_row_sq_norm(); see there
        self._w0_sq_norm_key = None
        if use_dora:  # m = ||W0||_row (B = 0 at init, so this is ||W0 + s B A||_row too)
            self.lora_magnitude_vector = nn.Parameter(self.base_row_sq_norm().sqrt().float())
        self.merged = False
        self.merge_error: float | None = None
        self._unmerged_base = None

    def base_weight_fp32(self) -> torch.Tensor:
        """W0 as float32 [out, in] (dequantized for a 4-bit base)."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return base.weight.detach().float()
        return base.quant.dequantize(torch.float32)

    def _base_weight(self):
        """W0 as it is stored: nn.Linear's weight tensor or Linear4bit's QuantizedTensor."""
        base = self.base_layer
        return base.weight if isinstance(base, nn.Linear) else base.quant

    def _base_weight_key(self):
        """What identifies W0's current contents: the object (weakly referenced, so a new weight
        never matches a dead one's cache) and the address and version counter of each of its
        tensors (a move changes the address, an in-place write through autograd's view of the
        tensor bumps the version)."""
        w = self._base_weight()
        if isinstance(w, torch.Tensor):
            tensors = (w,)
        else:
            tensors = (w.packed, w.absmax, w.nested_absmax, w.nested_offset)
        return weakref.ref(w), tuple((t.device, t.data_ptr(), t._version) for t in tensors if t is not None)

    def reset_norm_cache(self):
        """Forget the cached ||W0||^2 (done automatically on merge/unmerge, ``.to()`` and any
        change of W0 the cache key sees; call it after writing W0 in place through ``.data``,
        which no version counter records)."""
        self._w0_sq_norm = self._w0_sq_norm_key = None

    def base_row_sq_norm(self) -> torch.Tensor:
        """||W0||^2 per output row, float64 [out] (W0 dequantized to float32 for a 4-bit base).

        W0 is frozen, so this is computed once (in row chunks, lowrank.dora.base_row_sq_norm) and
        cached in a plain attribute: not a buffer, so it is neither saved in the state dict nor
        cast by ``.half()``. The cache is dropped on merge/unmerge, ``.to()``/``.cuda()``/dtype
        casts and pickling, and checked against W0 at each use: a different weight object (a new
        QuantizedTensor after load_state_dict, a replaced Parameter), a moved tensor or an
        in-place write (``copy_``, load_state_dict into nn.Linear) recomputes it. A write through
        ``.data`` is invisible to that check: call ``reset_norm_cache()`` after one."""
        key = self._base_weight_key()
        cached = self._w0_sq_norm_key
        if self._w0_sq_norm is None or cached is None or cached[0]() is not key[0]() or cached[1] != key[1]:
            self._w0_sq_norm = _dora.base_row_sq_norm(self._base_weight())
            self._w0_sq_norm_key = key
        return self._w0_sq_norm

    def dora_weight_norm(self) -> torch.Tensor:
        """n = ||W0 + s B A|| per output row, float32 [out], detached, without any [out, in]
        temporary (lowrank.dora.dora_weight_norm; rows with cancellation recomputed exactly)."""
        return _dora.dora_weight_norm(self._base_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling,
                                      base_sq_norm=self.base_row_sq_norm())

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x W0^T without the bias, as the base layer computes it (its dtypes), with no [out, in]
        float copy of W0: nn.Linear's weight as it is, or matmul_4bit in Linear4bit's compute dtype."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return torch.nn.functional.linear(x, base.weight)
        cd = base.compute_dtype or x.dtype
        return matmul_4bit(x.to(cd), base.quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        lean = self._lean_call(x)
        if lean is not None:
            return lean
        return self.forward_reference(x)

    def _lean_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The lean autograd function (lowrank.lora_function), or None where it does not apply: a
        trainable base weight or bias, or x in another dtype than an nn.Linear base's weight."""
        base = self.base_layer
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        if any(p.requires_grad for p in base.parameters()):
            return None
        if isinstance(base, nn.Linear):
            if x.dtype != base.weight.dtype:
                return None
            cd, kw = x.dtype, dict(weight=base.weight)
        else:
            cd, kw = base.compute_dtype or x.dtype, dict(quant=base.quant)
        args = (x.to(cd), self.lora_A.weight, self.lora_B.weight, self.scaling)
        # one mask per call: a DoRA forward re-run for flagged rows must drop the same elements
        kw.update(bias=base.bias, dropout_p=self.lora_dropout.p if dropout_active else 0.0,
                  seed=draw_seed() if dropout_active else None)
        if not self.use_dora:
            return lora_forward(*args, **kw).to(x.dtype)
        # DoRA: n, v = m / n and the status word (cancellation flags, m == 0), one copy to the host
        # read only once the layer's GEMMs are queued (a flagged row, rare, re-runs the forward with
        # the exact n): no GPU stall.
        weight = self._base_weight()
        m = self.lora_magnitude_vector
        n, flagged, v, status = _dora.dora_row_scale(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, m,
                                                     base_sq_norm=self.base_row_sq_norm())
        status = _AsyncFlag(status)
        has_zero = status.bits(ops.ROW_NORM_STATUS_ZERO_MAGNITUDE)
        y = lora_forward(*args, magnitude=m, weight_norm=n, row_scale=v, magnitude_has_zero=has_zero, **kw)
        if status.bits(ops.ROW_NORM_STATUS_FLAGGED):
            n = _dora.fix_flagged_rows(n, flagged, weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
            y = lora_forward(*args, magnitude=m, weight_norm=n, magnitude_has_zero=has_zero, **kw)
        return y.to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's formulation in PyTorch ops (adapter branch in the adapters' float32, nn.Dropout):
        the reference the lean path is tested against, and the path for the cases it leaves out."""
        result = self.base_layer(x)
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        x_dropped = self.lora_dropout(x)
        x_lora = x_dropped.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(x_lora))
        if not self.use_dora:
            return result + (lora * self.scaling).to(result.dtype)
        scale = self.lora_magnitude_vector / self.dora_weight_norm()
        if dropout_active:  # the base term sees the dropped input, as in PEFT
            base_no_bias = self._base_no_bias(x_dropped).to(x_lora.dtype)
        else:
            base_no_bias = result.to(x_lora.dtype)
            if self.base_layer.bias is not None:
                base_no_bias = base_no_bias - self.base_layer.bias.to(x_lora.dtype)
        dora = (scale - 1) * base_no_bias + scale * lora * self.scaling
        return result + dora.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, float32 [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> float | None:
        """Fold s*B@A into the base weight. For a 4-bit base this dequantizes, adds and re-quantizes
        with the same settings, and returns (and keeps in ``merge_error``) the relative Frobenius
        error the re-quantization introduced; for a float base it returns None. ``unmerge`` restores
        the original base exactly (the original is kept while merged)."""
        if self.merged:
            return self.merge_error
        base = self.base_layer
        target = self.base_weight_fp32() + self.delta_weight()
        if self.use_dora:  # W' = m * V / ||V||_row
            target = (self.lora_magnitude_vector.detach() / target.norm(dim=1))[:, None] * target
        if isinstance(base, nn.Linear):
            self._unmerged_base = base.weight.detach().clone()
            base.weight.copy_(target.to(base.weight.dtype))
            self.merge_error = None
        else:
            q = base.quant
            merged = quantize_4bit(target.to(q.dtype), q.codebook, q.blocksize, q.double_quant, q.quant_storage)
            self.merge_error = float((merged.dequantize(torch.float32) - target).norm() / target.norm())
            self._unmerged_base, base.quant = q, merged
        self.merged = True
        self.reset_norm_cache()
        return self.merge_error

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if isinstance(self.base_layer, nn.Linear):
            self.base_layer.weight.copy_(self._unmerged_base)
        else:
            self.base_layer.quant = self._unmerged_base
        self._unmerged_base, self.merged, self.merge_error = None, False, None
        self.reset_norm_cache()

    def _apply(self, fn, recurse=True):
        self.reset_norm_cache()  # a move or cast of W0 (the cache would also see it; this frees it now)
        return super()._apply(fn, recurse)

    def __getstate__(self):  # pickling / deepcopy: a weak reference cannot be pickled; recompute later
        state = super().__getstate__()
        state["_w0_sq_norm"] = state["_w0_sq_norm_key"] = None
        return state

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, use_dora={self.use_dora}, "
                f"merged={self.merged}")


def _matches(name: str, module: nn.Module, target_modules) -> bool:
    if not isinstance(module, (nn.Linear, Linear4bit)):
        return False
    if target_modules == "all-linear":
        return name.split(".")[-1] != "lm_head"
    if isinstance(target_modules, str):  # as PEFT: a string is a regular expression over the full name
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def add_lora(model: nn.Module, r: int, lora_alpha: float, target_modules, lora_dropout: float = 0.0,
             use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """Wrap the targeted Linear / Linear4bit modules of ``model`` in ``LoraLinear``, freeze every
    other parameter, and return the model. ``target_modules`` as PEFT: a list of module names
    (matched as name suffixes), a regular expression, or ``"all-linear"`` (every linear layer but
    ``lm_head``)."""
    targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, m, target_modules)]
    if not targets:
        raise ValueError(f"add_lora: no Linear / Linear4bit module matches target_modules={target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2],
                LoraLinear(module, r, lora_alpha, lora_dropout, use_rslora, use_dora))
    model._lowrank_lora_config = {
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora,
        "use_dora": use_dora,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(set(target_modules)),
    }
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> dict[str, float | None]:
    """Merge every LoRA layer; returns the re-quantization error per 4-bit layer (None for float)."""
    return {n: m.merge() for n, m in lora_layers(model).items()}


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.unmerge()
    return model
