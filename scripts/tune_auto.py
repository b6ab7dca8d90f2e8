"""Measure every FP8 backend per (M bucket, N, K) on this card and write `auto`'s table.

For each layer shape and each M in fp8linear.backends.auto.M_BUCKETS, times FP8Linear's forward
(quantization included) with each backend that can serve the shape, and bf16 F.linear, in one process
(bench_linear.bench_us: do_bench, L2 flushed). Writes, under torch.cuda.get_device_name(), one row per
(N, K, M bucket) with the fastest FP8 backend, all timings, and whether bf16 was faster (the issue's
"never slower than bf16" target: FP8Linear has no bf16 fallback, so such rows are reported, not fixed).
Rows of other cards in the file are kept. fp8 only: int8 has a single GEMM (triton).

    python scripts/tune_auto.py                  # bench_linear's layer shapes (~4 min on an H100)
    python scripts/tune_auto.py --quick          # 3 shapes
    python scripts/tune_auto.py --N 5120 --K 5120 --out /tmp/table.json
    python scripts/tune_auto.py --N 2112 --K 7168 --M 8 16   # re-measure two buckets; the others stay
    python scripts/tune_auto.py --model /path/to/model        # every layer shape of a model (its config)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import bench_linear  # noqa: E402  (scripts/ is not a package)


#: The pick is the fastest backend. Until DeepGEMM's calls launched from C++ (kernels/deepgemm_launch.cu),
#: DeepGEMM also had to beat cuBLASLt by 10% and by its 150 us of Python launch time, unless the GEMM was
#: long enough (350 us) to hide it: that launch cost more host time than an isolated do_bench timing
#: charges (322 vs 239 us per eager forward at M = 4096, N = K = 4096; scripts/profile_linear.py on the
#: H100, 2026-11-25), and at 2112x7168, M = 2048 the table had named DeepGEMM (78 us against cuBLASLt's 95)
#: where bench_linear then measured it at 0.63x bf16. With the C++ launch its host time is no longer the
#: larger one (docs/benchmarks.md), so the timings decide alone.
PICK_RULE = "the fastest"


def pick(us: dict) -> str:
    """The backend auto serves a bucket with, from that bucket's times (us per backend)."""
    return min(us, key=us.get)


def reselect(path: str) -> int:
    """Re-apply `pick` to every row of a table from its stored timings (no GPU needed)."""
    with open(path) as f:
        table = json.load(f)
    changed = 0
    for card, entry in table.items():
        if card.startswith("_") or not isinstance(entry, dict):
            continue
        for row in entry.get("rows", []):
            if isinstance(row.get("us"), dict) and row["us"]:
                new = pick(row["us"])
                changed += new != row["backend"]
                row["backend"] = new
                row["bf16_faster"] = row["bf16_us"] < row["us"][new]
        entry.setdefault("meta", {})["pick_rule"] = PICK_RULE
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"reselected {path}: {changed} rows changed")
    return 0


def merge_rows(old: list[dict], new: list[dict], whole_shapes: bool) -> list[dict]:
    """The card's rows after a tuning run. `whole_shapes` (every bucket measured): a measured (N, K) loses
    all its old fp8 rows, buckets that no backend served included. Otherwise (--M, some buckets): only the
    re-measured (N, K, M_max) rows are replaced and the shape's other buckets stay."""
    if whole_shapes:
        measured = {(r["N"], r["K"]) for r in new}
        kept = [r for r in old if r.get("dtype") != "e4m3" or (r.get("N"), r.get("K")) not in measured]
    else:
        measured = {(r["N"], r["K"], r["M_max"]) for r in new}
        kept = [r for r in old if r.get("dtype") != "e4m3" or (r.get("N"), r.get("K"), r.get("M_max")) not in measured]
    return kept + new


def tune_shape(N: int, K: int, Ms, names, rep_ms: float, rounds: int = 1) -> list[dict]:
    lin = bench_linear.make_layer(N, K)
    mods = bench_linear.layer_modules(lin, names)
    rows = []
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        fns, _ = bench_linear.layer_fns(lin, mods, [x], peers=False)  # bf16 and the backends serving M
        if len(fns) == 1:
            print(f"  {N}x{K} M={M}: no FP8 backend serves it; no row (auto falls back by availability)")
            continue
        timed = bench_linear.bench_rounds(fns, rounds, rep_ms, salt=hash((N, K, M)))
        bf16_us = timed.pop("bf16")
        us = {name: round(t, 2) for name, t in timed.items()}
        best = pick(us)
        rows.append(dict(dtype="e4m3", N=N, K=K, M_max=M, backend=best, us=us, bf16_us=round(bf16_us, 2),
                         bf16_faster=bf16_us < us[best]))
        flag = "  (bf16 faster)" if bf16_us < us[best] else ""
        print(f"  {N}x{K} M<={M}: {best} {us[best]:.1f} us vs bf16 {bf16_us:.1f} us{flag}", flush=True)
        x = fns = None  # free them before the next shape's
    mods = lin = None
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    from fp8linear.backends import auto

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes only")
    bench_linear.model_shapes.add_shape_arguments(ap)
    ap.add_argument("--M", type=int, nargs="+", help=f"bucket bounds (default {list(auto.M_BUCKETS)})")
    ap.add_argument("--backends", nargs="+", default=list(bench_linear.BACKENDS), choices=list(bench_linear.BACKENDS))
    ap.add_argument("--rep-ms", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over the backends per bucket (bench_linear.bench_rounds); the median is kept "
                         "(the lower middle one of an even number)")
    ap.add_argument("--out", help=f"table to update (default {auto.table_path()})")
    ap.add_argument("--reselect", action="store_true",
                    help="re-apply the pick rule to the table's stored timings and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.reselect:
        return reselect(args.out or str(auto.table_path()))

    if not torch.cuda.is_available():
        print("tune_auto.py needs a CUDA GPU (none found): the table is per card.", file=sys.stderr)
        return 2
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1; got {args.rounds}")
    shapes = bench_linear.model_shapes.shapes_from_args(
        ap, args, bench_linear.QUICK_SHAPES if args.quick else bench_linear.SHAPES)
    Ms = sorted(args.M or auto.M_BUCKETS)

    head = bench_linear.header()
    print(head, flush=True)
    start = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for N, K in shapes:
            rows += tune_shape(N, K, Ms, args.backends, args.rep_ms, args.rounds)
    commit = bench_linear.run_commit.commit()
    for row in rows:  # per row: a partial run keeps older rows, and the meta header names the last run only
        row["commit"] = commit

    path = args.out or str(auto.table_path())
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    card = torch.cuda.get_device_name()
    old = table.get(card, {}).get("rows", []) if isinstance(table.get(card), dict) else []
    old_meta = table.get(card, {}).get("meta", {}) if isinstance(table.get(card), dict) else {}
    buckets = Ms if args.M is None else sorted(set(old_meta.get("buckets", [])) | set(Ms))
    table[card] = {
        "meta": {"header": head, "date": datetime.date.today().isoformat(), "buckets": buckets,
                 "pick_rule": PICK_RULE},
        "rows": merge_rows(old, rows, whole_shapes=args.M is None),
    }
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    n_bf16 = sum(r["bf16_faster"] for r in rows)
    print(f"wrote {len(rows)} rows for {card!r} to {path} in {time.perf_counter() - start:.0f}s; "
          f"bf16 was faster in {n_bf16} of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
