// Device helpers of the fused prologues (kernels/fused_quant.cu), on top of common.cuh: no torch types.
//
// Bit-exactness with fp8linear/fused.py is the contract: every floating-point step is an explicitly
// rounded intrinsic (__fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn, __frcp_rn), so neither FMA
// contraction nor fast math can change a bit, and the CPU reference (one torch op per step) agrees.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.cuh"

namespace fp8linear {
namespace fused {

// ------------------------------------------------------------------------------------------------
// exp_fp32 (fp8linear/fused.py "exp_fp32"): Cody-Waite reduction, degree-7 Taylor polynomial by
// Horner without FMA, two exact power-of-two scalings. The bit patterns are fused.EXP_CONSTANT_BITS
// (tests/test_fused_cpu.py checks that both files hold the same ones).
// ------------------------------------------------------------------------------------------------
constexpr uint32_t kLog2eBits = 0x3FB8AA3Bu;
constexpr uint32_t kLn2HiBits = 0x3F317200u;
constexpr uint32_t kLn2LoBits = 0x35BFBE8Eu;
constexpr uint32_t kC2Bits = 0x3F000000u;
constexpr uint32_t kC3Bits = 0x3E2AAAABu;
constexpr uint32_t kC4Bits = 0x3D2AAAABu;
constexpr uint32_t kC5Bits = 0x3C088889u;
constexpr uint32_t kC6Bits = 0x3AB60B61u;
constexpr uint32_t kC7Bits = 0x39500D01u;
// fused.EXP_CLAMP: clamp(t, -32, 89) never changes 1 + exp(t) (fp8linear/fused.py docstring).
constexpr float kExpClampLo = -32.0f;
constexpr float kExpClampHi = 89.0f;

// kFma (the SiLU kernel's form for bf16 and fp16 inputs, silu_and_mul_quant.cuh kSiluFma): the exp runs in
// fused multiply-add form: nine fewer instructions per element and other fp32 bits than fused.exp_fp32, but
// the same silu(g) once rounded to the input dtype for every one of the 65536 values g of each 16-bit dtype
// (tests/test_fused_cpu.py emulates this form with an exact FMA and checks all of them), and silu(g)
// rounded to T is the only place the exp enters the result: the output is the spec's, bit for bit. fp32
// inputs keep the plain form (their silu is not rounded).
//
// t finite and already clamped (silu_fp32 guarantees it: fmaxf drops a NaN). n = rint(t log2 e) lies in
// [-46, 128]; p = exp(r) lies in [0.70, 1.42], a normal float.
template <bool kFma>
__device__ __forceinline__ float exp_fp32(float t) {
  // rint without FRND and F2I (conversion-pipe instructions, an eighth of the FP32 rate on sm_90): in
  // [2^23, 2^24) the floats are the integers, so adding 1.5 * 2^23 rounds x = t log2 e to an integer
  // (nearest, ties to even since 1.5 * 2^23 is even: rintf's and torch.round's rule) for |x| < 2^22,
  // and the sum's bit pattern minus the shifter's is that integer. (The FMA form rounds t log2 e + the
  // shifter once, so its n may differ from rint(t log2 e) at a tie: any integer n reduces correctly.)
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  const float shifted = kFma ? __fmaf_rn(t, __uint_as_float(kLog2eBits), kShifter)
                             : __fadd_rn(__fmul_rn(t, __uint_as_float(kLog2eBits)), kShifter);
  const float n = __fsub_rn(shifted, kShifter);  // exact
  float r, p;
  if constexpr (kFma) {
    r = __fmaf_rn(-n, __uint_as_float(kLn2HiBits), t);  // the unfused bits: n * LN2_HI is exact
    r = __fmaf_rn(-n, __uint_as_float(kLn2LoBits), r);
    p = __fmaf_rn(__uint_as_float(kC7Bits), r, __uint_as_float(kC6Bits));
    p = __fmaf_rn(p, r, __uint_as_float(kC5Bits));
    p = __fmaf_rn(p, r, __uint_as_float(kC4Bits));
    p = __fmaf_rn(p, r, __uint_as_float(kC3Bits));
    p = __fmaf_rn(p, r, __uint_as_float(kC2Bits));
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
  } else {
    r = __fsub_rn(t, __fmul_rn(n, __uint_as_float(kLn2HiBits)));
    r = __fsub_rn(r, __fmul_rn(n, __uint_as_float(kLn2LoBits)));
    p = __fmul_rn(r, __uint_as_float(kC7Bits));
    p = __fmul_rn(__fadd_rn(p, __uint_as_float(kC6Bits)), r);
    p = __fmul_rn(__fadd_rn(p, __uint_as_float(kC5Bits)), r);
    p = __fmul_rn(__fadd_rn(p, __uint_as_float(kC4Bits)), r);
    p = __fmul_rn(__fadd_rn(p, __uint_as_float(kC3Bits)), r);
    p = __fmul_rn(__fadd_rn(p, __uint_as_float(kC2Bits)), r);
    p = __fmul_rn(__fadd_rn(p, 1.0f), r);
    p = __fadd_rn(p, 1.0f);
  }
  // p * 2^n by adding n to p's exponent field: exact while the result is normal (its exponent is at
  // least 126 - 46 = 80), as the reference's two power-of-two products are. The field reaches 255 only
  // for n = 128 and p >= 1, where p * 2^128 >= 2^128 rounds to inf: so does this min (the sum stays
  // below 2^31, so the unsigned min is the select `bits >= inf ? inf : bits` in one instruction).
  // n << 23 is the shifted sum's bits << 23 (mod 2^32): its bits are the shifter's, 0x4B400000, plus n,
  // and 0x4B400000 << 23 wraps to 0; so one shift-and-add, no subtraction.
  const uint32_t bits = __float_as_uint(p) + (__float_as_uint(shifted) << 23);
  return __uint_as_float(min(bits, 0x7F800000u));
}

// silu(g) = g / (1 + exp(-g)) in fp32 (fused.silu_and_mul_reference, before its rounding to T).
// A NaN g skips the clamp's NaN (fmaxf drops it) but still makes the quotient NaN, as on the CPU.
// kFma: exp_fp32's FMA form, for 16-bit T only (above).
template <bool kFma>
__device__ __forceinline__ float silu_fp32(float g) {
  const float t = fminf(fmaxf(-g, kExpClampLo), kExpClampHi);
  return __fdiv_rn(g, __fadd_rn(1.0f, exp_fp32<kFma>(t)));
}

// ------------------------------------------------------------------------------------------------
// Eight consecutive elements of T ("a chunk" in the fused kernels, whatever T is): one 16-byte word
// for bf16/fp16, two for fp32, in memory order.
// ------------------------------------------------------------------------------------------------
constexpr int kChunk = 8;

template <typename T>
struct Vec8 {
  static constexpr int kWords = static_cast<int>(sizeof(T)) * kChunk / 16;  // 1 or 2
  static constexpr int kPerWord = InputTraits<T>::kPerChunk;                // 8 or 4
  uint4 w[kWords];
};

template <typename T>
__device__ __forceinline__ Vec8<T> zero8() {
  Vec8<T> v;
#pragma unroll
  for (int i = 0; i < Vec8<T>::kWords; ++i) v.w[i] = make_uint4(0u, 0u, 0u, 0u);
  return v;
}

// kVec: 16-byte aligned (one LDG.128 per word, without L1 allocation when kNoL1); else element loads
// (common.cuh load_chunk).
template <typename T, bool kVec, bool kNoL1 = false>
__device__ __forceinline__ Vec8<T> load8(const T* ptr) {
  Vec8<T> v;
#pragma unroll
  for (int i = 0; i < Vec8<T>::kWords; ++i) v.w[i] = load_chunk<T, kVec, kNoL1>(ptr + i * Vec8<T>::kPerWord);
  return v;
}

template <typename T>
__device__ __forceinline__ void to_float8(const Vec8<T>& v, float (&f)[kChunk]) {
#pragma unroll
  for (int i = 0; i < Vec8<T>::kWords; ++i) {
    float part[Vec8<T>::kPerWord];
    InputTraits<T>::to_float(v.w[i], part);
#pragma unroll
    for (int k = 0; k < Vec8<T>::kPerWord; ++k) f[i * Vec8<T>::kPerWord + k] = part[k];
  }
}

template <typename T>
__device__ __forceinline__ uint32_t abs_max_bits8(const Vec8<T>& v) {
  uint32_t m = InputTraits<T>::abs_max_bits(v.w[0]);
#pragma unroll
  for (int i = 1; i < Vec8<T>::kWords; ++i) m = max(m, InputTraits<T>::abs_max_bits(v.w[i]));
  return m;
}

// Round eight fp32 values to T, nearest even (torch's .to(bfloat16/float16); cvt.rn.{bf16,f16}x2.f32,
// which overflows to inf and keeps subnormals as torch does).
template <typename T>
struct Round8;

template <>
struct Round8<__nv_bfloat16> {
  __device__ __forceinline__ static Vec8<__nv_bfloat16> apply(const float (&f)[kChunk]) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);  // .x (low half) = first
      memcpy(&w[k], &pair, sizeof(uint32_t));
    }
    Vec8<__nv_bfloat16> v;
    v.w[0] = make_uint4(w[0], w[1], w[2], w[3]);
    return v;
  }
};

template <>
struct Round8<__half> {
  __device__ __forceinline__ static Vec8<__half> apply(const float (&f)[kChunk]) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __half2 pair = __floats2half2_rn(f[2 * k], f[2 * k + 1]);
      memcpy(&w[k], &pair, sizeof(uint32_t));
    }
    Vec8<__half> v;
    v.w[0] = make_uint4(w[0], w[1], w[2], w[3]);
    return v;
  }
};

template <>
struct Round8<float> {
  __device__ __forceinline__ static Vec8<float> apply(const float (&f)[kChunk]) {
    Vec8<float> v;
    v.w[0] = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    v.w[1] = make_uint4(__float_as_uint(f[4]), __float_as_uint(f[5]), __float_as_uint(f[6]), __float_as_uint(f[7]));
    return v;
  }
};

// Store a chunk of T at dst: 16-byte stores when aligned, else 32-bit/16-bit element stores.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const Vec8<T>& v, bool aligned) {
  if (aligned) {
#pragma unroll
    for (int i = 0; i < Vec8<T>::kWords; ++i) reinterpret_cast<uint4*>(dst)[i] = v.w[i];
  } else if constexpr (sizeof(T) == 4) {
    uint32_t* p = reinterpret_cast<uint32_t*>(dst);
#pragma unroll
    for (int i = 0; i < Vec8<T>::kWords; ++i) {
      p[4 * i] = v.w[i].x;
      p[4 * i + 1] = v.w[i].y;
      p[4 * i + 2] = v.w[i].z;
      p[4 * i + 3] = v.w[i].w;
    }
  } else {
    unsigned short* p = reinterpret_cast<unsigned short*>(dst);
    const uint32_t w[4] = {v.w[0].x, v.w[0].y, v.w[0].z, v.w[0].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      p[2 * k] = static_cast<unsigned short>(w[k] & 0xFFFFu);
      p[2 * k + 1] = static_cast<unsigned short>(w[k] >> 16);
    }
  }
}

// Max of amax_bits over the `lanes` adjacent lanes of a group (lanes a power of two <= 32, groups
// aligned to it); every lane of the warp must call this.
__device__ __forceinline__ uint32_t group_max(uint32_t amax_bits, int lanes) {
  for (int offset = 1; offset < lanes; offset <<= 1) {
    amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, offset));
  }
  return amax_bits;
}

// ------------------------------------------------------------------------------------------------
// Scale writes (DESIGN.md "Scale layouts"), one per group, by one lane of the group.
// ------------------------------------------------------------------------------------------------
struct ScaleOut {
  void* s;             // fp32 (row, col) or int32 words (ue8m0_packed)
  int64_t stride_row;  // in elements (fp32 or int32 words)
  int64_t stride_col;
  uint32_t groups;     // G, groups per row
};

template <bool kPacked>
__device__ __forceinline__ void store_scale(const ScaleOut& out, uint32_t m, uint32_t j, const GroupScale& g) {
  const int64_t row_offset = static_cast<int64_t>(m) * out.stride_row;
  if constexpr (kPacked) {
    // Byte j % 4 of word j / 4; the row's last group also zeroes the bytes of groups >= G in its word.
    uint8_t* word = static_cast<uint8_t*>(out.s) + 4 * (row_offset + static_cast<int64_t>(j / 4) * out.stride_col);
    word[j % 4] = static_cast<uint8_t>(g.exponent_byte);
    if (j + 1 == out.groups) {
      for (uint32_t k = j % 4 + 1; k < 4; ++k) word[k] = 0;
    }
  } else {
    static_cast<float*>(out.s)[row_offset + static_cast<int64_t>(j) * out.stride_col] = g.scale;
  }
}

}  // namespace fused
}  // namespace fp8linear
