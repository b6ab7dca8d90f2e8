"""The fused small-M op `fp8linear::small_m_linear` and the `small_m` GEMM backend (decode, M <= 16).

    y [M, N] = dequant(per_token_group_quant(x, 128, weight.dtype)) @ dequant(weight, weight_scale_inv)^T + bias

in fp32, cast to x's dtype (fp8linear.small_m). Two oracles:

- CPU: the op on CPU against `emulate`, written here step by step from fp8linear.reference's quantizer
  and DESIGN.md's block dequantization (no fp8linear GEMM code), at summation-order tolerance.
- GPU (marked `gpu`, skipped without CUDA): the CUDA op against the CPU op on the same inputs, with
  test_backends_gpu.py's metric ||y - ref|| / ||ref|| <= 1e-2 and, stricter, max |y - ref| <= 2e-2 *
  max |ref|: the kernel quantizes x bit-exactly like the reference, so only the tensor-core accumulation
  order and the output rounding differ, and no single element may be off by more than rounding.

Inputs are seeded and random, never zeros alone: each 128-group of x and each 128x128 block of W gets its
own magnitude (a wrong group or block index changes the answer) and x holds one all-zero group (amax
floored to eps). Bad arguments through the Python wrapper raise errors that name the argument.
"""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

from conftest import assert_bitwise_equal, poison_allocator
from fp8linear import FP8Linear, backends
from fp8linear.backends import small_m
from fp8linear.backends import BackendUnsupportedError
from fp8linear.reference import per_token_group_quant_reference
from fp8linear.weights import quantize_weight_blockwise

FP8, INT8 = torch.float8_e4m3fn, torch.int8
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
GROUP = 128
EPS = 1e-10

REL_TOL = 1e-2  # tests/test_backends_gpu.py (issue 3): ||y - ref|| / ||ref||
MAX_ABS_TOL = 2e-2  # max |y - ref| <= MAX_ABS_TOL * max |ref|: accumulation order and output rounding only
#: CPU: |y - y32| <= RTOL * |y32| + 2e-5 * max |y32|, y32 the emulation in fp32. fp32 output: summation
#: order only (brief: 1e-5); bf16/fp16: plus half an ulp of the output rounding (2^-8, 2^-11).
RTOL = {FP32: 1e-5, BF16: 2.0**-8, FP16: 2.0**-11}


def op(x, weight, weight_scale_inv, bias=None, scale_ue8m0=False, eps=EPS):
    """The registered op itself, positional as its schema (not the wrapper)."""
    return torch.ops.fp8linear.small_m_linear(x, weight, weight_scale_inv, bias, scale_ue8m0, eps)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def make_x(M: int, K: int, dtype: torch.dtype = BF16, seed: int = 0) -> torch.Tensor:
    """x [M, K] in `dtype` on CPU, contiguous: randn per 128-group times 10**uniform(-1, 1), and (when a
    row has several groups) the middle group of the last row all zeros."""
    gen = torch.Generator().manual_seed(seed)
    G = K // GROUP
    magnitude = 10.0 ** (torch.rand(M, G, 1, generator=gen) * 2 - 1)  # [M, G, 1]
    x = (torch.randn(M, G, GROUP, generator=gen) * magnitude).reshape(M, K)
    if M > 0 and G > 1:
        x[-1, (G // 2) * GROUP:(G // 2 + 1) * GROUP] = 0.0
    return x.to(dtype)


def make_weight(N: int, K: int, dtype: torch.dtype, scale_ue8m0: bool = False, seed: int = 1,
                device: "str | torch.device" = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K] fp8/int8, weight_scale_inv fp32 [ceil(N/128), K/128]) on `device`, each 128x128
    block with its own magnitude, quantized per DESIGN.md "Weights" (partial edge blocks when N % 128)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb, kb = -(-N // GROUP), -(-K // GROUP)
    magnitude = 0.05 * 10.0 ** (torch.rand(nb, kb, generator=gen, device=device) * 2 - 1)
    per_element = magnitude.repeat_interleave(GROUP, 0)[:N].repeat_interleave(GROUP, 1)[:, :K]
    W = torch.randn(N, K, generator=gen, device=device) * per_element
    return quantize_weight_blockwise(W, dtype, scale_ue8m0=scale_ue8m0)


def make_bias(N: int, dtype: "torch.dtype | None", seed: int = 2) -> "torch.Tensor | None":
    if dtype is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=gen).to(dtype)


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


def _opcheck_args(device: str, dtype: torch.dtype):
    """One small case: int8 with a bf16 bias and power-of-two scales, or fp8 without bias."""
    M, N, K = 3, 200, 384
    weight, weight_scale_inv = make_weight(N, K, dtype, scale_ue8m0=dtype == INT8)
    bias = make_bias(N, BF16) if dtype == INT8 else None
    x = make_x(M, K, BF16, seed=12)
    args = (x, weight, weight_scale_inv, bias, dtype == INT8, EPS)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _opcheck_tests(dtype: torch.dtype) -> tuple[str, ...]:
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if dtype == FP8:
        # SchemaCheckMode compares the inputs before and after with arithmetic torch lacks for fp8 (as in
        # tests/test_quant_cpu.py); the int8 sample runs the schema test on the same op.
        tests = tests[1:]
    return tests


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_opcheck_cpu(dtype):
    torch.library.opcheck(torch.ops.fp8linear.small_m_linear.default, _opcheck_args("cpu", dtype),
                          test_utils=_opcheck_tests(dtype))


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


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA op against the CPU op
# ------------------------------------------------------------------------------------------------

def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def assert_close_gpu(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """test_backends_gpu.py's relative error, and no element off by more than MAX_ABS_TOL * max |ref|."""
    y, ref = y.cpu(), ref.cpu()
    assert y.shape == ref.shape and y.dtype == ref.dtype, (
        f"{what}: {y.dtype} {list(y.shape)} vs {ref.dtype} {list(ref.shape)}")
    assert torch.isfinite(y).all(), f"{what}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    err = _rel_err(y, ref)
    assert err <= REL_TOL, f"{what}: relative error {err:.3g} > {REL_TOL}"
    diff = (y.float() - ref.float()).abs()
    bound = MAX_ABS_TOL * ref.float().abs().max().item()
    if diff.numel() and diff.max().item() > bound:
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(f"{what}: max |y - ref| = {diff.max().item():.4g} at {idx} (y {y[idx].item():.4g}, "
                             f"ref {ref[idx].item():.4g}) > {MAX_ABS_TOL} * max |ref| = {bound:.4g}")


GPU_MS = (1, 2, 3, 5, 8, 9, 15, 16)  # around the MMA tiles (8, 16) and the 4-row padding of other backends
GPU_NK = (
    (16, 128),  # one partial weight block, one group
    (112, 640),  # N < 128; G = 5
    (200, 1664),  # a partial second N block; G = 13
    (1024, 4096),  # a GQA k/v projection: 64 row blocks, split K 4 ways (kernels/small_m_linear.cu)
    (2112, 7168),  # DeepSeek-V3 q_a/kv_a projection: 16.5 N blocks, G = 56; 132 row blocks: split K
    (4096, 4096),  # Llama-class square layer
    (7168, 7168),  # N and K >= 7168: x quantized ahead from M = 1 (kernels/small_m_linear.cu)
    (4160, 256),  # many N blocks, the last half full; short K (two groups)
    (8336, 256),  # N / 32 >= the SM count: 32-row blocks at M > 8 (fewer N: 16-row), the last one partial
)
BIAS_DTYPES = (None, BF16, FP32)


def _gpu_grid():
    """Every (M, N, K, dtype) once; the remaining options (x dtype, bias dtype, power-of-two scales: 18
    combinations) dealt out over a seeded shuffle of the 64 (M, N, K) of each dtype, so each combination
    runs three or four times per dtype at unrelated shapes. The full product (2304) would run for minutes
    on the CPU oracle alone."""
    rng = random.Random(0)
    options = list(itertools.product((BF16, FP16, FP32), BIAS_DTYPES, (False, True)))
    short = {BF16: "bf16", FP16: "fp16", FP32: "fp32", None: "none"}
    cases = []
    for dtype in (FP8, INT8):
        shapes = list(itertools.product(GPU_MS, GPU_NK))
        rng.shuffle(shapes)
        for i, (M, (N, K)) in enumerate(shapes):
            x_dtype, bias_dtype, pow2 = options[i % len(options)]
            cases.append(pytest.param(
                M, N, K, dtype, x_dtype, bias_dtype, pow2,
                id=f"{M}x{N}x{K}-{'fp8' if dtype == FP8 else 'int8'}-x{short[x_dtype]}-bias{short[bias_dtype]}"
                   f"{'-pow2' if pow2 else ''}",
            ))
    cases.sort(key=lambda p: (p.values[1], p.values[2]))  # weights of one shape together (cache below)
    return cases


@functools.lru_cache(maxsize=None)
def _cpu_weight(N: int, K: int, dtype: torch.dtype, pow2: bool):
    return make_weight(N, K, dtype, scale_ue8m0=pow2, seed=N + K)


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("M,N,K,dtype,x_dtype,bias_dtype,pow2", _gpu_grid())
def test_cuda_op_matches_cpu_op(M, N, K, dtype, x_dtype, bias_dtype, pow2):
    weight, weight_scale_inv = _cpu_weight(N, K, dtype, pow2)
    x = make_x(M, K, x_dtype, seed=M * 7 + N + K)
    bias = make_bias(N, bias_dtype)
    ref = op(x, weight, weight_scale_inv, bias, pow2)
    args = [t.cuda() if t is not None else None for t in (x, weight, weight_scale_inv, bias)]
    poison_allocator()
    y = op(*args, pow2)
    assert y.device.type == "cuda" and y.shape == (M, N) and y.dtype == x_dtype
    assert_close_gpu(y, ref, f"M={M} N={N} K={K} {dtype} x {x_dtype} bias {bias_dtype} pow2={pow2}")


def _cuda_case(M, N, K, dtype=FP8, x_dtype=BF16, bias_dtype=BF16, seed=0):
    """(x, weight, weight_scale_inv, bias) on the GPU, from the CPU generators."""
    weight, weight_scale_inv = _cpu_weight(N, K, dtype, False)
    x = make_x(M, K, x_dtype, seed=seed)
    bias = make_bias(N, bias_dtype)
    return [t.cuda() if t is not None else None for t in (x, weight, weight_scale_inv, bias)]


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("x_dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("M,N,K", [(1, 200, 1664), (5, 4096, 4096), (16, 2112, 7168)])
def test_cuda_strided_and_misaligned_rows(M, N, K, x_dtype):
    """Rows of a wider buffer (row stride K + 128, still 16-byte aligned) and rows starting one element in
    (x = buf[:, 1:K+1] of a [M, K + 8] buffer: base pointer not 16-byte aligned, last dim contiguous) give
    exactly x.contiguous()'s answer. The buffers' other columns hold large finite garbage, so a read outside
    the view would change a group's amax."""
    x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, x_dtype=x_dtype, seed=21)
    want = op(x, weight, weight_scale_inv, bias)

    big = torch.full((M, K + GROUP), 3e4, dtype=x_dtype, device="cuda")
    big[:, :K] = x
    strided = big[:, :K]
    assert strided.stride() == (K + GROUP, 1)
    assert_bitwise_equal(op(strided, weight, weight_scale_inv, bias), want, "strided rows")

    buf = torch.full((M, K + 8), 3e4, dtype=x_dtype, device="cuda")
    buf[:, 1:K + 1] = x
    misaligned = buf[:, 1:K + 1]
    assert misaligned.data_ptr() % 16 != 0 and misaligned.stride(-1) == 1
    assert_bitwise_equal(op(misaligned, weight, weight_scale_inv, bias), want, "misaligned rows")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize(
    "M,row,group,value",
    [
        (5, 2, 1, float("nan")),  # a middle row and group
        (16, 15, -1, float("inf")),  # the last row of a full tile, the last group
        (9, 0, 0, float("-inf")),  # the first row and group, M past one 8-row tile
        (1, 0, 3, float("nan")),  # decode: the only row
    ],
)
def test_cuda_nonfinite_group_poisons_its_row(dtype, M, row, group, value):
    N, K = 2112, 4096  # 132 row blocks: the launch splits K (kernels/small_m_linear.cu)
    x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, dtype, seed=22)
    clean = op(x, weight, weight_scale_inv, bias)
    bad = x.clone()
    bad[row, (group % (K // GROUP)) * GROUP + 5] = value
    y = op(bad, weight, weight_scale_inv, bias)
    nan_count = int(torch.isnan(y[row]).sum())
    assert nan_count == N, f"row {row}: {nan_count} of {N} outputs NaN, expected all"
    others = [r for r in range(M) if r != row]
    if others:
        assert torch.isfinite(y[others]).all(), "a non-finite group leaked into other rows"
        assert_bitwise_equal(y[others], clean[others], "rows without the non-finite group")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("M,N,K", [(9, 2112, 7168), (16, 4096, 4096)])
def test_cuda_deterministic(M, N, K, dtype):
    """Two calls on the same input are bit-identical (no split-K atomics or other order races)."""
    x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, dtype, seed=23)
    first = op(x, weight, weight_scale_inv, bias)
    for _ in range(2):
        assert_bitwise_equal(op(x, weight, weight_scale_inv, bias), first, "second call")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("x_dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [4, 9, 13, 16])
def test_cuda_quantized_ahead_equals_in_kernel(M, x_dtype, dtype):
    """From M = 4 (on weights of at least 2^23 elements) x is quantized once by the quant kernel ahead of the
    GEMV; below, each block quantizes it. A token's output depends on no other token, so rows of an M >= 4
    call equal, bit for bit, the same rows computed in calls of at most 3 (N = K = 4096: no launch splits K,
    so the sums add in the same order)."""
    x, weight, weight_scale_inv, bias = _cuda_case(M, 4096, 4096, dtype, x_dtype=x_dtype, seed=25)
    whole = op(x, weight, weight_scale_inv, bias)
    parts = torch.cat([op(x[i:i + 3], weight, weight_scale_inv, bias) for i in range(0, M, 3)])
    assert_bitwise_equal(whole, parts, f"M={M} against calls of at most 3 rows")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_split_launches_in_turn_on_two_streams_and_in_a_graph():
    """Split-K launches count their splits in a per-stream buffer that each launch leaves cleared (a launch
    captured into a CUDA graph gets its own, zeroed by a memset node): launches of shapes with different split
    counts in turn, on two streams at once and replayed from a CUDA graph each give the bits of the same call
    made alone."""
    shapes = [(16, 2112, 7168), (1, 1024, 4096), (9, 1024, 8192), (3, 2112, 4096)]  # all split K
    cases = [_cuda_case(M, N, K, FP8, seed=24 + i) for i, (M, N, K) in enumerate(shapes)]
    alone = [op(*case) for case in cases]
    for _ in range(2):
        for (M, N, K), case, want in zip(shapes, cases, alone):
            assert_bitwise_equal(op(*case), want, f"{M}x{N}x{K} in turn")
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    got = []
    for stream in streams:
        with torch.cuda.stream(stream):
            got.append([op(*case) for case in cases for _ in range(2)])
    torch.cuda.synchronize()
    for ys in got:
        for i, y in enumerate(ys):
            M, N, K = shapes[i // 2]
            assert_bitwise_equal(y, alone[i // 2], f"{M}x{N}x{K} on a second stream")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(*cases[0])  # a warm-up on a side stream before capturing, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(*cases[0])
        y2 = op(*cases[2])
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(y, alone[0], "graph replay")
        assert_bitwise_equal(y2, alone[2], "graph replay, second launch")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_empty_batch():
    x, weight, weight_scale_inv, bias = _cuda_case(0, 200, 256)
    for y in (op(x, weight, weight_scale_inv, bias), small_m.small_m_linear(x, weight, weight_scale_inv, bias)):
        assert y.shape == (0, 200) and y.dtype == BF16 and y.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cuda_graph_replay_equals_eager(dtype):
    """Capture one call, replay it on fresh x copied into the static input: bit for bit eager's answer."""
    M, N, K = 5, 2112, 7168
    static_x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, dtype, seed=24)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (kernel load, first-launch work)
        for _ in range(2):
            op(static_x, weight, weight_scale_inv, bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = op(static_x, weight, weight_scale_inv, bias)
    for seed in (25, 26):
        fresh = make_x(M, K, BF16, seed=seed).cuda()
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(static_y, op(fresh, weight, weight_scale_inv, bias), f"replay, seed {seed}")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of a function calling the op (then something after it): eager's bits,
    at two M (the second call exercises the fake with a new or symbolic M)."""
    N, K = 2112, 1664
    _, weight, weight_scale_inv, bias = _cuda_case(1, N, K, FP8)

    def f(x):
        return op(x, weight, weight_scale_inv, bias) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for M, seed in ((3, 27), (16, 28)):
        x = make_x(M, K, BF16, seed=seed).cuda()
        assert_bitwise_equal(compiled(x), f(x), f"compiled y, M={M}")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_opcheck_cuda(dtype):
    torch.library.opcheck(torch.ops.fp8linear.small_m_linear.default, _opcheck_args("cuda", dtype),
                          test_utils=_opcheck_tests(dtype))


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_largest_benchmark_layer():
    """N = 28672, K = 8192 at M = 16 (the biggest layer of the benchmark: 235M weight elements): runs and
    matches. The oracle here is the same math on the GPU in fp64 (the CPU op would spend seconds
    dequantizing); the CUDA quantizer it uses is checked byte for byte against the CPU reference in
    tests/test_quant_gpu.py."""
    from fp8linear import per_token_group_quant

    M, N, K = 16, 28672, 8192
    for dtype in (FP8, INT8):
        weight, weight_scale_inv = make_weight(N, K, dtype, seed=29, device="cuda")
        bias = make_bias(N, BF16).cuda()
        x = make_x(M, K, BF16, seed=30).cuda()
        poison_allocator()
        y = op(x, weight, weight_scale_inv, bias)
        assert y.shape == (M, N) and y.dtype == BF16
        q, s = per_token_group_quant(x, GROUP, dtype)
        a = (q.float().double().reshape(M, K // GROUP, GROUP) * s.double().unsqueeze(-1)).reshape(M, K)
        w_scale = weight_scale_inv.double().repeat_interleave(GROUP, 0)[:N].repeat_interleave(GROUP, 1)
        w = weight.float().double() * w_scale  # [N, K] fp64
        del w_scale
        ref = (a @ w.t() + bias.double()).float().to(BF16)
        del w
        assert_close_gpu(y, ref, f"M={M} N={N} K={K} {dtype}")


# ------------------------------------------------------------------------------------------------
# GPU: the backend inside FP8Linear
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("scale_ue8m0", [False, True], ids=["scale", "pow2"])
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("lead", [(1,), (7,), (16,), (2, 4)], ids=["M1", "M7", "M16", "2x4"])
def test_fp8linear_small_m_matches_reference(lead, dtype, scale_ue8m0):
    N, K = 2112, 1664
    weight, weight_scale_inv = make_weight(N, K, dtype, scale_ue8m0, seed=31, device="cuda")
    bias = make_bias(N, BF16).cuda()
    mod = FP8Linear.from_quantized(weight, weight_scale_inv, bias, scale_ue8m0=scale_ue8m0, backend="small_m")
    ref = FP8Linear.from_quantized(weight, weight_scale_inv, bias, scale_ue8m0=scale_ue8m0, backend="reference")
    M = 1
    for n in lead:
        M *= n
    x = make_x(M, K, BF16, seed=32).reshape(*lead, K).cuda()
    y = mod(x)
    assert mod._choice[M].NAME == "fused_mma"
    assert y.shape == (*lead, N) and y.dtype == BF16
    assert_close_gpu(y, ref(x), f"FP8Linear small_m {lead} {dtype} pow2={scale_ue8m0}")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_fp8linear_small_m_refuses_m17():
    cuda = torch.device("cuda")
    for M in (0, 1, 16):
        assert backends.unsupported_reason("small_m", M, 4096, 4096, FP8, cuda) is None, f"M={M}"
        assert backends.unsupported_reason("small_m", M, 200, 1664, INT8, cuda) is None, f"M={M} int8"
    assert isinstance(backends.unsupported_reason("small_m", 17, 4096, 4096, FP8, cuda), str)
    assert isinstance(backends.unsupported_reason("small_m", 4, 256, 300, FP8, cuda), str)  # K % 128
    assert isinstance(backends.unsupported_reason("small_m", 4, 256, 256, BF16, cuda), str)
    weight, weight_scale_inv = make_weight(256, 256, FP8, device="cuda")
    mod = FP8Linear.from_quantized(weight, weight_scale_inv, backend="small_m")
    assert mod(torch.randn(16, 256, device="cuda", dtype=BF16)).shape == (16, 256)
    with pytest.raises(BackendUnsupportedError, match=r"backend='fused_mma' cannot serve M=17, N=256, K=256"):
        mod(torch.randn(17, 256, device="cuda", dtype=BF16))


@pytest.mark.gpu
def test_small_m_first_call_in_a_fresh_process_loads_the_kernels():
    """FP8Linear's first forward at decode size may be the process's first use of the kernels (auto picks
    small_m for M = 1 and nothing else has loaded them): the backend must build and load them itself.
    In-process tests cannot see this, since an earlier test has loaded them."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    code = (
        "import torch\n"
        "from fp8linear import FP8Linear\n"
        "lin = torch.nn.Linear(256, 128, bias=False, device='cuda', dtype=torch.bfloat16)\n"
        "m = FP8Linear.from_linear(lin, backend='small_m')\n"
        "x = torch.randn(1, 256, device='cuda', dtype=torch.bfloat16)\n"
        "ref = FP8Linear.from_linear(lin, backend='reference').cpu()(x.cpu())\n"
        "y = m(x).cpu()\n"
        "err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()\n"
        "assert err < 1e-2, err\n"
        "print('ok', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
