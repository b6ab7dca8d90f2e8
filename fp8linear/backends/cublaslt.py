"""cuBLASLt backend: cuBLASLt's blockwise FP8 GEMM, 1x128 activation x 128x128 weight scales.

The recipe is the one `torch.nn.functional.scaled_mm(..., ScalingType.BlockWise1x128, ...,
ScalingType.BlockWise128x128)` asks of cuBLASLt (SM90, cuBLASLt >= 12.9), with the operands as torch's checks
(aten/src/ATen/native/cuda/ScaledBlas.cpp) and DESIGN.md "GEMM backends" require:
  a   fp8 e4m3 [M, K] row-major                    q, with M a multiple of 4 (below)
  b   fp8 e4m3 [K, N] column-major                 weight.t()
  sa  fp32 [M, K/128], strides exactly (1, M)      our `col` layout over M_pad rows
  sb  fp32 [L4, ceil(N/128)], strides (1, L4)      L4 = ceil(ceil(K/128) / 4) * 4: weight_scale_inv
                                                   padded to [ceil(N/128), L4] once, passed as .t()
and K % 16 == 0, N % 16 == 0.

Rows: sa's strides must be (1, M), and cuBLASLt wants that column 16-byte aligned, so M is a multiple
of 4: ROW_ALIGN = 4 makes the callers quantize into q [M_pad, K] and s `col` [M_pad, K/128] (rows
M..M_pad-1 unwritten: an output row depends on its own input row only, and y's padding rows are dropped).
K: we ask for K % 128 == 0, since FP8Linear's zero padding of x to a multiple of 128 would need a padded
weight copy here; the triton backend serves other K without one. Earlier torch releases gave wrong
answers when ceil(K/128) % 4 != 0; tests/test_backends_gpu.py covers K = 640 and 1664 (5 and 13 blocks).

One launch path: fp8linear's own call (kernels/cublaslt_gemm.cu) asks cuBLASLt for the GEMM torch's op
asks for, with the same operands, descriptors and heuristic limit, but keeps the descriptors and the
heuristic's pick per shape instead of rebuilding them on every call; `linear` quantizes and multiplies in
one op call (`fp8linear::cublaslt_linear`). Measured against torch's op on the H100 (same kernel, same
bits): less host time per forward, which decides eager prefill (docs/benchmarks.md, the end-to-end table
with "cuBLASLt call: torch's / ours"). Where fp8linear's CUDA extension cannot be built or cuBLASLt is
older than 12.9, `unsupported_reason` says so and `auto` picks another backend.
"""

from __future__ import annotations

import torch

from .. import _build
from ..layouts import ScaleLayout
from ..ops import GEMM_EPS
from . import bf16_epilogue

NAME = "cublaslt"
SCALE_LAYOUT = ScaleLayout.COL
ROW_ALIGN = 4
DTYPES = (torch.float8_e4m3fn,)
MAX_M = None

#: device index -> why fp8linear's cuBLASLt call cannot run there ("" when it can); asked once per device.
_unavailable: "dict[int | None, str]" = {}


def _unavailable_reason(device: torch.device) -> str:
    why = _unavailable.get(device.index)
    if why is None:
        try:
            _build.ensure_loaded()
        except _build.KernelBuildError as exc:
            why = f"fp8linear's CUDA extension is unavailable: {exc}"
        else:
            why = torch.ops.fp8linear.cublaslt_unavailable_reason(torch.empty(0, device=device))
        _unavailable[device.index] = why
    return why


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    if device.type != "cuda":
        return f"needs a CUDA device; got {device.type}"
    if torch.version.hip is not None:
        return "blockwise 1x128/128x128 scaling is cuBLASLt-only (CUDA)"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs sm90 (cuBLASLt has this recipe on Hopper only); this GPU is {major}.{minor}"
    if N % 16 != 0:
        return f"N % 16 != 0 (N={N})"
    if K % 128 != 0:
        return f"K % 128 != 0 (K={K}; the triton backend serves it)"
    return _unavailable_reason(device) or None


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


def _fix_col(s: torch.Tensor) -> torch.Tensor:
    # Eagerly s already has strides (1, M); a compiler may hand the op a re-laid copy.
    M, G = s.shape
    if s.stride(0) == 1 and (s.stride(1) == M or G == 1):
        return s
    fixed = torch.empty((G, M), dtype=s.dtype, device=s.device).t()
    fixed.copy_(s)
    return fixed


def linear(x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           out_dtype: torch.dtype, dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
    """Quantize x2d [M, K] (unit stride along K) and multiply in one op call -> y [M, N] out_dtype: bit for
    bit `quantize_for_gemm(x2d, 128, fp8, scale_ue8m0, ScaleLayout.COL, ROW_ALIGN)` then `gemm`."""
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
    y = torch.ops.fp8linear.cublaslt_gemm(q, _fix_col(s), b, sb)
    return bf16_epilogue(y, bias, out_dtype)


# -- the ops (CUDA implementations in kernels/cublaslt_gemm.cu), and the fakes torch.compile traces ------
_lib = torch.library.Library("fp8linear", "FRAGMENT")
# q fp8 [M, K], s fp32 `col` [M, K/128], b fp8 [K, N] column-major, sb fp32 [L4, ceil(N/128)] -> y bf16 [M, N].
_lib.define("cublaslt_gemm(Tensor q, Tensor s, Tensor b, Tensor sb) -> Tensor")
# The same, quantizing x [M, K] first (fp8linear::quant_for_gemm's `col` layout, 4-row padding) -> y bf16 [M, N].
_lib.define("cublaslt_linear(Tensor x, Tensor b, Tensor sb, bool scale_ue8m0, float eps) -> Tensor")
# "" when the ops above can run on `like`'s device, else why not (cuBLASLt missing or older than 12.9).
_lib.define("cublaslt_unavailable_reason(Tensor like) -> str")


@torch.library.register_fake("fp8linear::cublaslt_gemm", lib=_lib)
def _gemm_fake(q, s, b, sb):
    return q.new_empty((q.shape[0], b.shape[1]), dtype=torch.bfloat16)


@torch.library.register_fake("fp8linear::cublaslt_linear", lib=_lib)
def _linear_fake(x, b, sb, scale_ue8m0, eps):
    return x.new_empty((x.shape[0], b.shape[1]), dtype=torch.bfloat16)
