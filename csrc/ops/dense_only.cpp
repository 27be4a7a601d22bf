// Every pyfastbayes op takes dense (strided) tensors. A sparse argument makes the dispatcher look
// for a kernel under a sparse key (SparseCPU, SparseCUDA, SparseCsrCPU, SparseCsrCUDA); without
// one the call ended in a NotImplementedError about a backend. One boxed function (it receives
// the OperatorHandle, so it names the op) is registered under those keys for every op of the
// library (for_each_library_op, ops/library_kernels.cpp).
#include "ops/library_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace pyfastbayes {
namespace {

std::string layout_name(c10::Layout layout) {
  switch (layout) {
    case c10::kSparse: return "torch.sparse_coo";
    case c10::kSparseCsr: return "torch.sparse_csr";
    case c10::kSparseCsc: return "torch.sparse_csc";
    case c10::kSparseBsr: return "torch.sparse_bsr";
    case c10::kSparseBsc: return "torch.sparse_bsc";
    default: return c10::str(layout);
  }
}

// "name" or "name[i]" and the layout of the first non-strided tensor argument on the stack
std::string first_sparse(const c10::FunctionSchema& schema, const torch::jit::Stack& stack) {
  const auto& args = schema.arguments();
  const size_t first = stack.size() - args.size();
  auto sparse = [](const at::Tensor& t) { return t.defined() && t.layout() != c10::kStrided; };
  for (size_t a = 0; a < args.size(); ++a) {
    const c10::IValue& v = stack[first + a];
    if (v.isTensor() && sparse(v.toTensor())) {
      return args[a].name() + " is a sparse tensor (" + layout_name(v.toTensor().layout()) + ")";
    }
    if (v.isTensorList()) {
      const auto list = v.toTensorList();
      for (size_t i = 0; i < list.size(); ++i) {
        const at::Tensor t = list[i];
        if (sparse(t))
          return args[a].name() + "[" + std::to_string(i) + "] is a sparse tensor (" + layout_name(t.layout()) + ")";
      }
    }
  }
  return "a sparse tensor was passed";
}

void refuse_sparse(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  TORCH_CHECK(false, op_name(op.schema()), ": ", first_sparse(op.schema(), *stack),
              "; pyfastbayes ops take dense (strided) tensors only: pass dense tensors (.to_dense())");
}

}  // namespace

void register_dense_only_kernels() {
  for (const auto key : {c10::DispatchKey::SparseCPU, c10::DispatchKey::SparseCUDA, c10::DispatchKey::SparseCsrCPU,
                         c10::DispatchKey::SparseCsrCUDA}) {
    // never destroyed: the registrations live as long as the ops (like TORCH_LIBRARY_IMPL's)
    auto* lib = new torch::Library(torch::Library::IMPL, "pyfastbayes", key, __FILE__, __LINE__);
    for_each_library_op([lib](const std::string& name, const c10::FunctionSchema&) {
      lib->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&refuse_sparse>());
    });
  }
}

}  // namespace pyfastbayes
