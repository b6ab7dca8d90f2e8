"""fp8linear::sm90_linear and sm90_gemm (kernels/sm90_linear.cu), the Hopper GEMM that quantizes x itself,
on CPU: the wrapper's checks (each bad argument named), the CPU op against the reference product, the
backend's refusals. The kernel itself: test_sm90_linear_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitwise_equal
from fp8linear import backends, per_token_group_quant
from fp8linear.backends import sm90
from fp8linear.weights import quantize_weight_blockwise

FP8, INT8 = torch.float8_e4m3fn, torch.int8


def _weights(N: int, K: int, device="cpu", seed: int = 0, dtype=FP8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    weight, wsi = quantize_weight_blockwise(W.to(device), dtype)
    return weight, wsi


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
