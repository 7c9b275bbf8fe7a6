"""Hypothesis strategies shared by the tests: weights that stress quantization (exact ties, zero
blocks, values over many decades, odd sizes) and codebooks (built-in and random)."""
import torch
from hypothesis import strategies as st

import lowrank

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
KINDS = ["normal", "small_ints", "zero_blocks", "decades", "signed_zero"]


def make_weight(n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "small_ints":  # k/12 in bf16/fp16 hits FP4's and NF4's thresholds exactly
        x = torch.randint(-12, 13, (n,), generator=g).float() / 12
    elif kind == "zero_blocks":
        x = torch.randn(n, generator=g)
        x[torch.rand(n, generator=g) < 0.5] = 0.0
        x[: min(n, 96)] = 0.0
    elif kind == "decades":
        x = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-20, 5, generator=g))
    elif kind == "signed_zero":
        x = torch.randn(n, generator=g)
        x[::3] = -0.0
    else:
        x = torch.randn(n, generator=g) * 0.02
    return x.to(dtype)


@st.composite
def codebooks(draw):
    choice = draw(st.sampled_from(["nf4", "fp4", "random", "quantile-like"]))
    if choice in ("nf4", "fp4"):
        return lowrank.get_codebook(choice)
    if choice == "random":  # any order, possibly repeated values
        vals = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=16, max_size=16))
        return lowrank.Codebook.from_values(vals, name="random")
    # a sorted, symmetric-ish table like the ones researchers try
    pos = sorted(draw(st.lists(st.floats(0.015625, 1, width=32), min_size=8, max_size=8, unique=True)))
    vals = [-v for v in pos[1:]] + [0.0] + pos
    return lowrank.Codebook.from_values(vals, name="symmetric")


@st.composite
def weights(draw, max_n=6000):
    n = draw(st.one_of(st.integers(1, 300), st.integers(1, max_n)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    misalign = draw(st.sampled_from([0, 0, 0, 1, 3]))  # element offset into a larger buffer
    return n, dtype, kind, seed, misalign
