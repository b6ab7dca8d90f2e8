"""fp8linear::sm90_linear and sm90_gemm (kernels/sm90_linear.cu): the Hopper GEMM that quantizes x itself.

- CPU: the wrapper's checks (each bad argument named), the CPU op against the reference product, the
  backend's refusals.
- GPU (marked `gpu`; the kernel needs compute capability 9.0): q and s, written by the kernel's quantizer
  warps, bit for bit against per_token_group_quant's `col` output on the same x; y against the reference
  product of those q and s; the GEMM on given (q, s) equal bit for bit to the fused call; shapes at the
  edges (M = 1, M % 4 != 0, partial m- and n-blocks, more m-blocks than one tile group, one K block),
  strided and misaligned rows, fp16, bias dtypes, power-of-two scales, a NaN group; every output
  allocated from poisoned memory.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitwise_equal, poison_allocator
from fp8linear import backends, per_token_group_quant
from fp8linear.backends import sm90
from fp8linear.weights import quantize_weight_blockwise

FP8, INT8 = torch.float8_e4m3fn, torch.int8
REL_TOL = 1e-2


def _weights(N: int, K: int, device="cpu", seed: int = 0, dtype=FP8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    weight, wsi = quantize_weight_blockwise(W.to(device), dtype)
    return weight, wsi


def _reference(q, s, weight, wsi, bias, out_dtype):
    return torch.ops.fp8linear.sm90_gemm(q.cpu(), s.cpu(), weight.cpu(), wsi.cpu(),
                                         None if bias is None else bias.cpu(), out_dtype)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float().cpu() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# -- CPU ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cpu_op_is_the_reference(dtype):
    weight, wsi = _weights(64, 256, dtype=dtype)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    bias = torch.randn(64)
    y, q, s = sm90.sm90_linear(x, weight, wsi, bias)
    assert q.dtype == dtype
    q_ref, s_ref = per_token_group_quant(x, 128, dtype, scale_layout="col")
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s, s_ref, "s")
    assert s.stride() == (1, 8)
    expected = (q.float().view(5, 2, 128) * s.reshape(5, 2, 1)).view(5, 256) @ (
        weight.float().view(1, 64, 2, 128) * wsi.view(1, 1, 2, 1)).view(64, 256).t() + bias
    torch.testing.assert_close(y.float(), expected.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=torch.randn(4, 256)), TypeError, "x must be bfloat16 or float16"),
        (dict(x=torch.randn(4, 200, dtype=torch.bfloat16)), ValueError, "multiple of 128"),
        (dict(x=torch.randn(2, 4, 256, dtype=torch.bfloat16)), ValueError, "2-D"),
        (dict(x=torch.randn(256, 4, dtype=torch.bfloat16).t()), ValueError, "unit stride"),
        (dict(weight=torch.zeros(64, 256, dtype=torch.float16)), TypeError, "float8_e4m3fn or int8"),
        (dict(weight=torch.zeros(64, 256, dtype=torch.int8), cluster=2), ValueError, "int8 runs without clusters"),
        (dict(weight=torch.zeros(60, 256, dtype=FP8)), ValueError, "multiple of 8"),
        (dict(weight=torch.zeros(64, 384, dtype=FP8)), ValueError, r"shape \[N, 256\]"),
        (dict(weight_scale_inv=torch.ones(1, 3)), ValueError, r"weight_scale_inv must be float32 of shape \[1, 2\]"),
        (dict(bias=torch.ones(63)), ValueError, r"bias must be .* shape \[64\]"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(block_m=64), ValueError, "block_m"),
        (dict(cluster=4), ValueError, "cluster"),
    ],
)
def test_wrapper_names_the_bad_argument(change, exc, match):
    weight, wsi = _weights(64, 256)
    args = dict(x=torch.randn(4, 256, dtype=torch.bfloat16), weight=weight, weight_scale_inv=wsi, bias=None, eps=1e-10,
                block_m=0, cluster=0)
    args.update(change)
    with pytest.raises(exc, match=match):
        sm90.sm90_linear(args["x"], args["weight"], args["weight_scale_inv"], args["bias"], eps=args["eps"],
                         block_m=args["block_m"], cluster=args["cluster"])


def test_backend_refusals_say_why():
    cpu = torch.device("cpu")
    assert "is not one of torch.float8_e4m3fn, torch.int8" in backends.unsupported_reason("sm90", 64, 256, 256, torch.float16, cpu)
    assert "K % 128" in backends.unsupported_reason("sm90", 64, 256, 200, FP8, cpu)
    assert "N % 8" in backends.unsupported_reason("sm90", 64, 250, 256, FP8, cpu)
    assert "CUDA device" in backends.unsupported_reason("sm90", 64, 256, 256, FP8, cpu)


# -- GPU ------------------------------------------------------------------------------------------------
def _skip_unless_sm90():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs compute capability 9.0")


SHAPES = [
    # (M, N, K)
    (1, 128, 128),        # one of everything
    (3, 256, 384),        # M % 4 != 0 (padded scale rows)
    (129, 136, 640),      # partial m- and n-blocks; G = 5
    (1000, 2112, 1024),   # N % 128 != 0 (16.5 blocks)
    (2500, 512, 256),     # 20 m-blocks: three tile groups, the last partial
    (4099, 4096, 4096),   # many tiles per block, M % 128 != 0
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "block_m,cluster,dtype",
    [(128, 1, FP8), (128, 2, FP8), (256, 1, FP8), (256, 2, FP8), (128, 1, INT8), (256, 1, INT8)],
    ids=["128-1", "128-2", "256-1", "256-2", "128-1-int8", "256-1-int8"])
def test_quantizes_like_the_op_and_multiplies_like_the_reference(M, N, K, x_dtype, block_m, cluster, dtype):
    _skip_unless_sm90()
    weight, wsi = _weights(N, K, "cuda", seed=M + N, dtype=dtype)
    x = (torch.randn(M, K, device="cuda") * 3).to(x_dtype)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    poison_allocator()
    y, q, s = sm90.sm90_linear(x, weight, wsi, bias, block_m=block_m, cluster=cluster)
    q_op, s_op = per_token_group_quant(x, 128, dtype, scale_layout="col")
    torch.cuda.synchronize()
    assert_bitwise_equal(q, q_op, "q")
    assert_bitwise_equal(s, s_op, "s")
    assert y.shape == (M, N) and y.dtype == x_dtype
    assert torch.isfinite(y).all(), "non-finite output (an unwritten element reads as poison)"
    err = _rel_err(y, _reference(q, s, weight, wsi, bias, x_dtype))
    assert err <= REL_TOL, f"relative error {err:.3g}"
    # The same kernel on the same operands, without the quantizer warps: the same bytes.
    poison_allocator()
    y_gemm = torch.ops.fp8linear.sm90_gemm(q, s, weight, wsi, bias, x_dtype, block_m, cluster)
    assert_bitwise_equal(y_gemm, y, "sm90_gemm vs sm90_linear")


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,cluster", [(128, 1), (256, 2)], ids=lambda v: str(v))
def test_repeated_calls_are_deterministic(block_m, cluster):
    _skip_unless_sm90()
    weight, wsi = _weights(1024, 2048, "cuda")
    x = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16)
    first = sm90.sm90_linear(x, weight, wsi, block_m=block_m, cluster=cluster)[0]
    for _ in range(5):
        assert_bitwise_equal(sm90.sm90_linear(x, weight, wsi, block_m=block_m, cluster=cluster)[0], first, "repeat")


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 8, 3], ids=["strided", "strided-aligned-offset", "misaligned"])
def test_strided_and_misaligned_rows(offset):
    _skip_unless_sm90()
    M, N, K = 77, 256, 512
    weight, wsi = _weights(N, K, "cuda")
    big = torch.randn(M, K + 64, device="cuda", dtype=torch.bfloat16)
    x = big[:, offset:offset + K]  # row stride K + 64; a 3-element offset is not 16-byte aligned
    y, q, s = sm90.sm90_linear(x, weight, wsi)
    y_dense, q_dense, s_dense = sm90.sm90_linear(x.contiguous(), weight, wsi)
    assert_bitwise_equal(q, q_dense, "q")
    assert_bitwise_equal(s, s_dense, "s")
    assert_bitwise_equal(y, y_dense, "y")
    assert_bitwise_equal(big[:, offset:offset + K], x, "x unchanged")


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_bias_dtypes_and_power_of_two_scales(bias_dtype):
    _skip_unless_sm90()
    M, N, K = 200, 384, 768
    weight, wsi = _weights(N, K, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = None if bias_dtype is None else torch.randn(N, device="cuda", dtype=bias_dtype)
    y, q, s = sm90.sm90_linear(x, weight, wsi, bias, scale_ue8m0=True)
    q_op, s_op = per_token_group_quant(x, 128, FP8, scale_layout="col", scale_ue8m0=True)
    assert_bitwise_equal(q, q_op, "q")
    assert_bitwise_equal(s, s_op, "s")
    assert _rel_err(y, _reference(q, s, weight, wsi, bias, torch.bfloat16)) <= REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_a_nan_group_poisons_its_row_only(dtype):
    _skip_unless_sm90()
    M, N, K = 130, 256, 512
    weight, wsi = _weights(N, K, "cuda", dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    x[129, 300] = float("nan")
    y, q, s = sm90.sm90_linear(x, weight, wsi)
    assert torch.isnan(y[129]).all()
    assert torch.isfinite(y[:129]).all()
    q_op, s_op = per_token_group_quant(x, 128, dtype, scale_layout="col")
    assert_bitwise_equal(q, q_op, "q")
    assert_bitwise_equal(s, s_op, "s")


@pytest.mark.gpu
def test_empty_batch():
    _skip_unless_sm90()
    weight, wsi = _weights(256, 256, "cuda")
    y, q, s = sm90.sm90_linear(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16), weight, wsi)
    assert y.shape == (0, 256) and q.shape == (0, 256) and s.shape == (0, 2)
