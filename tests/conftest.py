"""Shared test fixtures: the `gpu` marker, seeds, poisoned buffers and a byte-exact comparison."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

#: 0x7F7F7F7F as fp32 is ~3.4e38 and as fp8 bytes is NaN: any element a kernel forgets to write shows.
POISON_BYTE = 0x7F


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def kernels_built():
    """Build and load the CUDA kernels once, failing (not skipping) with the compiler's story on a GPU machine."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from fp8linear import _build

    try:
        _build.ensure_loaded()
    except _build.KernelBuildError as exc:
        pytest.fail(f"the CUDA kernels did not build: {exc}", pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t's whole storage (padding included) with POISON_BYTE; returns t."""
    storage = t.untyped_storage()
    torch.tensor([], dtype=torch.uint8, device=t.device).set_(storage).fill_(POISON_BYTE)
    return t


def poison_allocator(device="cuda") -> None:
    """Fill freed blocks of the caching allocator, large pool and small pool (<= 1 MiB), with POISON_BYTE
    (0x7F: ~3.4e38 as bf16 and fp32, NaN as fp16 and fp8), so an output element a kernel leaves unwritten
    shows up as a mismatch (decode-sized outputs come from the small pool)."""
    blocks = [torch.empty(256 << 20, dtype=torch.uint8, device=device)]
    blocks += [torch.empty(1 << 20, dtype=torch.uint8, device=device) for _ in range(16)]
    for b in blocks:
        b.fill_(POISON_BYTE)
    del blocks, b


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Compare as raw bytes; on a mismatch report the first differing coordinate, both bytes and values."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu().contiguous()
    e = expected.detach().cpu().contiguous()
    width = a.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    ai, ei = a.view(as_int), e.view(as_int)
    diff = ai != ei
    if bool(diff.any()):
        idx = tuple(int(i) for i in diff.nonzero()[0])
        count = int(diff.sum())
        raise AssertionError(
            f"{name}: {count} of {a.numel()} elements differ; first at {idx}: "
            f"got {a[idx].float().item()!r} (0x{int(ai[idx]) & ((1 << 8 * width) - 1):0{2 * width}x}), "
            f"expected {e[idx].float().item()!r} (0x{int(ei[idx]) & ((1 << 8 * width) - 1):0{2 * width}x})"
        )


# The end of a bad-argument script run by assert_rejected_in_child: `cases` maps the expected message to a call.
# "control" replaces them by a TORCH_CHECK of the quant op, which has always been there.
_REJECTION_LOOP = r"""
if sys.argv[1] == "control":
    import fp8linear._build
    fp8linear._build.ensure_loaded()
    _x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    cases = {"row_align must be >= 1":
             lambda: torch.ops.fp8linear.quant_for_gemm(_x, 128, torch.float8_e4m3fn, False, 1e-10, "col", 0)}
for expected, call in cases.items():
    try:
        call()
    except RuntimeError as exc:
        assert expected in str(exc), (expected, str(exc))
    else:
        raise AssertionError(f"no error for {expected!r}")
torch.cuda.synchronize()  # nothing above reached the GPU
print("all rejected")
"""


def assert_rejected_in_child(script: str) -> None:
    """Run `script` (which builds `cases`, see _REJECTION_LOOP) in a child process and assert every call in it
    raised its expected RuntimeError. In a child because on the lent H100's torch 2.11 build an exception
    thrown by *any* C++ extension's TORCH_CHECK (a five-line load_inline op included) kills the process with
    SIGSEGV instead of reaching Python (docs/design.md); the test skips when the control check dies that way."""

    def run(which: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-c", script + _REJECTION_LOOP, which], capture_output=True,
                              text=True, timeout=300)

    result = run("ops")
    if result.returncode == -signal.SIGSEGV and run("control").returncode == -signal.SIGSEGV:
        pytest.skip("this torch build turns every C++ extension's TORCH_CHECK into SIGSEGV (the quant op's too)")
    assert result.returncode == 0 and "all rejected" in result.stdout, result.stdout + result.stderr


# Our Triton kernels on CPU tensors, under Triton's interpreter (test_linear, test_moe).
@pytest.fixture
def triton_interpreter(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton) ")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton.runtime.interpreter as interp

    from fp8linear.backends.triton_blockwise import patch_interpreter_indexing

    monkeypatch.setattr(interp, "_patch_lang_tensor", interp._patch_lang_tensor)  # restored after the test
    patch_interpreter_indexing()
    # triton.language's own jitted helpers (tl.sum, tl.cumsum) were made for the compiler when triton was
    # imported, before TRITON_INTERPRET was set here: give the interpreter its own versions of them.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name in ("sum", "cumsum"):
        fn = getattr(tl, name)
        if isinstance(fn, JITFunction):
            monkeypatch.setattr(tl, name, InterpretedFunction(fn.fn))
    yield
