"""DeepGEMM tile configurations measured on this card, per (N, K, M bucket).

DeepGEMM's legacy API chooses the tiles of its kernel by a rule on wave counts (`get_best_configs`:
64 to 256 rows, BLOCK_N at most 160, and at most 128 with 256 rows). The same kernel template also builds
other tiles (128 x 192, 128 x 160, ...), and on some shapes they are faster: 2112 x 7168 at M = 4096 ran
its GEMM in 103.0 us with 128 x 192 tiles against 118.0 us with DeepGEMM's 256 x 88 (H100, the tuning
run in docs/runs/2026-11-26-bench-linear-tiles-h100.md). `scripts/tune_deepgemm.py` times the candidates on the card and writes, per
(N, K, M bucket), the fastest where it beats DeepGEMM's own pick by a margin; `fp8linear.backends.deepgemm`
compiles that configuration through DeepGEMM's JIT instead of its pick.

The tiles change the speed, not the result: every output element is the same fp32 sum over the same
K blocks in the same order, whatever the tile it falls in. The tuning script checks that bit for bit
against DeepGEMM's own configuration and refuses a configuration that differs.

The table (`deepgemm_tiles.json`; `$FP8LINEAR_TABLES_DIR` points elsewhere) is keyed by
`torch.cuda.get_device_name()`; its rows name N, K, the bucket's upper bound `M_max` (a value of
`fp8linear.backends.auto.M_BUCKETS`) and the tiles. A shape with no row keeps DeepGEMM's pick.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from . import card_tables
from .auto import M_BUCKETS

__all__ = ["Tiles", "table_path", "load_rows", "bucket", "lookup", "lookup_for_device", "num_sms_for"]

#: "fewest": DeepGEMM's own rule, the fewest SMs that keep the wave count (less L2 traffic, a higher
#: clock); "all": every SM (rounded down to the cluster size).
NUM_SMS_RULES = ("fewest", "all")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch configuration of DeepGEMM's legacy FP8 GEMM kernel (its template parameters)."""

    block_m: int
    block_n: int
    num_stages: int
    multicast: int
    multicast_on_a: bool
    num_sms: str = "fewest"

    def __post_init__(self) -> None:
        if self.block_m not in (64, 128, 256):
            raise ValueError(f"block_m must be 64, 128 or 256; got {self.block_m}")
        if not (16 <= self.block_n <= 256 and self.block_n % 8 == 0):
            raise ValueError(f"block_n must be a multiple of 8 in [16, 256]; got {self.block_n}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in [1, 8]; got {self.num_stages}")
        if self.multicast not in (1, 2):
            raise ValueError(f"multicast must be 1 or 2; got {self.multicast}")
        if self.num_sms not in NUM_SMS_RULES:
            raise ValueError(f"num_sms must be one of {NUM_SMS_RULES}; got {self.num_sms!r}")

    @classmethod
    def from_row(cls, row: dict) -> "Tiles":
        return cls(block_m=int(row["block_m"]), block_n=int(row["block_n"]), num_stages=int(row["num_stages"]),
                   multicast=int(row["multicast"]), multicast_on_a=bool(row["multicast_on_a"]),
                   num_sms=str(row.get("num_sms", "fewest")))

    def as_row(self) -> dict:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """'128x192 s4 mc2 on B, fewest SMs': for logs and benchmark notes."""
        cast = f"mc2 on {'A' if self.multicast_on_a else 'B'}" if self.multicast == 2 else "mc1"
        return f"{self.block_m}x{self.block_n} s{self.num_stages} {cast}, {self.num_sms} SMs"


def num_sms_for(tiles: Tiles, M: int, N: int, device_sms: int) -> int:
    """The grid size for `tiles` at this M: see NUM_SMS_RULES."""
    if tiles.num_sms == "all":
        return device_sms - device_sms % tiles.multicast
    blocks = -(-M // tiles.block_m) * -(-N // tiles.block_n)
    waves = -(-blocks // device_sms)
    fewest = -(-blocks // waves)
    return min(-(-fewest // tiles.multicast) * tiles.multicast, device_sms - device_sms % tiles.multicast)


def table_path() -> pathlib.Path:
    """deepgemm_tiles.json in `$FP8LINEAR_TABLES_DIR` if set, else in fp8linear/backends/."""
    return card_tables.table_path("deepgemm_tiles.json")


def load_rows(device_name: str) -> list[dict]:
    """The measured rows for this card (empty when the table has none)."""
    return card_tables.rows_for(table_path(), device_name)


def bucket(M: int) -> int:
    """The M bucket M falls in: the smallest of M_BUCKETS >= M, or the last one beyond it."""
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


def lookup(rows: list[dict], M: int, N: int, K: int) -> "Tiles | None":
    """The tiles measured fastest for (N, K) in M's bucket, or None: no row for that bucket, or a row
    that keeps DeepGEMM's own pick (`"tiles": null`)."""
    b = bucket(M)
    for row in rows:
        if row.get("N") == N and row.get("K") == K and row.get("M_max") == b:
            return Tiles.from_row(row["tiles"]) if row.get("tiles") else None
    return None


def lookup_for_device(M: int, N: int, K: int, device: torch.device) -> "Tiles | None":
    """`lookup` in this CUDA device's rows (None on other devices)."""
    if device.type != "cuda":
        return None
    return lookup(load_rows(card_tables.device_name(device)), M, N, K)
