"""DeepGEMM tile configurations measured per card (fp8linear.backends.deepgemm_tiles) and their use by the
deepgemm backend, on CPU: the table, and the first call's choice between the table's tiles and DeepGEMM's
own pick. What the tiles build and launch inside DeepGEMM is checked on the GPU only, against DeepGEMM's
own pick bit for bit (test_deepgemm_tiles_gpu.py): a CPU stand-in for its internals would restate them.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fp8linear import per_token_group_quant
from fp8linear.backends import deepgemm_relaunch as relaunch, deepgemm_tiles
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


# -- CPU: the first call of a shape, with stand-ins for run_with_tiles and DeepGEMM's own call ------------
def test_first_call_uses_the_tables_tiles_and_falls_back_with_a_warning(monkeypatch, caplog):
    """The first call runs the table's tiles where the card has a row for the shape and s is in the `col`
    layout; where DeepGEMM cannot build them it warns, naming the tiles and DeepGEMM's error, and runs its own
    pick through its own launch, as it does without a row or with s in another layout."""
    own_plan, tiles_plan = (0xD6, 132, 256, 88, 225792, 0, 2), (0xC0DE, 118, 128, 192, 4192, 128, 2)
    plain, tiled = [], []

    def deepgemm_call(lhs, rhs, out):
        plain.append(out.shape)
        out.fill_(1.0)

    def run_with_tiles(tiles, q, s, weight, weight_scale_inv, y):
        if tiles.block_n == 104:
            raise AssertionError("Failed to compile")
        tiled.append(tiles)
        y.fill_(2.0)
        return tiles_plan

    row = {"tiles": Tiles(128, 192, 4, 2, True, "fewest")}
    monkeypatch.setattr(relaunch, "written_for", lambda: None)
    monkeypatch.setattr(relaunch, "legacy_plan", lambda M, N, K: own_plan)
    monkeypatch.setattr(relaunch, "run_with_tiles", run_with_tiles)
    monkeypatch.setattr(deepgemm_tiles, "lookup_for_device", lambda M, N, K, device: row["tiles"])
    M, N, K = 301, 2112, 256  # M_pad = 304: the `col` scales' column stride is not M
    q, s = per_token_group_quant(torch.randn(M, K), 128, FP8, scale_layout="col")
    w, ws = torch.randn(N, K).to(FP8), torch.rand(17, 2)
    y = torch.empty(M, N, dtype=torch.bfloat16)

    assert relaunch.first_call(deepgemm_call, q, s, w, ws, y) == tiles_plan
    assert tiled == [row["tiles"]] and not plain and torch.equal(y, torch.full_like(y, 2.0))

    row["tiles"] = Tiles(128, 104, 4, 2, True)
    with caplog.at_level(logging.WARNING, logger=relaunch.__name__):
        assert relaunch.first_call(deepgemm_call, q, s, w, ws, y) == own_plan  # DeepGEMM's own pick, by its own launch
    assert plain == [(M, N)] and torch.equal(y, torch.ones_like(y))
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "128x104 s4 mc2 on A, fewest SMs" in record.getMessage() and "Failed to compile" in record.getMessage()

    row["tiles"] = None  # no row for this shape
    assert relaunch.first_call(deepgemm_call, q, s, w, ws, y) == own_plan and len(plain) == 2
    row["tiles"] = Tiles(128, 192, 4, 2, True, "all")  # s in another layout: DeepGEMM's own call re-lays it
    assert relaunch.first_call(deepgemm_call, q, s.contiguous(), w, ws, y) == own_plan and len(plain) == 3
    assert len(tiled) == 1
