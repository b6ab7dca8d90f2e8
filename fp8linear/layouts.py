"""Scale layouts: the one home of their shapes, strides, padding and UE8M0 packing.

DESIGN.md "Scale layouts" fixes them, because the GEMMs that read them (DeepGEMM, cuBLASLt) do:

| layout         | dtype | shape (2-D)         | strides        | read by                              |
| -------------- | ----- | ------------------- | -------------- | ------------------------------------ |
| `row`          | fp32  | [M, G]              | (G, 1)         | Triton GEMMs, people                 |
| `col`          | fp32  | [M, G]              | (1, M_pad)     | DeepGEMM SM90 LHS, cuBLASLt 1x128     |
| `ue8m0_packed` | int32 | [M, ceil(G/4)]      | (1, M_pad)     | DeepGEMM SM100                       |

with G = K / g groups per row and M_pad = ceil(M / 4) * 4 (TMA wants 16-byte aligned columns). A 3-D
input [E, M, K] gets a leading batch dim whose stride is one whole 2-D scale matrix (G * M_pad for `col`).
The column-major layouts own storage for all M_pad rows; rows M..M_pad-1 are padding nobody reads.

`ue8m0_packed`: byte b (bits 8b..8b+7) of word j holds the biased fp32 exponent of group 4j+b's
power-of-two scale (scale = 2^(e-127)); bytes of groups >= G are 0. G need not be a multiple of 4.
"""

from __future__ import annotations

import enum
import math
from typing import Sequence

import torch

__all__ = [
    "ScaleLayout",
    "tma_aligned_rows",
    "scale_shape",
    "scale_strides",
    "empty_scales",
    "check_scales",
    "pack_ue8m0",
    "unpack_ue8m0",
    "scales_to_row",
]

#: DeepGEMM and cuBLASLt read column-major scales through TMA, which needs each column 16-byte
#: aligned: 4 fp32 (or 4 int32 words).
TMA_ALIGN_ELEMS = 4


class ScaleLayout(str, enum.Enum):
    """Where per-token-group scales live in memory (DESIGN.md "Scale layouts")."""

    #: fp32 [M, G], row-major. Read by our Triton GEMMs and by people.
    ROW = "row"
    #: fp32 [M, G], column-major with M padded to 4 (strides (1, M_pad)). DeepGEMM SM90, cuBLASLt.
    COL = "col"
    #: int32 [M, ceil(G/4)], four UE8M0 exponents per word, column-major, M padded to 4. DeepGEMM SM100.
    UE8M0_PACKED = "ue8m0_packed"

    @classmethod
    def parse(cls, value: "str | ScaleLayout") -> "ScaleLayout":
        if isinstance(value, cls):  # the hot path: callers mostly pass members
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"scale_layout must be one of {names}; got {value!r}") from None

    @property
    def dtype(self) -> torch.dtype:
        return torch.int32 if self is ScaleLayout.UE8M0_PACKED else torch.float32

    def short_str(self) -> str:
        return self.value


def tma_aligned_rows(M: int) -> int:
    """M_pad = ceil(M / 4) * 4: rows of a column-major scale matrix, padded for TMA."""
    return (M + TMA_ALIGN_ELEMS - 1) // TMA_ALIGN_ELEMS * TMA_ALIGN_ELEMS


def _columns(G: int, layout: ScaleLayout) -> int:
    return (G + 3) // 4 if layout is ScaleLayout.UE8M0_PACKED else G


def scale_shape(batch: Sequence[int], M: int, G: int, layout: "str | ScaleLayout") -> tuple[int, ...]:
    """Shape of the scale tensor for `batch` leading dims (() or (E,)), M rows and G groups per row."""
    layout = ScaleLayout.parse(layout)
    return (*batch, M, _columns(G, layout))


def scale_strides(batch: Sequence[int], M: int, G: int, layout: "str | ScaleLayout") -> tuple[int, ...]:
    """Element strides of the scale tensor (see the table in this module's docstring)."""
    layout = ScaleLayout.parse(layout)
    cols = _columns(G, layout)
    if layout is ScaleLayout.ROW:
        inner = (cols, 1)
        matrix = M * cols
    else:
        M_pad = tma_aligned_rows(M)
        inner = (1, M_pad)
        matrix = M_pad * cols
    return ((matrix,) if len(batch) else ()) + inner


def empty_scales(
    batch: Sequence[int], M: int, G: int, layout: "str | ScaleLayout", device: "torch.device | str"
) -> torch.Tensor:
    """Allocate an uninitialised scale tensor in `layout`, owning the storage of its padding rows."""
    layout = ScaleLayout.parse(layout)
    batch = tuple(batch)
    cols = _columns(G, layout)
    if layout is ScaleLayout.ROW:
        return torch.empty((*batch, M, cols), dtype=layout.dtype, device=device)
    # Column-major: storage for [*batch, cols, M_pad] (padding rows included), viewed as [*batch, M, cols].
    # One as_strided instead of transpose + slice: this runs on every forward.
    M_pad = tma_aligned_rows(M)
    storage = torch.empty(math.prod(batch) * cols * M_pad, dtype=layout.dtype, device=device)
    return storage.as_strided((*batch, M, cols), scale_strides(batch, M, G, layout))


def check_scales(
    s: torch.Tensor,
    batch: Sequence[int],
    M: int,
    G: int,
    layout: "str | ScaleLayout",
    device: torch.device,
    name: str = "scale_out",
) -> None:
    """Raise ValueError/TypeError naming `name` unless `s` is exactly what `empty_scales` would allocate
    (dtype, device, shape, strides; the padding rows need not exist in storage)."""
    layout = ScaleLayout.parse(layout)
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(s).__name__}")
    if s.dtype != layout.dtype:
        raise TypeError(f"{name} must have dtype {layout.dtype} for scale_layout={layout.value!r}; got {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name} must be on {device} like the input; got {s.device}")
    shape = scale_shape(batch, M, G, layout)
    if tuple(s.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} for scale_layout={layout.value!r}; got {list(s.shape)}")
    strides = scale_strides(batch, M, G, layout)
    # Strides of size-1 dims never matter for addressing; compare the rest.
    if s.numel() > 0 and any(n != 1 and a != b for n, a, b in zip(shape, s.stride(), strides)):
        raise ValueError(
            f"{name} must have strides {strides} for scale_layout={layout.value!r} (see fp8linear.layouts); "
            f"got {s.stride()}. Allocate it with fp8linear.layouts.empty_scales"
        )


def pack_ue8m0(s_row: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two fp32 scales [..., M, G] (row-major) into int32 words [..., M, ceil(G/4)], row-major.

    Byte b of word j is the biased exponent of group 4j+b; bytes past G are 0. The caller puts the
    result into the column-major `ue8m0_packed` storage (`empty_scales(...).copy_(pack_ue8m0(s))`).
    """
    if s_row.dtype != torch.float32:
        raise TypeError(f"s_row must be float32; got {s_row.dtype}")
    G = s_row.shape[-1]
    exponent = (s_row.view(torch.int32) >> 23) & 0xFF  # [..., M, G], sign is 0 for scales
    pad = (-G) % 4
    if pad:
        exponent = torch.nn.functional.pad(exponent, (0, pad))  # missing groups contribute 0 bytes
    exponent = exponent.reshape(*exponent.shape[:-1], -1, 4)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=s_row.device)
    # Bytes occupy disjoint bits, so a sum is an OR; int32 arithmetic wraps bit 31 as intended.
    return (exponent << shifts).sum(-1, dtype=torch.int32)


def unpack_ue8m0(packed: torch.Tensor, G: int) -> torch.Tensor:
    """Inverse of `pack_ue8m0`: int32 words [..., M, ceil(G/4)] -> fp32 scales [..., M, G] (row-major).

    Byte 0xFF (UE8M0's NaN) unpacks to NaN."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32; got {packed.dtype}")
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=packed.device)
    exponent = (packed.unsqueeze(-1) >> shifts) & 0xFF  # [..., M, W, 4]
    exponent = exponent.reshape(*packed.shape[:-1], -1)[..., :G]
    bits = (exponent << 23).to(torch.int32)
    # 0xFF is UE8M0's NaN (a poisoned group's scale); shifted as is it would read back as +inf.
    bits = torch.where(exponent == 0xFF, torch.full_like(bits, 0x7FC00000), bits)
    return bits.view(torch.float32)


def scales_to_row(s: torch.Tensor, G: int, layout: "str | ScaleLayout") -> torch.Tensor:
    """Any layout -> fp32 [..., M, G] row-major (a copy): for reference GEMMs, tests and people."""
    layout = ScaleLayout.parse(layout)
    if layout is ScaleLayout.UE8M0_PACKED:
        return unpack_ue8m0(s.contiguous(), G)
    return s.contiguous()
