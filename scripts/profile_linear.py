"""Where one FP8Linear forward spends its time, per backend: host, GPU, and each kernel.

    python3 scripts/profile_linear.py [--N 4096] [--K 4096] [--M 1 64 512] [--cprofile | --parts]

Per (backend, M): host microseconds per call (a loop of calls, one synchronize at the end), GPU
microseconds per call (CUDA-graph replay of 20 calls: no host in the way), and the kernels of one
call from torch.profiler with their device time. bf16 F.linear is the yardstick. GPU only.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench_quant import graph_us  # scripts/ is on sys.path when run as a script


def host_us(fn, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def kernels(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    parts = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            parts.append(f"{evt.key[:60]} {t:.1f}us")
    return "; ".join(parts)


def their_launch(mod, x, backend: str):
    """mod(x) with fp8linear's C++ relaunch of DeepGEMM off: every call through DeepGEMM's own Python launch
    (the same kernel, for comparison)."""
    from fp8linear.backends import deepgemm_relaunch

    deepgemm_relaunch.ENABLED = False
    try:
        return mod(x)
    finally:
        deepgemm_relaunch.ENABLED = True


def host_profile(fn, n: int = 100) -> None:
    """cProfile of n calls: the functions with the most time of their own."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-13:]
    print("    " + "\n    ".join(lines))


def host_parts(N: int, K: int, Ms) -> None:
    """Host microseconds per call of the pieces of a cuBLASLt-backed forward, each alone in a loop: a
    trivial op (the floor of one Python -> dispatcher round trip), one allocation, the quant op, the
    GEMM op on ready operands, the whole forward, and bf16 F.linear. Says which piece to make cheaper."""
    from fp8linear import FP8Linear
    from fp8linear.backends import cublaslt
    from fp8linear.layouts import ScaleLayout
    from fp8linear.ops import quantize_for_gemm

    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    mod = FP8Linear.from_linear(lin, backend="cublaslt")
    prepared = cublaslt.prepare_weight(mod.weight, mod.weight_scale_inv)
    print(f"# host parts, cublaslt backend, N={N} K={K}: us per call, loop of 200, one sync")
    with torch.inference_mode():
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            q, s = quantize_for_gemm(x, 128, torch.float8_e4m3fn, False, ScaleLayout.COL, cublaslt.ROW_ALIGN)
            parts = {
                "x.view(-1)": lambda: x.view(-1),
                "torch.empty_like(x)": lambda: torch.empty_like(x),
                "quantize_for_gemm": lambda: quantize_for_gemm(x, 128, torch.float8_e4m3fn, False, ScaleLayout.COL,
                                                               cublaslt.ROW_ALIGN),
                "cublaslt_gemm op": lambda: torch.ops.fp8linear.cublaslt_gemm(q, s, *prepared),
                "cublaslt.gemm": lambda: cublaslt.gemm(q, s, prepared, torch.bfloat16, None),
                "FP8Linear forward": lambda: mod(x),
                "bf16 F.linear": lambda: torch.nn.functional.linear(x, lin.weight),
            }
            print("  M=%-6d " % M + "  ".join(f"{name} {host_us(fn):.1f}" for name, fn in parts.items()), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--M", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--backends", nargs="+", default=["deepgemm", "cublaslt", "triton", "fused_mma", "auto"])
    ap.add_argument("--cprofile", action="store_true", help="also print where the host time of each provider goes")
    ap.add_argument("--parts", action="store_true", help="only the host time of each piece of a cuBLASLt forward")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_linear.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.parts:
        host_parts(args.N, args.K, args.M)
        return 0
    from fp8linear import FP8Linear
    from fp8linear.backends import unsupported_reason

    N, K = args.N, args.K
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    mods = {b: FP8Linear.from_linear(lin, backend=b) for b in args.backends}
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}  N={N} K={K}")
    print(f"{'provider':12s} {'M':>6s} {'host us':>9s} {'graph us':>9s}  kernels of one call")
    with torch.inference_mode():
        for M in args.M:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            fns = {"bf16": lambda: torch.nn.functional.linear(x, lin.weight)}
            for b, mod in mods.items():
                if b != "auto" and unsupported_reason(b, M, N, K, torch.float8_e4m3fn, x.device) is not None:
                    continue
                fns[b] = (lambda m: (lambda: m(x)))(mod)
                theirs = {"deepgemm": "deepgemm-py"}.get(b)
                if theirs:  # the same kernel through DeepGEMM's own launch
                    fns[theirs] = (lambda m, b: (lambda: their_launch(m, x, b)))(mod, b)
            for name, fn in fns.items():
                try:
                    h = host_us(fn)
                    g = graph_us(fn, launches=20, replays=20)
                    k = kernels(fn)
                except Exception as exc:  # keep profiling the rest
                    print(f"{name:12s} {M:6d} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                print(f"{name:12s} {M:6d} {h:9.1f} {g:9.1f}  {k}", flush=True)
                if args.cprofile and name != "bf16":
                    host_profile(fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
