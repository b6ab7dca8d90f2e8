"""The C++ launch of DeepGEMM's legacy kernel (kernels/deepgemm_launch.cu, fp8linear.backends.deepgemm).

The first call of a shape runs DeepGEMM's own Python launch and records what it ran; later calls launch
the same kernel from C++. Same kernel, same inputs: the outputs must be equal bit for bit, over shapes
whose tile configurations differ (BLOCK_M from 64 to 256, partial last tiles, padded scale rows).
The CPU half checks the bookkeeping around it with a stand-in for DeepGEMM.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from conftest import assert_rejected_in_child, poison_allocator
from fp8linear import per_token_group_quant
from fp8linear.backends import deepgemm
from fp8linear.weights import quantize_weight_blockwise

FP8 = torch.float8_e4m3fn


def _legacy_on_this_gpu() -> "str | None":
    if not torch.cuda.is_available():
        return "needs CUDA"
    why = deepgemm.unsupported_reason(64, 256, 256, FP8, torch.device("cuda"))
    if why is not None:
        return why
    if deepgemm.api_name() != "legacy":
        return f"the C++ launch serves DeepGEMM's legacy API; this one is {deepgemm.api_name()!r}"
    return None


needs_legacy = pytest.mark.skipif(_legacy_on_this_gpu() is not None, reason=str(_legacy_on_this_gpu()))


def _operands(M: int, N: int, K: int):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
    q, s = per_token_group_quant(x, 128, FP8, scale_layout="col")
    weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, FP8)
    return q, s, weight, wsi


@pytest.mark.gpu
@needs_legacy
@pytest.mark.parametrize(
    "M,N,K",
    [
        (1, 4096, 4096),  # decode: BLOCK_M 64, BLOCK_N 32 (profile_linear's kernel names, H100)
        (3, 2112, 7168),  # N % 128 != 0, M % 4 != 0 (padded scale rows)
        (200, 7168, 1664),  # ceil(K/128) = 13
        (1000, 4096, 640),  # partial last M tile; M >= 512: DeepGEMM tries TMA multicast
        (4096, 4096, 4096),  # BLOCK_M 256
        (4099, 6144, 4096),  # M % 4 != 0 at large M
    ],
)
def test_cpp_launch_equals_deepgemm_launch(monkeypatch, M, N, K):
    q, s, weight, wsi = _operands(M, N, K)
    key = (M, N, K, q.device.index)
    deepgemm._plans.pop(key, None)
    first = deepgemm._gemm_impl(q, s, weight, wsi)  # DeepGEMM's own launch; records the plan
    plan = deepgemm._plans[key]
    assert plan, "the plan of a legacy kernel should be readable (see the INFO log for why not)"
    kernel, num_sms, block_m, block_n, smem, swizzle_d, multicast = plan
    assert kernel != 0 and block_m in (64, 128, 256) and multicast in (1, 2)
    poison_allocator(q.device)
    ours = deepgemm._gemm_impl(q, s, weight, wsi)  # the C++ launch
    monkeypatch.setattr(deepgemm, "OWN_LAUNCH", False)
    poison_allocator(q.device)
    theirs = deepgemm._gemm_impl(q, s, weight, wsi)  # DeepGEMM's own launch again
    torch.cuda.synchronize()
    assert ours.shape == (M, N) and ours.dtype == torch.bfloat16
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, theirs) and torch.equal(first, theirs)


@pytest.mark.gpu
@needs_legacy
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,bias,pow2", [(1, 256, 512, True, False), (7, 2112, 7168, False, True),
                                              (300, 4096, 640, True, False)])
def test_one_op_forward_equals_quantize_then_gemm(M, N, K, bias, pow2, x_dtype):
    """FP8Linear's DeepGEMM forward after the first call of a shape: quant + GEMM in one op call
    (fp8linear::deepgemm_linear), the same bytes as the quant op followed by the GEMM op."""
    from fp8linear import FP8Linear

    weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda") * 0.05, FP8, scale_ue8m0=pow2)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    layer = FP8Linear.from_quantized(weight, wsi, b, backend="deepgemm", scale_ue8m0=pow2)
    x = torch.randn(2, M, K, device="cuda", dtype=x_dtype)  # 3-D input: 2*M rows
    first = layer(x)  # DeepGEMM's own launch; records the plan
    prepared = layer._prepared["deepgemm"][1]
    x2d = x.reshape(-1, K)
    assert deepgemm._plans.get((2 * M, N, K, x.device.index)), "the one-op path should serve"
    poison_allocator(x.device)
    second = layer(x)  # the one-op path
    q, s = per_token_group_quant(x2d, 128, FP8, scale_layout="col", scale_ue8m0=pow2)
    two_ops = deepgemm.gemm(q, s, prepared, x_dtype, b).reshape(2, M, N)
    torch.cuda.synchronize()
    assert second.dtype == x_dtype and second.shape == (2, M, N)
    assert torch.equal(second, two_ops) and torch.equal(second, first)


# Run in a child process by conftest.assert_rejected_in_child (the lent H100's torch turns a C++ TORCH_CHECK
# into SIGSEGV); the child tells a rejected call from a crash.
_BAD_ARGUMENTS = r"""
import sys, torch
from fp8linear import per_token_group_quant
from fp8linear.backends import deepgemm
from fp8linear.weights import quantize_weight_blockwise
FP8 = torch.float8_e4m3fn
M, N, K = 64, 256, 512
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
q, s = per_token_group_quant(x, 128, FP8, scale_layout="col")
weight, wsi = quantize_weight_blockwise(torch.randn(N, K, device="cuda"), FP8)
if sys.argv[1] != "control":
    deepgemm._gemm_impl(q, s, weight, wsi)
    plan = deepgemm._plans[(M, N, K, q.device.index)]
    assert plan, "no plan recorded"
    op = torch.ops.fp8linear.deepgemm_gemm
    cases = {
        r"s must be [M, K/128]": lambda: op(q, s.contiguous(), weight, wsi, *plan),  # row-major scales
        "kernel must be a CUkernel handle": lambda: op(q, s, weight, wsi, 0, *plan[1:]),
        "N % 64 == 0": lambda: op(q, s, weight[:200], wsi, *plan),
        "q and weight must be float8_e4m3fn": lambda: op(q.view(torch.int8), s, weight, wsi, *plan),
        "multicast must be 1 or 2": lambda: op(q, s, weight, wsi, *plan[:-1], 3),
    }
"""


@pytest.mark.gpu
@needs_legacy
def test_cpp_launch_rejects_bad_arguments_with_clear_errors():
    assert_rejected_in_child(_BAD_ARGUMENTS)


# -- CPU: the bookkeeping, with a stand-in for DeepGEMM ---------------------------------------------------
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
    monkeypatch.setattr(deepgemm, "_plans", {})
    monkeypatch.setattr(deepgemm, "_logged", set())
    monkeypatch.setattr(deepgemm, "OWN_LAUNCH", True)

    def set_api(api):
        calls = []
        monkeypatch.setattr(deepgemm, "_api", lambda: (_fake_api(calls), api))
        return calls

    return set_api


def test_current_api_keeps_its_own_launch_and_says_why_once(fake_dg, caplog):
    calls = fake_dg("current")
    q, s, w, ws = _cpu_operands()
    with caplog.at_level(logging.INFO, logger=deepgemm.__name__):
        for _ in range(3):
            y = deepgemm._gemm_impl(q, s, w, ws)
    assert len(calls) == 3 and y.shape == (5, 64)
    assert deepgemm._plans == {(5, 64, 128, None): ()}
    lines = [r.getMessage() for r in caplog.records if "keeps its own launch" in r.getMessage()]
    assert len(lines) == 1 and "current API" in lines[0]


def test_unreadable_legacy_internals_keep_deepgemms_launch(fake_dg, monkeypatch, caplog):
    calls = fake_dg("legacy")
    # A deep_gemm whose internals are not where the plan reader looks.
    monkeypatch.setitem(sys.modules, "deep_gemm", types.ModuleType("deep_gemm"))
    for name in ("deep_gemm.jit_kernels", "deep_gemm.jit_kernels.gemm", "deep_gemm.jit_kernels.tuner",
                 "deep_gemm.jit_kernels.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    why = deepgemm._legacy_plan(5, 64, 128)
    assert isinstance(why, str) and "jit_kernels" in why
    q, s, w, ws = _cpu_operands()
    with caplog.at_level(logging.INFO, logger=deepgemm.__name__):
        ys = [deepgemm._gemm_impl(q, s, w, ws) for _ in range(2)]
    assert len(calls) == 2 and torch.equal(ys[0], ys[1])
    assert deepgemm._plans[(5, 64, 128, None)] == ()
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
    deepgemm._plans[(5, 64, 128, None)] = ()  # DeepGEMM's own launch for this shape
    deepgemm.linear(x, prepared, None, torch.bfloat16, FP8, False)
    assert len(two_ops) == 2
    deepgemm._plans[(5, 64, 128, None)] = (1, 132, 64, 64, 1000, 128, 1)
    calls = []
    monkeypatch.setattr(torch.ops.fp8linear, "deepgemm_linear", lambda *a: calls.append(a) or torch.zeros(5, 64))
    y = deepgemm.linear(x, prepared, torch.ones(64), torch.float16, FP8, True)
    assert len(calls) == 1 and calls[0][3] is True and calls[0][5:] == (1, 132, 64, 64, 1000, 128, 1)
    assert y.dtype == torch.float16 and torch.equal(y, torch.ones(5, 64, dtype=torch.float16))  # bias added
    monkeypatch.setattr(deepgemm, "OWN_LAUNCH", False)
    deepgemm.linear(x, prepared, None, torch.bfloat16, FP8, False)
    assert len(calls) == 1 and len(two_ops) == 3


def test_legacy_plan_reads_the_tuners_entry(monkeypatch):
    """The plan is read from DeepGEMM's tuner under the key gemm_fp8_fp8_bf16_nt builds, and refused for a
    kernel whose launch arguments are not the ones kernels/deepgemm_launch.cu passes."""
    config = (132, 128, 144, 5, (2, True), (200000, 0, 8))

    class Runtime:
        args = list(deepgemm._LEGACY_LAUNCH_ARGS)
        kernel = 0xABC000

    keys = {"N": 4096, "K": 7168, "BLOCK_M": 128, "BLOCK_N": 144, "SWIZZLE_D_MODE": 0, "BLOCK_N_PADDING": 8,
            "NUM_STAGES": 5, "NUM_TMA_MULTICAST": 2, "IS_TMA_MULTICAST_ON_A": True}
    tuner = types.SimpleNamespace(tuned={("gemm_fp8_fp8_bf16_nt", f"{dict(sorted(keys.items()))}"): (Runtime, {})})
    mods = {
        "deep_gemm": types.ModuleType("deep_gemm"),
        "deep_gemm.jit_kernels": types.ModuleType("deep_gemm.jit_kernels"),
        "deep_gemm.jit_kernels.gemm": types.SimpleNamespace(get_best_configs=lambda m, n, k, g, sms: config),
        "deep_gemm.jit_kernels.tuner": types.SimpleNamespace(jit_tuner=tuner),
        "deep_gemm.jit_kernels.utils": types.SimpleNamespace(get_num_sms=lambda: 132),
    }
    mods["deep_gemm"].jit_kernels = mods["deep_gemm.jit_kernels"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("gemm", "tuner", "utils"):
        setattr(mods["deep_gemm.jit_kernels"], name, mods[f"deep_gemm.jit_kernels.{name}"])
    assert deepgemm._legacy_plan(4096, 4096, 7168) == (0xABC000, 132, 128, 144, 200000, 0, 2)
    Runtime.args = Runtime.args[:-1]
    assert "other launch arguments" in deepgemm._legacy_plan(4096, 4096, 7168)
    Runtime.args = list(deepgemm._LEGACY_LAUNCH_ARGS)
    Runtime.kernel = None
    assert "not loaded" in deepgemm._legacy_plan(4096, 4096, 7168)
    assert "no kernel under the key" in deepgemm._legacy_plan(4096, 2048, 7168)
