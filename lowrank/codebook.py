"""4-bit codebooks: the 16 values a code can stand for, and the rule that picks a code.

Kernels take a codebook as data (three small tensors), so a new codebook needs no recompiling:

    cb = Codebook.from_values([...16 floats...], name="mine")
    q = lowrank.quantize_4bit(w, quant_type=cb)

or a quantile codebook of any scipy.stats distribution (NF4 is the normal case):

    cb = Codebook.from_distribution(scipy.stats.t(df=5), name="t5-quantile")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import reference

NF4_OFFSET = 0.9677083  # the outermost quantile of NF4 (QLoRA, appendix E)


@dataclass(frozen=True)
class Codebook:
    """A 16-entry codebook and its code-selection rule (see reference.codes_4bit).

    values[c] is the value of code c; thresholds (15, ascending) and code_of_rank say which code
    a normalized value takes: code_of_rank[#{i : x > thresholds[i]}], or in sign_magnitude mode
    (FP4) a sign bit plus a magnitude code chosen by the first 7 thresholds.
    """

    name: str
    values: tuple[float, ...]
    thresholds: tuple[float, ...]
    code_of_rank: tuple[int, ...]
    sign_magnitude: bool = False
    _tensors: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self):
        values = _as_floats(self.values, "values")
        if len(values) != 16:
            raise ValueError(f"a codebook needs exactly 16 values, got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"codebook values must be finite, got {values}")
        thresholds = _as_floats(self.thresholds, "thresholds")
        n_thr = 7 if self.sign_magnitude else 15
        if len(thresholds) < n_thr or not all(math.isfinite(t) for t in thresholds):
            raise ValueError(f"need {n_thr} finite thresholds, got {thresholds}")
        if any(b < a for a, b in zip(thresholds[:n_thr], thresholds[1:n_thr])):
            raise ValueError(f"thresholds must be non-decreasing, got {thresholds}")
        codes = tuple(int(c) for c in self.code_of_rank)
        limit = 8 if self.sign_magnitude else 16
        if len(codes) < n_thr + 1 or not all(0 <= c < limit for c in codes[: n_thr + 1]):
            raise ValueError(f"code_of_rank needs {n_thr + 1} codes in [0, {limit}), got {codes}")
        # Store canonical, padded forms (kernels always read 15 thresholds and 16 codes).
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "thresholds", thresholds[:n_thr] + (0.0,) * (15 - n_thr))
        object.__setattr__(self, "code_of_rank", codes[: n_thr + 1] + (0,) * (15 - n_thr))

    @classmethod
    def from_values(cls, values: Sequence[float], name: str = "custom") -> "Codebook":
        """Nearest-value codebook: any 16 finite floats (rounded to float32; [-1, 1] is the useful range since they scale the block's absmax), in any
        order; a value takes the nearest entry, an exact midpoint the lower one."""
        vals = torch.tensor(_as_floats(values, "values"), dtype=torch.float64)
        if vals.numel() != 16:
            raise ValueError(f"a codebook needs exactly 16 values, got {vals.numel()}")
        if not torch.isfinite(vals).all():
            raise ValueError(f"codebook values must be finite, got {vals.tolist()}")
        vals32 = vals.to(torch.float32)
        order = torch.argsort(vals32, stable=True)
        thresholds = reference.midpoint_thresholds(vals32[order])
        return cls(name, tuple(vals32.tolist()), tuple(thresholds.tolist()), tuple(order.tolist()))

    @classmethod
    def from_distribution(cls, dist, offset: float = NF4_OFFSET, name: str | None = None) -> "Codebook":
        """Quantile codebook of a continuous distribution (a scipy.stats frozen distribution, or
        anything with ``ppf``), built as NF4 is: 8 quantiles above the median at
        linspace(offset, 0.5, 9)[:-1], 7 below it mirrored, one zero, centred on the median and
        scaled so that the largest magnitude is 1. ``from_distribution(scipy.stats.norm)`` is NF4."""
        import numpy as np

        if not 0.5 < offset < 1.0:
            raise ValueError(f"offset must be in (0.5, 1), got {offset}")
        median = float(dist.ppf(0.5))
        upper = np.asarray(dist.ppf(np.linspace(offset, 0.5, 9)[:-1]), dtype=np.float64) - median
        lower = np.asarray(dist.ppf(1.0 - np.linspace(offset, 0.5, 8)[:-1]), dtype=np.float64) - median
        values = np.sort(np.concatenate([upper, lower, [0.0]]))
        values = values / np.abs(values).max()
        label = name or f"quantile-{getattr(getattr(dist, 'dist', dist), 'name', 'dist')}"
        return cls.from_values(values.tolist(), name=label)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values fp32 [16], thresholds fp32 [15], code_of_rank uint8 [16]) on ``device``, cached."""
        device = torch.device(device)
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = (
                torch.tensor(self.values, dtype=torch.float32, device=device),
                torch.tensor(self.thresholds, dtype=torch.float32, device=device),
                torch.tensor(self.code_of_rank, dtype=torch.uint8, device=device),
            )
        return self._tensors[key]


def _as_floats(seq, what: str) -> tuple[float, ...]:
    try:
        t = torch.as_tensor(seq, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"codebook {what} must be a sequence of floats: {e}") from None
    # Round through float32: the kernels compare in float32.
    return tuple(t.to(torch.float32).tolist())


NF4 = Codebook("nf4", reference.NF4_VALUES,
               tuple(reference.midpoint_thresholds(torch.tensor(reference.NF4_VALUES)).tolist()),
               tuple(range(16)))
FP4 = Codebook("fp4", reference.FP4_VALUES, reference.FP4_MAGNITUDE_THRESHOLDS,
               reference.FP4_MAGNITUDE_CODE_OF_RANK, sign_magnitude=True)
BUILTIN = {"nf4": NF4, "fp4": FP4}


def get_codebook(quant_type) -> Codebook:
    """'nf4', 'fp4' or a Codebook -> Codebook."""
    if isinstance(quant_type, Codebook):
        return quant_type
    if isinstance(quant_type, str) and quant_type.lower() in BUILTIN:
        return BUILTIN[quant_type.lower()]
    raise ValueError(f"quant_type must be 'nf4', 'fp4' or a lowrank.Codebook, got {quant_type!r}")
