// The walk over every op of the pyfastbayes library in the dispatcher, and the registration of the
// kernels that serve all of them (ops/library_kernels.h).
#include "ops/library_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace pyfastbayes {

void for_each_library_op(const std::function<void(const std::string&, const c10::FunctionSchema&)>& fn) {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const auto& op : dispatcher.getAllOpNames()) {
    if (op.name.rfind("pyfastbayes::", 0) != 0) continue;
    std::string impl_name = op.name.substr(op.name.find("::") + 2);
    if (!op.overload_name.empty()) impl_name += "." + op.overload_name;
    fn(impl_name, dispatcher.findSchemaOrThrow(op.name.c_str(), op.overload_name.c_str()).schema());
  }
}

void register_library_kernels() {
  static bool done = false;
  if (done) return;
  done = true;
  register_dense_only_kernels();
  register_version_bump_kernels();
  register_math_bit_kernels();
}

}  // namespace pyfastbayes
