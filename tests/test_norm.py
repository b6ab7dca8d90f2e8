"""FP8RMSNorm and quantize_model(fuse_norm=True): the norm's output reaches q/k/v and gate/up quantized.

The contract (fp8linear.norm): a consumer that receives the handoff computes bit for bit what it computes
by quantizing the norm's output itself; the swap changes only the norm (rmsnorm_reference's formula).
So the tests compare a fused model with the same model whose norms hand nothing over, bit for bit, and
count the quantizations that no longer run. These run the CPU op implementations; test_norm_gpu.py the
kernels, with the backends auto picks (cuBLASLt / DeepGEMM at prefill sizes, small_m at decode).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear import linear as linear_module  # noqa: E402
from fp8linear.fused import rmsnorm_reference  # noqa: E402
from fp8linear.norm import FP8RMSNorm, fuse_norms  # noqa: E402

from test_hf_models import tiny_model  # noqa: E402


def _norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8RMSNorm)}


def _without_handoff(model):
    """A deep copy whose FP8RMSNorms feed nobody: every layer quantizes its own input."""
    other = copy.deepcopy(model)
    for norm in _norms(other).values():
        object.__setattr__(norm, "_consumers", ())
    return other


def _count_quantizations(monkeypatch):
    """The shapes of the activations FP8Linear layers quantize themselves from now on: every backend's
    `linear` (the protocol's forward from unquantized x) quantizes its input once."""
    from fp8linear import backends

    calls = []
    for name in backends.NAMES[1:]:
        module = backends.get(name)

        def counting(x2d, *args, _real=module.linear, **kwargs):
            calls.append(tuple(x2d.shape))
            return _real(x2d, *args, **kwargs)

        monkeypatch.setattr(module, "linear", counting)
    return calls


@pytest.mark.parametrize("fuse_mlp", [False, True])
def test_fused_norms_are_exact_and_skip_the_consumers_quantization(monkeypatch, fuse_mlp):
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16), progress=False,
                                     fuse_mlp=fuse_mlp, fuse_norm=True)
    layers = model.config.num_hidden_layers
    assert model.fp8linear_fused_norms == {f"model.layers.{i}.{n}": None for i in range(layers)
                                           for n in ("input_layernorm", "post_attention_layernorm")}
    assert len(_norms(model)) == 2 * layers
    plain = _without_handoff(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))

    calls = _count_quantizations(monkeypatch)
    with torch.no_grad():
        ref = plain(ids).logits
    unfused_count = len(calls)
    calls.clear()
    with torch.no_grad():
        got = model(ids).logits
    # Per layer without the handoff: q, k, v, o, gate, up, down (FP8GatedMLP: q, k, v, o, gate_up; its
    # down_proj input comes quantized from the SiLU kernel); with it: o and down (FP8GatedMLP: o).
    assert unfused_count == layers * (5 if fuse_mlp else 7)
    assert len(calls) == layers * (1 if fuse_mlp else 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # Every handoff was used once and dropped: nothing keeps activations alive after the forward.
    assert all(m._offered is None for m in model.modules() if isinstance(m, linear_module.FP8Linear))


def test_norm_output_is_the_reference_formula_and_close_to_transformers():
    model = tiny_model("llama", dtype=torch.bfloat16)
    hf_norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        hf_norm.weight.normal_(1.0, 0.1)
    norm = FP8RMSNorm.from_norm(hf_norm)
    x = torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        got = norm(x)
        want = hf_norm(x)
    torch.testing.assert_close(got, rmsnorm_reference(x, hf_norm.weight, hf_norm.variance_epsilon), rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert norm.weight.data_ptr() == hf_norm.weight.data_ptr()  # shared, not copied


def test_a_modified_input_is_quantized_again():
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16), progress=False, fuse_norm=True)
    layer = model.model.layers[0]
    x = torch.randn(1, 4, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        h = layer.input_layernorm(x)
        h.mul_(2.0)  # after the norm quantized it: the handoff must not be used
        got = layer.self_attn.q_proj(h)
        want = copy.deepcopy(layer.self_attn.q_proj)(h)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_keys_unchanged_and_unsupported_norms_reported():
    base = tiny_model("llama", dtype=torch.bfloat16)
    keys = set(fp8linear.quantize_model(copy.deepcopy(base), progress=False).state_dict())
    fused = fp8linear.quantize_model(base, progress=False, fuse_norm=True)
    assert set(fused.state_dict()) == keys
    # A norm whose consumers are not FP8Linear (skipped projections) stays and says why.
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16), progress=False,
                                     skip=[r"model\.layers\.0\.self_attn\.k_proj"])
    report = fuse_norms(model)
    assert report["model.layers.0.input_layernorm"] == "the layers it feeds are not all FP8Linear"
    assert report["model.layers.1.input_layernorm"] is None
    assert not isinstance(model.model.layers[0].input_layernorm, FP8RMSNorm)


def test_from_norm_rejects_other_norms():
    with pytest.raises(TypeError, match="LayerNorm"):
        FP8RMSNorm.from_norm(torch.nn.LayerNorm(128))


def test_save_and_load_with_fused_norms(tmp_path):
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16), progress=False, fuse_norm=True)
    fp8linear.save_quantized(model, tmp_path)
    loaded = fp8linear.load_quantized(tmp_path, device="cpu", fuse_norm=True)
    assert len(_norms(loaded)) == 2 * model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_consumers_that_read_different_layouts_get_no_handoff(monkeypatch):
    """q_proj on a `col`-layout backend, k/v_proj on `row`: one buffer cannot serve both, so the norm hands
    nothing over and each layer quantizes for itself (same result as without the fusion)."""
    import types

    from fp8linear import backends
    from fp8linear.backends import reference
    from fp8linear.layouts import ScaleLayout

    col = types.SimpleNamespace(NAME="reference-col", SCALE_LAYOUT=ScaleLayout.COL, ROW_ALIGN=4,
                                prepare_weight=reference.prepare_weight, gemm=reference.gemm,
                                linear=functools.partial(backends.quantize_then_gemm, reference.gemm, ScaleLayout.COL, 4))
    model = fp8linear.quantize_model(tiny_model("llama", dtype=torch.bfloat16), progress=False, fuse_norm=True)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 6, model.config.hidden_size, dtype=torch.bfloat16)
    attn.q_proj._choice[6] = col
    plain_q = copy.deepcopy(attn.q_proj)  # copies start with an empty backend cache: give it the same one
    plain_q._choice[6] = col
    calls = _count_quantizations(monkeypatch)
    col_linear = col.linear
    col.linear = lambda x2d, *args: (calls.append(tuple(x2d.shape)), col_linear(x2d, *args))[1]
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(x)
        assert all(c._offered is None for c in (attn.q_proj, attn.k_proj, attn.v_proj))
        got = attn.q_proj(h)
        attn.k_proj(h), attn.v_proj(h)
        want = plain_q(h)
    assert len(calls) == 4  # q, k, v, and the copy
    torch.testing.assert_close(got, want, rtol=0, atol=0)
