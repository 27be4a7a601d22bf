// CPU kernels of the RNG ops, and the vectorised normal-stream filler used by every noisy kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "checks/random.h"
#include "common/philox.h"
#include "cpu/clones.h"
#include "cpu/multi_tensor.h"
#include "cpu/philox_tile.h"

namespace pyfastbayes::cpu {

// The Philox bits a tile at a time (cpu/philox_tile.h: vpmuludq rounds at the machine's width), then
// Box-Muller as branch-free scalar code that each target_clones body (cpu/clones.h) vectorises at
// its width. Same normals as philox_normal4 of every block (up to the clone's FMA contraction).
PFB_CPU_CLONES
void fill_normal(uint64_t seed, uint32_t stream, uint32_t step, int64_t first_block, int64_t nblocks,
                 float* out) {
  alignas(64) uint32_t r[4][kPhiloxTile];
  for (int64_t t = 0; t < nblocks; t += kPhiloxTile) {
    const int64_t m = std::min(kPhiloxTile, nblocks - t);
    philox_tile(seed, stream, step, first_block + t, m, r);
    float* o = out + 4 * t;
    for (int64_t b = 0; b < m; ++b) {
      box_muller(r[0][b], r[1][b], o[4 * b], o[4 * b + 1]);
      box_muller(r[2][b], r[3][b], o[4 * b + 2], o[4 * b + 3]);
    }
  }
}

namespace {

at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t key0, int64_t key1) {
  check_philox_counters(counters);
  auto c = counters.contiguous();
  auto out = at::empty_like(c);
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, c.size(0), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      uint32_t ctr[4], r[4];
      for (int k = 0; k < 4; ++k) ctr[k] = static_cast<uint32_t>(in[4 * i + k]);
      philox4x32_10(ctr, static_cast<uint32_t>(key0), static_cast<uint32_t>(key1), r);
      for (int k = 0; k < 4; ++k) o[4 * i + k] = static_cast<int64_t>(r[k]);
    }
  });
  return out;
}

void philox_normal_cpu(const at::Tensor& out, int64_t seed, int64_t stream, int64_t step) {
  check_philox_normal_out(out);
  const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({out.numel()}, out.options().dtype(at::kFloat));
  float* z = buf.data_ptr<float>();
  const int64_t n = out.numel();
  parallel_chunks({n}, [&](const Chunk& c) {
    const int64_t nb = (c.end - c.begin) / 4;
    fill_normal(static_cast<uint64_t>(seed), static_cast<uint32_t>(stream), static_cast<uint32_t>(step),
                c.begin / 4, nb, z + c.begin);
    if (c.end - c.begin > 4 * nb) {  // tail of fewer than 4 elements
      float t[4];
      philox_normal4(static_cast<uint64_t>(seed), static_cast<uint64_t>(c.begin / 4 + nb),
                     static_cast<uint32_t>(stream), static_cast<uint32_t>(step), t);
      for (int64_t k = c.begin + 4 * nb; k < c.end; ++k) z[k] = t[k - c.begin - 4 * nb];
    }
  });
  if (!direct) out.copy_(buf.view(out.sizes()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastbayes, CPU, m) {
  m.impl("philox4x32", &philox4x32_cpu);
  m.impl("philox_normal_", &philox_normal_cpu);
}

}  // namespace pyfastbayes::cpu
