// The pybind11 module pyfastbayes._C: loading it registers every op (static initialisers of the
// TORCH_LIBRARY blocks in this shared library), adds the sparse-input refusals and version-counter bumps of every op
// (ops/library_kernels.h) and exposes build_info(), layouts() and the scoped CPU allocation cache
// (cpu/allocation_cache.cpp; used through pyfastbayes._memory.allocation_cache()), and, for tests,
// the CPU Philox tile (cpu/philox_tile.cpp): which version runs, and its bits at any counter.
#include <ATen/Config.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common/layouts.h"
#include "cpu/allocation_cache.h"
#include "cpu/philox_tile.h"
#include "ops/library_kernels.h"

#ifndef PYFASTBAYES_VERSION
#define PYFASTBAYES_VERSION "unknown"
#endif
#ifndef PYFASTBAYES_TORCH_VERSION
#define PYFASTBAYES_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
  d["version"] = PYFASTBAYES_VERSION;
  d["torch"] = PYFASTBAYES_TORCH_VERSION;
#ifdef PYFASTBAYES_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = PYFASTBAYES_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

// The named slots of every small vector that crosses the op boundary (common/layouts.h), for the
// Python mirror pyfastbayes.ops.layouts: {layout: {slot name: index (or constant)}}.
static py::dict layouts() {
  using namespace pyfastbayes;
  auto slots = [](std::initializer_list<std::pair<const char*, int64_t>> items) {
    py::dict d;
    for (const auto& [name, value] : items) d[name] = value;
    return d;
  };
  py::dict d;
  d["sgmcmc_hyper"] = slots({{"lr", kHyperLr},
                             {"temperature", kHyperTemperature},
                             {"num_data", kHyperNumData},
                             {"prior_precision", kHyperPrior},
                             {"a", kHyperA},
                             {"b", kHyperB},
                             {"size", kHyperSize}});
  d["rng"] = slots({{"seed", kRngSeed}, {"step", kRngStep}, {"size", kRngSize}});
  d["calibration_stats"] = slots(
      {{"count", kStatCount}, {"confidence", kStatConfidence}, {"correct", kStatCorrect}, {"size", kCalibStats}});
  d["calibration_diag"] = slots({{"bad_sum", kDiagBadSum},
                                 {"negative", kDiagNegative},
                                 {"bad_target", kDiagBadTarget},
                                 {"nonfinite", kDiagNonFinite},
                                 {"size", kCalibDiag}});
  d["swag"] = slots({{"diag_stream", kSwagDiagStream},
                     {"lowrank_stream", kSwagLowRankStream},
                     {"max_draws", kSwagMaxDraws}});
  return d;
}

// words [4][nblocks] of philox_tile from block first_block (a uint64 counter), nblocks <= 64
static std::vector<std::vector<uint32_t>> philox_tile_bits(uint64_t seed, uint32_t stream, uint32_t step,
                                                           uint64_t first_block, int64_t nblocks) {
  if (nblocks < 0 || nblocks > pyfastbayes::cpu::kPhiloxTile)
    throw py::value_error("nblocks must be in [0, 64], got " + std::to_string(nblocks));
  alignas(64) uint32_t r[4][pyfastbayes::cpu::kPhiloxTile];
  pyfastbayes::cpu::philox_tile(seed, stream, step, static_cast<int64_t>(first_block), nblocks, r);
  std::vector<std::vector<uint32_t>> out(4);
  for (int w = 0; w < 4; ++w) out[w].assign(r[w], r[w] + nblocks);
  return out;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastbayes native ops (registered under torch.ops.pyfastbayes)";
  pyfastbayes::register_library_kernels();  // every schema is defined by now (static initialisers)
  m.def("build_info", &build_info, "dict(version, torch, cuda, cuda_archs, openmp) of this build");
  m.def("layouts", &layouts, "dict of the named slots of the op vectors: {layout: {slot: index}}");
  m.def("allocation_cache_enter", &pyfastbayes::cpu::allocation_cache_enter,
        "start (or nest) a scope in which freed CPU tensor memory is cached and reused");
  m.def("allocation_cache_exit", &pyfastbayes::cpu::allocation_cache_exit,
        "end the innermost scope; the outermost releases the cache and restores the CPU allocator");
  m.def("allocation_cache_active", &pyfastbayes::cpu::allocation_cache_active,
        "whether a scope is open and the process's CPU allocator is the cache");
  m.def("philox_tile_isa", &pyfastbayes::cpu::philox_tile_isa,
        "the CPU Philox version this process runs: 'avx512', 'avx2' or 'scalar'");
  m.def("philox_tile_bits", &philox_tile_bits, py::arg("seed"), py::arg("stream"), py::arg("step"),
        py::arg("first_block"), py::arg("nblocks"),
        "[4][nblocks] Philox words of blocks first_block.. (counter (lo, hi, stream, step), key seed): for tests");
}
