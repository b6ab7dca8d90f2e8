#!/usr/bin/env python3
"""End to end on the GPU: a Llama-3-8B-shaped model, Hugging Face generate at batch 1, bf16 vs FP8.

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
- decode: HF generate, greedy, batch 1, a --prompt-token prompt: tokens/s = decode tokens /
  (time(1 + --decode new tokens) - time(1 new token)), so prefill is not in it; median of --repeats.
  Also the weight bytes read per token (all parameters but the input embeddings) / time per token.

Eager HF generate: at batch 1 each decoder layer launches a few dozen kernels per token, and that host
overhead bounds the decode speedup when layers are few.

    python scripts/bench_e2e.py                       # ~1-2 min on an H100
    python scripts/bench_e2e.py --layers 32 --out e2e.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
DEVICE = "cuda"  # a module constant so a CPU dry run of the logic can swap it (never for numbers)
TARGETS = {"decode": 1.3, "prefill": 1.4, "weights": 0.5}  # issue 4: fp8 / bf16


def header() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=here).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        commit += "+dirty" if dirty else ""
    except Exception:  # noqa: BLE001 - no git on the machine is fine
        commit = "unknown"
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


@torch.inference_mode()
def measure(model, args, label: str, log) -> dict:
    from fp8linear import hf

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

    prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    hf.generate(model, prompt, 2)  # warm-up of the decode shapes (M = 1) and of generate itself
    one, full, tokens = [], [], None
    for _ in range(args.repeats):
        one.append(hf.generate(model, prompt, 1, warmup=False).seconds)
        res = hf.generate(model, prompt, args.decode + 1, warmup=False)
        full.append(res.seconds)
        tokens = res.tokens
    per_token = max((_median(full) - _median(one)) / args.decode, 1e-9)
    emb = model.get_input_embeddings().weight
    read = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    flops = 2 * args.prefill * sum(p.numel() for n, p in model.named_parameters()
                                   if "embed_tokens" not in n and not n.startswith("lm_head"))
    out = {
        "prefill_ms": prefill_s * 1e3,
        "prefill_tflops": flops / prefill_s / 1e12,
        "prefill_peak_gib": peak / 2**30,
        "decode_tok_s": 1.0 / per_token,
        "decode_gb_s": read / per_token / 1e9,
        "read_bytes_per_token": read,
        "tokens": tokens.tolist(),
    }
    log(f"[{label}] prefill {out['prefill_ms']:.1f} ms ({out['prefill_tflops']:.0f} TFLOP/s), decode "
        f"{out['decode_tok_s']:.1f} tok/s ({out['decode_gb_s']:.0f} GB/s of weights)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers (Llama-3-8B has 32; default 8)")
    p.add_argument("--prefill", type=int, default=2048, help="prefill length (default 2048)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the decode timing")
    p.add_argument("--decode", type=int, default=128, help="decode tokens timed (default 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", help="FP8Linear backend (default auto)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_e2e: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from transformers import LlamaConfig

    import fp8linear
    from fp8linear import hf

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(header())
    log(f"# model: Llama-3-8B shapes, {args.layers} of 32 layers, random bf16 weights on the GPU; batch 1; "
        f"prefill {args.prefill}; decode {args.decode} tokens after a {args.prompt_tokens}-token prompt; "
        f"median of {args.repeats}; FP8 backend {args.backend}")
    t_start = time.perf_counter()
    config = LlamaConfig(num_hidden_layers=args.layers, architectures=["LlamaForCausalLM"], **LLAMA3_8B)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)
    model = hf.build_model(config, torch.bfloat16, device=DEVICE)
    assert all(t.device.type == DEVICE for t in model.parameters())
    w_bf16 = torch.cuda.memory_allocated() - base
    log(f"[bf16] built in {time.perf_counter() - t_start:.1f}s; weights {w_bf16 / 2**30:.2f} GiB")
    results = {"bf16": measure(model, args, "bf16", log)}
    results["bf16"]["weights_gib"] = w_bf16 / 2**30

    t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    model = fp8linear.quantize_model(model, backend=args.backend, progress=False)
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
    same = sum(x == y for x, y in zip(b["tokens"], f["tokens"]))
    rows = [
        ("decode tok/s", f"{b['decode_tok_s']:.1f}", f"{f['decode_tok_s']:.1f}", _ratio(f["decode_tok_s"], b["decode_tok_s"]),
         f">= {TARGETS['decode']}x"),
        ("decode GB/s (weights)", f"{b['decode_gb_s']:.0f}", f"{f['decode_gb_s']:.0f}", None, ""),
        (f"prefill {args.prefill} ms", f"{b['prefill_ms']:.1f}", f"{f['prefill_ms']:.1f}", _ratio(b["prefill_ms"], f["prefill_ms"]),
         f">= {TARGETS['prefill']}x"),
        ("prefill TFLOP/s", f"{b['prefill_tflops']:.0f}", f"{f['prefill_tflops']:.0f}", None, ""),
        ("weights GiB", f"{b['weights_gib']:.2f}", f"{f['weights_gib']:.2f}", _ratio(f["weights_gib"], b["weights_gib"]),
         f"~{TARGETS['weights']}x"),
    ]
    log("")
    log(f"| {'metric':<22} | {'bf16':>9} | {'fp8':>9} | {'fp8/bf16':>8} | target  |")
    log(f"|{'-' * 24}|{'-' * 11}|{'-' * 11}|{'-' * 10}|---------|")
    for name, x, y, ratio, target in rows:
        log(f"| {name:<22} | {x:>9} | {y:>9} | {('%.2fx' % ratio) if ratio else '':>8} | {target:<7} |")
    log(f"greedy tokens equal to bf16: {same}/{len(b['tokens'])} (random weights: near-tied logits part early); "
        f"total {time.perf_counter() - t_start:.0f}s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"header": header(), "layers": args.layers, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
