"""quantize_model: swap a model's nn.Linear layers for FP8Linear, in place, with a skip list.

What stays in the original dtype, and why (each reason lands in the summary):
- the rules of `models/recipes.json` for the model's `config.model_type` plus its "*" rules: the output
  head (`lm_head`) and MoE routers / shared-expert gates. Embeddings are never nn.Linear, so never swapped;
- the user's `skip`: exact module names or regexes, each matched against the *whole* qualified name
  (re.fullmatch). A published tool skipped routers with the substring rule `mlp.gate.`, which also
  caught every `mlp.gate_proj`; under fullmatch `.*mlp\\.gate` names the router and nothing else;
- an nn.Linear whose weight is shared with another module (tied to the embeddings): quantizing it would
  silently untie the pair;
- subclasses of nn.Linear (e.g. nn.MultiheadAttention's out_proj): their owners may read `.weight`
  directly instead of calling forward, so only exact nn.Linear is swapped.

The fused MoE experts of transformers 5.x (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I], found by those attributes) become fp8linear.moe.FP8Experts, each expert quantized as an
FP8Linear weight would be; the skip rules apply to them by the experts module's qualified name (e.g.
`model.layers.0.mlp.experts`). Experts FP8Experts cannot serve (biases, transposed or interleaved
weights, another activation, I % 128 != 0: fp8linear.moe.unsupported_reason) and any other module
holding 3-D+ weights stay as they are, listed in the summary with the reason. A backend without a
grouped GEMM (cublaslt, fused_mma, fused_wgmma) serves the linear layers; the experts then use `auto`,
which the summary says.

The swap is post-order over `named_children` (torchao's `swap_linear_layers`): a root nn.Linear is
returned swapped, not mutated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Pattern, Union

import torch
from torch import nn

from .config import FP8Config
from .hf import models_dir

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate import Calibration

__all__ = ["quantize_model", "dequantize_model", "read_skip_list", "QuantizeSummary", "models_dir", "recipe_rules", "SkipRule"]

log = logging.getLogger("fp8linear")

SkipSpec = Union[str, Pattern[str]]


@dataclasses.dataclass(frozen=True)
class SkipRule:
    """One skip rule: a regex matched with re.fullmatch against a module's qualified name, and why."""

    pattern: Pattern[str]
    reason: str
    spec: str = ""  # what the user or recipe wrote

    def matches(self, name: str) -> bool:
        return self.pattern.fullmatch(name) is not None


@lru_cache(maxsize=None)
def _recipes() -> dict[str, Any]:
    with open(models_dir() / "recipes.json") as f:
        return json.load(f)


def recipe_rules(model_type: "str | None") -> list[SkipRule]:
    """The default skip rules for a Hugging Face model_type ("*" rules plus the type's own)."""
    recipes = _recipes()
    entries = list(recipes["*"]) + list(recipes.get(model_type or "", []))
    return [SkipRule(re.compile(e["pattern"]), e["reason"], e["pattern"]) for e in entries]


def _user_rules(skip: "Iterable[SkipSpec] | SkipSpec | None") -> list[SkipRule]:
    if skip is None:
        return []
    if isinstance(skip, (str, re.Pattern)):
        skip = [skip]
    rules = []
    for item in skip:
        if isinstance(item, re.Pattern):
            rules.append(SkipRule(item, f"skip pattern {item.pattern!r}", item.pattern))
        elif isinstance(item, str):
            try:
                # An exact name is also a regex that fullmatches itself ('.' matches '.'), so one rule
                # covers both; re.escape keeps a literal name from matching anything else.
                pattern = re.compile(f"(?:{re.escape(item)})|(?:{item})")
            except re.error as exc:
                raise ValueError(f"skip entry {item!r} is not a valid regular expression: {exc}") from None
            rules.append(SkipRule(pattern, f"skip {item!r}", item))
        else:
            raise TypeError(
                f"skip entries must be module names, regex strings or compiled patterns; got {item!r} "
                f"({type(item).__name__})"
            )
    return rules


@dataclasses.dataclass
class QuantizeSummary:
    """What quantize_model did, also attached to the model as `model.fp8linear_summary`.

    swapped:       qualified names of the nn.Linear layers now FP8Linear, in module order
    experts:       qualified names of the fused MoE experts modules now FP8Experts, in module order
    skipped:       nn.Linear layers and experts modules kept in the original dtype by a rule -> reason
    unquantized:   non-Linear modules holding 3-D+ weights (fused MoE experts FP8Experts cannot serve)
                   kept as they are -> reason
    unmatched_skip: user skip entries that matched no module (a typo shows here)
    notes:         anything else the user should know (the experts' backend when it differs)
    """

    swapped: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    unquantized: dict[str, str] = dataclasses.field(default_factory=dict)
    unmatched_skip: list[str] = dataclasses.field(default_factory=list)
    dtype: torch.dtype = torch.float8_e4m3fn
    experts: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def modules_to_not_convert(self) -> list[str]:
        """Every module left in the original dtype, as config.json's `modules_to_not_convert` lists them."""
        return sorted({*self.skipped, *self.unquantized})

    def __str__(self) -> str:
        lines = [f"fp8linear: {len(self.swapped)} nn.Linear -> FP8Linear ({self.dtype}); "
                 + (f"{len(self.experts)} MoE experts -> FP8Experts; " if self.experts else "")
                 + f"{len(self.skipped)} kept by rules; {len(self.unquantized)} other weight modules kept"]
        for name, reason in self.skipped.items():
            lines.append(f"  kept {name}: {reason}")
        for name, reason in self.unquantized.items():
            lines.append(f"  kept {name}: {reason}")
        for entry in self.unmatched_skip:
            lines.append(f"  skip entry {entry!r} matched no module")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every qualified name it appears under (more than one when tied)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _fused_weight_reason(module: nn.Module) -> "str | None":
    from .moe import FP8Experts, is_experts_module, unsupported_reason

    if isinstance(module, FP8Experts):
        return None
    shapes = [
        f"{name} {list(p.shape)}"
        for name, p in module.named_parameters(recurse=False)
        if p.dim() >= 3 and p.is_floating_point()
    ]
    if not shapes:
        return None
    if is_experts_module(module):
        why = unsupported_reason(module)
        return (f"{type(module).__name__}: fused MoE experts ({', '.join(shapes)}) left unquantized"
                + (f": FP8Experts cannot serve them ({why})" if why else ""))
    return (f"{type(module).__name__} holds 3-D+ weights ({', '.join(shapes)}), not nn.Linear layers "
            "nor fused MoE experts: left unquantized")


def quantize_model(
    model: nn.Module,
    config: "FP8Config | None" = None,
    *,
    skip: "Iterable[SkipSpec] | SkipSpec | None" = None,
    dtype: "torch.dtype | None" = None,
    backend: "str | None" = None,
    progress: bool = True,
    fuse_mlp: bool = False,
    fuse_norm: bool = False,
    calibration: "Calibration | torch.Tensor | None" = None,
) -> nn.Module:
    """Replace `model`'s nn.Linear layers with FP8Linear (128x128-block weights, 1x128 activations) and its
    fused MoE experts modules with fp8linear.moe.FP8Experts (the same quantization per expert).

    Args:
        model: any nn.Module; a Hugging Face model's `config.model_type` selects its recipe of default
            skips (models/recipes.json). Weights are quantized where they live (CPU or GPU).
        config: how to quantize (fp8linear.FP8Config: dtype, scale_ue8m0, backend); default FP8Config(),
            fp8 e4m3 with exact scales and backend "auto".
        skip: the one way to keep modules in the original dtype (on top of the model's recipe): exact
            qualified names, regex strings or compiled patterns, each matched against the whole name
            (re.fullmatch); an experts module by its own name (`.*mlp\\.experts` keeps every one).
            A checkpoint's `modules_to_not_convert` is written from what was kept.
        dtype, backend: shorthands for FP8Config(dtype=..., backend=...) (torch.float8_e4m3fn or
            torch.int8; a backend name, fp8linear.config.Backend); not together with `config`.
        progress: show a tqdm bar over the layers.
        fuse_mlp: also swap gated MLPs (gate_proj/up_proj/down_proj, SiLU) for fp8linear.mlp.FP8GatedMLP:
            one gate_up GEMM, SiLU-and-mul fused into the activation quantization, the down GEMM. MLPs
            that cannot fuse (intermediate size not a multiple of 128, ...) stay as they are, with the
            reason in `fp8linear_fused_mlps`. state_dict keys (and so checkpoints) stay per projection.
        fuse_norm: also swap each decoder layer's RMSNorms for fp8linear.norm.FP8RMSNorm: one kernel
            computes the norm and quantizes its output for the FP8Linear layers that read it (q/k/v,
            gate/up), which then skip their own quantization. Report in `fp8linear_fused_norms`.
        calibration: round the nn.Linear weights with error compensation against these calibration
            inputs instead of to nearest (fp8linear.calibrate: GPTQ-style, sequential over the decoder
            blocks): token ids, int64 [T] or [B, T], or a fp8linear.calibrate.Calibration (ids plus
            seq_len, damp, act_order). The model must take `input_ids` (a language model or encoder).
            Same format and scales as plain rounding; MoE experts are rounded plainly.

    Returns the model (the same object, swapped in place; a new FP8Linear if `model` itself is an
    nn.Linear). The summary (QuantizeSummary) is logged at INFO and attached as `fp8linear_summary`.
    """
    from .linear import FP8Linear  # the module pulls in the backends: import on use
    from .moe import FP8Experts, experts_kwargs, is_experts_module, unsupported_reason

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if calibration is not None:
        from .calibrate import Calibration

        if isinstance(calibration, torch.Tensor):
            calibration = Calibration(calibration)
        elif not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be token ids (an int64 tensor) or a fp8linear.calibrate.Calibration; "
                            f"got {type(calibration).__name__}")
        if isinstance(model, nn.Linear):
            raise ValueError("quantize_model: calibration needs a model that takes input_ids (a language model or "
                             "encoder); model itself is an nn.Linear")
    shorthands = {k: v for k, v in (("dtype", dtype), ("backend", backend)) if v is not None}
    if config is None:
        # FP8Config validates, before the model is touched, so a typo fails fast and leaves it intact.
        config = FP8Config(**shorthands)
    elif not isinstance(config, FP8Config):
        raise TypeError(f"config must be an fp8linear.FP8Config; got {type(config).__name__}")
    elif shorthands:
        raise ValueError(f"quantize_model: pass {', '.join(f'{k}=' for k in shorthands)} inside config (got both "
                         f"config={config.short_str()} and {shorthands}); e.g. dataclasses.replace(config, ...)")
    options = config.module_kwargs()
    experts_options = experts_kwargs(config)
    dtype = config.dtype

    config = getattr(model, "config", None)
    user = _user_rules(skip)
    rules = recipe_rules(getattr(config, "model_type", None)) + user
    used_user_rules: set[int] = set()
    tied = _tied_names(model)
    summary = QuantizeSummary(dtype=dtype)

    # (parent or None for the root, attribute name, qualified name, module), children before parents:
    # nn.Linear layers and fused experts modules.
    todo: list[tuple["nn.Module | None", str, str, nn.Module]] = []

    def visit(parent: "nn.Module | None", attr: str, name: str, module: nn.Module) -> None:
        for child_attr, child in module.named_children():
            visit(module, child_attr, f"{name}.{child_attr}" if name else child_attr, child)
        if isinstance(module, (FP8Linear, FP8Experts)):
            return
        experts = is_experts_module(module)
        if not isinstance(module, nn.Linear) and not experts:
            reason = _fused_weight_reason(module)
            if reason is not None:
                summary.unquantized[name] = reason
            return
        used_user_rules.update(i for i, rule in enumerate(user) if rule.matches(name))
        for rule in rules:
            if rule.matches(name):
                summary.skipped[name] = rule.reason
                return
        if experts:
            reason = _fused_weight_reason(module) if unsupported_reason(module) is not None else None
            if reason is not None:
                summary.unquantized[name] = reason
            elif parent is None:
                raise ValueError("quantize_model: the model itself is an experts module; use "
                                 "fp8linear.moe.FP8Experts.from_experts(model)")
            else:
                todo.append((parent, attr, name, module))
            return
        if type(module) is not nn.Linear:
            summary.skipped[name] = (f"subclass {type(module).__name__} of nn.Linear: its owner may read .weight "
                                     "without calling forward")
            return
        sharers = [n for n in tied.get(id(module.weight), []) if n != f"{name}.weight" and n != "weight"]
        if sharers:
            summary.skipped[name] = f"weight tied to {', '.join(sharers)}: quantizing would untie it"
            return
        todo.append((parent, attr, name, module))

    visit(None, "", "", model)
    summary.unmatched_skip = [
        rule.spec for i, rule in enumerate(user) if i not in used_user_rules
    ]

    calibrated: dict[str, nn.Module] = {}
    if calibration is not None:
        from .calibrate import calibrate_linears

        targets = {name: (parent, attr, module) for parent, attr, name, module in todo
                   if isinstance(module, nn.Linear) and parent is not None}
        calibrated = calibrate_linears(model, targets, calibration, options, progress=progress)
        summary.notes.append(f"{len(calibrated)} of {len(targets)} nn.Linear rounded with error compensation against "
                             f"{calibration.tokens:,} calibration tokens (fp8linear.calibrate)")

    from tqdm.auto import tqdm

    result = model
    for i in tqdm(range(len(todo)), desc="fp8linear: quantizing", unit="layer", disable=not progress):
        parent, attr, name, original = todo[i]
        todo[i] = None  # type: ignore[call-overload]  # drop our reference: each original frees once swapped
        if isinstance(original, nn.Linear):
            new = calibrated.pop(name, None)
            if new is None:
                new = FP8Linear.from_linear(original, **options)
            summary.swapped.append(name or "<root>")
        else:
            new = FP8Experts.from_experts(original, **experts_options)
            summary.experts.append(name)
        new.train(original.training)
        if parent is None:
            result = new
        else:
            setattr(parent, attr, new)
        del original
    if summary.experts and experts_options["backend"] != options["backend"]:
        summary.notes.append(f"backend {options['backend']!r} has no grouped GEMM: the MoE experts use 'auto'")

    for entry in summary.unmatched_skip:
        log.warning("fp8linear.quantize_model: skip entry %r matched no module name", entry)
    log.info("%s", summary)
    result.fp8linear_summary = summary
    if fuse_mlp:
        from .mlp import fuse_gated_mlps

        result.fp8linear_fused_mlps = fuse_gated_mlps(result)
    if fuse_norm:
        from .norm import fuse_norms

        result.fp8linear_fused_norms = fuse_norms(result)
    return result


def dequantize_model(model: nn.Module, dtype: "torch.dtype | None" = None) -> nn.Module:
    """The inverse swap, in place: every FP8Linear becomes an nn.Linear holding its dequantized weight
    (dequant(weight) in `dtype`, default the bias's dtype or bf16), every FP8Experts the transformers experts
    module it came from, holding its dequantized weights (in `dtype`, default bf16). The baseline for an FP8 checkpoint
    whose original weights are not at hand: the same values, run as a plain bf16 GEMM."""
    from .linear import FP8Linear
    from .weights import dequantize_weight_blockwise

    from .mlp import FP8GatedMLP
    from .moe import FP8Experts

    def swap(module: nn.Module) -> nn.Module:
        if isinstance(module, FP8GatedMLP):
            raise ValueError(
                "dequantize_model cannot unfuse an FP8GatedMLP (quantize_model(..., fuse_mlp=True)); save it with "
                "save_quantized and load it with load_quantized(..., fuse_mlp=False) to get per-projection layers"
            )
        for attr, child in module.named_children():
            setattr(module, attr, swap(child))
        if isinstance(module, FP8Experts):
            return module.dequantize(dtype or torch.bfloat16)
        if not isinstance(module, FP8Linear):
            return module
        out_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.bfloat16)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta", dtype=out_dtype)
        with torch.no_grad():
            w = dequantize_weight_blockwise(module.weight, module.weight_scale_inv, module.block_size)
            linear.weight = nn.Parameter(w.to(out_dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(out_dtype).clone(), requires_grad=False)
        return linear

    return swap(model)


def read_skip_list(path: "str | Path") -> list[str]:
    """A skip-list file (one module name or regex per line; '#' starts a comment), e.g. those under
    models/skip-lists/ or the skip_*.txt that `fp8linear eval` writes."""
    entries = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return entries
