"""compressed-tensors FP8_BLOCK checkpoints: read one written by hand, honour ignore/targets, write and re-read
byte-exact, refuse every other scheme by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import fp8linear  # noqa: E402
from fp8linear import compressed_tensors  # noqa: E402
from fp8linear.linear import FP8Linear  # noqa: E402

from conftest import assert_bitwise_equal  # noqa: E402
from test_checkpoint import _all_headers, _assert_same_state as assert_same_state  # noqa: E402
from test_hf_models import tiny_model  # noqa: E402

# What llm-compressor writes for its FP8_BLOCK preset (compressed-tensors' QuantizationArgs dumped whole).
FP8_BLOCK_GROUP = {
    "format": "float-quantized",
    "targets": ["Linear"],
    "weights": {
        "actorder": None, "block_structure": [128, 128], "dynamic": False, "group_size": None, "num_bits": 8,
        "observer": "static_minmax", "observer_kwargs": {}, "strategy": "block", "symmetric": True, "type": "float",
    },
    "input_activations": {
        "actorder": None, "block_structure": None, "dynamic": True, "group_size": 128, "num_bits": 8,
        "observer": None, "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "float",
    },
    "output_activations": None,
}


def ct_config(targets=("Linear",), ignore=("lm_head",), **group_changes) -> dict:
    group = {**copy.deepcopy(FP8_BLOCK_GROUP), "targets": list(targets), **group_changes}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": group}, "ignore": list(ignore), "kv_cache_scheme": None,
        "global_compression_ratio": None, "sparsity_config": {},
    }


def block_quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Written apart from fp8linear.weights: one 128x128 block at a time, scale = amax / 448 stored in
    scale_dtype (llm-compressor keeps the model dtype), fp8 = w / stored scale."""
    N, K = w.shape
    scale = torch.empty(-(-N // 128), -(-K // 128), dtype=scale_dtype)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s = (block.abs().max().clamp(min=1e-12) / 448.0).to(scale_dtype)
            scale[i, j] = s
            q_block = (block / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = q_block
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 * scale of its block, in fp32."""
    N, K = q.shape
    expanded = scale.float().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return q.float() * expanded


def write_ct_checkpoint(folder: Path, model: nn.Module, quantized: set, qc: dict, scale_dtype=torch.bfloat16,
                        shards: int = 2) -> dict:
    """Write `model` as a compressed-tensors checkpoint by hand: the layers in `quantized` as fp8 weight +
    weight_scale, everything else as it is, in `shards` files with an index. Returns {layer: (q, scale)}."""
    folder.mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    written = {}
    for name in sorted(quantized):
        q, scale = block_quantize(state[f"{name}.weight"], scale_dtype)
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = q, scale
        written[name] = (q, scale)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in names[i::shards]}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names[i::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    return written


def linear_names(model: nn.Module) -> set:
    return {n for n, m in model.named_modules() if type(m) is nn.Linear}


@pytest.fixture
def llama():
    """Tiny Llama in bf16; intermediate 200 gives partial 128x128 edge blocks in gate/up/down."""
    return tiny_model("llama_odd", torch.bfloat16)


# (targets, ignore, which Linear layers are quantized: worked out by hand from compressed-tensors' rule)
CASES = {
    "class_target_regex_ignore": (
        ["Linear"], ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"],
        lambda names: {n for n in names if n not in ("lm_head", "model.layers.1.mlp.down_proj")}),
    "regex_targets": (
        ["re:.*self_attn\\.(q|k|v|o)_proj$", "re:.*mlp\\.(gate|up)_proj$"], ["lm_head"],
        lambda names: {n for n in names if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj")}),
    "exact_name_targets": (
        ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"], [],
        lambda names: {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_written_checkpoint_loads_and_honours_ignore_and_targets(tmp_path, llama, case):
    targets, ignore, expected = CASES[case]
    quantized = expected(linear_names(llama))
    written = write_ct_checkpoint(tmp_path / "ct", llama, quantized, ct_config(targets, ignore))
    loaded = fp8linear.load_quantized(tmp_path / "ct", device="cpu", dtype=torch.float32, backend="reference")

    assert {n for n, m in loaded.named_modules() if isinstance(m, FP8Linear)} == quantized
    assert set(loaded.fp8linear_summary.skipped) == linear_names(llama) - quantized
    for name, (q, scale) in written.items():
        layer = loaded.get_submodule(name)
        assert_bitwise_equal(layer.weight, q, f"{name}.weight")
        assert_bitwise_equal(layer.weight_scale_inv, scale.float(), f"{name}.weight_scale_inv")  # bf16 -> fp32 exact
    for name in linear_names(llama) - quantized:
        assert_bitwise_equal(loaded.get_submodule(name).weight, llama.get_submodule(name).weight.float(), name)

    # Against a plain fp32 model holding the dequantized weights: only the activations' fp8 rounding differs.
    reference = copy.deepcopy(llama).float()
    with torch.no_grad():
        for name, (q, scale) in written.items():
            reference.get_submodule(name).weight.copy_(dequantize(q, scale))
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours, theirs = loaded(ids).logits, reference(ids).logits
    cos = nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0).item()
    assert cos > 0.99995, cos
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.95


def test_checkpoint_contradicting_its_config_is_refused(tmp_path, llama):
    linears = linear_names(llama)
    down = "model.layers.1.mlp.down_proj"
    # A scale for a layer that `ignore` covers.
    write_ct_checkpoint(tmp_path / "scaled_but_ignored", llama, linears - {"lm_head"},
                        ct_config(ignore=["lm_head", "re:.*layers.1.mlp.down"]))  # re.match: a prefix will do
    with pytest.raises(ValueError, match=rf"holds {down}.weight_scale, but .*entry 're:\.\*layers.1.mlp.down'"):
        fp8linear.load_quantized(tmp_path / "scaled_but_ignored", device="cpu")
    # A targeted, not ignored layer stored unquantized.
    write_ct_checkpoint(tmp_path / "targeted_but_plain", llama, linears - {"lm_head", down}, ct_config())
    with pytest.raises(ValueError, match=rf"target 'Linear' matches '{down}' \(Linear\).*holds no {down}.weight_scale"):
        fp8linear.load_quantized(tmp_path / "targeted_but_plain", device="cpu")
    # A scale for a layer no target names.
    write_ct_checkpoint(tmp_path / "scaled_untargeted", llama, {"model.layers.0.self_attn.q_proj", down},
                        ct_config(targets=["model.layers.0.self_attn.q_proj"], ignore=[]))
    with pytest.raises(ValueError, match=rf"holds {down}.weight_scale, but no config_groups target"):
        fp8linear.load_quantized(tmp_path / "scaled_untargeted", device="cpu")


def test_save_as_compressed_tensors_and_reload_byte_exact(tmp_path, llama):
    q = fp8linear.quantize_model(copy.deepcopy(llama), progress=False)
    fp8linear.save_quantized(q, tmp_path / "ct", format="compressed-tensors", max_shard_size=60_000)

    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("type", "num_bits", "strategy", "block_structure", "dynamic")} == \
        {"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128], "dynamic": False}
    assert {k: group["input_activations"][k] for k in ("type", "num_bits", "strategy", "group_size", "dynamic")} == \
        {"type": "float", "num_bits": 8, "strategy": "group", "group_size": 128, "dynamic": True}
    headers = _all_headers(tmp_path / "ct")
    assert not any(k.endswith("weight_scale_inv") for k in headers)
    for name in q.fp8linear_summary.swapped:
        assert headers[f"{name}.weight"]["dtype"] == "F8_E4M3"
        assert headers[f"{name}.weight_scale"]["dtype"] == "F32"
    assert headers["model.layers.0.mlp.down_proj.weight_scale"]["shape"] == [1, 2]

    loaded = fp8linear.load_quantized(tmp_path / "ct", device="cpu")
    assert_same_state(q, loaded)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert_bitwise_equal(loaded(ids).logits, q(ids).logits, "logits")


def test_round_trip_through_the_default_format(tmp_path, llama):
    """A hand-written compressed-tensors checkpoint, re-saved in our format and back, keeps every byte."""
    quantized = linear_names(llama) - {"lm_head"}
    write_ct_checkpoint(tmp_path / "theirs", llama, quantized, ct_config())
    first = fp8linear.load_quantized(tmp_path / "theirs", device="cpu")
    fp8linear.save_quantized(first, tmp_path / "fp8")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    second = fp8linear.load_quantized(tmp_path / "fp8", device="cpu")
    assert_same_state(first, second)
    fp8linear.save_quantized(second, tmp_path / "ct", format="compressed-tensors")
    assert_same_state(first, fp8linear.load_quantized(tmp_path / "ct", device="cpu"))


def _weights(**changes) -> dict:
    return {**FP8_BLOCK_GROUP["weights"], **changes}


def _inputs(**changes) -> dict:
    return {**FP8_BLOCK_GROUP["input_activations"], **changes}


UNSUPPORTED = {
    "fp8_dynamic_channel": (
        dict(weights=_weights(strategy="channel", block_structure=None),
             input_activations=_inputs(strategy="token", group_size=None)),
        r"is FP8_DYNAMIC \(weights: float 8-bit, strategy 'channel', static; input_activations: float 8-bit, "
        r"strategy 'token', dynamic\); fp8linear reads only FP8_BLOCK \(weights: float 8-bit, strategy 'block', "
        r"block_structure \[128, 128\]"),
    "fp8_static_tensor": (
        dict(weights=_weights(strategy="tensor", block_structure=None),
             input_activations=_inputs(strategy="tensor", group_size=None, dynamic=False)),
        r"is FP8 \(weights: float 8-bit, strategy 'tensor', static; input_activations: float 8-bit, "
        r"strategy 'tensor', static\)"),
    "int_w4a16": (  # strategy left out: compressed-tensors infers 'group' from group_size
        dict(weights={"num_bits": 4, "type": "int", "group_size": 128, "symmetric": True}, input_activations=None,
             format="pack-quantized"),
        r"is W4A16 \(weights: int 4-bit, strategy 'group', group_size 128, static; input_activations: none\)"),
    "fp8_block_weight_only": (
        dict(input_activations=None),
        r"is a custom scheme \(weights: float 8-bit, strategy 'block', block_structure \[128, 128\], static; "
        r"input_activations: none\)"),
    "other_block": (
        dict(weights=_weights(block_structure=[64, 64])),
        r"is a custom scheme \(weights: float 8-bit, strategy 'block', block_structure \[64, 64\]"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_other_schemes_are_refused_by_name(tmp_path, llama, case):
    changes, message = UNSUPPORTED[case]
    folder = tmp_path / case
    folder.mkdir()
    config = llama.config.to_dict()
    config["quantization_config"] = ct_config(**changes)
    (folder / "config.json").write_text(json.dumps(config))  # refused before any weight is read
    with pytest.raises(ValueError, match=r"quantization_config\['config_groups'\]\['group_0'\] " + message):
        fp8linear.load_quantized(folder, device="cpu")


@pytest.mark.parametrize("qc, message", [
    ({"config_groups": {"FP8_DYNAMIC": ["Linear"]}},
     r"\['FP8_DYNAMIC'\] is the preset 'FP8_DYNAMIC'; fp8linear reads only FP8_BLOCK"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}},
     r"\['kv_cache_scheme'\] is set \(KV-cache"),
    ({"format": "naive-quantized", "config_groups": {"g": {k: v for k, v in FP8_BLOCK_GROUP.items() if k != "format"}}},
     r"\['g'\] has format 'naive-quantized'; FP8_BLOCK checkpoints store fp8 bytes as 'float-quantized'"),
    ({"ignore": "lm_head"}, r"\['ignore'\] must be a list of strings; got 'lm_head'"),
])
def test_config_errors(qc, message):
    with pytest.raises(ValueError, match=message):
        compressed_tensors.parse({**ct_config(), **qc})


def test_preset_name_group_is_read():
    scheme = compressed_tensors.parse({"quant_method": "compressed-tensors", "format": "float-quantized",
                                       "config_groups": {"FP8_BLOCK": ["Linear"]}, "ignore": ["lm_head"]})
    assert scheme.targets == ("Linear",) and scheme.ignore == ("lm_head",)
    assert (scheme.config.dtype, scheme.config.block_size, scheme.config.scale_ue8m0) == \
        (torch.float8_e4m3fn, (128, 128), False)


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    int8 = fp8linear.quantize_model(tiny_model("llama", torch.bfloat16), dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match=r"format='compressed-tensors' holds fp8 e4m3 weights with exact scales only"
                                         r".*this model is int8.*save it with format='fp8'"):
        fp8linear.save_quantized(int8, tmp_path / "int8", format="compressed-tensors")
    pow2 = nn.Sequential(FP8Linear.from_linear(nn.Linear(256, 128), scale_ue8m0=True))
    with pytest.raises(ValueError, match=r"this model is e4m3,block=128x128,ue8m0=True"):
        fp8linear.save_quantized(pow2, tmp_path / "pow2", format="compressed-tensors")
    with pytest.raises(ValueError, match=r"format must be one of \['compressed-tensors', 'fp8'\]; got 'gguf'"):
        fp8linear.save_quantized(int8, tmp_path / "x", format="gguf")
    assert not any(tmp_path.iterdir())  # nothing written


def test_moe_model_lists_routers_in_ignore(tmp_path):
    """vLLM quantizes every Linear that `ignore` does not name, routers included: they must be listed."""
    q = fp8linear.quantize_model(tiny_model("qwen2_moe", torch.bfloat16), progress=False)
    fp8linear.save_quantized(q, tmp_path, format="compressed-tensors")
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.shared_expert_gate"} <= set(ignore)
    assert set(q.fp8linear_summary.skipped) <= set(ignore)
    assert_same_state(q, fp8linear.load_quantized(tmp_path, device="cpu"))
