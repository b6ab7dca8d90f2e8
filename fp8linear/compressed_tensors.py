"""compressed-tensors checkpoints: the FP8_BLOCK scheme, read and written.

llm-compressor's `FP8_BLOCK` scheme (the "-FP8-block" models) stores what our default format stores,
under another scale name and another config:

    <m>.weight        F8_E4M3 [N, K]
    <m>.weight_scale  [ceil(N/128), ceil(K/128)], the model dtype or F32: the multiplier that dequantizes
                      (dequantized = weight * scale per 128x128 block), i.e. our `weight_scale_inv`

    "quantization_config": {
      "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
      "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "symmetric": true, "strategy": "block",
                    "block_structure": [128, 128], "dynamic": false},
        "input_activations": {"type": "float", "num_bits": 8, "symmetric": true, "strategy": "group",
                              "group_size": 128, "dynamic": true}}},
      "ignore": ["lm_head", "re:.*mlp\\.gate$"], "kv_cache_scheme": null}

The field names and defaults are compressed-tensors' `QuantizationConfig`, `QuantizationScheme` and
`QuantizationArgs` (`quantization/quant_config.py`, `quant_scheme.py`, `quant_args.py`): a missing
`type` means "int", a missing `strategy` is inferred from `group_size` (none: "tensor", > 0: "group",
-1: "channel"), and a group may instead be a preset name mapped to its targets (`{"FP8_BLOCK": ["Linear"]}`).

Which layers are quantized follows compressed-tensors' `utils/match.py`: a module is quantized when an
entry of some group's `targets` matches it and no entry of `ignore` does. An entry matches a module when
it equals the module's full name; or starts with "re:" and the rest `re.match`es the full name (anchored
at the start only, so "re:.*gate$" needs its own "$"); or equals the name of a class in the module's
MRO ("Linear" matches every nn.Linear). Names are those of the checkpoint's tensors.

Every other scheme (FP8_DYNAMIC's per-channel weights, static activations, W4A16, NVFP4, ...) is refused
with its name: fp8linear computes 128x128 weight blocks and dynamic 1x128 activation groups only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .config import FP8Config

__all__ = ["QUANT_METHOD", "FP8BlockScheme", "is_compressed_tensors", "parse", "quantization_config", "matches",
           "counts_as_linear"]

QUANT_METHOD = "compressed-tensors"
#: How compressed-tensors names the on-disk layout of float weights stored as fp8 bytes.
FORMAT = "float-quantized"
#: The one scheme read and written, by its compressed-tensors preset name.
SCHEME = "FP8_BLOCK"

# FP8_BLOCK's QuantizationArgs, in the normal form `_args` gives (compressed-tensors quant_scheme.py).
_WEIGHTS = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "block", "block_structure": [128, 128],
            "group_size": None, "dynamic": False}
_INPUTS = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "group", "block_structure": None,
           "group_size": 128, "dynamic": True}

#: Preset names of compressed-tensors schemes, by (weights, input_activations) signature, to name what a
#: refused checkpoint holds. Signature: (type, num_bits, strategy) of the weights, plus
#: (type, num_bits, strategy, dynamic) of the input activations or None for weight-only schemes.
_PRESETS = {
    (("float", 8, "block"), ("float", 8, "group", True)): "FP8_BLOCK",
    (("float", 8, "channel"), ("float", 8, "token", True)): "FP8_DYNAMIC",
    (("float", 8, "tensor"), ("float", 8, "tensor", False)): "FP8",
    (("int", 8, "channel"), ("int", 8, "token", True)): "W8A8 (INT8)",
    (("int", 4, "group"), ("int", 8, "token", True)): "W4A8",
    (("int", 4, "group"), ("float", 8, "token", True)): "W4AFP8",
    (("int", 4, "group"), None): "W4A16",
    (("int", 8, "group"), None): "W8A16",
    (("float", 4, "tensor_group"), ("float", 4, "tensor_group", "local")): "NVFP4",
    (("float", 4, "tensor_group"), None): "NVFP4A16",
    (("float", 4, "group"), ("float", 4, "group", True)): "MXFP4",
    (("float", 4, "group"), None): "MXFP4A16",
    (("float", 8, "group"), ("float", 8, "group", True)): "MXFP8",
    (("float", 8, "group"), None): "MXFP8A16",
}


def is_compressed_tensors(qc: Mapping[str, Any]) -> bool:
    """Whether a `quantization_config` dict is compressed-tensors'."""
    return qc.get("quant_method") == QUANT_METHOD


def matches(name: str, module: "nn.Module | None", entry: str) -> bool:
    """compressed-tensors' rule for one `targets` / `ignore` entry (module docstring)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    if entry == name:
        return True
    return module is not None and any(
        issubclass(cls, nn.Module) and cls.__name__ == entry for cls in type(module).__mro__
    )


def counts_as_linear(module: nn.Module) -> bool:
    """Whether the target "Linear" covers `module` when vLLM serves it: nn.Linear, and (compressed-tensors'
    `get_vllm_module_type`) any class named like a router or gate ("Router", "Gate", "Gating"), which vLLM
    builds as a linear layer. Such modules left unquantized must be listed in `ignore`."""
    kind = type(module).__name__
    return isinstance(module, nn.Linear) or any(word in kind for word in ("Router", "Gate", "Gating"))


def _first_match(name: str, module: nn.Module, entries: Iterable[str]) -> "str | None":
    return next((e for e in entries if matches(name, module, e)), None)


@dataclasses.dataclass(frozen=True)
class FP8BlockScheme:
    """A parsed compressed-tensors FP8_BLOCK `quantization_config`.

    Fields:
        config: the FP8Config of every quantized layer (fp8 e4m3, 128x128 blocks, exact scales).
        targets: every group's `targets`, in order, duplicates dropped.
        ignore: the `ignore` entries.
    """

    config: FP8Config
    targets: tuple[str, ...]
    ignore: tuple[str, ...]

    def check_layers(self, quantized: Mapping[str, nn.Module], unquantized: Mapping[str, nn.Module]) -> None:
        """Raise where the checkpoint's tensors disagree with `targets` / `ignore`.

        quantized / unquantized: checkpoint module name -> the model's nn.Linear, for the layers that have
        a `weight_scale` in the checkpoint and for those that do not.
        """
        for name, module in quantized.items():
            ignored = _first_match(name, module, self.ignore)
            if ignored is not None:
                raise ValueError(
                    f"checkpoint holds {name}.weight_scale, but quantization_config['ignore'] entry {ignored!r} "
                    f"leaves {name!r} unquantized: the checkpoint contradicts its config"
                )
            if _first_match(name, module, self.targets) is None:
                raise ValueError(
                    f"checkpoint holds {name}.weight_scale, but no config_groups target of {list(self.targets)} "
                    f"matches {name!r} ({type(module).__name__}): the checkpoint contradicts its config"
                )
        for name, module in unquantized.items():
            target = _first_match(name, module, self.targets)
            if target is not None and _first_match(name, module, self.ignore) is None:
                raise ValueError(
                    f"config_groups target {target!r} matches {name!r} ({type(module).__name__}) and no "
                    f"quantization_config['ignore'] entry does, but the checkpoint holds no {name}.weight_scale "
                    "(an unquantized weight where the config promises fp8)"
                )


def _args(where: str, d: Any) -> "dict[str, Any] | None":
    """QuantizationArgs in normal form: defaults filled in, strategy inferred, strings lower-cased."""
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ValueError(f"quantization_config{where} must be a dict of QuantizationArgs or null; got {d!r}")
    group_size = d.get("group_size")
    strategy = d.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    block = d.get("block_structure")
    if isinstance(block, str):  # the older "128x128" spelling
        block = [int(b) for b in block.lower().split("x")]
    dynamic = d.get("dynamic", False)
    return {
        "type": str(d.get("type", "int")).lower(),
        "num_bits": d.get("num_bits", 8),
        "symmetric": d.get("symmetric", True),
        "strategy": str(strategy).lower(),
        "block_structure": list(block) if block is not None else None,
        "group_size": group_size,
        "dynamic": dynamic.lower() if isinstance(dynamic, str) else dynamic,
    }


def _describe(weights: "dict | None", inputs: "dict | None") -> str:
    def part(a: "dict | None") -> str:
        if a is None:
            return "none"
        s = f"{a['type']} {a['num_bits']}-bit, strategy {a['strategy']!r}"
        if a["block_structure"] is not None:
            s += f", block_structure {a['block_structure']}"
        if a["group_size"] is not None:
            s += f", group_size {a['group_size']}"
        if not a["symmetric"]:
            s += ", asymmetric"
        dynamic = {True: "dynamic", False: "static"}.get(a["dynamic"], f"dynamic={a['dynamic']!r}")
        return f"{s}, {dynamic}"

    w = (weights["type"], weights["num_bits"], weights["strategy"]) if weights else None
    i = (inputs["type"], inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) if inputs else None
    name = _PRESETS.get((w, i), "a custom scheme")
    if name == SCHEME and (weights, inputs) != (_WEIGHTS, _INPUTS):
        name = "a custom scheme"  # FP8_BLOCK's strategies with another block or group size
    return f"{name} (weights: {part(weights)}; input_activations: {part(inputs)})"


_SUPPORTED = _describe(_WEIGHTS, _INPUTS)


def parse(qc: Mapping[str, Any], *, backend: str = "auto") -> FP8BlockScheme:
    """Read a compressed-tensors `quantization_config` dict; ValueError for anything but FP8_BLOCK."""
    if not is_compressed_tensors(qc):
        raise ValueError(
            f"quantization_config['quant_method'] must be {QUANT_METHOD!r}; got {qc.get('quant_method')!r}"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"quantization_config['config_groups'] must be a non-empty dict; got {groups!r}")
    way_out = "fp8linear reads only " + _SUPPORTED + "; load this checkpoint with transformers or vLLM instead"
    targets: list[str] = []
    for group_name, group in groups.items():
        where = f"['config_groups'][{group_name!r}]"
        if isinstance(group, list):  # a preset name mapped to its targets
            if str(group_name).upper() != SCHEME:
                raise ValueError(f"quantization_config{where} is the preset {str(group_name).upper()!r}; {way_out}")
            group = {"targets": group}
            weights, inputs = _WEIGHTS, _INPUTS
        elif isinstance(group, Mapping):
            weights = _args(f"{where}['weights']", group.get("weights"))
            inputs = _args(f"{where}['input_activations']", group.get("input_activations"))
            if weights != _WEIGHTS or inputs != _INPUTS:
                raise ValueError(f"quantization_config{where} is {_describe(weights, inputs)}; {way_out}")
            if group.get("output_activations") is not None:
                raise ValueError(
                    f"quantization_config{where}['output_activations'] is set (output quantization); {way_out}"
                )
        else:
            raise ValueError(f"quantization_config{where} must be a dict (a QuantizationScheme); got {group!r}")
        fmt = group.get("format") or qc.get("format")
        if fmt != FORMAT:
            raise ValueError(
                f"quantization_config{where} has format {fmt!r}; {SCHEME} checkpoints store fp8 bytes as {FORMAT!r}"
            )
        group_targets = group.get("targets")
        if not (isinstance(group_targets, list) and group_targets and all(isinstance(t, str) for t in group_targets)):
            raise ValueError(
                f"quantization_config{where}['targets'] must be a non-empty list of strings; got {group_targets!r}"
            )
        targets += [t for t in group_targets if t not in targets]
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
        raise ValueError(f"quantization_config['ignore'] must be a list of strings; got {ignore!r}")
    for key, what in (("kv_cache_scheme", "KV-cache quantization"), ("sparsity_config", "sparsity"),
                      ("transform_config", "weight transforms (rotations)")):
        if qc.get(key):
            raise ValueError(f"quantization_config[{key!r}] is set ({what}), which fp8linear does not apply; {way_out}")
    config = FP8Config(dtype=torch.float8_e4m3fn, block_size=(128, 128), scale_ue8m0=False, backend=backend)
    return FP8BlockScheme(config=config, targets=tuple(targets), ignore=tuple(ignore))


def quantization_config(ignore: Iterable[str]) -> dict[str, Any]:
    """The `quantization_config` of an FP8_BLOCK checkpoint that quantizes every nn.Linear but `ignore`
    (full module names); what vLLM's and SGLang's compressed-tensors loaders read."""
    def args(a: dict) -> dict:
        return {k: v for k, v in a.items() if v is not None}

    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": args(_WEIGHTS), "input_activations": args(_INPUTS),
                        "output_activations": None},
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
