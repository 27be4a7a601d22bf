// Schema of the kfac family: Kronecker factors of a KFAC Laplace approximation, accumulated in
// place batch after batch without building the augmented activation matrix [x, 1].
//   factor: [D, D] with D = d + (1 if bias else 0), contiguous, float32 or float64, x's device,
//           sharing no memory with x; written in place (math in common/kfac.h):
//             factor[i, j] += scale * (T[i, j] + T[j, i]) / 2   (i, j < d), T = x^T x
//             factor[d, j] += scale * colsum(x)[j], factor[j, d] += the same (j < d; bias only)
//             factor[d, d] += scale * M                                        (bias only)
//           A symmetric factor stays exactly symmetric. M = 0 changes nothing.
//   x:      [M, d] floating (fp64/fp32/fp16/bf16), M >= 0, d >= 1, any strides; not more precise
//           than factor (float64 x needs a float64 factor); converted to factor's dtype for the math
//   scale:  finite, >= 0 (e.g. 1 / N for a mean over N data points)
//   bias:   whether factor carries the extra row / column of the bias (the ones column of [x, 1])
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("kfac_factor_(Tensor(a!) factor, Tensor x, float scale, bool bias) -> ()");
}
