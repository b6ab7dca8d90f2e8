"""Greedy decoding of a Hugging Face causal LM under CUDA graphs: the way a serving engine decodes.

At batch 1 an eager decode step is bound by the host (a few dozen kernel launches per decoder layer, each
~10-20 us of Python and dispatch on a slow host), so eager tokens/s measures the CPU, not the weights'
bytes. Replaying a CUDA graph of the whole step takes the host out; what remains is GPU time, where FP8
weights (half the bytes of bf16) pay off. Two routes, both on a transformers StaticCache (key/value
tensors allocated once at [1, kv_heads, max_cache_len, head_dim], written in place; its write position is
a device int64 scalar that the step itself advances, so a replayed step needs no host input):

    enable_compiled_decode(model)   transformers' own route: generation_config.cache_implementation =
                                    "static" plus a CompileConfig; generate() then runs prefill eagerly
                                    and decode steps through torch.compile(mode="reduce-overhead",
                                    fullgraph=True), whose CUDA graphs inductor records. Costs a compile.
    GraphDecoder(model, ...)        a manual capture of one decode step (input_ids / position buffers,
                                    greedy argmax on device, as gpt-fast does); no compile, one capture.

fp8linear's FP8Linear works in both after one eager forward per M (its backend choice per M is cached
then; fp8linear.linear), so run a short eager generate first (hf.generate does). `graph_generate` does all
of it in one call: the warm-up, the capture, the decode; `fp8linear generate` uses it on a GPU.

Tested with transformers 5.17 and 5.24, where the cache keyword of forward is `past_key_values` and `cache`
respectively (`cache_kwarg` picks it from the signature).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Iterable

import torch
from torch import nn

__all__ = [
    "cache_kwarg",
    "make_static_cache",
    "limit_recompiles",
    "enable_compiled_decode",
    "disable_compiled_decode",
    "GraphDecodeResult",
    "GraphDecoder",
    "eos_ids",
    "graph_generate",
]


def _forward_params(model: nn.Module) -> "set[str]":
    return set(inspect.signature(model.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """The name under which model.forward takes its KV cache: "cache" (transformers >= 5.2x) or
    "past_key_values" (earlier; later versions still accept it with a deprecation warning)."""
    params = _forward_params(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; GraphDecoder needs a "
        "Hugging Face causal LM with a KV cache"
    )


def make_static_cache(model: nn.Module, max_cache_len: int):
    """A transformers StaticCache for batch 1 and up to `max_cache_len` positions of `model`.

    transformers 5.x allocates the key/value tensors on the first update (lazily, in the model's dtype and
    device, [1, kv_heads, max_cache_len, head_dim] per layer); 4.x wanted batch size, device and dtype.
    """
    from transformers import StaticCache

    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise ValueError(f"max_cache_len must be an int >= 2; got {max_cache_len!r}")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    try:
        return StaticCache(config=config, max_cache_len=max_cache_len)
    except TypeError:  # transformers 4.x
        param = next(model.parameters())
        return StaticCache(config=config, max_batch_size=1, max_cache_len=max_cache_len, device=param.device,
                           dtype=param.dtype)


def limit_recompiles(limit: int = 8) -> None:
    """Cap dynamo's recompilations per code object (recompile_limit; cache_size_limit before torch 2.6).

    A decode step has one shape, so anything past a couple of compiles means a guard keeps failing; the
    cap turns that into eager fallback (with dynamo's warning) instead of minutes of compiling.
    """
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, limit)


def enable_compiled_decode(model: nn.Module, max_cache_len: "int | None" = None, *, backend: str = "inductor",
                           mode: "str | None" = "reduce-overhead", fullgraph: bool = True,
                           all_devices: bool = False) -> None:
    """Make model.generate() decode through torch.compile on a static KV cache (transformers' route).

    Sets model.generation_config.cache_implementation = "static" and its compile_config (static shapes,
    `fullgraph`, `backend`, `mode`; reduce-overhead = inductor's CUDA graphs). generate() then runs prefill
    eagerly and every decode step ([1, 1] input ids) through one compiled graph; transformers compiles only
    on CUDA-like devices unless `all_devices` (the CPU tests use backend="eager", mode=None).

    max_cache_len: the static cache's length. transformers sizes a fresh cache per generate call to that
    call's max_length (at least the largest seen before); a cache that grows changes the graph's shapes
    and recompiles, so pass the longest prompt + new tokens any later call will use.
    """
    from transformers import CompileConfig

    gen = model.generation_config
    gen.cache_implementation = "static"
    if max_cache_len is not None and hasattr(gen, "max_cache_len"):
        gen.max_cache_len = int(max_cache_len)
    config = CompileConfig(fullgraph=fullgraph, dynamic=False, backend=backend, mode=mode)
    if all_devices:
        config._compile_all_devices = True
    gen.compile_config = config
    limit_recompiles()


def disable_compiled_decode(model: nn.Module) -> None:
    """Undo enable_compiled_decode: dynamic cache again, compiled call and dynamo's caches dropped (which also
    frees inductor's CUDA-graph memory pools), so a later compile of a changed model starts clean."""
    gen = model.generation_config
    gen.cache_implementation = None
    gen.compile_config = None
    if hasattr(gen, "max_cache_len"):
        gen.max_cache_len = None
    for name in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_cache"):
        if name in model.__dict__:
            delattr(model, name)
    torch._dynamo.reset()


@dataclasses.dataclass
class GraphDecodeResult:
    """tokens: [n] new token ids (int64, CPU), the first from prefill; prefill_s: seconds of the eager prefill;
    decode_s: seconds of the n - 1 decode steps (graph replays), host launch to GPU completion."""

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.numel() - 1
        return steps / self.decode_s if self.decode_s > 0 else float("inf")


class GraphDecoder:
    """Greedy batch-1 decoding with one decode step captured as a CUDA graph and replayed per token.

    Args:
        model: a Hugging Face causal LM (…ForCausalLM) with a KV cache, in eval mode, on one device.
        max_cache_len: positions the static cache holds; prompt length + new tokens must fit.
        use_graph: capture and replay (needs CUDA); False runs the same step eagerly, which is how the
            logic is checked on a CPU.
        suppress_ids: token ids never chosen (their logits set to -inf before argmax), e.g. the EOS ids, to
            mirror generate(min_new_tokens=n), whose greedy choice excludes EOS until n tokens exist.

    State, all on the model's device and at fixed addresses (what the captured graph reads and writes):
        _ids  [1, 1] int64   the token fed to the next step
        _pos  [1, 1] int64   its position (= tokens already in the cache)
        _seq  [max_cache_len + 1] int64   chosen tokens by position (the step writes _seq[_pos + 1])
    The StaticCache's own write position (an int64 device scalar) advances inside the step, in step with _pos.

    generate(input_ids, n): cache reset, eager prefill of input_ids [1, T] (first token = argmax of the last
    logits), then n - 1 replays with no host synchronisation in between; tokens = _seq[T : T + n].
    """

    def __init__(self, model: nn.Module, max_cache_len: int, *, use_graph: bool = True,
                 suppress_ids: "Iterable[int] | None" = None) -> None:
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        if use_graph and self.device.type != "cuda":
            raise ValueError(f"use_graph=True needs the model on a CUDA device; it is on {self.device}")
        self.use_graph = use_graph
        self.max_cache_len = max_cache_len
        self.cache = make_static_cache(model, max_cache_len)
        params = _forward_params(model)
        self._cache_kw = cache_kwarg(model)
        # Fixed per-call arguments; transformers 4.x also took the write positions as `cache_position`.
        self._extra: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in params:
            self._extra["logits_to_keep"] = 1
        self._takes_cache_position = "cache_position" in params
        self._ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._seq = torch.zeros((max_cache_len + 1,), dtype=torch.long, device=self.device)
        ids = sorted({int(i) for i in (suppress_ids or ())})
        vocab = getattr(model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config")
                        else model.config, "vocab_size", None)
        bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise ValueError(f"suppress_ids must be token ids in [0, vocab_size={vocab}); got {bad}")
        self._suppress = torch.tensor(ids, dtype=torch.long, device=self.device) if ids else None
        self._graph: "torch.cuda.CUDAGraph | None" = None

    # -- the step ---------------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kwargs = dict(self._extra)
        kwargs[self._cache_kw] = self.cache
        if self._takes_cache_position:
            kwargs["cache_position"] = position_ids[0]
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :]  # [1, vocab]

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, vocab] -> [1] int64, on device (no host synchronisation)."""
        if self._suppress is not None:
            logits = logits.index_fill(-1, self._suppress, float("-inf"))
        return logits.argmax(dim=-1)

    def _step(self) -> None:
        next_id = self._greedy(self._forward(self._ids, self._pos))  # [1]
        self._ids.copy_(next_id.view(1, 1))
        self._pos.add_(1)
        self._seq.index_copy_(0, self._pos.view(1), next_id)

    # -- public -----------------------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, n: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [1, T] int64 tensor (batch 1); got {shape}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (new tokens) must be a positive int; got {n!r}")
        T = input_ids.shape[1]
        if T < 1 or T + n > self.max_cache_len:
            raise ValueError(
                f"prompt length T={T} plus n={n} new tokens must be in [1, max_cache_len={self.max_cache_len}]; "
                "build the GraphDecoder with a larger max_cache_len"
            )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Reset the cache, run input_ids [1, T] eagerly, leave the first new token in _ids / _seq[T]."""
        input_ids = input_ids.to(self.device)
        T = input_ids.shape[1]
        self.cache.reset()  # zeroes keys/values and the write position in place: addresses are kept
        positions = torch.arange(T, device=self.device).unsqueeze(0)  # [1, T]
        first = self._greedy(self._forward(input_ids, positions))  # [1]
        self._ids.copy_(first.view(1, 1))
        self._pos.fill_(T)
        self._seq[T:T + 1].copy_(first)

    @torch.inference_mode()
    def capture(self, input_ids: torch.Tensor) -> float:
        """Capture the decode step (after a prefill of input_ids and two warm-up steps); seconds taken.

        Warm-up runs on a side stream, as torch.cuda.graphs asks, so that lazy one-time work (cuBLAS
        workspaces, the cache's allocation, FP8Linear's per-M choice) happens before capture. Capture
        records without executing, but the warm-up steps advanced the cache: generate() prefills again.
        """
        if not self.use_graph:
            return 0.0
        self._check(input_ids, 2)  # the two warm-up steps write cache positions T and T + 1
        start = time.perf_counter()
        self.prefill(input_ids)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._sync()
        self._graph = graph
        return time.perf_counter() - start

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, n: int) -> GraphDecodeResult:
        """n greedy new tokens after input_ids [1, T] (int64); tokens and timings (GraphDecodeResult)."""
        self._check(input_ids, n)
        if self.use_graph and self._graph is None:
            self.capture(input_ids)
        T = input_ids.shape[1]
        self._sync()
        start = time.perf_counter()
        self.prefill(input_ids)
        self._sync()
        mid = time.perf_counter()
        if self._graph is not None:
            for _ in range(n - 1):
                self._graph.replay()
        else:
            for _ in range(n - 1):
                self._step()
        self._sync()
        end = time.perf_counter()
        tokens = self._seq[T:T + n].cpu()
        return GraphDecodeResult(tokens, mid - start, end - mid)

    def close(self) -> None:
        """Drop the graph (and with it its memory pool) and the cache tensors."""
        self._graph = None
        self.cache = None


def eos_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence token ids (generation_config), as GraphDecoder's suppress_ids takes them."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def graph_generate(model: nn.Module, input_ids: torch.Tensor, n: int, *, use_graph: bool = True) -> GraphDecodeResult:
    """n greedy new tokens after input_ids [1, T], decoded as a serving engine decodes: an eager warm-up
    (backend choice per M, JIT builds), then GraphDecoder's captured step replayed per token, EOS suppressed
    as hf.generate's min_new_tokens does. The same tokens as transformers' greedy generate, up to rounding
    of near-ties (the static cache's masked attention; tests/test_decode.py)."""
    from .hf import generate

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    generate(model, input_ids, 2, warmup=False)
    decoder = GraphDecoder(model, input_ids.shape[1] + n + 1, use_graph=use_graph, suppress_ids=eos_ids(model))
    try:
        return decoder.generate(input_ids, n)
    finally:
        decoder.close()
