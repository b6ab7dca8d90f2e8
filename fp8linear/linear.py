"""FP8Linear: a drop-in nn.Linear with 128x128-block FP8 (or INT8) weights and a blockwise GEMM.

forward(x), for x [..., K] in bf16, fp16 or fp32 (DESIGN.md "The data path"):

    x2d = x.reshape(M, K)                                  M = product of the leading dims
    x2d = pad(x2d, K -> Kp = ceil(K/128)*128) with zeros   only when K % 128 != 0 (see below)
    backend = the GEMM backend for M                       chosen once per M (`backend=`, or auto's table)
    y = backend.linear(x2d, prepared weight, bias, ...)    quantize per 1x128 group, then
                                                           dequant(q) @ dequant(W)^T + bias, fp32 accumulation
    return y.reshape(..., N)

Every backend implements the same protocol (fp8linear.backends.Backend); how many launches `linear` takes
(one where the backend fuses the quantization, two otherwise) is the backend's business.

The two halves, for modules that produce this layer's input already quantized (fp8linear.mlp's fused
SiLU-and-mul, fp8linear.norm's fused RMSNorm):

    layout = layer.input_layout(M, device)     InputLayout: dtype, scale layout, row alignment, ue8m0;
                                               None when the backend quantizes inside its own kernel
    q, s = layout.empty(M, device)             then any kernel writes rows 0..M-1 of q and s
    y = layer.forward_quantized(q, s, M, dtype)  the backend's GEMM on them -> y [M, N] in dtype

and `offer_quantized(h, q, s)`, which lets the next forward(h) use q and s instead of quantizing h.

Padding rule for K % 128 != 0: the quant op needs whole groups, so x gets zero columns up to Kp. Zeros
never raise a group's amax (the scales of the real columns are unchanged) and contribute nothing to the
product; the weight's columns K..Kp-1 are absent (the triton backend masks them, the reference slices
q), so the result is exactly that of the unpadded layer. N % 128 != 0 needs nothing: edge weight blocks
are partial (fp8linear.weights).

Parameters follow the checkpoint convention (DeepSeek-V3, transformers' FineGrainedFP8), so
`state_dict()` holds exactly `weight` (fp8 e4m3 or int8, [N, K]), `weight_scale_inv` (fp32
[ceil(N/128), ceil(K/128)], the multiplier that dequantizes) and `bias` (if any, [N], any float dtype).

Backend state lives in two Python dicts, never in the state dict:
- the backend per M, filled on the first forward with that M (`auto` consults its table then), so
  forward after a warm-up call does no lookup beyond a dict get: CUDA-graph capture and
  torch.compile(fullgraph=True) see no host synchronisation and no data-dependent branch;
- each backend's prepared weight (e.g. cuBLASLt's padded scales), derived lazily from the current
  `weight`/`weight_scale_inv`, keyed on their data_ptr and version, and dropped when they are replaced
  (attribute assignment, load_state_dict, .to()/.cuda()), so it is never stale.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from typing import Any

import torch
from torch import nn

from . import backends
from .backends import padded_k
from .config import FP8Config, dtype_short_str
from .layouts import ScaleLayout
from .ops import gemm_buffers
from .weights import quantize_weight_blockwise

__all__ = ["FP8Linear", "InputLayout", "fp8_linears"]

log = logging.getLogger(__name__)

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WEIGHT_NAMES = ("weight", "weight_scale_inv")


def _version(t: torch.Tensor) -> int:
    # Tensors made under torch.inference_mode() keep no version counter (reading it raises); they cannot
    # be modified in place outside inference mode, so their data_ptr alone identifies them.
    return -1 if t.is_inference() else t._version


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """How an FP8Linear wants its input quantized at some M: what `forward_quantized` reads.

    q [M_pad, K] in `dtype` and scales per 1 x `group_size` group in `scale_layout` over M_pad rows, M_pad =
    ceil(M / row_align) * row_align; `scale_ue8m0` asks for power-of-two scales. Equal layouts mean one
    quantization serves several layers (FP8RMSNorm's consumers)."""

    dtype: torch.dtype
    K: int
    scale_layout: ScaleLayout
    row_align: int
    scale_ue8m0: bool
    group_size: int = 128

    def empty(self, M: int, device: "torch.device | str") -> "tuple[torch.Tensor, torch.Tensor]":
        """Uninitialised (q [M_pad, K], s over M_pad rows) in this layout (fp8linear.ops.gemm_buffers)."""
        return gemm_buffers(M, self.K, self.group_size, self.dtype, self.scale_layout, self.row_align, device)


class FP8Linear(nn.Module):
    """y = x @ W^T + b with W stored as 128x128-block fp8 e4m3 (or int8) and x quantized per 1x128 group.

    Args:
        in_features: K. Any positive int (K % 128 != 0 is served by zero padding, module docstring).
        out_features: N. Any positive int (partial edge blocks).
        bias: whether the layer has a bias [N].
        dtype: `torch.float8_e4m3fn` (default) or `torch.int8`, for weights and activations.
        block_size: (128, 128) only (the checkpoint convention; fp8linear.config).
        scale_ue8m0: power-of-two scales for activations (and for weights quantized by `from_linear`).
        backend: "auto" (default) or a backend name (fp8linear.config.Backend: "deepgemm", "cublaslt",
            "triton", "fused_mma", "fused_wgmma", "reference"; earlier names are aliases).
            An explicit backend that cannot serve a shape raises on that forward, naming the reason.
        device: where the parameters live; "meta" costs nothing (the checkpoint loader builds on meta,
            then `load_state_dict(..., assign=True)`).

    A module built directly holds zero weights, unit scales and a zero bias (in torch's default dtype);
    fill it with `load_state_dict`, or build it with `from_linear` / `from_quantized`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.float8_e4m3fn,
        block_size: tuple[int, int] = (128, 128),
        scale_ue8m0: bool = False,
        backend: str = "auto",
        device: "torch.device | str | None" = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.config = FP8Config(dtype=dtype, block_size=block_size, scale_ue8m0=scale_ue8m0, backend=backend)
        self.in_features = in_features
        self.out_features = out_features
        self._choice: dict[int, types.ModuleType] = {}
        self._layouts: dict[str, "InputLayout | None"] = {}  # by backend name: what input_layout returns
        self._prepared: dict[str, tuple[tuple, Any]] = {}
        # (h, q, s, version) from `offer_quantized`: h already quantized in this layer's layout for h's M;
        # used once, when forward's x is h itself, unmodified.
        self._offered: "tuple | None" = None

        N, K = out_features, in_features
        bn, bk = self.config.block_size
        shape_s = (-(-N // bn), -(-K // bk))
        meta = torch.device(device).type == "meta" if device is not None else False
        make = torch.empty if meta else torch.zeros
        self.weight = nn.Parameter(make((N, K), dtype=self.config.dtype, device=device), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(shape_s, dtype=torch.float32, device=device) if meta
            else torch.ones(shape_s, dtype=torch.float32, device=device),
            requires_grad=False,
        )
        if bias:
            self.bias = nn.Parameter(make((N,), device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._register_load_state_dict_pre_hook(FP8Linear._drop_prepared_hook, with_module=True)

    # -- configuration views ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def block_size(self) -> tuple[int, int]:
        return self.config.block_size

    @property
    def scale_ue8m0(self) -> bool:
        return self.config.scale_ue8m0

    @property
    def backend(self) -> str:
        return self.config.backend.value

    # -- construction from other modules -------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> "FP8Linear":
        """Quantize an nn.Linear (weight [N, K], any float dtype, any device) into a new FP8Linear on the
        same device. `options` are the constructor's keywords (dtype, block_size, scale_ue8m0, backend).
        The weight is quantized per DESIGN.md "Weights" (fp8linear.weights.quantize_weight_blockwise);
        the bias is copied in its dtype. `linear` is not modified and shares no storage with the result.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        if "device" in options:
            raise TypeError("from_linear takes no device: the result lives where linear.weight does")
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **options)
        with torch.no_grad():
            weight, weight_scale_inv = quantize_weight_blockwise(
                linear.weight.detach(), module.dtype, module.block_size, module.scale_ue8m0
            )
            module.weight = nn.Parameter(weight, requires_grad=False)
            module.weight_scale_inv = nn.Parameter(weight_scale_inv, requires_grad=False)
            if linear.bias is not None:
                module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        weight_scale_inv: torch.Tensor,
        bias: "torch.Tensor | None" = None,
        **options: Any,
    ) -> "FP8Linear":
        """Wrap already-quantized tensors without copying them: weight [N, K] (fp8 e4m3 or int8; its dtype
        sets `dtype` unless given), weight_scale_inv fp32 [ceil(N/128), ceil(K/128)], bias [N] or None."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [N, K]; got {getattr(weight, 'shape', type(weight))}")
        options.setdefault("dtype", weight.dtype)
        if "device" in options:
            raise TypeError("from_quantized takes no device: the result lives where weight does")
        N, K = weight.shape
        module = cls(K, N, bias=bias is not None, device="meta", **options)
        module._check_weights(weight, weight_scale_inv, bias)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.weight_scale_inv = nn.Parameter(weight_scale_inv, requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias, requires_grad=False)
        return module

    def _check_weights(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: "torch.Tensor | None") -> None:
        N, K = self.out_features, self.in_features
        if weight.dtype != self.dtype:
            raise TypeError(f"weight must have dtype {self.dtype} (the module's dtype); got {weight.dtype}")
        if tuple(weight.shape) != (N, K):
            raise ValueError(
                f"weight must have shape [{N}, {K}] ([out_features, in_features]); got {list(weight.shape)}"
            )
        shape_s = tuple(self.weight_scale_inv.shape)
        if weight_scale_inv.dtype != torch.float32 or tuple(weight_scale_inv.shape) != shape_s:
            raise ValueError(
                f"weight_scale_inv must be float32 of shape {list(shape_s)} ([ceil(N/128), ceil(K/128)]); "
                f"got {weight_scale_inv.dtype} {list(weight_scale_inv.shape)}"
            )
        if bias is not None and (tuple(bias.shape) != (N,) or not bias.is_floating_point()):
            raise ValueError(f"bias must be a float tensor of shape [{N}]; got {bias.dtype} {list(bias.shape)}")

    # -- cache invalidation --------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WEIGHT_NAMES and "_prepared" in self.__dict__:
            self._prepared.clear()
        super().__setattr__(name, value)

    @staticmethod
    def _drop_prepared_hook(module: "FP8Linear", *args: Any, **kwargs: Any) -> None:
        module._prepared.clear()

    def _apply(self, fn, *args, **kwargs):
        self.__dict__["_offered"] = None
        self._prepared.clear()
        self._choice.clear()  # the choice depends on the device
        self._layouts.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- the hot path ----------------------------------------------------------------------------------
    def backend_for(self, M: int, device: "torch.device | str") -> types.ModuleType:
        """The backend (a module of fp8linear.backends) that serves M rows on `device`: chosen on first
        sight of M (the named backend, or auto's pick, logged at DEBUG) and cached until .to()/.cuda()."""
        backend = self._choice.get(M)
        if backend is None:
            device = torch.device(device)
            backend = backends.select(self.backend, M, self.out_features, self.in_features, self.dtype, device)
            log.debug(
                "FP8Linear(N=%d, K=%d, %s) M=%d on %s: %s (backend=%s)",
                self.out_features, self.in_features, dtype_short_str(self.dtype), M, device, backend.NAME,
                self.backend,
            )
            self._choice[M] = backend
        return backend

    def _prepared_for(self, backend: types.ModuleType) -> Any:
        params = self._parameters  # not self.weight: nn.Module.__getattr__ costs ~1 us a lookup
        weight, weight_scale_inv = params["weight"], params["weight_scale_inv"]
        entry = self._prepared.get(backend.NAME)
        if torch.compiler.is_compiling():
            # Dynamo cannot trace data_ptr(); the warm-up call filled the cache and replacing the
            # weights clears it (which makes dynamo's guards on the dict fail and retrace).
            if entry is not None:
                return entry[1]
            key = None
        else:
            key = (weight.data_ptr(), _version(weight), weight_scale_inv.data_ptr(), _version(weight_scale_inv))
            if entry is not None and entry[0] == key:
                return entry[1]
            self._check_weights(weight, weight_scale_inv, None)
        prepared = backend.prepare_weight(weight, weight_scale_inv)
        self._prepared[backend.NAME] = (key, prepared)
        return prepared

    def __getstate__(self) -> dict:
        # The caches hold backend modules (not picklable) and device-bound tensors: copies start empty.
        state = dict(self.__dict__)
        state["_choice"] = {}
        state["_layouts"] = {}
        state["_prepared"] = {}
        state["_offered"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] bf16/fp16/fp32 (any leading dims, any strides) -> y [..., N] in x's dtype."""
        if x.is_cuda and not torch.compiler.is_compiling() and x.device.index != torch.cuda.current_device():
            # Triton and DeepGEMM launch on the *current* device: a layer on cuda:1 called while cuda:0 is
            # current (device_map across GPUs) must switch, or it reads cuda:1 memory from cuda:0.
            with torch.cuda.device(x.device):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != K:
            raise ValueError(f"x's last dim must be in_features={K}; got x of shape {list(x.shape)}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"x must be bfloat16, float16 or float32; got {x.dtype}")
        params = self._parameters  # the hot path skips nn.Module.__getattr__ (~1 us a lookup)
        weight, bias = params["weight"], params["bias"]
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the layer's weight is on {weight.device}; move one of them")
        M = x.numel() // K
        if M == 0:
            return x.new_empty((*x.shape[:-1], N))
        backend = self._choice.get(M) or self.backend_for(M, x.device)
        prepared = self._prepared_for(backend)
        offered = self._offered
        if offered is not None:
            self.__dict__["_offered"] = None  # used once (and not kept alive)
            h, q, s, version = offered
            if h is x and _version(x) == version and not torch.compiler.is_compiling():
                # x is the output h of the module that offered it, quantized there in this layer's layout.
                y = backend.gemm(q, s, prepared, x.dtype, bias)
                return (y if y.shape[0] == M else y[:M]).reshape(*x.shape[:-1], N)

        lead = x.shape[:-1]
        x2d = x.reshape(-1, K)  # [M, K]
        Kp = padded_k(K)
        if Kp != K:
            x2d = torch.nn.functional.pad(x2d, (0, Kp - K))  # [M, Kp], zero columns (module docstring)
        elif x2d.stride(-1) != 1:
            x2d = x2d.contiguous()  # the quant op reads rows with unit element stride
        y = backend.linear(x2d, prepared, bias, x.dtype, self.dtype, self.scale_ue8m0)  # [M, N]
        return y.reshape(*lead, N)

    # -- the two halves, for modules that quantize this layer's input themselves ----------------------------
    def input_layout(self, M: int, device: "torch.device | str") -> "InputLayout | None":
        """How the backend serving M rows on `device` reads its quantized input, or None when that backend
        quantizes inside its own kernel (then call the layer on the unquantized input instead)."""
        backend = self._choice.get(M) or self.backend_for(M, device)
        if backend.NAME not in self._layouts:
            self._layouts[backend.NAME] = None if backend.SCALE_LAYOUT is None else InputLayout(
                self.dtype, padded_k(self.in_features), backend.SCALE_LAYOUT, backend.ROW_ALIGN, self.scale_ue8m0,
                self.config.activation_group_size)
        return self._layouts[backend.NAME]

    def forward_quantized(self, q: torch.Tensor, s: torch.Tensor, M: int, out_dtype: torch.dtype) -> torch.Tensor:
        """y [M, N] in `out_dtype` (the unquantized input's dtype) from q and s written in
        `input_layout(M, q.device)`: rows 0..M-1 filled, the padding rows as `InputLayout.empty` allocates."""
        backend = self._choice.get(M) or self.backend_for(M, q.device)
        if backend.SCALE_LAYOUT is None:
            raise ValueError(
                f"backend {backend.NAME!r} quantizes inside its own kernel at M={M} (input_layout is None): call "
                "the layer on the unquantized input instead"
            )
        y = backend.gemm(q, s, self._prepared_for(backend), out_dtype, self._parameters["bias"])
        return y if y.shape[0] == M else y[:M]

    def offer_quantized(self, h: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
        """Let the next forward(h) multiply q and s (h quantized in `input_layout(M, h.device)`, by the caller)
        instead of quantizing h again: used once, and only when forward's input is h itself, unmodified."""
        self.__dict__["_offered"] = (h, q, s, _version(h))  # not nn.Module.__setattr__: host time per call

    # -- display ---------------------------------------------------------------------------------------
    def _backend_str(self) -> str:
        device = self.weight.device
        if self.backend != "auto":
            module = backends.get(self.backend)
            if module.SCALE_LAYOUT is None:
                return f"{self.backend} (quantization fused into the GEMM)"
            return f"{self.backend} ({module.SCALE_LAYOUT.value} scales)"
        if device.type == "meta":
            return "auto (chosen per M on first forward)"
        from .backends import auto

        return f"auto ({auto.describe(self.out_features, self.in_features, self.dtype, device)})"

    def extra_repr(self) -> str:
        bn, bk = self.block_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={dtype_short_str(self.dtype)}, block_size={bn}x{bk}, scale_ue8m0={self.scale_ue8m0}, "
            f"backend={self._backend_str()}"
        )


def fp8_linears(model: nn.Module) -> "dict[str, FP8Linear]":
    """Every FP8Linear of `model` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
