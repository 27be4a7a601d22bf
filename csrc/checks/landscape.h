// Host-only argument checks of landscape_points_, landscape_combine and landscape_bias_act_,
// shared by the CPU and CUDA entry points (mirrored, with the same messages, by
// pyfastbayes/_reference/landscape.py: check_<op>).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "checks/common.h"
#include "common/landscape.h"

namespace pyfastbayes {

// The first tensor of a landscape op (the one the others are compared with): on the kernel's
// device type and of a floating dtype the kernels take.
inline void check_landscape_lead(const at::Tensor& t, const char* op, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " is on ", t.device(), ", expected ",
              device_type_name(device_type));
  TORCH_CHECK(kernel_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

// Checks theta0 [P], directions [m, P], coords [n, m], out [n, P] (device type of the kernel,
// dtypes, shapes, 1 <= m <= 8, out contiguous and overlapping no input) before anything is written.
inline void check_landscape_points(const at::Tensor& theta0, const at::Tensor& directions, const at::Tensor& coords,
                                   const at::Tensor& out, c10::DeviceType device_type) {
  const char* op = "landscape_points_";
  check_landscape_lead(theta0, op, "theta0", device_type);
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

// act: "none" -> kActNone, "relu" -> kActRelu; anything else is refused.
inline int parse_landscape_act(c10::string_view act, const char* op) {
  if (act == "none") return kActNone;
  if (act == "relu") return kActRelu;
  TORCH_CHECK(false, op, ": act must be 'none' or 'relu', got '", std::string(act), "'");
  return kActNone;
}

// Checks parts [R, k, F] (1 <= k <= 9) and mix [c, k] (device type of the kernel, dtypes, shapes);
// returns the activation.
inline int check_landscape_combine(const at::Tensor& parts, const at::Tensor& mix, c10::string_view act,
                                   c10::DeviceType device_type) {
  const char* op = "landscape_combine";
  check_landscape_lead(parts, op, "parts", device_type);
  TORCH_CHECK(parts.dim() == 3, op, ": parts must be a 3-D [R, k, F] tensor, got shape ", parts.sizes());
  const int64_t k = parts.size(1);
  TORCH_CHECK(k >= 1 && k <= kLandscapeMaxParts, op, ": parts must have 1 to ", kLandscapeMaxParts,
              " parts (dimension 1), got k = ", k);
  TORCH_CHECK(mix.device() == parts.device(), op, ": mix is on ", mix.device(), " but parts is on ", parts.device());
  TORCH_CHECK(mix.scalar_type() == parts.scalar_type(), op, ": mix must have the dtype of parts (",
              parts.scalar_type(), "), got ", mix.scalar_type());
  TORCH_CHECK(mix.dim() == 2 && mix.size(1) == k, op, ": mix must be [c, k] with k = ", k,
              " (parts' dimension 1), got shape ", mix.sizes());
  return parse_landscape_act(act, op);
}

// Checks x [c, R, F] (contiguous, written in place) and bias [c, F] or undefined (device type of
// the kernel, dtypes, shapes, no overlap with x); returns the activation.
inline int check_landscape_bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view act,
                                    c10::DeviceType device_type) {
  const char* op = "landscape_bias_act_";
  check_landscape_lead(x, op, "x", device_type);
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D [c, R, F] tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (it is written in place), got strides ", x.strides());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == x.device(), op, ": bias is on ", b.device(), " but x is on ", x.device());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (", x.scalar_type(),
                "), got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == x.size(0) && b.size(1) == x.size(2), op, ": bias must be [c, F] = [",
                x.size(0), ", ", x.size(2), "], got shape ", b.sizes());
  }
  const int a = parse_landscape_act(act, op);
  OverlapCheck overlap(op, 2);
  overlap.add(x, "x", -1, true);
  if (has_bias) overlap.add(*bias, "bias", -1, false);
  overlap.run();
  return a;
}

}  // namespace pyfastbayes
