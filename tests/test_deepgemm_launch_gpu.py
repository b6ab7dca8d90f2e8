"""The C++ launch of DeepGEMM's legacy kernel (kernels/deepgemm_launch.cu, fp8linear.backends.deepgemm) on
the GPU.

The first call of a shape runs DeepGEMM's own Python launch and records what it ran; later calls launch
the same kernel from C++. Same kernel, same inputs: the outputs must be equal bit for bit, over shapes
whose tile configurations differ (BLOCK_M from 64 to 256, partial last tiles, padded scale rows).
The bookkeeping around it on CPU, with a stand-in for DeepGEMM: test_deepgemm_launch.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_rejected_in_child, poison_allocator
from fp8linear import per_token_group_quant
from fp8linear.backends import deepgemm, deepgemm_relaunch as relaunch
from fp8linear.weights import quantize_weight_blockwise

FP8 = torch.float8_e4m3fn


def _legacy_on_this_gpu() -> "str | None":
    if not torch.cuda.is_available():
        return "needs CUDA"
    why = deepgemm.unsupported_reason(64, 256, 256, FP8, torch.device("cuda"))
    if why is not None:
        return why
    if deepgemm.api_name() != "legacy":
        return f"the C++ launch serves DeepGEMM's legacy API; this one is {deepgemm.api_name()!r}"
    return None


needs_legacy = pytest.mark.skipif(_legacy_on_this_gpu() is not None, reason=str(_legacy_on_this_gpu()))


def _operands(M: int, N: int, K: int):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
    q, s = per_token_group_quant(x, 128, FP8, scale_layout="col")
    weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, FP8)
    return q, s, weight, wsi


@pytest.mark.gpu
@needs_legacy
@pytest.mark.parametrize(
    "M,N,K",
    [
        (1, 4096, 4096),  # decode: BLOCK_M 64, BLOCK_N 32 (profile_linear's kernel names, H100)
        (3, 2112, 7168),  # N % 128 != 0, M % 4 != 0 (padded scale rows)
        (200, 7168, 1664),  # ceil(K/128) = 13
        (1000, 4096, 640),  # partial last M tile; M >= 512: DeepGEMM tries TMA multicast
        (4096, 4096, 4096),  # BLOCK_M 256
        (4099, 6144, 4096),  # M % 4 != 0 at large M
    ],
)
def test_cpp_launch_equals_deepgemm_launch(monkeypatch, M, N, K):
    q, s, weight, wsi = _operands(M, N, K)
    key = (M, N, K, q.device.index)
    relaunch.plans.pop(key, None)
    first = deepgemm._gemm_impl(q, s, weight, wsi)  # DeepGEMM's own launch; records the plan
    plan = relaunch.plans[key]
    assert plan, "the plan of a legacy kernel should be readable (see the INFO log for why not)"
    kernel, num_sms, block_m, block_n, smem, swizzle_d, multicast = plan
    assert kernel != 0 and block_m in (64, 128, 256) and multicast in (1, 2)
    poison_allocator(q.device)
    ours = deepgemm._gemm_impl(q, s, weight, wsi)  # the C++ launch
    monkeypatch.setattr(relaunch, "ENABLED", False)
    poison_allocator(q.device)
    theirs = deepgemm._gemm_impl(q, s, weight, wsi)  # DeepGEMM's own launch again
    torch.cuda.synchronize()
    assert ours.shape == (M, N) and ours.dtype == torch.bfloat16
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, theirs) and torch.equal(first, theirs)


@pytest.mark.gpu
@needs_legacy
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,bias,pow2", [(1, 256, 512, True, False), (7, 2112, 7168, False, True),
                                              (300, 4096, 640, True, False)])
def test_one_op_forward_equals_quantize_then_gemm(M, N, K, bias, pow2, x_dtype):
    """FP8Linear's DeepGEMM forward after the first call of a shape: quant + GEMM in one op call
    (fp8linear::deepgemm_linear), the same bytes as the quant op followed by the GEMM op."""
    from fp8linear import FP8Linear

    weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, FP8, scale_ue8m0=pow2)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    layer = FP8Linear.from_quantized(weight, wsi, b, backend="deepgemm", scale_ue8m0=pow2)
    x = torch.randn(2, M, K, device="cuda", dtype=x_dtype)  # 3-D input: 2*M rows
    first = layer(x)  # DeepGEMM's own launch; records the plan
    prepared = layer._prepared["deepgemm"][1]
    x2d = x.reshape(-1, K)
    assert relaunch.plans.get((2 * M, N, K, x.device.index)), "the one-op path should serve"
    poison_allocator(x.device)
    second = layer(x)  # the one-op path
    q, s = per_token_group_quant(x2d, 128, FP8, scale_layout="col", scale_ue8m0=pow2)
    two_ops = deepgemm.gemm(q, s, prepared, x_dtype, b).reshape(2, M, N)
    torch.cuda.synchronize()
    assert second.dtype == x_dtype and second.shape == (2, M, N)
    assert torch.equal(second, two_ops) and torch.equal(second, first)


# Run in a child process by conftest.assert_rejected_in_child (the lent H100's torch turns a C++ TORCH_CHECK
# into SIGSEGV); the child tells a rejected call from a crash.
_BAD_ARGUMENTS = r"""
import sys, torch
from fp8linear import per_token_group_quant
from fp8linear.backends import deepgemm, deepgemm_relaunch as relaunch
from fp8linear.weights import quantize_weight_blockwise
FP8 = torch.float8_e4m3fn
M, N, K = 64, 256, 512
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
q, s = per_token_group_quant(x, 128, FP8, scale_layout="col")
weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda"), FP8)
if sys.argv[1] != "control":
    deepgemm._gemm_impl(q, s, weight, wsi)
    plan = relaunch.plans[(M, N, K, q.device.index)]
    assert plan, "no plan recorded"
    op = torch.ops.fp8linear.deepgemm_gemm
    cases = {
        r"s must be [M, K/128]": lambda: op(q, s.contiguous(), weight, wsi, *plan),  # row-major scales
        "kernel must be a CUkernel handle": lambda: op(q, s, weight, wsi, 0, *plan[1:]),
        "N % 64 == 0": lambda: op(q, s, weight[:200], wsi, *plan),
        "q and weight must be float8_e4m3fn": lambda: op(q.view(torch.int8), s, weight, wsi, *plan),
        "multicast must be 1 or 2": lambda: op(q, s, weight, wsi, *plan[:-1], 3),
    }
"""


@pytest.mark.gpu
@needs_legacy
def test_cpp_launch_rejects_bad_arguments_with_clear_errors():
    assert_rejected_in_child(_BAD_ARGUMENTS)
