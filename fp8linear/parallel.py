"""Several GPUs: tensor-parallel shards of FP8Linear that respect 128-blocks, and per-device kernels.

Tensor parallelism (Megatron-style, the "colwise" / "rowwise" of transformers' `tp_plan`):

    colwise  y = x W^T: split N. Rank r holds weight rows [n0, n1), weight_scale_inv block rows
             [n0/128, ceil(n1/128)) and bias [n0, n1); its output is columns [n0, n1) of y.
    rowwise  split K. Rank r holds weight columns [k0, k1) and weight_scale_inv block columns
             [k0/128, ceil(k1/128)); it reads columns [k0, k1) of x (the colwise layer before it left
             them there) and its output is a partial sum; the sum over ranks (an all-reduce, in the
             output's own dtype, bf16) is y. The bias lives on rank 0 only, so that the plain sum
             counts it once and a shard is a complete FP8Linear with no hidden step.

A shard must own whole 128 x 128 weight blocks: a block's one scale cannot be split between two ranks,
and the 1 x 128 activation groups a rowwise shard quantizes must be the same groups the full layer
quantizes. `shard_ranges` gives the split and raises when it would cut a block.

Shards follow `torch.chunk` (DTensor `Shard`) sizes: ceil(size / world_size) per rank, the last rank
taking what is left. That is the split transformers applies to a checkpoint's `weight` and
`weight_scale_inv` alike under `tp_plan`; with both dimensions chunked this way, the weight rows and the
scale block rows land on the same rank exactly when ceil(size / world_size) is a multiple of 128, which
is the condition checked here. When `size` is not a multiple of 128 the last shard owns the partial edge
block (e.g. size 383 on 3 ranks: 128, 128, 127). vLLM and SGLang are stricter: they need size /
world_size itself to be a multiple of 128 (see docs/serving.md).

Several devices in one process (`device_map`): every FP8Linear must run its kernels on the device that
holds its weights. The quantization op sets a CUDA guard from its input's device, and torch's own GEMMs
do the same, but a JIT or Triton kernel launches on the *current* device unless told otherwise;
`guard_devices` makes each FP8Linear's device current for the length of its forward, and
`check_devices` reports where each layer lives and refuses a layer split across devices. Anything a
backend prepares lazily from the weights (padded scales, transposed copies, a JIT kernel handle) must be
keyed by device: one published FP8 integration returned garbage when a model spanned two GPUs because
its JIT GEMM kernels stayed bound to the first device's CUDA context (tests/test_multi_gpu.py checks
ours for exactly that).

Transformers integration: `shard_model` reads `model.config.base_model_tp_plan` (keys relative to the
base model, `*` standing for a layer number, e.g. "layers.*.self_attn.q_proj": "colwise"), replaces each
named FP8Linear (or a plain nn.Linear left unquantized) by its local shard, in place, and hooks a bf16
all-reduce after each rowwise layer. Parameter names do not change, so a sharded model still reads and
writes our checkpoint names. This is the same math as transformers' `from_pretrained(tp_plan="auto")`
without DTensor: each rank holds plain local tensors, which is what the GEMM backends read. Attention
keeps working on local heads because transformers' attention reshapes with -1 heads; the embeddings,
norms and lm_head stay replicated.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .linear import FP8Linear

__all__ = [
    "BLOCK",
    "STYLES",
    "shard_ranges",
    "valid_world_sizes",
    "shard_fp8_linear",
    "shard_linear",
    "all_reduce_output",
    "register_all_reduce",
    "tp_plan_of",
    "shard_model",
    "check_devices",
    "guard_devices",
]

#: The weight block along both N and K (fp8linear.config.SUPPORTED_BLOCK_SIZE).
BLOCK = 128

#: The tensor-parallel styles of transformers' tp_plan that `shard_fp8_linear` and `shard_model` apply.
STYLES = ("colwise", "rowwise")

#: tp_plan styles that change nothing at inference and are skipped by `shard_model` (norms between a
#: colwise and a rowwise layer only all-reduce gradients; "replicate" keeps a full copy on every rank).
_INFERENCE_NOOP_STYLES = ("replicated_with_grad_allreduce", "replicate")


# ----------------------------------------------------------------------------------------------------
# Shard arithmetic
# ----------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def _split_ok(size: int, world_size: int, block: int) -> bool:
    chunk = -(-size // world_size)
    # The last rank must not be empty: with chunk a multiple of block that needs world_size > block.
    return world_size == 1 or (chunk % block == 0 and (world_size - 1) * chunk < size)


def valid_world_sizes(size: int, block: int = BLOCK, limit: int = 16) -> list[int]:
    """The world sizes in 1..limit that split `size` into shards of whole `block`s (see `shard_ranges`)."""
    _check_int("size", size, 1)
    _check_int("block", block, 1)
    return [w for w in range(1, limit + 1) if _split_ok(size, w, block)]


def shard_ranges(size: int, world_size: int, block: int = BLOCK, *, name: str = "size") -> list[tuple[int, int]]:
    """Split `size` rows (or columns) into `world_size` shards of whole `block`s: [(start, stop)] per rank.

    Sizes follow `torch.chunk`: every rank but the last holds ceil(size / world_size), the last holds the
    rest. Every boundary must fall on a multiple of `block`; the last shard may end with the partial
    edge block when `size % block != 0` (only boundaries matter). Raises ValueError naming `name`, its
    value, the world size, the block and the world sizes that would work, e.g.

        "N=4160 is not divisible into 2 shards of whole 128-blocks: ..."

    `name` is only for that message ("N", "K", or a module's name).
    """
    _check_int(name, size, 1)
    _check_int("world_size", world_size, 1)
    _check_int("block", block, 1)
    if not _split_ok(size, world_size, block):
        chunk = -(-size // world_size)
        if chunk % block:
            why = (
                f"each of the first {world_size - 1} shard(s) would hold ceil({size}/{world_size})={chunk}, "
                f"not a multiple of {block}, so a {block}-block (and its one scale) would be cut in two"
            )
        else:
            why = f"shards of {chunk} leave rank {world_size - 1} nothing"
        raise ValueError(
            f"{name}={size} is not divisible into {world_size} shards of whole {block}-blocks: {why}. "
            f"World sizes that work for {name}={size}: {valid_world_sizes(size, block)}; otherwise leave "
            f"this layer unsharded (remove it from the tp_plan)"
        )
    chunk = -(-size // world_size)
    return [(r * chunk, min((r + 1) * chunk, size)) for r in range(world_size)]


def _block_range(start: int, stop: int, block: int) -> tuple[int, int]:
    """Rows [start, stop) -> the block rows that hold them; start is a multiple of block."""
    return start // block, -(-stop // block)


# ----------------------------------------------------------------------------------------------------
# Sharding one layer
# ----------------------------------------------------------------------------------------------------


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}; got {style!r}")
    return style


def _check_rank(rank: int, world_size: int) -> None:
    _check_int("world_size", world_size, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}); got {rank!r}")


def _owned(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: a view would keep the full unsharded tensor alive, and the GEMM
    # backends read row-major weights.
    return t.detach().clone(memory_format=torch.contiguous_format)


def _fp8_options(module: nn.Module) -> dict:
    """The keyword options of `FP8Linear.from_quantized` that rebuild `module`'s configuration."""
    options = dict(module.config.module_kwargs())  # dtype, block_size, scale_ue8m0, backend
    if tuple(options["block_size"]) != (BLOCK, BLOCK):
        raise ValueError(f"shard_fp8_linear needs block_size ({BLOCK}, {BLOCK}); got {options['block_size']!r}")
    return options


def shard_fp8_linear(module: "FP8Linear", style: str, rank: int, world_size: int) -> "FP8Linear":
    """The shard of an FP8Linear that rank `rank` of `world_size` holds; a new FP8Linear (module is untouched).

    module: an FP8Linear with weight [N, K] (fp8 e4m3 or int8, row-major), weight_scale_inv fp32
        [ceil(N/128), ceil(K/128)] and bias [N] or None.
    style "colwise": split N by `shard_ranges(N, world_size)`. The shard holds weight[n0:n1, :],
        weight_scale_inv[n0/128 : ceil(n1/128), :] and bias[n0:n1]; given the full input x [..., K] it
        returns columns [n0, n1) of the full output, exactly (the same blocks and activation groups).
    style "rowwise": split K by `shard_ranges(K, world_size)`. The shard holds weight[:, k0:k1] and
        weight_scale_inv[:, k0/128 : ceil(k1/128)]; bias on rank 0 only (None elsewhere). Given
        x[..., k0:k1] it returns a partial output [..., N] in x's dtype; the sum over ranks
        (`all_reduce_output`) is the full output up to rounding of the partial sums.

    The shard is on module's device, with module's dtype, block size, scale_ue8m0 and backend; its
    tensors are fresh contiguous copies (the full layer can be freed). Raises ValueError when the
    split would cut a 128-block (see `shard_ranges`) or on a bad style/rank.
    """
    from .linear import FP8Linear

    if not isinstance(module, FP8Linear):
        raise TypeError(f"module must be an FP8Linear; got {type(module).__name__} (use shard_linear for nn.Linear)")
    _check_style(style)
    _check_rank(rank, world_size)
    options = _fp8_options(module)
    weight, scale, bias = module.weight, module.weight_scale_inv, module.bias
    N, K = weight.shape
    if style == "colwise":
        n0, n1 = shard_ranges(N, world_size, BLOCK, name="N")[rank]
        b0, b1 = _block_range(n0, n1, BLOCK)
        weight, scale = weight[n0:n1], scale[b0:b1]
        bias = None if bias is None else bias[n0:n1]
    else:
        k0, k1 = shard_ranges(K, world_size, BLOCK, name="K")[rank]
        b0, b1 = _block_range(k0, k1, BLOCK)
        weight, scale = weight[:, k0:k1], scale[:, b0:b1]
        # Rank 0 alone adds the bias, so the plain sum of the partial outputs counts it once.
        bias = bias if rank == 0 else None
    return FP8Linear.from_quantized(
        _owned(weight), _owned(scale), None if bias is None else _owned(bias), **options
    )


def shard_linear(module: nn.Linear, style: str, rank: int, world_size: int) -> nn.Linear:
    """The same split as `shard_fp8_linear` for a plain nn.Linear (a layer left unquantized).

    The boundaries are the 128-block ones, so an unquantized layer agrees with the quantized layers
    around it on which rank owns which features.
    """
    if not isinstance(module, nn.Linear):
        raise TypeError(f"module must be a torch.nn.Linear; got {type(module).__name__}")
    _check_style(style)
    _check_rank(rank, world_size)
    weight, bias = module.weight, module.bias
    N, K = weight.shape
    if style == "colwise":
        n0, n1 = shard_ranges(N, world_size, BLOCK, name="N")[rank]
        weight, bias = weight[n0:n1], None if bias is None else bias[n0:n1]
    else:
        k0, k1 = shard_ranges(K, world_size, BLOCK, name="K")[rank]
        weight, bias = weight[:, k0:k1], bias if rank == 0 else None
    shard = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    shard.weight = nn.Parameter(_owned(weight), requires_grad=False)
    if bias is not None:
        shard.bias = nn.Parameter(_owned(bias), requires_grad=False)
    return shard


# ----------------------------------------------------------------------------------------------------
# The all-reduce after a rowwise layer
# ----------------------------------------------------------------------------------------------------


def _world(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_output(output: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a rowwise layer's partial output over the ranks of `group`, in place, in its own dtype.

    output: [..., N] bf16 (or fp16) on this rank's device. The reduction stays in that dtype: bf16
    moves half the bytes of fp32 over the links, as vLLM, SGLang and transformers do. Returns `output`.
    A no-op when torch.distributed is unavailable or not initialised, or the group has one rank.
    """
    if _world(group) == 1:
        return output
    import torch.distributed as dist

    dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
    return output


def _all_reduce_hook(module: nn.Module, args, output):
    return all_reduce_output(output, getattr(module, "_fp8linear_tp_group", None))


def register_all_reduce(module: nn.Module, group=None):
    """Make `module`'s forward end with `all_reduce_output(y, group)`; returns the hook's handle.

    A forward hook rather than a wrapper module, so the parameter names (and with them the checkpoint
    names) stay those of the unsharded model.
    """
    module._fp8linear_tp_group = group
    return module.register_forward_hook(_all_reduce_hook)


# ----------------------------------------------------------------------------------------------------
# A whole Hugging Face model
# ----------------------------------------------------------------------------------------------------


def _base_prefix(model: nn.Module) -> str:
    """The module path of the transformers base model inside `model` ("model" in LlamaForCausalLM)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return ""
    for name, sub in model.named_modules():
        if sub is base:
            return name
    return ""


def tp_plan_of(model: nn.Module) -> dict[str, str]:
    """`model.config.base_model_tp_plan` with keys made relative to `model` (the base model's prefix added).

    Raises ValueError when the model's config has no plan (pass `tp_plan=` to `shard_model` then).
    """
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan and config is not None and hasattr(config, "get_text_config"):
        plan = getattr(config.get_text_config(), "base_model_tp_plan", None)
    if not plan:
        raise ValueError(
            f"{type(model).__name__}.config has no base_model_tp_plan; pass tp_plan={{module pattern: "
            f"'colwise' | 'rowwise'}} to shard_model"
        )
    prefix = _base_prefix(model)
    return {(f"{prefix}.{k}" if prefix else k): v for k, v in plan.items()}


def _pattern(key: str) -> "re.Pattern[str]":
    # transformers writes a layer number as "*" (parallel_utils.replace_layer_number_by_wildcard).
    return re.compile("^" + re.escape(key).replace(r"\*", r"\d+") + "$")


def _check_heads(name: str, parent: nn.Module, style: str, size: int, world_size: int) -> None:
    """Attention projections must also split on whole heads (parent.head_dim), or the local reshape breaks."""
    head_dim = getattr(parent, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return
    for start, stop in shard_ranges(size, world_size, BLOCK, name=name)[:-1]:
        if stop % head_dim:
            dim = "N" if style == "colwise" else "K"
            raise ValueError(
                f"{name}: {dim}={size} split into {world_size} shards puts a boundary at {stop}, inside a head "
                f"(head_dim={head_dim}); the attention heads (and key/value heads) must divide by "
                f"world_size={world_size}"
            )


def shard_model(
    model: nn.Module,
    rank: int,
    world_size: int,
    *,
    tp_plan: "dict[str, str] | None" = None,
    group=None,
    all_reduce: bool = True,
) -> dict[str, str]:
    """Shard `model` in place for tensor parallelism; returns {module name: style} of what was sharded.

    model: typically a transformers model after `quantize_model` / `load_quantized` (FP8Linear layers),
        on any device; each FP8Linear (or plain nn.Linear) named by the plan is replaced by its
        `rank`-th shard (`shard_fp8_linear` / `shard_linear`) on the same device.
    tp_plan: {pattern: style} with keys relative to `model`; default `tp_plan_of(model)` (the config's
        base_model_tp_plan). Styles "colwise" and "rowwise" are applied; "replicate" and
        "replicated_with_grad_allreduce" are skipped (no-ops at inference); any other style raises.
    group / all_reduce: rowwise layers get `register_all_reduce(layer, group)`. With all_reduce=False
        they return their partial sums instead (for tests that emulate the reduction).

    Every rank must call this with the same model and plan. Errors (all raised before anything is
    replaced): a split that would cut a 128-block or an attention head, a plan entry matching no
    module, a matched module that is not a linear layer, world_size > 1 with all_reduce=True but no
    initialised process group of that size.
    """
    _check_rank(rank, world_size)
    if all_reduce and world_size > 1:
        world = _world(group)
        if world != world_size:
            raise RuntimeError(
                f"shard_model(world_size={world_size}, all_reduce=True) needs an initialised torch.distributed "
                f"process group of {world_size} ranks (found {world}): call torch.distributed.init_process_group "
                "first, or pass all_reduce=False to get partial sums from rowwise layers"
            )
        import torch.distributed as dist

        if dist.get_rank(group) != rank:
            raise RuntimeError(f"shard_model(rank={rank}) called on process-group rank {dist.get_rank(group)}")
    from .linear import FP8Linear

    plan = tp_plan_of(model) if tp_plan is None else dict(tp_plan)
    modules = dict(model.named_modules())
    todo: list[tuple[str, str]] = []
    for key, style in plan.items():
        if style in _INFERENCE_NOOP_STYLES:
            continue
        if style not in STYLES:
            raise ValueError(
                f"tp_plan[{key!r}] = {style!r}: shard_model applies {STYLES} (and skips "
                f"{_INFERENCE_NOOP_STYLES}); remove this entry or shard that module yourself"
            )
        pattern = _pattern(key)
        matched = [name for name in modules if pattern.match(name)]
        if not matched:
            raise ValueError(f"tp_plan[{key!r}] matches no module of {type(model).__name__}")
        for name in matched:
            if any(name == done for done, _ in todo):
                raise ValueError(f"{name} is matched by more than one tp_plan entry (the last is {key!r})")
            todo.append((name, style))

    # Check every split first, so that an error leaves the model whole.
    for name, style in todo:
        module = modules[name]
        if not isinstance(module, (FP8Linear, nn.Linear)):
            raise ValueError(f"{name} ({type(module).__name__}) is in the tp_plan as {style!r} but is not a linear layer")
        N, K = module.weight.shape
        size = N if style == "colwise" else K
        shard_ranges(size, world_size, BLOCK, name=f"{name} {'N' if style == 'colwise' else 'K'}")
        parent = modules[name.rpartition(".")[0]]
        _check_heads(name, parent, style, size, world_size)

    for name, style in todo:
        module = modules[name]
        if isinstance(module, FP8Linear):
            shard = shard_fp8_linear(module, style, rank, world_size)
        else:
            shard = shard_linear(module, style, rank, world_size)
        if style == "rowwise" and all_reduce and world_size > 1:
            register_all_reduce(shard, group)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, shard)
    return dict(todo)


# ----------------------------------------------------------------------------------------------------
# Several devices in one process (device_map)
# ----------------------------------------------------------------------------------------------------


def _module_device(name: str, module: nn.Module) -> torch.device:
    tensors = [t for t in (module.weight, module.weight_scale_inv, module.bias) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"{name or type(module).__name__}: weight, weight_scale_inv and bias must be on one device; got "
            f"{sorted(str(d) for d in devices)} (move the whole layer with .to(device))"
        )
    return devices.pop()


def check_devices(model: nn.Module) -> dict[torch.device, list[str]]:
    """{device: names of the FP8Linear layers on it}; raises ValueError for a layer split across devices."""
    from .linear import fp8_linears

    placement: dict[torch.device, list[str]] = {}
    for name, module in fp8_linears(model).items():
        placement.setdefault(_module_device(name, module), []).append(name)
    return placement


def _enter_device(module: nn.Module, args) -> None:
    device = module.weight.device
    guard = torch.cuda.device(device) if device.type == "cuda" else None
    if guard is not None:
        guard.__enter__()
    module._fp8linear_device_guards.append(guard)


def _exit_device(module: nn.Module, args, output) -> None:
    guard = module._fp8linear_device_guards.pop()
    if guard is not None:
        guard.__exit__(None, None, None)


def guard_devices(model: nn.Module) -> dict[torch.device, list[str]]:
    """Run each FP8Linear's forward with its own CUDA device current; returns `check_devices(model)`.

    For models split over devices in one process (accelerate's `device_map`): Triton and JIT-compiled
    GEMM kernels launch on the current device, which accelerate leaves at cuda:0. Installs a forward
    pre-hook and an always-called forward hook per FP8Linear (idempotent; hooks, not a forward
    override, so `copy.deepcopy` and `torch.save` of the model keep working). The device is read at
    each call, so a later `.to(device)` is honoured. Costs one device switch per layer call.
    """
    from .linear import fp8_linears

    placement = check_devices(model)
    for module in fp8_linears(model).values():
        if getattr(module, "_fp8linear_device_guards", None) is not None:
            continue
        module._fp8linear_device_guards = []
        module.register_forward_pre_hook(_enter_device)
        # always_call: restore the previous device even when forward raises.
        module.register_forward_hook(_exit_device, always_call=True)
    return placement
