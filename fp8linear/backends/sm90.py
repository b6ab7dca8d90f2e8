"""fused_wgmma backend: fp8linear's own Hopper GEMM, quantizing the activations inside the same kernel.

    y = dequant(per_token_group_quant(x, 128, weight.dtype, scale_layout="col", scale_ue8m0, eps))
        @ dequant(weight)^T + bias,   accumulated in fp32, returned in x's dtype

for x [M, K] bf16 or fp16, fp8 e4m3 or int8 weights, K % 128 == 0, N % 8 == 0, on compute capability 9.0
(wgmma, TMA; int8 block sums exact in int32, so the int8 result is the same product as the Triton GEMM's,
on Hopper's int8 tensor cores). One kernel (`kernels/sm90_linear.cu`): warps of its own quantize each 1x128
group of x once, in the order the GEMM's tiles consume them, and publish q and the scales to global memory
where the GEMM's TMA loads read them; q and the scales are returned too, bit for bit what
`per_token_group_quant` writes.

For fp8 it is slower than DeepGEMM's one-op forward at large M on the H100 (its quantization still adds to
its own GEMM, whose core is behind DeepGEMM's at the same clock; docs/benchmarks.md), so `auto` never names
it for fp8. For int8 it is the fastest GEMM here: `auto` names it on wide layers at large M
(fp8linear.backends.auto.heuristic).

Pieces, top to bottom: the schemas `fp8linear::sm90_linear` (quantize and multiply) and
`fp8linear::sm90_gemm` (the same GEMM on given q and `col` scales, which FP8RMSNorm's and FP8GatedMLP's
fused quantizations feed), fakes for torch.compile, CPU implementations (the reference), `sm90_linear`, the
checked wrapper, and the backend protocol (`fp8linear.backends.Backend`). The CUDA implementations are
registered from C++.
"""

from __future__ import annotations

import torch

from .. import _build
from ..layouts import ScaleLayout, tma_aligned_rows
from ..ops import GEMM_EPS
from ..reference import dequantize_groups, per_token_group_quant_reference
from ..weights import check_linear_operands, dequantize_weight_blockwise
from . import quantize_then_gemm

__all__ = ["sm90_linear", "unsupported_reason", "GROUP"]

NAME = "fused_wgmma"
SCALE_LAYOUT = ScaleLayout.COL
ROW_ALIGN = 1
DTYPES = (torch.float8_e4m3fn, torch.int8)
MAX_M = None

#: Activation group and weight block width along K; K must be a multiple of it.
GROUP = 128

_X_DTYPES = (torch.bfloat16, torch.float16)
_Q_DTYPES = DTYPES

_lib = torch.library.Library("fp8linear", "FRAGMENT")
_lib.define(
    "sm90_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, Tensor? bias, bool scale_ue8m0, float eps, "
    "int block_m=0, int cluster=0) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "sm90_gemm(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv, Tensor? bias, ScalarType out_dtype, "
    "int block_m=0, int cluster=0) -> Tensor"
)


def _col_scales_like(x: torch.Tensor, M: int, G: int) -> torch.Tensor:
    """An empty fp32 [M, G] in the `col` layout: strides (1, M rounded up to 4)."""
    return torch.empty_strided((M, G), (1, tma_aligned_rows(M)), dtype=torch.float32, device=x.device)


@torch.library.register_fake("fp8linear::sm90_linear", lib=_lib)
def _sm90_linear_fake(x, weight, weight_scale_inv, bias, scale_ue8m0, eps, block_m=0, cluster=0):
    if x.device.type == "cuda":
        _build.ensure_loaded("sm90")  # tracing runs this, not the wrapper: the kernel must exist when the graph runs
    M, K = x.shape
    y = x.new_empty((M, weight.shape[0]))
    q = x.new_empty((M, K), dtype=weight.dtype)
    return y, q, _col_scales_like(x, M, K // GROUP)


@torch.library.register_fake("fp8linear::sm90_gemm", lib=_lib)
def _sm90_gemm_fake(q, s, weight, weight_scale_inv, bias, out_dtype, block_m=0, cluster=0):
    if q.device.type == "cuda":
        _build.ensure_loaded("sm90")
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=out_dtype)


def _reference_product(q, s, weight, weight_scale_inv, bias, out_dtype):
    a = dequantize_groups(q, s)  # [M, K] fp32
    w = dequantize_weight_blockwise(weight, weight_scale_inv)  # [N, K] fp32
    y = a @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@torch.library.impl(_lib, "sm90_linear", "CPU")
def _sm90_linear_cpu(x, weight, weight_scale_inv, bias, scale_ue8m0, eps, block_m=0, cluster=0):
    M, K = x.shape
    q, s_row = per_token_group_quant_reference(x, GROUP, weight.dtype, scale_ue8m0, eps)
    s = _col_scales_like(x, M, K // GROUP)
    s.copy_(s_row)
    return _reference_product(q, s, weight, weight_scale_inv, bias, x.dtype), q, s


@torch.library.impl(_lib, "sm90_gemm", "CPU")
def _sm90_gemm_cpu(q, s, weight, weight_scale_inv, bias, out_dtype, block_m=0, cluster=0):
    return _reference_product(q, s, weight, weight_scale_inv, bias, out_dtype)


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    """Beyond DTYPES and MAX_M (fp8linear.backends.unsupported_reason): None when the kernel serves
    [M, K] x [N, K]^T on `device`, else why not."""
    if K % GROUP != 0 or K == 0:
        return f"K % 128 != 0 (K={K})"
    if N % 8 != 0 or N == 0:
        return f"N % 8 != 0 (N={N})"
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    if torch.version.hip is not None:
        return "CUDA only (sm_90a PTX)"
    capability = torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        return f"needs compute capability 9.0 (wgmma, TMA); this GPU is {capability[0]}.{capability[1]}"
    return None


def sm90_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: "torch.Tensor | None" = None,
    *,
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
    block_m: int = 0,
    cluster: int = 0,
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """(y, q, s): x [M, K] quantized per 1x128 group and multiplied by a 128x128-block fp8 or int8 weight in one
    kernel.

    Args:
        x: bfloat16 or float16 [M, K], K % 128 == 0, unit stride along K (rows may be strided).
        weight: float8_e4m3fn or int8 [N, K], N % 8 == 0; x is quantized to the same type (int8: amax / 127,
            round half to even, block sums exact in int32).
        weight_scale_inv: fp32 [ceil(N/128), K/128], the per-block multipliers that dequantize weight.
        bias: [N] bf16, fp16 or fp32, or None; added in fp32 before the output is rounded.
        scale_ue8m0: power-of-two activation scales.
        eps: floor of each group's amax (as in per_token_group_quant).
        block_m: output tile height, 128 or 256; 0 picks by shape (256 where that still gives every SM a tile).
        cluster: 2 runs blocks in pairs that share each A tile (TMA multicast), 1 alone; 0 picks (1: pairs
            measured slower on the H100, docs/benchmarks.md).

    Returns:
        y [M, N] in x's dtype; q [M, K] of the weight's type and s fp32 [M, K/128] in the `col` layout, equal
        bit for bit to `per_token_group_quant(x, 128, weight.dtype, scale_layout="col", scale_ue8m0=..., eps=...)`.
        A group of x holding a NaN or Inf makes its row of y NaN.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K]; got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be bfloat16 or float16; got {x.dtype}")
    M, K = x.shape
    if K % GROUP != 0 or K == 0:
        raise ValueError(f"x's last dim K={K} must be a positive multiple of {GROUP}")
    if x.stride(1) != 1 and M > 1:
        raise ValueError(f"x must have unit stride along K; got strides {tuple(x.stride())}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _Q_DTYPES:
        raise TypeError(f"weight must be a float8_e4m3fn or int8 tensor; got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, {K}] (x's K); got {list(weight.shape)}")
    N = weight.shape[0]
    if N % 8 != 0 or N == 0:
        raise ValueError(f"weight's N={N} must be a positive multiple of 8")
    check_linear_operands(x, weight, weight_scale_inv, bias, eps)
    if block_m not in (0, 128, 256):
        raise ValueError(f"block_m must be 0 (by shape), 128 or 256; got {block_m!r}")
    if cluster not in (0, 1, 2):
        raise ValueError(f"cluster must be 0 (by shape), 1 or 2; got {cluster!r}")
    if cluster == 2 and weight.dtype == torch.int8:
        raise ValueError("cluster=2 is fp8 only: int8 runs without clusters (cluster 0 or 1)")
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) != (9, 0):
            raise ValueError(f"sm90_linear needs a compute capability 9.0 GPU (wgmma, TMA); {x.device} is "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(x.device)))}")
        _build.ensure_loaded("sm90")
    return torch.ops.fp8linear.sm90_linear(
        x, weight.contiguous(), weight_scale_inv.contiguous(), None if bias is None else bias.contiguous(),
        bool(scale_ue8m0), float(eps), int(block_m), int(cluster),
    )


# -- the backend protocol (fp8linear.backends.Backend) ---------------------------------------------------
_LINEAR = torch.ops.fp8linear.sm90_linear.default  # the overloads themselves: no per-call overload resolution
_GEMM = torch.ops.fp8linear.sm90_gemm.default
_OUT_DTYPES = (torch.bfloat16, torch.float16)


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], weight_scale_inv fp32 [ceil(N/128), K/128]), contiguous (a copy only if not).

    Also builds and loads the CUDA kernels: the forward calls the ops directly."""
    if weight.is_cuda:
        _build.ensure_loaded("sm90")
    return weight.contiguous(), weight_scale_inv.float().contiguous()


def linear(x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           out_dtype: torch.dtype, dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
    """Quantize x2d [M, K] (unit stride along K) and multiply -> y [M, N] out_dtype, bit for bit
    `quantize_for_gemm(x2d, 128, weight's dtype, scale_ue8m0, ScaleLayout.COL)` then `gemm`: one kernel for
    bf16/fp16 x, the quant op then `gemm` for fp32 x (the kernel's quantizer warps read 16-bit rows)."""
    if x2d.dtype not in _OUT_DTYPES or out_dtype != x2d.dtype:
        return quantize_then_gemm(gemm, SCALE_LAYOUT, ROW_ALIGN, x2d, prepared, bias, out_dtype, dtype, scale_ue8m0)
    weight, weight_scale_inv = prepared
    return _LINEAR(x2d, weight, weight_scale_inv, bias, scale_ue8m0, GEMM_EPS)[0]


def gemm(
    q: torch.Tensor,
    s: torch.Tensor,
    prepared: tuple[torch.Tensor, torch.Tensor],
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> torch.Tensor:
    """q [M, K] contiguous (the weight's fp8 or int8), s fp32 [M, K/128] `col` -> y [M, N] out_dtype (bias added
    in fp32 in the kernel; fp32 output is the bf16 result cast, as the other Hopper backends give)."""
    weight, weight_scale_inv = prepared
    if out_dtype in _OUT_DTYPES:
        return _GEMM(q, s, weight, weight_scale_inv, bias, out_dtype)
    return _GEMM(q, s, weight, weight_scale_inv, bias, torch.bfloat16).to(out_dtype)
