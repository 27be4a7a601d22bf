// CPU kernel of loss_hessian: rows split over threads (at::parallel_for); per row the softmax is
// computed once (cross_entropy; gaussian_natural: each 2 x 2 block's columns in turn), then the k columns of V_n are read row by row of V_n (contiguous)
// twice: once for the k dots (double accumulators), once for the outputs. Per-element math:
// common/curvature.h (the CUDA kernel's functions).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks/curvature.h"
#include "common/curvature.h"

namespace pyfastbayes::cpu {
namespace {

// bce / mse: out[n, c, :] = scale(x[n, c]) * V[n, c, :].
template <typename scalar_t>
void elementwise_rows(const scalar_t* x, const scalar_t* v, scalar_t* out, int64_t r0, int64_t r1, int64_t C,
                      int64_t k, LossProblem pr) {
  using T = at::opmath_type<scalar_t>;
  for (int64_t i = r0 * C; i < r1 * C; ++i) {  // i = n * C + c
    const T a = elementwise_scale(pr.kind, pr.mode, static_cast<T>(x[i]));
    const scalar_t* vi = v + i * k;
    scalar_t* oi = out + i * k;
    for (int64_t j = 0; j < k; ++j) oi[j] = static_cast<scalar_t>(a * static_cast<T>(vi[j]));
  }
}

// gaussian_natural rows [r0, r1): block d of row n pairs outputs (d, D + d), C = 2D; each column j
// of the block's two rows of V_n gives the two outputs (common/curvature.h).
template <typename scalar_t>
void gaussian_natural_rows(const scalar_t* x, const scalar_t* v, scalar_t* out, int64_t r0, int64_t r1, int64_t C,
                           int64_t k, HessMode mode) {
  using T = at::opmath_type<scalar_t>;
  const int64_t D = C / 2;
  for (int64_t n = r0; n < r1; ++n)
    for (int64_t d = 0; d < D; ++d) {
      const T eta1 = static_cast<T>(x[n * C + d]), eta2 = static_cast<T>(x[n * C + D + d]);
      const scalar_t* v1 = v + (n * C + d) * k;
      const scalar_t* v2 = v1 + D * k;
      scalar_t* o1 = out + (n * C + d) * k;
      scalar_t* o2 = o1 + D * k;
      for (int64_t j = 0; j < k; ++j) {
        T a, b;
        gaussian_natural_out(eta1, eta2, static_cast<T>(v1[j]), static_cast<T>(v2[j]), mode, a, b);
        o1[j] = static_cast<scalar_t>(a);
        o2[j] = static_cast<scalar_t>(b);
      }
    }
}

// cross_entropy rows [r0, r1): softmax once per row into w / a (the dot weights and the output
// scales of the mode), the k dots in double, then the outputs.
template <typename scalar_t>
void cross_entropy_rows(const scalar_t* x, const scalar_t* v, scalar_t* out, int64_t r0, int64_t r1, int64_t C,
                        int64_t k, HessMode mode) {
  using T = at::opmath_type<scalar_t>;
  std::vector<T> w(static_cast<size_t>(C)), a(static_cast<size_t>(C));
  std::vector<double> t(static_cast<size_t>(k));
  std::vector<T> tt(static_cast<size_t>(k));
  for (int64_t n = r0; n < r1; ++n) {
    const scalar_t* xr = x + n * C;
    const scalar_t* vr = v + n * C * k;
    scalar_t* orow = out + n * C * k;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<T>(xr[c]));
    double z = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const T e = typed_exp(static_cast<T>(xr[c]) - m);
      w[c] = e;
      z += static_cast<double>(e);
    }
    for (int64_t c = 0; c < C; ++c) {
      const T p = softmax_prob(w[c], z);
      w[c] = ce_dot_weight(p, mode);
      a[c] = ce_out_scale(p, mode);
    }
    std::fill(t.begin(), t.end(), 0.0);
    for (int64_t c = 0; c < C; ++c) {
      const double wc = static_cast<double>(w[c]);
      const scalar_t* vc = vr + c * k;
      for (int64_t j = 0; j < k; ++j) t[j] += wc * static_cast<double>(static_cast<T>(vc[j]));
    }
    for (int64_t j = 0; j < k; ++j) tt[j] = static_cast<T>(t[j]);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* vc = vr + c * k;
      scalar_t* oc = orow + c * k;
      for (int64_t j = 0; j < k; ++j) oc[j] = static_cast<scalar_t>(ce_out(a[c], static_cast<T>(vc[j]), tt[j], mode));
    }
  }
}

at::Tensor loss_hessian_cpu(c10::string_view kind, const at::Tensor& outputs, const at::Tensor& V,
                            c10::string_view mode) {
  const LossProblem pr = check_loss_hessian(kind, outputs, V, mode, c10::DeviceType::CPU);
  const int64_t N = outputs.size(0), C = outputs.size(1), k = V.size(2);
  at::Tensor out = at::empty({N, C, k}, V.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const at::Tensor x = outputs.contiguous();
  const at::Tensor v = V.contiguous();
  const int64_t grain = std::max<int64_t>(1, 32768 / (C * k));  // rows per task: about 32k elements
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "loss_hessian", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      if (pr.kind == LossKind::kCrossEntropy) cross_entropy_rows(xp, vp, op, r0, r1, C, k, pr.mode);
      else if (pr.kind == LossKind::kGaussianNatural) gaussian_natural_rows(xp, vp, op, r0, r1, C, k, pr.mode);
      else elementwise_rows(xp, vp, op, r0, r1, C, k, pr);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) { m.impl("loss_hessian", &loss_hessian_cpu); }

}  // namespace pyfastbayes::cpu
