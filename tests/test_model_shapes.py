"""scripts/model_shapes.py: the layer shapes the tuning and benchmark scripts measure for `--model`."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
model_shapes = importlib.import_module("model_shapes")  # scripts/ is not a package


def _demo_dims():
    from fp8linear import hf

    c = hf.demo_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.hidden_size, c.intermediate_size, c.num_key_value_heads * head_dim, c.num_attention_heads * head_dim


def test_demo_model_shapes_follow_its_config():
    """Every projection quantize_model swaps, from the config's sizes; lm_head stays out (the recipe skips
    it), and with fuse_mlp the gate and up projections become one of twice the width."""
    H, inter, kv, q = _demo_dims()
    expected = {(q, H), (kv, H), (H, q), (inter, H), (H, inter)}
    assert model_shapes.model_shapes("demo-llama") == sorted(expected)
    fused = (expected - {(inter, H)}) | {(2 * inter, H)}
    assert model_shapes.model_shapes("demo-llama", fuse_mlp=True) == sorted(fused)


def test_a_local_folder_reads_its_config(tmp_path):
    from fp8linear.convert import models_dir

    (tmp_path / "config.json").write_text((models_dir() / "demo-llama" / "config.json").read_text())
    assert model_shapes.model_shapes(str(tmp_path)) == model_shapes.model_shapes("demo-llama")


def _parse(argv):
    ap = argparse.ArgumentParser()
    model_shapes.add_shape_arguments(ap)
    return ap, ap.parse_args(argv)


@pytest.mark.parametrize("argv,message", [
    (["--fuse-mlp"], "--fuse-mlp goes with --model"),
    (["--model", "demo-llama", "--N", "64", "--K", "128"], "--model and --N/--K name shapes two ways"),
    (["--N", "64", "128", "--K", "128"], "--N and --K take the same number of values"),
    (["--model", "no-such-model"], "--model no-such-model: no built-in model 'no-such-model'"),
])
def test_bad_shape_options_name_the_problem(argv, message, capsys):
    ap, args = _parse(argv)
    with pytest.raises(SystemExit):
        model_shapes.shapes_from_args(ap, args, [(1, 1)])
    assert message in capsys.readouterr().err


def test_shape_options_and_default():
    ap, args = _parse(["--N", "64", "192", "--K", "128", "256"])
    assert model_shapes.shapes_from_args(ap, args, [(1, 1)]) == [(64, 128), (192, 256)]
    ap, args = _parse([])
    assert model_shapes.shapes_from_args(ap, args, [(1, 1)]) == [(1, 1)]
