"""Time DeepGEMM's legacy FP8 GEMM with other tile configurations and write the faster ones per
(N, K, M bucket) to fp8linear/backends/deepgemm_tiles.json.

DeepGEMM picks its tiles by a wave-count rule; the same kernel template builds others. For each layer
shape this script builds the candidates through DeepGEMM's JIT (all at once, in parallel), then at each
M bucket times the GEMM alone on the same quantized operands, launched from C++ as FP8Linear launches
it (bench_linear.bench_us: do_bench, L2 flushed): DeepGEMM's pick first, then every candidate with
DeepGEMM's SM-count rule ("fewest") and with every SM ("all"). A candidate whose output differs from
DeepGEMM's pick in a single bit is refused. The fastest is timed again beside DeepGEMM's pick (three
rounds, the later two in shuffled order, medians) and kept when it wins by --min-gain; otherwise the row says to keep
DeepGEMM's pick. Rows of other cards and other shapes are kept.

    python scripts/tune_deepgemm.py                        # bench_linear's 11 shapes, M 64 .. 16384
    python scripts/tune_deepgemm.py --N 2112 --K 7168 --M 4096 --out /tmp/tiles.json
    python scripts/tune_deepgemm.py --model /path/to/model --fuse-mlp    # every layer shape of a model
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import bench_linear  # noqa: E402  (scripts/ is not a package)

DEFAULT_M = (64, 128, 256, 512, 1024, 2048, 4096, 16384)
#: Candidate BLOCK_N per BLOCK_M, from M = 512 up (where DeepGEMM turns TMA multicast on). The kernel
#: template's wgmma selector has these widths; 128-row tiles go to 192 (96 + 96 accumulator registers per
#: thread), 256-row tiles stop at 128 (DeepGEMM's own limit: its two math warpgroups hold 1.5 x BLOCK_N
#: accumulators each). 152 is refused by the template (its B scales would span three K blocks).
LARGE_M_BLOCK_NS = {128: (112, 120, 128, 144, 160, 192), 256: (64, 80, 96, 112, 128)}
#: Below M = 512: 64-row tiles (one math warpgroup) and 128-row ones, down to narrow N tiles that spread a
#: small GEMM over more SMs, with and without multicast.
SMALL_M_BLOCK_NS = {64: (16, 32, 48, 64, 96, 128, 160, 192), 128: (32, 64, 96, 128, 160, 192)}
SMEM_CAPACITY = 232448  # bytes of shared memory per block on sm90 (DeepGEMM's constant)


def _dg():
    from deep_gemm.jit import build
    from deep_gemm.jit_kernels import gemm as dg_gemm
    from deep_gemm.jit_kernels.runtime import FP8GemmRuntime, GemmType

    return build, dg_gemm, FP8GemmRuntime, GemmType


def most_stages(K: int, block_m: int, block_n: int) -> "int | None":
    """DeepGEMM's stage rule: the most stages (at most 8, at most K/128) that fit in shared memory, at
    most 4 where BLOCK_N's B scales unroll into long code."""
    _, dg_gemm, _, _ = _dg()
    limit = 4 if 128 % block_n != 0 and 128 // math.gcd(128, block_n) <= 4 else 8
    for stages in range(min(limit, max(K // 128, 1)), 0, -1):
        if dg_gemm.get_smem_config(stages, K, block_m, block_n)[0] <= SMEM_CAPACITY:
            return stages
    return None


def wave_efficiency(M: int, N: int, block_m: int, block_n: int, sms: int) -> float:
    """Useful fraction of the tile-slots the grid runs: last-wave fill times the padding of M and N."""
    blocks = -(-M // block_m) * -(-N // block_n)
    waves = -(-blocks // sms)
    return blocks / (waves * sms) * N / (-(-N // block_n) * block_n) * M / (-(-M // block_m) * block_m)


def dg_pick(M: int, N: int, K: int, sms: int):
    """DeepGEMM's own configuration for this shape, as Tiles."""
    from fp8linear.backends.deepgemm_tiles import Tiles

    _, dg_gemm, _, _ = _dg()
    _, bm, bn, stages, (mc, on_a), _ = dg_gemm.get_best_configs(M, N, K, 1, sms)
    return Tiles(bm, bn, stages, mc, on_a, "fewest")


def candidates(N: int, K: int, M: int, sms: int) -> list:
    """Tile shapes worth timing for (N, K) at M, each with both SM rules, plus DeepGEMM's pick. From
    M = 512: the LARGE_M_BLOCK_NS tiles whose grid wastes under 12%, TMA multicast on A or on B. Below:
    every SMALL_M_BLOCK_NS tile, without multicast, on A, and on B where there are two M tiles to pair."""
    from fp8linear.backends.deepgemm_tiles import Tiles

    large = M >= 512
    out = []
    for bm, bns in (LARGE_M_BLOCK_NS if large else SMALL_M_BLOCK_NS).items():
        for bn in bns:
            if large and wave_efficiency(M, N, bm, bn, sms) < 0.88:
                continue
            stages = most_stages(K, bm, bn)
            if stages is None:
                continue
            casts = [(2, True), (2, False)] if large else [(1, True), (2, True)] + [(2, False)] * (M > bm)
            for mc, on_a in casts:
                for rule in ("fewest", "all"):
                    out.append(Tiles(bm, bn, stages, mc, on_a, rule))
    pick = dg_pick(M, N, K, sms)
    for rule in ("fewest", "all"):
        out.append(Tiles(pick.block_m, pick.block_n, pick.num_stages, pick.multicast, pick.multicast_on_a, rule))
    return sorted(set(out), key=lambda t: (t.block_m, t.block_n, t.multicast, t.multicast_on_a, t.num_sms))


def prebuild(N: int, K: int, tiles_list, jobs: int) -> dict:
    """Compile every configuration through DeepGEMM's JIT in parallel (its cache then serves the runs).
    Returns {(block_m, block_n, stages, multicast, on_a): error or None}."""
    build, dg_gemm, FP8GemmRuntime, GemmType = _dg()
    kernels = {(t.block_m, t.block_n, t.num_stages, t.multicast, t.multicast_on_a) for t in tiles_list}

    def one(key):
        bm, bn, stages, mc, on_a = key
        smem, swizzle, pad = dg_gemm.get_smem_config(stages, K, bm, bn)
        # The keys deepgemm_relaunch.run_with_tiles hands DeepGEMM's tuner (as gemm_fp8_fp8_bf16_nt does for its
        # pick), so the code, and with it the cache entry, is the one the timed runs then find.
        code = FP8GemmRuntime.generate(
            N=N, K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, BLOCK_N_PADDING=pad, SWIZZLE_D_MODE=swizzle,
            NUM_GROUPS=1, NUM_STAGES=stages, NUM_TMA_THREADS=128, NUM_MATH_THREADS_PER_GROUP=128,
            NUM_TMA_MULTICAST=mc, IS_TMA_MULTICAST_ON_A=on_a, GEMM_TYPE=GemmType.Normal)
        try:
            build("gemm_fp8_fp8_bf16_nt", code, FP8GemmRuntime)
            return key, None
        except Exception as exc:  # noqa: BLE001 - DeepGEMM's build asserts on nvcc errors
            return key, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        return dict(pool.map(one, sorted(kernels)))


def tune_bucket(M: int, N: int, K: int, tiles_list, weight, wsi, rep_ms: float, min_gain: float) -> dict:
    from fp8linear import per_token_group_quant
    from fp8linear.backends import deepgemm_relaunch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    q, s = per_token_group_quant(x, 128, torch.float8_e4m3fn, scale_layout="col")
    pick = dg_pick(M, N, K, sms)

    def plan_of(tiles):
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        plan = deepgemm_relaunch.run_with_tiles(tiles, q, s, weight, wsi, y)
        if isinstance(plan, str):
            raise RuntimeError(plan)
        return plan

    def launch(plan):
        return lambda: torch.ops.fp8linear.deepgemm_gemm(q, s, weight, wsi, *plan)

    base_plan = plan_of(pick)
    base_y = launch(base_plan)()
    timed = {pick: bench_linear.bench_us(launch(base_plan), rep_ms=rep_ms)}
    seen = {base_plan}  # the two SM rules often give the same grid: time each launch once
    refused = []
    for tiles in tiles_list:
        if tiles in timed:
            continue
        try:
            plan = plan_of(tiles)
        except Exception as exc:  # noqa: BLE001 - report and go on
            refused.append(f"{tiles.label()}: {type(exc).__name__}: {exc}")
            continue
        if plan in seen:
            continue
        seen.add(plan)
        if not torch.equal(launch(plan)(), base_y):
            refused.append(f"{tiles.label()}: output differs from DeepGEMM's pick")
            continue
        timed[tiles] = bench_linear.bench_us(launch(plan), rep_ms=rep_ms)
    best = min(timed, key=timed.get)
    row = {"N": N, "K": K, "M_max": M, "tiles": None, "dg_pick": pick.as_row(), "candidates": len(timed),
           "refused": refused}
    if best != pick:
        us = bench_linear.bench_rounds({t: launch(plan_of(t)) for t in (pick, best)}, 3, rep_ms)
        row.update(us=round(us[best], 2), dg_pick_us=round(us[pick], 2))
        if us[pick] >= us[best] * (1 + min_gain):
            row["tiles"] = best.as_row()
    else:
        row.update(us=round(timed[pick], 2), dg_pick_us=round(timed[pick], 2))
    row["runner_up"] = sorted(((round(v, 2), t.label()) for t, v in timed.items()))[:3]
    return row


def write_rows(path: str, head: str, rows: list, min_gain: float) -> None:
    """Merge rows into the table at path: rows of other cards, shapes and buckets stay; a bucket measured again
    replaces its row, and only rows with tiles are written (a bucket without a row keeps DeepGEMM's pick,
    so a row that kept it would never be read; the run prints every bucket's pick and time)."""
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault("_comment", "Measured by scripts/tune_deepgemm.py, keyed by torch.cuda.get_device_name(); "
                                 "see fp8linear/backends/deepgemm_tiles.py.")
    card = torch.cuda.get_device_name()
    entry = table.get(card) if isinstance(table.get(card), dict) else {}
    new_keys = {(r["N"], r["K"], r["M_max"]) for r in rows}
    kept = [r for r in entry.get("rows", []) if (r["N"], r["K"], r["M_max"]) not in new_keys]
    merged = sorted((r for r in kept + rows if r.get("tiles") is not None), key=lambda r: (r["N"], r["K"], r["M_max"]))
    table[card] = {"meta": {"header": head, "date": datetime.date.today().isoformat(), "min_gain": min_gain},
                   "rows": merged}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    from fp8linear.backends import deepgemm, deepgemm_tiles
    from fp8linear.weights import quantize_weight_blockwise

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_linear.model_shapes.add_shape_arguments(ap)
    ap.add_argument("--M", type=int, nargs="+", default=list(DEFAULT_M),
                    help=f"bucket bounds, each one of auto.M_BUCKETS (default {list(DEFAULT_M)})")
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--min-gain", type=float, default=0.03, help="keep other tiles only this much faster")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc builds")
    ap.add_argument("--out", help=f"table to update (default {deepgemm_tiles.table_path()})")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("tune_deepgemm.py needs a CUDA GPU (none found): the table is per card.", file=sys.stderr)
        return 2
    why = deepgemm.unsupported_reason(4096, 4096, 4096, torch.float8_e4m3fn, torch.device("cuda"))
    if why is None and deepgemm.api_name() != "legacy":
        why = f"tiles apply to DeepGEMM's legacy API; this one is {deepgemm.api_name()!r}"
    if why is not None:
        print(f"tune_deepgemm.py: DeepGEMM cannot be tuned here: {why}", file=sys.stderr)
        return 2
    bad = [M for M in args.M if M not in deepgemm_tiles.M_BUCKETS]
    if bad:
        ap.error(f"--M takes bucket bounds from {list(deepgemm_tiles.M_BUCKETS)}; got {bad}")
    shapes = bench_linear.model_shapes.shapes_from_args(ap, args, bench_linear.SHAPES)
    bad = [(N, K) for N, K in shapes if N % 64 or K % 128]
    if bad and not args.model:
        ap.error(f"DeepGEMM needs N % 64 == 0 and K % 128 == 0; got {bad}")
    if bad:  # a model's other layers go to other backends: tune the ones DeepGEMM can serve
        print(f"skipping {bad}: DeepGEMM needs N % 64 == 0 and K % 128 == 0", flush=True)
        shapes = [s for s in shapes if s not in bad]

    head = bench_linear.header()
    print(head, flush=True)
    path = args.out or str(deepgemm_tiles.table_path())
    commit = bench_linear.run_commit.commit()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    start = time.perf_counter()
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for N, K in shapes:
            per_m = {M: candidates(N, K, M, sms) for M in args.M}
            t0 = time.perf_counter()
            built = prebuild(N, K, [t for ts in per_m.values() for t in ts], args.jobs)
            errors = {k: e for k, e in built.items() if e}
            print(f"{N}x{K}: {len(built) - len(errors)} kernels built in {time.perf_counter() - t0:.0f}s"
                  + (f"; {len(errors)} failed: {sorted(errors.items())[:2]}" if errors else ""), flush=True)
            weight, wsi = quantize_weight_blockwise(
                torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, torch.float8_e4m3fn)
            for M in sorted(args.M):
                tiles_list = [t for t in per_m[M]
                              if (t.block_m, t.block_n, t.num_stages, t.multicast, t.multicast_on_a) not in errors]
                row = tune_bucket(M, N, K, tiles_list, weight, wsi, args.rep_ms, args.min_gain)
                row["commit"] = commit
                rows.append(row)
                pick = deepgemm_tiles.Tiles.from_row(row["dg_pick"]).label()
                chosen = deepgemm_tiles.Tiles.from_row(row["tiles"]).label() if row["tiles"] else "DeepGEMM's pick"
                print(f"  M={M}: DeepGEMM's pick {pick} {row['dg_pick_us']:.1f} us -> {chosen} {row['us']:.1f} us "
                      f"({row['dg_pick_us'] / row['us']:.3f}x; {row['candidates']} timed, "
                      f"{len(row['refused'])} refused)", flush=True)
                for line in row["refused"]:
                    print(f"    refused {line}")
            write_rows(path, head, rows, args.min_gain)  # after each shape: a cut-short run keeps its rows
    changed = sum(r["tiles"] is not None for r in rows)
    print(f"wrote {len(rows)} rows for {torch.cuda.get_device_name()!r} to {path} in {time.perf_counter() - start:.0f}s; "
          f"{changed} take other tiles than DeepGEMM's pick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
