// Host-only argument checks of the RNG ops (philox4x32, philox_normal_), shared by the CPU and
// CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks/common.h"

namespace pyfastbayes {

inline void check_philox_counters(const at::Tensor& counters) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "philox4x32: counters must be int64 [N, 4], got ", counters.scalar_type(), " ", counters.sizes());
}

inline void check_philox_normal_out(const at::Tensor& out) {
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "philox_normal_: out must be floating point, got ",
              out.scalar_type());
  OverlapCheck overlap("philox_normal_", 1);  // one tensor: refuses an expanded (self-overlapping) out
  overlap.add(out, "out", -1, true);
}

}  // namespace pyfastbayes
