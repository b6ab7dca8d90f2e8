"""Summarize scripts/kernel_microbench.sh's CSV: one markdown table, microseconds per variant and shape.

    python3 scripts/kernel_microbench_summary.py kernel_microbench.csv

Rows are (kernel, layout, M, K); columns are the variants' median microseconds, then the default
variant's time as a percentage of the copy and stream baselines timed in its own binary (the median of
the three interleaved timings of each), the spread of those copy timings, and the empty kernel's time
(the harness's floor). A last column names the variants whose output hash differs from the default's:
a variant that only tunes must not change a bit. Plain Python, no torch.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict


def main(argv: "list[str] | None" = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("variant") and r["variant"] != "variant"]
    if not rows:
        print(f"error: no measurements in {args[0]}", file=sys.stderr)
        return 1

    base = defaultdict(list)  # (variant, kind, M, K) -> [us]
    kern = {}  # (kernel, layout, M, K) -> {variant: (us, bytes, hash)}
    variants = []
    for r in rows:
        v = r["variant"]
        if v not in variants:
            variants.append(v)
        shape = (int(r["M"]), int(r["K"]))
        kind = r["kernel"].rsplit("_r", 1)[0]
        if kind in ("copy", "stream", "empty"):
            base[(v, kind) + shape].append(float(r["us"]))
        else:
            kern.setdefault((r["kernel"], r["layout"]) + shape, {})[v] = (float(r["us"]), float(r["bytes"]), r["checksum"])
    ref = "default" if "default" in variants else variants[0]
    variants = [ref] + sorted(v for v in variants if v != ref)

    head = ["kernel", "layout", "M", "K", "MB"] + [f"{v} us" for v in variants]
    head += [f"{ref} % copy", f"{ref} % stream", "copy us (3 timings)", "empty us", "hash differs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (kernel, layout, M, K), by_v in sorted(kern.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        cells = [kernel, layout, str(M), str(K)]
        some = next(iter(by_v.values()))
        cells.append(f"{some[1] / 1e6:.1f}")
        best = min(t[0] for t in by_v.values())
        for v in variants:
            t = by_v.get(v)
            cells.append("-" if t is None else (f"**{t[0]:.1f}**" if t[0] == best else f"{t[0]:.1f}"))
        mine = by_v.get(ref)
        copies = base.get((ref, "copy", M, K), [])
        streams = base.get((ref, "stream", M, K), [])
        empties = base.get((ref, "empty", M, K), [])
        if mine and copies:
            cells.append(f"{100 * statistics.median(copies) / mine[0]:.0f}")
        else:
            cells.append("-")
        cells.append(f"{100 * statistics.median(streams) / mine[0]:.0f}" if mine and streams else "-")
        cells.append(" / ".join(f"{c:.1f}" for c in copies) or "-")
        cells.append(f"{statistics.median(empties):.1f}" if empties else "-")
        differs = [v for v, t in by_v.items() if mine and t[2] != mine[2]]
        cells.append(", ".join(sorted(differs)) or "none")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
