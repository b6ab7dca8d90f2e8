"""Calibrated rounding: each layer's weights rounded with error compensation, in the standard format.

Plain rounding (fp8linear.weights) rounds every weight to its nearest fp8 e4m3 (or int8) value. Rounding
*against calibration activations* (GPTQ, Frantar et al. 2022) instead minimises the layer's output error
on them, ||W X - dequant(q) X||^2 over the calibration inputs X [K, tokens]:

    H = X X^T                                  [K, K] fp32, accumulated over the calibration tokens
    H += damp * mean(diag H) * I               dampening (inputs that never fire: diag 1, no coupling)
    U = cholesky(H^-1, upper)                  the rows of H^-1 the column-by-column updates need
    for each column k, in order (columns by descending diag H: the loudest inputs first):
        q[:, k]   = round(W[:, k] / s[:, k])   s: the column's 128x128 block scale (weight_scale_inv)
        e         = (W[:, k] - q[:, k] * s[:, k]) / U[k, k]
        W[:, k:] -= e U[k, k:]                 the error pushed onto the columns not yet rounded

done lazily, 128 columns at a time (one rank-128 update of the remaining columns per block of 128). The
block scales are those plain rounding chooses, amax / QMAX of each original 128x128 block, so `weight`
(F8_E4M3 or int8) and `weight_scale_inv` (fp32 [ceil(N/128), ceil(K/128)]) mean exactly what they mean
in every other checkpoint (DESIGN.md "Weights"); only which neighbouring value each weight rounds to
differs. Nothing changes at inference, and any reader of the format loads the result.

Which activations: sequential, as GPTQ. The model's decoder blocks (its nn.ModuleList holding the most
layers to quantize) run one at a time on the calibration inputs, the inputs of block i being the outputs
of the blocks before it *already quantized*. Inside a block the layers go in groups of those reading the
same input (q/k/v, then o, then gate/up, then down in a Llama), each group calibrated on inputs computed
through the groups before it already quantized, each forward stopped at the group it was run for; the
layers of a group share one H and are rounded as one matrix (their rows stacked: the rows of W are
independent given H). Layers outside the blocks (a BERT pooler) follow, calibrated on full-model
forwards. Memory: the model, one block's inputs for the calibration tokens, one group's inputs and H.

What was measured and not kept (SmolLM2-135M, docs/calibration.md): H taken on the inputs quantized per
1x128 group as the GEMM sees them, and GPTAQ's asymmetric target (W first moved to the least-squares fit
of the original model's outputs on the quantized model's inputs) -- the first no better, the second worse
on held-out text than the plain sequential GPTQ here.

    Calibration(ids, ...)                      what to calibrate on, and how; validated
    calibrate_linears(model, targets, ...)     the work, for quantize_model(..., calibration=...)
    gptq_quantize_weight(weight, hessian, ...) one matrix: (q, weight_scale_inv)
    calibration_ids(tokenizer, text)           the default data: the first CALIBRATION_TOKENS tokens
    keep_for_ppl_target(reference, quantized, calibration, target_ppl_delta)
                                               the fewest layers to leave unquantized for a perplexity target
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .reference import QMAX
from .weights import expand_block_scales, quantize_weight_blockwise, saturate_

__all__ = ["Calibration", "calibrate_linears", "gptq_quantize_weight", "calibration_ids", "calibration_sentences",
           "KeptLayers", "layer_sensitivity", "keep_for_ppl_target"]

log = logging.getLogger("fp8linear")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What quantize_model(..., calibration=...) rounds against, and how.

    ids: token ids, int64 [T] (a stream, cut into sequences of `seq_len`; a last partial one is dropped
        unless it is the only one), [B, T] (B sequences as given), or a list of 1-D sequences of any
        lengths (sentences for an encoder: calibration_sentences). Not modified.
    seq_len: tokens per calibration sequence when ids is 1-D (each sequence is one forward).
    damp: dampening, a share of H's mean diagonal added to its diagonal (GPTQ's percdamp).
    act_order: round columns by descending diag(H) (the inputs with the most energy first) rather than
        in index order; the block scales stay those of the original blocks either way.
    """

    ids: "torch.Tensor | Sequence[torch.Tensor]"
    seq_len: int = 512
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self) -> None:
        ids = self.ids
        if isinstance(ids, (list, tuple)):
            if not ids:
                raise ValueError("calibration ids are empty: give at least one sequence of token ids")
            for i, t in enumerate(ids):
                if (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32)
                        or t.numel() == 0):
                    raise ValueError(f"calibration ids as a list must hold non-empty 1-D int64 tensors; entry {i} is "
                                     f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        elif not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
            raise ValueError(f"calibration ids must be an int64 tensor of token ids, [T] or [B, T]; got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        elif ids.numel() == 0:
            raise ValueError("calibration ids are empty: give at least one sequence of token ids")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"calibration seq_len must be a positive int; got {self.seq_len!r}")
        if not isinstance(self.damp, (int, float)) or not (math.isfinite(self.damp) and 0 < self.damp < 1):
            raise ValueError(f"calibration damp must be a float in (0, 1) (a share of H's mean diagonal); "
                             f"got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"calibration act_order must be True or False; got {self.act_order!r}")

    def sequences(self) -> "list[torch.Tensor]":
        """The calibration sequences, each int64 [T_i]."""
        if isinstance(self.ids, (list, tuple)):
            return [t.long() for t in self.ids]
        ids = self.ids.long()
        if ids.dim() == 2:
            return list(ids)
        n = ids.numel() // self.seq_len
        if n == 0:
            return [ids]
        return list(ids[:n * self.seq_len].view(n, self.seq_len))

    @property
    def tokens(self) -> int:
        return sum(t.numel() for t in self.sequences())


def _token_count(tokens: "int | None") -> int:
    """`tokens` of the calibration helpers, validated (None: CALIBRATION_TOKENS)."""
    from .lm_eval import CALIBRATION_TOKENS

    tokens = CALIBRATION_TOKENS if tokens is None else tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int; got {tokens!r}")
    return tokens


def calibration_ids(tokenizer: Any, text: "str | None" = None, tokens: "int | None" = None) -> torch.Tensor:
    """Token ids [T] (int64) for calibration: `text` (default: fp8linear.lm_eval's text, whose first
    CALIBRATION_TOKENS tokens are never scored) through `tokenizer`, the first `tokens` of them
    (default: CALIBRATION_TOKENS)."""
    from .lm_eval import tokenize_text

    tokens = _token_count(tokens)
    if text is not None and not text.strip():
        raise ValueError("calibration text is empty")
    from .hf import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):  # models without tokenizer files: UTF-8 bytes (no BOS)
        from .lm_eval import eval_text

        ids = torch.tensor(tokenizer.encode(eval_text() if text is None else text)[1:tokens + 1], dtype=torch.long)
    else:
        ids = tokenize_text(tokenizer, text)[:tokens]
    if ids.numel() == 0:
        raise ValueError("calibration text gives no tokens")
    return ids


def calibration_sentences(tokenizer: Any, text: "str | None" = None, tokens: "int | None" = None,
                          max_len: int = 128) -> list[torch.Tensor]:
    """Calibration data for an encoder: `text` (default: fp8linear.lm_eval's text) split into sentences
    and lines, each tokenized with the tokenizer's special tokens ([CLS] ... [SEP]) and cut at max_len,
    as an encoder sees its inputs; sentences until `tokens` (default CALIBRATION_TOKENS) are reached.
    Returns 1-D int64 tensors, one a sentence (Calibration takes the list)."""
    import re

    from .lm_eval import eval_text

    tokens = _token_count(tokens)
    out: list[torch.Tensor] = []
    total = 0
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", eval_text() if text is None else text):
        sentence = sentence.strip()
        if len(sentence) < 3:
            continue
        ids = tokenizer(sentence, truncation=True, max_length=max_len)["input_ids"]
        out.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= tokens:
            break
    if not out:
        raise ValueError("calibration text gives no sentences")
    return out


# -- one matrix ---------------------------------------------------------------------------------------

def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper cholesky(H^-1) of H + damp * mean(diag H) * I (H is modified), retried with 10x the
    dampening while H is not numerically positive definite."""
    mean_diag = H.diagonal().mean()
    added = 0.0
    for attempt in range(4):
        target = damp * 10 ** attempt
        H.diagonal().add_((target - added) * mean_diag)
        added = target
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                if attempt:
                    log.info("fp8linear.calibrate: H needed dampening %g (asked %g)", target, damp)
                return U
    raise ValueError(f"calibration: the input Hessian is not positive definite even with damp={added:g}; "
                     "the calibration inputs may hold NaN or Inf")


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *,
                         damp: float = 0.01, act_order: bool = True, scale_ue8m0: bool = False,
                         block_size: tuple[int, int] = (128, 128), row_blocks: "list[int] | None" = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-compensated rounding of one weight matrix (module docstring).

    Args:
        weight: W [N, K], any float dtype; not modified.
        hessian: H = X X^T [K, K] over the calibration inputs (any positive multiple: only ratios matter),
            fp32 on weight's device; not modified.
        dtype: torch.float8_e4m3fn or torch.int8.
        damp, act_order: as Calibration's.
        scale_ue8m0, block_size: as fp8linear.weights.quantize_weight_blockwise, which chooses the scales.
        row_blocks: W's rows are several layers stacked (sharing H): their row counts, each layer's blocks
            starting at its own first row. Default: one layer, [N].

    Returns (weight [N, K] in dtype, weight_scale_inv fp32 [sum of each part's ceil(n/128), ceil(K/128)]):
    DESIGN.md's format, on weight's device (split the rows per part with `split_quantized`).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [N, K]; got {weight.dtype} {list(weight.shape)}")
    N, K = weight.shape
    if tuple(hessian.shape) != (K, K):
        raise ValueError(f"hessian must be [K, K] = [{K}, {K}] for weight [{N}, {K}]; got {list(hessian.shape)}")

    if dtype not in QMAX:
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.int8; got {dtype}")
    row_blocks = [N] if row_blocks is None else list(row_blocks)
    if sum(row_blocks) != N or any(n < 1 for n in row_blocks):
        raise ValueError(f"row_blocks must be positive row counts summing to N = {N}; got {row_blocks}")
    bn, bk = block_size

    W = weight.detach().float().clone()  # [N, K], updated in place as the errors are pushed on
    parts = W.split(row_blocks)
    scales = [quantize_weight_blockwise(p, dtype, block_size, scale_ue8m0)[1] for p in parts]
    S = torch.cat([expand_block_scales(s, p.shape[0], K, block_size) for s, p in zip(scales, parts)])  # [N, K]

    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that never fired: round plainly, push nothing
    H[dead, dead] = 1.0
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, S, H = W[:, perm], S[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)  # [K, K] upper

    Q = torch.empty_like(W)  # the rounded values q (not yet times s), fp32
    for c1 in range(0, K, bk):
        c2 = min(c1 + bk, K)
        W1, S1, U1 = W[:, c1:c2], S[:, c1:c2], U[c1:c2, c1:c2]  # views: W1's updates land in W
        E1 = torch.empty_like(W1)  # [N, c2 - c1] scaled errors
        for i in range(c2 - c1):
            w, s = W1[:, i], S1[:, i]
            q = saturate_(w / s, dtype).to(dtype).float()  # the nearest representable value, in fp32
            Q[:, c1 + i] = q
            e = (w - q * s) / U1[i, i]
            W1[:, i + 1:].sub_(e[:, None] * U1[i, i + 1:][None, :])
            E1[:, i] = e
        W[:, c2:].sub_(E1 @ U[c1:c2, c2:])
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    out = torch.empty((N, K), dtype=dtype, device=weight.device)
    return out.copy_(Q), torch.cat(scales)  # Q holds representable values only: the copy is exact


def split_quantized(q: torch.Tensor, scale_inv: torch.Tensor, row_blocks: list[int],
                    block_rows: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """gptq_quantize_weight's stacked result -> (weight, weight_scale_inv) per part."""
    scale_rows = [-(-n // block_rows) for n in row_blocks]
    return [(a.contiguous(), b.contiguous()) for a, b in zip(q.split(row_blocks), scale_inv.split(scale_rows))]


# -- the model ----------------------------------------------------------------------------------------

class _Stop(Exception):
    """Ends a forward early, once the inputs it was run for have been seen."""


def _blocks(model: nn.Module, targets: Mapping[str, Any]) -> "tuple[str, nn.ModuleList] | None":
    """The ModuleList holding the most target layers (a transformer's decoder blocks), with its name."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefix = f"{name}." if name else ""
            count = sum(t.startswith(prefix) for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    return best


def _forward_model(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except TypeError as exc:  # models without a cache argument (encoders)
        if "use_cache" not in str(exc):
            raise
        model(input_ids=ids)


def _stopped_calls(module: nn.Module, run: Callable[[int], Any], count: int, what: str) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `module`'s first call in each run(i), i < count, each run stopped right there."""
    calls: list[tuple[tuple, dict]] = []

    def pre_hook(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(count):
            try:
                run(i)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != count:
        raise RuntimeError(f"calibration: {what} was reached in {len(calls)} of {count} calibration forwards, "
                           "expected every one")
    return calls


def _capture_block_inputs(model: nn.Module, block: nn.Module, sequences: "list[torch.Tensor]", device: torch.device
                          ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `block`'s call for each calibration sequence, the model stopped right there."""
    return _stopped_calls(block, lambda i: _forward_model(model, sequences[i][None].to(device)), len(sequences),
                          f"the model's {type(block).__name__}")


def _run_block(block: nn.Module, calls: list[tuple[tuple, dict]], hidden: list[torch.Tensor], i: int) -> torch.Tensor:
    """block on calibration sequence i: its captured call with the hidden states replaced."""
    args, kwargs = calls[i]
    if args:
        out = block(hidden[i], *args[1:], **kwargs)
    else:
        out = block(**{**kwargs, "hidden_states": hidden[i]})
    return out[0] if isinstance(out, (tuple, list)) else out


def _hessian(xs: "list[torch.Tensor]") -> torch.Tensor:
    """H = X^T X [K, K] fp32 over the inputs xs (each [..., K]), a sequence at a time."""
    H = None
    for x in xs:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, K]
        H = x.t() @ x if H is None else H.addmm_(x.t(), x)
    return H


def _groups(run: Callable[[int], Any], layers: Mapping[str, nn.Module]) -> list[list[str]]:
    """The layers grouped by input, from one forward (run(0)) with every layer hooked: the names of those
    reading the same input tensor (q/k/v, gate/up), groups in the order they first run. A layer the
    forward does not reach is in no group."""
    groups: dict[tuple, list[str]] = {}  # identity of an input tensor in this forward -> the layers reading it
    alive: list[torch.Tensor] = []  # the inputs, kept so that no id is reused within the forward
    placed: set[str] = set()

    def hook_for(name: str):
        def pre_hook(module, args):
            x = args[0]
            if name in placed:  # a layer called twice: its first input decides
                return
            placed.add(name)
            alive.append(x)
            groups.setdefault((id(x), x.data_ptr(), tuple(x.shape)), []).append(name)
        return pre_hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    try:
        run(0)
    finally:
        for h in handles:
            h.remove()
    return list(groups.values())


def _inputs_of(layer: nn.Module, run: Callable[[int], Any], count: int) -> list[torch.Tensor]:
    """layer's input for each sequence i, each run(i) stopped right after the layer is reached."""
    return [args[0].detach() for args, _ in _stopped_calls(layer, run, count, "a layer seen in the first pass")]


@torch.no_grad()
def calibrate_linears(model: nn.Module, targets: Mapping[str, tuple[nn.Module, str, nn.Linear]],
                      calibration: Calibration, options: Mapping[str, Any], *,
                      progress: bool = True) -> dict[str, nn.Module]:
    """Round every target nn.Linear with error compensation and swap it for the FP8Linear holding the
    result, in place, block after block (module docstring). Called by quantize_model.

    targets: qualified name -> (parent, attribute, the nn.Linear); options: FP8Linear's keywords.
    Returns {name: the new FP8Linear}; a target no calibration forward reached is left to the caller
    (absent from the result, and logged).
    """
    from tqdm.auto import tqdm

    from .linear import FP8Linear

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    sequences = calibration.sequences()
    dtype = options.get("dtype", torch.float8_e4m3fn)
    result: dict[str, nn.Module] = {}

    def quantize_group(names: list[str], H: torch.Tensor) -> None:
        weights = [targets[n][2].weight for n in names]
        rows = [w.shape[0] for w in weights]
        q, s = gptq_quantize_weight(torch.cat(weights) if len(weights) > 1 else weights[0], H, dtype,
                                    damp=calibration.damp, act_order=calibration.act_order,
                                    scale_ue8m0=options.get("scale_ue8m0", False), row_blocks=rows)
        for name, (qw, qs) in zip(names, split_quantized(q, s, rows)):
            parent, attr, linear = targets[name]
            bias = None if linear.bias is None else linear.bias.detach().clone()
            new = FP8Linear.from_quantized(qw, qs, bias, **options)
            new.train(linear.training)
            setattr(parent, attr, new)
            result[name] = new
            bar.update(1)

    def calibrate_stage(run: Callable[[int], Any], count: int, names: list[str]) -> None:
        """Group by group, each on its inputs through the groups before it already quantized."""
        for group in _groups(run, {n: targets[n][2] for n in names}):
            quantize_group(group, _hessian(_inputs_of(targets[group[0]][2], run, count)))

    training = model.training
    model.eval()
    bar = tqdm(total=len(targets), desc="fp8linear: calibrating", unit="layer", disable=not progress)
    try:
        found = _blocks(model, targets)
        if found is not None:
            prefix = f"{found[0]}." if found[0] else ""
            calls = _capture_block_inputs(model, found[1][0], sequences, device)
            hidden = [c[0][0] if c[0] else c[1]["hidden_states"] for c in calls]
            for j, block in enumerate(found[1]):
                here = f"{prefix}{j}."
                names = [n for n in targets if n.startswith(here)]

                def run(i: int, block=block) -> torch.Tensor:
                    return _run_block(block, calls, hidden, i)

                if names:
                    calibrate_stage(run, len(calls), names)
                hidden = [run(i) for i in range(len(calls))]  # the next block's inputs, through this one quantized
            del calls, hidden
        rest = [n for n in targets if n not in result]
        if rest:  # outside the blocks: calibrated on full forwards of the model as it is now
            calibrate_stage(lambda i: _forward_model(model, sequences[i][None].to(device)), len(sequences), rest)
    finally:
        bar.close()
        model.train(training)
    missed = [n for n in targets if n not in result]
    if missed:
        log.warning("fp8linear.calibrate: no calibration forward reached %s; rounded plainly", ", ".join(missed))
    return result


# -- a perplexity target: the fewest layers left unquantized -------------------------------------------

@dataclasses.dataclass
class KeptLayers:
    """keep_for_ppl_target's answer.

    kept: the layers to leave in the original dtype, most sensitive first (a skip list for quantize_model).
    sensitivity: every quantized layer of the model searched -> its estimated share of the perplexity loss
        (nats/token, layer_sensitivity), most sensitive first.
    quantized_elements, total_elements: weight elements of the searched layers left quantized, and of all
        of them (the layers quantize_model quantized: lm_head and the other recipe skips are in neither).
    reference_nll, nll, kl: on the calibration sequences, where the choice was made: mean next-token NLL
        (nats) of the original model and of the quantized one with `kept` restored, and the mean
        KL(original || that model) in nats per token, the measure the target was held to.
    """

    kept: list[str]
    sensitivity: dict[str, float]
    quantized_elements: int
    total_elements: int
    reference_nll: float
    nll: float
    kl: float

    @property
    def weight_share(self) -> float:
        """The quantized share of the searched layers' weight elements, in [0, 1]."""
        return self.quantized_elements / self.total_elements if self.total_elements else 0.0

    @property
    def ppl_delta(self) -> float:
        """Perplexity change on the calibration sequences with `kept` restored, in percent (reported; the
        target is held by `kl`)."""
        return 100.0 * math.expm1(self.nll - self.reference_nll)


def _check_ppl_delta(target_ppl_delta: Any) -> float:
    if (isinstance(target_ppl_delta, bool) or not isinstance(target_ppl_delta, (int, float))
            or not math.isfinite(target_ppl_delta) or target_ppl_delta <= 0):
        raise ValueError(f"target_ppl_delta must be a positive number of percent (0.6: perplexity at most 0.6% above "
                         f"the original's); got {target_ppl_delta!r}")
    return float(target_ppl_delta)


def _nll_and_kl(model: nn.Module, reference: nn.Module, sequences: "list[torch.Tensor]", device: torch.device
                ) -> tuple[float, float, float]:
    """(reference's mean next-token NLL, model's, mean KL(reference || model)) in nats per scored position
    (every position but each sequence's last), over the sequences. The reference runs again each call:
    its logits for every calibration token would be T x vocab fp32."""
    from .accuracy import causal_lm_metrics
    from .lm_eval import next_token_nll

    ref_total, total, kl, count = 0.0, 0.0, 0.0, 0
    for row in sequences:
        ids = row[None].to(device)
        ref_logits = reference(input_ids=ids, use_cache=False).logits
        logits = model(input_ids=ids, use_cache=False).logits
        n = ids.shape[1] - 1
        ref_total += next_token_nll(ref_logits, ids).double().sum().item()
        total += next_token_nll(logits, ids).double().sum().item()
        kl += causal_lm_metrics(ref_logits[:, :-1], logits[:, :-1]).kl * n
        count += n
    return ref_total / count, total / count, kl / count


def layer_sensitivity(reference: nn.Module, quantized: nn.Module, sequences: "list[torch.Tensor]"
                      ) -> dict[str, float]:
    """Each FP8Linear of `quantized`: an estimate of the NLL (nats/token) its rounding adds, on the
    calibration sequences, from one backward of the reference and one forward of the quantized model:

        0.5 * mean over tokens t of (g_t . e_t)^2

    g_t = d(sum of the sequence's NLL) / d(layer output at t) in the reference (its empirical Fisher
    information, per position), e_t = the FP8Linear's output minus the original layer's on the same input
    x_t (the input the quantized model gives it: activation rounding and upstream drift included). The
    second-order term of the loss around the reference, positions taken apart: a ranking, not a
    prediction. Both models are left as they were; reference and quantized must share layer names.
    """
    from .linear import fp8_linears
    from .lm_eval import next_token_nll

    layers = fp8_linears(quantized)
    ref_modules = dict(reference.named_modules())
    missing = [n for n in layers if not isinstance(ref_modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"layer_sensitivity: the reference has no nn.Linear named {', '.join(missing[:3])}; pass the "
                         "model the quantized one was made from")
    device = next(reference.parameters()).device
    score = {n: 0.0 for n in layers}
    tokens = 0
    requires = {p: p.requires_grad for p in reference.parameters()}
    training = reference.training, quantized.training
    reference.eval()
    quantized.eval()
    try:
        for p in requires:
            p.requires_grad_(False)
        for row in sequences:
            ids = row[None].to(device)
            grads: dict[str, torch.Tensor] = {}

            def keep_grad(module, args, out, name=None):
                out.register_hook(lambda g: grads.__setitem__(name, g.detach()))

            def embed_grad(module, args, out):
                return out.requires_grad_(True)  # the graph starts here: no parameter gradients needed

            handles = [ref_modules[n].register_forward_hook(lambda m, a, o, n=n: keep_grad(m, a, o, n)) for n in layers]
            handles.append(reference.get_input_embeddings().register_forward_hook(embed_grad))
            try:
                with torch.enable_grad():
                    logits = reference(input_ids=ids, use_cache=False).logits
                    next_token_nll(logits, ids).sum().backward()
            finally:
                for h in handles:
                    h.remove()
            del logits

            def measure(module, args, out, name=None):
                ref = ref_modules[name]
                e = out.float() - torch.nn.functional.linear(args[0].float(), ref.weight.float(),
                                                             None if ref.bias is None else ref.bias.float())
                score[name] += 0.5 * (grads[name].float() * e).sum(-1).pow(2).sum().item()

            handles = [m.register_forward_hook(lambda m, a, o, n=n: measure(m, a, o, n)) for n, m in layers.items()]
            try:
                with torch.no_grad():
                    quantized(input_ids=ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            tokens += ids.shape[1]
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        reference.train(training[0])
        quantized.train(training[1])
    return dict(sorted(((n, s / tokens) for n, s in score.items()), key=lambda kv: -kv[1]))


@torch.no_grad()
def keep_for_ppl_target(reference: nn.Module, quantized: nn.Module, calibration: "Calibration | torch.Tensor",
                        target_ppl_delta: float, *, log: "Callable[[str], None] | None" = None) -> KeptLayers:
    """The fewest layers of `quantized` (a causal LM from quantize_model) to leave in the original dtype
    so that its perplexity stays within target_ppl_delta percent of reference's, judged on the calibration
    sequences by KL(reference || model) <= log(1 + target_ppl_delta / 100).

    Why KL and not the calibration text's own perplexity: a perplexity change of a few tenths of a percent
    on 4,096 tokens moves up and down as layers are restored (SmolLM2-135M: +0.69% with 40 layers kept,
    +0.21% with 41, +0.51% with 42; docs/calibration.md), since its first-order term is the sign of which
    way a few weights rounded; the KL is the expected NLL increase on text drawn from the model,
    falls as layers are restored, and was 0.76-1.9x the held-out NLL increase in the six SmolLM2 FP8 and
    INT8 measurements of docs/benchmarks.md: an estimate of the held-out loss, not a bound.

    Layers are ranked by layer_sensitivity, then the k most sensitive restored, k found by doubling and
    then bisection (about 2 log2(layers) passes of both models over the calibration sequences). The choice
    is made on calibration data only: check held-out text afterwards (fp8linear eval does). For the final
    model quantize the original again with skip=kept (and the same calibration), so that the layers
    after a kept one are calibrated on the inputs they will see. `quantized` is left as it was.
    """
    from .linear import fp8_linears

    target = _check_ppl_delta(target_ppl_delta)
    if isinstance(calibration, torch.Tensor):
        calibration = Calibration(calibration)
    say = log or (lambda msg: None)
    sequences = [t for t in calibration.sequences() if t.numel() >= 2]  # a 1-token sequence scores nothing
    if not sequences:
        raise ValueError("keep_for_ppl_target: the calibration sequences must hold at least 2 tokens (one scored "
                         "position) to measure perplexity")
    layers = fp8_linears(quantized)
    if not layers:
        raise ValueError("keep_for_ppl_target: the model holds no FP8Linear layers; quantize it first")
    ref_modules = dict(reference.named_modules())
    device = next(reference.parameters()).device
    sensitivity = layer_sensitivity(reference, quantized, sequences)
    order = list(sensitivity)
    budget = math.log1p(target / 100.0)

    def put(name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(quantized.get_submodule(parent) if parent else quantized, attr, module)

    scores: dict[int, tuple[float, float, float]] = {}

    def kl_with(k: int) -> float:
        if k not in scores:
            for n in order[:k]:
                put(n, ref_modules[n])
            try:
                scores[k] = _nll_and_kl(quantized, reference, sequences, device)
            finally:
                for n in order[:k]:
                    put(n, layers[n])
            ref_nll, nll, kl = scores[k]
            say(f"{k} kept: calibration KL {kl:.3e} nats/token (budget {budget:.3e}), perplexity "
                f"{100 * math.expm1(nll - ref_nll):+.2f}%")
        return scores[k][2]

    training = reference.training, quantized.training
    reference.eval()
    quantized.eval()
    try:
        if kl_with(0) <= budget:
            k = 0
        else:
            lo, hi = 0, 1  # lo misses the target; hi is tried next
            while hi < len(order) and kl_with(hi) > budget:
                lo, hi = hi, min(2 * hi, len(order))
            # every layer restored is the reference itself: the target holds at len(order)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if kl_with(mid) > budget else (lo, mid)
            k = hi
        if k not in scores:  # all restored, never measured: the reference itself
            nll = _nll_and_kl(reference, reference, sequences, device)[0]
            scores[k] = (nll, nll, 0.0)
    finally:
        reference.train(training[0])
        quantized.train(training[1])
    kept = order[:k]
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(sizes.values())
    ref_nll, nll, kl = scores[k]
    return KeptLayers(kept, sensitivity, total - sum(sizes[n] for n in kept), total, ref_nll, nll, kl)
