"""FP8Linear, FP8Config and the backend registry on CPU (the reference backend; the Triton kernel under
Triton's interpreter when triton is installed). GPU backends: tests/test_backends_gpu.py."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from conftest import assert_bitwise_equal
from fp8linear import FP8Linear
from fp8linear import backends
from fp8linear.backends import BackendUnsupportedError, auto
from fp8linear.config import Backend, FP8Config
from fp8linear.reference import per_token_group_quant_reference
from fp8linear.weights import quantize_weight_blockwise

FP8, INT8 = torch.float8_e4m3fn, torch.int8


# -- an emulation written apart from the module and the backends --------------------------------------
def emulate(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias, dtype, scale_ue8m0=False):
    """dequant(quant_1x128(x)) @ dequant(W)^T + bias in fp32, step by step, cast to x's dtype."""
    K = x.shape[-1]
    N = weight.shape[0]
    Kp = -(-K // 128) * 128
    x2d = torch.cat([x.reshape(-1, K), x.new_zeros(x.numel() // K, Kp - K)], dim=1)  # zero columns
    q, s = per_token_group_quant_reference(x2d, 128, dtype, scale_ue8m0)
    a = (q.float().reshape(-1, Kp // 128, 128) * s[:, :, None]).reshape(-1, Kp)[:, :K]
    w_scale = weight_scale_inv.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    w = weight.float() * w_scale
    y = a.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return y.float().to(x.dtype).reshape(*x.shape[:-1], N)


def assert_close_to(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: summation-order tolerance; bf16/fp16: one rounding of the output on top."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[y.dtype]
    scale = ref.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)


def make_linear(K: int, N: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)  # not the default init's tiny range only
        if bias:
            lin.bias.normal_()
    return lin


# -- the module against the emulation -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize(
    "N,K",
    [
        (256, 256),  # whole blocks
        (200, 300),  # partial edge blocks in N and K; K padded to 384
        (130, 513),  # one column past a block; 3 rows in the last N block
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_emulation(dtype, N, K, bias):
    lin = make_linear(K, N, bias)
    m = FP8Linear.from_linear(lin, dtype=dtype)
    x = torch.randn(5, K) * 4
    ref = emulate(x, m.weight, m.weight_scale_inv, m.bias, dtype)
    assert_close_to(m(x), ref)
    # from_linear stores exactly DESIGN.md's weight quantization
    w, ws = quantize_weight_blockwise(lin.weight, dtype)
    assert_bitwise_equal(m.weight, w, "weight")
    assert_bitwise_equal(m.weight_scale_inv, ws, "weight_scale_inv")


@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 1, 3)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_leading_dims_and_input_dtypes(shape, x_dtype):
    K, N = 300, 200
    m = FP8Linear.from_linear(make_linear(K, N))
    x = (torch.randn(*shape, K) * 2).to(x_dtype)
    y = m(x)
    assert y.shape == (*shape, N) and y.dtype == x_dtype
    assert_close_to(y, emulate(x, m.weight, m.weight_scale_inv, m.bias, FP8))


def test_non_contiguous_input():
    K, N = 256, 128
    m = FP8Linear.from_linear(make_linear(K, N))
    base = torch.randn(K, 6)
    x = base.t()  # [6, K] with element stride 6 along K
    assert_close_to(m(x), emulate(x.contiguous(), m.weight, m.weight_scale_inv, m.bias, FP8))


def test_scale_ue8m0():
    K, N = 384, 256
    lin = make_linear(K, N)
    m = FP8Linear.from_linear(lin, scale_ue8m0=True)
    ws = m.weight_scale_inv
    assert torch.equal(ws, torch.exp2(torch.log2(ws).round())), "weight scales must be powers of two"
    x = torch.randn(4, K)
    assert_close_to(m(x), emulate(x, m.weight, m.weight_scale_inv, m.bias, FP8, scale_ue8m0=True))


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(lead):
    m = FP8Linear.from_linear(make_linear(300, 200))
    y = m(torch.randn(*lead, 300, dtype=torch.bfloat16))
    assert y.shape == (*lead, 200) and y.dtype == torch.bfloat16


def test_close_to_float_linear():
    """A sanity bound, not the contract: fp8 blockwise stays within a few percent of the fp32 layer."""
    lin = make_linear(512, 256)
    x = torch.randn(16, 512)
    for dtype, bound in ((FP8, 0.06), (INT8, 0.02)):
        y = FP8Linear.from_linear(lin, dtype=dtype)(x)
        ref = lin(x).detach()
        assert ((y - ref).norm() / ref.norm()).item() < bound


# -- construction, state dict, the original module -------------------------------------------------------
def test_from_linear_leaves_original_untouched():
    lin = make_linear(300, 200)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = FP8Linear.from_linear(lin)
    assert_bitwise_equal(lin.weight.detach(), w0, "linear.weight")
    assert_bitwise_equal(lin.bias.detach(), b0, "linear.bias")
    assert type(lin.weight) is nn.Parameter and lin.weight.dtype == torch.float32
    assert m.bias.data_ptr() != lin.bias.data_ptr(), "the bias must be a copy, not shared"
    assert m.in_features == 300 and m.out_features == 200
    assert not m.weight.requires_grad and not m.weight_scale_inv.requires_grad


def test_parameters_follow_checkpoint_convention():
    m = FP8Linear(300, 200)
    sd = m.state_dict()
    assert list(sd) == ["weight", "weight_scale_inv", "bias"]
    assert sd["weight"].dtype == FP8 and sd["weight"].shape == (200, 300)
    assert sd["weight_scale_inv"].dtype == torch.float32 and sd["weight_scale_inv"].shape == (2, 3)
    assert list(FP8Linear(300, 200, bias=False, dtype=INT8).state_dict()) == ["weight", "weight_scale_inv"]
    assert FP8Linear(300, 200, dtype=INT8).weight.dtype == INT8


def test_meta_construction_is_cheap_and_loads_with_assign():
    src = FP8Linear.from_linear(make_linear(300, 200))
    m = FP8Linear(300, 200, device="meta")
    assert m.weight.is_meta and m.weight_scale_inv.is_meta and m.bias.is_meta
    m.load_state_dict(src.state_dict(), assign=True)
    assert not m.weight.is_meta
    x = torch.randn(3, 300)
    assert_bitwise_equal(m(x), src(x), "y after assign-load")


def test_state_dict_round_trip_both_ways():
    a = FP8Linear.from_linear(make_linear(300, 200))
    b = FP8Linear(300, 200)
    b.load_state_dict(a.state_dict())  # copy into existing storage
    x = torch.randn(4, 300)
    assert_bitwise_equal(b(x), a(x), "y after copy-load")
    c = FP8Linear.from_linear(make_linear(300, 200))
    a.load_state_dict(c.state_dict())  # and back over a module that has already run
    assert_bitwise_equal(a(x), c(x), "y after reload")


def test_from_quantized():
    lin = make_linear(300, 200)
    w, ws = quantize_weight_blockwise(lin.weight)
    m = FP8Linear.from_quantized(w, ws, lin.bias.detach())
    assert m.weight.data_ptr() == w.data_ptr(), "from_quantized must not copy"
    x = torch.randn(2, 300)
    assert_close_to(m(x), emulate(x, w, ws, lin.bias.detach(), FP8))
    with pytest.raises(ValueError, match=r"weight_scale_inv must be float32 of shape \[2, 3\]"):
        FP8Linear.from_quantized(w, ws[:1])
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \[200\]"):
        FP8Linear.from_quantized(w, ws, torch.zeros(3))


def test_prepared_weight_cache_is_dropped_on_replacement():
    m = FP8Linear.from_linear(make_linear(256, 128))
    x = torch.randn(2, 256)
    m(x)
    assert "reference" in m._prepared
    m.load_state_dict(FP8Linear.from_linear(make_linear(256, 128)).state_dict())
    assert m._prepared == {}
    m(x)
    m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
    assert m._prepared == {}
    m(x)
    m.to(torch.device("cpu"))
    assert m._prepared == {} and m._choice == {}
    # In-place writes bump the version the cache is keyed on.
    m(x)
    other = FP8Linear.from_linear(make_linear(256, 128))
    with torch.no_grad():
        m.weight.copy_(other.weight)
        m.weight_scale_inv.copy_(other.weight_scale_inv)
        m.bias.copy_(other.bias)
    assert_bitwise_equal(m(x), other(x), "y after in-place update")


def test_row_aligned_backend_path(monkeypatch):
    """The cuBLASLt flow on CPU: q and `col` scales quantized into M_pad = ceil(M/4)*4 rows (padding rows
    unwritten, poisoned here), the GEMM run over M_pad rows, y's padding rows dropped."""
    import types

    from fp8linear.backends import reference
    from fp8linear.layouts import ScaleLayout

    seen = {}

    def gemm(q, s, prepared, out_dtype, bias):
        seen["q"], seen["s"] = q.shape, (tuple(s.shape), s.stride())
        q = q.view(torch.uint8).clone()
        q[5:] = 0x7F  # whatever the padding rows hold must not reach rows < M
        return reference.gemm(q.view(FP8), s, prepared, out_dtype, bias)

    fake = types.SimpleNamespace(NAME="fake4", SCALE_LAYOUT=ScaleLayout.COL, ROW_ALIGN=4,
                                 prepare_weight=reference.prepare_weight, gemm=gemm,
                                 linear=functools.partial(backends.quantize_then_gemm, gemm, ScaleLayout.COL, 4))
    m = FP8Linear.from_linear(make_linear(300, 200))
    m._choice[5] = fake
    x = torch.randn(5, 300)
    y = m(x)
    assert seen["q"] == (8, 384) and seen["s"] == ((8, 3), (1, 8))
    assert y.shape == (5, 200)
    assert_close_to(y, emulate(x, m.weight, m.weight_scale_inv, m.bias, FP8))


def test_torch_compile_fullgraph_traces_forward():
    """Dynamo traces forward in one graph after a warm-up call (aot_eager: no C++ build on CPU)."""
    m = FP8Linear.from_linear(make_linear(300, 200))
    x = torch.randn(2, 3, 300)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(compiled(x), eager, "compiled y")
    x2 = torch.randn(2, 3, 300)
    assert_bitwise_equal(compiled(x2), m(x2), "compiled y, new input")


# -- display -------------------------------------------------------------------------------------------
def test_extra_repr():
    m = FP8Linear.from_linear(make_linear(300, 200))
    assert repr(m) == (
        "FP8Linear(in_features=300, out_features=200, bias=True, dtype=e4m3, block_size=128x128, "
        "scale_ue8m0=False, backend=auto (all M: reference))"
    )
    m = FP8Linear(300, 200, bias=False, dtype=INT8, scale_ue8m0=True, backend="triton", device="meta")
    assert m.extra_repr() == (
        "in_features=300, out_features=200, bias=False, dtype=int8, block_size=128x128, "
        "scale_ue8m0=True, backend=triton (row scales)"
    )
    assert FP8Linear(256, 256, device="meta").extra_repr().endswith("backend=auto (chosen per M on first forward)")
    assert FP8Linear(256, 256, backend="cublas", device="meta").extra_repr().endswith("backend=cublaslt (col scales)")  # alias "cublas" reads as its name


# -- rejections ----------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    m = FP8Linear.from_linear(make_linear(300, 200))
    with pytest.raises(ValueError, match=r"last dim must be in_features=300; got x of shape \[4, 299\]"):
        m(torch.randn(4, 299))
    with pytest.raises(TypeError, match="bfloat16, float16 or float32; got torch.float64"):
        m(torch.randn(4, 300, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        m(torch.randn(4, 300, device="meta"))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(block_size=(64, 64)), ValueError, r"block_size must be \(128, 128\).*got \(64, 64\)"),
        (dict(dtype=torch.float16), ValueError, "dtype must be torch.float8_e4m3fn or torch.int8; got torch.float16"),
        (dict(backend="cutlass"), ValueError, "backend must be one of 'auto', .*; got 'cutlass'"),
        (dict(scale_ue8m0=1), ValueError, "scale_ue8m0 must be a bool; got 1"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FP8Linear(256, 256, **kwargs)
    with pytest.raises(exc, match=match):
        FP8Linear.from_linear(make_linear(256, 256), **kwargs)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="in_features must be a positive int; got 0"):
        FP8Linear(0, 8)
    with pytest.raises(TypeError, match="must be a torch.nn.Linear; got Conv1d"):
        FP8Linear.from_linear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize(
    "backend,match",
    [
        ("cublaslt", "needs a CUDA device; got cpu"),
        ("deepgemm", "needs a CUDA device; got cpu"),
        ("triton", "(needs a CUDA device|triton not importable)"),
    ],
)
def test_explicit_backend_that_cannot_serve_raises(backend, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = FP8Linear.from_linear(make_linear(256, 256), backend=backend)
    with pytest.raises(BackendUnsupportedError, match=rf"backend='{backend}' cannot serve M=2, N=256, K=256.*{match}"):
        m(torch.randn(2, 256))


def test_backend_reasons_name_the_constraint():
    cpu = torch.device("cpu")
    assert backends.unsupported_reason("reference", 3, 200, 300, INT8, cpu) is None
    assert "dtype torch.int8 is not one of torch.float8_e4m3fn" in backends.unsupported_reason("cublas", 3, 256, 256, INT8, cpu)
    assert "is not one of torch.float8_e4m3fn" in backends.unsupported_reason("deepgemm", 3, 256, 256, INT8, cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.get("auto")


# -- auto --------------------------------------------------------------------------------------------
def test_auto_table_lookup():
    rows = [
        {"dtype": "e4m3", "N": 4096, "K": 4096, "M_max": 64, "backend": "cublas"},
        {"dtype": "e4m3", "N": 4096, "K": 4096, "M_max": 512, "backend": "triton"},
        {"dtype": "e4m3", "N": 4096, "K": 4096, "M_max": 16384, "backend": "deepgemm"},
        {"dtype": "int8", "N": 4096, "K": 4096, "M_max": 16384, "backend": "triton"},
    ]
    assert auto.lookup(rows, 1, 4096, 4096, FP8) == "cublaslt"  # an earlier name, read as today's
    assert auto.lookup(rows, 64, 4096, 4096, FP8) == "cublaslt"
    assert auto.lookup(rows, 65, 4096, 4096, FP8) == "triton"
    assert auto.lookup(rows, 10**6, 4096, 4096, FP8) == "deepgemm"  # beyond the table: its last row
    assert auto.lookup(rows, 8, 4096, 4096, INT8) == "triton"
    assert auto.lookup(rows, 8, 4096, 7168, FP8) is None


def test_auto_on_a_cpu_device_is_the_reference():
    assert auto.choose(5, 200, 300, FP8, torch.device("cpu")) == "reference"
    assert auto.describe(200, 300, FP8, torch.device("cpu")) == "all M: reference"
    assert backends.select("auto", 5, 200, 300, FP8, "cpu").NAME == "reference"


#: Every edge of auto's M buckets, and layers from narrow to wide (the K of a GQA k/v projection, DeepSeek-V3's
#: q_a/kv_a projection and an MoE up projection among them).
_HEURISTIC_MS = sorted({M + d for M in auto.M_BUCKETS for d in (-1, 0, 1) if M + d >= 1})
_HEURISTIC_NK = [(128, 128), (256, 7168), (1024, 4096), (2048, 2048), (2112, 7168), (4096, 4096), (57344, 7168)]


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_auto_heuristic_names_a_gemm_backend_that_takes_the_shape(dtype):
    """What heuristic()'s docstring promises, as properties rather than its thresholds: it names a GEMM
    backend (never `auto` itself, never the slow reference on a GPU) whose declared element types hold the
    dtype and whose M range holds M (fused_mma, the M <= 16 kernel, nowhere above its MAX_M), and for fp8
    above M = 8 never the Triton GEMM. Where the named backend still refuses the shape, `choose` falls
    back (next test)."""
    for M in _HEURISTIC_MS:
        for N, K in _HEURISTIC_NK:
            name = auto.heuristic(M, N, K, dtype)
            where = f"heuristic({M}, {N}, {K}, {dtype}) = {name!r}"
            assert name in backends.NAMES and name not in ("auto", "reference"), where
            module = backends.get(name)
            assert dtype in module.DTYPES, where
            assert module.MAX_M is None or M <= module.MAX_M, where
            if dtype == FP8 and M > 8:
                assert name != "triton", where


def test_auto_falls_back_in_order_when_the_named_backend_refuses(monkeypatch):
    """On a card its table does not know, `choose` takes heuristic()'s pick where that backend serves the
    shape; else the first backend of FALLBACK_ORDER that does (the reference last, which serves
    everything); and with none it raises naming every refusal."""
    from fp8linear.backends import card_tables

    monkeypatch.setattr(card_tables, "device_name", lambda device: "a card no table knows")
    refused: set = set()
    monkeypatch.setattr(auto, "unsupported_reason",
                        lambda name, M, N, K, dtype, device: f"{name} refused here" if name in refused else None)
    cuda = torch.device("cuda", 0)
    for M, N, K, dtype in ((1, 4096, 4096, FP8), (300, 2112, 7168, FP8), (4096, 4096, 4096, INT8)):
        refused.clear()
        pick = auto.heuristic(M, N, K, dtype)
        assert auto.choose(M, N, K, dtype, cuda) == pick
        refused.add(pick)
        first, second = [b for b in backends.FALLBACK_ORDER if b != pick][:2]
        assert auto.choose(M, N, K, dtype, cuda) == first
        refused.add(first)
        assert auto.choose(M, N, K, dtype, cuda) == second
        refused.update(b for b in backends.FALLBACK_ORDER if b != "reference")
        assert auto.choose(M, N, K, dtype, cuda) == "reference"
        refused.add("reference")
        with pytest.raises(RuntimeError, match=rf"no backend can serve M={M}.*{pick} refused here.*reference refused"):
            auto.choose(M, N, K, dtype, cuda)


def test_shipped_auto_table_is_valid_json():
    import json

    data = json.loads(auto.table_path().read_text())
    assert isinstance(data, dict)
    for name, entry in data.items():
        if name.startswith("_"):
            continue
        for row in entry["rows"]:
            assert set(row) >= {"dtype", "N", "K", "M_max", "backend", "commit"}  # commit: which code measured it
            assert row["backend"] in backends.NAMES


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [FP8Config(), FP8Config(dtype=INT8, scale_ue8m0=True, backend="triton"), FP8Config(backend=Backend.CUBLASLT)],
)
def test_config_round_trip(config):
    d = config.to_quantization_config()
    # INT8 folders name a method no other reader knows, so transformers/vLLM/SGLang refuse them.
    assert d["quant_method"] == ("fp8" if config.dtype == torch.float8_e4m3fn else "fp8linear_int8")
    assert d["weight_block_size"] == [128, 128] and d["activation_scheme"] == "dynamic"
    assert FP8Config.from_quantization_config(d) == config
    m = FP8Linear(256, 256, device="meta", **config.module_kwargs())
    assert m.config == config


def test_config_reads_deepseek_v3():
    d = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert FP8Config.from_quantization_config(d) == FP8Config()
    d31 = dict(d, scale_fmt="ue8m0")
    assert FP8Config.from_quantization_config(d31, backend="triton") == FP8Config(scale_ue8m0=True, backend="triton")


@pytest.mark.parametrize(
    "d,match",
    [
        ({"quant_method": "gptq"}, "quant_method'\\] must be 'fp8' \\(or 'fp8linear_int8'\\); got 'gptq'"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "must be 'dynamic'.*got 'static'"),
        ({"quant_method": "fp8", "weight_block_size": None}, "per-tensor"),
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"block_size must be \(128, 128\)"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt'\\] must be one of"),
        ({"quant_method": "fp8", "fmt": "int8"}, "int8 weights go with quant_method='fp8linear_int8'"),
    ],
)
def test_config_rejects(d, match):
    with pytest.raises(ValueError, match=match):
        FP8Config.from_quantization_config(d)


def test_config_is_frozen_and_validates_group():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        FP8Config().scale_ue8m0 = True
    with pytest.raises(ValueError, match=r"activation_group_size must equal block_size\[1\]=128 .*; got 64"):
        FP8Config(activation_group_size=64)


# -- the Triton kernel's indexing, under Triton's CPU interpreter (conftest.triton_interpreter) ---------
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("M,N,K", [(3, 200, 300), (17, 160, 256), (70, 130, 129)])
def test_triton_kernel_interpreted(triton_interpreter, dtype, M, N, K):
    m = FP8Linear.from_linear(make_linear(K, N), dtype=dtype, backend="triton")
    x = torch.randn(M, K) * 3
    y = m(x)
    assert m._choice[M].NAME == "triton"
    ref = emulate(x, m.weight, m.weight_scale_inv, m.bias, dtype)
    assert_close_to(y, ref)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert_close_to(yb, emulate(x.bfloat16(), m.weight, m.weight_scale_inv, m.bias, dtype))


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize(
    "cfg",
    [dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, num_warps=4, num_stages=2),
     dict(BLOCK_M=32, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=3)],
    ids=["wide-tiles-span-weight-blocks", "narrow-tiles"])
def test_triton_kernel_any_tile_width(triton_interpreter, dtype, cfg):
    """Tiles wider than a 128-row weight block read one weight scale per column; N = 300 leaves a partial
    last block and masked columns inside a tile."""
    from fp8linear.backends import triton_blockwise as tb

    M, N, K = 37, 300, 384
    m = FP8Linear.from_linear(make_linear(K, N), dtype=dtype, backend="reference")
    x = torch.randn(M, K) * 3
    q, s = per_token_group_quant_reference(x, 128, dtype, False)
    y = tb._gemm_impl(q, s, m.weight, m.weight_scale_inv, m.bias, torch.float32, config=tb.check_config(cfg))
    assert_close_to(y, emulate(x, m.weight, m.weight_scale_inv, m.bias, dtype))


def test_triton_configs_table_per_card_and_bucket(tmp_path, monkeypatch):
    """Rows measured for the card pick the tiles per dtype and M bucket (M past the last bucket takes the
    last); another card, or a dtype without rows, keeps the built-in tiles; bad rows name the field."""
    import json

    from fp8linear.backends import card_tables
    from fp8linear.backends import triton_blockwise as tb

    def cfg(bm, bn):
        return dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=8, num_stages=3)

    rows = [{"dtype": "int8", "M_max": 4096, "config": cfg(128, 256)},
            {"dtype": "int8", "M_max": 64, "config": cfg(64, 64)},
            {"dtype": "int8", "M_max": 256, "config": None},  # measured, and the built-in tiles stayed
            {"dtype": "e4m3", "M_max": 256, "config": cfg(128, 128)}]
    path = tmp_path / tb.TABLE_FILE
    path.write_text(json.dumps({"Card A": {"meta": {}, "rows": rows}}))
    monkeypatch.setenv(card_tables.TABLES_ENV, str(tmp_path))
    tb._measured_rows.cache_clear()
    monkeypatch.setattr(card_tables, "device_name", lambda device: "Card A")
    dev = torch.device("cuda", 0)
    assert tb.config_for(1, 4096, INT8, dev) == cfg(64, 64)
    assert tb.config_for(64, 4096, INT8, dev) == cfg(64, 64)
    assert tb.config_for(65, 4096, INT8, dev) == tb._default_config(65, 4096)
    assert tb.config_for(257, 4096, INT8, dev) == cfg(128, 256)
    assert tb.config_for(16384, 4096, INT8, dev) == cfg(128, 256)
    assert tb.config_for(1000, 4096, FP8, dev) == cfg(128, 128)
    assert tb.config_for(1000, 4096, INT8, torch.device("cpu")) == tb._default_config(1000, 4096)
    monkeypatch.setattr(card_tables, "device_name", lambda device: "Card B")
    assert tb.config_for(1000, 4096, INT8, dev) == tb._default_config(1000, 4096)

    bad_rows = [({"dtype": "int8", "M_max": 64, "config": {**cfg(64, 64), "BLOCK_N": 96}}, "BLOCK_N must be one of"),
                ({"dtype": "int8", "M_max": 64, "config": {**cfg(64, 64), "num_stages": 0}}, "num_stages must be"),
                ({"dtype": "int8", "M_max": 64, "config": {**cfg(64, 64), "extra": 1}}, "exactly the keys"),
                ({"dtype": "fp16", "M_max": 64, "config": cfg(64, 64)}, "dtype must be one of"),
                ({"dtype": "int8", "M_max": 0, "config": cfg(64, 64)}, "M_max must be a positive int")]
    for i, (row, match) in enumerate(bad_rows):
        bad_dir = tmp_path / f"bad{i}"  # a new file each: the loader caches what it read
        bad_dir.mkdir()
        (bad_dir / tb.TABLE_FILE).write_text(json.dumps({"Card B": {"rows": [row]}}))
        monkeypatch.setenv(card_tables.TABLES_ENV, str(bad_dir))
        tb._measured_rows.cache_clear()
        with pytest.raises(ValueError, match=match):
            tb.config_for(8, 4096, INT8, dev)
    tb._measured_rows.cache_clear()


def test_deepcopy_after_forward_gives_an_independent_equal_layer():
    """The per-M backend cache holds Python modules, which cannot be copied: a copy starts with empty caches."""
    import copy

    layer = FP8Linear.from_linear(torch.nn.Linear(256, 192), backend="reference")
    x = torch.randn(5, 256)
    y = layer(x)
    clone = copy.deepcopy(layer)
    assert clone._choice == {} and clone._prepared == {}
    assert clone.weight.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(clone(x), y)


def test_forward_on_a_layer_built_under_inference_mode():
    """Inference tensors keep no version counter: the prepared-weight cache must not read it."""
    with torch.inference_mode():
        layer = FP8Linear.from_linear(torch.nn.Linear(256, 128), backend="reference")
        x = torch.randn(3, 256)
        y = layer(x)
        assert torch.equal(layer(x), y)
