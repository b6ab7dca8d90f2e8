"""FP8Experts and the grouped GEMM backends on a GPU (marked `gpu`; skipped without CUDA).

The grouped Triton and DeepGEMM GEMMs against the grouped reference on the same quantized operands (a
fp8 tensor-core accumulation bound, then one bf16 rounding), FP8Experts on each backend against the reference backend,
and decode in the masked and indexed layouts under CUDA-graph capture, whose output must equal eager's bit
for bit (same kernels, same inputs). DeepGEMM cases skip, with the reason, where deep_gemm is not importable.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, assert_bitwise_equal
from fp8linear import backends
from fp8linear.moe import FP8Experts, route
from fp8linear.reference import dequantize_groups, per_token_group_quant_reference
from fp8linear.weights import dequantize_weight_blockwise, quantize_weight_blockwise

pytestmark = pytest.mark.gpu

FP8, INT8 = torch.float8_e4m3fn, torch.int8
GROUPED = ("triton", "deepgemm")


def _skip_unless_serves(name: str, E: int, N: int, K: int, dtype: torch.dtype, grouping: str) -> None:
    why = backends.grouped_unsupported_reason(name, E, N, K, dtype, torch.device("cuda"), grouping)
    if why is not None:
        pytest.skip(f"{name}: {why}")


def _operands(E, N, K, rows, dtype, seed=0):
    """q [rows, K], row scales, E random experts, all on the GPU (quantized on the CPU reference)."""
    g = torch.Generator().manual_seed(seed)
    q, s = per_token_group_quant_reference(torch.randn(rows, K, generator=g) * 3, 128, dtype)
    parts = [quantize_weight_blockwise(torch.randn(N, K, generator=g), dtype) for _ in range(E)]
    w = torch.stack([p[0] for p in parts]).cuda(), torch.stack([p[1] for p in parts]).cuda()
    return q.cuda(), s.cuda(), w


def _in_layout(s_row: torch.Tensor, module, batch=()) -> torch.Tensor:
    """Row scales [*, M, G] copied into the backend's scale layout."""
    from fp8linear.layouts import empty_scales

    M, G = s_row.shape[-2], s_row.shape[-1]
    return empty_scales(batch, M, G, module.SCALE_LAYOUT, s_row.device).copy_(s_row)


def _assert_close_rows(y, expected, q, s, prepared, rows_experts):
    """bf16 y within an accumulation bound of the fp32 reference plus one bf16 rounding, on the listed rows.

    Hopper's fp8 tensor cores keep about 14 bits while they sum a 128-wide K block (DeepSeek-V3 technical
    report, "Increasing Accumulation Precision"), far fewer than fp32's 24, so the accumulation term is
    2^-11 of sum_k |a_k w_k| (the 14 bits with a factor 8 to spare), not fp32's K-derived one; int8 sums
    are exact and pass it with room."""
    weight, scales = prepared
    a = dequantize_groups(q, s).abs()
    for r, e in rows_experts:
        w = dequantize_weight_blockwise(weight[e], scales[e]).abs()
        mag = a[r] @ w.t()
        bound = 2**-11 * mag + 2**-8 * expected[r].float().abs() + 1e-30
        err = (y[r].float() - expected[r].float()).abs()
        assert bool((err <= bound).all()), f"row {r} (expert {e}): max err {err.max().item()}"


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_grouped_contiguous_matches_reference(name, dtype):
    E, N, K = 6, 512, 384
    _skip_unless_serves(name, E, N, K, dtype, "contiguous")
    module = backends.get_grouped(name)
    align = module.CONTIGUOUS_ALIGN
    # E not a power of two, empty experts, segments ending inside a 128-row block
    counts = [379, 0, 128, 1, 0, 256]
    padded = [-(-c // align) * align for c in counts]
    m_indices = torch.cat([torch.full((p,), e, dtype=torch.int32) for e, p in enumerate(padded)]).cuda()
    q, s, prepared = _operands(E, N, K, m_indices.numel(), dtype)
    y = module.grouped_gemm_contiguous(q, _in_layout(s, module), module.prepare_grouped_weight(*prepared),
                                       m_indices, torch.bfloat16)
    ref = backends.get_grouped("reference")
    expected = ref.grouped_gemm_contiguous(q, s, ref.prepare_grouped_weight(*prepared), m_indices, torch.float32)
    first = [sum(padded[:e]) for e in range(E)]
    rows = [(first[e] + r, e) for e in range(E) for r in range(counts[e])]  # padding rows are unspecified
    _assert_close_rows(y, expected, q, s, prepared, rows)


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_grouped_masked_matches_reference(name, dtype):
    E, N, K = 5, 512, 256
    _skip_unless_serves(name, E, N, K, dtype, "masked")
    module = backends.get_grouped(name)
    max_m = module.masked_rows(96)
    masked_m = torch.tensor([96, 0, 1, 40, 7], dtype=torch.int32).cuda()
    q, s, prepared = _operands(E, N, K, E * max_m, dtype)
    q3, s3 = q.view(E, max_m, K), s.view(E, max_m, K // 128)
    y = module.grouped_gemm_masked(q3, _in_layout(s3, module, (E,)), module.prepare_grouped_weight(*prepared),
                                   masked_m, 32, torch.bfloat16)
    ref = backends.get_grouped("reference")
    expected = ref.grouped_gemm_masked(q3, s3, ref.prepare_grouped_weight(*prepared), masked_m, 32, torch.float32)
    rows = [(e * max_m + r, e) for e in range(E) for r in range(int(masked_m[e]))]
    _assert_close_rows(y.view(-1, N), expected.view(-1, N), q, s, prepared, rows)


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("rows_per_expert", [1, 40, 90, 600], ids=lambda r: f"{r}-rows")  # each tile config
def test_grouped_indexed_matches_reference(dtype, rows_per_expert):
    from fp8linear.backends import triton_grouped

    E, N, K, k = 6, 512, 384, 2
    _skip_unless_serves("triton", E, N, K, dtype, "indexed")
    T = max(1, rows_per_expert * E // k)
    g = torch.Generator().manual_seed(rows_per_expert)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    index[index == 1] = 4  # an expert without rows; expert 4 with about twice the others'
    index[0, 0] = -1  # pairs naming no expert, sorted first and last
    index[-1, -1] = E
    index = index.cuda()
    pairs = backends.SortedPairs.of(index, E)
    q, s, prepared = _operands(E, N, K, T, dtype)
    ref = backends.get_grouped("reference")
    y = triton_grouped.grouped_gemm_indexed(q, s, prepared, pairs, "gather", torch.bfloat16)
    expected = ref.grouped_gemm_indexed(q, s, ref.prepare_grouped_weight(*prepared), pairs, "gather", torch.float32)
    experts = index.reshape(-1)[pairs.perm].tolist()
    tokens = (pairs.perm // k).tolist()
    rows = [(p, e) for p, e in enumerate(experts) if 0 <= e < E]
    _assert_close_rows(y, expected, q[tokens], s[tokens], prepared, rows)

    q2, s2, _ = _operands(E, N, K, T * k, dtype, seed=1)
    y = triton_grouped.grouped_gemm_indexed(q2, s2, prepared, pairs, "scatter", torch.bfloat16)
    expected = ref.grouped_gemm_indexed(q2, s2, ref.prepare_grouped_weight(*prepared), pairs, "scatter",
                                        torch.float32)
    inverse = torch.empty_like(pairs.perm)
    inverse[pairs.perm] = torch.arange(T * k, device="cuda")
    pair_rows = [(int(pairs.perm[p]), e) for p, e in rows]
    _assert_close_rows(y, expected, q2[inverse], s2[inverse], prepared, pair_rows)
    no_expert = (index.reshape(-1) < 0) | (index.reshape(-1) >= E)
    assert int((y[no_expert] != 0).sum()) == 0  # written as zeros


def _experts(E, H, I, backend, grouping, dtype=FP8, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = FP8Experts(E, H, I, dtype=dtype, backend=backend, grouping=grouping)
    with torch.no_grad():
        for name, (N, K) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            parts = [quantize_weight_blockwise(torch.randn(N, K, generator=g) * 0.05, dtype) for _ in range(E)]
            setattr(module, name, torch.nn.Parameter(torch.stack([p[0] for p in parts]), requires_grad=False))
            setattr(module, f"{name}_scale_inv", torch.nn.Parameter(torch.stack([p[1] for p in parts]),
                                                                    requires_grad=False))
    return module.cuda()


def _routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    return index.cuda(), (weights / weights.sum(-1, keepdim=True)).cuda()


@pytest.mark.parametrize("name", ("auto", *GROUPED))
@pytest.mark.parametrize("grouping", ["indexed", "contiguous", "masked"])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_fp8experts_on_gpu_backends_match_the_reference(kernels_built, name, grouping, T):
    E, H, I, k = 12, 1024, 512, 4
    if name != "auto":
        _skip_unless_serves(name, E, 2 * I, H, FP8, grouping)
    experts = _experts(E, H, I, name, grouping)
    reference = _experts(E, H, I, "reference", grouping)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    index, weights = _routing(T, E, k)
    y, expected = experts(x, index, weights), reference(x, index, weights)
    assert y.dtype == torch.bfloat16 and y.shape == (T, H)
    # Layer outputs: the GEMMs differ in summation order, so the down GEMM's input may round differently in a
    # few fp8 elements; a relative error well under fp8's step shows everything else agrees.
    err = (y.float() - expected.float()).norm() / expected.float().norm()
    assert err < 2e-2, f"{name} {grouping} T={T}: relative error {err.item()}"


def test_auto_prefill_runs_deepgemms_contiguous_gemms(kernels_built, monkeypatch):
    """A large prefill (here made large by lowering the bar: 256 pairs per expert, any size) runs DeepGEMM's
    contiguous GEMMs under auto (padded segments, the combine reading rows in place); the layer agrees with
    the reference and slots naming no expert add nothing."""
    from fp8linear import moe

    E, H, I, k = 12, 1024, 512, 4
    _skip_unless_serves("deepgemm", E, 2 * I, H, FP8, "contiguous")
    monkeypatch.setattr(moe, "DEEPGEMM_MIN_ROWS_PER_EXPERT", 256)
    monkeypatch.setattr(moe, "DEEPGEMM_MIN_PAIR_MACS", 0)
    T = 1000  # 4000 pairs, 333 per expert
    experts = _experts(E, H, I, "auto", "auto")
    reference = _experts(E, H, I, "reference", "auto")
    assert experts.grouping_for(T, torch.device("cuda"), k) == "contiguous"
    assert experts.grouping_for(700, torch.device("cuda"), k) == "indexed"
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    index, weights = _routing(T, E, k)
    index[5, 2] = -1
    index[9] = E  # a token naming no expert at all
    y, expected = experts(x, index, weights), reference(x, index, weights)
    err = (y.float() - expected.float()).norm() / expected.float().norm()
    assert err < 2e-2, f"relative error {err.item()}"
    assert not y[9].any()
    slots = experts.expert_outputs(x, index)
    assert not slots[5, 2].any() and slots[5, 1].any()


@pytest.mark.parametrize("name,grouping", [("triton", "masked"), ("deepgemm", "masked"), ("triton", "indexed")])
@pytest.mark.parametrize("T", [1, 4, 16, 300])
def test_decode_under_cuda_graph_equals_eager(kernels_built, name, grouping, T):
    E, H, I, k = 12, 1024, 512, 4
    _skip_unless_serves(name, E, 2 * I, H, FP8, grouping)
    experts = _experts(E, H, I, name, grouping)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    index, weights = _routing(T, E, k)
    static = [x.clone(), index.clone(), weights.clone()]
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: JIT builds, backend choice, prepared weights
                experts(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts(*static)
        for seed in (1, 2, 3):  # new tokens and new routing through the same graph
            x2 = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            index2, weights2 = _routing(T, E, k, seed)
            for buf, new in zip(static, (x2, index2, weights2)):
                buf.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            assert_bitwise_equal(out, experts(x2, index2, weights2), f"graph replay {seed} vs eager")


def test_capturing_the_reference_says_why_it_cannot(kernels_built):
    """The grouped reference reads per-expert counts on the host: a capture gets an error naming the way out."""
    experts = _experts(12, 1024, 512, "reference", "masked")
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    index, weights = _routing(2, 12, 4)
    with torch.inference_mode():
        experts(x, index, weights)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=r"reads masked_m on the host.*backend='triton' or 'deepgemm'"):
            with torch.cuda.graph(graph):
                experts(x, index, weights)


def test_contiguous_routing_pads_to_the_backend_alignment_on_gpu():
    """The padded layout built on the GPU: segments of ceil(count / 128) * 128 rows carrying their expert."""
    index = torch.tensor([[3, 0], [3, 1], [0, 3]], device="cuda")
    r = route(index, E=4, grouping="contiguous", align=128)
    assert r.rows == 3 * 128 and r.writes == 6
    assert r.m_indices.cpu().tolist() == [0] * 128 + [1] * 128 + [3] * 128
    assert r.dest.cpu().tolist() == [0, 1, 128, 256, 257, 258]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_deepgemm_api_is_named():
    what = backends.get_grouped("deepgemm").api_name()
    assert what in ("current", "legacy") or "deep_gemm" in what


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16), (torch.float32, torch.float32)],
                         ids=["bf16", "bf16-fp32", "fp16", "fp32"])
@pytest.mark.parametrize("T", [1, 300])
def test_combine_kernel_equals_the_cpu_path(dtypes, T):
    from fp8linear.moe_combine import combine_slots

    y_dtype, w_dtype = dtypes
    y = (torch.randn(T, 8, 7168) * 4).to(y_dtype)
    w = torch.softmax(torch.randn(T, 8), dim=-1).to(w_dtype)
    out = combine_slots(y.cuda(), w.cuda(), y_dtype)
    assert_bitwise_equal(out.cpu(), combine_slots(y, w, y_dtype))


@pytest.mark.parametrize("T,k,E", [(1, 8, 128), (64, 8, 256), (256, 8, 60), (300, 2, 7)])
def test_sort_pairs_kernel_equals_torch_sort(T, k, E):
    from fp8linear.moe_routing import sort_pairs

    index = torch.randint(-1, E + 1, (T, k), device="cuda")
    got, expected = sort_pairs(index, E), backends.SortedPairs.of(index, E)
    assert torch.equal(got.perm, expected.perm) and torch.equal(got.bounds, expected.bounds)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weights", "fp32-weights"])
@pytest.mark.parametrize("T", [1, 4])
def test_pairwise_forward_equals_the_sorted_one(kernels_built, w_dtype, T):
    """The decode path (no sort, the combine inside the down GEMM) gives the sorted path's bits on the GPU:
    the same tiles per row, the same combine arithmetic (no fused multiply-add where the combine has none)."""
    from fp8linear.moe_combine import combine_slots

    E, H, I, k = 16, 2048, 768, 8  # Qwen3-30B-A3B's expert shape and top-8 (fewer experts: built on the CPU)
    experts = _experts(E, H, I, "triton", "indexed")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    index, weights = _routing(T, E, k)
    index[0, 3] = -1  # a pair naming no expert
    weights = weights.to(w_dtype)
    assert experts._pairwise_backends(x, index, weights) is not None
    sorted_path = combine_slots(experts.expert_outputs(x, index), weights, x.dtype)
    assert_bitwise_equal(experts(x, index, weights), sorted_path, "pairwise vs sorted")
