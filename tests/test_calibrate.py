"""Calibrated rounding (fp8linear.calibrate): less output error than round-to-nearest on inputs it did not
see, in the standard checkpoint format (same scales, bytes that dequantize as weight * scale per block),
loadable by load_quantized and by transformers; int8 too; bad arguments named."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear.calibrate import Calibration, calibration_ids, gptq_quantize_weight  # noqa: E402
from fp8linear.linear import FP8Linear  # noqa: E402
from fp8linear.weights import quantize_weight_blockwise  # noqa: E402

from conftest import assert_bitwise_equal  # noqa: E402
from test_checkpoint import loaded_by_transformers  # noqa: E402
from test_hf_models import tiny_model  # noqa: E402

DTYPES = [torch.float8_e4m3fn, torch.int8]


def _naive_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """weight * weight_scale_inv, block by block, written out with loops (shares no code with the package)."""
    N, K = weight.shape
    out = torch.empty(N, K)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(128 * i, min(128 * i + 128, N)), slice(128 * j, min(128 * j + 128, K))
            out[rows, cols] = weight[rows, cols].float() * scale_inv[i, j].item()
    return out


def _correlated_inputs(tokens: int, K: int, seed: int) -> torch.Tensor:
    """[tokens, K] activations with correlated channels and a few loud ones, as transformer inputs have:
    a shared low-rank mixing (fixed seed) plus per-token noise (the given seed)."""
    mix = torch.randn(K // 4, K, generator=torch.Generator().manual_seed(123))
    loud = torch.ones(K)
    loud[::37] = 8.0
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, K // 4, generator=g) @ mix + 0.3 * torch.randn(tokens, K, generator=g)) * loud


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp8", "int8"])
@pytest.mark.parametrize("act_order", [True, False])
def test_one_matrix_less_output_error_on_unseen_inputs(dtype, act_order):
    """N = 200, K = 300: partial edge blocks both ways. H from one draw of inputs, the error measured on
    another draw of the same distribution."""
    torch.manual_seed(0)
    W = torch.randn(200, 300) * 0.05
    X = _correlated_inputs(1024, 300, seed=1)
    q, s = gptq_quantize_weight(W, X.t() @ X, dtype, act_order=act_order)
    plain_q, plain_s = quantize_weight_blockwise(W, dtype)

    assert q.dtype == dtype and list(q.shape) == [200, 300]
    assert_bitwise_equal(s, plain_s, "weight_scale_inv (the plain scales: amax / QMAX of each original block)")
    X_test = _correlated_inputs(1024, 300, seed=2)
    err_cal = (X_test @ (_naive_dequantize(q, s) - W).t()).pow(2).mean()
    err_plain = (X_test @ (_naive_dequantize(plain_q, plain_s) - W).t()).pow(2).mean()
    assert err_cal < 0.7 * err_plain, (err_cal.item(), err_plain.item())


def test_stacked_rows_equal_separate_layers():
    """Layers sharing an input (q/k/v) are rounded as one stacked matrix: the rows are independent given
    H, so the result equals rounding each alone, scales per layer included (192 rows: a partial block)."""
    torch.manual_seed(0)
    a, b = torch.randn(192, 256), torch.randn(128, 256)
    X = _correlated_inputs(512, 256, seed=3)
    H = X.t() @ X
    from fp8linear.calibrate import split_quantized

    (qa, sa), (qb, sb) = split_quantized(*gptq_quantize_weight(torch.cat([a, b]), H, row_blocks=[192, 128]), [192, 128])
    for (q, s), w in (((qa, sa), a), ((qb, sb), b)):
        q1, s1 = gptq_quantize_weight(w, H)
        assert_bitwise_equal(s, s1, "scales")
        # Two BLAS calls of different shapes may differ in the last bit; a flipped rounding is rare.
        assert (q.float() != q1.float()).float().mean() < 0.01


def _layer_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each nn.Linear's input [tokens, K] on `ids`, from the original model."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if type(m) is nn.Linear]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp8", "int8"])
def test_tiny_llama_layers_beat_plain_rounding_on_unseen_ids(dtype):
    """Every layer's output error (the FP8Linear's forward, activations quantized, on the original layer's
    input for held-out ids), summed over the model: calibrated below plain; and most layers below one by one."""
    ref = tiny_model("llama_odd", torch.float32)
    g = torch.Generator().manual_seed(5)
    calib, held_out = torch.randint(3, 256, (1024,), generator=g), torch.randint(3, 256, (2, 128), generator=g)
    plain = fp8linear.quantize_model(copy.deepcopy(ref), dtype=dtype, progress=False)
    cal = fp8linear.quantize_model(copy.deepcopy(ref), dtype=dtype, progress=False,
                                   calibration=Calibration(calib, seq_len=128))
    assert "14 of 14 nn.Linear rounded with error compensation against 1,024 calibration tokens" in str(
        cal.fp8linear_summary)
    inputs = _layer_inputs(ref, held_out)
    modules = dict(ref.named_modules())
    errs = {}
    for name, x in inputs.items():
        if name == "lm_head":
            continue
        w = modules[name].weight
        err = []
        for model in (plain, cal):
            layer = model.get_submodule(name)
            assert isinstance(layer, FP8Linear) and layer.dtype == dtype
            err.append((x @ (_naive_dequantize(layer.weight, layer.weight_scale_inv) - w).t()).pow(2).mean().item())
        errs[name] = err
    assert len(errs) == 14
    total_plain, total_cal = (sum(e[i] for e in errs.values()) for i in (0, 1))
    # Measured at this seed: 0.90 (fp8) and 0.87 (int8) of plain's total, every layer lower.
    assert total_cal < 0.95 * total_plain, errs
    assert sum(c < p for p, c in errs.values()) >= 12, errs


def test_sequential_inputs_are_those_the_quantized_model_feeds(monkeypatch):
    """Each group's H is taken on exactly the inputs its first layer gets in the finished model (earlier
    blocks and groups already quantized, their activations rounded per 1x128 group as FP8Linear runs them)."""
    from fp8linear import calibrate

    model = tiny_model("llama_odd", torch.float32)
    names = {id(m): n for n, m in model.named_modules() if type(m) is nn.Linear}
    seen: dict[str, list[torch.Tensor]] = {}
    real = calibrate._inputs_of

    def spy(layer, run, count):
        xs = real(layer, run, count)
        seen[names[id(layer)]] = [x.clone() for x in xs]
        return xs

    monkeypatch.setattr(calibrate, "_inputs_of", spy)
    ids = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(4))
    calib = Calibration(ids, seq_len=128)
    fp8linear.quantize_model(model, progress=False, calibration=calib)
    assert len(seen) == 8  # per block: q/k/v, o, gate/up, down
    final: dict[str, list[torch.Tensor]] = {n: [] for n in seen}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: final[n].append(a[0].clone()))
             for n in seen]
    with torch.no_grad():
        for row in calib.sequences():
            model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    for name in seen:
        assert isinstance(model.get_submodule(name), FP8Linear)
        for a, b in zip(seen[name], final[name], strict=True):
            # Equal on this CPU; a different input (plain activations, an unquantized earlier group) is
            # off by about 1e-2 of its norm.
            assert (a - b).norm() <= 1e-5 * b.norm(), name


def test_checkpoint_loads_with_load_quantized_and_transformers(tmp_path):
    """The calibrated checkpoint is the standard one: byte-exact through save/load_quantized, and
    transformers' FineGrainedFP8 reads it (on CPU it dequantizes) to the same logits."""
    ref = tiny_model("llama", torch.bfloat16)
    ids = torch.randint(3, 256, (512,), generator=torch.Generator().manual_seed(7))
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False, calibration=Calibration(ids, seq_len=128))
    fp8linear.save_quantized(q, tmp_path)
    loaded = fp8linear.load_quantized(tmp_path, device="cpu")
    state, state_loaded = q.state_dict(), loaded.state_dict()
    assert sorted(state) == sorted(state_loaded)
    for k in state:
        assert_bitwise_equal(state_loaded[k], state[k], k)
    # Every scale is the plain one: the bytes alone carry the calibration.
    for name, module in q.named_modules():
        if isinstance(module, FP8Linear):
            plain_scale = quantize_weight_blockwise(ref.get_submodule(name).weight, module.dtype)[1]
            assert_bitwise_equal(module.weight_scale_inv, plain_scale, name)

    theirs, cos = loaded_by_transformers(q, tmp_path, torch.randint(3, 256, (1, 32)))
    layer = theirs.model.layers[0].mlp.down_proj
    ours = q.model.layers[0].mlp.down_proj
    if hasattr(layer, "weight_scale_inv"):  # transformers kept the FP8 layer: the same bytes and scales
        assert_bitwise_equal(layer.weight, ours.weight, "transformers' down_proj.weight")
    assert cos > 0.99, cos


def test_int8_checkpoint_round_trip(tmp_path):
    ref = tiny_model("llama_odd", torch.float32)
    ids = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(8))
    q = fp8linear.quantize_model(copy.deepcopy(ref), dtype=torch.int8, progress=False, calibration=ids)
    down = q.model.layers[1].mlp.down_proj
    assert down.weight.dtype == torch.int8 and int(down.weight.abs().max()) <= 128
    fp8linear.save_quantized(q, tmp_path)
    loaded = fp8linear.load_quantized(tmp_path, device="cpu", dtype=torch.float32)
    for k, v in q.state_dict().items():
        assert_bitwise_equal(loaded.state_dict()[k], v, k)


def test_calibration_ids_default_and_text():
    from fp8linear import hf

    tok = hf.ByteTokenizer()
    ids = calibration_ids(tok, "héllo", tokens=3)
    assert ids.tolist() == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    assert calibration_ids(tok).numel() == 4096


def test_bad_arguments_are_named():
    ids = torch.randint(0, 10, (64,))
    with pytest.raises(ValueError, match="calibration ids must be an int64"):
        Calibration(ids.float())
    with pytest.raises(ValueError, match="calibration ids are empty"):
        Calibration(ids[:0])
    with pytest.raises(ValueError, match="calibration seq_len must be a positive int; got 0"):
        Calibration(ids, seq_len=0)
    with pytest.raises(ValueError, match="calibration damp must be a float in"):
        Calibration(ids, damp=1.5)
    with pytest.raises(ValueError, match="calibration act_order"):
        Calibration(ids, act_order="yes")
    with pytest.raises(TypeError, match="calibration must be token ids"):
        fp8linear.quantize_model(tiny_model("llama"), progress=False, calibration="some text")
    with pytest.raises(ValueError, match="calibration needs a model that takes input_ids"):
        fp8linear.quantize_model(nn.Linear(128, 128), progress=False, calibration=ids)
    with pytest.raises(ValueError, match=r"hessian must be \[K, K\] = \[64, 64\]"):
        gptq_quantize_weight(torch.randn(32, 64), torch.eye(32))
    with pytest.raises(ValueError, match="dtype must be torch.float8_e4m3fn or torch.int8"):
        gptq_quantize_weight(torch.randn(32, 64), torch.eye(64), torch.float16)
    with pytest.raises(ValueError, match="row_blocks must be positive row counts summing to N = 32"):
        gptq_quantize_weight(torch.randn(32, 64), torch.eye(64), row_blocks=[16])
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        calibration_ids(None, "text", tokens=0)
    with pytest.raises(ValueError, match="calibration text is empty"):
        calibration_ids(None, "  ")


def test_inputs_are_not_modified():
    ids = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(9))
    before = ids.clone()
    W, H = torch.randn(64, 128), torch.eye(128) * 2
    W0, H0 = W.clone(), H.clone()
    gptq_quantize_weight(W, H)
    fp8linear.quantize_model(tiny_model("llama"), progress=False, calibration=Calibration(ids, seq_len=64))
    assert torch.equal(ids, before) and torch.equal(W, W0) and torch.equal(H, H0)


# -- the command line -------------------------------------------------------------------------------------

@pytest.fixture
def plain_folder(tmp_path):
    """A plain fp32 tiny Llama folder, vocab 512 so byte ids fit (no tokenizer files: byte calibration ids)."""
    tiny_model("llama", torch.float32, vocab_size=512).save_pretrained(str(tmp_path / "plain"))
    return tmp_path / "plain"


def test_cli_quantize_calibrate_writes_a_loadable_checkpoint(tmp_path, plain_folder, capsys):
    from fp8linear.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2  # ünïcode\n" * 40, encoding="utf-8")
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out), "--calibrate", "--calib-text", str(text),
                 "--calib-tokens", "300", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"calibration: 300 tokens of {text}, sequences of 128" in printed  # max_position_embeddings 128
    loaded = fp8linear.load_quantized(out, device="cpu", dtype=torch.float32)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn


def test_cli_eval_calibrate_reports_both(plain_folder, capsys):
    from fp8linear.cli import main

    assert main(["eval", "--model", str(plain_folder), "--out", "", "--calibrate", "--calib-tokens", "256",
                 "--quant-dtype", "int8", "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 256 tokens of pydoc_data.topics" in printed
    assert "-- int8-calibrated" in printed and "logits cosine" in printed.split("-- int8-calibrated")[1]


def test_cli_calibration_arguments_are_checked(tmp_path, plain_folder, capsys):
    from fp8linear.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("some text")
    assert main(["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "o"), "--calib-text", str(text)]) == 2
    assert "--calib-text chooses the calibration data: add --calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "o"), "--calibrate",
              "--calib-text", str(tmp_path / "missing.txt")])
    assert "is not a file" in capsys.readouterr().err
    text.write_bytes(b"\xff\xfe not utf-8")
    assert main(["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "o"), "--calibrate",
                 "--calib-text", str(text)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_encoder_sentences_calibrate_a_bert():
    """An encoder calibrates on sentences of different lengths (a list of 1-D ids), the pooler included."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64)
    ref = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    sentences = [torch.randint(3, 256, (n,), generator=g) for n in (9, 17, 33, 12)]
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False, calibration=Calibration(sentences))
    assert "13 of 13 nn.Linear rounded" in str(q.fp8linear_summary)  # 6 a layer, and the pooler
    with pytest.raises(ValueError, match="entry 1 is torch.float32"):
        Calibration([sentences[0], sentences[1].float()])


# -- --target-ppl-delta: the fewest layers left unquantized ----------------------------------------------

def _sharp_llama_and_its_samples():
    """A tiny fp32 Llama whose weights are scaled up (sharp predictions, so rounding costs perplexity) and
    4 x 128 tokens sampled from it: on its own samples any change to the model raises perplexity in
    expectation (by the KL), as on real text for a trained model."""
    ref = tiny_model("llama_odd", torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.mul_(4)
    torch.manual_seed(11)
    start = torch.randint(3, 256, (4, 1), generator=torch.Generator().manual_seed(12))
    ids = ref.generate(start, do_sample=True, top_k=0, max_new_tokens=127, min_new_tokens=127,
                       pad_token_id=0)
    return ref, Calibration(ids)


def test_keep_for_ppl_target_keeps_the_fewest_layers_in_the_original_dtype():
    from fp8linear.calibrate import keep_for_ppl_target

    ref, calib = _sharp_llama_and_its_samples()
    quantized = fp8linear.quantize_model(copy.deepcopy(ref), progress=False, calibration=calib)
    everything = keep_for_ppl_target(ref, quantized, calib, 1000.0)
    assert everything.kept == [] and everything.weight_share == 1.0
    assert everything.ppl_delta > 0 and everything.kl > 0  # rounding costs this model on its own samples

    # A target a third of the all-quantized KL: held by KL <= log(1 + P/100), with some layers kept.
    target = 100 * math.expm1(everything.kl / 3)
    keep = keep_for_ppl_target(ref, quantized, calib, target)
    assert keep.kl <= math.log1p(target / 100) and 0 < len(keep.kept) < len(keep.sensitivity) == 14
    assert keep.kept == list(keep.sensitivity)[:len(keep.kept)]  # the most sensitive first
    # The share adds up: the quantized layers' weight elements over all the searched layers'.
    sizes = {n: ref.get_submodule(n).weight.numel() for n in keep.sensitivity}
    assert keep.total_elements == sum(sizes.values())
    assert keep.quantized_elements == sum(v for n, v in sizes.items() if n not in keep.kept)
    assert keep.weight_share == pytest.approx(keep.quantized_elements / keep.total_elements)
    # The searched model is left as it was.
    assert all(isinstance(quantized.get_submodule(n), FP8Linear) for n in keep.sensitivity)

    final = fp8linear.quantize_model(copy.deepcopy(ref), progress=False, calibration=calib, skip=keep.kept)
    for name in keep.sensitivity:
        layer = final.get_submodule(name)
        if name in keep.kept:  # the original layer, in the original dtype, with the original values
            assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
            assert torch.equal(layer.weight, ref.get_submodule(name).weight)
        else:
            assert isinstance(layer, FP8Linear)
    assert set(keep.kept) <= set(final.fp8linear_summary.modules_to_not_convert)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "0.6"])
def test_keep_for_ppl_target_refuses_bad_targets(bad):
    from fp8linear.calibrate import keep_for_ppl_target

    ref = tiny_model("llama", torch.float32)
    ids = torch.randint(3, 256, (128,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="target_ppl_delta must be a positive number of percent"):
        keep_for_ppl_target(ref, copy.deepcopy(ref), ids, bad)


def test_keep_for_ppl_target_needs_a_scored_position():
    from fp8linear.calibrate import keep_for_ppl_target

    ref = tiny_model("llama", torch.float32)
    ids = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(1))
    quantized = fp8linear.quantize_model(copy.deepcopy(ref), progress=False, calibration=Calibration(ids, seq_len=32))
    with pytest.raises(ValueError, match="calibration sequences must hold at least 2 tokens"):
        keep_for_ppl_target(ref, quantized, Calibration(ids[:1]), 1.0)


def test_cli_target_ppl_delta_quantize_and_eval(tmp_path, capsys):
    """quantize writes the kept layers into modules_to_not_convert; eval reports them and the share."""
    import json

    from fp8linear.cli import main

    model = tiny_model("llama", torch.float32, vocab_size=512)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)  # sharp predictions: rounding costs a measurable KL
    plain_folder = tmp_path / "sharp"
    model.save_pretrained(str(plain_folder))
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out), "--calibrate", "--calib-tokens", "512",
                 "--target-ppl-delta", "0.0001", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    kept_line = next(line for line in printed.splitlines() if line.startswith("kept unquantized ("))
    kept = kept_line.split(": ", 1)[1].split(", ")
    assert "FP8 weight share: " in printed and "on the calibration text KL" in printed
    not_converted = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert kept != ["none"] and set(kept) <= set(not_converted), (kept, not_converted)
    loaded = fp8linear.load_quantized(out, device="cpu", dtype=torch.float32)
    assert all(type(loaded.get_submodule(n)) is nn.Linear for n in kept)

    assert main(["eval", "--model", str(plain_folder), "--out", "", "--calibrate", "--calib-tokens", "256",
                 "--target-ppl-delta", "5", "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "kept unquantized (" in printed and "FP8 weight share: " in printed
    assert "-- fp8-calibrated-ppl5: calibrated again with those" in printed


def test_cli_target_ppl_delta_is_checked(tmp_path, plain_folder, capsys):
    from fp8linear.cli import main

    for bad in ("0", "-1", "nan", "inf", "abc"):
        with pytest.raises(SystemExit):
            main(["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "o"), "--calibrate",
                  "--target-ppl-delta", bad])
        assert "--target-ppl-delta" in capsys.readouterr().err
    assert main(["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "o"), "--target-ppl-delta",
                 "0.6"]) == 2
    assert "--target-ppl-delta 0.6 chooses layers to keep on top of calibrated rounding: add --calibrate" in (
        capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_target_ppl_delta_refuses_an_encoder(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from fp8linear.cli import main

    cfg = BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    assert main(["quantize", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o"), "--calibrate",
                 "--target-ppl-delta", "1", "--no-progress"]) == 2
    assert "--target-ppl-delta needs a causal language model (it targets perplexity); BertModel is not one" in (
        capsys.readouterr().err)
