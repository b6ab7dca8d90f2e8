"""fp8linear's own cuBLASLt call (kernels/cublaslt_gemm.cu, fp8linear.backends.cublaslt) on the GPU.

It asks cuBLASLt for the GEMM torch's scaled-mm op asks for, with the same operands, descriptors and
heuristic limit, so the same kernel runs: the outputs must equal torch's op bit for bit (the independent
oracle here), over shapes that exercise the scale layouts (N not a multiple of 128, ceil(K/128) not a
multiple of 4, padded rows). The one-op forward (`linear`) must equal the quant op followed by `gemm`.
Every backend's match with the reference, CUDA-graph replay and torch.compile are tested in
test_backends_gpu.py; the bookkeeping around the call on CPU in test_cublaslt_launch.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_rejected_in_child, poison_allocator
from fp8linear.backends import cublaslt
from fp8linear.layouts import ScaleLayout
from fp8linear.ops import quantize_for_gemm
from fp8linear.weights import quantize_weight_blockwise

FP8 = torch.float8_e4m3fn


def _own_call_on_this_gpu() -> "str | None":
    if not torch.cuda.is_available():
        return "needs CUDA"
    return cublaslt.unsupported_reason(64, 256, 256, FP8, torch.device("cuda", torch.cuda.current_device()))


def _torchs_call(q, s, b, sb):
    """torch's own blockwise scaled matmul on the same operands (torch >= 2.10: F.scaled_mm; 2.9: _scaled_mm)."""
    F = torch.nn.functional
    if hasattr(F, "scaled_mm"):
        return F.scaled_mm(q, b, s, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                           output_dtype=torch.bfloat16)
    return torch._scaled_mm(q, b, s, sb, out_dtype=torch.bfloat16)


needs_own_call = pytest.mark.skipif(_own_call_on_this_gpu() is not None, reason=str(_own_call_on_this_gpu()))


@pytest.mark.gpu
@needs_own_call
@pytest.mark.parametrize(
    "M,N,K",
    [
        (1, 4096, 4096),  # decode: 4 padded rows
        (3, 2112, 7168),  # N % 128 != 0
        (64, 16, 128),  # one N block, one K block (L4 = 4)
        (200, 7168, 1664),  # ceil(K/128) = 13: sb padded to 16
        (1000, 4096, 640),  # 5 K blocks
        (4099, 6144, 4096),  # M % 4 != 0 at large M
    ],
)
def test_own_call_equals_torchs_call(M, N, K):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
    q, s = quantize_for_gemm(x, 128, FP8, False, ScaleLayout.COL, cublaslt.ROW_ALIGN)
    weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, FP8)
    b, sb = cublaslt.prepare_weight(weight, wsi)
    poison_allocator(q.device)
    ours = torch.ops.fp8linear.cublaslt_gemm(q, s, b, sb)
    again = torch.ops.fp8linear.cublaslt_gemm(q, s, b, sb)  # the cached plan
    poison_allocator(q.device)
    theirs = _torchs_call(q, s, b, sb)
    torch.cuda.synchronize()
    M_pad = q.shape[0]
    assert ours.shape == (M_pad, N) and ours.dtype == torch.bfloat16
    assert torch.isfinite(ours[:M]).all()
    assert torch.equal(ours[:M], theirs[:M]) and torch.equal(ours[:M], again[:M])


@pytest.mark.gpu
@needs_own_call
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,bias,pow2", [(1, 256, 512, True, False), (7, 2112, 7168, False, True),
                                              (300, 4096, 640, True, False)])
def test_one_op_forward_equals_quantize_then_gemm(M, N, K, bias, pow2, x_dtype):
    """FP8Linear's cuBLASLt forward: quant + GEMM in one op call (fp8linear::cublaslt_linear), the same bytes
    as the quant op followed by the GEMM op."""
    from fp8linear import FP8Linear

    weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, FP8, scale_ue8m0=pow2)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    layer = FP8Linear.from_quantized(weight, wsi, b, backend="cublaslt", scale_ue8m0=pow2)
    x = torch.randn(2, M, K, device="cuda", dtype=x_dtype)  # 3-D input: 2*M rows
    poison_allocator(x.device)
    y = layer(x)
    prepared = cublaslt.prepare_weight(weight, wsi)
    x2d = x.reshape(-1, K)
    assert torch.equal(y.reshape(-1, N), cublaslt.linear(x2d, prepared, b, x_dtype, FP8, pow2))
    q, s = quantize_for_gemm(x2d, 128, FP8, pow2, ScaleLayout.COL, cublaslt.ROW_ALIGN)
    two_ops = cublaslt.gemm(q, s, prepared, x_dtype, b)[: 2 * M].reshape(2, M, N)
    torch.cuda.synchronize()
    assert y.dtype == x_dtype and y.shape == (2, M, N)
    assert torch.equal(y, two_ops)


# Run in a child process by conftest.assert_rejected_in_child (the lent H100's torch turns a C++ TORCH_CHECK
# into SIGSEGV).
_BAD_ARGUMENTS = r"""
import sys, torch
from fp8linear.backends import cublaslt
from fp8linear.layouts import ScaleLayout
from fp8linear.ops import quantize_for_gemm
from fp8linear.weights import quantize_weight_blockwise
FP8 = torch.float8_e4m3fn
M, N, K = 64, 256, 512
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
q, s = quantize_for_gemm(x, 128, FP8, False, ScaleLayout.COL, 4)
b, sb = cublaslt.prepare_weight(*quantize_weight_blockwise(torch.randn(N, K, device="cuda"), FP8))
op = torch.ops.fp8linear.cublaslt_gemm
cases = {
    "s must be [M, K/128]": lambda: op(q, s.contiguous(), b, sb),  # row-major scales
    "b must be [K, N]": lambda: op(q, s, b.contiguous(), sb),  # K x N row-major
    "multiple of 4 rows": lambda: op(q[:63], s[:63], b, sb),
    "q and b must be float8_e4m3fn": lambda: op(q.view(torch.int8), s, b, sb),
    "sb must be [L4, ceil(N/128)]": lambda: op(q, s, b, sb[:1]),
}
"""


@pytest.mark.gpu
@needs_own_call
def test_own_call_rejects_bad_arguments_with_clear_errors():
    assert_rejected_in_child(_BAD_ARGUMENTS)
