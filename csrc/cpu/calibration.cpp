// CPU kernel of calibration_bins: rows split into one contiguous chunk per thread
// (at::parallel_for), each chunk accumulating its own float64 partial bins, then a reduction in
// chunk order (deterministic for a given thread count). Per-row math in float64; the bin rule is
// common/calibration.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/calibration.h"
#include "common/calibration_args.h"

namespace pyfastbayes::cpu {
namespace {

// Row reductions of the S = 1 path, written so that gcc vectorises them. Their relaxed
// floating-point flags are scoped to these helpers and cannot change a result that is used:
// a row holding NaN or inf has a non-finite sum (the sum keeps IEEE NaN/inf semantics, it is
// only reassociated), is counted as non-finite and is not binned, so its (then unspecified) max
// is never read; the sum is only compared with 1 within a tolerance.
template <typename scalar_t>
__attribute__((optimize("finite-math-only", "no-signed-zeros"))) auto row_max(const scalar_t* row, int64_t C) {
  using cmp_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  cmp_t mx = static_cast<cmp_t>(row[0]);
  for (int64_t c = 1; c < C; ++c) {
    const cmp_t v = static_cast<cmp_t>(row[c]);
    mx = v > mx ? v : mx;
  }
  return mx;
}

template <typename scalar_t>
__attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math"))) double row_sum(
    const scalar_t* row, int64_t C, bool& neg) {
  double sum = 0.0;
  int any_neg = 0;  // an int (not bool) OR-reduction: gcc vectorises it
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(row[c]);
    sum += v;
    any_neg |= static_cast<int>(v < 0.0);
  }
  neg = any_neg != 0;
  return sum;
}

// acc[i] += src[i] in float64 over one draw's slab; returns whether any value was negative.
// Plain loops: the AVX2 / AVX-512 clones gcc emits (picked at load time) vectorise them.
template <typename scalar_t>
int accumulate_slab(const scalar_t* src, double* acc, int64_t len) {
  int neg = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double v = static_cast<double>(src[i]);
    acc[i] += v;
    neg |= static_cast<int>(v < 0.0);
  }
  return neg;
}
__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4"))) int accumulate_slab_f32(
    const float* src, double* acc, int64_t len) {
  return accumulate_slab(src, acc, len);
}
__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4"))) int accumulate_slab_f64(
    const double* src, double* acc, int64_t len) {
  return accumulate_slab(src, acc, len);
}
template <typename scalar_t>
bool accumulate(const scalar_t* src, double* acc, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, float>) return accumulate_slab_f32(src, acc, len) != 0;
  else if constexpr (std::is_same_v<scalar_t, double>) return accumulate_slab_f64(src, acc, len) != 0;
  else return accumulate_slab(src, acc, len) != 0;
}

template <typename scalar_t>
void bins_kernel(const scalar_t* p, const int64_t* y, int64_t S, int64_t N, int64_t C, int64_t B, bool logits,
                 bool classwise, double tol, double* bins, double* diag) {
  const int64_t nstat = (classwise ? C : 1) * B * kCalibStats;
  const int64_t width = nstat + kCalibDiag;
  const int64_t min_rows = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * C));
  const int64_t nchunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (N + min_rows - 1) / min_rows));
  std::vector<double> partial(static_cast<size_t>(nchunks * width), 0.0);
  const int64_t stride_s = N * C;
  const bool direct = !logits && S == 1;  // top path: read the row itself, no accumulator

  // Rows with S > 1 averaged probabilities are processed kBlock at a time, draw by draw, so each
  // draw's slab of kBlock * C values is read contiguously (not S far-apart rows per point).
  constexpr int64_t kBlock = 256;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<double> acc(direct ? 0 : (logits ? C : kBlock * C)), tmp(logits ? C : 0);
    std::vector<char> negrow(direct || logits ? 0 : kBlock);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      double* st = partial.data() + chunk * width;
      double* dg = st + nstat;
      // bin one row: vals = its S-summed values (nullptr: the row itself, S = 1)
      auto finish = [&](int64_t n, const scalar_t* row, const double* vals, double conf, int64_t pred, double sum,
                        bool neg, bool finite) {
        if (!finite) {
          dg[kDiagNonFinite] += 1.0;
          return;
        }
        const int64_t t = y[n];
        if (t < 0 || t >= C) {
          dg[kDiagBadTarget] += 1.0;
          return;
        }
        if (!logits) {
          if (!(std::fabs(sum - 1.0) <= tol)) dg[kDiagBadSum] += 1.0;
          if (neg) dg[kDiagNegative] += 1.0;
        }
        if (!classwise) {
          double* b = st + uniform_bin(conf, B) * kCalibStats;
          b[0] += 1.0;
          b[1] += conf;
          b[2] += pred == t ? 1.0 : 0.0;
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const double v = vals ? vals[c] / static_cast<double>(S) : static_cast<double>(row[c]);
            double* b = st + (c * B + uniform_bin(v, B)) * kCalibStats;
            b[0] += 1.0;
            b[1] += v;
            b[2] += c == t ? 1.0 : 0.0;
          }
        }
      };
      const int64_t r0 = chunk * N / nchunks, r1 = (chunk + 1) * N / nchunks;
      if (!direct && !logits) {
        for (int64_t blk = r0; blk < r1; blk += kBlock) {
          const int64_t nb = std::min(kBlock, r1 - blk), len = nb * C;
          std::fill(acc.begin(), acc.begin() + len, 0.0);
          bool any_neg = false;
          for (int64_t s = 0; s < S; ++s) any_neg |= accumulate(p + s * stride_s + blk * C, acc.data(), len);
          std::fill(negrow.begin(), negrow.begin() + nb, 0);
          if (any_neg)  // rare (invalid input): find which rows
            for (int64_t s = 0; s < S; ++s)
              for (int64_t i = 0; i < len; ++i)
                if (static_cast<double>(p[s * stride_s + blk * C + i]) < 0.0) negrow[i / C] = 1;
          for (int64_t r = 0; r < nb; ++r) {
            const double* a = acc.data() + r * C;
            double mx = a[0], sum = 0.0;
            int64_t pred = 0;
            for (int64_t c = 0; c < C; ++c) {
              const bool gt = a[c] > mx;
              mx = gt ? a[c] : mx;
              pred = gt ? c : pred;
              sum += a[c];
            }
            sum /= static_cast<double>(S);
            finish(blk + r, nullptr, a, mx / static_cast<double>(S), pred, sum, negrow[r] != 0, std::isfinite(sum));
          }
        }
        continue;
      }
      for (int64_t n = r0; n < r1; ++n) {
        const scalar_t* row = p + n * C;
        double conf, sum = 0.0;
        int64_t pred = 0;
        bool neg = false, finite;
        if (direct) {
          if (C < 64) {  // short rows: one fused scalar pass
            scalar_t mx = row[0];
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t v = row[c];
              const bool gt = v > mx;  // strict: ties keep the lowest class index
              mx = gt ? v : mx;
              pred = gt ? c : pred;
              sum += static_cast<double>(v);
              neg |= v < scalar_t(0);
            }
            conf = static_cast<double>(mx);
          } else {  // long rows: vectorised sum and max, then the first index of the max
            sum = row_sum(row, C, neg);
            const auto mx = row_max(row, C);
            if (std::isfinite(sum))
              while (pred < C - 1 && static_cast<decltype(mx)>(row[pred]) != mx) ++pred;
            conf = static_cast<double>(mx);
          }
          finite = std::isfinite(sum);
        } else {
          std::fill(acc.begin(), acc.end(), 0.0);
          finite = true;
          for (int64_t s = 0; s < S && finite; ++s) {
            const scalar_t* rs = row + s * stride_s;
            double m = -INFINITY;
            for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(rs[c]));
            double z = 0.0;
            for (int64_t c = 0; c < C; ++c) {
              tmp[c] = std::exp(static_cast<double>(rs[c]) - m);
              z += tmp[c];
            }
            finite = std::isfinite(m) && std::isfinite(z);
            for (int64_t c = 0; c < C; ++c) acc[c] += tmp[c] / z;
          }
          double mx = acc[0];
          for (int64_t c = 0; c < C; ++c) {
            const bool gt = acc[c] > mx;
            mx = gt ? acc[c] : mx;
            pred = gt ? c : pred;
          }
          conf = mx / static_cast<double>(S);
        }
        finish(n, row, direct ? nullptr : acc.data(), conf, pred, sum, neg, finite);
      }
    }
  });
  for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
    const double* st = partial.data() + chunk * width;
    for (int64_t j = 0; j < nstat; ++j) bins[j] += st[j];
    for (int64_t j = 0; j < kCalibDiag; ++j) diag[j] += st[nstat + j];
  }
}

std::tuple<at::Tensor, at::Tensor> calibration_bins_cpu(const at::Tensor& probs, const at::Tensor& targets,
                                                        int64_t n_bins, bool from_logits, bool classwise,
                                                        double sum_tol) {
  check_calibration_args(probs, targets, n_bins, sum_tol, c10::DeviceType::CPU);
  const int64_t S = probs.size(0), N = probs.size(1), C = probs.size(2);
  const auto f64 = probs.options().dtype(at::kDouble);
  at::Tensor bins = classwise ? at::zeros({C, n_bins, kCalibStats}, f64) : at::zeros({n_bins, kCalibStats}, f64);
  at::Tensor diag = at::zeros({kCalibDiag}, f64);
  if (N == 0) return {bins, diag};
  const at::Tensor p = probs.contiguous();
  const at::Tensor y = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "calibration_bins", [&] {
    bins_kernel<scalar_t>(p.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), S, N, C, n_bins, from_logits,
                          classwise, sum_tol, bins.data_ptr<double>(), diag.data_ptr<double>());
  });
  return {bins, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) { m.impl("calibration_bins", &calibration_bins_cpu); }

}  // namespace pyfastbayes::cpu
