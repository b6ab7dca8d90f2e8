"""quantize_model on each supported Hugging Face architecture, built from tiny random configs.

Also holds the tiny-model builders the other HF tests import (`tiny_config`, `tiny_model`).
Dims are multiples of 128 where the GEMM wants them, except the `odd` case (intermediate 200: partial
128x128 edge blocks in gate/up (N = 200) and down (K = 200)).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear import hf  # noqa: E402
from fp8linear.linear import FP8Linear  # noqa: E402

_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)

#: name -> (model_type, architecture, extra config). Why each is here: the four dense families the
#: issue names, qwen2 for its q/k/v biases, and two MoE layouts (shared expert + gate; plain experts).
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", {}),
    "llama_odd": ("llama", "LlamaForCausalLM", {"intermediate_size": 200}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mistral": ("mistral", "MistralForCausalLM", {}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256}),
    "mixtral": ("mixtral", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
MOE = {"qwen2_moe", "mixtral"}


def tiny_config(arch: str = "llama", **overrides):
    model_type, architecture, extra = ARCHS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    return transformers.AutoConfig.for_model(model_type, architectures=[architecture], **kwargs)


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of `arch`, eval mode, on CPU. Embeddings redrawn with std 1 like the demo
    model (models/README.md), so end-to-end metrics reflect per-layer error rather than init artefacts."""
    torch.manual_seed(seed)
    model = hf.build_model(tiny_config(arch, **overrides), dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def _linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is nn.Linear}


def _expected_skips(arch: str, names: set[str]) -> set[str]:
    """The recipe, restated independently: lm_head and MoE routers / shared-expert gates."""
    router = re.compile(r".*\.(mlp|block_sparse_moe)\.(gate|shared_expert_gate)")
    return {n for n in names if n == "lm_head" or router.fullmatch(n)}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_swap_counts_and_skips(arch):
    model = tiny_model(arch)
    linears = _linear_names(model)
    skips = _expected_skips(arch, linears)
    fused = {n for n, m in model.named_modules() if any(p.dim() >= 3 for p in m.parameters(recurse=False))}
    q = fp8linear.quantize_model(model, progress=False)
    summary = q.fp8linear_summary
    assert set(summary.swapped) == linears - skips
    assert set(summary.skipped) == skips
    assert set(summary.experts) == fused and not summary.unquantized  # fused experts -> FP8Experts
    assert {n for n, m in q.named_modules() if isinstance(m, FP8Linear)} == linears - skips
    for name in skips:
        assert type(q.get_submodule(name)) is nn.Linear, name
    # Attention projections are nn.Linear in every version: 4 per layer, always swapped.
    attn = [n for n in summary.swapped if ".self_attn." in n]
    assert len(attn) == 4 * 2
    if arch not in MOE:
        assert len(summary.swapped) == 7 * 2 and set(summary.skipped) == {"lm_head"}
    assert summary.modules_to_not_convert == sorted(skips)


def test_moe_layouts_as_found():
    """transformers 5.x fuses experts into 3-D parameters (not nn.Linear): they must become FP8Experts; if a
    version gives per-expert nn.Linear instead, they must be swapped."""
    from fp8linear.moe import FP8Experts

    for arch in sorted(MOE):
        q = fp8linear.quantize_model(tiny_model(arch), progress=False)
        summary = q.fp8linear_summary
        expert_linears = [n for n in summary.swapped if ".experts." in n]
        if summary.experts:
            assert not expert_linears and not summary.unquantized
            for name in summary.experts:
                assert name.endswith(".experts") and isinstance(q.get_submodule(name), FP8Experts)
        else:
            assert expert_linears, f"{arch}: experts neither fused nor swapped"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_close_to_original(arch):
    ref = tiny_model(arch)
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    assert b.dtype == a.dtype and b.shape == a.shape
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.995, f"{arch}: logits cosine {cos}"


def test_generate_runs_on_tiny_llama():
    ref = tiny_model("llama", torch.bfloat16)
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    ids = torch.randint(3, 256, (1, 8))
    res = hf.generate(q, ids, 5, warmup=False)
    assert res.tokens.shape == (5,) and res.tokens.dtype == torch.long
    assert int(res.tokens.min()) >= 0 and int(res.tokens.max()) < 256
    assert res.tokens_per_s > 0
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        hf.generate(q, ids, 0)
    with pytest.raises(ValueError, match=r"input_ids must be \[1, T\]"):
        hf.generate(q, ids.repeat(2, 1), 3)


def _dequantize_block_by_block(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """weight [N, K] in fp32, each 128 x 128 block (partial at the edges) times its own scale."""
    N, K = weight.shape
    out = torch.empty(N, K)
    for i in range(0, N, 128):
        for j in range(0, K, 128):
            out[i : i + 128, j : j + 128] = weight[i : i + 128, j : j + 128].float() * weight_scale_inv[i // 128, j // 128]
    return out


def test_dequantize_model_inverts_the_swap():
    from fp8linear.convert import dequantize_model

    q = fp8linear.quantize_model(tiny_model("llama_odd"), progress=False)  # N = 200 and K = 200: partial blocks
    expected = {name: _dequantize_block_by_block(m.weight, m.weight_scale_inv)
                for name, m in q.named_modules() if isinstance(m, FP8Linear)}
    d = dequantize_model(copy.deepcopy(q), torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in d.modules())
    for name, weight in expected.items():
        layer = d.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight), name


def test_model_class_errors():
    config = tiny_config("llama")
    config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(ValueError, match="NoSuchModelForCausalLM.*not a class"):
        hf.model_class(config)
    with pytest.raises(FileNotFoundError, match="local Hugging Face model folder"):
        hf.load_config("/nonexistent/model")
