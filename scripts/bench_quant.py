"""Time per_token_group_quant on the GPU beside a device copy, SGLang's kernels and torch.compile.

    python3 scripts/bench_quant.py [--quick] [--M 1 4096] [--K 7168] [--no-peers] [--out bench_quant.csv]

Input bf16 [M, K], group size 128, output fp8 e4m3 (layouts row, col, ue8m0_packed) and int8 (row, col).

What each column means (one process, one card; a number compares only within one run):
- bytes moved = input read (2 M K) + q written (M K) + scales written (4 M G for row/col with
  G = K / 128, 4 M ceil(G / 4) for ue8m0_packed; padding rows not counted).
- `us`: median kernel time in microseconds from triton.testing.do_bench (return_mode="median"), which
  zeroes a 256 MB buffer before every rep, so the 50 MB L2 is flushed; inputs additionally rotate among
  up to 8 buffers when one is smaller than 4 x L2. A call includes allocating its outputs, as callers do.
  Every provider, ours and the peers alike, is timed `--repeats` times (default 3) and the median kept:
  single timings at small M moved between 4 and 36 us for one kernel in the 2026-11-25 run.
- `TB/s` = bytes moved / time. `%copy` = the time of a device-to-device copy of the same traffic (a
  uint8 buffer of bytes/2 copied into another: bytes/2 read + bytes/2 written), timed the same way in the
  same run (the median of three timings), divided by the kernel's time.
- the header's `floor` line: an empty kernel (torch.cuda._sleep(0)) timed the same way, the least any
  launch measures in this harness (it dominates every time at M <= 128).
- peers: SGLang 0.5.23's `jit` (its default CUDA kernel), `v2` and `triton` kernels from .gpu/sgl
  (see GPU.md "Timing against SGLang"), and `torch`, fp8linear.reference under torch.compile
  (dynamic shapes). `x best` = the fastest peer's time / ours (> 1: ours is faster).
- `graph`: for M <= 128, per-launch time of 100 launches captured in one CUDA graph, replayed (inputs
  stay in L2 here, as in a serving step): the launch overhead a serving engine sees.

Before timing, each shape's output is checked bit for bit against fp8linear.reference on the first rows
(on CPU); peers' outputs are checked for shape and dtype only (their numerics differ: GPU.md).
Everything runs under torch.inference_mode(), as SGLang serves.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import math
import pathlib
import statistics
import sys
import time
import traceback

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit

import run_commit  # noqa: E402

FP8, INT8 = torch.float8_e4m3fn, torch.int8
GROUP = 128
L2_BYTES = 50 * 2**20
FULL_M = (1, 16, 128, 1024, 4096, 16384)
FULL_K = (2048, 4096, 7168, 16384)
QUICK_M = (1, 128, 4096)
QUICK_K = (4096, 7168)
#: (output dtype, scale layout) in table order; ue8m0_packed is fp8 only.
CONFIGS = ((FP8, "row"), (FP8, "col"), (FP8, "ue8m0_packed"), (INT8, "row"), (INT8, "col"))
PEERS = ("jit", "v2", "triton", "torch")
GRAPH_MAX_M = 128
GRAPH_LAUNCHES = 100
CHECK_ROWS = 32
#: Where inputs live; only a dry run of the reporting on a CPU machine changes it.
DEVICE = "cuda"


def dtype_name(dtype: torch.dtype) -> str:
    return "fp8" if dtype == FP8 else "int8"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def _events_bench(fn, warmup_ms: float, rep_ms: float) -> float:
    """Fallback when triton is missing: CUDA events around each call, L2 flushed before it; median ms."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


class Timer:
    """Median microseconds of fn(), L2 flushed before each rep; modest rep counts keep the grid short."""

    def __init__(self, warmup_ms: float = 10, rep_ms: float = 40):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        try:
            from triton.testing import do_bench

            self._do_bench = do_bench
            self.how = "triton.testing.do_bench(return_mode='median'), L2 flushed per rep"
        except ImportError:
            self._do_bench = None
            self.how = "CUDA events, median, L2 flushed per rep (triton not importable)"

    def us(self, fn) -> float:
        if self._do_bench is not None:
            ms = self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        else:
            ms = _events_bench(fn, self.warmup_ms, self.rep_ms)
        return 1e3 * ms


def host_generator(seed: int = 0) -> torch.Generator:
    """Inputs are drawn on the host and copied over: a peer whose CUDA-graph capture fails (reported, not
    fatal) can leave the CUDA generator inside a capture that never ended, after which every draw from it
    raises ("Offset increment outside graph capture encountered unexpectedly", torch 2.11, H100)."""
    return torch.Generator().manual_seed(seed)


def copy_us(timer: Timer, nbytes: int) -> float:
    """A device-to-device copy moving `nbytes` in total (half read, half written): the median of three
    timings, since one copy timing at ~50 MB moved by up to 20% between calls (19.0 vs 22.8 us for 50.5 and
    50.9 MB in the 2026-11-25 run)."""
    src = torch.randint(0, 256, (max(nbytes // 2, 16),), dtype=torch.uint8, generator=host_generator()).to(DEVICE)
    dst = torch.empty_like(src)
    return statistics.median(timer.us(lambda: dst.copy_(src)) for _ in range(3))


def graph_us(fn, launches: int = GRAPH_LAUNCHES, replays: int = 10) -> float:
    """Per-launch microseconds of `launches` calls of fn captured in one CUDA graph (median of replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graphs advises
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    del graph
    return statistics.median(times)


class Rotating:
    """Calls fn on the next of several equal inputs each time, so repeated calls do not hit in L2."""

    def __init__(self, x: torch.Tensor):
        n = 1 if x.nbytes >= 4 * L2_BYTES else min(8, math.ceil(4 * L2_BYTES / max(x.nbytes, 1)))
        self.xs = [x] + [x.clone() for _ in range(n - 1)]
        self.i = 0

    def __call__(self, fn):
        def call():
            self.i = (self.i + 1) % len(self.xs)
            return fn(self.xs[self.i])

        return call


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------

def moved_bytes(M: int, K: int, layout: str) -> int:
    G = K // GROUP
    scale_elems = M * ((G + 3) // 4 if layout == "ue8m0_packed" else G)
    return 2 * M * K + M * K + 4 * scale_elems


def expected_scale_shape(M: int, K: int, layout: str) -> tuple[int, int]:
    G = K // GROUP
    return (M, (G + 3) // 4) if layout == "ue8m0_packed" else (M, G)


def make_torch_peer(dtype: torch.dtype, layout: str):
    """fp8linear.reference under torch.compile, writing scales in `layout` (one compile per config)."""
    from fp8linear.layouts import empty_scales, pack_ue8m0
    from fp8linear.reference import per_token_group_quant_reference

    pow2 = layout == "ue8m0_packed"

    def quant(x):
        q, s = per_token_group_quant_reference(x, GROUP, dtype, pow2)
        if layout == "row":
            return q, s
        out = empty_scales((), x.shape[0], x.shape[1] // GROUP, layout, x.device)
        out.copy_(pack_ue8m0(s) if pow2 else s)
        return q, out

    return torch.compile(quant, dynamic=True)


def setup_peers(use_sgl: bool, use_torch: bool, Ks, dtypes, layouts) -> tuple[dict, dict]:
    """({peer name: quant(x, dtype, layout) function}, {peer name: why it is missing})."""
    peers, missing = {}, {}
    if use_sgl:
        sgl_dir = REPO / ".gpu" / "sgl"
        if not (sgl_dir / "sgl_peer.py").is_file():
            for k in ("jit", "v2", "triton"):
                missing[k] = f"{sgl_dir}/sgl_peer.py not found (make it with ../shared/tools/get-sglang-peer .gpu/sgl)"
        else:
            sys.path.insert(0, str(sgl_dir))
            try:
                import sgl_peer

                avail = sgl_peer.setup()
                t = time.time()
                built = sgl_peer.prebuild(K=sorted(set(Ks)), dtypes=tuple(dtypes), scale_layouts=tuple(layouts))
                failed = {c: e for c, e in built.items() if e}
                print(f"# sglang {sgl_peer.SGLANG_VERSION} peers prebuilt in {time.time() - t:.0f}s"
                      + (f"; {len(failed)} variant(s) failed, first: {next(iter(failed.values()))[:300]}" if failed else ""),
                      flush=True)
                for k, why in avail.items():
                    if why is None:
                        peers[k] = (lambda name: lambda x, dtype, layout: sgl_peer.quant(name, x, GROUP, dtype, scale_layout=layout))(k)
                    else:
                        missing[k] = why
            except Exception as exc:  # noqa: BLE001 - the benchmark goes on without them
                for k in ("jit", "v2", "triton"):
                    missing.setdefault(k, f"sgl_peer setup failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    if use_torch:
        compiled = {}

        def torch_quant(x, dtype, layout):
            key = (dtype, layout)
            if key not in compiled:
                compiled[key] = make_torch_peer(dtype, layout)
            return compiled[key](x)

        peers["torch"] = torch_quant
    return peers, missing


def check_ours(x, q, s, dtype, layout) -> str:
    """'ok', or what differs from fp8linear.reference on the first CHECK_ROWS rows (bit for bit, on CPU)."""
    from fp8linear.layouts import scales_to_row
    from fp8linear.reference import per_token_group_quant_reference

    rows = min(x.shape[0], CHECK_ROWS)
    G = x.shape[1] // GROUP
    pow2 = layout == "ue8m0_packed"
    q_ref, s_ref = per_token_group_quant_reference(x[:rows].cpu(), GROUP, dtype, pow2)
    q_got = q[:rows].cpu()
    s_got = scales_to_row(s[:rows].cpu(), G, layout)
    if q_got.shape != q_ref.shape or s_got.shape != s_ref.shape:
        return f"MISMATCH shapes q {list(q_got.shape)} s {list(s_got.shape)}"
    dq = (q_got.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
    ds = (s_got.view(torch.int32) != s_ref.view(torch.int32)).sum().item()
    return "ok" if dq == 0 and ds == 0 else f"MISMATCH {dq} q bytes, {ds} scales in {rows} rows"


def check_peer(x, out, dtype, layout) -> str:
    q, s = out
    M, K = x.shape
    want_s = expected_scale_shape(M, K, layout)
    if tuple(q.shape) != (M, K) or q.dtype != dtype or tuple(s.shape) != want_s:
        return f"shape? q {list(q.shape)} {q.dtype} s {list(s.shape)} (want {list(want_s)})"
    return "ok"


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def header(timer: Timer) -> list[str]:
    props = torch.cuda.get_device_properties(0)
    commit = run_commit.commit(12)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        f"card: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
        f"cc {props.major}.{props.minor}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}",
        f"commit: {commit}",
        f"timing: {timer.how}; bf16 input, group {GROUP}",
    ]


def run(args) -> int:
    import fp8linear
    from fp8linear import _build

    deadline = time.time() + args.budget_s  # counts the kernel build, peer builds and compiles too
    timer = Timer(args.warmup_ms, args.rep_ms)
    lines = header(timer)
    floor_us = statistics.median(timer.us(lambda: torch.cuda._sleep(0)) for _ in range(3))
    lines.append(f"floor: an empty kernel (torch.cuda._sleep(0)) measures {floor_us:.2f} us in this harness")
    for line in lines:
        print("# " + line, flush=True)

    t = time.time()
    try:
        _build.ensure_loaded()
    except Exception as exc:  # noqa: BLE001 - nothing of ours to time
        print(f"error: building fp8linear's kernel failed, nothing to time: {exc}", file=sys.stderr)
        return 1
    print(f"# fp8linear kernel loaded in {time.time() - t:.1f}s", flush=True)

    configs = [(d, lay) for d, lay in CONFIGS if dtype_name(d) in args.dtypes and lay in args.layouts]
    Ms = args.M or (QUICK_M if args.quick else FULL_M)
    Ks = args.K or (QUICK_K if args.quick else FULL_K)
    bad_K = [K for K in Ks if K % GROUP]
    if bad_K:
        print(f"error: every K must be a multiple of {GROUP}; got {bad_K}", file=sys.stderr)
        return 2
    peers, missing = setup_peers(not args.no_peers, not args.no_peers and not args.no_torch, Ks,
                                 {d for d, _ in configs}, {lay for _, lay in configs})
    for name, why in missing.items():
        print(f"# peer {name} not timed: {why}", flush=True)

    results = []  # dicts, one per (shape, config, provider)
    copy_cache = {}
    mismatches = 0
    torch.manual_seed(0)
    stopped = False
    with torch.inference_mode():
        for M in Ms:
            for K in Ks:
                if time.time() > deadline:
                    stopped = True
                    break
                # Never zeros: normal values with a per-row magnitude spread, as activations have.
                g = host_generator(M * 100003 + K)
                x = (torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-4, 5, (M, 1), generator=g))).to(
                    DEVICE, torch.bfloat16)
                rot = Rotating(x)
                for dtype, layout in configs:
                    nbytes = moved_bytes(M, K, layout)
                    if nbytes not in copy_cache:
                        copy_cache[nbytes] = copy_us(timer, nbytes)
                    row = dict(dtype=dtype_name(dtype), layout=layout, M=M, K=K, bytes=nbytes,
                               copy_us=copy_cache[nbytes])

                    def ours(xx, dtype=dtype, layout=layout):
                        return fp8linear.per_token_group_quant(xx, GROUP, dtype, scale_layout=layout)

                    entries = {}
                    try:
                        check = check_ours(x, *ours(x), dtype, layout)
                    except Exception as exc:  # noqa: BLE001 - a row of the report
                        check = f"error {type(exc).__name__}: {str(exc)[:200]}"
                    mismatches += check != "ok"
                    entries["ours"] = dict(fn=ours, check=check)
                    for name, quant in peers.items():
                        try:
                            fn = (lambda q: lambda xx, dtype=dtype, layout=layout: q(xx, dtype, layout))(quant)
                            entries[name] = dict(fn=fn, check=check_peer(x, fn(x), dtype, layout))
                        except NotImplementedError:
                            continue  # this peer lacks this layout or dtype (sgl_peer.unsupported says why)
                        except Exception as exc:  # noqa: BLE001
                            entries[name] = dict(fn=None, check=f"error {type(exc).__name__}: {str(exc)[:160]}")
                    for name, e in entries.items():
                        us = graph = float("nan")
                        if e["fn"] is not None and not e["check"].startswith("error"):
                            try:
                                fn = rot(e["fn"])
                                us = statistics.median(timer.us(fn) for _ in range(args.repeats))
                            except Exception as exc:  # noqa: BLE001
                                e["check"] = f"error timing {type(exc).__name__}: {str(exc)[:160]}"
                            if M <= GRAPH_MAX_M and not args.no_graph:
                                try:
                                    graph = graph_us(lambda f=e["fn"]: f(x))
                                except Exception as exc:  # noqa: BLE001 - capture is optional for peers
                                    e["graph_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        results.append(dict(row, provider=name, us=us, graph_us=graph, check=e["check"],
                                            graph_error=e.get("graph_error", "")))
                    print(progress_line(results, row), flush=True)
                x = rot = None  # free them (and empty the cache) before the next shape's
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            if stopped:
                break
    if stopped:
        print(f"# stopped early: the --budget-s of {args.budget_s:.0f}s ran out; the tables hold what was timed",
              flush=True)

    tables = render_tables(results)
    print()
    print(tables)
    notes = sorted({f"{r['provider']} {r['dtype']} {r['layout']} M={r['M']} K={r['K']}: {r['check']}"
                    for r in results if r["check"] != "ok"})
    graph_notes = sorted({f"{r['provider']} {r['dtype']} {r['layout']}: graph capture failed: {r['graph_error']}"
                          for r in results if r["graph_error"]})
    for n in notes + graph_notes[:10]:
        print("! " + n)
    if args.out:
        write_outputs(args.out, lines, results, tables)
    if mismatches:
        print(f"FAIL: {mismatches} shape(s) where our output differs from the reference", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------

def _fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _rows_of(results, dtype, layout, M, K):
    return {r["provider"]: r for r in results if (r["dtype"], r["layout"], r["M"], r["K"]) == (dtype, layout, M, K)}


def _summary(rows: dict) -> dict:
    """Derived numbers for one shape and config: ours' TB/s and %copy, the best peer and the ratio."""
    ours = rows.get("ours", {})
    any_row = next(iter(rows.values()))
    nbytes, copy_time = any_row["bytes"], any_row["copy_us"]
    us = ours.get("us", float("nan"))
    peer_us = {p: rows[p]["us"] for p in PEERS if p in rows and not math.isnan(rows[p]["us"])}
    best = min(peer_us, key=peer_us.get) if peer_us else None
    peer_graph = {p: rows[p]["graph_us"] for p in PEERS if p in rows and not math.isnan(rows[p]["graph_us"])}
    best_graph = min(peer_graph, key=peer_graph.get) if peer_graph else None
    return dict(
        bytes=nbytes, copy_us=copy_time, us=us, tbps=nbytes / us / 1e6 if us == us else float("nan"),
        pct=100 * copy_time / us if us == us else float("nan"), peer_us=peer_us, best=best,
        ratio=peer_us[best] / us if best and us == us else float("nan"),
        graph=ours.get("graph_us", float("nan")), best_graph=best_graph, check=ours.get("check", "-"),
    )


def progress_line(results, row) -> str:
    s = _summary(_rows_of(results, row["dtype"], row["layout"], row["M"], row["K"]))
    peers = " ".join(f"{p} {_fmt(u)}" for p, u in s["peer_us"].items())
    graph = f" | graph ours {_fmt(s['graph'], 2)}" if not math.isnan(s["graph"]) else ""
    return (f"{row['dtype']:>4} {row['layout']:<12} M={row['M']:<6} K={row['K']:<6} ours {_fmt(s['us'])} us "
            f"{_fmt(s['tbps'], 2)} TB/s {_fmt(s['pct'], 0)}% copy | {peers}{graph} | {s['check']}")


def render_tables(results) -> str:
    """Markdown tables, one per (dtype, layout): the compact form printed last and written with --out."""
    out = []
    order = [(dtype_name(d), lay) for d, lay in CONFIGS]
    present = {(r["dtype"], r["layout"]) for r in results}
    for dtype, layout in [c for c in order if c in present]:
        shapes = sorted({(r["M"], r["K"]) for r in results if (r["dtype"], r["layout"]) == (dtype, layout)})
        provs = [p for p in PEERS if any(r["provider"] == p and (r["dtype"], r["layout"]) == (dtype, layout)
                                         for r in results)]
        out.append(f"### {dtype} `{layout}`\n")
        cols = (["M", "K", "MB", "copy us", "ours us", "TB/s", "% copy"] + [f"{p} us" for p in provs]
                + ["x best peer", "graph ours us", "graph best peer us", "check"])
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for M, K in shapes:
            rows = _rows_of(results, dtype, layout, M, K)
            s = _summary(rows)
            cells = [str(M), str(K), _fmt(s["bytes"] / 1e6, 1), _fmt(s["copy_us"]), _fmt(s["us"]),
                     _fmt(s["tbps"], 2), _fmt(s["pct"], 0)]
            cells += [_fmt(rows[p]["us"]) if p in rows else "n/a" for p in provs]
            cells += [f"{_fmt(s['ratio'], 2)} ({s['best']})" if s["best"] else "-",
                      _fmt(s["graph"], 2),
                      f"{_fmt(rows[s['best_graph']]['graph_us'], 2)} ({s['best_graph']})" if s["best_graph"] else "-",
                      s["check"]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_outputs(path: str, header_lines, results, tables) -> None:
    """CSV (one row per shape, config and provider) and markdown (the tables): path decides which is which;
    the other goes beside it (x.csv <-> x.md)."""
    path = pathlib.Path(path)
    csv_path, md_path = (path.with_suffix(".csv"), path) if path.suffix == ".md" else (path, path.with_suffix(".md"))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["dtype", "layout", "M", "K", "bytes", "copy_us", "copy_tbps", "provider", "us", "tbps",
              "pct_copy", "graph_us", "check"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            us = r["us"]
            w.writerow(dict(
                dtype=r["dtype"], layout=r["layout"], M=r["M"], K=r["K"], bytes=r["bytes"],
                copy_us=f"{r['copy_us']:.3f}", copy_tbps=f"{r['bytes'] / r['copy_us'] / 1e6:.3f}",
                provider=r["provider"], us=f"{us:.3f}",
                tbps=f"{r['bytes'] / us / 1e6:.3f}" if us == us else "nan",
                pct_copy=f"{100 * r['copy_us'] / us:.1f}" if us == us else "nan",
                graph_us=f"{r['graph_us']:.3f}", check=r["check"]))
    with open(md_path, "w") as f:
        f.write("## per_token_group_quant benchmark\n\n")
        f.write("".join(f"- {line}\n" for line in header_lines))
        f.write("\n" + tables + "\n")
    print(f"# wrote {csv_path} and {md_path}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--M", type=int, nargs="+", help=f"rows to time (default {FULL_M})")
    parser.add_argument("--K", type=int, nargs="+", help=f"row lengths to time, multiples of {GROUP} (default {FULL_K})")
    parser.add_argument("--quick", action="store_true", help=f"a small grid for a first run: M {QUICK_M} x K {QUICK_K}")
    parser.add_argument("--dtypes", nargs="+", default=["fp8", "int8"], choices=["fp8", "int8"])
    parser.add_argument("--layouts", nargs="+", default=["row", "col", "ue8m0_packed"],
                        choices=["row", "col", "ue8m0_packed"])
    parser.add_argument("--no-peers", action="store_true", help="time ours and the copy only")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch.compile'd reference peer")
    parser.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timings")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up per timing (default 10)")
    parser.add_argument("--rep-ms", type=float, default=40.0, help="do_bench measuring time per timing (default 40)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per provider and shape, median kept (default 3; the copy always takes 3)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="stop starting new shapes this many seconds after the start, and report (default 270)")
    parser.add_argument("--out", help="write a CSV and a markdown version (x.csv and x.md)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    if not torch.cuda.is_available():
        print("bench_quant.py times CUDA kernels and needs an NVIDIA GPU; torch.cuda.is_available() is False "
              f"here (torch {torch.__version__}). Run it on the GPU machine (scripts/gpu_all.sh quant).",
              file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
