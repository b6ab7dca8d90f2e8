"""The (N, K) of every layer `quantize_model` swaps in a model, from its config alone: the tuning and
benchmark scripts' `--model`, so a card's tables can be measured for the model one serves.

The model is built on the meta device (no weights are read or allocated) and quantized there with the
same skip rules (models/recipes.json) and, with `fuse_mlp`, the fused gate_up projection.

    python scripts/tune_deepgemm.py --model /path/to/Qwen3-8B            # a local Hugging Face folder
    python scripts/tune_auto.py --model demo-llama                       # a built-in config under models/
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def model_config(model: str):
    """The transformers config of a local model folder (config.json) or of a built-in name under models/."""
    from fp8linear import hf

    if os.path.isdir(model):
        return hf.load_config(model)
    return hf.demo_config(model)


def model_shapes(model: str, fuse_mlp: bool = False) -> list[tuple[int, int]]:
    """Sorted distinct (N, K) = (out_features, in_features) of the layers quantize_model would swap."""
    from fp8linear import hf, quantize_model
    from fp8linear.linear import FP8Linear

    meta = hf.build_model(model_config(model), params_on_meta=True)
    quantized = quantize_model(meta, progress=False, backend="reference", fuse_mlp=fuse_mlp)
    return sorted({(m.out_features, m.in_features) for m in quantized.modules() if isinstance(m, FP8Linear)})


def add_shape_arguments(ap) -> None:
    """--N/--K pairs and --model/--fuse-mlp, the layer shapes a tuning or benchmark script measures."""
    ap.add_argument("--N", type=int, nargs="+", help="output widths (pairs with --K)")
    ap.add_argument("--K", type=int, nargs="+", help="input widths (pairs with --N)")
    ap.add_argument("--model", help="every layer shape of this model (a local Hugging Face folder or a "
                                    "built-in name under models/), from its config alone")
    ap.add_argument("--fuse-mlp", action="store_true", help="with --model: the fused gate_up projection")


def shapes_from_args(ap, args, default: list) -> list[tuple[int, int]]:
    """The (N, K) list add_shape_arguments' options name, else `default`; ap.error on a bad combination."""
    if args.fuse_mlp and not args.model:
        ap.error("--fuse-mlp goes with --model")
    if args.model and (args.N or args.K):
        ap.error("--model and --N/--K name shapes two ways: give one")
    if args.model:
        try:
            return model_shapes(args.model, args.fuse_mlp)
        except (FileNotFoundError, ValueError, OSError) as exc:
            ap.error(f"--model {args.model}: {exc}")
    if args.N or args.K:
        if not (args.N and args.K) or len(args.N) != len(args.K):
            ap.error("--N and --K take the same number of values (pairs)")
        return list(zip(args.N, args.K))
    return list(default)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a local Hugging Face model folder, or a built-in name under models/")
    ap.add_argument("--fuse-mlp", action="store_true", help="the fused gate_up projection instead of gate and up")
    args = ap.parse_args()
    for N, K in model_shapes(args.model, args.fuse_mlp):
        print(N, K)
