// Host-only argument checks of landscape_points_, shared by the CPU and CUDA entry points
// (mirrored, with the same messages, by pyfastbayes/_reference/landscape.py: check_landscape_points_).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks/common.h"
#include "common/landscape.h"

namespace pyfastbayes {

// Checks theta0 [P], directions [m, P], coords [n, m], out [n, P] (device type of the kernel,
// dtypes, shapes, 1 <= m <= 8, out contiguous and overlapping no input) before anything is written.
inline void check_landscape_points(const at::Tensor& theta0, const at::Tensor& directions, const at::Tensor& coords,
                                   const at::Tensor& out, c10::DeviceType device_type) {
  const char* op = "landscape_points_";
  TORCH_CHECK(theta0.device().type() == device_type, op, ": theta0 is on ", theta0.device(), ", expected ",
              device_type_name(device_type));
  TORCH_CHECK(kernel_float_dtype(theta0.scalar_type()), op,
              ": theta0 must be float64, float32, float16 or bfloat16, got ", theta0.scalar_type());
  TORCH_CHECK(theta0.dim() == 1, op, ": theta0 must be a 1-D [P] tensor, got shape ", theta0.sizes());
  const int64_t P = theta0.size(0);
  TORCH_CHECK(directions.device() == theta0.device(), op, ": directions is on ", directions.device(),
              " but theta0 is on ", theta0.device());
  TORCH_CHECK(directions.scalar_type() == theta0.scalar_type(), op, ": directions must have the dtype of theta0 (",
              theta0.scalar_type(), "), got ", directions.scalar_type());
  TORCH_CHECK(directions.dim() == 2 && directions.size(1) == P, op, ": directions must be [m, P] with P = ", P,
              " (theta0's length), got shape ", directions.sizes());
  const int64_t m = directions.size(0);
  TORCH_CHECK(m >= 1 && m <= kLandscapeMaxDirs, op, ": directions must have 1 to ", kLandscapeMaxDirs,
              " rows (m directions), got m = ", m);
  TORCH_CHECK(coords.device() == theta0.device(), op, ": coords is on ", coords.device(), " but theta0 is on ",
              theta0.device());
  TORCH_CHECK(coords.scalar_type() == at::kDouble || coords.scalar_type() == theta0.scalar_type(), op,
              ": coords must be float64 or the dtype of theta0 (", theta0.scalar_type(), "), got ",
              coords.scalar_type());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == m, op, ": coords must be [n, m] with m = ", m,
              " (directions' rows), got shape ", coords.sizes());
  const int64_t n = coords.size(0);
  TORCH_CHECK(out.device() == theta0.device(), op, ": out is on ", out.device(), " but theta0 is on ",
              theta0.device());
  TORCH_CHECK(out.scalar_type() == theta0.scalar_type(), op, ": out must have the dtype of theta0 (",
              theta0.scalar_type(), "), got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == P, op, ": out must be [n, P] = [", n, ", ", P,
              "], got shape ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (it is written in place), got strides ",
              out.strides());
  OverlapCheck overlap(op, 4);
  overlap.add(theta0, "theta0", -1, false);
  overlap.add(directions, "directions", -1, false);
  overlap.add(coords, "coords", -1, false);
  overlap.add(out, "out", -1, true);
  overlap.run();
}

}  // namespace pyfastbayes
