"""DeepGEMM tile configurations measured per card (fp8linear.backends.deepgemm_tiles) on the GPU: the
first call of a shape runs DeepGEMM with the table's tiles, and the kernel it compiles is the one the C++
launch runs after. Tiles change the speed only: the outputs must equal DeepGEMM's own pick bit for bit.
The table and the override on CPU: test_deepgemm_tiles.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitwise_equal, poison_allocator
from fp8linear.backends import deepgemm, deepgemm_relaunch as relaunch, deepgemm_tiles
from fp8linear.backends.deepgemm_tiles import Tiles
from test_deepgemm_launch_gpu import _operands, needs_legacy


@pytest.mark.gpu
@needs_legacy
@pytest.mark.parametrize("M,N,K,tiles", [
    (4096, 2112, 7168, Tiles(128, 192, 4, 2, True, "fewest")),  # N % 192 == 0, three waves
    (3001, 2112, 7168, Tiles(128, 192, 4, 2, False, "all")),  # partial last M tile, M % 4 != 0
    (2048, 7168, 7168, Tiles(128, 192, 4, 2, False, "all")),  # N % 192 != 0: partial last N tile
    (300, 6144, 4096, Tiles(128, 160, 4, 2, False, "fewest")),  # multicast on B with three M tiles
    (1000, 4096, 4096, Tiles(256, 64, 4, 2, True, "fewest")),
    (513, 7168, 1664, Tiles(128, 144, 5, 1, True, "all")),  # ceil(K/128) = 13, no multicast
])
def test_tiles_give_deepgemms_bits(M, N, K, tiles):
    q, s, weight, wsi = _operands(M, N, K)
    own = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    deepgemm._api()[0]((q, s), (weight, wsi), own)  # DeepGEMM's pick, its own launch
    poison_allocator(q.device)
    first = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    plan = relaunch.run_with_tiles(tiles, q, s, weight, wsi, first)
    assert isinstance(plan, tuple), plan
    assert plan[2:4] == (tiles.block_m, tiles.block_n) and plan[6] == tiles.multicast
    assert plan[1] == deepgemm_tiles.num_sms_for(tiles, M, N, torch.cuda.get_device_properties(0).multi_processor_count)
    poison_allocator(q.device)
    ours = torch.ops.fp8linear.deepgemm_gemm(q, s, weight, wsi, *plan)  # the C++ launch of that kernel
    torch.cuda.synchronize()
    assert torch.isfinite(own).all()
    assert_bitwise_equal(first, own, "DeepGEMM's launch with the tiles")
    assert_bitwise_equal(ours, own, "the C++ launch with the tiles")


def _table_rows_with_tiles():
    if not torch.cuda.is_available():
        return []
    rows = [r for r in deepgemm_tiles.load_rows(torch.cuda.get_device_name()) if r["tiles"]]
    return sorted(rows, key=lambda r: r["N"] * r["K"] * r["M_max"])[:3]  # the cheapest three


@pytest.mark.gpu
@needs_legacy
def test_the_backend_runs_the_tables_tiles():
    rows = _table_rows_with_tiles()
    if not rows:
        pytest.skip("the tile table has no row with other tiles for this card")
    for row in rows:
        N, K = row["N"], row["K"]
        lower = max(b for b in (0, *deepgemm_tiles.M_BUCKETS) if b < row["M_max"])
        for M in (row["M_max"], lower + 1):  # both ends of the bucket
            q, s, weight, wsi = _operands(M, N, K)
            relaunch.plans.pop((M, N, K, q.device.index), None)
            first = deepgemm._gemm_impl(q, s, weight, wsi)
            plan = relaunch.plans[(M, N, K, q.device.index)]
            tiles = Tiles.from_row(row["tiles"])
            assert plan and plan[2:4] == (tiles.block_m, tiles.block_n), (row, plan)
            own = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            deepgemm._api()[0]((q, s), (weight, wsi), own)
            assert_bitwise_equal(first, own, f"{M}x{N}x{K} with the table's tiles")
            assert_bitwise_equal(deepgemm._gemm_impl(q, s, weight, wsi), own, f"{M}x{N}x{K}, C++ launch")
