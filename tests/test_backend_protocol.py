"""The backend protocol (fp8linear.backends) and FP8Linear's two public halves of a forward, on CPU.

Every backend module declares what differs (scale layout, row alignment, element types, largest M) and
implements the same entry points; FP8Linear's `input_layout` / `forward_quantized` / `offer_quantized` are
what FP8GatedMLP and FP8RMSNorm call. The checks here compare against FP8Linear's own forward on the same
operands (the same reference GEMM on the same shapes, so equality is exact) and against independent
expectations for the layout's shape and strides.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fp8linear
from conftest import poison_
from fp8linear import FP8Config, FP8Linear, backends, per_token_group_quant
from fp8linear.config import ALIASES, Backend
from fp8linear.layouts import ScaleLayout

FP8, INT8 = torch.float8_e4m3fn, torch.int8


@pytest.mark.parametrize("name", backends.NAMES[1:])
def test_every_backend_satisfies_the_protocol(name):
    module = backends.get(name)
    assert module.NAME == name
    assert isinstance(module, backends.Backend)
    # A scale layout is declared exactly when the backend multiplies activations quantized elsewhere.
    assert isinstance(module, backends.QuantizedInputBackend) == (module.SCALE_LAYOUT is not None)
    assert module.ROW_ALIGN >= 1 and set(module.DTYPES) <= {FP8, INT8}


@pytest.mark.parametrize("old,new", sorted(ALIASES.items()))
def test_earlier_backend_names_are_aliases(old, new):
    assert Backend.parse(old).value == new
    assert backends.get(old) is backends.get(new)
    assert FP8Linear(256, 256, backend=old, device="meta").backend == new
    config = FP8Config.from_quantization_config({"quant_method": "fp8", "fp8linear": {"backend": old}})
    assert config.backend.value == new


def test_unknown_backend_names_the_choices_and_aliases():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto'.*'fused_mma'.*'small_m' for 'fused_mma'.*got 'cutlass'"):
        FP8Linear(256, 256, backend="cutlass", device="meta")


def test_backend_declarations_are_checked_before_the_backend():
    cpu = torch.device("cpu")
    assert backends.unsupported_reason("cublaslt", 4, 256, 256, INT8, cpu) == (
        "dtype torch.int8 is not one of torch.float8_e4m3fn")
    assert backends.unsupported_reason("fused_mma", 17, 256, 256, FP8, cpu) == "M=17 > 16 (the largest M it serves)"


def _layer(K=300, N=200, dtype=FP8):
    torch.manual_seed(1)
    return FP8Linear.from_linear(nn.Linear(K, N), dtype=dtype, backend="reference")


@pytest.mark.parametrize("dtype", [FP8, INT8])
@pytest.mark.parametrize("M", [1, 5])
def test_forward_quantized_equals_forward(dtype, M):
    layer = _layer(dtype=dtype)
    x = torch.randn(M, 300) * 3
    layout = layer.input_layout(M, "cpu")
    Kp = 384  # K = 300 padded to whole 128-column groups
    assert layout == fp8linear.linear.InputLayout(dtype, Kp, ScaleLayout.ROW, 1, False, 128)
    q, s = layout.empty(M, "cpu")
    assert q.shape == (M, Kp) and q.dtype == dtype and s.shape == (M, Kp // 128) and s.stride() == (Kp // 128, 1)
    poison_(q), poison_(s)
    per_token_group_quant(torch.nn.functional.pad(x, (0, Kp - 300)), 128, dtype, out=q, scale_out=s)
    y = layer.forward_quantized(q, s, M, x.dtype)
    assert y.shape == (M, 200) and y.dtype == x.dtype
    assert torch.equal(y, layer(x))


def test_offered_quantization_is_used_once_and_only_for_its_tensor():
    layer = _layer()
    h, other = torch.randn(4, 300), torch.randn(4, 300)
    # Deliberately the quantization of `other`: the result shows whether the offer was used.
    q, s = layer.input_layout(4, "cpu").empty(4, "cpu")
    per_token_group_quant(torch.nn.functional.pad(other, (0, 84)), 128, FP8, out=q, scale_out=s)
    layer.offer_quantized(h, q, s)
    assert torch.equal(layer(h), layer(other))  # used: h's forward multiplied other's q and s
    assert not torch.equal(layer(h), layer(other))  # used once: now h is quantized itself
    layer.offer_quantized(h, q, s)
    layer(other)  # a forward of another tensor drops the offer
    assert not torch.equal(layer(h), layer(other))
    layer.offer_quantized(h, q, s)
    h.mul_(2)  # h modified in place after the offer: the offer no longer describes it
    assert torch.equal(layer(h), _layer()(h))


def test_a_backend_that_quantizes_inside_has_no_input_layout(monkeypatch):
    from fp8linear.backends import small_m

    monkeypatch.setattr(backends, "select", lambda *args: small_m)
    layer = FP8Linear(256, 256, device="meta")
    assert layer.input_layout(3, "cpu") is None
    q, s = torch.empty(3, 256, dtype=FP8), torch.empty(3, 2)
    with pytest.raises(ValueError, match="'fused_mma' quantizes inside its own kernel at M=3.*unquantized input"):
        layer.forward_quantized(q, s, 3, torch.bfloat16)


def test_quantize_model_takes_a_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 128))
    out = fp8linear.quantize_model(model, FP8Config(dtype=INT8, scale_ue8m0=True, backend="triton"), progress=False)
    layers = [m for m in out.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 2
    assert all(m.dtype == INT8 and m.scale_ue8m0 and m.backend == "triton" for m in layers)
    # power-of-two weight scales: every weight_scale_inv is 2**e
    for m in layers:
        e = torch.log2(m.weight_scale_inv)
        assert torch.equal(e, e.round())


def test_quantize_model_refuses_config_and_shorthands_together():
    model = nn.Sequential(nn.Linear(128, 128))
    with pytest.raises(ValueError, match=r"pass dtype= inside config"):
        fp8linear.quantize_model(model, FP8Config(), dtype=INT8, progress=False)
    with pytest.raises(TypeError, match="config must be an fp8linear.FP8Config; got dict"):
        fp8linear.quantize_model(model, {"dtype": INT8}, progress=False)
    assert isinstance(model[0], nn.Linear)  # untouched
