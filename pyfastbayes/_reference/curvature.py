"""Reference of loss_hessian, the loss-Hessian kernel of the GGN / Fisher operators
(see csrc/ops/curvature.cpp and csrc/common/curvature.h).

Per row n of ``outputs`` [N, C] the Hessian H_n of the per-row loss with respect to the outputs,
and a factor B_n with H_n = B_n B_n^T, applied to the k columns of V_n [C, k]:

- cross_entropy: p = softmax(outputs_n), H = diag(p) - p p^T; with q = sqrt(p),
  B = diag(q) - p q^T (B B^T = diag(p) - p p^T because sum(p) = 1). All three products are
  a * (v - b t) with t = c^T v one dot per column:
  hessian  H v   = p * (v - p^T v)        (a = p, b = 1, c = p)
  factor   B v   = q * (v - q (q^T v))    (a = q, b = q, c = q)
  factor_t B^T v = q * (v - p^T v)        (a = q, b = 1, c = p)
- bce (binary cross-entropy with logits, elementwise): h = s (1 - s), s = sigmoid(outputs),
  computed as e / (1 + e)^2 with e = exp(-|x|) (no cancellation in 1 - s, no overflow);
  H = diag(h), B = B^T = diag(sqrt(h)).
- mse ((f - y)^2 per element, no reduction scaling): H = 2 I, B = B^T = sqrt(2) I.
- gaussian_natural: C = 2D outputs, the natural parameters of D Gaussians: eta1 = outputs[:, :D]
  (mu / s2) and eta2 = outputs[:, D:] (-1 / (2 s2), < 0). The negative log-likelihood
  -eta1 y - eta2 y^2 + A(eta), A = -eta1^2 / (4 eta2) - log(-2 eta2) / 2, has the Hessian of A (no
  y in it: the exact GGN is the Fisher), one 2 x 2 block per target d on outputs (d, D + d):
  H = [[s2, 2 mu s2], [2 mu s2, 4 mu^2 s2 + 2 s2^2]], B = [[s, 0], [2 mu s, sqrt(2) s2]], s = sqrt(s2),
  mu = eta1 s2. eta2 >= 0 (no Gaussian) gives NaN in the block.

Arithmetic in the op math type (float64 for float64 inputs, float32 for float32 / float16 /
bfloat16), the softmax max-subtracted, the row sum of the exponentials and the dots t accumulated
in float64; the result is rounded once to the input dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import KERNEL_DTYPES, check, check_dense, check_meta_mix, dispatch_device_type, scalar_type, sizes

KINDS = ("cross_entropy", "bce", "mse", "gaussian_natural")
MODES = ("hessian", "factor", "factor_t")


def check_loss_hessian(kind: str, outputs: Tensor, V: Tensor, mode: str, *, fake: bool = False) -> int:
    """The checks of ``loss_hessian`` (``check_loss_hessian``, csrc/checks/curvature.h); returns k."""
    op = "loss_hessian"
    check_meta_mix(op, outputs=outputs, V=V)
    check_dense(op, outputs=outputs, V=V)
    check(kind in KINDS, op, ": kind must be 'cross_entropy', 'bce', 'mse' or 'gaussian_natural', got '", kind, "'")
    check(mode in MODES, op, ": mode must be 'hessian', 'factor' or 'factor_t', got '", mode, "'")
    kernel = dispatch_device_type(outputs, V)
    check(outputs.device.type.upper() == kernel, op, ": outputs is on ", outputs.device, ", expected ", kernel)
    check(outputs.is_floating_point(), op, ": outputs must be floating point, got ", scalar_type(outputs.dtype))
    check(outputs.dtype in KERNEL_DTYPES, op, ": outputs must be float64, float32, float16 or bfloat16, got ",
          scalar_type(outputs.dtype))
    check(outputs.dim() == 2, op, ": outputs must be [N, C], got shape ", sizes(outputs))
    check(outputs.shape[1] >= 1, op, ": outputs needs C >= 1 columns, got C = ", outputs.shape[1])
    check(kind != "gaussian_natural" or outputs.shape[1] % 2 == 0, op,
          ": kind 'gaussian_natural' needs an even number of columns C = 2D (eta1 of the D targets, then their eta2), "
          "got C = ", outputs.shape[1])
    check(V.device == outputs.device, op, ": V is on ", V.device, " but outputs is on ", outputs.device)
    check(V.dtype == outputs.dtype, op, ": V must have the dtype of outputs (", scalar_type(outputs.dtype), "), got ",
          scalar_type(V.dtype))
    check(V.dim() == 3 and V.shape[0] == outputs.shape[0] and V.shape[1] == outputs.shape[1], op,
          ": V must be [N, C, k] with N = ", outputs.shape[0], ", C = ", outputs.shape[1], " (outputs' shape), got shape ",
          sizes(V))
    check(V.shape[2] >= 1, op, ": V needs k >= 1 columns (V.size(2)), got k = ", V.shape[2])
    return V.shape[2]


def loss_hessian(kind: str, outputs: Tensor, V: Tensor, mode: str = "hessian") -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.loss_hessian``: outputs [N, C], V [N, C, k] (same dtype
    and device) -> a new [N, C, k] tensor of H_n V_n ('hessian'), B_n V_n ('factor') or B_n^T V_n
    ('factor_t') per row n (formulas in the module docstring)."""
    check_loss_hessian(kind, outputs, V, mode)
    dtype = outputs.dtype
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    x = outputs.detach().to(opmath)
    v = V.detach().to(opmath)
    if kind == "mse":
        out = v * (2.0 if mode == "hessian" else math.sqrt(2.0))
    elif kind == "gaussian_natural":
        D = x.shape[1] // 2
        eta1, eta2 = x[:, :D, None], x[:, D:, None]
        s2 = torch.where(eta2 < 0, -0.5 / eta2, torch.full_like(eta2, math.nan))
        mu2 = 2 * eta1 * s2  # 2 mu
        v1, v2 = v[:, :D], v[:, D:]
        if mode == "hessian":
            o1 = s2 * (v1 + mu2 * v2)
            o2 = mu2 * o1 + 2 * s2 * s2 * v2
        elif mode == "factor":
            o1 = s2.sqrt() * v1
            o2 = mu2 * o1 + math.sqrt(2.0) * s2 * v2
        else:
            o1 = s2.sqrt() * (v1 + mu2 * v2)
            o2 = math.sqrt(2.0) * s2 * v2
        out = torch.cat([o1, o2], 1)
    elif kind == "bce":
        e = torch.exp(-x.abs())
        h = e / ((1 + e) * (1 + e))
        out = (h if mode == "hessian" else h.sqrt()).unsqueeze(-1) * v
    else:
        m = x.amax(-1, keepdim=True)
        e = torch.exp(x - m)
        z = e.sum(-1, keepdim=True, dtype=torch.float64)
        p = (e.double() / z).to(opmath)  # [N, C]
        q = p.sqrt()
        a, c = (p, p) if mode == "hessian" else (q, q) if mode == "factor" else (q, p)
        t = (c.double().unsqueeze(-1) * v.double()).sum(1, keepdim=True).to(opmath)  # [N, 1, k]: c^T v
        inner = v - q.unsqueeze(-1) * t if mode == "factor" else v - t
        out = a.unsqueeze(-1) * inner
    return out.to(dtype).contiguous()
