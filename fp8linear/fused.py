"""Fused prologues of the quantization op: SiLU-and-mul and RMSNorm, computed and quantized in one pass.

Every gated MLP runs `down_proj(silu(gate) * up)` and every decoder layer normalizes before its
projections; quantizing after those ops costs a full bf16 write and read of the intermediate. Here the
activation (or the normalized row) is computed in registers and quantized per token group at once. Two
out-variant ops in the `fp8linear` namespace, defined beside `fp8linear.ops`' own:

    silu_and_mul_quant_(Tensor x, Tensor(a!) q, Tensor(b!) s, int group_size, bool scale_ue8m0,
                        float eps, str layout) -> ()
    rmsnorm_quant_(Tensor x, Tensor weight, Tensor(a!) q, Tensor(b!) s, Tensor(c!)? normed,
                   float rms_eps, int group_size, bool scale_ue8m0, float eps, str layout) -> ()

with fakes (torch.compile), CPU implementations (the references below) and CUDA implementations
(`kernels/fused_quant.cu`, registered when `fp8linear._build` loads the library), and the public
wrappers `silu_and_mul_quant` and `rmsnorm_quant`, which check, allocate through `fp8linear.layouts`
and call the ops. The quantization step is exactly `fp8linear.reference.per_token_group_quant_reference`
applied to the prologue's output in the input dtype (DESIGN.md "Quantization semantics"); layouts as
`per_token_group_quant`.

The contract is bit-exactness between the CUDA kernels and the references of this module, which define
every floating-point step as an IEEE fp32 operation (correctly rounded add, mul, div, sqrt; no FMA):

SiLU-and-mul, for x [M, 2I] = [gate | up] (`silu_and_mul_reference`):

    t = clamp(-g, -32, 89)                  fp32; the clamp never changes 1 + exp(t) (below: exp(-32) < 2^-25,
                                            so 1 + e rounds to 1 exactly as with the true exp; above: exp
                                            overflows to inf either way)
    e = exp_fp32(t)                         our fp32 exp (`exp_fp32`), not libm's: CUDA's expf and torch's CPU
                                            exp may differ in the last bit, ours is the same on both sides
    s = (g / (1 + e)).to(x.dtype)           IEEE division (torch's own silu is x / (1 + exp(-x))), rounded
    a = (s.float() * u).to(x.dtype)         fp32 multiply, rounded; then a is quantized per group

  That is torch's `F.silu(g) * u` on bf16/fp16 tensors step for step (each op computes in fp32 and rounds
  to the tensor's dtype), so q is bit-exact with quantizing the unfused Hugging Face activation
  `act_fn(gate_proj(x)) * up_proj(x)` wherever torch's exp and ours round silu(g) to the same bf16 value
  (all of 262144 random bf16 elements on CPU; CUDA's expf differs from an exact exp by up to 2 ulp of
  fp32, which a bf16 rounding hides except near a tie). Rounding once instead (a = (silu(g) * u) in fp32,
  then to bf16) agreed with Hugging Face on only 74% of those elements, so this module rounds twice, as
  the unfused computation does. For fp32 input both roundings are the identity.

`exp_fp32(t)`: n = rint(t * log2(e)); r = (t - n * LN2_HI) - n * LN2_LO (Cody-Waite, LN2_HI has 16
trailing zero bits so n * LN2_HI is exact); p = the degree-7 Taylor polynomial of exp(r) by Horner
(|r| <= 0.35, truncation < 0.1 ulp); e = (p * 2^(n>>1)) * 2^(n - (n>>1)), two exact power-of-two
scalings that overflow to inf like the true exp. Max error about 2 ulp against the exact exp (pinned by
tests/test_fused_cpu.py). The constants are fp32 bit patterns, the same in kernels/fused_quant.cuh.
For bf16/fp16 input the CUDA kernel evaluates the same formula with fused multiply-adds (fewer
instructions): other fp32 bits for some t, but the same silu(g) after the rounding to the input dtype for
every one of the 65536 values of g, which tests/test_fused_cpu.py checks exhaustively with an exact FMA
emulation; the rounded silu is the only place the exp enters, so the spec above holds bit for bit.

RMSNorm, for x [M, H], weight [H] in x's dtype (`rmsnorm_reference`; Hugging Face's LlamaRMSNorm):

    xf = x.float(); sq = xf * xf                                   fp32
    ss = sum of sq in the fixed order below                        fp32 adds
    r  = 1 / sqrt(ss / H + rms_eps)                                IEEE division and sqrt (not rsqrtf)
    y  = (weight.float() * (xf * r).to(x.dtype).float()).to(x.dtype)
    then quantize y per group (and return it when asked: the residual path)

  "IEEE sqrt" means the correctly rounded root, which the reference computes itself (`sqrt_fp32`):
  torch.sqrt on CPU is MKL's vsSqrt, not correctly rounded on every CPU (on the H100 host it took the
  wrong side of a root 0.4998 ulp from a midpoint; r moved one ulp and a scale two).

  The summation order (the CUDA kernel's, one block of 256 threads per row): lane j in 0..255 adds, in
  this order, the squares of elements 8c .. 8c+7 for c = j, j + 256, j + 512, ... into its partial sum
  (starting from 0); then within each warp of 32 lanes pairs (j, j+16), (j, j+8), (j, j+4), (j, j+2),
  (j, j+1) are added (a butterfly); then the 8 warp sums w pair as (w, w+4), (w, w+2), (w, w+1). Hugging
  Face's `pow(2).mean(-1)` sums in torch's own order, so r may differ from it in the last fp32 bit;
  that shows in y rarely, after rounding to bf16.

Non-finite input: the quantization's rule applies to the prologue's output (a group holding a NaN or
Inf is poisoned whole: scale NaN, fp8 bytes 0x7F, int8 zeros). The `normed` output holds NaN where the
reference does, but NaN payloads (bits) may differ between CPU and GPU.
"""

from __future__ import annotations

import math

import torch

from . import _build
from .layouts import ScaleLayout, check_scales, empty_scales, pack_ue8m0
from .reference import (MIN_EPS, SUPPORTED_GROUP_SIZES, SUPPORTED_INPUT_DTYPES, SUPPORTED_OUTPUT_DTYPES,
                        per_token_group_quant_reference)

__all__ = [
    "silu_and_mul_quant",
    "rmsnorm_quant",
    "silu_and_mul_reference",
    "rmsnorm_reference",
    "exp_fp32",
    "sqrt_fp32",
    "MAX_RMSNORM_WIDTH",
    "RMSNORM_LANES",
    "RMSNORM_CHUNK",
]

#: Widest row rmsnorm_quant accepts: the CUDA kernel holds a row in the registers of 256 threads (8
#: chunks of 8 elements each at most).
MAX_RMSNORM_WIDTH = 16384
#: The fixed summation order of the sum of squares (module docstring): 256 partial sums of 8-element
#: chunks, 32 lanes per warp.
RMSNORM_LANES = 256
RMSNORM_CHUNK = 8
_WARP = 32

# fp32 constants of exp_fp32, as bit patterns (the same in kernels/fused_quant.cuh).
EXP_CONSTANT_BITS = {
    "LOG2E": 0x3FB8AA3B,  # log2(e)
    "LN2_HI": 0x3F317200,  # 0.693145751953125: ln 2 to 16 bits, so n * LN2_HI is exact for |n| < 256
    "LN2_LO": 0x35BFBE8E,  # ln 2 - LN2_HI
    "C2": 0x3F000000,  # 1/2!
    "C3": 0x3E2AAAAB,  # 1/3!
    "C4": 0x3D2AAAAB,  # 1/4!
    "C5": 0x3C088889,  # 1/5!
    "C6": 0x3AB60B61,  # 1/6!
    "C7": 0x39500D01,  # 1/7!
}
#: exp_fp32's input clamp (module docstring: invisible except for NaN).
EXP_CLAMP = (-32.0, 89.0)


def _f32(bits: int) -> torch.Tensor:
    """A 0-dim fp32 CPU tensor with these bits (a tensor, never a Python scalar: see fp8linear.reference)."""
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


# ------------------------------------------------------------------------------------------------
# references: plain torch, fp32, every step one IEEE operation
# ------------------------------------------------------------------------------------------------

def exp_fp32(t: torch.Tensor) -> torch.Tensor:
    """exp(t) for fp32 t with |t| in the clamp range (module docstring), from IEEE fp32 operations only.

    Not meant as a general exp: callers clamp first. NaN in, NaN out.
    """
    c = {k: _f32(v).to(t.device) for k, v in EXP_CONSTANT_BITS.items()}
    one = torch.ones((), dtype=torch.float32, device=t.device)
    n = torch.round(t * c["LOG2E"])  # round half to even, as the kernel's rintf
    r = t - n * c["LN2_HI"]
    r = r - n * c["LN2_LO"]
    p = r * c["C7"]
    for k in ("C6", "C5", "C4", "C3", "C2"):
        p = (p + c[k]) * r
    p = (p + one) * r
    p = p + one
    ni = torch.nan_to_num(n).to(torch.int32)  # NaN's integer is irrelevant: p is NaN then
    n1 = ni >> 1
    n2 = ni - n1
    two_n1 = ((n1 + 127) << 23).view(torch.float32)
    two_n2 = ((n2 + 127) << 23).view(torch.float32)
    return (p * two_n1) * two_n2


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """x [M, 2I] (gate | up) -> a [M, I] in x's dtype: `F.silu(g) * u` as the module docstring defines."""
    I = x.shape[-1] // 2
    g = x[..., :I].float()
    u = x[..., I:].float()
    lo, hi = (torch.full((), v, dtype=torch.float32, device=x.device) for v in EXP_CLAMP)
    t = torch.minimum(torch.maximum(-g, lo), hi)  # torch.clamp's NaN handling differs by version
    e = exp_fp32(t)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    s = (g / (one + e)).to(x.dtype)  # F.silu(g) in x's dtype
    return (s.float() * u).to(x.dtype)  # times up, in x's dtype


def sum_of_squares_fixed_order(xf: torch.Tensor) -> torch.Tensor:
    """fp32 [M, H] -> fp32 [M]: sum of xf * xf in the CUDA kernel's order (module docstring).

    H must be a multiple of 8. Padding with zero squares is exact (a sum of squares plus +0 is itself).
    """
    M, H = xf.shape
    sq = xf * xf
    span = RMSNORM_LANES * RMSNORM_CHUNK
    iters = max(1, -(-H // span))
    sq = torch.nn.functional.pad(sq, (0, iters * span - H))
    sq = sq.reshape(M, iters, RMSNORM_LANES, RMSNORM_CHUNK)  # chunk c = it * 256 + lane
    acc = torch.zeros((M, RMSNORM_LANES), dtype=torch.float32, device=xf.device)
    for it in range(iters):
        for k in range(RMSNORM_CHUNK):
            acc = acc + sq[:, it, :, k]
    acc = acc.reshape(M, RMSNORM_LANES // _WARP, _WARP)
    width = _WARP
    while width > 1:  # butterfly inside each warp: lane j takes j + width/2
        width //= 2
        acc = acc[..., :width] + acc[..., width:2 * width]
    acc = acc[..., 0]  # [M, 8] warp sums
    width = RMSNORM_LANES // _WARP
    while width > 1:
        width //= 2
        acc = acc[:, :width] + acc[:, width:2 * width]
    return acc[:, 0]


def sqrt_fp32(v: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root of fp32 v (any shape, any device with float64): IEEE sqrt,
    the kernel's __fsqrt_rn, whatever torch.sqrt does on this machine.

    torch.sqrt on CPU goes through MKL's VML (vsSqrt), whose result depends on the CPU it dispatches
    for: on the H100 host it returned the wrong neighbour of a root 0.4998 ulp from a midpoint; on an
    AMD EPYC with torch 2.13, of 17% of uniform random inputs (float64: 1.3%). So the
    root comes from float64 (within one fp32 step of the right one) and is then corrected by exact
    tests: s is the rounded root iff (s - ulp/2)^2 < v < (s + ulp/2)^2 (never equal: a midpoint has 25
    significant bits, its square 49 or more, which no fp32 holds). The midpoints have 25 bits, their
    squares at most 50, so float64 computes and compares them exactly; fp32 roots are never subnormal.
    NaN, +-0 and +inf pass through (sqrt of a negative is NaN, as IEEE's).
    """
    s = torch.sqrt(v.double()).to(torch.float32)
    for _ in range(2):  # one step suffices unless float64's sqrt is off by far more than an ulp
        down = torch.nextafter(s, torch.zeros_like(s))
        up = torch.nextafter(s, torch.full_like(s, math.inf))
        sd, vd = s.double(), v.double()
        lo = (sd + down.double()) * 0.5  # exact: the sum of two adjacent fp32 needs at most 26 bits
        hi = (sd + up.double()) * 0.5
        finite = torch.isfinite(s) & (s > 0)
        s = torch.where(finite & (vd < lo * lo), down, torch.where(finite & (vd > hi * hi), up, s))
    return s


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, rms_eps: float = 1e-6) -> torch.Tensor:
    """x [M, H], weight [H] (x's dtype) -> y [M, H] in x's dtype: LlamaRMSNorm with the fixed-order sum."""
    M, H = x.shape
    xf = x.float()
    ss = sum_of_squares_fixed_order(xf)  # [M]
    # A full-size divisor: a division by a 0-dim tensor may become a multiply by its reciprocal.
    var = ss / torch.full_like(ss, float(H))
    eps_t = torch.tensor(rms_eps, dtype=torch.float64).to(torch.float32).to(x.device)  # RNE to fp32
    r = torch.ones_like(var) / sqrt_fp32(var + eps_t)  # [M]
    h = (xf * r.unsqueeze(-1)).to(x.dtype)
    return (weight.float() * h.float()).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# the ops: schema, fake, CPU implementation
# ------------------------------------------------------------------------------------------------

# fp8linear.ops holds the namespace's DEF library; this module adds to it.
_lib = torch.library.Library("fp8linear", "FRAGMENT")
_lib.define(
    "silu_and_mul_quant_(Tensor x, Tensor(a!) q, Tensor(b!) s, int group_size, bool scale_ue8m0, "
    "float eps, str layout) -> ()"
)
_lib.define(
    "rmsnorm_quant_(Tensor x, Tensor weight, Tensor(a!) q, Tensor(b!) s, Tensor(c!)? normed, float rms_eps, "
    "int group_size, bool scale_ue8m0, float eps, str layout) -> ()"
)


@torch.library.register_fake("fp8linear::silu_and_mul_quant_")
def _silu_and_mul_quant_fake(x, q, s, group_size, scale_ue8m0, eps, layout) -> None:
    # Tracing runs this, not the wrapper: the CUDA kernels must be registered before the graph runs.
    if x.device.type == "cuda":
        _build.ensure_loaded()
    return None


@torch.library.register_fake("fp8linear::rmsnorm_quant_")
def _rmsnorm_quant_fake(x, weight, q, s, normed, rms_eps, group_size, scale_ue8m0, eps, layout) -> None:
    if x.device.type == "cuda":
        _build.ensure_loaded()
    return None


def _store(q: torch.Tensor, s: torch.Tensor, layout: str, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    q.copy_(q_ref)
    s.copy_(pack_ue8m0(s_ref) if layout == ScaleLayout.UE8M0_PACKED.value else s_ref)


@torch.library.impl(_lib, "silu_and_mul_quant_", "CPU")
def _silu_and_mul_quant_cpu(x, q, s, group_size, scale_ue8m0, eps, layout) -> None:
    a = silu_and_mul_reference(x)
    _store(q, s, layout, *per_token_group_quant_reference(a, group_size, q.dtype, scale_ue8m0, eps))


@torch.library.impl(_lib, "rmsnorm_quant_", "CPU")
def _rmsnorm_quant_cpu(x, weight, q, s, normed, rms_eps, group_size, scale_ue8m0, eps, layout) -> None:
    y = rmsnorm_reference(x, weight, rms_eps)
    _store(q, s, layout, *per_token_group_quant_reference(y, group_size, q.dtype, scale_ue8m0, eps))
    if normed is not None:
        normed.copy_(y)


# ------------------------------------------------------------------------------------------------
# the public wrappers: check, allocate, call
# ------------------------------------------------------------------------------------------------

def _check_common(x: torch.Tensor, group_size: int, dtype: torch.dtype, scale_layout, scale_ue8m0: bool,
                  eps: float, what: str) -> tuple[ScaleLayout, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32; got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D {what}; got shape {list(x.shape)} (flatten leading dims first)")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError(
            f"x's last dim must be contiguous (stride 1); got strides {x.stride()}. Rows may be strided; "
            "call .contiguous() for other layouts"
        )
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}; got {group_size!r}")
    if dtype not in SUPPORTED_OUTPUT_DTYPES:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.int8; got {dtype}")
    layout = ScaleLayout.parse(scale_layout)
    if layout is ScaleLayout.UE8M0_PACKED:
        if dtype != torch.float8_e4m3fn:
            raise ValueError(f"scale_layout='ue8m0_packed' is for fp8 (DeepGEMM SM100) only; got dtype={dtype}")
        scale_ue8m0 = True
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (math.isfinite(eps) and eps >= MIN_EPS):
        raise ValueError(f"eps must be a finite float >= {MIN_EPS}; got {eps!r}")
    return layout, bool(scale_ue8m0)


def _check_buffer(t, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} ({hint}); got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like x; got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}; got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; got strides {t.stride()} for shape {list(t.shape)}")


def _outputs(x, M, width, G, dtype, layout, out, scale_out):
    if out is None:
        out = torch.empty((M, width), dtype=dtype, device=x.device)
    else:
        _check_buffer(out, "out", (M, width), dtype, x.device, "the `dtype` argument")
    if scale_out is None:
        scale_out = empty_scales((), M, G, layout, x.device)
    else:
        check_scales(scale_out, (), M, G, layout, x.device)
    return out, scale_out


def silu_and_mul_quant(
    x: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    scale_layout: "str | ScaleLayout" = "row",
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
    out: "torch.Tensor | None" = None,
    scale_out: "torch.Tensor | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `silu(gate) * up` per group, where x = [gate | up]: the input of a gated MLP's down_proj.

    Args:
        x: bf16, fp16 or fp32 `[M, 2I]`, gate = x[:, :I], up = x[:, I:] (what a merged gate_up GEMM
            writes). The last dim must be contiguous; rows may have any stride.
        group_size: g, one of 16, 32, 64, 128, 256; I % g == 0. G = I / g groups per row.
        dtype: `torch.float8_e4m3fn` or `torch.int8`.
        scale_layout, scale_ue8m0, eps: as `fp8linear.per_token_group_quant` (`row`, `col`, `ue8m0_packed`).
        out: optional preallocated q: contiguous `[M, I]` in `dtype` on x's device.
        scale_out: optional preallocated scales, exactly as `fp8linear.layouts.empty_scales((), M, G, ...)`.

    Returns:
        (q, s): q `[M, I]` in `dtype`, contiguous; s fp32 `[M, G]` (int32 `[M, ceil(G/4)]` packed) in
        `scale_layout`. Bit for bit `per_token_group_quant(silu_and_mul_reference(x), ...)` (this module's
        docstring defines the activation: torch's `F.silu(g) * u` in x's dtype, with our fp32 exp).
    """
    layout, scale_ue8m0 = _check_common(x, group_size, dtype, scale_layout, scale_ue8m0, eps, "[M, 2I]")
    M, two_I = x.shape
    if two_I % 2 != 0:
        raise ValueError(f"x's last dim must be 2I (gate then up); got {two_I}, which is odd")
    I = two_I // 2
    if I % group_size != 0:
        raise ValueError(f"I = x.shape[-1] / 2 = {I} must be divisible by group_size={group_size}")
    out, scale_out = _outputs(x, M, I, I // group_size, dtype, layout, out, scale_out)
    if M == 0 or I == 0:
        return out, scale_out
    if x.is_cuda:
        _build.ensure_loaded()
    torch.ops.fp8linear.silu_and_mul_quant_(x, out, scale_out, group_size, scale_ue8m0, float(eps), layout.value)
    return out, scale_out


def rmsnorm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    rms_eps: float = 1e-6,
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    scale_layout: "str | ScaleLayout" = "row",
    scale_ue8m0: bool = False,
    eps: float = 1e-10,
    return_normed: bool = False,
    out: "torch.Tensor | None" = None,
    scale_out: "torch.Tensor | None" = None,
    normed_out: "torch.Tensor | None" = None,
):
    """Quantize `rmsnorm(x) * weight` per group (Hugging Face's LlamaRMSNorm, then the quantization).

    Args:
        x: bf16, fp16 or fp32 `[M, H]`, H <= 16384; the last dim contiguous, rows any stride.
        weight: `[H]`, x's dtype, contiguous, on x's device (the norm's weight).
        rms_eps: the norm's epsilon (finite, >= 0), added to the mean square in fp32.
        group_size: g, one of 16, 32, 64, 128, 256; H % g == 0. G = H / g.
        dtype, scale_layout, scale_ue8m0, eps: as `fp8linear.per_token_group_quant`.
        return_normed: also return y = rmsnorm(x) * weight, `[M, H]` in x's dtype, contiguous.
        out, scale_out: optional preallocated q (`[M, H]`, `dtype`, contiguous) and scales (as
            `fp8linear.layouts.empty_scales`).
        normed_out: optional preallocated y (`[M, H]`, x's dtype, contiguous); needs return_normed=True.

    Returns:
        (q, s), or (q, s, y) with return_normed: q `[M, H]` in `dtype`; s in `scale_layout`. Bit for bit
        `per_token_group_quant(rmsnorm_reference(x, weight, rms_eps), ...)` (this module's docstring
        fixes the summation order of the mean square).
    """
    layout, scale_ue8m0 = _check_common(x, group_size, dtype, scale_layout, scale_ue8m0, eps, "[M, H]")
    M, H = x.shape
    if H % group_size != 0:
        raise ValueError(f"x's last dim H={H} must be divisible by group_size={group_size}")
    if H > MAX_RMSNORM_WIDTH:
        raise ValueError(f"x's last dim H={H} is wider than rmsnorm_quant supports ({MAX_RMSNORM_WIDTH})")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype} (cast the norm's weight once); got {weight.dtype}")
    if tuple(weight.shape) != (H,):
        raise ValueError(f"weight must have shape [{H}] (x's last dim); got {list(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device} like x; got {weight.device}")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous; got strides {weight.stride()}")
    if not isinstance(rms_eps, (int, float)) or isinstance(rms_eps, bool) or not (math.isfinite(rms_eps) and rms_eps >= 0):
        raise ValueError(f"rms_eps must be a finite float >= 0; got {rms_eps!r}")
    if normed_out is not None and not return_normed:
        raise ValueError("normed_out was given but return_normed=False: pass return_normed=True to get it back")
    out, scale_out = _outputs(x, M, H, H // group_size, dtype, layout, out, scale_out)
    normed = None
    if return_normed:
        if normed_out is None:
            normed = torch.empty((M, H), dtype=x.dtype, device=x.device)
        else:
            _check_buffer(normed_out, "normed_out", (M, H), x.dtype, x.device, "x's dtype")
            normed = normed_out
    if M > 0 and H > 0:
        if x.is_cuda:
            _build.ensure_loaded()
        torch.ops.fp8linear.rmsnorm_quant_(
            x, weight, out, scale_out, normed, float(rms_eps), group_size, scale_ue8m0, float(eps), layout.value
        )
    return (out, scale_out, normed) if return_normed else (out, scale_out)
