"""The bookkeeping around fp8linear's own cuBLASLt call (fp8linear.backends.cublaslt), on CPU: the reason
it is unavailable is asked for once, and the one-op path hands its operands on and adds the bias. The call
itself against torch's: test_cublaslt_launch_gpu.py.
"""

from __future__ import annotations

import torch

from fp8linear.backends import cublaslt

FP8 = torch.float8_e4m3fn


def test_unavailable_own_call_is_a_reason_asked_once(monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise cublaslt._build.KernelBuildError("no nvcc here")

    monkeypatch.setattr(cublaslt, "_unavailable", {})
    monkeypatch.setattr(cublaslt._build, "ensure_loaded", broken)
    for _ in range(3):
        assert cublaslt._unavailable_reason(torch.device("cpu")) == "fp8linear's CUDA extension is unavailable: no nvcc here"
    assert len(calls) == 1


def test_one_op_path_passes_the_operands_and_adds_the_bias(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.fp8linear, "cublaslt_linear", lambda *a: calls.append(a) or torch.zeros(5, 64))
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    prepared = (torch.randn(64, 128).to(FP8).t(), torch.ones(4, 1))
    y = cublaslt.linear(x, prepared, torch.ones(64), torch.float16, FP8, True)
    assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is prepared[0] and calls[0][2] is prepared[1]
    assert calls[0][3] is True and calls[0][4] == 1e-10
    assert y.dtype == torch.float16 and torch.equal(y, torch.ones(5, 64, dtype=torch.float16))  # bias added
