// Device helpers for fp8linear's kernels: no torch types here (pointers, sizes, strides only), so the
// kernels compile against the CUDA headers alone.
//
// Each helper names the DESIGN.md rule it implements ("Quantization semantics", "Scale layouts").
// Bit-exactness with fp8linear/reference.py is the contract: every floating-point step below uses an
// explicitly rounded intrinsic (__fdiv_rn, __frcp_rn, __fmul_rn) so that neither --use_fast_math nor
// FMA contraction can change a bit.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

namespace fp8linear {

constexpr int kWarpSize = 32;

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ceil(log2 v) for v >= 1 (host side: shifts of power-of-two lane counts, FastDivmod's shift).
inline constexpr int ceil_log2(uint64_t v) {
  int l = 0;
  while ((uint64_t{1} << l) < v) ++l;
  return l;
}

// ------------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic-serialization
// attribute (launch_utils.h launch_kernel) may start before the kernel ahead of it in the stream has
// finished; griddep_wait() blocks until every grid it depends on has completed and its memory is
// visible, so a kernel that calls it before touching global memory reads and writes exactly as if
// launched plainly, while its launch overlaps the previous kernel's tail. griddep_launch_dependents()
// lets a dependent launched the same way start before this grid exits. Both are no-ops for a plain
// launch and below sm_90.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------------------
// Division by a runtime-invariant divisor (groups per row G, rows per batch M), without the ~20
// instructions of a generic 32-bit division per work item.
//
// With l = ceil(log2 d) and m = ceil(2^(31+l) / d): n / d == (n * m) >> (31 + l) for every n < 2^31
// (the rounding error n * (m - 2^(31+l)/d) / 2^(31+l) stays below 1/d). The launcher guarantees
// n < 2^31. m < 2^32 for every d >= 1 (m = 2^31 when d is a power of two).
// ------------------------------------------------------------------------------------------------
struct FastDivmod {
  uint32_t divisor;
  uint32_t multiplier;
  uint32_t shift;

  FastDivmod() = default;

  __host__ explicit FastDivmod(uint32_t d) : divisor(d) {
    shift = 31 + static_cast<uint32_t>(ceil_log2(d));
    multiplier = static_cast<uint32_t>(((uint64_t{1} << shift) + d - 1) / d);
  }

  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> shift);
  }
};

// ------------------------------------------------------------------------------------------------
// Inputs. A "chunk" is 16 bytes of input (one LDG.128): 8 bf16/fp16 or 4 fp32 elements, held as a
// uint4 in memory order.
//
// The group's amax is taken on the absolute-value *bit patterns* as unsigned integers: for IEEE
// formats |x| orders like its bits with the sign cleared, so this max is exact, and it orders
// NaN > +Inf > every finite value. A group is non-finite exactly when its amax bits reach the Inf
// pattern (DESIGN.md / reference.py: such a group is poisoned as a whole). bf16 and fp16 are compared
// in their own 16-bit encoding, two at a time (__vmaxu2), and converted to fp32 once per group.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct InputTraits;

template <>
struct InputTraits<__nv_bfloat16> {
  static constexpr int kPerChunk = 8;
  static constexpr uint32_t kInfBits = 0x7F80u;

  __device__ __forceinline__ static uint32_t abs_max_bits(const uint4& v) {
    constexpr uint32_t kAbs = 0x7FFF7FFFu;
    const uint32_t m = __vmaxu2(__vmaxu2(v.x & kAbs, v.y & kAbs), __vmaxu2(v.z & kAbs, v.w & kAbs));
    return max(m & 0xFFFFu, m >> 16);
  }
  // bf16 is the top half of an fp32: the conversion is exact.
  __device__ __forceinline__ static float bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
  __device__ __forceinline__ static void to_float(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <>
struct InputTraits<__half> {
  static constexpr int kPerChunk = 8;
  static constexpr uint32_t kInfBits = 0x7C00u;

  __device__ __forceinline__ static uint32_t abs_max_bits(const uint4& v) {
    constexpr uint32_t kAbs = 0x7FFF7FFFu;
    const uint32_t m = __vmaxu2(__vmaxu2(v.x & kAbs, v.y & kAbs), __vmaxu2(v.z & kAbs, v.w & kAbs));
    return max(m & 0xFFFFu, m >> 16);
  }
  // fp16 -> fp32 is exact (subnormals become normal fp32; Inf and NaN stay Inf and NaN).
  __device__ __forceinline__ static float bits_to_float(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  __device__ __forceinline__ static void to_float(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
};

template <>
struct InputTraits<float> {
  static constexpr int kPerChunk = 4;
  static constexpr uint32_t kInfBits = 0x7F800000u;

  __device__ __forceinline__ static uint32_t abs_max_bits(const uint4& v) {
    constexpr uint32_t kAbs = 0x7FFFFFFFu;
    return max(max(v.x & kAbs, v.y & kAbs), max(v.z & kAbs, v.w & kAbs));
  }
  __device__ __forceinline__ static float bits_to_float(uint32_t bits) { return __uint_as_float(bits); }
  __device__ __forceinline__ static void to_float(const uint4& v, float (&f)[4]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
};

// One 16-byte load of streamed input through the read-only path (ld.global.nc); kNoL1: without allocating
// in L1 (ld.global.nc.L1::no_allocate), 1% faster for the SiLU kernel's gate and up loads at M = 4096,
// I = 14336 (docs/runs/2026-11-25-kernel-microbench-2-h100.md). For the quant kernel, no-L1 loads,
// evict-first loads (ld.global.cs) and no-L1 loads with a 256-byte L2 prefetch gained up to 2% at 1024-4096
// rows and lost 2-6% at 16384, and evict-first stores (st.global.cs) moved nothing
// (docs/runs/2026-11-25-kernel-microbench-1-h100.md): it keeps the plain loads and stores.
template <bool kNoL1 = false>
__device__ __forceinline__ uint4 load_stream16(const void* ptr) {
  uint4 v;
  if constexpr (kNoL1) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else {
    v = __ldg(reinterpret_cast<const uint4*>(ptr));
  }
  return v;
}

// Plain stores of 8, 16 and 4 quantized bytes (dst aligned to the width).
__device__ __forceinline__ void store_bytes8(void* dst, uint32_t a, uint32_t b) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(a, b);
}

__device__ __forceinline__ void store_bytes16(void* dst, uint4 v) { *reinterpret_cast<uint4*>(dst) = v; }

__device__ __forceinline__ void store_bytes4(void* dst, uint32_t a) { *reinterpret_cast<uint32_t*>(dst) = a; }

// Eight quantized bytes (two words, element i in byte i) at dst: one 8-byte store when dst is 8-byte
// aligned, else byte stores.
__device__ __forceinline__ void store_q8(uint8_t* dst, const uint32_t (&w)[2], bool aligned) {
  if (aligned) {
    store_bytes8(dst, w[0], w[1]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4)));
  }
}

// Sixteen quantized bytes (two chunks' words) at dst: one 16-byte store when dst is 16-byte aligned,
// else byte stores.
__device__ __forceinline__ void store_q16(uint8_t* dst, const uint32_t (&lo)[2], const uint32_t (&hi)[2],
                                          bool aligned) {
  if (aligned) {
    store_bytes16(dst, make_uint4(lo[0], lo[1], hi[0], hi[1]));
  } else {
    store_q8(dst, lo, false);
    store_q8(dst + 8, hi, false);
  }
}

// One 16-byte chunk of input. kVec: one LDG.128 through the read-only path (the launcher proved the
// address 16-byte aligned), without L1 allocation when kNoL1; otherwise element-wide loads (a row slice
// at an odd offset, say) assembled into the same uint4, so everything after the load is shared.
template <typename T, bool kVec, bool kNoL1 = false>
__device__ __forceinline__ uint4 load_chunk(const T* ptr) {
  if constexpr (kVec) {
    return load_stream16<kNoL1>(ptr);
  } else if constexpr (sizeof(T) == 4) {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(ptr);
    return make_uint4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
  } else {
    const unsigned short* p = reinterpret_cast<const unsigned short*>(ptr);
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint32_t>(__ldg(p + 2 * i)) | (static_cast<uint32_t>(__ldg(p + 2 * i + 1)) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// ------------------------------------------------------------------------------------------------
// The per-group scale (DESIGN.md "Quantization semantics"):
//   amax = max(amax, eps); scale = amax / QMAX (IEEE division); optionally scale = 2^ceil(log2 scale)
//   by exponent bits; inv = 1 / scale correctly rounded (== the reference's ones / scale).
// ------------------------------------------------------------------------------------------------
struct GroupScale {
  float scale;  // fp32 scale as stored in `row`/`col` (NaN bits 0x7FC00000 for a non-finite group)
  float inv;    // the multiplier applied to every element of the group
  uint32_t exponent_byte;  // biased fp32 exponent of `scale` (UE8M0; 0xFF for a non-finite group)
  bool nonfinite;
};

// 2^ceil(log2 s) for positive finite s, exactly: bump the exponent when any mantissa bit is set,
// then clear the mantissa (DESIGN.md "power-of-two scales"; reference.ceil_to_power_of_two).
__device__ __forceinline__ float ceil_to_power_of_two(float s) {
  const uint32_t bits = __float_as_uint(s);
  const uint32_t exponent = (bits >> 23) + ((bits & 0x7FFFFFu) != 0u);
  return __uint_as_float(exponent << 23);
}

template <typename T>
__device__ __forceinline__ GroupScale group_scale(uint32_t amax_bits, float eps, float qmax, bool ue8m0) {
  GroupScale g;
  g.nonfinite = amax_bits >= InputTraits<T>::kInfBits;
  const float amax = fmaxf(InputTraits<T>::bits_to_float(amax_bits), eps);
  float scale = __fdiv_rn(amax, qmax);
  if (ue8m0) scale = ceil_to_power_of_two(scale);
  g.inv = __frcp_rn(scale);
  if (g.nonfinite) scale = __uint_as_float(0x7FC00000u);
  g.scale = scale;
  // Same bits as layouts.pack_ue8m0 takes from the fp32 scale (0xFF for the NaN above).
  g.exponent_byte = (__float_as_uint(scale) >> 23) & 0xFFu;
  return g;
}

// ------------------------------------------------------------------------------------------------
// Outputs: four quantized values packed into one 32-bit word, element i in byte i (memory order).
// ------------------------------------------------------------------------------------------------
struct OutFp8E4M3 {
  static constexpr float kQmax = 448.0f;
  // 0x7F is e4m3fn's NaN: a non-finite group dequantizes to NaN (reference.FP8_NAN_BYTE).
  static constexpr uint32_t kNonfiniteWord = 0x7F7F7F7Fu;

  // q = x * inv in fp32, then the hardware's saturating round-to-nearest-even conversion (F2FP with
  // satfinite), which equals the reference's clamp to +-448 followed by an RNE cast.
  __device__ __forceinline__ static uint32_t quantize4(float a, float b, float c, float d, float inv) {
    const __nv_fp8x2_storage_t lo =
        __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(a, inv), __fmul_rn(b, inv)), __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t hi =
        __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(c, inv), __fmul_rn(d, inv)), __NV_SATFINITE, __NV_E4M3);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
};

struct OutInt8 {
  static constexpr float kQmax = 127.0f;
  // int8 has no NaN: a non-finite group is all zeros, and its NaN scale carries the poison.
  static constexpr uint32_t kNonfiniteWord = 0u;

  // Round half to even (__float2int_rn, as torch.round), then clamp to [-128, 127].
  __device__ __forceinline__ static uint32_t to_byte(float y) {
    const int v = min(max(__float2int_rn(y), -128), 127);
    return static_cast<uint32_t>(v) & 0xFFu;
  }
  __device__ __forceinline__ static uint32_t quantize4(float a, float b, float c, float d, float inv) {
    return to_byte(__fmul_rn(a, inv)) | (to_byte(__fmul_rn(b, inv)) << 8) | (to_byte(__fmul_rn(c, inv)) << 16) |
           (to_byte(__fmul_rn(d, inv)) << 24);
  }
};

// Quantize one chunk of N elements (N = 8 or 4) into N/4 words; a non-finite group's bytes are
// replaced whole (fp8 NaN or int8 zero), whatever the individual element was.
template <typename Out, int N>
__device__ __forceinline__ void quantize_chunk(const float (&f)[N], float inv, bool nonfinite, uint32_t (&w)[N / 4]) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    const uint32_t word = Out::quantize4(f[4 * k], f[4 * k + 1], f[4 * k + 2], f[4 * k + 3], inv);
    w[k] = nonfinite ? Out::kNonfiniteWord : word;
  }
}

}  // namespace fp8linear
