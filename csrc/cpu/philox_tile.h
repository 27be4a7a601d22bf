// The raw Philox4x32-10 bits of up to kPhiloxTile consecutive counter blocks, word-major, at the
// vector width of the machine: the one place the CPU draws Philox blocks in bulk (fill_normal, and
// through it every CPU normal: SG-MCMC, SWAG sampling, the vi ops; and vi_rademacher_'s signs).
#pragma once
#include <cstdint>

namespace pyfastbayes::cpu {

constexpr int64_t kPhiloxTile = 64;  // blocks per tile (a multiple of the widest group: 4 x 8 blocks)

// r[w][b] = word w of philox4x32_10(counter = (first_block + b lo, hi, stream, step), key = seed),
// b < nblocks <= kPhiloxTile: bit for bit common/philox.h's. r[w][b] for b >= nblocks is scratch.
void philox_tile(uint64_t seed, uint32_t stream, uint32_t step, int64_t first_block, int64_t nblocks,
                 uint32_t (*r)[kPhiloxTile]);

// The version this process runs: "avx512", "avx2" or "scalar" (chosen at the first draw)
const char* philox_tile_isa();

}  // namespace pyfastbayes::cpu
