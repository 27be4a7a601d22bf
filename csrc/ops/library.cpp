// The pyfastbayes operator namespace. Each family adds its schemas with TORCH_LIBRARY_FRAGMENT in
// its own file (ops/<family>.cpp); fake (meta) kernels live in pyfastbayes/ops/ (one module per
// family); ops/library_kernels.h adds, for every op, the sparse-input refusal and the version bump.
#include <torch/library.h>

TORCH_LIBRARY(pyfastbayes, m) { m.set_python_module("pyfastbayes.ops"); }
