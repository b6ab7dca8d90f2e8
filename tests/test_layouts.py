"""fp8linear.layouts: every layout's shape, dtype, strides and padding storage, the checker, UE8M0 packing.

The expected values come from `expected_layout`, a plain re-derivation of DESIGN.md's table written
step by step here, not from the module under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from cases import enumerate_layout_shapes
from conftest import assert_bitwise_equal
from fp8linear.layouts import (
    ScaleLayout,
    check_scales,
    empty_scales,
    pack_ue8m0,
    scale_shape,
    scale_strides,
    scales_to_row,
    tma_aligned_rows,
    unpack_ue8m0,
)

LAYOUTS = ("row", "col", "ue8m0_packed")
SHAPES = enumerate_layout_shapes()


def expected_layout(batch: tuple[int, ...], M: int, G: int, layout: str):
    """DESIGN.md "Scale layouts", derived step by step: (dtype, shape, strides, storage elements)."""
    # Rows of a column-major matrix are padded to a multiple of 4 so each column starts 16-byte aligned.
    M_pad = M
    while M_pad % 4:
        M_pad += 1
    if layout == "ue8m0_packed":
        dtype = torch.int32
        cols = 0
        while 4 * cols < G:  # one int32 word holds four exponent bytes
            cols += 1
    else:
        dtype = torch.float32
        cols = G
    if layout == "row":
        strides = (cols, 1)  # row-major: next group is the next element
        matrix = M * cols
    else:
        strides = (1, M_pad)  # column-major: next row is the next element, next column M_pad later
        matrix = M_pad * cols
    E = batch[0] if batch else 1
    if batch:
        strides = (matrix,) + strides  # one whole (padded) matrix per batch entry
    return dtype, (*batch, M, cols), strides, E * matrix


def _id(case):
    batch, M, G = case
    return f"{'x'.join(map(str, batch)) + 'x' if batch else ''}M{M}-G{G}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", SHAPES, ids=[_id(c) for c in SHAPES])
def test_shape_strides_dtype_storage(case, layout):
    batch, M, G = case
    dtype, shape, strides, storage_elems = expected_layout(batch, M, G, layout)

    assert ScaleLayout(layout).dtype == dtype
    assert scale_shape(batch, M, G, layout) == shape
    assert scale_strides(batch, M, G, layout) == strides

    s = empty_scales(batch, M, G, layout, "cpu")
    assert s.dtype == dtype
    assert tuple(s.shape) == shape
    if s.numel() > 0:  # an empty tensor's strides address nothing; torch normalizes them
        assert s.stride() == strides
    # The padding rows M..M_pad-1 of col/ue8m0_packed exist in storage (a kernel may write them).
    assert s.untyped_storage().nbytes() == storage_elems * 4
    assert s.storage_offset() == 0
    check_scales(s, batch, M, G, layout, torch.device("cpu"))  # what empty_scales makes passes


def test_tma_aligned_rows():
    assert [tma_aligned_rows(M) for M in range(10)] == [0, 4, 4, 4, 4, 8, 8, 8, 8, 12]


@pytest.mark.parametrize("layout", ["col", "ue8m0_packed"])
def test_padding_rows_are_addressable(layout):
    """Writing every storage element through the padded column-major view touches no other memory."""
    M, G = 5, 3
    s = empty_scales((), M, G, layout, "cpu")
    cols = s.shape[1]
    full = s.as_strided((tma_aligned_rows(M), cols), (1, tma_aligned_rows(M)))  # rows 0..M_pad-1
    full.copy_(torch.arange(full.numel(), dtype=torch.int32).reshape(cols, -1).t().to(s.dtype))
    # The first M rows of the padded view are the tensor itself.
    assert torch.equal(s, full[:M])


def test_parse_rejects_unknown_layout():
    assert ScaleLayout.parse("col") is ScaleLayout.COL
    assert ScaleLayout.parse(ScaleLayout.ROW) is ScaleLayout.ROW
    with pytest.raises(ValueError, match=r"scale_layout must be one of 'row', 'col', 'ue8m0_packed'; got 'colmajor'"):
        ScaleLayout.parse("colmajor")


# ------------------------------------------------------------------------------------------------
# check_scales
# ------------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_scales_wrong_dtype(layout):
    wrong = torch.float32 if layout == "ue8m0_packed" else torch.float16
    s = torch.empty(scale_shape((), 4, 3, layout), dtype=wrong)
    with pytest.raises(TypeError, match=rf"scale_out must have dtype {ScaleLayout(layout).dtype}.*got {wrong}"):
        check_scales(s, (), 4, 3, layout, CPU)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_scales_wrong_shape(layout):
    s = empty_scales((), 4, 3, layout, "cpu")
    with pytest.raises(ValueError, match=r"scale_out must have shape \[5, .*got \[4, "):
        check_scales(s, (), 5, 3, layout, CPU)
    with pytest.raises(ValueError, match=r"scale_out must have shape \[2, 4, .*got \[4, "):
        check_scales(s, (2,), 4, 3, layout, CPU)  # 2-D buffer for a 3-D input


@pytest.mark.parametrize("layout", ["col", "ue8m0_packed"])
def test_check_scales_wrong_strides_col(layout):
    # Row-major storage of the right shape: what a caller gets from torch.empty(shape).
    M, G = 5, 6
    s = torch.empty(scale_shape((), M, G, layout), dtype=ScaleLayout(layout).dtype)
    with pytest.raises(ValueError, match=r"scale_out must have strides \(1, 8\).*got \(\d+, 1\)"):
        check_scales(s, (), M, G, layout, CPU)
    # Column-major but unpadded (strides (1, M)): cuBLASLt and DeepGEMM's TMA want (1, M_pad).
    unpadded = torch.empty(s.shape[::-1], dtype=s.dtype).t()
    with pytest.raises(ValueError, match=r"strides \(1, 8\).*got \(1, 5\)"):
        check_scales(unpadded, (), M, G, layout, CPU)


def test_check_scales_wrong_strides_row():
    s = empty_scales((), 5, 6, "col", "cpu")  # right dtype and shape, column-major
    with pytest.raises(ValueError, match=r"scale_out must have strides \(6, 1\).*got \(1, 8\)"):
        check_scales(s, (), 5, 6, "row", CPU)


def test_check_scales_wrong_batch_stride():
    # Each batch entry's matrix must start G * M_pad elements after the previous one.
    s = empty_scales((3,), 5, 6, "col", "cpu")
    other = torch.empty(3, 6, 12).transpose(-1, -2)[:, :5, :]  # M padded to 12, not 8
    with pytest.raises(ValueError, match=r"strides \(48, 1, 8\).*got \(72, 1, 12\)"):
        check_scales(other, (3,), 5, 6, "col", CPU)
    check_scales(s, (3,), 5, 6, "col", CPU)


def test_check_scales_wrong_device_and_type():
    s = empty_scales((), 4, 3, "row", "meta")
    with pytest.raises(ValueError, match=r"scale_out must be on cpu like the input; got meta"):
        check_scales(s, (), 4, 3, "row", CPU)
    with pytest.raises(TypeError, match=r"scale_out must be a torch.Tensor; got list"):
        check_scales([1.0], (), 4, 3, "row", CPU)
    with pytest.raises(TypeError, match=r"^my_scales must"):  # the caller's argument name is reported
        check_scales(s.to(torch.int32), (), 4, 3, "row", torch.device("meta"), name="my_scales")


def test_check_scales_ignores_strides_of_size_one_dims():
    # M = 1 row-major [1, G] and column-major [1, G] address the same elements only if G == 1.
    check_scales(torch.empty(1, 1), (), 1, 1, "col", CPU)
    check_scales(torch.empty(0, 3), (), 0, 3, "col", CPU)  # nothing to address at M = 0


# ------------------------------------------------------------------------------------------------
# UE8M0 packing
# ------------------------------------------------------------------------------------------------

def _expected_words(exponents: list[list[int]]) -> torch.Tensor:
    """Pack per-row exponent bytes into signed int32 words with Python integers, byte b of word j
    = group 4j+b, missing groups 0."""
    rows = []
    for row in exponents:
        words = []
        for j in range(math.ceil(len(row) / 4)):
            word = 0
            for b in range(4):
                if 4 * j + b < len(row):
                    word |= row[4 * j + b] << (8 * b)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)  # as a signed int32
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def test_pack_ue8m0_by_hand_G5():
    """G = 5, one row, scales 1, 2, 4, 8, 16 -> biased exponents 127..131 = 0x7F, 0x80, 0x81, 0x82, 0x83.

    Word 0 holds groups 0..3, group 0 in the low byte: 0x82_81_80_7F, which as a signed int32 is
    0x8281807F - 2**32 = -2105442177. Word 1 holds group 4 in its low byte and zeros for the missing
    groups 5..7: 0x00_00_00_83 = 131.
    """
    s = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])
    packed = pack_ue8m0(s)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (1, 2)
    assert packed.tolist() == [[-2105442177, 131]]
    assert_bitwise_equal(unpack_ue8m0(packed, 5), s, "unpacked")


@pytest.mark.parametrize("G", [1, 2, 3, 4, 5, 6, 7, 56])
def test_pack_ue8m0_byte_positions(G):
    M = 3
    # Distinct exponents per (row, group), including 0xFE (the largest finite) and 0x01 (smallest normal).
    exps = [[(1 + 37 * r + 11 * j) % 254 + 1 for j in range(G)] for r in range(M)]
    exps[0][0] = 0xFE
    exps[-1][-1] = 0x01
    s = (torch.tensor(exps, dtype=torch.int32) << 23).view(torch.float32)
    packed = pack_ue8m0(s)
    expected = _expected_words(exps)
    assert_bitwise_equal(packed, expected, f"packed G={G}")
    # Bytes past G are 0: look at the raw little-endian bytes of the last word.
    raw = packed.contiguous().view(torch.uint8).reshape(M, -1)
    assert raw[:, G:].eq(0).all(), raw
    assert_bitwise_equal(unpack_ue8m0(packed, G), s, f"round trip G={G}")


def test_pack_ue8m0_nan_and_batched():
    s = torch.exp2(torch.randint(-40, 40, (2, 3, 7)).float())
    s[1, 2, 6] = float("nan")  # a poisoned group's scale: UE8M0's NaN byte is 0xFF
    packed = pack_ue8m0(s)
    assert tuple(packed.shape) == (2, 3, 2)
    assert (int(packed[1, 2, 1]) >> 16) & 0xFF == 0xFF
    assert_bitwise_equal(packed[0], pack_ue8m0(s[0]), "batch 0")
    back = unpack_ue8m0(packed, 7)
    assert torch.isnan(back[1, 2, 6])
    assert torch.equal(back.nan_to_num(0), s.nan_to_num(0))


def test_pack_unpack_reject_wrong_dtype():
    with pytest.raises(TypeError, match=r"s_row must be float32; got torch.float16"):
        pack_ue8m0(torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"packed must be int32; got torch.float32"):
        unpack_ue8m0(torch.ones(2, 3), 9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scales_to_row(layout):
    M, G = 5, 6
    s_row = torch.exp2(torch.randint(-20, 20, (2, M, G)).float())
    s = empty_scales((2,), M, G, layout, "cpu")
    s.copy_(pack_ue8m0(s_row) if layout == "ue8m0_packed" else s_row)
    back = scales_to_row(s, G, layout)
    assert back.is_contiguous()
    assert_bitwise_equal(back, s_row, layout)
