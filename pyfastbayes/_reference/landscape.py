"""References of the landscape ops (see csrc/ops/landscape.cpp and csrc/common/landscape.h):
landscape_points_, the parameter vectors of a loss-landscape grid, and the grid engine's fused
elementwise passes landscape_combine and landscape_bias_act_ (at the end of this module).

For n points with coordinates ``coords`` [n, m] in the span of m directions [m, P] around the
centre theta0 [P], row i of ``out`` [n, P] is written in place:

    out[i] = theta0 + sum_j coords[i, j] * directions[j]

Arithmetic in the op math type (float64 for float64 tensors, float32 for float32 / float16 /
bfloat16); coords (float64 or the tensors' dtype) are rounded once to it. The sum starts from
theta0 and adds the terms in the order j = 0..m-1, every product and every sum rounded on its own
(separate torch mul and add, no fused multiply-add): the same bits as the native kernels. The
result is rounded once to the tensors' dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (KERNEL_DTYPES, OverlapCheck, check, check_dense, check_meta_mix, dispatch_device_type,
                      scalar_type, sizes)

MAX_DIRECTIONS = 8  # kLandscapeMaxDirs (csrc/common/landscape.h)
MAX_PARTS = MAX_DIRECTIONS + 1  # kLandscapeMaxParts
ACTS = ("none", "relu")  # the act argument of landscape_combine and landscape_bias_act_


def _check_lead(op: str, name: str, t: Tensor, kernel: str) -> None:
    """``check_landscape_lead``: the op's first tensor on the kernel's device type, of a kernel dtype."""
    check(t.device.type.upper() == kernel, op, ": ", name, " is on ", t.device, ", expected ", kernel)
    check(t.dtype in KERNEL_DTYPES, op, ": ", name, " must be float64, float32, float16 or bfloat16, got ",
          scalar_type(t.dtype))


def check_landscape_points_(theta0: Tensor, directions: Tensor, coords: Tensor, out: Tensor, *,
                            fake: bool = False) -> None:
    """The checks of ``landscape_points_`` (``check_landscape_points``, csrc/checks/landscape.h)."""
    op = "landscape_points_"
    check_meta_mix(op, theta0=theta0, directions=directions, coords=coords, out=out)
    check_dense(op, theta0=theta0, directions=directions, coords=coords, out=out)
    kernel = dispatch_device_type(theta0, directions, coords, out)
    _check_lead(op, "theta0", theta0, kernel)
    check(theta0.dim() == 1, op, ": theta0 must be a 1-D [P] tensor, got shape ", sizes(theta0))
    P = theta0.shape[0]
    check(directions.device == theta0.device, op, ": directions is on ", directions.device, " but theta0 is on ",
          theta0.device)
    check(directions.dtype == theta0.dtype, op, ": directions must have the dtype of theta0 (",
          scalar_type(theta0.dtype), "), got ", scalar_type(directions.dtype))
    check(directions.dim() == 2 and directions.shape[1] == P, op, ": directions must be [m, P] with P = ", P,
          " (theta0's length), got shape ", sizes(directions))
    m = directions.shape[0]
    check(1 <= m <= MAX_DIRECTIONS, op, ": directions must have 1 to ", MAX_DIRECTIONS,
          " rows (m directions), got m = ", m)
    check(coords.device == theta0.device, op, ": coords is on ", coords.device, " but theta0 is on ", theta0.device)
    check(coords.dtype in (torch.float64, theta0.dtype), op, ": coords must be float64 or the dtype of theta0 (",
          scalar_type(theta0.dtype), "), got ", scalar_type(coords.dtype))
    check(coords.dim() == 2 and coords.shape[1] == m, op, ": coords must be [n, m] with m = ", m,
          " (directions' rows), got shape ", sizes(coords))
    n = coords.shape[0]
    check(out.device == theta0.device, op, ": out is on ", out.device, " but theta0 is on ", theta0.device)
    check(out.dtype == theta0.dtype, op, ": out must have the dtype of theta0 (", scalar_type(theta0.dtype), "), got ",
          scalar_type(out.dtype))
    check(out.dim() == 2 and out.shape[0] == n and out.shape[1] == P, op, ": out must be [n, P] = [", n, ", ", P,
          "], got shape ", sizes(out))
    check(out.is_contiguous(), op, ": out must be contiguous (it is written in place), got strides ",
          sizes(out.stride()))
    if fake:  # no memory to compare; out, checked contiguous, cannot overlap itself (and symbolic
        return  # shapes would reach the element-wise self-overlap test)
    (OverlapCheck(op).add(theta0, "theta0", False).add(directions, "directions", False)
     .add(coords, "coords", False).add(out, "out", True).run())


def landscape_points_(theta0: Tensor, directions: Tensor, coords: Tensor, out: Tensor) -> None:
    """Reference of ``torch.ops.pyfastbayes.landscape_points_``: theta0 [P], directions [m, P],
    coords [n, m] -> out [n, P] in place, out[i] = theta0 + sum_j coords[i, j] * directions[j]
    (accumulated in the order j = 0..m-1, see the module docstring)."""
    check_landscape_points_(theta0, directions, coords, out)
    opmath = torch.float64 if theta0.dtype == torch.float64 else torch.float32
    th = theta0.detach().to(opmath)
    d = directions.detach().to(opmath)
    c = coords.detach().to(opmath)
    acc = th.unsqueeze(0).expand(out.shape[0], -1)
    for j in range(d.shape[0]):
        acc = acc + c[:, j, None] * d[j][None, :]  # a product, then a sum: each rounded once
    with torch.no_grad():
        out.copy_(acc)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_act(op: str, act) -> None:
    check(act in ACTS, op, ": act must be 'none' or 'relu', got '", act, "'")


def _act(v: Tensor, act: str) -> Tensor:
    """relu: v < 0 -> +0, everything else (-0, NaN) kept (landscape_act, csrc/common/landscape.h)."""
    return torch.where(v < 0, torch.zeros((), dtype=v.dtype, device=v.device), v) if act == "relu" else v


def check_landscape_combine(parts: Tensor, mix: Tensor, act: str, *, fake: bool = False) -> None:
    """The checks of ``landscape_combine`` (``check_landscape_combine``, csrc/checks/landscape.h)."""
    op = "landscape_combine"
    check_meta_mix(op, parts=parts, mix=mix)
    check_dense(op, parts=parts, mix=mix)
    kernel = dispatch_device_type(parts, mix)
    _check_lead(op, "parts", parts, kernel)
    check(parts.dim() == 3, op, ": parts must be a 3-D [R, k, F] tensor, got shape ", sizes(parts))
    k = parts.shape[1]
    check(1 <= k <= MAX_PARTS, op, ": parts must have 1 to ", MAX_PARTS, " parts (dimension 1), got k = ", k)
    check(mix.device == parts.device, op, ": mix is on ", mix.device, " but parts is on ", parts.device)
    check(mix.dtype == parts.dtype, op, ": mix must have the dtype of parts (", scalar_type(parts.dtype), "), got ",
          scalar_type(mix.dtype))
    check(mix.dim() == 2 and mix.shape[1] == k, op, ": mix must be [c, k] with k = ", k,
          " (parts' dimension 1), got shape ", sizes(mix))
    _check_act(op, act)


def landscape_combine(parts: Tensor, mix: Tensor, act: str) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.landscape_combine``: parts [R, k, F], mix [c, k] ->
    out [c, R, F] = act(sum_j mix[:, j] * parts[:, j]), accumulated in the op math type from
    mix[:, 0] * parts[:, 0] in the order j = 1..k-1 (a product, then a sum: each rounded once)."""
    check_landscape_combine(parts, mix, act)
    opmath = _opmath(parts.dtype)
    p = parts.detach().to(opmath)
    w = mix.detach().to(opmath)
    acc = w[:, 0, None, None] * p[None, :, 0, :]
    for j in range(1, p.shape[1]):
        acc = acc + w[:, j, None, None] * p[None, :, j, :]
    return _act(acc, act).to(parts.dtype).contiguous()


def check_landscape_bias_act_(x: Tensor, bias: Tensor | None, act: str, *, fake: bool = False) -> None:
    """The checks of ``landscape_bias_act_`` (``check_landscape_bias_act``, csrc/checks/landscape.h)."""
    op = "landscape_bias_act_"
    check_meta_mix(op, x=x, bias=bias)
    check_dense(op, x=x, bias=bias)
    kernel = dispatch_device_type(x, bias)
    _check_lead(op, "x", x, kernel)
    check(x.dim() == 3, op, ": x must be a 3-D [c, R, F] tensor, got shape ", sizes(x))
    check(x.is_contiguous(), op, ": x must be contiguous (it is written in place), got strides ", sizes(x.stride()))
    if bias is not None:
        check(bias.device == x.device, op, ": bias is on ", bias.device, " but x is on ", x.device)
        check(bias.dtype == x.dtype, op, ": bias must have the dtype of x (", scalar_type(x.dtype), "), got ",
              scalar_type(bias.dtype))
        check(bias.dim() == 2 and bias.shape[0] == x.shape[0] and bias.shape[1] == x.shape[2], op,
              ": bias must be [c, F] = [", x.shape[0], ", ", x.shape[2], "], got shape ", sizes(bias))
    _check_act(op, act)
    if fake:
        return
    OverlapCheck(op).add(x, "x", True).add(bias, "bias", False).run()


def landscape_bias_act_(x: Tensor, bias: Tensor | None, act: str) -> None:
    """Reference of ``torch.ops.pyfastbayes.landscape_bias_act_``: x [c, R, F] in place,
    x = act(x + bias[:, None, :]) in the op math type (bias None: act(x))."""
    check_landscape_bias_act_(x, bias, act)
    v = x.detach().to(_opmath(x.dtype))
    if bias is not None:
        v = v + bias.detach().to(v.dtype)[:, None, :]
    with torch.no_grad():
        x.copy_(_act(v, act))

