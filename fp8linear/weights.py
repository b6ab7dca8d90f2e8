"""128x128 block quantization of weights into `weight` / `weight_scale_inv`, and back.

DESIGN.md "Weights": for each block (partial at the bottom and right edges when N or K is not a
multiple of the block),

    weight_scale_inv[i, j] = max(|W[block]|, eps) / QMAX      (the multiplier that dequantizes)
    weight                 = clamp(W / weight_scale_inv, +-QMAX) rounded to the dtype

QMAX is 448 for fp8 e4m3fn, 127 for int8 (int8 rounds half to even). Optional power-of-two scales
(`scale_ue8m0=True`) round weight_scale_inv up to 2**ceil(log2(.)) as the activations do.
"""

from __future__ import annotations

import math

import torch

from .reference import QMAX, ceil_to_power_of_two

__all__ = ["quantize_weight_blockwise", "dequantize_weight_blockwise", "expand_block_scales"]


def _check_block(block_size: tuple[int, int]) -> tuple[int, int]:
    if len(block_size) != 2 or any(not isinstance(b, int) or b <= 0 for b in block_size):
        raise ValueError(f"block_size must be two positive ints (rows, cols); got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def expand_block_scales(scale: torch.Tensor, N: int, K: int, block_size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """[ceil(N/bn), ceil(K/bk)] block scales -> [N, K], each block's scale repeated over its elements."""
    bn, bk = _check_block(block_size)
    return scale.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]


def quantize_weight_blockwise(
    weight: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: tuple[int, int] = (128, 128),
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (weight [N, K] in `dtype`, weight_scale_inv fp32 [ceil(N/bn), ceil(K/bk)]).

    Computed in fp32 on W's device; W itself is not modified.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K]; got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor; got {weight.dtype}")
    if dtype not in QMAX:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.int8; got {dtype}")
    bn, bk = _check_block(block_size)
    N, K = weight.shape
    nb, kb = -(-N // bn), -(-K // bk)
    w = weight.detach().float()  # weight itself when it is fp32: only read
    # Pad to whole blocks with zeros (zeros never raise a block's amax); whole blocks need no copy.
    padded = torch.nn.functional.pad(w, (0, kb * bk - K, 0, nb * bn - N)) if (N % bn or K % bk) else w
    blocks = padded.reshape(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb, kb]
    amax = torch.maximum(amax, torch.full_like(amax, eps))
    scale_inv = amax / torch.full_like(amax, QMAX[dtype])
    if scale_ue8m0:
        scale_inv = ceil_to_power_of_two(scale_inv)
    q = saturate_(blocks / scale_inv[:, None, :, None], dtype)  # [nb, bn, kb, bk], a new tensor
    out = torch.empty((N, K), dtype=dtype, device=w.device)
    return out.copy_(q.reshape(nb * bn, kb * bk)[:N, :K]), scale_inv  # copy_ rounds as .to(dtype) does


def saturate_(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32, already divided by its scale), in place, ready for the cast to `dtype`: int8 rounded half to
    even and clamped to [-128, 127]; fp8 clamped to +-QMAX, the cast rounding it (to nearest, ties even).
    The one rounding of weights: quantize_weight_blockwise and fp8linear.calibrate use it."""
    if dtype == torch.int8:
        return x.round_().clamp_(-128.0, 127.0)
    return x.clamp_(-QMAX[dtype], QMAX[dtype])


def dequantize_weight_blockwise(
    weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """(weight [N, K], weight_scale_inv [ceil(N/bn), ceil(K/bk)]) -> fp32 [N, K]."""
    N, K = weight.shape
    return weight.float() * expand_block_scales(weight_scale_inv.float(), N, K, block_size)


def check_linear_operands(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                          bias: "torch.Tensor | None", eps: float) -> None:
    """The checks the fused linear ops' wrappers share (fp8linear.backends.small_m and .sm90), after each has
    checked x and weight's dtype and [N, K] shape: weight_scale_inv fp32 [ceil(N/128), K/128], bias a float
    [N] or None, every tensor on x's device, eps a finite float >= 1e-30. Raises ValueError naming the
    argument."""
    N, K = weight.shape
    shape_s = (math.ceil(N / 128), math.ceil(K / 128))
    if (not isinstance(weight_scale_inv, torch.Tensor) or weight_scale_inv.dtype != torch.float32
            or tuple(weight_scale_inv.shape) != shape_s):
        raise ValueError(
            f"weight_scale_inv must be float32 of shape {list(shape_s)} ([ceil(N/128), K/128]); got "
            f"{getattr(weight_scale_inv, 'dtype', None)} {list(getattr(weight_scale_inv, 'shape', []))}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)
                             or bias.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        raise ValueError(f"bias must be a bf16/fp16/fp32 tensor of shape [{N}] or None; got "
                         f"{getattr(bias, 'dtype', None)} {list(getattr(bias, 'shape', []))}")
    for name, t in (("weight", weight), ("weight_scale_inv", weight_scale_inv), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 1e-30):
        raise ValueError(f"eps must be a finite float >= 1e-30; got {eps!r}")
