"""The benchmark scripts' CPU-side pieces: argument checks, bench_sustained's nvidia-smi window, tune_triton's
candidate sets, bench_linear's summary of issue 3's targets (the timing itself runs on the GPU machine)."""

from __future__ import annotations

import importlib
import pathlib
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
sustained = importlib.import_module("bench_sustained")  # scripts/ is not a package
tune_triton = importlib.import_module("tune_triton")
bench_linear = importlib.import_module("bench_linear")


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


def test_bench_linear_summary_takes_the_true_median_and_names_split_passes():
    """Four points: the median is the mean of the middle two (1.5x), not the upper one (1.6x); the quant
    share is read at M = 4096; a provider whose passes lie 1.3x apart is named, one 1.1x apart is not;
    no M <= 64 line where the run timed none."""
    rows = []
    for N, M, auto_us in [(4096, 2048, 100 / 1.2), (4096, 4096, 100 / 1.4), (7168, 2048, 100 / 1.6),
                          (7168, 4096, 100 / 1.8)]:
        rows += [_row(N, M, "bf16", 100.0), _row(N, M, "auto", auto_us, [auto_us, 1.1 * auto_us])]
        rows.append(_row(N, M, "quant", 10.0, [10.0, 13.0] if (N, M) == (7168, 4096) else None))
    summary = bench_linear.summarize(rows).splitlines()
    assert summary[0] == "auto M>=2048: min 1.20x, median 1.50x over 4 points (targets 1.5x / 1.7x)"
    assert summary[1] == "auto slower than bf16 at: none"
    assert summary[2] == "quant share at M=4096: max 18.0% (target <= 7%)"  # 10 us of 1/1.8 * 100
    assert summary[3] == "passes more than 1.2x apart: 7168x4096 M=4096 quant (10.0-13.0 us)"
    assert len(summary) == 4


def test_bench_linear_summary_names_slower_points_and_small_m():
    rows = [_row(4096, 16, "bf16", 10.0), _row(4096, 16, "auto", 8.0, bf16_us=10.0),
            _row(4096, 64, "bf16", 20.0), _row(4096, 64, "auto", 25.0, bf16_us=20.0)]
    assert bench_linear.summarize(rows).splitlines() == [
        "auto M<=64: median 1.02x over 2 points (target 1.3x)",
        "auto slower than bf16 at: 4096x4096 M=64 (0.80x)"]


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
