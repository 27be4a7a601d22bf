// Schema of the landscape family: the parameter vectors of a loss-landscape grid (issue 11).
//   theta0:     [P] floating (fp64/fp32/fp16/bf16), P >= 0, any stride: the centre
//   directions: [m, P] of theta0's dtype and device, 1 <= m <= 8 (1: a line, 2: a plane), any strides
//   coords:     [n, m] float64 (recommended: offsets like 0.05 stay exact) or theta0's dtype, same
//               device, n >= 0, any strides
//   out:        [n, P] contiguous, theta0's dtype and device, overlapping no input; written in place:
//               out[i, :] = theta0 + sum_j coords[i, j] * directions[j, :] (math in common/landscape.h)
//
// The grid engine's fused elementwise passes over a chunk's activations (act: "none" or "relu"):
// landscape_combine(parts, mix, act) -> out
//   parts: [R, k, F] floating (fp64/fp32/fp16/bf16), 1 <= k <= 9, any strides: the first layer's
//          outputs at theta0 and along each direction, per row (F: the features of one row)
//   mix:   [c, k] of parts' dtype and device, any strides: per point (1, a_1, ..., a_m)
//   out:   [c, R, F] new, contiguous, parts' dtype: out[p, r, f] = act(sum_j mix[p, j] * parts[r, j, f])
// landscape_bias_act_(x, bias, act) -> ()
//   x:     [c, R, F] floating, contiguous, written in place: x[p, r, f] = act(x[p, r, f] + bias[p, f])
//   bias:  [c, F] of x's dtype and device, any strides, overlapping no part of x; or None (no bias)
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("landscape_points_(Tensor theta0, Tensor directions, Tensor coords, Tensor(a!) out) -> ()");
  m.def("landscape_combine(Tensor parts, Tensor mix, str act) -> Tensor");
  m.def("landscape_bias_act_(Tensor(a!) x, Tensor? bias, str act) -> ()");
}
