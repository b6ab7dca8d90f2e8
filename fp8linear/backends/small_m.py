"""fused_mma backend: fp8linear's small-M linear op, quantization fused into a tensor-core GEMM, one kernel.

    y = dequant(per_token_group_quant(x, 128, weight.dtype, scale_ue8m0, eps)) @ dequant(weight)^T + bias

for x [M, K] with M <= MAX_M (decode and small batches), accumulated in fp32 and returned in x's dtype.
The quantization is bit for bit that of `fp8linear.per_token_group_quant`; the CUDA kernel
(`kernels/small_m_linear.cu`) computes it inside the GEMM, so the activations' q and scales never reach
global memory and a layer costs one launch and one op call. The product runs on tensor cores
(mma.sync m16n8k32, fp8 e4m3 or int8), its sums promoted to fp32 every 128 columns with the two scales.
It needs K % 128 == 0 and a GPU of compute capability >= 8.9 (fp8 mma.sync).

Pieces, top to bottom: the schema `fp8linear::small_m_linear` (a functional op: it allocates y), a fake for
torch.compile, the CPU implementation (the reference: quantize, dequantize both operands, fp32 matmul),
`small_m_linear`, the checked wrapper, and the backend protocol (`fp8linear.backends.Backend`). The CUDA
implementation is registered from C++. It quantizes inside its kernel, so it declares SCALE_LAYOUT = None
and has no `gemm` on (q, s).
"""

from __future__ import annotations


import torch

from .. import _build
from ..ops import GEMM_EPS
from ..reference import dequantize_groups, per_token_group_quant_reference
from ..weights import check_linear_operands, dequantize_weight_blockwise

__all__ = ["small_m_linear", "MAX_M", "GROUP"]

NAME = "fused_mma"
#: None: it quantizes x inside its own kernel and has no `gemm` on (q, s).
SCALE_LAYOUT = None
ROW_ALIGN = 1
DTYPES = (torch.float8_e4m3fn, torch.int8)

#: Rows the kernel serves: two 8-token tensor-core tiles.
MAX_M = 16
#: Activation group and weight block width along K; K must be a multiple of it.
GROUP = 128

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WEIGHT_DTYPES = DTYPES

_lib = torch.library.Library("fp8linear", "FRAGMENT")
_lib.define(
    "small_m_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, Tensor? bias, bool scale_ue8m0, "
    "float eps) -> Tensor"
)


@torch.library.register_fake("fp8linear::small_m_linear", lib=_lib)
def _small_m_linear_fake(x, weight, weight_scale_inv, bias, scale_ue8m0, eps):
    if x.device.type == "cuda":
        _build.ensure_loaded()  # tracing runs this, not the wrapper: the kernel must exist when the graph runs
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.impl(_lib, "small_m_linear", "CPU")
def _small_m_linear_cpu(x, weight, weight_scale_inv, bias, scale_ue8m0, eps):
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    q, s = per_token_group_quant_reference(x, GROUP, weight.dtype, scale_ue8m0, eps)
    a = dequantize_groups(q, s)  # [M, K] fp32
    w = dequantize_weight_blockwise(weight, weight_scale_inv)  # [N, K] fp32
    y = a @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    """Beyond DTYPES and MAX_M (fp8linear.backends.unsupported_reason): None when the kernel serves
    [M, K] x [N, K]^T on `device`, else why not."""
    if K % GROUP != 0:
        return f"K % 128 != 0 (K={K})"
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    if torch.version.hip is not None:
        return "CUDA only (mma.sync fp8/int8 PTX)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"fp8 mma.sync needs compute capability >= 8.9; this GPU is {major}.{minor}"
    return None


def small_m_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: "torch.Tensor | None" = None,
    *,
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
) -> torch.Tensor:
    """y [..., N] = quantized x [..., K] times a 128x128-block quantized weight [N, K], plus bias.

    Args:
        x: bf16, fp16 or fp32 [..., K] with M <= 16 rows in all (the product of the leading dims),
            K % 128 == 0; rows may be strided. Quantized per 1x128 group exactly as
            `per_token_group_quant(x, 128, weight.dtype, ...)`.
        weight: float8_e4m3fn or int8 [N, K], contiguous.
        weight_scale_inv: fp32 [ceil(N/128), K/128], the per-block multipliers that dequantize weight.
        bias: [N] bf16, fp16 or fp32, or None; added in fp32.
        scale_ue8m0: power-of-two activation scales.
        eps: floor of each group's amax (as in per_token_group_quant).

    Returns: y [..., N] in x's dtype. A group of x holding a NaN or Inf makes its row of y NaN.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [..., M, K] (at least 2-D); got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32; got {x.dtype}")
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if M > MAX_M:
        raise ValueError(f"x has M={M} rows (product of its leading dims); small_m_linear serves at most {MAX_M} "
                         "(use FP8Linear for more)")
    if K % GROUP != 0 or K == 0:
        raise ValueError(f"x's last dim K={K} must be a positive multiple of {GROUP}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight must be a float8_e4m3fn or int8 tensor; got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, {K}] (x's K); got {list(weight.shape)}")
    check_linear_operands(x, weight, weight_scale_inv, bias, eps)
    if x.is_cuda:
        _build.ensure_loaded()
    return torch.ops.fp8linear.small_m_linear(
        x, weight.contiguous(), weight_scale_inv.contiguous(), None if bias is None else bias.contiguous(),
        bool(scale_ue8m0), float(eps),
    )


# -- the backend protocol (fp8linear.backends.Backend) ---------------------------------------------------
_OP = torch.ops.fp8linear.small_m_linear.default  # the overload itself: no per-call overload resolution


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], weight_scale_inv fp32 [ceil(N/128), K/128]), contiguous (a copy only if not).

    Also builds and loads the CUDA kernels: `linear` calls the op directly (no wrapper on the hot path),
    and FP8Linear prepares the weight before a backend's first call."""
    if weight.is_cuda:
        _build.ensure_loaded()
    return weight.contiguous(), weight_scale_inv.float().contiguous()


def linear(x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           out_dtype: torch.dtype, dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
    """x2d [M <= 16, K] -> y [M, N] in x's dtype (= out_dtype): one op call, quantization inside the kernel."""
    weight, weight_scale_inv = prepared
    return _OP(x2d, weight, weight_scale_inv, bias, scale_ue8m0, GEMM_EPS)
