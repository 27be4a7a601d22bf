// CUDA kernels of the RNG ops (the same Philox code as the CPU: csrc/common/philox.h).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks/random.h"
#include "common/philox.h"
#include "cuda/launch.cuh"

namespace pyfastbayes::cuda {
namespace {

__global__ void philox_kernel(const int64_t* __restrict__ in, int64_t* __restrict__ out, int64_t n, uint32_t k0,
                              uint32_t k1) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t ctr[4], r[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) ctr[k] = static_cast<uint32_t>(in[4 * i + k]);
  philox4x32_10(ctr, k0, k1, r);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[4 * i + k] = static_cast<int64_t>(r[k]);
}

__global__ void normal_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint32_t stream, uint32_t step) {
  const int64_t blk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blk * 4 >= n) return;
  float z[4];
  philox_normal4(seed, static_cast<uint64_t>(blk), stream, step, z);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (blk * 4 + k < n) out[blk * 4 + k] = z[k];
}

at::Tensor philox4x32_cuda(const at::Tensor& counters, int64_t key0, int64_t key1) {
  check_philox_counters(counters);
  const c10::cuda::CUDAGuard guard(counters.device());
  auto c = counters.contiguous();
  auto out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n > 0) {
    philox_kernel<<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n, static_cast<uint32_t>(key0), static_cast<uint32_t>(key1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

void philox_normal_cuda(const at::Tensor& out, int64_t seed, int64_t stream, int64_t step) {
  check_philox_normal_out(out);
  const c10::cuda::CUDAGuard guard(out.device());
  const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({out.numel()}, out.options().dtype(at::kFloat));
  const int64_t n = out.numel();
  if (n > 0) {
    normal_kernel<<<static_cast<unsigned>(blocks_for((n + 3) / 4)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        buf.data_ptr<float>(), n, static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
        static_cast<uint32_t>(step));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!direct) out.copy_(buf.view(out.sizes()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CUDA, m) {
  m.impl("philox4x32", &philox4x32_cuda);
  m.impl("philox_normal_", &philox_normal_cuda);
}

}  // namespace pyfastbayes::cuda
