"""cuBLASLt backend: torch's blockwise scaled matmul, 1x128 activation x 128x128 weight scales.

    torch.nn.functional.scaled_mm(a, b, sa, ScalingType.BlockWise1x128, sb, ScalingType.BlockWise128x128,
                                  output_dtype=torch.bfloat16)           torch >= 2.10, SM90, cuBLASLt >= 12.9

with, as torch's checks (aten/src/ATen/native/cuda/ScaledBlas.cpp, `_scaled_block1x128_block128x128`)
and DESIGN.md "GEMM backends" require:
  a   fp8 e4m3 [M, K] row-major                    q, with M a multiple of 4 (below)
  b   fp8 e4m3 [K, N] column-major                 weight.t()
  sa  fp32 [M, K/128], strides exactly (1, M)      our `col` layout over M_pad rows
  sb  fp32 [L4, ceil(N/128)], strides (1, L4)      L4 = ceil(ceil(K/128) / 4) * 4: weight_scale_inv
                                                   padded to [ceil(N/128), L4] once, passed as .t()
and K % 16 == 0, N % 16 == 0.

Rows: sa's strides must be (1, M), and cuBLASLt wants that column 16-byte aligned, so M is a multiple
of 4: ROW_ALIGN = 4 makes FP8Linear quantize into q [M_pad, K] and s `col` [M_pad, K/128] (rows
M..M_pad-1 unwritten: an output row depends on its own input row only, and FP8Linear drops y's
padding rows). K: we ask for K % 128 == 0, since FP8Linear's zero padding of x to a multiple of 128
would need a padded weight copy here; the triton backend serves other K without one.

Correctness note (issue 3): earlier torch releases gave silent wrong answers when ceil(K/128) % 4 != 0;
tests/test_backends_gpu.py covers K = 640 and 1664 (5 and 13 blocks) against the reference.

Older torch without `torch.nn.functional.scaled_mm` but with blockwise support in `torch._scaled_mm`
(2.9) infers the recipe from the scale shapes: we fall back to it with the same tensors.

The call itself: fp8linear's own (kernels/cublaslt_gemm.cu) asks cuBLASLt for the same GEMM with the same
operands, descriptors and heuristic limit as torch's op, but keeps the descriptors and the heuristic's
kernel per shape instead of rebuilding them on every call, and `quant_gemm` quantizes and multiplies in
one op call. torch's op stays where fp8linear's extension or cuBLASLt cannot be loaded (logged once),
under torch.compile (the opaque op below), and everywhere with FP8LINEAR_CUBLAS_LAUNCH=torch.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .. import _build
from ..layouts import ScaleLayout
from ..ops import GEMM_EPS
from . import bf16_epilogue

log = logging.getLogger(__name__)

NAME = "cublas"
SCALE_LAYOUT = ScaleLayout.COL
ROW_ALIGN = 4
FUSES_QUANT = False

#: Whether calls go through fp8linear's own cuBLASLt call (kernels/cublaslt_gemm.cu: the same kernel as
#: torch's op, less host time); FP8LINEAR_CUBLAS_LAUNCH=torch keeps torch's op for every call.
OWN_LAUNCH = os.environ.get("FP8LINEAR_CUBLAS_LAUNCH", "") != "torch"
_own_ready: "dict[int | None, bool]" = {}


@functools.lru_cache(maxsize=None)
def _api() -> "tuple[str | None, str]":
    """("scaled_mm" | "_scaled_mm", detail) or (None, why not)."""
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") and hasattr(F.ScalingType, "BlockWise1x128"):
        if hasattr(torch, "_scaled_mm_v2"):
            # The op F.scaled_mm wraps, called with the recipe lists built once: the wrapper's list and
            # enum conversions are host time on every forward.
            return "_scaled_mm_v2", "torch._scaled_mm_v2 (torch.nn.functional.scaled_mm's op)"
        return "scaled_mm", "torch.nn.functional.scaled_mm"
    if hasattr(torch, "_scaled_mm"):
        return "_scaled_mm", "torch._scaled_mm (recipe inferred from scale shapes)"
    return None, f"torch {torch.__version__} has neither torch.nn.functional.scaled_mm nor torch._scaled_mm"


def api_name() -> str:
    return _api()[1]


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    if dtype != torch.float8_e4m3fn:
        return f"fp8 e4m3 only; got {dtype}"
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    if torch.version.hip is not None:
        return "blockwise 1x128/128x128 scaling is CUDA-only in torch"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs sm90 (torch supports this recipe on Hopper only); this GPU is {major}.{minor}"
    if N % 16 != 0:
        return f"N % 16 != 0 (N={N})"
    if K % 128 != 0:
        return f"K % 128 != 0 (K={K}; the triton backend serves it)"
    name, why = _api()
    if name is None:
        return why
    return None


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (b fp8 [K, N] column-major view of weight, sb fp32 [L4, ceil(N/128)] with strides (1, L4)).

    weight_scale_inv [ceil(N/128), ceil(K/128)] is copied once into zero-padded storage
    [ceil(N/128), L4]; the zero columns pair with no K block, they only satisfy cuBLASLt's alignment.
    """
    nb, kb = weight_scale_inv.shape
    L4 = -(-kb // 4) * 4
    padded = torch.zeros((nb, L4), dtype=torch.float32, device=weight_scale_inv.device)
    padded[:, :kb] = weight_scale_inv
    return weight.contiguous().t(), padded.t()


@functools.lru_cache(maxsize=None)
def _recipes() -> "tuple[list[int], list[int]]":
    """F.scaled_mm's recipe enums as the int lists its op takes (BlockWise1x128, BlockWise128x128)."""
    F = torch.nn.functional
    return [int(F.ScalingType.BlockWise1x128.value)], [int(F.ScalingType.BlockWise128x128.value)]


def _fix_col(s: torch.Tensor) -> torch.Tensor:
    # Eagerly s already has strides (1, M); a compiler may hand the op a re-laid copy.
    M, G = s.shape
    if s.stride(0) == 1 and (s.stride(1) == M or G == 1):
        return s
    fixed = torch.empty((G, M), dtype=s.dtype, device=s.device).t()
    fixed.copy_(s)
    return fixed


def _own_launch(device: torch.device) -> bool:
    """Whether fp8linear's cuBLASLt op can serve calls on `device`: asked once per device, a no logged once."""
    ready = _own_ready.get(device.index)
    if ready is None:
        try:
            _build.ensure_loaded()
        except _build.KernelBuildError as exc:
            why = f"fp8linear's CUDA extension is unavailable: {exc}"
        else:
            why = torch.ops.fp8linear.cublaslt_unavailable_reason(torch.empty(0, device=device))
        if why:
            log.info("cuBLASLt is called through %s on %s: %s", api_name(), device, why)
        ready = _own_ready[device.index] = not why
    return ready


def _gemm_impl(q: torch.Tensor, s: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    s = _fix_col(s)
    if OWN_LAUNCH and _own_launch(q.device):
        return torch.ops.fp8linear.cublaslt_gemm(q, s, b, sb)
    name, _ = _api()
    # sa shape [M, ceil(K/128)] but sb was padded to L4 columns of K blocks: torch takes sa unpadded.
    if name == "_scaled_mm_v2":
        recipe_a, recipe_b = _recipes()
        return torch._scaled_mm_v2(q, b, [s], recipe_a, [], [sb], recipe_b, [], None, torch.bfloat16, [], False)
    if name == "scaled_mm":
        F = torch.nn.functional
        return F.scaled_mm(
            q, b, s, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        )
    return torch._scaled_mm(q, b, s, sb, out_dtype=torch.bfloat16)


def quant_gemm(
    x2d: torch.Tensor,
    prepared: tuple[torch.Tensor, torch.Tensor],
    scale_ue8m0: bool,
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> "torch.Tensor | None":
    """Quantize x2d [M, K] (unit stride along K) and multiply in one op call -> y [M, N] out_dtype, the
    result of quantizing with `quantize_for_gemm(x2d, 128, fp8, scale_ue8m0, ScaleLayout.COL, ROW_ALIGN)` and
    calling `gemm`, bit for bit; None where fp8linear's own cuBLASLt call is off or unavailable, or under
    torch.compile, and the caller quantizes and calls `gemm`."""
    if not OWN_LAUNCH or torch.compiler.is_compiling() or not _own_launch(x2d.device):
        return None
    b, sb = prepared
    y = torch.ops.fp8linear.cublaslt_linear(x2d, b, sb, scale_ue8m0, GEMM_EPS)
    return bf16_epilogue(y, bias, out_dtype)


def gemm(
    q: torch.Tensor,
    s: torch.Tensor,
    prepared: tuple[torch.Tensor, torch.Tensor],
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> torch.Tensor:
    """q fp8 [M_pad, K] contiguous (M_pad % 4 == 0), s fp32 `col` [M_pad, K/128] -> y [M_pad, N] out_dtype."""
    b, sb = prepared
    if torch.compiler.is_compiling():
        y = torch.ops.fp8linear.cublaslt_blockwise_mm(q, s, b, sb)
    else:
        y = _gemm_impl(q, s, b, sb)
    return bf16_epilogue(y, bias, out_dtype)


# -- the opaque op torch.compile sees: it keeps inductor from re-laying the scales or lowering the
# matmul to a template that does not know this recipe. ------------------------------------------------
_lib = torch.library.Library("fp8linear", "FRAGMENT")
_lib.define("cublaslt_blockwise_mm(Tensor q, Tensor s, Tensor b, Tensor sb) -> Tensor")
# kernels/cublaslt_gemm.cu: the same GEMM through fp8linear's own cuBLASLt call (operands as above) -> y bf16.
_lib.define("cublaslt_gemm(Tensor q, Tensor s, Tensor b, Tensor sb) -> Tensor")
# The same, quantizing x [M, K] first (fp8linear::quant_for_gemm's `col` layout, 4-row padding) -> y bf16 [M, N].
_lib.define("cublaslt_linear(Tensor x, Tensor b, Tensor sb, bool scale_ue8m0, float eps) -> Tensor")
# "" when the op above can run on `like`'s device, else why not (cuBLASLt missing or older than 12.9).
_lib.define("cublaslt_unavailable_reason(Tensor like) -> str")


@torch.library.register_fake("fp8linear::cublaslt_blockwise_mm", lib=_lib)
def _gemm_fake(q, s, b, sb):
    return q.new_empty((q.shape[0], b.shape[1]), dtype=torch.bfloat16)


@torch.library.impl(_lib, "cublaslt_blockwise_mm", "CUDA")
def _gemm_cuda(q, s, b, sb):
    return _gemm_impl(q, s, b, sb)


@torch.library.register_fake("fp8linear::cublaslt_gemm", lib=_lib)
def _own_gemm_fake(q, s, b, sb):
    return q.new_empty((q.shape[0], b.shape[1]), dtype=torch.bfloat16)


@torch.library.register_fake("fp8linear::cublaslt_linear", lib=_lib)
def _own_linear_fake(x, b, sb, scale_ue8m0, eps):
    return x.new_empty((x.shape[0], b.shape[1]), dtype=torch.bfloat16)
