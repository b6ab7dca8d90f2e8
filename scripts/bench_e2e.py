#!/usr/bin/env python3
"""End to end on the GPU: a Llama-3-8B-shaped model (or 70B-shaped: --shapes), Hugging Face generate at
batch 1, bf16 vs FP8.

The model: Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128, vocab
128256, untied lm_head) with --layers decoder layers (default 8 of 32, to fit the GPU session's time
budget; the embeddings and lm_head are full size, so they weigh more in the totals than in the real
model: at 8 layers they are 38% of the bf16 weights, at 32 layers 13%). Random bf16 weights built
directly on the GPU (transformers' init under a cuda device context; nothing on the CPU).

Measured, for bf16 and then for the same model after fp8linear.quantize_model (in place; --backend,
default auto; lm_head and embeddings stay bf16):
- weights: torch.cuda.memory_allocated() after building / after quantizing (caches emptied);
- prefill: one forward of [1, --prefill] tokens (default 2048), logits of the last position only (what
  generate's prefill computes), CUDA events, median of --repeats after a warm-up;
- decode, batch 1, greedy, a --prompt-token prompt, tokens/s of decode alone (prefill not in it), in each
  --mode (median of --repeats; also the weight bytes read per token, all parameters but the input
  embeddings, / time per token):
  - eager: HF generate with its dynamic cache: decode tokens / (time(1 + --decode new tokens) - time(1)).
    At batch 1 each decoder layer launches a few dozen kernels per token and the host is slow (~10 us a
    torch.empty, ~20 us F.linear's host path on the GPU machine), so this measures the CPU more than the
    weights, and FP8 (quant + GEMM per Linear) launches more than bf16.
  - graphs: the decode step as a CUDA graph, for BOTH models: what a serving engine does, and where the
    GPU time (FP8's half the weight bytes) decides. --graph-impl (default both, one table row each):
    manual: one decode step captured by hand and replayed per token, greedy argmax on the GPU
    (fp8linear.decode.GraphDecoder, gpt-fast's way): no compile, no per-token host work; tokens/s =
    --decode / time of the replays. compile: transformers' route, a static KV cache and generate()
    running decode steps through torch.compile(mode="reduce-overhead", fullgraph=True)
    (fp8linear.decode.enable_compiled_decode), prefill eager, HF generate's per-token Python still in;
    the first call (compile + recording) is timed apart, and tokens/s = --decode / (time(W + 1 +
    --decode) - time(W + 1)) with W = 4 warm tokens so that per-call CUDA-graph (re)recording is in both
    terms. When the compile route fails for a model, the reason is printed and, if manual was not
    chosen, that model falls back to manual.
  Greedy agreement: tokens equal to bf16's in the same mode (random weights: near-tied logits part
  early), and in graphs mode tokens equal to the same model's eager tokens (a check of the graph path).

    python scripts/bench_e2e.py                       # eager, graphs manual + compile; ~3-5 min on an H100
    python scripts/bench_e2e.py --mode graphs --graph-impl manual    # no compile; ~1-2 min
    python scripts/bench_e2e.py --layers 32 --out e2e.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit

import run_commit  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
#: Llama-3-70B's layer shapes (80 layers in the real model): q and o 8192 x 8192, gate / up 28672 x 8192,
#: down 8192 x 28672, k and v 1024 x 8192.
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_attention_heads=64)
SHAPES = {"llama3-8b": (LLAMA3_8B, "Llama-3-8B", 32), "llama3-70b": (LLAMA3_70B, "Llama-3-70B", 80)}
DEVICE = "cuda"  # a module constant so a CPU dry run of the logic can swap it (never for numbers)
# Likewise for the graphs mode's dry run on a CPU: torch.compile backend / mode, and whether the manual
# path captures a CUDA graph (False runs the same step eagerly).
COMPILE_BACKEND, COMPILE_MODE, COMPILE_ALL_DEVICES, CAPTURE = "inductor", "reduce-overhead", False, True
DECODE_MODES = ("eager", "graphs-manual", "graphs-compile")  # result keys, in table order
WARM_TOKENS = 4  # compile route: tokens before the timed span (cudagraph warm-up / re-record per call)
TARGETS = {"decode": 1.3, "prefill": 1.4, "weights": 0.5}  # the end-to-end goals: fp8 / bf16


def header() -> str:
    commit = run_commit.commit()
    import transformers

    return (f"# bench_e2e: {torch.cuda.get_device_name()} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
            f" | torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}"
            f" | commit {commit}")


def _ratio(a: float, b: float) -> "float | None":
    return a / b if b else None


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _cuda_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _weight_read_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every parameter but the input embeddings (a gather)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()


def _decode_entry(model, per_token_s: float, tokens: torch.Tensor, **extra) -> dict:
    per_token_s = max(per_token_s, 1e-9)
    return {"tok_s": 1.0 / per_token_s, "gb_s": _weight_read_bytes(model) / per_token_s / 1e9,
            "tokens": tokens.tolist(), **extra}


@torch.inference_mode()
def measure_prefill(model, args, label: str, log) -> dict:
    vocab = model.config.vocab_size
    g = torch.Generator(device=DEVICE).manual_seed(0)
    long_ids = torch.randint(0, vocab, (1, args.prefill), device=DEVICE, generator=g)

    def prefill():
        try:
            model(long_ids, use_cache=False, logits_to_keep=1)
        except TypeError:  # older transformers: num_logits_to_keep / all logits
            model(long_ids, use_cache=False)

    t0 = time.perf_counter()
    prefill()  # warm-up: backend choice per M, DeepGEMM JIT builds, cuBLAS handles
    torch.cuda.synchronize()
    log(f"[{label}] prefill warm-up {time.perf_counter() - t0:.1f}s")
    torch.cuda.reset_peak_memory_stats()
    prefill_s = _median([_cuda_time(prefill) for _ in range(args.repeats)])
    peak = torch.cuda.max_memory_allocated()
    flops = 2 * args.prefill * sum(p.numel() for n, p in model.named_parameters()
                                   if "embed_tokens" not in n and not n.startswith("lm_head"))
    out = {"prefill_ms": prefill_s * 1e3, "prefill_tflops": flops / prefill_s / 1e12, "prefill_peak_gib": peak / 2**30}
    log(f"[{label}] prefill {out['prefill_ms']:.1f} ms ({out['prefill_tflops']:.0f} TFLOP/s)")
    return out


@torch.inference_mode()
def decode_eager(model, args, prompt: torch.Tensor, label: str, log) -> dict:
    """HF generate with its default dynamic cache: (time(1 + n) - time(1)) / n per token."""
    from fp8linear import hf

    # Untimed first: on the GPU machine the first generate() calls of a model took ~1.2 s each whatever
    # their length (one-time setup inside transformers/torch), which a median of 2 does not drop.
    hf.generate(model, prompt, 1, warmup=False)
    hf.generate(model, prompt, args.decode + 1, warmup=False)
    one, full, tokens = [], [], None
    for _ in range(args.repeats):
        one.append(hf.generate(model, prompt, 1, warmup=False).seconds)
        res = hf.generate(model, prompt, args.decode + 1, warmup=False)
        full.append(res.seconds)
        tokens = res.tokens
    out = _decode_entry(model, (_median(full) - _median(one)) / args.decode, tokens, impl="eager")
    log(f"[{label}] decode eager {out['tok_s']:.1f} tok/s ({out['gb_s']:.0f} GB/s of weights)")
    return out


def _dynamo_counts() -> "tuple[int, int]":
    """(graphs dynamo compiled so far, CUDA-graph skips inductor reported so far)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"].get("cudagraph_skips", 0))


@torch.inference_mode()
def decode_compiled(model, args, prompt: torch.Tensor, label: str, log) -> dict:
    """transformers' route: static cache, decode steps through torch.compile(reduce-overhead, fullgraph).

    Raises when the first call does not compile a graph (generate's auto-compile criteria unmet), so the
    caller can fall back; recompiles or skipped CUDA graphs during the timed calls are reported (the
    numbers are then not those of graph replay).
    """
    from fp8linear import decode, hf

    n_short, n_long = WARM_TOKENS + 1, WARM_TOKENS + 1 + args.decode
    graphs0, skips0 = _dynamo_counts()
    # One cache length for every call (the longest), or a grown cache would change shapes and recompile.
    decode.enable_compiled_decode(model, prompt.shape[1] + n_long, backend=COMPILE_BACKEND, mode=COMPILE_MODE,
                                  all_devices=COMPILE_ALL_DEVICES)
    t0 = time.perf_counter()
    hf.generate(model, prompt, n_long, warmup=False)
    setup_s = time.perf_counter() - t0
    graphs1, skips1 = _dynamo_counts()
    if graphs1 == graphs0:
        raise RuntimeError("generate() compiled nothing: transformers' auto-compile criteria were not met "
                           "(static cache on a CUDA device, no hf_quantizer)")
    log(f"[{label}] graphs (compile): first generate {setup_s:.1f}s (compile + CUDA-graph recording; "
        f"{graphs1 - graphs0} graph(s) compiled{f', {skips1 - skips0} CUDA-graph skip(s)' if skips1 > skips0 else ''})")
    short, full, tokens = [], [], None
    for _ in range(args.repeats):
        short.append(hf.generate(model, prompt, n_short, warmup=False).seconds)
        res = hf.generate(model, prompt, n_long, warmup=False)
        full.append(res.seconds)
        tokens = res.tokens[: args.decode + 1]
    graphs2, skips2 = _dynamo_counts()
    notes = []
    if graphs2 > graphs1:
        notes.append(f"{graphs2 - graphs1} recompile(s) during the timed calls")
    if skips2 > skips0:
        notes.append(f"inductor skipped CUDA graphs {skips2 - skips0} time(s): steps ran without graph replay "
                     "(TORCH_LOGS=perf_hints says why)")
    for note in notes:
        log(f"[{label}] WARNING graphs (compile): {note}")
    return _decode_entry(model, (_median(full) - _median(short)) / args.decode, tokens, impl="compile",
                         setup_s=setup_s, notes=notes)


@torch.inference_mode()
def decode_manual(model, args, prompt: torch.Tensor, label: str, log) -> dict:
    """One decode step captured as a CUDA graph and replayed per token (fp8linear.decode.GraphDecoder)."""
    from fp8linear import decode

    n = args.decode + 1
    decoder = decode.GraphDecoder(model, prompt.shape[1] + n, use_graph=CAPTURE, suppress_ids=decode.eos_ids(model))
    try:
        setup_s = decoder.capture(prompt.to(DEVICE))
        log(f"[{label}] graphs (manual): capture {setup_s:.2f}s")
        times, tokens = [], None
        for _ in range(args.repeats):
            res = decoder.generate(prompt, n)
            times.append(res.decode_s)
            tokens = res.tokens
    finally:
        decoder.close()
    return _decode_entry(model, _median(times) / args.decode, tokens, impl="manual", setup_s=setup_s)


def decode_graphs(model, args, prompt: torch.Tensor, label: str, log) -> dict:
    """The graphs mode: {"graphs-manual": ..., "graphs-compile": ...} for the --graph-impl chosen.

    Manual runs first (cheap, no compile: its numbers are in even if the compile later breaks the process);
    a compile failure is printed and, when manual was not chosen, manual runs in its place. A route that
    fails is absent from the result.
    """
    from fp8linear import decode

    impls = ["manual", "compile"] if args.graph_impl == "both" else [args.graph_impl]
    out: dict = {}
    for impl in impls:
        try:
            if impl == "manual":
                out["graphs-manual"] = decode_manual(model, args, prompt, label, log)
            else:
                out["graphs-compile"] = decode_compiled(model, args, prompt, label, log)
        except Exception as exc:  # noqa: BLE001 - the other measurements still count
            log(f"[{label}] graphs ({impl}) FAILED: {type(exc).__name__}: {str(exc).strip()[:2000]}")
            if impl == "compile" and "manual" not in impls:
                log(f"[{label}] falling back to the manual CUDA-graph capture for this model")
                try:
                    out["graphs-manual"] = decode_manual(model, args, prompt, label, log)
                    out["graphs-manual"]["notes"] = ["fallback: the compile route failed"]
                except Exception as exc2:  # noqa: BLE001
                    log(f"[{label}] graphs (manual) FAILED: {type(exc2).__name__}: {str(exc2).strip()[:2000]}")
        finally:
            if impl == "compile":
                decode.disable_compiled_decode(model)  # also frees inductor's CUDA-graph pools
            gc.collect()
            torch.cuda.empty_cache()
    for key, res in out.items():
        log(f"[{label}] decode {key} {res['tok_s']:.1f} tok/s ({res['gb_s']:.0f} GB/s of weights)")
    return out


def measure(model, args, label: str, log) -> dict:
    from fp8linear import hf

    out = measure_prefill(model, args, label, log)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    # Eager warm-up of the decode shapes in every mode: FP8Linear caches its backend per M on an eager call,
    # which torch.compile and graph capture then find (fp8linear.linear).
    hf.generate(model, prompt, 2)
    out["decode"] = {}
    if args.mode in ("eager", "both"):
        out["decode"]["eager"] = decode_eager(model, args, prompt, label, log)
    if args.mode in ("graphs", "both"):
        out["decode"].update(decode_graphs(model, args, prompt, label, log))
    return out


def _agreement(a: list[int], b: list[int]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"{same}/{min(len(a), len(b))}" + (f" (first difference at token {first})" if first is not None else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers (Llama-3-8B has 32; default 8)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="llama3-8b",
                   help="the layer shapes (default llama3-8b; llama3-70b: hidden 8192, intermediate 28672)")
    p.add_argument("--prefill", type=int, default=2048, help="prefill length (default 2048)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the decode timing")
    p.add_argument("--decode", type=int, default=128, help="decode tokens timed (default 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", help="FP8Linear backend (default auto)")
    p.add_argument("--fuse-mlp", action="store_true",
                   help="quantize_model(fuse_mlp=True): gate_up GEMM + fused SiLU-and-mul quant + down GEMM")
    p.add_argument("--fuse-norm", action="store_true",
                   help="quantize_model(fuse_norm=True): RMSNorm and the next layers' quantization in one kernel")
    p.add_argument("--mode", choices=("eager", "graphs", "both"), default="both",
                   help="decode: eager HF generate, CUDA graphs for both models, or both (default)")
    p.add_argument("--graph-impl", choices=("compile", "manual", "both"), default="both",
                   help="graphs mode: transformers' static cache + torch.compile (falls back to manual on "
                        "failure), a manual CUDA-graph capture of one decode step, or both (default)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("layers", "prefill", "prompt_tokens", "decode", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_e2e: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from transformers import LlamaConfig

    import fp8linear
    from fp8linear import hf

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(header())
    graphs_how = f", graphs via {args.graph_impl}" if args.mode != "eager" else ""
    dims, shape_name, real_layers = SHAPES[args.shapes]
    log(f"# model: {shape_name} shapes, {args.layers} of {real_layers} layers, random bf16 weights on the GPU; batch 1; "
        f"prefill {args.prefill}; decode {args.decode} tokens after a {args.prompt_tokens}-token prompt; "
        f"median of {args.repeats}; FP8 backend {args.backend}; fuse_mlp {args.fuse_mlp}; fuse_norm {args.fuse_norm}; decode mode {args.mode}{graphs_how}")
    t_start = time.perf_counter()
    config = LlamaConfig(num_hidden_layers=args.layers, architectures=["LlamaForCausalLM"], **dims)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)
    model = hf.build_model(config, torch.bfloat16, device=DEVICE)
    assert all(t.device.type == torch.device(DEVICE).type for t in model.parameters())
    w_bf16 = torch.cuda.memory_allocated() - base
    log(f"[bf16] built in {time.perf_counter() - t_start:.1f}s; weights {w_bf16 / 2**30:.2f} GiB")
    results = {"bf16": measure(model, args, "bf16", log)}
    results["bf16"]["weights_gib"] = w_bf16 / 2**30
    log(f"[bf16] done at {time.perf_counter() - t_start:.0f}s")

    t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    model = fp8linear.quantize_model(model, backend=args.backend, progress=False, fuse_mlp=args.fuse_mlp,
                                     fuse_norm=args.fuse_norm)
    gc.collect()
    torch.cuda.empty_cache()
    w_fp8 = torch.cuda.memory_allocated() - base
    log(f"[fp8] quantized {len(model.fp8linear_summary.swapped)} layers in {time.perf_counter() - t0:.1f}s "
        f"(peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB); weights {w_fp8 / 2**30:.2f} GiB")
    log(f"[fp8] {model.model.layers[0].mlp.down_proj}")
    try:
        results["fp8"] = measure(model, args, "fp8", log)
    except Exception as exc:  # noqa: BLE001 - print the bf16 numbers before failing
        log(f"[fp8] FAILED: {type(exc).__name__}: {exc}")
        raise
    results["fp8"]["weights_gib"] = w_fp8 / 2**30

    b, f = results["bf16"], results["fp8"]
    modes = [m for m in DECODE_MODES if m in b["decode"] or m in f["decode"]]
    rows = []
    for mode in modes:  # one row per decode mode
        bd, fd = b["decode"].get(mode), f["decode"].get(mode)
        rows.append((f"decode tok/s {mode}", f"{bd['tok_s']:.1f}" if bd else "failed",
                     f"{fd['tok_s']:.1f}" if fd else "failed",
                     _ratio(fd["tok_s"], bd["tok_s"]) if bd and fd else None, f">= {TARGETS['decode']}x"))
    rows += [
        (f"prefill {args.prefill} ms", f"{b['prefill_ms']:.1f}", f"{f['prefill_ms']:.1f}", _ratio(b["prefill_ms"], f["prefill_ms"]),
         f">= {TARGETS['prefill']}x"),
        ("prefill TFLOP/s", f"{b['prefill_tflops']:.0f}", f"{f['prefill_tflops']:.0f}", None, ""),
        ("weights GiB", f"{b['weights_gib']:.2f}", f"{f['weights_gib']:.2f}", _ratio(f["weights_gib"], b["weights_gib"]),
         f"~{TARGETS['weights']}x"),
    ]
    width = max(22, *(len(r[0]) for r in rows))
    log("")
    log(f"| {'metric':<{width}} | {'bf16':>9} | {'fp8':>9} | {'fp8/bf16':>8} | target  |")
    log(f"|{'-' * (width + 2)}|{'-' * 11}|{'-' * 11}|{'-' * 10}|---------|")
    for name, x, y, ratio, target in rows:
        log(f"| {name:<{width}} | {x:>9} | {y:>9} | {('%.2fx' % ratio) if ratio else '':>8} | {target:<7} |")
    for mode in modes:
        bd, fd = b["decode"].get(mode), f["decode"].get(mode)
        if bd is None or fd is None:
            continue
        setup = (f"; setup (compile or capture) bf16 {bd['setup_s']:.1f}s, fp8 {fd['setup_s']:.1f}s"
                 if "setup_s" in bd and "setup_s" in fd else "")
        log(f"decode {mode}: GB/s of weights bf16 {bd['gb_s']:.0f}, fp8 {fd['gb_s']:.0f}{setup}")
        log(f"  greedy tokens fp8 = bf16: {_agreement(bd['tokens'], fd['tokens'])}")
        for label, d in (("bf16", bd), ("fp8", fd)):
            if mode != "eager" and "eager" in results[label]["decode"]:
                log(f"  greedy tokens {label} {mode} = {label} eager: "
                    f"{_agreement(results[label]['decode']['eager']['tokens'], d['tokens'])}")
            for note in d.get("notes", []):
                log(f"  {label}: {note}")
    log(f"(random weights: near-tied logits part early, so agreement is reported, not a target); "
        f"total {time.perf_counter() - t_start:.0f}s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"header": header(), "layers": args.layers, "args": vars(args), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
