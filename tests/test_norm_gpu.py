"""FP8RMSNorm and quantize_model(fuse_norm=True) on the GPU: the kernels, with the backends auto picks
(cuBLASLt / DeepGEMM at prefill sizes, small_m at decode), give the logits of the same model whose norms
hand nothing over, bit for bit, also under CUDA-graph replay. The contract and the CPU half: test_norm.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import fp8linear  # noqa: E402

from test_hf_models import tiny_model  # noqa: E402
from test_norm import _count_quantizations, _without_handoff  # noqa: E402


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
def test_fused_norms_on_gpu_match_the_unfused_model(monkeypatch, tokens):
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16).cuda(), progress=False,
                                     fuse_mlp=True, fuse_norm=True)
    plain = _without_handoff(model)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(tokens))
    with torch.inference_mode():
        ref = plain(ids).logits
        calls = _count_quantizations(monkeypatch)
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert torch.isfinite(got).all()
    if tokens > 16:  # prefill sizes: only o_proj quantizes (small_m serves M <= 16 itself)
        assert len(calls) == model.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_fused_norms_under_cuda_graph_replay():
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16).cuda(), progress=False,
                                     fuse_norm=True)
    x = torch.randn(1, 64, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    layer = model.model.layers[0]
    with torch.inference_mode():
        pos = torch.arange(64, device="cuda")[None]
        emb = model.model.rotary_emb(x, pos)
        eager = layer(x, position_embeddings=emb)
        eager = eager[0] if isinstance(eager, tuple) else eager
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, position_embeddings=emb)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, position_embeddings=emb)
        out = out[0] if isinstance(out, tuple) else out
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
