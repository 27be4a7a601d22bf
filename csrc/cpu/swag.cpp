// CPU kernels of the SWA / SWAG ops: one parallel pass over every parameter tensor for collect,
// and a column-blocked sampler that reads each block of D once for all S draws.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks/common.h"
#include "checks/swag.h"
#include "common/philox.h"
#include "common/swag.h"
#include "cpu/clones.h"
#include "cpu/multi_tensor.h"

namespace pyfastbayes::cpu {
namespace {

// dispatch over the three dtype families of the SWAG ops
#define PFB_SWAG_DISPATCH_STATE(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES(T, NAME, [&] { using state_t = scalar_t; __VA_ARGS__(); })
#define PFB_SWAG_DISPATCH_ANY(T, ALIAS, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, [&] { using ALIAS = scalar_t; __VA_ARGS__(); })

template <typename param_t, typename state_t, typename dev_t>
void collect_range(const param_t* p, state_t* mean, state_t* sq, dev_t* dev, int64_t n, state_t w) {
  const bool has_sq = sq != nullptr;
  for (int64_t i = 0; i < n; ++i) swag_collect_update(p, mean, sq, has_sq, dev, i, w);
}

void swag_collect_cpu(at::TensorList params, const at::Tensor& mean, const std::optional<at::Tensor>& sq_mean,
                      const std::optional<at::Tensor>& deviation, int64_t n) {
  check_swag_collect(params, mean, sq_mean, deviation, n, c10::DeviceType::CPU);
  if (params.empty()) return;
  const auto ps = contiguous_list(params);  // read-only stand-ins for non-contiguous params
  std::vector<int64_t> numels, offsets;
  int64_t off = 0;
  for (const auto& p : ps) {
    numels.push_back(p.numel());
    offsets.push_back(off);
    off += p.numel();
  }
  const auto dev_type = deviation.has_value() ? deviation->scalar_type() : mean.scalar_type();
  PFB_SWAG_DISPATCH_STATE(mean.scalar_type(), "swag_collect_state", [&] {
    // w = 1 / (n + 1) rounded once in the state dtype, as torch computes AveragedModel's weight
    const state_t w = state_t(1) / static_cast<state_t>(n + 1);
    state_t* m = mean.data_ptr<state_t>();
    state_t* s = sq_mean.has_value() ? sq_mean->data_ptr<state_t>() : nullptr;
    PFB_SWAG_DISPATCH_ANY(dev_type, dev_t, "swag_collect_dev", [&] {
      dev_t* d = deviation.has_value() ? deviation->data_ptr<dev_t>() : nullptr;
      parallel_chunks(numels, [&](const Chunk& c) {
        const int64_t o = offsets[c.tensor] + c.begin;
        PFB_SWAG_DISPATCH_ANY(ps[c.tensor].scalar_type(), param_t, "swag_collect_param", [&] {
          collect_range<param_t, state_t, dev_t>(ps[c.tensor].data_ptr<param_t>() + c.begin, m + o,
                                                 s ? s + o : nullptr, d ? d + o : nullptr, c.end - c.begin, w);
        });
      });
    });
  });
}

constexpr int64_t kCols = 256;  // columns per work item (multiple of 4); K x kCols of D stays in L1/L2

// z2 [S, K]: element s * K + k of the stream (seed, kSwagLowRankStream, step)
std::vector<float> lowrank_noise(uint64_t seed, uint32_t step, int64_t S, int64_t K) {
  const int64_t n = S * K;
  std::vector<float> z(static_cast<size_t>((n + 3) / 4 * 4));
  if (n > 0) fill_normal(seed, kSwagLowRankStream, step, 0, (n + 3) / 4, z.data());
  return z;
}

// z1 of draw s for the nc columns whose first has global index g0 (any g0 >= 0): the Philox blocks
// g0 / 4 .. (g0 + nc - 1) / 4 of the stream (seed, kSwagDiagStream + s, step) into buf (kZ1
// floats); returns buf + g0 % 4, where the normal of global index g0 sits (the lanes before it,
// and after the last column, are drawn and skipped)
constexpr int64_t kZ1 = kCols + 4;  // kCols columns starting at any lane fit in kCols / 4 + 1 blocks
inline const float* diag_noise(uint64_t seed, uint32_t step, int64_t s, int64_t g0, int64_t nc, float* buf) {
  const int64_t lane = g0 % 4;
  fill_normal(seed, kSwagDiagStream + static_cast<uint32_t>(s), step, g0 / 4, (lane + nc + 3) / 4, buf);
  return buf + lane;
}

constexpr int64_t kTile = 16;  // columns whose K-term accumulators stay in registers

// out[s, c0:c0+nc] for one column block (Dblk: the block of D, K x nc, converted to the state
// type, row stride ldD, cache-resident): read from memory once and reused by all S draws; the
// accumulators of kTile columns live in registers. Compiled into each target_clones body
// (sample_one_block_f32 / _f64), so the K-term dot products run at AVX2 / AVX-512 width, not SSE2
// (multiplies and adds: the file is built without FMA contraction, see CMakeLists.txt).
template <typename state_t>
PFB_CPU_INLINE void sample_block(const state_t* mean, const state_t* sigma, const state_t* Dblk, int64_t ldD, int64_t K,
                                 const float* z2, int64_t S, int64_t P, int64_t c0, int64_t nc, state_t* out,
                                 state_t c_diag, state_t c_low, uint64_t seed, uint32_t step, int64_t offset,
                                 float* z1) {
  for (int64_t s = 0; s < S; ++s) {
    const float* zc = diag_noise(seed, step, s, offset + c0, nc, z1);
    state_t* o = out + s * P + c0;
    const float* zr = z2 + s * K;
    int64_t j = 0;
    for (; j + kTile <= nc; j += kTile) {
      state_t acc[kTile] = {};
      for (int64_t k = 0; k < K; ++k) {
        const state_t zk = static_cast<state_t>(zr[k]);
        const state_t* dr = Dblk + k * ldD + j;
        for (int q = 0; q < kTile; ++q) acc[q] += zk * dr[q];
      }
      for (int q = 0; q < kTile; ++q)
        o[j + q] = swag_draw(mean[c0 + j + q], sigma[j + q], zc[j + q], acc[q], c_diag, c_low);
    }
    for (; j < nc; ++j) {
      state_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<state_t>(zr[k]) * Dblk[k * ldD + j];
      o[j] = swag_draw(mean[c0 + j], sigma[j], zc[j], acc, c_diag, c_low);
    }
  }
}

template <typename state_t>
PFB_CPU_INLINE void sample_block_diag(const state_t* mean, const state_t* sigma, int64_t S, int64_t P, int64_t c0,
                                      int64_t nc, state_t* out, state_t c_diag, uint64_t seed, uint32_t step,
                                      int64_t offset, float* z1) {
  for (int64_t s = 0; s < S; ++s) {
    const float* zc = diag_noise(seed, step, s, offset + c0, nc, z1);
    state_t* o = out + s * P + c0;
    for (int64_t j = 0; j < nc; ++j) o[j] = swag_draw(mean[c0 + j], sigma[j], zc[j], state_t(0), c_diag, state_t(0));
  }
}

// One column block, low rank (Dblk given) or diagonal only (Dblk null), in each target_clones body
// (cpu/clones.h), per state type
template <typename state_t>
PFB_CPU_INLINE void sample_one_block(const state_t* mean, const state_t* sigma, const state_t* Dblk, int64_t K,
                                     const float* z2, int64_t S, int64_t P, int64_t c0, int64_t nc, state_t* out,
                                     state_t c_diag, state_t c_low, uint64_t seed, uint32_t step, int64_t offset,
                                     float* z1) {
  if (Dblk != nullptr)
    sample_block(mean, sigma, Dblk, kCols, K, z2, S, P, c0, nc, out, c_diag, c_low, seed, step, offset, z1);
  else
    sample_block_diag(mean, sigma, S, P, c0, nc, out, c_diag, seed, step, offset, z1);
}
PFB_CPU_CLONES void sample_one_block_f32(const float* mean, const float* sigma, const float* Dblk, int64_t K,
                                         const float* z2, int64_t S, int64_t P, int64_t c0, int64_t nc, float* out,
                                         float c_diag, float c_low, uint64_t seed, uint32_t step, int64_t offset,
                                         float* z1) {
  sample_one_block(mean, sigma, Dblk, K, z2, S, P, c0, nc, out, c_diag, c_low, seed, step, offset, z1);
}
PFB_CPU_CLONES void sample_one_block_f64(const double* mean, const double* sigma, const double* Dblk, int64_t K,
                                         const float* z2, int64_t S, int64_t P, int64_t c0, int64_t nc, double* out,
                                         double c_diag, double c_low, uint64_t seed, uint32_t step, int64_t offset,
                                         float* z1) {
  sample_one_block(mean, sigma, Dblk, K, z2, S, P, c0, nc, out, c_diag, c_low, seed, step, offset, z1);
}

template <typename state_t, typename d_t>
void sample_blocks(const state_t* mean, const state_t* sq, const d_t* D, int64_t ldD, int64_t K, int64_t P,
                   int64_t S, state_t* out, double scale, double eps, uint64_t seed, uint32_t step,
                   int64_t offset) {
  const bool lowrank = D != nullptr;
  const auto coef = swag_coefficients(scale, lowrank ? K : 0);
  const state_t c_diag = static_cast<state_t>(coef.diag), c_low = static_cast<state_t>(coef.lowrank);
  const state_t e = static_cast<state_t>(eps);
  const auto z2 = lowrank ? lowrank_noise(seed, step, S, K) : std::vector<float>();
  const int64_t nblocks = (P + kCols - 1) / kCols;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float z1[kZ1];
    state_t sigma[kCols];
    std::vector<state_t> dbuf(lowrank ? static_cast<size_t>(K * kCols) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols, nc = std::min(kCols, P - c0);
      for (int64_t j = 0; j < nc; ++j) sigma[j] = swag_sigma(mean[c0 + j], sq[c0 + j], e);
      if (lowrank) {
        // copy (and convert) the block of D once into a contiguous K x kCols buffer: rows of D are
        // P apart, often a power of two, and would alias in the cache when read directly
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < nc; ++j) dbuf[k * kCols + j] = static_cast<state_t>(D[k * ldD + c0 + j]);
      }
      const state_t* dblk = lowrank ? dbuf.data() : nullptr;
      if constexpr (std::is_same_v<state_t, float>)
        sample_one_block_f32(mean, sigma, dblk, K, z2.data(), S, P, c0, nc, out, c_diag, c_low, seed, step, offset, z1);
      else
        sample_one_block_f64(mean, sigma, dblk, K, z2.data(), S, P, c0, nc, out, c_diag, c_low, seed, step, offset, z1);
    }
  });
}

at::Tensor swag_sample_cpu(const at::Tensor& mean, const at::Tensor& sq_mean, const std::optional<at::Tensor>& D,
                           int64_t n_draws, double scale, double eps, int64_t seed, int64_t step, int64_t offset) {
  const int64_t K = check_swag_sample(mean, sq_mean, D, n_draws, scale, eps, offset, c10::DeviceType::CPU);
  const int64_t P = mean.numel();
  auto out = at::empty({n_draws, P}, mean.options());
  if (n_draws == 0 || P == 0) return out;
  const auto d_type = D.has_value() ? D->scalar_type() : mean.scalar_type();
  PFB_SWAG_DISPATCH_STATE(mean.scalar_type(), "swag_sample_state", [&] {
    PFB_SWAG_DISPATCH_ANY(d_type, d_t, "swag_sample_D", [&] {
      sample_blocks<state_t, d_t>(mean.data_ptr<state_t>(), sq_mean.data_ptr<state_t>(),
                                  D.has_value() ? D->data_ptr<d_t>() : nullptr, D.has_value() ? D->stride(0) : 0, K,
                                  P, n_draws, out.data_ptr<state_t>(), scale, eps, static_cast<uint64_t>(seed),
                                  static_cast<uint32_t>(step), offset);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  m.impl("swag_collect_", &swag_collect_cpu);
  m.impl("swag_sample", &swag_sample_cpu);
}

}  // namespace pyfastbayes::cpu
