"""The readable math of every lowrank op, in plain PyTorch: this file is the specification.

Kernels (CPU and CUDA) are tested against these functions bit for bit where the arithmetic is exact
(all of quantization is: comparisons, one IEEE reciprocal, one multiply per element), and the
bitsandbytes golden vectors are tested against them too. See docs/format.md for the format.

Conventions shared by every function here:
- A tensor is quantized as its row-major flattening; block ``b`` holds elements
  ``[b * blocksize, (b + 1) * blocksize)``; the last block may be partial.
- ``absmax[b]`` is float32 ``max |x|`` over the block's existing elements.
- 4-bit codes are packed two per byte, the first element in the HIGH nibble; with an odd element
  count the missing last element is quantized as if it were 0.0.
"""
from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# 4-bit codebooks. A codebook is described to the kernels by three tensors:
#   values [16] float32      the dequantized value of each 4-bit code (index = code)
#   thresholds [15] float32  ascending decision boundaries (only the first 7 are used in the
#                            sign-magnitude mode)
#   code_of_rank [16] uint8  the code chosen when x exceeds exactly ``rank`` thresholds
# Mode "sorted": rank = #{i : x > thresholds[i]} (strict: a tie goes to the lower value).
# Mode "sign_magnitude" (bitsandbytes FP4): sign bit 0b1000 set when x < 0, then
#   rank = #{i < 7 : |x| > thresholds[i]} picks the magnitude code code_of_rank[rank] (< 8).
# ---------------------------------------------------------------------------------------------

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (1 sign bit, 2 exponent bits, 1 mantissa bit), indexed by bit pattern, as bitsandbytes.
FP4_VALUES = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                      -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
# bitsandbytes' FP4 magnitude thresholds are these float literals, not the exact midpoints
# (0.583333 is not (0.5 + 2/3) / 2); byte compatibility needs them as they are.
FP4_MAGNITUDE_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667,
                            0.583333, 0.8333333)
# Magnitude codes (low 3 bits) in increasing order of value: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1.
FP4_MAGNITUDE_CODE_OF_RANK = (0, 1, 6, 7, 4, 5, 2, 3)


def midpoint_thresholds(sorted_values: torch.Tensor) -> torch.Tensor:
    """float32 midpoints between neighbouring sorted float32 values.

    (a + b) / 2 in float32 equals the exact midpoint rounded to float32 (scaling by 2 commutes with
    rounding), which is what bitsandbytes' NF4 literals are."""
    v = sorted_values.to(torch.float32)
    return (v[:-1] + v[1:]) / 2


def codes_4bit(xn: torch.Tensor, thresholds: torch.Tensor, code_of_rank: torch.Tensor,
               sign_magnitude: bool) -> torch.Tensor:
    """4-bit code (int64) of each normalized float32 value. NaN fails every comparison: code_of_rank[0]."""
    thresholds = thresholds.to(device=xn.device, dtype=torch.float32)
    code_of_rank = code_of_rank.to(device=xn.device, dtype=torch.int64)
    if sign_magnitude:
        magnitude = xn.abs()
        rank = (magnitude.unsqueeze(-1) > thresholds[:7]).sum(-1)
        return code_of_rank[rank] | ((xn < 0).to(torch.int64) << 3)
    rank = (xn.unsqueeze(-1) > thresholds).sum(-1)
    return code_of_rank[rank]


def _blocks(x: torch.Tensor, blocksize: int, fill: float = 0.0) -> torch.Tensor:
    """Flatten to float32 and view as [n_blocks, blocksize], the tail padded with ``fill``."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.view(n_blocks, blocksize)


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 max |x| per block; NaN propagates (the caller rejects non-finite weights)."""
    return _blocks(x, blocksize).abs().amax(dim=1)


def quantize_4bit(x: torch.Tensor, thresholds: torch.Tensor, code_of_rank: torch.Tensor,
                  blocksize: int, sign_magnitude: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization. Returns (packed uint8 [ceil(n/2)], absmax float32 [n_blocks]).

    Normalization multiplies by the float32 reciprocal of absmax, as bitsandbytes does (not a
    division). An all-zero block has absmax 0: 0 * inf = NaN, so every element there takes
    code_of_rank[0]."""
    n = x.numel()
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.reciprocal(absmax)
    codes = codes_4bit(blocks * inverse[:, None], thresholds, code_of_rank, sign_magnitude)
    codes = codes.reshape(-1)[: n + (n & 1)]  # the padding element of an odd n is a real 0.0
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.to(torch.uint8), absmax


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 codes [numel] from packed bytes (high nibble first)."""
    b = packed.reshape(-1).to(torch.int64)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:numel]


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, values: torch.Tensor,
                    blocksize: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """out[i] = dtype(values[code[i]] * absmax[i // blocksize]), the product in float32 then
    rounded to nearest even. Returns a flat tensor of ``numel`` elements."""
    codes = unpack_4bit(packed, numel)
    values = values.to(device=packed.device, dtype=torch.float32)
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:numel]
    return (values[codes] * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise quantization (used for the nested absmax of double quantization)
# ---------------------------------------------------------------------------------------------

def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map: 256 sorted float32 values.

    7 decades (1e-6 .. 1) each split into 2**i linearly spaced mantissa bins (bin centres of
    linspace(0.1, 1, 2**i + 1)), mirrored for negatives, plus 0.0 and 1.0. Index 127 is 0.0,
    index 255 is 1.0, and -1.0 is not in the map."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-6 + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def code_8bit(xn: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a sorted 256-entry map, found as bitsandbytes finds it.

    A binary search of 7 halving steps (64, 32, .., 1) starting at index 127 keeps the last index
    it went up from (``lower``) and down from (``upper``); x is then compared with the midpoint
    between the final index and the neighbour on x's side. The path decides exact ties, so the
    spec is the search itself, not just "nearest"."""
    qmap = qmap.to(device=xn.device, dtype=torch.float32)
    pivot = torch.full_like(xn, 127, dtype=torch.int64)
    lower_idx = torch.zeros_like(pivot)
    upper_idx = torch.full_like(pivot, 255)
    lower = torch.full_like(xn, -1.0)
    upper = torch.full_like(xn, 1.0)
    val = qmap[pivot]
    step = 64
    while step > 0:
        up = xn > val
        lower_idx = torch.where(up, pivot, lower_idx)
        lower = torch.where(up, val, lower)
        upper_idx = torch.where(up, upper_idx, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = qmap[pivot]
        step //= 2
    upper = torch.where(upper_idx == 255, qmap[255], upper)
    lower = torch.where(lower_idx == 0, qmap[0], lower)
    up = xn > val
    go_upper = up & (xn > (upper + val) * 0.5)
    go_lower = ~up & (xn < (lower + val) * 0.5)
    return torch.where(go_upper, upper_idx, torch.where(go_lower, lower_idx, pivot))


def quantize_8bit_blockwise(x: torch.Tensor, qmap: torch.Tensor, blocksize: int,
                            offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of float32 ``x - offset`` (a float32 subtraction):
    (codes uint8 [n], absmax float32 [n_blocks])."""
    n = x.numel()
    x = x.to(torch.float32) - torch.tensor(offset, dtype=torch.float32, device=x.device)
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    xn = blocks * torch.reciprocal(absmax)[:, None]
    return code_8bit(xn, qmap).reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_8bit_blockwise(q: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor,
                              blocksize: int, offset: float = 0.0) -> torch.Tensor:
    """float32 ``qmap[q] * absmax[i // blocksize] + offset``: a rounded product, then a rounded sum
    (two roundings, no fused multiply-add), as bitsandbytes' dequantize followed by ``+= offset``."""
    n = q.numel()
    qmap = qmap.to(device=q.device, dtype=torch.float32)
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    out = qmap[q.reshape(-1).to(torch.int64)] * scale
    return out + torch.tensor(offset, dtype=torch.float32, device=q.device)


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quantization offset (float32 scalar tensor): the mean of the float32 absmax,
    summed in float64 and rounded to float32 once, so that CPU and CUDA agree (a float32 sum
    depends on its order; a float64 one moves the float32 result only when the mean lies within
    ~1e-16 of a float32 rounding boundary)."""
    return (torch.sum(absmax, dtype=torch.float64) / absmax.numel()).to(torch.float32)


def double_quantize(absmax: torch.Tensor, qmap: torch.Tensor, nested_blocksize: int = 256):
    """bitsandbytes' double quantization: (codes uint8, nested_absmax float32, offset float).

    The absmax values are centred on their mean (float32 subtraction) and quantized blockwise to
    8 bits with the signed dynamic map."""
    offset = float(absmax_mean(absmax))
    codes, nested_absmax = quantize_8bit_blockwise(absmax, qmap, nested_blocksize, offset)
    return codes, nested_absmax, offset


def dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_qmap, offset, values,
                           blocksize, nested_blocksize, numel, dtype):
    """Dequantize with a double-quantized absmax: rebuild absmax in float32, then dequantize."""
    absmax = dequantize_8bit_blockwise(absmax_codes, nested_absmax, nested_qmap,
                                       nested_blocksize, offset)
    return dequantize_4bit(packed, absmax, values, blocksize, numel, dtype)
