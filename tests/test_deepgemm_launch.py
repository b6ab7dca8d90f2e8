"""The bookkeeping around the C++ launch of DeepGEMM's legacy kernel (fp8linear.backends.deepgemm), on CPU
with a stand-in for DeepGEMM: which shapes keep DeepGEMM's own launch and why, and when the one-op path
serves. The launch itself against DeepGEMM's, bit for bit: test_deepgemm_launch_gpu.py.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from fp8linear.backends import deepgemm, deepgemm_relaunch as relaunch

FP8 = torch.float8_e4m3fn


def _fake_api(calls):
    def fn(lhs, rhs, out):
        calls.append(out.shape)
        out.copy_(lhs[0].float() @ rhs[0].float().t())

    return fn


def _cpu_operands(M=5, N=64, K=128):
    q = torch.randn(M, K).to(FP8)
    s = torch.ones(M, K // 128)
    return q, s, torch.randn(N, K).to(FP8), torch.ones(1, 1)


@pytest.fixture
def fake_dg(monkeypatch):
    """Empty plan cache and log memory, the C++ launch on; returns set_api(api) -> calls, which makes
    DeepGEMM a matmul stand-in reporting `api` ("legacy" or "current") and records its calls."""
    monkeypatch.setattr(relaunch, "plans", {})
    monkeypatch.setattr(deepgemm, "_logged", set())
    monkeypatch.setattr(relaunch, "ENABLED", True)
    relaunch.written_for.cache_clear()

    def set_api(api):
        calls = []
        monkeypatch.setattr(deepgemm, "_api", lambda: (_fake_api(calls), api))
        return calls

    return set_api


def test_current_api_is_called_through_its_public_function_alone(fake_dg, caplog):
    calls = fake_dg("current")
    q, s, w, ws = _cpu_operands()
    with caplog.at_level(logging.INFO, logger=deepgemm.__name__):
        for _ in range(3):
            y = deepgemm._gemm_impl(q, s, w, ws)
    assert len(calls) == 3 and y.shape == (5, 64)
    assert relaunch.plans == {}  # nothing of its internals is read
    assert not caplog.records


def test_unreadable_legacy_internals_keep_deepgemms_launch(fake_dg, monkeypatch, caplog):
    calls = fake_dg("legacy")
    # A deep_gemm whose internals are not where the plan reader looks.
    monkeypatch.setitem(sys.modules, "deep_gemm", types.ModuleType("deep_gemm"))
    for name in ("deep_gemm.jit_kernels", "deep_gemm.jit_kernels.gemm", "deep_gemm.jit_kernels.tuner",
                 "deep_gemm.jit_kernels.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    why = relaunch.written_for()
    assert isinstance(why, str) and "jit_kernels" in why
    q, s, w, ws = _cpu_operands()
    with caplog.at_level(logging.INFO, logger=deepgemm.__name__):
        ys = [deepgemm._gemm_impl(q, s, w, ws) for _ in range(2)]
    assert len(calls) == 2 and torch.equal(ys[0], ys[1])
    assert relaunch.plans[(5, 64, 128, None)] == ()
    assert any("keeps its own launch" in r.getMessage() for r in caplog.records)


def test_one_op_path_waits_for_a_plan(fake_dg, monkeypatch):
    """`linear` takes the one-op path only for shapes whose plan exists (DeepGEMM ran them once) and only with
    our launch; otherwise the quant op then `gemm`."""
    fake_dg("legacy")
    two_ops = []
    monkeypatch.setattr(deepgemm, "quantize_then_gemm", lambda *a: two_ops.append(a) or torch.zeros(5, 64))
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    prepared = (torch.randn(64, 128).to(FP8), torch.ones(1, 1))
    deepgemm.linear(x, prepared, None, torch.bfloat16, FP8, False)  # no plan yet
    relaunch.plans[(5, 64, 128, None)] = ()  # DeepGEMM's own launch for this shape
    deepgemm.linear(x, prepared, None, torch.bfloat16, FP8, False)
    assert len(two_ops) == 2
    relaunch.plans[(5, 64, 128, None)] = (1, 132, 64, 64, 1000, 128, 1)
    calls = []
    monkeypatch.setattr(torch.ops.fp8linear, "deepgemm_linear", lambda *a: calls.append(a) or torch.zeros(5, 64))
    y = deepgemm.linear(x, prepared, torch.ones(64), torch.float16, FP8, True)
    assert len(calls) == 1 and calls[0][3] is True and calls[0][5:] == (1, 132, 64, 64, 1000, 128, 1)
    assert y.dtype == torch.float16 and torch.equal(y, torch.ones(5, 64, dtype=torch.float16))  # bias added
    monkeypatch.setattr(relaunch, "ENABLED", False)
    deepgemm.linear(x, prepared, None, torch.bfloat16, FP8, False)
    assert len(calls) == 1 and len(two_ops) == 3


def test_a_kernel_the_cpp_launch_cannot_run_gives_a_reason_not_a_plan():
    """The C++ launch passes the arguments kernels/deepgemm_launch.cu passes: a DeepGEMM runtime whose kernel
    takes other arguments, or has not been loaded, yields the reason (that shape keeps DeepGEMM's launch).
    Which tuner entry DeepGEMM's own call fills, and that the plan read from it runs the same kernel, is
    checked against the real DeepGEMM on the GPU (test_deepgemm_launch_gpu.py)."""
    runtime = types.SimpleNamespace(args=list(relaunch.LEGACY_LAUNCH_ARGS), kernel=0xABC000)
    tiles = (132, 128, 144, 200000, 0, 2)  # num_sms, block_m, block_n, smem, swizzle_d, multicast
    assert relaunch.launch_args(runtime, *tiles) == (0xABC000, *tiles)
    runtime.args = runtime.args[:-1]
    assert "other launch arguments" in relaunch.launch_args(runtime, *tiles)
    runtime.args = list(reversed(relaunch.LEGACY_LAUNCH_ARGS))
    assert "other launch arguments" in relaunch.launch_args(runtime, *tiles)
    runtime.args, runtime.kernel = list(relaunch.LEGACY_LAUNCH_ARGS), None
    assert "not loaded" in relaunch.launch_args(runtime, *tiles)
