// Kernels registered for every op of the pyfastbayes library at once, found in the dispatcher
// (no op list to keep in sync with the schemas; the walk and the registration in library_kernels.cpp):
// the sparse-input refusal (ops/dense_only.cpp), the version-counter bump of every mutated argument
// (ops/version_bump.cpp) and the math-bit (negative / conjugate view) handling (ops/math_bits.cpp).
#pragma once

#include <ATen/core/function_schema.h>

#include <functional>
#include <string>

namespace pyfastbayes {

// Calls fn(impl name, schema) for every op whose schema is in the pyfastbayes namespace; the
// impl name is "<op>" or "<op>.<overload>", as torch::Library::impl takes it.
void for_each_library_op(const std::function<void(const std::string&, const c10::FunctionSchema&)>& fn);

// Whether the schema marks the argument as written (Tensor(a!), Tensor(a!)?, Tensor(a!)[]).
inline bool writes(const c10::Argument& arg) { return arg.alias_info() != nullptr && arg.alias_info()->isWrite(); }

// Whether the op writes any of its arguments.
inline bool writes_any(const c10::FunctionSchema& schema) {
  for (const auto& arg : schema.arguments())
    if (writes(arg)) return true;
  return false;
}

// "<op>" of the schema's "pyfastbayes::<op>", as the errors name it.
inline std::string op_name(const c10::FunctionSchema& schema) {
  const std::string& full = schema.name();
  return full.substr(full.find("::") + 2);
}

// One boxed kernel under each sparse dispatch key that raises a RuntimeError naming the op and
// the sparse argument (ops/dense_only.cpp).
void register_dense_only_kernels();

// One boxed ADInplaceOrView kernel for every op with a mutable argument (Tensor(a!), Tensor(a!)[]):
// it runs the op, then bumps each mutated tensor's version counter, as ATen's in-place ops do, so
// autograd refuses a backward through a tensor an op changed after it was saved (ops/version_bump.cpp).
void register_version_bump_kernels();

// One boxed kernel under the Negative and Conjugate keys for every op with a mutable argument: a
// written argument with the math bit is refused, a read one resolved (ATen's math-bit fallback
// assumes an in-place op returns its argument: with ours it corrupted the heap; ops/math_bits.cpp).
void register_math_bit_kernels();

// All of the above, once; module.cpp calls it when _C is imported, after every schema is defined.
void register_library_kernels();

}  // namespace pyfastbayes
