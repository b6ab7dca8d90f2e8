"""Measure the Triton blockwise GEMM's tiles on this GPU and write them to its per-card table.

For each dtype (e4m3, int8) and M bucket, every candidate tile configuration runs the GEMM alone
(`triton_blockwise._gemm_impl` on pre-quantized operands, bench_linear.bench_us: do_bench, L2 flushed)
on each layer shape; a candidate's score is the geometric mean over the shapes of its time relative to
the built-in tiles' (`_default_config`). A candidate whose output differs from the built-in tiles' in a
single bit is refused, as is one Triton cannot build (too much shared memory, too many registers). The
best is timed again beside the built-in tiles in three rounds (bench_linear.bench_rounds) and kept when
its geometric mean wins by --min-gain; otherwise the bucket keeps the built-in tiles. Rows of other cards
are kept; this card's rows for the tuned dtypes are replaced.

The Triton GEMM serves int8 layers from small_m's M up to M = 1024 (at any M on layers narrower than 2048,
and everywhere off compute capability 9.0, where sm90 cannot) and fp8 shapes DeepGEMM and cuBLASLt refuse,
so bf16's time on each shape is printed beside it.

    python scripts/tune_triton.py                                  # both dtypes, the default shapes
    python scripts/tune_triton.py --dtype int8 --M 4096 --out /tmp/triton_configs.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: bench_linear, run_commit

import bench_linear  # noqa: E402
import model_shapes  # noqa: E402
import run_commit  # noqa: E402
from fp8linear.backends import card_tables  # noqa: E402

# Llama-3-8B's q/o, k/v, gate_up and down projections, DeepSeek-V3's 7168^2 and its narrow 2112 x 7168.
SHAPES = [(4096, 4096), (1024, 4096), (28672, 4096), (4096, 14336), (7168, 7168), (2112, 7168)]
M_BUCKETS = [16, 64, 256, 1024, 4096, 16384]
DTYPES = {key: dtype for dtype, key in card_tables.DTYPE_KEYS.items()}  # the table rows' "dtype" names


def candidates(M: int) -> list[dict]:
    """The tile configurations tried for an M bucket: narrow row tiles and more programs at small M,
    128- and 256-row tiles with 4 or 8 warps and 3-5 stages from M = 1024."""
    if M <= 16:
        grid = dict(BLOCK_M=[16], BLOCK_N=[32, 64, 128], GROUP_M=[1], num_warps=[4], num_stages=[3, 4, 5])
    elif M <= 64:
        grid = dict(BLOCK_M=[32, 64], BLOCK_N=[64, 128], GROUP_M=[1, 8], num_warps=[4], num_stages=[3, 4])
    elif M <= 256:
        grid = dict(BLOCK_M=[64, 128], BLOCK_N=[64, 128, 256], GROUP_M=[8], num_warps=[4, 8], num_stages=[3, 4])
    else:
        grid = dict(BLOCK_M=[128, 256], BLOCK_N=[128, 256], GROUP_M=[8], num_warps=[4, 8], num_stages=[3, 4, 5])
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def label(cfg: dict) -> str:
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} g{cfg['GROUP_M']} w{cfg['num_warps']} s{cfg['num_stages']}"


def operands(M: int, N: int, K: int, dtype: torch.dtype):
    """Quantized x and weights of a random layer (as FP8Linear holds them), and bf16's x and weight."""
    from fp8linear import FP8Linear, per_token_group_quant

    lin = bench_linear.make_layer(N, K)
    layer = FP8Linear.from_linear(lin, dtype=dtype, backend="triton")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    q, s = per_token_group_quant(x, 128, dtype, scale_layout="row")
    return q, s, layer.weight, layer.weight_scale_inv, x, lin.weight


def tune_bucket(M: int, dtype: torch.dtype, shapes: list, rep_ms: float, min_gain: float) -> "tuple[dict | None, str]":
    """The kept configuration for one (dtype, M bucket), or None to keep the built-in tiles; and a report."""
    from fp8linear.backends import triton_blockwise as tb

    ops = {shape: operands(M, *shape, dtype) for shape in shapes}
    default = {shape: tb._default_config(M, shape[0]) for shape in shapes}

    def run(shape, cfg):
        q, s, w, ws, _, _ = ops[shape]
        return lambda: tb._gemm_impl(q, s, w, ws, None, torch.bfloat16, config=cfg)

    base_out = {shape: run(shape, default[shape])() for shape in shapes}
    base_us = {shape: bench_linear.bench_us(run(shape, default[shape]), rep_ms=rep_ms) for shape in shapes}
    bf16_us = {shape: bench_linear.bench_us(lambda x=ops[shape][4], w=ops[shape][5]: torch.nn.functional.linear(x, w),
                                            rep_ms=rep_ms) for shape in shapes}
    scores, refused = [], []
    for cfg in candidates(M):
        rel = []
        try:
            for shape in shapes:
                out = run(shape, cfg)()
                if not torch.equal(out.view(torch.int16), base_out[shape].view(torch.int16)):
                    refused.append(f"{label(cfg)}: output differs at {shape[0]}x{shape[1]}")
                    break
                rel.append(bench_linear.bench_us(run(shape, cfg), rep_ms=rep_ms) / base_us[shape])
        except Exception as exc:  # noqa: BLE001 - Triton's OutOfResources and compile errors
            refused.append(f"{label(cfg)}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        if len(rel) == len(shapes):
            scores.append((statistics.geometric_mean(rel), cfg))
    lines = [f"  M={M}: built-in tiles " + ", ".join(
        f"{n}x{k} {base_us[(n, k)]:.1f} us (bf16 {bf16_us[(n, k)]:.1f}, {bf16_us[(n, k)] / base_us[(n, k)]:.2f}x)"
        for n, k in shapes)]
    if not scores:
        return None, "\n".join(lines + [f"    no candidate ran ({len(refused)} refused)"])
    scores.sort(key=lambda t: t[0])
    best = scores[0][1]
    lines.append("    fastest: " + ", ".join(f"{label(c)} {r:.3f}" for r, c in scores[:3])
                 + f" (geomean time / built-in; {len(scores)} timed, {len(refused)} refused)")
    # Confirm beside the built-in tiles over rounds in shuffled order, per shape.
    confirm = []
    for shape in shapes:
        got = bench_linear.bench_rounds({"base": run(shape, default[shape]), "best": run(shape, best)}, 3, rep_ms)
        confirm.append(got["best"] / got["base"])
    gain = 1.0 / statistics.geometric_mean(confirm)
    kept = gain >= 1.0 + min_gain
    per_shape = ", ".join(
        f"{n}x{k} {bf16_us[(n, k)] / (base_us[(n, k)] * r):.2f}x bf16" for (n, k), r in zip(shapes, confirm))
    lines.append(f"    {label(best)}: {gain:.3f}x the built-in tiles over three rounds -> "
                 f"{'kept' if kept else 'built-in kept'} ({per_shape})")
    for line in refused[:5]:
        lines.append(f"    refused {line}")
    return (best if kept else None), "\n".join(lines)


def main(argv: "list[str] | None" = None) -> int:
    from fp8linear.backends import triton_blockwise as tb

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--M", type=int, nargs="+", default=M_BUCKETS, help="bucket upper bounds (M_max), one M each")
    model_shapes.add_shape_arguments(ap)
    ap.add_argument("--rep-ms", type=float, default=10.0, help="do_bench measuring time per timing")
    ap.add_argument("--min-gain", type=float, default=0.03, help="keep a configuration only this much faster")
    ap.add_argument("--out", help=f"the table to update (default: the shipped {tb.TABLE_FILE})")
    args = ap.parse_args(argv)
    shapes = model_shapes.shapes_from_args(ap, args, SHAPES)
    if any(k % 128 for _, k in shapes):
        ap.error(f"--K values must be multiples of 128 (the quantization group; with --model, every layer's K); "
                 f"got {sorted({k for _, k in shapes})}")
    if any(m < 1 for m in args.M):
        ap.error(f"--M values must be >= 1; got {args.M}")
    if args.rep_ms <= 0 or args.min_gain < 0:
        ap.error(f"--rep-ms must be > 0 and --min-gain >= 0; got {args.rep_ms} and {args.min_gain}")
    if not torch.cuda.is_available():
        print("tune_triton needs a CUDA GPU")
        return 2
    reason = tb.unsupported_reason(1, 128, 128, torch.int8, torch.device("cuda"))
    if reason is not None:
        print(f"tune_triton: the Triton backend cannot run here: {reason}")
        return 2

    card = torch.cuda.get_device_name()
    commit = run_commit.commit()
    print(f"card: {card} | date: {datetime.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} "
          f"| triton {__import__('triton').__version__} | commit {commit}", flush=True)
    rows = []
    for name in args.dtype:
        print(f"{name}: shapes {', '.join(f'{n}x{k}' for n, k in shapes)}", flush=True)
        for M in sorted(args.M):
            cfg, report = tune_bucket(M, DTYPES[name], shapes, args.rep_ms, args.min_gain)
            print(report, flush=True)
            rows.append({"dtype": name, "M_max": M, "config": cfg, "commit": commit})
            torch.cuda.empty_cache()
    path = args.out or str(tb.__file__).replace("triton_blockwise.py", tb.TABLE_FILE)
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    entry = table.get(card, {"meta": {}, "rows": []})
    kept_rows = [r for r in entry.get("rows", []) if r.get("dtype") not in args.dtype]
    entry["rows"] = kept_rows + rows
    entry["meta"] = {"date": datetime.date.today().isoformat(), "commit": commit,
                     "shapes": [f"{n}x{k}" for n, k in shapes], "min_gain": args.min_gain}
    table[card] = entry
    table.setdefault("_comment", "Triton blockwise GEMM tiles per card, dtype and M bucket (scripts/tune_triton.py); "
                                 "a null config keeps the built-in tiles for that bucket")
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(rows)} rows for {card} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
