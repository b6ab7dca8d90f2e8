"""FP8GatedMLP: a gated MLP (Llama, Qwen, Mistral, DeepSeek) as two FP8 GEMMs and one fused quantization.

    down_proj(silu(gate_proj(x)) * up_proj(x))          Hugging Face's LlamaMLP and its kin

becomes

    h    = gate_up_proj(x)                               one FP8Linear, N = 2I: [gate; up] along N
    q, s = silu_and_mul_quant(h, 128, scale_layout=<down_proj's backend's>)   fp8linear.fused
    y    = down_proj's GEMM on (q, s)                    no bf16 activation written or read in between

Merging gate and up: the merged weight is `cat([gate.weight, up.weight])` along N with its scales
`cat([gate.weight_scale_inv, up.weight_scale_inv])`, which is exactly the per-projection quantization
only when I % 128 == 0: otherwise the 128-row blocks of the merged weight straddle gate and up, and
requantizing would change the numbers. So fusion requires I % 128 == 0 (`unsupported_reason` says why
a module cannot be fused; `fuse_gated_mlps` leaves such modules as they are and logs the reason).
Every published gated-MLP width we know is a multiple of 128 (Llama-3-8B 14336, Qwen2.5-7B 18944,
DeepSeek-V3 18432), and down_proj's K = I must be whole 128-groups for the fused quantization anyway.

Checkpoints keep the standard per-projection format: `state_dict()` of an FP8GatedMLP holds
`gate_proj.{weight,weight_scale_inv[,bias]}`, `up_proj.{...}` (views into the merged tensors) and
`down_proj.{...}`, never `gate_up_proj.*`; `load_state_dict` accepts those keys (or the merged ones)
and concatenates. So `fp8linear.save_quantized` writes a fused model as it writes an unfused one.

Numerics: the merged GEMM's halves are gate_proj(x) and up_proj(x) bit for bit (same blocks, same
backend), and the fused quantization computes Hugging Face's bf16 `act_fn(gate) * up` step for step
(fp8linear.fused docstring), so the fused MLP equals the unfused FP8 MLP bit for bit wherever our exp
and torch's round silu to the same bf16 value.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .fused import silu_and_mul_quant
from .linear import FP8Linear

__all__ = ["FP8GatedMLP", "fuse_gated_mlps", "unsupported_reason", "is_silu"]

log = logging.getLogger(__name__)

#: Rows of a weight block: gate and up merge without requantization only when I is a multiple.
BLOCK_N = 128
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_TENSORS = ("weight", "weight_scale_inv", "bias")
#: Activation modules computing SiLU: torch's, and transformers' (SiLUActivation, which ACT2FN["silu"]
#: returns in transformers 5.x and which the kernels hub may swap for its own SiLU).
_SILU_NAMES = ("SiLU", "SiLUActivation")
_SILU_ACTS = ("silu", "swish")


def is_silu(act: Any) -> bool:
    """Whether `act` is SiLU in one of its spellings (nn.SiLU, transformers' SiLUActivation, F.silu): the
    activation fp8linear.fused fuses with the quantization (FP8GatedMLP and FP8Experts ask)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ in _SILU_NAMES or act is torch.nn.functional.silu


def unsupported_reason(mlp: nn.Module) -> "str | None":
    """None when `mlp` (a Hugging Face gated MLP) can become an FP8GatedMLP; else why not.

    Needs gate_proj, up_proj, down_proj (all nn.Linear, or all FP8Linear), act_fn a SiLU, I % 128 == 0,
    gate and up of the same shape, bias presence and (for FP8Linear) the same quantization config.
    """
    missing = [name for name in _PROJECTIONS if not isinstance(getattr(mlp, name, None), nn.Module)]
    if missing:
        return f"{type(mlp).__name__} has no {', '.join(missing)}: not a gated MLP"
    if isinstance(mlp, FP8GatedMLP):
        return "already an FP8GatedMLP"
    gate, up, down = (getattr(mlp, name) for name in _PROJECTIONS)
    act = getattr(mlp, "act_fn", None)
    if not is_silu(act):
        return f"act_fn is {type(act).__name__}, not SiLU (only silu(gate) * up is fused)"
    config = getattr(mlp, "config", None)
    hidden_act = getattr(config, "hidden_act", None)
    if isinstance(hidden_act, str) and hidden_act not in _SILU_ACTS:
        return f"config.hidden_act is {hidden_act!r}, not 'silu'"
    kinds = {type(m) for m in (gate, up, down)}
    if kinds not in ({nn.Linear}, {FP8Linear}):
        return (f"projections are {', '.join(type(m).__name__ for m in (gate, up, down))}: need all nn.Linear "
                "(quantized here) or all FP8Linear")
    H, I = gate.in_features, gate.out_features
    if (up.in_features, up.out_features) != (H, I) or (down.in_features, down.out_features) != (I, H):
        return (f"shapes do not chain: gate [{gate.out_features}, {gate.in_features}], up [{up.out_features}, "
                f"{up.in_features}], down [{down.out_features}, {down.in_features}]")
    if I % BLOCK_N != 0:
        return (f"intermediate size I={I} is not a multiple of {BLOCK_N}: merged gate/up weight blocks would "
                "straddle the two projections (requantizing would change the numbers)")
    if (gate.bias is None) != (up.bias is None):
        return "gate_proj and up_proj disagree on having a bias"
    if isinstance(gate, FP8Linear) and gate.config != up.config:
        return f"gate_proj and up_proj are quantized differently ({gate.config} vs {up.config})"
    return None


class FP8GatedMLP(nn.Module):
    """y = down_proj(silu(gate) * up) with [gate | up] = gate_up_proj(x): two FP8 GEMMs, one fused quant.

    Args:
        hidden_size: H, in_features of the MLP (and out_features of down_proj).
        intermediate_size: I, a multiple of 128 (module docstring).
        bias: whether the projections have biases (gate_up [2I], down [H]).
        options: FP8Linear's keywords (dtype, block_size, scale_ue8m0, backend, device) for both layers.

    Submodules: `gate_up_proj` FP8Linear(H -> 2I) whose weight rows are [gate; up], and `down_proj`
    FP8Linear(I -> H). Build it with `from_mlp` (from a Hugging Face MLP, quantized or not) or
    `from_projections`; a module built directly holds FP8Linear's placeholder weights.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, **options: Any) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if intermediate_size % BLOCK_N != 0:
            raise ValueError(
                f"intermediate_size must be a multiple of {BLOCK_N} (merged gate/up weight blocks); got "
                f"{intermediate_size}. Keep such an MLP unfused"
            )
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = FP8Linear(hidden_size, 2 * intermediate_size, bias, **options)
        self.down_proj = FP8Linear(intermediate_size, hidden_size, bias, **options)
        self.register_state_dict_post_hook(FP8GatedMLP._split_state_hook)
        self.register_load_state_dict_pre_hook(FP8GatedMLP._merge_state_hook)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_projections(cls, gate_proj: FP8Linear, up_proj: FP8Linear, down_proj: FP8Linear) -> "FP8GatedMLP":
        """Merge quantized projections without requantizing: gate_up's tensors are the concatenations
        of gate's and up's (new storage); down_proj is used as it is (not copied)."""
        holder = nn.Module()
        holder.gate_proj, holder.up_proj, holder.down_proj, holder.act_fn = gate_proj, up_proj, down_proj, nn.SiLU()
        why = unsupported_reason(holder)
        if why is not None:
            raise ValueError(f"cannot fuse these projections: {why}")
        H, I = gate_proj.in_features, gate_proj.out_features
        module = cls(H, I, gate_proj.bias is not None, device="meta", dtype=gate_proj.dtype,
                     block_size=gate_proj.block_size, scale_ue8m0=gate_proj.scale_ue8m0, backend=gate_proj.backend)
        with torch.no_grad():
            merged = FP8Linear.from_quantized(
                torch.cat([gate_proj.weight, up_proj.weight]),
                torch.cat([gate_proj.weight_scale_inv, up_proj.weight_scale_inv]),
                None if gate_proj.bias is None else torch.cat([gate_proj.bias, up_proj.bias]),
                dtype=gate_proj.dtype, block_size=gate_proj.block_size, scale_ue8m0=gate_proj.scale_ue8m0,
                backend=gate_proj.backend,
            )
        module.gate_up_proj = merged
        module.down_proj = down_proj
        module.train(gate_proj.training)
        return module

    @classmethod
    def from_mlp(cls, mlp: nn.Module, **options: Any) -> "FP8GatedMLP":
        """From a Hugging Face gated MLP (LlamaMLP, Qwen2MLP, MistralMLP, ...): projections that are
        nn.Linear are quantized first (FP8Linear.from_linear with `options`: each projection on its own,
        so the numbers equal an unfused quantize_model); FP8Linear projections are merged as they are
        (`options` must then be empty). Raises ValueError with `unsupported_reason` otherwise."""
        why = unsupported_reason(mlp)
        if why is not None:
            raise ValueError(f"cannot fuse {type(mlp).__name__}: {why}")
        gate, up, down = (getattr(mlp, name) for name in _PROJECTIONS)
        if isinstance(gate, nn.Linear):
            gate, up, down = (FP8Linear.from_linear(m, **options) for m in (gate, up, down))
        elif options:
            raise TypeError(f"the projections are FP8Linear already; from_mlp takes no options ({sorted(options)})")
        return cls.from_projections(gate, up, down)

    # -- the hot path ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] bf16/fp16/fp32 -> y [..., H] in x's dtype."""
        H, I = self.hidden_size, self.intermediate_size
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != H:
            raise ValueError(f"x must be a tensor [..., {H}] (hidden_size); got {getattr(x, 'shape', type(x))}")
        lead = x.shape[:-1]
        M = x.numel() // H
        if M == 0:
            return x.new_empty((*lead, H))
        # gate_up_proj sees x itself (not the 2-D view): an FP8RMSNorm before it may have quantized x already.
        h = self.gate_up_proj(x).reshape(-1, 2 * I)  # [M, 2I] = [gate | up], x's dtype
        down = self.down_proj
        layout = down.input_layout(M, x.device)
        if layout is None:
            # down_proj's backend quantizes inside its own kernel: the activation runs unfused, as Hugging
            # Face computes it.
            gate, up = h.chunk(2, dim=-1)
            return down(torch.nn.functional.silu(gate) * up).reshape(*lead, H)
        q, s = layout.empty(M, x.device)  # rows M..M_pad-1 (if any) stay unwritten; forward_quantized drops them
        silu_and_mul_quant(h, layout.group_size, layout.dtype, scale_layout=layout.scale_layout,
                           scale_ue8m0=layout.scale_ue8m0, out=q[:M], scale_out=s[:M])
        return down.forward_quantized(q, s, M, x.dtype).reshape(*lead, H)

    # -- the standard per-projection state dict --------------------------------------------------------
    def _rows(self, leaf: str) -> int:
        """Rows of gate's part of a merged tensor: I for weight and bias, I / 128 for the block scales."""
        return self.intermediate_size // BLOCK_N if leaf == "weight_scale_inv" else self.intermediate_size

    @staticmethod
    def _split_state_hook(module: "FP8GatedMLP", state_dict: dict, prefix: str, local_metadata: dict) -> None:
        merged = {leaf: state_dict.pop(f"{prefix}gate_up_proj.{leaf}", None) for leaf in _TENSORS}
        for part, name in enumerate(("gate_proj", "up_proj")):  # a checkpoint's order: gate, up, down
            for leaf, tensor in merged.items():
                if tensor is not None:
                    n = module._rows(leaf)
                    state_dict[f"{prefix}{name}.{leaf}"] = tensor[part * n:(part + 1) * n]
        if hasattr(state_dict, "move_to_end"):
            for key in [k for k in state_dict if k.startswith(f"{prefix}down_proj.")]:
                state_dict.move_to_end(key)

    @staticmethod
    def _merge_state_hook(module: "FP8GatedMLP", state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                          missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for leaf in _TENSORS:
            gate_key, up_key = f"{prefix}gate_proj.{leaf}", f"{prefix}up_proj.{leaf}"
            if gate_key not in state_dict and up_key not in state_dict:
                continue
            if gate_key not in state_dict or up_key not in state_dict:
                error_msgs.append(f"{prefix}: found only one of {gate_key!r} and {up_key!r}; both are needed to "
                                  "build gate_up_proj")
                continue
            gate, up = state_dict.pop(gate_key), state_dict.pop(up_key)
            n = module._rows(leaf)
            if gate.shape[0] != n or up.shape[0] != n:
                error_msgs.append(f"{prefix}: {gate_key} and {up_key} must each have {n} rows; got "
                                  f"{list(gate.shape)} and {list(up.shape)}")
                continue
            state_dict[f"{prefix}gate_up_proj.{leaf}"] = torch.cat([gate, up])

    def projection_state_dict(self) -> dict[str, torch.Tensor]:
        """{"gate_proj.weight": ..., "up_proj.weight_scale_inv": ..., "down_proj.bias": ...}: the
        per-projection tensors (views of the merged ones), as `state_dict()` gives them."""
        return dict(self.state_dict())

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, act=silu (fused quant)"


def fuse_gated_mlps(
    model: nn.Module, filter_fn: "Callable[[nn.Module, str], bool] | None" = None
) -> dict[str, "str | None"]:
    """Replace every gated MLP of `model` whose projections are FP8Linear by an FP8GatedMLP, in place.

    Run it after `fp8linear.quantize_model` or `load_quantized` (so gate_proj, up_proj and down_proj are
    FP8Linear). `filter_fn(module, qualified_name)` may veto a module. Returns {name: None if fused,
    else the reason it was left as it is}; each reason is logged at INFO. Modules whose projections
    are nn.Linear (skipped by quantize_model's recipe) are not considered.
    """
    report: dict[str, "str | None"] = {}
    todo: list[tuple[nn.Module, str, str, nn.Module]] = []

    def visit(parent: "nn.Module | None", attr: str, name: str, module: nn.Module) -> None:
        for child_attr, child in module.named_children():
            visit(module, child_attr, f"{name}.{child_attr}" if name else child_attr, child)
        if isinstance(module, FP8GatedMLP) or not all(hasattr(module, p) for p in _PROJECTIONS):
            return
        if not any(isinstance(getattr(module, p), FP8Linear) for p in _PROJECTIONS):
            return
        if filter_fn is not None and not filter_fn(module, name):
            return
        why = unsupported_reason(module)
        report[name or "<root>"] = why
        if why is not None:
            log.info("fp8linear.fuse_gated_mlps: %s (%s) left unfused: %s", name or "<root>", type(module).__name__, why)
            return
        if parent is None:
            raise ValueError("fuse_gated_mlps: the model itself is a gated MLP; use FP8GatedMLP.from_mlp(model)")
        todo.append((parent, attr, name, module))

    visit(None, "", "", model)
    for parent, attr, name, module in todo:
        setattr(parent, attr, FP8GatedMLP.from_mlp(module))
    log.info("fp8linear.fuse_gated_mlps: fused %d gated MLP(s), left %d as they were",
             len(todo), sum(1 for v in report.values() if v is not None))
    return report
