"""Every GEMM backend on the GPU against the reference backend, plus auto, CUDA graphs and torch.compile.

Each case builds two FP8Linear modules over the same quantized weights, one with the backend under test
and one with backend="reference", on the same device: both quantize x with the same CUDA op (the
`row` and `col` layouts hold the same bits), so they see the same quantized activations and differ
only in the GEMM. A backend that cannot serve a case is skipped with its own reason (pytest -ra shows
it): DeepGEMM not importable, N % 64 != 0, and so on.
"""

from __future__ import annotations

import pytest
import torch

from conftest import poison_allocator
from fp8linear import FP8Linear
from fp8linear import backends
from fp8linear.weights import quantize_weight_blockwise

pytestmark = pytest.mark.gpu

FP8, INT8 = torch.float8_e4m3fn, torch.int8
REL_TOL = 1e-2  # ||y - ref|| / ||ref||, the bar every GPU backend is held to

M_CASES = (1, 3, 64, 1000)  # decode, M % 4 != 0 (cuBLASLt's row padding), one tile, many tiles + edge
NK_CASES = (
    (200, 300),  # N and K not multiples of 128 (triton, reference only)
    (256, 128),  # one K block
    (4096, 640),  # ceil(K/128) = 5: % 4 != 0, the case earlier torch got silently wrong
    (2112, 7168),  # DeepSeek-V3 q_a/kv_a projection: N % 128 != 0 (16.5 blocks), N % 64 == 0
    (7168, 1664),  # ceil(K/128) = 13
)
GEMM_BACKENDS = ("deepgemm", "cublas", "triton", "small_m", "sm90")  # small_m: M <= 16 only, K % 128 == 0


def _pair(N: int, K: int, dtype: torch.dtype, backend: str, bias: bool = True, device="cuda"):
    W = torch.randn(N, K, device=device) * 0.05
    weight, weight_scale_inv = quantize_weight_blockwise(W, dtype)
    b = torch.randn(N, device=device, dtype=torch.bfloat16) if bias else None
    mod = FP8Linear.from_quantized(weight, weight_scale_inv, b, backend=backend)
    ref = FP8Linear.from_quantized(weight, weight_scale_inv, b, backend="reference")
    return mod, ref


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _skip_unless_served(backend: str, M: int, N: int, K: int, dtype: torch.dtype) -> None:
    why = backends.unsupported_reason(backend, M, N, K, dtype, torch.device("cuda"))
    if why is not None:
        pytest.skip(f"{backend} cannot serve M={M} N={N} K={K} {dtype}: {why}")


@pytest.mark.parametrize("M", M_CASES)
@pytest.mark.parametrize("N,K", NK_CASES)
@pytest.mark.parametrize(
    "backend,dtype",
    [("deepgemm", FP8), ("cublas", FP8), ("triton", FP8), ("triton", INT8), ("small_m", FP8), ("small_m", INT8),
     ("sm90", FP8), ("sm90", INT8)],
    ids=["deepgemm", "cublas", "triton-fp8", "triton-int8", "small_m-fp8", "small_m-int8", "sm90", "sm90-int8"],
)
def test_backend_matches_reference(backend, dtype, N, K, M):
    _skip_unless_served(backend, M, N, K, dtype)
    mod, ref = _pair(N, K, dtype, backend)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    poison_allocator(x.device)
    y = mod(x)
    torch.cuda.synchronize()
    assert mod.backend_for(M, x.device).NAME == backends.canonical_name(backend)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all(), f"{backend}: non-finite output"
    err = _rel_err(y, ref(x))
    assert err <= REL_TOL, f"{backend} M={M} N={N} K={K} {dtype}: relative error {err:.3g} > {REL_TOL}"


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32])
def test_backend_other_input_dtypes_and_3d(backend, x_dtype):
    N, K = 512, 1024
    _skip_unless_served(backend, 6, N, K, FP8)
    mod, ref = _pair(N, K, FP8, backend)
    x = torch.randn(2, 3, K, device="cuda", dtype=x_dtype)
    y = mod(x)
    assert y.shape == (2, 3, N) and y.dtype == x_dtype
    assert _rel_err(y, ref(x)) <= REL_TOL


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_backend_no_bias_and_ue8m0(backend):
    N, K = 256, 512
    _skip_unless_served(backend, 8, N, K, FP8)
    W = torch.randn(N, K, device="cuda")
    weight, wsi = quantize_weight_blockwise(W, FP8, scale_ue8m0=True)
    mod = FP8Linear.from_quantized(weight, wsi, scale_ue8m0=True, backend=backend)
    ref = FP8Linear.from_quantized(weight, wsi, scale_ue8m0=True, backend="reference")
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    assert _rel_err(mod(x), ref(x)) <= REL_TOL


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_triton_measured_tiles_give_the_built_in_tiles_bits(dtype):
    """Every tile row this card's triton_configs.json holds: at an M inside its bucket the layer uses those
    tiles and matches the reference, and the GEMM gives the built-in tiles' bits (what
    scripts/tune_triton.py demanded of them)."""
    from fp8linear import per_token_group_quant
    from fp8linear.backends import triton_blockwise as tb

    key = {FP8: "e4m3", INT8: "int8"}[dtype]
    card_rows = [r for r in tb._measured_rows(torch.cuda.get_device_name()) if r["dtype"] == key]
    if not any(r["config"] is not None for r in card_rows):
        pytest.skip(f"no measured Triton tiles for {key} on {torch.cuda.get_device_name()}")
    lowers = [0] + [r["M_max"] for r in card_rows]
    for N, K in ((200, 300), (2112, 7168)):
        mod, ref = _pair(N, K, dtype, "triton")
        for row, lower in zip(card_rows, lowers):
            m_max, cfg = row["M_max"], row["config"]
            if cfg is None:
                continue
            M = (lower + 1 + m_max) // 2  # inside the bucket (lower, m_max]
            assert tb.config_for(M, N, dtype, torch.device("cuda")) == cfg
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            assert _rel_err(mod(x), ref(x)) <= REL_TOL, (N, K, M, cfg)
            Kp = -(-K // 128) * 128
            q, s = per_token_group_quant(torch.nn.functional.pad(x, (0, Kp - K)), 128, dtype, scale_layout="row")
            w, ws = mod.weight, mod.weight_scale_inv
            measured = tb._gemm_impl(q, s, w, ws, mod.bias, torch.bfloat16, config=cfg)
            built_in = tb._gemm_impl(q, s, w, ws, mod.bias, torch.bfloat16, config=tb._default_config(M, N))
            assert torch.equal(measured.view(torch.int16), built_in.view(torch.int16)), (N, K, M, cfg)


def test_empty_batch_on_gpu():
    mod, _ = _pair(256, 256, FP8, "auto")
    y = mod(torch.randn(0, 256, device="cuda", dtype=torch.bfloat16))
    assert y.shape == (0, 256)


@pytest.mark.parametrize("M", M_CASES + (4096,))
@pytest.mark.parametrize("N,K", NK_CASES)
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_auto_choice_serves_the_shape(dtype, N, K, M):
    chosen = backends.select("auto", M, N, K, dtype, "cuda")
    assert chosen.NAME != "reference", "a GPU backend should serve every shape on an H100"
    assert backends.unsupported_reason(chosen.NAME, M, N, K, dtype, torch.device("cuda")) is None
    mod, ref = _pair(N, K, dtype, "auto")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert _rel_err(mod(x), ref(x)) <= REL_TOL
    assert "auto (" in mod.extra_repr()


@pytest.mark.parametrize("backend", ("auto",) + GEMM_BACKENDS)
@pytest.mark.parametrize("M", [3, 64])
def test_cuda_graph_replay_equals_eager(backend, M):
    N, K = 2048, 1024
    _skip_unless_served(backend if backend != "auto" else "reference", M, N, K, FP8)
    mod, _ = _pair(N, K, FP8, backend)
    static_x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: backend choice, prepared weight, JIT builds
        for _ in range(2):
            mod(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mod(static_x)
    for _ in range(2):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        eager = mod(x)
        assert torch.equal(static_y, eager), f"{backend}: graph replay differs from eager"


@pytest.mark.parametrize("backend", ("auto",) + GEMM_BACKENDS)
def test_torch_compile_fullgraph(backend):
    N, K, M = 1024, 512, 16
    _skip_unless_served(backend if backend != "auto" else "reference", M, N, K, FP8)
    mod, _ = _pair(N, K, FP8, backend)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    eager = mod(x)  # warm-up fills the per-M choice and the prepared weight
    compiled = torch.compile(mod, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, eager, rtol=1e-2, atol=1e-2)
    x2 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x2), mod(x2), rtol=1e-2, atol=1e-2)
