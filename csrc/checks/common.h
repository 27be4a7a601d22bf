// Host-only helpers shared by every op family (CPU and CUDA entry points): contiguous stand-ins
// for read-only tensor lists.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace pyfastbayes {

// Contiguous stand-ins for a list of tensors that the op only reads.
inline std::vector<at::Tensor> contiguous_list(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace pyfastbayes
