"""FP8 checkpoints: save_quantized / load_quantized, as DeepSeek-V3 and Qwen3-FP8 ship them (or compressed-tensors).

On disk (a Hugging Face model folder):

    config.json                      the model's config plus
                                     "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                       "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                                       "modules_to_not_convert": [...], "fp8linear": {...}}
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                     ({"metadata": {"total_size": bytes}, "weight_map": {name: file}})
    generation_config.json, tokenizer files   copied when present

Tensor names (TENSOR_NAMES below): for every FP8Linear `<m>`, `<m>.weight` (F8_E4M3 [N, K], or I8 in
INT8 mode), `<m>.weight_scale_inv` (F32 [ceil(N/128), ceil(K/128)], the multiplier that dequantizes:
DeepSeek-V3's name and meaning) and `<m>.bias` as it is; every other tensor under its state_dict name.
transformers' FineGrainedFP8 (`integrations/finegrained_fp8.py`) declares exactly these parameters on
its FP8Linear, so these folders load there too.

`modules_to_not_convert` lists every module left unquantized by its full name: the skipped nn.Linear
layers and the fused MoE expert modules. transformers matches the entries as prefixes at module
boundaries, so a full name covers that module only (`...mlp.gate` does not cover `...mlp.gate_proj`).

INT8 (fp8linear's extension, `fmt: "int8"`, fp8linear.config): weights are I8 with amax/127 scales.
Only fp8linear reads INT8 folders back: they say `quant_method: "fp8linear_int8"`, which other readers refuse.

The `quantization_config` dict comes from fp8linear.config.FP8Config, the one owner of that format.

compressed-tensors (`format="compressed-tensors"`, fp8linear.compressed_tensors): llm-compressor's FP8_BLOCK
scheme, the same tensors with the scale named `<m>.weight_scale` and compressed-tensors'
`quantization_config` (`ignore` listing the unquantized layers). `load_quantized` reads either format.

Saving never half-writes: every file goes first into a temporary folder beside `path` (same filesystem),
then moves into place by renames: weights first, then the index, then config.json; old shards that the new
save does not reuse go last. A failure before or during the moves leaves the previous checkpoint as it was
(moves already made are undone) and no temporary files behind. Only a process killed during the renames
themselves can leave a mix of old and new files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["save_quantized", "load_quantized", "TENSOR_NAMES", "SCALE_ALIASES"]

log = logging.getLogger("fp8linear")

#: The tensors of one quantized linear layer, under the module's name.
TENSOR_NAMES = ("weight", "weight_scale_inv", "bias")
#: Other names of `weight_scale_inv` found in published block-FP8 checkpoints, read as the same tensor
#: (same meaning: the per-block multiplier that dequantizes). Checked for shape on load.
SCALE_ALIASES = ("weight_scale_inv", "weight_scale")
#: Scale dtypes accepted on load (DeepSeek-V3 stores fp32; Qwen3-FP8 bf16); all become fp32.
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: What `save_quantized(format=...)` writes, and the name its scale tensors get.
FORMATS = {"fp8": "weight_scale_inv", "compressed-tensors": "weight_scale"}

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
    "chat_template.json",
)


# -- saving -----------------------------------------------------------------------------------------------

def _parse_size(size: "int | str") -> int:
    nbytes = None
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
        if m:
            unit = m.group(2).upper()
            base = 1024 if "I" in unit else 1000
            power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
            nbytes = int(float(m.group(1)) * base**power)
    if nbytes is not None:
        if nbytes <= 0:
            raise ValueError(f"max_shard_size must be at least one byte; got {size!r}")
        return nbytes
    raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB' / '500MiB'; got {size!r}")


def _modules_to_not_convert(model: nn.Module) -> list[str]:
    """Full names of every weight-holding module left unquantized: nn.Linear layers and fused experts."""
    from .convert import _fused_weight_reason

    names = set()
    summary = getattr(model, "fp8linear_summary", None)
    if summary is not None:
        names.update(summary.modules_to_not_convert)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or _fused_weight_reason(module):
            names.add(name)
    names.discard("")
    return sorted(names)


def _state_to_save(model: nn.Module, scale_name: str = "weight_scale_inv") -> dict[str, torch.Tensor]:
    """The model's state_dict with tied duplicates dropped (the first name wins, as transformers does),
    FP8Linear modules reduced to TENSOR_NAMES and their scales named `scale_name`."""
    from .linear import fp8_linears

    fp8 = fp8_linears(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module in fp8 and leaf not in TENSOR_NAMES:
            continue  # backend caches are never state, but be strict about what the format holds
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name!r}: it is on the meta device (never loaded)")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.numel() else None
        if key is not None and key in seen:
            log.debug("save_quantized: %s shares storage with %s (tied): not written", name, seen[key])
            continue
        if key is not None:
            seen[key] = name
        if leaf == "weight_scale_inv":
            name = f"{module}.{scale_name}"
        out[name] = tensor
    return out


def _quantization_config(model: nn.Module, format: str = "fp8") -> dict[str, Any]:
    from . import compressed_tensors
    from .config import FP8Config
    from .linear import fp8_linears

    fp8 = fp8_linears(model)
    if not fp8:
        raise ValueError("save_quantized: the model has no FP8Linear layer; run fp8linear.quantize_model first")
    first = next(iter(fp8.values())).config
    for name, m in fp8.items():
        c = m.config
        if (c.dtype, c.block_size, c.scale_ue8m0) != (first.dtype, first.block_size, first.scale_ue8m0):
            raise ValueError(
                f"save_quantized: every FP8Linear must share dtype, block_size and scale_ue8m0 (one "
                f"quantization_config per checkpoint); {name!r} has {c.short_str()}, others {first.short_str()}"
            )
    if format == "compressed-tensors":
        if first.dtype != torch.float8_e4m3fn or first.scale_ue8m0:
            raise ValueError(
                f"save_quantized: format='compressed-tensors' holds fp8 e4m3 weights with exact scales only "
                f"(its FP8_BLOCK scheme); this model is {first.short_str()}: save it with format='fp8'"
            )
        routers = {n for n, m in model.named_modules() if compressed_tensors.counts_as_linear(m)
                   and n not in fp8 and isinstance(m._parameters.get("weight"), torch.Tensor)}
        return compressed_tensors.quantization_config(set(_modules_to_not_convert(model)) | routers)
    qc = FP8Config(dtype=first.dtype, block_size=first.block_size, scale_ue8m0=first.scale_ue8m0).to_quantization_config()
    qc["modules_to_not_convert"] = _modules_to_not_convert(model)
    return qc


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _copy_tokenizer(model: nn.Module, tokenizer: Any, folder: Path, target: Path) -> None:
    """Tokenizer files into `folder` (the temporary one), unless they come from `target` itself."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        return
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not Path(source).is_dir() or Path(source).resolve() == target.resolve():
        return  # a hub id or nothing: offline, so no tokenizer to fetch; or already in place
    for name in _TOKENIZER_FILES:
        f = Path(source) / name
        if f.is_file():
            shutil.copy2(f, folder / name)


def _move_order(name: str) -> int:
    """Weights first, then the index that names them, then the rest, config.json last."""
    if name.endswith(".safetensors"):
        return 0
    return {_INDEX: 1, "config.json": 3}.get(name, 2)


def _move_into_place(new: Path, path: Path, backup: Path) -> None:
    """Move every file of `new` into `path` (replacing same-named files), then move the old shards and the
    old index that no new file replaces out to `backup`; on any failure undo the moves made, in reverse.

    A replaced file stays reachable for the undo in `backup` (a hard link, or the file itself where the
    filesystem has no links). Each replacement is one rename, so a reader sees the old file or the new one.
    """
    incoming = sorted((p.name for p in new.iterdir()), key=lambda n: (_move_order(n), n))
    stale = sorted(p.name for p in path.glob("model*.safetensors") if p.name not in incoming)
    if _INDEX not in incoming and (path / _INDEX).is_file():
        stale.insert(0, _INDEX)  # a single-file save: the old index would still name the old shards
    done: list[tuple[str, bool]] = []  # (name, whether the old file of that name waits in backup)
    try:
        for name in incoming:
            had_old = os.path.lexists(path / name)
            if had_old:
                try:
                    os.link(path / name, backup / name, follow_symlinks=False)
                except OSError:
                    os.replace(path / name, backup / name)
            try:
                os.replace(new / name, path / name)
            except BaseException:
                if had_old and not os.path.lexists(path / name):
                    os.replace(backup / name, path / name)  # it was moved, not linked
                raise
            done.append((name, had_old))
        for name in stale:
            os.replace(path / name, backup / name)
            done.append((name, True))
    except BaseException:
        for name, had_old in reversed(done):
            if had_old:
                os.replace(backup / name, path / name)
            else:
                os.unlink(path / name)
        raise


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run write(folder) on a fresh temporary folder beside `path`, then _move_into_place; the temporary
    folder is gone afterwards, whatever happens."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_quantized: path {str(path)!r} is a file; pass a folder (created when missing)")
    target = path.absolute()  # "." has no name of its own
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.fp8linear-save-", dir=target.parent))
    created = False
    try:
        (work / "new").mkdir()
        (work / "old").mkdir()
        write(work / "new")
        created = not path.exists()
        path.mkdir(exist_ok=True)
        _move_into_place(work / "new", path, work / "old")
    except BaseException:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_quantized(model: nn.Module, path: "str | os.PathLike", *, max_shard_size: "int | str" = "5GB",
                   tokenizer: Any = None, format: str = "fp8") -> Path:
    """Write `model` (after fp8linear.quantize_model) as an FP8 checkpoint folder (module docstring).

    Args:
        model: holds FP8Linear layers; a Hugging Face model also gets its config.json (plus
            quantization_config) and generation_config.json; a bare nn.Module gets a config.json holding
            only quantization_config.
        path: output folder (created; existing files of the same names are replaced, old shards removed).
        max_shard_size: bytes per safetensors file (int, or "5GB", "500MiB"); one file when it all fits.
        tokenizer: saved alongside when given; otherwise tokenizer files are copied from the local folder
            the model came from (model.name_or_path), when there is one.
        format: "fp8" (default: DeepSeek-V3's names and quantization_config) or "compressed-tensors"
            (llm-compressor's FP8_BLOCK scheme; fp8 e4m3 models with exact scales only).

    Returns the folder's Path. Tensors are moved to CPU one shard at a time. Nothing in `path` changes
    until every file is written, and a failure leaves the previous checkpoint there as it was.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}; got {format!r}")
    max_bytes = _parse_size(max_shard_size)
    qc = _quantization_config(model, format)
    state = _state_to_save(model, FORMATS[format])
    path = Path(path)
    shards = _shards(state, max_bytes)
    n = len(shards)
    total = 0

    def write(folder: Path) -> None:
        nonlocal total
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards, start=1):
            filename = _SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            tensors = {name: state[name].detach().contiguous().cpu() for name in names}
            save_file(tensors, str(folder / filename), metadata={"format": "pt"})
            for name, t in tensors.items():
                weight_map[name] = filename
                total += t.numel() * t.element_size()
            del tensors
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config = copy.deepcopy(config)
            config.quantization_config = qc
            config.save_pretrained(str(folder))
        else:
            (folder / "config.json").write_text(json.dumps({"quantization_config": qc}, indent=2) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            generation_config.save_pretrained(str(folder))
        _copy_tokenizer(model, tokenizer, folder, path)

    _write_atomically(path, write)
    log.info("save_quantized: %d tensors, %.1f MB in %d file(s), format %s -> %s", len(state), total / 1e6, n,
             format, path)
    return path


# -- loading ----------------------------------------------------------------------------------------------

def _read_index(path: Path) -> dict[str, str]:
    """The weight_map of `path`'s index: checkpoint key -> shard file name."""
    index = path / _INDEX
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{index}: not a readable safetensors index ({type(e).__name__}: {e}); it must be JSON with a "
            "'weight_map' of tensor name -> file: save the checkpoint again"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to file names; save the checkpoint again")
    return weight_map


def _shard_files(path: Path) -> list[Path]:
    if (path / _INDEX).is_file():
        files = sorted(set(_read_index(path).values()))
    elif (path / _SINGLE).is_file():
        files = [_SINGLE]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise FileNotFoundError(
            f"{str(path)!r} has config.json but no weights: no {_INDEX}, {_SINGLE} or *.safetensors"
            + (f" (it holds {others}: fp8linear reads safetensors only)" if others else "")
        )
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{_INDEX} in {str(path)!r} names shard(s) that are missing: {missing}")
    return [path / f for f in files]


@contextlib.contextmanager
def _open_shard(f: Path) -> Iterator[Any]:
    """safe_open(f) on CPU, with a truncated or corrupted file reported by name (safetensors' own error,
    "incomplete metadata" and the like, names no file)."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{f}: not a readable safetensors file ({e}): it is truncated or corrupted; copy or save it again"
        ) from None
    with handle as sf:
        yield sf


def _keep_fp32(model: nn.Module, name: str) -> bool:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    )
    return any(k in name for k in keep)


class _Resolver:
    """Checkpoint key -> the model's own name, allowing the base-model prefix to be present or absent
    (a BertModel checkpoint saved from BertForX carries `bert.`; one saved from BertModel does not)."""

    def __init__(self, model: nn.Module, targets: set[str]):
        self.targets = targets
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def __call__(self, key: str) -> "str | None":
        if key in self.targets:
            return key
        p = self.prefix
        if p:
            if f"{p}.{key}" in self.targets:
                return f"{p}.{key}"
            if key.startswith(p + ".") and key[len(p) + 1:] in self.targets:
                return key[len(p) + 1:]
        return None


def load_quantized(path: "str | os.PathLike", *, device: "torch.device | str | None" = None,
                   dtype: torch.dtype = torch.bfloat16, backend: str = "auto", fuse_mlp: bool = False,
                   fuse_norm: bool = False) -> nn.Module:
    """Build the Hugging Face model of an FP8 checkpoint folder with FP8Linear in place, offline.

    Args:
        path: a local folder written by save_quantized, a DeepSeek-V3 / Qwen3-FP8-style block-FP8
            checkpoint (weight_scale_inv stored fp32, bf16 or fp16; also named weight_scale), or a
            compressed-tensors FP8_BLOCK checkpoint (its `ignore` and `targets` checked against the tensors;
            other compressed-tensors schemes are refused by name).
        device: where every tensor goes; None means "cuda" when a GPU is present, else "cpu".
        dtype: the dtype of every non-quantized floating tensor (embeddings, norms, lm_head, biases);
            modules the model keeps in fp32 (`_keep_in_fp32_modules`) stay fp32. Quantized weights stay
            fp8/int8 and scales fp32.
        backend: the FP8Linear GEMM backend for every quantized layer.
        fuse_mlp: swap gated MLPs for fp8linear.mlp.FP8GatedMLP after loading (as quantize_model's).
        fuse_norm: swap decoder RMSNorms for fp8linear.norm.FP8RMSNorm after loading (as quantize_model's).

    The model is built on the meta device from config.json (quantization_config removed first, so
    transformers' own FP8 quantizer stays out), layers with scales in the checkpoint become
    FP8Linear, and tensors are read shard by shard with safetensors (one tensor in host memory at a
    time), then tied weights are re-tied. Raises if a checkpoint tensor has no place in the model, a
    quantized layer misses a tensor, anything is left on the meta device, or a file is unreadable (named).
    """
    from . import compressed_tensors, hf
    from .config import FP8Config
    from .convert import QuantizeSummary
    from .linear import FP8Linear
    from .moe import FP8Experts, experts_kwargs, plan_expert_keys

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32; got {dtype!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    folder = Path(path)
    config = hf.load_config(folder)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(
            f"{str(path)!r} is not a quantized checkpoint (config.json has no quantization_config); "
            "load it with transformers and run fp8linear.quantize_model"
        )
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    scheme = None  # compressed-tensors' targets and ignore, to check the tensors against
    if compressed_tensors.is_compressed_tensors(qc):
        scheme = compressed_tensors.parse(qc, backend=backend)
        fp8_config = scheme.config
    else:
        fp8_config = FP8Config.from_quantization_config(qc, backend=backend)
    options = fp8_config.module_kwargs()
    files = _shard_files(folder)
    keys: dict[str, Path] = {}  # checkpoint key -> the shard it is read from
    for f in files:
        with _open_shard(f) as sf:
            for k in sf.keys():
                keys.setdefault(k, f)
    if (folder / _INDEX).is_file():  # a key in two shards: the index decides
        keys.update({k: folder / v for k, v in _read_index(folder).items() if k in keys})

    del config.quantization_config  # else transformers' own quantizers would rebuild the layers
    model = hf.build_model(config, dtype, params_on_meta=True)

    modules = dict(model.named_modules())
    targets = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
        n for n, _ in model.named_buffers(remove_duplicate=False)
    }
    resolve = _Resolver(model, targets)

    # Fused MoE experts stored per expert (`...experts.{e}.gate_proj.weight` + scales): FP8Experts, allocated
    # on `device` and filled expert by expert as the shards are read (no bf16 copy of the experts).
    experts_plan = plan_expert_keys(keys, resolve, modules)
    key_to_expert: dict[str, tuple[str, tuple[int, str, str]]] = {}
    for name, entries in experts_plan.items():
        new = FP8Experts.empty_like(modules[name], device, **experts_kwargs(fp8_config))
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        modules[name] = new
        key_to_expert.update({key: (name, spec) for spec, key in entries.items()})

    # The quantized layers: every module with a block scale in the checkpoint.
    quantized: dict[str, dict[str, str]] = {}  # model module name -> {tensor name: checkpoint key}
    checkpoint_names: dict[str, str] = {}  # model module name -> its name in the checkpoint
    for key in keys:
        module_key, _, leaf = key.rpartition(".")
        if leaf not in SCALE_ALIASES or key in key_to_expert:
            continue
        weight_name = resolve(f"{module_key}.weight")
        if weight_name is None:
            raise ValueError(f"checkpoint tensor {key!r} belongs to no weight of the model ({type(model).__name__})")
        name = weight_name.rpartition(".")[0]
        if type(modules[name]) is not nn.Linear:
            raise ValueError(
                f"checkpoint has block scales for {name!r}, a {type(modules[name]).__name__}, not an nn.Linear: "
                "only quantized nn.Linear layers and per-expert MoE experts (experts.{e}.gate_proj|up_proj|down_proj) "
                "are supported"
            )
        entry = quantized.setdefault(name, {})
        if "weight_scale_inv" in entry:
            raise ValueError(f"checkpoint has two scales for {name!r}: {entry['weight_scale_inv']!r} and {key!r}")
        entry["weight_scale_inv"] = key
        checkpoint_names[name] = module_key
    by_target = {}
    for key in keys:
        target = resolve(key)
        if target is not None:
            by_target.setdefault(target, key)
    for name, entry in quantized.items():
        for leaf in ("weight", "bias"):
            if f"{name}.{leaf}" in by_target:
                entry[leaf] = by_target[f"{name}.{leaf}"]
        if "weight" not in entry:
            raise ValueError(f"checkpoint has a scale for {name!r} but no {name}.weight")
        if modules[name].bias is not None and "bias" not in entry:
            raise ValueError(f"checkpoint misses {name}.bias (the model's layer has a bias)")
    key_to_quantized = {key: (name, leaf) for name, entry in quantized.items() for leaf, key in entry.items()}
    unquantized: dict[str, str] = {}  # nn.Linear layers stored unquantized: model name -> checkpoint name
    for target, key in by_target.items():
        name = target.rpartition(".")[0]
        if target.endswith(".weight") and name not in quantized and type(modules.get(name)) is nn.Linear:
            unquantized[name] = key.rpartition(".")[0]
    if scheme is not None:
        scheme.check_layers({checkpoint_names[n]: modules[n] for n in quantized},
                            {key: modules[n] for n, key in unquantized.items()})

    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []

    def swap_in(name: str, tensors: dict[str, torch.Tensor]) -> None:
        linear = modules[name]
        weight, scale = tensors["weight"], tensors["weight_scale_inv"]
        N, K = linear.out_features, linear.in_features
        if tuple(weight.shape) != (N, K):
            raise ValueError(f"{name}.weight: checkpoint shape {list(weight.shape)}, the model's layer is [{N}, {K}]")
        if weight.dtype != fp8_config.dtype:
            raise ValueError(
                f"{name}.weight: dtype {weight.dtype}, but quantization_config says {fp8_config.dtype} "
                "(float8_e5m2 and per-tensor formats are not supported)"
            )
        bn, bk = fp8_config.block_size
        if tuple(scale.shape) != (-(-N // bn), -(-K // bk)):
            raise ValueError(
                f"{name}: scale shape {list(scale.shape)}, expected [ceil({N}/{bn}), ceil({K}/{bk})] = "
                f"[{-(-N // bn)}, {-(-K // bk)}] (block scales)"
            )
        new = FP8Linear.from_quantized(weight, scale, tensors.get("bias"), **options)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        modules[name] = new

    def assign(name: str, tensor: torch.Tensor) -> None:
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name] if module_name else model
        current = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
        if current is not None and tuple(current.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: checkpoint shape {list(tensor.shape)}, the model's is {list(current.shape)}")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if _keep_fp32(model, name) else dtype)
        tensor = tensor.to(device)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor

    for f in files:
        with _open_shard(f) as sf:
            for key in sf.keys():
                if keys[key] != f:
                    continue  # listed in another shard too: the index decides
                if key in key_to_expert:
                    name, (e, projection, leaf) = key_to_expert[key]
                    modules[name].load_expert_(e, projection, leaf, sf.get_tensor(key))
                    continue
                if key in key_to_quantized:
                    name, leaf = key_to_quantized[key]
                    t = sf.get_tensor(key)
                    if leaf == "weight_scale_inv":
                        if t.dtype not in SCALE_DTYPES:
                            raise ValueError(f"{key}: scale dtype {t.dtype}; expected one of {SCALE_DTYPES}")
                        t = t.float()
                    elif leaf == "bias":
                        t = t.to(dtype)
                    pending.setdefault(name, {})[leaf] = t.to(device)
                    if set(pending[name]) == set(quantized[name]):
                        swap_in(name, pending.pop(name))
                    continue
                name = resolve(key)
                if name is None:
                    unexpected.append(key)
                    continue
                assign(name, sf.get_tensor(key))
                loaded.add(name)
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} checkpoint tensor(s) have no place in {type(model).__name__}: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    if pending:
        raise ValueError(f"quantized layer(s) missing tensors after reading every shard: {sorted(pending)}")
    incomplete = {n: modules[n].missing_expert_tensors() for n in experts_plan if modules[n].missing_expert_tensors()}
    if incomplete:
        raise ValueError("MoE experts missing per-expert tensors after reading every shard: "
                         f"{ {n: m[:4] for n, m in incomplete.items()} }")

    if hasattr(model, "tie_weights"):
        model.tie_weights()  # lm_head <- embed_tokens when tie_word_embeddings (not stored twice)
    for module in model.modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[leaf] = buf.to(device)  # constructor-made buffers (rotary inv_freq)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise RuntimeError(
            f"load_quantized: {len(on_meta)} tensor(s) were not in the checkpoint and stay on the meta device: "
            f"{on_meta[:8]}{' ...' if len(on_meta) > 8 else ''}"
        )

    hf.load_generation_config(model, folder)
    summary = QuantizeSummary(dtype=fp8_config.dtype)
    summary.swapped = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    summary.experts = sorted(experts_plan)
    skipped = sorted(unquantized) if scheme is not None else qc.get("modules_to_not_convert") or []
    summary.skipped = {n: "not quantized in the checkpoint" for n in skipped}
    model.fp8linear_summary = summary
    model.fp8linear_quantization_config = qc
    if fuse_mlp:
        from .mlp import fuse_gated_mlps

        model.fp8linear_fused_mlps = fuse_gated_mlps(model)
    if fuse_norm:
        from .norm import fuse_norms

        model.fp8linear_fused_norms = fuse_norms(model)
    return model.eval()
