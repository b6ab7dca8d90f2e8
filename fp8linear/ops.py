"""The per-token-group quantization op: its torch.library registration and the public wrapper.

Four pieces, side by side (STYLE.md 4-5):
- the schema `fp8linear::per_token_group_quant_`, an out-variant: it writes `q` and `s` and returns
  nothing, so its fake (for torch.compile) is trivial and callers may pass preallocated buffers;
- the CPU implementation: `fp8linear.reference`, copied into the buffers in their layout;
- the CUDA implementation: `kernels/per_token_group_quant.cu`, compiled on first CUDA use by
  `fp8linear._build` and registered from C++ (`TORCH_LIBRARY_IMPL(fp8linear, CUDA, m)`);
- `per_token_group_quant`, which checks the arguments, allocates through `fp8linear.layouts`, and calls
  the op.
"""

from __future__ import annotations

import math

import torch

from . import _build, fused
from .layouts import ScaleLayout, check_scales, empty_scales, pack_ue8m0
from .reference import (MIN_EPS, SUPPORTED_GROUP_SIZES, SUPPORTED_INPUT_DTYPES, SUPPORTED_OUTPUT_DTYPES,
                        per_token_group_quant_reference)

__all__ = ["per_token_group_quant", "quantize_for_gemm", "gemm_buffers", "SUPPORTED_GROUP_SIZES", "SUPPORTED_INPUT_DTYPES", "SUPPORTED_OUTPUT_DTYPES"]

_LAYOUTS = {**{m.value: m for m in ScaleLayout}, **{m: m for m in ScaleLayout}}

# The Library object must live as long as the op: module level (vLLM's direct_register_custom_op note).
_lib = torch.library.Library("fp8linear", "DEF")
_lib.define(
    "per_token_group_quant_(Tensor x, Tensor(a!) q, Tensor(b!) s, int group_size, "
    "bool scale_ue8m0, float eps, str layout) -> ()"
)


@torch.library.register_fake("fp8linear::per_token_group_quant_")
def _per_token_group_quant_fake(x, q, s, group_size, scale_ue8m0, eps, layout) -> None:
    # Tracing for torch.compile runs this, not the wrapper: make sure the CUDA kernel is registered
    # before the compiled graph first runs.
    if x.device.type == "cuda":
        _build.ensure_loaded()
    return None


# The allocating variant for GEMM callers (FP8Linear): q [M_pad, K] and s in `layout` over M_pad rows, rows
# M..M_pad-1 unwritten. One op call per forward instead of several tensor calls from Python.
_lib.define(
    "quant_for_gemm(Tensor x, int group_size, ScalarType dtype, bool scale_ue8m0, float eps, str layout, "
    "int row_align) -> (Tensor, Tensor)"
)


def gemm_buffers(M: int, K: int, group_size: int, dtype: torch.dtype, layout: "str | ScaleLayout", row_align: int,
                 device: "torch.device | str") -> "tuple[torch.Tensor, torch.Tensor]":
    """Uninitialised q [M_pad, K] and scales in `layout` over M_pad = ceil(M / row_align) * row_align rows: what
    a GEMM that reads whole row tiles takes (quant_for_gemm, and the fused prologues' callers, fill rows 0..M-1)."""
    M_pad = -(-M // row_align) * row_align
    q = torch.empty((M_pad, K), dtype=dtype, device=device)
    return q, empty_scales((), M_pad, K // group_size, layout, device)


@torch.library.register_fake("fp8linear::quant_for_gemm")
def _quant_for_gemm_fake(x, group_size, dtype, scale_ue8m0, eps, layout, row_align):
    if x.device.type == "cuda":
        _build.ensure_loaded()
    return gemm_buffers(*x.shape, group_size, dtype, layout, row_align, x.device)


@torch.library.impl(_lib, "quant_for_gemm", "CPU")
def _quant_for_gemm_cpu(x, group_size, dtype, scale_ue8m0, eps, layout, row_align):
    q, s = gemm_buffers(*x.shape, group_size, dtype, layout, row_align, x.device)
    M = x.shape[0]
    if M:
        packed = layout == ScaleLayout.UE8M0_PACKED.value
        _per_token_group_quant_cpu(x, q[:M], s[:M], group_size, scale_ue8m0 or packed, eps, layout)
    return q, s


@torch.library.impl(_lib, "per_token_group_quant_", "CPU")
def _per_token_group_quant_cpu(x, q, s, group_size, scale_ue8m0, eps, layout) -> None:
    ref_q, ref_s = per_token_group_quant_reference(x, group_size, q.dtype, scale_ue8m0, eps)
    q.copy_(ref_q)
    s.copy_(pack_ue8m0(ref_s) if layout == ScaleLayout.UE8M0_PACKED.value else ref_s)


def _check_out(out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor; got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype} (the `dtype` argument); got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"out must be on {x.device} like x; got {out.device}")
    if out.shape != x.shape:
        raise ValueError(f"out must have x's shape {list(x.shape)}; got {list(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous; got strides {out.stride()} for shape {list(out.shape)}")


def per_token_group_quant(
    x: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    scale_layout: "str | ScaleLayout" = "row",
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
    out: "torch.Tensor | None" = None,
    scale_out: "torch.Tensor | None" = None,
    prologue: "str | None" = None,
    weight: "torch.Tensor | None" = None,
    rms_eps: float = 1e-6,
    return_normed: bool = False,
    normed_out: "torch.Tensor | None" = None,
):
    """Quantize x per group of `group_size` consecutive elements along its last dim.

    Args:
        x: bf16, fp16 or fp32, `[M, K]` or `[E, M, K]`. The last dim must be contiguous; rows (and
            batches) may have any stride, so a slice of a larger buffer quantizes without a copy.
        group_size: g, one of 16, 32, 64, 128, 256; K % g == 0. G = K / g groups per row.
        dtype: `torch.float8_e4m3fn` (QMAX 448) or `torch.int8` (QMAX 127).
        scale_layout: `"row"` (fp32 [M, G], strides (G, 1)), `"col"` (fp32 [M, G], strides (1, M_pad),
            M_pad = ceil(M/4)*4: what DeepGEMM on SM90 and cuBLASLt read) or `"ue8m0_packed"` (int32
            [M, ceil(G/4)], strides (1, M_pad), four UE8M0 exponents per word: DeepGEMM on SM100; fp8 only,
            implies power-of-two scales). 3-D inputs get a leading [E] dim (see `fp8linear.layouts`).
        scale_ue8m0: round scales up to powers of two (stored as fp32 in `row`/`col`).
        eps: floor of each group's amax (>= 1e-30), so all-zero groups get a finite scale.
        out: optional preallocated q (contiguous, x's shape, `dtype`, x's device).
        scale_out: optional preallocated scales, exactly as `fp8linear.layouts.empty_scales` allocates.

    Returns:
        (q, s): q `[..., M, K]` in `dtype`, contiguous; s in `scale_layout`. With x = q * s per group,
        semantics bit for bit as DESIGN.md "Quantization semantics" (see `fp8linear.reference`); a group
        with a NaN or Inf gets scale NaN and q NaN (fp8) or 0 (int8).

    Prologues (fused into the same kernel, 2-D x only; fp8linear.fused has the exact semantics):
        prologue="silu_and_mul": x [M, 2I] is [gate | up]; quantizes silu(gate) * up, q [M, I].
        prologue="rmsnorm": quantizes rmsnorm(x) * weight (`weight` [H], `rms_eps`); with
            `return_normed=True` also returns the normalized row in x's dtype: (q, s, normed).

    Runs the reference in torch on CPU and the CUDA kernel (built on first use) on CUDA.
    """
    if prologue is not None:
        return _fused(x, group_size, dtype, scale_layout, scale_ue8m0, eps, out, scale_out, prologue, weight,
                      rms_eps, return_normed, normed_out)
    # -- check ---------------------------------------------------------------------------------------
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32; got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D [M, K] or 3-D [E, M, K]; got shape {list(x.shape)}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}; got {group_size!r}")
    K = x.shape[-1]
    if K % group_size != 0:
        raise ValueError(f"x's last dim K={K} must be divisible by group_size={group_size}")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError(
            f"x's last dim must be contiguous (stride 1); got strides {x.stride()}. Rows may be strided; "
            "call .contiguous() for other layouts"
        )
    if dtype not in SUPPORTED_OUTPUT_DTYPES:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.int8; got {dtype}")
    layout = _LAYOUTS.get(scale_layout) or ScaleLayout.parse(scale_layout)  # dict first: this is a hot path
    if layout is ScaleLayout.UE8M0_PACKED:
        if dtype != torch.float8_e4m3fn:
            raise ValueError(f"scale_layout='ue8m0_packed' is for fp8 (DeepGEMM SM100) only; got dtype={dtype}")
        scale_ue8m0 = True
    if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= MIN_EPS):
        raise ValueError(f"eps must be a finite float >= {MIN_EPS}; got {eps!r}")

    batch, M = tuple(x.shape[:-2]), x.shape[-2]
    G = K // group_size
    # -- allocate ------------------------------------------------------------------------------------
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        _check_out(out, x, dtype)
    if scale_out is None:
        scale_out = empty_scales(batch, M, G, layout, x.device)
    else:
        check_scales(scale_out, batch, M, G, layout, x.device)
    if x.numel() == 0:
        return out, scale_out
    # -- launch --------------------------------------------------------------------------------------
    if x.is_cuda:
        _build.ensure_loaded()
    torch.ops.fp8linear.per_token_group_quant_(x, out, scale_out, group_size, bool(scale_ue8m0), float(eps), layout.value)
    return out, scale_out


#: The amax floor FP8Linear quantizes activations with: quantize_for_gemm's default, and what the backends'
#: one-op paths (quantization inside their op call) pass, so that both paths write the same bytes.
GEMM_EPS = 1e-10


def quantize_for_gemm(x: torch.Tensor, group_size: int, dtype: torch.dtype, scale_ue8m0: bool, layout: ScaleLayout,
                      row_align: int, eps: float = GEMM_EPS) -> "tuple[torch.Tensor, torch.Tensor]":
    """Allocate and quantize in one op call, for GEMM callers that have validated x [M, K] themselves
    (FP8Linear's forward): q [M_pad, K] and s in `layout` over M_pad = ceil(M / row_align) * row_align rows,
    the padding rows allocated but unwritten (a GEMM reading whole 4-row tiles; its caller drops those rows)."""
    if x.is_cuda:
        _build.ensure_loaded()
    return torch.ops.fp8linear.quant_for_gemm(x, group_size, dtype, scale_ue8m0, eps, layout.value, row_align)


def _fused(x, group_size, dtype, scale_layout, scale_ue8m0, eps, out, scale_out, prologue, weight, rms_eps,
           return_normed, normed_out):
    if prologue == "silu_and_mul":
        if weight is not None or return_normed or normed_out is not None:
            raise ValueError("prologue='silu_and_mul' takes no weight, return_normed or normed_out")
        return fused.silu_and_mul_quant(x, group_size, dtype, scale_layout=scale_layout, scale_ue8m0=scale_ue8m0,
                                        eps=eps, out=out, scale_out=scale_out)
    if prologue == "rmsnorm":
        if weight is None:
            raise ValueError("prologue='rmsnorm' needs weight= (the norm's [H] weight)")
        return fused.rmsnorm_quant(x, weight, rms_eps, group_size, dtype, scale_layout=scale_layout,
                                   scale_ue8m0=scale_ue8m0, eps=eps, return_normed=return_normed, out=out,
                                   scale_out=scale_out, normed_out=normed_out)
    raise ValueError(f"prologue must be None, 'silu_and_mul' or 'rmsnorm'; got {prologue!r}")
