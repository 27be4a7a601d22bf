// ATen's in-place ops bump the version counter of every tensor they write (their ADInplaceOrView
// kernels), so that autograd refuses a backward that would read a saved tensor changed since it was
// saved ("modified by an inplace operation"). A custom op gets no such kernel: the dispatcher falls
// through ADInplaceOrView, and a backward after, e.g., sgld_step_ on a parameter a graph had saved
// computed its gradient from the new values without a word. This boxed kernel, registered under
// ADInplaceOrView for every pyfastbayes op with a mutable argument (Tensor(a!), Tensor(a!)?,
// Tensor(a!)[] in its schema), runs the op below that key and then bumps the version of every tensor
// the schema says it writes (inference tensors have no counter: written only inside
// torch.inference_mode(), as ATen allows). An op that raises bumps nothing (it changed nothing either).
#include "ops/library_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace pyfastbayes {
namespace {

void run_and_bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;  // taken before the call pops its arguments
  for (size_t a = 0; a < args.size(); ++a) {
    if (!writes(args[a])) continue;
    auto take = [&](const at::Tensor& t) {
      if (!t.defined()) return;
      if (t.is_inference()) {
        // no version counter to bump. Inside torch.inference_mode() the write is legal (this kernel
        // still runs when another argument is a normal tensor); outside it ATen refuses in-place
        // writes to inference tensors, and so does this kernel, before the op writes anything
        TORCH_CHECK(c10::InferenceMode::is_enabled(), op_name(op.schema()), ": ", args[a].name(),
                    " is an inference tensor (made under torch.inference_mode()), which may be written in place "
                    "only inside torch.inference_mode(): call the op there, or pass a clone made outside it");
        return;
      }
      written.push_back(t);
    };
    const c10::IValue& v = (*stack)[first + a];
    if (v.isTensor()) {
      take(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) take(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace

void register_version_bump_kernels() {
  // never destroyed: the registrations live as long as the ops (like TORCH_LIBRARY_IMPL's)
  auto* lib = new torch::Library(torch::Library::IMPL, "pyfastbayes", c10::DispatchKey::ADInplaceOrView, __FILE__,
                                 __LINE__);
  for_each_library_op([lib](const std::string& name, const c10::FunctionSchema& schema) {
    if (writes_any(schema)) lib->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&run_and_bump_versions>());
  });
}

}  // namespace pyfastbayes
