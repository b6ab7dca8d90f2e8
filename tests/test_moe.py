"""FP8Experts (fp8linear.moe) and the grouped GEMM backends on CPU.

The expert path is checked against FP8Linear(backend="reference") run on each expert's tokens with that
expert's 2-D weights: the same quantized rows and the same per-expert GEMM shapes, so equality is exact
(bytes). Everything else compares with tolerances derived from the arithmetic (fp32 sums, one rounding
to bf16) or, for accuracy, with cosine similarity against the dequantized weights in fp32.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from conftest import assert_bitwise_equal
from fp8linear import FP8Linear, backends
from fp8linear.backends import BackendUnsupportedError
from fp8linear.fused import silu_and_mul_reference
from fp8linear.moe import FP8Experts, parse_expert_key, route, unsupported_reason
from fp8linear.weights import quantize_weight_blockwise

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

FP8, INT8 = torch.float8_e4m3fn, torch.int8


def make_experts(E: int = 6, H: int = 256, I: int = 256, dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' Qwen3MoeExperts with seeded random weights (the default init leaves them empty)."""
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.05)
        experts.down_proj.normal_(0.0, 0.05)
    return experts.to(dtype).requires_grad_(False)


def random_routing(T: int, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k routing as a router makes it: k distinct experts per token, weights that sum to 1."""
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.int64)
    weights = torch.rand(T, k)
    return index, weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)


def per_expert_fp8linear(experts: FP8Experts, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[T, k, H]: each expert's tokens through two FP8Linear(backend="reference") holding that expert's 2-D
    weights, with silu(gate) * up between them as fp8linear.fused defines it (the quantization of that
    activation is then the fused kernel's, byte for byte)."""
    T, k = index.shape
    out = torch.zeros(T, k, experts.hidden_size, dtype=x.dtype)
    for e in range(experts.num_experts):
        t_idx, j_idx = (index == e).nonzero(as_tuple=True)  # tokens in increasing order, as a stable sort
        if t_idx.numel() == 0:
            continue
        gate_up = FP8Linear.from_quantized(experts.gate_up_proj[e], experts.gate_up_proj_scale_inv[e],
                                           backend="reference")
        down = FP8Linear.from_quantized(experts.down_proj[e], experts.down_proj_scale_inv[e], backend="reference")
        out[t_idx, j_idx] = down(silu_and_mul_reference(gate_up(x[t_idx])))
    return out


# -- the expert path, bit for bit --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("grouping", ["indexed", "contiguous", "masked"])
@pytest.mark.parametrize("E,H", [(6, 256), (5, 300)], ids=["E6-H256", "E5-H300-padded"])
def test_expert_path_is_fp8linear_per_expert_bit_for_bit(dtype, x_dtype, grouping, E, H):
    experts = FP8Experts.from_experts(make_experts(E, H, 256, x_dtype), dtype=dtype, grouping=grouping)
    x = torch.randn(11, H, dtype=x_dtype) * 2
    index, _ = random_routing(11, E, 3)
    got = experts.expert_outputs(x, index)
    assert_bitwise_equal(got, per_expert_fp8linear(experts, x, index), f"expert outputs ({grouping})")


def test_forward_weights_and_sums_the_slots():
    experts = FP8Experts.from_experts(make_experts(dtype=torch.bfloat16))
    x = torch.randn(9, 256, dtype=torch.bfloat16)
    index, weights = random_routing(9, 6, 2)
    y = experts(x, index, weights)
    slots = experts.expert_outputs(x, index)
    expected = (slots.double() * weights.double().unsqueeze(-1)).sum(1)  # exact products and sum
    assert y.dtype == torch.bfloat16 and y.shape == (9, 256)
    # transformers' combine: fp32 products (weights are fp32) summed in fp32, one rounding to bf16.
    torch.testing.assert_close(y.double(), expected, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("grouping", ["indexed", "contiguous", "masked"])
def test_close_to_transformers_on_the_dequantized_weights(grouping):
    """Only the activations' 1x128 quantization separates the two: cosine well above 0.999."""
    source = make_experts(E=7, H=384, I=256)
    experts = FP8Experts.from_experts(source, grouping=grouping)
    baseline = experts.dequantize(torch.float32)
    baseline.config._experts_implementation = "eager"
    x = torch.randn(20, 384)
    index, weights = random_routing(20, 7, 2)
    y, ref = experts(x, index, weights), baseline(x, index, weights)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos


# -- edge routings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["indexed", "contiguous", "masked"])
def test_edge_routings(grouping):
    E = 7  # not a power of two
    experts = FP8Experts.from_experts(make_experts(E=E), grouping=grouping)
    x = torch.randn(5, 256)

    # zero tokens
    assert experts(x[:0], torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2)).shape == (0, 256)
    # a single token
    index, weights = random_routing(1, E, 2)
    assert_bitwise_equal(experts.expert_outputs(x[:1], index), per_expert_fp8linear(experts, x[:1], index), "T=1")
    # every token on one expert (the others hit by none)
    index = torch.full((5, 1), 3)
    assert_bitwise_equal(experts.expert_outputs(x, index), per_expert_fp8linear(experts, x, index), "one expert")
    # only the last expert
    index = torch.full((5, 1), E - 1, dtype=torch.int32)
    assert_bitwise_equal(experts.expert_outputs(x, index), per_expert_fp8linear(experts, x, index), "last expert")


@pytest.mark.parametrize("grouping", ["indexed", "contiguous", "masked"])
def test_slots_naming_no_expert_contribute_zero(grouping):
    """transformers marks pairs of other ranks with index E (expert parallelism): they add nothing."""
    experts = FP8Experts.from_experts(make_experts(E=6), grouping=grouping)
    x = torch.randn(4, 256)
    index = torch.tensor([[0, 6], [6, 6], [2, 5], [6, 1]])
    weights = torch.rand(4, 2)
    slots = experts.expert_outputs(x, index)
    assert torch.equal(slots[index == 6], torch.zeros(4, 256))
    assert_bitwise_equal(slots, per_expert_fp8linear(experts, x, index), "valid slots")  # 6 matches no expert
    y = experts(x, index, weights)
    assert torch.equal(y[1], torch.zeros(256))
    assert torch.equal(experts(x, torch.full((4, 2), 6), weights), torch.zeros(4, 256))  # no pair has an expert
    r = route(torch.full((4, 2), 6), E=6, grouping="contiguous", align=128)
    assert r.rows == 0 and r.writes == 0 and r.m_indices.numel() == 0


def test_repeated_expert_per_token():
    """A token may name an expert twice: indexed and contiguous serve it; masked (T rows per expert) serves it
    while no expert gets more than T pairs and raises on the device beyond."""
    x = torch.randn(3, 256)
    index = torch.tensor([[1, 1], [0, 1], [2, 2]])  # expert 1: 3 pairs = T
    for grouping in ("indexed", "contiguous", "masked"):
        experts = FP8Experts.from_experts(make_experts(E=4), grouping=grouping)
        assert_bitwise_equal(experts.expert_outputs(x, index), per_expert_fp8linear(experts, x, index), grouping)
    with pytest.raises(RuntimeError, match="an expert got more pairs than the layout's max_m rows"):
        experts(x[:2], torch.tensor([[1, 1], [1, 0]]), torch.ones(2, 2))


def test_the_three_layouts_agree_bit_for_bit():
    experts = FP8Experts.from_experts(make_experts(E=9, H=256, dtype=torch.bfloat16))
    x = torch.randn(13, 256, dtype=torch.bfloat16)
    index, weights = random_routing(13, 9, 4)
    assert experts.grouping_for(13, x.device) == "indexed"  # auto on a CPU: the reference serves it
    a = experts(x, index, weights)
    for grouping in ("contiguous", "masked"):
        experts.grouping = grouping
        assert_bitwise_equal(experts(x, index, weights), a, f"{grouping} vs indexed")


# -- the routing layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sorted_pairs_order_by_expert_and_bound_each(index_dtype):
    E, k = 6, 3
    index = torch.randint(-1, E + 2, (17, k), dtype=index_dtype)  # -1 and E, E+1 name no expert
    pairs = backends.SortedPairs.of(index, E)
    flat = index.reshape(-1).tolist()
    # stable order by expert id, the pairs naming no expert before (negative) and after (>= E) the rest
    expected = sorted(range(len(flat)), key=lambda p: (flat[p], p))
    assert pairs.perm.tolist() == expected and pairs.top_k == k
    assert pairs.bounds.dtype == torch.int32
    assert pairs.bounds.tolist() == [sum(1 for v in flat if v < e) for e in range(E + 1)]


def test_contiguous_layout_pads_each_segment():
    index = torch.tensor([[2, 0], [2, 4], [0, 2]])  # pairs 0..5 -> experts 2, 0, 2, 4, 0, 2
    r = route(index, E=5, grouping="contiguous", align=4)
    # expert 0: pairs 1, 4 (rows 0-1, padded to 4); expert 2: pairs 0, 2, 5 (rows 4-6, padded to 8);
    # expert 4: pair 3 (row 8, padded to 12). Padding rows carry their segment's expert.
    assert r.rows == 12 and r.writes == 6
    assert r.m_indices.tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4]
    assert r.perm.tolist() == [1, 4, 0, 2, 5, 3]
    assert r.token.tolist() == [0, 2, 0, 1, 2, 1]
    assert r.dest.tolist() == [0, 1, 4, 5, 6, 8]
    r1 = route(index, E=5, grouping="contiguous", align=1)
    assert r1.rows == 6 and r1.m_indices.tolist() == [0, 0, 2, 2, 2, 4] and r1.dest.tolist() == list(range(6))


def test_masked_layout_places_rows_per_expert():
    index = torch.tensor([[2, 0], [2, 4], [0, 5]])  # 5 is no expert of E=5
    r = route(index, E=5, grouping="masked")
    assert r.rows == 3  # max_m = T
    assert r.masked_m.tolist() == [2, 0, 2, 0, 1]
    # sorted pairs: expert 0 (pairs 1, 4), expert 2 (0, 2), expert 4 (3), invalid (5) -> scratch group 5
    assert r.dest.tolist() == [0 * 3 + 0, 0 * 3 + 1, 2 * 3 + 0, 2 * 3 + 1, 4 * 3 + 0, 5 * 3 + 0]
    assert r.valid.tolist() == [True] * 5 + [False]


# -- the grouped reference backend -------------------------------------------------------------------
def test_grouped_reference_rejects_a_broken_layout():
    ref = backends.get_grouped("reference")
    w, ws = quantize_weight_blockwise(torch.randn(256, 256))
    prepared = ref.prepare_grouped_weight(w[None].expand(2, -1, -1), ws[None].expand(2, -1, -1))
    q = torch.zeros(3, 256, dtype=FP8)
    s = torch.ones(3, 2)
    with pytest.raises(ValueError, match="rows of expert 0 are not one consecutive segment"):
        ref.grouped_gemm_contiguous(q, s, prepared, torch.tensor([0, 1, 0], dtype=torch.int32), torch.float32)
    with pytest.raises(ValueError, match=r"m_indices must hold experts in \[0, 2\) or -1"):
        ref.grouped_gemm_contiguous(q, s, prepared, torch.tensor([0, 2, -1], dtype=torch.int32), torch.float32)


# -- construction and rejected input -----------------------------------------------------------------
class BiasedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 256, 128))
        self.down_proj = nn.Parameter(torch.zeros(2, 128, 128))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(2, 256))
        self.act_fn = nn.SiLU()


class GeluExperts(BiasedExperts):
    def __init__(self):
        super().__init__()
        self.gate_up_proj_bias = None
        self.act_fn = nn.GELU()


class OddWidthExperts(GeluExperts):
    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 200, 128))
        self.down_proj = nn.Parameter(torch.zeros(2, 128, 100))


def test_unsupported_experts_say_why():
    assert unsupported_reason(make_experts()) is None
    assert "has expert biases" in unsupported_reason(BiasedExperts())
    assert "not SiLU" in unsupported_reason(GeluExperts())
    assert "I=100 is not a multiple of 128" in unsupported_reason(OddWidthExperts())
    assert "holds no 3-D gate_up_proj" in unsupported_reason(nn.Linear(4, 4))
    transposed = make_experts()
    transposed.is_transposed = True
    assert "transposed" in unsupported_reason(transposed)
    with pytest.raises(ValueError, match="cannot quantize GeluExperts: act_fn is GELU"):
        FP8Experts.from_experts(GeluExperts())


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="intermediate_size must be a multiple of 128.*got 100"):
        FP8Experts(4, 256, 100)
    with pytest.raises(ValueError, match="backend='cublaslt' has no grouped GEMM.*'reference'"):
        FP8Experts(4, 256, 128, backend="cublaslt")
    with pytest.raises(ValueError, match="grouping must be one of"):
        FP8Experts(4, 256, 128, grouping="ragged")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        FP8Experts(0, 256, 128)


def test_forward_rejects_bad_input():
    experts = FP8Experts(4, 256, 128)
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match=r"hidden_states must be a tensor \[T, 256\]"):
        experts(torch.randn(1, 3, 256), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"top_k_index must be an integer tensor \[T=3, k\]"):
        experts(x, torch.zeros(3, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="top_k_weights must be a float tensor of top_k_index's shape"):
        experts(x, torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 1))
    with pytest.raises(TypeError, match="hidden_states must be bfloat16, float16 or float32"):
        experts(x.double(), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1))


def test_explicit_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    experts = FP8Experts.from_experts(make_experts(), backend="triton")
    with pytest.raises(BackendUnsupportedError,
                       match=r"backend='triton' cannot serve the contiguous grouped GEMM of E=6 experts, N=512, K=256"):
        experts(torch.randn(2, 256), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1))
    assert "needs a CUDA device" in backends.grouped_unsupported_reason(
        "deepgemm", 6, 512, 256, FP8, torch.device("cpu"), "masked")
    assert "dtype torch.int8 is not one of torch.float8_e4m3fn" in backends.grouped_unsupported_reason(
        "deepgemm", 6, 512, 256, INT8, torch.device("cpu"), "masked")
    with pytest.raises(ValueError, match="grouped backend must be one of 'reference', 'triton', 'deepgemm'.*"
                                         "got 'cublaslt', which has no grouped GEMM"):
        backends.get_grouped("cublaslt")


def test_auto_grouping_without_an_indexed_layout_takes_contiguous(monkeypatch):
    """A backend that serves contiguous and masked but not indexed (DeepGEMM's case): auto takes contiguous,
    gives the same outputs, and asks the backend about the indexed layout once, not on every forward."""
    ref = backends.get_grouped("reference")
    asked = []

    def no_indexed(E, N, K, dtype, device, grouping):
        asked.append(grouping)
        return "no indexed layout here" if grouping == "indexed" else None

    experts = FP8Experts.from_experts(make_experts(E=5))
    x = torch.randn(7, 256)
    index, weights = random_routing(7, 5, 2)
    expected = experts(x, index, weights)
    monkeypatch.setattr(ref, "grouped_unsupported_reason", no_indexed)
    fresh = FP8Experts.from_experts(make_experts(E=5), backend="reference")
    fresh.load_state_dict(experts.state_dict())
    for _ in range(3):
        assert fresh.grouping_for(7, x.device) == "contiguous"
        assert_bitwise_equal(fresh(x, index, weights), expected, "contiguous vs indexed")
    assert asked.count("indexed") == 1  # gate_up's refusal, cached with its reason
    with pytest.raises(BackendUnsupportedError, match="no indexed layout here"):
        fresh.backends_for("indexed", x.device)


def test_padded_contiguous_layout_equals_the_indexed_one(monkeypatch):
    """Segments padded to 8 rows (DeepGEMM pads to 128): the padding rows are computed and never read, the
    combine reads each pair's row where it lies, and slots naming no expert still contribute zero. Within
    bf16 rounding, not bit for bit: the reference's fp32 GEMM goes through BLAS, whose order of the sum
    depends on a segment's row count, which the padding changes."""
    experts = FP8Experts.from_experts(make_experts(E=6, H=300, dtype=torch.bfloat16))
    x = torch.randn(11, 300, dtype=torch.bfloat16)
    index, weights = random_routing(11, 6, 3)
    index[index == 2] = 4  # an expert with no pair
    index[3, 1], index[7, 0] = -1, 6  # slots naming no expert
    expected_slots, expected = experts.expert_outputs(x, index), experts(x, index, weights)
    monkeypatch.setattr(backends.get_grouped("reference"), "CONTIGUOUS_ALIGN", 8)
    padded = FP8Experts.from_experts(make_experts(E=6, H=300, dtype=torch.bfloat16), grouping="contiguous")
    padded.load_state_dict(experts.state_dict())
    r = route(index, 6, "contiguous", align=8)
    assert r.rows % 8 == 0 and r.rows > 11 * 3  # each segment padded: padding rows exist
    x_before = x.clone()
    slots = padded.expert_outputs(x, index)
    assert not slots[3, 1].any() and not slots[7, 0].any()
    torch.testing.assert_close(slots, expected_slots, rtol=2**-7, atol=1e-4)
    torch.testing.assert_close(padded(x, index, weights), expected, rtol=2**-7, atol=2e-3)  # a sum of 3: cancellation
    assert torch.equal(x, x_before)


def test_auto_runs_deepgemms_contiguous_gemms_for_large_prefills(monkeypatch):
    """Where an indexed backend and DeepGEMM's contiguous GEMMs both serve, auto takes DeepGEMM's contiguous
    layout once a forward has DEEPGEMM_MIN_ROWS_PER_EXPERT pairs per expert and DEEPGEMM_MIN_PAIR_MACS
    (pairs * H * I), whichever binds; the indexed one below; never where a backend other than DeepGEMM
    would run the contiguous layout (a CPU's reference) or a layout was asked for."""
    from fp8linear import moe as moe_module

    experts = FP8Experts.from_experts(make_experts(E=4))
    cpu, H, I = torch.device("cpu"), experts.hidden_size, experts.intermediate_size
    monkeypatch.setattr(moe_module, "DEEPGEMM_MIN_ROWS_PER_EXPERT", 10)  # 40 pairs over 4 experts
    monkeypatch.setattr(moe_module, "DEEPGEMM_MIN_PAIR_MACS", 100 * H * I)  # 100 pairs
    assert experts.grouping_for(10**6, cpu, 8) == "indexed"  # the reference serves the contiguous layout
    fake_deepgemm = types.SimpleNamespace(NAME="deepgemm", CONTIGUOUS_ALIGN=128)
    real = experts.backends_for

    def backends_for(grouping, device):
        return (fake_deepgemm, fake_deepgemm) if grouping == "contiguous" else real(grouping, device)

    monkeypatch.setattr(experts, "backends_for", backends_for)
    assert [experts.grouping_for(T, cpu, 2) for T in (1, 49, 50, 4000)] == ["indexed", "indexed", "contiguous",
                                                                            "contiguous"]
    assert [experts.grouping_for(T, cpu) for T in (99, 100)] == ["indexed", "contiguous"]  # k defaults to 1
    monkeypatch.setattr(moe_module, "DEEPGEMM_MIN_PAIR_MACS", 1)
    assert [experts.grouping_for(T, cpu, 2) for T in (19, 20)] == ["indexed", "contiguous"]  # rows bind
    experts.grouping = "indexed"
    assert experts.grouping_for(4000, cpu, 2) == "indexed"


@pytest.mark.parametrize("name", backends.GROUPED_NAMES[1:])
def test_every_grouped_backend_satisfies_the_protocol(name):
    module = backends.get_grouped(name)
    assert module.NAME == name and isinstance(module, backends.GroupedBackend)
    assert module.CONTIGUOUS_ALIGN >= 1 and set(module.DTYPES) <= {FP8, INT8}
    for m in (1, 5, 64, 65, 128, 300):
        assert module.masked_rows(m) >= m and module.masked_rows(module.masked_rows(m)) == module.masked_rows(m)


def test_deepgemm_masked_rows_are_whole_blocks():
    """Every expert's rows in DeepGEMM's masked layout are whole blocks of either of its BLOCK_M (64, 128):
    fewer rows than a block let one expert's tiles overwrite the next expert's rows on the GPU."""
    rows = backends.get_grouped("deepgemm").masked_rows
    for m in (1, 37, 63, 64, 65, 128, 129, 300):
        assert rows(m) >= m and rows(m) % 128 == 0 and rows(m) - m < 128, (m, rows(m))


def test_repr_names_backend_and_layout():
    experts = FP8Experts(4, 256, 128, backend="reference", grouping="masked", device="meta")
    assert repr(experts) == (
        "FP8Experts(num_experts=4, hidden_size=256, intermediate_size=128, dtype=e4m3, block_size=128x128, "
        "scale_ue8m0=False, backend=reference, grouping=masked, act=silu (fused quant))")


def test_from_experts_quantizes_each_expert_as_the_dense_path():
    source = make_experts(E=3, H=300, I=256)
    experts = FP8Experts.from_experts(source, dtype=INT8, scale_ue8m0=True)
    for e in range(3):
        w, ws = quantize_weight_blockwise(source.gate_up_proj[e], INT8, scale_ue8m0=True)
        assert_bitwise_equal(experts.gate_up_proj[e], w, f"gate_up_proj[{e}]")
        assert_bitwise_equal(experts.gate_up_proj_scale_inv[e], ws, f"gate_up_proj_scale_inv[{e}]")
        # gate and up quantized apart give the same blocks (I % 128 == 0)
        wg, wsg = quantize_weight_blockwise(source.gate_up_proj[e, :256], INT8, scale_ue8m0=True)
        assert_bitwise_equal(experts.gate_up_proj[e, :256], wg, "gate rows")
        assert_bitwise_equal(experts.gate_up_proj_scale_inv[e, :2], wsg, "gate scales")
        w2, ws2 = quantize_weight_blockwise(source.down_proj[e], INT8, scale_ue8m0=True)
        assert_bitwise_equal(experts.down_proj[e], w2, f"down_proj[{e}]")
        assert_bitwise_equal(experts.down_proj_scale_inv[e], ws2, f"down_proj_scale_inv[{e}]")
    assert experts.gate_up_proj_scale_inv.shape == (3, 4, 3) and experts.down_proj_scale_inv.shape == (3, 3, 2)


def test_parse_expert_key():
    assert parse_expert_key("model.layers.0.mlp.experts.17.up_proj.weight_scale_inv") == (
        "model.layers.0.mlp.experts", 17, "up_proj", "weight_scale_inv")
    assert parse_expert_key("experts.2.down_proj.weight_scale") == ("experts", 2, "down_proj", "weight_scale_inv")
    assert parse_expert_key("3.gate_proj.weight") == ("", 3, "gate_proj", "weight")
    assert parse_expert_key("model.layers.0.mlp.gate_proj.weight") is None
    assert parse_expert_key("model.layers.0.mlp.experts.gate_up_proj") is None


# -- quantize_model on whole MoE models --------------------------------------------------------------
def tiny_moe(model_type: str, embedding_std: float = 0.1, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer random MoE model of transformers' own classes, hidden 256, experts of width 256.

    Token embeddings get std 0.1 (transformers' init leaves the experts' output about 1% of the logits'
    cosine at std 1.0, where no expert error could show; at 0.1 removing the experts moves the logits by
    1-3% of cosine, so the experts' quantization is what the accuracy test measures)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                  num_hidden_layers=2, num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        config = Qwen3MoeConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=6,
                                decoder_sparse_step=1, norm_topk_prob=True, **common)
    else:  # DeepSeek-V3: MLA attention, layer 0 dense, layer 1 MoE with a shared expert, grouped routing
        config = DeepseekV3Config(num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                                  n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                  q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
                                  v_head_dim=64, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    return model


def one_minus_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_quantized_moe_model_keeps_logits(model_type):
    """FP8 model vs the same weights dequantized to fp32: logits cosine >= 0.995, while dropping the experts'
    output would move the logits several times more (so the experts are what is measured)."""
    import copy

    from fp8linear import quantize_model
    from fp8linear.convert import dequantize_model

    model = tiny_moe(model_type)
    ids = torch.randint(0, 512, (2, 24))
    quantize_model(model, progress=False)
    summary = model.fp8linear_summary
    experts_names = [n for n, m in model.named_modules() if isinstance(m, FP8Experts)]
    assert summary.experts == experts_names and len(experts_names) == (2 if model_type == "qwen3_moe" else 1)
    assert not summary.unquantized
    baseline = dequantize_model(copy.deepcopy(model), torch.float32)
    assert not any(isinstance(m, (FP8Experts, FP8Linear)) for m in baseline.modules())
    with torch.no_grad():
        fp8, ref = model(ids).logits, baseline(ids).logits
        for name in experts_names:
            baseline.get_submodule(name).down_proj.zero_()
        without_experts = baseline(ids).logits
    assert one_minus_cosine(fp8, ref) <= 0.005
    assert one_minus_cosine(ref, without_experts) > 5 * one_minus_cosine(fp8, ref)
    if model_type == "deepseek_v3":  # shared experts are ordinary MLPs: FP8Linear as any other
        assert isinstance(model.model.layers[1].mlp.shared_experts.gate_proj, FP8Linear)
        assert type(model.model.layers[1].mlp.gate).__name__ == "DeepseekV3TopkRouter"  # router untouched


def test_quantize_model_honours_config_and_skip_rules_for_experts():
    from fp8linear import FP8Config, quantize_model

    model = tiny_moe("qwen3_moe")
    source = model.model.layers[0].mlp.experts
    w13 = source.gate_up_proj.detach().clone()
    quantize_model(model, FP8Config(dtype=INT8, scale_ue8m0=True, backend="reference"),
                   skip=[r"model\.layers\.1\.mlp\.experts"], progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, FP8Experts) and experts.dtype == INT8 and experts.backend == "reference"
    w, ws = quantize_weight_blockwise(w13[4], INT8, scale_ue8m0=True)
    assert_bitwise_equal(experts.gate_up_proj[4], w, "gate_up_proj[4]")
    assert_bitwise_equal(experts.gate_up_proj_scale_inv[4], ws, "gate_up_proj_scale_inv[4]")
    kept = model.model.layers[1].mlp.experts
    assert type(kept).__name__ == "Qwen3MoeExperts"
    assert model.fp8linear_summary.skipped["model.layers.1.mlp.experts"].startswith("skip ")
    assert model.fp8linear_summary.experts == ["model.layers.0.mlp.experts"]
    assert "model.layers.1.mlp.experts" in model.fp8linear_summary.modules_to_not_convert


def test_backend_without_grouped_gemm_leaves_experts_on_auto():
    from fp8linear import quantize_model

    model = quantize_model(tiny_moe("qwen3_moe"), backend="cublaslt", progress=False)
    assert model.model.layers[0].mlp.experts.backend == "auto"
    assert model.model.layers[0].self_attn.q_proj.backend == "cublaslt"
    assert "backend 'cublaslt' has no grouped GEMM: the MoE experts use 'auto'" in str(model.fp8linear_summary)


def test_unservable_experts_stay_with_the_reason():
    from fp8linear import quantize_model

    holder = nn.Module()
    holder.experts = GeluExperts()
    quantize_model(holder, progress=False)
    assert isinstance(holder.experts, GeluExperts)
    assert holder.fp8linear_summary.unquantized == {
        "experts": "GeluExperts: fused MoE experts (gate_up_proj [2, 256, 128], down_proj [2, 128, 128]) left "
                   "unquantized: FP8Experts cannot serve them (act_fn is GELU, not SiLU (only silu(gate) * up is "
                   "fused))"}


# -- the published per-expert state dict -------------------------------------------------------------
def expected_expert_keys(prefix: str, E: int) -> list[str]:
    return [f"{prefix}{e}.{p}.{leaf}" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")
            for leaf in ("weight", "weight_scale_inv")]


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_state_dict_is_the_published_per_expert_layout(dtype):
    E, H, I = 5, 300, 256
    experts = FP8Experts.from_experts(make_experts(E, H, I), dtype=dtype)
    state = experts.state_dict()
    assert list(state) == expected_expert_keys("", E)
    for e in range(E):
        for p, (N, K) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w, s = state[f"{e}.{p}.weight"], state[f"{e}.{p}.weight_scale_inv"]
            assert w.dtype == dtype and tuple(w.shape) == (N, K), (e, p)
            assert s.dtype == torch.float32 and tuple(s.shape) == (-(-N // 128), -(-K // 128)), (e, p)
        # the values are the fused tensors' rows: gate first, then up
        assert_bitwise_equal(state[f"{e}.gate_proj.weight"], experts.gate_up_proj[e, :I], "gate rows")
        assert_bitwise_equal(state[f"{e}.up_proj.weight_scale_inv"], experts.gate_up_proj_scale_inv[e, 2:], "up scales")
        assert_bitwise_equal(state[f"{e}.down_proj.weight"], experts.down_proj[e], "down")


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32-scales", "bf16-scales"])
def test_load_state_dict_from_per_expert_keys_bit_exact(scale_dtype):
    source = FP8Experts.from_experts(make_experts(4, 256, 384))
    state = {k: (v.to(scale_dtype) if k.endswith("scale_inv") else v).clone() for k, v in source.state_dict().items()}
    for assign in (False, True):
        target = FP8Experts(4, 256, 384, device="meta" if assign else None)
        target.load_state_dict(state, assign=assign)
        for name in ("gate_up_proj", "down_proj"):
            assert_bitwise_equal(getattr(target, name), getattr(source, name), name)
            expected = getattr(source, f"{name}_scale_inv").to(scale_dtype).float()  # what the file held
            assert_bitwise_equal(getattr(target, f"{name}_scale_inv"), expected, f"{name}_scale_inv")
    # the fused names load too
    fused = FP8Experts(4, 256, 384)
    fused.load_state_dict({n: p for n, p in source.named_parameters()})
    assert_bitwise_equal(fused.down_proj, source.down_proj, "down_proj via fused keys")


def test_load_state_dict_names_what_is_missing():
    source = FP8Experts.from_experts(make_experts(3, 256, 256))
    state = source.state_dict()
    del state["2.up_proj.weight_scale_inv"]
    with pytest.raises(RuntimeError, match=r"per-expert tensors of 3 experts are incomplete: missing \['2.up_proj.weight_scale_inv'\]"):
        FP8Experts(3, 256, 256).load_state_dict(state)
    state = source.state_dict()
    state["1.down_proj.weight"] = state["1.down_proj.weight"][:, :128]
    with pytest.raises(RuntimeError, match=r"1.down_proj.weight: shape \[256, 128\], expected \[256, 256\]"):
        FP8Experts(3, 256, 256).load_state_dict(state)


def test_model_state_dict_round_trip_and_saved_files(tmp_path):
    """A quantized Qwen3-MoE's state dict holds the per-expert keys a published FP8 checkpoint holds;
    save_quantized writes them, and a loader that fills FP8Experts expert by expert (plan_expert_keys,
    empty_like, load_expert_: what load_quantized is given) rebuilds the experts bit for bit."""
    import json

    from safetensors import safe_open

    from fp8linear import quantize_model, save_quantized
    from fp8linear.moe import plan_expert_keys

    model = quantize_model(tiny_moe("qwen3_moe", dtype=torch.bfloat16), progress=False)
    state = model.state_dict()
    prefix = "model.layers.1.mlp.experts."
    assert [k for k in state if k.startswith(prefix)] == expected_expert_keys(prefix, 6)
    assert not any(k.endswith(("gate_up_proj", "down_proj_scale_inv")) for k in state)
    assert "model.layers.1.mlp.gate.weight" in state  # the router, unquantized

    save_quantized(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert not any("experts" in name for name in qc["modules_to_not_convert"])
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(prefix + "3.up_proj.weight").dtype == FP8
        # the loader's path: a skeleton with transformers' experts (here on meta), filled expert by expert
        skeleton = tiny_moe("qwen3_moe", dtype=torch.bfloat16)
        modules = dict(skeleton.named_modules())
        params = {n for n, _ in skeleton.named_parameters()}
        plan = plan_expert_keys(keys, lambda k: k if k in params else None, modules)
        assert sorted(plan) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        for name, entries in plan.items():
            with torch.device("meta"):
                meta_experts = type(modules[name])(skeleton.config)
            experts = FP8Experts.empty_like(meta_experts, "cpu")
            assert len(experts.missing_expert_tensors()) == 36
            for (e, projection, leaf), key in entries.items():
                experts.load_expert_(e, projection, leaf, f.get_tensor(key))
            assert experts.missing_expert_tensors() == []
            original = model.get_submodule(name)
            for p in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"):
                assert_bitwise_equal(getattr(experts, p), getattr(original, p), f"{name}.{p}")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    index, weights = random_routing(3, 6, 2)
    assert_bitwise_equal(experts(x, index, weights), original(x, index, weights), "loaded experts' output")


def test_load_expert_rejects_wrong_tensors():
    experts = FP8Experts.empty_like(make_experts(3, 256, 256), "cpu")
    with pytest.raises(ValueError, match=r"1.gate_proj.weight: shape \[128, 256\], expected \[256, 256\]"):
        experts.load_expert_(1, "gate_proj", "weight", torch.zeros(128, 256, dtype=FP8))
    with pytest.raises(ValueError, match=r"1.gate_proj.weight: dtype torch.bfloat16, expected torch.float8_e4m3fn"):
        experts.load_expert_(1, "gate_proj", "weight", torch.zeros(256, 256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"3.down_proj.weight: not a tensor of 3 experts"):
        experts.load_expert_(3, "down_proj", "weight", torch.zeros(256, 256, dtype=FP8))
    with pytest.raises(ValueError, match=r"0.down_proj.weight_scale_inv: scale dtype torch.int32"):
        experts.load_expert_(0, "down_proj", "weight_scale_inv", torch.zeros(2, 2, dtype=torch.int32))


# -- the Triton grouped GEMM, under Triton's CPU interpreter -----------------------------------------


def grouped_operands(E, N, K, rows, dtype, seed=0):
    """q [rows, Kp] quantized from random rows (zero columns past K), row scales, and E random experts."""
    from fp8linear.reference import per_token_group_quant_reference

    g = torch.Generator().manual_seed(seed)
    Kp = -(-K // 128) * 128
    x = torch.zeros(rows, Kp)
    x[:, :K] = torch.randn(rows, K, generator=g) * 3
    q, s = per_token_group_quant_reference(x, 128, dtype)
    parts = [quantize_weight_blockwise(torch.randn(N, K, generator=g), dtype) for _ in range(E)]
    return q, s, (torch.stack([w for w, _ in parts]), torch.stack([ws for _, ws in parts]))


def assert_within_k_tolerance(y, ref, q, s, prepared, rows_experts):
    """|y - ref| <= 2 K u sum_k |a_k w_k| per element (two fp32 summation orders; u = 2^-24), on the rows
    whose expert is given (others are unspecified)."""
    from fp8linear.reference import dequantize_groups
    from fp8linear.weights import dequantize_weight_blockwise

    weight, scales = prepared
    K = weight.shape[2]
    a = dequantize_groups(q, s)[:, :K].abs()
    for r, e in rows_experts:
        w = dequantize_weight_blockwise(weight[e], scales[e]).abs()
        bound = 2 * K * 2**-24 * (a[r] @ w.t()) + 1e-30
        err = (y[r].float() - ref[r].float()).abs()
        assert bool((err <= bound).all()), f"row {r} (expert {e}): max err {err.max()} vs bound {bound.max()}"


TRITON_CONFIGS = [
    None,  # the default tiles for the shape
    dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, num_warps=4, num_stages=2),  # N tile spans two weight-block rows
    dict(BLOCK_M=32, BLOCK_N=16, GROUP_M=1, num_warps=4, num_stages=3),  # tiles straddle no segment boundary
]


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("cfg", TRITON_CONFIGS, ids=["default", "16x256", "32x16"])
def test_triton_grouped_contiguous_interpreted(triton_interpreter, dtype, cfg):
    E, N, K = 5, 200, 300  # E not a power of two; partial N and K blocks
    ref = backends.get_grouped("reference")
    tri = backends.get_grouped("triton")
    # segments of 7, 0, 19, 1, 0 rows (unaligned), then 3 rows of -1 (pairs naming no expert)
    m_indices = torch.tensor([0] * 7 + [2] * 19 + [3] + [-1] * 3, dtype=torch.int32)
    q, s, prepared = grouped_operands(E, N, K, m_indices.numel(), dtype)
    y = tri.grouped_gemm_contiguous(q, s, prepared, m_indices, torch.float32, config=cfg)
    expected = ref.grouped_gemm_contiguous(q, s, ref.prepare_grouped_weight(*prepared), m_indices, torch.float32)
    assert y.shape == (30, N) and y.dtype == torch.float32
    assert_within_k_tolerance(y, expected, q, s, prepared, [(r, int(e)) for r, e in enumerate(m_indices) if e >= 0])
    # aligned segments as DeepGEMM wants them (padding rows carry their segment's expert) serve as well
    padded = torch.tensor([1] * 8 + [4] * 16, dtype=torch.int32)
    q, s, prepared = grouped_operands(E, N, K, 24, dtype, seed=1)
    y = tri.grouped_gemm_contiguous(q, s, prepared, padded, torch.bfloat16, config=cfg)
    expected = ref.grouped_gemm_contiguous(q, s, ref.prepare_grouped_weight(*prepared), padded, torch.float32)
    torch.testing.assert_close(y.float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_triton_grouped_masked_interpreted(triton_interpreter, dtype):
    E, N, K, max_m = 3, 160, 256, 20
    ref = backends.get_grouped("reference")
    tri = backends.get_grouped("triton")
    q, s, prepared = grouped_operands(E, N, K, E * max_m, dtype)
    q, s = q.view(E, max_m, K), s.view(E, max_m, 2)
    masked_m = torch.tensor([20, 0, 3], dtype=torch.int32)
    y = tri.grouped_gemm_masked(q, s, prepared, masked_m, 8, torch.float32,
                                config=dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=2))
    expected = ref.grouped_gemm_masked(q, s, ref.prepare_grouped_weight(*prepared), masked_m, 8, torch.float32)
    assert y.shape == (E, max_m, N)
    rows = [(e * max_m + r, e) for e in range(E) for r in range(int(masked_m[e]))]
    assert_within_k_tolerance(y.view(-1, N), expected.view(-1, N), q.view(-1, K), s.view(-1, 2), prepared, rows)


INDEXED_CONFIGS = [
    None,  # the default tiles for the shape
    dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=3, num_warps=4, num_stages=2),  # program groups cut by the tile count
    dict(BLOCK_M=32, BLOCK_N=16, GROUP_M=1, num_warps=4, num_stages=3),
]


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("cfg", INDEXED_CONFIGS, ids=["default", "16x256-g3", "32x16"])
def test_triton_grouped_indexed_interpreted(triton_interpreter, monkeypatch, dtype, cfg):
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # outputs start as NaN: rows the kernel must write cannot pass unwritten
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    E, N, K, T, k = 5, 200, 300, 13, 3  # E not a power of two; partial N and K blocks
    ref = backends.get_grouped("reference")
    tri = backends.get_grouped("triton")
    index = torch.randint(0, E, (T, k))
    index[:, 0] = 2  # expert 2 gets more rows than one tile
    index[0] = torch.tensor([-1, E, 4])  # pairs naming no expert sort first and last
    index[index == 1] = 3  # expert 1 gets none
    pairs = backends.SortedPairs.of(index, E)
    q, s, prepared = grouped_operands(E, N, K, T, dtype)
    gathered = tri.grouped_gemm_indexed(q, s, prepared, pairs, "gather", torch.float32, config=cfg)
    expected = ref.grouped_gemm_indexed(q, s, ref.prepare_grouped_weight(*prepared), pairs, "gather", torch.float32)
    assert gathered.shape == (T * k, N)
    experts = index.reshape(-1)[pairs.perm]
    rows = [(p, int(e)) for p, e in enumerate(experts) if 0 <= e < E]
    assert_within_k_tolerance(gathered, expected, q[pairs.perm // k], s[pairs.perm // k], prepared, rows)

    q2, s2, _ = grouped_operands(E, N, K, T * k, dtype, seed=1)
    y = tri.grouped_gemm_indexed(q2, s2, prepared, pairs, "scatter", torch.float32, config=cfg)
    expected = ref.grouped_gemm_indexed(q2, s2, ref.prepare_grouped_weight(*prepared), pairs, "scatter",
                                        torch.float32)
    pair_rows = [(int(pairs.perm[p]), e) for p, e in rows]
    inverse = torch.empty_like(pairs.perm)
    inverse[pairs.perm] = torch.arange(T * k)
    assert_within_k_tolerance(y, expected, q2[inverse], s2[inverse], prepared, pair_rows)
    no_expert = (index.reshape(-1) < 0) | (index.reshape(-1) >= E)
    assert torch.equal(y[no_expert], torch.zeros(int(no_expert.sum()), N))  # written, as zeros


def test_triton_grouped_indexed_with_fewer_pairs_than_a_tile(triton_interpreter):
    E, N, K = 7, 128, 128
    tri, ref = backends.get_grouped("triton"), backends.get_grouped("reference")
    index = torch.tensor([[6]])  # one token, one slot, the last expert
    pairs = backends.SortedPairs.of(index, E)
    q, s, prepared = grouped_operands(E, N, K, 1, FP8)
    y = tri.grouped_gemm_indexed(q, s, prepared, pairs, "gather", torch.float32)
    expected = ref.grouped_gemm_indexed(q, s, ref.prepare_grouped_weight(*prepared), pairs, "gather", torch.float32)
    assert_within_k_tolerance(y, expected, q, s, prepared, [(0, 6)])


@pytest.mark.parametrize("grouping", ["indexed", "contiguous", "masked"])
def test_fp8experts_on_the_triton_backend_interpreted(triton_interpreter, grouping):
    source = make_experts(E=5, H=256, I=256)
    on_triton = FP8Experts.from_experts(source, backend="triton", grouping=grouping)
    on_reference = FP8Experts.from_experts(source, backend="reference", grouping=grouping)
    x = torch.randn(6, 256)
    index, weights = random_routing(6, 5, 2)
    y, expected = on_triton(x, index, weights), on_reference(x, index, weights)
    assert on_triton.backends_for(grouping, x.device)[0].NAME == "triton"
    # fp32 outputs: the GEMMs differ in summation order only; the second GEMM's quantization may flip a
    # rounding, so compare as layer outputs
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("out_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32w"])
def test_triton_pairwise_equals_its_sorted_gemms_and_combine(triton_interpreter, monkeypatch, dtype, out_dtype,
                                                             w_dtype):
    """The decode path (no sort, combine inside the down GEMM) against the sorted path's kernels. Bit for bit
    for int8, whose dots are exact in any order; fp8 dots under the interpreter are NumPy's matmul, which
    rounds a row by its place in the tile, so there within rounding (bit for bit on the GPU:
    tests/test_moe_gpu.py). The combine inside the kernel equals combine_slots on the kernel's own rows bit
    for bit either way (under the interpreter both truncate to bf16 alike)."""
    from fp8linear.moe_combine import combine_slots

    def same(got, expected):
        if dtype == INT8:
            assert_bitwise_equal(got, expected)
        else:
            scale = expected.float().abs().max().item()
            torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7 if out_dtype == torch.bfloat16
                                       else 1e-5, atol=1e-5 * scale)

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                          else t)(real_empty(*a, **kw)))
    E, N, K, T, k = 5, 200, 300, 3, 4  # partial N and K blocks
    tri = backends.get_grouped("triton")
    assert isinstance(tri, backends.PairwiseGroupedBackend)
    index = torch.tensor([[0, 4, -1, 2], [2, 2, 1, 5], [3, 0, 4, 1]])  # a pair naming no expert at each end
    valid = ((index >= 0) & (index < E)).reshape(-1)
    pairs = backends.SortedPairs.of(index, E)
    q, s, prepared = grouped_operands(E, N, K, T, dtype)
    h = tri.grouped_gemm_pairwise(q, s, prepared, index, "tokens", out_dtype)
    sorted_h = tri.grouped_gemm_indexed(q, s, prepared, pairs, "gather", out_dtype)
    in_pair_order = torch.empty_like(sorted_h)
    in_pair_order[pairs.perm] = sorted_h
    assert h.shape == (T * k, N)
    same(h[valid], in_pair_order[valid])
    assert torch.equal(h[~valid], torch.zeros(int((~valid).sum()), N, dtype=out_dtype))

    q2, s2, _ = grouped_operands(E, N, K, T * k, dtype, seed=1)
    y = tri.grouped_gemm_pairwise(q2, s2, prepared, index, "pairs", out_dtype)
    scattered = tri.grouped_gemm_indexed(q2[pairs.perm], s2[pairs.perm], prepared, pairs, "scatter", out_dtype)
    same(y, scattered)
    weights = torch.softmax(torch.randn(T, k), dim=-1).to(w_dtype)
    combined = tri.grouped_gemm_pairwise(q2, s2, prepared, index, "pairs", out_dtype, combine_weights=weights)
    assert combined.shape == (T, N)
    assert_bitwise_equal(combined, combine_slots(y.view(T, k, N), weights, out_dtype))


def test_triton_pairwise_refuses_bad_arguments(triton_interpreter):
    tri = backends.get_grouped("triton")
    q, s, prepared = grouped_operands(3, 128, 128, 4, FP8)
    index = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="rows must be 'tokens' or 'pairs'; got 'gather'"):
        tri.grouped_gemm_pairwise(q, s, prepared, index, "gather", torch.float32)
    with pytest.raises(ValueError, match="combine_weights must be \\[T, k\\] = \\[2, 2\\]"):
        tri.grouped_gemm_pairwise(q, s, prepared, index, "pairs", torch.float32, combine_weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="combine_weights must be .* with rows='pairs'"):
        tri.grouped_gemm_pairwise(q, s, prepared, index, "tokens", torch.float32, combine_weights=torch.ones(2, 2))


@pytest.mark.parametrize("T", [1, 4, 5])  # 4 tokens x 2 slots: pairwise; 5 x 2 with the limit at 8: sorted
def test_fp8experts_pairwise_forward_equals_the_sorted_one(triton_interpreter, monkeypatch, T):
    """int8, whose dots are exact in any order under the interpreter (see the test above): the whole forward,
    pairwise or sorted, gives the same bits."""
    from fp8linear.backends import triton_grouped
    from fp8linear.moe_combine import combine_slots

    monkeypatch.setattr(triton_grouped, "PAIRWISE_MAX_PAIRS", 8)
    experts = FP8Experts.from_experts(make_experts(E=5, H=256, I=256), backend="triton", dtype=INT8)
    assert experts.gate_up_proj.dtype == INT8
    x = torch.randn(T, 256)
    index, weights = random_routing(T, 5, 2)
    index[0, 1] = -1  # transformers' expert-parallel sentinel
    runs = experts._pairwise_backends(x, index, weights) is not None
    assert runs == (T * 2 <= 8)
    y = experts(x, index, weights)
    sorted_path = combine_slots(experts.expert_outputs(x, index), weights, x.dtype)
    assert_bitwise_equal(y, sorted_path)


def test_triton_pairwise_in_the_32_row_band(triton_interpreter):
    """One expert, 32 pairs: the pairwise kernel on the sorted layout's 32-row tiles (not the 16-row ones of
    most decode steps). Close, not bit for bit: under the interpreter NumPy's matmul rounds a row by its
    place in the tile (row 0 here, any row there); the GPU's tensor cores do not (tests/test_moe_gpu.py)."""
    from fp8linear.backends import triton_grouped

    tri = backends.get_grouped("triton")
    E, N, K, T = 1, 128, 256, triton_grouped.PAIRWISE_MAX_PAIRS
    assert triton_grouped.config_for(T, N, K, FP8)["BLOCK_M"] == 32
    index = torch.zeros(T, 1, dtype=torch.int64)
    q, s, prepared = grouped_operands(E, N, K, T, FP8)
    h = tri.grouped_gemm_pairwise(q, s, prepared, index, "tokens", torch.float32)
    expected = tri.grouped_gemm_indexed(q, s, prepared, backends.SortedPairs.of(index, E), "gather", torch.float32)
    torch.testing.assert_close(h, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
