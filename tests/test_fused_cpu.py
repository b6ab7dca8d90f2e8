"""Fused SiLU-and-mul / RMSNorm quantization (fp8linear.fused) and FP8GatedMLP (fp8linear.mlp) on CPU.

The references of fp8linear.fused are checked against naive second implementations that share no code
with them: Python loops, IEEE fp32 arithmetic through numpy float32 scalars, the exp written again from
its definition in the module docstring, the sum of squares lane by lane; the quantization step is
tests/test_quant_cpu.py's `naive_quant`. Where they agree bit for bit, the references are fit oracles
for the CUDA kernels (tests/test_fused_gpu.py). The generators here are shared with that file.
"""

from __future__ import annotations

import math
import pathlib
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from cases import FP8, INT8, make_strided
from conftest import assert_bitwise_equal, poison_
from fp8linear import fused
from fp8linear.fused import (
    exp_fp32,
    rmsnorm_quant,
    rmsnorm_reference,
    silu_and_mul_quant,
    silu_and_mul_reference,
    sum_of_squares_fixed_order,
)
from fp8linear.layouts import empty_scales
from test_quant_cpu import assert_matches, naive_quant

REPO = pathlib.Path(__file__).resolve().parent.parent
F32 = np.float32
LAYOUT_DTYPES = [("row", FP8), ("row", INT8), ("col", FP8), ("col", INT8), ("ue8m0_packed", FP8)]
LAYOUT_DTYPE_IDS = [f"{lay}-{'fp8' if d == FP8 else 'int8'}" for lay, d in LAYOUT_DTYPES]
IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------------------
# inputs (shared with tests/test_fused_gpu.py)
# ------------------------------------------------------------------------------------------------

def make_silu_input(M: int, I: int, dtype: torch.dtype = torch.bfloat16, *, seed: int = 0, group_size: int = 128,
                    specials: bool = True) -> torch.Tensor:
    """x [M, 2I] = [gate | up], contiguous. gate ~ N(0, 4^2) with planted extremes that walk exp's edges
    (-100, -89.5, -88.6, 17.4, 32.5, 100: overflow of exp(-g), 1 + e == 1); up gets a power of two per
    output group (2^-12..2^12, 2^-6..2^6 for fp16) so scales span exponents. With `specials`, where
    rows allow: a NaN gate, an Inf up, a -Inf gate, and an all-zero gate group (silu(0) = 0: an all-zero
    output group, scale eps/QMAX)."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(M, I, generator=gen) * 4.0
    if M * I:
        edges = torch.tensor([-100.0, -89.5, -88.6, 17.4, 32.5, 100.0, -17.4, -32.5])
        idx = torch.randint(0, M * I, (min(M * I // 4, 64),), generator=gen)
        gate.view(-1)[idx] = edges[torch.randint(0, len(edges), idx.shape, generator=gen)]
    G = I // group_size
    lo, hi = (-6, 6) if dtype == torch.float16 else (-12, 12)
    up = torch.randn(M, G, group_size, generator=gen)
    up = (up * torch.exp2(torch.randint(lo, hi + 1, (M, G, 1), generator=gen).float())).reshape(M, I)
    if specials and M >= 4 and G >= 2:
        rows = torch.randperm(M, generator=gen)[:4].tolist()
        cols = torch.randint(0, I, (4,), generator=gen).tolist()
        gate[rows[0], cols[0]] = float("nan")
        up[rows[1], cols[1]] = float("inf")
        gate[rows[2], cols[2]] = float("-inf")
        j = cols[3] // group_size
        gate[rows[3], j * group_size:(j + 1) * group_size] = 0.0
    return torch.cat([gate, up], dim=1).to(dtype)


def make_rms_input(M: int, H: int, dtype: torch.dtype = torch.bfloat16, *, seed: int = 0, specials: bool = True):
    """(x [M, H], weight [H]) in `dtype`. Each row has its own power-of-two magnitude; weight ~ 1 + N(0, 0.5)
    with some negatives. With `specials`, where rows allow: an all-zero row (y = 0: every group zero), a
    row holding an Inf (that group NaN, the others 0), a row holding a NaN (the whole row NaN) and, for
    bf16/fp32, a row whose squares overflow fp32 (r = 0, y = 0)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-6, 6) if dtype == torch.float16 else (-16, 16)
    x = torch.randn(M, H, generator=gen) * torch.exp2(torch.randint(lo, hi + 1, (M, 1), generator=gen).float())
    weight = 1.0 + 0.5 * torch.randn(H, generator=gen)
    if specials and M >= 5:
        rows = torch.randperm(M, generator=gen)[:4].tolist()
        cols = torch.randint(0, H, (3,), generator=gen).tolist()
        x[rows[0]] = 0.0
        x[rows[1], cols[0]] = float("inf")
        x[rows[2], cols[1]] = float("nan")
        if dtype != torch.float16:
            x[rows[3], cols[2]] = 3e30
    return x.to(dtype), weight.to(dtype)


# ------------------------------------------------------------------------------------------------
# naive second implementations: loops and numpy float32 scalars
# ------------------------------------------------------------------------------------------------

def _bits_f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def naive_exp(t: np.float32) -> np.float32:
    """fp8linear.fused's exp_fp32, written again from the docstring's formula, one scalar at a time."""
    c = {k: _bits_f32(v) for k, v in fused.EXP_CONSTANT_BITS.items()}
    n = np.rint(F32(t * c["LOG2E"]))
    r = F32(t - F32(n * c["LN2_HI"]))
    r = F32(r - F32(n * c["LN2_LO"]))
    p = F32(1.0)
    for k in ("C7", "C6", "C5", "C4", "C3", "C2"):  # Horner from the top coefficient, p starts at 1/7!
        p = c[k] if k == "C7" else F32(F32(p * r) + c[k])
    p = F32(F32(p * r) + F32(1.0))
    p = F32(F32(p * r) + F32(1.0))
    if math.isnan(float(n)):
        return F32("nan")
    ni = int(n)
    n1 = ni // 2  # floor division: the arithmetic shift
    n2 = ni - n1
    return F32(F32(p * F32(2.0 ** n1)) * F32(2.0 ** n2))


def naive_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[M, 2I] -> [M, I] in x's dtype, one element at a time."""
    M, two_I = x.shape
    I = two_I // 2
    xf = x.float().numpy()
    a = np.zeros((M, I), dtype=np.float32)
    with np.errstate(all="ignore"):
        for m in range(M):
            for k in range(I):
                g = F32(xf[m, k])
                t = F32(-g)
                if not math.isnan(float(t)):
                    t = min(max(t, F32(-32.0)), F32(89.0))
                a[m, k] = F32(g / F32(F32(1.0) + naive_exp(t)))
    silu = torch.from_numpy(a).to(x.dtype).float().numpy()  # F.silu(g) rounded to x's dtype
    with np.errstate(all="ignore"):
        for m in range(M):
            for k in range(I):
                a[m, k] = F32(F32(silu[m, k]) * F32(xf[m, I + k]))
    return torch.from_numpy(a).to(x.dtype)


def naive_rmsnorm(x: torch.Tensor, weight: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """[M, H] -> [M, H] in x's dtype: the fixed summation order of fp8linear.fused, lane by lane."""
    M, H = x.shape
    xf = x.float().numpy()
    wf = weight.float().numpy()
    out = np.zeros((M, H), dtype=np.float32)
    with np.errstate(all="ignore"):
        for m in range(M):
            lanes = [F32(0.0)] * 256
            for lane in range(256):
                for c in range(lane, H // 8, 256):
                    for k in range(8):
                        v = F32(xf[m, 8 * c + k])
                        lanes[lane] = F32(lanes[lane] + F32(v * v))
            warps = []
            for w in range(8):
                vals = lanes[32 * w:32 * w + 32]
                while len(vals) > 1:
                    half = len(vals) // 2
                    vals = [F32(vals[j] + vals[j + half]) for j in range(half)]
                warps.append(vals[0])
            while len(warps) > 1:
                half = len(warps) // 2
                warps = [F32(warps[j] + warps[j + half]) for j in range(half)]
            var = F32(warps[0] / F32(H))
            r = F32(F32(1.0) / np.sqrt(F32(var + F32(rms_eps))))
            h = torch.from_numpy(np.array([F32(F32(v) * r) for v in xf[m]], dtype=np.float32)).to(x.dtype).float()
            out[m] = np.array([F32(F32(wf[k]) * F32(h[k].item())) for k in range(H)], dtype=np.float32)
    return torch.from_numpy(out).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# exp_fp32 and the kernel's copy of its constants
# ------------------------------------------------------------------------------------------------

def test_exp_constants_are_the_named_values():
    named = {"LOG2E": 1 / math.log(2), "LN2_HI": 0.693145751953125, "LN2_LO": math.log(2) - 0.693145751953125,
             "C2": 1 / 2, "C3": 1 / 6, "C4": 1 / 24, "C5": 1 / 120, "C6": 1 / 720, "C7": 1 / 5040}
    for name, value in named.items():
        assert _bits_f32(fused.EXP_CONSTANT_BITS[name]) == F32(value), name
    # n * LN2_HI must be exact for |n| <= 128: LN2_HI has at most 16 significant bits.
    assert (fused.EXP_CONSTANT_BITS["LN2_HI"] & 0xFF) == 0


def test_kernel_header_holds_the_same_constants():
    text = (REPO / "kernels" / "fused_quant.cuh").read_text()
    kernel = {m.group(1): int(m.group(2), 16) for m in re.finditer(r"constexpr uint32_t k(\w+)Bits = 0x([0-9A-Fa-f]+)u;", text)}
    names = {"Log2e": "LOG2E", "Ln2Hi": "LN2_HI", "Ln2Lo": "LN2_LO", **{f"C{i}": f"C{i}" for i in range(2, 8)}}
    assert {names[k]: v for k, v in kernel.items()} == fused.EXP_CONSTANT_BITS
    lo, hi = fused.EXP_CLAMP
    assert f"kExpClampLo = {lo:.1f}f" in text and f"kExpClampHi = {hi:.1f}f" in text


def test_exp_fp32_accuracy():
    """Within 1.5 ulp of the exact exp over the whole clamp range (measured max: 1.17 ulp)."""
    t = torch.cat([torch.linspace(-32.0, 88.72, 400_001), torch.randn(100_000) * 8]).clamp(-32.0, 88.72)
    e = exp_fp32(t)
    exact = torch.exp(t.double())
    ulp = (torch.nextafter(exact.float(), torch.tensor(math.inf)).double() - exact.float().double())
    err = ((e.double() - exact).abs() / ulp).max().item()
    assert err < 1.5, f"exp_fp32 max error {err:.3f} ulp"


def test_exp_fp32_edges():
    """Overflow where the true exp overflows (t > ln(FLT_MAX) ~ 88.7228); exp(0) = 1 exactly; NaN stays NaN."""
    e = exp_fp32(torch.tensor([0.0, 88.72, 88.7229, 89.0, float("nan")]))
    assert e[0].item() == 1.0
    assert math.isfinite(e[1].item()) and math.isinf(e[2].item()) and math.isinf(e[3].item())
    assert math.isnan(e[4].item())


def test_naive_exp_matches_exp_fp32():
    t = torch.cat([torch.linspace(-32.0, 89.0, 1001), torch.randn(500) * 10]).clamp(-32.0, 89.0)
    with np.errstate(all="ignore"):
        naive = torch.tensor([naive_exp(F32(v)) for v in t.tolist()], dtype=torch.float32)
    assert_bitwise_equal(exp_fp32(t), naive, "exp_fp32")


def kernel_fast_exp(t: torch.Tensor) -> torch.Tensor:
    """kernels/fused_quant.cuh's exp_fp32<false> (the plain form fp32 inputs use), emulated step for step: rint by
    the 1.5 * 2^23 shifter, the scaling by an add to the exponent field (scale_by_shifted_bits). Finite t
    only (the kernel's clamp never passes a NaN)."""
    c = {k: torch.tensor(v, dtype=torch.int32).view(torch.float32) for k, v in fused.EXP_CONSTANT_BITS.items()}
    shifter = torch.tensor(12582912.0)
    shifted = t * c["LOG2E"] + shifter  # two torch ops: two roundings, as __fmul_rn then __fadd_rn
    n = shifted - shifter
    r = (t - n * c["LN2_HI"]) - n * c["LN2_LO"]
    p = r * c["C7"]
    for k in ("C6", "C5", "C4", "C3", "C2"):
        p = (p + c[k]) * r
    p = (p + 1.0) * r + 1.0
    return scale_by_shifted_bits(p, shifted)


def scale_by_shifted_bits(p: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """The kernel's p * 2^n: p's bits plus the shifted sum's bits << 23 in uint32 arithmetic (the shifter's
    own bits shift out), then the unsigned min with inf's bits."""
    mask = (1 << 32) - 1
    p_bits = p.view(torch.int32).to(torch.int64) & mask
    s_bits = shifted.view(torch.int32).to(torch.int64) & mask
    bits = (p_bits + ((s_bits << 23) & mask)) & mask
    return torch.clamp(bits, max=0x7F800000).to(torch.int32).view(torch.float32)


def test_kernel_fast_exp_is_exp_fp32():
    """The kernel's cheaper exp gives exp_fp32's bits over the whole clamp range: a dense sweep, every
    t where t * log2(e) is a half-integer (rint's ties), the overflow edge and the clamp's ends."""
    sweep = torch.linspace(-32.0, 89.0, 2_000_001)
    ties = (torch.arange(-93, 258, dtype=torch.float32) * 0.5) / torch.tensor(1.4426950408889634)
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    ties = torch.cat([ties, torch.nextafter(ties, up), torch.nextafter(ties, down)])
    edge = torch.tensor([88.3762626647949, 88.72283172607422, 88.7228317260742, 88.72284, 89.0, -32.0, 0.0, -0.0])
    t = torch.cat([sweep, ties.clamp(-32.0, 89.0), edge])
    with np.errstate(all="ignore"):
        assert_bitwise_equal(kernel_fast_exp(t), exp_fp32(t), "fast exp")
    assert torch.isinf(kernel_fast_exp(torch.tensor([89.0]))).all()


def fma_fp32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 fused multiply-add (CUDA's __fmaf_rn), exactly, from float64 torch ops: a * b is exact in
    float64; the sum's rounding error comes exactly from TwoSum; the float64 sum is then rounded to odd
    (an inexact sum with an even last bit steps toward the error), and rounding a round-to-odd value of
    53 bits to 24 is correct rounding (53 >= 24 + 2), so no double-rounding error is possible."""
    a, b, c = torch.broadcast_tensors(a, b, c)
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    back = s - p
    err = (p - (s - back)) + (cd - back)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    toward = torch.nextafter(s, torch.where(err > 0, inf, -inf))
    even = (s.view(torch.int64) & 1) == 0
    return torch.where((err != 0) & even, toward, s).float()


def round_fraction_to_fp32(v: "Fraction") -> np.float32:
    """The fp32 nearest to the rational v (ties to even), by exact comparisons; |v| within fp32's range."""
    x = np.float32(float(v))  # float64 then float32: at most one fp32 step off (double rounding)
    cands = [x, np.nextafter(x, F32(np.inf)), np.nextafter(x, F32(-np.inf))]
    def key(c):
        return (abs(Fraction(float(c)) - v), int(np.array(c).view(np.int32)) & 1)
    return min(cands, key=key)


def test_fma_fp32_is_exact():
    """fma_fp32 against exact rational arithmetic: random operands, and operands chosen so that a * b and c
    nearly cancel or sit at the magnitudes where a float64 sum rounds on an fp32 midpoint."""
    rng = np.random.default_rng(7)
    n = 6000
    bits = rng.integers(0, 2**32, size=(3, n), dtype=np.uint64).astype(np.uint32)
    exps = np.stack([rng.integers(118, 136, n), rng.integers(118, 136, n), rng.integers(100, 150, n)]).astype(np.uint32)
    close = (bits & np.uint32(0x807FFFFF)) | (exps << np.uint32(23))
    bits = np.where(np.arange(n) % 2 == 0, bits, close)
    a, b, c = (torch.from_numpy(bits[i].astype(np.int64).astype(np.int32)).view(torch.float32) for i in range(3))
    ok = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c) & (a.double().abs() < 1e18) & (b.double().abs() < 1e18)
    ok &= (a.double() * b.double() + c.double()).abs() < 3e38  # inside fp32's range
    a, b, c = a[ok], b[ok], c[ok]
    got = fma_fp32(a, b, c)
    for i in range(a.numel()):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        want = round_fraction_to_fp32(exact) if exact != 0 else F32(0.0)
        assert got[i].item() == float(want), (a[i].item(), b[i].item(), c[i].item(), got[i].item(), float(want))


def kernel_fma_exp(t: torch.Tensor) -> torch.Tensor:
    """kernels/fused_quant.cuh's exp_fp32<true> (FP8L_SILU_FMA, 16-bit inputs), emulated with fma_fp32:
    the shifter's rint fused with t * log2(e), the reduction and the polynomial in FMA form, the scaling as
    exp_fp32<false>'s (scale_by_shifted_bits). Finite t only."""
    c = {k: torch.tensor(v, dtype=torch.int32).view(torch.float32) for k, v in fused.EXP_CONSTANT_BITS.items()}
    shifter, one = torch.tensor(12582912.0), torch.tensor(1.0)
    shifted = fma_fp32(t, c["LOG2E"], shifter)
    n = shifted - shifter
    r = fma_fp32(-n, c["LN2_HI"], t)
    r = fma_fp32(-n, c["LN2_LO"], r)
    p = fma_fp32(c["C7"], r, c["C6"])
    for k in ("C5", "C4", "C3", "C2"):
        p = fma_fp32(p, r, c[k])
    p = fma_fp32(fma_fp32(p, r, one), r, one)
    return scale_by_shifted_bits(p, shifted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_fma_exp_gives_the_reference_silu_for_every_16_bit_input(dtype):
    """The kernel's FMA exp has other fp32 bits than exp_fp32 (hundreds of the 65536 inputs), but silu(g)
    rounded to bf16 / fp16 is the same for every one of the 65536 values g: the only place the exp enters
    silu_and_mul's result, so the kernel's FMA form is exact to the spec for 16-bit inputs."""
    g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    lo, hi = (torch.tensor(v) for v in fused.EXP_CLAMP)
    t = torch.minimum(torch.maximum(-g, lo), hi)
    nan = torch.isnan(t)  # the kernel's fmaxf drops the NaN: t = -32 there, the quotient is NaN anyway
    one = torch.tensor(1.0)
    with np.errstate(all="ignore"):
        e_ref = exp_fp32(t)
        e_fma = kernel_fma_exp(torch.where(nan, lo, t))
    assert ((e_ref.view(torch.int32) != e_fma.view(torch.int32)) & ~nan).any(), "the forms should differ somewhere"
    s_ref = (g / (one + e_ref)).to(dtype)
    s_fma = (g / (one + e_fma)).to(dtype)
    both_nan = torch.isnan(s_ref.float()) & torch.isnan(s_fma.float())
    differ = (s_ref.view(torch.int16) != s_fma.view(torch.int16)) & ~both_nan
    assert not differ.any(), f"silu differs at g = {g[differ][:8].tolist()}"
    assert torch.equal(torch.isnan(s_ref.float()), torch.isnan(s_fma.float()))


# ------------------------------------------------------------------------------------------------
# silu_and_mul
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
def test_silu_reference_matches_naive(dtype):
    x = make_silu_input(6, 128, dtype, seed=1)
    assert_bitwise_equal(silu_and_mul_reference(x), naive_silu_and_mul(x), f"silu_and_mul {dtype}")


def test_silu_reference_is_torch_silu_to_fp32_accuracy():
    """In fp32 (no rounding to a narrower dtype) against torch's silu(g) * u in float64: within a few fp32
    ulp where the result is a normal fp32 (our exp is within 1.2 ulp, then a division and a multiply)."""
    x = make_silu_input(64, 512, torch.float32, seed=2, specials=False)
    ours = silu_and_mul_reference(x).double()
    g, u = x[:, :512].double(), x[:, 512:].double()
    exact = torch.nn.functional.silu(g) * u
    normal = exact.abs() > 1e-30  # subnormal fp32 results carry fewer bits
    rel = (ours - exact).abs()[normal] / exact.abs()[normal]
    assert normal.float().mean().item() > 0.99 and rel.max().item() < 4 * 2.0**-24


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_silu_reference_is_hugging_face_unfused(dtype):
    """Hugging Face's `act_fn(gate) * up` in bf16/fp16 (torch's silu, then a multiply, each rounded):
    bit-exact with the reference (the module docstring's reason for rounding twice)."""
    x = make_silu_input(128, 1024, dtype, seed=3, specials=False)
    hf = torch.nn.functional.silu(x[:, :1024]) * x[:, 1024:]
    assert_bitwise_equal(silu_and_mul_reference(x), hf, f"silu {dtype}")


@pytest.mark.parametrize("layout,out_dtype", LAYOUT_DTYPES, ids=LAYOUT_DTYPE_IDS)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
def test_silu_and_mul_quant_matches_naive(layout, out_dtype, dtype):
    g = 32
    x = make_silu_input(5, 3 * g, dtype, seed=4, group_size=g)  # G = 3: a partial ue8m0 word
    pow2 = layout == "ue8m0_packed" or out_dtype == INT8
    q, s = silu_and_mul_quant(x, g, out_dtype, scale_layout=layout, scale_ue8m0=pow2)
    q_ref, s_ref = naive_quant(naive_silu_and_mul(x), g, out_dtype, pow2)
    assert_matches(q, s, q_ref, s_ref, layout, f"silu {dtype}")


@pytest.mark.parametrize("group_size", [16, 64, 128, 256])
def test_silu_and_mul_quant_group_sizes(group_size):
    x = make_silu_input(4, 2 * group_size, torch.bfloat16, seed=group_size, group_size=group_size)
    q, s = silu_and_mul_quant(x, group_size)
    q_ref, s_ref = naive_quant(naive_silu_and_mul(x), group_size, FP8, False)
    assert_matches(q, s, q_ref, s_ref, "row", f"g={group_size}")


def test_silu_nonfinite_groups_are_poisoned():
    """A NaN gate, an Inf up, a -Inf gate (silu = -inf / inf = NaN): that output group is NaN-poisoned;
    an all-zero gate group: all-zero q and the eps scale."""
    x = make_silu_input(8, 256, torch.bfloat16, seed=5)
    q, s = silu_and_mul_quant(x, 128)
    a = silu_and_mul_reference(x).float().reshape(8, 2, 128)
    bad = ~torch.isfinite(a).all(-1)
    assert int(bad.sum()) == 3
    assert torch.isnan(s[bad]).all() and (q.view(torch.uint8).reshape(8, 2, 128)[bad] == 0x7F).all()
    zero_groups = (a == 0).all(-1)
    assert zero_groups.any()
    assert (s[zero_groups] == torch.tensor(1e-10) / torch.tensor(448.0)).all()


@pytest.mark.parametrize("layout", ["row", "col", "ue8m0_packed"])
def test_silu_strided_rows_and_poisoned_buffers(layout):
    M, I = 7, 256
    x = make_silu_input(M, I, torch.bfloat16, seed=6)
    xs = make_strided(x, 24)
    assert xs.stride(0) == 2 * I + 24
    q = poison_(torch.empty(M, I, dtype=FP8))
    s = poison_(empty_scales((), M, I // 128, layout, "cpu"))
    silu_and_mul_quant(xs, 128, scale_layout=layout, out=q, scale_out=s)
    q_ref, s_ref = silu_and_mul_quant(x, 128, scale_layout=layout)
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s.contiguous(), s_ref.contiguous(), "s")


@pytest.mark.parametrize("M", [0, 1])
def test_silu_small_and_empty(M):
    x = make_silu_input(M, 128, torch.bfloat16, seed=7)
    q, s = silu_and_mul_quant(x, 128, scale_layout="col")
    assert q.shape == (M, 128) and s.shape == (M, 1) and s.stride() == empty_scales((), M, 1, "col", "cpu").stride()
    if M:
        q_ref, s_ref = naive_quant(naive_silu_and_mul(x), 128, FP8, False)
        assert_matches(q, s, q_ref, s_ref, "col")


def test_silu_input_not_modified():
    x = make_silu_input(4, 128, torch.bfloat16, seed=8)
    before = x.clone()
    silu_and_mul_quant(x, 128)
    assert_bitwise_equal(x, before, "x")


# ------------------------------------------------------------------------------------------------
# rmsnorm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H", [128, 144, 2048 + 16, 4096])
def test_sum_of_squares_order_matches_naive(H):
    """H = 144: 18 chunks (lanes 18..255 empty); 2064: chunk 256 wraps to lane 0; 4096: two per lane."""
    x, _ = make_rms_input(3, H, torch.float32, seed=H, specials=False)
    ss = sum_of_squares_fixed_order(x.float())
    for m in range(3):
        lanes = [F32(0.0)] * 256
        xm = x[m].numpy()
        for lane in range(256):
            for c in range(lane, H // 8, 256):
                for k in range(8):
                    lanes[lane] = F32(lanes[lane] + F32(xm[8 * c + k] * xm[8 * c + k]))
        vals = lanes
        sums = []
        for w in range(8):
            v = vals[32 * w:32 * (w + 1)]
            while len(v) > 1:
                v = [F32(v[j] + v[j + len(v) // 2]) for j in range(len(v) // 2)]
            sums.append(v[0])
        while len(sums) > 1:
            sums = [F32(sums[j] + sums[j + len(sums) // 2]) for j in range(len(sums) // 2)]
        assert ss[m].item() == float(sums[0]), (m, ss[m].item(), float(sums[0]))


def assert_equal_nan_as_nan(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bitwise equal where expected is not NaN, NaN where it is (NaN payloads may differ: fused docstring)."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{name}: NaN positions differ"
    assert_bitwise_equal(actual.where(~nan, 0), expected.where(~nan, 0), name)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
def test_rmsnorm_reference_matches_naive(dtype):
    x, w = make_rms_input(6, 272, dtype, seed=9)
    assert_equal_nan_as_nan(rmsnorm_reference(x, w, 1e-6), naive_rmsnorm(x, w, 1e-6), f"rmsnorm {dtype}")


def naive_sqrt_f32(v: float) -> float:
    """Correctly rounded fp32 sqrt of a non-negative finite fp32 v, from integer square roots alone."""
    if v == 0.0:
        return 0.0
    mant, exp = math.frexp(v)  # v = mant * 2^exp, 0.5 <= mant < 1
    n = int(mant * 2**24)  # exact: fp32 holds 24 significant bits
    e = exp - 24
    if e % 2:  # make the exponent even so that sqrt(2^e) is a power of two
        n, e = n * 2, e - 1
    # sqrt(v) = sqrt(n * 2^(2k)) * 2^(e/2 - k): isqrt with 2k = 120 gives far more than 25 bits.
    big = n << 120
    root = math.isqrt(big)
    exact = root * root == big
    bits = root.bit_length()
    drop = bits - 24
    if bits + (e // 2 - 60) - 1 < -126:  # a subnormal root cannot occur for fp32 input
        raise AssertionError("unexpected subnormal root")
    kept, rest = root >> drop, root & ((1 << drop) - 1)
    half = 1 << (drop - 1)
    if rest > half or (rest == half and (not exact or kept & 1)):
        kept += 1  # rest == half with an inexact root means above the midpoint
    return math.ldexp(kept, drop + e // 2 - 60)


def _hard_roots(count: int, seed: int) -> torch.Tensor:
    """fp32 values whose square roots lie within 1e-3 ulp of a rounding midpoint (where an sqrt that
    is not correctly rounded shows), plus the one that failed on the H100 host."""
    gen = torch.Generator().manual_seed(seed)
    v = (torch.rand(400_000, generator=gen) * 2.0 + 1.0) * torch.exp2(
        torch.randint(-60, 60, (400_000,), generator=gen).float())
    r = torch.sqrt(v.double())
    ulp = (torch.nextafter(r.float(), torch.tensor(math.inf)).double() - r.float().double())
    frac = (r - r.float().double()) / ulp  # position of the root between fp32 neighbours, +-0.5 at midpoints
    near = v[((frac.abs() - 0.5).abs() < 1e-3)][:count]
    failed = torch.tensor([0x4169B0DE], dtype=torch.int32).view(torch.float32)  # root 0.4998 ulp off
    return torch.cat([failed, near])


def test_sqrt_fp32_is_correctly_rounded():
    """Against integer square roots: hard cases near midpoints, random values across the exponent range,
    subnormals, powers of two and their neighbours, and the extremes."""
    hard = _hard_roots(300, seed=15)
    assert hard.numel() > 100
    gen = torch.Generator().manual_seed(16)
    bits = torch.randint(0, 0x7F800000, (3000,), generator=gen, dtype=torch.int32)
    edges = torch.tensor([1, 2, 3, 0x7FFFFF, 0x800000, 0x800001, 0x3F800000, 0x3F7FFFFF, 0x40000000,
                          0x407FFFFF, 0x7F7FFFFF], dtype=torch.int32)
    v = torch.cat([hard, bits.view(torch.float32), edges.view(torch.float32), torch.tensor([0.0, 4.0, 2.0])])
    got = fused.sqrt_fp32(v)
    want = torch.tensor([naive_sqrt_f32(float(t)) for t in v.tolist()], dtype=torch.float32)
    assert_bitwise_equal(got, want, "sqrt_fp32")
    special = fused.sqrt_fp32(torch.tensor([math.inf, math.nan, -1.0, -0.0]))
    assert special[0].item() == math.inf and math.isnan(special[1].item()) and math.isnan(special[2].item())
    assert special[3].view(torch.int32).item() == torch.tensor(-0.0).view(torch.int32).item()


def test_rmsnorm_reference_does_not_trust_torch_sqrt(monkeypatch):
    """The H100 failure: torch.sqrt (MKL on CPU) one ulp off near a midpoint moved r. With torch.sqrt made
    deliberately wrong by one ulp (of the dtype it is called in) on every element, the reference still
    agrees with the naive implementation, whose sqrt is numpy's correctly rounded one."""
    x, w = make_rms_input(128, 128, torch.float32, seed=256)  # the failing GPU case's input
    x = x[78:86]  # row 80 failed: scale 0x3c7d6ad1 from a wrong root, 0x3c7d6acf right
    want = naive_rmsnorm(x, w, 1e-5)
    true_sqrt = torch.sqrt

    def wrong_sqrt(t, *args, **kwargs):
        out = true_sqrt(t, *args, **kwargs)
        return torch.nextafter(out, torch.full_like(out, math.inf))

    monkeypatch.setattr(torch, "sqrt", wrong_sqrt)
    got = rmsnorm_reference(x, w, 1e-5)
    assert_equal_nan_as_nan(got, want, "rmsnorm with a wrong torch.sqrt")
    _, s = rmsnorm_quant(x[2:3], w, 1e-5, 128)
    assert s.view(torch.int32).item() == 0x3C7D6ACF


@pytest.mark.parametrize("H", [128, 384, 640])
def test_rmsnorm_reference_matches_naive_fp32_partial_rows(H):
    """fp32 rows narrower than 256 lanes x 8 (16, 48, 80 lanes hold data) and rows whose mean square has
    a root near a midpoint: every rounding step visible (no bf16 rounding to hide one)."""
    x, w = make_rms_input(6, H, torch.float32, seed=H)
    # Rows 0..1: one non-zero element a, so that v = fl(a * a) / H lands on a hard root exactly.
    hard = _hard_roots(2, seed=H)[1:3].double()
    x[:2] = 0.0
    x[:2, 5] = torch.sqrt(hard * H).float()  # fl(a^2) / H need not equal hard; still near-midpoint often
    assert_equal_nan_as_nan(rmsnorm_reference(x, w, 0.0), naive_rmsnorm(x, w, 0.0), f"rmsnorm fp32 H={H}")
    assert_equal_nan_as_nan(rmsnorm_reference(x, w, 1e-6), naive_rmsnorm(x, w, 1e-6), f"rmsnorm fp32 H={H}")


@pytest.mark.parametrize("H", [4096, 7168])
def test_rmsnorm_reference_vs_hugging_face(H):
    """LlamaRMSNorm sums in torch's order: equal bits almost everywhere, within one bf16 ulp elsewhere."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = make_rms_input(32, H, torch.bfloat16, seed=10, specials=False)
    norm = LlamaRMSNorm(H, eps=1e-5)
    norm.weight = nn.Parameter(w)
    with torch.no_grad():
        hf = norm(x)
    ours = rmsnorm_reference(x, w, 1e-5)
    assert (ours == hf).float().mean().item() > 0.999
    assert torch.allclose(ours.float(), hf.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("layout,out_dtype", LAYOUT_DTYPES, ids=LAYOUT_DTYPE_IDS)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
def test_rmsnorm_quant_matches_naive(layout, out_dtype, dtype):
    g = 16
    x, w = make_rms_input(6, 5 * g, dtype, seed=11)  # G = 5
    pow2 = layout == "ue8m0_packed"
    q, s, y = rmsnorm_quant(x, w, 1e-6, g, out_dtype, scale_layout=layout, scale_ue8m0=pow2, return_normed=True)
    y_ref = naive_rmsnorm(x, w, 1e-6)
    q_ref, s_ref = naive_quant(y_ref, g, out_dtype, pow2)
    assert_matches(q, s, q_ref, s_ref, layout, f"rmsnorm {dtype}")
    assert_equal_nan_as_nan(y, y_ref, "normed")


def test_rmsnorm_specials():
    """All-zero row: y = 0, scale eps/QMAX. Inf in a row: ss = inf, r = 0, inf * 0 = NaN in that group
    only (others 0). NaN in a row: every group NaN. Squares overflowing fp32: r = 0, y = 0."""
    x, w = make_rms_input(8, 256, torch.bfloat16, seed=12)
    q, s, y = rmsnorm_quant(x, w, 1e-6, 128, return_normed=True)
    xf = x.float()
    zero_row = (xf == 0).all(-1)
    inf_row = torch.isinf(xf).any(-1)
    nan_row = torch.isnan(xf).any(-1)
    big_row = (xf.abs() == 3e30).any(-1) | (xf.abs() > 1e30).any(-1)
    assert int(zero_row.sum()) == 1 and int(inf_row.sum()) == 1 and int(nan_row.sum()) == 1
    assert (y[zero_row] == 0).all() and (s[zero_row] == torch.tensor(1e-10) / torch.tensor(448.0)).all()
    assert torch.isnan(s[nan_row]).all()
    assert int(torch.isnan(s[inf_row]).sum()) == 1 and torch.isnan(y[inf_row]).sum() == 1
    assert (y[big_row & ~inf_row & ~nan_row] == 0).all()


def test_rmsnorm_strided_buffers_and_outputs():
    M, H = 9, 512
    x, w = make_rms_input(M, H, torch.bfloat16, seed=13)
    xs = make_strided(x, 40)
    q = poison_(torch.empty(M, H, dtype=INT8))
    s = poison_(empty_scales((), M, H // 64, "col", "cpu"))
    y = poison_(torch.empty(M, H, dtype=torch.bfloat16))
    q2, s2, y2 = rmsnorm_quant(xs, w, 1e-5, 64, INT8, scale_layout="col", return_normed=True, out=q, scale_out=s,
                               normed_out=y)
    assert q2 is q and s2 is s and y2 is y
    q_ref, s_ref, y_ref = rmsnorm_quant(x, w, 1e-5, 64, INT8, scale_layout="col", return_normed=True)
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s.contiguous(), s_ref.contiguous(), "s")
    assert_equal_nan_as_nan(y, y_ref, "normed")


def test_rmsnorm_empty_and_widest():
    x, w = make_rms_input(0, 256, torch.bfloat16)
    q, s = rmsnorm_quant(x, w)
    assert q.shape == (0, 256) and s.shape == (0, 2)
    x, w = make_rms_input(2, 16384, torch.bfloat16, seed=14, specials=False)
    q, s, y = rmsnorm_quant(x, w, return_normed=True)
    assert_bitwise_equal(y, rmsnorm_reference(x, w, 1e-6), "normed")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _x(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


SILU_BAD = [
    ("odd", (_x(4, 257),), {}, ValueError, r"x's last dim must be 2I \(gate then up\); got 257, which is odd"),
    ("I%g", (_x(4, 192), 128), {}, ValueError, r"I = x.shape\[-1\] / 2 = 96 must be divisible by group_size=128"),
    ("g48", (_x(4, 192), 48), {}, ValueError, r"group_size must be one of .*got 48"),
    ("x-3d", (_x(2, 4, 256),), {}, ValueError, r"x must be 2-D \[M, 2I\]; got shape \[2, 4, 256\]"),
    ("x-int", (_x(4, 256).to(torch.int32),), {}, TypeError, r"x must be bfloat16, float16 or float32; got torch.int32"),
    ("x-list", ([[1.0] * 256],), {}, TypeError, r"x must be a torch.Tensor; got list"),
    ("strided", (_x(256, 4).t(),), {}, ValueError, r"x's last dim must be contiguous \(stride 1\)"),
    ("dtype", (_x(4, 256), 128, torch.bfloat16), {}, TypeError, r"dtype must be torch.float8_e4m3fn or torch.int8; got torch.bfloat16"),
    ("layout", (_x(4, 256),), {"scale_layout": "tma"}, ValueError, r"scale_layout must be one of .*got 'tma'"),
    ("ue8m0-int8", (_x(4, 256), 128, INT8), {"scale_layout": "ue8m0_packed"}, ValueError, r"ue8m0_packed.*fp8.*torch.int8"),
    ("eps", (_x(4, 256),), {"eps": 0.0}, ValueError, r"eps must be a finite float >= 1e-30; got 0.0"),
    ("out-shape", (_x(4, 256),), {"out": torch.empty(4, 256, dtype=FP8)}, ValueError, r"out must have shape \[4, 128\]; got \[4, 256\]"),
    ("out-dtype", (_x(4, 256),), {"out": torch.empty(4, 128, dtype=INT8)}, TypeError, r"out must have dtype torch.float8_e4m3fn"),
    ("scale-out", (_x(5, 512),), {"scale_layout": "col", "scale_out": torch.empty(5, 2)}, ValueError, r"scale_out must have strides \(1, 8\)"),
]

RMS_BAD = [
    ("H%g", (_x(4, 200), _x(200)), {}, ValueError, r"x's last dim H=200 must be divisible by group_size=128"),
    ("wide", (_x(1, 16384 + 128), _x(16384 + 128)), {}, ValueError, r"H=16512 is wider than rmsnorm_quant supports \(16384\)"),
    ("w-dtype", (_x(4, 256), _x(256, dtype=torch.float32)), {}, TypeError, r"weight must have x's dtype torch.bfloat16 .*got torch.float32"),
    ("w-shape", (_x(4, 256), _x(128)), {}, ValueError, r"weight must have shape \[256\] \(x's last dim\); got \[128\]"),
    ("w-type", (_x(4, 256), [1.0] * 256), {}, TypeError, r"weight must be a torch.Tensor; got list"),
    ("w-strided", (_x(4, 256), _x(512)[::2]), {}, ValueError, r"weight must be contiguous; got strides \(2,\)"),
    ("w-device", (_x(4, 256), torch.empty(256, dtype=torch.bfloat16, device="meta")), {}, ValueError, r"weight must be on cpu like x; got meta"),
    ("rms-eps", (_x(4, 256), _x(256), -1.0), {}, ValueError, r"rms_eps must be a finite float >= 0; got -1.0"),
    ("rms-eps-nan", (_x(4, 256), _x(256), float("nan")), {}, ValueError, r"rms_eps must be .*got nan"),
    ("x-1d", (_x(256), _x(256)), {}, ValueError, r"x must be 2-D \[M, H\]; got shape \[256\]"),
    ("normed-without-flag", (_x(4, 256), _x(256)), {"normed_out": _x(4, 256)}, ValueError, r"normed_out was given but return_normed=False"),
    ("normed-dtype", (_x(4, 256), _x(256)), {"return_normed": True, "normed_out": _x(4, 256, dtype=torch.float16)}, TypeError, r"normed_out must have dtype torch.bfloat16"),
    ("normed-shape", (_x(4, 256), _x(256)), {"return_normed": True, "normed_out": _x(4, 128)}, ValueError, r"normed_out must have shape \[4, 256\]; got \[4, 128\]"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", [b[1:] for b in SILU_BAD], ids=[b[0] for b in SILU_BAD])
def test_silu_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        silu_and_mul_quant(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,exc,match", [b[1:] for b in RMS_BAD], ids=[b[0] for b in RMS_BAD])
def test_rmsnorm_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rmsnorm_quant(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck
# ------------------------------------------------------------------------------------------------

def _op_samples():
    samples = []
    for M, I, g, dtype, layout in [(3, 128, 64, INT8, "row"), (5, 256, 128, FP8, "col"), (4, 64, 16, FP8, "ue8m0_packed")]:
        x = make_silu_input(M, I, torch.bfloat16, seed=M, group_size=g, specials=False)
        q = torch.empty(M, I, dtype=dtype)
        s = empty_scales((), M, I // g, layout, "cpu")
        samples.append(("silu", (x, q, s, g, layout == "ue8m0_packed", 1e-10, layout)))
    for M, H, g, dtype, layout, normed in [(3, 256, 128, INT8, "row", True), (2, 128, 32, INT8, "col", False),
                                           (5, 256, 64, FP8, "ue8m0_packed", True)]:
        x, w = make_rms_input(M, H, torch.bfloat16, seed=M, specials=False)
        q = torch.empty(M, H, dtype=dtype)
        s = empty_scales((), M, H // g, layout, "cpu")
        y = torch.empty(M, H, dtype=torch.bfloat16) if normed else None
        samples.append(("rms", (x, w, q, s, y, 1e-6, g, layout == "ue8m0_packed", 1e-10, layout)))
    return samples


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(sample):
    kind, args = _op_samples()[sample]
    op = torch.ops.fp8linear.silu_and_mul_quant_.default if kind == "silu" else torch.ops.fp8linear.rmsnorm_quant_.default
    q = args[1] if kind == "silu" else args[2]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if q.dtype == FP8:
        # SchemaCheckMode needs fp8 arithmetic that CPU torch lacks (as in tests/test_quant_cpu.py).
        tests = tests[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.opcheck(op, args, test_utils=tests)


# ------------------------------------------------------------------------------------------------
# GEMM operands bit for bit, fp32 GEMM outputs within a bound derived from K
# ------------------------------------------------------------------------------------------------
#
# fp32 results of the same products added in different orders (one [2I, H] GEMM against two [I, H] ones,
# a column or row shard against the whole layer, another CPU's BLAS, another thread count) need not agree
# in the last bit; what our code decides is what goes into the GEMM (q and s, weight and scale bytes),
# and that is compared bit for bit. The outputs are compared against the error bound of a sum of n terms
# added in any order, products with or without FMA (Higham, "Accuracy and Stability of Numerical
# Algorithms", 2nd ed., section 3.1):
#
#     |fl(sum) - sum| <= gamma_n sum |terms|,   gamma_n = n u / (1 - n u),   u = 2^-24 (fp32)
#
# so two evaluations differ by at most twice that. At K = 256 it is 3e-5 of sum |a w|: a real fault
# (halves swapped, a scale from the wrong block, a group left out) is orders of magnitude larger.

U_FP32 = 2.0**-24  # unit roundoff of fp32
WEIGHT_BLOCK = 128  # weight_scale_inv covers 128 x 128 blocks (DESIGN.md "Weights")


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for fp32."""
    return n * U_FP32 / (1 - n * U_FP32)


def summation_bound(a: torch.Tensor, w: torch.Tensor, bias: "torch.Tensor | None" = None) -> torch.Tensor:
    """[M, N] float64: how far two fp32 evaluations of y = a @ w.T + bias may differ when each adds the K
    products and the bias in its own order: 2 gamma_{K+1} (|a| @ |w|^T + |bias|). a [M, K] and w [N, K]
    hold the fp32 operands (exactly: float64 or float32)."""
    terms = a.double().abs() @ w.double().abs().T
    if bias is not None:
        terms = terms + bias.double().abs()
    return 2 * gamma(a.shape[1] + 1) * terms


@dataclass
class GemmCall:
    """One call of the reference backend's GEMM: its operands (as the backend received them) and result."""

    q: torch.Tensor  # [M, Kp] fp8 / int8
    s: torch.Tensor  # [M, Kp / 128] fp32, row layout
    weight: torch.Tensor  # [N, K] fp8 / int8
    weight_scale_inv: torch.Tensor  # [ceil(N / 128), ceil(K / 128)] fp32
    bias: "torch.Tensor | None"  # [N]
    y: torch.Tensor  # [M, N] in the caller's dtype


def record_gemm_calls(monkeypatch) -> "list[GemmCall]":
    """From now to the end of the test, every call of the reference backend's GEMM, in call order."""
    from fp8linear.backends import reference

    calls: list[GemmCall] = []
    real, real_prepare = reference.gemm, reference.prepare_weight
    sources: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(prepared) -> the quantized weight it came from

    def preparing(weight, weight_scale_inv):
        prepared = real_prepare(weight, weight_scale_inv)
        sources[id(prepared)] = (weight, weight_scale_inv)
        return prepared

    def recording(q, s, prepared, out_dtype, bias):
        y = real(q, s, prepared, out_dtype, bias)
        weight, weight_scale_inv = sources[id(prepared)]
        calls.append(GemmCall(q.clone(), s.clone(), weight, weight_scale_inv, bias, y.clone()))
        return y

    monkeypatch.setattr(reference, "prepare_weight", preparing)
    monkeypatch.setattr(reference, "gemm", recording)
    return calls


def gemm_operands(call: GemmCall) -> "tuple[torch.Tensor, torch.Tensor]":
    """The operands the call multiplies, dequantized exactly in float64: a [M, K] and w [N, K]."""
    N, K = call.weight.shape
    group = call.q.shape[-1] // call.s.shape[-1]
    a = call.q.double() * call.s.double().repeat_interleave(group, dim=-1)
    scale = call.weight_scale_inv.double().repeat_interleave(WEIGHT_BLOCK, 0).repeat_interleave(WEIGHT_BLOCK, 1)
    return a[:, :K], call.weight.double() * scale[:N, :K]


def gemm_bound(call: GemmCall) -> torch.Tensor:
    """summation_bound for the call's GEMM: the reference multiplies fp32 copies of the exact operands
    (gemm_operands), each within a factor (1 + u) of them."""
    a, w = gemm_operands(call)
    return (1 + U_FP32) ** 2 * summation_bound(a, w, call.bias)


def assert_within_bound(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, name: str) -> None:
    """|actual - expected| <= bound (for the fp32 values they were rounded from) plus one rounding of each
    to its dtype: half an ulp each, at most eps/2 of the larger magnitude times (1 + eps) (the value may
    have rounded down), or half the smallest subnormal. Elementwise; NaN fails."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    info = torch.finfo(actual.dtype)
    got, want = actual.double().reshape(bound.shape), expected.double().reshape(bound.shape)
    bound = bound + info.eps * (1 + info.eps) * torch.maximum(got.abs(), want.abs()) + info.smallest_normal * info.eps
    err = (got - want).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} outside the summation bound; first at {idx}: got "
            f"{got[idx].item()!r}, expected {want[idx].item()!r}, |diff| {err[idx].item():.3g} > {bound[idx].item():.3g}"
        )


def assert_within_gemm_bound(actual: torch.Tensor, expected: torch.Tensor, call: GemmCall, name: str) -> None:
    """actual and expected: two evaluations of `call`'s GEMM (same operand bytes), summed in any orders."""
    assert_within_bound(actual, expected, gemm_bound(call), name)


# ------------------------------------------------------------------------------------------------
# FP8GatedMLP
# ------------------------------------------------------------------------------------------------

def _llama_mlp(H=256, I=384, act="silu", bias=False, seed=0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act=act, mlp_bias=bias)
    return LlamaMLP(cfg).to(torch.bfloat16)


def assert_fused_mlp_matches(fused_mlp, gate, up, down, x: torch.Tensor, gemm_calls: "list[GemmCall]") -> torch.Tensor:
    """fused_mlp(x) against the unfused FP8Linear projections gate, up and down (reference backend).

    The merged gate_up GEMM gets the bytes that gate's and up's GEMMs get (the same q and s; weights,
    scales and biases concatenated along N) and returns [gate(x) | up(x)] within the summation bound.
    down_proj's GEMM gets the bytes that down(silu_and_mul_reference(h)) gives it, h being the merged
    GEMM's result (silu_and_mul_reference is checked against a naive formula above), and returns that
    result within the bound. Returns fused_mlp(x).
    """
    gemm_calls.clear()
    with torch.no_grad():
        y = fused_mlp(x)
        gate(x), up(x)
        merged, fused_down, g, u = gemm_calls
        down(silu_and_mul_reference(merged.y))
    plain_down = gemm_calls[4]
    for t in ("q", "s"):
        assert_bitwise_equal(getattr(merged, t), getattr(g, t), f"merged GEMM's {t} vs gate_proj's")
        assert_bitwise_equal(getattr(merged, t), getattr(u, t), f"merged GEMM's {t} vs up_proj's")
        assert_bitwise_equal(getattr(fused_down, t), getattr(plain_down, t), f"down_proj GEMM's {t}")
    for t in ("weight", "weight_scale_inv", "bias"):
        if getattr(g, t) is None:
            assert getattr(merged, t) is None and getattr(fused_down, t) is None, t
            continue
        assert_bitwise_equal(getattr(merged, t), torch.cat([getattr(g, t), getattr(u, t)]), f"merged GEMM's {t}")
        assert_bitwise_equal(getattr(fused_down, t), getattr(plain_down, t), f"down_proj GEMM's {t}")
    assert_within_gemm_bound(merged.y, torch.cat([g.y, u.y], dim=-1), merged, "merged gate_up GEMM")
    assert_within_gemm_bound(fused_down.y, plain_down.y, fused_down, "down_proj GEMM")
    assert_bitwise_equal(y.reshape(fused_down.y.shape), fused_down.y, "the MLP returns down_proj's GEMM")
    return y


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_equals_unfused_composition(dtype, bias, monkeypatch):
    """Fused = down_proj(silu_and_mul(gate_up(x))) with the unfused per-projection FP8Linear layers
    (assert_fused_mlp_matches), and close to the bf16 MLP it was quantized from."""
    from fp8linear.linear import FP8Linear
    from fp8linear.mlp import FP8GatedMLP

    mlp = _llama_mlp(bias=bias)
    fused_mlp = FP8GatedMLP.from_mlp(mlp, dtype=dtype, backend="reference")
    gate, up, down = (FP8Linear.from_linear(m, dtype=dtype, backend="reference")
                      for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    y = assert_fused_mlp_matches(fused_mlp, gate, up, down, x, record_gemm_calls(monkeypatch))
    with torch.no_grad():
        ref = mlp(x).float()
    assert y.shape == (2, 3, 256) and y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < (0.1 if dtype == FP8 else 0.05)


def test_mlp_state_dict_is_per_projection():
    from fp8linear.linear import FP8Linear
    from fp8linear.mlp import FP8GatedMLP

    mlp = _llama_mlp(bias=True)
    fused_mlp = FP8GatedMLP.from_mlp(mlp, backend="reference")
    state = fused_mlp.state_dict()
    assert list(state) == [f"{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj")
                           for t in ("weight", "weight_scale_inv", "bias")]
    for name in ("gate_proj", "up_proj", "down_proj"):
        unfused = FP8Linear.from_linear(getattr(mlp, name), backend="reference").state_dict()
        for t in ("weight", "weight_scale_inv", "bias"):
            assert_bitwise_equal(state[f"{name}.{t}"], unfused[t], f"{name}.{t}")
    # Round trip into a fresh module (the merged tensors rebuilt from the standard keys).
    fresh = FP8GatedMLP(256, 384, True, backend="reference")
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(4, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert_bitwise_equal(fresh(x), fused_mlp(x), "reloaded MLP")
    # And onto meta with assign=True, as the checkpoint loader builds models.
    meta = FP8GatedMLP(256, 384, True, backend="reference", device="meta")
    meta.load_state_dict(state, assign=True)
    with torch.no_grad():
        assert_bitwise_equal(meta(x), fused_mlp(x), "assigned MLP")


def test_mlp_load_rejects_half_a_pair():
    from fp8linear.mlp import FP8GatedMLP

    state = FP8GatedMLP.from_mlp(_llama_mlp(), backend="reference").state_dict()
    del state["up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"found only one of 'gate_proj.weight' and 'up_proj.weight'"):
        FP8GatedMLP(256, 384, backend="reference").load_state_dict(state)


def test_mlp_from_fp8_projections_merges_without_requantizing():
    from fp8linear.convert import quantize_model
    from fp8linear.mlp import FP8GatedMLP

    mlp = quantize_model(_llama_mlp(), backend="reference", progress=False)
    fused_mlp = FP8GatedMLP.from_mlp(mlp)
    assert_bitwise_equal(fused_mlp.gate_up_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), "w")
    assert fused_mlp.down_proj is mlp.down_proj


@pytest.mark.parametrize("kind,match", [
    ("I%128", r"intermediate size I=320 is not a multiple of 128"),
    ("gelu", r"act_fn is .*, not SiLU"),
    ("mixed", r"projections are FP8Linear, Linear, Linear: need all nn.Linear .* or all FP8Linear"),
    ("no-up", r"has no up_proj: not a gated MLP"),
])
def test_mlp_unsupported_reasons(kind, match):
    from fp8linear.linear import FP8Linear
    from fp8linear.mlp import FP8GatedMLP, unsupported_reason

    mlp = _llama_mlp(I=320 if kind == "I%128" else 384, act="gelu" if kind == "gelu" else "silu")
    if kind == "mixed":
        mlp.gate_proj = FP8Linear.from_linear(mlp.gate_proj, backend="reference")
    if kind == "no-up":
        del mlp.up_proj
    assert re.search(match, unsupported_reason(mlp))
    with pytest.raises(ValueError, match=match):
        FP8GatedMLP.from_mlp(mlp)


def test_mlp_constructor_rejects_unaligned_intermediate():
    from fp8linear.mlp import FP8GatedMLP

    with pytest.raises(ValueError, match=r"intermediate_size must be a multiple of 128 .*got 320"):
        FP8GatedMLP(256, 320)


def _tiny_llama(I=384):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def assert_fused_model_matches(plain_model, fused_model, ids: torch.Tensor, gemm_calls: "list[GemmCall]") -> None:
    """Every FP8GatedMLP of fused_model against the unfused MLP at its place in plain_model, both fed the input
    that MLP sees in plain_model's forward on ids (assert_fused_mlp_matches).

    Not the logits: the two models' activations may differ in the last bit (the merged GEMM may add in
    another order; in fp32 our SiLU and torch's differ in the last bit for some inputs, which on a 2-core
    AMD EPYC moved one activation scale and 203 of 3600 logits), and a quantization downstream can turn
    that into a whole fp8 step, which no bound derived from K covers.
    """
    from fp8linear.mlp import FP8GatedMLP

    layers = plain_model.model.layers
    inputs = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for layer in layers]
    try:
        with torch.no_grad():
            plain_model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(inputs) == len(layers)
    for x, plain, fused_layer in zip(inputs, layers, fused_model.model.layers):
        assert isinstance(fused_layer.mlp, FP8GatedMLP)
        assert_fused_mlp_matches(fused_layer.mlp, plain.mlp.gate_proj, plain.mlp.up_proj, plain.mlp.down_proj, x,
                                 gemm_calls)


def test_fuse_gated_mlps_on_a_model_keeps_outputs_and_state_dict(monkeypatch):
    import copy

    from fp8linear.convert import quantize_model
    from fp8linear.mlp import FP8GatedMLP, fuse_gated_mlps

    model = quantize_model(_tiny_llama(), backend="reference", progress=False)
    plain = copy.deepcopy(model)
    state_before = model.state_dict()
    report = fuse_gated_mlps(model)
    assert report == {"model.layers.0.mlp": None, "model.layers.1.mlp": None}
    assert all(isinstance(layer.mlp, FP8GatedMLP) for layer in model.model.layers)
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key in state_before:
        assert_bitwise_equal(state_after[key], state_before[key], key)
    assert_fused_model_matches(plain, model, torch.randint(0, 512, (2, 7)), record_gemm_calls(monkeypatch))


def test_fuse_gated_mlps_leaves_unaligned_mlps(caplog):
    from fp8linear.convert import quantize_model
    from fp8linear.mlp import fuse_gated_mlps

    model = quantize_model(_tiny_llama(I=320), backend="reference", progress=False)
    with caplog.at_level("INFO", logger="fp8linear.mlp"):
        report = fuse_gated_mlps(model)
    assert all("not a multiple of 128" in why for why in report.values()) and len(report) == 2
    assert "left unfused" in caplog.text
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_fused_model_saves_and_loads_in_the_standard_format(tmp_path):
    """save_quantized on a fused model writes gate_proj/up_proj/down_proj tensors; load_quantized reads them
    into the unfused layout, and fusing that gives the same MLPs, bit for bit."""
    from safetensors import safe_open

    from fp8linear.checkpoint import load_quantized, save_quantized
    from fp8linear.convert import quantize_model
    from fp8linear.mlp import fuse_gated_mlps

    model = quantize_model(_tiny_llama(), backend="reference", progress=False)
    fuse_gated_mlps(model)
    save_quantized(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.gate_proj.weight_scale_inv" in keys and "model.layers.1.mlp.up_proj.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    loaded = load_quantized(tmp_path, device="cpu", backend="reference")
    assert fuse_gated_mlps(loaded) == {"model.layers.0.mlp": None, "model.layers.1.mlp": None}
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        for i in range(2):
            assert_bitwise_equal(loaded.model.layers[i].mlp(x), model.model.layers[i].mlp(x), f"layer {i} MLP")


def test_prologue_routing_through_per_token_group_quant():
    """per_token_group_quant(prologue=...) is the same computation as the fused functions."""
    from fp8linear import per_token_group_quant
    from fp8linear.fused import rmsnorm_quant, silu_and_mul_quant

    x = torch.randn(3, 512, dtype=torch.bfloat16)
    q, s = per_token_group_quant(x, 128, prologue="silu_and_mul", scale_layout="col")
    q2, s2 = silu_and_mul_quant(x, 128, scale_layout="col")
    assert q.shape == (3, 256)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    w = torch.randn(512, dtype=torch.bfloat16)
    q, s, normed = per_token_group_quant(x, 128, prologue="rmsnorm", weight=w, return_normed=True)
    q2, s2, normed2 = rmsnorm_quant(x, w, 1e-6, 128, return_normed=True)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2) and torch.equal(normed, normed2)
    with pytest.raises(ValueError, match="prologue must be None, 'silu_and_mul' or 'rmsnorm'; got 'gelu'"):
        per_token_group_quant(x, 128, prologue="gelu")
    with pytest.raises(ValueError, match="needs weight="):
        per_token_group_quant(x, 128, prologue="rmsnorm")
    with pytest.raises(ValueError, match="takes no weight"):
        per_token_group_quant(x, 128, prologue="silu_and_mul", weight=w)


def test_quantize_model_fuse_mlp_matches_unfused_and_keeps_checkpoint_keys(tmp_path, monkeypatch):
    """quantize_model(fuse_mlp=True) against the unfused FP8 model (CPU reference backend): the same
    tensors under the same per-projection state_dict keys, every MLP the unfused one's GEMMs
    (assert_fused_model_matches), and a checkpoint that loads fused again."""
    import copy

    from fp8linear import load_quantized, quantize_model, save_quantized
    from fp8linear.mlp import FP8GatedMLP

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    unfused = quantize_model(copy.deepcopy(base), progress=False)
    fused = quantize_model(copy.deepcopy(base), progress=False, fuse_mlp=True)
    assert sum(isinstance(m, FP8GatedMLP) for m in fused.modules()) == 2
    fused_state, unfused_state = fused.state_dict(), unfused.state_dict()
    assert set(fused_state) == set(unfused_state)
    for key, tensor in unfused_state.items():
        assert_bitwise_equal(fused_state[key], tensor, key)
    assert_fused_model_matches(unfused, fused, torch.randint(0, 300, (1, 12)), record_gemm_calls(monkeypatch))
    save_quantized(fused, tmp_path / "ckpt")
    again = load_quantized(tmp_path / "ckpt", device="cpu", dtype=torch.float32, fuse_mlp=True)
    assert sum(isinstance(m, FP8GatedMLP) for m in again.modules()) == 2
