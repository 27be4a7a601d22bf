// The CPU side of the multi-tensor launcher: a flat table of (tensor, element range) work items
// over every tensor of a list, run with at::parallel_for. Ranges start on 4-element boundaries
// so that each Philox block belongs to exactly one work item.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
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

// The at::parallel_for grain over work items: about `chunk` elements per task on average, so a list
// of small tensors (a small model's layers) runs inline instead of opening a parallel region for a
// few hundred elements; full-sized items keep a grain of 1.
inline int64_t chunk_grain(const std::vector<Chunk>& chunks, int64_t chunk = kChunk) {
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  const auto n = static_cast<int64_t>(chunks.size());
  return total <= 0 ? std::max<int64_t>(n, 1) : std::max<int64_t>(1, (n * chunk + total - 1) / total);
}

template <class F>
void parallel_chunks(const std::vector<int64_t>& numels, F&& f, int64_t chunk = kChunk) {
  const auto chunks = make_chunks(numels, chunk);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks, chunk), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(chunks[i]);
  });
}

// Fill out[0 .. 4*nblocks) with the normal stream (seed, stream, step) from Philox block
// `first_block` on; the Philox bits by cpu/philox_tile.h's vector versions, Box-Muller in AVX2 /
// AVX-512 clones chosen at load time (cpu/random.cpp).
void fill_normal(uint64_t seed, uint32_t stream, uint32_t step, int64_t first_block, int64_t nblocks, float* out);

}  // namespace pyfastbayes::cpu
