"""`auto`: choose a backend per (M bucket, N, K, dtype) from measurements taken on this card.

The table, `auto_table.json` beside this file, is written by `scripts/tune_auto.py`:

    {"<torch.cuda.get_device_name()>": {
        "meta": {"date": ..., "torch": ..., "cuda": ..., "commit": ...},
        "rows": [{"dtype": "e4m3", "N": 7168, "K": 7168, "M_max": 64, "backend": "cublaslt",
                  "us": {...}, "bf16_us": ..., "bf16_faster": false}, ...]}}

A row serves M <= M_max for its exact (dtype, N, K); the row with the smallest M_max >= M wins, and
M beyond the largest M_max uses the largest row. Shapes the table lacks (or a card it lacks) get
`heuristic()`, from the H100 table's measurements, and a log line saying it is a heuristic. Whatever
the table or heuristic names, a backend that cannot serve the shape is skipped for the next one in
`fp8linear.backends.FALLBACK_ORDER`; every choice is logged at DEBUG (logger `fp8linear.backends.auto`).
"""

from __future__ import annotations

import logging
import pathlib

import torch

from . import FALLBACK_ORDER, canonical_name, card_tables, unsupported_reason

__all__ = ["choose", "heuristic", "load_table", "table_path", "lookup", "M_BUCKETS"]

log = logging.getLogger(__name__)

#: The M buckets scripts/tune_auto.py measures (upper bounds; beyond the last, the last row holds).
M_BUCKETS = (1, 8, 16, 64, 128, 256, 512, 1024, 2048, 4096, 16384)



def table_path() -> pathlib.Path:
    """auto_table.json in `$FP8LINEAR_TABLES_DIR` if set, else in fp8linear/backends/."""
    return card_tables.table_path("auto_table.json")


def load_table(device_name: str) -> list[dict]:
    """The measured rows for this card (empty when the table has none)."""
    return card_tables.rows_for(table_path(), device_name)


def lookup(rows: list[dict], M: int, N: int, K: int, dtype: torch.dtype) -> "str | None":
    """The table's backend for this shape, or None when the table has no row for (dtype, N, K)."""
    key = card_tables.DTYPE_KEYS.get(dtype)
    mine = sorted((r for r in rows if r.get("dtype") == key and r.get("N") == N and r.get("K") == K),
                  key=lambda r: r["M_max"])
    row = card_tables.bucket_row(mine, M)
    return None if row is None else canonical_name(row["backend"])  # a table written before a rename


def heuristic(M: int, N: int, K: int, dtype: torch.dtype) -> str:
    """A choice for shapes the card's table has no row for, read off the H100 table (auto_table.json, its
    runs in docs/benchmarks.md):

    - M <= 8: fused_mma, the fused quantize-and-GEMM kernel (fp8 and int8): the fastest at half the table's
      points there and close to the best elsewhere.
    - int8, M > 8: fused_wgmma (int8 wgmma, its quantization inside) from M = 1024 on layers with N >= 2048,
      where it was at least as fast as the Triton GEMM at every point measured; triton below that, on
      narrower layers, and where fused_wgmma cannot serve (`choose` falls back).
    - fp8, M > 8: DeepGEMM, the fastest at most points from M = 16 up; where DeepGEMM is missing or refuses
      the shape `choose` falls back to cuBLASLt. Triton stays out: slower than bf16 at most points there.
    """
    if M <= 8:
        return "fused_mma"
    if dtype == torch.int8:
        return "fused_wgmma" if M >= 1024 and N >= 2048 else "triton"
    return "deepgemm"


def choose(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> str:
    """The name of the backend that serves this shape (see the module docstring)."""
    if device.type != "cuda":
        first, source = "reference", f"{device.type} device"
    else:
        name = card_tables.device_name(device)
        first = lookup(load_table(name), M, N, K, dtype)
        source = f"measured table for {name!r}"
        if first is None:
            first = heuristic(M, N, K, dtype)
            source = f"heuristic (no row for {name!r} in {table_path().name}; run scripts/tune_auto.py)"
    tried = []
    for candidate in (first, *[b for b in FALLBACK_ORDER if b != first]):
        why = unsupported_reason(candidate, M, N, K, dtype, device)
        if why is None:
            if tried:
                log.debug("auto M=%d N=%d K=%d %s: %s named %s; %s -> %s", M, N, K, dtype, source, first,
                          "; ".join(tried), candidate)
            else:
                log.debug("auto M=%d N=%d K=%d %s: %s -> %s", M, N, K, dtype, source, candidate)
            return candidate
        tried.append(f"{candidate} unsupported ({why})")
    raise RuntimeError(
        f"auto: no backend can serve M={M}, N={N}, K={K}, dtype={dtype} on {device}: " + "; ".join(tried)
    )


def plan(N: int, K: int, dtype: torch.dtype, device: torch.device) -> list[tuple[int, str]]:
    """[(M_max, backend), ...] over M_BUCKETS with equal neighbours merged; the last row serves every
    larger M. What `FP8Linear.extra_repr` shows for backend='auto'."""
    rows: list[tuple[int, str]] = []
    for M in M_BUCKETS:
        name = choose(M, N, K, dtype, device)
        if rows and rows[-1][1] == name:
            rows[-1] = (M, name)
        else:
            rows.append((M, name))
    return rows


def describe(N: int, K: int, dtype: torch.dtype, device: torch.device) -> str:
    """'M<=64: cublaslt, M<=512: triton, M>512: deepgemm' for this layer on this device."""
    rows = plan(N, K, dtype, device)
    if len(rows) == 1:
        return f"all M: {rows[0][1]}"
    parts = [f"M<={m}: {b}" for m, b in rows[:-1]]
    parts.append(f"M>{rows[-2][0]}: {rows[-1][1]}")
    return ", ".join(parts)
