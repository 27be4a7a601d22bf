// CPU kernel of landscape_points_: the P parameters split over threads (at::parallel_for) in
// chunks of kChunk; per chunk theta0 and the m direction rows are converted to the math type once
// (kept in L1 / L2), then every point i writes its out[i, chunk] row: acc = theta0, then
// acc = acc + c_ij * d_j for j = 0..m-1 (the loop over the chunk is innermost: contiguous,
// vectorisable). Per-element math: common/landscape.h (the CUDA kernel's function).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks/landscape.h"
#include "common/landscape.h"

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

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) { m.impl("landscape_points_", &landscape_points_cpu); }

}  // namespace pyfastbayes::cpu
