// Branch-free fp32 log and sin/cos(2 pi t), written so that gcc vectorises loops over them and
// nvcc compiles them to plain FMAs: the same code runs on both sides, so CPU and CUDA noise agree
// to ~1e-6 (not bit for bit: nvcc contracts a * b + c into FMAs, the host compiler only in its
// AVX2 / AVX-512 clones), and typed_sqrt, the square root in the argument's own type.
// Accuracy (checked in tests/test_philox.py against float64): a few ulp on the ranges used here.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace pyfastbayes {
// a * b, a + b, a - b rounded once each on host and device: nvcc would contract a * b + c into
// one FMA (different rounding from the host's separate operations); where CPU and CUDA must agree
// to the bit (the SWAG moments), the device uses the _rn intrinsics, which are never contracted.
PFB_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PFB_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PFB_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PFB_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
PFB_HD float sub_rn(float a, float b) { return add_rn(a, -b); }
PFB_HD double sub_rn(double a, double b) { return add_rn(a, -b); }

// Square root in the argument's own type on host and device (fp32 stays fp32: an unqualified sqrt
// on a float resolves to ::sqrt(double) on the host).
PFB_HD float typed_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
PFB_HD double typed_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}


PFB_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}
PFB_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

// natural log for normal, positive, finite x
PFB_HD float fast_logf(float x) {
  // x = m 2^e with m in [sqrt(1/2), sqrt(2)): integer arithmetic on the bits, no branches
  const int32_t bits = static_cast<int32_t>(float_bits(x));
  const int32_t e = (bits - 0x3F3504F3) >> 23;  // 0x3F3504F3 = sqrt(1/2)
  const float m = bits_float(static_cast<uint32_t>(bits - (e << 23)));
  // log(1 + f) = f - f^2/2 + f^3 P(f), f in [sqrt(1/2) - 1, sqrt(2) - 1]: P is a degree-7 least-squares
  // fit (relative error of the log < 1.3e-7), no division; ln 2 split in two for the e term
  const float f = m - 1.0f;
  float p = -0.073628679f;
  p = p * f + 0.12620327f;
  p = p * f - 0.13202104f;
  p = p * f + 0.14227115f;
  p = p * f - 0.16621371f;
  p = p * f + 0.19999826f;
  p = p * f - 0.25000852f;
  p = p * f + 0.33333355f;
  const float ef = static_cast<float>(e);
  return ef * 0.693359375f + (f - 0.5f * f * f + f * f * f * p) + ef * -2.12194440e-4f;
}

// sin(2 pi t) and cos(2 pi t) for t in [0, 1)
PFB_HD void fast_sincos_2pi(float t, float& sn, float& cs) {
  const int32_t q = static_cast<int32_t>(4.0f * t + 0.5f);  // nearest quadrant 0..4 (t >= 0)
  const float x = (t - 0.25f * static_cast<float>(q)) * 6.28318531f;  // [-pi/4, pi/4]
  const float x2 = x * x;
  float sp = 2.7557319e-06f;  // 1/9!
  sp = sp * x2 - 1.9841270e-04f;
  sp = sp * x2 + 8.3333333e-03f;
  sp = sp * x2 - 1.6666667e-01f;
  const float s = x + x * x2 * sp;
  float cp = -2.7557319e-07f;  // -1/10!
  cp = cp * x2 + 2.4801587e-05f;
  cp = cp * x2 - 1.3888889e-03f;
  cp = cp * x2 + 4.1666668e-02f;
  cp = cp * x2 - 0.5f;
  const float c = 1.0f + x2 * cp;
  const int32_t qi = q & 3;
  const float a = (qi & 1) ? c : s;
  const float b = (qi & 1) ? s : c;
  sn = (qi & 2) ? -a : a;
  cs = ((qi + 1) & 2) ? -b : b;
}

// exp in the argument's own type on host and device (an unqualified exp of a float could resolve
// to the double overload on the host).
PFB_HD float typed_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
PFB_HD double typed_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

}  // namespace pyfastbayes
