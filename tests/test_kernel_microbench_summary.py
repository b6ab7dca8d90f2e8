"""scripts/kernel_microbench_summary.py: the table it prints from the harness's CSV (CPU only)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))

import kernel_microbench_summary as summary  # noqa: E402

HEAD = "variant,kernel,layout,M,K,bytes,us,checksum\n"


def write_csv(tmp_path, lines):
    path = tmp_path / "mb.csv"
    path.write_text(HEAD + "".join(line + "\n" for line in lines))
    return str(path)


def test_percentages_use_the_median_of_the_baselines_and_hashes_are_compared(tmp_path, capsys):
    lines = [
        "default,copy_r0,-,4096,4096,50000000,20.0,0", "default,copy_r1,-,4096,4096,50000000,22.0,0",
        "default,copy_r2,-,4096,4096,50000000,30.0,0", "default,stream_r0,-,4096,4096,50000000,23.0,0",
        "default,empty_r0,-,4096,4096,0,3.0,0",
        "default,quant,row,4096,4096,50000000,25.0,aaaa",
        "fast,quant,row,4096,4096,50000000,24.0,aaaa",
        "wrong,quant,row,4096,4096,50000000,23.0,bbbb",
    ]
    assert summary.main([write_csv(tmp_path, lines)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = [c.strip() for c in out[0].strip("|").split("|")]
    row = [c.strip() for c in out[2].strip("|").split("|")]
    cell = dict(zip(head, row))
    assert head[5:8] == ["default us", "fast us", "wrong us"]  # the default first, then the others sorted
    assert cell["default us"] == "25.0" and cell["wrong us"] == "**23.0**"  # the fastest is bold
    assert cell["default % copy"] == "88"  # median copy 22.0 / 25.0
    assert cell["default % stream"] == "92"
    assert cell["copy us (3 timings)"] == "20.0 / 22.0 / 30.0"
    assert cell["empty us"] == "3.0"
    assert cell["hash differs"] == "wrong"


def test_empty_csv_is_an_error(tmp_path, capsys):
    assert summary.main([write_csv(tmp_path, [])]) == 1
    assert "no measurements" in capsys.readouterr().err


def test_usage(capsys):
    assert summary.main([]) == 2
