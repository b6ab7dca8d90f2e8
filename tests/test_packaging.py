"""The wheel carries every source the package needs at run time: pyproject's package-data patterns cover
every file of kernels/ (compiled on first CUDA use from the installed copy), models/ (the demo model) and
the tables measured per card in fp8linear/backends/ (auto's backends, DeepGEMM's tiles)."""

from __future__ import annotations

import fnmatch
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _package_data() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(REPO / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    return {pkg: (dirs.get(pkg, pkg.replace(".", "/")), patterns) for pkg, patterns in setuptools["package-data"].items()}


def _ships(path: str, pattern: str) -> bool:
    """setuptools' glob: `*` stays within one path segment."""
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats))


@pytest.mark.parametrize("package", ["fp8linear._kernels", "fp8linear._models", "fp8linear.backends"])
def test_package_data_covers_every_file(package):
    folder, patterns = _package_data()[package]
    root = REPO / folder
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    if package == "fp8linear.backends":  # a package proper: its modules ship as modules, its data by pattern
        files = [f for f in files if not f.endswith(".py")]
    assert files, f"{folder}/ is empty"
    missing = [f for f in files if not any(_ships(f, pat) for pat in patterns)]
    assert not missing, f"{folder}/ files no package-data pattern of {package} ships: {missing}"
