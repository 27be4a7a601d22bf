// Per-element math of landscape_points_, shared by the CPU loop and the CUDA kernel. T is the op
// math type: float for fp32 / fp16 / bf16 tensors, double for fp64; coords (float64 or the tensors'
// dtype) are rounded once to T. Host-side argument checks: checks/landscape.h.
//
// out[i, p] = theta0[p] + sum_j coords[i, j] * directions[j, p], accumulated in T in the fixed
// order j = 0, 1, ..., m - 1 starting from theta0[p], every product and sum rounded once (mul_rn /
// add_rn: nvcc never contracts them into FMAs), so the CPU op, the CUDA kernel and the reference
// (separate torch mul and add) agree to the bit; the result is rounded once to the tensors' dtype.
#pragma once
#include "common/fastmath.h"
#include "common/macros.h"

namespace pyfastbayes {

constexpr int kLandscapeMaxDirs = 8;  // m, the number of directions, is 1..8

// One step of the accumulation: acc + c * d (c = coords[i, j], d = directions[j, p]).
template <class T>
PFB_HD T landscape_step(T acc, T c, T d) {
  return add_rn(acc, mul_rn(c, d));
}

}  // namespace pyfastbayes
