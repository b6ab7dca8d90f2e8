"""Blockwise GEMM backends: one module each, one interface, and `select()`.

Every backend computes, for activations quantized per 1 x 128 group and weights per 128 x 128 block,

    y[M, N] = (q * s)[M, K] @ (weight * weight_scale_inv)^T[K, N]  (+ bias),  accumulated in fp32

and exposes (STYLE.md 11):

    NAME                  its name in `FP8Linear(backend=...)`, a `fp8linear.config.Backend` value
    SCALE_LAYOUT          the `fp8linear.layouts.ScaleLayout` its activation scales must be written in;
                          `FP8Linear` passes it to `per_token_group_quant`, so no transpose runs between
    ROW_ALIGN             how many rows q and s must have storage for (cuBLASLt: 4; others 1): FP8Linear
                          quantizes into buffers of ceil(M / ROW_ALIGN) * ROW_ALIGN rows
    FUSES_QUANT           True for a backend that quantizes x itself (small_m): FP8Linear then calls
                          `linear(x, prepared, bias, scale_ue8m0) -> y` (x [..., K]) instead of quantizing and `gemm`
    unsupported_reason(M, N, K, dtype, device) -> str | None
                          None when it can serve this shape; else why not ("not importable: ...",
                          "needs sm90", "N % 64 != 0", ...). K is the layer's in_features.
    prepare_weight(weight, weight_scale_inv) -> prepared
                          once per weight (FP8Linear caches it): weight [N, K] fp8/int8 row-major,
                          weight_scale_inv fp32 [ceil(N/128), ceil(K/128)] row-major
    gemm(q, s, prepared, out_dtype, bias) -> y
                          q [M, Kp] fp8/int8 contiguous with Kp = ceil(K/128)*128 (columns K..Kp-1 are
                          zeros: FP8Linear pads x with zeros, see fp8linear.linear); s fp32 [M, Kp/128] in
                          SCALE_LAYOUT; bias [N] (any float dtype) or None; y [M, N] in out_dtype.
                          No host synchronisation (CUDA-graph capture and torch.compile must work).
    quant_gemm(x2d, prepared, scale_ue8m0, out_dtype, bias) -> y | None   (optional; deepgemm, cublas)
                          quantize x2d [M, Kp] and run `gemm` in one op call, with the same result; None
                          where it cannot (FP8Linear then quantizes and calls `gemm`).

The names (each a `Backend` value, documented in fp8linear.config):

    reference   dequantize and fp32 matmul, any device (the CPU path and the tests' oracle)
    deepgemm    DeepGEMM, legacy or current API by feature detection
    cublas      cuBLASLt's blockwise FP8 GEMM (BlockWise1x128 x BlockWise128x128), called as torch calls it
    triton      fp8linear's Triton GEMM, fp8 and int8, any N and K
    small_m     fp8linear's CUDA kernel for M <= 16: quantization fused into a tensor-core GEMM
    sm90        fp8linear's Hopper GEMM (wgmma, TMA), quantizing x inside the same kernel
    auto        per shape from measurements on this card (fp8linear.backends.auto)

Asking for a backend by name that cannot serve a shape raises `BackendUnsupportedError` with the
reason: there is no silent fallback. Only `auto` falls back, in the order of `FALLBACK_ORDER`.
"""

from __future__ import annotations

import importlib
import types

import torch

__all__ = [
    "NAMES",
    "FALLBACK_ORDER",
    "BackendUnsupportedError",
    "get",
    "unsupported_reason",
    "select",
    "padded_k",
]

#: Backend name -> module implementing the interface above. `auto` is a chooser, not a GEMM.
_MODULES = {
    "reference": "fp8linear.backends.reference",
    "deepgemm": "fp8linear.backends.deepgemm",
    "cublas": "fp8linear.backends.cublaslt",
    "triton": "fp8linear.backends.triton_blockwise",
    "small_m": "fp8linear.backends.small_m",
    "sm90": "fp8linear.backends.sm90",
}
NAMES = ("auto", *_MODULES)

#: What `auto` tries, in this order, when its table (or heuristic) names no backend that can serve a
#: shape: triton serves every shape and dtype on a GPU with Triton; reference serves everything, slowly.
FALLBACK_ORDER = ("cublas", "deepgemm", "triton", "reference")

#: Activation groups and weight blocks along K are 128 wide (fp8linear.config.SUPPORTED_BLOCK_SIZE).
GROUP = 128


class BackendUnsupportedError(ValueError):
    """An explicitly requested backend cannot serve this shape, dtype or device (the message says why)."""


def padded_k(K: int) -> int:
    """Kp = ceil(K / 128) * 128: the width of q after FP8Linear pads x along K with zeros."""
    return (K + GROUP - 1) // GROUP * GROUP


def bf16_epilogue(y: torch.Tensor, bias: "torch.Tensor | None", out_dtype: torch.dtype) -> torch.Tensor:
    """For GEMMs that write bf16 and take no bias (DeepGEMM, cuBLASLt here): add the bias, cast to out_dtype."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)


def get(name: str) -> types.ModuleType:
    """The module of a GEMM backend by name (imports it; importing never touches the GPU)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in NAMES)}; got {name!r}")
    return importlib.import_module(_MODULES[name])


def unsupported_reason(name: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    """None when backend `name` can serve [M, K] x [N, K]^T in `dtype` on `device`; else why not."""
    try:
        module = get(name)
    except ImportError as exc:  # a backend module itself failing to import is a reason, not a crash
        return f"not importable: {exc}"
    return module.unsupported_reason(M, N, K, dtype, torch.device(device))


def select(name: str, M: int, N: int, K: int, dtype: torch.dtype, device: "torch.device | str") -> types.ModuleType:
    """The backend module that will compute this GEMM.

    `name` is a `Backend` value. "auto" asks `fp8linear.backends.auto.choose` (measured table or
    heuristic, then FALLBACK_ORDER by availability). Any other name must be able to serve the shape,
    else BackendUnsupportedError names the backend, the shape and the reason.
    """
    device = torch.device(device)
    if name == "auto":
        from . import auto

        return get(auto.choose(M, N, K, dtype, device))
    why = unsupported_reason(name, M, N, K, dtype, device)
    if why is not None:
        raise BackendUnsupportedError(
            f"backend={name!r} cannot serve M={M}, N={N}, K={K}, dtype={dtype} on {device}: {why}. "
            "Use backend='auto' (falls back by availability) or another backend"
        )
    return get(name)
