"""per_token_group_quant on CPU and fp8linear.reference against a deliberately naive second implementation.

`naive_quant` shares no code with the package: Python loops over rows and groups, IEEE fp32 arithmetic
through numpy float32 scalars, power-of-two scales through math.frexp, and fp8 e4m3fn / int8 encoding
by hand. Where it and the reference agree bit for bit, the reference is a fit oracle for the CUDA
kernel (tests/test_quant_gpu.py).
"""

from __future__ import annotations

import functools
import math
import os
import shutil

import numpy as np
import pytest
import torch

import fp8linear
from cases import (
    FP8,
    INT8,
    QuantCase,
    enumerate_configs,
    enumerate_small_shapes,
    generate_activation,
    make_strided,
)
from conftest import assert_bitwise_equal, poison_
from fp8linear import per_token_group_quant
from fp8linear.layouts import empty_scales, tma_aligned_rows
from fp8linear.reference import per_token_group_quant_reference

CONFIGS = enumerate_configs()
#: (layout, output dtype) pairs the op accepts: ue8m0_packed is fp8 only.
LAYOUT_DTYPES = [("row", FP8), ("row", INT8), ("col", FP8), ("col", INT8), ("ue8m0_packed", FP8)]
LAYOUT_DTYPE_IDS = [f"{lay}-{'fp8' if d == FP8 else 'int8'}" for lay, d in LAYOUT_DTYPES]


# ------------------------------------------------------------------------------------------------
# the naive implementation
# ------------------------------------------------------------------------------------------------

def fp8_e4m3fn_byte(v: float) -> int:
    """Round a finite float to fp8 e4m3fn (nearest even, saturating at 448) and return its byte.

    e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are NaN; the
    largest finite value is 1.75 * 2^8 = 448 (0x7E). Subnormals are multiples of 2^-9 below 2^-6.
    """
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0x00  # -0 and negatives rounding to 0 keep the sign
    a = min(abs(v), 448.0)
    if a < 2.0 ** -6:
        m = round(a * 2.0 ** 9)  # exact scaling by a power of two; round() is half-to-even
        return sign | m  # m == 8 is 2^-6, the smallest normal, whose encoding is also 0x08
    exp = math.frexp(a)[1] - 1  # a = 1.f * 2^exp
    m = round(a * 2.0 ** (3 - exp))  # 1.f with 3 fraction bits, as an integer in [8, 16]
    if m == 16:  # rounded up into the next binade
        exp, m = exp + 1, 8
    return sign | ((exp + 7) << 3) | (m - 8)


def int8_value(v: float) -> int:
    """Round half to even, then clamp to [-128, 127]."""
    return max(-128, min(127, round(v)))


def naive_quant(x: torch.Tensor, group_size: int, out_dtype: torch.dtype, pow2: bool, eps: float = 1e-10):
    """Per-token-group quantization, one group at a time: returns (q like x in out_dtype, s fp32 [..., G])."""
    f32 = np.float32
    rows = x.detach().float().reshape(-1, x.shape[-1]).numpy()  # bf16/fp16 -> fp32 is exact
    R, K = rows.shape
    G = K // group_size
    qmax = f32(448.0 if out_dtype == FP8 else 127.0)
    q = np.zeros((R, K), dtype=np.uint8 if out_dtype == FP8 else np.int8)
    s = np.zeros((R, G), dtype=np.float32)
    for r in range(R):
        for j in range(G):
            lo = j * group_size
            group = rows[r, lo:lo + group_size]
            if not all(math.isfinite(float(v)) for v in group):
                # Documented choice (fp8linear.reference): the whole group is poisoned.
                s[r, j] = f32("nan")
                q[r, lo:lo + group_size] = 0x7F if out_dtype == FP8 else 0
                continue
            amax = f32(0.0)
            for v in group:
                if abs(v) > amax:
                    amax = abs(v)
            if amax < f32(eps):
                amax = f32(eps)
            scale = f32(amax / qmax)  # numpy float32 scalars: IEEE single-precision division
            if pow2:
                mant, e = math.frexp(float(scale))  # scale = mant * 2^e, mant in [0.5, 1)
                if mant != 0.5:  # not already a power of two: the next one up
                    scale = f32(2.0 ** e)
            inv = f32(f32(1.0) / scale)
            for k in range(group_size):
                y = float(f32(group[k] * inv))  # one fp32 multiply, correctly rounded
                if out_dtype == FP8:
                    q[r, lo + k] = fp8_e4m3fn_byte(y)
                else:
                    q[r, lo + k] = int8_value(y)
            s[r, j] = scale
    qt = torch.from_numpy(q).reshape(x.shape)
    if out_dtype == FP8:
        qt = qt.view(FP8)
    return qt, torch.from_numpy(s).reshape(*x.shape[:-1], G)


def naive_pack_ue8m0(s_row: torch.Tensor) -> torch.Tensor:
    """fp32 [..., G] power-of-two scales -> int32 words [..., ceil(G/4)]: byte b of word j = biased
    exponent of group 4j+b (0xFF for NaN), missing groups 0. Python integers, one word at a time."""
    G = s_row.shape[-1]
    flat = s_row.reshape(-1, G)
    words = []
    for row in flat.tolist():
        out = []
        for j in range((G + 3) // 4):
            word = 0
            for b in range(4):
                if 4 * j + b < G:
                    bits = int(np.array(row[4 * j + b], dtype=np.float32).view(np.uint32))
                    word |= ((bits >> 23) & 0xFF) << (8 * b)
            out.append(word - (1 << 32) if word >= 1 << 31 else word)
        words.append(out)
    return torch.tensor(words, dtype=torch.int32).reshape(*s_row.shape[:-1], (G + 3) // 4)


@functools.lru_cache(maxsize=None)
def _naive_cached(shape, group_size, in_dtype, out_dtype, pow2, seed, specials):
    x = generate_activation(shape, group_size, in_dtype, seed=seed, out_dtype=out_dtype, specials=specials)
    return x, naive_quant(x, group_size, out_dtype, pow2)


def assert_matches(q, s, q_ref, s_row_ref, layout, name=""):
    """q and s (in `layout`) equal the naive (q_ref, s_row_ref) bit for bit, with the layout's strides."""
    assert_bitwise_equal(q, q_ref, f"{name} q")
    *batch, M, G = s_row_ref.shape
    if layout == "ue8m0_packed":
        assert_bitwise_equal(s.contiguous(), naive_pack_ue8m0(s_row_ref), f"{name} packed scales")
    else:
        assert_bitwise_equal(s.contiguous(), s_row_ref, f"{name} scales")
    expected = empty_scales(batch, M, G, layout, "cpu")
    assert s.stride() == expected.stride() or s.numel() == 0, f"{name} scale strides {s.stride()}"


# ------------------------------------------------------------------------------------------------
# the naive implementation itself: hand-checked values, so its agreement means something
# ------------------------------------------------------------------------------------------------

def test_naive_fp8_encoder_against_known_bytes():
    # (value, byte): max, min normal, min subnormal, ties to even, saturation, signed zero.
    known = [(448.0, 0x7E), (-448.0, 0xFE), (1000.0, 0x7E), (1.0, 0x38), (2.0 ** -6, 0x08),
             (2.0 ** -9, 0x01), (2.0 ** -10, 0x00), (3 * 2.0 ** -10, 0x02), (-0.0, 0x80), (0.0, 0x00),
             (1.0625, 0x38), (1.1875, 0x3A), (240.0, 0x77), (232.0, 0x76)]
    for value, byte in known:
        assert fp8_e4m3fn_byte(value) == byte, (value, hex(fp8_e4m3fn_byte(value)), hex(byte))
    # Every finite e4m3fn value encodes to its own byte.
    allbytes = torch.arange(256, dtype=torch.uint8)
    values = allbytes.view(FP8).float()
    for b, v in zip(allbytes.tolist(), values.tolist()):
        if b & 0x7F != 0x7F:
            assert fp8_e4m3fn_byte(v) == b, (b, v)


def test_naive_int8_rounds_half_to_even():
    assert [int8_value(v) for v in (0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.4, -128.6)] == [0, 2, 2, 0, -2, 126, 127, -128]


# ------------------------------------------------------------------------------------------------
# the reference and the public op against the naive implementation: every config
# ------------------------------------------------------------------------------------------------

def _config_id(c):
    return QuantCase(0, 0, c.group_size, c.in_dtype, c.out_dtype, c.layout, c.scale_ue8m0).id()[4:]


@pytest.mark.parametrize("config", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_matches_naive(config):
    in_dtype, out_dtype, g, layout, pow2 = config
    for seed, (M, K) in enumerate(enumerate_small_shapes(g)):
        # Special groups (zeros, NaN, +-Inf, power-of-two edges) where there is room for them (M = 5).
        x, (q_ref, s_ref) = _naive_cached((M, K), g, in_dtype, out_dtype, pow2, seed, M >= 5)
        name = f"{M}x{K}"

        q, s = per_token_group_quant(x, g, out_dtype, scale_layout=layout, scale_ue8m0=pow2)
        assert_matches(q, s, q_ref, s_ref, layout, name)

        q2, s2 = per_token_group_quant_reference(x, g, out_dtype, pow2)
        assert_bitwise_equal(q2, q_ref, f"{name} reference q")
        assert_bitwise_equal(s2, s_ref, f"{name} reference scales")


@pytest.mark.parametrize("eps", [1e-30, 1e-3, 0.5])
@pytest.mark.parametrize("out_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_matches_naive_eps(eps, out_dtype):
    # eps 1e-3 and 0.5 floor many of generate_activation's small-magnitude groups.
    x = generate_activation((4, 256), 32, torch.bfloat16, seed=3, specials=("zeros",))
    q_ref, s_ref = naive_quant(x, 32, out_dtype, False, eps)
    q, s = per_token_group_quant(x, 32, out_dtype, eps=eps)
    assert_matches(q, s, q_ref, s_ref, "row", f"eps={eps}")


# ------------------------------------------------------------------------------------------------
# special groups, one at a time
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("pow2", [False, True], ids=["fp32", "pow2"])
def test_all_zero_group(out_dtype, pow2):
    """An all-zero group: amax = 0, floored to eps = 1e-10 (as fp32: 1.00000001e-10), so
    scale = fp32(1e-10) / 448 = 2.2321...e-13 for fp8 (/ 127 for int8): finite and positive. Then
    q = 0 * (1 / scale) = +0, whose fp8 and int8 bytes are 0x00. With power-of-two scales,
    2.23e-13 lies in [2^-43, 2^-42), so the scale is 2^-42 (fp8; int8's 7.87e-13 gives 2^-40).
    """
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    x[1, 128:] = 0
    q, s = per_token_group_quant(x, 128, out_dtype, scale_ue8m0=pow2)
    qmax = 448.0 if out_dtype == FP8 else 127.0
    expected = torch.tensor(1e-10, dtype=torch.float32) / torch.tensor(qmax, dtype=torch.float32)
    if pow2:
        expected = torch.tensor(2.0 ** -42 if out_dtype == FP8 else 2.0 ** -40)
    assert_bitwise_equal(s[1, 1], expected, "zero-group scale")
    assert q[1, 128:].view(torch.uint8).eq(0).all()
    q_ref, s_ref = naive_quant(x, 128, out_dtype, pow2)
    assert_matches(q, s, q_ref, s_ref, "row")


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_group_max_at_odd_index(in_dtype, sign):
    """Every odd index in turn holds the only large value: a reduction that skips odd lanes (or any
    lane) gets a smaller amax and a different scale."""
    g = 32
    x = (torch.rand(g // 2, g) * 0.5).to(in_dtype)  # one group per row, |x| < 0.5
    for row, idx in enumerate(range(1, g, 2)):
        x[row, idx] = sign * 100.0
    q, s = per_token_group_quant(x, g, FP8)
    expected = torch.full((g // 2, 1), 100.0) / torch.tensor(448.0)
    assert_bitwise_equal(s, expected, "scales")
    q_ref, s_ref = naive_quant(x, g, FP8, False)
    assert_matches(q, s, q_ref, s_ref, "row")
    # The maximum lands on +-448 exactly.
    assert q.float()[torch.arange(g // 2), torch.arange(1, g, 2)].eq(sign * 448.0).all()


@pytest.mark.parametrize("layout", ["row", "col", "ue8m0_packed"])
def test_power_of_two_rounding(layout):
    """amax 448 -> scale 1 exactly (no bump); amax 450 (the next bf16 above 448) -> 1.0045 -> 2;
    amax 224 -> 0.5; amax 1 -> 1/448 = 2^-8.807 -> 2^-8; amax 0.0625 -> 2^-12.807 -> 2^-12."""
    amaxes = [448.0, 450.0, 224.0, 1.0, 0.0625]
    x = torch.rand(1, 16 * len(amaxes), dtype=torch.bfloat16) * 0.01
    for j, a in enumerate(amaxes):
        x[0, 16 * j + 5] = a
    q, s = per_token_group_quant(x, 16, FP8, scale_layout=layout, scale_ue8m0=True)
    expected = torch.tensor([[1.0, 2.0, 0.5, 2.0 ** -8, 2.0 ** -12]])
    if layout == "ue8m0_packed":
        # biased exponents 127, 128, 126, 119, 115 -> word 0 = 0x777E807F, word 1 = 0x73
        assert s.tolist() == [[0x777E807F, 0x73]]
    else:
        assert_bitwise_equal(s.contiguous(), expected, "pow2 scales")
    q_ref, s_ref = naive_quant(x, 16, FP8, True)
    assert_matches(q, s, q_ref, s_ref, layout)


@pytest.mark.parametrize("layout,out_dtype", LAYOUT_DTYPES, ids=LAYOUT_DTYPE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "pinf", "ninf"])
def test_nonfinite_groups_do_not_leak(layout, out_dtype, bad):
    M, K, g = 5, 384, 64
    x = generate_activation((M, K), g, torch.bfloat16, seed=7, specials=False)
    poisoned = [(0, 0), (2, 3), (4, 5)]  # first group, a middle one, the last group of the last row
    x_bad = x.clone()
    for r, j in poisoned:
        x_bad[r, j * g + 2 * r + 1] = bad
    q, s = per_token_group_quant(x_bad, g, out_dtype, scale_layout=layout)
    q_clean, s_clean = per_token_group_quant(x, g, out_dtype, scale_layout=layout)
    s_row = s.contiguous() if layout != "ue8m0_packed" else None

    mask = torch.zeros(M, K // g, dtype=torch.bool)
    for r, j in poisoned:
        mask[r, j] = True
        qb = q[r, j * g:(j + 1) * g].view(torch.uint8)
        assert qb.eq(0x7F if out_dtype == FP8 else 0).all(), qb
        if s_row is not None:
            assert torch.isnan(s_row[r, j])
        else:
            assert (int(s[r, j // 4]) >> (8 * (j % 4))) & 0xFF == 0xFF
    # Every other group is exactly what it is without the bad values.
    qmask = mask.repeat_interleave(g, dim=1)
    assert_bitwise_equal(q.view(torch.uint8)[~qmask], q_clean.view(torch.uint8)[~qmask], "q of clean groups")
    if s_row is not None:
        assert_bitwise_equal(s_row[~mask], s_clean.contiguous()[~mask], "scales of clean groups")
    q_ref, s_ref = naive_quant(x_bad, g, out_dtype, layout == "ue8m0_packed")
    assert_matches(q, s, q_ref, s_ref, layout)


# ------------------------------------------------------------------------------------------------
# memory: strides, batches, buffers, empty inputs, the input left alone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["row", "col", "ue8m0_packed"])
@pytest.mark.parametrize("row_pad", [3, 64])
@pytest.mark.parametrize("batch", [0, 3])
def test_strided_rows_equal_contiguous(layout, row_pad, batch):
    shape = ((batch,) if batch else ()) + (5, 256)
    x = generate_activation(shape, 64, torch.float16, seed=11)
    xs = make_strided(x, row_pad)
    assert not xs.is_contiguous() and xs.stride(-1) == 1
    before = xs._base.clone()
    q, s = per_token_group_quant(xs, 64, FP8, scale_layout=layout)
    q_ref, s_ref = per_token_group_quant(x, 64, FP8, scale_layout=layout)
    assert q.is_contiguous()
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s.contiguous(), s_ref.contiguous(), "scales")
    assert s.stride() == s_ref.stride()
    assert_bitwise_equal(xs._base, before, "input buffer")  # read only, garbage around it untouched


@pytest.mark.parametrize("layout,out_dtype", LAYOUT_DTYPES, ids=LAYOUT_DTYPE_IDS)
def test_3d_equals_per_batch_2d(layout, out_dtype):
    E, M, K, g = 3, 5, 640, 128  # G = 5: a partial packed word; M_pad = 8
    x = generate_activation((E, M, K), g, torch.bfloat16, seed=5, out_dtype=out_dtype)
    q, s = per_token_group_quant(x, g, out_dtype, scale_layout=layout)
    expected = empty_scales((E,), M, K // g, layout, "cpu")
    assert s.shape == expected.shape and s.stride() == expected.stride()
    for e in range(E):
        q2, s2 = per_token_group_quant(x[e], g, out_dtype, scale_layout=layout)
        assert_bitwise_equal(q[e], q2, f"q[{e}]")
        assert s[e].stride() == s2.stride()
        assert_bitwise_equal(s[e].contiguous(), s2.contiguous(), f"s[{e}]")


@pytest.mark.parametrize("layout", ["row", "col", "ue8m0_packed"])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_out_buffers_fully_written(layout, batch):
    M, K, g = 5, 384, 32
    x = generate_activation((*batch, M, K), g, torch.bfloat16, seed=2)
    q_buf = poison_(torch.empty(x.shape, dtype=FP8))
    s_buf = poison_(empty_scales(batch, M, K // g, layout, "cpu"))
    q, s = per_token_group_quant(x, g, FP8, scale_layout=layout, out=q_buf, scale_out=s_buf)
    assert q is q_buf and s is s_buf
    q_ref, s_ref = per_token_group_quant(x, g, FP8, scale_layout=layout)
    # Bitwise equality with a fresh result means no poisoned element is left (padding rows excepted:
    # they are not part of the tensor).
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s.contiguous(), s_ref.contiguous(), "scales")
    if layout != "row":  # the storage does hold padding rows the op may leave alone
        assert s.untyped_storage().nbytes() == 4 * s.shape[-1] * tma_aligned_rows(M) * (batch[0] if batch else 1)


@pytest.mark.parametrize("layout", ["row", "col", "ue8m0_packed"])
@pytest.mark.parametrize("shape", [(0, 256), (2, 0, 256), (0, 3, 256)], ids=["M0", "E2-M0", "E0"])
def test_empty_input(layout, shape):
    x = torch.empty(shape, dtype=torch.bfloat16)
    q, s = per_token_group_quant(x, 64, FP8, scale_layout=layout)
    *batch, M, K = shape
    assert q.dtype == FP8 and tuple(q.shape) == shape
    G = K // 64
    cols = (G + 3) // 4 if layout == "ue8m0_packed" else G
    assert tuple(s.shape) == (*batch, M, cols)
    assert s.dtype == (torch.int32 if layout == "ue8m0_packed" else torch.float32)
    # And buffers passed in for an empty input are validated and returned as they are.
    q_buf, s_buf = torch.empty(shape, dtype=FP8), empty_scales(batch, M, G, layout, "cpu")
    q2, s2 = per_token_group_quant(x, 64, FP8, scale_layout=layout, out=q_buf, scale_out=s_buf)
    assert q2 is q_buf and s2 is s_buf


def test_input_not_modified():
    x = generate_activation((5, 512), 128, torch.float32, seed=9)
    before = x.clone()
    per_token_group_quant(x, 128, INT8, scale_layout="col", scale_ue8m0=False)
    per_token_group_quant(x, 128, FP8, scale_layout="ue8m0_packed")
    assert_bitwise_equal(x, before, "x")


def test_public_name_is_the_op_wrapper():
    assert fp8linear.per_token_group_quant is per_token_group_quant


# ------------------------------------------------------------------------------------------------
# bad input: the right exception type, naming the argument
# ------------------------------------------------------------------------------------------------

def _x(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


BAD_INPUTS = [
    # (id, args, kwargs, exception, message regex)
    ("K%g", (_x(4, 100), 16), {}, ValueError, r"K=100 must be divisible by group_size=16"),
    ("g48", (_x(4, 96), 48), {}, ValueError, r"group_size must be one of \(16, 32, 64, 128, 256\); got 48"),
    ("g0", (_x(4, 96), 0), {}, ValueError, r"group_size must be one of .*got 0"),
    ("x-float64", (_x(4, 128, dtype=torch.float64), 128), {}, TypeError, r"x must be bfloat16, float16 or float32; got torch.float64"),
    ("x-int8", (_x(4, 128).to(torch.int8), 128), {}, TypeError, r"x must be .*got torch.int8"),
    ("x-list", ([[1.0] * 128], 128), {}, TypeError, r"x must be a torch.Tensor; got list"),
    ("dtype-fp16", (_x(4, 128), 128, torch.float16), {}, TypeError, r"dtype must be torch.float8_e4m3fn or torch.int8; got torch.float16"),
    ("dtype-e5m2", (_x(4, 128), 128, torch.float8_e5m2), {}, TypeError, r"dtype must be .*got torch.float8_e5m2"),
    ("last-dim-strided", (_x(128, 4).t(), 128), {}, ValueError, r"x's last dim must be contiguous \(stride 1\); got strides \(1, 4\)"),
    ("x-1d", (_x(128), 128), {}, ValueError, r"x must be 2-D \[M, K\] or 3-D \[E, M, K\]; got shape \[128\]"),
    ("x-4d", (_x(2, 2, 2, 128), 128), {}, ValueError, r"x must be 2-D .*got shape \[2, 2, 2, 128\]"),
    ("layout", (_x(4, 128), 128), {"scale_layout": "colmajor"}, ValueError, r"scale_layout must be one of .*got 'colmajor'"),
    ("ue8m0-int8", (_x(4, 128), 128, torch.int8), {"scale_layout": "ue8m0_packed"}, ValueError, r"scale_layout='ue8m0_packed' is for fp8.*torch.int8"),
    ("eps0", (_x(4, 128), 128), {"eps": 0.0}, ValueError, r"eps must be a finite float >= 1e-30; got 0.0"),
    ("eps-nan", (_x(4, 128), 128), {"eps": float("nan")}, ValueError, r"eps must be .*got nan"),
    ("eps-inf", (_x(4, 128), 128), {"eps": float("inf")}, ValueError, r"eps must be .*got inf"),
    ("eps-neg", (_x(4, 128), 128), {"eps": -1e-3}, ValueError, r"eps must be .*got -0.001"),
    ("eps-str", (_x(4, 128), 128), {"eps": "1e-10"}, ValueError, r"eps must be .*got '1e-10'"),
    ("out-shape", (_x(4, 128), 128), {"out": torch.empty(4, 256, dtype=FP8)}, ValueError, r"out must have x's shape \[4, 128\]; got \[4, 256\]"),
    ("out-dtype", (_x(4, 128), 128), {"out": torch.empty(4, 128, dtype=torch.int8)}, TypeError, r"out must have dtype torch.float8_e4m3fn .*got torch.int8"),
    ("out-device", (_x(4, 128), 128), {"out": torch.empty(4, 128, dtype=FP8, device="meta")}, ValueError, r"out must be on cpu like x; got meta"),
    ("out-noncontig", (_x(4, 128), 128), {"out": torch.empty(128, 4, dtype=torch.uint8).t().view(FP8)}, ValueError, r"out must be contiguous; got strides \(1, 4\)"),
    ("out-type", (_x(4, 128), 128), {"out": "buffer"}, TypeError, r"out must be a torch.Tensor; got str"),
    ("scale-strides-col", (_x(5, 256), 128), {"scale_layout": "col", "scale_out": torch.empty(5, 2)}, ValueError, r"scale_out must have strides \(1, 8\) for scale_layout='col'.*got \(2, 1\)"),
    ("scale-strides-row", (_x(5, 256), 128), {"scale_out": empty_scales((), 5, 2, "col", "cpu")}, ValueError, r"scale_out must have strides \(2, 1\) for scale_layout='row'.*got \(1, 8\)"),
    ("scale-shape", (_x(5, 256), 128), {"scale_out": torch.empty(5, 3)}, ValueError, r"scale_out must have shape \[5, 2\] .*got \[5, 3\]"),
    ("scale-dtype", (_x(5, 256), 128), {"scale_layout": "ue8m0_packed", "scale_out": empty_scales((), 5, 2, "col", "cpu")}, TypeError, r"scale_out must have dtype torch.int32 for scale_layout='ue8m0_packed'; got torch.float32"),
    ("scale-device", (_x(5, 256), 128), {"scale_out": torch.empty(5, 2, device="meta")}, ValueError, r"scale_out must be on cpu like the input; got meta"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        per_token_group_quant(*args, **kwargs)


def test_bad_buffer_is_not_written():
    """A rejected call must not have touched the caller's valid buffer."""
    x = _x(5, 256)
    q_buf = poison_(torch.empty(5, 256, dtype=FP8))
    with pytest.raises(ValueError):
        per_token_group_quant(x, 128, out=q_buf, scale_out=torch.empty(5, 3))
    assert q_buf.view(torch.uint8).eq(0x7F).all()


# ------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ------------------------------------------------------------------------------------------------

def _op_samples():
    samples = []
    for (M, K, g, dtype, layout, pow2) in [(3, 256, 64, FP8, "col", False), (4, 384, 128, INT8, "row", False),
                                           (5, 640, 128, FP8, "ue8m0_packed", True), (2, 64, 16, FP8, "row", True)]:
        x = generate_activation((M, K), g, torch.bfloat16, seed=M, specials=False)
        q = torch.empty(x.shape, dtype=dtype)
        s = empty_scales((), M, K // g, layout, "cpu")
        samples.append((x, q, s, g, pow2, 1e-10, layout))
    return samples


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = _op_samples()[sample]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if args[1].dtype == FP8:
        # SchemaCheckMode detects mutation with arithmetic that CPU torch lacks for fp8
        # ('"mul_cpu_reduced_float" not implemented for Float8_e4m3fn', torch 2.13); the int8 samples
        # run the schema test on the same op.
        tests = tests[1:]
    torch.library.opcheck(torch.ops.fp8linear.per_token_group_quant_.default, args, test_utils=tests)


def _inductor_problem() -> "str | None":
    """Why torch.compile's default backend (inductor, which compiles C++ on CPU) cannot run here, or None.

    A cheap look instead of a probe compile: a cold probe costs seconds on a 2-core CI machine."""
    try:
        import torch._inductor.config as inductor_config
    except Exception as exc:  # noqa: BLE001 - the reason goes into the skip message
        return f"torch._inductor does not import: {type(exc).__name__}: {exc}"
    names = [os.environ.get("CXX")] + [c for c in inductor_config.cpp.cxx if c]
    if not any(n and shutil.which(n) for n in names):
        return f"no C++ compiler on PATH (tried {[n for n in names if n]})"
    return None


@pytest.mark.parametrize("layout", ["col", "ue8m0_packed"])
def test_torch_compile_fullgraph(layout):
    problem = _inductor_problem()
    if problem:
        pytest.skip(f"torch.compile (inductor) does not run here: {problem}")

    def quantize(x):
        q, s = per_token_group_quant(x, 64, FP8, scale_layout=layout, scale_ue8m0=True)
        return q, s

    x = generate_activation((5, 256), 64, torch.bfloat16, seed=4)
    torch._dynamo.reset()
    q, s = torch.compile(quantize, fullgraph=True)(x)
    q_ref, s_ref = quantize(x)
    assert_bitwise_equal(q, q_ref, "compiled q")
    assert s.shape == s_ref.shape and s.stride() == s_ref.stride(), (s.stride(), s_ref.stride())
    assert_bitwise_equal(s.contiguous(), s_ref.contiguous(), "compiled scales")


# -- quant_for_gemm: FP8Linear's allocating variant ----------------------------------------------------

@pytest.mark.parametrize("layout", ["row", "col", "ue8m0_packed"])
@pytest.mark.parametrize("row_align", [1, 4])
@pytest.mark.parametrize("M", [0, 1, 5, 8])
@pytest.mark.parametrize("dtype", [FP8, torch.int8])
def test_quant_for_gemm_matches_the_public_op_on_its_rows(layout, row_align, M, dtype):
    from fp8linear.layouts import ScaleLayout
    from fp8linear.ops import quantize_for_gemm

    if layout == "ue8m0_packed" and dtype == torch.int8:
        pytest.skip("ue8m0_packed is fp8 only")
    K, g = 640, 128  # G = 5: packed words not full
    x = generate_activation((max(M, 1), K), g, torch.bfloat16, seed=M + 10 * row_align, specials=False)[:M]
    q, s = quantize_for_gemm(x, g, dtype, False, ScaleLayout(layout), row_align)
    M_pad = -(-M // row_align) * row_align
    want_s = empty_scales((), M_pad, K // g, layout, "cpu")
    assert q.shape == (M_pad, K) and q.dtype == dtype and q.is_contiguous()
    assert s.shape == want_s.shape and s.dtype == want_s.dtype
    if M_pad > 1:
        assert s.stride() == want_s.stride()
    ref_q, ref_s = per_token_group_quant(x, g, dtype, scale_layout=layout)
    assert_bitwise_equal(q[:M], ref_q, "q rows 0..M-1")
    assert_bitwise_equal(s[:M], ref_s, "s rows 0..M-1")
