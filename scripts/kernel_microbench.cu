// Standalone timing harness for the bandwidth kernels: the quant kernel (kernels/per_token_group_quant.cuh)
// and the SiLU-and-mul + quant kernel (kernels/silu_and_mul_quant.cuh), compiled here with nvcc alone, no
// torch, so that a variant under test (a temporary -D switch in a kernel header) builds on a machine without a
// GPU in seconds and runs on the GPU machine without a torch build. scripts/kernel_microbench.sh builds the
// variants and runs them.
//
// Timing is triton.testing.do_bench's, in C++: before every rep a 256 MB cudaMemsetAsync evicts the
// inputs from the 50 MB L2 (and leaves it full of dirty lines, as do_bench's cache.zero_() does); CUDA
// events around the one launch; the median of the reps. Beside every kernel the same harness times
//   - "empty": a kernel of one thread that does nothing (the harness's own floor at small sizes),
//   - "copy": cudaMemcpyAsync device to device of the kernel's traffic (bytes/2 read, bytes/2 written),
//   - "stream": a kernel that reads the input and writes one byte per element, with no arithmetic (the
//     quant kernel's traffic pattern; its time is the floor for any kernel that must move those bytes).
// Each baseline is timed three times, interleaved with the kernels, and all three are printed: a single
// copy timing at 50 MB moved by up to 20% between calls in bench_quant.py.
//
// Output: CSV on stdout, one line per measurement:
//   variant,kernel,layout,M,K,bytes,us,checksum
// where checksum is an FNV-1a hash of q and the scales (same input, same bits => same hash: variants that
// must not change results can be compared across binaries).
//
// Build (scripts/kernel_microbench.sh does this per variant):
//   nvcc -O3 -std=c++17 -arch=sm_90a -Ikernels -DFP8L_VARIANT=\"name\" [-D...] scripts/kernel_microbench.cu

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "per_token_group_quant.cuh"
#include "silu_and_mul_quant.cuh"

#ifndef FP8L_VARIANT
#define FP8L_VARIANT "default"
#endif

#define CHECK(call)                                                                                   \
  do {                                                                                                \
    cudaError_t err_ = (call);                                                                        \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_));   \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

namespace {

using fp8linear::ceil_div;
using fp8linear::FastDivmod;

constexpr int kGroup = 128;
constexpr size_t kFlushBytes = size_t{256} << 20;

__global__ void empty_kernel() {}

// Reads kLoads x 16 bytes and writes 8 bytes per thread and step, no math: the quant kernel's traffic at
// kLoads = 1 (8 bf16 in, 8 bytes out), the SiLU kernel's at 2 (gate and up in, 8 bytes out).
template <int kLoads>
__global__ void stream_kernel(const uint4* __restrict__ x, uint2* __restrict__ q, uint32_t steps) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < steps; i += gridDim.x * blockDim.x) {
    uint4 v = __ldg(x + static_cast<size_t>(i) * kLoads);
#pragma unroll
    for (int l = 1; l < kLoads; ++l) {
      const uint4 w = __ldg(x + static_cast<size_t>(i) * kLoads + l);
      v = make_uint4(v.x ^ w.x, v.y ^ w.y, v.z ^ w.z, v.w ^ w.w);
    }
    q[i] = make_uint2(v.x ^ v.y, v.z ^ v.w);
  }
}

struct Bench {
  cudaStream_t stream;
  cudaEvent_t start, stop;
  void* flush;

  Bench() {
    CHECK(cudaStreamCreate(&stream));
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    CHECK(cudaMalloc(&flush, kFlushBytes));
  }

  // Median microseconds of fn() over reps (after warmup reps), L2 flushed before each.
  float us(const std::function<void()>& fn, int reps) {
    for (int i = 0; i < 3; ++i) fn();
    CHECK(cudaStreamSynchronize(stream));
    std::vector<float> t(reps);
    for (int i = 0; i < reps; ++i) {
      CHECK(cudaMemsetAsync(flush, 0, kFlushBytes, stream));
      CHECK(cudaEventRecord(start, stream));
      fn();
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      t[i] = 1e3f * ms;
    }
    CHECK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[reps / 2];
  }
};

uint64_t fnv1a(const std::vector<uint8_t>& bytes, uint64_t h = 1469598103934665603ull) {
  for (uint8_t b : bytes) h = (h ^ b) * 1099511628211ull;
  return h;
}

uint64_t device_hash(const void* a, size_t na, const void* b, size_t nb) {
  std::vector<uint8_t> ha(na), hb(nb);
  CHECK(cudaMemcpy(ha.data(), a, na, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hb.data(), b, nb, cudaMemcpyDeviceToHost));
  return fnv1a(hb, fnv1a(ha));
}

// Normal values with a per-row magnitude spread (bench_quant.py's input), as bf16 bits.
std::vector<__nv_bfloat16> random_bf16(size_t rows, size_t cols, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> spread(-4, 4);
  std::vector<__nv_bfloat16> v(rows * cols);
  for (size_t r = 0; r < rows; ++r) {
    const float m = std::ldexp(1.0f, spread(gen));
    for (size_t c = 0; c < cols; ++c) v[r * cols + c] = __float2bfloat16(normal(gen) * m);
  }
  return v;
}

int wave_of(const void* kernel, int threads) {
  int device = 0, sms = 0, per_sm = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return sms * std::max(per_sm, 1);
}

void print(const char* kernel, const char* layout, int64_t M, int64_t K, double bytes, float us, uint64_t hash) {
  std::printf("%s,%s,%s,%lld,%lld,%.0f,%.3f,%016llx\n", FP8L_VARIANT, kernel, layout, static_cast<long long>(M),
              static_cast<long long>(K), bytes, us, static_cast<unsigned long long>(hash));
  std::fflush(stdout);
}

// The baselines for a kernel moving `bytes` (of which `in_bytes` read from x): printed once per call.
// `pairs`: the kernel reads two 16-byte chunks per 8 bytes written (SiLU), else one (quant).
void baselines(Bench& b, const void* x, void* dst, size_t bytes, size_t in_bytes, bool pairs, int64_t M, int64_t K,
               int reps, int round) {
  const std::string tag = "r" + std::to_string(round);
  const size_t half = bytes / 2;
  print(("copy_" + tag).c_str(), "-", M, K, static_cast<double>(bytes),
        b.us([&] { CHECK(cudaMemcpyAsync(dst, x, half, cudaMemcpyDeviceToDevice, b.stream)); }, reps), 0);
  // Steps of 8 output bytes: the quant kernel reads 16 bytes per step, the SiLU kernel 32.
  const uint32_t steps = static_cast<uint32_t>(in_bytes / (pairs ? 32 : 16));
  const int threads = 256;
  const auto kernel = pairs ? stream_kernel<2> : stream_kernel<1>;
  const uint32_t grid = std::max<uint32_t>(
      1u, std::min<uint32_t>(ceil_div<uint32_t>(steps, threads), wave_of((const void*)kernel, threads) * 8));
  print(("stream_" + tag).c_str(), "-", M, K, static_cast<double>(bytes), b.us([&] {
          kernel<<<grid, threads, 0, b.stream>>>(static_cast<const uint4*>(x), static_cast<uint2*>(dst), steps);
        }, reps), 0);
  print(("empty_" + tag).c_str(), "-", M, K, 0, b.us([&] { empty_kernel<<<1, 1, 0, b.stream>>>(); }, reps), 0);
}

enum class Layout { kRow, kCol, kPacked };
const char* name_of(Layout l) { return l == Layout::kRow ? "row" : l == Layout::kCol ? "col" : "ue8m0_packed"; }

// Scale buffer of [M, G] in `layout` (fp8linear.layouts): words, and the strides in words.
struct Scales {
  size_t words;
  int64_t stride_row, stride_col;
};
Scales scales_for(Layout l, int64_t M, int64_t G) {
  const int64_t rows = ceil_div<int64_t>(M, 4) * 4;  // TMA-aligned column length
  if (l == Layout::kRow) return {static_cast<size_t>(M * G), G, 1};
  const int64_t cols = l == Layout::kPacked ? ceil_div<int64_t>(G, 4) : G;
  return {static_cast<size_t>(rows * cols), 1, rows};
}

template <bool kPacked>
void run_quant(Bench& b, Layout layout, const __nv_bfloat16* x, uint8_t* q, void* s, int64_t M, int64_t K, int reps) {
  const int64_t G = K / kGroup;
  const Scales sc = scales_for(layout, M, G);
  fp8linear::QuantParams p{};
  p.x = x;
  p.q = q;
  p.s = s;
  p.num_groups = static_cast<uint32_t>(M * G);
  p.groups_per_row = FastDivmod(static_cast<uint32_t>(G));
  p.rows = FastDivmod(static_cast<uint32_t>(M));
  p.x_stride_batch = 0;
  p.x_stride_row = M > 1 ? K : 0;
  p.s_stride_batch = 0;
  p.s_stride_row = M > 1 ? sc.stride_row : 0;
  p.s_stride_col = sc.stride_col;
  p.eps = 1e-10f;
  p.scale_ue8m0 = kPacked;
  p.q_aligned = true;
  const auto kernel =
      fp8linear::per_token_group_quant_kernel<__nv_bfloat16, fp8linear::OutFp8E4M3, kGroup, kPacked, true>;
  const uint32_t grid =
      fp8linear::quant_grid<__nv_bfloat16, kGroup>(p.num_groups, wave_of((const void*)kernel, fp8linear::kThreads));
  auto launch = [&] { kernel<<<grid, fp8linear::kThreads, 0, b.stream>>>(p); };
  CHECK(cudaMemset(s, 0xA5, sc.words * 4));
  launch();
  CHECK(cudaDeviceSynchronize());
  const uint64_t hash = device_hash(q, static_cast<size_t>(M * K), s, sc.words * 4);
  const size_t scale_bytes = static_cast<size_t>(M) * (layout == Layout::kPacked ? ceil_div<int64_t>(G, 4) : G) * 4;
  const double bytes = 3.0 * M * K + scale_bytes;
  print("quant", name_of(layout), M, K, bytes, b.us(launch, reps), hash);
}

void run_silu(Bench& b, const __nv_bfloat16* x, uint8_t* q, void* s, int64_t M, int64_t I, int reps) {
  const int64_t G = I / kGroup;
  const Scales sc = scales_for(Layout::kCol, M, G);
  fp8linear::fused::SiluParams p{};
  p.x = x;
  p.q = q;
  p.s = fp8linear::fused::ScaleOut{s, M > 1 ? sc.stride_row : 0, sc.stride_col, static_cast<uint32_t>(G)};
  fp8linear::fused::silu_set_sizes(p, M, I, kGroup);
  p.x_stride_row = M > 1 ? 2 * I : 0;
  p.eps = 1e-10f;
  p.scale_ue8m0 = false;
  p.vec = true;
  p.q_aligned = true;
  const auto kernel = fp8linear::fused::silu_and_mul_quant_kernel<__nv_bfloat16, fp8linear::OutFp8E4M3, false>;
  const uint32_t grid = fp8linear::fused::silu_grid(p.num_slots);
  auto launch = [&] { kernel<<<grid, fp8linear::fused::kSiluThreads, 0, b.stream>>>(p); };
  CHECK(cudaMemset(s, 0xA5, sc.words * 4));
  launch();
  CHECK(cudaDeviceSynchronize());
  const uint64_t hash = device_hash(q, static_cast<size_t>(M * I), s, sc.words * 4);
  const double bytes = 5.0 * M * I + 4.0 * M * G;  // gate and up read, q written, scales
  print("silu_quant", "col", M, I, bytes, b.us(launch, reps), hash);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  Bench b;
  const std::vector<int64_t> Ms = quick ? std::vector<int64_t>{16, 4096} : std::vector<int64_t>{1, 16, 128, 1024, 4096, 16384};
  const std::vector<int64_t> Ks = {4096, 7168};
  const int64_t max_elems = 16384 * 7168;
  // One input of the largest shape, sliced; outputs sized for it. 2x for the SiLU input [M, 2I].
  const int64_t silu_M = 4096, silu_I = 14336;
  const int64_t in_elems = std::max<int64_t>(max_elems, silu_M * 2 * silu_I);
  __nv_bfloat16* x = nullptr;
  uint8_t* q = nullptr;
  void* s = nullptr;
  void* dst = nullptr;
  CHECK(cudaMalloc(&x, in_elems * 2));
  CHECK(cudaMalloc(&q, in_elems));
  CHECK(cudaMalloc(&s, (max_elems / kGroup + 4 * 128) * 4));
  CHECK(cudaMalloc(&dst, in_elems * 2));
  {
    const std::vector<__nv_bfloat16> host = random_bf16(in_elems / 4096, 4096, 20261125u);
    CHECK(cudaMemcpy(x, host.data(), in_elems * 2, cudaMemcpyHostToDevice));
  }
  std::printf("variant,kernel,layout,M,K,bytes,us,checksum\n");
  for (int64_t M : Ms) {
    for (int64_t K : Ks) {
      const int reps = M * K >= 4096 * 4096 ? 60 : 200;
      const size_t in_bytes = static_cast<size_t>(M * K * 2);
      const size_t bytes = static_cast<size_t>(3 * M * K);
      baselines(b, x, dst, bytes, in_bytes, false, M, K, reps, 0);
      run_quant<false>(b, Layout::kRow, x, q, s, M, K, reps);
      baselines(b, x, dst, bytes, in_bytes, false, M, K, reps, 1);
      run_quant<false>(b, Layout::kCol, x, q, s, M, K, reps);
      run_quant<true>(b, Layout::kPacked, x, q, s, M, K, reps);
      baselines(b, x, dst, bytes, in_bytes, false, M, K, reps, 2);
    }
  }
  for (int64_t M : std::vector<int64_t>{128, silu_M}) {
    const size_t bytes = static_cast<size_t>(5 * M * silu_I);
    baselines(b, x, dst, bytes, static_cast<size_t>(4 * M * silu_I), true, M, silu_I, 60, 0);
    run_silu(b, x, q, s, M, silu_I, 60);
    baselines(b, x, dst, bytes, static_cast<size_t>(4 * M * silu_I), true, M, silu_I, 60, 1);
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
