"""fp8linear.moe_routing.sort_pairs: the counting kernel (under Triton's interpreter) against Python's sort.

The reference is written out here: the stable order of the (token, slot) pairs by expert id is Python's
sorted() on (id, pair), and bounds[e] counts the ids below e. sort_pairs must also return exactly what
SortedPairs.of returns (the torch path it replaces at small sizes).
"""

from __future__ import annotations

import pytest
import torch

from fp8linear.backends import SortedPairs
from fp8linear.moe_routing import SMALL_PAIRS, sort_pairs


def _python_sort(index: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = index.reshape(-1).tolist()
    perm = sorted(range(len(ids)), key=lambda p: (ids[p], p))
    bounds = [sum(1 for i in ids if i < e) for e in range(E + 1)]
    return torch.tensor(perm, dtype=torch.int64), torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("T,k,E,dtype", [
    (1, 8, 128, torch.int64),  # one decode token, Qwen3-MoE's routing
    (1, 8, 256, torch.int32),  # DeepSeek-V3's: more experts than pairs (bounds past the pairs' programs)
    (37, 2, 5, torch.int32),  # E not a power of two
    (300, 6, 7, torch.int64),  # many programs, many pairs per expert
    (5, 3, 200, torch.int16),
    (SMALL_PAIRS // 8, 8, 60, torch.int64),  # the kernel's largest size
])
@pytest.mark.parametrize("invalid", [False, True], ids=["valid", "with-invalid-ids"])
def test_counting_kernel_sorts_as_python(triton_interpreter, T, k, E, dtype, invalid):
    g = torch.Generator().manual_seed(T * k + E)
    lo, hi = (-3, E + 3) if invalid else (0, E)
    index = torch.randint(lo, hi, (T, k), generator=g).to(dtype)
    perm, bounds = _python_sort(index, E)
    got = sort_pairs(index, E)
    assert torch.equal(got.perm, perm) and torch.equal(got.bounds, bounds) and got.top_k == k
    ref = SortedPairs.of(index, E)
    assert torch.equal(got.perm, ref.perm) and torch.equal(got.bounds, ref.bounds)


@pytest.mark.parametrize("case", ["one-expert", "all-invalid", "strided"])
def test_counting_kernel_edge_routings(triton_interpreter, case):
    E = 9
    if case == "one-expert":
        index = torch.full((40, 4), 3, dtype=torch.int64)
    elif case == "all-invalid":
        index = torch.full((6, 2), E, dtype=torch.int64)
        index[::2] = -1
    else:  # a [T, k] view of a wider tensor, as a router's topk output sliced
        index = torch.randint(0, E, (30, 8), generator=torch.Generator().manual_seed(1))[:, 1:6:2]
        assert not index.is_contiguous()
    before = index.clone()
    perm, bounds = _python_sort(index, E)
    got = sort_pairs(index, E)
    assert torch.equal(got.perm, perm) and torch.equal(got.bounds, bounds)
    assert torch.equal(index, before)


def test_large_or_empty_routings_take_the_torch_sort(triton_interpreter):
    E = 16
    for T in (0, SMALL_PAIRS // 2 + 1):
        index = torch.randint(0, E, (T, 2), generator=torch.Generator().manual_seed(T))
        got, ref = sort_pairs(index, E), SortedPairs.of(index, E)
        assert torch.equal(got.perm, ref.perm) and torch.equal(got.bounds, ref.bounds)
