"""What fp8linear reads of DeepGEMM's internals, in one module: the C++ relaunch of its legacy kernels.

Written for the legacy DeepGEMM that sgl-kernel 0.1.x wheels bundle (`gemm_fp8_fp8_bf16_nt`, a Python JIT
with `deep_gemm.jit_kernels.{gemm,runtime,tuner}`; it has no `__version__`, so `written_for()` identifies it
by the internals read here and its runtime's launch-argument list). With any other DeepGEMM, and wherever
something here does not match, fp8linear.backends.deepgemm calls DeepGEMM's public API alone.

Why: through DeepGEMM's legacy Python launch (four TMA descriptors and a launch config built through
cuda-python per call) an eager forward cost about 80-140 us more host time than the same kernel launched from
C++ on the lent H100's host (scripts/profile_linear.py; docs/benchmarks.md). So the first call per
(M, N, K, device) goes through DeepGEMM, which compiles, tunes and runs the kernel; `legacy_plan` reads back
what it ran (the CUkernel handle and the tile configuration from its tuner's cache), and later calls launch
that same kernel from C++ (kernels/deepgemm_launch.cu), bit for bit the same result:
`fp8linear::deepgemm_gemm` on quantized operands, and `fp8linear::deepgemm_linear`, quantization included.

Tiles: where `deepgemm_tiles` holds a row for this card, (N, K) and M's bucket, the first call runs DeepGEMM
with those tiles instead of its own pick (`run_with_tiles`: its JIT compiles them, nothing of DeepGEMM's is
modified): the same result, measured faster by scripts/tune_deepgemm.py.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..layouts import tma_aligned_rows
from . import deepgemm_tiles

log = logging.getLogger(__name__)

__all__ = ["ENABLED", "plans", "written_for", "first_call", "legacy_plan", "run_with_tiles", "launch_args"]


@functools.lru_cache(maxsize=None)
def written_for() -> "str | None":
    """None when the installed DeepGEMM has the legacy internals this module reads; else why not."""
    try:
        import deep_gemm
        from deep_gemm.jit_kernels import gemm, runtime, tuner, utils  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not installed, or another layout of its package
        return f"not the legacy DeepGEMM this relaunch reads ({type(exc).__name__}: {exc})"
    missing = [name for mod, name in ((gemm, "get_best_configs"), (gemm, "get_smem_config"),
                                      (runtime, "FP8GemmRuntime"), (tuner, "jit_tuner"), (utils, "get_num_sms"))
               if not hasattr(mod, name)]
    if not hasattr(deep_gemm, "gemm_fp8_fp8_bf16_nt") or missing:
        return f"DeepGEMM's legacy internals differ (missing: {', '.join(missing) or 'gemm_fp8_fp8_bf16_nt'})"
    return None


#: False sends every call through DeepGEMM's own Python launch: set only by scripts/profile_linear.py, which
#: times both launches of the same kernel.
ENABLED = True

#: The legacy kernel's launch arguments, in the order FP8GemmRuntime passes them (deep_gemm/jit_kernels/
#: runtime.py); kernels/deepgemm_launch.cu passes the same. Another list means another kernel signature.
LEGACY_LAUNCH_ARGS = ["NUM_TMA_MULTICAST", "M", "BLOCK_M", "GMEM_D", "SCALES_B", "GROUPED_LAYOUT", "NUM_SMS",
                       "SMEM_SIZE", "TENSOR_MAP_A", "TENSOR_MAP_B", "TENSOR_MAP_SCALES_A", "TENSOR_MAP_D", "STREAM"]

#: (M, N, K, device index) -> the C++ launch's arguments after the tensors (kernel, num_sms, block_m, block_n,
#: smem_size, swizzle_d, multicast), or () where DeepGEMM's own launch serves that shape.
plans: "dict[tuple[int, int, int, int], tuple[int, ...]]" = {}


def launch_args(runtime, num_sms: int, block_m: int, block_n: int, smem: int, swizzle_d: int,
                 multicast: int) -> "tuple[int, ...] | str":
    """The arguments of `fp8linear::deepgemm_gemm` after the tensors, for a legacy DeepGEMM runtime that has
    run (its kernel is loaded on first use), or why they cannot be taken from it."""
    if list(getattr(runtime, "args", None) or []) != LEGACY_LAUNCH_ARGS:
        return f"the kernel takes other launch arguments ({getattr(runtime, 'args', None)})"
    if getattr(runtime, "kernel", None) is None:
        return "DeepGEMM has not loaded the kernel"
    return (int(runtime.kernel), int(num_sms), int(block_m), int(block_n), int(smem), int(swizzle_d), int(multicast))


def tuner_keys(N: int, K: int, block_m: int, block_n: int, num_stages: int, multicast: int, on_a: bool,
                swizzle_d: int, n_pad: int) -> dict:
    """The template keys under which DeepGEMM's legacy JIT tuner builds and caches a configuration."""
    return {"N": N, "K": K, "BLOCK_M": block_m, "BLOCK_N": block_n, "SWIZZLE_D_MODE": swizzle_d,
            "BLOCK_N_PADDING": n_pad, "NUM_STAGES": num_stages, "NUM_TMA_MULTICAST": multicast,
            "IS_TMA_MULTICAST_ON_A": on_a}


def legacy_plan(M: int, N: int, K: int) -> "tuple[int, ...] | str":
    """What DeepGEMM's legacy `gemm_fp8_fp8_bf16_nt` ran for this shape on the current device (call it once
    first): the launch arguments of `fp8linear::deepgemm_gemm`, or the reason they cannot be read."""
    try:
        from deep_gemm.jit_kernels import gemm as dg_gemm
        from deep_gemm.jit_kernels.tuner import jit_tuner
        from deep_gemm.jit_kernels.utils import get_num_sms

        # The same derivation as gemm_fp8_fp8_bf16_nt: configs by shape, then the tuner's key for them.
        num_sms, block_m, block_n, num_stages, (multicast, on_a), (smem, swizzle_d, n_pad) = \
            dg_gemm.get_best_configs(M, N, K, 1, get_num_sms())
        keys = tuner_keys(N, K, block_m, block_n, num_stages, multicast, on_a, swizzle_d, n_pad)
        signature = str({k: keys[k] for k in sorted(keys)})  # JITTuner.compile_and_tune's f'{keys}'
        entry = jit_tuner.tuned.get(("gemm_fp8_fp8_bf16_nt", signature))
        if entry is None:
            return "DeepGEMM's tuner holds no kernel under the key its configs give"
        return launch_args(entry[0], num_sms, block_m, block_n, smem, swizzle_d, multicast)
    except Exception as exc:  # its internals moved: keep its own launch
        return f"{type(exc).__name__}: {exc}"


def run_with_tiles(tiles: deepgemm_tiles.Tiles, q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                   weight_scale_inv: torch.Tensor, y: torch.Tensor) -> "tuple[int, ...] | str":
    """y <- q @ weight^T by DeepGEMM's legacy kernel built with `tiles` instead of its own pick: its JIT
    tuner compiles (or finds) that configuration and its runtime launches it, the calls
    `gemm_fp8_fp8_bf16_nt` makes for its pick; nothing of DeepGEMM's is modified. q fp8 [M, K] (M > 0),
    s fp32 [M, K/128] in the `col` layout, weight fp8 [N, K], weight_scale_inv fp32 [N/128, K/128], y bf16
    [M, N]. Returns the C++ launch's arguments for that kernel (or why they cannot be read); raises what
    DeepGEMM raises when it cannot build or run it."""
    import cuda.bindings.driver as cbd  # DeepGEMM's own dependency: its launches return a CUresult
    from deep_gemm.jit_kernels import gemm as dg_gemm
    from deep_gemm.jit_kernels import runtime as dg_runtime
    from deep_gemm.jit_kernels.tuner import jit_tuner
    from deep_gemm.jit_kernels.utils import get_num_sms

    M, K = q.shape
    N = weight.shape[0]
    bm, bn = tiles.block_m, tiles.block_n
    smem, swizzle_d, n_pad = dg_gemm.get_smem_config(tiles.num_stages, K, bm, bn)
    num_sms = deepgemm_tiles.num_sms_for(tiles, M, N, get_num_sms())
    normal = dg_runtime.GemmType.Normal
    kwargs = {
        "GEMM_TYPE": normal, "NUM_TMA_THREADS": 128, "NUM_MATH_THREADS_PER_GROUP": 128, "M": M, "NUM_GROUPS": 1,
        "BLOCK_K": 128, "GMEM_D": y, "SCALES_B": weight_scale_inv,
        "GROUPED_LAYOUT": torch.empty(0, dtype=torch.int32, device=q.device), "NUM_SMS": num_sms,
        "SMEM_SIZE": smem,
        "TENSOR_MAP_A": dg_runtime.make_2d_tma_a_desc(normal, q, M, K, bm, 128, 1),
        "TENSOR_MAP_B": dg_runtime.make_2d_tma_b_desc(normal, weight, K, N, 128, bn, 1),
        "TENSOR_MAP_SCALES_A": dg_runtime.make_2d_tma_scales_a_desc(normal, s, M, K, bm, 128),
        "TENSOR_MAP_D": dg_runtime.make_2d_tma_d_desc(normal, y, M, N, bm, bn, 1, swizzle_d),
        "STREAM": torch.cuda.current_stream(q.device).cuda_stream,
    }
    keys = tuner_keys(N, K, bm, bn, tiles.num_stages, tiles.multicast, tiles.multicast_on_a, swizzle_d, n_pad)
    runtime, keys = jit_tuner.compile_and_tune(name="gemm_fp8_fp8_bf16_nt", keys=keys, space=(), kwargs=kwargs,
                                               runtime_cls=dg_runtime.FP8GemmRuntime)
    result = runtime(**keys, **kwargs)  # cuLaunchKernelEx's return through cuda-python: (CUresult,)
    status = result[0] if isinstance(result, tuple) else result
    if status != cbd.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"DeepGEMM's launch of {tiles.label()} returned {status}")
    return launch_args(runtime, num_sms, bm, bn, smem, swizzle_d, tiles.multicast)


def first_call(fn, q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               y: torch.Tensor) -> "tuple[int, ...] | str":
    """The first call of a shape through DeepGEMM's legacy public `fn` (gemm_fp8_fp8_bf16_nt), with the tiles
    measured for this card where deepgemm_tiles has a row, else DeepGEMM's pick; returns what it ran as the C++
    launch's arguments, or why they cannot be read (then DeepGEMM's own launch keeps serving the shape)."""
    why = written_for()
    if why is not None:
        fn((q, s), (weight, weight_scale_inv), y)
        return why
    M, K = q.shape
    N = weight.shape[0]
    tiles = deepgemm_tiles.lookup_for_device(M, N, K, q.device)
    if tiles is not None and s.stride() == (1, tma_aligned_rows(M)):
        try:
            return run_with_tiles(tiles, q, s, weight, weight_scale_inv, y)
        except Exception as exc:  # noqa: BLE001 - DeepGEMM's JIT raises AssertionError and others
            log.warning("DeepGEMM could not run the measured tiles %s for M=%d, N=%d, K=%d (%s: %s); "
                        "using its own pick for this shape", tiles.label(), M, N, K, type(exc).__name__, exc)
    fn((q, s), (weight, weight_scale_inv), y)
    return legacy_plan(M, N, K)


# -- the C++ relaunch (kernels/deepgemm_launch.cu), and the fakes torch.compile traces -------------------------
_lib = torch.library.Library("fp8linear", "FRAGMENT")
# Launch a kernel DeepGEMM compiled (its handle and tile configuration) -> y bf16.
_lib.define(
    "deepgemm_gemm(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv, int kernel, int num_sms, "
    "int block_m, int block_n, int smem_size, int swizzle_d, int multicast) -> Tensor"
)
# The same, quantizing x [M, K] first (fp8linear::quant_for_gemm's `col` layout) in the same op call.
_lib.define(
    "deepgemm_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, bool scale_ue8m0, float eps, int kernel, "
    "int num_sms, int block_m, int block_n, int smem_size, int swizzle_d, int multicast) -> Tensor"
)


@torch.library.register_fake("fp8linear::deepgemm_gemm", lib=_lib)
def _launch_fake(q, s, weight, weight_scale_inv, kernel, num_sms, block_m, block_n, smem_size, swizzle_d, multicast):
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=torch.bfloat16)


@torch.library.register_fake("fp8linear::deepgemm_linear", lib=_lib)
def _linear_fake(x, weight, weight_scale_inv, scale_ue8m0, eps, kernel, num_sms, block_m, block_n, smem_size,
                 swizzle_d, multicast):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)
