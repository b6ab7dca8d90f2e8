"""Layer-level and model-level accuracy of a quantized model against its original.

Per layer (forward hooks): each FP8Linear of the quantized model is hooked; on every call the hook
runs the *original* layer (same name in the reference model) on the *same* input and accumulates

    rel_err = ||y - y_ref|| / ||y_ref||
    cosine  = <y, y_ref> / (||y|| ||y_ref||)
    snr_db  = 10 log10(||y_ref||^2 / ||y - y_ref||^2)      (SQNR, torchao's compute_error)

over every element of every call, in fp32. Feeding both layers the quantized model's own activations
isolates each layer's error from the error accumulated upstream.

MoE experts (fp8linear.moe.FP8Experts) are measured the same way, one row per experts module: the hook
takes the call's (hidden_states, top_k_index, top_k_weights), runs the same-named original experts module
on them, and accumulates the three metrics of the combined output [T, H] (the routing-weighted sum over
the k slots: what the MoE block adds to the residual stream). Per expert, the row carries a summary only:
the worst expert's SNR and index, where expert e's SNR is that of its outputs before the routing weights
(`FP8Experts.expert_outputs` against the original module run on each routed (token, slot) pair alone)
over the pairs routed to it, and how many experts the batch routed any pair to. An expert no pair reached
is not measured. A row, not a per-expert table, because a skip list can only keep a whole experts module
in high precision (quantize_model matches it by the module's name); the worst expert says whether one
expert, rather than the module as a whole, drags the row down. The eval forward runs each experts module
three more times (the original twice, the FP8 one once for its per-pair outputs).

Per model, on the same batch:
- causal LMs: KL(P_ref || P_fp8) of the next-token distributions (mean over tokens, in nats), top-1
  agreement, and the mean per-token cosine of the logits;
- encoders: sentence embeddings by mean pooling over the attention mask then L2-normalising (what
  sentence-transformers does for all-MiniLM-L6-v2); the mean and the worst cosine over sentences.

No transformers import here (hf.py owns that); matplotlib is imported only to draw the plot.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "LayerError",
    "ModelMetrics",
    "EvalResult",
    "layer_errors",
    "causal_lm_metrics",
    "embedding_metrics",
    "evaluate",
    "propose_skip",
    "sensitivity_skip",
    "calibration_batch",
    "write_csv",
    "plot_snr",
    "PLOT_INSTALL",
    "format_table",
    "SENTENCES",
    "CALIBRATION_TEXT",
    "mean_pool",
]

#: How to get the optional dependency of plot_snr.
PLOT_INSTALL = "pip install 'fp8linear[plot]'"

#: Eight mixed sentences (plain prose, code, numbers, a question, non-English, a list, a quotation):
#: the encoder calibration batch and the MiniLM accuracy target's inputs.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 2023 the company reported revenue of $4.2 billion, up 17% from the previous year.",
    "How do I reset my password if I no longer have access to my email account?",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris.",
    "Ingredients: two eggs, 200 g flour, a pinch of salt, and 300 ml of milk.",
    "\"To be, or not to be, that is the question,\" said Hamlet in the famous soliloquy.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
)

#: Causal-LM calibration text (used when the model folder has a tokenizer; random ids otherwise).
CALIBRATION_TEXT = (
    "Quantization maps each weight block and each group of activations to eight-bit floating point "
    "numbers with one scale per block, so a matrix multiply reads half the bytes it read in bfloat16.",
    "The committee met on Tuesday to review the budget, and after a long debate it approved the new "
    "library, the repairs to the bridge, and a modest increase in the salaries of teachers.",
    "import torch\nx = torch.randn(4, 128)\nw = torch.randn(256, 128)\ny = x @ w.t()\nprint(y.shape)",
    "Q: What is the capital of Australia? A: Canberra, which was chosen as a compromise between "
    "Sydney and Melbourne and became the seat of government in 1927.",
)


@dataclasses.dataclass
class LayerError:
    """One quantized module's error against its original: name, shape [N, K], the three metrics and the
    number of forward calls and output elements they cover.

    An FP8Experts row has num_experts = E > 0 and out_features = in_features = H (the module maps
    hidden_states [T, H] to [T, H]); its metrics are those of the combined output, and the last three
    fields summarise the experts one by one (module docstring). An FP8Linear row leaves them at their
    defaults."""

    name: str
    out_features: int
    in_features: int
    rel_err: float
    cosine: float
    snr_db: float
    calls: int
    elements: int
    num_experts: int = 0                   # E of an experts module; 0 for a linear layer
    experts_routed: int = 0                # experts the batch routed at least one (token, slot) pair to
    worst_expert: int = -1                 # the routed expert of lowest SNR (-1: none, or a linear layer)
    worst_expert_snr_db: float = math.nan  # its SNR over its pairs, before the routing weights

    @property
    def is_experts(self) -> bool:
        return self.num_experts > 0

    @property
    def shape(self) -> str:
        """'N x K' of a linear layer, 'E experts' of an experts module."""
        return f"{self.num_experts} experts" if self.is_experts else f"{self.out_features}x{self.in_features}"


@dataclasses.dataclass
class ModelMetrics:
    """Model-level metrics; `kind` is "causal_lm" or "encoder", unused fields stay None."""

    kind: str
    kl: "float | None" = None
    top1_agreement: "float | None" = None
    logits_cosine: "float | None" = None
    embedding_cosine_mean: "float | None" = None
    embedding_cosine_min: "float | None" = None

    def lines(self) -> list[str]:
        if self.kind == "causal_lm":
            return [
                f"logits cosine (mean per token): {self.logits_cosine:.5f}",
                f"top-1 agreement:                {self.top1_agreement:.4f}",
                f"KL(ref || fp8), nats per token: {self.kl:.3e}",
            ]
        return [
            f"sentence-embedding cosine: mean {self.embedding_cosine_mean:.5f}, min {self.embedding_cosine_min:.5f}",
        ]


@dataclasses.dataclass
class EvalResult:
    layers: list[LayerError]
    model: ModelMetrics

    @property
    def worst(self) -> "LayerError | None":
        return min(self.layers, key=lambda r: r.snr_db) if self.layers else None

    @property
    def experts(self) -> list[LayerError]:
        """The rows of FP8Experts modules, in module order."""
        return [r for r in self.layers if r.is_experts]


class _Accumulator:
    __slots__ = ("ref2", "err2", "out2", "dot", "calls", "elements")

    def __init__(self) -> None:
        self.ref2 = self.err2 = self.out2 = self.dot = 0.0
        self.calls = self.elements = 0

    def add(self, y: torch.Tensor, y_ref: torch.Tensor) -> None:
        y, y_ref = y.detach().float(), y_ref.detach().float()
        err = y - y_ref
        # One host transfer per call: four sums stacked (float64 keeps long sums exact enough).
        sums = torch.stack([(y_ref * y_ref).sum(), (err * err).sum(), (y * y).sum(), (y * y_ref).sum()])
        ref2, err2, out2, dot = sums.double().tolist()
        self.ref2 += ref2
        self.err2 += err2
        self.out2 += out2
        self.dot += dot
        self.calls += 1
        self.elements += y.numel()

    def result(self, name: str, out_features: int, in_features: int) -> LayerError:
        rel = math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else (0.0 if self.err2 == 0 else math.inf)
        denom = math.sqrt(self.ref2 * self.out2)
        cos = self.dot / denom if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        return LayerError(name, out_features, in_features, rel, cos, _snr_db(self.ref2, self.err2), self.calls,
                          self.elements)


def _snr_db(ref2: float, err2: float) -> float:
    """10 log10(ref2 / err2): +inf for no error, -inf for error on a zero reference."""
    if err2 == 0:
        return math.inf
    if ref2 == 0:
        return -math.inf
    return 10.0 * math.log10(ref2 / err2)


class _ExpertsAccumulator:
    """Per expert, over the (token, slot) pairs routed to it: sums of y_ref^2 and (y - y_ref)^2 and the pair
    count, kept on the device in float64 (no host transfer per call)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.ref2 = self.err2 = self.pairs = None

    def add(self, expert: torch.Tensor, y: torch.Tensor, y_ref: torch.Tensor) -> None:
        """expert int64 [P] in [0, E); y, y_ref [P, H]: the pairs' outputs before the routing weights."""
        y, y_ref = y.detach().float(), y_ref.detach().float()
        err = y - y_ref
        if self.ref2 is None:
            self.ref2, self.err2, self.pairs = (torch.zeros(self.num_experts, dtype=torch.float64, device=y.device)
                                                for _ in range(3))
        self.ref2.index_add_(0, expert, (y_ref * y_ref).sum(-1).double())
        self.err2.index_add_(0, expert, (err * err).sum(-1).double())
        self.pairs.index_add_(0, expert, torch.ones_like(expert, dtype=torch.float64))

    def summary(self) -> tuple[int, int, float]:
        """(experts routed, worst expert, its SNR in dB); (0, -1, nan) when no pair was routed."""
        if self.pairs is None:
            return 0, -1, math.nan
        snr = {e: _snr_db(r, d) for e, (r, d, n) in enumerate(zip(self.ref2.tolist(), self.err2.tolist(),
                                                                 self.pairs.tolist())) if n > 0}
        if not snr:
            return 0, -1, math.nan
        worst = min(snr, key=lambda e: snr[e])
        return len(snr), worst, snr[worst]


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every FP8Linear and FP8Experts of `model` by qualified name, in module order."""
    from .linear import FP8Linear
    from .moe import FP8Experts

    return {name: m for name, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}


_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def _experts_args(name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of an experts call, given by position or by name."""
    values = dict(zip(_EXPERTS_ARGS, args))
    values.update((k, kwargs[k]) for k in _EXPERTS_ARGS if k in kwargs)
    missing = [k for k in _EXPERTS_ARGS if k not in values]
    if missing:
        raise ValueError(f"{name} was called without {', '.join(missing)}: an experts module takes "
                         f"({', '.join(_EXPERTS_ARGS)})")
    return tuple(values[k] for k in _EXPERTS_ARGS)


def _pair_outputs_of(experts: nn.Module, x: torch.Tensor, expert: torch.Tensor, token: torch.Tensor,
                     weight_dtype: torch.dtype) -> torch.Tensor:
    """[P, H]: expert[p] applied to x[token[p]] alone, through the experts module's own forward (one slot per
    row, routing weight 1, which the combine multiplies exactly)."""
    ones = torch.ones((expert.numel(), 1), dtype=weight_dtype, device=x.device)
    return experts(x[token], expert.unsqueeze(1), ones)


@torch.inference_mode()
def layer_errors(reference: nn.Module, quantized: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[list[LayerError], Any]:
    """Hook every FP8Linear and FP8Experts of `quantized`, call run(quantized), and compare each module's
    output with the same-named module of `reference` on the same inputs (module docstring; experts rows
    add the per-expert summary).

    run: e.g. `lambda m: m(**batch)`; its return value is passed back. Returns (errors in module
    order, run's output); a module run never called has no row. Both models must be on the same device.
    """
    from .moe import FP8Experts, is_experts_module

    layers = _quantized_layers(quantized)
    if not layers:
        raise ValueError("the quantized model has no FP8Linear layer nor FP8Experts module: run "
                         "fp8linear.quantize_model first")
    ref_modules = dict(reference.named_modules())
    missing = [n for n in layers if n not in ref_modules]
    if missing:
        raise ValueError(f"reference model has no layer named {missing[:4]}: pass the model quantize_model copied")
    not_experts = [f"{n} ({type(ref_modules[n]).__name__})" for n, m in layers.items()
                   if isinstance(m, FP8Experts) and not is_experts_module(ref_modules[n])]
    if not_experts:
        raise ValueError(f"reference model's {', '.join(not_experts[:4])} is not a fused experts module (3-D "
                         "gate_up_proj and down_proj): pass the model quantize_model copied, before quantizing")
    acc = {name: _Accumulator() for name in layers}
    per_expert = {name: _ExpertsAccumulator(m.num_experts) for name, m in layers.items() if isinstance(m, FP8Experts)}
    handles = []

    def linear_hook(name: str):
        ref_layer = ref_modules[name]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            ref_x = x.to(ref_layer.weight.dtype) if x.is_floating_point() else x
            acc[name].add(output, ref_layer(ref_x))

        return hook

    def experts_hook(name: str):
        ref_experts = ref_modules[name]

        def hook(module: FP8Experts, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x, top_k_index, top_k_weights = _experts_args(name, args, kwargs)
            ref_x = x.to(ref_experts.gate_up_proj.dtype)
            acc[name].add(output, ref_experts(ref_x, top_k_index, top_k_weights))
            # Per expert: the routed pairs (slots naming an expert in [0, E)), before the routing weights.
            T, k = top_k_index.shape
            flat = top_k_index.reshape(-1).long()
            pair = ((flat >= 0) & (flat < module.num_experts)).nonzero().squeeze(1)  # [P], pair = t * k + j
            expert, token = flat[pair], torch.div(pair, k, rounding_mode="floor")
            y = module.expert_outputs(x, top_k_index).reshape(T * k, -1)[pair]  # [P, H]
            y_ref = _pair_outputs_of(ref_experts, ref_x, expert, token, top_k_weights.dtype)
            per_expert[name].add(expert, y, y_ref)

        return hook

    try:
        for name, module in layers.items():
            if isinstance(module, FP8Experts):
                handles.append(module.register_forward_hook(experts_hook(name), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(linear_hook(name)))
        out = run(quantized)
    finally:
        for h in handles:
            h.remove()
    errors = []
    for name, module in layers.items():
        if acc[name].calls == 0:
            continue
        if isinstance(module, FP8Experts):
            H = module.hidden_size
            row = acc[name].result(name, H, H)
            row.num_experts = module.num_experts
            row.experts_routed, row.worst_expert, row.worst_expert_snr_db = per_expert[name].summary()
        else:
            row = acc[name].result(name, module.out_features, module.in_features)
        errors.append(row)
    return errors, out


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def causal_lm_metrics(ref_logits: torch.Tensor, q_logits: torch.Tensor,
                      attention_mask: "torch.Tensor | None" = None) -> ModelMetrics:
    """Logits [B, T, V] of the reference and the quantized model on the same batch -> KL, top-1, cosine
    (tokens where attention_mask [B, T] is 0 are ignored)."""
    r = ref_logits.float().reshape(-1, ref_logits.shape[-1])
    q = q_logits.float().reshape(-1, q_logits.shape[-1])
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).bool().to(r.device)
        r, q = r[keep], q[keep]
    log_p = torch.log_softmax(r, dim=-1)
    log_q = torch.log_softmax(q, dim=-1)
    kl = max(0.0, (log_p.exp() * (log_p - log_q)).sum(-1).mean().item())  # rounding can dip below 0
    top1 = (r.argmax(-1) == q.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(r, q, dim=-1).mean().item()
    return ModelMetrics("causal_lm", kl=kl, top1_agreement=top1, logits_cosine=cos)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], attention_mask [B, T] -> L2-normalised mean over the unmasked tokens, fp32 [B, H]."""
    mask = attention_mask.to(hidden.device).unsqueeze(-1).float()
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def embedding_metrics(ref_hidden: torch.Tensor, q_hidden: torch.Tensor, attention_mask: torch.Tensor) -> ModelMetrics:
    """Last hidden states [B, T, H] of both models -> cosine of their sentence embeddings (mean, min)."""
    cos = (mean_pool(ref_hidden, attention_mask) * mean_pool(q_hidden, attention_mask)).sum(-1)
    return ModelMetrics("encoder", embedding_cosine_mean=cos.mean().item(), embedding_cosine_min=cos.min().item())


@torch.inference_mode()
def evaluate(reference: nn.Module, quantized: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> EvalResult:
    """Per-layer errors and model-level metrics of `quantized` against `reference` on `batch` (the
    keyword inputs of both models' forward, e.g. input_ids and attention_mask). kind: "causal_lm" or
    "encoder"."""
    if kind not in ("causal_lm", "encoder"):
        raise ValueError(f"kind must be 'causal_lm' or 'encoder'; got {kind!r}")
    if _quantized_layers(quantized):
        errors, q_out = layer_errors(reference, quantized, lambda m: m(**batch))
    else:  # everything kept in high precision (a skip list can do that): model-level metrics only
        errors, q_out = [], quantized(**batch)
    ref_out = reference(**batch)
    mask = batch.get("attention_mask")
    if kind == "causal_lm":
        metrics = causal_lm_metrics(_logits(ref_out), _logits(q_out), mask)
    else:
        if mask is None:
            mask = torch.ones(batch["input_ids"].shape, dtype=torch.long)
        ref_h = ref_out.last_hidden_state if hasattr(ref_out, "last_hidden_state") else ref_out[0]
        q_h = q_out.last_hidden_state if hasattr(q_out, "last_hidden_state") else q_out[0]
        metrics = embedding_metrics(ref_h, q_h, mask)
    return EvalResult(errors, metrics)


def propose_skip(errors: Iterable[LayerError], threshold_db: float) -> list[str]:
    """Names of the layers and experts modules whose SNR is below threshold_db: the accuracy-driven skip
    list (quantize_model keeps an experts module named in it whole, in high precision)."""
    return [e.name for e in errors if e.snr_db < threshold_db]


def format_table(errors: list[LayerError], threshold_db: "float | None" = None) -> str:
    """A fixed-width table, one row per layer or experts module, worst marked; '<' flags rows below
    threshold_db; experts rows end with their worst expert."""
    if not errors:
        return "(no quantized layer ran)"
    width = max(len(e.name) for e in errors)
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'rel err':>8}  {'cosine':>8}  {'SNR dB':>7}"]
    worst = min(errors, key=lambda e: e.snr_db)
    for e in errors:
        flag = " <" if threshold_db is not None and e.snr_db < threshold_db else ("  worst" if e is worst else "")
        if e.is_experts:
            flag += (f"  worst expert {e.worst_expert}: {e.worst_expert_snr_db:.2f} dB "
                     f"({e.experts_routed} of {e.num_experts} routed)")
        lines.append(f"{e.name:<{width}}  {e.shape:>11}  {e.rel_err:8.5f}  {e.cosine:8.6f}  {e.snr_db:7.2f}{flag}")
    snrs = [e.snr_db for e in errors]
    n_experts = sum(e.is_experts for e in errors)
    what = f"{len(errors) - n_experts} layers" + (f" + {n_experts} experts modules" if n_experts else "")
    lines.append(f"{what}: SNR min {min(snrs):.2f} dB ({worst.name}), median {sorted(snrs)[len(snrs) // 2]:.2f} dB")
    return "\n".join(lines)


def write_csv(errors: list[LayerError], path: "str | os.PathLike") -> Path:
    """One row per layer or experts module: the LayerError fields (a linear row's experts fields read 0, 0,
    -1, nan)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        fields = [f.name for f in dataclasses.fields(LayerError)]
        writer.writerow(fields)
        for e in errors:
            writer.writerow([getattr(e, k) for k in fields])
    return path


def plot_snr(errors: list[LayerError], path: "str | os.PathLike", threshold_db: "float | None" = None,
             title: str = "FP8 layer SNR") -> Path:
    """A PNG of SNR (dB) by layer, in module order, with the threshold as a line; experts modules' bars
    are hatched.

    matplotlib is optional (the `plot` extra): without it, ModuleNotFoundError (name "matplotlib")
    says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ModuleNotFoundError(f"the SNR plot needs matplotlib: {PLOT_INSTALL}", name="matplotlib") from exc

    matplotlib.use("Agg", force=True)  # files only: never a window, works headless
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    snr = [min(e.snr_db, 99.0) for e in errors]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(errors) + 2), 4.0))
    colors = ["tab:red" if threshold_db is not None and s < threshold_db else "tab:blue" for s in snr]
    bars = ax.bar(range(len(snr)), snr, color=colors)
    for bar, e in zip(bars, errors):
        if e.is_experts:
            bar.set_hatch("//")
    if threshold_db is not None:
        ax.axhline(threshold_db, color="tab:red", linestyle="--", linewidth=1, label=f"{threshold_db:g} dB")
        ax.legend(loc="lower right")
    short = [e.name.replace("model.layers.", "L").replace("encoder.layer.", "L") for e in errors]
    ax.set_xticks(range(len(snr)))
    ax.set_xticklabels(short, rotation=90, fontsize=6)
    ax.set_ylabel("SNR (dB)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibration_batch(kind: str, tokenizer: Any = None, vocab_size: "int | None" = None, *, seed: int = 0,
                      batch: int = 4, tokens: int = 64) -> dict[str, torch.Tensor]:
    """The eval batch: SENTENCES (encoders) or CALIBRATION_TEXT (causal LMs) through `tokenizer`, padded;
    without a tokenizer (causal LMs only), `batch` x `tokens` seeded random ids in [3, vocab_size)."""
    if tokenizer is not None:
        texts = list(SENTENCES if kind == "encoder" else CALIBRATION_TEXT)
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if kind == "encoder":
        raise ValueError("an encoder's eval needs its tokenizer (the model folder has no tokenizer files)")
    if not vocab_size or vocab_size <= 3:
        raise ValueError(f"random calibration ids need vocab_size > 3; got {vocab_size!r}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _error_of(ref_out: Any, q_out: Any, batch: Mapping[str, torch.Tensor], kind: str) -> float:
    """1 - the model-level cosine (logits per token for LMs, sentence embeddings for encoders)."""
    mask = batch.get("attention_mask")
    if kind == "causal_lm":
        return 1.0 - causal_lm_metrics(_logits(ref_out), _logits(q_out), mask).logits_cosine
    if mask is None:
        mask = torch.ones(batch["input_ids"].shape, dtype=torch.long)
    ref_h = ref_out.last_hidden_state if hasattr(ref_out, "last_hidden_state") else ref_out[0]
    q_h = q_out.last_hidden_state if hasattr(q_out, "last_hidden_state") else q_out[0]
    return 1.0 - embedding_metrics(ref_h, q_h, mask).embedding_cosine_mean


@torch.inference_mode()
def sensitivity_skip(reference: nn.Module, quantized: nn.Module, batch: Mapping[str, torch.Tensor], kind: str,
                     target_cosine: float, *, log: "Callable[[str], None] | None" = None) -> list[str]:
    """The accuracy-driven skip list: the fewest layers (greedily) to keep in high precision so that the
    model-level cosine (embedding cosine for encoders, logits cosine for LMs) reaches target_cosine.
    An FP8Experts module is one candidate, as a layer is: put back, it keeps all its experts.

    Leave-one-out first: for each FP8Linear and FP8Experts, put the original module back and measure how much the
    model-level error (1 - cosine) drops; then restore layers in that order, re-measuring, until the
    target is met. 2 x (number of layers) forwards at most. Per-layer SNR ranks layers worse: on
    all-MiniLM-L6-v2 reaching 0.999 takes 9 layers by this measure and 28 of 37 by an SNR threshold
    (33 dB), since a layer's SNR says nothing about how much its error matters downstream (pooler.dense
    has a low SNR and no effect on mean-pooled embeddings).

    `quantized` is returned to its original state. Raises if even the fully restored model misses.
    """
    if not 0.0 < target_cosine <= 1.0:
        raise ValueError(f"target_cosine must be in (0, 1]; got {target_cosine!r}")
    say = log or (lambda msg: None)
    layers = _quantized_layers(quantized)
    ref_modules = dict(reference.named_modules())
    ref_out = reference(**batch)
    target = 1.0 - target_cosine

    def put(name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(quantized.get_submodule(parent) if parent else quantized, attr, module)

    def error() -> float:
        return _error_of(ref_out, quantized(**batch), batch, kind)

    restored: list[str] = []
    try:
        base = error()
        say(f"all {len(layers)} layers in FP8: cosine {1 - base:.5f} (target {target_cosine})")
        if base <= target:
            return []
        gain = {}
        for name, module in layers.items():
            put(name, ref_modules[name])
            gain[name] = base - error()
            put(name, module)
        for name in sorted(layers, key=lambda n: -gain[n]):
            put(name, ref_modules[name])
            restored.append(name)
            e = error()
            say(f"keep {name} in high precision: cosine {1 - e:.5f}")
            if e <= target:
                return restored
        raise ValueError(
            f"target_cosine={target_cosine} not reached even with every layer in high precision "
            f"(cosine {1 - e:.6f}): the gap is outside the quantized modules"
        )
    finally:
        for name in restored:
            put(name, layers[name])
