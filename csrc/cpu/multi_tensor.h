// The CPU side of the multi-tensor launcher: a flat table of (tensor, element range) work items
// over every tensor of a list, run with at::parallel_for. Ranges start on 4-element boundaries
// so that each Philox block belongs to exactly one work item.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace pyfastbayes::cpu {

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

constexpr int64_t kChunk = 1 << 14;  // elements per work item (multiple of 4)

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk = kChunk) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t b = 0; b < numels[t]; b += chunk)
      chunks.push_back({static_cast<int32_t>(t), b, std::min(b + chunk, numels[t])});
  return chunks;
}

template <class F>
void parallel_chunks(const std::vector<int64_t>& numels, F&& f, int64_t chunk = kChunk) {
  const auto chunks = make_chunks(numels, chunk);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(chunks[i]);
  });
}

// Fill out[0 .. 4*nblocks) with the normal stream (seed, stream, step) from Philox block
// `first_block` on; vectorised (AVX2/AVX-512 clones chosen at load time).
void fill_normal(uint64_t seed, uint32_t stream, uint32_t step, int64_t first_block, int64_t nblocks, float* out);

}  // namespace pyfastbayes::cpu
