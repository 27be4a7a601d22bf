// CUDA kernel of kfac_factor_ (math in common/kfac.h, the CPU loop's function).
//
// gram = x^T x and colsum come from ATen on the current stream (cuBLAS GEMM, row chunks when x is
// converted: kfac_gram); then one elementwise kernel, grid-stride over the D * D elements of
// factor (element e = i * D + j: a warp reads and writes 32 consecutive elements of factor and
// of gram's row i; the transposed reads gram[j, i] are strided and served by L1 / L2). Results
// equal the CPU op up to the GEMM's summation order (cuBLAS vs MKL), not bit for bit; both keep a
// symmetric factor exactly symmetric.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "checks/kfac.h"
#include "common/kfac.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) kfac_factor_kernel(T* __restrict__ factor, const T* __restrict__ gram,
                                                               const T* __restrict__ colsum, KfacScalars<T> s,
                                                               int64_t d, int64_t D) {
  const int64_t n = D * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t i = e / D, j = e - i * D;
    factor[e] = kfac_update(factor[e], gram, colsum, s, d, i, j);
  }
}

void kfac_factor_cuda(const at::Tensor& factor, const at::Tensor& x, double scale, bool bias) {
  check_kfac_factor(factor, x, scale, bias, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(factor.device());
  const int64_t M = x.size(0), d = x.size(1), D = factor.size(0);
  if (M == 0) return;  // nothing to add (and factor keeps every bit)
  at::Tensor gram, colsum;
  std::tie(gram, colsum) = kfac_gram(x, factor.scalar_type(), bias);  // on the current stream
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "kfac_factor_cuda", [&] {
    const KfacScalars<scalar_t> s = kfac_scalars<scalar_t>(scale, M);
    const int64_t blocks = resident_blocks_for(D * D, kThreads);
    kfac_factor_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        factor.data_ptr<scalar_t>(), gram.const_data_ptr<scalar_t>(),
        bias ? colsum.const_data_ptr<scalar_t>() : nullptr, s, d, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) { m.impl("kfac_factor_", &kfac_factor_cuda); }

}  // namespace pyfastbayes::cuda
