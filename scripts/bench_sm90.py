"""The sm90 kernel's variants beside its peers, per layer shape and M (GPU, compute capability 9.0).

Per (N, K, M), median microseconds (triton.testing.do_bench, L2 flushed) of:
  bf16       F.linear on bf16 weights (the baseline of every speedup)
  deepgemm   FP8Linear(backend="deepgemm"), quantization included (its one-op C++ launch), if importable
  cublaslt   FP8Linear(backend="cublaslt"), quantization included
  quant      per_token_group_quant alone (`col` scales), and `copy`, a device-to-device copy moving the
             quantization's bytes (3 per element of x), timed in the same run: the quant pass's ceiling
  gBcC       sm90_gemm on pre-quantized (q, s), tile height B, cluster C: the GEMM without quantization
  lBcC       sm90_linear, quantization inside the kernel, same variants; `l-auto` the shape's default
and auto's speedups over bf16 for the fastest sm90 variant and for DeepGEMM.

    python scripts/bench_sm90.py                          # bench_linear's narrow and wide shapes, M 512 2048 4096
    python scripts/bench_sm90.py --N 4096 --K 4096 --M 4096
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_commit  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (2112, 7168), (7168, 7168), (4096, 14336), (28672, 4096)]
VARIANTS = [(128, 1), (128, 2), (256, 1), (256, 2)]


def us(fn, rep_ms: float) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=rep_ms, return_mode="median") * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, nargs="+", help="output widths (pairs with --K)")
    ap.add_argument("--K", type=int, nargs="+", help="input widths (pairs with --N)")
    ap.add_argument("--M", type=int, nargs="+", default=[512, 2048, 4096], help="token counts")
    ap.add_argument("--rep-ms", type=float, default=4.0, help="do_bench measuring time per point")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench_sm90 needs a compute capability 9.0 GPU (the sm90 kernel is Hopper-only)")
        return 2
    shapes = list(zip(args.N, args.K)) if args.N else SHAPES
    if args.N and (not args.K or len(args.N) != len(args.K)):
        ap.error("--N and --K pair up: give both, the same number of values")

    from fp8linear import FP8Linear, _build, per_token_group_quant
    importlib.import_module("fp8linear.backends.sm90")  # defines the ops called directly below
    from fp8linear.backends import unsupported_reason

    _build.ensure_loaded()  # ... and their CUDA kernels, before any FP8Linear forward would load them

    fp8 = torch.float8_e4m3fn
    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()} | date: {datetime.datetime.now().isoformat(timespec='seconds')} | "
          f"torch {torch.__version__} CUDA {torch.version.cuda} | commit {run_commit.commit()}")
    cols = ["bf16", "deepgemm", "cublaslt", "quant", "copy"] + [f"g{b}c{c}" for b, c in VARIANTS] + \
        [f"l{b}c{c}" for b, c in VARIANTS] + ["l-auto"]
    print("| N x K | M | " + " | ".join(cols) + " | best sm90 x bf16 | deepgemm x bf16 |")
    print("|" + " --- |" * (len(cols) + 4))
    for N, K in shapes:
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        peers = {name: FP8Linear.from_linear(lin, backend=name) for name in ("deepgemm", "cublaslt")
                 if unsupported_reason(name, 4096, N, K, fp8, dev) is None}
        mine = FP8Linear.from_linear(lin, backend="sm90")
        w, ws = mine.weight, mine.weight_scale_inv
        for M in args.M:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            for mod in peers.values():
                mod(x), mod(x)  # JIT builds and plans: not timed
            q, s = per_token_group_quant(x, 128, fp8, scale_layout="col")
            src = torch.empty(M * K * 3 // 2, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            t = {"bf16": us(lambda: torch.nn.functional.linear(x, lin.weight), args.rep_ms)}
            for name, mod in peers.items():
                t[name] = us(lambda: mod(x), args.rep_ms)
            t["quant"] = us(lambda: per_token_group_quant(x, 128, fp8, scale_layout="col"), args.rep_ms)
            t["copy"] = us(lambda: dst.copy_(src), args.rep_ms)
            for b, c in VARIANTS:
                t[f"g{b}c{c}"] = us(lambda: torch.ops.fp8linear.sm90_gemm(q, s, w, ws, None, torch.bfloat16, b, c),
                                    args.rep_ms)
                t[f"l{b}c{c}"] = us(lambda: torch.ops.fp8linear.sm90_linear(x, w, ws, None, False, 1e-10, b, c),
                                    args.rep_ms)
            t["l-auto"] = us(lambda: torch.ops.fp8linear.sm90_linear(x, w, ws, None, False, 1e-10, 0, 0),
                             args.rep_ms)
            best = min(v for k, v in t.items() if k.startswith("l"))
            dg = f"{t['bf16'] / t['deepgemm']:.2f}x" if "deepgemm" in t else "-"
            print(f"| {N}x{K} | {M} | " + " | ".join(f"{t[c]:.1f}" if c in t else "-" for c in cols)
                  + f" | {t['bf16'] / best:.2f}x | {dg} |", flush=True)
            x = q = s = src = dst = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
