// Schemas of the RNG ops: raw Philox blocks and the normal stream that every noisy kernel uses.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  // counters: int64 [N, 4] holding uint32 words; returns int64 [N, 4], the Philox4x32-10 output
  m.def("philox4x32(Tensor counters, int key0, int key1) -> Tensor");
  // out: float tensor to fill (any floating dtype) with the normal stream (seed, stream, step):
  // element i gets lane i % 4 of block i / 4, exactly as the fused optimizers draw it
  m.def("philox_normal_(Tensor(a!) out, int seed, int stream, int step) -> ()");
}
