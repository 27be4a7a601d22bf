// CUDA kernel of calibration_bins. A "group" of G lanes (G = the power of two >= C, at most 32)
// handles one row: lane l owns the classes c = l, l + G, ...; the row's max / argmax / sum are
// reduced with xor shuffles (every lane ends with the same values). Top-label bins live in
// shared memory per block (float64 atomics, one lane per row), flushed to global with atomics at
// the end; class-wise bins go straight to global atomics. Per-row math in float64 for the
// averaged confidence; the bin rule is common/calibration.h (same function as the CPU loop).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/calibration.h"
#include "common/calibration_args.h"

namespace pyfastbayes::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSmemBins = 48 * 1024 / (kCalibStats * sizeof(double));  // B up to 2048 in shared
constexpr int64_t kMaxWorkDoubles = int64_t(2) << 20;                          // 16 MiB of row scratch (stays in L2)

__device__ __forceinline__ void group_max_arg(double& v, int64_t& arg, int G) {
  for (int off = G / 2; off > 0; off >>= 1) {
    const double ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, off);
    if (ov > v || (ov == v && oa < arg)) {  // larger value wins; ties keep the lowest class
      v = ov;
      arg = oa;
    }
  }
}
__device__ __forceinline__ double group_sum(double v, int G) {
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ double group_max(double v, int G) {
  for (int off = G / 2; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ int group_or(int v, int G) {
  for (int off = G / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// work: [gridDim.x * groups_per_block, C] float64 scratch (logits or classwise), else nullptr.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    calibration_bins_kernel(const scalar_t* __restrict__ p, const int64_t* __restrict__ y, int64_t S, int64_t N,
                            int64_t C, int64_t B, bool logits, bool classwise, double tol, int G,
                            bool smem_bins, double* __restrict__ work, double* __restrict__ bins,
                            double* __restrict__ diag) {
  using op_t = at::opmath_type<scalar_t>;
  extern __shared__ double sbins[];
  const int64_t nstat = (classwise ? C : 1) * B * kCalibStats;  // bins held in shared memory
  if (smem_bins) {
    for (int64_t i = threadIdx.x; i < nstat; i += blockDim.x) sbins[i] = 0.0;
    __syncthreads();
  }
  double* tgt = smem_bins ? sbins : bins;
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int64_t gpb = blockDim.x / G;  // groups (rows in flight) per block
  const int64_t gib = threadIdx.x / G;
  // per-row scratch: acc [C] (sum over draws); with logits also tmp [C] (the draw's exponentials)
  const int64_t wstride = (logits ? 2 : 1) * C;
  double* acc = work ? work + (static_cast<int64_t>(blockIdx.x) * gpb + gib) * wstride : nullptr;
  double* tmp = logits ? acc + C : nullptr;
  const int64_t stride_s = N * C;
  const double sd = static_cast<double>(S);  // divide (not multiply by 1/S): same rounding as the CPU
  double d_sum = 0.0, d_neg = 0.0, d_tgt = 0.0, d_fin = 0.0;

  // The loop bound is uniform over the block, so every lane of a warp runs the same shuffles;
  // a group past the last row computes on nothing and records nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * gpb; base < N; base += static_cast<int64_t>(gridDim.x) * gpb) {
    const int64_t n = base + gib;
    const bool active = n < N;
    const scalar_t* row = p + (active ? n : 0) * C;
    double mx = -INFINITY, sum = 0.0;
    int64_t pred = INT64_MAX;
    int neg = 0;
    bool finite = true;
    if (!logits) {
      for (int64_t c = lane; active && c < C; c += G) {
        double a;
        if (S == 1) {
          const op_t v = static_cast<op_t>(row[c]);
          neg |= v < op_t(0);
          a = static_cast<double>(v);
        } else {
          a = 0.0;
          for (int64_t s = 0; s < S; ++s) {
            const double v = static_cast<double>(static_cast<op_t>(row[s * stride_s + c]));
            neg |= v < 0.0;
            a += v;
          }
        }
        if (acc) acc[c] = a;  // sum over draws (divided by S below)
        if (a > mx) {
          mx = a;
          pred = c;
        }
        sum += a;
      }
      sum = group_sum(sum, G) / sd;
      neg = group_or(neg, G);
      finite = isfinite(sum);
    } else {
      if (active)
        for (int64_t c = lane; c < C; c += G) acc[c] = 0.0;
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* rs = row + s * stride_s;
        double m = -INFINITY;
        for (int64_t c = lane; active && c < C; c += G) m = fmax(m, static_cast<double>(static_cast<op_t>(rs[c])));
        m = group_max(m, G);
        double z = 0.0;
        for (int64_t c = lane; active && c < C; c += G) {
          const double e = exp(static_cast<double>(static_cast<op_t>(rs[c])) - m);  // once per element
          tmp[c] = e;
          z += e;
        }
        z = group_sum(z, G);
        finite = finite && isfinite(m) && isfinite(z);
        for (int64_t c = lane; active && c < C; c += G) acc[c] += tmp[c] / z;  // the lane's own writes
      }
      for (int64_t c = lane; active && c < C; c += G) {
        if (acc[c] > mx) {
          mx = acc[c];
          pred = c;
        }
      }
    }
    group_max_arg(mx, pred, G);
    if (!active) continue;
    const double conf = mx / sd;
    const int64_t t = y[n];
    const bool bad_target = t < 0 || t >= C;
    const bool skip = !finite || bad_target;
    if (lane == 0) {
      if (!finite) {
        d_fin += 1.0;
      } else if (bad_target) {
        d_tgt += 1.0;
      } else {
        if (!logits) {
          if (!(fabs(sum - 1.0) <= tol)) d_sum += 1.0;
          if (neg) d_neg += 1.0;
        }
        if (!classwise) {
          double* b = tgt + uniform_bin(conf, B) * kCalibStats;
          atomicAdd(b, 1.0);
          atomicAdd(b + 1, conf);
          if (pred == t) atomicAdd(b + 2, 1.0);
        }
      }
    }
    if (classwise && !skip) {
      for (int64_t c = lane; c < C; c += G) {
        const double v = acc[c] / sd;  // the lane's own writes: no synchronisation needed
        double* b = tgt + (c * B + uniform_bin(v, B)) * kCalibStats;
        atomicAdd(b, 1.0);
        atomicAdd(b + 1, v);
        if (c == t) atomicAdd(b + 2, 1.0);
      }
    }
  }
  if (d_sum != 0.0) atomicAdd(diag + kDiagBadSum, d_sum);
  if (d_neg != 0.0) atomicAdd(diag + kDiagNegative, d_neg);
  if (d_tgt != 0.0) atomicAdd(diag + kDiagBadTarget, d_tgt);
  if (d_fin != 0.0) atomicAdd(diag + kDiagNonFinite, d_fin);
  if (smem_bins) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < nstat; i += blockDim.x)
      if (sbins[i] != 0.0) atomicAdd(bins + i, sbins[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> calibration_bins_cuda(const at::Tensor& probs, const at::Tensor& targets,
                                                         int64_t n_bins, bool from_logits, bool classwise,
                                                         double sum_tol) {
  check_calibration_args(probs, targets, n_bins, sum_tol, c10::DeviceType::CUDA);

  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t S = probs.size(0), N = probs.size(1), C = probs.size(2);
  const auto f64 = probs.options().dtype(at::kDouble);
  at::Tensor bins = classwise ? at::zeros({C, n_bins, kCalibStats}, f64) : at::zeros({n_bins, kCalibStats}, f64);
  at::Tensor diag = at::zeros({kCalibDiag}, f64);
  if (N == 0) return {bins, diag};
  const at::Tensor p = probs.contiguous();
  const at::Tensor y = targets.contiguous();

  int G = 1;
  while (G < C && G < 32) G <<= 1;
  const int64_t gpb = kThreads / G;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t blocks = std::min<int64_t>((N + gpb - 1) / gpb, int64_t(sms) * 8);
  at::Tensor work;
  if (from_logits || classwise) {
    const int64_t wstride = (from_logits ? 2 : 1) * C;
    blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxWorkDoubles / (gpb * wstride)));
    work = at::empty({blocks * gpb, wstride}, f64);
  }
  const int64_t nbins_total = (classwise ? C : 1) * n_bins;  // class-wise bins too, when they fit
  const bool smem_bins = nbins_total <= kMaxSmemBins;
  const size_t smem = smem_bins ? static_cast<size_t>(nbins_total) * kCalibStats * sizeof(double) : 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "calibration_bins_cuda", [&] {
    calibration_bins_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        p.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), S, N, C, n_bins, from_logits, classwise, sum_tol,
        G, smem_bins, work.defined() ? work.data_ptr<double>() : nullptr, bins.data_ptr<double>(),
        diag.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {bins, diag};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("calibration_bins", &calibration_bins_cuda); }

}  // namespace pyfastbayes::cuda
