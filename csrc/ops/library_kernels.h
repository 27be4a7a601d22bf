// Kernels registered for every op of the pyfastbayes library at once, found in the dispatcher
// (no op list to keep in sync with the schemas; the walk and the registration in library_kernels.cpp):
// the sparse-input refusal (ops/dense_only.cpp) and
// the version-counter bump of every mutated argument (ops/version_bump.cpp).
#pragma once

#include <ATen/core/function_schema.h>

#include <functional>
#include <string>

namespace pyfastbayes {

// Calls fn(impl name, schema) for every op whose schema is in the pyfastbayes namespace; the
// impl name is "<op>" or "<op>.<overload>", as torch::Library::impl takes it.
void for_each_library_op(const std::function<void(const std::string&, const c10::FunctionSchema&)>& fn);

// One boxed kernel under each sparse dispatch key that raises a RuntimeError naming the op and
// the sparse argument (ops/dense_only.cpp).
void register_dense_only_kernels();

// One boxed ADInplaceOrView kernel for every op with a mutable argument (Tensor(a!), Tensor(a!)[]):
// it runs the op, then bumps each mutated tensor's version counter, as ATen's in-place ops do, so
// autograd refuses a backward through a tensor an op changed after it was saved (ops/version_bump.cpp).
void register_version_bump_kernels();

// Both of the above, once; module.cpp calls it when _C is imported, after every schema is defined.
void register_library_kernels();

}  // namespace pyfastbayes
