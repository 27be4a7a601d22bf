// Schemas of the fused SG-MCMC steps. One call updates every tensor of a parameter group.
//   hyper: float64 [6] on the parameters' device (slots kHyper* in common/layouts.h, rules in
//          common/sgmcmc_rules.h)
//   rng:   int64 [2] = (seed, step) on the parameters' device; step += 1 after the update
//   skip:  optional bool scalar on the device; when true the call changes nothing
//   offsets: optional int64 per tensor (len(params) values, each >= 0; None = all 0): the index of
//          the tensor's first element in the noise stream, for a tensor that is one contiguous
//          piece (e.g. a rank's FSDP shard) of a larger row-major tensor
// Tensor i of the list draws its noise from Philox stream i: its element e (logical, row-major
// index) takes normal offsets[i] + e of the stream, lane (offsets[i] + e) % 4 of Philox block
// (offsets[i] + e) / 4, so stepping the pieces of a tensor (same stream, their offsets) equals
// stepping it whole. A tensor the call writes (params,
// the state buffers, rng) must not overlap itself or another argument (checks/sgmcmc.h).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor hyper, Tensor(b!) rng, Tensor? skip=None, int[]? offsets=None) -> ()");
  m.def("sghmc_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, Tensor hyper, Tensor(c!) rng, Tensor? skip=None, int[]? offsets=None) -> ()");
  m.def("psgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avg, Tensor hyper, Tensor(c!) rng, Tensor? skip=None, int[]? offsets=None) -> ()");
  // true where any element of any tensor is NaN or +-inf, or, given a limit (> 0), has a magnitude
  // >= limit (floating and complex elements; integer tensors are skipped); a bool scalar on the
  // tensors' device
  m.def("any_nonfinite(Tensor[] tensors, float? limit=None) -> Tensor");
}
