"""pyflakes over the package, the scripts, the model recipes and the tests.

The benchmark scripts run only on the GPU machine, never in CI, so a Python mistake in them surfaces
there, after the machine's minutes are spent: bench_quant.py once bound a local `copy_us` in the function
that called the module's `copy_us()`, and died with UnboundLocalError on its first shape (b2a9a4e).
pyflakes finds that class of mistake (a name used before its local assignment), undefined names and
unused imports without running anything.
"""

from __future__ import annotations

import io
import pathlib

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api", reason="pyflakes is in the test extra: pip install -e '.[test]'")
from pyflakes.reporter import Reporter  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
CHECKED = ("fp8linear", "scripts", "models", "tests")


def _flakes(paths) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    count = pyflakes_api.checkRecursive([str(p) for p in paths], Reporter(out, err))
    return count, out.getvalue() + err.getvalue()


def test_pyflakes_finds_nothing():
    paths = [REPO / name for name in CHECKED if (REPO / name).exists()]
    count, report = _flakes(paths)
    assert count == 0, f"pyflakes: {count} problem(s)\n{report}"


def test_pyflakes_catches_a_local_shadowing_the_function_it_calls(tmp_path):
    """The bench_quant.py mistake, reduced: the check above would have caught it."""
    bad = tmp_path / "shadow.py"
    bad.write_text(
        "def copy_us(n):\n"
        "    return n\n\n"
        "def run(sizes):\n"
        "    cache = {}\n"
        "    for n in sizes:\n"
        "        cache[n] = copy_us(n)\n"
        "        copy_us = cache[n]\n"
        "    return copy_us\n"
    )
    count, report = _flakes([bad])
    assert count >= 1 and "copy_us" in report, report
