// CPU kernel of landscape_points_: the P parameters split over threads (at::parallel_for) in
// chunks of kChunk; per chunk theta0 and the m direction rows are converted to the math type once
// (kept in L1 / L2), then every point i writes its out[i, chunk] row: acc = theta0, then
// acc = acc + c_ij * d_j for j = 0..m-1 (the loop over the chunk is innermost: contiguous,
// vectorisable). Per-element math: common/landscape.h (the CUDA kernel's function).
//
// landscape_combine and landscape_bias_act_: the c * R rows of the output split over threads; per
// row one loop over its F features (contiguous, vectorised: target_clones for AVX2 / AVX-512, fp32
// and fp64 in their own type, fp16 / bf16 through float in chunks of kChunk features), the
// activation applied in the same loop (the output is written once).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks/landscape.h"
#include "common/landscape.h"
#include "cpu/clones.h"

namespace pyfastbayes::cpu {
namespace {

constexpr int64_t kChunk = 512;  // parameters per inner block: (m + 2) * 512 math-type values <= 40 KiB

// out[:, p0:p1) for every point; c: the n x m coords already in T.
template <typename scalar_t, typename T>
void landscape_range(const scalar_t* th, const scalar_t* d, const T* c, scalar_t* out, int64_t n, int64_t m,
                     int64_t P, int64_t p0, int64_t p1) {
  T th_t[kChunk], acc[kChunk];
  std::vector<T> dir(static_cast<size_t>(m * kChunk));
  for (int64_t q0 = p0; q0 < p1; q0 += kChunk) {
    const int64_t len = std::min(kChunk, p1 - q0);
    for (int64_t p = 0; p < len; ++p) th_t[p] = static_cast<T>(th[q0 + p]);
    for (int64_t j = 0; j < m; ++j)
      for (int64_t p = 0; p < len; ++p) dir[j * kChunk + p] = static_cast<T>(d[j * P + q0 + p]);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t p = 0; p < len; ++p) acc[p] = th_t[p];
      for (int64_t j = 0; j < m; ++j) {  // fixed order j = 0..m-1, as the kernel and the reference
        const T cij = c[i * m + j];
        const T* dj = dir.data() + j * kChunk;
        for (int64_t p = 0; p < len; ++p) acc[p] = landscape_step(acc[p], cij, dj[p]);
      }
      scalar_t* orow = out + i * P + q0;
      for (int64_t p = 0; p < len; ++p) orow[p] = static_cast<scalar_t>(acc[p]);
    }
  }
}

void landscape_points_cpu(const at::Tensor& theta0, const at::Tensor& directions, const at::Tensor& coords,
                          const at::Tensor& out) {
  check_landscape_points(theta0, directions, coords, out, c10::DeviceType::CPU);
  const int64_t P = theta0.size(0), m = directions.size(0), n = coords.size(0);
  if (n == 0 || P == 0) return;
  const at::Tensor th = theta0.contiguous();
  const at::Tensor d = directions.contiguous();
  const at::Tensor cc = coords.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, th.scalar_type(), "landscape_points_", [&] {
    using T = at::opmath_type<scalar_t>;
    // the coords rounded once to T (from float64 or from the tensors' dtype)
    std::vector<T> c(static_cast<size_t>(n * m));
    if (cc.scalar_type() == at::kDouble) {
      const double* cp = cc.const_data_ptr<double>();
      for (int64_t k = 0; k < n * m; ++k) c[k] = static_cast<T>(cp[k]);
    } else {
      const scalar_t* cp = cc.const_data_ptr<scalar_t>();
      for (int64_t k = 0; k < n * m; ++k) c[k] = static_cast<T>(cp[k]);
    }
    const scalar_t* thp = th.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // a task covers at least kChunk parameters, more when there are few points (about 32k outputs)
    const int64_t grain = std::max<int64_t>(kChunk, 32768 / std::max<int64_t>(n, 1));
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
      landscape_range<scalar_t, T>(thp, dp, c.data(), op, n, m, P, p0, p1);
    });
  });
}

// rows per task: about 32k outputs
int64_t row_grain(int64_t F) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1)); }

// ---- Row loops of the fused passes, compiled as target_clones (cpu/clones.h); this file is built
// with contraction off (CMakeLists.txt): every product and sum rounded on its own, as the reference
// and the CUDA kernel.

// o[f] = act(sum_j w[j] * row[j * F + f]) for one output row (T: the tensors' own type, float or double).
template <class T>
PFB_CPU_INLINE void combine_row(const T* __restrict row, const T* __restrict w, T* __restrict o, int64_t F, int k,
                               int act) {
  if (k == 3) {  // a plane: theta0 and two directions
    const T w0 = w[0], w1 = w[1], w2 = w[2];
    const T* __restrict p1 = row + F;
    const T* __restrict p2 = row + 2 * F;
    for (int64_t f = 0; f < F; ++f)
      o[f] = landscape_act(landscape_step(landscape_step(landscape_first_term(w0, row[f]), w1, p1[f]), w2, p2[f]), act);
    return;
  }
  if (k == 2) {  // a line
    const T w0 = w[0], w1 = w[1];
    const T* __restrict p1 = row + F;
    for (int64_t f = 0; f < F; ++f)
      o[f] = landscape_act(landscape_step(landscape_first_term(w0, row[f]), w1, p1[f]), act);
    return;
  }
  for (int64_t f = 0; f < F; ++f) o[f] = landscape_first_term(w[0], row[f]);  // any k: the row accumulates
  for (int j = 1; j < k; ++j) {
    const T wj = w[j];
    const T* __restrict pj = row + j * F;
    for (int64_t f = 0; f < F; ++f) o[f] = landscape_step(o[f], wj, pj[f]);
  }
  if (act != kActNone)
    for (int64_t f = 0; f < F; ++f) o[f] = landscape_act(o[f], act);
}

// rows i0..i1 of out [c, R, F] (i = p * R + r) from parts [R, k, F] and mix [c, k]
template <class T>
PFB_CPU_INLINE void combine_rows(const T* parts, const T* mix, T* out, int64_t i0, int64_t i1, int64_t R, int64_t F,
                                int k, int act) {
  for (int64_t i = i0; i < i1; ++i)
    combine_row(parts + (i % R) * k * F, mix + (i / R) * k, out + i * F, F, k, act);
}

// rows i0..i1 of x [c, R, F] in place: act(x + bias[p]) (bias null: act(x))
template <class T>
PFB_CPU_INLINE void bias_act_rows(T* x, const T* bias, int64_t i0, int64_t i1, int64_t R, int64_t F, int act) {
  for (int64_t i = i0; i < i1; ++i) {
    T* __restrict row = x + i * F;
    if (bias != nullptr) {
      const T* __restrict b = bias + (i / R) * F;
      for (int64_t f = 0; f < F; ++f) row[f] = landscape_act(add_rn(row[f], b[f]), act);
    } else {
      for (int64_t f = 0; f < F; ++f) row[f] = landscape_act(row[f], act);
    }
  }
}

PFB_CPU_CLONES void combine_rows_f32(const float* parts, const float* mix, float* out, int64_t i0, int64_t i1,
                                    int64_t R, int64_t F, int k, int act) {
  combine_rows(parts, mix, out, i0, i1, R, F, k, act);
}
PFB_CPU_CLONES void combine_rows_f64(const double* parts, const double* mix, double* out, int64_t i0, int64_t i1,
                                    int64_t R, int64_t F, int k, int act) {
  combine_rows(parts, mix, out, i0, i1, R, F, k, act);
}
PFB_CPU_CLONES void bias_act_rows_f32(float* x, const float* bias, int64_t i0, int64_t i1, int64_t R, int64_t F,
                                     int act) {
  bias_act_rows(x, bias, i0, i1, R, F, act);
}
PFB_CPU_CLONES void bias_act_rows_f64(double* x, const double* bias, int64_t i0, int64_t i1, int64_t R, int64_t F,
                                     int act) {
  bias_act_rows(x, bias, i0, i1, R, F, act);
}

// fp16 / bf16: the same rows through float math (converted per chunk of kChunk features)
template <typename scalar_t>
void combine_rows_typed(const scalar_t* parts, const scalar_t* mix, scalar_t* out, int64_t i0, int64_t i1, int64_t R,
                       int64_t F, int k, int act) {
  float p[kLandscapeMaxParts * kChunk], w[kLandscapeMaxParts], o[kChunk];
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t* row = parts + (i % R) * k * F;
    for (int j = 0; j < k; ++j) w[j] = static_cast<float>(mix[(i / R) * k + j]);
    for (int64_t f0 = 0; f0 < F; f0 += kChunk) {
      const int64_t len = std::min(kChunk, F - f0);
      for (int j = 0; j < k; ++j)
        for (int64_t f = 0; f < len; ++f) p[j * len + f] = static_cast<float>(row[j * F + f0 + f]);
      combine_row(p, w, o, len, k, act);
      for (int64_t f = 0; f < len; ++f) out[i * F + f0 + f] = static_cast<scalar_t>(o[f]);
    }
  }
}

template <typename scalar_t>
void bias_act_rows_typed(scalar_t* x, const scalar_t* bias, int64_t i0, int64_t i1, int64_t R, int64_t F, int act) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t f = 0; f < F; ++f) {
      float v = static_cast<float>(x[i * F + f]);
      if (bias != nullptr) v = add_rn(v, static_cast<float>(bias[(i / R) * F + f]));
      x[i * F + f] = static_cast<scalar_t>(landscape_act(v, act));
    }
}

// the typed entry points: fp32 / fp64 to their clones, the others to the templates above
void combine_rows_typed(const float* p, const float* m, float* o, int64_t i0, int64_t i1, int64_t R, int64_t F, int k,
                        int act) {
  combine_rows_f32(p, m, o, i0, i1, R, F, k, act);
}
void combine_rows_typed(const double* p, const double* m, double* o, int64_t i0, int64_t i1, int64_t R, int64_t F,
                        int k, int act) {
  combine_rows_f64(p, m, o, i0, i1, R, F, k, act);
}
void bias_act_rows_typed(float* x, const float* b, int64_t i0, int64_t i1, int64_t R, int64_t F, int act) {
  bias_act_rows_f32(x, b, i0, i1, R, F, act);
}
void bias_act_rows_typed(double* x, const double* b, int64_t i0, int64_t i1, int64_t R, int64_t F, int act) {
  bias_act_rows_f64(x, b, i0, i1, R, F, act);
}

at::Tensor landscape_combine_cpu(const at::Tensor& parts, const at::Tensor& mix, c10::string_view act) {
  const int a = check_landscape_combine(parts, mix, act, c10::DeviceType::CPU);
  const int64_t R = parts.size(0), F = parts.size(2), c = mix.size(0);
  const int k = static_cast<int>(parts.size(1));
  at::Tensor out = at::empty({c, R, F}, parts.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor pc = parts.contiguous();
  const at::Tensor mc = mix.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc.scalar_type(), "landscape_combine", [&] {
    const scalar_t* pp = pc.const_data_ptr<scalar_t>();
    const scalar_t* mp = mc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, c * R, row_grain(F), [&](int64_t i0, int64_t i1) {
      combine_rows_typed(pp, mp, op, i0, i1, R, F, k, a);
    });
  });
  return out;
}

void landscape_bias_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view act) {
  const int a = check_landscape_bias_act(x, bias, act, c10::DeviceType::CPU);
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.numel() == 0 || (!has_bias && a == kActNone)) return;
  const int64_t c = x.size(0), R = x.size(1), F = x.size(2);
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "landscape_bias_act_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, c * R, row_grain(F), [&](int64_t i0, int64_t i1) {
      bias_act_rows_typed(xp, bp, i0, i1, R, F, a);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  m.impl("landscape_points_", &landscape_points_cpu);
  m.impl("landscape_combine", &landscape_combine_cpu);
  m.impl("landscape_bias_act_", &landscape_bias_act_cpu);
}

}  // namespace pyfastbayes::cpu
