"""DESIGN.md's quantization semantics in plain torch, on any device: the bit-exact oracle for the kernel.

Per row and group of g consecutive elements (DESIGN.md "Quantization semantics"):

    amax  = max(|x|) over the group, in fp32; amax = max(amax, eps)
    scale = amax / QMAX                      QMAX = 448 (fp8 e4m3fn) or 127 (int8); IEEE fp32 division
    scale = 2 ** ceil(log2(scale))           only with power-of-two scales, by exponent bits
    q     = x * (1 / scale)                  one correctly rounded reciprocal, then an fp32 multiply
    fp8:  clamp to [-448, 448], round to nearest even;  int8: round half to even, clamp to [-128, 127]

Non-finite input (our documented choice): a group holding a NaN or +-Inf is poisoned as a whole: its
scale is NaN (and its UE8M0 exponent byte 0xFF, UE8M0's NaN), its fp8 bytes are 0x7F (NaN) and its int8
bytes 0, so the dequantized group is NaN whatever the output dtype and the error cannot pass unseen.

Every division here has a tensor divisor on purpose: torch on CUDA rewrites a division by a Python
scalar into a multiply by its reciprocal, which is not the IEEE quotient the kernel computes.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX", "per_token_group_quant_reference", "ceil_to_power_of_two", "dequantize_groups"]

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
FP8_NAN_BYTE = 0x7F

# What the quantization ops accept (fp8linear.ops, fp8linear.fused), checked before any kernel runs.
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, 256)
SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_OUTPUT_DTYPES = tuple(QMAX)
#: eps below this lets 1/scale overflow to inf (amax/448 must stay above ~3e-39).
MIN_EPS = 1e-30


def ceil_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(scale)) for positive finite fp32, exactly: bump the exponent when any mantissa bit
    is set, then clear the mantissa (DESIGN.md "power-of-two scales"). NaN stays NaN."""
    bits = scale.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    exponent = exponent + (mantissa != 0).to(torch.int32)
    result = (exponent << 23).view(torch.float32)
    return torch.where(torch.isnan(scale), scale, result)


def per_token_group_quant_reference(
    x: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] per group of `group_size` along K.

    Returns q [..., K] (`dtype`, contiguous) and s [..., K / group_size] (fp32, row-major). No argument
    checking: `fp8linear.per_token_group_quant` checks, then calls this on CPU.
    """
    K = x.shape[-1]
    G = K // group_size
    xf = x.float().reshape(*x.shape[:-1], G, group_size)  # [..., G, g]; x itself when x is fp32: read only

    # CPU forwards run this on every call: few passes over [..., K], each step per group on [..., G].
    amax = xf.abs().amax(dim=-1).clamp_min_(eps)  # [..., G]; NaN propagates, an Inf gives Inf
    nonfinite = ~torch.isfinite(amax)  # [..., G]: the group holds a NaN or an Inf (see the module docstring)
    scale = amax / torch.full_like(amax, QMAX[dtype])
    if scale_ue8m0:
        scale = ceil_to_power_of_two(scale)
    inv = torch.ones_like(scale) / scale
    y = xf * inv.unsqueeze(-1)  # [..., G, g], a new tensor: the steps below work in place

    if dtype == torch.int8:
        q = y.round_().clamp_(-128.0, 127.0).to(torch.int8)
        q_bits, poison = q, 0
    else:
        q = y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        q_bits, poison = q.view(torch.uint8), FP8_NAN_BYTE
    if nonfinite.any():  # rare: on CPU a host check costs less than a pass over every byte
        q_bits.masked_fill_(nonfinite.unsqueeze(-1), poison)
        scale = scale.masked_fill(nonfinite, float("nan"))
    return q.reshape(x.shape), scale


#: Every fp8 e4m3fn byte's fp32 value, as torch converts it (NaN for 0x7F and 0xFF).
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _to_float(q: torch.Tensor) -> torch.Tensor:
    """q.float(), always a new tensor. fp8 on CPU by a 256-entry table: torch's CPU fp8 -> fp32 conversion is
    a scalar loop, and on two cores the gather ran in about half its time (docs/benchmarks.md, "CPU forward")."""
    if q.dtype == torch.float8_e4m3fn and q.device.type == "cpu":
        return _E4M3_VALUES.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)
    return q.float()


def dequantize_groups(q: torch.Tensor, s_row: torch.Tensor) -> torch.Tensor:
    """q [..., K] times its row-major scales [..., G], in fp32: what a blockwise GEMM sees as its LHS."""
    G = s_row.shape[-1]
    K = q.shape[-1]
    qf = _to_float(q).reshape(*q.shape[:-1], G, K // G)  # a new tensor: scaled in place
    return qf.mul_(s_row.unsqueeze(-1)).reshape(q.shape)
