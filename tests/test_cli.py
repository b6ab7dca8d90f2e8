"""The `fp8linear` command: demo, quantize -> generate, eval, errors (through main([...]) and -m)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fp8linear import cli, hf  # noqa: E402
from fp8linear.cli import CPU_NOTICE, main  # noqa: E402

from conftest import HAS_CUDA  # noqa: E402
from test_hf_models import tiny_model  # noqa: E402


@pytest.fixture
def plain_folder(tmp_path):
    """A plain (unquantized) bf16 tiny Llama folder, vocab 512 so byte ids fit (no tokenizer files)."""
    model = tiny_model("llama", torch.bfloat16, vocab_size=512)
    model.save_pretrained(str(tmp_path / "plain"))
    return tmp_path / "plain"


def test_module_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "fp8linear", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("demo", "generate", "eval", "quantize"):
        assert cmd in out.stdout


def test_demo_runs_and_says_where(capsys):
    assert main(["demo", "--max-new-tokens", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    if not HAS_CUDA:
        assert CPU_NOTICE in out
    assert "demo-llama" in out and "28 nn.Linear -> FP8Linear" in out
    assert "logits cosine" in out and "layer SNR: min" in out and "tokens/s" in out


def test_demo_moe_shows_the_experts(capsys):
    assert main(["demo", "--model", "demo-moe", "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "demo-moe (Qwen3MoeForCausalLM" in out
    # models/demo-moe: 4 layers of 12 experts, 3 x 512 x 256 weights each: 18.9M of the 26.2M parameters.
    assert "16 nn.Linear -> FP8Linear, 4 MoE experts modules -> FP8Experts (72% of the parameters)" in out
    assert "experts SNR (combined output): min" in out and "over 4 experts modules" in out
    assert "single expert SNR: min" in out and "logits cosine" in out


def test_eval_demo_moe_reports_experts_rows_and_drops_a_skipped_one(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "demo-moe", "--skip", r"model\.layers\.0\.mlp\.experts", "--out", str(out),
                 "--skip-below-db", "26", "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "3 MoE experts modules -> FP8Experts" in text and "kept in fp32: lm_head, model.layers.0.mlp.experts" in text
    experts_lines = [line for line in text.splitlines() if line.startswith("model.layers.") and "experts " in line]
    assert [line.split()[0] for line in experts_lines] == [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)]
    assert all("12 experts" in line and "worst expert" in line for line in experts_lines)
    with open(out / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    experts_rows = [r for r in rows if int(r["num_experts"])]
    assert len(rows) == 16 + 3 and [int(r["num_experts"]) for r in experts_rows] == [12] * 3
    assert all(15 < float(r["snr_db"]) < 40 and int(r["experts_routed"]) > 0 for r in experts_rows)
    # Two GEMMs in series put the experts near 24 dB, every linear layer near 28.6: 26 dB selects the experts,
    # and the variant keeps them whole.
    below = (out / "skip_snr_below_26dB.txt").read_text().split()
    assert below == [r"model\.layers\.0\.mlp\.experts"] + [r["name"] for r in experts_rows]
    assert "-- snr_below_26dB: 16 layers in FP8, 4 kept" in text


def test_quantize_then_generate_fp8_folder(tmp_path, plain_folder, capsys):
    out_dir = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out_dir), "--no-progress"]) == 0
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["modules_to_not_convert"] == ["lm_head"]
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--max-new-tokens", "3", "--prompt", "hi", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "FP8 checkpoint" in text and "[fp8]" in text and "tokens/s" in text and "tokens equal" in text


def test_generate_plain_folder_quantizes_on_the_fly(plain_folder, capsys):
    assert main(["generate", "--model", str(plain_folder), "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "14 nn.Linear -> FP8Linear" in text and "[fp32]" in text and "[fp8]" in text


def test_eval_writes_csv_png_and_applies_skip_list(tmp_path, plain_folder, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(plain_folder), "--out", str(out), "--skip-below-db", "100", "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SNR dB" in text and "logits cosine" in text
    with open(out / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14 and all(float(r["snr_db"]) > 20 for r in rows)
    assert (out / "snr.png").read_bytes()[:4] == b"\x89PNG"
    # Every layer is below 100 dB: the variant keeps all 14 in high precision.
    assert len((out / "skip_snr_below_100dB.txt").read_text().split()) == 14
    assert "0 layers in FP8, 14 kept" in text


def one_line_error(err: str) -> str:
    """The message of a CLI error, after checking it is the whole of stderr and one line."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp8linear: error: "), err
    return lines[0].removeprefix("fp8linear: error: ")


def exit_status(argv: list) -> int:
    """main(argv)'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def no_loading(monkeypatch):
    """Any model loading fails the test: the errors below must come before it."""
    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the argument was checked")

    for name in ("load_pretrained", "load_config", "demo_model"):
        monkeypatch.setattr(hf, name, refuse)


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    assert "local Hugging Face model folder" in one_line_error(capsys.readouterr().err)
    assert exit_status(["demo", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: must be >= 1; got 0" in one_line_error(capsys.readouterr().err)
    assert exit_status(["quantize", "--model", str(tmp_path)]) == 2  # argparse's own: --out missing
    assert "--out" in one_line_error(capsys.readouterr().err)


def test_unexpected_failure_is_one_line_exit_1_and_traceback_with_v(monkeypatch, capsys):
    def boom(args, say):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    assert main(["demo"]) == 1
    assert one_line_error(capsys.readouterr().err) == "RuntimeError: disk on fire second line (-v prints the traceback)"
    assert main(["demo", "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == (
        "fp8linear: error: RuntimeError: disk on fire second line")


@pytest.mark.parametrize("out", [".", "sub/fp8"])
def test_quantize_refuses_out_at_or_inside_model_before_loading(plain_folder, out, no_loading, capsys):
    before = {p.name: p.read_bytes() for p in plain_folder.iterdir()}
    assert main(["quantize", "--model", str(plain_folder), "--out", str(plain_folder / out)]) == 2
    message = one_line_error(capsys.readouterr().err)
    assert "--model folder" in message and "choose a folder outside it" in message
    assert {p.name: p.read_bytes() for p in plain_folder.iterdir()} == before


def test_out_that_is_a_file_is_refused_before_loading(tmp_path, plain_folder, no_loading, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for cmd in ("quantize", "eval"):
        for out in (taken, taken / "below"):
            assert main([cmd, "--model", str(plain_folder), "--out", str(out)]) == 2
            message = one_line_error(capsys.readouterr().err)
            assert f"{taken} is a file, not a folder" in message
    assert taken.read_text() == "not a folder"


@pytest.mark.parametrize("size", ["5XB", "0GB", "1000", "lots"])
def test_max_shard_size_is_checked_before_loading(tmp_path, plain_folder, size, no_loading, capsys):
    argv = ["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "fp8"), "--max-shard-size", size]
    assert exit_status(argv) == 2
    message = one_line_error(capsys.readouterr().err)
    assert "--max-shard-size" in message and repr(size) in message and "5GB" in message
    assert not (tmp_path / "fp8").exists()


def test_max_shard_size_splits_the_checkpoint(tmp_path, plain_folder):
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out), "--max-shard-size", "200KB",
                 "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # about 0.6 MB in all


def _broken_copy(plain_folder, tmp_path, how: str):
    folder = tmp_path / how
    shutil.copytree(plain_folder, folder)
    weights = folder / "model.safetensors"
    if how == "no_weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "index_missing_shard":
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return folder


@pytest.mark.parametrize("how, expected", [
    ("no_weights", "has config.json but no weights: none of model.safetensors"),
    ("truncated", "model.safetensors' is not a readable safetensors file"),
    ("index_missing_shard", "names shard files that are not in the folder: model-00002-of-00002.safetensors"),
])
def test_broken_model_folder_is_one_line_naming_it(tmp_path, plain_folder, how, expected, capsys):
    folder = _broken_copy(plain_folder, tmp_path, how)
    for argv in (["quantize", "--out", str(tmp_path / "fp8")], ["generate"], ["eval", "--out", ""]):
        assert main([argv[0], "--model", str(folder), "--device", "cpu", *argv[1:]]) == 2
        message = one_line_error(capsys.readouterr().err)
        assert str(folder) in message and expected in message


def test_eval_without_matplotlib_writes_csv_and_says_how_to_plot(tmp_path, plain_folder, monkeypatch, capsys):
    # A None entry makes `import matplotlib` raise ModuleNotFoundError, installed or not.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(plain_folder), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "SNR dB" in text and "logits cosine" in text  # the text report
    with open(out / "layers.csv") as f:
        assert len(list(csv.DictReader(f))) == 14
    assert not (out / "snr.png").exists()
    lines = [line for line in text.splitlines() if "snr.png" in line]
    assert len(lines) == 1 and "pip install 'fp8linear[plot]'" in lines[0], text


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"fp8linear {name} {action.option_strings[0]} has no help"
    subs = _subparsers(parser)
    assert "(default: 16)" in subs["demo"].format_help()  # --max-new-tokens
    assert "(default: 0)" in subs["demo"].format_help()  # --seed
    assert "(default: The capital of France is)" in subs["generate"].format_help()
    assert "(default: 5GB)" in subs["quantize"].format_help()
    assert "(default: the model's own" in " ".join(subs["quantize"].format_help().split())
    assert "(default: None)" not in " ".join(sub.format_help() for sub in subs.values())


def test_verbose_before_or_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "demo"]).verbose is True
    assert parser.parse_args(["demo", "-v"]).verbose is True
    assert parser.parse_args(["quantize", "--model", "m", "--out", "o", "--verbose"]).verbose is True
    assert parser.parse_args(["demo"]).verbose is False


def test_log_lines_carry_one_prefix(tmp_path, plain_folder, capsys):
    argv = ["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "fp8"), "--skip", "no_such_layer",
            "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "fp8linear.quantize_model: skip entry 'no_such_layer' matched no module name" in err
    assert main([*argv, "-v"]) == 0
    err = capsys.readouterr().err
    assert "nn.Linear -> FP8Linear" in err and "save_quantized" in err  # INFO with -v
    assert "fp8linear: fp8linear" not in err


def test_no_progress_silences_transformers_loading_bar(tmp_path, plain_folder, capsys):
    from transformers.utils import logging as hf_logging

    argv = ["quantize", "--model", str(plain_folder), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "Loading weights" in capsys.readouterr().err  # what there is to silence
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # as it was before main()


def _tensors(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("flag, dtype, config_dtype", [
    ([], torch.bfloat16, "bfloat16"),  # the model's own
    (["--dtype", "fp32"], torch.float32, "float32"),
])
def test_quantize_dtype_of_unquantized_tensors(tmp_path, plain_folder, flag, dtype, config_dtype, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out), "--no-progress", *flag]) == 0
    assert f"kept in {cli._dtype_name(dtype)}: lm_head" in capsys.readouterr().out
    source = _tensors(plain_folder / "model.safetensors")
    saved = _tensors(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["dtype"] == config_dtype
    quantized = {k.removesuffix("_scale_inv") for k in saved if k.endswith(".weight_scale_inv")}
    assert len(quantized) == 14 and {saved[k].dtype for k in quantized} == {torch.float8_e4m3fn}
    plain = {k: t for k, t in saved.items() if k in source and k not in quantized}  # embeddings, norms, lm_head
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(plain)
    for name, tensor in plain.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, source[name].to(dtype)), name  # bf16 -> fp32 is exact


def test_generate_no_baseline_says_so_for_both_kinds_of_folder(tmp_path, plain_folder, capsys):
    fp8_dir = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(fp8_dir), "--no-progress"]) == 0
    capsys.readouterr()
    for folder in (plain_folder, fp8_dir):
        assert main(["generate", "--model", str(folder), "--max-new-tokens", "2", "--no-baseline", "--no-progress",
                     "--device", "cpu"]) == 0
        text = capsys.readouterr().out
        assert "no baseline (--no-baseline)" in text and "baseline:" not in text
        assert "[fp8]" in text and "[fp32" not in text and "tokens equal" not in text


def test_skip_file_takes_a_shipped_list_by_name(tmp_path, plain_folder, monkeypatch, capsys):
    import fp8linear.convert

    shipped = tmp_path / "models"
    (shipped / "skip-lists").mkdir(parents=True)
    (shipped / "skip-lists" / "tiny-down.txt").write_text("# a comment\nmodel.layers.0.mlp.down_proj\n")
    monkeypatch.setattr(fp8linear.convert, "models_dir", lambda: shipped)
    for i, name in enumerate(["tiny-down", "tiny-down.txt"]):
        out = tmp_path / f"fp8_{i}"
        assert main(["quantize", "--model", str(plain_folder), "--out", str(out), "--skip-file", name,
                     "--no-progress"]) == 0
        kept = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
        assert kept == ["lm_head", "model.layers.0.mlp.down_proj"]
    capsys.readouterr()
    assert exit_status(["quantize", "--model", str(plain_folder), "--out", str(tmp_path / "x"),
                        "--skip-file", "tiny-up"]) == 2
    message = one_line_error(capsys.readouterr().err)
    assert "'tiny-up' is neither a file nor the name of a shipped skip list; shipped: tiny-down" in message


def test_skip_file_finds_the_real_shipped_list():
    from fp8linear.convert import models_dir

    args = cli.build_parser().parse_args(["eval", "--model", "minilm", "--skip-file", "all-MiniLM-L6-v2.cosine-0.999"])
    assert args.skip_file == models_dir() / "skip-lists" / "all-MiniLM-L6-v2.cosine-0.999.txt"


def test_demo_and_generate_with_fusion(tmp_path, plain_folder, capsys):
    assert main(["demo", "--max-new-tokens", "2", "--no-progress", "--fuse"]) == 0
    out = capsys.readouterr().out
    # demo-llama: intermediate 1408 = 11 x 128 fuses; its 4 layers have 8 RMSNorms.
    assert "fused: 4 of 4 gated MLPs, 8 of 8 RMSNorms" in out and "logits cosine" in out
    out_dir = tmp_path / "fp8"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--max-new-tokens", "2", "--prompt", "hi", "--device", "cpu",
                 "--fuse"]) == 0
    text = capsys.readouterr().out
    assert "fused: " in text and "RMSNorms" in text and "tokens/s" in text


def test_quantize_writes_compressed_tensors_and_generate_reads_it(tmp_path, plain_folder, capsys):
    out_dir = tmp_path / "ct"
    assert main(["quantize", "--model", str(plain_folder), "--out", str(out_dir), "--format", "compressed-tensors",
                 "--no-progress"]) == 0
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--max-new-tokens", "2", "--prompt", "hi", "--device", "cpu"]) == 0
    assert "FP8 checkpoint" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="the refusal is for a device without CUDA")
def test_generate_refuses_a_backend_the_device_cannot_run_before_loading(plain_folder, capsys, monkeypatch):
    from fp8linear import hf

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the backend check")

    monkeypatch.setattr(hf, "load_pretrained", no_loading)
    rc = main(["generate", "--model", str(plain_folder), "--backend", "deepgemm", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("fp8linear: error: --backend deepgemm cannot run on cpu: needs a CUDA device")
