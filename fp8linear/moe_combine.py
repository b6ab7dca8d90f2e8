"""The MoE combine: each token's k expert outputs, times their routing weights, summed, in one pass.

    out[t, :] = fp32 sum over j = 0, 1, .., k-1 in order of  P(y[t, j, :] * w[t, j]),  rounded to P, then
                to out_dtype                                  P = torch.promote_types(y.dtype, w.dtype)

This is transformers' combine, `(y * w.unsqueeze(-1)).sum(dim=1).to(out_dtype)`, with the order of the
sum fixed: each product rounded to P as torch's multiply rounds it, the sum over the k slots accumulated
in fp32 slot by slot (torch's reduction picks its own order, which differs by CPU and GPU in the last
bits of an fp32 sum), rounded once to P. As torch ops it is three passes that write a [T, k, H] product
(in fp32 for DeepSeek-V3's fp32 routing weights: twice y's bytes) and read it back; the Triton kernel
reads y once and writes out once.

Where it runs: the kernel on CUDA tensors (Triton's interpreter under TRITON_INTERPRET=1, for the tests;
the interpreter truncates fp32 to bf16 where a GPU rounds to nearest even), a loop of k torch ops in the
same order elsewhere: both give the same bits.
"""

# (no `from __future__ import annotations`: triton.jit reads the tl.constexpr annotations as objects)

import functools

import torch

from .backends.triton_blockwise import _interpret, tl, triton

BLOCK_H = 1024  # columns per program: 8 x 128-bit loads per thread at 4 warps of bf16


def _kernel_source(y_ptr, w_ptr, out_ptr, H, k,
                   stride_yt, stride_yj, stride_yh, stride_wt, stride_wj, stride_ot, stride_oh,
                   P_IS_FP32: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.full((BLOCK_H,), 0.0, dtype=tl.float32)
    for j in range(0, k):
        w = tl.load(w_ptr + t * stride_wt + j * stride_wj).to(tl.float32)
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


def _check(y: torch.Tensor, weights: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or not y.is_floating_point():
        raise ValueError(f"y must be a float tensor [T, k, H]; got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}")
    if (not isinstance(weights, torch.Tensor) or tuple(weights.shape) != tuple(y.shape[:2])
            or not weights.is_floating_point()):
        raise ValueError(f"weights must be a float tensor [T, k] = {list(y.shape[:2])} (y's first two dims); got "
                         f"{getattr(weights, 'dtype', type(weights).__name__)} {list(getattr(weights, 'shape', []))}")
    if weights.device != y.device:
        raise ValueError(f"weights is on {weights.device} but y on {y.device}; both must be on one device")


def combine_slots(y: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y [T, k, H] (expert outputs per (token, slot)), weights [T, k] (routing weights) -> [T, H] in
    out_dtype: sum_j y[t, j] * weights[t, j], as transformers combines (module docstring). Any strides;
    neither input is modified."""
    _check(y, weights)
    P = torch.promote_types(y.dtype, weights.dtype)
    T, k, H = y.shape
    use_kernel = (triton is not None and (y.is_cuda or _interpret()) and P in (torch.float32, y.dtype)
                  and y.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if not use_kernel or T == 0 or H == 0:
        acc = torch.zeros((T, H), dtype=torch.float32, device=y.device)
        for j in range(k):
            acc += (y[:, j] * weights[:, j, None]).float()  # the product rounded to P by torch's multiply
        return acc.to(P).to(out_dtype)
    out = torch.empty((T, H), dtype=out_dtype, device=y.device)
    launch = dict(P_IS_FP32=P == torch.float32, BLOCK_H=BLOCK_H, num_warps=4)
    if not _interpret():
        launch["enable_fp_fusion"] = False
    sy, sw = y.stride(), weights.stride()
    _kernel(_interpret())[(T, -(-H // BLOCK_H))](
        y, weights, out, H, k, sy[0], sy[1], sy[2], sw[0], sw[1], H, 1, **launch)
    return out

