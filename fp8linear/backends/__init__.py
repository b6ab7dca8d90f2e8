"""Blockwise GEMM backends: one protocol, one module per backend, and `select()`.

Every backend computes, for activations quantized per 1 x 128 group and weights per 128 x 128 block,

    y[M, N] = (q * s)[M, K] @ (weight * weight_scale_inv)^T[K, N]  (+ bias),  accumulated in fp32

and is a module satisfying `Backend` below (STYLE.md 11). What differs between backends is declared, not
discovered at call sites: the scale layout it reads (or None when it quantizes inside its own kernel and
cannot take q/s from outside), the row alignment of q and s, the element types, the largest M it serves.
`FP8Linear` is the one caller that reads those declarations (fp8linear.linear); modules built on it
(FP8GatedMLP, FP8RMSNorm) go through FP8Linear's public `input_layout` / `forward_quantized` /
`offer_quantized`, never through a backend.

The names (each a `fp8linear.config.Backend` value; old names are accepted as aliases, see there):

    reference    dequantize and fp32 matmul, any device (the CPU path and the tests' oracle)
    deepgemm     DeepGEMM's SM90 FP8 GEMM (legacy or current API by feature detection)
    cublaslt     cuBLASLt's blockwise FP8 GEMM (BlockWise1x128 x BlockWise128x128)
    triton       fp8linear's Triton GEMM, fp8 and int8, any N and K
    fused_mma    fp8linear's CUDA kernel for M <= 16: quantization fused into an mma.sync GEMM
    fused_wgmma  fp8linear's Hopper GEMM (wgmma, TMA) quantizing x inside the same kernel
    auto         per shape from measurements on this card (fp8linear.backends.auto)

Asking for a backend by name that cannot serve a shape raises `BackendUnsupportedError` with the
reason: there is no silent fallback. Only `auto` falls back, in the order of `FALLBACK_ORDER`.

Grouped GEMMs (mixture-of-experts) follow `GroupedBackend`: the same weights and scales with a leading
expert dimension, the activations in one of three layouts (GROUPINGS): expert-sorted rows with a per-row
expert index (contiguous, for prefill) or [E, max_m, K] with a per-expert row count (masked, for decode
under CUDA graphs), as DeepGEMM's `m_grouped_*` GEMMs take them (DESIGN.md "Mixture of experts"), or the
(token, slot) pairs sorted by expert and read and written through their order (indexed: no copies, no
host synchronisation, as the serving engines' fused-MoE kernels run). Three serve it, each in its own
module: reference (grouped_reference), triton (triton_grouped), deepgemm (deepgemm_grouped);
`select_grouped` chooses, as `select` does for dense layers.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Protocol, runtime_checkable

import torch

from ..config import Backend as BackendName
from ..layouts import ScaleLayout
from ..ops import quantize_for_gemm

__all__ = [
    "Backend",
    "QuantizedInputBackend",
    "GroupedBackend",
    "IndexedGroupedBackend",
    "PairwiseGroupedBackend",
    "SortedPairs",
    "GROUPINGS",
    "NAMES",
    "FALLBACK_ORDER",
    "BackendUnsupportedError",
    "get",
    "unsupported_reason",
    "device_unsupported_reason",
    "select",
    "padded_k",
    "GROUPED_NAMES",
    "get_grouped",
    "grouped_unsupported_reason",
    "select_grouped",
]


@runtime_checkable
class Backend(Protocol):
    """What every backend module provides. Shapes: x2d / q [M, Kp] with Kp = ceil(K/128) * 128 (FP8Linear
    pads x with zero columns; fp8linear.linear), weight [N, K] fp8 e4m3 or int8, weight_scale_inv fp32
    [ceil(N/128), ceil(K/128)], bias [N] (any float dtype) or None, y [M, N] in out_dtype.
    No entry point synchronises with the host (CUDA-graph capture and torch.compile must work)."""

    #: Its name in `FP8Linear(backend=...)`.
    NAME: str
    #: The layout (fp8linear.layouts) in which `gemm` reads activation scales (QuantizedInputBackend);
    #: None for a backend that quantizes inside its own kernel and has no `gemm` on (q, s).
    SCALE_LAYOUT: "ScaleLayout | None"
    #: q and s need storage for a multiple of this many rows (cuBLASLt reads 4-row tiles); rows M..M_pad-1
    #: are allocated, left unwritten, and their rows of y are dropped by the caller.
    ROW_ALIGN: int
    #: Element types of weights and activations it multiplies.
    DTYPES: "tuple[torch.dtype, ...]"
    #: The largest M it serves, or None for any.
    MAX_M: "int | None"

    def unsupported_reason(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
        """Beyond DTYPES and MAX_M (checked by `fp8linear.backends.unsupported_reason`): None when it can
        serve [M, K] x [N, K]^T on `device`, else why not ("needs sm90", "N % 64 != 0", ...)."""

    def prepare_weight(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> Any:
        """Once per weight (FP8Linear caches the result until the weight changes)."""

    def linear(self, x2d: torch.Tensor, prepared: Any, bias: "torch.Tensor | None", out_dtype: torch.dtype,
               dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
        """The whole forward from unquantized x2d [M, Kp] (unit stride along K) to y [M, N]: quantize per
        1x128 group to `dtype` (bit for bit `per_token_group_quant`) and multiply, in as few launches as
        the backend has (one op call where it fuses them)."""



@runtime_checkable
class QuantizedInputBackend(Backend, Protocol):
    """A backend whose SCALE_LAYOUT is not None also multiplies activations quantized elsewhere (by
    FP8RMSNorm's or FP8GatedMLP's fused kernels, through FP8Linear.forward_quantized)."""

    def gemm(self, q: torch.Tensor, s: torch.Tensor, prepared: Any, out_dtype: torch.dtype,
             bias: "torch.Tensor | None") -> torch.Tensor:
        """y [rows of q, N] from q [M_pad, Kp] contiguous and s in SCALE_LAYOUT over M_pad rows (M_pad a
        multiple of ROW_ALIGN)."""


@runtime_checkable
class GroupedBackend(Protocol):
    """What a grouped (mixture-of-experts) GEMM backend provides: E experts of the same [N, K].

    weight [E, N, K] fp8 e4m3 or int8, weight_scale_inv fp32 [E, ceil(N/128), ceil(K/128)]; activations
    quantized per 1x128 group, q with Kp = ceil(K/128) * 128 columns (zero columns past K), scales s in
    SCALE_LAYOUT (3-D for the masked layout: `fp8linear.layouts.empty_scales((E,), max_m, Kp/128, ...)`).
    y[row] = dequant(q[row]) @ dequant(weight[expert of row])^T, accumulated in fp32, in out_dtype.

    Contiguous layout (prefill): rows sorted by expert, each expert's rows one consecutive segment
    (experts in increasing order), each segment's length a multiple of CONTIGUOUS_ALIGN; `m_indices`
    gives every row's expert. The padding rows that complete a segment carry that segment's expert (what
    DeepGEMM 0.1.4 reads: the id of the first row of each aligned block); rows after the last segment
    carry -1. Outputs of padding and -1 rows are unspecified.
    Masked layout (decode, CUDA graphs): q [E, max_m, Kp] with max_m = masked_rows(rows needed), the
    first masked_m[e] rows of expert e valid; the host never reads masked_m, so shapes stay fixed.
    Indexed layout (any size, CUDA graphs): `IndexedGroupedBackend`, where a backend serves it.

    No entry point synchronises with the host, except the reference backend's (CPU oracle).
    fp8linear.moe.FP8Experts is the caller; `select_grouped` chooses the module.
    """

    #: Its name in `FP8Experts(backend=...)` (the dense backend of the same name computes the same product).
    NAME: str
    #: The layout in which the grouped GEMMs read activation scales.
    SCALE_LAYOUT: ScaleLayout
    #: Element types of weights and activations it multiplies.
    DTYPES: "tuple[torch.dtype, ...]"
    #: Rows each expert's segment is padded to in the contiguous layout (DeepGEMM's
    #: get_mk_alignment_for_contiguous_layout(); 1 where the backend needs no padding). Above 1, building
    #: the layout needs the per-expert counts on the host (one synchronisation): prefill only.
    CONTIGUOUS_ALIGN: int

    def grouped_unsupported_reason(self, E: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                                   grouping: str) -> "str | None":
        """grouping is "contiguous" or "masked"; None when the backend serves it, else why not."""

    def masked_rows(self, max_m: int) -> int:
        """Rows per expert to allocate in the masked layout for at most max_m valid rows (>= max_m)."""

    def prepare_grouped_weight(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> Any:
        """Once per weight (FP8Experts caches the result until the weight changes)."""

    def grouped_gemm_contiguous(self, q: torch.Tensor, s: torch.Tensor, prepared: Any, m_indices: torch.Tensor,
                                out_dtype: torch.dtype) -> torch.Tensor:
        """q [M_all, Kp] contiguous, s over M_all rows in SCALE_LAYOUT, m_indices int32 [M_all] -> y [M_all, N]."""

    def grouped_gemm_masked(self, q: torch.Tensor, s: torch.Tensor, prepared: Any, masked_m: torch.Tensor,
                            expected_m: int, out_dtype: torch.dtype) -> torch.Tensor:
        """q [E, max_m, Kp] contiguous, s [E, max_m, Kp/128] in SCALE_LAYOUT, masked_m int32 [E] (read on
        the device only), expected_m a hint for tile choice (> 0) -> y [E, max_m, N]."""


@runtime_checkable
class IndexedGroupedBackend(GroupedBackend, Protocol):
    """A grouped backend that also serves the indexed layout (grouped_unsupported_reason(..., "indexed")
    is None for the shapes it serves): the gather of each token's row and the scatter of each pair's
    output happen inside its GEMMs."""

    def grouped_gemm_indexed(self, q: torch.Tensor, s: torch.Tensor, prepared: Any, pairs: "SortedPairs",
                             rows: str, out_dtype: torch.dtype) -> torch.Tensor:
        """rows="gather": q [T, Kp] (a row per token), s [T, Kp/128] in SCALE_LAYOUT -> y [S, N], row p the
        product for sorted position p (rows of pairs naming no expert unspecified); rows="scatter": q [S, Kp]
        in sorted order, s [S, Kp/128] -> y [S, N], row t * top_k + j the product for pair (t, j), zeros for
        pairs naming no expert."""


@runtime_checkable
class PairwiseGroupedBackend(IndexedGroupedBackend, Protocol):
    """An indexed backend that also runs each (token, slot) pair through its expert without sorting the
    pairs, and the down GEMM with the routing weights' combine inside: FP8Experts takes it up to
    PAIRWISE_MAX_PAIRS pairs (an eager decode step, bound by its launches). Per row, the same bits as its
    indexed GEMMs (the same tiles)."""

    #: The most pairs (T * k) FP8Experts runs through grouped_gemm_pairwise.
    PAIRWISE_MAX_PAIRS: int

    def grouped_gemm_pairwise(self, q: torch.Tensor, s: torch.Tensor, prepared: Any, top_k_index: torch.Tensor,
                              rows: str, out_dtype: torch.dtype,
                              combine_weights: "torch.Tensor | None" = None) -> torch.Tensor:
        """rows="tokens": q [T, Kp], s [T, Kp/128] in SCALE_LAYOUT -> y [T * k, N], row t * k + j the product
        for pair (t, j); rows="pairs": q [T * k, Kp] (a row per pair) -> y [T * k, N], or with
        combine_weights [T, k] the [T, N] of fp8linear.moe_combine.combine_slots over those rows. Pairs
        naming no expert give zero rows."""


@dataclasses.dataclass(frozen=True)
class SortedPairs:
    """The indexed layout of one forward: the S = T * top_k (token, slot) pairs, flattened t * top_k + j,
    sorted by their expert (stably: tokens in order within an expert).

    perm    int64 [S]: sorted position -> pair
    bounds  int32 [E + 1]: expert e's pairs sit at positions [bounds[e], bounds[e+1]); positions before
            bounds[0] and from bounds[E] on are pairs naming no expert in [0, E) (they sort first or last)
    top_k   k: pair p belongs to token p // top_k
    """

    perm: torch.Tensor
    bounds: torch.Tensor
    top_k: int

    @classmethod
    def of(cls, top_k_index: torch.Tensor, E: int) -> "SortedPairs":
        """From top_k_index [T, k] (any integer dtype) over E experts: one sort and one search on the
        device, no host synchronisation."""
        T, k = top_k_index.shape
        sorted_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        experts = torch.arange(E + 1, dtype=sorted_ids.dtype, device=sorted_ids.device)
        return cls(perm, torch.searchsorted(sorted_ids, experts, out_int32=True), k)


#: Backend name -> module implementing `Backend`. `auto` is a chooser, not a GEMM.
_MODULES = {
    "reference": "fp8linear.backends.reference",
    "deepgemm": "fp8linear.backends.deepgemm",
    "cublaslt": "fp8linear.backends.cublaslt",
    "triton": "fp8linear.backends.triton_blockwise",
    "fused_mma": "fp8linear.backends.small_m",
    "fused_wgmma": "fp8linear.backends.sm90",
}
NAMES = ("auto", *_MODULES)

#: Grouped (mixture-of-experts) backend name -> module implementing `GroupedBackend`. Names are those of
#: the dense backends computing the same product; `auto` picks the first of GROUPED_ORDER that serves.
_GROUPED_MODULES = {
    "reference": "fp8linear.backends.grouped_reference",
    "triton": "fp8linear.backends.triton_grouped",
    "deepgemm": "fp8linear.backends.deepgemm_grouped",
}
GROUPED_NAMES = ("auto", *_GROUPED_MODULES)
#: The grouped layouts (GroupedBackend): every backend serves the first two, some the third.
GROUPINGS = ("contiguous", "masked", "indexed")
#: `auto`'s order for grouped GEMMs on a GPU, per layout: DeepGEMM where it serves (contiguous, masked),
#: then our Triton kernel, which alone serves the indexed layout FP8Experts prefers (faster than DeepGEMM's
#: grouped GEMMs with their gathers at every point measured, docs/runs/2026-12-06-moe-indexed-h100.md); on a
#: CPU `auto` is the reference.
GROUPED_ORDER = ("deepgemm", "triton", "reference")

#: What `auto` tries, in this order, when its table (or heuristic) names no backend that can serve a
#: shape: triton serves every shape and dtype on a GPU with Triton; reference serves everything, slowly.
FALLBACK_ORDER = ("cublaslt", "deepgemm", "triton", "reference")

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


def quantize_then_gemm(gemm, layout: ScaleLayout, row_align: int, x2d: torch.Tensor, prepared: Any,
                       bias: "torch.Tensor | None", out_dtype: torch.dtype, dtype: torch.dtype,
                       scale_ue8m0: bool) -> torch.Tensor:
    """`Backend.linear` for a backend whose product is its `gemm` on (q, s): one op call allocates q and s in
    `layout` over M_pad = ceil(M / row_align) * row_align rows and quantizes rows 0..M-1
    (fp8linear.ops.quantize_for_gemm), then `gemm`; y's padding rows are dropped."""
    M = x2d.shape[0]
    q, s = quantize_for_gemm(x2d, GROUP, dtype, scale_ue8m0, layout, row_align)
    y = gemm(q, s, prepared, out_dtype, bias)  # [M or M_pad, N]
    return y if y.shape[0] == M else y[:M]


def canonical_name(name: "str | BackendName") -> str:
    """The backend's current name for a name or documented alias (fp8linear.config.Backend.parse)."""
    return BackendName.parse(name).value


def get(name: str) -> types.ModuleType:
    """The module of a GEMM backend by name or alias (imports it; importing never touches the GPU)."""
    name = canonical_name(name)
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in _MODULES)}; got {name!r}")
    return importlib.import_module(_MODULES[name])


def unsupported_reason(name: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    """None when backend `name` can serve [M, K] x [N, K]^T in `dtype` on `device`; else why not."""
    try:
        module = get(name)
    except ImportError as exc:  # a backend module itself failing to import is a reason, not a crash
        return f"not importable: {exc}"
    if dtype not in module.DTYPES:
        return f"dtype {dtype} is not one of {', '.join(str(d) for d in module.DTYPES)}"
    if module.MAX_M is not None and M > module.MAX_M:
        return f"M={M} > {module.MAX_M} (the largest M it serves)"
    return module.unsupported_reason(M, N, K, dtype, torch.device(device))


def device_unsupported_reason(name: str, dtype: torch.dtype, device: "torch.device | str") -> "str | None":
    """None when backend `name` can serve `dtype` on `device` for some layer; else why it never can (the
    library missing, the wrong GPU, a CPU): for checking a request before loading a model, where the
    layers' shapes are not known yet. Shape reasons are left to `unsupported_reason` at the first forward."""
    name = canonical_name(name)
    if name == "auto":
        return None
    # M = 1 and a 1024 x 1024 layer: a shape every backend's alignment rules accept.
    return unsupported_reason(name, 1, 1024, 1024, dtype, torch.device(device))


def select(name: str, M: int, N: int, K: int, dtype: torch.dtype, device: "torch.device | str") -> types.ModuleType:
    """The backend module that will compute this GEMM.

    `name` is a `Backend` value or alias. "auto" asks `fp8linear.backends.auto.choose` (measured table or
    heuristic, then FALLBACK_ORDER by availability). Any other name must be able to serve the shape,
    else BackendUnsupportedError names the backend, the shape and the reason.
    """
    device = torch.device(device)
    name = canonical_name(name)
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


# -- grouped (mixture-of-experts) GEMMs -----------------------------------------------------------------

def get_grouped(name: str) -> types.ModuleType:
    """The module of a grouped GEMM backend by name or alias (imports it; importing never touches the GPU)."""
    name = canonical_name(name)
    if name not in _GROUPED_MODULES:
        raise ValueError(f"grouped backend must be one of {', '.join(repr(n) for n in _GROUPED_MODULES)} "
                         f"(or 'auto'); got {name!r}, which has no grouped GEMM")
    return importlib.import_module(_GROUPED_MODULES[name])


def grouped_unsupported_reason(name: str, E: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                               grouping: str) -> "str | None":
    """None when grouped backend `name` can serve E experts of [N, K] in `dtype` on `device` in `grouping`
    (one of GROUPINGS); else why not."""
    try:
        module = get_grouped(name)
    except ImportError as exc:
        return f"not importable: {exc}"
    if dtype not in module.DTYPES:
        return f"dtype {dtype} is not one of {', '.join(str(d) for d in module.DTYPES)}"
    return module.grouped_unsupported_reason(E, N, K, dtype, torch.device(device), grouping)


def select_grouped(name: str, E: int, N: int, K: int, dtype: torch.dtype, device: "torch.device | str",
                   grouping: str) -> types.ModuleType:
    """The grouped backend module that will compute E experts of [N, K] in `grouping`.

    "auto": the reference on a CPU; on a GPU the first of GROUPED_ORDER that serves. Any other name must
    serve, else BackendUnsupportedError names the backend, the shape and the reason.
    """
    device = torch.device(device)
    name = canonical_name(name)
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(repr(g) for g in GROUPINGS)}; got {grouping!r}")
    if name == "auto":
        order = ("reference",) if device.type == "cpu" else GROUPED_ORDER
        for candidate in order:
            if grouped_unsupported_reason(candidate, E, N, K, dtype, device, grouping) is None:
                return get_grouped(candidate)
        raise BackendUnsupportedError(f"no grouped backend serves E={E}, N={N}, K={K}, dtype={dtype} on {device}")
    why = grouped_unsupported_reason(name, E, N, K, dtype, device, grouping)
    if why is not None:
        raise BackendUnsupportedError(
            f"backend={name!r} cannot serve the {grouping} grouped GEMM of E={E} experts, N={N}, K={K}, "
            f"dtype={dtype} on {device}: {why}. Use backend='auto' or another grouped backend "
            f"({', '.join(repr(n) for n in _GROUPED_MODULES)})"
        )
    return get_grouped(name)
