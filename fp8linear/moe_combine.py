"""The MoE combine: each token's k expert outputs, times their routing weights, summed, in one pass.

    out[t, :] = fp32 sum over j = 0, 1, .., k-1 in order of  P(y[t, j, :] * w[t, j]),  rounded to P, then
                to out_dtype                                  P = torch.promote_types(y.dtype, w.dtype)

This is transformers' combine, `(y * w.unsqueeze(-1)).sum(dim=1).to(out_dtype)`, with the order of the
sum fixed: each product rounded to P as torch's multiply rounds it, the sum over the k slots accumulated
in fp32 slot by slot (torch's reduction picks its own order, which differs by CPU and GPU in the last
bits of an fp32 sum), rounded once to P. As torch ops it is three passes that write a [T, k, H] product
(in fp32 for DeepSeek-V3's fp32 routing weights: twice y's bytes) and read it back; the Triton kernel
reads y once and writes out once.

With `rows` [T, k], y holds the expert outputs as rows of a grouped layout, [R, H], and slot (t, j)
reads y[rows[t, j]] (a row below zero reads zeros: a slot that named no expert): the layouts that group
the pairs by expert (contiguous, masked) are combined where they lie, without a copy back into pair order.

Where it runs: the kernel on CUDA tensors (Triton's interpreter under TRITON_INTERPRET=1, for the tests;
the interpreter truncates fp32 to bf16 where a GPU rounds to nearest even), a loop of k torch ops in the
same order elsewhere: both give the same bits.
"""

# (no `from __future__ import annotations`: triton.jit reads the tl.constexpr annotations as objects)

import functools

import torch

from .backends.triton_blockwise import _interpret, tl, triton

BLOCK_H = 1024  # columns per program: 8 x 128-bit loads per thread at 4 warps of bf16


def _kernel_source(y_ptr, w_ptr, rows_ptr, out_ptr, H, k,
                   stride_yt, stride_yj, stride_yh, stride_wt, stride_wj, stride_rt, stride_rj, stride_ot, stride_oh,
                   P_IS_FP32: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.full((BLOCK_H,), 0.0, dtype=tl.float32)
    for j in range(0, k):
        w = tl.load(w_ptr + t * stride_wt + j * stride_wj).to(tl.float32)
        if HAS_ROWS:  # y is [R, H]: the slot's row, or zeros where it is below zero
            row = tl.load(rows_ptr + t * stride_rt + j * stride_rj).to(tl.int64)
            width = tl.where(row >= 0, H, 0)
            y = tl.load(y_ptr + row * stride_yt + cols * stride_yh, mask=cols < width, other=0.0).to(tl.float32)
        else:
            y = tl.load(y_ptr + t * stride_yt + j * stride_yj + cols * stride_yh, mask=ok, other=0.0).to(tl.float32)
        if P_IS_FP32:
            acc += y * w  # launched with enable_fp_fusion=False: a rounded product, then the add (torch's two ops)
        else:
            acc += (y * w).to(y_ptr.dtype.element_ty).to(tl.float32)  # exact in fp32, rounded to P = y's dtype
    if not P_IS_FP32:
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)  # the sum rounded to P once
    tl.store(out_ptr + t * stride_ot + cols * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    return triton.jit(_kernel_source)


def _check(y: torch.Tensor, weights: torch.Tensor, rows: "torch.Tensor | None") -> None:
    want, dims = ("[R, H]", 2) if rows is not None else ("[T, k, H]", 3)
    if not isinstance(y, torch.Tensor) or y.dim() != dims or not y.is_floating_point():
        raise ValueError(f"y must be a float tensor {want}; got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}")
    if rows is not None:
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rows must be an int32 or int64 tensor [T, k]; got "
                             f"{getattr(rows, 'dtype', type(rows).__name__)} {list(getattr(rows, 'shape', []))}")
        if rows.device != y.device:
            raise ValueError(f"rows is on {rows.device} but y on {y.device}; both must be on one device")
    slots = tuple(rows.shape) if rows is not None else tuple(y.shape[:2])
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != slots or not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor [T, k] = {list(slots)} "
                         f"({'rows' if rows is not None else 'y'}'s first two dims); got "
                         f"{getattr(weights, 'dtype', type(weights).__name__)} {list(getattr(weights, 'shape', []))}")
    if weights.device != y.device:
        raise ValueError(f"weights is on {weights.device} but y on {y.device}; both must be on one device")


def slots_at_rows(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """y [R, H] read at rows [T, k] -> [T, k, H], zeros where a row is below zero: the [T, k, H] that
    `combine_slots(y, weights, out_dtype, rows=rows)` combines."""
    T, k = rows.shape
    if y.shape[0] == 0:  # every row below zero (combine_slots checks that before it gets here)
        return y.new_zeros((T, k, y.shape[-1]))
    return y[rows.clamp(min=0)].masked_fill((rows < 0).unsqueeze(-1), 0)


def combine_slots(y: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype,
                  rows: "torch.Tensor | None" = None) -> torch.Tensor:
    """y [T, k, H] (expert outputs per (token, slot)), weights [T, k] (routing weights) -> [T, H] in
    out_dtype: sum_j y[t, j] * weights[t, j], as transformers combines (module docstring). With rows
    [T, k] (int32 or int64), y is [R, H] and slot (t, j) reads y[rows[t, j]], zeros where that is below
    zero; a row >= R raises (on a GPU asynchronously, as a device-side assert). Any strides; no input is
    modified."""
    _check(y, weights, rows)
    P = torch.promote_types(y.dtype, weights.dtype)
    T, k = weights.shape
    H = y.shape[-1]
    if rows is not None and rows.numel() and not torch.compiler.is_compiling():
        torch._assert_async(rows.max() < y.shape[0], "combine_slots: rows names a row past y's first dimension")
    use_kernel = (triton is not None and (y.is_cuda or _interpret()) and P in (torch.float32, y.dtype)
                  and y.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if not use_kernel or T == 0 or H == 0:
        if rows is not None:
            y = slots_at_rows(y, rows)
        acc = torch.zeros((T, H), dtype=torch.float32, device=y.device)
        for j in range(k):
            acc += (y[:, j] * weights[:, j, None]).float()  # the product rounded to P by torch's multiply
        return acc.to(P).to(out_dtype)
    out = torch.empty((T, H), dtype=out_dtype, device=y.device)
    launch = dict(P_IS_FP32=P == torch.float32, HAS_ROWS=rows is not None, BLOCK_H=BLOCK_H, num_warps=4)
    if not _interpret():
        launch["enable_fp_fusion"] = False
    sw = weights.stride()
    if rows is None:
        sy, sr, rows = y.stride(), (0, 0), weights  # rows_ptr unread
    else:
        sy, sr = (y.stride(0), 0, y.stride(1)), rows.stride()
    _kernel(_interpret())[(T, -(-H // BLOCK_H))](
        y, weights, rows, out, H, k, sy[0], sy[1], sy[2], sw[0], sw[1], sr[0], sr[1], H, 1, **launch)
    return out
