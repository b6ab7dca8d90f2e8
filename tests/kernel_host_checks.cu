// Host-side checks of the kernel headers' integer logic, compiled by nvcc and run on the CPU (no GPU):
// tests/test_kernel_host.py builds and runs this. Every kernel indexes its work through FastDivmod and
// sizes its grid by quant_grid / silu_grid; a wrong quotient would be silent garbage on the GPU.
//
// Prints one line per failed check and "ok N" with the number of checks at the end; exits 1 on failure.

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_bf16.h>

#include "per_token_group_quant.cuh"
#include "silu_and_mul_quant.cuh"

namespace {

int failures = 0;
long long checks = 0;

void expect(bool ok, const char* what, long long a, long long b, long long c) {
  ++checks;
  if (!ok && failures++ < 20) std::printf("FAIL %s: %lld %lld %lld\n", what, a, b, c);
}

// n / d for every divisor the launchers can pass (groups per row, rows: 1 .. 2^31 - 1) and numerators
// below 2^31: around multiples of d (q*d - 1, q*d, q*d + 1), the top of the range, and random ones.
void check_fast_divmod() {
  std::mt19937_64 gen(20261125);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 5000; ++d) divisors.push_back(d);
  for (int e = 13; e < 31; ++e) {
    const uint32_t p = 1u << e;
    for (uint32_t d : {p - 1, p, p + 1, p + p / 3}) divisors.push_back(d);
  }
  for (int i = 0; i < 2000; ++i) divisors.push_back(1 + static_cast<uint32_t>(gen() % 0x7FFFFFFEu));
  divisors.push_back(0x7FFFFFFFu);
  constexpr uint32_t kTop = 0x7FFFFFFFu;  // numerators are < 2^31 (the launchers check B*M*G < 2^31)
  for (uint32_t d : divisors) {
    const fp8linear::FastDivmod fd(d);
    auto one = [&](uint32_t n) { expect(fd.div(n) == n / d, "FastDivmod", n, d, fd.div(n)); };
    const uint64_t quotients[] = {0, 1, 2, 3, 7, 1000, kTop / d};
    for (uint64_t q : quotients) {
      for (int64_t delta : {-1, 0, 1}) {
        const int64_t n = static_cast<int64_t>(q * d) + delta;
        if (n >= 0 && n <= static_cast<int64_t>(kTop)) one(static_cast<uint32_t>(n));
      }
    }
    one(kTop);
    one(kTop - 1);
    for (int i = 0; i < 200; ++i) one(static_cast<uint32_t>(gen() % (uint64_t{kTop} + 1)));
  }
}

// The grids: at least one block; the blocks cover the work; one tile per block below a resident wave and
// never more tiles per block than the kernel loads (quant); one slot per thread, no more threads than a
// block's worth beyond the slots (SiLU).
void check_grids() {
  using Shape = fp8linear::TileShape<__nv_bfloat16, 128>;
  for (uint32_t wave : {1u, 132u * 8u, 132u * 5u}) {
    for (uint32_t groups : {1u, 15u, 16u, 17u, 1000u, 131072u, 917504u, 0x7FFFFFF0u}) {
      const uint32_t grid = fp8linear::quant_grid<__nv_bfloat16, 128>(groups, wave);
      const uint64_t tiles = (uint64_t{groups} + Shape::kGroupsPerTile - 1) / Shape::kGroupsPerTile;
      const uint64_t per_block = (tiles + grid - 1) / grid;
      expect(grid >= 1, "quant_grid >= 1", groups, wave, grid);
      expect(per_block <= static_cast<uint64_t>(Shape::kUnroll), "quant tiles per block <= unroll", groups, wave, grid);
      if (tiles <= wave) expect(grid == tiles, "quant: one tile per block below a wave", groups, wave, grid);
    }
  }
  for (uint32_t slots : {2u, 256u, 257u, 229376u, 7340032u, 0x7FFFFF00u}) {
    const uint32_t grid = fp8linear::fused::silu_grid(slots);
    const uint64_t threads = uint64_t{grid} * fp8linear::fused::kSiluThreads;
    expect(grid >= 1, "silu_grid >= 1", slots, grid, threads);
    expect(threads >= slots && threads - slots < fp8linear::fused::kSiluThreads, "silu: one slot per thread", slots, grid,
           threads);
  }
}

// silu_set_sizes: a slot is kSiluSlotElems outputs, a group tpg = 2^tpg_log2 whole slots, a row whole
// groups, for every group size the op takes (16 .. 256).
void check_silu_sizes() {
  namespace fu = fp8linear::fused;
  for (int64_t g : {16, 32, 64, 128, 256}) {
    for (int64_t I : {g, 3 * g, 7 * g, int64_t{14336}}) {
      if (I % g != 0) continue;
      for (int64_t M : {1, 3, 4096}) {
        fu::SiluParams p{};
        fu::silu_set_sizes(p, M, I, g);
        expect(static_cast<int64_t>(p.tpg) * fu::kSiluSlotElems == g, "silu tpg * slot == group", M, I, g);
        expect((1 << p.tpg_log2) == p.tpg, "silu tpg_log2", p.tpg, p.tpg_log2, g);
        expect(int64_t{p.num_slots} * fu::kSiluSlotElems == M * I, "silu slots cover M * I", M, I, p.num_slots);
        expect(int64_t{p.slots_per_row.divisor} * fu::kSiluSlotElems == I, "silu slots per row", M, I, g);
        expect(p.num_slots % p.tpg == 0, "silu groups are whole", M, I, g);
        expect(p.I == I, "silu I", M, I, p.I);
      }
    }
  }
}

}  // namespace

int main() {
  check_fast_divmod();
  check_grids();
  check_silu_sizes();
  if (failures) {
    std::printf("%d of %lld checks failed\n", failures, checks);
    return 1;
  }
  std::printf("ok %lld\n", checks);
  return 0;
}
