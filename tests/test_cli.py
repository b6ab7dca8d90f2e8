"""The `fp8linear` command: demo, quantize -> generate, eval, errors (through main([...]) and -m)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

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


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8linear generate: error:") and "local Hugging Face model folder" in err
    with pytest.raises(SystemExit):
        main(["demo", "--max-new-tokens", "0"])
    assert main(["eval", "--model", str(tmp_path), "--skip-file", str(tmp_path / "none.txt")]) == 2


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
