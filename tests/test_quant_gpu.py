"""The CUDA kernel of per_token_group_quant against the CPU path (fp8linear.reference), byte for byte.

The oracle is the same public function on a CPU copy of the input: `per_token_group_quant(x.cpu(), ...)`
runs `fp8linear.reference`, which tests/test_quant_cpu.py checks against a naive implementation.

Every GPU call writes into poisoned buffers (conftest.poison_, 0x7F bytes) that sit inside a larger
poisoned allocation, and the whole allocation is compared: the outputs must equal the reference, and the
guard bytes around them and the padding rows of `col`/`ue8m0_packed` scales must still be poison
(never written). Inputs: per-group magnitudes 10**uniform(-3, 3), plus planted groups (all zeros, -0.0,
the max at an odd index, NaN, +Inf, -Inf, values beyond fp16's range and fp32 subnormals where the
input dtype holds them), and strided views whose surroundings hold finite garbage, so a read outside
the view changes an amax.

Grid: every config (input dtype x output dtype x group size x layout x power-of-two scales) on three
small shapes, then a seeded random sample of the cross product M x K x config x view (contiguous,
16-byte aligned slice, unaligned slice) x 2-D/3-D x q offset, sized so that the CPU reference (the cost)
stays short. Then torch.compile, CUDA graphs and opcheck.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import NamedTuple

import pytest
import torch

from cases import FP8, GROUP_SIZES, IN_DTYPES, INT8, LAYOUTS, OUT_DTYPES
from conftest import POISON_BYTE, assert_bitwise_equal, poison_
from fp8linear import per_token_group_quant
from fp8linear.layouts import empty_scales, scale_shape, scale_strides, scales_to_row, unpack_ue8m0

# gpu: skipped without CUDA; kernels_built (conftest): build and load the kernels once, or fail loudly.
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("kernels_built")]

NAN_SCALE_BITS = 0x7FC00000

#: Guard bytes before and after every output buffer (q and the scale storage).
GUARD = 64
#: Finite garbage around strided views: a kernel reading outside the view would see it in its amax.
GARBAGE = 30000.0  # fits fp16


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def make_x(shape: tuple[int, ...], g: int, dtype: torch.dtype, seed: int, specials: bool = True) -> torch.Tensor:
    """Seeded x of `shape` ([M, K] or [E, M, K]) in `dtype` on the CPU, contiguous.

    Each group of g gets randn times 10**uniform(-3, 3) (scales over six decades, not only powers of
    two). With `specials`, distinct random groups are then replaced, as far as there are groups:
    an eighth of them (at most 64) get their |max| (twice the group's amax, random sign) at an odd
    index; one group each: all +0.0, all -0.0, a NaN, a +Inf, a -Inf at a random index; fp32/bf16 get
    a group near 1e30 (beyond fp16) and one near fp32's max; fp32 gets a group of subnormals; fp16 gets
    a group at fp16's max.
    """
    *lead, K = shape
    G = K // g
    n_groups = math.prod(lead) * G
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_groups, g, generator=gen)
    x *= 10.0 ** (torch.rand(n_groups, 1, generator=gen) * 6.0 - 3.0)
    if specials and n_groups:
        order = iter(torch.randperm(n_groups, generator=gen).tolist())

        def rand_index(odd: bool = False) -> int:
            i = int(torch.randint(0, g // 2 if odd else g, (1,), generator=gen))
            return 2 * i + 1 if odd else i

        for grp in itertools.islice(order, min(n_groups // 8, 64)):
            sign = 1.0 if bool(torch.randint(0, 2, (1,), generator=gen)) else -1.0
            x[grp, rand_index(odd=True)] = sign * 2.0 * float(x[grp].abs().max())
        plants = ["zeros", "neg_zeros", "nan", "pos_inf", "neg_inf"]
        if dtype in (torch.float32, torch.bfloat16):
            plants += ["huge", "near_max"]
        if dtype == torch.float32:
            plants += ["subnormal"]
        if dtype == torch.float16:
            plants += ["fp16_max"]
        for name, grp in zip(plants, order):
            if name == "zeros":
                x[grp] = 0.0
            elif name == "neg_zeros":
                x[grp] = -0.0
            elif name == "nan":
                x[grp, rand_index()] = float("nan")
            elif name == "pos_inf":
                x[grp, rand_index()] = float("inf")
            elif name == "neg_inf":
                x[grp, rand_index()] = float("-inf")
            elif name == "huge":
                x[grp] = torch.randn(g, generator=gen) * 1e30
            elif name == "near_max":
                x[grp] = (torch.rand(g, generator=gen) * 2.0 - 1.0) * 3.0e38
            elif name == "subnormal":
                x[grp] = torch.randn(g, generator=gen) * 1e-40
            elif name == "fp16_max":
                x[grp] = (torch.rand(g, generator=gen) * 2.0 - 1.0) * 65504.0
    return x.reshape(shape).to(dtype)


def make_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """x on the GPU as a `view`: "contig"; "aligned" (a column slice of a wider buffer whose base and
    row stride stay 16-byte aligned: the vectorized path); "unaligned" (slice at column 3 of a buffer
    5 columns wider: odd addresses, the scalar path). 3-D slices also get a spare row per batch, so
    the batch stride is not M times the row stride."""
    x = x.cuda()
    if view == "contig":
        return x
    *lead, M, K = x.shape
    if view == "aligned":
        per16 = 16 // x.element_size()
        left, width = per16, K + 3 * per16
    elif view == "unaligned":
        left, width = 3, K + 5
    else:
        raise ValueError(f"view must be 'contig', 'aligned' or 'unaligned'; got {view!r}")
    extra_rows = 1 if lead else 0
    buf = torch.full((*lead, M + extra_rows, width), GARBAGE, dtype=x.dtype, device=x.device)
    out = buf[..., :M, left:left + K]
    out.copy_(x)
    return out


# ------------------------------------------------------------------------------------------------
# guarded, poisoned outputs
# ------------------------------------------------------------------------------------------------

class Guarded(NamedTuple):
    """A view (what the op writes) inside a poisoned buffer (what the test compares whole)."""

    view: torch.Tensor
    buf: torch.Tensor
    offset: int  # storage offset of `view` in `buf`, elements


def guarded_q(shape: tuple[int, ...], dtype: torch.dtype, offset_bytes: int = GUARD) -> Guarded:
    """q (contiguous, `shape`) at byte `offset_bytes` of a poisoned buffer GUARD bytes longer after it.
    offset_bytes % 16 != 0 makes q unaligned (the kernel must then store narrower)."""
    n = math.prod(shape)
    buf = poison_(torch.empty(offset_bytes + n + GUARD, dtype=torch.uint8, device="cuda"))
    q = buf[offset_bytes:offset_bytes + n].view(dtype).view(shape)
    return Guarded(q, buf, offset_bytes)


def guarded_scales(batch: tuple[int, ...], M: int, G: int, layout: str) -> Guarded:
    """Scales with `layout`'s exact shape and strides (what empty_scales allocates, padding rows
    included) at GUARD bytes into a poisoned buffer GUARD bytes longer than that storage."""
    ref = empty_scales(batch, M, G, layout, "cpu")
    elems = ref.untyped_storage().nbytes() // ref.element_size()
    guard = GUARD // ref.element_size()
    buf = poison_(torch.empty(guard + elems + guard, dtype=ref.dtype, device="cuda"))
    s = buf.as_strided(scale_shape(batch, M, G, layout), scale_strides(batch, M, G, layout), guard)
    return Guarded(s, buf, guard)


def expected_buffer(out: Guarded, ref: torch.Tensor) -> torch.Tensor:
    """The poisoned buffer as it must look after the call: `ref` written through the same view."""
    nbytes = out.buf.numel() * out.buf.element_size()
    expected = torch.full((nbytes,), POISON_BYTE, dtype=torch.uint8).view(out.buf.dtype)
    # q's buffer is bytes and q_ref fp8/int8 (both 1 byte): write through a view of ref's dtype.
    expected.view(ref.dtype).as_strided(out.view.shape, out.view.stride(), out.offset).copy_(ref)
    return expected


def assert_outputs(q: Guarded, s: Guarded, q_ref: torch.Tensor, s_ref: torch.Tensor, name: str) -> None:
    """Values first (clear coordinates on a mismatch), then the whole buffers (guards, padding rows)."""
    assert_bitwise_equal(q.view, q_ref, f"{name}: q")
    assert_bitwise_equal(s.view, s_ref, f"{name}: s")
    assert_bitwise_equal(q.buf, expected_buffer(q, q_ref), f"{name}: q buffer (guard bytes must stay poison)")
    assert_bitwise_equal(s.buf, expected_buffer(s, s_ref), f"{name}: scale storage (padding rows and guards must stay poison)")


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------

class Case(NamedTuple):
    shape: tuple[int, ...]  # [M, K] or [E, M, K]
    g: int
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    layout: str
    pow2: bool  # scale_ue8m0 (always True with ue8m0_packed)
    view: str = "contig"
    q_offset: int = GUARD  # byte offset of q in its buffer: not a multiple of 16 -> unaligned q
    eps: float = 1e-10
    seed: int = 0

    def id(self) -> str:
        short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8", INT8: "int8"}
        parts = ["x".join(map(str, self.shape)), f"g{self.g}", short[self.in_dtype], short[self.out_dtype], self.layout]
        if self.pow2 and self.layout != "ue8m0_packed":
            parts.append("pow2")
        if self.view != "contig":
            parts.append(self.view)
        if self.q_offset % 16:
            parts.append(f"qoff{self.q_offset}")
        if self.eps != 1e-10:
            parts.append(f"eps{self.eps:g}")
        return "-".join(parts) + f"-s{self.seed}"


def configs():
    """Every valid (in_dtype, out_dtype, g, layout, pow2): 135. ue8m0_packed is fp8 only and implies pow2."""
    for in_dtype, out_dtype, g, layout in itertools.product(IN_DTYPES, OUT_DTYPES, GROUP_SIZES, LAYOUTS):
        if layout == "ue8m0_packed":
            if out_dtype == FP8:
                yield in_dtype, out_dtype, g, layout, True
            continue
        for pow2 in (False, True):
            yield in_dtype, out_dtype, g, layout, pow2


#: Every config on these. K = 1280: G = 5, 10, 20, 40, 80; K = 1792: G = 7, 14, 28, 56, 112; K = 768:
#: G = 3, 6, 12, 24, 48 (partial packed words at g = 256 and 128), each shape in a different view.
FULL_SHAPES = (
    ((5, 1280), "contig"),  # M_pad = 8: three padding rows
    ((3, 1792), "unaligned"),  # scalar loads, M_pad = 4
    ((2, 3, 768), "aligned"),  # 3-D, strided batches, vector loads
)
FULL_CASES = [
    Case(shape, g, i, o, lay, p, view=view, seed=n)
    for n, ((shape, view), (i, o, g, lay, p)) in enumerate(itertools.product(FULL_SHAPES, configs()))
]

GRID_MS = (0, 1, 3, 4, 5, 17, 128, 1000, 4096)
GRID_KS = (128, 384, 640, 1664, 4096, 7168)
N_RANDOM = 300


def random_cases(n: int = N_RANDOM, seed: int = 2) -> list[Case]:
    """A seeded sample of the grid: M x K x every config valid for K x view x 2-D/3-D x q offset x eps."""
    rng = random.Random(seed)
    all_configs = list(configs())
    cases = []
    for k in range(n):
        M, K = rng.choice(GRID_MS), rng.choice(GRID_KS)
        in_dtype, out_dtype, g, layout, pow2 = rng.choice([c for c in all_configs if K % c[2] == 0])
        view = rng.choice(("contig", "contig", "aligned", "unaligned"))
        batch = rng.choice((2, 3)) if M <= 128 and rng.random() < 0.25 else 0
        q_offset = rng.choice((GUARD, GUARD, GUARD, GUARD + 8, GUARD + 1))
        eps = 1e-2 if rng.random() < 0.1 else 1e-10  # 1e-2 floors the amax of many 1e-3 groups
        shape = ((batch,) if batch else ()) + (M, K)
        cases.append(Case(shape, g, in_dtype, out_dtype, layout, pow2, view, q_offset, eps, seed=1000 + k))
    return cases


RANDOM_CASES = random_cases()


def run_case(case: Case) -> None:
    x_cpu = make_x(case.shape, case.g, case.in_dtype, case.seed)
    x = make_view(x_cpu, case.view)
    *batch, M, K = case.shape
    q = guarded_q(case.shape, case.out_dtype, case.q_offset)
    s = guarded_scales(tuple(batch), M, K // case.g, case.layout)
    kwargs = dict(scale_layout=case.layout, scale_ue8m0=case.pow2, eps=case.eps)
    q_out, s_out = per_token_group_quant(x, case.g, case.out_dtype, out=q.view, scale_out=s.view, **kwargs)
    assert q_out is q.view and s_out is s.view, "the op must return the buffers it was given"
    q_ref, s_ref = per_token_group_quant(x_cpu, case.g, case.out_dtype, **kwargs)
    torch.cuda.synchronize()
    assert_outputs(q, s, q_ref, s_ref, case.id())
    # The input is read-only.
    assert_bitwise_equal(x.cpu(), x_cpu, f"{case.id()}: x was modified")


# ------------------------------------------------------------------------------------------------
# bit-exactness
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", FULL_CASES, ids=Case.id)
def test_every_config(case):
    run_case(case)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=Case.id)
def test_random_grid(case):
    run_case(case)


def _cases_py_grid():
    """The shared GPU grid of tests/cases.py, if that module offers it (it belongs to another test file)."""
    try:
        import cases

        cases.generate_case_input  # the test below needs it: a missing one skips here, not there
        return [pytest.param(c, id=c.id()) for c in cases.enumerate_quant_cases_gpu()]
    except Exception as exc:  # ImportError, or a changed signature: report, do not break collection
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"tests/cases.py grid unavailable: {exc!r}"))]


@pytest.mark.parametrize("case", _cases_py_grid())
def test_cases_py_grid(case):
    from cases import generate_case_input

    x = generate_case_input(case, seed=7, device="cuda")
    *batch, M, K = case.shape
    q = guarded_q(case.shape, case.out_dtype)
    s = guarded_scales(tuple(batch), M, K // case.group_size, case.layout)
    kwargs = dict(scale_layout=case.layout, scale_ue8m0=case.scale_ue8m0)
    per_token_group_quant(x, case.group_size, case.out_dtype, out=q.view, scale_out=s.view, **kwargs)
    q_ref, s_ref = per_token_group_quant(x.cpu(), case.group_size, case.out_dtype, **kwargs)
    assert_outputs(q, s, q_ref, s_ref, case.id())


@pytest.mark.parametrize("G", (1, 2, 3, 4, 5, 6, 7))
@pytest.mark.parametrize("g", (16, 128))
@pytest.mark.parametrize("batch", ((), (2,)))
def test_ue8m0_packed_partial_words(G, g, batch):
    """ue8m0_packed with G % 4 != 0 (the seed kernel's bug): word j holds groups 4j..4j+3, and the bytes
    of groups >= G in a row's last word are 0. E.g. G = 5: word 1 = [e(group 4), 0, 0, 0]. Rows 1..3 of
    M_pad = 4 for M = 1 are padding: still poison afterwards."""
    for M in (1, 5):
        shape = (*batch, M, G * g)
        case = Case(shape, g, torch.bfloat16, FP8, "ue8m0_packed", True, seed=G * 100 + g + M)
        run_case(case)
        # And spelled out: bytes past G decode to 0, bytes below G are exponents of real scales.
        x = make_x(shape, g, torch.bfloat16, seed=1, specials=False).cuda()
        _, s = per_token_group_quant(x, g, FP8, scale_layout="ue8m0_packed")
        words = s.cpu().contiguous()
        exponents = unpack_ue8m0(words, 4 * words.shape[-1]).view(torch.int32) >> 23
        assert bool((exponents[..., G:] == 0).all()), f"bytes past G={G} must be 0; got {exponents[..., G:]}"
        assert bool((exponents[..., :G] > 0).all()), "every real group's exponent byte must be written"


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=("fp8", "int8"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=("bf16", "fp16", "fp32"))
def test_nonfinite_groups(in_dtype, out_dtype, layout):
    """A group holding NaN, +Inf or -Inf is poisoned whole (fp8linear.reference): scale NaN (bits
    0x7FC00000; UE8M0 byte 0xFF), every q byte 0x7F (fp8 NaN) or 0 (int8); its neighbours are untouched."""
    if layout == "ue8m0_packed" and out_dtype == INT8:
        pytest.skip("ue8m0_packed is fp8 only")
    g = 128
    x = make_x((4, 3 * g), g, in_dtype, seed=5, specials=False)
    x[0, 5] = float("nan")  # row 0, group 0, odd index
    x[1, g + 127] = float("inf")  # row 1, group 1, last element
    x[2, 2 * g] = float("-inf")  # row 2, group 2, first element
    bad = {(0, 0), (1, 1), (2, 2)}
    q, s = per_token_group_quant(x.cuda(), g, out_dtype, scale_layout=layout)
    q_ref, s_ref = per_token_group_quant(x, g, out_dtype, scale_layout=layout)
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s, s_ref, "s")
    q_bytes = q.cpu().view(torch.uint8).view(4, 3, g)
    s_row = scales_to_row(s.cpu(), 3, layout)
    for r, j in itertools.product(range(4), range(3)):
        if (r, j) in bad:
            assert bool((q_bytes[r, j] == (0x7F if out_dtype == FP8 else 0)).all()), f"q of bad group {(r, j)}"
            if layout == "ue8m0_packed":  # G = 3: one word per row, group j in byte j
                byte = (int(s.cpu()[r, 0]) >> (8 * j)) & 0xFF
                assert byte == 0xFF, f"UE8M0 byte of bad group {(r, j)}: 0x{byte:02x}"
            else:
                bits = int(s_row[r, j].view(torch.int32))
                assert bits == NAN_SCALE_BITS, f"scale of bad group {(r, j)}: 0x{bits & 0xFFFFFFFF:08x}"
        else:
            assert math.isfinite(float(s_row[r, j])), f"finite group {(r, j)} got scale {s_row[r, j]}"


@pytest.mark.parametrize("view", ("aligned", "unaligned"))
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=("bf16", "fp16", "fp32"))
def test_column_slice_equals_contiguous(in_dtype, view):
    """buf[:, 3:3+K] (unaligned) and an aligned slice quantize exactly like their contiguous copy."""
    x = make_x((17, 640), 128, in_dtype, seed=9)
    xs = make_view(x, view)
    assert not xs.is_contiguous()
    q1, s1 = per_token_group_quant(xs, 128, FP8, scale_layout="col")
    q2, s2 = per_token_group_quant(xs.contiguous(), 128, FP8, scale_layout="col")
    assert_bitwise_equal(q1, q2, "q")
    assert_bitwise_equal(s1, s2, "s")


def test_row_stride_zero():
    """A broadcast row (stride 0) is a legal input: every row quantizes like the first."""
    row = make_x((1, 1024), 128, torch.bfloat16, seed=3).cuda()
    x = row.expand(6, 1024)
    q, s = per_token_group_quant(x, 128, FP8, scale_layout="col")
    q1, s1 = per_token_group_quant(row, 128, FP8)
    for r in range(6):
        assert_bitwise_equal(q[r], q1[0], f"q row {r}")
        assert_bitwise_equal(s[r], s1[0], f"s row {r}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ((0, 256), (2, 0, 256)))
def test_empty_writes_nothing(shape, layout):
    """M = 0 (2-D and 3-D): empty outputs of the right shapes, no launch."""
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    q, s = per_token_group_quant(x, 128, FP8, scale_layout=layout)
    assert q.shape == x.shape and q.numel() == 0
    assert s.shape[-2] == 0


def test_two_devices_current_device_differs():
    """x on cuda:0 while cuda:1 is current: the kernel must run on x's device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (x on cuda:0 while another device is current)")
    x = make_x((33, 1024), 128, torch.bfloat16, seed=4)
    with torch.cuda.device(1):
        q, s = per_token_group_quant(x.to("cuda:0"), 128, FP8, scale_layout="col")
    q_ref, s_ref = per_token_group_quant(x, 128, FP8, scale_layout="col")
    assert q.device == torch.device("cuda:0")
    assert_bitwise_equal(q, q_ref, "q")
    assert_bitwise_equal(s, s_ref, "s")


# ------------------------------------------------------------------------------------------------
# torch.compile, CUDA graphs, opcheck
# ------------------------------------------------------------------------------------------------

def _two_call_sites(x: torch.Tensor):
    """Two layouts (and dtypes) from the same input in one function: DeepGEMM-style and Triton-style."""
    q_col, s_col = per_token_group_quant(x, 128, FP8, scale_layout="col")
    q_row, s_row = per_token_group_quant(x, 64, INT8, scale_layout="row", scale_ue8m0=True)
    q_pk, s_pk = per_token_group_quant(x, 128, FP8, scale_layout="ue8m0_packed")
    return q_col, s_col, q_row, s_row, q_pk, s_pk


def test_two_call_sites_agree():
    """The col and packed scales of one input are the row scales in another layout."""
    x = make_x((9, 1024), 128, torch.bfloat16, seed=6).cuda()
    q_col, s_col, _, _, q_pk, s_pk = _two_call_sites(x)
    q_row, s_row = per_token_group_quant(x, 128, FP8, scale_layout="row")
    assert_bitwise_equal(q_col, q_row, "q col vs row")
    assert_bitwise_equal(scales_to_row(s_col, 8, "col"), s_row, "s col vs row")
    _, s_row_pow2 = per_token_group_quant(x, 128, FP8, scale_layout="row", scale_ue8m0=True)
    assert_bitwise_equal(scales_to_row(s_pk, 8, "ue8m0_packed"), s_row_pow2, "s packed vs row pow2")


@pytest.mark.parametrize("M", (4, 37))
def test_torch_compile_fullgraph_same_bytes(M):
    """torch.compile(fullgraph=True) of a function calling the op at two call sites: same bytes and the
    same scale strides as eager (the GEMMs read the strides)."""
    torch._dynamo.reset()
    compiled = torch.compile(_two_call_sites, fullgraph=True)
    for seed in (11, 12):  # the second call reuses the compiled graph on fresh input
        x = make_x((M, 1024), 128, torch.bfloat16, seed=seed).cuda()
        eager = _two_call_sites(x)
        got = compiled(x)
        for name, a, e in zip(("q_col", "s_col", "q_row", "s_row", "q_pk", "s_pk"), got, eager):
            assert_bitwise_equal(a, e, f"compiled {name}")
            assert a.stride() == e.stride(), f"compiled {name}: strides {a.stride()} != eager {e.stride()}"


def test_cuda_graph_replay_fresh_inputs():
    """Capture both an out= call (two layouts into preallocated buffers) and an allocating call; replay
    on fresh data copied into the static input; every replay matches the CPU reference."""
    shape, g = (16, 7168), 128
    static_x = make_x(shape, g, torch.bfloat16, seed=20).cuda()
    q_col, s_col = torch.empty(shape, dtype=FP8, device="cuda"), empty_scales((), 16, 56, "col", "cuda")
    q_pk, s_pk = torch.empty(shape, dtype=FP8, device="cuda"), empty_scales((), 16, 56, "ue8m0_packed", "cuda")

    def body():
        per_token_group_quant(static_x, g, FP8, scale_layout="col", out=q_col, scale_out=s_col)
        per_token_group_quant(static_x, g, FP8, scale_layout="ue8m0_packed", out=q_pk, scale_out=s_pk)
        return per_token_group_quant(static_x, g, INT8, scale_layout="row")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside capture (allocator, first-launch work)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_int8, s_int8 = body()

    for seed in (21, 22, 23):
        fresh = make_x(shape, g, torch.bfloat16, seed=seed)
        static_x.copy_(fresh)
        for t in (q_col, s_col, q_pk, s_pk, q_int8, s_int8):
            poison_(t)
        graph.replay()
        torch.cuda.synchronize()
        for (q, s), (dtype, layout) in zip(
            ((q_col, s_col), (q_pk, s_pk), (q_int8, s_int8)), ((FP8, "col"), (FP8, "ue8m0_packed"), (INT8, "row"))
        ):
            q_ref, s_ref = per_token_group_quant(fresh, g, dtype, scale_layout=layout)
            assert_bitwise_equal(q, q_ref, f"replay seed {seed} {layout}: q")
            assert_bitwise_equal(s, s_ref, f"replay seed {seed} {layout}: s")


def _opcheck_samples():
    samples = []
    for shape, layout, out_dtype, pow2 in (
        ((5, 640), "row", FP8, False),
        ((5, 640), "col", INT8, True),
        ((3, 1024), "ue8m0_packed", FP8, True),
        ((2, 5, 640), "col", INT8, False),
    ):
        samples.append(pytest.param(shape, layout, out_dtype, pow2, id=f"{'x'.join(map(str, shape))}-{layout}"))
    return samples


@pytest.mark.parametrize("shape, layout, out_dtype, pow2", _opcheck_samples())
def test_opcheck_cuda(shape, layout, out_dtype, pow2):
    """torch.library.opcheck on the op itself with CUDA tensors: schema (mutates exactly q and s), fake,
    and AOT dispatch."""
    x = make_x(shape, 128, torch.bfloat16, seed=30).cuda()
    *batch, M, K = shape
    q = torch.empty(shape, dtype=out_dtype, device="cuda")
    s = empty_scales(tuple(batch), M, K // 128, layout, "cuda")
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if out_dtype == FP8:
        # SchemaCheckMode compares tensors before and after with allclose, whose arithmetic torch lacks
        # for fp8 ('"mul_cpu_reduced_float" not implemented for Float8_e4m3fn' on CPU, torch 2.13); the
        # int8 samples run the schema test on the same kernel.
        tests = tests[1:]
    torch.library.opcheck(
        torch.ops.fp8linear.per_token_group_quant_.default, (x, q, s, 128, pow2, 1e-10, layout), test_utils=tests
    )


# ------------------------------------------------------------------------------------------------
# Programmatic dependent launch (kernels/launch_utils.h): the kernel may start before the kernel ahead
# of it has finished, and must still read that kernel's output and never overwrite what it reads.
# ------------------------------------------------------------------------------------------------

def test_launch_after_a_producer_and_before_a_consumer_in_one_stream():
    """No synchronisation in the loop: a torch kernel writes x right before the quant reads it (read
    after write), and a torch kernel reads q right before the next quant's q, allocated from the block
    the freed q left, is written (write after read). Every result equals the CPU reference."""
    base = make_x((256, 4096), 128, torch.bfloat16, seed=30, specials=False).cuda()
    xs, scales, sums = [], [], []
    for i in range(24):
        x = base * float(i % 7 + 1)  # producer
        q, s = per_token_group_quant(x, 128, FP8, scale_layout="col")
        sums.append(q.view(torch.uint8).to(torch.int32).sum(dim=1))  # consumer of q
        xs.append(x)
        scales.append(s)
        del q  # its block goes back to the allocator, for the next iteration's q
    torch.cuda.synchronize()
    for i, (x, s, total) in enumerate(zip(xs, scales, sums)):
        q_ref, s_ref = per_token_group_quant(x.cpu(), 128, FP8, scale_layout="col")
        assert_bitwise_equal(s, s_ref, f"iteration {i}: s")
        expected = q_ref.view(torch.uint8).to(torch.int32).sum(dim=1)
        assert_bitwise_equal(total.cpu(), expected, f"iteration {i}: row sums of q read by the next kernel")
