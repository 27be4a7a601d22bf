// Math of kfac_factor_, shared by the CPU loop and the CUDA kernel. T is the factor's dtype
// (float or double), the math type of the whole op. Host-side argument checks: checks/kfac.h.
//
// Two steps (both entry points):
//  1. kfac_gram (host code, ATen ops on x's device): gram = x^T x [d, d] by GEMM (at::mm / addmm_:
//     MKL or OpenBLAS on the CPU, cuBLAS on CUDA) and, with the bias, colsum = sum of x's rows [d],
//     both in T. An x of another dtype (fp16 / bf16, or fp32 into a float64 factor) is converted
//     to T kKfacChunkBytes at a time (row chunks), so the temporary stays bounded whatever M is.
//     The CPU kernel asks for the lower block triangle only (kfac_gram_lower) and reads gram[i, j]
//     for i >= j only: the pass below on the gram mirrored from it.
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
#include <ATen/ops/empty.h>
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

// Column blocks of gram for lower_blocks (see kfac_gram): 1 (the whole x^T x) below
// kKfacBlockMin columns, else about kKfacBlockCols columns each, at most kKfacMaxBlocks.
constexpr int64_t kKfacBlockMin = 128, kKfacBlockCols = 128, kKfacMaxBlocks = 8;

inline int64_t kfac_gram_blocks(int64_t d) {
  if (d < kKfacBlockMin) return 1;
  return std::clamp<int64_t>((d + kKfacBlockCols / 2) / kKfacBlockCols, 2, kKfacMaxBlocks);
}

// gram (+)= xc^T xc on gram's lower block triangle: with nb blocks of columns [c_b, c_{b+1}), row
// block b gets xc[:, b]^T xc[:, :c_{b+1}] by one GEMM writing into gram's rows in place (a
// BLAS-compatible view: row stride d, unit column stride); nb = 1 is the whole product. The
// blocks above the diagonal blocks are never written (nb (nb - 1) / 2 of nb^2: a quarter to
// nearly half of the GEMM's work saved).
inline void kfac_gram_lower(at::Tensor& gram, const at::Tensor& xc, int64_t nb, bool first) {
  const int64_t d = xc.size(1);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t r0 = d * b / nb, r1 = d * (b + 1) / nb;
    at::Tensor out = gram.narrow(0, r0, r1 - r0).narrow(1, 0, r1);
    const at::Tensor a = xc.narrow(1, r0, r1 - r0).t(), c = xc.narrow(1, 0, r1);
    if (first) {
      at::mm_out(out, a, c);
    } else {
      out.addmm_(a, c);
    }
  }
}

// Step 1 on x's device: (gram [d, d], colsum [d] or an undefined tensor without bias), both
// contiguous and of dtype `math` (the factor's). x: [M, d] with M >= 1, any strides (ATen copies
// where BLAS must). One GEMM pass over all rows, or, when x is not in `math`, over converted row
// chunks of kKfacChunkBytes. With lower_blocks (the CPU kernel, which reads gram[i, j] for i >= j
// only) just gram's lower block triangle is computed (kfac_gram_lower, kfac_gram_blocks(d)
// blocks) and the rest is left unset.
inline std::pair<at::Tensor, at::Tensor> kfac_gram(const at::Tensor& x, at::ScalarType math, bool bias,
                                                   bool lower_blocks = false) {
  const int64_t M = x.size(0), d = x.size(1);
  const int64_t nb = lower_blocks ? kfac_gram_blocks(d) : 1;
  const bool convert = x.scalar_type() != math;
  const int64_t rows = convert ? kfac_chunk_rows(d, static_cast<int64_t>(c10::elementSize(math))) : M;
  at::Tensor gram = at::empty({d, d}, x.options().dtype(math)), colsum;
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    // converted: one bounded temporary per chunk
    const at::Tensor xc = convert ? x.narrow(0, r0, std::min(rows, M - r0)).to(math) : x;
    kfac_gram_lower(gram, xc, nb, r0 == 0);  // gram (+)= xc^T xc
    if (bias) colsum = r0 == 0 ? at::sum(xc, at::IntArrayRef{0}) : colsum.add_(at::sum(xc, at::IntArrayRef{0}));
  }
  return {gram, bias ? colsum.contiguous() : colsum};
}

// The scalars of the update in T (scale / 2 exact; scale * M in double, then rounded once).
template <class T>
inline KfacScalars<T> kfac_scalars(double scale, int64_t M) {
  return {static_cast<T>(scale * 0.5), static_cast<T>(scale), static_cast<T>(scale * static_cast<double>(M))};
}

}  // namespace pyfastbayes
