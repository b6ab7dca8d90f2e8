#!/usr/bin/env python3
"""Where an eager FP8Experts forward spends host time at decode sizes, piece by piece, beside transformers'.

    python3 scripts/profile_moe_host.py [--shape qwen3-30b-a3b] [--tokens 1 16] [--cprofile]

At one token the layer is bound by the host: its GPU work is tens of microseconds, its launches and
Python are hundreds. Per T, each piece of the forward runs alone in a loop of 200 calls with one
synchronize at the end (scripts/profile_linear.py host_us): microseconds of host per call, against a
trivial op (one Python -> dispatcher round trip) and an empty Triton kernel (one Triton launch). The
whole forward, transformers' experts under each of its implementations and the bf16 grouped pipeline of
scripts/bench_moe.py are timed the same way. --cprofile adds cProfile's heaviest functions of the whole
forward. GPU only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: profile_linear, bench_moe

from bench_moe import (SHAPES, bf16_grouped_fn, fp8_modules, hf_fn, hf_implementations,  # noqa: E402
                       make_experts, make_routing)
from profile_linear import host_profile, host_us  # noqa: E402


def empty_triton_kernel():
    """A launch of a Triton kernel that does nothing: the floor of any Triton launch from Python."""
    import triton

    @triton.jit
    def _nothing(ptr):
        pass

    buf = torch.empty(1, device="cuda")
    return lambda: _nothing[(1,)](buf)


def parts(mod, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> dict:
    """The pieces of FP8Experts' indexed forward (sorted, and pairwise at decode sizes), each callable alone on
    ready inputs."""
    from fp8linear import backends
    from fp8linear.fused import silu_and_mul_quant
    from fp8linear.moe_combine import combine_slots
    from fp8linear.moe_routing import sort_pairs
    from fp8linear.ops import quantize_for_gemm

    T, k = idx.shape
    E = mod.num_experts
    b13, b2 = mod.backends_for("indexed", x.device)
    p13, p2 = mod._prepared_for("gate_up_proj", b13), mod._prepared_for("down_proj", b2)
    pairs = sort_pairs(idx, E)
    q_x, s_x = quantize_for_gemm(x, 128, mod.dtype, False, b13.SCALE_LAYOUT, 1)
    h = b13.grouped_gemm_indexed(q_x, s_x, p13, pairs, "gather", x.dtype)
    q2, s2 = silu_and_mul_quant(h, 128, mod.dtype, scale_layout=b2.SCALE_LAYOUT)
    y = b2.grouped_gemm_indexed(q2, s2, p2, pairs, "scatter", x.dtype).view(T, k, -1)
    return {
        "SortedPairs.of (torch.sort, arange, searchsorted)": lambda: backends.SortedPairs.of(idx, E),
        "sort_pairs": lambda: sort_pairs(idx, E),
        "quantize_for_gemm": lambda: quantize_for_gemm(x, 128, mod.dtype, False, b13.SCALE_LAYOUT, 1),
        "gate_up GEMM (gather)": lambda: b13.grouped_gemm_indexed(q_x, s_x, p13, pairs, "gather", x.dtype),
        "silu_and_mul_quant": lambda: silu_and_mul_quant(h, 128, mod.dtype, scale_layout=b2.SCALE_LAYOUT),
        "down GEMM (scatter)": lambda: b2.grouped_gemm_indexed(q2, s2, p2, pairs, "scatter", x.dtype),
        "combine_slots": lambda: combine_slots(y, w, x.dtype),
        "gate_up GEMM (pairwise)": lambda: b13.grouped_gemm_pairwise(q_x, s_x, p13, idx, "tokens", x.dtype),
        "down GEMM + combine (pairwise)": lambda: b2.grouped_gemm_pairwise(q2, s2, p2, idx, "pairs", x.dtype,
                                                                          combine_weights=w),
        "combine as torch ops": lambda: (y * w.unsqueeze(-1)).sum(dim=1).to(x.dtype),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--cprofile", action="store_true", help="cProfile of the whole forward too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_moe_host: needs a CUDA GPU", file=sys.stderr)
        return 2
    E, k, H, I = SHAPES[args.shape]
    experts = make_experts(E, k, H, I, "cuda")
    mods, _ = fp8_modules(experts, ["auto"], ["auto"])
    mod = mods["fp8:auto"]
    floor = torch.empty(1, device="cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.shape} (E={E}, k={k}, H={H}, I={I})")
    print("# host us per call: a loop of 200 calls, one synchronize at the end")
    with torch.inference_mode():
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            idx, w = make_routing(T, E, k, "uniform", "cuda", seed=T)
            rows = {"floor: x.view(-1)": lambda: floor.view(-1), "floor: empty Triton kernel": empty_triton_kernel()}
            rows.update(parts(mod, x, idx, w))
            rows["FP8Experts forward"] = lambda: mod(x, idx, w)
            rows["bf16-grouped (bench_moe)"] = bf16_grouped_fn(experts, x, idx, w)
            for impl in hf_implementations(experts):
                rows[f"hf-bf16:{impl}"] = hf_fn(experts, impl, x, idx, w)
            print(f"\n## T = {T}\n\n| piece | host us |\n| --- | --- |")
            for name, fn in rows.items():
                try:
                    print(f"| {name} | {host_us(fn):.1f} |", flush=True)
                except Exception as exc:  # noqa: BLE001 - transformers' hub kernels fail offline
                    print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} |", flush=True)
            if args.cprofile:
                print("\ncProfile, FP8Experts forward:")
                host_profile(lambda: mod(x, idx, w))
    return 0


if __name__ == "__main__":
    sys.exit(main())
