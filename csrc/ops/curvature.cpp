// Schema of the curvature family: the loss-Hessian kernel of the GGN / Fisher operators.
//   kind:    'cross_entropy' (softmax over the C outputs of a row: H = diag(p) - p p^T),
//            'bce' (binary cross-entropy with logits, elementwise: H = diag(s (1 - s)), s = sigmoid)
//            or 'mse' ((f - y)^2 per element: H = 2 I; no reduction scaling)
//   outputs: [N, C] floating (fp64/fp32/fp16/bf16), N >= 0, C >= 1, any strides: the model outputs
//   V:       [N, C, k] of outputs' dtype and device, k >= 1, any strides
//   mode:    'hessian' -> H_n V_n, 'factor' -> B_n V_n, 'factor_t' -> B_n^T V_n with H_n = B_n B_n^T
//            (cross_entropy: B = diag(q) - p q^T, q = sqrt(p); bce: B = diag(sqrt(s (1 - s)));
//            mse: B = sqrt(2) I)
//   returns a new contiguous [N, C, k] tensor of outputs' dtype (math in common/curvature.h).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("loss_hessian(str kind, Tensor outputs, Tensor V, str mode='hessian') -> Tensor");
}
