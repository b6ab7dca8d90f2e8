"""Test cases for per-token-group quantization and its scale layouts, shared by CPU and GPU tests.

`enumerate_*` functions return case tuples (each row commented with why it exists); `generate_*`
functions make seeded random inputs for a case. Nothing here runs a kernel or asserts anything.

Inputs are never zeros alone: every group gets its own magnitude (a spread of powers of two), and
`generate_activation` plants special groups where the shape has room for them:

    zeros        all-zero group: amax is floored to eps, scale eps/QMAX, q all zero bytes
    max_odd      the group's |max| at an odd index (one published kernel's reduction skipped odd lanes)
    pow2_exact   amax = QMAX * 2^k exactly: a power-of-two scale that must NOT be rounded up
    pow2_bump    amax one input ulp above QMAX * 2^k: the power-of-two scale must round up to 2^(k+1)
    nan, +inf, -inf   non-finite groups: scale NaN, fp8 0x7F / int8 0 (fp8linear.reference docstring),
                 and nothing leaks into neighbouring groups
"""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
INT8 = torch.int8
IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = (FP8, INT8)
GROUP_SIZES = (16, 32, 64, 128, 256)
LAYOUTS = ("row", "col", "ue8m0_packed")
QMAX = {FP8: 448.0, INT8: 127.0}

#: Special groups in the order they are planted (the first ones win when groups are scarce).
SPECIALS = ("zeros", "nan", "pos_inf", "neg_inf", "pow2_exact", "pow2_bump")
NONFINITE_SPECIALS = ("nan", "pos_inf", "neg_inf")

#: Finite garbage written around strided views: if a kernel reads outside the view, amax changes.
STRIDE_GARBAGE = 30000.0  # fits fp16 (max 65504)


# ------------------------------------------------------------------------------------------------
# case tuples
# ------------------------------------------------------------------------------------------------

class QuantConfig(NamedTuple):
    """What the op is asked to do (independent of the input's shape)."""

    in_dtype: torch.dtype
    out_dtype: torch.dtype
    group_size: int
    layout: str
    scale_ue8m0: bool  # True for every ue8m0_packed config (the layout implies it)


class QuantCase(NamedTuple):
    """One call of per_token_group_quant: a config plus an input shape and its memory layout."""

    M: int
    K: int
    group_size: int
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    layout: str
    scale_ue8m0: bool
    row_pad: int = 0  # 0: contiguous rows; > 0: rows are a slice of a buffer row_pad elements wider
    batch: int = 0  # 0: 2-D [M, K]; E > 0: 3-D [E, M, K]

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(self.in_dtype, self.out_dtype, self.group_size, self.layout, self.scale_ue8m0)

    @property
    def shape(self) -> tuple[int, ...]:
        return ((self.batch,) if self.batch else ()) + (self.M, self.K)

    def id(self) -> str:
        """A short pytest id: M x K, g, dtypes, layout, pow2, strided, batched."""
        parts = [f"{self.batch}x" if self.batch else "", f"{self.M}x{self.K}", f"-g{self.group_size}",
                 f"-{_short(self.in_dtype)}-{_short(self.out_dtype)}-{self.layout}"]
        if self.scale_ue8m0 and self.layout != "ue8m0_packed":
            parts.append("-pow2")
        if self.row_pad:
            parts.append(f"-pad{self.row_pad}")
        return "".join(parts)


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8", INT8: "int8"}[dtype]


def enumerate_configs(in_dtypes=IN_DTYPES, out_dtypes=OUT_DTYPES, group_sizes=GROUP_SIZES,
                      layouts=LAYOUTS) -> list[QuantConfig]:
    """Every valid (in_dtype, out_dtype, g, layout, scale_ue8m0): 3 x 5 x 9 = 135 with the defaults.

    Per (in_dtype, g): fp8 and int8 x row and col x pow2 off/on (8), plus fp8 ue8m0_packed (1), which
    implies power-of-two scales and has no int8 form (the op rejects it).
    """
    configs = []
    for in_dtype, g, out_dtype, layout in itertools.product(in_dtypes, group_sizes, out_dtypes, layouts):
        if layout == "ue8m0_packed":
            if out_dtype == FP8:
                configs.append(QuantConfig(in_dtype, out_dtype, g, layout, True))
            continue
        for pow2 in (False, True):
            configs.append(QuantConfig(in_dtype, out_dtype, g, layout, pow2))
    return configs


def enumerate_layout_shapes() -> list[tuple[tuple[int, ...], int, int]]:
    """(batch, M, G) for layout tests: every M around the padding of 4, G around the packing of 4."""
    Ms = (
        0,  # empty: shapes and strides must still be right, storage may be empty
        1,  # one token (decode): M_pad = 4, three padding rows
        3,  # M_pad = 4, one padding row
        4,  # exactly aligned: no padding
        5,  # one past alignment: M_pad = 8
    )
    Gs = (
        1, 2, 3,  # fewer groups than one packed word: bytes past G are 0
        4,  # exactly one packed word
        5, 6, 7,  # the seed kernel's bug: a partial last word (G % 4 != 0)
        56,  # K = 7168 at g = 128 (DeepSeek-V3 hidden size): 14 full words
    )
    batches = ((), (2,))  # 2-D, and 3-D [E, M, K] whose batch stride is one whole padded matrix
    return [(b, M, G) for b in batches for M in Ms for G in Gs]


def enumerate_small_shapes(group_size: int) -> list[tuple[int, int]]:
    """(M, K) small enough for a Python-loop oracle, with 1, 3 and 5 groups per row."""
    return [
        (1, group_size),  # one token, one group: the smallest launch
        (3, 3 * group_size),  # M_pad = 4; G = 3: partial packed word
        (5, 5 * group_size),  # M_pad = 8; G = 5: one full and one partial packed word
    ]


#: The quant kernel's GPU grid (tests/test_quant_gpu.py).
GPU_MS = (
    0,  # empty input: nothing launched, empty outputs
    1, 3, 4, 5,  # around the padding of M to 4 (decode sizes)
    17,  # odd, more than one warp/CTA row tile in most designs
    128,  # a typical prefill tile
    1000,  # not a multiple of any tile: the tail block path
    4096,  # large prefill: many CTAs per SM
)
GPU_KS = (
    128,  # one group at g = 128
    384,  # G = 3 at g = 128: partial packed word
    640,  # G = 5: one full and one partial packed word
    1664,  # G = 13 at g = 128, 26 at g = 64: odd word counts
    4096,  # Llama-class hidden size
    7168,  # DeepSeek-V3 hidden size, G = 56
)


def enumerate_quant_cases_gpu(seed: int = 0, per_shape: int = 2) -> list[QuantCase]:
    """The quant kernel's GPU grid, about 600 cases: every config on small shapes, every grid shape with
    `per_shape` configs drawn (seeded) from all valid ones, plus strided and 3-D variants.

    Deterministic for a given seed, so a failure names a case that reruns.
    """
    rng = random.Random(seed)
    configs = enumerate_configs()
    cases: list[QuantCase] = []

    # 1. Every config once on a small odd shape (bf16-sized work, quick), and once at M = 1.
    for c in configs:
        K = 5 * 128 if c.group_size <= 128 else 7168  # G = 5 (partial word) / 28 for g = 256
        cases.append(QuantCase(17, K, *_cfg(c)))  # all 135 configs, M not a multiple of 4
        cases.append(QuantCase(1, 7168, *_cfg(c)))  # decode: one row, 56 groups at g = 128

    # 2. Every shape of the grid with a few random configs valid for its K.
    for M, K in itertools.product(GPU_MS, GPU_KS):
        valid = [c for c in configs if K % c.group_size == 0]
        for c in rng.sample(valid, per_shape):
            cases.append(QuantCase(M, K, *_cfg(c)))

    # 3. Strided rows: a slice of a wider buffer. pad 64 keeps 16-byte row alignment for every input
    #    dtype; pad 3 breaks it (rows start at odd addresses), which a vectorized kernel must handle.
    for M, K, pad in ((5, 640, 64), (17, 1664, 3), (1000, 4096, 8), (4, 7168, 3), (128, 7168, 64)):
        for c in rng.sample([c for c in configs if K % c.group_size == 0], 3):
            cases.append(QuantCase(M, K, *_cfg(c), row_pad=pad))

    # 4. 3-D [E, M, K] (batched experts): scales [E, M, G], col batch stride G * M_pad.
    for E, M, K, pad in ((3, 5, 640, 0), (2, 17, 1664, 0), (4, 128, 7168, 0), (3, 5, 640, 3)):
        for c in rng.sample([c for c in configs if K % c.group_size == 0], 3):
            cases.append(QuantCase(M, K, *_cfg(c), row_pad=pad, batch=E))
    return cases


def _cfg(c: QuantConfig) -> tuple:
    return (c.group_size, c.in_dtype, c.out_dtype, c.layout, c.scale_ue8m0)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def _magnitude_range(dtype: torch.dtype) -> tuple[int, int]:
    """log2 range of per-group magnitudes that stays finite and mostly normal in `dtype`."""
    return (-8, 8) if dtype == torch.float16 else (-16, 16)


def _next_up(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The next representable value above positive `value` in `dtype`, as a 0-dim tensor of `dtype`."""
    t = torch.tensor(value, dtype=dtype)
    as_int = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return (t.view(as_int) + 1).view(dtype)


def generate_activation(
    shape: tuple[int, ...],
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    out_dtype: torch.dtype = FP8,
    specials: "bool | tuple[str, ...]" = True,
    max_odd_fraction: float = 0.25,
    device: "torch.device | str" = "cpu",
    return_specials: bool = False,
):
    """Seeded random x of `shape` ([M, K] or [E, M, K]) in `dtype`, contiguous, on `device`.

    Each group of `group_size` along K gets normal values times its own power of two (2^-16..2^16,
    2^-8..2^8 for fp16), so scales span many exponents. Then, where there are enough groups:
    `max_odd_fraction` of groups get their |max| (random sign) at a random odd index, and the groups of
    `specials` (True: all of SPECIALS; False or (): none) are planted in distinct random groups.
    `out_dtype` picks QMAX for the pow2_exact/pow2_bump groups.

    Returns x, or (x, {special name: (flat group index, batch index tuple, row, group)}) when
    `return_specials`. Generated on CPU with its own generator (device-independent values), then moved.
    """
    *lead, K = shape
    if K % group_size:
        raise ValueError(f"K={K} must be divisible by group_size={group_size}")
    G = K // group_size
    rows = 1
    for n in lead:
        rows *= n
    n_groups = rows * G
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _magnitude_range(dtype)

    x = torch.randn(n_groups, group_size, generator=gen)
    x *= torch.exp2(torch.randint(lo, hi + 1, (n_groups, 1), generator=gen).float())
    x = x.to(dtype)

    placed = {}
    if n_groups:
        # The |max| at an odd index: twice the group's amax, so it is the unique maximum.
        n_odd = int(n_groups * max_odd_fraction)
        if n_odd and group_size > 1:
            groups = torch.randperm(n_groups, generator=gen)[:n_odd]
            for grp in groups.tolist():
                idx = 2 * int(torch.randint(0, group_size // 2, (1,), generator=gen)) + 1
                sign = 1.0 if bool(torch.randint(0, 2, (1,), generator=gen)) else -1.0
                amax = float(x[grp].float().abs().max())
                x[grp, idx] = sign * 2.0 * amax

        names = SPECIALS if specials is True else tuple(specials or ())
        order = torch.randperm(n_groups, generator=gen).tolist()
        qmax = QMAX[out_dtype]
        for name, grp in zip(names, order):
            idx = 2 * int(torch.randint(0, max(group_size // 2, 1), (1,), generator=gen)) + (group_size > 1)
            k = int(torch.randint(-8, 1, (1,), generator=gen))  # QMAX * 2^k within every input range
            body = (torch.rand(group_size, generator=gen) * 1.8 - 0.9)
            if name == "zeros":
                x[grp] = 0
            elif name in NONFINITE_SPECIALS:
                x[grp, idx] = {"nan": float("nan"), "pos_inf": float("inf"), "neg_inf": float("-inf")}[name]
            elif name == "pow2_exact":
                amax = qmax * 2.0 ** k
                x[grp] = (body * amax).to(dtype)  # |body| <= 0.9: stays below amax after rounding
                x[grp, idx] = -amax
            elif name == "pow2_bump":
                top = _next_up(qmax * 2.0 ** k, dtype)
                x[grp] = (body * float(top)).to(dtype)
                x[grp, idx] = top
            else:
                raise ValueError(f"unknown special group {name!r}; expected one of {SPECIALS}")
            pos = list(_unflatten(grp, lead, G))
            placed[name] = (grp, tuple(pos[:-2]), pos[-2], pos[-1])

    x = x.reshape(shape).to(device)
    return (x, placed) if return_specials else x


def _unflatten(grp: int, lead: list[int], G: int) -> tuple[int, ...]:
    """Flat group index -> (*batch, row, group)."""
    idx = [grp % G]
    rest = grp // G
    for n in reversed(lead):
        idx.append(rest % n if n else 0)
        rest = rest // n if n else 0
    return tuple(reversed(idx))


def make_strided(x: torch.Tensor, row_pad: int, offset: "int | None" = None) -> torch.Tensor:
    """A view equal to x whose rows are strided: x sits at column `offset` (default min(row_pad, 5)) of a
    buffer `row_pad` elements wider, surrounded by finite garbage (STRIDE_GARBAGE). 3-D inputs also get
    a padding row per batch, so the batch stride is not M * row stride either.

    row_pad = 0 returns x itself. The last dim stays contiguous.
    """
    if row_pad == 0:
        return x
    offset = min(row_pad, 5) if offset is None else offset
    if not 0 <= offset <= row_pad:
        raise ValueError(f"offset must be in [0, row_pad={row_pad}]; got {offset}")
    *lead, M, K = x.shape
    extra_rows = 1 if lead else 0
    buf = torch.full((*lead, M + extra_rows, K + row_pad), STRIDE_GARBAGE, dtype=x.dtype, device=x.device)
    view = buf[..., :M, offset:offset + K]
    view.copy_(x)
    return view


def generate_case_input(case: QuantCase, seed: int = 0, device="cpu", specials=True) -> torch.Tensor:
    """The input of `case`: generate_activation for its shape and dtypes, strided if it says so."""
    x = generate_activation(case.shape, case.group_size, case.in_dtype, seed=seed, out_dtype=case.out_dtype,
                            specials=specials, device=device)
    return make_strided(x, case.row_pad)
