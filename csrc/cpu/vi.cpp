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
//
// Section 2 (closed-form KL): the work items of cpu/multi_tensor.h (chunks of kChunk elements of
// one tensor) over all tensors of the lists, run by one at::parallel_for. vi_kl: each work item
// sums its terms in float32 runs of kViKlRun (64) terms (float64 for float64 inputs) added into a
// float64 partial of its own slot; the partials are summed in work-item order afterwards, so the
// result does not depend on the number of threads. vi_kl_backward: elementwise into new contiguous
// tensors. Inputs are read through contiguous stand-ins (mu and rho must pair element by element).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

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

// The sum of the terms of elements [b, e) of one tensor: float32 (op_t) runs of kViKlRun terms,
// each added to a float64 total
template <class scalar_t>
double kl_range(const scalar_t* mu, const scalar_t* rho, int64_t b, int64_t e,
                const ViKlPrior<at::opmath_type<scalar_t>>& prior) {
  using op_t = at::opmath_type<scalar_t>;
  double total = 0.0;
  for (int64_t s = b; s < e; s += kViKlRun) {
    const int64_t n = std::min<int64_t>(kViKlRun, e - s);
    op_t run = op_t(0);
    for (int64_t k = 0; k < n; ++k)
      run += vi_kl_term(static_cast<op_t>(mu[s + k]), static_cast<op_t>(rho[s + k]), prior);
    total += static_cast<double>(run);
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
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
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
      for (int64_t i = c.begin; i < c.end; ++i) {
        op_t dm, dr;
        vi_kl_grad(static_cast<op_t>(mu[i]), static_cast<op_t>(rho[i]), g, prior, dm, dr);
        gm[i] = static_cast<scalar_t>(dm);
        gr[i] = static_cast<scalar_t>(dr);
      }
    });
  });
  return {std::move(gms), std::move(grs)};
}

// ======================= end of section 2 ======================================================

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  // section 1
  m.impl("vi_sample", &vi_sample_cpu);
  m.impl("vi_sample_backward", &vi_sample_backward_cpu);
  m.impl("vi_local_noise", &vi_local_noise_cpu);
  m.impl("vi_local_noise_backward", &vi_local_noise_backward_cpu);
  m.impl("vi_rademacher_", &vi_rademacher_cpu);
  // section 2
  m.impl("vi_kl", &vi_kl_cpu);
  m.impl("vi_kl_backward", &vi_kl_backward_cpu);
}

}  // namespace pyfastbayes::cpu
