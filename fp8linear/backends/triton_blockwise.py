"""Triton backend: fp8linear's own blockwise GEMM, for fp8 e4m3 and int8, any N and K, fused bias.

What it computes (fp8linear.backends interface): for activations q [M, Kp] with one fp32 scale per row
and 128-column group (s, `row` layout [M, Kp/128]) and weights [N, K] with one fp32 scale per 128x128
block (weight_scale_inv [ceil(N/128), ceil(K/128)]),

    y[m, n] = sum_kb  s[m, kb] * weight_scale_inv[n // 128, kb] * sum_{k in block kb} q[m, k] * weight[n, k]

The blocked algorithm (Triton's 03-matrix-multiplication tutorial, plus scales):

    for each output tile [BLOCK_M, BLOCK_N]:
        acc = 0 (fp32)
        for kb in 0 .. ceil(K / 128) - 1:               BLOCK_K = 128: one scale column per step
            part = tl.dot(q tile [BM, 128], weight tile^T [128, BN])
                   fp8: fp32 accumulation (wgmma on Hopper); int8: exact int32 accumulation
            acc += part * s[rows, kb][:, None] * weight_scale_inv[n-block of each column, kb][None, :]
                   (one scalar when BLOCK_N divides 128: the tile sits in one weight-block row)
        y tile = (acc + bias).to(out_dtype)

Edges: rows >= M and columns >= N are masked; K % 128 != 0 needs no special case in the kernel: q's
columns K..Kp-1 are zeros (FP8Linear pads x) and weight columns >= K are masked to zero, so the last,
partial block contributes exactly its real columns.

Tiles are fixed per M bucket, not autotuned: autotuning would time kernels on first sight of a shape,
which breaks CUDA-graph capture, and makes runs differ. `triton_configs.json` holds the tiles
`scripts/tune_triton.py` measured per card (fastest over a set of layer shapes, per dtype and M bucket);
cards without rows use `_default_config`. Tile programs are ordered in groups
of GROUP_M rows of tiles so that consecutive programs share weight tiles in L2 (the tutorial's
"grouped ordering").

Under torch.compile, `gemm` calls the kernel through the opaque op `fp8linear::triton_blockwise_gemm`
(with a fake), so dynamo never traces the launcher; eagerly it launches directly (no dispatcher cost).

Set TRITON_INTERPRET=1 to run the kernel on CPU tensors with Triton's interpreter (slow; tests only).
"""

# (no `from __future__ import annotations`: triton.jit reads the tl.constexpr annotations as objects)

import functools
import os

import torch

from ..layouts import ScaleLayout
from . import card_tables, quantize_then_gemm

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: "str | None" = None
except Exception as exc:  # ImportError, or a broken install
    triton = None

    class tl:  # noqa: N801 - stands in so the kernel's annotations evaluate without triton
        constexpr = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

NAME = "triton"
SCALE_LAYOUT = ScaleLayout.ROW
ROW_ALIGN = 1
DTYPES = (torch.float8_e4m3fn, torch.int8)
MAX_M = None
BLOCK_K = 128


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter_indexing() -> None:
    """Make Triton's interpreter (TRITON_INTERPRET=1) index 1-element loop bounds itself: Triton 3.6 calls
    int() on them, which NumPy >= 2.4 refuses for arrays of ndim > 0. Idempotent; interpreter-only (tests and
    CPU smoke runs of scripts/bench_moe.py)."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_fp8linear_index_patch", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fp8linear_index_patch = True
    interp._patch_lang_tensor = patched


def unsupported_reason(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> "str | None":
    if _IMPORT_ERROR is not None:
        return f"triton not importable ({_IMPORT_ERROR})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if dtype == torch.float8_e4m3fn and (major, minor) < (8, 9):
            return f"fp8 tl.dot needs compute capability >= 8.9; this GPU is {major}.{minor}"
        return None
    if device.type == "cpu" and _interpret():
        return None
    return f"needs a CUDA device (or TRITON_INTERPRET=1 on CPU); got {device.type}"


def prepare_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K] fp8/int8, weight_scale_inv fp32 [ceil(N/128), ceil(K/128)]), any strides: the
    kernel takes strides, so nothing is copied."""
    return weight, weight_scale_inv


# -- the kernel ---------------------------------------------------------------------------------------
def _kernel_source(
    # pointers
    q_ptr, s_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,
    # sizes: y [M, N] = q [M, Kp] x w [N, K]^T
    M, N, K,
    # strides, in elements: one step along the named dim
    stride_qm, stride_qk,
    stride_sm, stride_sk,
    stride_wn, stride_wk,
    stride_wsn, stride_wsk,
    stride_ym, stride_yn,
    # compile-time
    IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M rows of tiles walk N together, so their weight tiles stay in L2.
    pid = tl.program_id(0)
    # Plain arithmetic, not tl.cdiv: the interpreter cannot run Triton's jitted standard library when
    # triton was imported before TRITON_INTERPRET was set (as in the CPU tests).
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output rows
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_ok = rm < M
    n_ok = rn < N
    q_ptrs = q_ptr + rm[:, None] * stride_qm + rk[None, :] * stride_qk  # [BM, BK]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # [BK, BN]: w^T tile
    s_ptrs = s_ptr + rm * stride_sm  # [BM], column kb added per step
    # Where BLOCK_N divides 128 the whole tile sits in one weight-block row (one scale per step); wider
    # tiles span several and read one scale per column.
    ONE_WS_ROW: tl.constexpr = 128 % BLOCK_N == 0
    ws_row = ws_ptr + ((pid_n * BLOCK_N) // 128) * stride_wsn
    ws_cols = ws_ptr + (rn // 128) * stride_wsn  # [BN]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # tl.full, a builtin (see tl.cdiv above)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // BLOCK_K
        k_ok = (k0 + rk) < K
        # q has ceil(K/128)*128 columns, so only rows need a mask; w's columns >= K are masked to 0.
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

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    # Jitted on first use, not at import: importing this module stays free of Triton work, and the
    # interpreter (TRITON_INTERPRET=1, read by triton.jit) can be switched on by a test before it.
    return triton.jit(_kernel_source)


def _default_config(M: int, N: int) -> dict:
    """Tile shape per M bucket where the card has no measured rows.

    Small M is weight-bandwidth bound: narrow N tiles put more programs on the SMs (N = 4096 with
    BLOCK_N = 32 gives 128 programs). From M = 128 on, 128x128 tiles with 8 warps feed wgmma.
    """
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32 if N <= 8192 else 64, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4)


#: The keys of a tile configuration, and what each may be.
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages")
_POWERS_OF_TWO = (16, 32, 64, 128, 256)
TABLE_FILE = "triton_configs.json"


def check_config(cfg: dict, where: str = "config") -> dict:
    """cfg with exactly CONFIG_KEYS and values the kernel compiles for, else ValueError naming the field."""
    if not isinstance(cfg, dict) or set(cfg) != set(CONFIG_KEYS):
        raise ValueError(f"{where}: a Triton tile config has exactly the keys {list(CONFIG_KEYS)}; got {cfg!r}")
    for key in ("BLOCK_M", "BLOCK_N"):
        if cfg[key] not in _POWERS_OF_TWO:
            raise ValueError(f"{where}: {key} must be one of {list(_POWERS_OF_TWO)}; got {cfg[key]!r}")
    if not isinstance(cfg["GROUP_M"], int) or not 1 <= cfg["GROUP_M"] <= 64:
        raise ValueError(f"{where}: GROUP_M must be an int in 1..64; got {cfg['GROUP_M']!r}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"{where}: num_warps must be 1, 2, 4, 8 or 16; got {cfg['num_warps']!r}")
    if not isinstance(cfg["num_stages"], int) or not 1 <= cfg["num_stages"] <= 8:
        raise ValueError(f"{where}: num_stages must be an int in 1..8; got {cfg['num_stages']!r}")
    return dict(cfg)


@functools.lru_cache(maxsize=None)
def _measured_rows(device_name: str) -> tuple:
    """The card's rows {dtype, M_max, config}, sorted by M_max, configs checked; read once."""
    path = card_tables.table_path(TABLE_FILE)
    out = []
    for i, row in enumerate(card_tables.rows_for(path, device_name)):
        where = f"{path} [{device_name!r}] row {i}"
        if row.get("dtype") not in card_tables.DTYPE_KEYS.values():
            raise ValueError(f"{where}: dtype must be one of {sorted(card_tables.DTYPE_KEYS.values())}; "
                             f"got {row.get('dtype')!r}")
        if not isinstance(row.get("M_max"), int) or row["M_max"] < 1:
            raise ValueError(f"{where}: M_max must be a positive int; got {row.get('M_max')!r}")
        cfg = row.get("config")
        out.append({"dtype": row["dtype"], "M_max": row["M_max"],
                    "config": None if cfg is None else check_config(cfg, where)})
    return tuple(sorted(out, key=lambda r: r["M_max"]))


def config_for(M: int, N: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tiles for M rows: the card's measured row for M's bucket (the first whose M_max >= M, else the
    largest), or `_default_config` on a card (or CPU) without rows and for a row whose config is null (a
    bucket where the measured tiles did not beat the built-in ones)."""
    if device.type == "cuda":
        key = card_tables.DTYPE_KEYS.get(dtype)
        rows = [r for r in _measured_rows(card_tables.device_name(device)) if r["dtype"] == key]
        row = card_tables.bucket_row(rows, M)
        if row is not None and row["config"] is not None:
            return dict(row["config"])
    return _default_config(M, N)


def _gemm_impl(
    q: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: "torch.Tensor | None",
    out_dtype: torch.dtype,
    config: "dict | None" = None,
) -> torch.Tensor:
    """The launch; `config` (CONFIG_KEYS) overrides the tiles (scripts/tune_triton.py, tests)."""
    M, N, K = q.shape[0], weight.shape[0], weight.shape[1]
    y = torch.empty((M, N), dtype=out_dtype, device=q.device)
    if M == 0:
        return y
    cfg = config if config is not None else config_for(M, N, q.dtype, q.device)
    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "GROUP_M")}
    grid = (-(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]),)  # not triton.cdiv: a jitted helper, slow from Python
    _kernel(_interpret())[grid](
        q, s, weight, weight_scale_inv, bias if bias is not None else y, y,
        M, N, K,
        q.stride(0), q.stride(1),
        s.stride(0), s.stride(1),
        weight.stride(0), weight.stride(1),
        weight_scale_inv.stride(0), weight_scale_inv.stride(1),
        y.stride(0), y.stride(1),
        IS_INT8=q.dtype == torch.int8, HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **meta,
    )
    return y


def gemm(
    q: torch.Tensor,
    s: torch.Tensor,
    prepared: tuple[torch.Tensor, torch.Tensor],
    out_dtype: torch.dtype,
    bias: "torch.Tensor | None",
) -> torch.Tensor:
    """q [M, Kp] fp8/int8 contiguous, s fp32 [M, Kp/128] (`row`), bias [N] or None -> y [M, N] out_dtype."""
    weight, weight_scale_inv = prepared
    if q.dtype != weight.dtype:
        raise TypeError(f"q's dtype {q.dtype} must match the weight's {weight.dtype}")
    if torch.compiler.is_compiling():
        return torch.ops.fp8linear.triton_blockwise_gemm(q, s, weight, weight_scale_inv, bias, out_dtype)
    return _gemm_impl(q, s, weight, weight_scale_inv, bias, out_dtype)


def linear(x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], bias: "torch.Tensor | None",
           out_dtype: torch.dtype, dtype: torch.dtype, scale_ue8m0: bool) -> torch.Tensor:
    """Quantize x2d [M, Kp] (`row` scales) and call `gemm`: two launches."""
    return quantize_then_gemm(gemm, SCALE_LAYOUT, ROW_ALIGN, x2d, prepared, bias, out_dtype, dtype, scale_ue8m0)


# -- the opaque op torch.compile sees -----------------------------------------------------------------
_lib = torch.library.Library("fp8linear", "FRAGMENT")
_lib.define(
    "triton_blockwise_gemm(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv, Tensor? bias, "
    "ScalarType out_dtype) -> Tensor"
)


@torch.library.register_fake("fp8linear::triton_blockwise_gemm", lib=_lib)
def _gemm_fake(q, s, weight, weight_scale_inv, bias, out_dtype):
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.impl(_lib, "triton_blockwise_gemm", "CUDA")
def _gemm_cuda(q, s, weight, weight_scale_inv, bias, out_dtype):
    return _gemm_impl(q, s, weight, weight_scale_inv, bias, out_dtype)
