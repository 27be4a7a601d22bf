// Host-only argument checks of kfac_factor_, shared by the CPU and CUDA entry points (mirrored,
// with the same messages, by pyfastbayes/_reference/kfac.py: check_kfac_factor_).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "checks/common.h"

namespace pyfastbayes {

// Bits of precision of the dtypes kfac_factor_ takes (x must not have more than factor).
inline int kfac_precision(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 53;
    case at::kFloat: return 24;
    case at::kBFloat16: return 8;
    case at::kHalf: return 11;
    default: return 0;
  }
}

// Checks factor [D, D] (D = d + bias, contiguous, float32 / float64, on the kernel's device type),
// x [M, d] (d >= 1, a kernel float dtype not more precise than factor, factor's device), scale
// (finite, >= 0) and that factor shares no memory with x, before anything is written.
inline void check_kfac_factor(const at::Tensor& factor, const at::Tensor& x, double scale, bool bias,
                              c10::DeviceType device_type) {
  const char* op = "kfac_factor_";
  TORCH_CHECK(factor.device().type() == device_type, op, ": factor is on ", factor.device(), ", expected ",
              device_type_name(device_type));
  TORCH_CHECK(factor.scalar_type() == at::kFloat || factor.scalar_type() == at::kDouble, op,
              ": factor must be float32 or float64, got ", factor.scalar_type());
  TORCH_CHECK(x.device() == factor.device(), op, ": x is on ", x.device(), " but factor is on ", factor.device());
  TORCH_CHECK(kernel_float_dtype(x.scalar_type()), op, ": x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(kfac_precision(x.scalar_type()) <= kfac_precision(factor.scalar_type()), op, ": x (",
              x.scalar_type(), ") is more precise than factor (", factor.scalar_type(),
              "); accumulate into a float64 factor or pass x as float32");
  TORCH_CHECK(x.dim() == 2, op, ": x must be a 2-D [M, d] tensor, got shape ", x.sizes());
  const int64_t d = x.size(1);
  TORCH_CHECK(d >= 1, op, ": x must have d >= 1 columns, got shape ", x.sizes());
  const int64_t D = d + (bias ? 1 : 0);
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == D && factor.size(1) == D, op, ": factor must be [D, D] = [",
              D, ", ", D, "] (d = ", d, " columns of x", bias ? ", + 1 for the bias" : ", no bias", "), got shape ",
              factor.sizes());
  TORCH_CHECK(factor.is_contiguous(), op, ": factor must be contiguous (it is written in place), got strides ",
              factor.strides());
  TORCH_CHECK(std::isfinite(scale) && scale >= 0, op, ": scale must be finite and >= 0, got ", scale);
  OverlapCheck overlap(op, 2);
  overlap.add(factor, "factor", -1, true);
  overlap.add(x, "x", -1, false);
  overlap.run();
}

}  // namespace pyfastbayes
