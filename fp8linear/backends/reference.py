"""Reference backend: dequantize both operands and matmul in fp32, on any device.

The CPU path of FP8Linear and the oracle of every GEMM test: exact up to fp32 summation order. The weight
is dequantized once, by `prepare_weight` (FP8Linear caches what it returns per weight and drops it when
the weight changes), so a forward costs the activations' quantization and dequantization plus an fp32
matmul, as an fp32 nn.Linear's does (docs/benchmarks.md, "CPU forward"). The price is memory: the cached
fp32 weight takes 4 bytes an element, 4x the fp8 weight's bytes (an fp32 model's worth).
"""

from __future__ import annotations

import torch

from ..layouts import ScaleLayout
from . import quantize_then_gemm
from ..reference import dequantize_groups
from ..weights import dequantize_weight_blockwise

NAME = "reference"
SCALE_LAYOUT = ScaleLayout.ROW
ROW_ALIGN = 1
DTYPES = (torch.float8_e4m3fn, torch.int8)
MAX_M = None


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    return None  # any shape, any device


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """(weight [N, K] fp8/int8, weight_scale_inv fp32 [ceil(N/128), ceil(K/128)]) -> the dequantized weight,
    fp32 [N, K] contiguous (4 bytes an element where the fp8 weight holds 1)."""
    return dequantize_weight_blockwise(weight, weight_scale_inv)


def gemm(
    q: torch.Tensor,
    s: torch.Tensor,
    prepared: torch.Tensor,
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> torch.Tensor:
    """q [M, Kp] fp8/int8, s fp32 [M, Kp/128] (row-major or not), prepared fp32 [N, K] from `prepare_weight`
    -> y [M, N] in out_dtype (bias added in fp32)."""
    K = prepared.shape[1]
    a = dequantize_groups(q, s.contiguous())[:, :K]  # [M, K] fp32; columns >= K are the zero padding
    y = a @ prepared.t()  # [M, N] fp32, a new tensor
    if bias is not None:
        y += bias  # in fp32, whatever bias's dtype
    return y.to(out_dtype)


def linear(x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           out_dtype: torch.dtype, dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
    """Quantize x2d [M, Kp] (the reference quantization) and call `gemm`."""
    return quantize_then_gemm(gemm, SCALE_LAYOUT, ROW_ALIGN, x2d, prepared, bias, out_dtype, dtype, scale_ue8m0)
