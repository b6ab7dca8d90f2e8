"""Grouped Triton backend: fp8linear's blockwise GEMM over E experts, fp8 and int8, any E, N and K.

What it computes (fp8linear.backends.GroupedBackend): for every row r of the grouped activations q (`row`
scales s, one per row and 128-column group) and its expert e(r),

    y[r, n] = sum_kb  s[r, kb] * weight_scale_inv[e, n // 128, kb] * sum_{k in block kb} q[r, k] * weight[e, n, k]

One kernel serves the three layouts: one [BLOCK_M, BLOCK_N] output tile per program, a loop over 128-wide K
blocks, fp32 accumulation (exact int32 for int8), each tile holding rows of one expert only. The layout
is described to the kernel by per-group row ranges, and each program finds its own tile from them (a
prefix sum over the groups' tile counts, in registers): no tile list is built, no host synchronisation
happens, so CUDA graphs capture every layout.

    contiguous (m_indices [M_all]): expert e's rows are [bounds[e], bounds[e+1]), bounds found on the
        device with one searchsorted; no alignment needed; -1 rows after the last segment are skipped.
    masked (masked_m [E], q [E, max_m, Kp]): expert e's rows are [e * max_m, e * max_m + masked_m[e]).
    indexed (SortedPairs: perm [S], bounds [E + 1]): position p of the pairs sorted by expert belongs to
        expert e for bounds[e] <= p < bounds[e+1]. rows="gather": the tile reads q row perm[p] // top_k
        (the token: no gathered copy of the activations) and writes y row p; rows="scatter": reads q row
        p and writes y row perm[p] (the (token, slot) pair: no scatter afterwards), and writes zeros for
        the positions before bounds[0] and from bounds[E] on (pairs naming no expert).

    tiles: group by group, ceil(rows / BLOCK_M) each, the last one cut at the group's end; at most
           ceil(rows / BLOCK_M) + min(E, rows) of them (+ 2 zero groups when scattering). Programs walk
           GROUP_M consecutive tiles (those of one expert, mostly) across every column block before the
           next GROUP_M, so an expert's weight columns are read about once and the rows stay in L2.

pairwise (decode sizes, backends.PairwiseGroupedBackend; a second kernel): no sort; one program per
    (token, slot) pair and column block (rows="tokens" or "pairs"), or per token and column block with
    its k pairs and their combine (combine_weights: fp8linear.moe_combine's arithmetic). Each pair is a
    tile of the sorted layout's shape at that size holding one real row, so its row has the same bits.

Rows past a tile's end are masked on load and store: other experts' rows and -1 rows are never written
(their output is unspecified, as the protocol allows). Pointer offsets are 64-bit (E * N * K passes 2^31
at DeepSeek-V3's 256 experts of 4096 x 7168).

Tiles come from `config_for`, by the expected rows per expert (fixed per shape: no autotuning, which
would break CUDA-graph capture). Set TRITON_INTERPRET=1 to run it on CPU tensors with Triton's
interpreter (slow; tests only).
"""

# (no `from __future__ import annotations`: triton.jit reads the tl.constexpr annotations as objects)

import functools
import os

import torch

from ..layouts import ScaleLayout
from . import SortedPairs, triton_blockwise
from .triton_blockwise import tl, triton

try:
    from triton.language.extra import libdevice
except Exception:  # no triton, or a build without it: the pairwise kernel is then never compiled
    libdevice = None

NAME = "triton"
SCALE_LAYOUT = ScaleLayout.ROW
DTYPES = (torch.float8_e4m3fn, torch.int8)
CONTIGUOUS_ALIGN = 1
BLOCK_K = 128

# The kernel's LAYOUT argument.
_CONTIGUOUS, _MASKED, _GATHER, _SCATTER = 0, 1, 2, 3


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def grouped_unsupported_reason(E: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                               grouping: str) -> "str | None":
    return triton_blockwise.unsupported_reason(1, N, K, dtype, device)  # the same needs as the dense kernel


def masked_rows(max_m: int) -> int:
    return max_m


def prepare_grouped_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [E, N, K], weight_scale_inv fp32 [E, ceil(N/128), ceil(K/128)]), any strides: nothing copied."""
    return weight, weight_scale_inv


# -- the kernel ---------------------------------------------------------------------------------------
def _kernel_source(
    # pointers
    q_ptr, s_ptr, w_ptr, ws_ptr, y_ptr,
    groups_ptr,  # int32: bounds [E + 1] (contiguous, indexed) or masked_m [E] (masked)
    perm_ptr,  # int64 [S]: sorted position -> pair (indexed only)
    # sizes: y rows = q rows x w[e] [N, K]^T per tile
    num_tiles, E, rows, N, K, max_m, top_k,
    # strides, in elements
    stride_qm, stride_qk,
    stride_sm, stride_sk,
    stride_we, stride_wn, stride_wk,
    stride_wse, stride_wsn, stride_wsk,
    stride_ym, stride_yn,
    # compile-time
    LAYOUT: tl.constexpr, IS_INT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GROUPS_POW2: tl.constexpr,
):
    # Program -> (tile, column block): GROUP_M tiles at a time across every column block.
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first = (pid // width) * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    tile = first + (pid % width) % size
    pid_n = (pid % width) // size

    # Tile -> (group, first row, end row). Groups 0..E-1 are the experts; when scattering, group E holds
    # the positions from bounds[E] on and group E+1 those before bounds[0] (pairs naming no expert).
    g = tl.arange(0, GROUPS_POW2)
    if LAYOUT == 1:
        count = tl.load(groups_ptr + g, mask=g < E, other=0)
        lo = g * max_m
    else:
        lo = tl.load(groups_ptr + g, mask=g <= E, other=0)
        hi = tl.load(groups_ptr + g + 1, mask=g < E, other=0)
        if LAYOUT == 3:
            first_row = tl.load(groups_ptr)
            hi = tl.where(g == E, rows, tl.where(g == E + 1, first_row, hi))
            lo = tl.where(g == E + 1, 0, lo)
            count = tl.where(g <= E + 1, hi - lo, 0)
        else:
            count = tl.where(g < E, hi - lo, 0)
    n_tiles = (count + BLOCK_M - 1) // BLOCK_M
    end_tile = tl.cumsum(n_tiles, axis=0)
    group = tl.sum((end_tile <= tile).to(tl.int32), axis=0)
    if group >= GROUPS_POW2:  # past the last tile
        return
    here = g == group
    row0 = tl.sum(tl.where(here, lo + (tile - (end_tile - n_tiles)) * BLOCK_M, 0), axis=0)
    row_end = tl.sum(tl.where(here, lo + count, 0), axis=0)

    rm = row0 + tl.arange(0, BLOCK_M)  # [BM] rows (positions, when indexed) of this tile
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_ok = rm < row_end
    n_ok = rn < N
    a_rows = rm.to(tl.int64)
    y_rows = rm.to(tl.int64)
    if LAYOUT == 2:
        a_rows = tl.load(perm_ptr + rm, mask=m_ok, other=0) // top_k
    if LAYOUT == 3:
        y_rows = tl.load(perm_ptr + rm, mask=m_ok, other=0)
    y_ptrs = y_ptr + y_rows[:, None] * stride_ym + rn[None, :] * stride_yn
    y_mask = m_ok[:, None] & n_ok[None, :]
    if group >= E:  # scattering the pairs that name no expert: zeros
        tl.store(y_ptrs, tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32).to(y_ptr.dtype.element_ty), mask=y_mask)
        return

    expert = group.to(tl.int64)
    w_base = w_ptr + expert * stride_we
    ws_base = ws_ptr + expert * stride_wse
    q_ptrs = q_ptr + a_rows[:, None] * stride_qm + rk[None, :] * stride_qk  # [BM, BK]
    w_ptrs = w_base + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # [BK, BN]: w^T tile
    s_ptrs = s_ptr + a_rows * stride_sm  # [BM], column kb added per step
    ONE_WS_ROW: tl.constexpr = 128 % BLOCK_N == 0  # the tile sits in one weight-block row
    ws_row = ws_base + ((pid_n * BLOCK_N) // 128) * stride_wsn
    ws_cols = ws_base + (rn // 128) * stride_wsn  # [BN]

    # Plain arithmetic and builtins only (no tl.cdiv / tl.zeros): see triton_blockwise on the interpreter.
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // BLOCK_K
        k_ok = (k0 + rk) < K
        a = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_INT8:
            part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)  # exact: |sum| <= 128*128*128 < 2^31
        else:
            part = tl.dot(a, b, out_dtype=tl.float32)
        s_a = tl.load(s_ptrs + kb * stride_sk, mask=m_ok, other=0.0)  # [BM]
        if ONE_WS_ROW:
            s_w = tl.load(ws_row + kb * stride_wsk)  # scalar
            acc += part * (s_a[:, None] * s_w)
        else:
            s_w = tl.load(ws_cols + kb * stride_wsk, mask=n_ok, other=0.0)  # [BN]
            acc += part * (s_a[:, None] * s_w[None, :])
        q_ptrs += BLOCK_K * stride_qk
        w_ptrs += BLOCK_K * stride_wk

    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _pairwise_kernel_source(
    q_ptr, s_ptr, w_ptr, ws_ptr, y_ptr, ids_ptr, rw_ptr,
    N, K, E, top_k, slots,
    stride_qm, stride_sm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
    stride_it, stride_ij, stride_rt, stride_rj,
    A_ROWS_ARE_TOKENS: tl.constexpr, COMBINE: tl.constexpr, P_IS_FP32: tl.constexpr, INTERPRET: tl.constexpr,
    IS_INT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (unit, column block): a unit is one (token, slot) pair (slots == 1) or one token and
    # its top_k pairs (slots == top_k, COMBINE). Each pair is a BLOCK_M-row tile of which only row 0 is
    # real: the same dot shapes, K loop and scale order as _kernel_source's tiles of BLOCK_M rows, so each
    # row comes out bit for bit as there.
    unit = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row0 = tl.arange(0, BLOCK_M) == 0
    n_ok = rn < N
    ONE_WS_ROW: tl.constexpr = 128 % BLOCK_N == 0
    total = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for j in range(0, slots):
        pair = unit * slots + j
        token = pair // top_k
        expert = tl.load(ids_ptr + token * stride_it + (pair % top_k) * stride_ij).to(tl.int64)
        valid = (expert >= 0) & (expert < E)
        expert = tl.where(valid, expert, 0)
        a_row = token if A_ROWS_ARE_TOKENS else pair
        m_ok = tl.arange(0, BLOCK_M) < tl.where(valid, 1, 0)  # row 0, if the pair names an expert
        n_live = rn < tl.where(valid, N, 0)  # (comparisons, not `&` with a scalar: the interpreter's dtype)
        q_ptrs = q_ptr + a_row * stride_qm + tl.full((BLOCK_M, 1), 0, dtype=tl.int64) + rk[None, :]
        w_ptrs = w_ptr + expert * stride_we + rn[None, :] * stride_wn + rk[:, None]
        s_row = s_ptr + a_row * stride_sm + tl.full((BLOCK_M,), 0, dtype=tl.int64)
        ws_base = ws_ptr + expert * stride_wse
        ws_row = ws_base + ((tl.program_id(1) * BLOCK_N) // 128) * stride_wsn
        ws_cols = ws_base + (rn // 128) * stride_wsn
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // BLOCK_K
            k_ok = (k0 + rk) < K
            a = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_live[None, :], other=0.0)
            if IS_INT8:
                part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
            else:
                part = tl.dot(a, b, out_dtype=tl.float32)
            s_a = tl.load(s_row + kb, mask=m_ok, other=0.0)
            if ONE_WS_ROW:
                s_w = tl.load(ws_row + kb)
                acc += part * (s_a[:, None] * s_w)
            else:
                s_w = tl.load(ws_cols + kb, mask=n_ok, other=0.0)
                acc += part * (s_a[:, None] * s_w[None, :])
            q_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = acc.to(y_ptr.dtype.element_ty)  # the expert's output row in y's dtype (zeros for no expert)
        if COMBINE:  # fp8linear.moe_combine's arithmetic: P(y * w), an fp32 sum in slot order, rounded to P
            w = tl.load(rw_ptr + token * stride_rt + (pair % top_k) * stride_rj).to(tl.float32)
            if P_IS_FP32:
                if INTERPRET:
                    total += y.to(tl.float32) * w
                else:
                    total += libdevice.mul_rn(y.to(tl.float32), w)  # never contracted into an fma
            else:
                total += (y.to(tl.float32) * w).to(y_ptr.dtype.element_ty).to(tl.float32)
        else:
            tl.store(y_ptr + pair * stride_ym + rn[None, :] + tl.full((BLOCK_M, 1), 0, dtype=tl.int64), y,
                     mask=row0[:, None] & n_ok[None, :])
    if COMBINE:
        if not P_IS_FP32:
            total = total.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + unit * stride_ym + rn[None, :] + tl.full((BLOCK_M, 1), 0, dtype=tl.int64),
                 total.to(y_ptr.dtype.element_ty), mask=row0[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    # Jitted on first use (see triton_blockwise._kernel).
    return triton.jit(_kernel_source)


@functools.lru_cache(maxsize=2)
def _pairwise_kernel(interpret: bool):
    return triton.jit(_pairwise_kernel_source)


# -- the launch ---------------------------------------------------------------------------------------
def _launch(layout: int, q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
            groups: torch.Tensor, perm: "torch.Tensor | None", y: torch.Tensor, num_groups: int, busy_groups: int,
            max_m: int, top_k: int, cfg: dict) -> torch.Tensor:
    """The kernel over `groups` (int32 bounds or masked_m, module docstring) into the preallocated y
    [rows, N]. num_groups: groups the layout has; busy_groups: at most how many hold rows."""
    if q.dtype != weight.dtype:
        raise TypeError(f"q's dtype {q.dtype} must match the weight's {weight.dtype}")
    rows, N, K = y.shape[0], weight.shape[1], weight.shape[2]
    bm = cfg["BLOCK_M"]
    num_tiles = -(-rows // bm) + busy_groups if layout != _MASKED else num_groups * -(-max_m // bm)
    if rows == 0 or num_tiles == 0:
        return y
    # Plain integer arithmetic and one stride() per tensor: at decode sizes the host is the bottleneck, and
    # triton.cdiv / next_power_of_2 are jitted helpers that cost microseconds per call from Python.
    grid = (num_tiles * -(-N // cfg["BLOCK_N"]),)
    sq, ss, sw, sws, sy = q.stride(), s.stride(), weight.stride(), weight_scale_inv.stride(), y.stride()
    _kernel(_interpret())[grid](
        q, s, weight, weight_scale_inv, y, groups, perm if perm is not None else groups,
        num_tiles, weight.shape[0], rows, N, K, max_m, top_k,
        sq[0], sq[1], ss[0], ss[1], sw[0], sw[1], sw[2], sws[0], sws[1], sws[2], sy[0], sy[1],
        LAYOUT=layout, IS_INT8=q.dtype == torch.int8, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK_K,
        GROUP_M=cfg["GROUP_M"], GROUPS_POW2=1 << num_groups.bit_length(),  # the power of 2 >= num_groups + 1
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


#: Tiles by expected rows per expert, the first row whose bound holds: the fastest of scripts/tune_grouped.py's
#: candidates at nearly every point of both MoE shapes on the H100 (docs/benchmarks.md, "MoE layer"); from
#: 512 rows per expert (DeepSeek-V3 at 16384 tokens) 128-row tiles of two warpgroups win by 5-10%.
#: Triton multiplies BLOCK_M < 64 tiles with mma.sync and larger ones with wgmma, which round a 128-wide
#: block's fp8 sum differently: the 32-row band's outputs differ from the 64-row band's in the last bits
#: (within each band, every candidate's outputs were equal bit for bit: 64- and 128-row tiles agree).
_CONFIGS = (
    (16, dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)),
    (48, dict(BLOCK_M=32, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)),
    (384, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)),
    (None, dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4)),
)
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages")


def config_for(rows_per_expert: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """The tiles for about `rows_per_expert` rows in each expert's group (`_CONFIGS`)."""
    for bound, cfg in _CONFIGS:
        if bound is None or rows_per_expert <= bound:
            return dict(cfg)
    raise AssertionError("unreachable: the last row has no bound")


def _config(config: "dict | None", rows_per_expert: int, weight: torch.Tensor) -> dict:
    if config is None:
        return config_for(max(1, rows_per_expert), weight.shape[1], weight.shape[2], weight.dtype)
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}; it needs {CONFIG_KEYS}")
    return config


def grouped_gemm_contiguous(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                            m_indices: torch.Tensor, out_dtype: torch.dtype, config: "dict | None" = None) -> torch.Tensor:
    """q [M_all, Kp] fp8/int8, s fp32 [M_all, Kp/128] (`row`), m_indices int32 [M_all] -> y [M_all, N].
    `config` (CONFIG_KEYS) overrides the tiles (tests, tuning)."""
    weight, weight_scale_inv = prepared
    E, N = weight.shape[0], weight.shape[1]
    M_all = q.shape[0]
    # Segments in increasing expert order with -1 rows after the last: sorted once -1 reads as E.
    keys = torch.where(m_indices < 0, E, m_indices).to(torch.int32)
    bounds = torch.searchsorted(keys, torch.arange(E + 1, dtype=torch.int32, device=q.device), out_int32=True)
    y = torch.empty((M_all, N), dtype=out_dtype, device=q.device)
    cfg = _config(config, -(-M_all // E), weight)
    return _launch(_CONTIGUOUS, q, s, weight, weight_scale_inv, bounds, None, y, E, min(E, M_all), 0, 1, cfg)


def grouped_gemm_masked(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                        masked_m: torch.Tensor, expected_m: int, out_dtype: torch.dtype,
                        config: "dict | None" = None) -> torch.Tensor:
    """q [E, max_m, Kp], s fp32 [E, max_m, Kp/128] (`row`), masked_m int32 [E] -> y [E, max_m, N]."""
    weight, weight_scale_inv = prepared
    E, max_m, Kp = q.shape
    N = weight.shape[1]
    y = torch.empty((E * max_m, N), dtype=out_dtype, device=q.device)
    cfg = _config(config, min(expected_m, max_m), weight)
    _launch(_MASKED, q.reshape(E * max_m, Kp), s.reshape(E * max_m, -1), weight, weight_scale_inv,
            masked_m.to(torch.int32), None, y, E, E, max_m, 1, cfg)
    return y.view(E, max_m, N)


def grouped_gemm_indexed(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                         pairs: SortedPairs, rows: str, out_dtype: torch.dtype,
                         config: "dict | None" = None) -> torch.Tensor:
    """rows="gather": q [T, Kp] (one row per token), s fp32 [T, Kp/128] -> y [S, N] in sorted order;
    rows="scatter": q [S, Kp] in sorted order, s [S, Kp/128] -> y [S, N] in pair order, zeros for pairs
    naming no expert (fp8linear.backends.SortedPairs)."""
    weight, weight_scale_inv = prepared
    E, N = weight.shape[0], weight.shape[1]
    S = pairs.perm.numel()
    if rows not in ("gather", "scatter"):
        raise ValueError(f"rows must be 'gather' or 'scatter'; got {rows!r}")
    y = torch.empty((S, N), dtype=out_dtype, device=q.device)
    cfg = _config(config, -(-S // E), weight)
    if rows == "gather":
        return _launch(_GATHER, q, s, weight, weight_scale_inv, pairs.bounds, pairs.perm, y, E, min(E, S), 0,
                       pairs.top_k, cfg)
    return _launch(_SCATTER, q, s, weight, weight_scale_inv, pairs.bounds, pairs.perm, y, E + 2, min(E, S) + 2, 0,
                   pairs.top_k, cfg)


#: Up to this many (token, slot) pairs FP8Experts runs the pairwise GEMMs (decode: no sort, the combine
#: inside the down GEMM; two launches fewer, which is what an eager step of a few tokens is bound by).
#: Beyond, pairs of one expert share its weight tiles only in the sorted layout.
PAIRWISE_MAX_PAIRS = 32


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def grouped_gemm_pairwise(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                          top_k_index: torch.Tensor, rows: str, out_dtype: torch.dtype,
                          combine_weights: "torch.Tensor | None" = None) -> torch.Tensor:
    """Each (token, slot) pair of top_k_index [T, k] through its expert, unsorted (PairwiseGroupedBackend).
    rows="tokens": q [T, Kp], s [T, Kp/128] -> y [T * k, N], row t * k + j for pair (t, j); rows="pairs":
    q [T * k, Kp] (a row per pair), s [T * k, Kp/128] -> y [T * k, N], or with combine_weights [T, k] the
    combined [T, N] (fp8linear.moe_combine's arithmetic). Pairs naming no expert give zero rows."""
    weight, weight_scale_inv = prepared
    E, N, K = weight.shape
    T, k = top_k_index.shape
    if rows not in ("tokens", "pairs"):
        raise ValueError(f"rows must be 'tokens' or 'pairs'; got {rows!r}")
    if q.dtype != weight.dtype:
        raise TypeError(f"q's dtype {q.dtype} must match the weight's {weight.dtype}")
    combine = combine_weights is not None
    P = torch.promote_types(out_dtype, combine_weights.dtype) if combine else out_dtype
    if combine and (rows != "pairs" or tuple(combine_weights.shape) != (T, k) or P not in (torch.float32, out_dtype)):
        raise ValueError(f"combine_weights must be [T, k] = {[T, k]} with rows='pairs', and promote with out_dtype "
                         f"{out_dtype} to it or to float32; got {combine_weights.dtype} "
                         f"{list(combine_weights.shape)} with rows={rows!r}")
    units, slots = (T, k) if combine else (T * k, 1)
    y = torch.empty((units, N), dtype=out_dtype, device=q.device)
    if units == 0 or N == 0:
        return y
    q, s = _unit_inner_stride(q), _unit_inner_stride(s)
    weight, weight_scale_inv = _unit_inner_stride(weight), _unit_inner_stride(weight_scale_inv)
    rw = combine_weights if combine else top_k_index
    cfg = _config(None, -(-(T * k) // E), weight)  # grouped_gemm_indexed's tiles here: the same bits per row
    sq, ss, sw, sws, si, sr = q.stride(), s.stride(), weight.stride(), weight_scale_inv.stride(), \
        top_k_index.stride(), rw.stride()
    _pairwise_kernel(_interpret())[(units, -(-N // cfg["BLOCK_N"]))](
        q, s, weight, weight_scale_inv, y, top_k_index, rw,
        N, K, E, k, slots,
        sq[0], ss[0], sw[0], sw[1], sws[0], sws[1], N,
        si[0], si[1], sr[0], sr[1],
        A_ROWS_ARE_TOKENS=rows == "tokens", COMBINE=combine, P_IS_FP32=P == torch.float32, INTERPRET=_interpret(),
        IS_INT8=q.dtype == torch.int8, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK_K,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
