// CPU kernel of kfac_factor_: gram = x^T x and colsum by ATen (GEMM: MKL / OpenBLAS, row chunks
// when x is converted; common/kfac.h: kfac_gram), of which only the lower block triangle is
// computed from kKfacBlockMin columns on (kfac_gram_lower: the GEMMs of the blocks above the
// diagonal are skipped), then one pass over factor [D, D] in square tiles of kTile x kTile, the
// tile rows split over threads (at::parallel_for, OpenMP). Element (i, j) reads gram's lower
// triangle only, g = gram[max(i, j), min(i, j)], and gets f + (scale / 2) (g + g): the update of
// kfac_update (the CUDA kernel's) on an exactly symmetric gram, so (i, j) and (j, i) get the same
// bits. Reads of gram[j, i] (tiles above the diagonal) go through a local transposed copy of the
// tile (16-32 KiB), so the loops vectorise; tiles below the diagonal read gram's rows directly.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks/kfac.h"
#include "common/kfac.h"

namespace pyfastbayes::cpu {
namespace {

constexpr int64_t kTile = 64;  // a 64 x 64 tile of factor: 32 KiB of doubles, plus the transposed tile of gram

// factor row i over columns [j0, j1) += (scale / 2) (g + g), g read along a row: src[j].
template <typename T>
inline void add_twice(T* row, const T* src, T half_scale, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) row[j] = add_rn(row[j], mul_rn(half_scale, add_rn(src[j], src[j])));
}

// Rows [i0, i1) of factor, in tiles of up to kTile x kTile elements (see the file's comment). The
// bias row and column (i == d or j == d) take kfac_update itself.
template <typename T>
void kfac_rows(T* f, const T* gram, const T* colsum, KfacScalars<T> s, int64_t d, int64_t D, int64_t i0,
               int64_t i1) {
  T tile[kTile * kTile];  // tile[(i - ib) * kTile + (j - jb)] = gram[j, i], for tiles reaching above the diagonal
  for (int64_t ib = i0; ib < i1; ib += kTile) {
    const int64_t ie = std::min(ib + kTile, i1);
    const int64_t id = std::min(ie, d);  // rows of the tile inside gram: [ib, id)
    for (int64_t jb = 0; jb < D; jb += kTile) {
      const int64_t je = std::min(jb + kTile, D);
      const int64_t jd = std::min(je, d);  // columns of the tile inside gram: [jb, jd)
      if (ib < id && jb < jd) {
        const bool above = jd - 1 > ib;  // some (i, j) of the tile has j > i: gram[j, i] is read
        if (above) {
          for (int64_t j = std::max(jb, ib + 1); j < jd; ++j) {
            const T* gj = gram + j * d;
            for (int64_t i = ib; i < std::min(id, j); ++i) tile[(i - ib) * kTile + (j - jb)] = gj[i];
          }
        }
        for (int64_t i = ib; i < id; ++i) {
          T* row = f + i * D;
          const int64_t split = std::clamp(i + 1, jb, jd);  // j < split: j <= i, gram's row i
          add_twice(row, gram + i * d, s.half_scale, jb, split);
          if (split < jd) add_twice(row, tile + (i - ib) * kTile - jb, s.half_scale, split, jd);
        }
      }
      for (int64_t i = ib; i < ie; ++i) {  // the bias column (i < d, j == d) and row (i == d)
        T* row = f + i * D;
        for (int64_t j = i < d ? std::max(jb, d) : jb; j < je; ++j)
          row[j] = kfac_update(row[j], gram, colsum, s, d, i, j);
      }
    }
  }
}

void kfac_factor_cpu(const at::Tensor& factor, const at::Tensor& x, double scale, bool bias) {
  check_kfac_factor(factor, x, scale, bias, c10::DeviceType::CPU);
  const int64_t M = x.size(0), d = x.size(1), D = factor.size(0);
  if (M == 0) return;  // nothing to add (and factor keeps every bit)
  at::Tensor gram, colsum;
  std::tie(gram, colsum) = kfac_gram(x, factor.scalar_type(), bias, /*lower_blocks=*/true);
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "kfac_factor_", [&] {
    const KfacScalars<scalar_t> s = kfac_scalars<scalar_t>(scale, M);
    scalar_t* f = factor.data_ptr<scalar_t>();
    const scalar_t* g = gram.const_data_ptr<scalar_t>();
    const scalar_t* c = bias ? colsum.const_data_ptr<scalar_t>() : nullptr;  // never read without the bias
    // a task covers whole tiles of rows, at least about 64 K elements
    const int64_t grain = kTile * std::max<int64_t>(1, 65536 / (kTile * D));
    at::parallel_for(0, D, grain, [&](int64_t i0, int64_t i1) { kfac_rows<scalar_t>(f, g, c, s, d, D, i0, i1); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) { m.impl("kfac_factor_", &kfac_factor_cpu); }

}  // namespace pyfastbayes::cpu
