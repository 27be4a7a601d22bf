// Per-element math of landscape_points_, landscape_combine and landscape_bias_act_, shared by the
// CPU loops and the CUDA kernels. T is the op math type: float for fp32 / fp16 / bf16 tensors,
// double for fp64; coords (float64 or the tensors' dtype) are rounded once to T. Host-side
// argument checks: checks/landscape.h.
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

// The activations of the fused passes (the op argument act: "none", "relu").
constexpr int kActNone = 0;
constexpr int kActRelu = 1;
constexpr int kLandscapeMaxParts = kLandscapeMaxDirs + 1;  // k of landscape_combine: theta0 and m directions

// act(v): relu maps v < 0 to +0 and keeps everything else (-0 and NaN included), as the reference.
template <class T>
PFB_HD T landscape_act(T v, int act) {
  return (act == kActRelu && v < T(0)) ? T(0) : v;
}

// landscape_combine: sum_j mix_j * part_j from mix_0 * part_0 in the order j = 0..k-1 (k >= 1),
// every product and sum rounded on its own (the reference's separate torch mul and add).
template <class T>
PFB_HD T landscape_first_term(T mix0, T part0) {
  return mul_rn(mix0, part0);
}

}  // namespace pyfastbayes
