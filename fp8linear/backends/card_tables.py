"""Tables measured per GPU model and shipped beside the backends: JSON objects keyed by
`torch.cuda.get_device_name()`, each entry {"meta": {...}, "rows": [...]} (auto's backend table, DeepGEMM's
tiles, the Triton GEMM's tiles). `$FP8LINEAR_TABLES_DIR` points all of them to another folder (where the
tuning scripts wrote new ones); a missing file reads as an empty table."""

from __future__ import annotations

import functools
import json
import os
import pathlib

import torch

__all__ = ["DTYPE_KEYS", "TABLES_ENV", "table_path", "rows_for", "device_name", "bucket_row"]

#: How rows name the weight type they were measured for (their "dtype" field).
DTYPE_KEYS = {torch.float8_e4m3fn: "e4m3", torch.int8: "int8"}


#: The one environment variable of the per-card tables: a folder holding tables by their shipped names.
TABLES_ENV = "FP8LINEAR_TABLES_DIR"


def table_path(filename: str) -> pathlib.Path:
    """`filename` in `$FP8LINEAR_TABLES_DIR` if set, else beside this module."""
    folder = os.environ.get(TABLES_ENV)
    return pathlib.Path(folder) / filename if folder else pathlib.Path(__file__).with_name(filename)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    p = pathlib.Path(path)
    if not p.is_file():
        return {}
    with open(p) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a per-card table must be a JSON object keyed by GPU name; got {type(data).__name__}")
    return data


def rows_for(path: pathlib.Path, device_name: str) -> list[dict]:
    """The rows the table at `path` holds for this card (empty when it has none)."""
    entry = _load(str(path)).get(device_name)
    return list(entry.get("rows", [])) if isinstance(entry, dict) else []


@functools.lru_cache(maxsize=None)
def _name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The key of a CUDA device's rows: its `torch.cuda.get_device_name()` (looked up once per index; the
    current device when `device` has no index)."""
    return _name_of(device.index if device.index is not None else torch.cuda.current_device())


def bucket_row(rows: list, M: int):
    """The row of M's bucket among rows sorted by "M_max": the first whose M_max >= M, else the last (M beyond
    every measured bucket); None for no rows."""
    if not rows:
        return None
    return next((r for r in rows if M <= r["M_max"]), rows[-1])
