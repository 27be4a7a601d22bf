// CPU kernels of the fused SG-MCMC steps: one parallel pass over every tensor of the group,
// noise drawn in cache-sized blocks from the Philox stream, the update rule from common/.
// Element i of tensor s takes normal j = offsets[s] + i of stream s (offsets default to 0): lane
// j % 4 of Philox block j / 4, i the logical (row-major) index, as in the CUDA kernel and the
// reference: non-contiguous tensors are computed on contiguous copies (ContiguousList,
// checks/sgmcmc.h, says why dense permuted ones are too).
// And any_nonfinite: its inputs are flat arrays (nonfinite_inputs: dense tensors in place, in
// memory order), tested on their bits (the magnitude's bits against a threshold).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <type_traits>

#include "checks/sgmcmc.h"
#include "common/layouts.h"
#include "common/philox.h"
#include "common/sgmcmc_rules.h"
#include "cpu/clones.h"
#include "cpu/multi_tensor.h"

namespace pyfastbayes::cpu {
namespace {

constexpr int64_t kNoiseBuf = 1024;  // normals generated per inner block (multiple of 4)

// offsets: the stream index of each tensor's element 0 (empty: all 0)
template <typename scalar_t, template <class> class Rule, bool kHasBuf>
void noisy_step(std::vector<at::Tensor>& ps, std::vector<at::Tensor>& gs, std::vector<at::Tensor>& bs,
                const at::Tensor& hyper, const at::Tensor& rng, c10::IntArrayRef offsets) {
  using op_t = at::opmath_type<scalar_t>;
  const auto rule = Rule<op_t>::make(hyper.data_ptr<double>());
  const auto seed = static_cast<uint64_t>(rng.data_ptr<int64_t>()[kRngSeed]);
  const auto step = static_cast<uint32_t>(rng.data_ptr<int64_t>()[kRngStep]);
  std::vector<int64_t> numels;
  for (const auto& p : ps) numels.push_back(p.numel());
  parallel_chunks(numels, [&](const Chunk& c) {
    scalar_t* p = ps[c.tensor].data_ptr<scalar_t>();
    const scalar_t* g = gs[c.tensor].data_ptr<scalar_t>();
    scalar_t* b = kHasBuf ? bs[c.tensor].data_ptr<scalar_t>() : nullptr;
    const int64_t off = offsets.empty() ? 0 : offsets[c.tensor];
    // elements s .. s + n - 1 take normals j = off + s .. off + s + n - 1: the blocks from
    // (off + s) / 4 on, from lane r = (off + s) % 4 (r > 0 only for an offset that is not a
    // multiple of 4: the first r normals of the first block are drawn and not used)
    alignas(64) float z[kNoiseBuf + 4];
    for (int64_t s = c.begin; s < c.end; s += kNoiseBuf) {
      const int64_t n = std::min(kNoiseBuf, c.end - s);
      const int64_t r = (off + s) % 4;
      fill_normal(seed, static_cast<uint32_t>(c.tensor), step, (off + s) / 4, (r + n + 3) / 4, z);
      for (int64_t k = 0; k < n; ++k) sgmcmc_update<kHasBuf>(rule, p, g, b, s + k, z[r + k]);
    }
  });
}

// bufs_name: the schema name of the state buffers, nullptr for SGLD (none)
template <template <class> class Rule, bool kHasBuf>
void step_cpu(const char* op, at::TensorList params, at::TensorList grads, at::TensorList bufs, const char* bufs_name,
              const at::Tensor& hyper, const at::Tensor& rng, const std::optional<at::Tensor>& skip,
              c10::OptionalIntArrayRef offsets) {
  check_step_args(op, params, grads, bufs, bufs_name, hyper, kHyperSize, rng, skip, offsets, c10::DeviceType::CPU);
  if (skip.has_value() && skip->item<bool>()) return;
  if (!params.empty()) {
    ContiguousList ps(params), bs(kHasBuf ? bufs : at::TensorList());
    auto gs = contiguous_list(grads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgmcmc_step", [&] {
      noisy_step<scalar_t, Rule, kHasBuf>(ps.work, gs, bs.work, hyper, rng, offsets.value_or(c10::IntArrayRef()));
    });
    ps.write_back();
    bs.write_back();
  }
  int64_t& step = rng.data_ptr<int64_t>()[kRngStep];
  step = static_cast<int64_t>(static_cast<uint64_t>(step) + 1);  // wraps like torch's int64 add, no UB
}

void sgld_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& hyper, const at::Tensor& rng,
                   const std::optional<at::Tensor>& skip, c10::OptionalIntArrayRef offsets) {
  step_cpu<SGLDRule, false>("sgld_step_", params, grads, {}, nullptr, hyper, rng, skip, offsets);
}
void sghmc_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta, const at::Tensor& hyper,
                    const at::Tensor& rng, const std::optional<at::Tensor>& skip, c10::OptionalIntArrayRef offsets) {
  step_cpu<SGHMCRule, true>("sghmc_step_", params, grads, momenta, "momenta", hyper, rng, skip, offsets);
}
void psgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avg,
                    const at::Tensor& hyper, const at::Tensor& rng, const std::optional<at::Tensor>& skip,
                    c10::OptionalIntArrayRef offsets) {
  step_cpu<PSGLDRule, true>("psgld_step_", params, grads, square_avg, "square_avg", hyper, rng, skip, offsets);
}

// The bit test of any_nonfinite: (bits with the sign cleared) >= threshold (nonfinite_threshold,
// checks/sgmcmc.h: +inf's bits for NaN / inf, or a limit's), compared as signed integers (both sides
// are below the sign bit), OR-reduced into an int, so every clone below vectorises at its width (a
// float compare chain `v - v != 0` with a bool reduction did not: 4M floats took 2.2 ms, ~5x the
// read time).
template <typename bits_t>
int any_magnitude_at_least(const bits_t* x, int64_t n, bits_t abs_mask, bits_t threshold) {
  using sbits_t = std::make_signed_t<bits_t>;
  const auto thr = static_cast<sbits_t>(threshold);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<int>(static_cast<sbits_t>(x[i] & abs_mask) >= thr);
  return bad;
}
#define PFB_NONFINITE_CLONES(NAME, BITS)                                                                    \
  PFB_CPU_CLONES int NAME(const BITS* x, int64_t n, BITS m, BITS thr) {                                    \
    return any_magnitude_at_least<BITS>(x, n, m, thr);                                                     \
  }
PFB_NONFINITE_CLONES(nonfinite_bits16, uint16_t)
PFB_NONFINITE_CLONES(nonfinite_bits32, uint32_t)
PFB_NONFINITE_CLONES(nonfinite_bits64, uint64_t)
#undef PFB_NONFINITE_CLONES

// elements [b, e) of a flat input of a kernel float dtype (nonfinite_inputs), threshold its dtype's
bool range_nonfinite(const at::Tensor& t, int64_t b, int64_t e, uint64_t thr) {
  const void* base = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat:
      return nonfinite_bits32(static_cast<const uint32_t*>(base) + b, e - b, 0x7FFFFFFFu, static_cast<uint32_t>(thr)) != 0;
    case at::kDouble:
      return nonfinite_bits64(static_cast<const uint64_t*>(base) + b, e - b, 0x7FFFFFFFFFFFFFFFull, thr) != 0;
    case at::kHalf:
    case at::kBFloat16:
      return nonfinite_bits16(static_cast<const uint16_t*>(base) + b, e - b, uint16_t(0x7FFF), static_cast<uint16_t>(thr)) != 0;
    default: TORCH_CHECK(false, "any_nonfinite: unexpected dtype ", t.scalar_type());
  }
}

at::Tensor any_nonfinite_cpu(at::TensorList tensors, std::optional<double> limit) {
  check_nonfinite_limit(limit);
  std::atomic<bool> found{false};
  const auto ts = nonfinite_inputs(tensors, c10::DeviceType::CPU);
  std::vector<int64_t> numels;
  std::vector<uint64_t> thr;
  for (const auto& t : ts) {
    numels.push_back(t.numel());
    thr.push_back(nonfinite_threshold(t.scalar_type(), limit));
  }
  parallel_chunks(numels, [&](const Chunk& c) {
    if (found.load(std::memory_order_relaxed)) return;
    if (range_nonfinite(ts[c.tensor], c.begin, c.end, thr[c.tensor])) found.store(true, std::memory_order_relaxed);
  });
  return at::zeros({}, at::TensorOptions().dtype(at::kBool)).fill_(found.load());
}

// any_nonfinite when the dispatcher finds no backend kernel: no tensor at all (an empty list has
// no dispatch key; nothing in it is non-finite: False on the CPU), or tensors on a device this
// build has no kernel for (the NotImplementedError the dispatcher would raise, with the op's name).
at::Tensor any_nonfinite_no_backend(at::TensorList tensors, std::optional<double> limit) {
  check_nonfinite_limit(limit);
  TORCH_CHECK_NOT_IMPLEMENTED(tensors.empty(), "any_nonfinite: no kernel for ", tensors[0].device(),
                              " tensors in this build of pyfastbayes");
  return at::zeros({}, at::TensorOptions().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CompositeExplicitAutograd, m) { m.impl("any_nonfinite", &any_nonfinite_no_backend); }

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  m.impl("sgld_step_", &sgld_step_cpu);
  m.impl("sghmc_step_", &sghmc_step_cpu);
  m.impl("psgld_step_", &psgld_step_cpu);
  m.impl("any_nonfinite", &any_nonfinite_cpu);
}

}  // namespace pyfastbayes::cpu
