// The pyfastbayes operator namespace. Each family adds its schemas with TORCH_LIBRARY_FRAGMENT in
// its own file (ops/<family>.cpp); fake (meta) kernels live in pyfastbayes/ops/ (one module per
// family); ops/dense_only.cpp adds the sparse-input refusal of every op.
#include <torch/library.h>

TORCH_LIBRARY(pyfastbayes, m) { m.set_python_module("pyfastbayes.ops"); }
