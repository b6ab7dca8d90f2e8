"""scripts/tune_deepgemm.py's candidate sets, with stand-ins for DeepGEMM's config helpers (the timing and
the bit checks run on the GPU machine; docs/benchmarks.md "DeepGEMM with measured tiles")."""

from __future__ import annotations

import importlib
import pathlib
import sys
import types

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
tune = importlib.import_module("tune_deepgemm")  # scripts/ is not a package

from fp8linear.backends.deepgemm_tiles import Tiles  # noqa: E402


@pytest.fixture
def fake_dg(monkeypatch):
    """DeepGEMM's shared-memory rule (a stand-in with sm90's budget in play) and its pick (64 x 32, no
    multicast, at M <= 256; 256 x 128 with multicast on A above)."""
    def get_smem_config(stages, k, bm, bn):
        return (stages * (bm + bn) * 128 + bm * bn * 2, 128, 0)

    def get_best_configs(m, n, k, groups, sms):
        if m <= 256:
            return (sms, 64, 32, 8, (1, True), get_smem_config(8, k, 64, 32))
        return (sms, 256, 128, 3, (2, True), get_smem_config(3, k, 256, 128))

    gemm = types.SimpleNamespace(get_smem_config=get_smem_config, get_best_configs=get_best_configs)
    monkeypatch.setattr(tune, "_dg", lambda: (None, gemm, None, None))


def test_wave_efficiency_counts_the_last_wave_and_the_padding():
    assert tune.wave_efficiency(4096, 2112, 128, 192, 132) == pytest.approx(352 / 396)  # 32 x 11 tiles, 3 waves
    assert tune.wave_efficiency(4096, 4096, 256, 128, 132) == pytest.approx(512 / 528)
    assert tune.wave_efficiency(100, 256, 128, 128, 132) == pytest.approx(2 / 132 * 100 / 128)


def test_most_stages_fits_shared_memory_and_caps_long_unrolls(fake_dg):
    # The stand-in's bytes: stages * (bm + bn) * 128 + bm * bn * 2, against sm90's 232448.
    assert tune.most_stages(7168, 128, 128) == 6  # 32768 * 7 + 32768 would not fit
    assert tune.most_stages(7168, 256, 128) == 3  # 49152 * 4 + 65536 would not fit
    assert tune.most_stages(7168, 64, 96) == 4  # would fit 9 stages, but 128 % 96 != 0 unrolls: at most 4
    assert tune.most_stages(256, 64, 64) == 2  # at most K / 128


def test_candidates_per_bucket(fake_dg):
    small = tune.candidates(2112, 7168, 64, 132)
    assert {t.block_m for t in small} == {64, 128}
    assert Tiles(64, 32, 8, 1, True, "fewest") in small  # DeepGEMM's pick, both SM rules
    assert Tiles(64, 32, 8, 1, True, "all") in small
    # One 64-row M tile: nothing to pair along M, so no multicast on B; a 128-row tile pads M.
    assert not [t for t in small if t.multicast == 2 and not t.multicast_on_a]
    assert [t for t in tune.candidates(2112, 7168, 128, 132) if t.block_m == 64 and not t.multicast_on_a]

    large = tune.candidates(2112, 7168, 4096, 132)
    assert Tiles(128, 192, 4, 2, False, "fewest") in large and Tiles(128, 192, 4, 2, True, "all") in large
    assert Tiles(256, 128, 3, 2, True, "fewest") in large  # the pick
    assert all(t.multicast == 2 for t in large)
    # 256 x 128 leaves a third of its grid idle at 2112 (17 N tiles of 128, 16 x 17 tiles on 132 SMs in
    # three waves): timed only as DeepGEMM's pick, 128 x 128 (0.8 of its slots busy) not at all.
    assert tune.wave_efficiency(4096, 2112, 128, 128, 132) < 0.88
    assert not [t for t in large if (t.block_m, t.block_n) == (128, 128)]
    assert {(t.block_m, t.block_n) for t in large} == {(128, 112), (128, 144), (128, 192), (256, 64), (256, 96),
                                                       (256, 128)}
    assert len(set(large)) == len(large)
