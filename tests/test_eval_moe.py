"""fp8linear.accuracy on MoE models: one row per FP8Experts module, checked against an independent computation.

The reference side is computed here in float64 from the original experts' weights (gate rows first, then
up; y = down(silu(gate x) * up x); the k slots summed with their routing weights), never through
transformers' experts forward; the FP8 side per (token, slot) pair comes from tests/test_moe.py's
`per_expert_fp8linear` (two FP8Linear per expert), and the combined one from the module's own call,
captured by a hook of the test. The SNR formula is written out below.
"""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fp8linear  # noqa: E402
from fp8linear import accuracy  # noqa: E402
from fp8linear.moe import FP8Experts  # noqa: E402

from test_moe import make_experts, per_expert_fp8linear, tiny_moe  # noqa: E402


def expert_mlp_fp64(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a transformers experts module on x [n, H], in float64."""
    w13, w2 = experts.gate_up_proj[e].double(), experts.down_proj[e].double()
    I = w2.shape[1]
    h = x.double() @ w13.T
    return (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2.T


def snr_db(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    y, y_ref = y.double(), y_ref.double()
    return 10 * math.log10((y_ref**2).sum().item() / ((y - y_ref) ** 2).sum().item())


def capture_calls(model: nn.Module) -> dict[str, list]:
    """{experts module name: [(hidden_states, top_k_index, top_k_weights, output), ...]} filled by the forward
    hooks this registers on every FP8Experts of `model`."""
    calls: dict[str, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, FP8Experts):
            def hook(module, args, kwargs, output, name=name):
                x, idx, w = (list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights")
                                           if k in kwargs])[:3]
                calls.setdefault(name, []).append((x.detach().clone(), idx.clone(), w.detach().clone(),
                                                   output.detach().clone()))
            m.register_forward_hook(hook, with_kwargs=True)
    return calls


def independent_row(ref_experts: nn.Module, fp8_experts: FP8Experts, calls: list) -> dict:
    """The combined SNR and the per-expert SNRs (before the routing weights) over `calls`, computed here."""
    E = fp8_experts.num_experts
    y_all, ref_all = [], []
    pairs_q: dict[int, list] = {e: [] for e in range(E)}
    pairs_ref: dict[int, list] = {e: [] for e in range(E)}
    for x, idx, w, out in calls:
        T, k = idx.shape
        per_pair_ref = torch.zeros(T, k, x.shape[1], dtype=torch.float64)
        for e in range(E):
            t, j = (idx == e).nonzero(as_tuple=True)
            if t.numel():
                per_pair_ref[t, j] = expert_mlp_fp64(ref_experts, e, x[t])
        combined_ref = (per_pair_ref * w.double().unsqueeze(-1)).sum(1)
        y_all.append(out)
        ref_all.append(combined_ref)
        per_pair_q = per_expert_fp8linear(fp8_experts, x, idx)
        for e in range(E):
            t, j = (idx == e).nonzero(as_tuple=True)
            pairs_q[e].append(per_pair_q[t, j])
            pairs_ref[e].append(per_pair_ref[t, j])
    per_expert = {e: snr_db(torch.cat(pairs_q[e]), torch.cat(pairs_ref[e]))
                  for e in range(E) if sum(p.shape[0] for p in pairs_q[e])}
    return {"snr": snr_db(torch.cat(y_all), torch.cat(ref_all)), "per_expert": per_expert,
            "elements": sum(o.numel() for o in y_all)}


@pytest.fixture(scope="module")
def moe_eval():
    """A 2-layer random Qwen3-MoE (6 experts, top-2), quantized, evaluated, with the experts' calls captured."""
    ref = tiny_moe("qwen3_moe")
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    calls = capture_calls(q)
    batch = accuracy.calibration_batch("causal_lm", None, ref.config.vocab_size, batch=2, tokens=24)
    result = accuracy.evaluate(ref, q, batch, "causal_lm")
    return ref, q, calls, result


def test_one_row_per_experts_module_matching_an_independent_computation(moe_eval):
    ref, q, calls, result = moe_eval
    names = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert [r.name for r in result.experts] == names == sorted(calls)
    assert len(result.layers) == 2 * 4 + 2  # q/k/v/o per layer (routers are not nn.Linear), then the experts
    for row in result.experts:
        fp8_experts = q.get_submodule(row.name)
        expected = independent_row(ref.get_submodule(row.name), fp8_experts, calls[row.name])
        assert (row.num_experts, row.out_features, row.in_features) == (6, 256, 256)
        assert row.calls == len(calls[row.name]) == 1 and row.elements == expected["elements"]
        # An fp32 reference in the package, float64 here: about 1e-6 dB apart at an SNR near 24 dB.
        assert row.snr_db == pytest.approx(expected["snr"], abs=1e-4)
        assert 15 < row.snr_db < 40  # FP8 error, neither zero nor noise
        per_expert = expected["per_expert"]
        assert row.experts_routed == len(per_expert) == 6
        # Seeded: the experts' SNRs lie 0.05 dB or more apart, so the worst one is unambiguous.
        assert row.worst_expert == min(per_expert, key=per_expert.get)
        assert row.worst_expert_snr_db == pytest.approx(per_expert[row.worst_expert], abs=1e-4)


def test_table_csv_and_propose_skip_carry_the_experts_rows(moe_eval, tmp_path):
    _, _, _, result = moe_eval
    table = accuracy.format_table(result.layers, 30.0)
    row = next(line for line in table.splitlines() if line.startswith("model.layers.1.mlp.experts"))
    worst = result.experts[1]
    assert "6 experts" in row and f"worst expert {worst.worst_expert}:" in row and "of 6 routed" in row
    assert "8 layers + 2 experts modules" in table
    with open(accuracy.write_csv(result.layers, tmp_path / "layers.csv")) as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert int(rows["model.layers.0.mlp.experts"]["num_experts"]) == 6
    assert float(rows["model.layers.0.mlp.experts"]["snr_db"]) == pytest.approx(result.experts[0].snr_db)
    assert int(rows["model.layers.0.self_attn.q_proj"]["num_experts"]) == 0
    # A threshold between the experts' SNR and every linear layer's selects exactly the experts modules.
    # (two quantized GEMMs in series: about 24 dB against the linear layers' 28).
    linear_min = min(r.snr_db for r in result.layers if not r.is_experts)
    experts_max = max(r.snr_db for r in result.experts)
    assert experts_max < linear_min
    threshold = (experts_max + linear_min) / 2
    assert accuracy.propose_skip(result.layers, threshold) == [r.name for r in result.experts]


def test_skipping_an_experts_module_keeps_it_and_drops_its_row():
    ref = tiny_moe("qwen3_moe")
    q = fp8linear.quantize_model(copy.deepcopy(ref), skip=[r"model\.layers\.1\.mlp\.experts"], progress=False)
    kept = q.model.layers[1].mlp.experts
    assert not isinstance(kept, FP8Experts)
    assert torch.equal(kept.gate_up_proj, ref.model.layers[1].mlp.experts.gate_up_proj)
    batch = accuracy.calibration_batch("causal_lm", None, ref.config.vocab_size, batch=1, tokens=16)
    result = accuracy.evaluate(ref, q, batch, "causal_lm")
    assert [r.name for r in result.experts] == ["model.layers.0.mlp.experts"]
    assert all(not r.name.startswith("model.layers.1.mlp.experts") for r in result.layers)


def test_sensitivity_skip_puts_experts_back_whole():
    """With only the experts in FP8, the search can only name experts modules, and leaves them restored."""
    ref = tiny_moe("qwen3_moe")
    q = fp8linear.quantize_model(copy.deepcopy(ref), skip=[r".*_proj"], progress=False)
    assert not q.fp8linear_summary.swapped and len(q.fp8linear_summary.experts) == 2
    batch = accuracy.calibration_batch("causal_lm", None, ref.config.vocab_size, batch=1, tokens=16)
    skip = accuracy.sensitivity_skip(ref, q, batch, "causal_lm", 0.999999999)
    assert skip and set(skip) <= {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert sum(isinstance(m, FP8Experts) for m in q.modules()) == 2  # restored
    q2 = fp8linear.quantize_model(copy.deepcopy(ref), skip=[r".*_proj", *skip], progress=False)
    assert sorted(q2.fp8linear_summary.experts) == sorted({"model.layers.0.mlp.experts",
                                                           "model.layers.1.mlp.experts"} - set(skip))


class KeywordMoE(nn.Module):
    """Calls its experts by keyword, with a fixed routing onto experts 0..2 of 6."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        index = torch.stack([torch.arange(T) % 3, (torch.arange(T) + 1) % 3], dim=1)
        weights = torch.full((T, 2), 0.5)
        return self.experts(hidden_states=x, top_k_index=index, top_k_weights=weights)


def test_experts_called_by_keyword_and_unrouted_experts_are_not_measured():
    torch.manual_seed(0)
    ref = KeywordMoE(make_experts(E=6, H=256, I=256))
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    assert isinstance(q.experts, FP8Experts) and not q.fp8linear_summary.swapped
    xs = [torch.randn(5, 256), torch.randn(7, 256)]
    rows, _ = accuracy.layer_errors(ref, q, lambda m: [m(x) for x in xs])
    (row,) = rows
    assert row.calls == 2 and row.elements == 12 * 256
    assert row.experts_routed == 3 and row.worst_expert in (0, 1, 2)
    assert not q.experts._forward_hooks  # hooks are gone afterwards


def test_reference_that_is_not_an_experts_module_is_refused():
    torch.manual_seed(0)
    ref = KeywordMoE(make_experts())
    q = fp8linear.quantize_model(copy.deepcopy(ref), progress=False)
    ref.experts = nn.Linear(256, 256)
    with pytest.raises(ValueError, match=r"reference model's experts \(Linear\) is not a fused experts module"):
        accuracy.layer_errors(ref, q, lambda m: m(torch.randn(3, 256)))
