// Host-only argument checks of calibration_bins and its outputs, shared by the CPU and CUDA entry
// points.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "checks/common.h"
#include "common/layouts.h"

namespace pyfastbayes {

inline void check_calibration_args(const at::Tensor& probs, const at::Tensor& targets, int64_t n_bins,
                                   double sum_tol, c10::DeviceType device_type) {
  TORCH_CHECK(probs.dim() == 3, "calibration_bins: probs must be [S, N, C], got shape ", probs.sizes());
  TORCH_CHECK(at::isFloatingType(probs.scalar_type()), "calibration_bins: probs must be floating point, got ",
              probs.scalar_type());
  TORCH_CHECK(kernel_float_dtype(probs.scalar_type()),
              "calibration_bins: probs must be float64, float32, float16 or bfloat16, got ", probs.scalar_type());
  TORCH_CHECK(probs.device().type() == device_type, "calibration_bins: probs must be on ", device_type,
              " here, got ", probs.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "calibration_bins: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.device() == probs.device(), "calibration_bins: targets on ", targets.device(),
              " but probs on ", probs.device());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == probs.size(1), "calibration_bins: targets must be [N] with N = ",
              probs.size(1), " (probs.size(1)), got shape ", targets.sizes());
  // a bin index is computed in float64 (exact below 2^53)
  TORCH_CHECK(n_bins >= 1 && n_bins < (int64_t(1) << 53), "calibration_bins: n_bins must be in [1, 2^53), got ",
              n_bins);
  TORCH_CHECK(probs.size(0) >= 1, "calibration_bins: probs needs S >= 1 draws, got S = ", probs.size(0));
  TORCH_CHECK(probs.size(2) >= 1, "calibration_bins: probs needs C >= 1 classes, got C = ", probs.size(2));
  TORCH_CHECK(sum_tol >= 0.0, "calibration_bins: sum_tol must be >= 0, got ", sum_tol);
}

// The zeroed outputs on probs' device: bins float64 [(C,) n_bins, kCalibStats], diag [kCalibDiag].
inline std::tuple<at::Tensor, at::Tensor> calibration_outputs(const at::Tensor& probs, int64_t n_bins, bool classwise) {
  const auto f64 = probs.options().dtype(at::kDouble);
  at::Tensor bins =
      classwise ? at::zeros({probs.size(2), n_bins, kCalibStats}, f64) : at::zeros({n_bins, kCalibStats}, f64);
  return {bins, at::zeros({kCalibDiag}, f64)};
}

}  // namespace pyfastbayes
