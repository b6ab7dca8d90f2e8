"""fp8linear: FP8/INT8 inference for Hugging Face models on NVIDIA Hopper GPUs.

Public API (stable; everything else is reachable but not promised):

    per_token_group_quant   quantize activations per 1 x g group into the scale layout a GEMM reads
    FP8Config               how to quantize (dtype, power-of-two scales, GEMM backend), validated and frozen
    FP8Linear               drop-in nn.Linear with 128x128-block FP8/INT8 weights and a blockwise GEMM
    quantize_model          swap a model's nn.Linear layers for FP8Linear, in place
    save_quantized          write a DeepSeek-V3-style FP8 checkpoint (safetensors + config.json)
    load_quantized          build a Hugging Face model from such a checkpoint, offline

Importing fp8linear initialises no GPU and compiles nothing: the CUDA kernels build on first CUDA use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["per_token_group_quant", "FP8Config", "FP8Linear", "quantize_model", "save_quantized", "load_quantized",
           "__version__"]

from .config import FP8Config
from .ops import per_token_group_quant

# The module and the Hugging Face side import on first use, keeping `import fp8linear` light.
_LAZY = {
    "FP8Linear": "fp8linear.linear",
    "quantize_model": "fp8linear.convert",
    "save_quantized": "fp8linear.checkpoint",
    "load_quantized": "fp8linear.checkpoint",
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load_quantized, save_quantized
    from .convert import quantize_model
    from .linear import FP8Linear


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fp8linear' has no attribute {name!r}")
