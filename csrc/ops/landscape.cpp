// Schema of the landscape family: the parameter vectors of a loss-landscape grid (issue 11).
//   theta0:     [P] floating (fp64/fp32/fp16/bf16), P >= 0, any stride: the centre
//   directions: [m, P] of theta0's dtype and device, 1 <= m <= 8 (1: a line, 2: a plane), any strides
//   coords:     [n, m] float64 (recommended: offsets like 0.05 stay exact) or theta0's dtype, same
//               device, n >= 0, any strides
//   out:        [n, P] contiguous, theta0's dtype and device, overlapping no input; written in place:
//               out[i, :] = theta0 + sum_j coords[i, j] * directions[j, :] (math in common/landscape.h)
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("landscape_points_(Tensor theta0, Tensor directions, Tensor coords, Tensor(a!) out) -> ()");
}
