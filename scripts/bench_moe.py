#!/usr/bin/env python3
"""Benchmark a MoE layer's experts: fp8linear's FP8Experts against bf16 and SGLang's FP8 fused MoE.

Every provider runs in this process on the same x [T, H] and the same routing (top_k_index [T, k],
top_k_weights [T, k]), and its output is checked before it is timed:

    fp8:<backend>     fp8linear.moe.FP8Experts built from the bf16 experts (from_experts), one module per
                      --backends name (auto, triton, deepgemm, reference) and --grouping (auto, indexed,
                      contiguous, masked; "fp8:triton/masked"), all sharing one copy of the quantized weights. A backend
                      that cannot serve the shape on this device is skipped with its reason
                      (fp8linear.backends.grouped_unsupported_reason).
    hf-bf16           transformers' own experts module (Qwen3MoeExperts) in bf16 under each experts
                      implementation it registers (eager, grouped_mm, batched_mm, ...: config
                      _experts_implementation); each is timed as hf-bf16:<impl>, and the table's hf-bf16
                      column is the fastest at that point, named. transformers' default is grouped_mm.
    bf16-grouped      torch._grouped_mm in bf16: sort the (token, slot) pairs by expert, gather, gate_up
                      grouped GEMM (offsets: int32 cumulative ends), silu(gate) * up, down grouped GEMM,
                      the rows back in (token, slot) order, and the routing weights and the sum over k
                      by FP8Experts' own one-pass combine (fp8linear.moe_combine). No host sync.
    dg-bf16-grouped   DeepGEMM 2.x's m_grouped_bf16_gemm_nt_contiguous in the same pipeline (segments
                      padded to DeepGEMM's alignment: one host sync), where `deep_gemm` exposes it.
    sglang-fp8        SGLang 0.5.23's block-FP8 fused-MoE Triton kernel, standalone, from --peer-dir
                      (a git-ignored folder, default .gpu/moe-peer; its moe_peer.py says what runs).

Correctness: each provider's output for the first --check-tokens tokens (a token's output depends on
that token alone) is compared with (a) "exact": the bf16 weights' experts in fp32, and for FP8
providers (b) FP8Experts' reference backend (dequantize, fp32 matmul) on the same quantized weights.
A provider above its bound (BOUNDS) is reported and not timed.

Timing: triton.testing.do_bench medians (L2 flushed before each call, so inputs and the weights an
expert set touches never sit in L2 between calls), --rounds passes per point taking the providers in
shuffled turns (scripts/bench_linear.py, bench_rounds); on a CPU a perf_counter loop (no numbers that
count). With --cuda-graph, each provider at T <= 128 is also captured as a CUDA graph and its replay timed
("<provider>@graph"); one that cannot be captured is reported with the reason.

Routing: "uniform": each token's k experts are k distinct experts drawn uniformly; "skewed": expert
popularity Zipf-like, p(e) proportional to 1 / rank(e)^1.2 with ranks a random permutation of the
experts, each token drawing k distinct experts by that popularity (multinomial without replacement; at
E=128, k=8 the most popular expert takes about 3x the uniform load's pairs). Routing weights: softmax over
k random logits (top-k renormalised, as Qwen3-MoE's norm_topk_prob), in bf16.

Reported per (shape, routing, T, eager or graph): median microseconds of every provider; TFLOP/s of
fp8:auto (2 * T * k * 3 * H * I FLOPs); the speedups t(bf16-grouped) / t(fp8:auto) and t(hf-bf16) /
t(fp8:auto); and "quant %": the time of the quantization of x (fp8linear.ops.quantize_for_gemm, [T, H])
plus the fused SiLU-and-mul quantization of the gate_up output (fp8linear.fused.silu_and_mul_quant,
[T * k, 2I]), timed alone on those shapes, as a share of fp8:auto's layer time. The summary restates the
targets: >= 1.5x bf16-grouped from 4096 tokens, >= 1.3x at T <= 128 under CUDA graphs, never slower than
hf-bf16, quant % <= 10 at 4096 tokens.

--e2e: a Qwen3-30B-A3B-shaped Qwen3MoeForCausalLM of --layers layers (random weights), bf16 and then
after fp8linear.quantize_model: weight memory, one prefill of --prefill tokens, and decode tokens/s of a
one-token step captured as a CUDA graph and replayed (fp8linear.decode.GraphDecoder, as bench_e2e.py's
graphs-manual mode); on a CPU a tiny model, eager steps. On a GPU the prefill also reports the host time
to issue it: an eager prefill whose issuing takes nearly its whole wall time is bound by the host (Python,
dispatch, launches), and its FP8-vs-bf16 ratio then follows the host CPU, not the GPU.

    python scripts/bench_moe.py --quick --cuda-graph                  # ~2-3 min on an H100
    python scripts/bench_moe.py --cuda-graph --out bench-moe.md       # the whole grid (+ .json beside)
    python scripts/bench_moe.py --shape deepseek-v3 --tokens 4096 --routing skewed --backends auto triton
    python scripts/bench_moe.py --e2e --layers 4
    TRITON_INTERPRET=1 python scripts/bench_moe.py --device cpu --shape tiny --tokens 3 17   # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback

import torch

# transformers' hub-kernel experts implementations (deepgemm, sonicmoe) would try the network; the GPU
# machine has none, so they fail at once with the reason instead of waiting on retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit, bench_linear

import run_commit  # noqa: E402

# name: (E experts, k, H hidden, I expert intermediate)
SHAPES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
    "tiny": (8, 2, 256, 128),  # CPU smoke runs
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [1, 128, 4096]
CPU_TOKENS = [3, 17]
ROUTINGS = ("uniform", "skewed")
ZIPF_S = 1.2
GRAPH_MAX_T = 128  # decode sizes: captured as CUDA graphs with --cuda-graph
#: Largest gathered weight batched_mm would build ([S, 3 * H * I] bf16): its cost grows with S, not E.
BATCHED_MM_MAX_BYTES = 8 << 30
#: Relative L2 error bounds: (against what, bound). FP8 providers against FP8Experts' reference backend on
#: the same quantized weights; bf16 ones against the fp32 math of the bf16 weights.
BOUNDS = {"fp8": ("fp8-reference", 0.03), "bf16": ("exact", 0.02)}
TARGETS = {"prefill": 1.5, "decode": 1.3, "quant_pct": 10.0}
HOST_BOUND = 0.9  # an e2e prefill whose issuing takes this share of its wall time is bound by the host
LOG = logging.getLogger("bench_moe")


# -- inputs ---------------------------------------------------------------------------------------------

def make_routing(T: int, E: int, k: int, kind: str, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index int64 [T, k], top_k_weights bf16 [T, k]) for routing `kind` (module docstring)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "uniform":
        idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    elif kind == "skewed":
        ranks = torch.randperm(E, generator=g).double() + 1
        p = ranks.pow(-ZIPF_S)
        idx = torch.multinomial((p / p.sum()).expand(T, E), k, replacement=False, generator=g)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}; got {kind!r}")
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return idx.to(device), weights.to(device=device, dtype=torch.bfloat16)


def make_experts(E: int, k: int, H: int, I: int, device):
    """transformers' Qwen3MoeExperts in bf16 with weights ~ N(0, 0.02), built on `device`."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    with torch.device(device):
        experts = Qwen3MoeExperts(config).to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    return experts.eval()


# -- providers --------------------------------------------------------------------------------------------

def fp8_modules(experts, names: list[str], groupings: list[str]) -> tuple[dict, "torch.nn.Module"]:
    """({provider name: FP8Experts}, the reference-backend FP8Experts: the oracle), all sharing one quantized
    copy of `experts` (from_experts once, then the same Parameters in a module per backend and grouping)."""
    from fp8linear.moe import FP8Experts

    base = FP8Experts.from_experts(experts, backend="reference")
    mods = {}
    for name in names:
        for grouping in groupings:
            mod = FP8Experts(base.num_experts, base.hidden_size, base.intermediate_size, backend=name,
                             grouping=grouping, device="meta")
            for pname, param in base.named_parameters():
                setattr(mod, pname, param)
            mods[f"fp8:{name}" + ("" if grouping == "auto" else f"/{grouping}")] = mod
    return mods, base


def fp8_unsupported(mod, T: int, k: int, device) -> "str | None":
    """Why this FP8Experts cannot run T tokens on `device` (the BackendUnsupportedError's message, which holds
    fp8linear.backends.grouped_unsupported_reason), or None."""
    from fp8linear import backends

    try:
        mod.backends_for(mod.grouping_for(T, device, k), device)
    except backends.BackendUnsupportedError as exc:
        return str(exc)
    return None


def fp8_pick(mod, T: int, k: int, device) -> str:
    grouping = mod.grouping_for(T, device, k)
    b13, b2 = mod.backends_for(grouping, device)
    return f"{grouping}: {b13.NAME}/{b2.NAME}"


def hf_implementations(experts) -> list[str]:
    """The experts implementations this transformers registers (eager first)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager"] + sorted(k for k in ALL_EXPERTS_FUNCTIONS.keys() if k != "eager")


def hf_fn(experts, impl: str, x, idx, w):
    def call():
        experts.config._experts_implementation = impl
        return experts(x, idx, w)
    return call


def _combine(y_sorted: torch.Tensor, perm: torch.Tensor, w: torch.Tensor, T: int, k: int, dtype) -> torch.Tensor:
    """Rows back to (token, slot) order, then FP8Experts' own combine (fp8linear.moe_combine: transformers'
    weighted sum over k in one kernel), so that the bf16 pipelines differ from FP8Experts in their GEMMs."""
    from fp8linear.moe_combine import combine_slots

    out = torch.empty_like(y_sorted)
    out[perm] = y_sorted
    return combine_slots(out.view(T, k, -1), w, dtype)


def bf16_grouped_fn(experts, x, idx, w):
    """torch._grouped_mm in bf16 (module docstring); no host synchronisation (histc, not bincount)."""
    T, k = idx.shape
    E = experts.gate_up_proj.shape[0]
    w13_t = experts.gate_up_proj.transpose(-2, -1)  # [E, H, 2I], each [H, 2I] column-major: what it wants
    w2_t = experts.down_proj.transpose(-2, -1)  # [E, I, H]

    def call():
        ids = idx.reshape(-1)
        ids_sorted, perm = torch.sort(ids, stable=True)
        xs = x[perm // k]  # [S, H]
        hist_in = ids_sorted.float() if x.device.type == "cpu" else ids_sorted.int()
        offs = torch.cumsum(torch.histc(hist_in, bins=E, min=0, max=E - 1), 0).to(torch.int32)
        h = torch._grouped_mm(xs, w13_t, offs=offs)  # [S, 2I]
        gate, up = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
        y = torch._grouped_mm(a, w2_t, offs=offs)  # [S, H]
        return _combine(y, perm, w, T, k, x.dtype)
    return call


def deepgemm_bf16_reason() -> "str | None":
    try:
        import deep_gemm
    except Exception as exc:  # noqa: BLE001
        return f"deep_gemm not importable ({type(exc).__name__}: {exc})"
    if not hasattr(deep_gemm, "m_grouped_bf16_gemm_nt_contiguous"):
        return "deep_gemm has no m_grouped_bf16_gemm_nt_contiguous (DeepGEMM 2.x has it)"
    return None


def deepgemm_bf16_fn(experts, x, idx, w):
    """DeepGEMM 2.x's bf16 grouped GEMM: rows sorted by expert, segments padded to its alignment."""
    import deep_gemm
    from fp8linear.moe import route

    T, k = idx.shape
    E, two_I, H = experts.gate_up_proj.shape
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()

    def call():
        r = route(idx, E, "contiguous", align=align)  # one host read of the padded row count
        xs = torch.zeros((r.rows, H), dtype=x.dtype, device=x.device)
        xs[r.dest[:r.writes]] = x[r.token[:r.writes]]
        h = torch.empty((r.rows, two_I), dtype=x.dtype, device=x.device)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(xs, experts.gate_up_proj, h, r.m_indices)
        gate, up = h.chunk(2, dim=-1)
        a = (torch.nn.functional.silu(gate) * up).contiguous()
        y = torch.empty((r.rows, H), dtype=x.dtype, device=x.device)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, experts.down_proj, y, r.m_indices)
        return _combine(y[r.dest], r.perm, w, T, k, x.dtype)
    return call


def load_peer(peer_dir: "str | None"):
    """(moe_peer module, None) or (None, why not)."""
    if not peer_dir:
        return None, "no --peer-dir"
    if not os.path.isfile(os.path.join(peer_dir, "moe_peer.py")):
        return None, f"{peer_dir}/moe_peer.py not found (build it: python3 <peer-dir>/build.py)"
    sys.path.insert(0, os.path.abspath(peer_dir))
    try:
        peer = importlib.import_module("moe_peer")
    except Exception as exc:  # noqa: BLE001
        return None, f"moe_peer import failed: {type(exc).__name__}: {exc}"
    why = peer.setup()
    return (peer, None) if why is None else (None, why)


def sglang_fn(peer, mod, x, idx, w):
    from fp8linear import per_token_group_quant

    def quant(a):
        return per_token_group_quant(a.contiguous(), 128, torch.float8_e4m3fn, scale_layout="row")

    idx32 = idx.to(torch.int32)  # sglang's top-k ids are int32

    def call():
        return peer.fused_experts_fp8(x, mod.gate_up_proj, mod.gate_up_proj_scale_inv, mod.down_proj,
                                      mod.down_proj_scale_inv, w, idx32, quant)
    return call


def quant_fn(mod, x, T: int, k: int, device):
    """Activation quantization plus the fused SiLU-and-mul quantization alone, on the layer's shapes."""
    from fp8linear.fused import silu_and_mul_quant
    from fp8linear.layouts import ScaleLayout
    from fp8linear.ops import quantize_for_gemm

    try:
        layout = mod.backends_for(mod.grouping_for(T, device, k), device)[1].SCALE_LAYOUT
    except Exception:  # noqa: BLE001 - the row layout stands in
        layout = ScaleLayout.ROW
    h = torch.randn(T * k, 2 * mod.intermediate_size, device=device, dtype=torch.bfloat16)

    def call():
        quantize_for_gemm(x, 128, mod.dtype, mod.scale_ue8m0, ScaleLayout.ROW, 1)
        return silu_and_mul_quant(h, 128, mod.dtype, scale_layout=layout, scale_ue8m0=mod.scale_ue8m0)
    return call


# -- correctness ------------------------------------------------------------------------------------------

def exact_output(experts, x, idx, w) -> torch.Tensor:
    """fp32 math of the bf16 weights, expert by expert (an oracle: reads the experts used on the host)."""
    T, k = idx.shape
    I = experts.down_proj.shape[2]
    xf = x.float()
    y = torch.zeros(T, k, x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(idx).tolist():
        t, j = (idx == e).nonzero(as_tuple=True)
        h = xf[t] @ experts.gate_up_proj[e].float().T
        y[t, j] = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ experts.down_proj[e].float().T
    return (y * w.float().unsqueeze(-1)).sum(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()  # transformers' experts hold parameters that want gradients
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- timing -----------------------------------------------------------------------------------------------

def cpu_us(fn, rep_ms: float) -> float:
    """Median microseconds per call on a CPU: a perf_counter loop (at least 3 calls, about rep_ms)."""
    fn()
    times, deadline = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def issue_ms(fn, n: int = 5) -> float:
    """Median milliseconds the host takes to issue fn's work (the GPU idle before, no synchronize inside
    the timing). Near fn's timed wall time, fn is bound by its Python and launches, not by the GPU."""
    times = []
    for _ in range(n + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times[1:]) * 1e3


def time_all(fns: dict, rounds: int, rep_ms: float, device, salt) -> dict:
    if device.type == "cuda":
        bench_linear = importlib.import_module("bench_linear")
        return bench_linear.bench_rounds(fns, rounds, rep_ms, salt=hash(salt))
    return {name: cpu_us(fn, rep_ms) for name, fn in fns.items()}


def capture(fn):
    """(graph, its output) for fn captured as a CUDA graph, warmed up on a side stream first."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# -- one point ----------------------------------------------------------------------------------------------

def run_point(shape: str, routing: str, T: int, experts, mods: dict, oracle, peer, args, device,
              log) -> list[dict]:
    """Rows {shape, routing, T, mode, provider, us, err_exact, err_fp8ref, note} for one point; `oracle` is the
    reference-backend FP8Experts on the same weights."""
    E, k, H, I = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=torch.bfloat16)
    idx, w = make_routing(T, E, k, routing, device, seed=T + 1)
    fns, notes = {}, {}
    for name, mod in mods.items():
        why = fp8_unsupported(mod, T, k, device)
        if why is not None:
            notes[name] = f"skipped: {why}"
            continue
        fns[name] = (lambda m: lambda: m(x, idx, w))(mod)
        notes[name] = fp8_pick(mod, T, k, device)
    if not args.no_hf:
        for impl in hf_implementations(experts):
            if impl == "batched_mm" and T * k * 3 * H * I * 2 > BATCHED_MM_MAX_BYTES:
                notes[f"hf-bf16:{impl}"] = (f"skipped: gathers [S={T * k}, 3*H*I] bf16 weights "
                                            f"({T * k * 3 * H * I * 2 / 2**30:.0f} GiB)")
                continue
            fns[f"hf-bf16:{impl}"] = hf_fn(experts, impl, x, idx, w)
    if hasattr(torch, "_grouped_mm"):
        fns["bf16-grouped"] = bf16_grouped_fn(experts, x, idx, w)
    else:
        notes["bf16-grouped"] = "skipped: torch has no _grouped_mm"
    why = deepgemm_bf16_reason() if device.type == "cuda" else "DeepGEMM needs a CUDA GPU"
    if why is None:
        fns["dg-bf16-grouped"] = deepgemm_bf16_fn(experts, x, idx, w)
    else:
        notes["dg-bf16-grouped"] = f"skipped: {why}"
    if peer is not None:
        fns["sglang-fp8"] = sglang_fn(peer, oracle, x, idx, w)

    # Correctness first, on the first check_tokens tokens.
    n = min(T, args.check_tokens)
    exact = exact_output(experts, x[:n], idx[:n], w[:n])
    fp8_ref = oracle(x[:n], idx[:n], w[:n])
    errs, outputs = {}, {}
    for name in list(fns):
        try:
            out = fns[name]()
        except Exception as exc:  # noqa: BLE001 - one provider failing does not end the run
            notes[name] = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            if not name.startswith("hf-bf16:"):  # transformers' optional kernels fail without a note's worth
                log(f"  {name}: FAILED\n{traceback.format_exc(limit=4)}")
            del fns[name]
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        is_fp8 = name.startswith(("fp8:", "sglang"))
        e_exact = rel_err(out[:n], exact)
        e_ref = rel_err(out[:n], fp8_ref) if is_fp8 else float("nan")
        errs[name] = (e_exact, e_ref)
        outputs[name] = out
        against, bound = BOUNDS["fp8" if is_fp8 else "bf16"]
        err = e_ref if against == "fp8-reference" else e_exact
        if not err <= bound:
            notes[name] = f"WRONG: rel err {err:.3g} vs {against} > {bound} (not timed)"
            del fns[name]
    qfn = quant_fn(mods["fp8:auto"], x, T, k, device) if "fp8:auto" in fns else None

    graph_fns = {}
    if args.cuda_graph and device.type == "cuda" and T <= GRAPH_MAX_T:
        for name, fn in list(fns.items()):
            if name in ("hf-bf16:eager", "dg-bf16-grouped") or (name.startswith("fp8:") and "reference" in notes.get(name, "")):
                notes[f"{name}@graph"] = "not captured: reads expert counts on the host"
                continue
            try:
                graph, out = capture(fn)
                graph.replay()
                torch.cuda.synchronize()
                diff = rel_err(out, outputs[name])
                if diff > 1e-2:
                    notes[f"{name}@graph"] = f"WRONG: replay differs from eager by {diff:.3g} (not timed)"
                    continue
                graph_fns[f"{name}@graph"] = graph.replay
            except Exception as exc:  # noqa: BLE001
                torch.cuda.synchronize()
                notes[f"{name}@graph"] = f"not captured: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    outputs = None

    timed = dict(fns)
    if qfn is not None:
        timed["quant+silu"] = qfn
    us = time_all(timed, args.rounds, args.rep_ms, device, (shape, routing, T))
    if graph_fns:
        us.update(time_all(graph_fns, args.rounds, args.rep_ms, device, (shape, routing, T, "graph")))
    rows = []
    for name in sorted(set(us) | set(notes), key=lambda s: (s.endswith("@graph"), s)):
        base = name[:-len("@graph")] if name.endswith("@graph") else name
        e_exact, e_ref = errs.get(base, (float("nan"), float("nan")))
        rows.append(dict(shape=shape, routing=routing, T=T, E=E, k=k, H=H, I=I,
                         mode="graph" if name.endswith("@graph") else "eager", provider=base,
                         us=us.get(name, float("nan")), err_exact=e_exact, err_fp8ref=e_ref,
                         note=notes.get(name, "")))
    return rows


def flops(row: dict) -> float:
    return 2.0 * row["T"] * row["k"] * 3 * row["H"] * row["I"]


# -- report -------------------------------------------------------------------------------------------------

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def point_summary(rows: list[dict]) -> list[dict]:
    """Per (shape, routing, T, mode): providers' us, fp8:auto's TFLOP/s, speedups, the quant share."""
    points: dict = {}
    for r in rows:
        points.setdefault((r["shape"], r["routing"], r["T"], r["mode"]), []).append(r)
    out = []
    for (shape, routing, T, mode), rs in points.items():
        by = {r["provider"]: r for r in rs if _finite(r["us"])}
        if mode == "graph":  # the quant share and the providers that were not captured come from eager
            eager = {r["provider"]: r for r in rows if (r["shape"], r["routing"], r["T"], r["mode"]) ==
                     (shape, routing, T, "eager") and _finite(r["us"])}
        else:
            eager = by
        hf = {p: r["us"] for p, r in by.items() if p.startswith("hf-bf16:")}
        best_hf = min(hf, key=hf.get) if hf else None
        fp8 = by.get("fp8:auto")
        quant = eager.get("quant+silu")
        s = dict(shape=shape, routing=routing, T=T, mode=mode, us={p: r["us"] for p, r in by.items()},
                 hf_best=best_hf, hf_us=hf.get(best_hf), fp8_tflops=None, x_bf16_grouped=None, x_hf=None,
                 quant_pct=None)
        if fp8 is not None:
            s["fp8_tflops"] = flops(fp8) / (fp8["us"] * 1e-6) / 1e12
            if "bf16-grouped" in by:
                s["x_bf16_grouped"] = by["bf16-grouped"]["us"] / fp8["us"]
            if best_hf is not None:
                s["x_hf"] = hf[best_hf] / fp8["us"]
            if quant is not None and mode == "eager":
                s["quant_pct"] = 100 * quant["us"] / fp8["us"]
        out.append(s)
    return out


def _fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return format(v, spec) if _finite(v) else none


def format_table(summary: list[dict]) -> str:
    providers = sorted({p for s in summary for p in s["us"] if not p.startswith("hf-bf16:") and p != "quant+silu"})
    providers = [p for p in providers if p.startswith("fp8:")] + [p for p in providers if not p.startswith("fp8:")]
    head = ("| shape | routing | T | mode | " + " | ".join(f"{p} us" for p in providers)
            + " | hf-bf16 us (best impl) | fp8:auto TFLOP/s | fp8:auto x bf16-grouped | fp8:auto x hf-bf16 | quant % |")
    lines = [head, "|" + " --- |" * (len(providers) + 9)]
    for s in summary:
        cells = [_fmt(s["us"].get(p)) for p in providers]
        hf = f"{_fmt(s['hf_us'])} ({s['hf_best'].split(':', 1)[1]})" if s["hf_best"] else "-"
        lines.append(f"| {s['shape']} | {s['routing']} | {s['T']} | {s['mode']} | " + " | ".join(cells)
                     + f" | {hf} | {_fmt(s['fp8_tflops'])} | {_fmt(s['x_bf16_grouped'], '.2f')}"
                     + f" | {_fmt(s['x_hf'], '.2f')} | {_fmt(s['quant_pct'])} |")
    return "\n".join(lines)


def summarize(summary: list[dict]) -> str:
    """The targets, restated against what was timed (a target with no timed point is left out)."""
    lines = []
    big = [s for s in summary if s["T"] >= 4096 and s["mode"] == "eager" and s["x_bf16_grouped"] is not None]
    if big:
        worst = min(big, key=lambda s: s["x_bf16_grouped"])
        lines.append(f"fp8:auto vs bf16-grouped at T >= 4096: min {worst['x_bf16_grouped']:.2f}x "
                     f"({worst['shape']} {worst['routing']} T={worst['T']}) over {len(big)} points "
                     f"(target >= {TARGETS['prefill']}x)")
    dec = [s for s in summary if s["T"] <= GRAPH_MAX_T and s["mode"] == "graph" and s["x_bf16_grouped"] is not None]
    if dec:
        worst = min(dec, key=lambda s: s["x_bf16_grouped"])
        lines.append(f"fp8:auto vs bf16-grouped at T <= {GRAPH_MAX_T} under CUDA graphs: min "
                     f"{worst['x_bf16_grouped']:.2f}x ({worst['shape']} {worst['routing']} T={worst['T']}) over "
                     f"{len(dec)} points (target >= {TARGETS['decode']}x)")
    with_hf = [s for s in summary if s["x_hf"] is not None]
    if with_hf:
        slower = [f"{s['shape']} {s['routing']} T={s['T']} {s['mode']} ({s['x_hf']:.2f}x vs {s['hf_best']})"
                  for s in with_hf if s["x_hf"] < 1.0]
        lines.append(f"fp8:auto slower than hf-bf16 at: {', '.join(slower) if slower else 'none'} "
                     f"({len(with_hf)} points)")
    shares = [s for s in summary if s["T"] == 4096 and s["quant_pct"] is not None]
    if shares:
        worst = max(shares, key=lambda s: s["quant_pct"])
        lines.append(f"quant + SiLU-and-mul at T=4096: max {worst['quant_pct']:.1f}% of fp8:auto "
                     f"({worst['shape']} {worst['routing']}; target <= {TARGETS['quant_pct']:.0f}%)")
    return "\n".join(lines)


def header(device) -> str:
    import transformers

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (timings are not numbers that count)"
    return (f"# bench_moe: {card} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__} | "
            f"commit {run_commit.commit()}")


# -- end to end -------------------------------------------------------------------------------------------

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1e6,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[])
TINY_MODEL = dict(QWEN3_30B_A3B, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)


def run_e2e(args, device, log) -> dict:
    """bf16, then the same model after quantize_model: weight bytes, one prefill, decode tokens/s."""
    import fp8linear
    from fp8linear import decode, hf
    from transformers import Qwen3MoeConfig

    dims = QWEN3_30B_A3B if device.type == "cuda" else TINY_MODEL
    prefill = args.prefill if device.type == "cuda" else min(args.prefill, 32)
    config = Qwen3MoeConfig(num_hidden_layers=args.layers, architectures=["Qwen3MoeForCausalLM"], **dims)
    torch.manual_seed(0)
    model = hf.build_model(config, torch.bfloat16, device=device)
    ids = torch.randint(3, config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = ids[:, :16]
    results = {"model": "Qwen3-30B-A3B-shaped" if device.type == "cuda" else "a tiny Qwen3-MoE (CPU)"}
    for label in ("bf16", "fp8"):
        if label == "fp8":
            model = fp8linear.quantize_model(model, progress=False)
            log(f"[e2e] {model.fp8linear_summary}")
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        res = {"weights_mib": weights / 2**20}

        def forward():
            with torch.inference_mode():
                return model(ids, use_cache=False, logits_to_keep=1)

        try:
            res["prefill_ms"] = time_all({"p": forward}, 1, args.rep_ms * 4, device, ("e2e", label))["p"] / 1e3
            if device.type == "cuda":
                res["prefill_issue_ms"] = issue_ms(forward)
        except Exception as exc:  # noqa: BLE001
            res["prefill_error"] = f"{type(exc).__name__}: {exc}"
        use_graph = device.type == "cuda"
        decoder = None
        try:
            decoder = decode.GraphDecoder(model, prompt.shape[1] + args.decode + 1, use_graph=use_graph,
                                          suppress_ids=decode.eos_ids(model))
            with torch.inference_mode():
                decoder.generate(prompt, 2)  # warm-up (and capture)
                r = decoder.generate(prompt, args.decode + 1)
            res["decode_tok_s"] = r.decode_tokens_per_s
            res["decode_mode"] = "graph" if use_graph else "eager steps"
        except Exception as exc:  # noqa: BLE001
            res["decode_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        finally:
            if decoder is not None:
                decoder.close()
        log(f"[e2e] {label}: " + ", ".join(f"{key} {v:.3g}" if isinstance(v, float) else f"{key} {v}"
                                            for key, v in res.items()))
        results[label] = res
    return results


def format_e2e(res: dict, layers: int) -> str:
    b, f = res["bf16"], res["fp8"]

    def ratio(key, invert=False):
        if key in b and key in f and b[key] and f[key]:
            return f"{(b[key] / f[key]) if invert else (f[key] / b[key]):.2f}x"
        return "-"

    rows = [("weights MiB", "weights_mib", ratio("weights_mib")),
            ("prefill ms", "prefill_ms", ratio("prefill_ms", invert=True)),
            ("prefill host ms (issuing it)", "prefill_issue_ms", "-"),
            (f"decode tok/s ({b.get('decode_mode', '-')})", "decode_tok_s", ratio("decode_tok_s"))]
    lines = [f"end to end: {res['model']}, {layers} layers, random weights",
             "| metric | bf16 | fp8 | fp8 vs bf16 |", "| --- | --- | --- | --- |"]
    for name, key, r in rows:
        if key == "prefill_issue_ms" and key not in b and key not in f:
            continue  # timed on a GPU only
        lines.append(f"| {name} | {_fmt(b.get(key), '.2f', b.get(key.split('_')[0] + '_error', '-'))} | "
                     f"{_fmt(f.get(key), '.2f', f.get(key.split('_')[0] + '_error', '-'))} | {r} |")
    for label, r in (("bf16", b), ("fp8", f)):
        if r.get("prefill_issue_ms", 0) >= HOST_BOUND * r.get("prefill_ms", math.inf):
            lines.append(f"{label}'s prefill is bound by the host: issuing it takes {r['prefill_issue_ms']:.2f} ms "
                         f"against {r['prefill_ms']:.2f} ms of wall time, so its time follows the host CPU more "
                         "than the GPU.")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), help="layer shapes (default: both real ones; "
                    "tiny on a CPU)")
    ap.add_argument("--tokens", type=int, nargs="+", help=f"token counts T (default {TOKENS})")
    ap.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    ap.add_argument("--backends", nargs="+", choices=("auto", "triton", "deepgemm", "reference"),
                    help="FP8Experts backends (default: auto triton deepgemm on CUDA, auto triton reference on CPU)")
    ap.add_argument("--grouping", nargs="+", choices=("auto", "indexed", "contiguous", "masked"), default=["auto"])
    ap.add_argument("--no-hf", action="store_true", help="leave transformers' experts out")
    ap.add_argument("--peer-dir", default=".gpu/moe-peer", help="SGLang's fused MoE peer (moe_peer.py)")
    ap.add_argument("--cuda-graph", action="store_true", help=f"also capture and time each provider at T <= {GRAPH_MAX_T}")
    ap.add_argument("--quick", action="store_true", help=f"T in {QUICK_TOKENS}, one pass per point")
    ap.add_argument("--rounds", type=int, help="passes per point (default 3; 1 with --quick)")
    ap.add_argument("--rep-ms", type=float, default=25.0, help="do_bench measuring time per provider and pass")
    ap.add_argument("--check-tokens", type=int, default=256, help="tokens whose outputs are checked (default 256)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--e2e", action="store_true", help="also the end-to-end model (module docstring)")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end model")
    ap.add_argument("--layers", type=int, default=4, help="--e2e decoder layers (default 4)")
    ap.add_argument("--prefill", type=int, default=2048, help="--e2e prefill tokens (default 2048)")
    ap.add_argument("--decode", type=int, default=64, help="--e2e decode tokens timed (default 64)")
    ap.add_argument("--out", help="write the tables (markdown) here, and the rows next to it as .json")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (use --device cpu --shape tiny for a smoke run)")
    shapes = args.shape or (["tiny"] if device.type == "cpu" else ["qwen3-30b-a3b", "deepseek-v3"])
    if device.type == "cpu" and any(s != "tiny" for s in shapes):
        ap.error(f"--device cpu runs --shape tiny only (the reference path); got {shapes}")
    tokens = args.tokens or (CPU_TOKENS if device.type == "cpu" else QUICK_TOKENS if args.quick else TOKENS)
    if any(t < 1 for t in tokens):
        ap.error(f"--tokens must be >= 1; got {tokens}")
    rounds = args.rounds or (1 if args.quick or device.type == "cpu" else 3)
    if rounds < 1 or args.check_tokens < 1 or args.layers < 1 or args.prefill < 1 or args.decode < 1:
        ap.error("--rounds, --check-tokens, --layers, --prefill and --decode must be >= 1")
    args.rounds = rounds
    names = args.backends or (["auto", "triton", "deepgemm"] if device.type == "cuda" else ["auto", "triton", "reference"])
    if "auto" not in names:
        names = ["auto"] + names  # the speedups and quant share are fp8:auto's
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        from fp8linear.backends.triton_blockwise import patch_interpreter_indexing

        patch_interpreter_indexing()
    logging.getLogger("sglang").setLevel(logging.ERROR)  # its "using the default config" warnings

    def log(msg: str) -> None:
        print(msg, flush=True)

    head = header(device)
    log(head)
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    all_rows, sections = [], []
    if not args.e2e_only:
        peer, why = load_peer(args.peer_dir)
        log(f"sglang-fp8: {'from ' + args.peer_dir if peer else 'skipped: ' + why}")
        for shape in shapes:
            E, k, H, I = SHAPES[shape]
            t0 = time.perf_counter()
            experts = make_experts(E, k, H, I, device)
            mods, oracle = fp8_modules(experts, names, args.grouping)
            log(f"{shape}: E={E} k={k} H={H} I={I}; modules built in {time.perf_counter() - t0:.1f}s")
            for routing in args.routing:
                for T in tokens:
                    t1 = time.perf_counter()
                    rows = run_point(shape, routing, T, experts, mods, oracle, peer, args, device, log)
                    all_rows += rows
                    for r in rows:
                        if r["note"].startswith(("skipped", "WRONG", "failed", "not captured")) and r["mode"] == "eager":
                            log(f"  {shape} {routing} T={T} {r['provider']}: {r['note']}")
                    errs = ", ".join(f"{r['provider']} {r['err_exact']:.2g}/{r['err_fp8ref']:.2g}" for r in rows
                                     if r["mode"] == "eager" and _finite(r["err_exact"]))
                    log(f"  {shape} {routing} T={T}: {time.perf_counter() - t1:.1f}s; rel err exact/fp8-ref: {errs}")
            experts = mods = oracle = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        summary = point_summary(all_rows)
        sections += [format_table(summary), summarize(summary)]
        picks = sorted({f"{r['shape']} T={r['T']}: {r['note']}" for r in all_rows
                        if r["provider"] == "fp8:auto" and r["mode"] == "eager" and r["note"]})
        sections.append("fp8:auto ran as (grouping: gate_up/down backend): " + "; ".join(picks))
    e2e = None
    if args.e2e or args.e2e_only:
        e2e = run_e2e(args, device, log)
        sections.append(format_e2e(e2e, args.layers))
    text = "\n\n".join(s for s in sections if s)
    log("")
    log(text)
    log(f"total {time.perf_counter() - t_start:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{head}\n\n{text}\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"header": head, "args": vars(args), "rows": all_rows, "e2e": e2e}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
