// Per-element math of the CUDA kernels, shared by the device code and a host build (for checks on a
// machine without a GPU). Every operation matches lowrank_optim/kernels/reference.py bit for bit
// where the reference is deterministic, and the Triton kernels' random streams where it is not:
//   * float32 sums, products and quotients are rounded one at a time (no FMA contraction: the
//     __f*_rn intrinsics are never fused), division is IEEE (__fdiv_rn, even under --use_fast_math);
//   * Philox4x32-10 is Triton's tl.randint4x: key (seed low, seed high), counter (c low, c high, 0, 0);
//   * uniform() is tl.rand's uint32 → [0, 1) map.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define LRO_HD __host__ __device__ __forceinline__
#else
#define LRO_HD inline
#endif

namespace lro {

LRO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;  // host checks build with -ffp-contract=off
#endif
}

LRO_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

LRO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LRO_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LRO_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

LRO_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

struct Words {
  uint32_t w[4];
};

// Philox4x32 with 10 rounds, exactly as triton.language.random.philox_impl.
LRO_HD Words philox(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t a = c0, b = c2;
    c0 = mulhi(0xCD9E8D57u, b) ^ c1 ^ k0;
    c2 = mulhi(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * b;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words{{c0, c1, c2, c3}};
}

// tl.rand's map of a random word to [0, 1): 31 bits, the largest rounds to just below 1.
LRO_HD float uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return mul_rn(static_cast<float>(x), 4.6566127342e-10f);
}

// The min–max code of x: floor((x − lo)/scale + u) clamped to [0, levels]; u = 0.5 rounds to nearest.
LRO_HD uint8_t grouped_code(float x, float lo, float scale, float levels, float u) {
  const float q = floorf(add_rn(div_rn(sub_rn(x, lo), scale), u));
  return static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), levels));
}

// The scale of a group with range [lo, hi]: (hi − lo)/levels, or 1 for a constant group.
LRO_HD float grouped_scale(float lo, float hi, float levels) {
  const float scale = div_rn(sub_rn(hi, lo), levels);
  return scale > 0.0f ? scale : 1.0f;
}

// float32 bits → bfloat16 bits, adding 16 bits of noise below the cut: the magnitude rounds up with
// probability equal to the dropped fraction. inf passes through; NaN becomes 0x7FC0 (as torch writes it).
LRO_HD uint16_t stochastic_bf16(uint32_t bits, uint32_t noise16) {
  if ((bits & 0x7F800000u) == 0x7F800000u) {
    return (bits & 0x007FFFFFu) ? uint16_t{0x7FC0} : static_cast<uint16_t>(bits >> 16);
  }
  return static_cast<uint16_t>((bits + noise16) >> 16);
}

// float32 → bfloat16 bits rounded to nearest even, NaN → 0x7FC0: c10::BFloat16's conversion.
LRO_HD uint16_t bf16_rtne(float f) {
  const uint32_t u = float_bits(f);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// zero + scale·code, two roundings (the reference's order).
LRO_HD float dequantize(uint32_t code, float scale, float zero) {
  return add_rn(zero, mul_rn(scale, static_cast<float>(code)));
}

}  // namespace lro
