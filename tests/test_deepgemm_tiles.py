"""DeepGEMM tile configurations measured per card (fp8linear.backends.deepgemm_tiles) and their use by the
deepgemm backend, on CPU: the table, and the override with a stand-in for DeepGEMM's internals. The GPU
half, tiles against DeepGEMM's own pick bit for bit: test_deepgemm_tiles_gpu.py.
"""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

from fp8linear.backends import deepgemm, deepgemm_tiles
from fp8linear.backends.deepgemm_tiles import Tiles

FP8 = torch.float8_e4m3fn


# -- CPU: the table ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("M,expected", [(1, 1), (2, 8), (9, 16), (257, 512), (512, 512), (4096, 4096),
                                        (4097, 16384), (100_000, 16384)])
def test_bucket_is_the_smallest_bound_at_or_above_m(M, expected):
    assert deepgemm_tiles.bucket(M) == expected


def _row(N, K, M_max, tiles):
    return {"N": N, "K": K, "M_max": M_max, "tiles": tiles.as_row() if tiles else None}


def test_lookup_takes_the_row_of_ms_bucket_and_nothing_else():
    wide = Tiles(128, 192, 4, 2, False, "all")
    rows = [_row(2112, 7168, 4096, wide), _row(2112, 7168, 2048, None), _row(4096, 4096, 4096, Tiles(256, 64, 4, 2, True))]
    assert deepgemm_tiles.lookup(rows, 4096, 2112, 7168) == wide
    assert deepgemm_tiles.lookup(rows, 2049, 2112, 7168) == wide  # same bucket
    assert deepgemm_tiles.lookup(rows, 2048, 2112, 7168) is None  # the row keeps DeepGEMM's pick
    assert deepgemm_tiles.lookup(rows, 16384, 2112, 7168) is None  # no row for that bucket
    assert deepgemm_tiles.lookup(rows, 4096, 2112, 4096) is None  # other K
    assert deepgemm_tiles.lookup(rows, 4096, 4096, 4096) == Tiles(256, 64, 4, 2, True, "fewest")


def _fewest_by_search(M, N, bm, bn, mc, sms):
    """The fewest SMs, in whole clusters, that run the grid in as few waves as every SM does."""
    blocks = -(-M // bm) * -(-N // bn)
    waves = -(-blocks // sms)
    return next(n for n in range(mc, sms + 1, mc) if -(-blocks // n) == waves)


@pytest.mark.parametrize("M", [1, 300, 2048, 3000, 4096, 16384])
@pytest.mark.parametrize("N,bm,bn,mc", [(2112, 128, 192, 2), (7168, 256, 112, 2), (4096, 128, 144, 1),
                                        (57344, 256, 128, 2)])
def test_num_sms_rules(M, N, bm, bn, mc):
    fewest = Tiles(bm, bn, 4, mc, True, "fewest")
    assert deepgemm_tiles.num_sms_for(fewest, M, N, 132) == _fewest_by_search(M, N, bm, bn, mc, 132)
    assert deepgemm_tiles.num_sms_for(Tiles(bm, bn, 4, mc, True, "all"), M, N, 132) == 132


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_m=192), "block_m must be 64, 128 or 256; got 192"),
    (dict(block_n=100), "block_n must be a multiple of 8 in [16, 256]; got 100"),
    (dict(num_stages=0), "num_stages must be in [1, 8]; got 0"),
    (dict(multicast=4), "multicast must be 1 or 2; got 4"),
    (dict(num_sms="most"), "num_sms must be one of ('fewest', 'all'); got 'most'"),
])
def test_tiles_reject_bad_values_by_name(kwargs, message):
    args = dict(block_m=128, block_n=192, num_stages=4, multicast=2, multicast_on_a=True) | kwargs
    with pytest.raises(ValueError) as info:
        Tiles(**args)
    assert str(info.value) == message


def test_table_comes_from_the_environment_and_is_read_per_card(tmp_path, monkeypatch):
    path = tmp_path / "deepgemm_tiles.json"
    tiles = Tiles(128, 160, 4, 2, False)
    path.write_text(json.dumps({"_comment": "x", "Card A": {"rows": [_row(2112, 7168, 2048, tiles)]}}))
    monkeypatch.setenv("FP8LINEAR_TABLES_DIR", str(tmp_path))
    assert deepgemm_tiles.table_path() == path
    assert deepgemm_tiles.lookup(deepgemm_tiles.load_rows("Card A"), 2048, 2112, 7168) == tiles
    assert deepgemm_tiles.load_rows("Card B") == []
    monkeypatch.setenv("FP8LINEAR_TABLES_DIR", str(tmp_path / "missing"))
    assert deepgemm_tiles.load_rows("Card A") == []
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "deepgemm_tiles.json").write_text("[1, 2]")
    monkeypatch.setenv("FP8LINEAR_TABLES_DIR", str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="keyed by GPU name; got list"):
        deepgemm_tiles.load_rows("Card A")


def test_committed_table_rows_are_valid():
    """Every row of the shipped table names a bucket bound and tiles Tiles accepts (or null)."""
    with open(deepgemm_tiles.table_path()) as f:
        table = json.load(f)
    for card, entry in table.items():
        if card.startswith("_"):
            continue
        for row in entry["rows"]:
            assert row["M_max"] in deepgemm_tiles.M_BUCKETS and row["N"] % 64 == 0 and row["K"] % 128 == 0
            if row["tiles"] is not None:
                Tiles.from_row(row["tiles"])
                assert row["dg_pick_us"] > row["us"]  # kept only where it measured faster


# -- CPU: the tiles path, with stand-ins for DeepGEMM's internals ------------------------------------------
@pytest.fixture
def fake_legacy(monkeypatch):
    """deep_gemm's legacy modules as stand-ins: the tuner records the keys and launch arguments it is handed
    and returns a runtime whose kernel loads on its first call; `get_best_configs` answers DeepGEMM's pick
    (used by the fallback's `_legacy_plan`), and the plain GEMM records its calls."""
    state = types.SimpleNamespace(tuned=[], launched=[], plain=[], fail_block_n=None)
    own = (132, 256, 88, 4, (2, True), (225792, 0, 0))

    class Runtime:
        args = list(deepgemm._LEGACY_LAUNCH_ARGS)

        def __init__(self):
            self.kernel = None

        def __call__(self, **kwargs):
            self.kernel = 0xC0DE
            state.launched.append(kwargs)
            kwargs["GMEM_D"].fill_(2.0)
            return (0,)  # as cuda-python returns cuLaunchKernelEx's status

    def compile_and_tune(name, keys, space, kwargs, runtime_cls):
        if keys["BLOCK_N"] == state.fail_block_n:
            raise AssertionError("Failed to compile")
        state.tuned.append((name, dict(keys)))
        return Runtime(), dict(keys)

    def plain(lhs, rhs, out):
        state.plain.append(out.shape)
        out.fill_(1.0)

    tuner = types.SimpleNamespace(compile_and_tune=compile_and_tune, tuned={})
    runtime = types.SimpleNamespace(GemmType=types.SimpleNamespace(Normal="Normal"), FP8GemmRuntime=Runtime,
                                    make_2d_tma_a_desc=lambda *a: ("A", a[2:]), make_2d_tma_b_desc=lambda *a: ("B", a[2:]),
                                    make_2d_tma_d_desc=lambda *a: ("D", a[2:]),
                                    make_2d_tma_scales_a_desc=lambda *a: ("SA", a[2:]))
    mods = {"cuda": types.ModuleType("cuda"), "cuda.bindings": types.ModuleType("cuda.bindings"),
            "cuda.bindings.driver": types.SimpleNamespace(CUresult=types.SimpleNamespace(CUDA_SUCCESS=0)),
            "deep_gemm": types.ModuleType("deep_gemm"), "deep_gemm.jit_kernels": types.ModuleType("jk"),
            "deep_gemm.jit_kernels.gemm": types.SimpleNamespace(
                get_best_configs=lambda m, n, k, g, sms: own,
                get_smem_config=lambda stages, k, bm, bn: (1000 * stages + bn, 128, 0)),
            "deep_gemm.jit_kernels.runtime": runtime,
            "deep_gemm.jit_kernels.tuner": types.SimpleNamespace(jit_tuner=tuner),
            "deep_gemm.jit_kernels.utils": types.SimpleNamespace(get_num_sms=lambda: 132)}
    mods["cuda"].bindings = mods["cuda.bindings"]
    mods["cuda.bindings"].driver = mods["cuda.bindings.driver"]
    for name in ("gemm", "runtime", "tuner", "utils"):
        setattr(mods["deep_gemm.jit_kernels"], name, mods[f"deep_gemm.jit_kernels.{name}"])
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(deepgemm, "_api", lambda: (plain, "legacy"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    # DeepGEMM's pick as its tuner would hold it after the plain call (the fallback reads it there).
    pick_keys = deepgemm._tuner_keys(2112, 256, 256, 88, 4, 2, True, 0, 0)
    pick_runtime = Runtime()
    pick_runtime.kernel = 0xD6
    tuner.tuned[("gemm_fp8_fp8_bf16_nt", str(dict(sorted(pick_keys.items()))))] = (pick_runtime, {})
    return state


def _cpu_operands(M=4096, N=2112, K=256):
    s = torch.ones(K // 128, M).t()  # the `col` layout: strides (1, M)
    return torch.zeros(M, K, dtype=FP8), s, torch.zeros(N, K, dtype=FP8), torch.ones(17, 2)


def test_run_with_tiles_builds_and_launches_that_configuration(fake_legacy):
    q, s, w, ws = _cpu_operands()
    y = torch.empty(4096, 2112, dtype=torch.bfloat16)
    plan = deepgemm.run_with_tiles(Tiles(128, 192, 4, 2, False, "fewest"), q, s, w, ws, y)
    # 32 x 11 tiles in three waves of 132: 118 SMs (two per cluster) run them in three as well.
    assert plan == (0xC0DE, 118, 128, 192, 4192, 128, 2)
    ((name, keys),) = fake_legacy.tuned
    assert name == "gemm_fp8_fp8_bf16_nt" and keys == {
        "N": 2112, "K": 256, "BLOCK_M": 128, "BLOCK_N": 192, "SWIZZLE_D_MODE": 128, "BLOCK_N_PADDING": 0,
        "NUM_STAGES": 4, "NUM_TMA_MULTICAST": 2, "IS_TMA_MULTICAST_ON_A": False}
    (launch,) = fake_legacy.launched
    assert launch["NUM_SMS"] == 118 and launch["SMEM_SIZE"] == 4192 and launch["M"] == 4096
    assert launch["GMEM_D"] is y and launch["SCALES_B"] is ws and launch["STREAM"] == 7
    assert launch["TENSOR_MAP_A"] == ("A", (4096, 256, 128, 128, 1))
    assert launch["TENSOR_MAP_D"] == ("D", (4096, 2112, 128, 192, 1, 128))
    assert torch.equal(y, torch.full_like(y, 2.0)) and not fake_legacy.plain


def test_first_call_uses_the_tables_tiles_and_falls_back_with_a_warning(fake_legacy, monkeypatch, caplog):
    q, s, w, ws = _cpu_operands()
    y = torch.empty(4096, 2112, dtype=torch.bfloat16)
    rows = {"tiles": Tiles(128, 192, 4, 2, True, "all")}
    monkeypatch.setattr(deepgemm_tiles, "lookup_for_device", lambda M, N, K, device: rows["tiles"])
    assert deepgemm._first_call(q, s, w, ws, y) == (0xC0DE, 132, 128, 192, 4192, 128, 2)
    assert not fake_legacy.plain
    fake_legacy.fail_block_n = 104
    rows["tiles"] = Tiles(128, 104, 4, 2, True)
    with caplog.at_level(logging.WARNING, logger=deepgemm.__name__):
        plan = deepgemm._first_call(q, s, w, ws, y)
    assert plan == (0xD6, 132, 256, 88, 225792, 0, 2)  # DeepGEMM's own pick, run by its own launch
    assert fake_legacy.plain == [(4096, 2112)] and torch.equal(y, torch.ones_like(y))
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "128x104 s4 mc2 on A, fewest SMs" in record.getMessage() and "Failed to compile" in record.getMessage()
    rows["tiles"] = None
    assert deepgemm._first_call(q, s, w, ws, y) == (0xD6, 132, 256, 88, 225792, 0, 2)
    rows["tiles"] = Tiles(128, 192, 4, 2, True, "all")  # s in another layout: DeepGEMM's own call re-lays it
    assert deepgemm._first_call(q, s.contiguous(), w, ws, y) == (0xD6, 132, 256, 88, 225792, 0, 2)
