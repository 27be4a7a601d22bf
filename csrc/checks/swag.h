// Host-only argument checks of the SWA / SWAG ops, shared by the CPU and CUDA entry points
// (math in common/swag.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "checks/common.h"
#include "common/layouts.h"

namespace pyfastbayes {

inline bool swag_state_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }
inline bool swag_dev_dtype(at::ScalarType t) { return kernel_float_dtype(t); }

// Largest n (models averaged so far) that swag_collect_ takes: n + 1 stays exact in float64, so
// the weight 1 / (n + 1) still means something (and n + 1 cannot overflow int64).
constexpr int64_t kSwagMaxModels = (int64_t(1) << 53) - 1;

// swag_collect_: returns P; every check runs before anything is written
inline int64_t check_swag_collect(at::TensorList params, const at::Tensor& mean,
                                  const std::optional<at::Tensor>& sq_mean,
                                  const std::optional<at::Tensor>& deviation, int64_t n,
                                  c10::DeviceType device_type) {
  const char* op = "swag_collect_";
  TORCH_CHECK(n >= 0, op, ": n (models averaged so far) must be >= 0, got ", n);
  TORCH_CHECK(n <= kSwagMaxModels, op, ": n (models averaged so far) must be < 2**53 (the weight 1 / (n + 1) ",
              "is float64), got ", n);
  TORCH_CHECK(mean.device().type() == device_type, op, ": mean is on ", mean.device(), ", expected ", device_type_name(device_type));
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
    // (a sum that wraps past int64 could equal mean's size: expanded params of 2^62 elements each)
    TORCH_CHECK(p.numel() <= std::numeric_limits<int64_t>::max() - total, op,
                ": the params hold more than 2^63 - 1 elements in all (params[", i, "] has ", p.numel(), ")");
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
  OverlapCheck overlap(op, params.size() + 3);
  overlap.add(params, "params", false);
  overlap.add(mean, "mean", -1, true);
  if (sq_mean.has_value()) overlap.add(*sq_mean, "sq_mean", -1, true);
  if (deviation.has_value()) overlap.add(*deviation, "deviation", -1, true);
  overlap.run();
  return total;
}

// swag_sample: returns K (rows of D, 0 for the diagonal covariance)
inline int64_t check_swag_sample(const at::Tensor& mean, const at::Tensor& sq_mean, const std::optional<at::Tensor>& D,
                                 int64_t n_draws, double scale, double eps, int64_t offset,
                                 c10::DeviceType device_type) {
  const char* op = "swag_sample";
  TORCH_CHECK(mean.device().type() == device_type, op, ": mean is on ", mean.device(), ", expected ", device_type_name(device_type));
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
  TORCH_CHECK(mean.scalar_type() != at::kFloat || eps <= static_cast<double>(std::numeric_limits<float>::max()), op,
              ": eps must be finite in float32 (the state's dtype), got ", eps);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  // the global index offset + j of every column stays below 2^63 (the kernels add them in int64)
  TORCH_CHECK(offset <= std::numeric_limits<int64_t>::max() - mean.numel(), op, ": offset + ", mean.numel(),
              " elements must be below 2^63, got offset = ", offset);
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
