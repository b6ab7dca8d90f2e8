"""The fused small-M op `fp8linear::small_m_linear` and the `small_m` GEMM backend (decode, M <= 16), on CPU.

    y [M, N] = dequant(per_token_group_quant(x, 128, weight.dtype)) @ dequant(weight, weight_scale_inv)^T + bias

in fp32, cast to x's dtype (fp8linear.small_m). The oracle: the op on CPU against `emulate`, written here
step by step from fp8linear.reference's quantizer and DESIGN.md's block dequantization (no fp8linear GEMM
code), at summation-order tolerance. The CUDA op against this CPU op: test_small_m_gpu.py.

Inputs (small_m_cases.py) are seeded and random, never zeros alone: each 128-group of x and each 128x128
block of W gets its own magnitude (a wrong group or block index changes the answer) and x holds one
all-zero group (amax floored to eps). Bad arguments through the Python wrapper raise errors that name the
argument.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitwise_equal
from fp8linear import FP8Linear, backends
from fp8linear.backends import small_m
from fp8linear.backends import BackendUnsupportedError
from fp8linear.reference import per_token_group_quant_reference
from small_m_cases import (BF16, EPS, FP8, FP16, FP32, GROUP, INT8, make_bias, make_weight, make_x, op,
                           opcheck_args, opcheck_tests)

#: |y - y32| <= RTOL * |y32| + 2e-5 * max |y32|, y32 the emulation in fp32. fp32 output: summation
#: order only (brief: 1e-5); bf16/fp16: plus half an ulp of the output rounding (2^-8, 2^-11).
RTOL = {FP32: 1e-5, BF16: 2.0**-8, FP16: 2.0**-11}


# ------------------------------------------------------------------------------------------------
# the independent CPU oracle
# ------------------------------------------------------------------------------------------------

def emulate(x, weight, weight_scale_inv, bias=None, scale_ue8m0=False, eps=EPS) -> torch.Tensor:
    """The op's contract step by step, in fp32 (not cast to x's dtype: the checker rounds).

    q, s = per_token_group_quant_reference(x)           q [M, K] fp8/int8, s fp32 [M, K/128]
    a    = q * s per 128-group                          [M, K] fp32
    w    = weight * weight_scale_inv per 128x128 block  [N, K] fp32 (edge blocks cut at N)
    y    = a @ w^T + bias                               [M, N] fp32
    """
    M, K = x.shape
    N = weight.shape[0]
    q, s = per_token_group_quant_reference(x, GROUP, weight.dtype, scale_ue8m0, eps)
    a = (q.float().reshape(M, K // GROUP, GROUP) * s.unsqueeze(-1)).reshape(M, K)
    w_scale = weight_scale_inv.repeat_interleave(GROUP, 0)[:N].repeat_interleave(GROUP, 1)  # [N, K]
    w = weight.float() * w_scale
    y = a @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y


def assert_matches_emulation(y: torch.Tensor, y32: torch.Tensor, x_dtype: torch.dtype, equal_nan: bool = False):
    """y (the op, in x's dtype) against the fp32 emulation: summation order plus one output rounding."""
    assert y.dtype == x_dtype, f"y dtype {y.dtype} != x dtype {x_dtype}"
    assert y.shape == y32.shape, f"y shape {list(y.shape)} != {list(y32.shape)}"
    finite = y32[torch.isfinite(y32)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(y.float(), y32, rtol=RTOL[x_dtype], atol=2e-5 * max(scale, 1e-30),
                               equal_nan=equal_nan)


# ------------------------------------------------------------------------------------------------
# CPU: the op against the emulation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_ue8m0", [False, True], ids=["scale", "pow2"])
@pytest.mark.parametrize("bias_dtype", [None, BF16, FP32], ids=["nobias", "bias-bf16", "bias-fp32"])
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("K", [128, 384])  # one group; G = 3
@pytest.mark.parametrize("N", [16, 200, 256])  # one partial block; a full and a partial block; two full
@pytest.mark.parametrize("M", [1, 3, 16])  # decode; odd; MAX_M
def test_cpu_op_matches_emulation(M, N, K, dtype, bias_dtype, scale_ue8m0):
    x = make_x(M, K, FP32, seed=M * 1000 + N + K)
    weight, weight_scale_inv = make_weight(N, K, dtype, scale_ue8m0)
    bias = make_bias(N, bias_dtype)
    y = op(x, weight, weight_scale_inv, bias, scale_ue8m0)
    assert y.is_contiguous()
    assert_matches_emulation(y, emulate(x, weight, weight_scale_inv, bias, scale_ue8m0), FP32)
    wrapped = small_m.small_m_linear(x, weight, weight_scale_inv, bias, scale_ue8m0=scale_ue8m0)
    assert_bitwise_equal(wrapped, y, "wrapper vs op")


@pytest.mark.parametrize("x_dtype", [BF16, FP16])
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cpu_op_half_inputs(dtype, x_dtype):
    """bf16/fp16 x: quantized from its own values, y rounded once to x's dtype."""
    M, N, K = 5, 200, 384
    x = make_x(M, K, x_dtype, seed=7)
    weight, weight_scale_inv = make_weight(N, K, dtype)
    bias = make_bias(N, BF16)
    y = op(x, weight, weight_scale_inv, bias)
    assert_matches_emulation(y, emulate(x, weight, weight_scale_inv, bias), x_dtype)


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cpu_eps_is_the_amax_floor(dtype):
    """Every group's amax is <= 1e-5 < eps = 1e-3: its scale is eps/QMAX, so q is coarse (fp8: |q| <= 4.48,
    int8: |q| <= 1.27 rounds to -1, 0 or 1). The op must follow the eps it is given; with the default eps
    the answer is visibly different."""
    M, N, K = 3, 128, 256
    x = make_x(M, K, FP32, seed=8)
    x *= 1e-5 / x.abs().max()
    weight, weight_scale_inv = make_weight(N, K, dtype)
    y = op(x, weight, weight_scale_inv, None, False, 1e-3)
    want = emulate(x, weight, weight_scale_inv, eps=1e-3)
    assert_matches_emulation(y, want, FP32)
    default = emulate(x, weight, weight_scale_inv)
    assert not torch.allclose(want, default, rtol=1e-2, atol=0), "the case does not exercise eps"
    assert_bitwise_equal(small_m.small_m_linear(x, weight, weight_scale_inv, eps=1e-3), y, "wrapper eps")


@pytest.mark.parametrize("x_dtype", [BF16, FP32])
def test_cpu_strided_rows(x_dtype):
    """x = big[:, :K] of a wider buffer whose extra columns hold large finite garbage: same y as contiguous."""
    M, N, K = 4, 200, 384
    x = make_x(M, K, x_dtype, seed=9)
    big = torch.full((M, K + GROUP), 3e4, dtype=x_dtype)
    big[:, :K] = x
    strided = big[:, :K]
    assert strided.stride() == (K + GROUP, 1)
    weight, weight_scale_inv = make_weight(N, K, FP8)
    assert_bitwise_equal(op(strided, weight, weight_scale_inv), op(x, weight, weight_scale_inv), "strided x")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cpu_nonfinite_group_poisons_its_row(dtype, value):
    """One non-finite element in group 1 of row 2: that group's scale is NaN, so all of row 2 is NaN; the
    other rows are finite and unchanged."""
    M, N, K, row = 5, 200, 384, 2
    x = make_x(M, K, BF16, seed=10)
    weight, weight_scale_inv = make_weight(N, K, dtype)
    bias = make_bias(N, BF16)
    bad = x.clone()
    bad[row, GROUP + 37] = value
    y = op(bad, weight, weight_scale_inv, bias)
    assert torch.isnan(y[row]).all(), f"row {row}: {int(torch.isnan(y[row]).sum())} of {N} NaN"
    others = [r for r in range(M) if r != row]
    assert torch.isfinite(y[others]).all()
    assert_bitwise_equal(y[others], op(x, weight, weight_scale_inv, bias)[others], "rows without the NaN")
    assert_matches_emulation(y, emulate(bad, weight, weight_scale_inv, bias), BF16, equal_nan=True)


@pytest.mark.parametrize("x_dtype", [BF16, FP32])
def test_cpu_empty_batch(x_dtype):
    weight, weight_scale_inv = make_weight(200, 256, FP8)
    x = torch.empty(0, 256, dtype=x_dtype)
    for y in (op(x, weight, weight_scale_inv), small_m.small_m_linear(x, weight, weight_scale_inv)):
        assert y.shape == (0, 200) and y.dtype == x_dtype


@pytest.mark.parametrize("M", [0, 3])
def test_fake_matches_real(M):
    """The fake (meta) implementation gives y's shape, dtype and strides exactly (STYLE.md 4), also for
    strided x."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    N, K = 200, 384
    big = make_x(M, K + GROUP, BF16, seed=11)
    x = big[:, :K]
    weight, weight_scale_inv = make_weight(N, K, INT8)
    bias = make_bias(N, FP32)
    y = op(x, weight, weight_scale_inv, bias)
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in (x, weight, weight_scale_inv, bias)]
    with mode:
        fy = op(*fake)
    assert (tuple(fy.shape), fy.dtype, fy.stride()) == (tuple(y.shape), y.dtype, y.stride())
    assert y.shape == (M, N) and y.dtype == BF16


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_opcheck_cpu(dtype):
    torch.library.opcheck(torch.ops.fp8linear.small_m_linear.default, opcheck_args("cpu", dtype),
                          test_utils=opcheck_tests(dtype))


def test_torch_compile_fullgraph_cpu():
    """Dynamo traces the op in one graph, also at a second M (aot_eager: no C++ build on CPU)."""
    N, K = 200, 384
    weight, weight_scale_inv = make_weight(N, K, FP8)
    bias = make_bias(N, BF16)

    def f(x):
        return op(x, weight, weight_scale_inv, bias)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for M, seed in ((3, 13), (16, 14)):
        x = make_x(M, K, BF16, seed=seed)
        assert_bitwise_equal(compiled(x), f(x), f"compiled y, M={M}")


# ------------------------------------------------------------------------------------------------
# CPU: rejections by the wrapper, and the backend's registry entry
# ------------------------------------------------------------------------------------------------

def _names(*parts: str) -> str:
    """A regex that matches a message containing every part (as a whole word where it starts and ends
    with a word character), in any order."""
    def word(p: str) -> str:
        return rf"\b{p}\b" if p[0].isalnum() and p[-1].isalnum() else p

    return "(?s)^" + "".join(f"(?=.*{word(p)})" for p in parts)


def _bad_cases():
    N, K = 200, 256
    weight, weight_scale_inv = make_weight(N, K, FP8)
    weight_k200, weight_scale_inv_k200 = make_weight(N, 200, FP8)
    x = make_x(2, K, BF16)
    bias = make_bias(N, BF16)
    ok = dict(x=x, weight=weight, weight_scale_inv=weight_scale_inv, bias=bias)
    return [
        ("M=17", dict(ok, x=make_x(17, K, BF16)), ValueError, _names("x", "17")),
        ("K%128", dict(ok, x=torch.randn(2, 200, dtype=BF16), weight=weight_k200,
                       weight_scale_inv=weight_scale_inv_k200), ValueError, _names(r"\b(x|weight|K)\b", "200")),
        ("K-mismatch", dict(ok, x=make_x(2, 384, BF16)), ValueError, _names(r"\b(x|weight)\b", "384")),
        ("weight-dtype", dict(ok, weight=weight.to(BF16)), TypeError, _names("weight", "bfloat16")),
        ("weight_scale_inv-shape", dict(ok, weight_scale_inv=torch.ones(2, 3)), ValueError,
         _names("weight_scale_inv", "2, 3")),
        ("bias-shape", dict(ok, bias=torch.zeros(199, dtype=BF16)), ValueError, _names("bias", "199")),
        ("x-1d", dict(ok, x=x[0]), ValueError, _names("x")),
        ("x-int", dict(ok, x=torch.ones(2, K, dtype=torch.int32)), TypeError, _names("x", "int32")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_wrapper_rejects_bad_input(case):
    _, kwargs, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        small_m.small_m_linear(kwargs["x"], kwargs["weight"], kwargs["weight_scale_inv"], kwargs["bias"])


def test_wrapper_accepts_max_m():
    assert small_m.MAX_M == 16
    weight, weight_scale_inv = make_weight(200, 256, INT8)
    y = small_m.small_m_linear(make_x(16, 256, BF16), weight, weight_scale_inv)
    assert y.shape == (16, 200) and y.dtype == BF16


def test_backend_reasons_on_cpu():
    cpu = torch.device("cpu")
    for M in (1, 17):
        why = backends.unsupported_reason("small_m", M, 256, 256, FP8, cpu)
        assert isinstance(why, str) and why, f"M={M} on CPU: the small_m backend must give a reason, got {why!r}"
    assert backends.get("small_m").NAME == "fused_mma"
    assert backends.get("small_m").SCALE_LAYOUT is None  # quantizes inside its kernel: no gemm on (q, s)


def test_explicit_backend_on_cpu_raises_on_forward():
    m = FP8Linear(256, 256, backend="small_m")  # building is fine: the backend is chosen per M on forward
    with pytest.raises(BackendUnsupportedError, match=r"backend='fused_mma' cannot serve M=2, N=256, K=256.* on cpu"):
        m(torch.randn(2, 256))


def test_repr_names_the_backend():
    """repr(layer) shows which backend serves it (README), also for a backend that has no scale layout."""
    assert "backend=fused_mma" in FP8Linear(256, 256, backend="small_m", device="meta").extra_repr()
    assert "backend=fused_mma" in repr(FP8Linear(256, 256, backend="small_m"))
