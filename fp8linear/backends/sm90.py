"""sm90 backend: fp8linear's own Hopper FP8 GEMM, with the activations' quantization inside the kernel.

One kernel per forward (`fp8linear::sm90_linear`, fp8linear.sm90): warps of its own quantize x once per
1x128 group, in the order the GEMM's tiles consume it, instead of a separate pass before the GEMM; the q
and scales it writes are bit for bit the quant op's. Experimental: on the H100 it is 1.05-1.33x the time of
DeepGEMM's one-op forward at large M (its quantization still adds 6-23% to its own GEMM, whose core is
7-9% behind DeepGEMM's at the same clock, and both run at the card's power limit; docs/benchmarks.md), so
`auto` never names it for fp8. For int8 it is the fastest GEMM here: `auto` names it from M = 1024 on layers
with N >= 2048 (fp8linear.backends.auto.heuristic).

Needs fp8 e4m3 or int8 weights, K % 128 == 0, N % 8 == 0, compute capability 9.0 (wgmma, TMA), bf16 or fp16 input
for the one-op path (`quant_gemm`); fp32 input, and q and scales handed over by FP8RMSNorm, go through
`gemm` (the same kernel on given operands, `col` scales).
"""

from __future__ import annotations

import torch

from .. import _build
from .. import sm90 as _op
from ..layouts import ScaleLayout
from ..ops import GEMM_EPS

NAME = "sm90"
SCALE_LAYOUT = ScaleLayout.COL
ROW_ALIGN = 1
FUSES_QUANT = False
_LINEAR = torch.ops.fp8linear.sm90_linear.default  # the overloads themselves: no per-call overload resolution
_GEMM = torch.ops.fp8linear.sm90_gemm.default
_OUT_DTYPES = (torch.bfloat16, torch.float16)


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    why = _op.unsupported_reason(M, N, K, dtype)
    if why is not None:
        return why
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    if torch.version.hip is not None:
        return "CUDA only (sm_90a PTX)"
    capability = torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        return f"needs compute capability 9.0 (wgmma, TMA); this GPU is {capability[0]}.{capability[1]}"
    return None


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], weight_scale_inv fp32 [ceil(N/128), K/128]), contiguous (a copy only if not).

    Also builds and loads the CUDA kernels: the forward calls the ops directly."""
    if weight.is_cuda:
        _build.ensure_loaded()
    return weight.contiguous(), weight_scale_inv.float().contiguous()


def quant_gemm(
    x2d: torch.Tensor,
    prepared: tuple[torch.Tensor, torch.Tensor],
    scale_ue8m0: bool,
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> "torch.Tensor | None":
    """Quantize x2d [M, K] (bf16/fp16, unit stride along K) and multiply in one kernel -> y [M, N] out_dtype,
    the result of quantizing with `quantize_for_gemm(x2d, 128, weight's dtype, scale_ue8m0, ScaleLayout.COL)` and calling
    `gemm`, bit for bit; None for fp32 x (FP8Linear then quantizes and calls `gemm`)."""
    if x2d.dtype not in _OUT_DTYPES or out_dtype != x2d.dtype:
        return None
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
