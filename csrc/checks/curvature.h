// Host-only argument checks of loss_hessian, shared by the CPU and CUDA entry points (mirrored,
// with the same messages, by pyfastbayes/_reference/curvature.py: check_loss_hessian).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

#include "checks/common.h"
#include "common/curvature.h"

namespace pyfastbayes {

// The kind and mode named by the strings (refused with the accepted spellings otherwise), after
// checking outputs [N, C] and V [N, C, k]: device type of the kernel, dtype, shapes, k >= 1.
inline LossProblem check_loss_hessian(std::string_view kind, const at::Tensor& outputs, const at::Tensor& V,
                                      std::string_view mode, c10::DeviceType device_type) {
  const char* op = "loss_hessian";
  LossProblem pr{};
  if (kind == "cross_entropy") pr.kind = LossKind::kCrossEntropy;
  else if (kind == "bce") pr.kind = LossKind::kBce;
  else if (kind == "mse") pr.kind = LossKind::kMse;
  else if (kind == "gaussian_natural") pr.kind = LossKind::kGaussianNatural;
  else TORCH_CHECK(false, op, ": kind must be 'cross_entropy', 'bce', 'mse' or 'gaussian_natural', got '", kind, "'");
  if (mode == "hessian") pr.mode = HessMode::kHessian;
  else if (mode == "factor") pr.mode = HessMode::kFactor;
  else if (mode == "factor_t") pr.mode = HessMode::kFactorT;
  else TORCH_CHECK(false, op, ": mode must be 'hessian', 'factor' or 'factor_t', got '", mode, "'");
  TORCH_CHECK(outputs.device().type() == device_type, op, ": outputs is on ", outputs.device(), ", expected ",
              device_type_name(device_type));
  TORCH_CHECK(at::isFloatingType(outputs.scalar_type()), op, ": outputs must be floating point, got ",
              outputs.scalar_type());
  TORCH_CHECK(kernel_float_dtype(outputs.scalar_type()), op,
              ": outputs must be float64, float32, float16 or bfloat16, got ", outputs.scalar_type());
  TORCH_CHECK(outputs.dim() == 2, op, ": outputs must be [N, C], got shape ", outputs.sizes());
  TORCH_CHECK(outputs.size(1) >= 1, op, ": outputs needs C >= 1 columns, got C = ", outputs.size(1));
  TORCH_CHECK(pr.kind != LossKind::kGaussianNatural || outputs.size(1) % 2 == 0, op,
              ": kind 'gaussian_natural' needs an even number of columns C = 2D (eta1 of the D targets, then "
              "their eta2), got C = ", outputs.size(1));
  TORCH_CHECK(V.device() == outputs.device(), op, ": V is on ", V.device(), " but outputs is on ", outputs.device());
  TORCH_CHECK(V.scalar_type() == outputs.scalar_type(), op, ": V must have the dtype of outputs (",
              outputs.scalar_type(), "), got ", V.scalar_type());
  TORCH_CHECK(V.dim() == 3 && V.size(0) == outputs.size(0) && V.size(1) == outputs.size(1), op,
              ": V must be [N, C, k] with N = ", outputs.size(0), ", C = ", outputs.size(1),
              " (outputs' shape), got shape ", V.sizes());
  TORCH_CHECK(V.size(2) >= 1, op, ": V needs k >= 1 columns (V.size(2)), got k = ", V.size(2));
  return pr;
}

}  // namespace pyfastbayes
