// Philox4x32-10 counter-based RNG (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as
// easy as 1, 2, 3", SC'11) and a branch-free Box-Muller transform to standard normals.
//
// One definition for host and device, so the CPU loop and the CUDA kernel draw the same random
// bits; the normals agree to ~1e-6 (FMA contraction differs, see fastmath.h).
// The noise for element i of the tensor with stream id s at step t under 64-bit seed k is
// lane (i mod 4) of normal4(k, i / 4, s, t): counter = (block lo, block hi, s, t), key = k.
#pragma once
#include <cstdint>

#include "common/fastmath.h"
#include "common/macros.h"

namespace pyfastbayes {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// ten rounds, key bumped between rounds; c is the counter in, r the 128 random bits out
PFB_HD void philox4x32_10(const uint32_t c[4], uint32_t k0, uint32_t k1, uint32_t r[4]) {
#if defined(__CUDA_ARCH__)
  uint32_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  r[0] = c0;
  r[1] = c1;
  r[2] = c2;
  r[3] = c3;
#else
  // Host: the portable rounds, every word zero-extended in 64 bits and hi/lo split by shifts. (gcc
  // vectorises these products as 64x64 vpmullq, not the one-uop vpmuludq: bulk CPU draws come from
  // cpu/philox_tile.cpp's intrinsics, bit for bit these rounds.)
  constexpr uint64_t kLo = 0xFFFFFFFFull;
  uint64_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], w0 = k0, w1 = k1;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = c0 * uint64_t(kPhiloxM0);
    const uint64_t p1 = c2 * uint64_t(kPhiloxM1);
    c0 = ((p1 >> 32) ^ c1 ^ w0) & kLo;
    c1 = p1 & kLo;
    c2 = ((p0 >> 32) ^ c3 ^ w1) & kLo;
    c3 = p0 & kLo;
    w0 = (w0 + kPhiloxW0) & kLo;
    w1 = (w1 + kPhiloxW1) & kLo;
  }
  r[0] = static_cast<uint32_t>(c0);
  r[1] = static_cast<uint32_t>(c1);
  r[2] = static_cast<uint32_t>(c2);
  r[3] = static_cast<uint32_t>(c3);
#endif
}

// uniform on (0, 1] from the top 24 bits: (k + 1) 2^-24, exact in fp32, never 0
PFB_HD float uniform_oc(uint32_t x) { return static_cast<float>((x >> 8) + 1u) * 5.9604644775390625e-08f; }
// uniform on [0, 1) from the top 24 bits
PFB_HD float uniform_co(uint32_t x) { return static_cast<float>(x >> 8) * 5.9604644775390625e-08f; }

// Box-Muller: (u1, u2) -> r cos(2 pi u2), r sin(2 pi u2), r = sqrt(-2 ln u1)
PFB_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float r = sqrtf(-2.0f * fast_logf(uniform_oc(a)));
  float s, c;
  fast_sincos_2pi(uniform_co(b), s, c);
  z0 = r * c;
  z1 = r * s;
}

// four standard normals for counter block `block` of stream `stream` at step `step`
PFB_HD void philox_normal4(uint64_t seed, uint64_t block, uint32_t stream, uint32_t step, float z[4]) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, step};
  uint32_t r[4];
  philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), r);
  box_muller(r[0], r[1], z[0], z[1]);
  box_muller(r[2], r[3], z[2], z[3]);
}

}  // namespace pyfastbayes
