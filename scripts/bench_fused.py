"""Time the fused prologues and the FP8 gated MLP on the GPU, each beside its unfused pair, in one run.

    python3 scripts/bench_fused.py [--quick] [--out bench_fused.csv]

Rows (bf16 input, fp8 e4m3 output, group 128, `col` scales: what DeepGEMM and cuBLASLt read):
- silu_and_mul, M in {1, 16, 128, 1024, 4096, 16384} x I in {14336, 18432}: `fused` =
  fp8linear.fused.silu_and_mul_quant(x [M, 2I]); `unfused` = torch `F.silu(g) * u` then
  fp8linear.per_token_group_quant. bytes = M (2I * 2 read + I written) + 4 M I / 128 of scales.
- rmsnorm, M in the same x H in {4096, 7168}: `fused` = rmsnorm_quant(x, w) (q only) and `fused+y` (also
  writes the normalized row); `unfused` = LlamaRMSNorm's torch ops then per_token_group_quant.
  bytes = M (2H read + H written) + scales (+ 2 M H for y).
- MLP block, Llama-3-8B shape (H 4096 -> I 14336 -> H), M = 4096 (and 1, 128 without --quick):
  FP8GatedMLP (merged gate_up GEMM, fused quant, down GEMM) vs the unfused FP8 MLP (three FP8Linear, torch
  silu * up in bf16) vs bf16 nn.Linear; backend `auto` for both FP8 variants.

Columns: `us` median kernel time (triton.testing.do_bench, which flushes the 50 MB L2 before each rep;
CUDA events with a flush when triton is missing); TB/s = bytes / time; %copy = time of a device copy of
the same traffic (bytes/2 read + bytes/2 written; the median of three timings) / our time; `x unfused` = unfused time / fused time.
Targets (H100): silu_and_mul >= 85 %copy and >= 1.5x unfused at M >= 1024; MLP >= 1.1x at
M = 4096. Each shape's fused output is checked bit for bit against the CPU reference on its first rows
before timing. Under torch.inference_mode(). Full run about 2 minutes on an H100, --quick under one.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit

import run_commit  # noqa: E402

FP8 = torch.float8_e4m3fn
FULL_M = (1, 16, 128, 1024, 4096, 16384)
QUICK_M = (1, 128, 4096)
SILU_I = (14336, 18432)
RMS_H = (4096, 7168)
MLP_SHAPE = (4096, 14336)  # Llama-3-8B: hidden 4096, intermediate 14336
CHECK_ROWS = 8


# The same timer as the quant benchmark (do_bench median, L2 flushed; CUDA events without triton).
from bench_quant import Timer, copy_us  # noqa: E402  (scripts/ is on sys.path when run as a script)


def header(timer: Timer) -> list[str]:
    commit = run_commit.commit(12)
    props = torch.cuda.get_device_properties(0)
    return [
        f"card: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; commit {commit}",
        f"timing: {timer.how}",
    ]


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, as the unfused path runs it."""
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(var + eps)).to(x.dtype)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(width), b.view(width))


def row(results: list, section: str, shape: str, variant: str, us: float, nbytes: "int | None", copy: "float | None",
        base: "float | None") -> None:
    tbs = nbytes / us / 1e6 if nbytes else float("nan")
    pct = 100.0 * copy / us if copy else float("nan")
    speed = base / us if base else float("nan")
    results.append({"section": section, "shape": shape, "variant": variant, "us": us, "TB/s": tbs, "%copy": pct,
                    "x unfused": speed})
    print(f"{section:13s} {shape:22s} {variant:9s} {us:10.1f} us {tbs:6.2f} TB/s {pct:6.1f} %copy  "
          f"{speed:5.2f}x unfused", flush=True)


def bench_silu(timer: Timer, Ms, results: list) -> None:
    from fp8linear import per_token_group_quant
    from fp8linear.fused import silu_and_mul_quant

    for I in SILU_I:
        for M in Ms:
            x = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16) * 3
            fused = lambda: silu_and_mul_quant(x, 128, scale_layout="col")  # noqa: E731
            unfused = lambda: per_token_group_quant(  # noqa: E731
                torch.nn.functional.silu(x[:, :I]) * x[:, I:], 128, scale_layout="col")
            q, s = fused()
            ref = silu_and_mul_quant(x[:CHECK_ROWS].cpu(), 128, scale_layout="col")
            ok = _bitwise(q[:CHECK_ROWS], ref[0]) and _bitwise(s.contiguous()[:CHECK_ROWS], ref[1].contiguous())
            if not ok:
                print(f"# silu_and_mul M={M} I={I}: fused output differs from the CPU reference!", flush=True)
            nbytes = M * (4 * I + I) + 4 * M * (I // 128)
            copy = copy_us(timer, nbytes)
            t_unfused = timer.us(unfused)
            shape = f"M={M} I={I}"
            row(results, "silu_and_mul", shape, "unfused", t_unfused, nbytes, copy, t_unfused)
            row(results, "silu_and_mul", shape, "fused", timer.us(fused), nbytes, copy, t_unfused)
            x = q = s = None  # free them before the next shape's


def bench_rmsnorm(timer: Timer, Ms, results: list) -> None:
    from fp8linear import per_token_group_quant
    from fp8linear.fused import rmsnorm_quant

    eps = 1e-5
    for H in RMS_H:
        for M in Ms:
            x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
            w = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
            fused = lambda: rmsnorm_quant(x, w, eps, scale_layout="col")  # noqa: E731
            fused_y = lambda: rmsnorm_quant(x, w, eps, scale_layout="col", return_normed=True)  # noqa: E731
            unfused = lambda: per_token_group_quant(rmsnorm_torch(x, w, eps), 128, scale_layout="col")  # noqa: E731
            q, s, y = fused_y()
            ref = rmsnorm_quant(x[:CHECK_ROWS].cpu(), w.cpu(), eps, scale_layout="col", return_normed=True)
            ok = all(_bitwise(a[:CHECK_ROWS], b) for a, b in
                     ((q, ref[0]), (s.contiguous(), ref[1].contiguous()), (y, ref[2])))
            if not ok:
                print(f"# rmsnorm M={M} H={H}: fused output differs from the CPU reference!", flush=True)
            nbytes = M * 3 * H + 4 * M * (H // 128)
            copy = copy_us(timer, nbytes)
            copy_y = copy_us(timer, nbytes + 2 * M * H)
            t_unfused = timer.us(unfused)
            shape = f"M={M} H={H}"
            row(results, "rmsnorm", shape, "unfused", t_unfused, nbytes, copy, t_unfused)
            row(results, "rmsnorm", shape, "fused", timer.us(fused), nbytes, copy, t_unfused)
            row(results, "rmsnorm", shape, "fused+y", timer.us(fused_y), nbytes + 2 * M * H, copy_y, t_unfused)
            x = q = s = y = None


def bench_mlp(timer: Timer, Ms, results: list) -> None:
    from torch import nn

    from fp8linear.linear import FP8Linear
    from fp8linear.mlp import FP8GatedMLP

    H, I = MLP_SHAPE
    torch.manual_seed(0)
    linears = {name: nn.Linear(i, o, bias=False, device="cuda", dtype=torch.bfloat16)
               for name, (i, o) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items()}
    mlp = nn.Module()
    for name, lin in linears.items():
        setattr(mlp, name, lin)
    mlp.act_fn = nn.SiLU()
    fused = FP8GatedMLP.from_mlp(mlp)
    gate, up, down = (FP8Linear.from_linear(linears[n]) for n in ("gate_proj", "up_proj", "down_proj"))

    def unfused(x):
        return down(torch.nn.functional.silu(gate(x)) * up(x))

    def bf16(x):
        return linears["down_proj"](torch.nn.functional.silu(linears["gate_proj"](x)) * linears["up_proj"](x))

    for M in Ms:
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        fused(x), unfused(x)  # warm-up: backend choice per M, prepared weights, DeepGEMM JIT
        t_unfused = timer.us(lambda: unfused(x))
        shape = f"M={M} {H}->{I}->{H}"
        row(results, "mlp", shape, "bf16", timer.us(lambda: bf16(x)), None, None, t_unfused)
        row(results, "mlp", shape, "unfused", t_unfused, None, None, t_unfused)
        row(results, "mlp", shape, "fused", timer.us(lambda: fused(x)), None, None, t_unfused)
        print(f"#   backends: gate_up {fused.gate_up_proj.backend_for(M, x.device).NAME}, down "
              f"{fused.down_proj.backend_for(M, x.device).NAME}; unfused gate {gate.backend_for(M, x.device).NAME}",
              flush=True)


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in {1, 128, 4096} only; MLP at M = 4096 only")
    parser.add_argument("--out", type=pathlib.Path, help="also write the rows as CSV")
    parser.add_argument("--only", choices=("silu", "rmsnorm", "mlp"), action="append", help="run these sections")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from fp8linear import _build

    timer = Timer()
    for line in header(timer):
        print("# " + line, flush=True)
    t = time.time()
    _build.ensure_loaded()
    print(f"# fp8linear kernels loaded in {time.time() - t:.1f}s", flush=True)
    Ms = QUICK_M if args.quick else FULL_M
    sections = args.only or ["silu", "rmsnorm", "mlp"]
    results: list[dict] = []
    start = time.time()
    with torch.inference_mode():
        if "silu" in sections:
            bench_silu(timer, Ms, results)
        if "rmsnorm" in sections:
            bench_rmsnorm(timer, Ms, results)
        if "mlp" in sections:
            bench_mlp(timer, (4096,) if args.quick else (1, 128, 4096), results)
    print(f"# done in {time.time() - start:.0f}s", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
