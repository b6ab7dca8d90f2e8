"""quantize_model on plain nn.Module trees: skip rules (fullmatch), tied weights, subclasses, root swap."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

import fp8linear
from fp8linear.convert import QuantizeSummary, recipe_rules
from fp8linear.linear import FP8Linear

from conftest import assert_bitwise_equal


class MLP(nn.Module):
    """The names that broke a published tool: a router `gate` next to `gate_proj`."""

    def __init__(self, hidden=128, inter=256):
        super().__init__()
        self.gate = nn.Linear(hidden, 8, bias=False)  # router-like
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=True)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.attn = nn.MultiheadAttention(128, 4, batch_first=True)  # out_proj: an nn.Linear subclass


class Toy(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(64, 128)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(128, 64, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def _swapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear))


def test_default_recipe_skips_router_gate_not_gate_proj():
    """The "*" recipe's router rule is `(.*\\.)?(mlp|...)\\.(gate|router)` under fullmatch: it keeps
    `layers.0.mlp.gate` and must not catch `layers.0.mlp.gate_proj` (the substring rule `mlp.gate` did)."""
    q = fp8linear.quantize_model(Toy(), progress=False)
    s = q.fp8linear_summary
    assert "layers.0.mlp.gate" in s.skipped and "layers.1.mlp.gate" in s.skipped
    assert "layers.0.mlp.gate_proj" in s.swapped and "layers.1.mlp.gate_proj" in s.swapped
    assert type(q.layers[0].mlp.gate) is nn.Linear
    assert isinstance(q.layers[0].mlp.gate_proj, FP8Linear)


@pytest.mark.parametrize(
    "skip, kept",
    [
        # An exact name keeps that module only.
        (["layers.0.mlp.gate_proj"], {"layers.0.mlp.gate_proj"}),
        # A regex matches whole names: `.*mlp\.gate` is not a prefix rule, so gate_proj stays swapped.
        ([r".*mlp\.gate"], set()),  # (the routers are in the default recipe already)
        ([r".*\.gate_proj"], {"layers.0.mlp.gate_proj", "layers.1.mlp.gate_proj"}),
        ([re.compile(r"layers\.1\..*")], {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}),
        ("layers.1.mlp.up_proj", {"layers.1.mlp.up_proj"}),  # a lone string is one entry
    ],
)
def test_user_skip_fullmatch(skip, kept):
    base = {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
            "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj", "head"}
    q = fp8linear.quantize_model(Toy(), skip=skip, progress=False)
    assert set(_swapped(q)) == base - kept
    for name in kept:
        assert name in q.fp8linear_summary.skipped


def test_exact_name_is_literal_and_a_prefix_does_not_cover_children():
    q = fp8linear.quantize_model(Toy(), skip=["layers.0.mlp", "layers.0.mlp.gate"], progress=False)
    # "layers.0.mlp" names the container, not its layers: nothing under it is kept by that entry.
    assert "layers.0.mlp.up_proj" in q.fp8linear_summary.swapped
    assert q.fp8linear_summary.unmatched_skip == ["layers.0.mlp"]


def test_unmatched_skip_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fp8linear"):
        q = fp8linear.quantize_model(Toy(), skip=["no.such.layer"], progress=False)
    assert q.fp8linear_summary.unmatched_skip == ["no.such.layer"]
    assert "no.such.layer" in caplog.text and "matched no module" in caplog.text


def test_subclass_and_tied_weights_are_kept():
    q = fp8linear.quantize_model(Toy(tied=True), skip=None, progress=False)
    s = q.fp8linear_summary
    assert "head" in s.skipped and "tied to embed.weight" in s.skipped["head"]
    assert q.head.weight is q.embed.weight
    out_proj = "layers.0.attn.out_proj"
    assert out_proj in s.skipped and "subclass" in s.skipped[out_proj]
    x = torch.randn(2, 5, 128)
    q.layers[0].attn(x, x, x)  # still works: its out_proj was not replaced


def _quantize_block_by_block(w: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """DESIGN.md "Weights", one 128 x 128 block at a time in fp32: scale_inv = max(|block|, 1e-10) / 448,
    weight = clamp(block / scale_inv, -448, 448) as fp8 e4m3."""
    N, K = w.shape
    weight = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(-(-N // 128), -(-K // 128))
    for i in range(0, N, 128):
        for j in range(0, K, 128):
            block = w[i : i + 128, j : j + 128].float()
            s = torch.clamp(block.abs().max(), min=1e-10) / 448.0
            scale_inv[i // 128, j // 128] = s
            weight[i : i + 128, j : j + 128] = (block / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return weight, scale_inv


def test_swapped_layer_holds_the_blockwise_quantized_weight():
    model = Toy()
    w = model.layers[0].mlp.down_proj.weight.detach().clone()
    b = model.layers[0].mlp.down_proj.bias.detach().clone()
    q = fp8linear.quantize_model(model, progress=False)
    layer = q.layers[0].mlp.down_proj
    ew, es = _quantize_block_by_block(w)
    assert_bitwise_equal(layer.weight, ew, "weight")
    assert_bitwise_equal(layer.weight_scale_inv, es, "weight_scale_inv")
    assert_bitwise_equal(layer.bias, b, "bias")


def test_root_linear_is_returned_swapped_not_mutated():
    lin = nn.Linear(256, 384)
    w = lin.weight.detach().clone()
    out = fp8linear.quantize_model(lin, progress=False)
    assert isinstance(out, FP8Linear) and out is not lin
    assert type(lin) is nn.Linear and torch.equal(lin.weight, w)
    assert out.fp8linear_summary.swapped == ["<root>"]


def test_int8_and_backend_are_passed_through():
    q = fp8linear.quantize_model(Toy(), dtype=torch.int8, backend="reference", progress=False)
    layer = q.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.int8 and layer.backend == "reference"
    assert q.fp8linear_summary.dtype == torch.int8


def test_bad_arguments_raise_before_touching_the_model():
    model = Toy()
    with pytest.raises(ValueError, match=r"dtype must be torch.float8_e4m3fn or torch.int8; got torch.float16"):
        fp8linear.quantize_model(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8linear.quantize_model(model, backend="cutlass")
    with pytest.raises(ValueError, match=r"skip entry '\(\[' is not a valid regular expression"):
        fp8linear.quantize_model(model, skip=["(["])
    with pytest.raises(TypeError, match="skip entries must be"):
        fp8linear.quantize_model(model, skip=[3])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fp8linear.quantize_model("model")
    assert not _swapped(model)


def test_progress_bar_and_summary_text(capsys):
    q = fp8linear.quantize_model(Toy(), progress=True)
    err = capsys.readouterr().err
    assert "fp8linear: quantizing" in err
    text = str(q.fp8linear_summary)
    assert "7 nn.Linear -> FP8Linear" in text and "kept layers.0.mlp.gate" in text


def test_recipes_are_valid_and_anchored():
    for model_type in ("llama", "qwen2_moe", "mixtral", "unknown_type", None):
        for rule in recipe_rules(model_type):
            assert not rule.matches("model.layers.0.mlp.gate_proj"), rule.spec
            assert not rule.matches("model.layers.0.mlp.up_proj"), rule.spec
    names = {r.spec for r in recipe_rules("qwen2_moe")}
    assert any(re.fullmatch(n, "model.layers.3.mlp.shared_expert_gate") for n in names)
    assert isinstance(QuantizeSummary().modules_to_not_convert, list)
