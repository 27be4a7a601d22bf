// The pybind11 module pyfastbayes._C: loading it registers every op (static initialisers of the
// TORCH_LIBRARY blocks in this shared library) and exposes build_info().
#include <ATen/Config.h>
#include <pybind11/pybind11.h>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastbayes native ops (registered under torch.ops.pyfastbayes)";
  m.def("build_info", &build_info, "dict(version, torch, cuda, cuda_archs, openmp) of this build");
}
