// Per-element SWAG / SWA rules (Izmailov et al. 2018; Maddox et al. 2019): the one definition
// used by the CPU loop and the CUDA kernel.
//
// collect, with w = 1 / (n + 1) and n the number of models averaged before this call:
//   mean <- lerp(mean, theta, w);  sq_mean <- lerp(sq_mean, theta^2, w);  dev = theta - mean (new)
// lerp is written as ATen's (a + w (b - a) for w < 1/2, else b - (b - a)(1 - w)), so the running
// mean of fp32 parameters equals torch.optim.swa_utils.AveragedModel's (w = 1 gives theta exactly).
//
// sample, scale multiplies the covariance (swa_gaussian's convention; scale = 0.5 is the SWAG
// paper's posterior N(mean, (diag(sigma^2) + D^T D / (K - 1)) / 2)):
//   sigma^2 = max(sq_mean - mean^2, eps)
//   lowrank: Sigma = scale (diag(sigma^2) + D^T D / (K - 1)),
//            theta = mean + sqrt(scale) sigma z1 + sqrt(scale / (K - 1)) sum_k z2[k] D[k]
//   diag:    Sigma = scale diag(sigma^2), theta = mean + sqrt(scale) sigma z1
// z1 of draw s is the Philox normal stream (seed, kSwagDiagStream + s, step) indexed by the global
// parameter index; z2 [S, K] is the stream (seed, kSwagLowRankStream, step), element s * K + k.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace pyfastbayes {

constexpr uint32_t kSwagDiagStream = 0x53570000u;     // + draw index (< 2^16 draws per call)
constexpr uint32_t kSwagLowRankStream = 0x5357FFFFu;  // z2 of every draw of the call
constexpr int64_t kSwagMaxDraws = 0xFFFF;

template <typename op_t>
PFB_HD op_t swag_lerp(op_t a, op_t b, op_t w) {
  return (w < op_t(0.5)) ? a + w * (b - a) : b - (b - a) * (op_t(1) - w);
}

// one collect for one element; returns the deviation from the updated mean
template <typename op_t>
PFB_HD op_t swag_collect_elem(op_t theta, op_t& mean, op_t& sq_mean, op_t w, bool has_sq) {
  mean = swag_lerp(mean, theta, w);
  if (has_sq) sq_mean = swag_lerp(sq_mean, theta * theta, w);
  return theta - mean;
}

template <typename op_t>
PFB_HD op_t swag_sigma(op_t mean, op_t sq_mean, op_t eps) {
  const op_t var = sq_mean - mean * mean;
  return sqrt(var > eps ? var : eps);
}

// the coefficients of a draw for the covariance convention above (K = 0: diagonal)
struct SwagCoefficients {
  double diag, lowrank;
};
inline SwagCoefficients swag_coefficients(double scale, int64_t K) {
  return {std::sqrt(scale), K > 0 ? std::sqrt(scale / static_cast<double>(K - 1)) : 0.0};
}

// c_diag, c_low from swag_coefficients; lowrank_acc = sum_k z2[s, k] D[k, j] accumulated in k order
template <typename op_t>
PFB_HD op_t swag_draw(op_t mean, op_t sigma, float z1, op_t lowrank_acc, op_t c_diag, op_t c_low) {
  return mean + c_diag * sigma * op_t(z1) + c_low * lowrank_acc;
}

// ---- host-side argument checks shared by the CPU and CUDA implementations --------------------

inline bool swag_state_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }
inline bool swag_dev_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// swag_collect_: returns P; every check runs before anything is written
inline int64_t check_swag_collect(at::TensorList params, const at::Tensor& mean,
                                  const std::optional<at::Tensor>& sq_mean,
                                  const std::optional<at::Tensor>& deviation, int64_t n,
                                  c10::DeviceType device_type) {
  const char* op = "swag_collect_";
  TORCH_CHECK(n >= 0, op, ": n (models averaged so far) must be >= 0, got ", n);
  TORCH_CHECK(mean.device().type() == device_type, op, ": mean is on ", mean.device(), ", expected ", device_type);
  TORCH_CHECK(swag_state_dtype(mean.scalar_type()), op, ": mean must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(mean.dim() == 1 && mean.is_contiguous() && mean.layout() == at::kStrided, op,
              ": mean must be a contiguous 1-D tensor, got shape ", mean.sizes());
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] must be dense (strided), got ", p.layout());
    TORCH_CHECK(p.device() == mean.device(), op, ": params[", i, "] is on ", p.device(), " but mean is on ",
                mean.device());
    TORCH_CHECK(swag_dev_dtype(p.scalar_type()), op, ": params[", i, "] must be float64/32/16 or bfloat16, got ",
                p.scalar_type());
    total += p.numel();
  }
  TORCH_CHECK(params.size() < (size_t(1) << 31), op, ": too many tensors");
  TORCH_CHECK(mean.numel() == total, op, ": mean has ", mean.numel(), " elements but the params have ", total);
  if (sq_mean.has_value()) {
    TORCH_CHECK(sq_mean->device() == mean.device() && sq_mean->scalar_type() == mean.scalar_type() &&
                    sq_mean->sizes() == mean.sizes() && sq_mean->is_contiguous(),
                op, ": sq_mean must be a contiguous ", mean.scalar_type(), " [", total, "] on ", mean.device(),
                " like mean");
  }
  if (deviation.has_value()) {
    TORCH_CHECK(sq_mean.has_value(), op, ": a deviation row needs sq_mean (SWAG); pass neither for SWA");
    TORCH_CHECK(deviation->device() == mean.device(), op, ": deviation is on ", deviation->device(),
                " but mean is on ", mean.device());
    TORCH_CHECK(swag_dev_dtype(deviation->scalar_type()), op,
                ": deviation must be float64/32/16 or bfloat16, got ", deviation->scalar_type());
    TORCH_CHECK(deviation->dim() == 1 && deviation->numel() == total && deviation->is_contiguous(), op,
                ": deviation must be a contiguous [", total, "] row, got shape ", deviation->sizes());
  }
  return total;
}

// swag_sample: returns K (rows of D, 0 for the diagonal covariance)
inline int64_t check_swag_sample(const at::Tensor& mean, const at::Tensor& sq_mean, const std::optional<at::Tensor>& D,
                                 int64_t n_draws, double scale, double eps, int64_t offset,
                                 c10::DeviceType device_type) {
  const char* op = "swag_sample";
  TORCH_CHECK(mean.device().type() == device_type, op, ": mean is on ", mean.device(), ", expected ", device_type);
  TORCH_CHECK(swag_state_dtype(mean.scalar_type()), op, ": mean must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(mean.dim() == 1 && mean.is_contiguous(), op, ": mean must be a contiguous 1-D tensor, got shape ",
              mean.sizes());
  TORCH_CHECK(sq_mean.device() == mean.device() && sq_mean.scalar_type() == mean.scalar_type() &&
                  sq_mean.sizes() == mean.sizes() && sq_mean.is_contiguous(),
              op, ": sq_mean must be a contiguous ", mean.scalar_type(), " tensor shaped like mean on ", mean.device());
  TORCH_CHECK(n_draws >= 0 && n_draws <= kSwagMaxDraws, op, ": n_draws must be in [0, ", kSwagMaxDraws, "], got ",
              n_draws);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a finite number > 0, got ", scale);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(offset >= 0 && offset % 4 == 0, op, ": offset must be a non-negative multiple of 4, got ", offset);
  if (!D.has_value()) return 0;
  TORCH_CHECK(D->device() == mean.device(), op, ": D is on ", D->device(), " but mean is on ", mean.device());
  TORCH_CHECK(swag_dev_dtype(D->scalar_type()), op, ": D must be float64/32/16 or bfloat16, got ", D->scalar_type());
  TORCH_CHECK(D->dim() == 2 && D->size(1) == mean.numel(), op, ": D must be [K, ", mean.numel(), "], got ",
              D->sizes());
  TORCH_CHECK(D->size(0) >= 2, op, ": the low-rank part needs K >= 2 deviation rows, got ", D->size(0));
  TORCH_CHECK(D->stride(1) == 1 || D->size(1) <= 1, op, ": D's rows must be contiguous (stride(1) == 1)");
  return D->size(0);
}

}  // namespace pyfastbayes
