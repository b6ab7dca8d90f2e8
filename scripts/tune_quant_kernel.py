"""Re-tune the quant kernel's compile-time knobs on this GPU: build variants in parallel, time each.

    python3 scripts/tune_quant_kernel.py [--out DIR] [--variants NAME ...]

Each variant is the kernel compiled with other `-DFP8L_*` values (kernels/per_token_group_quant.cu,
"Tuning knobs") through FP8LINEAR_NVCC_EXTRA, in its own cache folder; all builds run at once, then
scripts/bench_quant.py times each variant in its own process (one op registration per process) on a
few shapes, with SGLang's kernels timed beside the first variant as the yardstick. Prints one table:
microseconds per variant and shape. GPU only.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# name -> extra nvcc flags. "default" is what the source ships.
VARIANTS = {
    "default": "",
    "loads8": "-DFP8L_LOADS_PER_THREAD=8",
    "nocap4": "-DFP8L_MAX_WAVES=0",
    "nocap2": "-DFP8L_MAX_WAVES=0 -DFP8L_LOADS_PER_THREAD=2",
    "nocap8": "-DFP8L_MAX_WAVES=0 -DFP8L_LOADS_PER_THREAD=8",
    "waves2": "-DFP8L_MAX_WAVES=2",
    "t512": "-DFP8L_THREADS=512",
    "t128nocap": "-DFP8L_THREADS=128 -DFP8L_MAX_WAVES=0",
}
SHAPES_M = ["1", "16", "128", "1024", "4096", "16384"]
SHAPES_K = ["4096", "7168"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--layouts", nargs="+", default=["row", "col", "ue8m0_packed"])
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("tune_quant_kernel.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cache = pathlib.Path(os.environ.get("FP8LINEAR_TUNE_CACHE", "/tmp/fp8linear-tune"))

    def env_for(name: str) -> dict:
        env = dict(os.environ)
        env["FP8LINEAR_CACHE"] = str(base_cache / name)
        env["FP8LINEAR_NVCC_EXTRA"] = VARIANTS[name]
        env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}"
        return env

    t0 = time.time()
    builds = {
        name: subprocess.Popen(
            [sys.executable, "-c", "from fp8linear import _build; _build.ensure_loaded()"],
            env=env_for(name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in args.variants
    }
    failed = []
    for name, proc in builds.items():
        log, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(name)
            print(f"build {name} failed:\n{log[-2000:]}")
    print(f"# built {len(builds) - len(failed)} variants in {time.time() - t0:.0f}s", flush=True)

    results: dict[str, dict[tuple, float]] = {}
    for i, name in enumerate(n for n in args.variants if n not in failed):
        csv_path = out / f"tune-{name}.csv"
        cmd = [sys.executable, str(REPO / "scripts" / "bench_quant.py"), "--M", *SHAPES_M, "--K", *SHAPES_K,
               "--dtypes", "fp8", "--layouts", *args.layouts, "--no-torch", "--rep-ms", "25",
               "--out", str(csv_path)]
        if i > 0:
            cmd.append("--no-peers")
        t1 = time.time()
        proc = subprocess.run(cmd, env=env_for(name), capture_output=True, text=True)
        (out / f"tune-{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"bench {name} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-1500:]}")
            continue
        rows = {}
        with open(csv_path) as f:
            for r in csv.DictReader(f):
                key = (r["layout"], int(r["M"]), int(r["K"]))
                provider = r["provider"] if r["provider"] != "ours" else name
                rows.setdefault(provider, {})[key] = float(r["us"])
                if r["provider"] == "ours":
                    rows.setdefault("graph:" + name, {})[key] = float(r["graph_us"] or "nan")
        results.update(rows)
        print(f"# {name}: {time.time() - t1:.0f}s", flush=True)

    keys = sorted({k for v in results.values() for k in v})
    names = list(results)
    print("\nlayout        M      K  " + " ".join(f"{n[:10]:>10}" for n in names))
    for k in keys:
        print(f"{k[0]:12s} {k[1]:5d} {k[2]:6d}  " + " ".join(f"{results[n].get(k, float('nan')):10.2f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
