"""The fused small-M op `fp8linear::small_m_linear` and the `small_m` backend on the GPU (decode, M <= 16).

The oracle: the CPU op (checked against an emulation in test_small_m.py) on the same inputs, with
test_backends_gpu.py's metric ||y - ref|| / ||ref|| <= 1e-2 and, stricter, max |y - ref| <= 2e-2 *
max |ref|: the kernel quantizes x bit-exactly like the reference, so only the tensor-core accumulation
order and the output rounding differ, and no single element may be off by more than rounding. Inputs
from small_m_cases.py. Also strided and misaligned rows, non-finite groups, determinism, split-K launches
on two streams and in a CUDA graph, torch.compile, opcheck, and the backend inside FP8Linear.
"""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

from conftest import assert_bitwise_equal, poison_allocator
from fp8linear import FP8Linear, backends
from fp8linear.backends import small_m
from fp8linear.backends import BackendUnsupportedError
from small_m_cases import (BF16, FP8, FP16, FP32, GROUP, INT8, make_bias, make_weight, make_x, op, opcheck_args,
                           opcheck_tests)

REL_TOL = 1e-2  # tests/test_backends_gpu.py: ||y - ref|| / ||ref||
MAX_ABS_TOL = 2e-2  # max |y - ref| <= MAX_ABS_TOL * max |ref|: accumulation order and output rounding only


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA op against the CPU op
# ------------------------------------------------------------------------------------------------

def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def assert_close_gpu(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """test_backends_gpu.py's relative error, and no element off by more than MAX_ABS_TOL * max |ref|."""
    y, ref = y.cpu(), ref.cpu()
    assert y.shape == ref.shape and y.dtype == ref.dtype, (
        f"{what}: {y.dtype} {list(y.shape)} vs {ref.dtype} {list(ref.shape)}")
    assert torch.isfinite(y).all(), f"{what}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    err = _rel_err(y, ref)
    assert err <= REL_TOL, f"{what}: relative error {err:.3g} > {REL_TOL}"
    diff = (y.float() - ref.float()).abs()
    bound = MAX_ABS_TOL * ref.float().abs().max().item()
    if diff.numel() and diff.max().item() > bound:
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(f"{what}: max |y - ref| = {diff.max().item():.4g} at {idx} (y {y[idx].item():.4g}, "
                             f"ref {ref[idx].item():.4g}) > {MAX_ABS_TOL} * max |ref| = {bound:.4g}")


GPU_MS = (1, 2, 3, 5, 8, 9, 15, 16)  # around the MMA tiles (8, 16) and the 4-row padding of other backends
GPU_NK = (
    (16, 128),  # one partial weight block, one group
    (112, 640),  # N < 128; G = 5
    (200, 1664),  # a partial second N block; G = 13
    (1024, 4096),  # a GQA k/v projection: 64 row blocks, split K 4 ways (kernels/small_m_linear.cu)
    (2112, 7168),  # DeepSeek-V3 q_a/kv_a projection: 16.5 N blocks, G = 56; 132 row blocks: split K
    (4096, 4096),  # Llama-class square layer
    (7168, 7168),  # N and K >= 7168: x quantized ahead from M = 1 (kernels/small_m_linear.cu)
    (4160, 256),  # many N blocks, the last half full; short K (two groups)
    (8336, 256),  # N / 32 >= the SM count: 32-row blocks at M > 8 (fewer N: 16-row), the last one partial
)
BIAS_DTYPES = (None, BF16, FP32)


def _gpu_grid():
    """Every (M, N, K, dtype) once; the remaining options (x dtype, bias dtype, power-of-two scales: 18
    combinations) dealt out over a seeded shuffle of the 64 (M, N, K) of each dtype, so each combination
    runs three or four times per dtype at unrelated shapes. The full product (2304) would run for minutes
    on the CPU oracle alone."""
    rng = random.Random(0)
    options = list(itertools.product((BF16, FP16, FP32), BIAS_DTYPES, (False, True)))
    short = {BF16: "bf16", FP16: "fp16", FP32: "fp32", None: "none"}
    cases = []
    for dtype in (FP8, INT8):
        shapes = list(itertools.product(GPU_MS, GPU_NK))
        rng.shuffle(shapes)
        for i, (M, (N, K)) in enumerate(shapes):
            x_dtype, bias_dtype, pow2 = options[i % len(options)]
            cases.append(pytest.param(
                M, N, K, dtype, x_dtype, bias_dtype, pow2,
                id=f"{M}x{N}x{K}-{'fp8' if dtype == FP8 else 'int8'}-x{short[x_dtype]}-bias{short[bias_dtype]}"
                   f"{'-pow2' if pow2 else ''}",
            ))
    cases.sort(key=lambda p: (p.values[1], p.values[2]))  # weights of one shape together (cache below)
    return cases


@functools.lru_cache(maxsize=None)
def _cpu_weight(N: int, K: int, dtype: torch.dtype, pow2: bool):
    return make_weight(N, K, dtype, scale_ue8m0=pow2, seed=N + K)


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("M,N,K,dtype,x_dtype,bias_dtype,pow2", _gpu_grid())
def test_cuda_op_matches_cpu_op(M, N, K, dtype, x_dtype, bias_dtype, pow2):
    weight, weight_scale_inv = _cpu_weight(N, K, dtype, pow2)
    x = make_x(M, K, x_dtype, seed=M * 7 + N + K)
    bias = make_bias(N, bias_dtype)
    ref = op(x, weight, weight_scale_inv, bias, pow2)
    args = [t.cuda() if t is not None else None for t in (x, weight, weight_scale_inv, bias)]
    poison_allocator()
    y = op(*args, pow2)
    assert y.device.type == "cuda" and y.shape == (M, N) and y.dtype == x_dtype
    assert_close_gpu(y, ref, f"M={M} N={N} K={K} {dtype} x {x_dtype} bias {bias_dtype} pow2={pow2}")


def _cuda_case(M, N, K, dtype=FP8, x_dtype=BF16, bias_dtype=BF16, seed=0):
    """(x, weight, weight_scale_inv, bias) on the GPU, from the CPU generators."""
    weight, weight_scale_inv = _cpu_weight(N, K, dtype, False)
    x = make_x(M, K, x_dtype, seed=seed)
    bias = make_bias(N, bias_dtype)
    return [t.cuda() if t is not None else None for t in (x, weight, weight_scale_inv, bias)]


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("x_dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("M,N,K", [(1, 200, 1664), (5, 4096, 4096), (16, 2112, 7168)])
def test_cuda_strided_and_misaligned_rows(M, N, K, x_dtype):
    """Rows of a wider buffer (row stride K + 128, still 16-byte aligned) and rows starting one element in
    (x = buf[:, 1:K+1] of a [M, K + 8] buffer: base pointer not 16-byte aligned, last dim contiguous) give
    exactly x.contiguous()'s answer. The buffers' other columns hold large finite garbage, so a read outside
    the view would change a group's amax."""
    x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, x_dtype=x_dtype, seed=21)
    want = op(x, weight, weight_scale_inv, bias)

    big = torch.full((M, K + GROUP), 3e4, dtype=x_dtype, device="cuda")
    big[:, :K] = x
    strided = big[:, :K]
    assert strided.stride() == (K + GROUP, 1)
    assert_bitwise_equal(op(strided, weight, weight_scale_inv, bias), want, "strided rows")

    buf = torch.full((M, K + 8), 3e4, dtype=x_dtype, device="cuda")
    buf[:, 1:K + 1] = x
    misaligned = buf[:, 1:K + 1]
    assert misaligned.data_ptr() % 16 != 0 and misaligned.stride(-1) == 1
    assert_bitwise_equal(op(misaligned, weight, weight_scale_inv, bias), want, "misaligned rows")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize(
    "M,row,group,value",
    [
        (5, 2, 1, float("nan")),  # a middle row and group
        (16, 15, -1, float("inf")),  # the last row of a full tile, the last group
        (9, 0, 0, float("-inf")),  # the first row and group, M past one 8-row tile
        (1, 0, 3, float("nan")),  # decode: the only row
    ],
)
def test_cuda_nonfinite_group_poisons_its_row(dtype, M, row, group, value):
    N, K = 2112, 4096  # 132 row blocks: the launch splits K (kernels/small_m_linear.cu)
    x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, dtype, seed=22)
    clean = op(x, weight, weight_scale_inv, bias)
    bad = x.clone()
    bad[row, (group % (K // GROUP)) * GROUP + 5] = value
    y = op(bad, weight, weight_scale_inv, bias)
    nan_count = int(torch.isnan(y[row]).sum())
    assert nan_count == N, f"row {row}: {nan_count} of {N} outputs NaN, expected all"
    others = [r for r in range(M) if r != row]
    if others:
        assert torch.isfinite(y[others]).all(), "a non-finite group leaked into other rows"
        assert_bitwise_equal(y[others], clean[others], "rows without the non-finite group")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("M,N,K", [(9, 2112, 7168), (16, 4096, 4096)])
def test_cuda_deterministic(M, N, K, dtype):
    """Two calls on the same input are bit-identical (no split-K atomics or other order races)."""
    x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, dtype, seed=23)
    first = op(x, weight, weight_scale_inv, bias)
    for _ in range(2):
        assert_bitwise_equal(op(x, weight, weight_scale_inv, bias), first, "second call")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("x_dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [4, 9, 13, 16])
def test_cuda_quantized_ahead_equals_in_kernel(M, x_dtype, dtype):
    """From M = 4 (on weights of at least 2^23 elements) x is quantized once by the quant kernel ahead of the
    GEMV; below, each block quantizes it. A token's output depends on no other token, so rows of an M >= 4
    call equal, bit for bit, the same rows computed in calls of at most 3 (N = K = 4096: no launch splits K,
    so the sums add in the same order)."""
    x, weight, weight_scale_inv, bias = _cuda_case(M, 4096, 4096, dtype, x_dtype=x_dtype, seed=25)
    whole = op(x, weight, weight_scale_inv, bias)
    parts = torch.cat([op(x[i:i + 3], weight, weight_scale_inv, bias) for i in range(0, M, 3)])
    assert_bitwise_equal(whole, parts, f"M={M} against calls of at most 3 rows")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_split_launches_in_turn_on_two_streams_and_in_a_graph():
    """Split-K launches count their splits in a per-stream buffer that each launch leaves cleared (a launch
    captured into a CUDA graph gets its own, zeroed by a memset node): launches of shapes with different split
    counts in turn, on two streams at once and replayed from a CUDA graph each give the bits of the same call
    made alone."""
    shapes = [(16, 2112, 7168), (1, 1024, 4096), (9, 1024, 8192), (3, 2112, 4096)]  # all split K
    cases = [_cuda_case(M, N, K, FP8, seed=24 + i) for i, (M, N, K) in enumerate(shapes)]
    alone = [op(*case) for case in cases]
    for _ in range(2):
        for (M, N, K), case, want in zip(shapes, cases, alone):
            assert_bitwise_equal(op(*case), want, f"{M}x{N}x{K} in turn")
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    got = []
    for stream in streams:
        with torch.cuda.stream(stream):
            got.append([op(*case) for case in cases for _ in range(2)])
    torch.cuda.synchronize()
    for ys in got:
        for i, y in enumerate(ys):
            M, N, K = shapes[i // 2]
            assert_bitwise_equal(y, alone[i // 2], f"{M}x{N}x{K} on a second stream")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(*cases[0])  # a warm-up on a side stream before capturing, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(*cases[0])
        y2 = op(*cases[2])
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(y, alone[0], "graph replay")
        assert_bitwise_equal(y2, alone[2], "graph replay, second launch")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_empty_batch():
    x, weight, weight_scale_inv, bias = _cuda_case(0, 200, 256)
    for y in (op(x, weight, weight_scale_inv, bias), small_m.small_m_linear(x, weight, weight_scale_inv, bias)):
        assert y.shape == (0, 200) and y.dtype == BF16 and y.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cuda_graph_replay_equals_eager(dtype):
    """Capture one call, replay it on fresh x copied into the static input: bit for bit eager's answer."""
    M, N, K = 5, 2112, 7168
    static_x, weight, weight_scale_inv, bias = _cuda_case(M, N, K, dtype, seed=24)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (kernel load, first-launch work)
        for _ in range(2):
            op(static_x, weight, weight_scale_inv, bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = op(static_x, weight, weight_scale_inv, bias)
    for seed in (25, 26):
        fresh = make_x(M, K, BF16, seed=seed).cuda()
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(static_y, op(fresh, weight, weight_scale_inv, bias), f"replay, seed {seed}")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of a function calling the op (then something after it): eager's bits,
    at two M (the second call exercises the fake with a new or symbolic M)."""
    N, K = 2112, 1664
    _, weight, weight_scale_inv, bias = _cuda_case(1, N, K, FP8)

    def f(x):
        return op(x, weight, weight_scale_inv, bias) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for M, seed in ((3, 27), (16, 28)):
        x = make_x(M, K, BF16, seed=seed).cuda()
        assert_bitwise_equal(compiled(x), f(x), f"compiled y, M={M}")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_opcheck_cuda(dtype):
    torch.library.opcheck(torch.ops.fp8linear.small_m_linear.default, opcheck_args("cuda", dtype),
                          test_utils=opcheck_tests(dtype))


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_cuda_largest_benchmark_layer():
    """N = 28672, K = 8192 at M = 16 (the biggest layer of the benchmark: 235M weight elements): runs and
    matches. The oracle here is the same math on the GPU in fp64 (the CPU op would spend seconds
    dequantizing); the CUDA quantizer it uses is checked byte for byte against the CPU reference in
    tests/test_quant_gpu.py."""
    from fp8linear import per_token_group_quant

    M, N, K = 16, 28672, 8192
    for dtype in (FP8, INT8):
        weight, weight_scale_inv = make_weight(N, K, dtype, seed=29, device="cuda")
        bias = make_bias(N, BF16).cuda()
        x = make_x(M, K, BF16, seed=30).cuda()
        poison_allocator()
        y = op(x, weight, weight_scale_inv, bias)
        assert y.shape == (M, N) and y.dtype == BF16
        q, s = per_token_group_quant(x, GROUP, dtype)
        a = (q.float().double().reshape(M, K // GROUP, GROUP) * s.double().unsqueeze(-1)).reshape(M, K)
        w_scale = weight_scale_inv.double().repeat_interleave(GROUP, 0)[:N].repeat_interleave(GROUP, 1)
        w = weight.float().double() * w_scale  # [N, K] fp64
        del w_scale
        ref = (a @ w.t() + bias.double()).float().to(BF16)
        del w
        assert_close_gpu(y, ref, f"M={M} N={N} K={K} {dtype}")


# ------------------------------------------------------------------------------------------------
# GPU: the backend inside FP8Linear
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("scale_ue8m0", [False, True], ids=["scale", "pow2"])
@pytest.mark.parametrize("dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("lead", [(1,), (7,), (16,), (2, 4)], ids=["M1", "M7", "M16", "2x4"])
def test_fp8linear_small_m_matches_reference(lead, dtype, scale_ue8m0):
    N, K = 2112, 1664
    weight, weight_scale_inv = make_weight(N, K, dtype, scale_ue8m0, seed=31, device="cuda")
    bias = make_bias(N, BF16).cuda()
    mod = FP8Linear.from_quantized(weight, weight_scale_inv, bias, scale_ue8m0=scale_ue8m0, backend="small_m")
    ref = FP8Linear.from_quantized(weight, weight_scale_inv, bias, scale_ue8m0=scale_ue8m0, backend="reference")
    M = 1
    for n in lead:
        M *= n
    x = make_x(M, K, BF16, seed=32).reshape(*lead, K).cuda()
    y = mod(x)
    assert mod._choice[M].NAME == "fused_mma"
    assert y.shape == (*lead, N) and y.dtype == BF16
    assert_close_gpu(y, ref(x), f"FP8Linear small_m {lead} {dtype} pow2={scale_ue8m0}")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernels_built")
def test_fp8linear_small_m_refuses_m17():
    cuda = torch.device("cuda")
    for M in (0, 1, 16):
        assert backends.unsupported_reason("small_m", M, 4096, 4096, FP8, cuda) is None, f"M={M}"
        assert backends.unsupported_reason("small_m", M, 200, 1664, INT8, cuda) is None, f"M={M} int8"
    assert isinstance(backends.unsupported_reason("small_m", 17, 4096, 4096, FP8, cuda), str)
    assert isinstance(backends.unsupported_reason("small_m", 4, 256, 300, FP8, cuda), str)  # K % 128
    assert isinstance(backends.unsupported_reason("small_m", 4, 256, 256, BF16, cuda), str)
    weight, weight_scale_inv = make_weight(256, 256, FP8, device="cuda")
    mod = FP8Linear.from_quantized(weight, weight_scale_inv, backend="small_m")
    assert mod(torch.randn(16, 256, device="cuda", dtype=BF16)).shape == (16, 256)
    with pytest.raises(BackendUnsupportedError, match=r"backend='fused_mma' cannot serve M=17, N=256, K=256"):
        mod(torch.randn(17, 256, device="cuda", dtype=BF16))


@pytest.mark.gpu
def test_small_m_first_call_in_a_fresh_process_loads_the_kernels():
    """FP8Linear's first forward at decode size may be the process's first use of the kernels (auto picks
    small_m for M = 1 and nothing else has loaded them): the backend must build and load them itself.
    In-process tests cannot see this, since an earlier test has loaded them."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    code = (
        "import torch\n"
        "from fp8linear import FP8Linear\n"
        "lin = torch.nn.Linear(256, 128, bias=False, device='cuda', dtype=torch.bfloat16)\n"
        "m = FP8Linear.from_linear(lin, backend='small_m')\n"
        "x = torch.randn(1, 256, device='cuda', dtype=torch.bfloat16)\n"
        "ref = FP8Linear.from_linear(lin, backend='reference').cpu()(x.cpu())\n"
        "y = m(x).cpu()\n"
        "err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()\n"
        "assert err < 1e-2, err\n"
        "print('ok', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
