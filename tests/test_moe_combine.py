"""fp8linear.moe_combine: the MoE combine against independent references, its kernel under Triton's interpreter.

References: where k <= 2 every order of the sum gives the same bits, so transformers' own expression
`(y * w.unsqueeze(-1)).sum(dim=1).to(out_dtype)` is the reference; for larger k the slot-by-slot order
is checked against NumPy's IEEE float32 / float16 arithmetic, written out here. The interpreter truncates
fp32 to bf16 where a GPU rounds to nearest even, so bf16 products are compared bit for bit on the CPU path
and on the GPU (tests/test_moe_gpu.py), and within that truncation under the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fp8linear.moe_combine import combine_slots

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
#: (y dtype, routing weights dtype, output dtype): Qwen's routers (x's dtype), DeepSeek-V3's (fp32), and mixes.
DTYPES = [(BF16, BF16, BF16), (BF16, FP32, BF16), (FP16, FP16, FP16), (FP16, BF16, FP16), (FP32, FP32, FP32),
          (FP32, BF16, BF16)]
IDS = ["-".join(str(d).split(".")[-1] for d in t) for t in DTYPES]


def _inputs(T, k, H, y_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(T, k, H, generator=g) * 4).to(y_dtype)
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(w_dtype)
    return y, w


def _slot_order_numpy(y: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The module's definition in NumPy: each product rounded to P, fp32 sum slot by slot, rounded to P."""
    P = torch.promote_types(y.dtype, w.dtype)
    assert P in (FP32, FP16), "NumPy has no bfloat16"
    np_p = np.float32 if P == FP32 else np.float16
    yf, wf = y.float().numpy(), w.float().numpy()
    acc = np.zeros((y.shape[0], y.shape[2]), dtype=np.float32)
    for j in range(y.shape[1]):
        product = (yf[:, j, :] * wf[:, j, None]).astype(np_p)  # exact in fp32 for fp16 operands, then rounded
        acc = (acc + product.astype(np.float32)).astype(np.float32)
    return torch.from_numpy(acc.astype(np_p)).to(out_dtype)


@pytest.fixture(params=["cpu", "interpreted"])
def path(request):
    """The torch path, or the Triton kernel under the interpreter."""
    if request.param == "interpreted":
        request.getfixturevalue("triton_interpreter")
    return request.param


def _truncating(path, y, w, out_dtype) -> bool:
    return path == "interpreted" and BF16 in (torch.promote_types(y.dtype, w.dtype), out_dtype)


def _assert_same(path, out, expected, y, w):
    """Equal bits, or within bf16's truncation under the interpreter (module docstring)."""
    if _truncating(path, y, w, out.dtype):  # a few bf16 steps of the sum of |products|
        bound = 2 ** -6 * (y.float().abs() * w.float().abs().unsqueeze(-1)).sum(dim=1)
        assert ((out.float() - expected.float()).abs() <= bound).all()
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
@pytest.mark.parametrize("k", [1, 2])
def test_where_order_cannot_matter_it_is_transformers_combine(path, dtypes, k):
    y_dtype, w_dtype, out_dtype = dtypes
    y, w = _inputs(5, k, 1100, y_dtype, w_dtype)  # 1100: a partial column block
    expected = (y * w.unsqueeze(-1)).sum(dim=1).to(out_dtype)
    out = combine_slots(y, w, out_dtype)
    assert out.dtype == out_dtype and out.shape == (5, 1100)
    _assert_same(path, out, expected, y, w)


@pytest.mark.parametrize("dtypes", [d for d in DTYPES if BF16 not in d[:2]], ids=[i for i, d in zip(IDS, DTYPES)
                                                                                    if BF16 not in d[:2]])
@pytest.mark.parametrize("k", [3, 8])
def test_slot_by_slot_sum_matches_numpy(path, dtypes, k):
    y_dtype, w_dtype, out_dtype = dtypes
    y, w = _inputs(7, k, 300, y_dtype, w_dtype, seed=k)
    assert torch.equal(combine_slots(y, w, out_dtype), _slot_order_numpy(y, w, out_dtype))


@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_kernel_equals_the_cpu_path(triton_interpreter, monkeypatch, dtypes):
    y_dtype, w_dtype, out_dtype = dtypes
    y, w = _inputs(4, 8, 2100, y_dtype, w_dtype, seed=3)
    kernel = combine_slots(y, w, out_dtype)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch loop
    torch_path = combine_slots(y, w, out_dtype)
    _assert_same("interpreted", kernel, torch_path, y, w)


def test_any_strides_and_inputs_left_alone(path):
    y, w = _inputs(6, 4, 260, FP32, FP32, seed=5)
    expected = combine_slots(y, w, FP32)
    y_strided = torch.randn(6, 260, 4 * 2).to(FP32)[:, :, ::2].transpose(1, 2)  # [6, 4, 260], non-contiguous
    y_strided.copy_(y)
    w_strided = w.t().contiguous().t()
    before = (y_strided.clone(), w_strided.clone())
    assert not y_strided.is_contiguous() and not w_strided.is_contiguous()
    assert torch.equal(combine_slots(y_strided, w_strided, FP32), expected)
    assert torch.equal(y_strided, before[0]) and torch.equal(w_strided, before[1])


@pytest.mark.parametrize("T,k,H", [(0, 8, 256), (3, 0, 256), (1, 8, 1), (1, 1, 7168)])
def test_edge_shapes(path, T, k, H):
    y, w = _inputs(T, k, H, FP32, FP32, seed=T + k + H)
    out = combine_slots(y, w, BF16)
    assert out.shape == (T, H) and out.dtype == BF16
    _assert_same(path, out, _slot_order_numpy(y, w, BF16), y, w)


@pytest.mark.parametrize("y,w,what", [
    (torch.randn(3, 4), torch.rand(3, 4), "y must be a float tensor \\[T, k, H\\]"),
    (torch.randint(0, 5, (3, 4, 8)), torch.rand(3, 4), "y must be a float tensor"),
    (torch.randn(3, 4, 8), torch.rand(3, 2), "weights must be a float tensor \\[T, k\\] = \\[3, 4\\]"),
    (torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.int64), "weights must be a float tensor"),
    (torch.randn(3, 4, 8), torch.rand(3, 4, device="meta"), "weights is on meta but y on cpu; both must be on one"),
])
def test_bad_input_names_the_argument(y, w, what):
    with pytest.raises(ValueError, match=what):
        combine_slots(y, w, BF16)


# -- rows: slots read from a grouped layout [R, H] ------------------------------------------------------------

def _grouped(y: torch.Tensor, missing: torch.Tensor, rows_dtype, seed: int):
    """y [T, k, H] scattered to random distinct rows of a [R, H] layout whose other rows are NaN (a slot
    that read one would show), slots in `missing` pointing at no row (-1)."""
    T, k, H = y.shape
    g = torch.Generator().manual_seed(seed)
    R = 2 * T * k + 3
    rows = torch.randperm(R, generator=g)[:T * k].view(T, k)
    rows = torch.where(missing, torch.full_like(rows, -1), rows).to(rows_dtype)
    layout = torch.full((R, H), float("nan"), dtype=y.dtype)
    layout[rows[~missing].long()] = y[~missing]
    return layout, rows


@pytest.mark.parametrize("dtypes", [d for d in DTYPES if BF16 not in d[:2]], ids=[i for i, d in zip(IDS, DTYPES)
                                                                                    if BF16 not in d[:2]])
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
def test_rows_read_the_grouped_layout(path, dtypes, rows_dtype):
    y_dtype, w_dtype, out_dtype = dtypes
    y, w = _inputs(6, 8, 300, y_dtype, w_dtype, seed=11)
    missing = torch.rand(6, 8, generator=torch.Generator().manual_seed(12)) < 0.25
    missing[0] = True  # a token with no expert at all
    layout, rows = _grouped(y, missing, rows_dtype, seed=13)
    expected = _slot_order_numpy(y.masked_fill(missing.unsqueeze(-1), 0), w, out_dtype)
    before = (layout.clone(), rows.clone())
    assert torch.equal(combine_slots(layout, w, out_dtype, rows=rows), expected)
    assert torch.equal(layout.nan_to_num(7.0), before[0].nan_to_num(7.0)) and torch.equal(rows, before[1])


def test_rows_in_bf16_equal_the_pair_order_combine(path):
    y, w = _inputs(5, 8, 1100, BF16, BF16, seed=21)
    missing = torch.zeros(5, 8, dtype=torch.bool)
    missing[2, 3] = True
    layout, rows = _grouped(y, missing, torch.int64, seed=22)
    assert torch.equal(combine_slots(layout, w, BF16, rows=rows),
                       combine_slots(y.masked_fill(missing.unsqueeze(-1), 0), w, BF16))


def test_rows_naming_no_row_of_an_empty_layout(path):
    w = torch.rand(3, 2)
    out = combine_slots(torch.empty(0, 260), w, BF16, rows=torch.full((3, 2), -1))
    assert out.shape == (3, 260) and not out.any()


@pytest.mark.parametrize("rows,what,error", [
    (torch.zeros(3, 4), "rows must be an int32 or int64 tensor \\[T, k\\]", ValueError),
    (torch.zeros(12, dtype=torch.int64), "rows must be an int32 or int64 tensor", ValueError),
    (torch.zeros(3, 2, dtype=torch.int64), "weights must be a float tensor \\[T, k\\] = \\[3, 2\\] \\(rows'",
     ValueError),
    (torch.full((3, 4), 9), "rows names a row past y's first dimension", RuntimeError),
])
def test_bad_rows_name_the_argument(path, rows, what, error):
    with pytest.raises(error, match=what):
        combine_slots(torch.randn(9, 16), torch.rand(3, 4), BF16, rows=rows)
