"""Reference of kfac_factor_, the in-place accumulation of a KFAC Kronecker factor
(see csrc/ops/kfac.cpp and csrc/common/kfac.h).

For activations x [M, d] and factor [D, D] (D = d + 1 with the bias, else d), written in place:

    A = [x, 1]  (with the bias: an explicit ones column)  or  x,   in factor's dtype
    G = A^T A,  factor += scale * (G + G^T) / 2

so factor[:d, :d] gains scale * sym(x^T x), the bias row and column scale * colsum(x) and the
corner scale * M. Unlike the native kernels (one GEMM for x^T x, a column sum, then an elementwise
rule), the reference builds the augmented matrix explicitly and multiplies it whole: an
independent computation, equal to the kernels up to rounding (the summation order of the
products). Symmetrising G keeps a symmetric factor exactly symmetric, as the kernels do. M = 0
changes nothing.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import (KERNEL_DTYPES, OverlapCheck, check, check_dense, check_meta_mix, dispatch_device_type, num,
                      scalar_type, sizes)

_PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}  # kfac_precision


def check_kfac_factor_(factor: Tensor, x: Tensor, scale: float, bias: bool, *, fake: bool = False) -> None:
    """The checks of ``kfac_factor_`` (``check_kfac_factor``, csrc/checks/kfac.h)."""
    op = "kfac_factor_"
    check_meta_mix(op, factor=factor, x=x)
    check_dense(op, factor=factor, x=x)
    kernel = dispatch_device_type(factor, x)
    check(factor.device.type.upper() == kernel, op, ": factor is on ", factor.device, ", expected ", kernel)
    check(factor.dtype in (torch.float32, torch.float64), op, ": factor must be float32 or float64, got ",
          scalar_type(factor.dtype))
    check(x.device == factor.device, op, ": x is on ", x.device, " but factor is on ", factor.device)
    check(x.dtype in KERNEL_DTYPES, op, ": x must be float64, float32, float16 or bfloat16, got ",
          scalar_type(x.dtype))
    check(_PRECISION[x.dtype] <= _PRECISION[factor.dtype], op, ": x (", scalar_type(x.dtype),
          ") is more precise than factor (", scalar_type(factor.dtype),
          "); accumulate into a float64 factor or pass x as float32")
    check(x.dim() == 2, op, ": x must be a 2-D [M, d] tensor, got shape ", sizes(x))
    d = x.shape[1]
    check(d >= 1, op, ": x must have d >= 1 columns, got shape ", sizes(x))
    D = d + (1 if bias else 0)
    check(factor.dim() == 2 and factor.shape[0] == D and factor.shape[1] == D, op, ": factor must be [D, D] = [",
          D, ", ", D, "] (d = ", d, " columns of x", ", + 1 for the bias" if bias else ", no bias", "), got shape ",
          sizes(factor))
    check(factor.is_contiguous(), op, ": factor must be contiguous (it is written in place), got strides ",
          sizes(factor.stride()))
    check(math.isfinite(scale) and scale >= 0, op, ": scale must be finite and >= 0, got ", num(scale))
    if fake:  # no memory to compare; factor, checked contiguous, cannot overlap itself
        return
    OverlapCheck(op).add(factor, "factor", True).add(x, "x", False).run()


def kfac_factor_(factor: Tensor, x: Tensor, scale: float, bias: bool) -> None:
    """Reference of ``torch.ops.pyfastbayes.kfac_factor_``: factor [D, D] += scale * sym(A^T A)
    with A = [x, 1] (bias) or x, x [M, d], in factor's dtype (see the module docstring)."""
    check_kfac_factor_(factor, x, scale, bias)
    if x.shape[0] == 0:
        return
    A = x.detach().to(factor.dtype)
    if bias:
        A = torch.cat([A, torch.ones(A.shape[0], 1, dtype=A.dtype, device=A.device)], dim=1)
    G = A.t() @ A
    with torch.no_grad():
        factor.add_(scale * (0.5 * (G + G.t())))
