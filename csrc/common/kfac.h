// Math of kfac_factor_, shared by the CPU loop and the CUDA kernel. T is the factor's dtype
// (float or double), the math type of the whole op. Host-side argument checks: checks/kfac.h.
//
// Two steps (both entry points):
//  1. kfac_gram (host code, ATen ops on x's device): gram = x^T x [d, d] by GEMM (at::mm / addmm_:
//     MKL or OpenBLAS on the CPU, cuBLAS on CUDA) and, with the bias, colsum = sum of x's rows [d],
//     both in T. An x of another dtype (fp16 / bf16, or fp32 into a float64 factor) is converted
//     to T kKfacChunkBytes at a time (row chunks), so the temporary stays bounded whatever M is.
//  2. one elementwise pass over factor [D, D] applying kfac_update to every element:
//       i, j < d:        f + (scale / 2) * (gram[i, j] + gram[j, i])
//       i < d, j == d:   f + scale * colsum[i]      (the bias column)
//       i == d, j < d:   f + scale * colsum[j]      (the bias row: the same value)
//       i == j == d:     f + corner,  corner = scale * M (computed in double, rounded once to T)
//     The rule gives element (j, i) the same operations on the same operands as (i, j) (the sum
//     commutes), so a symmetric factor stays symmetric to the bit, whatever rounding the GEMM did.
//     Products and sums are rounded one at a time (mul_rn / add_rn: nvcc never fuses them).
#pragma once
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <utility>

#include "common/fastmath.h"
#include "common/macros.h"

namespace pyfastbayes {

constexpr int64_t kKfacChunkBytes = int64_t(64) << 20;  // the converted x chunk: at most 64 MiB (>= 1 row)

// The scalars of one update, in T: scale / 2, scale, and scale * M.
template <class T>
struct KfacScalars {
  T half_scale, scale, corner;
};

// factor[i, j] updated (i, j < D = d + bias); gram [d, d] row-major, colsum [d] (bias only).
template <class T>
PFB_HD T kfac_update(T f, const T* gram, const T* colsum, KfacScalars<T> s, int64_t d, int64_t i, int64_t j) {
  if (i < d && j < d) return add_rn(f, mul_rn(s.half_scale, add_rn(gram[i * d + j], gram[j * d + i])));
  if (i < d) return add_rn(f, mul_rn(s.scale, colsum[i]));  // j == d
  if (j < d) return add_rn(f, mul_rn(s.scale, colsum[j]));  // i == d
  return add_rn(f, s.corner);                               // i == j == d
}

// ---- host code (step 1 and the scalars): ATen ops, also compiled into the .cu (host side) ----
// Rows of x per converted chunk: kKfacChunkBytes of factor-dtype values, at least one row.
inline int64_t kfac_chunk_rows(int64_t d, int64_t elem_size) {
  return std::max<int64_t>(1, kKfacChunkBytes / (d * elem_size));
}

// Step 1 on x's device: (gram [d, d], colsum [d] or an undefined tensor without bias), both
// contiguous and of dtype `math` (the factor's). x: [M, d] with M >= 1.
inline std::pair<at::Tensor, at::Tensor> kfac_gram(const at::Tensor& x, at::ScalarType math, bool bias) {
  const int64_t M = x.size(0), d = x.size(1);
  if (x.scalar_type() == math) {  // no conversion: one GEMM over all rows (any strides: ATen copies if it must)
    at::Tensor gram = at::mm(x.t(), x);
    at::Tensor colsum = bias ? at::sum(x, at::IntArrayRef{0}) : at::Tensor();
    return {gram.contiguous(), bias ? colsum.contiguous() : colsum};
  }
  const int64_t rows = kfac_chunk_rows(d, static_cast<int64_t>(c10::elementSize(math)));
  at::Tensor gram, colsum;
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const at::Tensor xc = x.narrow(0, r0, std::min(rows, M - r0)).to(math);  // one bounded temporary
    if (!gram.defined()) {
      gram = at::mm(xc.t(), xc);
      if (bias) colsum = at::sum(xc, at::IntArrayRef{0});
    } else {
      gram.addmm_(xc.t(), xc);  // gram += xc^T xc
      if (bias) colsum.add_(at::sum(xc, at::IntArrayRef{0}));
    }
  }
  return {gram.contiguous(), bias ? colsum.contiguous() : colsum};
}

// The scalars of the update in T (scale / 2 exact; scale * M in double, then rounded once).
template <class T>
inline KfacScalars<T> kfac_scalars(double scale, int64_t M) {
  return {static_cast<T>(scale * 0.5), static_cast<T>(scale), static_cast<T>(scale * static_cast<double>(M))};
}

}  // namespace pyfastbayes
