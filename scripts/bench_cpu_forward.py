"""Benchmark the CPU path: FP8Linear(backend="reference") against nn.Linear in fp32 and bf16, on the CPU.

Per (N, K, M): the best of --rounds wall times of one layer forward (activation quantization included for
FP8), the three providers interleaved round by round so that a load change on a shared machine hits them
alike; the best, not the median, because other processes on a shared machine only ever add time. Then
the ratio FP8 / fp32 (the CPU eval runs its models in fp32). Then, unless --no-demo, the built-in
demo model's greedy decode in tokens/s, fp32 vs FP8, by the path `python -m fp8linear demo` takes
(fp8linear.hf.demo_model, quantize_model, hf.generate); with --smollm2, SmolLM2-135M (fp8linear.lm_eval):
one 512-token window forward, the step the perplexity eval repeats, and its greedy decode.

    python scripts/bench_cpu_forward.py                      # the grid below and the demo decode
    python scripts/bench_cpu_forward.py --M 1 512 --N 1536 --K 576 --no-demo
    python scripts/bench_cpu_forward.py --smollm2 --threads 2

Shapes: SmolLM2-135M's projections (gate/up 1536x576, down 576x1536, q/o 576x576, k/v 192x576), the demo
model's MLP (1408x512) and one Llama-size square (4096x4096). Layers have no bias, as LLM projections.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit

import run_commit  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (1408, 512), (4096, 4096)]
M_LIST = [1, 16, 512, 2048]
PROVIDERS = ("fp32", "bf16", "fp8")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"cpu: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | "
            f"load average {load:.1f} | date: {datetime.datetime.now().isoformat(timespec='seconds')} | "
            f"torch {torch.__version__} | commit {run_commit.commit()}")


def time_once(fn, min_s: float) -> float:
    """Seconds per call: calls fn until min_s has passed (at least once) and divides."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / n


def interleaved(fns: dict, rounds: int, min_s: float) -> dict[str, float]:
    """Best seconds per call of each fn over `rounds`, the fns taking turns within each round (one warm-up
    call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_once(fn, min_s))
    return {name: min(t) for name, t in times.items()}


def layer_case(N: int, K: int, M: int, rounds: int, min_s: float) -> dict[str, float]:
    from fp8linear import FP8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    lin_bf16 = copy.deepcopy(lin).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin, backend="reference")
    x = torch.randn(M, K)
    x_bf16 = x.to(torch.bfloat16)
    with torch.inference_mode():
        return interleaved({"fp32": lambda: lin(x), "bf16": lambda: lin_bf16(x_bf16), "fp8": lambda: fp8(x)},
                           rounds, min_s)


def decode_tokens_per_s(models: dict, ids: torch.Tensor, tokens: int, rounds: int) -> dict[str, float]:
    """Greedy decode tokens/s of each model after ids [1, T] (fp8linear.hf.generate), best of rounds."""
    from fp8linear import hf

    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = max(best[name], hf.generate(model, ids, tokens, warmup=True).tokens_per_s)
    return best


def demo_case(tokens: int, rounds: int) -> dict[str, float]:
    """tokens/s of greedy decode on the built-in demo model, fp32 vs FP8 (reference backend)."""
    from fp8linear import hf, quantize_model

    ref = hf.demo_model("demo-llama", torch.float32, "cpu", seed=0)
    fp8 = quantize_model(copy.deepcopy(ref), backend="reference", progress=False)
    ids = hf.encode_prompt(hf.ByteTokenizer(), "The quick brown fox")
    return decode_tokens_per_s({"fp32": ref, "fp8": fp8}, ids, tokens, rounds)


def smollm2_case(tokens: int, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """SmolLM2-135M, fp32 vs FP8 (reference backend): seconds per forward of one 512-token window of the
    eval text (best of rounds), and greedy decode tokens/s after a 9-token prompt."""
    from fp8linear import lm_eval, quantize_model

    ref, tokenizer = lm_eval.load_smollm2(torch.float32, "cpu", progress=False)
    fp8 = quantize_model(copy.deepcopy(ref), backend="reference", progress=False)
    ids = lm_eval.tokenize_text(tokenizer)
    window = lm_eval.text_windows(ids, count=1)
    with torch.inference_mode():
        forward = interleaved({"fp32": lambda: ref(window), "fp8": lambda: fp8(window)}, rounds, 0.0)
    return forward, decode_tokens_per_s({"fp32": ref, "fp8": fp8}, ids[None, :9], tokens, rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, nargs="+", help="output features (with --K: shapes instead of the grid)")
    parser.add_argument("--K", type=int, nargs="+", help="input features, one per --N")
    parser.add_argument("--M", type=int, nargs="+", default=M_LIST, help=f"rows (default {M_LIST})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case; the best counts (default 5)")
    parser.add_argument("--min-s", type=float, default=0.2, help="seconds of calls per provider per round (default 0.2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--demo-tokens", type=int, default=32, help="new tokens per decode (default 32)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo model's decode")
    parser.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M: a 512-token window forward and greedy decode (fp8linear.lm_eval)")
    args = parser.parse_args(argv)
    if (args.N is None) != (args.K is None) or (args.N and len(args.N) != len(args.K)):
        parser.error("--N and --K take the same number of values")
    if min(args.M) < 1 or args.rounds < 1 or args.min_s < 0:
        parser.error("--M values and --rounds must be >= 1, --min-s >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = list(zip(args.N, args.K)) if args.N else SHAPES

    print(header())
    print(f"{'N x K':>11} {'M':>5} | {'fp32 ms':>9} {'bf16 ms':>9} {'fp8 ms':>9} | {'fp8/fp32':>8} {'fp8/bf16':>8}")
    for N, K in shapes:
        for M in args.M:
            t = layer_case(N, K, M, args.rounds, args.min_s)
            print(f"{f'{N}x{K}':>11} {M:>5} | {t['fp32'] * 1e3:9.3f} {t['bf16'] * 1e3:9.3f} {t['fp8'] * 1e3:9.3f} | "
                  f"{t['fp8'] / t['fp32']:8.2f} {t['fp8'] / t['bf16']:8.2f}", flush=True)
    if not args.no_demo:
        tps = demo_case(args.demo_tokens, rounds=2)
        print(f"demo-llama greedy decode, {args.demo_tokens} tokens (best of 2): fp32 {tps['fp32']:.1f} tokens/s, "
              f"fp8 {tps['fp8']:.1f} tokens/s ({tps['fp32'] / tps['fp8']:.2f}x slower)", flush=True)
    if args.smollm2:
        t, tps = smollm2_case(args.demo_tokens, rounds=3)
        print(f"SmolLM2-135M, one 512-token window forward (best of 3): fp32 {t['fp32']:.2f} s, fp8 {t['fp8']:.2f} s "
              f"({t['fp8'] / t['fp32']:.2f}x); greedy decode, {args.demo_tokens} tokens (best of 3): fp32 "
              f"{tps['fp32']:.1f} tokens/s, fp8 {tps['fp8']:.1f} tokens/s ({tps['fp32'] / tps['fp8']:.2f}x slower)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
