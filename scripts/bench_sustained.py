"""FP8Linear against bf16 under sustained load: each layer run back to back, with the SM clock and power.

bench_linear times one call at a time with L2 flushed before each (triton's do_bench), which leaves the
card idle between calls. A prefill or a training step runs one large GEMM after another, and there every
large GEMM on an H100 holds the card at its power limit with the SM clock pulled down (docs/benchmarks.md,
"sm90 with TMA-fed quantizers, and the power cap"): bf16, DeepGEMM's and ours alike. This script measures
that regime. Per (N, K, M) and provider it runs the call back to back for --seconds, discards the first
--settle-s, and reports microseconds per call (CUDA events over the rest) with the median SM clock and
power that `nvidia-smi` sampled meanwhile. Inputs rotate over enough copies of x to exceed twice the L2,
so no call finds its x cached by the previous one. Providers run in --rounds passes, forward then reverse
order, and each keeps its faster pass (the clock drifts as the card warms).

Providers: bf16 (F.linear on bf16 weights), auto and any --backends (FP8Linear, quantization included),
dg-gemm (DeepGEMM's GEMM alone on pre-quantized operands, where DeepGEMM is importable) and quant
(per_token_group_quant alone).

    python scripts/bench_sustained.py                         # bench_linear's layer shapes at M = 4096
    python scripts/bench_sustained.py --N 4096 --K 4096 --M 2048 4096 --seconds 2
    python scripts/bench_sustained.py --model /path/to/model --M 4096   # every layer shape of a model
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit, bench_linear

import bench_linear  # noqa: E402
import model_shapes  # noqa: E402
import run_commit  # noqa: E402

L2_BYTES = 50 * 2**20  # the H100's; more copies than needed elsewhere only cost memory
MAX_COPIES = 8


class SmiSampler:
    """Background `nvidia-smi` readings of (time, SM MHz, W) every 20 ms; empty where nvidia-smi is absent."""

    def __init__(self, index: int):
        self.samples: list[tuple[float, float, float]] = []
        self._proc = None
        self.power_field = "n/a"  # the nvidia-smi field read, once one is
        if shutil.which("nvidia-smi") is None:
            return
        field = "power.draw.instant"
        probe = subprocess.run(["nvidia-smi", "-i", str(index), f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
        if probe.returncode != 0 or not _is_number(probe.stdout):
            field = "power.draw"  # drivers without the instantaneous reading: a one-second average
        self.power_field = field
        self._proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), f"--query-gpu=clocks.sm,{field}", "--format=csv,noheader,nounits",
             "-lms", "20"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = line.strip().split(",")
            if len(parts) == 2 and _is_number(parts[0]) and _is_number(parts[1]):
                self.samples.append((time.time(), float(parts[0]), float(parts[1])))

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        """Median SM MHz and W of the samples taken between t0 and t1 (nan without any)."""
        inside = [(mhz, w) for t, mhz, w in self.samples if t0 <= t <= t1]
        if not inside:
            return float("nan"), float("nan")
        return statistics.median(m for m, _ in inside), statistics.median(w for _, w in inside)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


def _is_number(text: str) -> bool:
    try:
        float(text.strip())
        return True
    except ValueError:
        return False


def sustained_us(fn, seconds: float, settle_s: float, sampler: SmiSampler) -> tuple[float, float, float]:
    """Run fn back to back for `seconds`; microseconds per call, SM MHz and W after the first `settle_s`.

    Calls go in batches of about 10 ms of GPU time with one synchronize each, so the host never runs far
    ahead (the wall clock then matches the GPU's work, which the nvidia-smi window needs) and the GPU idles
    only for a synchronize's round trip per batch.
    """
    fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    batch = max(1, int(10_000 / max(begin.elapsed_time(end) * 1e3 / 3, 1.0)))
    start = time.time()
    while time.time() - start < settle_s:
        for _ in range(batch):
            fn()
        torch.cuda.synchronize()
    t0 = time.time()
    begin.record()
    calls = 0
    while time.time() - t0 < seconds - settle_s:
        for _ in range(batch):
            fn()
        calls += batch
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    t1 = time.time()
    mhz, watts = sampler.window(t0, t1)
    return begin.elapsed_time(end) * 1e3 / calls, mhz, watts


def providers_for(N: int, K: int, M: int, names: list[str]):
    """{provider: callable} for one (N, K, M), each rotating over copies of x (bench_linear.layer_fns);
    dg-gemm wherever DeepGEMM serves the shape, whether or not --backends names it."""
    from fp8linear.backends import unsupported_reason

    lin = bench_linear.make_layer(N, K)
    copies = max(2, min(MAX_COPIES, -(-2 * L2_BYTES // (M * K * 2))))
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    dg = unsupported_reason("deepgemm", M, N, K, torch.float8_e4m3fn, torch.device("cuda")) is None
    mods = bench_linear.layer_modules(lin, names + (["deepgemm"] if dg and "deepgemm" not in names else []))
    fns, _ = bench_linear.layer_fns(lin, mods, xs)
    if "deepgemm" not in names:
        fns.pop("deepgemm", None)  # built for dg-gemm's prepared weight only
    return fns


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_shapes.add_shape_arguments(ap)
    ap.add_argument("--M", type=int, nargs="+", default=[4096], help="token counts")
    ap.add_argument("--backends", nargs="*", default=[], choices=["deepgemm", "cublaslt", "triton"],
                    help="FP8Linear backends timed beside auto (none by default)")
    ap.add_argument("--seconds", type=float, default=1.5, help="back-to-back running time per provider and pass")
    ap.add_argument("--settle-s", type=float, default=0.6, help="the first part of each run, not measured")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the providers (forward, then reverse order, in turn)")
    ap.add_argument("--out", help="write the table (markdown) here")
    args = ap.parse_args(argv)
    shapes = model_shapes.shapes_from_args(ap, args, bench_linear.SHAPES)
    if args.seconds <= args.settle_s or args.settle_s < 0:
        ap.error(f"--seconds ({args.seconds}) must exceed --settle-s ({args.settle_s}), which must be >= 0")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1; got {args.rounds}")
    if any(m < 1 for m in args.M):
        ap.error(f"--M values must be >= 1; got {args.M}")
    if not torch.cuda.is_available():
        print("bench_sustained needs a CUDA GPU")
        return 2

    from fp8linear import _build

    _build.ensure_loaded()
    names = ["auto", *args.backends]
    sampler = SmiSampler(torch.cuda.current_device())
    head = (f"card: {torch.cuda.get_device_name()} | date: {datetime.datetime.now().isoformat(timespec='seconds')} | "
            f"torch {torch.__version__} CUDA {torch.version.cuda} | commit {run_commit.commit()} | "
            f"{args.seconds} s per provider and pass, first {args.settle_s} s not measured, {args.rounds} passes | "
            f"power: {sampler.power_field}")
    print(head, flush=True)
    cols = None
    lines = []
    try:
        for N, K in shapes:
            for M in args.M:
                fns = providers_for(N, K, M, names)
                best: dict[str, tuple[float, float, float]] = {}
                order = list(fns)
                for r in range(args.rounds):
                    for p in (order if r % 2 == 0 else order[::-1]):
                        got = sustained_us(fns[p], args.seconds, args.settle_s, sampler)
                        if p not in best or got[0] < best[p][0]:
                            best[p] = got
                if cols is None:
                    cols = list(best)
                    lines = ["| N x K | M | " + " | ".join(f"{c} us (MHz, W)" for c in cols)
                             + " | auto x bf16 | dg-gemm x bf16 |", "|" + " --- |" * (len(cols) + 4)]
                cells = [f"{best[c][0]:.1f} ({best[c][1]:.0f}, {best[c][2]:.0f})" if c in best else "-" for c in cols]
                ratio = {p: f"{best['bf16'][0] / best[p][0]:.2f}x" if p in best else "-" for p in ("auto", "dg-gemm")}
                line = f"| {N}x{K} | {M} | " + " | ".join(cells) + f" | {ratio['auto']} | {ratio['dg-gemm']} |"
                if len(lines) == 2:
                    print("\n".join(lines), flush=True)
                print(line, flush=True)
                lines.append(line)
                fns = None
                torch.cuda.empty_cache()
    finally:
        sampler.close()
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
