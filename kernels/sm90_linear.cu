// fp8linear's own Hopper GEMM, with the activations' quantization inside the same kernel (backend `sm90`).
//
// Why: a lone FP8Linear with bf16 input quantizes x in a pass of its own before the GEMM. That pass moves
// three bytes per element of x at copy speed, about 675 / N of the layer whatever M is (docs/design.md):
// 16% at N = 4096, 25% at 2112. Inside a model fuse_norm and fuse_mlp fold it into kernels that run anyway;
// for a lone layer only the GEMM kernel itself can hide it. Quantizing each tile in shared memory would
// redo every 128-wide group once per N tile (32 times at N = 4096) on the SM's issue slots, which the
// tensor cores' promotion already loads (docs/design.md "What the last per-layer targets need"). This
// kernel quantizes each group exactly once instead, with warps of its own, and writes q and its scales to
// global memory where the GEMM's TMA loads read them, the way the quant op would, in the order the tiles
// consume them.
//
// Where it stands (H100, docs/benchmarks.md "sm90"): correct, and slower than DeepGEMM's one-op forward. Its
// GEMM on pre-quantized operands takes 1.07-1.24x DeepGEMM's at large M (1.35x before the TMA-store epilogue).
// With the quantizers fed by TMA (2026-11-26) the quantization lengthens the kernel by 6-23% instead of
// 8-51%, against 16-29% for the standalone pass; in sustained loops this kernel and DeepGEMM's both run at
// the card's 700 W limit, where our GEMM core takes 7-9% longer than DeepGEMM's at the same clock. For fp8
// `auto` never names it. It also runs int8 (Tile::kInt8, wgmma .s32.s8.s8): there it beats the Triton GEMM,
// and `auto` uses it from M = 1024 (docs/benchmarks.md).
//
// The block (384 threads, one per SM, persistent over kBlockM x 128 output tiles, kBlockM = 128 or 256):
//   warp 0           TMA producer: per K step, waits for the stage to be free and (with kQuantize) for the
//                    step's quantized parts to be published, then loads A (q), B (weight) and A's scales into
//                    the stage; lane 0 issues, the warp polls the publication flags 32 K steps at a time.
//   warps 1-3        quantizers (kQuantize only): claim 64-row x 128-column units of x from a counter in the
//                    order the tiles consume them, load them by TMA 16 rows at a time into shared memory, write
//                    q and the scales exactly as fp8linear::per_token_group_quant does (common.cuh's helpers:
//                    the same bits), then count the unit in flags[m_block, k]. They wait only on their own
//                    loads, and whichever blocks are resident claim every unit, so the producers' waits end
//                    without any co-residency guarantee.
//   warpgroups 1-2   math: each half of the tile's rows as m64 slices; per K step four wgmma m64n128k32 (e4m3,
//                    fp32) per slice into a scratch accumulator, then promoted into the tile's accumulator with
//                    the two scales (scale_a[row] * scale_b[n_block, k]), as DESIGN.md's blockwise contract
//                    says. The epilogue adds the bias in fp32, rounds to x's dtype into the warpgroup's staging
//                    buffer (stmatrix) and stores it by TMA while the warpgroup starts its next tile.
// With kCluster = 2, blocks run in pairs on neighbouring n-blocks of one m-block, each loading half of the A
// tile into both by TMA multicast; each pair's "empty" barriers count both blocks' math warps.
//
// Operands in shared memory: rows of 128 bytes written by TMA with the 128-byte swizzle and read by wgmma
// through descriptors of the same swizzle; kStages stages of (A, B, A's scales), each with a "full" barrier
// (the TMA transaction count) and an "empty" one (one arrival per math warp of the cluster).
//
// q and s (the `col` layout: s[k * m_pad + row], m_pad = M rounded up to 4) are also returned, so a caller
// (and the tests) can check them against the quant op; without kQuantize the kernel is a plain blockwise
// GEMM of given (q, s).
//
// Build: a library of its own with sm90_bindings.cpp (fp8linear._build.ensure_loaded("sm90")), compiled the
// first time the sm90 backend is used, not with the default kernels. Torch-free: the launcher at the bottom
// takes pointers and sizes (launchers.h Sm90LinearArgs); the ops' torch glue is in sm90_bindings.cpp.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "launch_utils.h"
#include "launchers.h"
#include "tensor_map.h"

namespace fp8linear {
namespace sm90 {

constexpr int kBlockN = 128;
constexpr int kBlockK = 128;      // = the scale group along K
constexpr int kThreads = 384;     // warpgroup 0: producer (warp 0) + quantizers (warps 1-3); 1-2: math
constexpr int kQuantWarps = 3;
constexpr int kPartRows = 16;     // rows of x one quantizer warp takes at a time: one lane pair per row
constexpr int kXPartBytes = kPartRows * kBlockK * 2;  // a part of x (2-byte T) in shared memory
constexpr int kBTileBytes = kBlockN * kBlockK;

// The two tile heights. 256-row tiles load 0.75x the operand bytes per flop of 128-row ones (the L2 to SM
// traffic bounds a 128 x 128 tile here, docs/benchmarks.md), but hold 128 rows of accumulators per math
// thread: the math warpgroups take 232 registers each (setmaxnreg) and warpgroup 0 keeps 40, and its
// quantizers get one part buffer each instead of two. 128-row tiles serve M too small to fill the SMs with
// 256-row ones.
template <int kBlockM_, int kCluster_, bool kInt8_ = false>
struct Tile {
  static constexpr int kBlockM = kBlockM_;
  // int8 operands (wgmma .s32.s8.s8, exact per 128-wide K block) instead of fp8 e4m3; blocks alone only.
  static constexpr bool kInt8 = kInt8_;
  static_assert(!kInt8_ || kCluster_ == 1, "int8 tiles run without clusters");
  // 2: blocks run in pairs on the same m-block and neighbouring n-blocks, each loading half of the A tile
  // into both (TMA multicast): a quarter fewer bytes from L2 per flop.
  static constexpr int kCluster = kCluster_;
  static constexpr int kSub = kBlockM / 128;             // m64 wgmma rows per math warpgroup, / 64
  // Stages of (A, B, A's scales): 3 x 49 KB or 5 x 32.5 KB, beside the output staging below.
  static constexpr int kStages = kBlockM == 256 ? 3 : 5;
  static constexpr int kPartsPerBlock = kBlockM / kPartRows;
  static constexpr int kGroupM = 1024 / kBlockM;         // tiles run m-fastest over 1024-row groups
  // Parts of x each quantizer warp has in flight (one shared-memory buffer each): what the 256-row tiles'
  // stages and output staging leave is 15 KB, one 4 KB buffer per warp.
  static constexpr int kXBufs = kBlockM == 256 ? 1 : 2;
  // Parts a quantizer warp claims and publishes at once (64 rows): a quarter of the atomics, fences and
  // releases of one part at a time; 1, 2, 4 and 8 measured within noise of each other (docs/benchmarks.md).
  static constexpr int kClaimParts = 4;
  static constexpr bool kSetMaxNReg = kBlockM == 256;
  static constexpr int kATileBytes = kBlockM * kBlockK;
  static constexpr int kScaleBytes = kBlockM * 4;
  // The epilogue stages each math warpgroup's rows of y (2-byte T) in shared memory for one TMA store: the
  // direct 4-byte stores of the accumulator fragments cost about a fifth of the kernel (docs/benchmarks.md).
  static constexpr int kHalfRows = kBlockM / 2;
  static constexpr int kDHalfBytes = kHalfRows * kBlockN * 2;
  static constexpr int kXBufBytes = kQuantWarps * kXBufs * kXPartBytes;
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kStages * (kATileBytes + kBTileBytes + kScaleBytes) +
                                    2 * kDHalfBytes + kXBufBytes + 2 * kStages * 8 + kQuantWarps * kXBufs * 8;
  static_assert(kSmemBytes <= 232448, "over the H100's 227 KB of shared memory per block");
};

struct Params {
  const void* x;          // [M, K] in T, rows x_stride elements apart, 16-byte aligned (kQuantize only)
  int64_t x_stride;
  uint8_t* q;             // [M, K] fp8 e4m3 or int8 (the weight's type), row-major (written with kQuantize)
  float* s;               // `col`: s[k * m_pad + row]
  const float* sb;        // weight_scale_inv [ceil(N / 128), G]
  const void* bias;
  int bias_kind;
  void* y;                // [M, N] in T
  uint32_t* flags;        // [m_blocks, G]: quantized parts published (kQuantize only; zeroed by the host)
  uint32_t* next_part;    // the quantizers' work counter (kQuantize only; zeroed by the host)
  int M, N, K, G, m_pad, m_blocks, n_blocks;
  float eps;
  bool ue8m0;
};

// ------------------------------------------------------------------------------------------------
// PTX wrappers (sm_90a).
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Whether the barrier's phase of parity `parity` has completed, without waiting.
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Wait until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int inner, int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(inner), "r"(outer)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int inner,
                                                      int outer, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(inner), "r"(outer), "h"(mask)
      : "memory");
}

// Arrive on the barrier at the same shared-memory offset in block `rank` of this cluster.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n" "barrier.cluster.wait.acquire;" ::: "memory");
}

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_add(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Orders this thread's generic-proxy view of global memory with its async-proxy (TMA) accesses.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// Orders this thread's shared-memory writes before a later TMA (async-proxy) read of them.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// A barrier of `count` threads (a multiple of 32) by id; 0 is __syncthreads'.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// TMA store of a box from shared memory to global; out-of-bounds rows and columns are not written.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int inner, int outer) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(inner), "r"(outer)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// This thread's committed bulk stores have finished reading shared memory / have completed.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// A wgmma shared-memory descriptor: K-major tile of 128-byte rows with the 128-byte swizzle, 8-row groups
// 1024 bytes apart (the stride byte offset); the leading byte offset is unused in this mode.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// d[64] (+)= A[64 x 32] * B[128 x 32]^T, fp8 e4m3 from shared memory, fp32 accumulate; scale_d = 0 overwrites.
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The same product for int8: d[64] (+)= A * B^T in exact int32 (s8 x s8); integer wgmma has no operand
// scaling or transposes, so scale-d is its only flag.
__device__ __forceinline__ void wgmma_m64n128k32_s8(uint32_t (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                    uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]),
        "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]),
        "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),
        "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]),
        "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]),
        "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]),
        "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]),
        "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// Keeps the compiler from moving reads of wgmma's outputs above the wait (the wait names no registers).
__device__ __forceinline__ void fence_operands(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_operands(uint32_t (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// An int8 block sum (int32) as fp32 without a conversion instruction (I2F runs at a quarter of the FMA
// rate): adding the bits of 1.5 * 2^23 gives those of the float 1.5 * 2^23 + sum, exact for |sum| < 2^22 (a
// block's sum is at most 128 * 128 * 128 = 2^21), and one subtraction leaves sum exactly. (Starting the
// accumulator at those bits instead saved the add but made the 256-row tiles spill.)
__device__ __forceinline__ float int8_block_sum(uint32_t sum) {
  return __uint_as_float(sum + 0x4B400000u) - 12582912.0f;
}

// ------------------------------------------------------------------------------------------------
// Work order. Tiles: groups of kGroupM m-blocks (1024 rows), m fastest within a group, so the blocks running
// at once share few B tiles and few m-blocks. Quantized parts: the same groups, then k, then m, then the
// 32-row part, so the parts the first tiles wait for are the first ones taken.
// ------------------------------------------------------------------------------------------------
// With kCluster = 2, t counts tiles of kBlockM x 2 kBlockN and the block of rank r in its pair takes n-block
// 2 n + r (past the last n-block when n_blocks is odd: it then loads its half of A for its peer, multiplies
// zeros and stores nothing).
template <typename C>
__device__ __forceinline__ int tile_count(const Params& p) {
  return p.m_blocks * ceil_div(p.n_blocks, C::kCluster);
}

template <typename C>
__device__ __forceinline__ void tile_coords(const Params& p, int t, int& m_block, int& n_block) {
  const int n_tiles = ceil_div(p.n_blocks, C::kCluster);
  const int per_group = C::kGroupM * n_tiles;
  const int group = t / per_group;
  const int within = t - group * per_group;
  const int rows = min(C::kGroupM, p.m_blocks - group * C::kGroupM);
  const int n_tile = within / rows;
  m_block = group * C::kGroupM + (within - n_tile * rows);
  n_block = n_tile * C::kCluster + static_cast<int>(blockIdx.x % C::kCluster);
}

// This block's first tile and the stride between its tiles (blocks of a cluster share both).
template <typename C>
__device__ __forceinline__ int first_tile() {
  return static_cast<int>(blockIdx.x / C::kCluster);
}
template <typename C>
__device__ __forceinline__ int tile_stride() {
  return static_cast<int>(gridDim.x / C::kCluster);
}

template <typename C>
__device__ __forceinline__ void part_coords(const Params& p, int v, int& m_block, int& k, int& part) {
  const int per_group = C::kGroupM * p.G * C::kPartsPerBlock;
  const int group = v / per_group;
  const int within = v - group * per_group;
  const int rows = min(C::kGroupM, p.m_blocks - group * C::kGroupM);
  k = within / (rows * C::kPartsPerBlock);
  const int rest = within - k * rows * C::kPartsPerBlock;
  m_block = group * C::kGroupM + rest / C::kPartsPerBlock;
  part = rest % C::kPartsPerBlock;
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// A quantizer warp: claims units of kClaim consecutive 16-row parts of x (one m-block, one k) in order from a
// global counter (so whichever blocks are resident take every part: no block waits on one that has not
// started, and the launch needs no co-residency), loads each part by TMA into a shared-memory buffer of its own
// (with two buffers the next part's load flies while it quantizes one), quantizes it from there, and publishes
// the unit with one count. The TMA holds the bytes in flight that registers could not (the 256-row tiles leave
// this warpgroup 40 registers): loading x through registers, three warps per SM quantized 4096 x 4096 in 78 us
// against the standalone op's 24.
//
// A part is two boxes of 64 columns, rows of 128 bytes with the 128-byte swizzle (16-byte chunk c of row r at
// chunk c ^ (r % 8)). Lane l takes half l % 2 of row l / 2, so one shuffle completes a row's amax; the second
// half's lanes walk their chunks starting 4 further on, which puts every quarter-warp's 16-byte reads on 8
// different bank groups. Rows past M read as zeros (TMA) and are not written, but count: every m-block
// publishes kPartsPerBlock parts per k.
template <typename C, typename T, int kClaim>
__device__ void quantize_parts(const Params& p, const CUtensorMap* map_x, uint32_t bufs, uint32_t bars) {
  static_assert(C::kPartsPerBlock % kClaim == 0 && kClaim % C::kXBufs == 0, "a unit is whole parts of one m-block");
  const int lane = threadIdx.x % kWarpSize;
  const int r = lane / 2;
  const int h = lane % 2;
  const int units = p.m_blocks * p.G * (C::kPartsPerBlock / kClaim);
  using Out = std::conditional_t<C::kInt8, OutInt8, OutFp8E4M3>;
  // Lane 0's ticket from the counter; the shuffle that hands it out comes after the unit's work, so the
  // atomic's round trip overlaps it.
  auto ticket = [&]() { return lane == 0 ? static_cast<int>(atomicAdd(p.next_part, 1u)) : 0; };
  auto hand_out = [&](int t) { return __shfl_sync(0xFFFFFFFFu, t, 0); };
  uint32_t phase = 0;  // bit b: the parity of buffer b's next load
  for (int unit = hand_out(ticket()); unit < units;) {
    const int next = ticket();
    int m_block, k, part0;
    part_coords<C>(p, unit * kClaim, m_block, k, part0);
    auto load = [&](int j) {
      if (lane == 0) {
        const int row0 = m_block * C::kBlockM + (part0 + j) * kPartRows;
        const uint32_t buf = bufs + (j % C::kXBufs) * kXPartBytes;
        const uint32_t bar = bars + 8 * (j % C::kXBufs);
        mbar_arrive_expect_tx(bar, kXPartBytes);
        tma_load_2d(buf, map_x, bar, k * kBlockK, row0);
        tma_load_2d(buf + kXPartBytes / 2, map_x, bar, k * kBlockK + 64, row0);
      }
    };
#pragma unroll
    for (int j = 0; j < C::kXBufs; ++j) load(j);
#pragma unroll 1  // (unrolled, the 256-row tiles' quantizers, in 40 registers, spilled twice the loads)
    for (int j = 0; j < kClaim; ++j) {
      const int b = j % C::kXBufs;
      const int row = m_block * C::kBlockM + (part0 + j) * kPartRows + r;
      const uint32_t row_addr = bufs + b * kXPartBytes + h * (kXPartBytes / 2) + r * 128;
      mbar_wait(bars + 8 * b, (phase >> b) & 1u);
      phase ^= 1u << b;
      uint32_t amax = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = (i + 4 * h) % 8;
        amax = max(amax, InputTraits<T>::abs_max_bits(ld_shared_v4(row_addr + ((c ^ (r % 8)) << 4))));
      }
      amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
      const GroupScale g = group_scale<T>(amax, p.eps, Out::kQmax, p.ue8m0);
      uint8_t* q_row = p.q + static_cast<int64_t>(row) * p.K + k * kBlockK + h * 64;
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        const int c = (i + 4 * h) % 8;  // even: two chunks, one 16-byte store
        uint32_t w[4];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          float f[8];
          InputTraits<T>::to_float(ld_shared_v4(row_addr + (((c + jj) ^ (r % 8)) << 4)), f);
          uint32_t half_w[2];
          quantize_chunk<Out, 8>(f, g.inv, g.nonfinite, half_w);
          w[2 * jj] = half_w[0];
          w[2 * jj + 1] = half_w[1];
        }
        if (row < p.M) *reinterpret_cast<uint4*>(q_row + c * 8) = make_uint4(w[0], w[1], w[2], w[3]);
      }
      if (h == 0 && row < p.M) p.s[static_cast<int64_t>(k) * p.m_pad + row] = g.scale;
      __syncwarp();  // every lane has read the buffer: the unit's next part may land in it
      if (j + C::kXBufs < kClaim) load(j + C::kXBufs);
    }
    // Publish: every lane's stores, then one count, released at GPU scope (cumulative over the warp's stores
    // through the warp barrier) and not waited for. The producer that reads these parts acquires the count and
    // fences the async proxy before its TMA reads these bytes.
    fence_proxy_async_global();
    __syncwarp();
    if (lane == 0) red_release_add(p.flags + m_block * p.G + k, static_cast<uint32_t>(kClaim));
    unit = hand_out(next);
  }
}

// The bias of columns col and col + 1, in fp32; the kind is a template argument so the epilogue's loop holds
// no switch (one per element cost about as many instructions as a tile's promotion; docs/benchmarks.md).
template <int kBias>
__device__ __forceinline__ float2 bias_pair(const Params& p, int col) {
  if constexpr (kBias == kBiasBf16) {
    const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.bias) + col;
    return make_float2(__bfloat162float(b[0]), __bfloat162float(b[1]));
  } else if constexpr (kBias == kBiasFp16) {
    const __half* b = static_cast<const __half*>(p.bias) + col;
    return make_float2(__half2float(b[0]), __half2float(b[1]));
  } else if constexpr (kBias == kBiasFp32) {
    const float* b = static_cast<const float*>(p.bias) + col;
    return make_float2(b[0], b[1]);
  } else {
    return make_float2(0.0f, 0.0f);
  }
}

// Two values rounded to T, packed as one 32-bit word (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float a, float b) {
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Four 8 x 8 matrices of 16-bit values into shared memory: lane l gives the address of row l % 8 of matrix l / 8,
// and its word j holds its two values (row l / 4, columns 2 (l % 4) + {0, 1}) of matrix j, the layout of an
// mma accumulator fragment.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// The producer warp: per K step, the stage free, the step's parts published (kQuantize), then A, B and A's
// scales into the stage. The whole warp runs the loop; lane 0 issues. Publication is polled for up to 32 K
// steps at once (one flag per lane, a ballot), so in the steady state, with the quantizers far ahead, a tile
// costs one round trip to L2 rather than one per K step.
template <typename C, bool kQuantize>
__device__ __forceinline__ void produce(const Params& p, const CUtensorMap* map_a, const CUtensorMap* map_b,
                                        uint32_t a_tiles, uint32_t b_tiles, uint32_t a_scales, uint32_t full_bars,
                                        uint32_t empty_bars) {
  const int lane = threadIdx.x % kWarpSize;
  const int tiles = tile_count<C>(p);
  constexpr int kARows = C::kBlockM / C::kCluster;  // rows of A this block loads (for every block of its cluster)
  const int rank = static_cast<int>(blockIdx.x % C::kCluster);
  int stage = 0;
  uint32_t phase = 0;
  for (int t = first_tile<C>(); t < tiles; t += tile_stride<C>()) {
    int m_block, n_block;
    tile_coords<C>(p, t, m_block, n_block);
    const int scale_rows = min(C::kBlockM, p.m_pad - m_block * C::kBlockM);  // a multiple of 4: 16-byte copies
    int published = 0;  // K steps of this m-block known to be published
    for (int k = 0; k < p.G; ++k) {
      if constexpr (kQuantize) {
        if (k >= published) {
          for (;;) {
            const int kk = k + lane;
            const bool ready = kk >= p.G || load_acquire(p.flags + m_block * p.G + kk) >= C::kPartsPerBlock;
            const uint32_t not_ready = __ballot_sync(0xFFFFFFFFu, !ready);
            published = k + (not_ready == 0 ? kWarpSize : __ffs(not_ready) - 1);
            if (k < published) break;
            __nanosleep(64);
          }
          // Once per poll, not per K step (a fence costs about as long as a K step's math). The lanes' acquires
          // order lane 0's TMA after the quantizers' stores through the ballot's warp barrier.
          if (lane == 0) fence_proxy_async_global();
        }
      }
      if (lane == 0) {
        mbar_wait(empty_bars + 8 * stage, phase ^ 1u);
        const uint32_t full = full_bars + 8 * stage;
        mbar_arrive_expect_tx(full, C::kATileBytes + kBTileBytes + scale_rows * 4);
        const uint32_t a_dst = a_tiles + stage * C::kATileBytes + rank * kARows * kBlockK;
        if constexpr (C::kCluster == 1) {
          tma_load_2d(a_dst, map_a, full, k * kBlockK, m_block * C::kBlockM);
        } else {
          tma_load_2d_multicast(a_dst, map_a, full, k * kBlockK, m_block * C::kBlockM + rank * kARows,
                                static_cast<uint16_t>((1u << C::kCluster) - 1u));
        }
        tma_load_2d(b_tiles + stage * kBTileBytes, map_b, full, k * kBlockK, n_block * kBlockN);
        bulk_load(a_scales + stage * C::kScaleBytes, p.s + static_cast<int64_t>(k) * p.m_pad + m_block * C::kBlockM,
                  scale_rows * 4, full);
      }
      __syncwarp();
      if (++stage == C::kStages) {
        stage = 0;
        phase ^= 1u;
      }
    }
  }
}

// The epilogue of one math warpgroup: its kHalfRows rows of the tile, bias added in fp32, rounded to T into
// its staging buffer, then stored by TMA (two boxes of 64 columns) while the warpgroup goes on to its next
// tile. The buffer holds the boxes one after the other, rows of 128 bytes with the 128-byte swizzle (16-byte
// chunk c of row r at chunk c ^ (r % 8)), which the map's swizzle undoes: the 8 rows a warp writes at once
// then fall in 8 different bank groups. Accumulator fragment of wgmma m64nN: acc[4i + {0, 1}] is row r,
// columns 8i + 2 (lane % 4) + {0, 1}; acc[4i + {2, 3}] the same columns of row r + 8.
template <typename C, typename T, int kBias>
__device__ __forceinline__ void store_tile(const Params& p, const float (&acc)[C::kSub][64], int m_block, int n_block,
                                           int wg, uint32_t d_smem, const CUtensorMap* map_d) {
  const int lane = threadIdx.x % kWarpSize;
  const int wg_warp = (threadIdx.x / kWarpSize) % 4;
  const bool issuer = threadIdx.x % 128 == 0;
  if (issuer) bulk_wait_read();  // the previous tile's store has read the buffer
  named_barrier_sync(1 + wg, 128);
  const int j = lane / 8;  // the matrix this lane addresses: rows + 8 (j % 2), columns + 8 (j / 2)
#pragma unroll
  for (int sub = 0; sub < C::kSub; ++sub) {
    const int row = wg_warp * 16 + 64 * sub + 8 * (j % 2) + lane % 8;  // within the warpgroup's half
#pragma unroll
    for (int i = 0; i < 16; i += 2) {
      const int col = n_block * kBlockN + 8 * i + 2 * (lane % 4);
      const float2 b0 = col < p.N ? bias_pair<kBias>(p, col) : make_float2(0.0f, 0.0f);  // N % 8 == 0
      const float2 b1 = col + 8 < p.N ? bias_pair<kBias>(p, col + 8) : make_float2(0.0f, 0.0f);
      const int chunk = i + j / 2;  // 16-byte column chunk of the tile: box chunk / 8, chunk % 8 within
      const uint32_t addr = d_smem + (chunk / 8) * (C::kHalfRows * 128) + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
      const float* a = acc[sub] + 4 * i;
      stmatrix_x4(addr, pack_pair<T>(a[0] + b0.x, a[1] + b0.y), pack_pair<T>(a[2] + b0.x, a[3] + b0.y),
                  pack_pair<T>(a[4] + b1.x, a[5] + b1.y), pack_pair<T>(a[6] + b1.x, a[7] + b1.y));
    }
  }
  fence_proxy_async_shared();
  named_barrier_sync(1 + wg, 128);
  if (issuer) {
    const int row = m_block * C::kBlockM + wg * C::kHalfRows;
    tma_store_2d(map_d, d_smem, n_block * kBlockN, row);
    if (n_block * kBlockN + 64 < p.N) tma_store_2d(map_d, d_smem + C::kHalfRows * 128, n_block * kBlockN + 64, row);
    bulk_commit();
  }
}

// A math warpgroup: rows wg * kBlockM / 2 .. + kBlockM / 2 of every tile, as kSub m64 slices.
template <typename C, typename T>
__device__ __forceinline__ void consume(const Params& p, uint32_t a_tiles, uint32_t b_tiles, const float* a_scales,
                                        uint32_t full_bars, uint32_t empty_bars, uint32_t d_tiles,
                                        const CUtensorMap* map_d) {
  const int lane = threadIdx.x % kWarpSize;
  const int wg = threadIdx.x / 128 - 1;
  const int wg_warp = (threadIdx.x / kWarpSize) % 4;
  const int r_local = wg * (C::kBlockM / 2) + wg_warp * 16 + lane / 4;  // rows r_local + 64 sub + {0, 8}
  const int tiles = tile_count<C>(p);
  const uint32_t peer = static_cast<uint32_t>(blockIdx.x % C::kCluster) ^ 1u;
  int stage = 0;
  uint32_t phase = 0;
  bool full_ready = false;  // this stage's loads have landed (tested during the last step's promotion)
  for (int t = first_tile<C>(); t < tiles; t += tile_stride<C>()) {
    int m_block, n_block;
    tile_coords<C>(p, t, m_block, n_block);
    const bool live = n_block < p.n_blocks;  // false for a pair's second block past the last n-block
    const float* sb = p.sb + static_cast<int64_t>(live ? n_block : 0) * p.G;
    float acc[C::kSub][64];
#pragma unroll
    for (int sub = 0; sub < C::kSub; ++sub) {
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[sub][i] = 0.0f;
    }
    for (int k = 0; k < p.G; ++k) {
      const float scale_b = live ? __ldg(sb + k) : 0.0f;
      if (!full_ready) mbar_wait(full_bars + 8 * stage, phase);
      const uint64_t desc_b = smem_desc(b_tiles + stage * kBTileBytes);
#pragma unroll
      for (int sub = 0; sub < C::kSub; ++sub) {
        const int r = r_local + 64 * sub;
        const float scale_0 = a_scales[stage * C::kBlockM + r] * scale_b;
        const float scale_1 = a_scales[stage * C::kBlockM + r + 8] * scale_b;
        const uint64_t desc_a =
            smem_desc(a_tiles + stage * C::kATileBytes + (wg * (C::kBlockM / 2) + 64 * sub) * kBlockK);
        std::conditional_t<C::kInt8, uint32_t, float> part[64];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockK / 32; ++kk) {
          if constexpr (C::kInt8) {
            wgmma_m64n128k32_s8(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
          } else {
            wgmma_m64n128k32(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
          }
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_operands(part);
        if (sub == C::kSub - 1 && lane == 0) {
          mbar_arrive(empty_bars + 8 * stage);
          if constexpr (C::kCluster == 2) mbar_arrive_remote(empty_bars + 8 * stage, peer);  // its multicast too
        }
        if (sub == C::kSub - 1) {  // the next stage, tested now: the test's latency hides under the FMAs below
          const int next = stage + 1 == C::kStages ? 0 : stage + 1;
          full_ready = mbar_test(full_bars + 8 * next, next == 0 ? phase ^ 1u : phase);
        }
        auto value = [&](int i) {
          if constexpr (C::kInt8) {
            return int8_block_sum(part[i]);
          } else {
            return part[i];
          }
        };
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          acc[sub][4 * i + 0] = fmaf(scale_0, value(4 * i + 0), acc[sub][4 * i + 0]);
          acc[sub][4 * i + 1] = fmaf(scale_0, value(4 * i + 1), acc[sub][4 * i + 1]);
          acc[sub][4 * i + 2] = fmaf(scale_1, value(4 * i + 2), acc[sub][4 * i + 2]);
          acc[sub][4 * i + 3] = fmaf(scale_1, value(4 * i + 3), acc[sub][4 * i + 3]);
        }
      }
      if (++stage == C::kStages) {
        stage = 0;
        phase ^= 1u;
      }
    }
    if (!live) continue;  // (uniform over the block)
    const uint32_t d_smem = d_tiles + wg * C::kDHalfBytes;
    switch (p.bias_kind) {
      case kBiasBf16: store_tile<C, T, kBiasBf16>(p, acc, m_block, n_block, wg, d_smem, map_d); break;
      case kBiasFp16: store_tile<C, T, kBiasFp16>(p, acc, m_block, n_block, wg, d_smem, map_d); break;
      case kBiasFp32: store_tile<C, T, kBiasFp32>(p, acc, m_block, n_block, wg, d_smem, map_d); break;
      default: store_tile<C, T, kNoBias>(p, acc, m_block, n_block, wg, d_smem, map_d); break;
    }
  }
  if (threadIdx.x % 128 == 0) bulk_wait_all();  // the stores are done before the block's memory goes
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

template <typename C, typename T, bool kQuantize>
__global__ void __launch_bounds__(kThreads, 1)
    sm90_linear_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_b, const __grid_constant__ CUtensorMap map_d,
                       const __grid_constant__ CUtensorMap map_x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;  // the 128-byte swizzle needs 1024-byte aligned tiles
  const uint32_t a_tiles = base;
  const uint32_t b_tiles = a_tiles + C::kStages * C::kATileBytes;
  const uint32_t d_tiles = b_tiles + C::kStages * kBTileBytes;  // 1024-byte aligned too, for the swizzle
  const uint32_t x_bufs = d_tiles + 2 * C::kDHalfBytes;  // the quantizers' parts of x, 1024-byte aligned too
  const uint32_t a_scales = x_bufs + C::kXBufBytes;
  const float* a_scales_ptr = reinterpret_cast<const float*>(smem_raw + (a_scales - raw));
  const uint32_t full_bars = a_scales + C::kStages * C::kScaleBytes;
  const uint32_t empty_bars = full_bars + C::kStages * 8;
  const uint32_t x_bars = empty_bars + C::kStages * 8;  // one per quantizer buffer

  if (threadIdx.x == 0) {
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(full_bars + 8 * s, 1);
      mbar_init(empty_bars + 8 * s, 2 * 4 * C::kCluster);  // one arrival per math warp of the cluster
    }
    for (int b = 0; b < kQuantWarps * C::kXBufs; ++b) mbar_init(x_bars + 8 * b, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  if constexpr (C::kCluster > 1) {
    cluster_sync();  // the peer's barriers are initialized before anything arrives on them
  } else {
    __syncthreads();
  }

  const int warp = threadIdx.x / kWarpSize;
  if (warp < 4) {
    if constexpr (C::kSetMaxNReg) setmaxnreg_dec<40>();
    if (warp == 0) {
      produce<C, kQuantize>(p, &map_a, &map_b, a_tiles, b_tiles, a_scales, full_bars, empty_bars);
    } else if constexpr (kQuantize) {
      const int qw = warp - 1;
      quantize_parts<C, T, C::kClaimParts>(p, &map_x, x_bufs + qw * C::kXBufs * kXPartBytes, x_bars + 8 * qw * C::kXBufs);
    }
  } else {
    if constexpr (C::kSetMaxNReg) setmaxnreg_inc<232>();
    consume<C, T>(p, a_tiles, b_tiles, a_scales_ptr, full_bars, empty_bars, d_tiles, &map_d);
  }
  // No block leaves while its peer may still multicast into its shared memory or arrive on its barriers.
  if constexpr (C::kCluster > 1) cluster_sync();
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------
// A [rows, cols] uint8 row-major matrix as box_rows x 128 boxes with the 128-byte swizzle; out-of-bounds rows
// and columns read as zeros.
CUtensorMap fp8_tile_map(const void* base, int64_t rows, int64_t cols, int box_rows) {
  return tensor_map_2d("sm90_linear", CU_TENSOR_MAP_DATA_TYPE_UINT8, base, static_cast<uint64_t>(cols),
                       static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), kBlockK,
                       static_cast<uint32_t>(box_rows), CU_TENSOR_MAP_SWIZZLE_128B);
}

template <typename C, typename T, bool kQuantize>
void launch(Params p, const void* q, const void* weight, int device, cudaStream_t stream) {
  auto kernel = &sm90_linear_kernel<C, T, kQuantize>;
  constexpr int kMaxDevices = 64;
  static bool smem_set[kMaxDevices] = {};  // the shared-memory opt-in, made once per device
  if (device >= kMaxDevices || !__atomic_load_n(&smem_set[device], __ATOMIC_RELAXED)) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes),
               "cudaFuncSetAttribute");
    if (device < kMaxDevices) __atomic_store_n(&smem_set[device], true, __ATOMIC_RELAXED);
  }
  // One block per SM (the shared memory allows no more); with pairs, a GPC with an odd number of SMs leaves
  // one idle and a pair past the resident ones waits for a free one (no block waits on another to start:
  // the quantizers claim their parts).
  const int resident = device_sm_count(device) / C::kCluster;
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = C::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = C::kCluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = C::kCluster > 1 ? 1 : 0;
  p.m_blocks = ceil_div(p.M, C::kBlockM);
  const CUtensorMap map_a = fp8_tile_map(q, p.M, p.K, C::kBlockM / C::kCluster);
  const CUtensorMap map_b = fp8_tile_map(weight, p.N, p.K, kBlockN);
  // y [M, N] in T as boxes of 64 columns (128 bytes) x kHalfRows rows, the 128-byte swizzle.
  constexpr CUtensorMapDataType kType =  // T: x's and y's element type
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUtensorMap map_d = tensor_map_2d("sm90_linear", kType, p.y, static_cast<uint64_t>(p.N),
                                          static_cast<uint64_t>(p.M), static_cast<uint64_t>(p.N) * 2, 64, C::kHalfRows,
                                          CU_TENSOR_MAP_SWIZZLE_128B);
  // x [M, K] in T (kQuantize) as the quantizers' parts: boxes of 64 columns x kPartRows rows, the 128-byte
  // swizzle; rows past M read as zeros. The GEMM alone passes the A map in its place, unused.
  const CUtensorMap map_x =
      kQuantize ? tensor_map_2d("sm90_linear", kType, p.x, static_cast<uint64_t>(p.K), static_cast<uint64_t>(p.M),
                                static_cast<uint64_t>(p.x_stride) * 2, 64, kPartRows, CU_TENSOR_MAP_SWIZZLE_128B)
                : map_a;
  const int tiles = p.m_blocks * ceil_div(p.n_blocks, C::kCluster);  // tiles of kBlockM x kCluster kBlockN
  config.gridDim = dim3(static_cast<unsigned>(std::min(tiles, resident) * C::kCluster));
  check_cuda(cudaLaunchKernelEx(&config, kernel, p, map_a, map_b, map_d, map_x), "cudaLaunchKernelEx");
}

// 256-row tiles where they still give every SM a tile (fewer bytes per flop), else 128-row ones; blocks alone.
// `block_m` 128 or 256 and `cluster` 1 or 2 force a choice (scripts/bench_sm90.py, tests).
struct Shape {
  int block_m;
  int cluster;
};

Shape pick_shape(const Params& p, int64_t block_m, int64_t cluster, int device) {
  require(block_m == 0 || block_m == 128 || block_m == 256, "sm90_linear: block_m must be 0 (auto), 128 or 256; got ",
          block_m);
  require(cluster == 0 || cluster == 1 || cluster == 2, "sm90_linear: cluster must be 0 (auto), 1 or 2; got ", cluster);
  Shape s;
  s.block_m = block_m != 0 ? static_cast<int>(block_m)
                           : (int64_t{ceil_div(p.M, 256)} * p.n_blocks >= device_sm_count(device) ? 256 : 128);
  // Pairs measured slower everywhere on the H100 (docs/benchmarks.md, 2026-11-26): alone unless asked.
  s.cluster = cluster != 0 ? static_cast<int>(cluster) : 1;
  return s;
}

template <bool kQuantize, typename T>
void dispatch_tile(const Params& p, Shape s, bool int8, const void* q, const void* weight, int device,
                   cudaStream_t stream) {
  if (int8) {
    require(s.cluster == 1, "sm90_linear: int8 runs without clusters (cluster 0 or 1); got ", s.cluster);
    s.block_m == 256 ? launch<Tile<256, 1, true>, T, kQuantize>(p, q, weight, device, stream)
                     : launch<Tile<128, 1, true>, T, kQuantize>(p, q, weight, device, stream);
    return;
  }
  if (s.block_m == 256) {
    s.cluster == 2 ? launch<Tile<256, 2>, T, kQuantize>(p, q, weight, device, stream)
                   : launch<Tile<256, 1>, T, kQuantize>(p, q, weight, device, stream);
  } else {
    s.cluster == 2 ? launch<Tile<128, 2>, T, kQuantize>(p, q, weight, device, stream)
                   : launch<Tile<128, 1>, T, kQuantize>(p, q, weight, device, stream);
  }
}

template <bool kQuantize>
void dispatch(DType dtype, const Params& p, Shape s, bool int8, const void* q, const void* weight, int device,
              cudaStream_t stream) {
  if (dtype == DType::kBFloat16) {
    dispatch_tile<kQuantize, __nv_bfloat16>(p, s, int8, q, weight, device, stream);
  } else {
    dispatch_tile<kQuantize, __half>(p, s, int8, q, weight, device, stream);
  }
}

}  // namespace sm90

// sm90_linear (quantize) and sm90_gemm on operands sm90_bindings.cpp checked and allocated: y, q and s's storage
// (K/128 columns of m_pad = ceil(M/4)*4 floats); the quantizers' flags come from the workspace, zeroed.
void launch_sm90_linear(const Sm90LinearArgs& a, int device, cudaStream_t stream, Workspace& workspace) {
  using namespace sm90;
  Params p;
  p.M = static_cast<int>(a.M);
  p.N = static_cast<int>(a.N);
  p.K = static_cast<int>(a.K);
  p.G = static_cast<int>(a.K / kBlockK);
  p.m_pad = static_cast<int>((a.M + 3) / 4 * 4);
  p.n_blocks = static_cast<int>((a.N + kBlockN - 1) / kBlockN);
  p.x = a.x;
  p.x_stride = a.x_stride;
  p.q = static_cast<uint8_t*>(a.q);
  p.s = a.s;
  p.sb = a.weight_scale_inv;
  p.bias = a.bias;
  p.bias_kind = bias_kind(a.bias, a.bias_dtype);
  p.y = a.y;
  p.flags = nullptr;
  p.next_part = nullptr;
  p.eps = a.eps;
  p.ue8m0 = a.scale_ue8m0;
  const Shape shape = pick_shape(p, a.block_m, a.cluster, device);
  const bool int8 = a.weight_dtype == DType::kInt8;
  if (a.quantize) {
    const int64_t n_flags = ceil_div<int64_t>(a.M, shape.block_m) * p.G;
    p.flags = static_cast<uint32_t*>(workspace.zeros(sizeof(uint32_t) * (n_flags + 1)));  // + the quantizers' counter
    p.next_part = p.flags + n_flags;
    return dispatch<true>(a.dtype, p, shape, int8, a.q, a.weight, device, stream);
  }
  dispatch<false>(a.dtype, p, shape, int8, a.q, a.weight, device, stream);
}

}  // namespace fp8linear
