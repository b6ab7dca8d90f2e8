"""Grouped DeepGEMM backend: DeepGEMM's m-grouped FP8 GEMMs (fp8linear.backends.GroupedBackend), SM90.

Two APIs, found by feature detection (DESIGN.md "Mixture of experts"):
- legacy (the sgl-kernel 0.1.4 build): `m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out,
  m_indices)` and `m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, expected_m)`;
- current (2.x): `m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, grouped_layout)` and
  `m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), d, masked_m, expected_m)`.
Both read, on SM90:
  a   fp8 e4m3 [M_all, K] (contiguous) or [E, max_m, K] (masked), contiguous
  sa  fp32 per 1x128 group, MN-major and TMA-aligned: our `col` layout, 2-D over M_all rows or 3-D
      with strides (G * M_pad, 1, M_pad) (fp8linear.layouts), so no transpose runs inside DeepGEMM
  b   fp8 e4m3 [E, N, K] contiguous;  sb fp32 [E, ceil(N/128), ceil(K/128)] contiguous
  out bf16 [M_all, N] or [E, max_m, N], preallocated (cast after for fp16/fp32 models)
and need N % 64 == 0 and K % 128 == 0, fp8 only.

Contiguous: every expert's segment padded to CONTIGUOUS_ALIGN = 128 rows
(`get_m_alignment_for_contiguous_layout()` in 0.1.4, `get_mk_alignment_for_contiguous_layout()` in 2.x,
128 by default; `grouped_unsupported_reason` says so when the library asks for another), the padding rows
carrying their segment's expert: 0.1.4 takes each 128-row block's expert from its first row and has no
notion of -1 rows, 2.x skips blocks whose first row is -1. FP8Experts reads the padded row count on
the host: the contiguous layout is for prefill.
Masked: max_m is always a multiple of 128 (`masked_rows` rounds up). 0.1.4 asserts max_m % BLOCK_M == 0
only past one block (BLOCK_M 64 or 128, picked from expected_m), yet with fewer rows than BLOCK_M its
tiles of one expert read and write the next experts' rows: on the H100, masked layouts of 1 and 37 rows
gave wrong outputs, 64, 128 and 384 right ones (docs/runs/2026-12-06-moe-h100.md). masked_m stays on the
device, so decode under CUDA graphs works.

Each call goes through DeepGEMM's own Python launch (JIT-compiled per shape on first use); the relaunch
from C++ that backends/deepgemm.py does for dense layers is not done here.
"""

from __future__ import annotations

import functools

import torch

from ..layouts import ScaleLayout
from . import bf16_epilogue, deepgemm

NAME = "deepgemm"
SCALE_LAYOUT = ScaleLayout.COL
DTYPES = (torch.float8_e4m3fn,)
CONTIGUOUS_ALIGN = 128
#: Masked-layout rows per expert come in multiples of this (DeepGEMM's largest masked BLOCK_M).
_MASKED_ROWS_MULTIPLE = 128

#: (contiguous, masked, alignment) function names of each API generation.
_API_NAMES = {
    "current": ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
                "get_mk_alignment_for_contiguous_layout"),
    "legacy": ("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
               "get_m_alignment_for_contiguous_layout"),
}


@functools.lru_cache(maxsize=None)
def _api() -> "tuple[object | None, object | None, object | None, str]":
    """(contiguous GEMM, masked GEMM, alignment getter, "current" | "legacy") or (None, None, None, why not)."""
    try:
        import deep_gemm
    except Exception as exc:  # ImportError, or its own import-time failures
        return None, None, None, f"deep_gemm not importable ({type(exc).__name__}: {exc})"
    for what, names in _API_NAMES.items():
        if all(hasattr(deep_gemm, n) for n in names):
            return (*(getattr(deep_gemm, n) for n in names), what)
    return None, None, None, ("deep_gemm has neither m_grouped_fp8_gemm_nt_contiguous/_masked nor "
                              "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous/_masked")


def api_name() -> str:
    """'current', 'legacy', or the reason DeepGEMM's grouped GEMMs are unavailable."""
    return _api()[3]


def grouped_unsupported_reason(E: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                               grouping: str) -> "str | None":
    if grouping == "indexed":
        return "DeepGEMM's grouped GEMMs read rows already grouped (contiguous or masked), not through an index"
    why = deepgemm.unsupported_reason(1, N, K, dtype, device)  # the dense GEMM's needs: device, sm90, N, K
    if why is not None:
        return why
    contiguous, masked, alignment, what = _api()
    if contiguous is None:
        return what
    if grouping == "contiguous" and alignment() != CONTIGUOUS_ALIGN:
        return (f"DeepGEMM asks for contiguous segments of {alignment()} rows; this backend pads to "
                f"{CONTIGUOUS_ALIGN}")
    return None


def masked_rows(max_m: int) -> int:
    """max_m rounded up to a multiple of 128 (module docstring)."""
    return max(1, -(-max_m // _MASKED_ROWS_MULTIPLE)) * _MASKED_ROWS_MULTIPLE


def prepare_grouped_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight fp8 [E, N, K] and weight_scale_inv fp32 [E, N/128, K/128], both contiguous (a copy only if
    they were not)."""
    return weight.contiguous(), weight_scale_inv.float().contiguous()


def grouped_gemm_contiguous(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                            m_indices: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """q fp8 [M_all, K], s fp32 `col` over M_all rows, m_indices int32 [M_all] -> y [M_all, N] in out_dtype."""
    weight, weight_scale_inv = prepared
    out = torch.empty((q.shape[0], weight.shape[1]), dtype=torch.bfloat16, device=q.device)
    if q.shape[0] == 0:
        return out.to(out_dtype)
    contiguous = _api()[0]
    contiguous((q, s), (weight, weight_scale_inv), out, m_indices)
    return bf16_epilogue(out, None, out_dtype)


def grouped_gemm_masked(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                        masked_m: torch.Tensor, expected_m: int, out_dtype: torch.dtype) -> torch.Tensor:
    """q fp8 [E, max_m, K], s fp32 `col` [E, max_m, K/128], masked_m int32 [E] -> y [E, max_m, N]."""
    weight, weight_scale_inv = prepared
    E, max_m = q.shape[0], q.shape[1]
    out = torch.empty((E, max_m, weight.shape[1]), dtype=torch.bfloat16, device=q.device)
    masked = _api()[1]
    masked((q, s), (weight, weight_scale_inv), out, masked_m, max(1, min(int(expected_m), max_m)))
    return bf16_epilogue(out, None, out_dtype)
