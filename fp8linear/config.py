"""FP8Config: how a model's linear layers are quantized and which GEMM serves them.

One frozen dataclass, validated in `__post_init__`, that round-trips to the `quantization_config` dict
of a Hugging Face config.json (DESIGN.md "Weights"):

    {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}

which DeepSeek-V3, Qwen3-FP8, transformers' FineGrainedFP8, vLLM and SGLang all read. Power-of-two
scales are written as `"scale_fmt": "ue8m0"` (DeepSeek-V3.1's key). INT8 checkpoints are ours alone:
they say `"quant_method": "fp8linear_int8"` (and `"fmt": "int8"`), so transformers, vLLM and SGLang refuse
them instead of reading int8 bytes as fp8 (all three ignore `fmt`). Our own knobs (backend) go under `"fp8linear"`, a key other readers ignore.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

import torch

#: INT8 checkpoints' quant_method: a name no other reader knows, so they refuse rather than misread.
INT8_QUANT_METHOD = "fp8linear_int8"

__all__ = ["ALIASES", "Backend", "FP8Config", "SUPPORTED_BLOCK_SIZE", "SUPPORTED_DTYPES"]

#: The only weight block the GEMM backends and the checkpoint format agree on.
SUPPORTED_BLOCK_SIZE = (128, 128)
#: Quantized element types: fp8 e4m3 (QMAX 448) and int8 (QMAX 127).
SUPPORTED_DTYPES = (torch.float8_e4m3fn, torch.int8)

_FMT = {torch.float8_e4m3fn: "e4m3", torch.int8: "int8"}


class Backend(str, enum.Enum):
    """Which blockwise GEMM computes `FP8Linear.forward` (see `fp8linear.backends`). Each name says what
    computes the product: a library (deepgemm, cublaslt), our Triton kernel, or one of our CUDA kernels
    that quantize inside the GEMM (fused_mma, fused_wgmma). Earlier names stay accepted (`ALIASES`)."""

    #: Per (M bucket, N, K, dtype), the backend measured fastest on this card
    #: (`fp8linear/backends/auto_table.json`, written by `scripts/tune_auto.py`); without a table for the
    #: card, a heuristic from the H100 table's measurements; never a backend that cannot serve the shape.
    AUTO = "auto"
    #: DeepGEMM (legacy `gemm_fp8_fp8_bf16_nt` or current `fp8_gemm_nt`): fp8 only, SM90, N % 64 == 0,
    #: K % 128 == 0. Fastest at large M on wide layers.
    DEEPGEMM = "deepgemm"
    #: cuBLASLt's blockwise 1x128 x 128x128 FP8 GEMM (the recipe of `torch.nn.functional.scaled_mm`, SM90,
    #: cuBLAS >= 12.9): fp8 only, N % 16 == 0, K % 128 == 0. Alias: "cublas".
    CUBLASLT = "cublaslt"
    #: fp8linear's own Triton GEMM: fp8 and int8, any N and K, fused bias; the fallback that serves all.
    TRITON = "triton"
    #: fp8linear's own CUDA kernel for M <= 16 (decode): quantizes x inside an mma.sync tensor-core GEMM,
    #: one launch; fp8 and int8, K % 128 == 0, compute capability >= 8.9. Alias: "small_m".
    FUSED_MMA = "fused_mma"
    #: fp8linear's own Hopper GEMM (wgmma, TMA) quantizing x inside the same kernel; fp8 and int8,
    #: K % 128 == 0, N % 8 == 0, compute capability 9.0. For fp8 slower than DeepGEMM and cuBLASLt on the
    #: H100 (docs/benchmarks.md), so `auto` names it only for int8 layers. Alias: "sm90".
    FUSED_WGMMA = "fused_wgmma"
    #: Dequantize and matmul in fp32 on any device: the CPU path and the oracle of the tests.
    #: Slow, never chosen by `auto` on a GPU that another backend serves.
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value: "str | Backend") -> "Backend":
        if isinstance(value, str) and value in ALIASES:
            value = ALIASES[value]
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            aliases = ", ".join(f"{old!r} for {new!r}" for old, new in ALIASES.items())
            raise ValueError(f"backend must be one of {names} (or the earlier names {aliases}); got {value!r}") from None

    def short_str(self) -> str:
        return self.value


#: Earlier backend names, still accepted everywhere a backend name is (config.json included).
ALIASES = {"cublas": "cublaslt", "small_m": "fused_mma", "sm90": "fused_wgmma"}


def dtype_short_str(dtype: torch.dtype) -> str:
    """'e4m3' or 'int8': the `fmt` of config.json, and what `extra_repr` prints."""
    return _FMT[dtype]


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """How FP8Linear quantizes (validated on construction; frozen).

    Fields:
        dtype: element type of weights and activations: `torch.float8_e4m3fn` (default; what every FP8
            checkpoint holds) or `torch.int8` (QMAX 127; served by the triton, fused_mma, fused_wgmma and
            reference backends).
        block_size: weight block (rows of N, columns of K); (128, 128) only, the checkpoint convention
            and what DeepGEMM and cuBLASLt read.
        scale_ue8m0: round every scale (weight blocks and activation groups) up to a power of two,
            as DeepSeek-V3.1 checkpoints (`"scale_fmt": "ue8m0"`) and DeepGEMM on SM100 want. Default
            False: exact amax/QMAX scales are slightly more accurate.
        backend: a `Backend` (or its string value); default `auto`.
        activation_group_size: g of the per-token-group activation quantization; must equal
            block_size[1] so that each activation group meets exactly one weight block along K.
    """

    dtype: torch.dtype = torch.float8_e4m3fn
    block_size: tuple[int, int] = SUPPORTED_BLOCK_SIZE
    scale_ue8m0: bool = False
    backend: Backend = Backend.AUTO
    activation_group_size: int = 128

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.int8; got {self.dtype!r}")
        try:
            block = tuple(int(b) for b in self.block_size)
        except TypeError:
            raise ValueError(f"block_size must be a pair of ints; got {self.block_size!r}") from None
        if block != SUPPORTED_BLOCK_SIZE:
            raise ValueError(
                f"block_size must be {SUPPORTED_BLOCK_SIZE} (the checkpoint convention every backend reads); "
                f"got {self.block_size!r}"
            )
        object.__setattr__(self, "block_size", block)
        if not isinstance(self.scale_ue8m0, bool):
            raise ValueError(f"scale_ue8m0 must be a bool; got {self.scale_ue8m0!r}")
        object.__setattr__(self, "backend", Backend.parse(self.backend))
        if self.activation_group_size != block[1]:
            raise ValueError(
                f"activation_group_size must equal block_size[1]={block[1]} (one activation group per weight "
                f"block along K); got {self.activation_group_size!r}"
            )

    def short_str(self) -> str:
        return (
            f"{dtype_short_str(self.dtype)},block={self.block_size[0]}x{self.block_size[1]},"
            f"ue8m0={self.scale_ue8m0},backend={self.backend.value}"
        )

    def module_kwargs(self) -> dict[str, Any]:
        """The keyword options of `FP8Linear(...)` / `FP8Linear.from_linear(...)`."""
        return {
            "dtype": self.dtype,
            "block_size": self.block_size,
            "scale_ue8m0": self.scale_ue8m0,
            "backend": self.backend.value,
        }

    def to_quantization_config(self) -> dict[str, Any]:
        """The `quantization_config` dict of config.json (see this module's docstring)."""
        d: dict[str, Any] = {
            "quant_method": "fp8" if self.dtype == torch.float8_e4m3fn else INT8_QUANT_METHOD,
            "fmt": dtype_short_str(self.dtype),
            "weight_block_size": list(self.block_size),
            "activation_scheme": "dynamic",
        }
        if self.scale_ue8m0:
            d["scale_fmt"] = "ue8m0"
        d["fp8linear"] = {"backend": self.backend.value, "activation_group_size": self.activation_group_size}
        return d

    @classmethod
    def from_quantization_config(cls, d: "Mapping[str, Any]", **overrides: Any) -> "FP8Config":
        """Read a `quantization_config` dict (ours, DeepSeek-V3's, or transformers' FineGrainedFP8Config's).

        `overrides` (e.g. backend="triton") replace what the dict says. Raises ValueError for what
        fp8linear cannot serve: another quant_method, a static activation scheme, another block size.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"quantization_config must be a dict; got {type(d).__name__}")
        method = d.get("quant_method")
        if method not in ("fp8", INT8_QUANT_METHOD):
            raise ValueError(
                f"quantization_config['quant_method'] must be 'fp8' (or {INT8_QUANT_METHOD!r}); got {method!r}"
            )
        scheme = d.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"quantization_config['activation_scheme'] must be 'dynamic' (per-token-group scales computed at "
                f"run time); got {scheme!r}"
            )
        fmt = d.get("fmt", "e4m3" if method == "fp8" else "int8")
        if (fmt == "int8") != (method == INT8_QUANT_METHOD):
            raise ValueError(
                f"quantization_config has quant_method={method!r} with fmt={fmt!r}: int8 weights go with "
                f"quant_method={INT8_QUANT_METHOD!r} only (other readers ignore fmt and would read them as fp8)"
            )
        by_fmt = {v: k for k, v in _FMT.items()}
        if fmt not in by_fmt:
            raise ValueError(f"quantization_config['fmt'] must be one of {sorted(by_fmt)}; got {fmt!r}")
        scale_fmt = d.get("scale_fmt")
        if scale_fmt not in (None, "ue8m0", "fp32", "float32"):
            raise ValueError(f"quantization_config['scale_fmt'] must be 'ue8m0' or absent; got {scale_fmt!r}")
        block = d.get("weight_block_size", list(SUPPORTED_BLOCK_SIZE))
        if block is None:
            raise ValueError(
                "quantization_config['weight_block_size'] is null (per-tensor FP8); fp8linear reads 128x128 "
                "block scales only"
            )
        ours = d.get("fp8linear") or {}
        kwargs: dict[str, Any] = {
            "dtype": by_fmt[fmt],
            "block_size": tuple(block),
            "scale_ue8m0": scale_fmt == "ue8m0",
            "backend": ours.get("backend", Backend.AUTO.value),
            "activation_group_size": ours.get("activation_group_size", 128),
        }
        kwargs.update(overrides)
        return cls(**kwargs)
