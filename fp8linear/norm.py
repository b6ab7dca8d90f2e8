"""FP8RMSNorm: a decoder layer's RMSNorm that also quantizes its output for the FP8Linear layers it feeds.

Every Llama-style decoder layer runs

    h = input_layernorm(x);          q_proj(h), k_proj(h), v_proj(h)
    h = post_attention_layernorm(x); mlp(h)     (gate_proj(h), up_proj(h), or FP8GatedMLP's gate_up_proj(h))

and each of those FP8Linear layers quantizes the same h again. FP8RMSNorm computes h with the fused
kernel (`fp8linear.fused.rmsnorm_quant`, one launch instead of Hugging Face's half-dozen elementwise ops),
and in the same pass writes h's 1x128 quantization in the layout its consumers' backend reads. It hands
(h, q, s) to each consumer; a consumer whose input *is* that h (the same tensor object, unmodified) uses
q and s instead of quantizing. Because rmsnorm_quant is bit for bit `per_token_group_quant(h)`, a consumer
computes exactly what it computes without the handoff; the only numerical change of the swap is the norm
itself, `fp8linear.fused.rmsnorm_reference` (Hugging Face's formula and roundings, with a fixed-order
sum of squares and a correctly rounded sqrt).

No handoff (h alone, still from the one kernel) when the consumers disagree on the layout for this M, when
one quantizes inside its GEMM (fused_mma: decode sizes), under torch.compile (the handoff is Python state),
or when the input does not fit the kernel (dtype other than the weight's, width > 16384 or not a multiple
of 128): then the consumers quantize h as usual. `quantize_model(..., fuse_norm=True)` installs it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .fused import rmsnorm_quant, rmsnorm_reference

__all__ = ["FP8RMSNorm", "fuse_norms", "SUPPORTED_NORMS"]

log = logging.getLogger(__name__)

#: Norm classes computing weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) (Llama's formula). Gemma's
#: (1 + weight) norms and LayerNorms are not among them.
SUPPORTED_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                   "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm")
_MAX_WIDTH = 16384
_GROUP = 128


class FP8RMSNorm(nn.Module):
    """RMSNorm (Llama's formula) whose output also arrives quantized at the FP8Linear layers it feeds.

    Args:
        weight: the norm's weight [H] (kept as the parameter `weight`: state_dict keys do not change).
        eps: the norm's epsilon (Hugging Face's `variance_epsilon`).
        consumers: the FP8Linear layers that read this norm's output (module docstring); may be empty.
    """

    def __init__(self, weight: torch.Tensor, eps: float, consumers: "list[nn.Module] | tuple" = ()) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.variance_epsilon = float(eps)
        # A plain attribute, not submodules: the consumers belong to the attention / MLP modules.
        object.__setattr__(self, "_consumers", tuple(consumers))

    @classmethod
    def from_norm(cls, norm: nn.Module, consumers: "list[nn.Module] | tuple" = ()) -> "FP8RMSNorm":
        """Wrap a Hugging Face RMSNorm (one of SUPPORTED_NORMS), sharing its weight tensor."""
        if type(norm).__name__ not in SUPPORTED_NORMS:
            raise TypeError(f"norm must be one of {', '.join(SUPPORTED_NORMS)}; got {type(norm).__name__}")
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise ValueError(f"{type(norm).__name__} has neither variance_epsilon nor eps")
        return cls(norm.weight, eps, consumers)

    @property
    def consumers(self) -> tuple:
        return self._consumers

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, consumers={len(self._consumers)}"

    # -- the hot path ----------------------------------------------------------------------------------
    def _fits(self, x: torch.Tensor) -> bool:
        H = self.weight.shape[0]
        return (x.dim() >= 1 and x.shape[-1] == H and x.dtype == self.weight.dtype and H % _GROUP == 0
                and H <= _MAX_WIDTH and x.device == self.weight.device)

    def _layout(self, M: int, device: torch.device) -> "Any | None":
        """The consumers' one InputLayout for this M, or None when they differ or one quantizes inside its
        own GEMM (fp8linear.linear.FP8Linear.input_layout)."""
        layouts = {c.input_layout(M, device) for c in self._consumers}
        return layouts.pop() if len(layouts) == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fits(x):
            return self._unfused(x)
        H = x.shape[-1]
        x2d = x.reshape(-1, H)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        M = x2d.shape[0]
        layout = None
        if M > 0 and self._consumers and not torch.compiler.is_compiling():
            layout = self._layout(M, x.device)
        if layout is None:
            if M == 0:
                return x.new_empty(x.shape)
            _, _, h = rmsnorm_quant(x2d, self.weight, self.variance_epsilon, _GROUP, return_normed=True)
            return h.reshape(x.shape)
        q, s = layout.empty(M, x.device)
        h2d = torch.empty((M, H), dtype=x.dtype, device=x.device)
        rmsnorm_quant(x2d, self.weight, self.variance_epsilon, layout.group_size, layout.dtype,
                      scale_layout=layout.scale_layout, scale_ue8m0=layout.scale_ue8m0, return_normed=True,
                      out=q[:M], scale_out=s[:M], normed_out=h2d)
        h = h2d.reshape(x.shape)
        for c in self._consumers:
            c.offer_quantized(h, q, s)
        return h

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs the kernel does not take: the same formula in torch (fp8linear.fused.rmsnorm_reference).
        H = x.shape[-1]
        return rmsnorm_reference(x.reshape(-1, H), self.weight.to(x.dtype), self.variance_epsilon).reshape(x.shape)


def _linears(module: nn.Module, names: tuple[str, ...]) -> "list[nn.Module] | None":
    from .linear import FP8Linear

    out = [getattr(module, n, None) for n in names]
    return out if all(isinstance(m, FP8Linear) for m in out) else None


def _mlp_consumers(mlp: nn.Module) -> "list[nn.Module] | None":
    from .mlp import FP8GatedMLP

    if isinstance(mlp, FP8GatedMLP):
        return [mlp.gate_up_proj]
    return _linears(mlp, ("gate_proj", "up_proj"))


def fuse_norms(model: nn.Module) -> dict[str, "str | None"]:
    """Swap each decoder layer's input_layernorm and post_attention_layernorm for FP8RMSNorm, in place.

    Run after `quantize_model` (and `fuse_gated_mlps`, if used). A norm is swapped when its class is one of
    SUPPORTED_NORMS and every layer reading it is an FP8Linear of the same width: q/k/v_proj for
    input_layernorm, gate/up_proj (or an FP8GatedMLP's gate_up_proj) for post_attention_layernorm.
    Returns {norm name: None if swapped, else why not}; reasons are logged at INFO.
    """
    report: dict[str, "str | None"] = {}
    for name, layer in model.named_modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        pairs = (("input_layernorm", attn, lambda m: _linears(m, ("q_proj", "k_proj", "v_proj"))),
                 ("post_attention_layernorm", mlp, _mlp_consumers))
        for attr, reader, find in pairs:
            norm = getattr(layer, attr, None)
            if norm is None or reader is None or isinstance(norm, FP8RMSNorm):
                continue
            full = f"{name}.{attr}" if name else attr
            why = None
            consumers = find(reader)
            if type(norm).__name__ not in SUPPORTED_NORMS:
                why = f"{type(norm).__name__} is not a Llama-formula RMSNorm"
            elif consumers is None:
                why = "the layers it feeds are not all FP8Linear"
            elif any(c.in_features != norm.weight.shape[0] for c in consumers):
                why = "a layer it feeds has another width"
            report[full] = why
            if why is not None:
                log.info("fp8linear.fuse_norms: %s left as it is: %s", full, why)
                continue
            setattr(layer, attr, FP8RMSNorm.from_norm(norm, consumers))
    return report
