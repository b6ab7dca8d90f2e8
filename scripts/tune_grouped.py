#!/usr/bin/env python3
"""Time the grouped Triton GEMM's tiles on this GPU, in the indexed layout FP8Experts runs.

For each MoE shape (scripts/bench_moe.py SHAPES) and token count T, both GEMMs of the layer run alone on
pre-quantized operands with uniform top-k routing: gate_up (rows="gather", N = 2I, K = H) and down
(rows="scatter", N = H, K = I), each under every candidate tile configuration of the rows-per-expert
band T * k / E falls in, and under the built-in tiles (`triton_grouped.config_for`). At every point a
candidate's output must equal the built-in tiles' bit for bit (the K loop's order is the same; only the
tiling differs), else it is refused there: tiles below 64 rows multiply with mma.sync and larger ones
with wgmma, which round differently, so candidates of another band than the built-in tiles' are refused.
Timing: bench_linear.bench_us (do_bench medians, L2 flushed). Prints, per point, the built-in tiles' time and the best candidate's, and writes the rows as
JSON with --out: the evidence behind `triton_grouped._CONFIGS`. With --deepgemm, DeepGEMM's contiguous
grouped GEMM is timed beside at each point on the same pairs (each expert's segment padded to its 128
rows, random operands: the GEMM alone, without the gathers FP8Experts would need around it).

    python scripts/tune_grouped.py                                  # both shapes, T in 1 16 128 1024 4096 16384
    python scripts/tune_grouped.py --shape deepseek-v3 --tokens 4096 --out /tmp/grouped-tiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: bench_linear, bench_moe

import bench_linear  # noqa: E402
from bench_moe import SHAPES, TOKENS  # noqa: E402
from fp8linear import backends  # noqa: E402
from fp8linear.backends import triton_grouped  # noqa: E402
from fp8linear.layouts import ScaleLayout  # noqa: E402
from fp8linear.ops import quantize_for_gemm  # noqa: E402
from fp8linear.weights import quantize_weight_blockwise  # noqa: E402


#: Candidates per rows-per-expert band: (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages).
CANDIDATES = (
    (16, [(16, 64, 1, 4, 3), (16, 64, 1, 4, 4), (16, 128, 1, 4, 3), (16, 128, 1, 4, 4), (16, 256, 1, 4, 3),
          (16, 256, 1, 8, 3)]),
    (96, [(32, 64, 8, 4, 4), (32, 128, 8, 4, 4), (64, 128, 8, 4, 3), (64, 128, 8, 4, 4), (32, 256, 8, 8, 3),
          (64, 256, 8, 8, 3)]),
    (None, [(64, 128, 8, 4, 3), (64, 128, 8, 4, 4), (128, 128, 8, 8, 3), (128, 128, 8, 8, 4), (128, 128, 8, 4, 3),
            (128, 256, 8, 8, 3), (64, 256, 8, 8, 3), (128, 128, 32, 8, 3), (128, 128, 16, 8, 4), (128, 64, 8, 4, 4)]),
)


def candidates(rows_per_expert: int) -> list[dict]:
    """Tile configurations worth timing for about `rows_per_expert` rows per expert."""
    for bound, grid in CANDIDATES:
        if bound is None or rows_per_expert <= bound:
            return [dict(BLOCK_M=m, BLOCK_N=n, GROUP_M=g, num_warps=w, num_stages=s) for m, n, g, w, s in grid]
    raise AssertionError("unreachable: the last band has no bound")


def experts(E: int, N: int, K: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """E random experts [N, K] quantized per 128x128 block, on the GPU (one expert quantized, then
    repeated with a random permutation of its rows per expert: quantizing 256 experts of DeepSeek-V3 one by
    one would take most of the run)."""
    w, ws = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, dtype)
    perms = [torch.randperm(N // 128, device="cuda") for _ in range(E)]
    weight = torch.stack([w.view(N // 128, 128, K)[p].view(N, K) for p in perms])
    scale = torch.stack([ws[p] for p in perms])
    return weight, scale


def deepgemm_reason() -> "str | None":
    return backends.grouped_unsupported_reason("deepgemm", 8, 256, 256, torch.float8_e4m3fn, torch.device("cuda"),
                                               "contiguous")


def deepgemm_us(index: torch.Tensor, E: int, K: int, weight: tuple[torch.Tensor, torch.Tensor],
                rep_ms: float) -> float:
    """DeepGEMM's contiguous grouped GEMM alone on the pairs of `index`, segments padded to its alignment."""
    from fp8linear.backends import deepgemm_grouped
    from fp8linear.moe import route

    r = route(index, E, "contiguous", align=deepgemm_grouped.CONTIGUOUS_ALIGN)
    q, s = quantize_for_gemm(torch.randn(r.rows, K, device="cuda", dtype=torch.bfloat16), 128, torch.float8_e4m3fn,
                             False, deepgemm_grouped.SCALE_LAYOUT, 1)
    prepared = deepgemm_grouped.prepare_grouped_weight(*weight)
    return bench_linear.bench_us(
        lambda: deepgemm_grouped.grouped_gemm_contiguous(q, s, prepared, r.m_indices, torch.bfloat16), rep_ms=rep_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", choices=[s for s in SHAPES if s != "tiny"],
                    default=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--rep-ms", type=float, default=20.0)
    ap.add_argument("--out", help="write the rows here (JSON)")
    ap.add_argument("--deepgemm", action="store_true", help="also time DeepGEMM's contiguous grouped GEMM alone")
    args = ap.parse_args()
    dtype = torch.float8_e4m3fn
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    dg_why = deepgemm_reason() if args.deepgemm else "not asked (--deepgemm)"
    if args.deepgemm and dg_why:
        print(f"DeepGEMM skipped: {dg_why}")
    print("| shape | T | GEMM | rows/expert | built-in tiles | us | best tiles | us | gain | DeepGEMM contiguous us |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shape:
        E, k, H, I = SHAPES[shape]
        gemms = {"gate_up": (2 * I, H, "gather"), "down": (H, I, "scatter")}
        weights = {name: experts(E, N, K, dtype) for name, (N, K, _) in gemms.items()}
        for T in args.tokens:
            g = torch.Generator(device="cuda").manual_seed(T)
            index = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k]
            pairs = backends.SortedPairs.of(index, E)
            per_expert = -(-T * k // E)
            for name, (N, K, rows_mode) in gemms.items():
                M = T if rows_mode == "gather" else T * k
                q, s = quantize_for_gemm(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), 128, dtype, False,
                                         ScaleLayout.ROW, 1)

                def run(cfg):
                    return triton_grouped.grouped_gemm_indexed(q, s, weights[name], pairs, rows_mode, torch.bfloat16,
                                                               config=cfg)

                builtin = triton_grouped.config_for(per_expert, N, K, dtype)
                expected = run(builtin)
                t_builtin = bench_linear.bench_us(lambda: run(builtin), rep_ms=args.rep_ms)
                best, t_best = builtin, t_builtin
                for cfg in candidates(per_expert):
                    try:
                        out = run(cfg)
                    except Exception as exc:  # noqa: BLE001 - out of shared memory or registers: not a candidate
                        print(f"  refused {cfg}: {type(exc).__name__}: {str(exc)[:80]}", file=sys.stderr)
                        continue
                    if not torch.equal(out.view(torch.int16), expected.view(torch.int16)):
                        print(f"  refused {cfg}: output differs from the built-in tiles'", file=sys.stderr)
                        continue
                    t = bench_linear.bench_us(lambda: run(cfg), rep_ms=args.rep_ms)
                    if t < t_best:
                        best, t_best = cfg, t
                t_dg = None if dg_why else deepgemm_us(index, E, K, weights[name], args.rep_ms)
                short = "{BLOCK_M}x{BLOCK_N} g{GROUP_M} w{num_warps} s{num_stages}"
                print(f"| {shape} | {T} | {name} | {per_expert} | {short.format(**builtin)} | {t_builtin:.1f} | "
                      f"{short.format(**best)} | {t_best:.1f} | {t_builtin / t_best:.2f}x | "
                      f"{'-' if t_dg is None else f'{t_dg:.1f}'} |", flush=True)
                rows.append(dict(shape=shape, T=T, gemm=name, rows_per_expert=per_expert, builtin=builtin,
                                 builtin_us=t_builtin, best=best, best_us=t_best, deepgemm_us=t_dg))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
