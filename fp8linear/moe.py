"""FP8Experts: a mixture-of-experts layer's experts in 128x128-block FP8 (or INT8), run as grouped GEMMs.

transformers 5.x holds a MoE layer's experts fused (DESIGN.md "Mixture of experts"): `gate_up_proj`
[E, 2I, H] (gate rows first, then up), `down_proj` [E, H, I], called as
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])` after the router (`mlp.gate`,
left as it is). FP8Experts replaces such a module (`from_experts`; `fp8linear.quantize_model` does it):

    gate_up_proj            fp8 e4m3 | int8 [E, 2I, H]        each expert's 2-D weight quantized exactly as
    gate_up_proj_scale_inv  fp32 [E, 2I/128, ceil(H/128)]     fp8linear.weights.quantize_weight_blockwise
    down_proj               fp8 e4m3 | int8 [E, H, I]         quantizes it (DESIGN.md "Weights")
    down_proj_scale_inv     fp32 [E, ceil(H/128), I/128]

I % 128 == 0 is required: the gate and up halves then fill whole 128-row blocks, so the fused [2I, H]
quantization is the per-projection one of the published checkpoints, and the down GEMM's K = I is whole
1x128 groups for the fused SiLU-and-mul quantization. H is free (zero padding along K, as FP8Linear).

forward, as serving engines run it (one pass over the routed (token, slot) pairs, S = T * k of them), in
the indexed layout, where the backends serve it (triton on a GPU, reference on a CPU):

    sort the pairs by expert (stable: tokens in order within an expert)     backends.SortedPairs
    q_x, s_x = quantize x [T, H] per 1x128 group, once per token            fp8linear.ops
    h    = grouped GEMM gate_up, each row read from its token's q_x row     rows="gather"
           -> [S, 2I] in x's dtype, in sorted order
    q, s = silu_and_mul_quant(h) in the down backend's scale layout         fp8linear.fused
    y    = grouped GEMM down, each row written to its pair's row            rows="scatter"
           -> [S, H] = [T, k, H] in x's dtype
    out[t] = sum_j y[t, j] * top_k_weights[t, j], then x's dtype            fp8linear.moe_combine

No copy of the activations, no host synchronisation: the same launches at every T, so CUDA graphs
capture any size. Up to the backends' PAIRWISE_MAX_PAIRS pairs (a decode step of a few tokens), backends
that serve it (backends.PairwiseGroupedBackend: triton) skip the sort and run each pair through its
expert, with the combine inside the down GEMM: four launches instead of six, the same bits. The
contiguous and masked layouts (DeepGEMM's) gather the quantized rows into the grouped layout first
(below).

The combine is what transformers' default experts forward ("grouped_mm") computes: each product in the
promoted dtype of y and the routing weights (x's dtype for Qwen's routers, fp32 for DeepSeek-V3's), then
a sum over the k slots accumulated in fp32 and rounded once to x's dtype; fp8linear.moe_combine fixes the
sum's order (slot by slot) and runs it as one Triton kernel on a GPU.
`expert_outputs` returns the per-pair y before the combine.

Grouped layouts (fp8linear.backends.GroupedBackend):
- indexed (any T): above; backends that serve it implement backends.IndexedGroupedBackend.
- contiguous (prefill): pairs sorted by expert, each expert's segment padded to the backend's
  CONTIGUOUS_ALIGN rows (DeepGEMM: 128). Where the alignment is 1 (reference, triton) the layout needs
  no host synchronisation; above 1 the row count is read on the host once per forward.
- masked (decode, CUDA graphs): [E, max_m, K] with masked_m[e] valid rows per expert, max_m from T
  alone, so nothing is read on the host. It holds what top-k routing guarantees, at most T pairs per
  expert (a token naming each expert once); more raise, checked on the device with torch._assert_async.
`grouping="auto"` takes indexed where both backends serve it, except for large prefills where DeepGEMM
serves the contiguous layout (DEEPGEMM_MIN_ROWS_PER_EXPERT, DEEPGEMM_MIN_PAIR_MACS; never under CUDA-graph
capture or torch.compile): there its GEMMs are faster than ours by more than the gather and the one host
read cost. Where indexed is not served: contiguous where it needs no synchronisation, else masked while a
CUDA graph is being captured or for T <= MASKED_MAX_TOKENS tokens (decode sizes), contiguous beyond.
The contiguous layout gathers each row's quantized token in one pass per tensor (the masked one
scatters the pairs' rows into place); in both the combine reads each pair's output row where the down
GEMM wrote it (fp8linear.moe_combine's `rows`).

Slots whose expert index is outside [0, E) (transformers' expert-parallel sentinel) contribute zero.
The state dict is the published per-expert layout (`{e}.gate_proj.weight`, `.weight_scale_inv`,
`{e}.up_proj.*`, `{e}.down_proj.*`), through state-dict hooks as fp8linear.mlp.FP8GatedMLP does, and
load_state_dict accepts those keys (or the fused ones). A checkpoint loader fills an `empty_like`
module expert by expert with `load_expert_`, never holding a bf16 copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import types
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from . import backends
from .backends import padded_k
from .config import FP8Config, dtype_short_str
from .fused import silu_and_mul_quant
from .layouts import ScaleLayout, empty_scales
from .mlp import is_silu
from .moe_combine import combine_slots, slots_at_rows
from .moe_routing import sort_pairs
from .ops import quantize_for_gemm
from .weights import dequantize_weight_blockwise, quantize_weight_blockwise

__all__ = ["FP8Experts", "Routing", "route", "unsupported_reason", "is_experts_module", "parse_expert_key",
           "plan_expert_keys", "experts_kwargs", "PROJECTIONS", "LEAVES"]

log = logging.getLogger(__name__)

#: The per-expert projections of a published checkpoint, in its order.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: The tensors of each projection.
LEAVES = ("weight", "weight_scale_inv")
#: Rows of a weight block and width of an activation group.
BLOCK = 128
#: `grouping="auto"` takes the masked layout up to this many tokens when contiguous would synchronise.
MASKED_MAX_TOKENS = 64
#: `grouping="auto"` runs DeepGEMM's contiguous GEMMs rather than the indexed layout where DeepGEMM serves
#: both GEMMs and a forward has at least this many pairs per expert (below, DeepGEMM's GEMMs alone are no
#: faster than ours) and at least DEEPGEMM_MIN_PAIR_MACS = pairs * H * I (the gathers and the host read of
#: the row count must be paid back). On the H100 this takes DeepSeek-V3's experts from 8192 tokens and
#: Qwen3-30B-A3B's at 16384, where DeepGEMM's layer was faster; not at the sizes below, where it was slower
#: (docs/runs/2026-12-06-moe-deepgemm-prefill-h100.md).
DEEPGEMM_MIN_ROWS_PER_EXPERT = 256
DEEPGEMM_MIN_PAIR_MACS = 1.5e11
GROUPINGS = ("auto", *backends.GROUPINGS)

_EXPERT_KEY = re.compile(r"(?:(.*)\.)?(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv|weight_scale)")


def parse_expert_key(key: str) -> "tuple[str, int, str, str] | None":
    """'model.layers.0.mlp.experts.3.up_proj.weight_scale_inv' -> ('model.layers.0.mlp.experts', 3, 'up_proj',
    'weight_scale_inv'); None for any other key. The leaf `weight_scale` (another published name of the
    same tensor) reads as 'weight_scale_inv'."""
    m = _EXPERT_KEY.fullmatch(key)
    if m is None:
        return None
    leaf = "weight_scale_inv" if m.group(4) == "weight_scale" else m.group(4)
    return m.group(1) or "", int(m.group(2)), m.group(3), leaf


def plan_expert_keys(keys: "Iterable[str]", resolve: "Callable[[str], str | None]",
                     modules: "Mapping[str, nn.Module]") -> dict[str, dict[tuple[int, str, str], str]]:
    """For a checkpoint loader: {experts module name: {(e, projection, leaf): checkpoint key}} for every key of
    the per-expert layout that belongs to a fused experts module of the model (`is_experts_module`).

    `resolve` maps a checkpoint name to the model's parameter name (or None), `modules` is
    dict(model.named_modules()). Keys of modules that are not fused experts are left out (they are
    ordinary per-expert nn.Linear layers in models that have them)."""
    plan: dict[str, dict[tuple[int, str, str], str]] = {}
    for key in keys:
        parsed = parse_expert_key(key)
        if parsed is None:
            continue
        module_key, e, projection, leaf = parsed
        target = resolve(f"{module_key}.gate_up_proj" if module_key else "gate_up_proj")
        name = None if target is None else target.rpartition(".")[0]
        if name is None or not is_experts_module(modules.get(name, nn.Module())):
            continue
        entry = plan.setdefault(name, {})
        if (e, projection, leaf) in entry:
            raise ValueError(f"checkpoint has two tensors for {name}.{e}.{projection}.{leaf}: "
                             f"{entry[(e, projection, leaf)]!r} and {key!r}")
        entry[(e, projection, leaf)] = key
    return plan


def experts_kwargs(config: FP8Config) -> dict[str, Any]:
    """FP8Experts' keyword options for a model quantized with `config`: its module kwargs, with the backend
    'auto' where the configured one has no grouped GEMM (cublaslt, fused_mma, fused_wgmma serve dense
    layers only)."""
    options = config.module_kwargs()
    if options["backend"] not in backends.GROUPED_NAMES:
        options["backend"] = "auto"
    return options


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` holds fused MoE experts as transformers 5.x does: 3-D float `gate_up_proj` and
    `down_proj` parameters (found by attributes, not class names: the classes differ by model and version)."""
    if isinstance(module, FP8Experts):
        return False
    params = module._parameters
    w13, w2 = params.get("gate_up_proj"), params.get("down_proj")
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 and p.is_floating_point() for p in (w13, w2))


def unsupported_reason(experts: nn.Module) -> "str | None":
    """None when `experts` (a transformers fused experts module) can become an FP8Experts; else why not.

    Needs gate_up_proj [E, 2I, H] ([gate; up] concatenated, not transposed, no biases), down_proj
    [E, H, I], a SiLU activation with transformers' default gating (silu(gate) * up), no post-expert
    norm, not expert-parallel, and I % 128 == 0."""
    if not is_experts_module(experts):
        return f"{type(experts).__name__} holds no 3-D gate_up_proj and down_proj parameters"
    name = type(experts).__name__
    w13, w2 = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        return f"{name} stores transposed weights ([E, H, 2I]); only [E, 2I, H] is supported"
    if getattr(experts, "has_bias", False) or any(
            getattr(experts, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")):
        return f"{name} has expert biases (not supported)"
    if not getattr(experts, "is_concatenated", True):
        return f"{name} interleaves gate and up rows (only [gate; up] concatenated is supported)"
    if not getattr(experts, "has_gate", True):
        return f"{name} has no gate (only gated experts, silu(gate) * up, are supported)"
    if getattr(experts, "has_post_expert_norm", False):
        return f"{name} normalizes each expert's output (not supported)"
    if getattr(experts, "_is_expert_parallel", False):
        return f"{name} is expert-parallel (not supported)"
    act = getattr(experts, "act_fn", None)
    if not is_silu(act):
        return f"act_fn is {type(act).__name__}, not SiLU (only silu(gate) * up is fused)"
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        return f"{name} overrides _apply_gate (a gating other than silu(gate) * up)"
    E, two_I, H = w13.shape
    if two_I % 2:
        return f"gate_up_proj has {two_I} rows, not 2I"
    I = two_I // 2
    if tuple(w2.shape) != (E, H, I):
        return f"down_proj has shape {list(w2.shape)}; gate_up_proj {list(w13.shape)} implies [{E}, {H}, {I}]"
    if I % BLOCK:
        return (f"intermediate size I={I} is not a multiple of {BLOCK}: gate and up blocks would straddle and "
                "the down GEMM's K would not be whole 1x128 groups")
    return None


# -- routing: where each (token, slot) pair goes in the grouped layout ----------------------------------------

@dataclasses.dataclass
class Routing:
    """The grouped layout of one forward. Pairs are the S = T * k (token, slot) entries of top_k_index,
    flattened as t * k + j; "sorted" order is by expert, stably (invalid experts last).

    perm      int64 [S]: sorted position -> pair
    token     int64 [S]: sorted position -> token
    valid     bool [S]: the sorted pair names an expert in [0, E)
    dest      int64 [S]: sorted position -> row of the grouped q (flattened [E(+1), max_m] when masked)
    writes    how many sorted pairs (the first ones) are written into the layout
    grouping  "contiguous" | "masked"
    rows      rows of the contiguous layout (M_all), or max_m of the masked one
    m_indices int32 [M_all] (contiguous) or None
    masked_m  int32 [E] (masked) or None
    expected_m rows per expert to expect (the masked GEMMs' tile hint)
    """

    perm: torch.Tensor
    token: torch.Tensor
    valid: torch.Tensor
    dest: torch.Tensor
    writes: int
    grouping: str
    rows: int
    m_indices: "torch.Tensor | None"
    masked_m: "torch.Tensor | None"
    expected_m: int


def route(top_k_index: torch.Tensor, E: int, grouping: str, align: int = 1,
          masked_rows: "Callable[[int], int] | None" = None) -> Routing:
    """The grouped layout for top_k_index [T, k] (any integer dtype) over E experts.

    grouping "contiguous": segments padded to `align` rows (align 1: no host synchronisation; above 1 the
    total is read on the host). "masked": max_m = masked_rows(T) (identity when None) rows per expert,
    plus one scratch group E for invalid pairs, which the GEMMs never see.
    """
    T, k = top_k_index.shape
    S = T * k
    device = top_k_index.device
    ids = top_k_index.reshape(-1).long()
    valid = (ids >= 0) & (ids < E)
    keys = torch.where(valid, ids, torch.full_like(ids, E))  # invalid pairs sort last
    sorted_keys, perm = torch.sort(keys, stable=True)
    token = torch.div(perm, k, rounding_mode="floor")
    valid_sorted = sorted_keys < E
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, keys, torch.ones_like(keys))
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    rank = torch.arange(S, device=device) - first[sorted_keys]  # position within its expert
    expert = sorted_keys.clamp(max=E - 1)
    expected_m = max(1, -(-S // E))

    if grouping == "contiguous":
        if align == 1:
            m_indices = torch.where(valid_sorted, sorted_keys, torch.full_like(sorted_keys, -1)).to(torch.int32)
            return Routing(perm, token, valid_sorted, torch.arange(S, device=device), S, grouping, S, m_indices, None,
                           expected_m)
        padded = (counts[:E] + align - 1) // align * align
        M_all, invalid = (int(v) for v in torch.stack([padded.sum(), counts[E]]).tolist())  # the one sync
        seg_start = torch.cumsum(padded, 0) - padded
        dest = torch.where(valid_sorted, seg_start[expert] + rank, torch.zeros_like(rank))
        m_indices = torch.repeat_interleave(torch.arange(E, dtype=torch.int32, device=device), padded,
                                            output_size=M_all)
        return Routing(perm, token, valid_sorted, dest, S - invalid, grouping, M_all, m_indices, None, expected_m)

    if grouping != "masked":
        raise ValueError(f"grouping must be 'contiguous' or 'masked'; got {grouping!r}")
    max_m = T if masked_rows is None else masked_rows(T)
    if not torch.compiler.is_compiling():
        torch._assert_async(torch.all(counts[:E] <= max_m),
                            "FP8Experts, masked layout: an expert got more pairs than the layout's max_m rows "
                            "(tokens name the same expert twice in top_k_index; top-k routing never does); "
                            "use grouping='contiguous'")
    dest = torch.where(valid_sorted, expert * max_m + rank, E * max_m + rank.clamp(max=max_m - 1))
    return Routing(perm, token, valid_sorted, dest, S, grouping, max_m, None, counts[:E].to(torch.int32),
                   expected_m)


def _on_device_of(x: torch.Tensor) -> "contextlib.AbstractContextManager":
    """x's CUDA device made current where it is not (our kernels and DeepGEMM launch on the current device;
    a model split over GPUs calls each layer with another current); nothing to do otherwise."""
    if x.is_cuda and not torch.compiler.is_compiling() and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _pairwise_max_pairs(b13: types.ModuleType, b2: types.ModuleType) -> int:
    """The most pairs both backends run pairwise (0 unless both are PairwiseGroupedBackends), asked by
    attribute: an isinstance against the runtime-checkable protocol costs tens of microseconds, a good part
    of an eager decode step's host time."""
    if not all(hasattr(b, "grouped_gemm_pairwise") for b in (b13, b2)):
        return 0
    return min(b13.PAIRWISE_MAX_PAIRS, b2.PAIRWISE_MAX_PAIRS)


# -- the module ----------------------------------------------------------------------------------------------

class FP8Experts(nn.Module):
    """E gated experts y = down(silu(gate(x)) * up(x)) with block-FP8 (or INT8) weights, as grouped GEMMs.

    Args:
        num_experts: E.
        hidden_size: H (any positive int).
        intermediate_size: I, a multiple of 128 (module docstring).
        dtype: `torch.float8_e4m3fn` (default) or `torch.int8`, for weights and activations.
        block_size: (128, 128) only.
        scale_ue8m0: power-of-two scales for activations (and for weights quantized by `from_experts`).
        backend: "auto" (default) or a grouped backend name: "reference", "triton", "deepgemm"
            (fp8linear.backends.GROUPED_NAMES). One that cannot serve raises BackendUnsupportedError on
            the forward, naming the reason.
        grouping: "auto" (default), "indexed", "contiguous" or "masked" (module docstring).
        device: where the parameters live; "meta" costs nothing.

    A module built directly holds zero weights and unit scales; fill it with `load_state_dict`, `load_expert_`
    or build it with `from_experts`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 dtype: torch.dtype = torch.float8_e4m3fn, block_size: tuple[int, int] = (128, 128),
                 scale_ue8m0: bool = False, backend: str = "auto", grouping: str = "auto",
                 device: "torch.device | str | None" = None) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if intermediate_size % BLOCK:
            raise ValueError(f"intermediate_size must be a multiple of {BLOCK} (module docstring); got "
                             f"{intermediate_size}. Keep such experts unquantized")
        self.config = FP8Config(dtype=dtype, block_size=block_size, scale_ue8m0=scale_ue8m0, backend=backend)
        if self.config.backend.value not in backends.GROUPED_NAMES:
            raise ValueError(
                f"backend={self.config.backend.value!r} has no grouped GEMM; FP8Experts takes one of "
                f"{', '.join(repr(n) for n in backends.GROUPED_NAMES)}")
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {', '.join(repr(g) for g in GROUPINGS)}; got {grouping!r}")
        self.grouping = grouping
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        # (grouping, device) -> the backends' pair, or why none serves (asked again on every auto forward)
        self._choice: dict[tuple, "tuple[types.ModuleType, types.ModuleType] | str"] = {}
        self._prepared: dict[tuple[str, str], tuple[tuple, Any]] = {}
        self._source: "tuple[type, Any] | None" = None  # (transformers class, its config): for `dequantize`

        E, H, I = num_experts, hidden_size, intermediate_size
        meta = device is not None and torch.device(device).type == "meta"
        make, ones = (torch.empty, torch.empty) if meta else (torch.zeros, torch.ones)
        hb, ib = -(-H // BLOCK), I // BLOCK
        f32 = torch.float32
        self.gate_up_proj = nn.Parameter(make((E, 2 * I, H), dtype=self.dtype, device=device), requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(ones((E, 2 * ib, hb), dtype=f32, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(make((E, H, I), dtype=self.dtype, device=device), requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(ones((E, hb, ib), dtype=f32, device=device), requires_grad=False)
        self.register_state_dict_post_hook(FP8Experts._per_expert_state_hook)
        self.register_load_state_dict_pre_hook(FP8Experts._merge_state_hook)

    # -- configuration views (FP8Linear's names) --------------------------------------------------------
    dtype = property(lambda self: self.config.dtype, doc="torch.float8_e4m3fn or torch.int8")
    block_size = property(lambda self: self.config.block_size, doc="(128, 128)")
    scale_ue8m0 = property(lambda self: self.config.scale_ue8m0, doc="power-of-two scales")
    backend = property(lambda self: self.config.backend.value, doc="the grouped backend's name, or 'auto'")

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        hb, ib = -(-H // BLOCK), I // BLOCK
        return {"gate_up_proj": (E, 2 * I, H), "gate_up_proj_scale_inv": (E, 2 * ib, hb),
                "down_proj": (E, H, I), "down_proj_scale_inv": (E, hb, ib)}

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_experts(cls, experts: nn.Module, **options: Any) -> "FP8Experts":
        """Quantize a transformers experts module (Qwen3MoeExperts, Qwen2MoeExperts, MixtralExperts,
        DeepseekV3Experts, ...) into a new FP8Experts on the same device: each expert's gate_up [2I, H] and
        down [H, I] through fp8linear.weights.quantize_weight_blockwise. `options` are the constructor's
        keywords (dtype, block_size, scale_ue8m0, backend, grouping). `experts` is not modified."""
        why = unsupported_reason(experts)
        if why is not None:
            raise ValueError(f"cannot quantize {type(experts).__name__}: {why}")
        if "device" in options:
            raise TypeError("from_experts takes no device: the result lives where experts.gate_up_proj does")
        E, two_I, H = experts.gate_up_proj.shape
        module = cls(E, H, two_I // 2, device="meta", **options)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                source = getattr(experts, name).detach()
                parts = [quantize_weight_blockwise(source[e], module.dtype, module.block_size, module.scale_ue8m0)
                         for e in range(E)]
                setattr(module, name, nn.Parameter(torch.stack([w for w, _ in parts]), requires_grad=False))
                setattr(module, f"{name}_scale_inv", nn.Parameter(torch.stack([s for _, s in parts]),
                                                                  requires_grad=False))
        module._source = (type(experts), getattr(experts, "config", None))
        module.train(experts.training)
        return module

    @classmethod
    def empty_like(cls, experts: nn.Module, device: "torch.device | str", **options: Any) -> "FP8Experts":
        """An FP8Experts of `experts`' shapes (a transformers experts module, on the meta device or not) with
        uninitialised storage on `device`, to be filled expert by expert with `load_expert_` (a checkpoint
        loader's path: no bf16 copy of the experts is ever made). `options` as the constructor's."""
        why = unsupported_reason(experts)
        if why is not None:
            raise ValueError(f"cannot hold {type(experts).__name__} in FP8: {why}")
        E, two_I, H = experts.gate_up_proj.shape
        module = cls(E, H, two_I // 2, device="meta", **options)
        for name, shape in module._shapes().items():
            dtype = torch.float32 if name.endswith("scale_inv") else module.dtype
            setattr(module, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))
        module._source = (type(experts), getattr(experts, "config", None))
        module._unloaded = set(itertools.product(range(E), PROJECTIONS, LEAVES))
        return module

    def expert_tensor_shape(self, projection: str, leaf: str) -> tuple[int, int]:
        """The shape of one expert's tensor in the per-expert layout (gate_proj/up_proj [I, H], down_proj
        [H, I]; scales [ceil(N/128), ceil(K/128)])."""
        H, I = self.hidden_size, self.intermediate_size
        N, K = (H, I) if projection == "down_proj" else (I, H)
        return (N, K) if leaf == "weight" else (-(-N // BLOCK), -(-K // BLOCK))

    def _slot(self, e: int, projection: str, leaf: str) -> torch.Tensor:
        """The view of the fused storage that holds expert e's `projection.leaf`."""
        I = self.intermediate_size
        if projection == "down_proj":
            return (self.down_proj if leaf == "weight" else self.down_proj_scale_inv)[e]
        fused = self.gate_up_proj if leaf == "weight" else self.gate_up_proj_scale_inv
        n = I if leaf == "weight" else I // BLOCK
        part = 0 if projection == "gate_proj" else 1
        return fused[e, part * n:(part + 1) * n]

    def load_expert_(self, e: int, projection: str, leaf: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (`{e}.{projection}.{leaf}` of the per-expert layout) into place.

        weight: the module's dtype, shape `expert_tensor_shape`; weight_scale_inv: fp32, bf16 or fp16 (stored
        as fp32). Raises ValueError naming the tensor otherwise."""
        name = f"{e}.{projection}.{leaf}"
        if not (isinstance(e, int) and 0 <= e < self.num_experts) or projection not in PROJECTIONS or leaf not in LEAVES:
            raise ValueError(f"{name}: not a tensor of {self.num_experts} experts' {PROJECTIONS} x {LEAVES}")
        shape = self.expert_tensor_shape(projection, leaf)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {list(tensor.shape)}, expected {list(shape)}")
        if leaf == "weight" and tensor.dtype != self.dtype:
            raise ValueError(f"{name}: dtype {tensor.dtype}, expected {self.dtype} (the quantization_config's)")
        if leaf != "weight" and tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: scale dtype {tensor.dtype}; expected float32, bfloat16 or float16")
        with torch.no_grad():
            self._slot(e, projection, leaf).copy_(tensor)
        self._prepared.clear()
        unloaded = self.__dict__.get("_unloaded")
        if unloaded is not None:
            unloaded.discard((e, projection, leaf))

    def missing_expert_tensors(self) -> list[str]:
        """Per-expert names (`{e}.{projection}.{leaf}`) an `empty_like` module has not received yet."""
        return [f"{e}.{p}.{l}" for e, p, l in sorted(self.__dict__.get("_unloaded") or ())]

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) in fp32: dequant(weight) per expert."""
        return tuple(torch.stack([dequantize_weight_blockwise(w[e], s[e], self.block_size)
                                  for e in range(self.num_experts)])
                     for w, s in ((self.gate_up_proj, self.gate_up_proj_scale_inv),
                                  (self.down_proj, self.down_proj_scale_inv)))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        """The transformers experts module this one was built from (`from_experts` / `empty_like`), holding
        the dequantized weights in `dtype`: the baseline of the same values in high precision."""
        if self._source is None:
            raise ValueError("this FP8Experts was not built from a transformers experts module (from_experts or "
                             "empty_like): use dequantized_weights() for the tensors")
        cls, config = self._source
        with torch.device("meta"):
            experts = cls(config)
        w13, w2 = self.dequantized_weights()
        experts.gate_up_proj = nn.Parameter(w13.to(dtype), requires_grad=False)
        experts.down_proj = nn.Parameter(w2.to(dtype), requires_grad=False)
        for name, buf in list(experts.named_buffers()):
            if buf.device.type == "meta":
                raise ValueError(f"{cls.__name__} has buffer {name!r}, which dequantize cannot rebuild")
        return experts.train(self.training)

    # -- caches ----------------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._shapes_names() and "_prepared" in self.__dict__:
            self._prepared.clear()
        super().__setattr__(name, value)

    @staticmethod
    def _shapes_names() -> tuple[str, ...]:
        return ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")

    def _apply(self, fn, *args, **kwargs):
        self._prepared.clear()
        self._choice.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_choice"] = {}
        state["_prepared"] = {}
        return state

    def _prepared_for(self, name: str, backend: types.ModuleType) -> Any:
        params = self._parameters
        weight, scale = params[name], params[f"{name}_scale_inv"]
        entry = self._prepared.get((name, backend.NAME))
        if torch.compiler.is_compiling():
            if entry is not None:
                return entry[1]
            key = None
        else:
            key = (weight.data_ptr(), weight._version, scale.data_ptr(), scale._version) \
                if not weight.is_inference() else (weight.data_ptr(), -1, scale.data_ptr(), -1)
            if entry is not None and entry[0] == key:
                return entry[1]
        prepared = backend.prepare_grouped_weight(weight, scale)
        self._prepared[(name, backend.NAME)] = (key, prepared)
        return prepared

    def backends_for(self, grouping: str, device: torch.device) -> tuple[types.ModuleType, types.ModuleType]:
        """(gate_up's backend, down's backend) for `grouping` on `device`, chosen once and cached (as is a
        BackendUnsupportedError's reason, raised again on every call)."""
        key = (grouping, device)
        pair = self._choice.get(key)
        if pair is None:
            E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
            try:
                pair = (backends.select_grouped(self.backend, E, 2 * I, H, self.dtype, device, grouping),
                        backends.select_grouped(self.backend, E, H, I, self.dtype, device, grouping))
                log.debug("FP8Experts(E=%d, H=%d, I=%d, %s) %s on %s: gate_up %s, down %s (backend=%s)", E, H, I,
                          dtype_short_str(self.dtype), grouping, device, pair[0].NAME, pair[1].NAME, self.backend)
            except backends.BackendUnsupportedError as exc:
                pair = str(exc)
            self._choice[key] = pair
        if isinstance(pair, str):
            raise backends.BackendUnsupportedError(pair)
        return pair

    def grouping_for(self, T: int, device: torch.device, k: int = 1) -> str:
        """The layout a forward of T tokens with k slots each (top-k) on `device` runs in (module docstring)."""
        if self.grouping != "auto":
            return self.grouping
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        try:
            self.backends_for("indexed", device)
        except backends.BackendUnsupportedError:
            pass
        else:
            S = T * k
            if (S >= DEEPGEMM_MIN_ROWS_PER_EXPERT * self.num_experts
                    and S * self.hidden_size * self.intermediate_size >= DEEPGEMM_MIN_PAIR_MACS
                    and not capturing and not torch.compiler.is_compiling()):
                try:
                    if all(b.NAME == "deepgemm" for b in self.backends_for("contiguous", device)):
                        return "contiguous"
                except backends.BackendUnsupportedError:
                    pass
            return "indexed"
        b13, b2 = self.backends_for("contiguous", device)
        if max(b13.CONTIGUOUS_ALIGN, b2.CONTIGUOUS_ALIGN) == 1:
            return "contiguous"
        return "masked" if capturing or T <= MASKED_MAX_TOKENS else "contiguous"

    # -- the hot path ----------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: "torch.Tensor | None") -> None:
        H = self.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != H:
            raise ValueError(f"hidden_states must be a tensor [T, {H}] (hidden_size); got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"hidden_states must be bfloat16, float16 or float32; got {x.dtype}")
        if x.device != self.gate_up_proj.device:
            raise ValueError(f"hidden_states is on {x.device} but the experts' weights are on "
                             f"{self.gate_up_proj.device}; move one of them")
        T = x.shape[0]
        if (not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2 or top_k_index.shape[0] != T
                or top_k_index.is_floating_point() or top_k_index.is_complex() or top_k_index.dtype == torch.bool):
            raise ValueError(f"top_k_index must be an integer tensor [T={T}, k]; got "
                             f"{getattr(top_k_index, 'dtype', type(top_k_index).__name__)} "
                             f"{list(getattr(top_k_index, 'shape', []))}")
        if top_k_index.device != x.device:
            raise ValueError(f"top_k_index is on {top_k_index.device}, hidden_states on {x.device}")
        if top_k_weights is not None and (not isinstance(top_k_weights, torch.Tensor)
                                          or tuple(top_k_weights.shape) != tuple(top_k_index.shape)
                                          or not top_k_weights.is_floating_point()):
            raise ValueError(f"top_k_weights must be a float tensor of top_k_index's shape "
                             f"{list(top_k_index.shape)}; got {getattr(top_k_weights, 'dtype', None)} "
                             f"{list(getattr(top_k_weights, 'shape', []))}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H] bf16/fp16/fp32, top_k_index [T, k] (experts, any integer dtype), top_k_weights
        [T, k] -> [T, H] in hidden_states' dtype: sum_j weight[t, j] * expert_{index[t, j]}(x[t])."""
        self._check_inputs(hidden_states, top_k_index, top_k_weights)
        pairwise = self._pairwise_backends(hidden_states, top_k_index, top_k_weights)
        if pairwise is not None:
            return self._pairwise_forward(hidden_states, top_k_index, top_k_weights, *pairwise)
        y, rows = self._outputs(hidden_states, top_k_index)
        return combine_slots(y, top_k_weights, hidden_states.dtype, rows=rows)  # transformers' combine, one pass

    def _quantize_tokens(self, x: torch.Tensor, layout: ScaleLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's row of x [T, H] quantized once per 1x128 group, H padded with zero columns to whole
        groups (as FP8Linear pads): (q [T, Hp], scales in `layout`)."""
        Hp = padded_k(self.hidden_size)
        x2d = x if Hp == self.hidden_size else torch.nn.functional.pad(x, (0, Hp - self.hidden_size))
        return quantize_for_gemm(x2d.contiguous(), BLOCK, self.dtype, self.scale_ue8m0, layout, 1)

    def _pairwise_backends(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                           ) -> "tuple[types.ModuleType, types.ModuleType] | None":
        """(gate_up's, down's) backend where this forward runs pairwise (module docstring), else None."""
        T, k = top_k_index.shape
        if T * k == 0 or self.grouping_for(T, x.device, k) != "indexed":
            return None
        b13, b2 = self.backends_for("indexed", x.device)
        if T * k > _pairwise_max_pairs(b13, b2):
            return None
        P = torch.promote_types(x.dtype, top_k_weights.dtype)
        return (b13, b2) if P in (torch.float32, x.dtype) else None

    def _pairwise_forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                          b13: types.ModuleType, b2: types.ModuleType) -> torch.Tensor:
        with _on_device_of(x):
            q_x, s_x = self._quantize_tokens(x, b13.SCALE_LAYOUT)
            h = b13.grouped_gemm_pairwise(q_x, s_x, self._prepared_for("gate_up_proj", b13), top_k_index, "tokens",
                                          x.dtype)
            q2, s2 = silu_and_mul_quant(h, BLOCK, self.dtype, scale_layout=b2.SCALE_LAYOUT,
                                        scale_ue8m0=self.scale_ue8m0)
            return b2.grouped_gemm_pairwise(q2, s2, self._prepared_for("down_proj", b2), top_k_index, "pairs",
                                            x.dtype, combine_weights=top_k_weights)

    def expert_outputs(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """[T, k, H] in hidden_states' dtype: expert index[t, j] applied to token t, before the routing weights
        (zeros where the index names no expert in [0, E))."""
        self._check_inputs(hidden_states, top_k_index, None)
        y, rows = self._outputs(hidden_states, top_k_index)
        return y if rows is None else slots_at_rows(y, rows)

    def _outputs(self, x: torch.Tensor, top_k_index: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """(y [T, k, H], None) in pair order, or (y [R, H], rows [T, k]): the grouped layout's output rows
        and each pair's row in them, -1 where the pair names no expert (moe_combine reads them in place)."""
        T, k = top_k_index.shape
        if T == 0 or k == 0:
            return x.new_zeros((T, k, self.hidden_size)), None
        with _on_device_of(x):
            return self._expert_outputs(x, top_k_index)

    def _expert_outputs(self, x: torch.Tensor, top_k_index: torch.Tensor
                        ) -> "tuple[torch.Tensor, torch.Tensor | None]":
        T, k = top_k_index.shape
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        device = x.device
        grouping = self.grouping_for(T, device, k)
        b13, b2 = self.backends_for(grouping, device)
        if grouping == "indexed":
            pairs = sort_pairs(top_k_index, E)
            q_x, s_x = self._quantize_tokens(x, b13.SCALE_LAYOUT)
            h = b13.grouped_gemm_indexed(q_x, s_x, self._prepared_for("gate_up_proj", b13), pairs, "gather", x.dtype)
            q2, s2 = silu_and_mul_quant(h, BLOCK, self.dtype, scale_layout=b2.SCALE_LAYOUT, scale_ue8m0=self.scale_ue8m0)
            y = b2.grouped_gemm_indexed(q2, s2, self._prepared_for("down_proj", b2), pairs, "scatter", x.dtype)
            return y.view(T, k, H), None
        if grouping == "contiguous":
            r = route(top_k_index, E, grouping, align=max(b13.CONTIGUOUS_ALIGN, b2.CONTIGUOUS_ALIGN))
            if r.rows == 0:  # aligned segments of no pair: every index names no expert
                return x.new_zeros((T, k, H)), None
        else:
            def masked_rows(m: int) -> int:  # rows both backends accept (a fixed point of both roundings)
                while True:
                    n = max(b13.masked_rows(m), b2.masked_rows(m))
                    if n == m:
                        return m
                    m = n
            r = route(top_k_index, E, grouping, masked_rows=masked_rows)

        # Quantize each token once (row scales), then copy its bytes into the grouped layout.
        q_x, s_x = self._quantize_tokens(x, ScaleLayout.ROW)
        dest_w, token_w = r.dest[:r.writes], r.token[:r.writes]
        Hp = q_x.shape[1]
        G1 = Hp // BLOCK
        if grouping == "contiguous":  # one gather per tensor; padding rows copy token 0, their outputs unread
            row_token = torch.zeros(r.rows, dtype=torch.int64, device=device)
            row_token[dest_w] = token_w
            q = q_x.view(torch.uint8).index_select(0, row_token).view(self.dtype)
            s = empty_scales((), r.rows, G1, b13.SCALE_LAYOUT, device).copy_(s_x.index_select(0, row_token))
        else:
            max_m = r.rows
            q = torch.empty(((E + 1) * max_m, Hp), dtype=self.dtype, device=device)  # group E: scratch
            s3 = empty_scales((E + 1,), max_m, G1, b13.SCALE_LAYOUT, device)
            s3[torch.div(dest_w, max_m, rounding_mode="floor"), dest_w % max_m] = s_x[token_w]
            s = s3[:E]
            q.view(torch.uint8)[dest_w] = q_x.view(torch.uint8)[token_w]

        # gate_up, then SiLU-and-mul fused into the quantization of the down GEMM's input.
        G2 = I // BLOCK
        if grouping == "contiguous":
            h = b13.grouped_gemm_contiguous(q, s, self._prepared_for("gate_up_proj", b13), r.m_indices, x.dtype)
            q2, s2 = silu_and_mul_quant(h, BLOCK, self.dtype, scale_layout=b2.SCALE_LAYOUT, scale_ue8m0=self.scale_ue8m0)
            y = b2.grouped_gemm_contiguous(q2, s2, self._prepared_for("down_proj", b2), r.m_indices, x.dtype)
        else:
            q = q[:E * max_m].view(E, max_m, Hp)
            h = b13.grouped_gemm_masked(q, s, self._prepared_for("gate_up_proj", b13), r.masked_m, r.expected_m,
                                        x.dtype)  # [E, max_m, 2I]
            q2, s2 = silu_and_mul_quant(h.reshape(E * max_m, 2 * I), BLOCK, self.dtype, scale_layout=ScaleLayout.ROW,
                                        scale_ue8m0=self.scale_ue8m0)
            q2 = q2.view(E, max_m, I)
            if b2.SCALE_LAYOUT is ScaleLayout.ROW:
                s2 = s2.view(E, max_m, G2)
            else:
                s2 = empty_scales((E,), max_m, G2, b2.SCALE_LAYOUT, device).copy_(s2.view(E, max_m, G2))
            y = b2.grouped_gemm_masked(q2, s2, self._prepared_for("down_proj", b2), r.masked_m, r.expected_m, x.dtype)

        # Each pair's output row, -1 where it names no expert: the combine reads y where it lies.
        rows = torch.empty(T * k, dtype=torch.int64, device=device)
        rows[r.perm] = torch.where(r.valid, r.dest, torch.full_like(r.dest, -1))
        return y.reshape(-1, H), rows.view(T, k)

    # -- the published per-expert state dict -------------------------------------------------------------
    @staticmethod
    def _per_expert_state_hook(module: "FP8Experts", state_dict: dict, prefix: str, local_metadata: dict) -> None:
        fused = {name: state_dict.pop(f"{prefix}{name}", None) for name in FP8Experts._shapes_names()}
        if any(t is None for t in fused.values()):
            return
        I, ib = module.intermediate_size, module.intermediate_size // BLOCK
        for e in range(module.num_experts):
            views = {
                "gate_proj": (fused["gate_up_proj"][e, :I], fused["gate_up_proj_scale_inv"][e, :ib]),
                "up_proj": (fused["gate_up_proj"][e, I:], fused["gate_up_proj_scale_inv"][e, ib:]),
                "down_proj": (fused["down_proj"][e], fused["down_proj_scale_inv"][e]),
            }
            for projection in PROJECTIONS:
                for leaf, tensor in zip(LEAVES, views[projection]):
                    state_dict[f"{prefix}{e}.{projection}.{leaf}"] = tensor

    @staticmethod
    def _merge_state_hook(module: "FP8Experts", state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                          missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        found: dict[tuple[int, str, str], str] = {}
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            parsed = parse_expert_key(key[len(prefix):])
            if parsed is not None and parsed[0] == "":
                found[parsed[1:]] = key
        if not found:
            return
        tensors = {spec: state_dict.pop(key) for spec, key in found.items()}
        E = module.num_experts
        wanted = set(itertools.product(range(E), PROJECTIONS, LEAVES))
        missing = sorted(wanted - set(tensors))
        extra = sorted(set(tensors) - wanted)
        if missing or extra:
            error_msgs.append(
                f"{prefix}: per-expert tensors of {E} experts are incomplete: missing "
                f"{[f'{prefix}{e}.{p}.{l}' for e, p, l in missing[:6]]}{' ...' if len(missing) > 6 else ''}, "
                f"beyond the experts {[f'{prefix}{e}.{p}.{l}' for e, p, l in extra[:6]]}")
            return
        for (e, projection, leaf), t in tensors.items():
            shape = module.expert_tensor_shape(projection, leaf)
            if tuple(t.shape) != shape:
                error_msgs.append(f"{prefix}{e}.{projection}.{leaf}: shape {list(t.shape)}, expected {list(shape)}")
                return

        def scale(t: torch.Tensor) -> torch.Tensor:
            return t.float()

        for leaf, suffix, fix in (("weight", "", lambda t: t), ("weight_scale_inv", "_scale_inv", scale)):
            state_dict[f"{prefix}gate_up_proj{suffix}"] = torch.stack(
                [torch.cat([fix(tensors[(e, "gate_proj", leaf)]), fix(tensors[(e, "up_proj", leaf)])]) for e in range(E)])
            state_dict[f"{prefix}down_proj{suffix}"] = torch.stack([fix(tensors[(e, "down_proj", leaf)]) for e in range(E)])

    def extra_repr(self) -> str:
        bn, bk = self.block_size
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, dtype={dtype_short_str(self.dtype)}, "
                f"block_size={bn}x{bk}, scale_ue8m0={self.scale_ue8m0}, backend={self.backend}, "
                f"grouping={self.grouping}, act=silu (fused quant)")
