// Schemas of the SWA / SWAG ops (math in common/swag.h).
//
// swag_collect_: one pass over every parameter tensor (list order = flat order, P elements):
//   mean  float32/float64 [P]       running mean, updated in place
//   sq_mean  same, optional         running mean of squares (None: SWA, mean only)
//   deviation [P], optional         one row of the deviation matrix D (float64/32/16, bfloat16),
//                                   written with theta - mean (updated); needs sq_mean
//   n                               models averaged before this call (weight 1 / (n + 1)), < 2**53
//   mean, sq_mean and deviation must not overlap each other or the params (checks/swag.h)
// swag_sample: S = n_draws draws [S, P'] of the columns [offset, offset + P') of the posterior,
//   mean/sq_mean [P'] (float32/64), D [K, P'] or None (diagonal covariance), scale > 0
//   multiplying the covariance, eps the variance floor, (seed, step) the Philox stream; offset
//   (any int >= 0) is the global index of column 0, so column blocks draw the noise of the
//   whole vector. Output dtype = mean's. D is read once for all S draws.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("swag_collect_(Tensor[] params, Tensor(a!) mean, Tensor(b!)? sq_mean, Tensor(c!)? deviation, int n) -> ()");
  m.def("swag_sample(Tensor mean, Tensor sq_mean, Tensor? D, int n_draws, float scale, float eps, int seed, int step=0, int offset=0) -> Tensor");
}
