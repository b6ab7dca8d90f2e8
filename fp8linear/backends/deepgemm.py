"""DeepGEMM backend: DeepSeek's JIT-compiled SM90 FP8 GEMM, 1x128 activation x 128x128 weight scales.

Two APIs, found by feature detection (DESIGN.md "GEMM backends"):
- legacy (sgl-kernel 0.1-0.2 wheels, DeepGEMM before mid-2025):
  `deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)`;
- current: `deep_gemm.fp8_gemm_nt((a, sa), (b, sb), d)`.
Both read, on SM90:
  a   fp8 e4m3 [M, K] contiguous                 (our q)
  sa  fp32 [M, K/128], strides (1, M_pad)         (our `col` layout: no transpose kernel runs between)
  b   fp8 e4m3 [N, K] contiguous                  (weight)
  sb  fp32 [ceil(N/128), ceil(K/128)] contiguous  (weight_scale_inv)
  out bf16 [M, N] contiguous, preallocated
and need N % 64 == 0 and K % 128 == 0; no bias (added after) and bf16 output only (cast after for
fp16/fp32 inputs). M is free: the legacy source asserts nothing on M, returns early for M == 0, and
pads the scale rows by TMA alignment exactly as our `col` layout does (get_tma_aligned_size, 16 bytes).

Its first call per (N, K, tile config) JIT-compiles with nvcc (seconds); later calls launch a cached
kernel on the current stream, which CUDA graphs capture. Under torch.compile, `gemm` goes through the
opaque op `fp8linear::deepgemm_gemm_nt` so dynamo never traces DeepGEMM's Python.

Launch path. Every call goes through DeepGEMM's public function, except with the legacy DeepGEMM of
sgl-kernel 0.1.x wheels: there the first call per (M, N, K, device) does, and later calls launch the kernel
it ran from C++ (less host time, the same bits). All of that reads DeepGEMM's internals and lives in one
module, fp8linear.backends.deepgemm_relaunch, which checks that the installed DeepGEMM is the build it was
written for; where it is not, or a plan cannot be read, DeepGEMM's own launch serves and one INFO log line
says why.
"""

from __future__ import annotations

import functools
import logging

import torch

from .. import _build
from ..layouts import ScaleLayout, tma_aligned_rows
from ..ops import GEMM_EPS
from . import bf16_epilogue, deepgemm_relaunch as relaunch, quantize_then_gemm

log = logging.getLogger(__name__)
_logged: "set[str]" = set()

NAME = "deepgemm"
SCALE_LAYOUT = ScaleLayout.COL
ROW_ALIGN = 1
DTYPES = (torch.float8_e4m3fn,)
MAX_M = None


@functools.lru_cache(maxsize=None)
def _api() -> "tuple[object | None, str]":
    """(the GEMM function, "legacy" | "current") or (None, why not)."""
    try:
        import deep_gemm
    except Exception as exc:  # ImportError, or its own import-time failures
        return None, f"deep_gemm not importable ({type(exc).__name__}: {exc})"
    if hasattr(deep_gemm, "fp8_gemm_nt"):
        return deep_gemm.fp8_gemm_nt, "current"
    if hasattr(deep_gemm, "gemm_fp8_fp8_bf16_nt"):
        return deep_gemm.gemm_fp8_fp8_bf16_nt, "legacy"
    return None, "deep_gemm has neither fp8_gemm_nt nor gemm_fp8_fp8_bf16_nt"


def api_name() -> str:
    """'current', 'legacy', or the reason DeepGEMM is unavailable (for logs and benchmark headers)."""
    fn, what = _api()
    return what


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs sm90 (Hopper) for fp32 scales; this GPU is {major}.{minor}"
    if N % 64 != 0:
        return f"N % 64 != 0 (N={N})"
    if K % 128 != 0:
        return f"K % 128 != 0 (K={K})"
    fn, why = _api()
    if fn is None:
        return why
    return None


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight fp8 [N, K] and weight_scale_inv fp32 [N/128, K/128], both made contiguous (a copy only if
    they were not)."""
    return weight.contiguous(), weight_scale_inv.float().contiguous()


def _gemm_impl(q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    M, K = q.shape
    N = weight.shape[0]
    key = (M, N, K, q.device.index)
    plan = relaunch.plans.get(key) if relaunch.ENABLED else ()
    if plan and s.stride() == (1, tma_aligned_rows(M)):
        return torch.ops.fp8linear.deepgemm_gemm(q, s, weight, weight_scale_inv, *plan)
    y = torch.empty((M, N), dtype=torch.bfloat16, device=q.device)  # [M, N]
    if M == 0:
        return y
    fn, api = _api()
    if plan is not None or api != "legacy":  # DeepGEMM's own launch serves this shape (or s came re-laid)
        fn((q, s), (weight, weight_scale_inv), y)
        return y
    plan = relaunch.first_call(fn, q, s, weight, weight_scale_inv, y)  # records what DeepGEMM ran
    if isinstance(plan, str):
        if plan not in _logged:
            _logged.add(plan)
            log.info("DeepGEMM keeps its own launch (M=%d, N=%d, K=%d): %s", M, N, K, plan)
        plan = ()
    else:
        _build.ensure_loaded()  # the C++ launch lives in fp8linear's extension
    relaunch.plans[key] = plan
    return y


def linear(x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           out_dtype: torch.dtype, dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
    """Quantize x2d [M, K] (unit stride along K) and multiply -> y [M, N] out_dtype. Once DeepGEMM has run a
    shape (its plan is known), in one op call that quantizes and launches the same kernel from C++
    (`fp8linear::deepgemm_linear`, the same bytes as quantizing with `col` scales and calling `gemm`);
    before that, and under torch.compile, the quant op then `gemm`."""
    weight, weight_scale_inv = prepared
    plan = None
    if relaunch.ENABLED and not torch.compiler.is_compiling():
        plan = relaunch.plans.get((x2d.shape[0], weight.shape[0], x2d.shape[1], x2d.device.index))
    if not plan:
        return quantize_then_gemm(gemm, SCALE_LAYOUT, ROW_ALIGN, x2d, prepared, bias, out_dtype, dtype, scale_ue8m0)
    y = torch.ops.fp8linear.deepgemm_linear(x2d, weight, weight_scale_inv, scale_ue8m0, GEMM_EPS, *plan)
    return bf16_epilogue(y, bias, out_dtype)


def gemm(
    q: torch.Tensor,
    s: torch.Tensor,
    prepared: tuple[torch.Tensor, torch.Tensor],
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> torch.Tensor:
    """q fp8 [M, K] contiguous, s fp32 [M, K/128] `col` -> y [M, N] out_dtype (bias added after)."""
    weight, weight_scale_inv = prepared
    if torch.compiler.is_compiling():
        y = torch.ops.fp8linear.deepgemm_gemm_nt(q, s, weight, weight_scale_inv)
    else:
        y = _gemm_impl(q, s, weight, weight_scale_inv)
    return bf16_epilogue(y, bias, out_dtype)


# -- the opaque op torch.compile sees ------------------------------------------------------------------------
_lib = torch.library.Library("fp8linear", "FRAGMENT")
_lib.define("deepgemm_gemm_nt(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv) -> Tensor")


@torch.library.register_fake("fp8linear::deepgemm_gemm_nt", lib=_lib)
def _gemm_fake(q, s, weight, weight_scale_inv):
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=torch.bfloat16)


@torch.library.impl(_lib, "deepgemm_gemm_nt", "CUDA")
def _gemm_cuda(q, s, weight, weight_scale_inv):
    # DeepGEMM's legacy API re-lays s itself (a slow copy) should the compiler have changed its strides.
    return _gemm_impl(q, s, weight, weight_scale_inv)
