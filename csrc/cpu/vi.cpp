// CPU kernels of the vi family. Math: common/vi.h (the CUDA kernels' functions); checks: checks/vi.h.
//
// Section 1 (reparameterised noise): at::parallel_for (OpenMP) over Philox blocks of 4 elements, a
// task owning whole blocks, so every block's 4 normals are drawn once, by one thread. Inside a task
// the noise is made kViBuf elements at a time into a stack buffer by fill_normal (cpu/random.cpp:
// the very function behind philox_normal_, with its AVX2 / AVX-512 clones; the tensor's partial last
// block by the scalar philox_normal4, as philox_normal_ does), so eps is bit for bit philox_normal_'s
// on the same machine; then one branch-free elementwise loop applies the rule.
// Inputs are read through contiguous stand-ins (logical order = memory order: the noise is indexed
// by the logical element); the result is a new contiguous tensor. vi_rademacher_ writes its out in
// place, through a contiguous float32 temporary copied back when out is not a contiguous tensor of
// a kernel dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks/vi.h"
#include "common/layouts.h"
#include "common/vi.h"
#include "cpu/multi_tensor.h"

namespace pyfastbayes::cpu {

// ======================= Section 1: reparameterised noise ======================================

// out[0 .. 4 nblocks) = the +-1 signs of Philox blocks first_block .. first_block + nblocks
// (common/vi.h: vi_rademacher_sign of word k of each block); integer code, vectorised by each clone
__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
void fill_rademacher(uint64_t seed, uint32_t stream, uint32_t step, int64_t first_block, int64_t nblocks,
                     float* out) {
  for (int64_t b = 0; b < nblocks; ++b) {
    uint32_t r[4];
    vi_philox_bits4(seed, static_cast<uint64_t>(first_block + b), stream, step, r);
    out[4 * b + 0] = vi_rademacher_sign(r[0]);
    out[4 * b + 1] = vi_rademacher_sign(r[1]);
    out[4 * b + 2] = vi_rademacher_sign(r[2]);
    out[4 * b + 3] = vi_rademacher_sign(r[3]);
  }
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

// out[i] = Rule(a[i], b[i], eps_i) for i < n, all three contiguous; math in op_t
template <class scalar_t, class Rule>
void noisy_pair(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, RngPosition pos, uint32_t stream) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t nblocks = (n + 3) / 4;
  at::parallel_for(0, nblocks, kViGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kViBuf];
    const Rule rule{};
    const int64_t end = std::min(4 * b1, n);
    for (int64_t s = 4 * b0; s < end; s += kViBuf) {  // s: a multiple of 4, the start of a block
      const int64_t m = std::min(kViBuf, end - s);
      const int64_t whole = m / 4;
      fill_normal(pos.seed, stream, pos.step, s / 4, whole, z);
      // the tensor's partial last block (only the last piece has one): drawn as philox_normal_ draws
      // it, by the scalar philox_normal4, not by fill_normal's clone (whose FMAs may round the
      // normals an ulp differently), so eps stays bit for bit philox_normal_'s; 4 whole + 4 <= kViBuf
      if (m > 4 * whole) {
        philox_normal4(pos.seed, static_cast<uint64_t>(s / 4 + whole), stream, pos.step, z + 4 * whole);
      }
      for (int64_t k = 0; k < m; ++k) {
        out[s + k] = static_cast<scalar_t>(
            rule(static_cast<op_t>(a[s + k]), static_cast<op_t>(b[s + k]), static_cast<op_t>(z[k])));
      }
    }
  });
}

// The entry point of a two-input noisy op: checks, contiguous stand-ins, a new contiguous result.
template <class Rule>
at::Tensor noisy_pair_cpu(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                          const char* b_name, const at::Tensor& rng, int64_t stream) {
  check_vi_pair(op, a, a_name, b, b_name, rng, stream, c10::DeviceType::CPU);
  at::Tensor out = at::empty(a.sizes(), a.options());  // contiguous
  const int64_t n = a.numel();
  if (n == 0) return out;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const RngPosition pos = read_rng(rng);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "vi_noisy_pair", [&] {
    noisy_pair<scalar_t, Rule>(ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                               out.mutable_data_ptr<scalar_t>(), n, pos, static_cast<uint32_t>(stream));
  });
  return out;
}

at::Tensor vi_sample_cpu(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& rng, int64_t stream) {
  return noisy_pair_cpu<ViSampleRule>("vi_sample", mu, "mu", rho, "rho", rng, stream);
}

at::Tensor vi_sample_backward_cpu(const at::Tensor& grad_w, const at::Tensor& rho, const at::Tensor& rng,
                                  int64_t stream) {
  return noisy_pair_cpu<ViSampleBackwardRule>("vi_sample_backward", grad_w, "grad_w", rho, "rho", rng, stream);
}

at::Tensor vi_local_noise_cpu(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& rng, int64_t stream) {
  return noisy_pair_cpu<ViLocalNoiseRule>("vi_local_noise", mean, "mean", var, "var", rng, stream);
}

at::Tensor vi_local_noise_backward_cpu(const at::Tensor& grad_out, const at::Tensor& var, const at::Tensor& rng,
                                       int64_t stream) {
  return noisy_pair_cpu<ViLocalNoiseBackwardRule>("vi_local_noise_backward", grad_out, "grad_out", var, "var", rng,
                                                  stream);
}

void vi_rademacher_cpu(const at::Tensor& out, const at::Tensor& rng, int64_t stream) {
  check_vi_rademacher(out, rng, stream, c10::DeviceType::CPU);
  const int64_t n = out.numel();
  if (n == 0) return;
  const bool direct = kernel_float_dtype(out.scalar_type()) && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({n}, out.options().dtype(at::kFloat));
  const RngPosition pos = read_rng(rng);
  const auto s32 = static_cast<uint32_t>(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "vi_rademacher_", [&] {
    scalar_t* o = buf.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, kViGrainBlocks, [&](int64_t b0, int64_t b1) {
      alignas(64) float sign[kViBuf];
      const int64_t end = std::min(4 * b1, n);
      for (int64_t s = 4 * b0; s < end; s += kViBuf) {
        const int64_t m = std::min(kViBuf, end - s);
        fill_rademacher(pos.seed, s32, pos.step, s / 4, (m + 3) / 4, sign);
        for (int64_t k = 0; k < m; ++k) o[s + k] = static_cast<scalar_t>(sign[k]);
      }
    });
  });
  if (!direct) out.copy_(buf.view(out.sizes()));  // +-1 is exact in every floating dtype
}

}  // namespace

// ======================= end of section 1 ======================================================

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  // section 1
  m.impl("vi_sample", &vi_sample_cpu);
  m.impl("vi_sample_backward", &vi_sample_backward_cpu);
  m.impl("vi_local_noise", &vi_local_noise_cpu);
  m.impl("vi_local_noise_backward", &vi_local_noise_backward_cpu);
  m.impl("vi_rademacher_", &vi_rademacher_cpu);
}

}  // namespace pyfastbayes::cpu
