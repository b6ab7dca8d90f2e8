"""Grouped Triton backend: fp8linear's blockwise GEMM over E experts, fp8 and int8, any E, N and K.

What it computes (fp8linear.backends.GroupedBackend): for every row r of the grouped activations q (`row`
scales s, one per row and 128-column group) and its expert e(r),

    y[r, n] = sum_kb  s[r, kb] * weight_scale_inv[e, n // 128, kb] * sum_{k in block kb} q[r, k] * weight[e, n, k]

The kernel is the dense one's (fp8linear.backends.triton_blockwise: one [BLOCK_M, BLOCK_N] output tile per
program, a loop over 128-wide K blocks, fp32 accumulation, exact int32 for int8) on a list of row tiles:
each tile holds rows of one expert only, so it multiplies by one expert's weight. The host side turns
either layout into that list with a few tensor ops on the device (no host synchronisation, so CUDA
graphs capture it):

    contiguous (m_indices [M_all]): expert e owns rows [start_e, start_e + count_e); its tiles are
        ceil(count_e / BLOCK_M) blocks of BLOCK_M rows from start_e, the last one cut at the segment's end.
        Segments need no alignment. At most ceil(M_all / BLOCK_M) + min(E, M_all) tiles; the surplus
        entries of that fixed-size list say "no tile" (expert -1) and their programs exit at once.
    masked (masked_m [E], q [E, max_m, Kp]): expert e's tiles start at row e * max_m, every BLOCK_M rows,
        those at or past masked_m[e] empty.

    tile t: (expert, first row, end row)    programs: tile t x column block n, t fastest, so programs
                                            that run together share an expert's weight columns in L2

Rows past a tile's end are masked on load and store: rows of other experts, padding and -1 rows are
never written (their output is unspecified, as the protocol allows). Pointer offsets are 64-bit (E * N * K
passes 2^31 at DeepSeek-V3's 256 experts of 4096 x 7168).

Tiles come from `triton_blockwise.config_for` at the expected rows per expert (fixed per shape, as for
dense layers: no autotuning, which would break CUDA-graph capture). Set TRITON_INTERPRET=1 to run it on
CPU tensors with Triton's interpreter (slow; tests only).
"""

# (no `from __future__ import annotations`: triton.jit reads the tl.constexpr annotations as objects)

import functools
import os

import torch

from ..layouts import ScaleLayout
from . import triton_blockwise
from .triton_blockwise import tl, triton

NAME = "triton"
SCALE_LAYOUT = ScaleLayout.ROW
DTYPES = (torch.float8_e4m3fn, torch.int8)
CONTIGUOUS_ALIGN = 1
BLOCK_K = 128


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def grouped_unsupported_reason(E: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                               grouping: str) -> "str | None":
    return triton_blockwise.unsupported_reason(1, N, K, dtype, device)  # the same kernel, the same needs


def masked_rows(max_m: int) -> int:
    return max_m


def prepare_grouped_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [E, N, K], weight_scale_inv fp32 [E, ceil(N/128), ceil(K/128)]), any strides: nothing copied."""
    return weight, weight_scale_inv


# -- the kernel ---------------------------------------------------------------------------------------
def _kernel_source(
    # pointers
    q_ptr, s_ptr, w_ptr, ws_ptr, y_ptr,
    tile_expert_ptr, tile_row0_ptr, tile_end_ptr,  # int64 [num_tiles]: the tile list (module docstring)
    # sizes: y [rows, N] = q [rows, Kp] x w[e] [N, K]^T per tile
    num_tiles, N, K,
    # strides, in elements
    stride_qm, stride_qk,
    stride_sm, stride_sk,
    stride_we, stride_wn, stride_wk,
    stride_wse, stride_wsn, stride_wsk,
    stride_ym, stride_yn,
    # compile-time
    IS_INT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % num_tiles
    pid_n = pid // num_tiles
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row0 = tl.load(tile_row0_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)

    rm = row0 + tl.arange(0, BLOCK_M).to(tl.int64)  # [BM] rows of this tile (int64: row0 is)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_ok = rm < row_end
    n_ok = rn < N
    w_base = w_ptr + expert * stride_we  # int64: expert is
    ws_base = ws_ptr + expert * stride_wse
    q_ptrs = q_ptr + rm[:, None] * stride_qm + rk[None, :] * stride_qk  # [BM, BK]
    w_ptrs = w_base + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # [BK, BN]: w^T tile
    s_ptrs = s_ptr + rm * stride_sm  # [BM], column kb added per step
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

    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    # Jitted on first use (see triton_blockwise._kernel).
    return triton.jit(_kernel_source)


# -- the tile lists -----------------------------------------------------------------------------------
def tiles_contiguous(m_indices: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """(expert, first row, end row) int64 tensors of the fixed length ceil(M_all / block_m) + min(E, M_all)
    for a contiguous layout; entries past the real tiles have expert -1."""
    M_all = m_indices.numel()
    device = m_indices.device
    valid = m_indices >= 0
    ids = torch.where(valid, m_indices.long(), torch.zeros((), dtype=torch.int64, device=device))
    rows = torch.arange(M_all, device=device)
    counts = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(0, ids, valid.long())
    # First row of each expert's segment (M_all for an expert without rows: it has no tiles anyway).
    start = torch.full((E,), M_all, dtype=torch.int64, device=device).scatter_reduce_(
        0, ids, torch.where(valid, rows, torch.full_like(rows, M_all)), "amin")
    n_tiles = (counts + block_m - 1) // block_m
    end_tile = torch.cumsum(n_tiles, 0)  # tiles of expert e: [end_tile[e] - n_tiles[e], end_tile[e])
    t = torch.arange(-(-M_all // block_m) + min(E, M_all), device=device)
    expert = torch.searchsorted(end_tile, t, right=True)  # the expert whose tile range holds t; E: none
    has = expert < E
    e = expert.clamp(max=E - 1)
    row0 = start[e] + (t - (end_tile[e] - n_tiles[e])) * block_m
    return torch.where(has, e, torch.full_like(e, -1)), row0, start[e] + counts[e]


def tiles_masked(masked_m: torch.Tensor, max_m: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """(expert, first row, end row) int64 tensors of length E * ceil(max_m / block_m) for a masked layout
    viewed as [E * max_m] rows; tiles at or past masked_m[e] have expert -1."""
    E = masked_m.numel()
    per = -(-max_m // block_m)
    t = torch.arange(E * per, device=masked_m.device)
    e, j = t // per, t % per
    count = masked_m.long()[e]
    row0 = e * max_m + j * block_m
    return torch.where(j * block_m < count, e, torch.full_like(e, -1)), row0, e * max_m + count


# -- the launch ---------------------------------------------------------------------------------------
def _launch(q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
            tiles: tuple[torch.Tensor, ...], out_dtype: torch.dtype, cfg: dict) -> torch.Tensor:
    """q [rows, Kp], s [rows, Kp/128] (row-major), weight [E, N, K] -> y [rows, N] (unlisted rows unwritten)."""
    if q.dtype != weight.dtype:
        raise TypeError(f"q's dtype {q.dtype} must match the weight's {weight.dtype}")
    rows, N, K = q.shape[0], weight.shape[1], weight.shape[2]
    y = torch.empty((rows, N), dtype=out_dtype, device=q.device)
    num_tiles = tiles[0].numel()
    if rows == 0 or num_tiles == 0:
        return y
    grid = (num_tiles * triton.cdiv(N, cfg["BLOCK_N"]),)
    _kernel(_interpret())[grid](
        q, s, weight, weight_scale_inv, y, *tiles,
        num_tiles, N, K,
        q.stride(0), q.stride(1),
        s.stride(0), s.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        weight_scale_inv.stride(0), weight_scale_inv.stride(1), weight_scale_inv.stride(2),
        y.stride(0), y.stride(1),
        IS_INT8=q.dtype == torch.int8, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK_K,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def _config(rows_per_expert: int, N: int, dtype: torch.dtype, device: torch.device) -> dict:
    return triton_blockwise.config_for(max(1, rows_per_expert), N, dtype, device)


def grouped_gemm_contiguous(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                            m_indices: torch.Tensor, out_dtype: torch.dtype, config: "dict | None" = None) -> torch.Tensor:
    """q [M_all, Kp] fp8/int8, s fp32 [M_all, Kp/128] (`row`), m_indices int32 [M_all] -> y [M_all, N].
    `config` (triton_blockwise.CONFIG_KEYS) overrides the tiles (tests)."""
    weight, weight_scale_inv = prepared
    E, N = weight.shape[0], weight.shape[1]
    cfg = config or _config(-(-q.shape[0] // E), N, q.dtype, q.device)
    return _launch(q, s, weight, weight_scale_inv, tiles_contiguous(m_indices, E, cfg["BLOCK_M"]), out_dtype, cfg)


def grouped_gemm_masked(q: torch.Tensor, s: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                        masked_m: torch.Tensor, expected_m: int, out_dtype: torch.dtype,
                        config: "dict | None" = None) -> torch.Tensor:
    """q [E, max_m, Kp], s fp32 [E, max_m, Kp/128] (`row`), masked_m int32 [E] -> y [E, max_m, N]."""
    weight, weight_scale_inv = prepared
    E, max_m, Kp = q.shape
    N = weight.shape[1]
    cfg = config or _config(min(expected_m, max_m), N, q.dtype, q.device)
    tiles = tiles_masked(masked_m, max_m, cfg["BLOCK_M"])
    y = _launch(q.reshape(E * max_m, Kp), s.reshape(E * max_m, -1), weight, weight_scale_inv, tiles, out_dtype, cfg)
    return y.view(E, max_m, N)
