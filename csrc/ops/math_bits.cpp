// A tensor may carry a lazy "math bit": the negative bit (a negated view, e.g. z.conj().imag of a
// complex z) or the conjugate bit (z.conj()). ATen resolves them in its Negative / Conjugate
// fallbacks (aten/src/ATen/native/MathBitsFallback.h), which for an op with a mutable argument run
// the op on a clone of that argument and then take the op's RETURN value as the result to copy
// back. pyfastbayes's in-place ops return () (or other tensors): the fallback read past the end of
// the stack and corrupted the heap (malloc abort), or copied nothing back after the op had written
// its other outputs (a partial write). This boxed kernel, registered under both keys for every op
// with a mutable argument, refuses a written argument that carries the bit (naming it; nothing is
// written), resolves the bit of every read argument (a copy, as the fallback would make) and runs
// the op below the key.
#include "ops/library_kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace pyfastbayes {
namespace {

template <c10::DispatchKey Key>
void resolve_math_bit(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  constexpr bool neg = Key == c10::DispatchKey::Negative;
  auto has_bit = [](const at::Tensor& t) { return t.defined() && (neg ? t.is_neg() : t.is_conj()); };
  auto resolve = [](const at::Tensor& t) { return neg ? t.resolve_neg() : t.resolve_conj(); };
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  const std::string name = op_name(op.schema());
  auto refuse = [&](const std::string& what) {
    TORCH_CHECK(false, name, ": ", what, " has the ", neg ? "negative" : "conjugate", " bit set (a lazily ",
                neg ? "negated view, e.g. z.conj().imag" : "conjugated view, z.conj()",
                "), which the op cannot write in place: pass ", what, ".resolve_", neg ? "neg" : "conj",
                "() (a copy) and read the result from it");
  };
  // every written argument first: a refusal leaves everything as it was
  for (size_t a = 0; a < args.size(); ++a) {
    if (!writes(args[a])) continue;
    const c10::IValue& v = (*stack)[first + a];
    if (v.isTensor() && has_bit(v.toTensor())) refuse(args[a].name());
    if (v.isTensorList()) {
      const auto list = v.toTensorList();
      for (size_t i = 0; i < list.size(); ++i)
        if (has_bit(list[i])) refuse(args[a].name() + "[" + std::to_string(i) + "]");
    }
  }
  for (size_t a = 0; a < args.size(); ++a) {
    c10::IValue& v = (*stack)[first + a];
    if (v.isTensor() && has_bit(v.toTensor())) {
      v = resolve(v.toTensor());
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();  // shares the IValue's list (made for this call)
      for (size_t i = 0; i < list.size(); ++i)
        if (has_bit(list[i])) list[i] = resolve(list[i]);
    }
  }
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, Key), stack);
}

}  // namespace

void register_math_bit_kernels() {
  for (const auto key : {c10::DispatchKey::Negative, c10::DispatchKey::Conjugate}) {
    // never destroyed: the registrations live as long as the ops (like TORCH_LIBRARY_IMPL's)
    auto* lib = new torch::Library(torch::Library::IMPL, "pyfastbayes", key, __FILE__, __LINE__);
    for_each_library_op([lib, key](const std::string& name, const c10::FunctionSchema& schema) {
      if (!writes_any(schema)) return;
      lib->impl(name.c_str(), key == c10::DispatchKey::Negative
                                  ? torch::CppFunction::makeFromBoxedFunction<
                                        &resolve_math_bit<c10::DispatchKey::Negative>>()
                                  : torch::CppFunction::makeFromBoxedFunction<
                                        &resolve_math_bit<c10::DispatchKey::Conjugate>>());
    });
  }
}

}  // namespace pyfastbayes
