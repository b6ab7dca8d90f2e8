"""Inputs and the op call shared by tests/test_small_m.py (CPU: the op against an emulation) and
tests/test_small_m_gpu.py (the CUDA op against the CPU op): `fp8linear::small_m_linear` positional as its
schema, seeded generators whose every 128-group of x and 128x128 block of W has its own magnitude, and the
opcheck sample.
"""

from __future__ import annotations

import torch

from fp8linear.weights import quantize_weight_blockwise

FP8, INT8 = torch.float8_e4m3fn, torch.int8
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
GROUP = 128
EPS = 1e-10


def op(x, weight, weight_scale_inv, bias=None, scale_ue8m0=False, eps=EPS):
    """The registered op itself, positional as its schema (not the wrapper)."""
    return torch.ops.fp8linear.small_m_linear(x, weight, weight_scale_inv, bias, scale_ue8m0, eps)


def make_x(M: int, K: int, dtype: torch.dtype = BF16, seed: int = 0) -> torch.Tensor:
    """x [M, K] in `dtype` on CPU, contiguous: randn per 128-group times 10**uniform(-1, 1), and (when a
    row has several groups) the middle group of the last row all zeros."""
    gen = torch.Generator().manual_seed(seed)
    G = K // GROUP
    magnitude = 10.0 ** (torch.rand(M, G, 1, generator=gen) * 2 - 1)  # [M, G, 1]
    x = (torch.randn(M, G, GROUP, generator=gen) * magnitude).reshape(M, K)
    if M > 0 and G > 1:
        x[-1, (G // 2) * GROUP:(G // 2 + 1) * GROUP] = 0.0
    return x.to(dtype)


def make_weight(N: int, K: int, dtype: torch.dtype, scale_ue8m0: bool = False, seed: int = 1,
                device: "str | torch.device" = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K] fp8/int8, weight_scale_inv fp32 [ceil(N/128), K/128]) on `device`, each 128x128
    block with its own magnitude, quantized per DESIGN.md "Weights" (partial edge blocks when N % 128)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb, kb = -(-N // GROUP), -(-K // GROUP)
    magnitude = 0.05 * 10.0 ** (torch.rand(nb, kb, generator=gen, device=device) * 2 - 1)
    per_element = magnitude.repeat_interleave(GROUP, 0)[:N].repeat_interleave(GROUP, 1)[:, :K]
    W = torch.randn(N, K, generator=gen, device=device) * per_element
    return quantize_weight_blockwise(W, dtype, scale_ue8m0=scale_ue8m0)


def make_bias(N: int, dtype: "torch.dtype | None", seed: int = 2) -> "torch.Tensor | None":
    if dtype is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=gen).to(dtype)


def opcheck_args(device: str, dtype: torch.dtype):
    """One small case: int8 with a bf16 bias and power-of-two scales, or fp8 without bias."""
    M, N, K = 3, 200, 384
    weight, weight_scale_inv = make_weight(N, K, dtype, scale_ue8m0=dtype == INT8)
    bias = make_bias(N, BF16) if dtype == INT8 else None
    x = make_x(M, K, BF16, seed=12)
    args = (x, weight, weight_scale_inv, bias, dtype == INT8, EPS)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def opcheck_tests(dtype: torch.dtype) -> tuple[str, ...]:
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if dtype == FP8:
        # SchemaCheckMode compares the inputs before and after with arithmetic torch lacks for fp8 (as in
        # tests/test_quant_cpu.py); the int8 sample runs the schema test on the same op.
        tests = tests[1:]
    return tests
