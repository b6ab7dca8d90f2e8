"""small_m backend: fp8linear's fused quantize-and-multiply CUDA kernel for M <= 16 (decode).

One op (`fp8linear::small_m_linear`, fp8linear.small_m) quantizes x per 1x128 group inside the GEMM and
multiplies on tensor cores, fp8 e4m3 or int8, with the bias added in fp32: no separate quantization launch,
no q or scales in global memory, one op call per forward. It needs K % 128 == 0 and M <= 16, and a GPU of
compute capability >= 8.9 (fp8 mma.sync).

Unlike the other backends it takes x, not (q, s): `FUSES_QUANT = True` tells FP8Linear to call
`linear(x, prepared, bias, scale_ue8m0)` (x [..., K], any leading dims) instead of quantizing and calling
`gemm`.
"""

from __future__ import annotations

import torch

from .. import _build
from .. import small_m as _op
from ..ops import GEMM_EPS

NAME = "small_m"
SCALE_LAYOUT = None  # quantizes inside the kernel
ROW_ALIGN = 1
FUSES_QUANT = True
_OP = torch.ops.fp8linear.small_m_linear.default  # the overload itself: no per-call overload resolution


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    why = _op.unsupported_reason(M, N, K, dtype)
    if why is not None:
        return why
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    if torch.version.hip is not None:
        return "CUDA only (mma.sync fp8/int8 PTX)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"fp8 mma.sync needs compute capability >= 8.9; this GPU is {major}.{minor}"
    return None


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], weight_scale_inv fp32 [ceil(N/128), K/128]), contiguous (a copy only if not).

    Also builds and loads the CUDA kernels: `linear` calls the op directly (no wrapper on the hot path),
    and FP8Linear prepares the weight before a backend's first call."""
    if weight.is_cuda:
        _build.ensure_loaded()
    return weight.contiguous(), weight_scale_inv.float().contiguous()


def linear(x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           scale_ue8m0: bool) -> torch.Tensor:
    """x [..., K] (at most 16 rows in all) -> y [..., N] in x's dtype; FP8Linear has checked the shapes."""
    weight, weight_scale_inv = prepared
    return _OP(x, weight, weight_scale_inv, bias, scale_ue8m0, GEMM_EPS)


def gemm(q, s, prepared, out_dtype, bias):  # the interface's (q, s) entry: FP8Linear calls `linear` instead
    raise NotImplementedError("the small_m backend quantizes inside its kernel: call linear(x2d, ...)")
