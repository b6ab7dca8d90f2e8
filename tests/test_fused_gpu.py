"""The fused CUDA kernels (kernels/fused_quant.cu) against fp8linear.fused's CPU references, bit for bit.

Grids: SiLU-and-mul M in {0, 1, 3, 17, 128, 1000, 4096} x I in {128, 1408, 14336}; RMSNorm
M in the same x H in {128, 144, 2064, 4096, 7168, 16384}; every scale layout, fp8 and int8, bf16 input
everywhere and fp16/fp32 on the smaller shapes, extra group sizes, strided rows (16-byte aligned and
not), outputs poisoned and surrounded by guard bytes. Rows are independent, so for M >= 1000 the CPU
reference checks a sample of rows (first, last, random) while the kernel computes all of them; every
row is still checked for guard bytes and padding. Inputs plant non-finite values (tests/test_fused_cpu.py
generators), so poisoned groups are covered in the same runs.

Also: CUDA-graph capture, torch.compile(fullgraph=True), and FP8GatedMLP on the GPU against the unfused
composition on the same backends.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch

from cases import FP8, INT8, make_strided
from conftest import POISON_BYTE, assert_bitwise_equal, poison_
from fp8linear.fused import rmsnorm_quant, silu_and_mul_quant, silu_and_mul_reference
from fp8linear.layouts import empty_scales, tma_aligned_rows
from test_fused_cpu import assert_equal_nan_as_nan, make_rms_input, make_silu_input

# gpu: skipped without CUDA; kernels_built (conftest): build and load the kernels once, or fail loudly.
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("kernels_built")]

LAYOUT_DTYPES = [("row", FP8), ("row", INT8), ("col", FP8), ("col", INT8), ("ue8m0_packed", FP8)]
SAMPLE_ABOVE = 1000  # rows above which the CPU reference checks a sample
GUARD = 64  # bytes before and after q


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------

class Case(NamedTuple):
    M: int
    width: int  # I for silu_and_mul, H for rmsnorm
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    layout: str
    group_size: int = 128
    row_pad: int = 0  # extra elements per row of x (strided view)
    offset: int = 0  # x's first column within its padded row (0: 16-byte aligned when row_pad allows)
    normed: bool = False  # rmsnorm: also write the normalized row

    def id(self) -> str:
        d = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.in_dtype]
        o = "fp8" if self.out_dtype == FP8 else "int8"
        s = f"M{self.M}-W{self.width}-{d}-{o}-{self.layout}-g{self.group_size}"
        if self.row_pad:
            s += f"-pad{self.row_pad}+{self.offset}"
        return s + ("-normed" if self.normed else "")


def silu_cases() -> list[Case]:
    cases = []
    for M in (0, 1, 3, 17, 128, 1000, 4096):
        for I in (128, 1408, 14336):
            for layout, out in LAYOUT_DTYPES:
                cases.append(Case(M, I, torch.bfloat16, out, layout))
                if M <= 128 and I <= 1408:  # fp16/fp32 where the CPU reference stays quick
                    cases.append(Case(M, I, torch.float16, out, layout))
                    cases.append(Case(M, I, torch.float32, out, layout))
    for g in (16, 32, 64, 256):  # every group size: I = 1536 divides by all of them
        for dtype in (torch.bfloat16, torch.float32):
            cases.append(Case(33, 1536, dtype, FP8, "ue8m0_packed" if g == 32 else "col", g))
    for row_pad, offset in ((8, 0), (8, 3), (24, 8)):  # aligned strided rows (vector loads) and not
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            cases.append(Case(130, 1408, dtype, FP8, "col", 128, row_pad, offset))
            cases.append(Case(17, 256, dtype, INT8, "row", 64, row_pad, offset))
    return cases


def rms_cases() -> list[Case]:
    cases = []
    for M in (0, 1, 3, 17, 128, 1000, 4096):
        for H in (128, 144, 2064, 4096, 7168, 16384):
            g = 16 if H in (144, 2064) else 128
            for i, (layout, out) in enumerate(LAYOUT_DTYPES):
                normed = (i + M) % 2 == 0
                cases.append(Case(M, H, torch.bfloat16, out, layout, g, normed=normed))
                if M <= 128 and H <= 7168:
                    cases.append(Case(M, H, torch.float16, out, layout, g, normed=not normed))
                    cases.append(Case(M, H, torch.float32, out, layout, g, normed=normed))
    for g in (16, 32, 64, 256):
        cases.append(Case(9, 4096, torch.bfloat16, FP8, "col", g, normed=True))
        cases.append(Case(9, 16384, torch.float32, INT8, "row", g, normed=True))
    for row_pad, offset in ((8, 0), (8, 3), (24, 8)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            cases.append(Case(33, 4096, dtype, FP8, "col", 128, row_pad, offset, normed=True))
    return cases


SILU_CASES = silu_cases()
RMS_CASES = rms_cases()


# ------------------------------------------------------------------------------------------------
# guarded, poisoned outputs
# ------------------------------------------------------------------------------------------------

class Guarded(NamedTuple):
    buffer: torch.Tensor  # uint8, the whole allocation, poisoned
    view: torch.Tensor  # what the kernel writes


def guarded(shape: tuple[int, int], dtype: torch.dtype, offset: int = GUARD) -> Guarded:
    n = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    buffer = poison_(torch.empty(n + offset + GUARD, dtype=torch.uint8, device="cuda"))
    view = buffer[offset:offset + n].view(dtype).view(shape)
    return Guarded(buffer, view)


def guarded_scales(M: int, G: int, layout: str) -> Guarded:
    s = poison_(empty_scales((), M, G, layout, "cuda"))
    return Guarded(torch.empty(0, dtype=torch.uint8, device="cuda").set_(s.untyped_storage()), s)


def check_guards(q: Guarded, s: Guarded, layout: str, name: str) -> None:
    """Nothing outside q's view and the scale rows 0..M-1 was written (DESIGN.md "Scale layouts")."""
    start = q.view.data_ptr() - q.buffer.data_ptr()
    n = q.view.numel() * q.view.element_size()
    assert bool(q.buffer[:start].eq(POISON_BYTE).all()) and bool(q.buffer[start + n:].eq(POISON_BYTE).all()), \
        f"{name}: bytes written outside q"
    M = s.view.shape[0]
    if layout != "row" and M:
        M_pad = tma_aligned_rows(M)
        cols = s.view.shape[1]
        storage = s.buffer.view(torch.int32).view(cols, M_pad)
        assert bool(storage[:, M:].view(torch.uint8).eq(POISON_BYTE).all()), f"{name}: padding rows written"


def sample_rows(M: int, seed: int) -> torch.Tensor:
    if M <= SAMPLE_ABOVE:
        return torch.arange(M)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.cat([torch.arange(64), torch.arange(M - 64, M), torch.randint(0, M, (128,), generator=gen)])
    return torch.unique(picks)


@functools.lru_cache(maxsize=8)  # the grids reuse each input for every layout; kernels never write x
def make_on_gpu(make, M: int, *args, **kwargs):
    """The tests/test_fused_cpu.py generators, run on the CPU in row blocks for big M (same values as one
    call would give only for M <= 1000; beyond, each block has its own seed), then moved."""
    if M <= SAMPLE_ABOVE:
        out = make(M, *args, **kwargs)
        return tuple(t.cuda() for t in out) if isinstance(out, tuple) else out.cuda()
    seed = kwargs.pop("seed", 0)
    blocks = [make(min(1024, M - r), *args, seed=seed + r, **kwargs) for r in range(0, M, 1024)]
    if isinstance(blocks[0], tuple):  # rmsnorm: (x, weight); one weight for all rows
        return torch.cat([b[0] for b in blocks]).cuda(), blocks[0][1].cuda()
    return torch.cat(blocks).cuda()


# ------------------------------------------------------------------------------------------------
# bit-exactness
# ------------------------------------------------------------------------------------------------

def run_silu(case: Case) -> None:
    M, I, g = case.M, case.width, case.group_size
    x = make_on_gpu(make_silu_input, M, I, case.in_dtype, seed=M + I, group_size=g)
    if case.row_pad:
        x = make_strided(x, case.row_pad, case.offset)
    G = I // g
    pow2 = case.layout == "ue8m0_packed" or (case.out_dtype == INT8 and M % 2 == 1)
    q = guarded((M, I), case.out_dtype, GUARD + (3 if case.row_pad else 0))  # unaligned q once in a while
    s = guarded_scales(M, G, case.layout)
    silu_and_mul_quant(x, g, case.out_dtype, scale_layout=case.layout, scale_ue8m0=pow2, out=q.view, scale_out=s.view)
    torch.cuda.synchronize()
    check_guards(q, s, case.layout, case.id())
    if M == 0:
        return
    rows = sample_rows(M, M)
    q_ref, s_ref = silu_and_mul_quant(x[rows.cuda()].cpu(), g, case.out_dtype, scale_layout=case.layout,
                                      scale_ue8m0=pow2)
    assert_bitwise_equal(q.view.cpu()[rows], q_ref, f"{case.id()} q")
    assert_bitwise_equal(s.view.cpu().contiguous()[rows], s_ref.contiguous(), f"{case.id()} scales")


def run_rms(case: Case) -> None:
    M, H, g = case.M, case.width, case.group_size
    x, w = make_on_gpu(make_rms_input, M, H, case.in_dtype, seed=M + H)
    if case.row_pad:
        x = make_strided(x, case.row_pad, case.offset)
    G = H // g
    pow2 = case.layout == "ue8m0_packed"
    q = guarded((M, H), case.out_dtype, GUARD + (3 if case.row_pad else 0))
    s = guarded_scales(M, G, case.layout)
    # 4 bytes past the guard: element-aligned for every input dtype (fp32 too), never 16-byte aligned.
    y = guarded((M, H), case.in_dtype, GUARD + (4 if case.row_pad else 0)) if case.normed else None
    rmsnorm_quant(x, w, 1e-5, g, case.out_dtype, scale_layout=case.layout, scale_ue8m0=pow2,
                  return_normed=case.normed, out=q.view, scale_out=s.view, normed_out=None if y is None else y.view)
    torch.cuda.synchronize()
    check_guards(q, s, case.layout, case.id())
    if y is not None:
        check_guards(y, s, "row", f"{case.id()} normed")
    if M == 0:
        return
    rows = sample_rows(M, M)
    ref = rmsnorm_quant(x[rows.cuda()].cpu(), w.cpu(), 1e-5, g, case.out_dtype, scale_layout=case.layout,
                        scale_ue8m0=pow2, return_normed=True)
    assert_bitwise_equal(q.view.cpu()[rows], ref[0], f"{case.id()} q")
    assert_bitwise_equal(s.view.cpu().contiguous()[rows], ref[1].contiguous(), f"{case.id()} scales")
    if y is not None:
        assert_equal_nan_as_nan(y.view.cpu()[rows], ref[2], f"{case.id()} normed")


@pytest.mark.parametrize("case", SILU_CASES, ids=Case.id)
def test_silu_and_mul_quant(case):
    run_silu(case)


@pytest.mark.parametrize("case", RMS_CASES, ids=Case.id)
def test_rmsnorm_quant(case):
    run_rms(case)


def test_repeatable():
    """Two runs give the same bytes (a race or an uninitialised read would show here first)."""
    x = make_silu_input(1000, 14336, torch.bfloat16, seed=1).cuda()
    a = silu_and_mul_quant(x, 128, scale_layout="col")
    b = silu_and_mul_quant(x, 128, scale_layout="col")
    assert_bitwise_equal(a[0], b[0], "q")
    assert_bitwise_equal(a[1].contiguous(), b[1].contiguous(), "s")
    x, w = make_rms_input(1000, 7168, torch.bfloat16, seed=2)
    a = rmsnorm_quant(x.cuda(), w.cuda(), return_normed=True)
    b = rmsnorm_quant(x.cuda(), w.cuda(), return_normed=True)
    for i, name in enumerate(("q", "s", "normed")):
        assert_equal_nan_as_nan(a[i].cpu(), b[i].cpu(), name) if i == 2 else assert_bitwise_equal(a[i], b[i], name)


# ------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile
# ------------------------------------------------------------------------------------------------

def test_cuda_graph_capture():
    x = make_silu_input(16, 1408, torch.bfloat16, seed=3).cuda()
    h, w = (t.cuda() for t in make_rms_input(16, 4096, torch.bfloat16, seed=4))
    q1 = torch.empty(16, 1408, dtype=FP8, device="cuda")
    s1 = empty_scales((), 16, 11, "col", "cuda")
    q2 = torch.empty(16, 4096, dtype=FP8, device="cuda")
    s2 = empty_scales((), 16, 32, "col", "cuda")
    y2 = torch.empty_like(h)

    def step():
        silu_and_mul_quant(x, 128, scale_layout="col", out=q1, scale_out=s1)
        rmsnorm_quant(h, w, 1e-6, scale_layout="col", return_normed=True, out=q2, scale_out=s2, normed_out=y2)

    step()  # warm-up outside capture (first-call allocations, occupancy queries)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(make_silu_input(16, 1408, torch.bfloat16, seed=5).cuda())
    h.copy_(make_rms_input(16, 4096, torch.bfloat16, seed=6)[0].cuda())
    graph.replay()
    torch.cuda.synchronize()
    q1_ref, s1_ref = silu_and_mul_quant(x.cpu(), 128, scale_layout="col")
    q2_ref, s2_ref, y2_ref = rmsnorm_quant(h.cpu(), w.cpu(), 1e-6, scale_layout="col", return_normed=True)
    assert_bitwise_equal(q1, q1_ref, "graph silu q")
    assert_bitwise_equal(s1.contiguous(), s1_ref.contiguous(), "graph silu s")
    assert_bitwise_equal(q2, q2_ref, "graph rms q")
    assert_bitwise_equal(s2.contiguous(), s2_ref.contiguous(), "graph rms s")
    assert_equal_nan_as_nan(y2.cpu(), y2_ref, "graph rms normed")


def test_torch_compile_fullgraph():
    def f(x, h, w):
        q1, s1 = silu_and_mul_quant(x, 128, scale_layout="col")
        q2, s2, y2 = rmsnorm_quant(h, w, 1e-6, scale_layout="ue8m0_packed", return_normed=True)
        return q1, s1, q2, s2, y2

    x = make_silu_input(8, 1408, torch.bfloat16, seed=7, specials=False).cuda()
    h, w = (t.cuda() for t in make_rms_input(8, 4096, torch.bfloat16, seed=8, specials=False))
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, h, w)
    want = f(x, h, w)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.stride() == b.stride(), (i, a.stride(), b.stride())
        assert_bitwise_equal(a.contiguous(), b.contiguous(), f"compiled output {i}")


# ------------------------------------------------------------------------------------------------
# FP8GatedMLP on the GPU
# ------------------------------------------------------------------------------------------------

def _mlp(H: int, I: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act="silu")).to("cuda", torch.bfloat16)


@pytest.mark.parametrize("backend", ["auto", "triton", "cublas", "deepgemm"])
@pytest.mark.parametrize("M", [1, 7, 64, 300])
def test_mlp_equals_composition(backend, M):
    """Fused = down_proj(silu_and_mul_reference(gate_up_proj(x))) on the same backend, bit for bit (the
    reference activation runs as torch ops on the GPU: IEEE fp32 ops, the same spec); and close to the
    unfused FP8 MLP with HF's activation."""
    from fp8linear import backends
    from fp8linear.linear import FP8Linear
    from fp8linear.mlp import FP8GatedMLP

    H, I = 1024, 2816
    if backend != "auto":
        why = backends.unsupported_reason(backend, M, 2 * I, H, FP8, torch.device("cuda"))
        why = why or backends.unsupported_reason(backend, M, H, I, FP8, torch.device("cuda"))
        if why:
            pytest.skip(f"backend {backend} cannot serve this MLP: {why}")
    mlp = _mlp(H, I)
    fused_mlp = FP8GatedMLP.from_mlp(mlp, backend=backend)
    x = torch.randn(M, H, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        y = fused_mlp(x)
        h = fused_mlp.gate_up_proj(x)
        expected = fused_mlp.down_proj(silu_and_mul_reference(h))
        assert_bitwise_equal(y, expected, "fused vs composition")
        gate, up, down = (FP8Linear.from_linear(m, backend=backend) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        unfused = down(torch.nn.functional.silu(gate(x)) * up(x))
        exact = mlp(x)
    err = lambda a: ((a.float() - exact.float()).norm() / exact.float().norm()).item()  # noqa: E731
    assert err(y) < 0.1 and abs(err(y) - err(unfused)) < 0.01, (err(y), err(unfused))
    # The merged GEMM is gate's and up's GEMM; equal bits unless the backend tiles N=2I differently.
    halves = torch.cat([gate(x), up(x)], dim=-1)
    assert torch.allclose(h.float(), halves.float(), rtol=2**-7, atol=1e-3)


def test_mlp_cuda_graph():
    from fp8linear.mlp import FP8GatedMLP

    fused_mlp = FP8GatedMLP.from_mlp(_mlp(1024, 2816))
    x = torch.randn(4, 1024, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        eager = fused_mlp(x)  # warm-up: picks the backend for M = 4, prepares weights
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_mlp(x)
        graph.replay()
        torch.cuda.synchronize()
    assert_bitwise_equal(out, eager, "graph MLP")
