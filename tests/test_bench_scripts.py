"""scripts/bench_sustained.py's and scripts/tune_triton.py's CPU-side pieces: argument checks, the nvidia-smi
window, the candidate sets (the timing itself runs on the GPU machine)."""

from __future__ import annotations

import importlib
import pathlib
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
sustained = importlib.import_module("bench_sustained")  # scripts/ is not a package
tune_triton = importlib.import_module("tune_triton")


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
