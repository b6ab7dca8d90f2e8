"""The benchmark scripts' CPU-side pieces: argument checks, bench_sustained's nvidia-smi window, tune_triton's
candidate sets, bench_linear's summary of a run (the timing itself runs on the GPU machine).

The summary's figures are checked against what the rows given to it imply, worked out by hand; the goals
the script prints beside them are the script's business, not asserted here."""

from __future__ import annotations

import importlib
import pathlib
import re
import sys
import time

import pytest

from fp8linear.backends import auto

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
sustained = importlib.import_module("bench_sustained")  # scripts/ is not a package
tune_triton = importlib.import_module("tune_triton")
bench_linear = importlib.import_module("bench_linear")
tune_auto = importlib.import_module("tune_auto")


@pytest.mark.parametrize(
    "script,argv,message",
    [(sustained, ["--seconds", "0.5", "--settle-s", "0.6"], "--seconds (0.5) must exceed --settle-s (0.6)"),
     (sustained, ["--rounds", "0"], "--rounds must be >= 1; got 0"),
     (sustained, ["--M", "0"], "--M values must be >= 1"),
     (sustained, ["--N", "4096"], "--N and --K take the same number of values"),
     (sustained, ["--model", "demo-llama", "--N", "4096", "--K", "4096"], "name shapes two ways"),
     (tune_triton, ["--N", "4096", "--K", "4000"], "--K values must be multiples of 128"),
     (tune_triton, ["--M", "0"], "--M values must be >= 1"),
     (tune_triton, ["--rep-ms", "0"], "--rep-ms must be > 0")],
    ids=lambda v: v.__name__ if hasattr(v, "__name__") else None)
def test_scripts_reject_bad_arguments(script, argv, message, capsys):
    with pytest.raises(SystemExit):
        script.main(argv)
    assert message in capsys.readouterr().err


def test_sustained_window_takes_medians_inside_it():
    sampler = sustained.SmiSampler.__new__(sustained.SmiSampler)  # no nvidia-smi process
    now = time.time()
    sampler.samples = [(now - 5, 1980.0, 100.0), (now, 1400.0, 690.0), (now + 1, 1300.0, 700.0),
                       (now + 2, 1600.0, 760.0), (now + 9, 1980.0, 90.0)]
    assert sampler.window(now - 0.5, now + 2.5) == (1400.0, 700.0)  # medians, not means or the ends
    mhz, watts = sampler.window(now + 3, now + 4)
    assert mhz != mhz and watts != watts  # nan: no sample inside


@pytest.mark.parametrize("text,ok", [("1980", True), (" 690.52 ", True), ("[N/A]", False), ("", False)])
def test_nvidia_smi_numbers(text, ok):
    assert sustained._is_number(text) is ok


def test_tune_triton_candidates_compile_checks_and_bucket_shapes():
    from fp8linear.backends import triton_blockwise as tb

    for M in tune_triton.M_BUCKETS:
        cands = tune_triton.candidates(M)
        assert cands and len({tune_triton.label(c) for c in cands}) == len(cands)
        for cfg in cands:
            tb.check_config(cfg)  # every candidate is a config the table may hold
    assert {c["BLOCK_M"] for c in tune_triton.candidates(16)} == {16}
    assert {c["BLOCK_M"] for c in tune_triton.candidates(4096)} == {128, 256}


def _row(N, M, provider, us, rounds=None, bf16_us=100.0, pick="deepgemm"):
    return dict(N=N, K=4096, M=M, provider=provider, us=us, us_rounds=rounds or [us], pick=pick,
                speedup=bf16_us / us if provider not in ("bf16", "quant") else float("nan"))


def _summary_line(summary: str, prefix: str) -> str:
    """The one line of `summary` that starts with `prefix`."""
    lines = [line for line in summary.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one line starting {prefix!r} in:\n{summary}"
    return lines[0]


def _figures(line: str, pattern: str) -> "list[float]":
    """The numbers `pattern`'s groups capture in `line`."""
    match = re.search(pattern, line)
    assert match, f"{pattern!r} not in {line!r}"
    return [float(g) for g in match.groups()]


def test_bench_linear_summary_takes_the_true_median_and_names_split_passes():
    """Auto at 1.2x, 1.4x, 1.6x and 1.8x of bf16 at M >= 2048: min 1.2x and median 1.5x (the mean of the
    middle two, not the upper one, 1.6x) over 4 points, none slower than bf16. The quant share is read at
    M = 4096: 10 us of auto's 100 / 1.4 us (14%) and of 100 / 1.8 us (18%), max 18%. The passes of quant
    at 7168x4096 M=4096 lie 1.3x apart (named), auto's 1.1x (not named). No M <= 64 line: none was timed."""
    rows = []
    for N, M, auto_us in [(4096, 2048, 100 / 1.2), (4096, 4096, 100 / 1.4), (7168, 2048, 100 / 1.6),
                          (7168, 4096, 100 / 1.8)]:
        rows += [_row(N, M, "bf16", 100.0), _row(N, M, "auto", auto_us, [auto_us, 1.1 * auto_us])]
        rows.append(_row(N, M, "quant", 10.0, [10.0, 13.0] if (N, M) == (7168, 4096) else None))
    summary = bench_linear.summarize(rows, spread_limit=1.2)
    big = _figures(_summary_line(summary, "auto M>=2048:"), r"min ([\d.]+)x, median ([\d.]+)x over (\d+) points")
    assert big == pytest.approx([1.2, 1.5, 4], abs=0.005)
    assert _summary_line(summary, "auto slower than bf16 at:") == "auto slower than bf16 at: none"
    share = _figures(_summary_line(summary, "quant share at M=4096:"), r"max ([\d.]+)%")
    assert share == pytest.approx([100 * 10 / (100 / 1.8)], abs=0.05)
    assert _summary_line(summary, "passes more than") == (
        "passes more than 1.2x apart: 7168x4096 M=4096 quant (10.0-13.0 us)")
    assert not any(line.startswith("auto M<=64") for line in summary.splitlines())
    assert len(summary.splitlines()) == 4


def test_bench_linear_summary_names_slower_points_and_small_m():
    """Auto at 8 us against bf16's 10 us (1.25x) at M = 16 and 25 us against 20 us (0.8x) at M = 64: the
    M <= 64 median is 1.025x over 2 points, and the M = 64 point is named as slower than bf16."""
    rows = [_row(4096, 16, "bf16", 10.0), _row(4096, 16, "auto", 8.0, bf16_us=10.0),
            _row(4096, 64, "bf16", 20.0), _row(4096, 64, "auto", 25.0, bf16_us=20.0)]
    summary = bench_linear.summarize(rows)
    small = _figures(_summary_line(summary, "auto M<=64:"), r"median ([\d.]+)x over (\d+) points")
    assert small == pytest.approx([1.025, 2], abs=0.005)
    assert _summary_line(summary, "auto slower than bf16 at:") == "auto slower than bf16 at: 4096x4096 M=64 (0.80x)"
    assert len(summary.splitlines()) == 2


def test_layer_fns_rotate_each_provider_over_the_inputs():
    """bench_sustained's providers take the copies of x in turn (none finds its input in L2 from its last
    call); bench_linear's take its one x every time. Checked on the CPU with the reference backend: each
    call's result is the one for the input it should have taken."""
    import torch
    from fp8linear import per_token_group_quant

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    mods = bench_linear.layer_modules(lin, ["auto", "reference"])
    xs = [torch.randn(3, 256, dtype=torch.bfloat16) for _ in range(3)]
    fns, first = bench_linear.layer_fns(lin, mods, xs)
    assert list(fns) == ["bf16", "auto", "reference", "quant"] and sorted(first) == ["auto", "reference"]
    for i in (1, 2, 0, 1):  # each provider counts on its own from the copy after the first
        assert torch.equal(fns["bf16"](), torch.nn.functional.linear(xs[i], lin.weight))
        assert torch.equal(fns["reference"](), mods["reference"](xs[i]))
    q, s = fns["quant"]()
    q1, s1 = per_token_group_quant(xs[1], 128, torch.float8_e4m3fn, scale_layout="col")
    assert torch.equal(q.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s, s1)
    one, _ = bench_linear.layer_fns(lin, mods, xs[:1])
    assert all(torch.equal(one["bf16"](), torch.nn.functional.linear(xs[0], lin.weight)) for _ in range(3))
    bare, _ = bench_linear.layer_fns(lin, mods, xs[:1], peers=False)  # tune_auto's: no quant, no GEMM alone
    assert list(bare) == ["bf16", "auto", "reference"]


# -- tune_auto and bench_linear.bench_rounds --------------------------------------------------------------
def test_auto_pick_rule():
    """The fastest backend wins; DeepGEMM gets no host-time handicap since its calls launch from C++."""
    pick = tune_auto.pick
    assert pick({"deepgemm": 100.0, "cublas": 105.0}) == "deepgemm"
    assert pick({"deepgemm": 78.0, "cublas": 95.0, "triton": 70.0}) == "triton"
    assert pick({"deepgemm": 800.0, "cublas": 790.0, "triton": 900.0}) == "cublas"
    assert pick({"small_m": 8.0, "cublas": 16.0}) == "small_m"


def test_tune_auto_merges_rows():
    """A whole-shape run replaces every fp8 row of the shapes it measured; a --M run only its buckets."""
    merge_rows = tune_auto.merge_rows

    def row(N, M_max, backend, dtype="e4m3"):
        return {"dtype": dtype, "N": N, "K": 512, "M_max": M_max, "backend": backend}

    old = [row(256, 1, "small_m"), row(256, 64, "cublas"), row(256, 4096, "deepgemm"), row(512, 64, "cublas"),
           row(256, 64, "triton", dtype="int8")]
    new = [row(256, 64, "deepgemm")]
    partial = merge_rows(old, new, whole_shapes=False)
    assert sorted((r["N"], r["M_max"], r["backend"], r["dtype"]) for r in partial) == [
        (256, 1, "small_m", "e4m3"), (256, 64, "deepgemm", "e4m3"), (256, 64, "triton", "int8"),
        (256, 4096, "deepgemm", "e4m3"), (512, 64, "cublas", "e4m3")]
    whole = merge_rows(old, new, whole_shapes=True)
    assert sorted((r["N"], r["M_max"], r["backend"], r["dtype"]) for r in whole) == [
        (256, 64, "deepgemm", "e4m3"), (256, 64, "triton", "int8"), (512, 64, "cublas", "e4m3")]


def test_bench_rounds_alternates_providers_and_keeps_medians(monkeypatch):
    """Each pass times every provider once; a provider's result is the median of its passes, so one hot
    (slow) pass does not decide a pick. The first pass keeps the given order, later ones shuffle it, so no
    provider always follows the same one (the one whose heat it would inherit)."""
    names = ["a", "b", "c", "d", "e"]
    values = {"a": [10.0, 30.0, 11.0, 12.0, 50.0], "b": [20.0, 19.0, 90.0, 21.0, 18.0]}
    order, samples = [], {n: iter(values.get(n, [1.0] * 5)) for n in names}
    monkeypatch.setattr(bench_linear, "bench_us", lambda fn, rep_ms: fn())

    def timed(name):
        return lambda: order.append(name) or next(samples[name])

    result = bench_linear.bench_rounds({n: timed(n) for n in names}, rounds=5, rep_ms=1.0)
    passes = [order[i:i + len(names)] for i in range(0, len(order), len(names))]
    assert len(passes) == 5 and all(sorted(p) == names for p in passes)
    assert passes[0] == names
    predecessors = {n: {p[p.index(n) - 1] for p in passes if p.index(n) > 0} for n in names}
    assert any(len(preds) > 1 for preds in predecessors.values()), passes
    assert len({tuple(p) for p in passes}) > 2, passes
    assert result["a"] == 12.0 and result["b"] == 20.0
    with pytest.raises(ValueError, match="rounds must be at least 1; got 0"):
        bench_linear.bench_rounds({"a": timed("a")}, rounds=0, rep_ms=1.0)


def test_bench_rounds_even_passes_keep_the_lower_middle(monkeypatch):
    """With two passes the upper middle is the slower pass itself: one interrupted timing would decide."""
    values = {"quant": iter([30.0, 244.0]), "auto": iter([135.0, 131.0, 140.0, 133.0])}
    monkeypatch.setattr(bench_linear, "bench_us", lambda fn, rep_ms: fn())
    samples: dict = {}
    two = bench_linear.bench_rounds({"quant": lambda: next(values["quant"])}, rounds=2, rep_ms=1.0,
                                    samples=samples)
    assert two == {"quant": 30.0} and samples == {"quant": [30.0, 244.0]}
    four = bench_linear.bench_rounds({"auto": lambda: next(values["auto"])}, rounds=4, rep_ms=1.0)
    assert four == {"auto": 133.0}


def test_bench_rounds_salt_varies_the_shuffles_between_points(monkeypatch):
    """With the shuffles seeded by the pass alone every point would repeat the same orders, and whatever a
    provider inherits from its predecessor would bias it at every point alike."""
    monkeypatch.setattr(bench_linear, "bench_us", lambda fn, rep_ms: fn())
    names = ["bf16", "deepgemm", "cublas", "auto", "dg-gemm", "quant"]

    def orders(salt):
        order = []
        bench_linear.bench_rounds({n: (lambda n=n: order.append(n) or 1.0) for n in names}, 3, 1.0, salt=salt)
        return tuple(order)

    assert orders(7) == orders(7)
    assert len({orders(salt) for salt in range(6)}) == 6
    assert all(o[:len(names)] == tuple(names) for o in map(orders, range(6)))  # the first pass: as given


def test_shipped_auto_table_follows_the_pick_rule():
    import json

    pick = tune_auto.pick
    data = json.loads(auto.table_path().read_text())
    rows = [r for name, e in data.items() if not name.startswith("_") for r in e["rows"] if r.get("us")]
    assert rows
    for row in rows:
        assert row["backend"] == pick(row["us"]), row


# -- bench_moe: a CPU smoke run in a child process (the table's structure, never its numbers) ------------
def _run_bench_moe(tmp_path, *argv) -> tuple[str, dict]:
    import json
    import os
    import subprocess

    out = tmp_path / "moe.md"
    repo = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    env.pop("TRITON_INTERPRET", None)  # the Triton column skips with its reason; the interpreter is slow
    result = subprocess.run([sys.executable, str(repo / "scripts" / "bench_moe.py"), "--device", "cpu",
                             "--peer-dir", str(tmp_path / "no-peer"), "--rep-ms", "1", "--out", str(out), *argv],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


def test_bench_moe_cpu_smoke(tmp_path):
    """Tiny shapes, one T, both routings: a table row per (routing, T) with the providers that can run on a
    CPU, each checked before timing (no WRONG note), the unsupported ones skipped with their reason."""
    text, data = _run_bench_moe(tmp_path, "--tokens", "3", "--backends", "auto", "triton")
    table = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert [line.split(" | ")[1:4] for line in table] == [["uniform", "3", "eager"], ["skewed", "3", "eager"]]
    head = next(line for line in text.splitlines() if line.startswith("| shape |"))
    for column in ("fp8:auto us", "bf16-grouped us", "hf-bf16 us (best impl)", "fp8:auto x bf16-grouped",
                   "fp8:auto x hf-bf16", "quant %"):
        assert column in head, head
    assert all(len(line.split("|")) == len(head.split("|")) for line in table)
    rows = {(r["routing"], r["provider"]): r for r in data["rows"]}
    for routing in ("uniform", "skewed"):
        for provider in ("fp8:auto", "bf16-grouped", "hf-bf16:eager", "hf-bf16:grouped_mm", "quant+silu"):
            r = rows[(routing, provider)]
            assert r["us"] > 0 and "WRONG" not in r["note"], r
        assert rows[(routing, "fp8:auto")]["err_fp8ref"] == 0.0  # auto is the reference on a CPU
        assert rows[(routing, "fp8:triton")]["note"].startswith("skipped: ")
        assert "TRITON_INTERPRET" in rows[(routing, "fp8:triton")]["note"]
    assert "fp8:auto ran as" in text


def test_bench_moe_cpu_e2e(tmp_path):
    text, data = _run_bench_moe(tmp_path, "--e2e-only", "--layers", "1", "--prefill", "8", "--decode", "2")
    assert data["rows"] == [] and set(data["e2e"]) == {"model", "bf16", "fp8"}
    for label in ("bf16", "fp8"):
        assert {"weights_mib", "prefill_ms", "decode_tok_s"} <= set(data["e2e"][label]), data["e2e"][label]
    assert data["e2e"]["fp8"]["weights_mib"] < data["e2e"]["bf16"]["weights_mib"]
    assert "| weights MiB |" in text and "| decode tok/s (eager steps) |" in text


def test_bench_moe_e2e_names_a_host_bound_prefill():
    """The e2e table says which prefill is bound by the host (issuing it takes >= 90% of its wall time) and
    only that one; without a host timing (a CPU run) it has no such row."""
    bench_moe = importlib.import_module("bench_moe")
    res = {"model": "m", "bf16": {"weights_mib": 10.0, "prefill_ms": 9.4, "prefill_issue_ms": 7.4},
           "fp8": {"weights_mib": 6.0, "prefill_ms": 9.3, "prefill_issue_ms": 9.2}}
    text = bench_moe.format_e2e(res, 4)
    assert "| prefill host ms (issuing it) | 7.40 | 9.20 | - |" in text
    assert "fp8's prefill is bound by the host: issuing it takes 9.20 ms against 9.30 ms of wall time" in text
    assert "bf16's prefill is bound" not in text
    for r in res.values():
        if isinstance(r, dict):
            r.pop("prefill_issue_ms")
    text = bench_moe.format_e2e(res, 4)
    assert "host" not in text and "| prefill ms | 9.40 | 9.30 | 1.01x |" in text


@pytest.mark.parametrize("argv,message", [(["--device", "cpu", "--shape", "deepseek-v3"], "runs --shape tiny only"),
                                          (["--device", "cpu", "--tokens", "0"], "--tokens must be >= 1")])
def test_bench_moe_rejects_bad_arguments(argv, message, capsys):
    bench_moe = importlib.import_module("bench_moe")
    with pytest.raises(SystemExit):
        bench_moe.main(argv)
    assert message in capsys.readouterr().err


def test_bench_moe_routings_name_distinct_experts():
    """Each token names k distinct experts in both routings (what top-k routing guarantees and the masked
    layout relies on); the skewed routing's most popular expert gets well above the uniform share."""
    import torch

    bench_moe = importlib.import_module("bench_moe")
    T, E, k = 2048, 128, 8
    for kind in ("uniform", "skewed"):
        idx, w = bench_moe.make_routing(T, E, k, kind, "cpu")
        assert idx.shape == (T, k) and w.shape == (T, k) and w.dtype == torch.bfloat16
        assert all(len(set(row)) == k for row in idx.tolist())
        assert int(idx.min()) >= 0 and int(idx.max()) < E
        top = torch.bincount(idx.reshape(-1), minlength=E).max().item() / (T * k / E)
        assert (top > 2.0) if kind == "skewed" else (top < 1.5), (kind, top)
