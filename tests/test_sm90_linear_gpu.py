"""fp8linear::sm90_linear and sm90_gemm (kernels/sm90_linear.cu) on the GPU (the kernel needs compute
capability 9.0): q and s, written by the kernel's quantizer warps, bit for bit against
per_token_group_quant's `col` output on the same x; y against the reference product of those q and s; the
GEMM on given (q, s) equal bit for bit to the fused call; shapes at the edges (M = 1, M % 4 != 0, partial
m- and n-blocks, more m-blocks than one tile group, one K block), strided and misaligned rows, fp16, bias
dtypes, power-of-two scales, a NaN group; every output allocated from poisoned memory. The wrapper's
checks and the CPU op: test_sm90_linear.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitwise_equal, poison_allocator
from fp8linear import per_token_group_quant
from fp8linear.backends import sm90
from test_sm90_linear import FP8, INT8, _weights

REL_TOL = 1e-2


def _reference(q, s, weight, wsi, bias, out_dtype):
    return torch.ops.fp8linear.sm90_gemm(q.cpu(), s.cpu(), weight.cpu(), wsi.cpu(),
                                         None if bias is None else bias.cpu(), out_dtype)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float().cpu() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


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
