"""QuantizedTensor: a 4-bit blockwise-quantized weight in bitsandbytes' layout.

    q = lowrank.quantize_4bit(w)            # NF4, blocksize 64, double quantization
    w_hat = q.dequantize()                  # back to w's dtype
    sd = q.to_bnb_state_dict("weight")      # bitsandbytes' keys, byte for byte
    q2 = QuantizedTensor.from_bnb_state_dict(sd, "weight")

docs/format.md describes the format; lowrank/reference.py is its math.
"""
from __future__ import annotations

import json
import math

import torch

from . import ops, reference
from .codebook import BUILTIN, Codebook, get_codebook

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the 8-bit absmax
_FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_OF_NAME = {v: k for k, v in _FLOAT_NAMES.items()}
_dynamic_maps: dict[str, torch.Tensor] = {}


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (fp32 [256]) on ``device``, cached."""
    key = str(torch.device(device))
    if key not in _dynamic_maps:
        _dynamic_maps[key] = reference.dynamic_map_signed().to(device)
    return _dynamic_maps[key]


def _check_blocksize(blocksize, what="blocksize"):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not (32 <= blocksize <= 4096) \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{what} must be a power of two in [32, 4096], got {blocksize!r}")


class QuantizedTensor:
    """A weight stored as packed 4-bit codes plus a per-block absmax (itself 8-bit quantized when
    double_quant). Immutable; ``to()`` returns a moved copy."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int,
                 codebook: Codebook, nested_absmax: torch.Tensor | None = None,
                 nested_quant_map: torch.Tensor | None = None, nested_offset: torch.Tensor | None = None,
                 nested_blocksize: int = NESTED_BLOCKSIZE, quant_storage: torch.dtype = torch.uint8):
        self.packed = packed.reshape(-1, 1)  # bitsandbytes' [ceil(n/2), 1]
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.codebook = codebook
        self.nested_absmax = nested_absmax
        self.nested_quant_map = nested_quant_map
        self.nested_offset = nested_offset  # fp32 scalar tensor on the device (no host sync)
        self.nested_blocksize = nested_blocksize
        self.quant_storage = quant_storage

    # -- description ---------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_type(self) -> str:
        return self.codebook.name

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quant_map(self) -> torch.Tensor:
        return self.codebook.tensors(self.device)[0]

    @property
    def nbytes(self) -> int:
        """Memory footprint in bytes: packed codes, absmax, nested absmax, code tables and offset."""
        parts = [self.packed, self.absmax, self.quant_map]
        if self.double_quant:
            parts += [self.nested_absmax, self.nested_quant_map, self.nested_offset]
        return sum(t.numel() * t.element_size() for t in parts)

    def __repr__(self):
        dq = f", double_quant (nested blocksize {self.nested_blocksize})" if self.double_quant else ""
        return (f"QuantizedTensor(shape={list(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
                f"blocksize={self.blocksize}{dq}, device={self.device}, nbytes={self.nbytes})")

    # -- use -------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight in ``dtype`` (default: the original dtype), shaped like it."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in _FLOAT_NAMES:
            raise ValueError(f"dequantize: dtype must be float32, float16 or bfloat16, got {dtype}")
        values = self.quant_map
        packed = self.packed.reshape(-1)
        if self.double_quant:
            flat = ops.dequantize_4bit_nested(packed, self.absmax, self.nested_absmax, self.nested_quant_map,
                                              self.nested_offset, values, self.blocksize, self.nested_blocksize,
                                              self.numel(), dtype)
        else:
            flat = ops.dequantize_4bit(packed, self.absmax, values, self.blocksize, self.numel(), dtype)
        return flat.view(self.shape)

    def float_absmax(self) -> torch.Tensor:
        """The per-block absmax as float32 (rebuilt from the 8-bit codes when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return ops.dequantize_8bit_blockwise(self.absmax, self.nested_absmax, self.nested_quant_map,
                                             self.nested_offset, self.nested_blocksize)

    def to(self, device) -> "QuantizedTensor":
        """A copy on ``device`` (no re-quantization: the bytes move as they are)."""
        def mv(t):
            return None if t is None else t.to(device)
        return QuantizedTensor(mv(self.packed), mv(self.absmax), self.shape, self.dtype, self.blocksize,
                               self.codebook, mv(self.nested_absmax), mv(self.nested_quant_map),
                               mv(self.nested_offset), self.nested_blocksize, self.quant_storage)

    def cuda(self, device=None) -> "QuantizedTensor":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    # -- bitsandbytes serialization --------------------------------------------------------------
    def bnb_quant_state_json(self) -> str:
        """The JSON object bitsandbytes packs into ``weight.quant_state.bitsandbytes__<type>``."""
        d = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _FLOAT_NAMES[self.dtype],
             "shape": list(self.shape)}
        if self.double_quant:
            d.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                      "nested_offset": float(self.nested_offset.item())})
        return json.dumps(d)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes' state-dict entries for this weight, in its key order and dtypes."""
        if self.quant_type not in BUILTIN or self.codebook is not BUILTIN[self.quant_type]:
            raise ValueError(f"bitsandbytes' format names only nf4 and fp4; codebook {self.quant_type!r} "
                             "cannot be saved in it")
        weight = self.packed
        if self.quant_storage != torch.uint8:
            weight = weight.reshape(-1).view(self.quant_storage).reshape(-1, 1)
        sd = {prefix: weight, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map.clone()}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_quant_map
        blob = self.bnb_quant_state_json().encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8, device=self.device)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "weight") -> "QuantizedTensor":
        """Load a weight saved by bitsandbytes (or by to_bnb_state_dict); validates every entry."""
        def get(key):
            if key not in sd:
                raise ValueError(f"bnb state dict: missing key {key!r} (have {sorted(sd)})")
            return sd[key]

        state_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(state_keys) != 1:
            raise ValueError(f"bnb state dict: expected one key {prefix}.quant_state.bitsandbytes__<nf4|fp4>, "
                             f"found {state_keys or 'none'}")
        suffix = state_keys[0].rsplit("__", 1)[1]
        try:
            blob = sd[state_keys[0]]
            meta = json.loads(bytes(blob.detach().cpu().reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"bnb state dict: {state_keys[0]} is not a valid JSON object: {e}") from None
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in meta:
                raise ValueError(f"bnb state dict: quant_state JSON lacks {field!r}: {meta}")
        quant_type = meta["quant_type"]
        if quant_type != suffix or quant_type not in BUILTIN:
            raise ValueError(f"bnb state dict: quant_type {quant_type!r} must be nf4 or fp4 and match the key "
                             f"suffix {suffix!r}")
        codebook = get_codebook(quant_type)
        _check_blocksize(meta["blocksize"], "bnb state dict: blocksize")
        blocksize = meta["blocksize"]
        if meta["dtype"] not in _DTYPE_OF_NAME:
            raise ValueError(f"bnb state dict: dtype must be one of {sorted(_DTYPE_OF_NAME)}, got {meta['dtype']!r}")
        shape = meta["shape"]
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"bnb state dict: shape must be a list of positive ints, got {shape!r}")
        n = math.prod(shape)
        n_blocks = -(-n // blocksize)

        weight = get(prefix)
        quant_storage = weight.dtype
        packed = weight.detach().contiguous().reshape(-1)
        if quant_storage != torch.uint8:
            packed = packed.view(torch.uint8)
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"bnb state dict: {prefix} holds {packed.numel()} bytes but shape {shape} needs "
                             f"{(n + 1) // 2}")
        quant_map = get(f"{prefix}.quant_map")
        values = codebook.tensors(quant_map.device)[0]
        if quant_map.dtype != torch.float32 or not torch.equal(quant_map.reshape(-1), values):
            raise ValueError(f"bnb state dict: {prefix}.quant_map is not the {quant_type} table")

        absmax = get(f"{prefix}.absmax")
        nested = "nested_offset" in meta
        nested_args = {}
        if nested:
            for field in ("nested_blocksize", "nested_dtype"):
                if field not in meta:
                    raise ValueError(f"bnb state dict: quant_state JSON lacks {field!r}: {meta}")
            _check_blocksize(meta["nested_blocksize"], "bnb state dict: nested_blocksize")
            if meta["nested_dtype"] != "float32":
                raise ValueError(f"bnb state dict: nested_dtype must be float32, got {meta['nested_dtype']!r}")
            offset = meta["nested_offset"]
            if not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"bnb state dict: nested_offset must be a finite number, got {offset!r}")
            nbs = meta["nested_blocksize"]
            _expect(absmax, torch.uint8, n_blocks, f"{prefix}.absmax")
            nested_absmax = get(f"{prefix}.nested_absmax")
            _expect(nested_absmax, torch.float32, -(-n_blocks // nbs), f"{prefix}.nested_absmax")
            nested_qmap = get(f"{prefix}.nested_quant_map")
            _expect(nested_qmap, torch.float32, 256, f"{prefix}.nested_quant_map")
            nested_args = dict(nested_absmax=nested_absmax.reshape(-1), nested_quant_map=nested_qmap.reshape(-1),
                               nested_offset=torch.tensor(offset, dtype=torch.float32, device=packed.device),
                               nested_blocksize=nbs)
        else:
            _expect(absmax, torch.float32, n_blocks, f"{prefix}.absmax")
        return cls(packed, absmax.reshape(-1), shape, _DTYPE_OF_NAME[meta["dtype"]], blocksize, codebook,
                   quant_storage=quant_storage, **nested_args)


def _expect(t: torch.Tensor, dtype: torch.dtype, numel: int, name: str):
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel:
        got = f"{t.dtype} with {t.numel()} elements" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"bnb state dict: {name} must be {dtype} with {numel} elements, got {got}")


def quantize_4bit(w: torch.Tensor, quant_type="nf4", blocksize: int = 64, double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8, check_finite: bool = True) -> QuantizedTensor:
    """Quantize a float weight to 4 bits, blockwise, as bitsandbytes does (same bytes for nf4).

    w: any shape, float32/float16/bfloat16, CPU or CUDA, finite; read in row-major order
    (a non-contiguous w is copied to contiguous first). quant_type: "nf4", "fp4" or a Codebook.
    double_quant: also quantize the absmax to 8 bits (blocksize 256, mean offset).
    check_finite: raise on NaN/inf in w. It costs one host sync (the GPU work is all queued
    first); pass False only where w is known finite and the sync matters (bulk quantization)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_4bit: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_NAMES:
        raise ValueError(f"quantize_4bit: w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize_4bit: w must be on a cpu or cuda device, got {w.device}")
    if w.numel() == 0:
        raise ValueError(f"quantize_4bit: w must not be empty, got shape {tuple(w.shape)}")
    _check_blocksize(blocksize)
    codebook = get_codebook(quant_type)
    if quant_storage not in (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_4bit: quant_storage must be a 1, 2 or 4 byte dtype, got {quant_storage}")
    n_packed = (w.numel() + 1) // 2
    if quant_storage != torch.uint8 and n_packed % torch.empty((), dtype=quant_storage).element_size():
        raise ValueError(f"quantize_4bit: {n_packed} packed bytes do not fill whole {quant_storage} words")
    x = w.detach().contiguous()
    _, thresholds, code_of_rank = codebook.tensors(x.device)
    packed, absmax = ops.quantize_4bit(x, thresholds, code_of_rank, blocksize, codebook.sign_magnitude)
    # Every launch is queued before the one host sync below (the finiteness check), so the GPU never
    # waits on Python. The mean is NaN/inf exactly when some absmax is (absmax >= 0, float64 sum).
    offset = ops.absmax_mean(absmax)
    if double_quant:
        codes, nested_absmax = ops.quantize_8bit_blockwise(absmax, dynamic_map(x.device), offset, NESTED_BLOCKSIZE)
    if check_finite and not bool(torch.isfinite(offset)):
        bad = int(torch.nonzero(~torch.isfinite(absmax))[0])
        raise ValueError(f"quantize_4bit: w must be finite, but block {bad} (elements {bad * blocksize} to "
                         f"{min((bad + 1) * blocksize, x.numel()) - 1} of the flattened weight) holds NaN or inf")
    if not double_quant:
        return QuantizedTensor(packed, absmax, w.shape, w.dtype, blocksize, codebook, quant_storage=quant_storage)
    return QuantizedTensor(packed, codes, w.shape, w.dtype, blocksize, codebook, nested_absmax,
                           dynamic_map(x.device), offset, NESTED_BLOCKSIZE, quant_storage)


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``q.dequantize(dtype)``: the weight in ``dtype`` (default: its original dtype)."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize_4bit: expected a lowrank.QuantizedTensor, got {type(q).__name__}")
    return q.dequantize(dtype)
