// CPU kernels of the vi family. Math: common/vi.h (the CUDA kernels' functions); checks: checks/vi.h.
//
// Section 1 (reparameterised noise): at::parallel_for (OpenMP) over Philox blocks of 4 elements, a
// task owning whole blocks, so every block's 4 normals are drawn once, by one thread. Inside a task
// the noise is made kViBuf elements at a time into a stack buffer by fill_normal (cpu/random.cpp:
// the very function behind philox_normal_: cpu/philox_tile.h's bits, Box-Muller in AVX2 / AVX-512
// clones; the tensor's partial last block by the scalar philox_normal4, as philox_normal_ does), so
// eps is bit for bit philox_normal_'s on the same machine; then branch-free elementwise loops apply
// the rule (vi_noisy_f32 / _f64: target_clones, vectorised with the polynomial exp / log / log1p
// below instead of scalar libm calls, staged in short loops; fp16 / bf16 through float copies of
// the piece).
// Inputs are read through contiguous stand-ins (logical order = memory order: the noise is indexed
// by the logical element), except a first input that is one value broadcast to every element (all
// strides 0: flipout's zero mean), read as that value piece by piece instead of a materialised
// copy; the result is a new contiguous tensor. vi_rademacher_ writes its out in
// place, through a contiguous float32 temporary copied back when out is not a contiguous tensor of
// a kernel dtype; vi_rademacher_mul multiplies x's contiguous stand-in by the same signs into a new
// contiguous tensor.
//
// Section 2 (closed-form KL): the work items of cpu/multi_tensor.h (chunks of kChunk elements of
// one tensor) over all tensors of the lists, run by one at::parallel_for. vi_kl: each work item
// sums its terms in float32 runs of kViKlRun (64) terms (float64 for float64 inputs; each run in a
// fixed 16-lane order, vi_kl_sum) added into a float64 partial of its own slot; the partials are summed in work-item order afterwards, so the
// result does not depend on the number of threads. vi_kl_backward: elementwise into new contiguous
// tensors. Inputs are read through contiguous stand-ins (mu and rho must pair element by element).
//
// Section 3 (the local reparameterisation's weight variance): at::parallel_for over elements, a
// task walking kViBuf-element pieces through the staged sigma^2 loops (vi_sigma_sq_f32 / _f64, the
// target_clones of vi_sigma_sq_loop: exp into a stack scratch first, then softplus, its square and
// derivative); fp16 / bf16 through float copies of each piece. rho through a contiguous stand-in,
// sigma^2 a new contiguous tensor, grad updated in place (through a contiguous copy written back
// when it is not contiguous).
//
// Section 4 (a layer's weight function with its KL term): at::parallel_for over kViBuf-element
// pieces aligned from element 0 (for_each_aligned_piece), the noise of a piece drawn as section 1
// draws it (none for kind 2), then one staged loop (vi_weight_kl_f32 / _f64, vi_weight_grad_f32 /
// _f64: target_clones) per piece; vi_weight_kl sums each piece's terms by vi_kl's run rule into its
// own float64 slot, added in piece order (deterministic for any thread count). fp16 / bf16 through
// float copies of each piece; grad_rho / grad_mu through contiguous copies written back when needed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks/vi.h"
#include "common/layouts.h"
#include "common/vi.h"
#include "cpu/clones.h"
#include "cpu/multi_tensor.h"
#include "cpu/philox_tile.h"

namespace pyfastbayes::cpu {

// ======================= Section 1: reparameterised noise ======================================

// out[0 .. 128 nblocks) = the +-1 signs of Philox blocks first_block .. first_block + nblocks
// (common/vi.h: bit k of word w of a block is sign 32 w + k); the bits from philox_tile a tile at a
// time, the signs by integer code that each clone vectorises
PFB_CPU_CLONES
void fill_rademacher(uint64_t seed, uint32_t stream, uint32_t step, int64_t first_block, int64_t nblocks,
                     float* out) {
  alignas(64) uint32_t r[4][kPhiloxTile];
  for (int64_t t = 0; t < nblocks; t += kPhiloxTile) {
    const int64_t m = std::min(kPhiloxTile, nblocks - t);
    philox_tile(seed, stream, step, first_block + t, m, r);
    float* o = out + kViSignsPerBlock * t;
    for (int64_t b = 0; b < m; ++b)
      for (int w = 0; w < 4; ++w)
        for (int k = 0; k < 32; ++k) o[kViSignsPerBlock * b + 32 * w + k] = vi_rademacher_sign(r[w][b], k);
  }
}

// ---- Vectorisable transcendental functions (CPU only) ----------------------------------------
// Branch-free Cephes-style exp / log / log1p in float and double, written with float arithmetic,
// selects and unsigned bit operations only (no float<->int conversions, no calls), so that gcc
// vectorises the loops that inline them at the width of each target_clones body (AVX2 / AVX-512),
// where std::exp / std::log1p / std::log stay scalar libm calls. Accuracy: ~1-2 ulp over the
// domains the vi rules use them on (checked against libm in the commit that added them).

// exp(x): round(x / ln 2) by the 1.5 * 2^23 magic add, the reduced argument in two parts
// (C1 + C2 = ln 2), Cephes expf's polynomial, and the scale 2^n applied as two factors 2^n1 2^n2
// (each a normal float for n in [-150, 128], so subnormal results come out right). Below -104 the
// result is 0, above ~88.72 +inf; NaN stays NaN.
PFB_CPU_INLINE float vi_vexp(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |v| < 2^22 to an integer
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n1, 2^n2 with n1 = n / 2 rounded, n2 = n - n1: the low bits of v + magic are v + 2^22; shifted
  // left by 23 only v + 127 (in [52, 191]) stays, as the biased exponent of 2^v
  const float n1 = (n * 0.5f + kMagic) - kMagic;
  const float n2 = n - n1;
  const float s1 = std::bit_cast<float>(std::bit_cast<uint32_t>(n1 + (kMagic + 127.0f)) << 23);
  const float s2 = std::bit_cast<float>(std::bit_cast<uint32_t>(n2 + (kMagic + 127.0f)) << 23);
  const float y = p * s1 * s2;
  return x < -104.0f ? 0.0f : y;
}

PFB_CPU_INLINE double vi_vexp(double x) {
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  const double xc = x < -746.0 ? -746.0 : (x > 710.0 ? 710.0 : x);
  const double n = (xc * 1.4426950408889634073599 + kMagic) - kMagic;
  double r = xc - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  // Cephes exp: e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2))
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                         9.99999999999999999910e-1);
  const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                    2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
  const double p = 1.0 + 2.0 * (px / (q - px));
  const double n1 = (n * 0.5 + kMagic) - kMagic;
  const double n2 = n - n1;
  const double s1 = std::bit_cast<double>(std::bit_cast<uint64_t>(n1 + (kMagic + 1023.0)) << 52);
  const double s2 = std::bit_cast<double>(std::bit_cast<uint64_t>(n2 + (kMagic + 1023.0)) << 52);
  const double y = p * s1 * s2;
  return x < -746.0 ? 0.0 : y;
}

// log(x) for x a positive normal number or +inf (NaN stays NaN): x = m 2^e, m in [sqrt(1/2), sqrt(2)),
// Cephes logf's polynomial in f = m - 1, e ln 2 in two parts. The exponent field is read as a float
// by the 2^23 magic (or'ed into the mantissa of 2^23). Zero, subnormal and negative x are outside the
// domain (the callers select another value for them).
PFB_CPU_INLINE float vi_vlog(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const float ef = std::bit_cast<float>((bits >> 23) | 0x4b000000u) - 8388608.0f;  // biased exponent
  float m = std::bit_cast<float>((bits & 0x007fffffu) | 0x3f800000u);             // in [1, 2)
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  const float e = ef - (big ? 126.0f : 127.0f);
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * (z * p);
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  const float res = (f + y) + e * 0.693359375f;
  return x < std::numeric_limits<float>::infinity() ? res : x;  // +inf and NaN: themselves
}

PFB_CPU_INLINE double vi_vlog(double x) {
  const uint64_t bits = std::bit_cast<uint64_t>(x);
  const double ef = std::bit_cast<double>((bits >> 52) | 0x4330000000000000ull) - 4503599627370496.0;
  double m = std::bit_cast<double>((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
  const bool big = m > 1.4142135623730950488;
  m = big ? m * 0.5 : m;
  const double e = ef - (big ? 1022.0 : 1023.0);
  const double f = m - 1.0;
  const double z = f * f;
  // Cephes log: log(1 + f) = f - f^2 / 2 + f^3 P(f) / Q(f)
  const double p = ((((1.01875663804580931796e-4 * f + 4.97494994976747001425e-1) * f + 4.70579119878881725854e0) * f +
                     1.44989225341610930846e1) * f + 1.79368678507819816313e1) * f + 7.70838733755885391666e0;
  const double q = ((((f + 1.12873587189167450590e1) * f + 4.52279145837532221105e1) * f + 8.29875266912776603211e1) * f +
                    7.11544750618563894466e1) * f + 2.31251620126765340583e1;
  double y = f * (z * p / q);
  y = y - e * 2.121944400546905827679e-4;
  y = y - 0.5 * z;
  const double res = (f + y) + e * 0.693359375;
  return x < std::numeric_limits<double>::infinity() ? res : x;
}

// log1p(x) for x >= 0, +inf or NaN: u = 1 + x rounded, log(u) corrected by (x - (u - 1)) / u, the
// first-order term of the rounding error of u (exact to a few ulp; x below 2^-24 gives x)
template <class T>
PFB_CPU_INLINE T vi_vlog1p(T x) {
  const T u = T(1) + x;
  const T res = vi_vlog(u) + (x - (u - T(1))) / u;
  return x < std::numeric_limits<T>::infinity() ? res : x;  // +inf and NaN: themselves
}

// ---- The elementwise loops, compiled as target_clones (default / AVX2+FMA / AVX-512) -----------
// Each rule is common/vi.h's, computed branch-free: both sides of a threshold are evaluated and
// the right one selected, with the vectorisable exp / log / log1p above in place of libm's (same
// formulas, same operation order, results within ~2 ulp of the libm ones). fp16 / bf16 run the
// float loops on converted copies (so they are the fp32 op on the converted inputs, bit for bit).
// Staged: a loop whose body chains several of these functions (exp -> log1p -> log: ~60 dependent
// vector operations) is latency-bound, because the out-of-order window holds only about two of
// its iterations; so each such loop is split into short loops over the piece (exp into the output
// or a stack buffer, then the rest), whose iterations overlap (the KL terms: 2.5 -> 1.5 ns per
// element on one AVX-512 core). Every loop that uses e = exp(rho) stores it first, so the rules
// that must agree bit for bit (vi_sample_and_backward and the two ops) round it the same way.

// softplus (threshold 20) and its derivative from rho and e = exp(rho)
template <class T>
PFB_CPU_INLINE T vi_vsoftplus(T rho, T e) {
  return rho > T(kViSoftplusThreshold) ? rho : vi_vlog1p(e);
}
template <class T>
PFB_CPU_INLINE T vi_vsoftplus_grad(T rho, T e) {
  return rho > T(kViSoftplusThreshold) ? T(1) : e / (T(1) + e);
}

// common/vi.h's vi_softplus_parts branch-free, from rho and e = exp(rho): sigma = softplus(rho),
// ds = softplus'(rho), ratio = ds / sigma (1 below -20, 1 / rho above 20): the KL gradients' parts
template <class T>
PFB_CPU_INLINE void vi_vsoftplus_parts(T rho, T e, T& sigma, T& ds, T& ratio) {
  const bool big = rho > T(kViSoftplusThreshold);
  sigma = big ? rho : vi_vlog1p(e);
  ds = big ? T(1) : e / (T(1) + e);
  ratio = big ? T(1) / rho : (rho < T(-kViSoftplusThreshold) ? T(1) : ds / sigma);
}

enum class ViNoisy : int { kSample, kSampleBackward, kLocalNoise, kLocalNoiseBackward };

// out[k] = rule(a[k], b[k], z[k]) for k < n (ViSampleRule, ViSampleBackwardRule, ViLocalNoiseRule,
// ViLocalNoiseBackwardRule of common/vi.h)
template <class T>
PFB_CPU_INLINE void vi_noisy_loop(ViNoisy op, const T* __restrict a, const T* __restrict b, const float* __restrict z,
                                 T* __restrict out, int64_t n) {
  switch (op) {
    case ViNoisy::kSample:  // staged: e = exp(b) into out first
      for (int64_t k = 0; k < n; ++k) out[k] = vi_vexp(b[k]);
      for (int64_t k = 0; k < n; ++k) out[k] = a[k] + vi_vsoftplus(b[k], out[k]) * static_cast<T>(z[k]);
      break;
    case ViNoisy::kSampleBackward:
      for (int64_t k = 0; k < n; ++k) out[k] = vi_vexp(b[k]);
      for (int64_t k = 0; k < n; ++k) out[k] = a[k] * static_cast<T>(z[k]) * vi_vsoftplus_grad(b[k], out[k]);
      break;
    case ViNoisy::kLocalNoise:
      for (int64_t k = 0; k < n; ++k) {
        const T v = b[k] < T(0) ? T(0) : b[k];
        out[k] = a[k] + std::sqrt(v) * static_cast<T>(z[k]);
      }
      break;
    case ViNoisy::kLocalNoiseBackward:
      for (int64_t k = 0; k < n; ++k) {
        const T g = a[k] * static_cast<T>(z[k]) / (T(2) * std::sqrt(b[k]));
        out[k] = b[k] <= T(0) ? T(0) : g;
      }
      break;
  }
}

// vi_sample_and_backward: w[k] = the kSample rule, gr[k] = the kSampleBackward rule, one eps and one
// exp(rho) for both (the same expressions as vi_noisy_loop's: bit for bit the two ops' results)
template <class T>
PFB_CPU_INLINE void vi_sample_grad_loop(const T* __restrict mu, const T* __restrict rho, const T* __restrict gw,
                                       const float* __restrict z, T* __restrict w, T* __restrict gr, int64_t n) {
  for (int64_t k = 0; k < n; ++k) gr[k] = vi_vexp(rho[k]);  // staged: e into gr first
  for (int64_t k = 0; k < n; ++k) {
    const T e = gr[k];
    const T eps = static_cast<T>(z[k]);
    w[k] = mu[k] + vi_vsoftplus(rho[k], e) * eps;
    gr[k] = gw[k] * eps * vi_vsoftplus_grad(rho[k], e);
  }
}

PFB_CPU_CLONES void vi_sample_grad_f32(const float* mu, const float* rho, const float* gw, const float* z, float* w,
                                      float* gr, int64_t n) {
  vi_sample_grad_loop(mu, rho, gw, z, w, gr, n);
}
PFB_CPU_CLONES void vi_sample_grad_f64(const double* mu, const double* rho, const double* gw, const float* z,
                                      double* w, double* gr, int64_t n) {
  vi_sample_grad_loop(mu, rho, gw, z, w, gr, n);
}

PFB_CPU_CLONES void vi_noisy_f32(ViNoisy op, const float* a, const float* b, const float* z, float* out, int64_t n) {
  vi_noisy_loop(op, a, b, z, out, n);
}
PFB_CPU_CLONES void vi_noisy_f64(ViNoisy op, const double* a, const double* b, const float* z, double* out,
                                int64_t n) {
  vi_noisy_loop(op, a, b, z, out, n);
}

// vi_kl_term of common/vi.h for k < n into t
template <class T>
PFB_CPU_INLINE void vi_kl_terms(const T* __restrict mu, const T* __restrict rho, int64_t n, T half_log_v, T inv_2v,
                               T* __restrict t) {
  for (int64_t k = 0; k < n; ++k) t[k] = vi_vexp(rho[k]);  // staged: e, sigma, then the term
  for (int64_t k = 0; k < n; ++k) t[k] = vi_vsoftplus(rho[k], t[k]);
  for (int64_t k = 0; k < n; ++k) {
    const T r = rho[k], sigma = t[k];
    const T log_sigma = r < T(-kViSoftplusThreshold) ? r : vi_vlog(sigma);
    t[k] = half_log_v - log_sigma + (sigma * sigma + mu[k] * mu[k]) * inv_2v - T(0.5);
  }
}

// total += the sums of the runs of kViKlRun terms of elements [0, n), run by run in order. A run is
// summed in a fixed order independent of the clone: 16 lanes, lane j adding terms j, j + 16, j + 32,
// j + 48 in turn, then the lanes by a fixed halving tree; a short last run is padded with zeros.
// total += the run sums of the m terms t[0 .. m) (t has room up to m rounded up to kViKlRun: the
// short last run is padded with zeros there)
template <class T>
PFB_CPU_INLINE void vi_kl_add_runs(T* t, int64_t m, double& total) {
  static_assert(kViKlRun == 64, "the lane sum below covers 64 terms");
  const int64_t padded = (m + kViKlRun - 1) / kViKlRun * kViKlRun;
  for (int64_t k = m; k < padded; ++k) t[k] = T(0);
  for (int64_t r = 0; r < padded; r += kViKlRun) {
    T acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = ((t[r + j] + t[r + 16 + j]) + t[r + 32 + j]) + t[r + 48 + j];
    for (int w = 8; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
    total += static_cast<double>(acc[0]);
  }
}

template <class T>
PFB_CPU_INLINE void vi_kl_sum(const T* mu, const T* rho, int64_t n, T half_log_v, T inv_2v, double& total) {
  constexpr int64_t kBlock = 1024;  // terms per vectorised pass (a multiple of kViKlRun)
  alignas(64) T t[kBlock];
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t m = std::min(kBlock, n - s);
    vi_kl_terms(mu + s, rho + s, m, half_log_v, inv_2v, t);
    vi_kl_add_runs(t, m, total);
  }
}

PFB_CPU_CLONES void vi_kl_sum_f32(const float* mu, const float* rho, int64_t n, float half_log_v, float inv_2v,
                                 double& total) {
  vi_kl_sum(mu, rho, n, half_log_v, inv_2v, total);
}
PFB_CPU_CLONES void vi_kl_sum_f64(const double* mu, const double* rho, int64_t n, double half_log_v, double inv_2v,
                                 double& total) {
  vi_kl_sum(mu, rho, n, half_log_v, inv_2v, total);
}

// vi_kl_grad of common/vi.h for k < n
template <class T>
PFB_CPU_INLINE void vi_kl_grad_loop(const T* __restrict mu, const T* __restrict rho, int64_t n, T g, T inv_v,
                                   T* __restrict gm, T* __restrict gr) {
  constexpr int64_t kStage = 1024;  // staged a piece at a time, so that e stays in L1
  for (int64_t s = 0; s < n; s += kStage) {
    const int64_t m = std::min(kStage, n - s);
    const T* __restrict rs = rho + s;
    T* __restrict gs = gr + s;
    for (int64_t k = 0; k < m; ++k) gs[k] = vi_vexp(rs[k]);  // staged: e into gr first
    for (int64_t k = 0; k < m; ++k) {
      T sigma, ds, ratio;
      vi_vsoftplus_parts(rs[k], gs[k], sigma, ds, ratio);
      gs[k] = g * (sigma * ds * inv_v - ratio);
    }
  }
  for (int64_t k = 0; k < n; ++k) gm[k] = g * mu[k] * inv_v;
}

PFB_CPU_CLONES void vi_kl_grad_f32(const float* mu, const float* rho, int64_t n, float g, float inv_v, float* gm,
                                  float* gr) {
  vi_kl_grad_loop(mu, rho, n, g, inv_v, gm, gr);
}
PFB_CPU_CLONES void vi_kl_grad_f64(const double* mu, const double* rho, int64_t n, double g, double inv_v,
                                  double* gm, double* gr) {
  vi_kl_grad_loop(mu, rho, n, g, inv_v, gm, gr);
}

// ---- Section 3's loops: sigma^2 = softplus(rho)^2 and its gradient ------------------------------
// s2[k] = ViSigmaSqRule(rho[k]) when s2 is given, gr[k] = ViSigmaSqBackwardRule(gr[k], rho[k]) (in place:
// gr holds the incoming gradient) when gr is given, k < n <= kViBuf. Staged as the section 1 loops:
// e = exp(rho) into the scratch e first, then softplus, its square and derivative from it: the three
// ops run the same expressions on the same e, so vi_sigma_sq_and_backward_ is bit for bit the other two.
template <class T>
PFB_CPU_INLINE void vi_sigma_sq_loop(const T* __restrict rho, T* __restrict gr, T* __restrict s2, T* __restrict e,
                                    int64_t n) {
  for (int64_t k = 0; k < n; ++k) e[k] = vi_vexp(rho[k]);
  if (gr == nullptr) {
    for (int64_t k = 0; k < n; ++k) {
      const T s = vi_vsoftplus(rho[k], e[k]);
      s2[k] = s * s;
    }
  } else if (s2 == nullptr) {
    for (int64_t k = 0; k < n; ++k) gr[k] = gr[k] * (T(2) * vi_vsoftplus(rho[k], e[k]) * vi_vsoftplus_grad(rho[k], e[k]));
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const T s = vi_vsoftplus(rho[k], e[k]);
      s2[k] = s * s;
      gr[k] = gr[k] * (T(2) * s * vi_vsoftplus_grad(rho[k], e[k]));
    }
  }
}

PFB_CPU_CLONES void vi_sigma_sq_f32(const float* rho, float* gr, float* s2, float* e, int64_t n) {
  vi_sigma_sq_loop(rho, gr, s2, e, n);
}
PFB_CPU_CLONES void vi_sigma_sq_f64(const double* rho, double* gr, double* s2, double* e, int64_t n) {
  vi_sigma_sq_loop(rho, gr, s2, e, n);
}

// ---- Section 4's loops: a layer's weight function with its KL term ---------------------------
// Staged as the loops above (e = exp(rho) stored first); the same expressions as vi_kl_terms for the
// terms and as the section 1 / 3 rules for w and the data gradients. K: kViWeightSample /
// kViWeightPerturbation / kViWeightVariance (common/vi.h); z (the noise) is not read for the latter.

// w[k] of kind K and the KL terms into t[k], k < n (t: scratch of at least n rounded up to kViKlRun),
// then total += their run sums (vi_kl_add_runs)
template <int K, class T>
PFB_CPU_INLINE void vi_weight_kl_loop(const T* __restrict mu, const T* __restrict rho, const float* __restrict z,
                                     T* __restrict w, T* __restrict t, int64_t n, T half_log_v, T inv_2v,
                                     double& total) {
  for (int64_t k = 0; k < n; ++k) t[k] = vi_vexp(rho[k]);
  for (int64_t k = 0; k < n; ++k) t[k] = vi_vsoftplus(rho[k], t[k]);
  for (int64_t k = 0; k < n; ++k) {
    if constexpr (K == kViWeightVariance) {
      w[k] = t[k] * t[k];
    } else {
      w[k] = vi_weight_value<K>(mu[k], t[k], static_cast<T>(z[k]));
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const T r = rho[k], sigma = t[k];
    const T log_sigma = r < T(-kViSoftplusThreshold) ? r : vi_vlog(sigma);
    t[k] = half_log_v - log_sigma + (sigma * sigma + mu[k] * mu[k]) * inv_2v - T(0.5);
  }
  vi_kl_add_runs(t, n, total);
}

// vi_weight_grad of common/vi.h for k < n: gr (in: dL/dw, out: dL/drho), gm (in: other paths, not
// read for kind 0; out: dL/dmu), w when W; e: scratch for exp(rho)
template <int K, bool W, class T>
PFB_CPU_INLINE void vi_weight_grad_loop(const T* __restrict mu, const T* __restrict rho, const float* __restrict z,
                                       T* __restrict gr, T* __restrict gm, T* __restrict w, T* __restrict e,
                                       int64_t n, T g, T inv_v) {
  for (int64_t k = 0; k < n; ++k) e[k] = vi_vexp(rho[k]);
  for (int64_t k = 0; k < n; ++k) {
    T sigma, ds, ratio;
    vi_vsoftplus_parts(rho[k], e[k], sigma, ds, ratio);
    const T d = gr[k];
    T eps = T(0), data;
    if constexpr (K == kViWeightVariance) {
      data = d * (T(2) * sigma * ds);
    } else {
      eps = static_cast<T>(z[k]);
      data = d * eps * ds;
    }
    gr[k] = data + g * (sigma * ds * inv_v - ratio);
    gm[k] = (K == kViWeightSample ? d : gm[k]) + g * mu[k] * inv_v;
    if constexpr (W) w[k] = vi_weight_value<K>(mu[k], sigma, eps);
  }
}

template <class T>
PFB_CPU_INLINE void vi_weight_kl_kind(int kind, const T* mu, const T* rho, const float* z, T* w, int64_t n,
                                     T half_log_v, T inv_2v, double& total) {
  alignas(64) T t[1024];  // n <= kViBuf (1024), a multiple of kViKlRun
  switch (kind) {
    case kViWeightSample: vi_weight_kl_loop<kViWeightSample>(mu, rho, z, w, t, n, half_log_v, inv_2v, total); break;
    case kViWeightPerturbation:
      vi_weight_kl_loop<kViWeightPerturbation>(mu, rho, z, w, t, n, half_log_v, inv_2v, total);
      break;
    default: vi_weight_kl_loop<kViWeightVariance>(mu, rho, z, w, t, n, half_log_v, inv_2v, total); break;
  }
}

template <class T>
PFB_CPU_INLINE void vi_weight_grad_kind(int kind, bool want_w, const T* mu, const T* rho, const float* z, T* gr,
                                       T* gm, T* w, int64_t n, T g, T inv_v) {
  alignas(64) T e[1024];  // n <= kViBuf (1024)
  switch (kind * 2 + (want_w ? 1 : 0)) {
    case 0: vi_weight_grad_loop<kViWeightSample, false>(mu, rho, z, gr, gm, w, e, n, g, inv_v); break;
    case 1: vi_weight_grad_loop<kViWeightSample, true>(mu, rho, z, gr, gm, w, e, n, g, inv_v); break;
    case 2: vi_weight_grad_loop<kViWeightPerturbation, false>(mu, rho, z, gr, gm, w, e, n, g, inv_v); break;
    case 3: vi_weight_grad_loop<kViWeightPerturbation, true>(mu, rho, z, gr, gm, w, e, n, g, inv_v); break;
    case 4: vi_weight_grad_loop<kViWeightVariance, false>(mu, rho, z, gr, gm, w, e, n, g, inv_v); break;
    default: vi_weight_grad_loop<kViWeightVariance, true>(mu, rho, z, gr, gm, w, e, n, g, inv_v); break;
  }
}

PFB_CPU_CLONES void vi_weight_kl_f32(int kind, const float* mu, const float* rho, const float* z, float* w, int64_t n,
                                    float half_log_v, float inv_2v, double& total) {
  vi_weight_kl_kind(kind, mu, rho, z, w, n, half_log_v, inv_2v, total);
}
PFB_CPU_CLONES void vi_weight_kl_f64(int kind, const double* mu, const double* rho, const float* z, double* w,
                                    int64_t n, double half_log_v, double inv_2v, double& total) {
  vi_weight_kl_kind(kind, mu, rho, z, w, n, half_log_v, inv_2v, total);
}
PFB_CPU_CLONES void vi_weight_grad_f32(int kind, bool want_w, const float* mu, const float* rho, const float* z,
                                      float* gr, float* gm, float* w, int64_t n, float g, float inv_v) {
  vi_weight_grad_kind(kind, want_w, mu, rho, z, gr, gm, w, n, g, inv_v);
}
PFB_CPU_CLONES void vi_weight_grad_f64(int kind, bool want_w, const double* mu, const double* rho, const float* z,
                                      double* gr, double* gm, double* w, int64_t n, double g, double inv_v) {
  vi_weight_grad_kind(kind, want_w, mu, rho, z, gr, gm, w, n, g, inv_v);
}

namespace {

constexpr int64_t kViBuf = 1024;          // noise values per inner piece (a multiple of 4): 4 KiB on the stack
constexpr int64_t kViGrainBlocks = 4096;  // at least this many Philox blocks (16 K elements) per task

struct RngPosition {
  uint64_t seed;
  uint32_t step;
};

// rng = (seed, step): the seed's 64 bits, the step's low 32 (as the SG-MCMC kernels read it)
RngPosition read_rng(const at::Tensor& rng) {
  const int64_t* r = rng.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(r[kRngSeed]), static_cast<uint32_t>(r[kRngStep])};
}

// The float / double loop of op over one piece (the float loop for fp16 / bf16 too)
inline void noisy_piece(ViNoisy op, const float* a, const float* b, const float* z, float* out, int64_t n) {
  vi_noisy_f32(op, a, b, z, out, n);
}
inline void noisy_piece(ViNoisy op, const double* a, const double* b, const float* z, double* out, int64_t n) {
  vi_noisy_f64(op, a, b, z, out, n);
}

// z[k] = eps of element s + k, k < m <= kViBuf, s a multiple of 4: fill_normal's whole blocks, and
// the tensor's partial last block (only the last piece has one) drawn as philox_normal_ draws it,
// by the scalar philox_normal4, not by fill_normal's clone (whose FMAs may round the normals an
// ulp differently), so eps stays bit for bit philox_normal_'s; 4 whole + 4 <= kViBuf
inline void fill_piece_noise(RngPosition pos, uint32_t stream, int64_t s, int64_t m, float* z) {
  const int64_t whole = m / 4;
  fill_normal(pos.seed, stream, pos.step, s / 4, whole, z);
  if (m > 4 * whole) philox_normal4(pos.seed, static_cast<uint64_t>(s / 4 + whole), stream, pos.step, z + 4 * whole);
}

// Walks [0, n) in pieces of at most kViBuf elements (tasks of at least kViGrainBlocks Philox blocks)
// and calls piece(s, m, z) with z[k] = eps of element s + k, k < m: the noise of every noisy op
template <class Piece>
void for_each_noise_piece(int64_t n, RngPosition pos, uint32_t stream, const Piece& piece) {
  at::parallel_for(0, (n + 3) / 4, kViGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kViBuf];
    const int64_t end = std::min(4 * b1, n);
    for (int64_t s = 4 * b0; s < end; s += kViBuf) {  // s: a multiple of 4, the start of a block
      const int64_t m = std::min(kViBuf, end - s);
      fill_piece_noise(pos, stream, s, m, z);
      piece(s, m, z);
    }
  });
}

// Section 4's walk: [0, n) in pieces [p kViBuf, (p + 1) kViBuf) whose bounds do not depend on the
// tasks (so a per-piece partial sum, added in piece order, does not depend on the thread count);
// piece(p, s, m, z) with z the noise of elements s .. s + m (nullptr when !noise)
template <class Piece>
void for_each_aligned_piece(int64_t n, bool noise, RngPosition pos, uint32_t stream, const Piece& piece) {
  at::parallel_for(0, (n + kViBuf - 1) / kViBuf, kViGrainBlocks * 4 / kViBuf, [&](int64_t p0, int64_t p1) {
    alignas(64) float z[kViBuf];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s = p * kViBuf, m = std::min(kViBuf, n - s);
      if (noise) fill_piece_noise(pos, stream, s, m, z);
      piece(p, s, m, noise ? z : nullptr);
    }
  });
}

// The piece [s, s + m) of input p: p + s, or (bcast: p holds one value) buf filled with it.
template <class T>
const T* piece_of(const T* p, bool bcast, int64_t s, int64_t m, T* buf) {
  if (!bcast) return p + s;
  std::fill_n(buf, m, p[0]);
  return buf;
}

// out[i] = op's rule(a[i], b[i], eps_i) for i < n, all three contiguous (a may be one broadcast
// value: a_bcast); math in op_t
template <class scalar_t>
void noisy_pair(ViNoisy op, const scalar_t* a, bool a_bcast, const scalar_t* b, scalar_t* out, int64_t n,
                RngPosition pos, uint32_t stream) {
  using op_t = at::opmath_type<scalar_t>;
  for_each_noise_piece(n, pos, stream, [&](int64_t s, int64_t m, const float* z) {
    alignas(64) scalar_t abuf[kViBuf];
    const scalar_t* ap = piece_of(a, a_bcast, s, m, abuf);  // a's piece: element k is ap[k]
    if constexpr (std::is_same_v<scalar_t, op_t>) {  // fp32 / fp64: no conversion buffers
      noisy_piece(op, ap, b + s, z, out + s, m);
    } else {  // fp16 / bf16: the piece's inputs converted to float, the float result converted back
      alignas(64) op_t ca[kViBuf], cb[kViBuf], co[kViBuf];
      for (int64_t k = 0; k < m; ++k) {
        ca[k] = static_cast<op_t>(ap[k]);
        cb[k] = static_cast<op_t>(b[s + k]);
      }
      noisy_piece(op, ca, cb, z, co, m);
      for (int64_t k = 0; k < m; ++k) out[s + k] = static_cast<scalar_t>(co[k]);
    }
  });
}

// The entry point of a two-input noisy op: checks, contiguous stand-ins, a new contiguous result.
at::Tensor noisy_pair_cpu(ViNoisy kind, const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                          const char* b_name, const at::Tensor& rng, int64_t stream) {
  check_vi_pair(op, a, a_name, b, b_name, rng, stream, c10::DeviceType::CPU);
  at::Tensor out = at::empty(a.sizes(), a.options());  // contiguous
  const int64_t n = a.numel();
  if (n == 0) return out;
  const at::Tensor ac = input_stand_in(a), bc = b.contiguous();
  const RngPosition pos = read_rng(rng);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "vi_noisy_pair", [&] {
    noisy_pair<scalar_t>(kind, ac.const_data_ptr<scalar_t>(), broadcast_scalar(ac), bc.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(), n, pos, static_cast<uint32_t>(stream));
  });
  return out;
}

at::Tensor vi_sample_cpu(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& rng, int64_t stream) {
  return noisy_pair_cpu(ViNoisy::kSample, "vi_sample", mu, "mu", rho, "rho", rng, stream);
}

at::Tensor vi_sample_backward_cpu(const at::Tensor& grad_w, const at::Tensor& rho, const at::Tensor& rng,
                                  int64_t stream) {
  return noisy_pair_cpu(ViNoisy::kSampleBackward, "vi_sample_backward", grad_w, "grad_w", rho, "rho", rng, stream);
}

inline void sample_grad_piece(const float* mu, const float* rho, const float* gw, const float* z, float* w, float* gr,
                              int64_t n) {
  vi_sample_grad_f32(mu, rho, gw, z, w, gr, n);
}
inline void sample_grad_piece(const double* mu, const double* rho, const double* gw, const float* z, double* w,
                              double* gr, int64_t n) {
  vi_sample_grad_f64(mu, rho, gw, z, w, gr, n);
}

// vi_sample_and_backward over n contiguous elements (mu may be one broadcast value: mu_bcast), the
// noise drawn as noisy_pair draws it
template <class scalar_t>
void sample_and_backward(const scalar_t* mu, bool mu_bcast, const scalar_t* rho, const scalar_t* gw, scalar_t* w,
                         scalar_t* gr, int64_t n, RngPosition pos, uint32_t stream) {
  using op_t = at::opmath_type<scalar_t>;
  for_each_noise_piece(n, pos, stream, [&](int64_t s, int64_t m, const float* z) {
    alignas(64) scalar_t mbuf[kViBuf];
    const scalar_t* mp = piece_of(mu, mu_bcast, s, m, mbuf);  // mu's piece: element k is mp[k]
    if constexpr (std::is_same_v<scalar_t, op_t>) {
      sample_grad_piece(mp, rho + s, gw + s, z, w + s, gr + s, m);
    } else {  // fp16 / bf16: mu, rho, grad_w, w, grad_rho of the piece in float
      alignas(64) op_t c[5][kViBuf];
      for (int64_t k = 0; k < m; ++k) {
        c[0][k] = static_cast<op_t>(mp[k]);
        c[1][k] = static_cast<op_t>(rho[s + k]);
        c[2][k] = static_cast<op_t>(gw[s + k]);
      }
      sample_grad_piece(c[0], c[1], c[2], z, c[3], c[4], m);
      for (int64_t k = 0; k < m; ++k) {
        w[s + k] = static_cast<scalar_t>(c[3][k]);
        gr[s + k] = static_cast<scalar_t>(c[4][k]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vi_sample_and_backward_cpu(const at::Tensor& mu, const at::Tensor& rho,
                                                              const at::Tensor& grad_w, const at::Tensor& rng,
                                                              int64_t stream) {
  check_vi_sample_and_backward(mu, rho, grad_w, rng, stream, c10::DeviceType::CPU);
  at::Tensor w = at::empty(mu.sizes(), mu.options()), gr = at::empty(mu.sizes(), mu.options());  // contiguous
  const int64_t n = mu.numel();
  if (n == 0) return {w, gr};
  const at::Tensor mc = input_stand_in(mu), rc = rho.contiguous(), gc = grad_w.contiguous();
  const RngPosition pos = read_rng(rng);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vi_sample_and_backward", [&] {
    sample_and_backward<scalar_t>(mc.const_data_ptr<scalar_t>(), broadcast_scalar(mc), rc.const_data_ptr<scalar_t>(),
                                  gc.const_data_ptr<scalar_t>(), w.mutable_data_ptr<scalar_t>(),
                                  gr.mutable_data_ptr<scalar_t>(), n, pos, static_cast<uint32_t>(stream));
  });
  return {w, gr};
}

at::Tensor vi_local_noise_cpu(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& rng, int64_t stream) {
  return noisy_pair_cpu(ViNoisy::kLocalNoise, "vi_local_noise", mean, "mean", var, "var", rng, stream);
}

at::Tensor vi_local_noise_backward_cpu(const at::Tensor& grad_out, const at::Tensor& var, const at::Tensor& rng,
                                       int64_t stream) {
  return noisy_pair_cpu(ViNoisy::kLocalNoiseBackward, "vi_local_noise_backward", grad_out, "grad_out", var, "var", rng,
                                                  stream);
}

// Walks the sign stream of [0, n) in pieces of one Philox tile (kPhiloxTile * 128 signs; tasks of at
// least kViGrainBlocks * 4 signs, as the noise ops' tasks of elements) and calls piece(s, m, sign)
// with sign[k] = the +-1 of element s + k, k < m: vi_rademacher_ and vi_rademacher_mul
template <class Piece>
void for_each_sign_piece(int64_t n, RngPosition pos, uint32_t stream, const Piece& piece) {
  constexpr int64_t per = kViSignsPerBlock;
  constexpr int64_t tile = kPhiloxTile * per;
  at::parallel_for(0, (n + per - 1) / per, kViGrainBlocks * 4 / per, [&](int64_t b0, int64_t b1) {
    alignas(64) float sign[tile];  // 32 KiB
    const int64_t end = std::min(per * b1, n);
    for (int64_t s = per * b0; s < end; s += tile) {
      const int64_t m = std::min(tile, end - s);
      fill_rademacher(pos.seed, stream, pos.step, s / per, (m + per - 1) / per, sign);
      piece(s, m, sign);
    }
  });
}

void vi_rademacher_cpu(const at::Tensor& out, const at::Tensor& rng, int64_t stream) {
  check_vi_rademacher(out, rng, stream, c10::DeviceType::CPU);
  const int64_t n = out.numel();
  if (n == 0) return;
  const bool direct = kernel_float_dtype(out.scalar_type()) && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({n}, out.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "vi_rademacher_", [&] {
    scalar_t* o = buf.mutable_data_ptr<scalar_t>();
    for_each_sign_piece(n, read_rng(rng), static_cast<uint32_t>(stream), [&](int64_t s, int64_t m, const float* sign) {
      for (int64_t k = 0; k < m; ++k) o[s + k] = static_cast<scalar_t>(sign[k]);
    });
  });
  if (!direct) out.copy_(buf.view(out.sizes()));  // +-1 is exact in every floating dtype
}

// x * s into a new contiguous tensor, x read through a contiguous stand-in (the signs are indexed by
// the logical element); the product is exact (x or -x), computed in the op math type
at::Tensor vi_rademacher_mul_cpu(const at::Tensor& x, const at::Tensor& rng, int64_t stream) {
  check_vi_rademacher_mul(x, rng, stream, c10::DeviceType::CPU);
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous
  const int64_t n = x.numel();
  if (n == 0) return out;
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vi_rademacher_mul", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_sign_piece(n, read_rng(rng), static_cast<uint32_t>(stream), [&](int64_t s, int64_t m, const float* sign) {
      for (int64_t k = 0; k < m; ++k) o[s + k] = static_cast<scalar_t>(static_cast<op_t>(xp[s + k]) * sign[k]);
    });
  });
  return out;
}

// ======================= end of section 1 ======================================================

// ======================= Section 2: closed-form KL of mean-field Gaussians =====================

// The per-tensor prior constants (common/vi.h: ViKlPrior), from a contiguous float64 prior_var
template <class op_t>
std::vector<ViKlPrior<op_t>> kl_priors(const at::Tensor& prior_var) {
  const at::Tensor pv = prior_var.contiguous();
  const double* v = pv.const_data_ptr<double>();
  std::vector<ViKlPrior<op_t>> out;
  out.reserve(static_cast<size_t>(pv.numel()));
  for (int64_t t = 0; t < pv.numel(); ++t) out.push_back(ViKlPrior<op_t>::make(v[t]));
  return out;
}

// The sum of the terms of elements [b, e) of one tensor: runs of kViKlRun terms summed in op_t
// (vi_kl_sum: a fixed lane order), each added to a float64 total in order. fp16 / bf16 convert
// kViBuf elements at a time (a multiple of kViKlRun: the runs are those of the float32 op)
inline void kl_piece(const float* mu, const float* rho, int64_t n, const ViKlPrior<float>& p, double& total) {
  vi_kl_sum_f32(mu, rho, n, p.half_log_v, p.inv_2v, total);
}
inline void kl_piece(const double* mu, const double* rho, int64_t n, const ViKlPrior<double>& p, double& total) {
  vi_kl_sum_f64(mu, rho, n, p.half_log_v, p.inv_2v, total);
}

template <class scalar_t>
double kl_range(const scalar_t* mu, const scalar_t* rho, int64_t b, int64_t e,
                const ViKlPrior<at::opmath_type<scalar_t>>& prior) {
  using op_t = at::opmath_type<scalar_t>;
  double total = 0.0;
  if constexpr (std::is_same_v<scalar_t, op_t>) {
    kl_piece(mu + b, rho + b, e - b, prior, total);
  } else {
    static_assert(kViBuf % kViKlRun == 0);
    alignas(64) op_t cm[kViBuf], cr[kViBuf];
    for (int64_t s = b; s < e; s += kViBuf) {
      const int64_t m = std::min(kViBuf, e - s);
      for (int64_t k = 0; k < m; ++k) {
        cm[k] = static_cast<op_t>(mu[s + k]);
        cr[k] = static_cast<op_t>(rho[s + k]);
      }
      kl_piece(cm, cr, m, prior, total);
    }
  }
  return total;
}

at::Tensor vi_kl_cpu(at::TensorList mus, at::TensorList rhos, const at::Tensor& prior_var) {
  check_vi_kl("vi_kl", mus, rhos, prior_var, c10::DeviceType::CPU);
  const auto dtype = mus[0].scalar_type();
  const auto ms = contiguous_list(mus), rs = contiguous_list(rhos);
  std::vector<int64_t> numels;
  for (const auto& m : ms) numels.push_back(m.numel());
  const auto chunks = make_chunks(numels);
  std::vector<double> partial(chunks.size(), 0.0);  // one slot per work item: no shared accumulator
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vi_kl", [&] {
    const auto priors = kl_priors<at::opmath_type<scalar_t>>(prior_var);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Chunk& c = chunks[i];
        partial[i] = kl_range(ms[c.tensor].const_data_ptr<scalar_t>(), rs[c.tensor].const_data_ptr<scalar_t>(),
                              c.begin, c.end, priors[c.tensor]);
      }
    });
  });
  double total = 0.0;
  for (const double p : partial) total += p;  // work-item order: deterministic
  const auto rdtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(total, at::TensorOptions().dtype(rdtype).device(mus[0].device()));
}

// vi_kl_grad over n elements by the float / double clones
inline void kl_grad_piece(const float* mu, const float* rho, int64_t n, float g, float inv_v, float* gm, float* gr) {
  vi_kl_grad_f32(mu, rho, n, g, inv_v, gm, gr);
}
inline void kl_grad_piece(const double* mu, const double* rho, int64_t n, double g, double inv_v, double* gm,
                          double* gr) {
  vi_kl_grad_f64(mu, rho, n, g, inv_v, gm, gr);
}

// grad_mu, grad_rho of elements [b, e) of one tensor (vi_kl_grad); fp16 / bf16 run the float loop
// on converted copies, kViBuf elements at a time
template <class scalar_t>
void kl_grad_range(const scalar_t* mu, const scalar_t* rho, int64_t b, int64_t e, at::opmath_type<scalar_t> g,
                   at::opmath_type<scalar_t> inv_v, scalar_t* gm, scalar_t* gr) {
  using op_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, op_t>) {
    kl_grad_piece(mu + b, rho + b, e - b, g, inv_v, gm + b, gr + b);
  } else {
    alignas(64) op_t cm[kViBuf], cr[kViBuf], om[kViBuf], orr[kViBuf];
    for (int64_t s = b; s < e; s += kViBuf) {
      const int64_t m = std::min(kViBuf, e - s);
      for (int64_t k = 0; k < m; ++k) {
        cm[k] = static_cast<op_t>(mu[s + k]);
        cr[k] = static_cast<op_t>(rho[s + k]);
      }
      kl_grad_piece(cm, cr, m, g, inv_v, om, orr);
      for (int64_t k = 0; k < m; ++k) {
        gm[s + k] = static_cast<scalar_t>(om[k]);
        gr[s + k] = static_cast<scalar_t>(orr[k]);
      }
    }
  }
}

// grad as a float64 value (any kernel float dtype; the CPU tensor is read on the host)
double read_grad(const at::Tensor& grad) {
  double g = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "vi_kl_backward_grad",
                                  [&] { g = static_cast<double>(*grad.const_data_ptr<scalar_t>()); });
  return g;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> vi_kl_backward_cpu(const at::Tensor& grad,
                                                                                 at::TensorList mus,
                                                                                 at::TensorList rhos,
                                                                                 const at::Tensor& prior_var) {
  const char* op = "vi_kl_backward";
  check_vi_kl(op, mus, rhos, prior_var, c10::DeviceType::CPU);
  check_vi_kl_grad(op, grad, mus[0].device());
  const auto dtype = mus[0].scalar_type();
  const auto ms = contiguous_list(mus), rs = contiguous_list(rhos);
  std::vector<at::Tensor> gms, grs;
  std::vector<int64_t> numels;
  for (const auto& m : ms) {
    gms.push_back(at::empty(m.sizes(), m.options()));  // contiguous
    grs.push_back(at::empty(m.sizes(), m.options()));
    numels.push_back(m.numel());
  }
  const double g64 = read_grad(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vi_kl_backward", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const auto priors = kl_priors<op_t>(prior_var);
    const auto g = static_cast<op_t>(g64);
    parallel_chunks(numels, [&](const Chunk& c) {
      const scalar_t* mu = ms[c.tensor].const_data_ptr<scalar_t>();
      const scalar_t* rho = rs[c.tensor].const_data_ptr<scalar_t>();
      scalar_t* gm = gms[c.tensor].mutable_data_ptr<scalar_t>();
      scalar_t* gr = grs[c.tensor].mutable_data_ptr<scalar_t>();
      const ViKlPrior<op_t>& prior = priors[c.tensor];
      kl_grad_range(mu, rho, c.begin, c.end, g, prior.inv_v, gm, gr);
    });
  });
  return {std::move(gms), std::move(grs)};
}

// ======================= end of section 2 ======================================================

// ======================= Section 3: the local reparameterisation's weight variance ============

inline void sigma_sq_piece(const float* rho, float* gr, float* s2, float* e, int64_t n) {
  vi_sigma_sq_f32(rho, gr, s2, e, n);
}
inline void sigma_sq_piece(const double* rho, double* gr, double* s2, double* e, int64_t n) {
  vi_sigma_sq_f64(rho, gr, s2, e, n);
}

// s2 = softplus(rho)^2 and / or gr <- gr * its derivative, in place (a null pointer: not computed)
// over n contiguous elements, in tasks of kViBuf-element pieces
template <class scalar_t>
void sigma_sq(const scalar_t* rho, scalar_t* gr, scalar_t* s2, int64_t n) {
  using op_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, 4 * kViGrainBlocks, [&](int64_t b, int64_t e) {
    alignas(64) op_t scratch[kViBuf];
    for (int64_t s = b; s < e; s += kViBuf) {
      const int64_t m = std::min(kViBuf, e - s);
      if constexpr (std::is_same_v<scalar_t, op_t>) {
        sigma_sq_piece(rho + s, gr == nullptr ? nullptr : gr + s, s2 == nullptr ? nullptr : s2 + s, scratch, m);
      } else {  // fp16 / bf16: the piece in float
        alignas(64) op_t c[3][kViBuf];
        for (int64_t k = 0; k < m; ++k) c[0][k] = static_cast<op_t>(rho[s + k]);
        if (gr != nullptr)
          for (int64_t k = 0; k < m; ++k) c[1][k] = static_cast<op_t>(gr[s + k]);
        sigma_sq_piece(c[0], gr == nullptr ? nullptr : c[1], s2 == nullptr ? nullptr : c[2], scratch, m);
        if (gr != nullptr)
          for (int64_t k = 0; k < m; ++k) gr[s + k] = static_cast<scalar_t>(c[1][k]);
        if (s2 != nullptr)
          for (int64_t k = 0; k < m; ++k) s2[s + k] = static_cast<scalar_t>(c[2][k]);
      }
    }
  });
}

// The entry point of the three ops: checks; sigma^2 (a new contiguous tensor) when want_s2, else
// undefined; grad (when given) overwritten with its product by the derivative, through a contiguous
// copy written back when grad is not contiguous
at::Tensor sigma_sq_cpu(const char* op, const at::Tensor& rho, const at::Tensor* grad, bool want_s2) {
  check_vi_sigma_sq(op, rho, grad, c10::DeviceType::CPU);
  at::Tensor s2 = want_s2 ? at::empty(rho.sizes(), rho.options()) : at::Tensor();  // contiguous
  const int64_t n = rho.numel();
  if (n == 0) return s2;
  const at::Tensor rc = rho.contiguous();
  at::Tensor gc = grad == nullptr ? at::Tensor() : grad->contiguous();  // grad itself when contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rho.scalar_type(), "vi_sigma_sq", [&] {
    sigma_sq<scalar_t>(rc.const_data_ptr<scalar_t>(), gc.defined() ? gc.mutable_data_ptr<scalar_t>() : nullptr,
                       s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr, n);
  });
  if (grad != nullptr && !gc.is_same(*grad)) grad->copy_(gc);
  return s2;
}

at::Tensor vi_sigma_sq_cpu(const at::Tensor& rho) { return sigma_sq_cpu("vi_sigma_sq", rho, nullptr, true); }

void vi_sigma_sq_backward_cpu(const at::Tensor& grad, const at::Tensor& rho) {
  sigma_sq_cpu("vi_sigma_sq_backward_", rho, &grad, false);
}

at::Tensor vi_sigma_sq_and_backward_cpu(const at::Tensor& grad, const at::Tensor& rho) {
  return sigma_sq_cpu("vi_sigma_sq_and_backward_", rho, &grad, true);
}

// ======================= end of section 3 ======================================================

// ======================= Section 4: a layer's weight function with its KL term =================

static_assert(kViBuf == 1024, "vi_weight_kl_kind / vi_weight_grad_kind's scratch holds one piece");

inline void weight_kl_piece(int kind, const float* mu, const float* rho, const float* z, float* w, int64_t n,
                            const ViKlPrior<float>& p, double& total) {
  vi_weight_kl_f32(kind, mu, rho, z, w, n, p.half_log_v, p.inv_2v, total);
}
inline void weight_kl_piece(int kind, const double* mu, const double* rho, const float* z, double* w, int64_t n,
                            const ViKlPrior<double>& p, double& total) {
  vi_weight_kl_f64(kind, mu, rho, z, w, n, p.half_log_v, p.inv_2v, total);
}
inline void weight_grad_piece(int kind, bool want_w, const float* mu, const float* rho, const float* z, float* gr,
                              float* gm, float* w, int64_t n, float g, float inv_v) {
  vi_weight_grad_f32(kind, want_w, mu, rho, z, gr, gm, w, n, g, inv_v);
}
inline void weight_grad_piece(int kind, bool want_w, const double* mu, const double* rho, const float* z, double* gr,
                              double* gm, double* w, int64_t n, double g, double inv_v) {
  vi_weight_grad_f64(kind, want_w, mu, rho, z, gr, gm, w, n, g, inv_v);
}

// w and the per-piece KL partials of vi_weight_kl over n contiguous elements (math in op_t)
template <class scalar_t>
void weight_kl(int kind, const scalar_t* m, const scalar_t* r, scalar_t* o, int64_t n, double prior_var,
               RngPosition pos, uint32_t stream, std::vector<double>& partial) {
  using op_t = at::opmath_type<scalar_t>;
  const auto prior = ViKlPrior<op_t>::make(prior_var);
  for_each_aligned_piece(n, kind != kViWeightVariance, pos, stream, [&](int64_t p, int64_t s, int64_t len,
                                                                          const float* z) {
    double total = 0.0;
    if constexpr (std::is_same_v<scalar_t, op_t>) {
      weight_kl_piece(kind, m + s, r + s, z, o + s, len, prior, total);
    } else {  // fp16 / bf16: the piece in float
      alignas(64) op_t c[3][kViBuf];
      for (int64_t i = 0; i < len; ++i) {
        c[0][i] = static_cast<op_t>(m[s + i]);
        c[1][i] = static_cast<op_t>(r[s + i]);
      }
      weight_kl_piece(kind, c[0], c[1], z, c[2], len, prior, total);
      for (int64_t i = 0; i < len; ++i) o[s + i] = static_cast<scalar_t>(c[2][i]);
    }
    partial[static_cast<size_t>(p)] = total;
  });
}

// (w, kl): the pieces of for_each_aligned_piece, each piece's terms summed into its own float64
// slot (vi_kl's run rule), the slots added in piece order: deterministic for any thread count
std::tuple<at::Tensor, at::Tensor> vi_weight_kl_cpu(const at::Tensor& mu, const at::Tensor& rho,
                                                    const at::Tensor& rng, int64_t stream, double prior_var,
                                                    int64_t kind) {
  check_vi_weight_kl(mu, rho, rng, stream, prior_var, kind, c10::DeviceType::CPU);
  at::Tensor w = at::empty(mu.sizes(), mu.options());  // contiguous
  const auto rdtype = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = mu.numel();
  std::vector<double> partial(static_cast<size_t>((n + kViBuf - 1) / kViBuf), 0.0);
  if (n > 0) {
    const at::Tensor mc = mu.contiguous(), rc = rho.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vi_weight_kl", [&] {
      weight_kl<scalar_t>(static_cast<int>(kind), mc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
                          w.mutable_data_ptr<scalar_t>(), n, prior_var, read_rng(rng), static_cast<uint32_t>(stream),
                          partial);
    });
  }
  double total = 0.0;
  for (const double v : partial) total += v;  // piece order
  return {w, at::scalar_tensor(total, at::TensorOptions().dtype(rdtype).device(mu.device()))};
}

// vi_weight_kl_backward_ over n contiguous elements: gr, gm in place, o (w) when not null
template <class scalar_t>
void weight_grad(int kind, const scalar_t* m, const scalar_t* r, scalar_t* gr, scalar_t* gm, scalar_t* o, int64_t n,
                 double g64, double prior_var, RngPosition pos, uint32_t stream) {
  using op_t = at::opmath_type<scalar_t>;
  const auto prior = ViKlPrior<op_t>::make(prior_var);
  const auto g = static_cast<op_t>(g64);
  const bool want_w = o != nullptr;
  for_each_aligned_piece(n, kind != kViWeightVariance, pos, stream, [&](int64_t, int64_t s, int64_t len,
                                                                          const float* z) {
    if constexpr (std::is_same_v<scalar_t, op_t>) {
      weight_grad_piece(kind, want_w, m + s, r + s, z, gr + s, gm + s, want_w ? o + s : nullptr, len, g, prior.inv_v);
    } else {  // fp16 / bf16: the piece in float
      alignas(64) op_t c[5][kViBuf];
      for (int64_t i = 0; i < len; ++i) {
        c[0][i] = static_cast<op_t>(m[s + i]);
        c[1][i] = static_cast<op_t>(r[s + i]);
        c[2][i] = static_cast<op_t>(gr[s + i]);
        c[3][i] = static_cast<op_t>(gm[s + i]);
      }
      weight_grad_piece(kind, want_w, c[0], c[1], z, c[2], c[3], c[4], len, g, prior.inv_v);
      for (int64_t i = 0; i < len; ++i) {
        gr[s + i] = static_cast<scalar_t>(c[2][i]);
        gm[s + i] = static_cast<scalar_t>(c[3][i]);
        if (want_w) o[s + i] = static_cast<scalar_t>(c[4][i]);
      }
    }
  });
}

// grad_rho and grad_mu updated in place (through contiguous copies written back when they are not
// contiguous); w (when want_w) a new contiguous tensor, else an empty [0]
at::Tensor vi_weight_kl_backward_cpu(const at::Tensor& grad_rho, const at::Tensor& grad_mu, const at::Tensor& mu,
                                     const at::Tensor& rho, const at::Tensor& rng, int64_t stream,
                                     const at::Tensor& kl_grad, double prior_var, int64_t kind, bool want_w) {
  check_vi_weight_kl_backward(grad_rho, grad_mu, mu, rho, rng, stream, kl_grad, prior_var, kind,
                              c10::DeviceType::CPU);
  at::Tensor w = want_w ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  const int64_t n = mu.numel();
  if (n == 0) return w;
  const at::Tensor mc = mu.contiguous(), rc = rho.contiguous();
  at::Tensor grc = grad_rho.contiguous(), gmc = grad_mu.contiguous();  // themselves when contiguous
  const double g64 = read_grad(kl_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vi_weight_kl_backward_", [&] {
    weight_grad<scalar_t>(static_cast<int>(kind), mc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
                          grc.mutable_data_ptr<scalar_t>(), gmc.mutable_data_ptr<scalar_t>(),
                          want_w ? w.mutable_data_ptr<scalar_t>() : nullptr, n, g64, prior_var, read_rng(rng),
                          static_cast<uint32_t>(stream));
  });
  if (!grc.is_same(grad_rho)) grad_rho.copy_(grc);
  if (!gmc.is_same(grad_mu)) grad_mu.copy_(gmc);
  return w;
}

// ======================= end of section 4 ======================================================

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  // section 1
  m.impl("vi_sample", &vi_sample_cpu);
  m.impl("vi_sample_backward", &vi_sample_backward_cpu);
  m.impl("vi_sample_and_backward", &vi_sample_and_backward_cpu);
  m.impl("vi_local_noise", &vi_local_noise_cpu);
  m.impl("vi_local_noise_backward", &vi_local_noise_backward_cpu);
  m.impl("vi_rademacher_", &vi_rademacher_cpu);
  m.impl("vi_rademacher_mul", &vi_rademacher_mul_cpu);
  // section 2
  m.impl("vi_kl", &vi_kl_cpu);
  m.impl("vi_kl_backward", &vi_kl_backward_cpu);
  // section 3
  m.impl("vi_sigma_sq", &vi_sigma_sq_cpu);
  m.impl("vi_sigma_sq_backward_", &vi_sigma_sq_backward_cpu);
  m.impl("vi_sigma_sq_and_backward_", &vi_sigma_sq_and_backward_cpu);
  // section 4
  m.impl("vi_weight_kl", &vi_weight_kl_cpu);
  m.impl("vi_weight_kl_backward_", &vi_weight_kl_backward_cpu);
}

}  // namespace pyfastbayes::cpu
