// Refusal kernels for sparse inputs (ops/dense_only.cpp).
#pragma once

namespace pyfastbayes {

// Registers, for every op of the pyfastbayes library, one boxed kernel under each sparse dispatch
// key that raises a RuntimeError naming the op and the sparse argument. Call once, after every
// schema is defined (module.cpp does it when _C is imported).
void register_dense_only_kernels();

}  // namespace pyfastbayes
