"""fp8linear.decode on the GPU: the manual decoder's CUDA graph, captured and replayed for real (bf16 and
FP8), gives the tokens of the same step run uncaptured. The CPU half: test_decode.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear import decode, hf  # noqa: E402

from test_decode import NEW, _prompt  # noqa: E402
from test_hf_models import tiny_model  # noqa: E402


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_graph_replay_matches_the_same_step_uncaptured(fp8):
    model = tiny_model("llama", torch.bfloat16).cuda()
    if fp8:
        model = fp8linear.quantize_model(model, progress=False)
    prompt = _prompt(model.config.vocab_size)
    hf.generate(model, prompt, 2)  # eager warm-up: FP8Linear's backend per M
    plain = decode.GraphDecoder(model, 32, use_graph=False).generate(prompt, NEW).tokens
    graphed = decode.GraphDecoder(model, 32)
    assert graphed.capture(prompt) >= 0 and graphed._graph is not None
    # Same kernels, same inputs: the replayed step is bit-identical to the eager one.
    first = graphed.generate(prompt, NEW)
    assert first.tokens.tolist() == plain.tolist()
    assert graphed.generate(prompt, NEW).tokens.tolist() == plain.tolist()
    graphed.close()
