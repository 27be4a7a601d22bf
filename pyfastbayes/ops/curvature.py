"""The loss-Hessian op of the curvature family (GGN / Fisher operators; math in csrc/common/curvature.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._reference.curvature import check_loss_hessian
from ._dispatch import select

__all__ = ["loss_hessian"]


def loss_hessian(kind: str, outputs: Tensor, V: Tensor, mode: str = "hessian", *,
                 backend: str | None = None) -> Tensor:
    """Apply the per-row Hessian of a loss w.r.t. the model outputs (or its factor) to k vectors.

    outputs: [N, C] model outputs (logits for 'cross_entropy' and 'bce'); V: [N, C, k] with the
    same dtype (float64, float32, float16, bfloat16) and device, k >= 1, any strides. Returns a
    new contiguous [N, C, k] tensor whose row n is H_n V_n (mode='hessian'), B_n V_n ('factor')
    or B_n^T V_n ('factor_t'), where H_n = B_n B_n^T is the Hessian of the row's loss:

    - 'cross_entropy': H = diag(p) - p p^T, p = softmax(outputs_n); B = diag(q) - p q^T, q = sqrt(p).
    - 'bce' (binary cross-entropy with logits): H = diag(s (1 - s)), s = sigmoid(outputs);
      B = diag(sqrt(s (1 - s))).
    - 'mse' ((f - y)^2 per element): H = 2 I, B = sqrt(2) I. No reduction scaling: for
      ``reduction='mean'`` the caller divides by the number of elements averaged.
    - 'gaussian_natural' (heteroscedastic Gaussian NLL in natural parameters, C = 2D even):
      outputs [:, :D] are eta1 = mu / s2, outputs [:, D:] are eta2 = -1 / (2 s2) < 0; per target d
      the 2 x 2 block on outputs (d, D + d) is H = [[s2, 2 mu s2], [2 mu s2, 4 mu^2 s2 + 2 s2^2]]
      (the NLL's Hessian, free of y: the exact GGN is the Fisher), B = [[s, 0], [2 mu s, sqrt(2) s2]],
      s = sqrt(s2). eta2 >= 0 gives NaN in its block (callers check: :class:`pyfastbayes.nn.NaturalGaussianNLLLoss`).

    The sum-reduced loss of N rows has the block-diagonal Hessian of these H_n. Softmax is
    max-subtracted (logits of any magnitude), sums and dots accumulate in float64, the rest runs
    in float32 (float64 for float64 inputs). C = 1 is allowed (cross_entropy: H = 0).
    Not differentiable: the inputs are detached, the result carries no autograd graph.
    """
    fn = select("loss_hessian", outputs.device, backend)
    return fn(str(kind), outputs.detach(), V.detach(), str(mode))


if _native.available():

    @torch.library.register_fake("pyfastbayes::loss_hessian")
    def _(kind, outputs, V, mode="hessian"):
        check_loss_hessian(kind, outputs, V, mode, fake=True)
        return V.new_empty(V.shape)
