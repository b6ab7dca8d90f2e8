"""Grouped reference backend: per expert, dequantize and matmul in fp32 (fp8linear.backends.GroupedBackend).

The CPU path of FP8Experts and the oracle of the grouped GEMM tests. Each expert's rows go through the
dense reference GEMM (`fp8linear.backends.reference.gemm`) on exactly the rows of that expert, so an
expert's output equals FP8Linear(backend="reference") on the same quantized rows bit for bit: the same
function on operands of the same shapes. Reads the per-expert counts on the host (it is an oracle,
not a kernel); rows it does not compute are zeros. On a CPU it dequantizes the weights once, in
`prepare_grouped_weight`, as the dense reference does (4 bytes an element: the price of a fast CPU path);
on a GPU, where it is the oracle beside the grouped kernels, each call dequantizes the experts it
uses, so GPU memory holds the fp8 weights alone (DeepSeek-V3's 256 experts would take 45 GB in fp32).
"""

from __future__ import annotations

import torch

from ..layouts import ScaleLayout
from . import SortedPairs, reference

NAME = "reference"
SCALE_LAYOUT = ScaleLayout.ROW
DTYPES = (torch.float8_e4m3fn, torch.int8)
CONTIGUOUS_ALIGN = 1


def grouped_unsupported_reason(E: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                               grouping: str) -> "str | None":
    return None  # any shape, any device, every layout


def masked_rows(max_m: int) -> int:
    return max_m


Prepared = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


def prepare_grouped_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> Prepared:
    """(weight [E, N, K], weight_scale_inv fp32 [E, ceil(N/128), ceil(K/128)]) -> on a CPU fp32 [E, N, K], each
    expert's weight dequantized as the dense reference's `prepare_weight` does it; elsewhere the pair as
    given (dequantized per call, module docstring)."""
    if weight.device.type != "cpu":
        return weight, weight_scale_inv
    return torch.stack([reference.prepare_weight(weight[e], weight_scale_inv[e]) for e in range(weight.shape[0])])


def _expert_weight(prepared: Prepared, e: int) -> torch.Tensor:
    """Expert e's dequantized fp32 weight [N, K]."""
    if isinstance(prepared, tuple):
        return reference.prepare_weight(prepared[0][e], prepared[1][e])
    return prepared[e]


def _shape(prepared: Prepared) -> tuple[int, int]:
    """(E, N)."""
    w = prepared[0] if isinstance(prepared, tuple) else prepared
    return w.shape[0], w.shape[1]


def _on_host(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as int64 on the CPU: the one host read of each call, refused while a CUDA graph is captured."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"the grouped reference backend reads {name} on the host, which a CUDA graph cannot "
                           "capture; capture FP8Experts with backend='triton' or 'deepgemm', or run the model "
                           "eagerly (fp8linear generate --eager)")
    return t.detach().to("cpu", torch.int64)


def segments(m_indices: torch.Tensor, E: int) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every non-empty segment of a contiguous layout, read on the host.

    Raises ValueError when an expert's rows are not one consecutive segment (the layout's contract) or an
    index is outside [-1, E)."""
    m = _on_host(m_indices, "m_indices")
    if m.numel() and (int(m.min()) < -1 or int(m.max()) >= E):
        raise ValueError(f"m_indices must hold experts in [0, {E}) or -1; got values in "
                         f"[{int(m.min())}, {int(m.max())}]")
    out = []
    for e in torch.unique(m[m >= 0]).tolist():
        rows = (m == e).nonzero().squeeze(1)
        first, end = int(rows[0]), int(rows[-1]) + 1
        if end - first != rows.numel():
            raise ValueError(f"m_indices: the rows of expert {e} are not one consecutive segment (rows {first}.."
                             f"{end - 1} hold {rows.numel()} of them)")
        out.append((e, first, end))
    return out


def grouped_gemm_contiguous(q: torch.Tensor, s: torch.Tensor, prepared: Prepared, m_indices: torch.Tensor,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """q [M_all, Kp], s fp32 [M_all, Kp/128] row-major, prepared from `prepare_grouped_weight`, m_indices int32
    [M_all] -> y [M_all, N] in out_dtype."""
    E, N = _shape(prepared)
    y = torch.zeros((q.shape[0], N), dtype=out_dtype, device=q.device)
    for e, first, end in segments(m_indices, E):
        y[first:end] = reference.gemm(q[first:end], s[first:end], _expert_weight(prepared, e), out_dtype, None)
    return y


def grouped_gemm_masked(q: torch.Tensor, s: torch.Tensor, prepared: Prepared, masked_m: torch.Tensor,
                        expected_m: int, out_dtype: torch.dtype) -> torch.Tensor:
    """q [E, max_m, Kp], s fp32 [E, max_m, Kp/128] row-major, prepared from `prepare_grouped_weight`, masked_m
    int32 [E] -> y [E, max_m, N]."""
    E, max_m, N = q.shape[0], q.shape[1], _shape(prepared)[1]
    counts = _on_host(masked_m, "masked_m").tolist()
    if any(c < 0 or c > max_m for c in counts):
        raise ValueError(f"masked_m must lie in [0, max_m={max_m}]; got {counts}")
    y = torch.zeros((E, max_m, N), dtype=out_dtype, device=q.device)
    for e, n in enumerate(counts):
        if n:
            y[e, :n] = reference.gemm(q[e, :n], s[e, :n], _expert_weight(prepared, e), out_dtype, None)
    return y


def grouped_gemm_indexed(q: torch.Tensor, s: torch.Tensor, prepared: Prepared, pairs: SortedPairs, rows: str,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """rows="gather": q [T, Kp], s fp32 [T, Kp/128] row-major -> y [S, N] in sorted order; rows="scatter":
    q [S, Kp] in sorted order -> y [S, N] in pair order (fp8linear.backends.IndexedGroupedBackend). Rows it
    does not compute are zeros."""
    if rows not in ("gather", "scatter"):
        raise ValueError(f"rows must be 'gather' or 'scatter'; got {rows!r}")
    E, N = _shape(prepared)
    perm = pairs.perm.to(q.device)
    bounds = _on_host(pairs.bounds, "the pairs' bounds").tolist()
    S = perm.numel()
    if len(bounds) != E + 1 or any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[0] < 0 or bounds[-1] > S:
        raise ValueError(f"pairs.bounds must be {E + 1} non-decreasing positions in [0, {S}]; got {bounds}")
    y = torch.zeros((S, N), dtype=out_dtype, device=q.device)
    for e in range(E):
        first, end = bounds[e], bounds[e + 1]
        if first == end:
            continue
        if rows == "gather":
            src = torch.div(perm[first:end], pairs.top_k, rounding_mode="floor")
            y[first:end] = reference.gemm(q[src], s[src], _expert_weight(prepared, e), out_dtype, None)
        else:
            y[perm[first:end]] = reference.gemm(q[first:end], s[first:end], _expert_weight(prepared, e), out_dtype,
                                                None)
    return y
