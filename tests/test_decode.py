"""fp8linear.decode on CPU: greedy decoding on a static KV cache, manual CUDA-graph capture and transformers'
compiled route, checked token for token against Hugging Face generate (dynamic cache, eager).

On a CPU the manual path runs its step without capture (use_graph=False: the same buffers, cache and
argmax, no graph) and the compiled route uses torch.compile's "eager" backend; test_decode_gpu.py captures
and replays for real, bf16 and FP8.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear import decode, hf  # noqa: E402

from test_hf_models import tiny_model  # noqa: E402

PROMPT_LEN, NEW = 7, 10


def _prompt(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_manual_decoder_matches_hf_generate(fp8):
    # fp32 activations: the static cache's masked attention over max_cache_len positions and the dynamic
    # cache's unmasked one differ only by rounding, far below the gap between the top two logits.
    model = tiny_model("llama", torch.float32)
    if fp8:
        model = fp8linear.quantize_model(model, progress=False)
    prompt = _prompt(model.config.vocab_size)
    expected = hf.generate(model, prompt, NEW).tokens
    decoder = decode.GraphDecoder(model, PROMPT_LEN + NEW + 3, use_graph=False, suppress_ids=decode.eos_ids(model))
    first = decoder.generate(prompt, NEW)
    assert first.tokens.dtype == torch.long and first.tokens.shape == (NEW,)
    assert first.tokens.tolist() == expected.tolist()
    assert first.prefill_s > 0 and first.decode_s > 0
    # A second call resets the cache in place (same tensors) and repeats the tokens exactly.
    keys = decoder.cache.layers[0].keys
    again = decoder.generate(prompt, NEW)
    assert decoder.cache.layers[0].keys is keys
    assert again.tokens.tolist() == expected.tolist()
    # A shorter call is a prefix.
    assert decoder.generate(prompt, 3).tokens.tolist() == expected[:3].tolist()


def test_graph_generate_is_hf_generate_token_for_token():
    """What `fp8linear generate` runs on a GPU (warm-up, capture, replay with EOS suppressed), here without
    capture: the same tokens as transformers' greedy generate with min_new_tokens."""
    model = fp8linear.quantize_model(tiny_model("llama", torch.float32), progress=False)
    prompt = _prompt(model.config.vocab_size, seed=5)
    got = decode.graph_generate(model, prompt, NEW, use_graph=False)
    assert got.tokens.tolist() == hf.generate(model, prompt, NEW).tokens.tolist()
    assert decode.eos_ids(model) == [model.generation_config.eos_token_id]


def test_manual_decoder_suppresses_ids():
    model = tiny_model("llama", torch.float32)
    prompt = _prompt(model.config.vocab_size)
    free = decode.GraphDecoder(model, 32, use_graph=False).generate(prompt, NEW).tokens
    banned = sorted(set(free.tolist()))[:2]
    got = decode.GraphDecoder(model, 32, use_graph=False, suppress_ids=banned).generate(prompt, NEW).tokens
    assert not set(got.tolist()) & set(banned)
    # The suppressed choice is the best of the rest: the first step's token is the runner-up logit.
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    logits[banned] = float("-inf")
    assert got[0].item() == int(logits.argmax())


def test_manual_decoder_rejects_bad_input():
    model = tiny_model("llama", torch.float32)
    decoder = decode.GraphDecoder(model, 16, use_graph=False)
    prompt = _prompt(model.config.vocab_size)
    with pytest.raises(ValueError, match=r"n \(new tokens\) must be a positive int; got 0"):
        decoder.generate(prompt, 0)
    with pytest.raises(ValueError, match=r"T=7 plus n=10 new tokens must be in \[1, max_cache_len=16\]"):
        decoder.generate(prompt, 10)
    with pytest.raises(ValueError, match=r"input_ids must be a \[1, T\] int64 tensor \(batch 1\); got \[7\]"):
        decoder.generate(prompt[0], 2)
    with pytest.raises(ValueError, match=r"input_ids must be .*got \[2, 7\]"):
        decoder.generate(prompt.repeat(2, 1), 2)
    with pytest.raises(ValueError, match=r"suppress_ids must be token ids in \[0, vocab_size=256\); got \[256\]"):
        decode.GraphDecoder(model, 16, use_graph=False, suppress_ids=[5, 256])
    with pytest.raises(ValueError, match=r"max_cache_len must be an int >= 2; got 1"):
        decode.GraphDecoder(model, 1, use_graph=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"use_graph=True needs the model on a CUDA device; it is on cpu"):
            decode.GraphDecoder(model, 16)


def test_cache_kwarg_names_the_forward_parameter():
    model = tiny_model("llama", torch.float32)
    name = decode.cache_kwarg(model)
    import inspect

    assert name in ("cache", "past_key_values") and name in inspect.signature(model.forward).parameters
    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        decode.cache_kwarg(torch.nn.Linear(2, 2))


def test_compiled_decode_matches_eager_without_recompiling():
    from torch._dynamo.utils import counters

    model = fp8linear.quantize_model(tiny_model("llama", torch.float32), progress=False)
    prompt = _prompt(model.config.vocab_size)
    expected = hf.generate(model, prompt, NEW).tokens  # also the eager warm-up FP8Linear wants per M
    decode.enable_compiled_decode(model, PROMPT_LEN + NEW, backend="eager", mode=None, all_devices=True)
    try:
        assert model.generation_config.cache_implementation == "static"
        before = counters["stats"]["unique_graphs"]
        got = hf.generate(model, prompt, NEW, warmup=False).tokens
        compiled = counters["stats"]["unique_graphs"] - before
        # Every generate call builds a fresh StaticCache of the same length: no recompile.
        shorter = hf.generate(model, prompt, 4, warmup=False).tokens
        assert counters["stats"]["unique_graphs"] - before == compiled == 1
    finally:
        decode.disable_compiled_decode(model)
    assert got.tolist() == expected.tolist()
    assert shorter.tolist() == expected[:4].tolist()
    assert model.generation_config.cache_implementation is None and not hasattr(model, "_compiled_call")
