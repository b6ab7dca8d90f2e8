"""The kernel headers' host-side integer logic, compiled by nvcc and run on the CPU (no GPU needed).

tests/kernel_host_checks.cu checks FastDivmod's quotient (every kernel's indexing) against `/` over every
divisor up to 5000, divisors around powers of two up to 2^31 - 1 and random ones, with numerators around
multiples of the divisor, at the top of the range and at random; and the quant and SiLU kernels' grid
rules (kernels/per_token_group_quant.cuh quant_grid, kernels/silu_and_mul_quant.cuh silu_grid) and the SiLU
kernel's sizes (silu_set_sizes). Skipped where nvcc is missing (CI and the developers' machines have it).

And the host code's layout (fp8linear/_build.py, docs/design.md "Building the kernel"): only the binding files
include torch, every source is in one of the two libraries, and each op a binding file registers takes the
arguments of the schema fp8linear's Python defines for it.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re
import shutil
import subprocess

import pytest

from fp8linear import _build

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_kernel_header_host_checks(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    exe = tmp_path / "kernel_host_checks"
    build = subprocess.run(
        [nvcc, "-O2", "-std=c++17", "-arch=sm_90a", f"-I{REPO / 'kernels'}",
         str(REPO / "tests" / "kernel_host_checks.cu"), "-o", str(exe)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout[-4000:]
    assert int(run.stdout.split()[1]) > 1_000_000  # the checks ran, not an empty program


# ---- the host code's layout: torch-free kernels, one binding file per library ------------------------------

TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](ATen|c10|torch)/', re.M)
BINDINGS = {"main": "bindings.cpp", "sm90": "sm90_bindings.cpp"}


def test_only_the_binding_files_include_torch():
    """The kernels' translation units and headers compile against the CUDA headers alone (_build's compile-only
    build gives them no torch include path); the torch glue is in the binding files and their header."""
    glue = {*BINDINGS.values(), "bindings.h"}
    sources = sorted(p for p in (REPO / "kernels").iterdir() if p.is_file())
    with_torch = sorted(p.name for p in sources if TORCH_INCLUDE.search(p.read_text()))
    assert with_torch == sorted(glue), with_torch


def test_each_source_is_in_one_library_with_one_registration_block():
    on_disk = {p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cpp")}
    main, sm90 = ({p.name for p in _build.library_sources(lib)} for lib in ("main", "sm90"))
    assert main | sm90 == on_disk and not main & sm90
    assert sm90 == {"sm90_linear.cu", "sm90_bindings.cpp"}
    for library, names in (("main", main), ("sm90", sm90)):
        blocks = [n for n in sorted(names) if "TORCH_LIBRARY_IMPL(" in (REPO / "kernels" / n).read_text()]
        assert blocks == [BINDINGS[library]], (library, blocks)


def test_ensure_loaded_names_the_libraries():
    with pytest.raises(ValueError, match=r"library must be one of 'main', 'sm90'; got 'sm100'"):
        _build.ensure_loaded("sm100")


def _cxx_types(params: str) -> list[str]:
    """'const at::Tensor& x, int64_t g' -> ['Tensor', 'int']: the schema type each C++ parameter type binds to."""
    cxx_to_schema = {
        "const at::Tensor&": "Tensor", "at::Tensor&": "Tensor", "const std::optional<at::Tensor>&": "Tensor?",
        "int64_t": "int", "double": "float", "bool": "bool", "c10::string_view": "str",
        "at::ScalarType": "ScalarType",
    }
    types = []
    for param in (p.strip() for p in params.split(",") if p.strip()):
        cxx_type = param.rsplit(None, 1)[0].strip()
        assert cxx_type in cxx_to_schema, f"no schema type for the C++ parameter {param!r}"
        types.append(cxx_to_schema[cxx_type])
    return types


def _schema_types(schema: str) -> tuple[list[str], str]:
    """'ns::op(Tensor(a!) q, int g=0) -> (Tensor, Tensor)' -> (['Tensor', 'int'], '(Tensor, Tensor)')."""
    args, returns = re.fullmatch(r"[\w:.]+\((.*)\) -> (.*)", schema).groups()
    types = [re.sub(r"\(\w!?\)", "", arg.strip().split()[0]) for arg in args.split(",") if arg.strip()]
    return types, returns


def test_each_cuda_registration_takes_its_schemas_arguments():
    """Every op a binding file registers is defined in Python (fp8linear imports it) with the arguments, in
    order and type, and the returns of the C++ function registered for it."""
    torch = pytest.importorskip("torch")
    import fp8linear

    for info in pkgutil.walk_packages(fp8linear.__path__, "fp8linear."):
        if not info.name.endswith("__main__"):  # the CLI's entry point runs the CLI
            importlib.import_module(info.name)  # every op's schema, wherever it lives
    cxx_returns = {"void": "()", "at::Tensor": "Tensor", "std::string": "str",
                   "std::tuple<at::Tensor, at::Tensor>": "(Tensor, Tensor)",
                   "std::tuple<at::Tensor, at::Tensor, at::Tensor>": "(Tensor, Tensor, Tensor)"}
    registered = 0
    for file in BINDINGS.values():
        text = (REPO / "kernels" / file).read_text()
        for op, function in re.findall(r'm\.impl\("(\w+)", &fp8linear::(\w+)\);', text):
            definition = re.search(r"\n([\w:<>, ]+?)\s+" + function + r"\(([^)]*)\)\s*\{", text)
            assert definition, f"{file}: no definition of {function}"
            assert hasattr(torch.ops.fp8linear, op), f"{file} registers fp8linear::{op}, which no module defines"
            schema_args, schema_returns = _schema_types(str(getattr(torch.ops.fp8linear, op).default._schema))
            assert _cxx_types(definition.group(2)) == schema_args, (op, definition.group(2))
            assert cxx_returns[definition.group(1).strip()] == schema_returns, (op, definition.group(1))
            registered += 1
    assert registered == 12
