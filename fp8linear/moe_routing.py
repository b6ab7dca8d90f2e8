"""The MoE routing step of the indexed layout: the (token, slot) pairs sorted by expert, in one launch.

`sort_pairs(top_k_index, E)` returns what `fp8linear.backends.SortedPairs.of` returns, bit for bit: the
stable order of the pairs by expert id (perm) and each expert's first sorted position (bounds). That
one is a torch.sort, an arange and a searchsorted: at decode sizes (a few dozen pairs) their launches,
not their work, are the cost, and an eager one-token step is bound by the host. Up to SMALL_PAIRS pairs
on a GPU, one Triton kernel computes both by counting instead:

    position of pair p = #{q : id[q] < id[p]} + #{q < p : id[q] == id[p]}      perm[position] = p
    bounds[e]          = #{q : id[q] < e}                                      e = 0 .. E

(S^2 comparisons, in [BLOCK, BLOCK] tiles; ids outside [0, E) sort first or last, as in torch.sort).
Larger S, CPU tensors and GPUs without Triton take SortedPairs.of.
"""

# (no `from __future__ import annotations`: triton.jit reads the tl.constexpr annotations as objects)

import functools

import torch

from .backends import SortedPairs
from .backends.triton_blockwise import _interpret, tl, triton

SMALL_PAIRS = 2048  # the counting kernel's limit: S^2 / BLOCK^2 tiles stay a few microseconds of work
BLOCK = 64


def _kernel_source(ids_ptr, perm_ptr, bounds_ptr, S, E, k, stride_t, stride_j, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p_ok = i < S
    key = tl.load(ids_ptr + (i // k) * stride_t + (i % k) * stride_j, mask=p_ok, other=0).to(tl.int64)
    e = i.to(tl.int64)  # this program's experts, for bounds
    position = tl.full((BLOCK,), 0, dtype=tl.int32)
    below = tl.full((BLOCK,), 0, dtype=tl.int32)
    for q0 in range(0, S, BLOCK):
        q = q0 + tl.arange(0, BLOCK)
        q_ok = q < S
        other = tl.load(ids_ptr + (q // k) * stride_t + (q % k) * stride_j, mask=q_ok, other=0).to(tl.int64)
        ahead = (other[None, :] < key[:, None]) | ((other[None, :] == key[:, None]) & (q[None, :] < i[:, None]))
        position += tl.sum((ahead & q_ok[None, :]).to(tl.int32), axis=1)
        below += tl.sum(((other[None, :] < e[:, None]) & q_ok[None, :]).to(tl.int32), axis=1)
    tl.store(perm_ptr + position, i.to(tl.int64), mask=p_ok)
    tl.store(bounds_ptr + i, below, mask=i <= E)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    return triton.jit(_kernel_source)


def sort_pairs(top_k_index: torch.Tensor, E: int) -> SortedPairs:
    """SortedPairs.of(top_k_index [T, k] (any integer dtype, any strides), E), in one launch where
    S = T * k <= SMALL_PAIRS on a GPU (module docstring); no host synchronisation either way."""
    T, k = top_k_index.shape
    S = T * k
    if triton is None or not (top_k_index.is_cuda or _interpret()) or S == 0 or S > SMALL_PAIRS:
        return SortedPairs.of(top_k_index, E)
    device = top_k_index.device
    perm = torch.empty(S, dtype=torch.int64, device=device)
    bounds = torch.empty(E + 1, dtype=torch.int32, device=device)
    stride = top_k_index.stride()
    _kernel(_interpret())[(-(-max(S, E + 1) // BLOCK),)](
        top_k_index, perm, bounds, S, E, k, stride[0], stride[1], BLOCK=BLOCK, num_warps=4)
    return SortedPairs(perm, bounds, k)
