"""The kernel headers' host-side integer logic, compiled by nvcc and run on the CPU (no GPU needed).

tests/kernel_host_checks.cu checks FastDivmod's quotient (every kernel's indexing) against `/` over every
divisor up to 5000, divisors around powers of two up to 2^31 - 1 and random ones, with numerators around
multiples of the divisor, at the top of the range and at random; and the quant and SiLU kernels' grid
rules (kernels/per_token_group_quant.cuh quant_grid, kernels/silu_and_mul_quant.cuh silu_grid) and the SiLU
kernel's sizes (silu_set_sizes). Skipped where nvcc is missing (CI and the developers' machines have it).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

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
