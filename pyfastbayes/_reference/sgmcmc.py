"""Reference of the fused SG-MCMC steps and of any_nonfinite (same Philox stream as the kernels)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..ops.layouts import HYPER, RNG
from ._checks import (KERNEL_DTYPES, OverlapCheck, check, check_dense, check_meta_mix, dispatch_device_type, num,
                      scalar_type, sizes)
from .random import philox_normal_range

_BUFS = {"sgld_step_": None, "sghmc_step_": "momenta", "psgld_step_": "square_avg"}


def check_step_args(op: str, params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor] | None,
                    hyper: Tensor, rng: Tensor, skip: Tensor | None, offsets: Sequence[int] | None = None, *,
                    fake: bool = False) -> None:
    """The checks of the fused steps (``check_step_args``, csrc/checks/sgmcmc.h): matching lists of
    dense tensors, one floating dtype, one device; offsets None or one int >= 0 per tensor (with
    offsets[i] + numel below 2^63); hyper float64 [>= HYPER.size], rng int64 [RNG.size], skip a
    bool scalar, all on that device; nothing the step writes (params, state, rng) overlaps another
    argument or itself."""
    bufs_name = _BUFS[op]
    state = {bufs_name: bufs} if bufs_name else {}
    check_meta_mix(op, params=params, grads=grads, **state, hyper=hyper, rng=rng, skip=skip)
    check_dense(op, params=params, grads=grads, **state, hyper=hyper, rng=rng, skip=skip)
    has_bufs = bufs_name is not None
    check(len(params) == len(grads), op, ": got ", len(params), " params but ", len(grads), " grads")
    check(not has_bufs or len(bufs) == len(params), op, ": got ", len(params), " params but ",
          len(bufs) if has_bufs else 0, " state buffers")
    if offsets is not None:
        check(len(offsets) == len(params), op, ": got ", len(params), " params but ", len(offsets), " offsets")
        for i, (off, p) in enumerate(zip(offsets, params)):
            check(off >= 0, op, ": offsets[", i, "] must be >= 0, got ", off)
            check(off <= 2**63 - 1 - p.numel(), op, ": offsets[", i, "] + ", p.numel(),
                  " elements must be below 2^63, got offsets[", i, "] = ", off)
    device = params[0].device if len(params) else rng.device
    check(hyper.dtype == torch.float64 and hyper.dim() == 1 and hyper.numel() >= HYPER.size and hyper.is_contiguous()
          and hyper.device == device, op, ": hyper must be a contiguous float64 vector of length ", HYPER.size,
          " on ", device)
    check(rng.dtype == torch.int64 and rng.dim() == 1 and rng.numel() == RNG.size and rng.is_contiguous()
          and rng.device == device, op, ": rng must be a contiguous int64 [2] = (seed, step) on ", device)
    if skip is not None:
        check(skip.numel() == 1 and skip.dtype == torch.bool and skip.device == device, op,
              ": skip must be a bool scalar on ", device)
    kernel = dispatch_device_type(params, grads, bufs, hyper, rng, skip)
    check(device.type.upper() == kernel, op, ": tensors are on ", device, ", expected ", kernel)
    if len(params):
        dtype = params[0].dtype
        check(dtype.is_floating_point, op, ": params must be floating point, got ", scalar_type(dtype))
        check(dtype in KERNEL_DTYPES, op, ": params must be float64, float32, float16 or bfloat16, got ",
              scalar_type(dtype))

        def like(t, p, what, i):
            check(t.device == device, op, ": ", what, "[", i, "] is on ", t.device, " but params[0] is on ", device)
            check(t.dtype == dtype, op, ": ", what, "[", i, "] has dtype ", scalar_type(t.dtype),
                  " but params[0] has ", scalar_type(dtype), " (one dtype per call)")
            check(p is None or t.shape == p.shape, op, ": ", what, "[", i, "] has shape ", sizes(t),
                  " but params[", i, "] has shape ", sizes(p) if p is not None else "")

        for i in range(len(params)):
            like(params[i], None, "params", i)
            like(grads[i], params[i], "grads", i)
            if has_bufs:
                like(bufs[i], params[i], "state", i)
    overlap = OverlapCheck(op, fake).add_list(params, "params", True).add_list(grads, "grads", False)
    if has_bufs:
        overlap.add_list(bufs, bufs_name, True)
    overlap.add(hyper, "hyper", False).add(rng, "rng", True).add(skip, "skip", False).run()


def check_any_nonfinite(tensors: Sequence[Tensor], limit: float | None = None, *, fake: bool = False) -> None:
    """The checks of ``any_nonfinite`` (``check_nonfinite_limit``, ``nonfinite_inputs``,
    csrc/checks/sgmcmc.h): limit None or > 0; one device (the CPU kernel words it as 'all on the
    CPU'); any dtype (only floating and complex can be non-finite)."""
    check(limit is None or limit > 0, "any_nonfinite: limit must be > 0 (a bound on the magnitude), got ",
          num(limit if limit is not None else 0.0))
    check_meta_mix("any_nonfinite", tensors=tensors)
    check_dense("any_nonfinite", tensors=tensors)
    if not len(tensors):
        return
    kernel = dispatch_device_type(tensors)
    for t in tensors:
        if kernel == "CPU":
            check(t.device.type == "cpu", "any_nonfinite: all tensors must be on the CPU, got ", t.device)
        else:
            check(t.device == tensors[0].device, "any_nonfinite: tensors on ", t.device, " and ", tensors[0].device)


def _sqrt(x: float) -> float:
    """sqrt as the kernels take it: NaN for a negative argument (hyper-parameter values are not
    checked by the op: a negative lr or temperature gives NaN parameters on both backends)."""
    return math.sqrt(x) if x >= 0 else math.nan


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noisy_step(kind: str, params, grads, bufs, hyper: Tensor, rng: Tensor, skip, offsets) -> None:
    check_step_args(f"{kind}_step_", params, grads, bufs, hyper, rng, skip, offsets)
    if skip is not None and bool(skip):
        return
    h = [float(v) for v in hyper.tolist()]
    lr, temp, num_data, prior = h[HYPER.lr], h[HYPER.temperature], h[HYPER.num_data], h[HYPER.prior_precision]
    a, b = h[HYPER.a], h[HYPER.b]
    seed, step = int(rng[RNG.seed]), int(rng[RNG.step])
    for i, (p, g) in enumerate(zip(params, grads)):
        op = _opmath(p.dtype)
        # element e (row-major) takes normal offsets[i] + e of stream i
        start = 0 if offsets is None else int(offsets[i])
        xi = philox_normal_range(start, p.numel(), seed, i, step, p.device).view(p.shape).to(op)
        pv, gv = p.to(op), g.to(op)
        grad_u = num_data * gv + prior * pv
        if kind == "sgld":
            pv = pv - (0.5 * lr) * grad_u + _sqrt(lr * temp) * xi
        elif kind == "sghmc":
            v = (1.0 - a) * bufs[i].to(op) - lr * grad_u + _sqrt(2.0 * a * lr * temp) * xi
            pv = pv + v
            bufs[i].copy_(v)
        else:  # psgld
            v = a * bufs[i].to(op) + (1.0 - a) * gv * gv
            precond = 1.0 / (b + torch.sqrt(v))
            pv = pv - (0.5 * lr) * precond * grad_u + torch.sqrt((lr * temp) * precond) * xi
            bufs[i].copy_(v)
        p.copy_(pv)
    rng[RNG.step] += 1


def sgld_step_(params: Sequence[Tensor], grads: Sequence[Tensor], hyper: Tensor, rng: Tensor,
               skip: Tensor | None = None, offsets: Sequence[int] | None = None) -> None:
    """Reference of ``torch.ops.pyfastbayes.sgld_step_`` (see :class:`pyfastbayes.optim.SGLD`)."""
    _noisy_step("sgld", params, grads, None, hyper, rng, skip, offsets)


def sghmc_step_(params, grads, momenta, hyper, rng, skip=None, offsets=None) -> None:
    """Reference of ``torch.ops.pyfastbayes.sghmc_step_`` (see :class:`pyfastbayes.optim.SGHMC`)."""
    _noisy_step("sghmc", params, grads, momenta, hyper, rng, skip, offsets)


def psgld_step_(params, grads, square_avg, hyper, rng, skip=None, offsets=None) -> None:
    """Reference of ``torch.ops.pyfastbayes.psgld_step_`` (see :class:`pyfastbayes.optim.PSGLD`)."""
    _noisy_step("psgld", params, grads, square_avg, hyper, rng, skip, offsets)


def any_nonfinite(tensors: Sequence[Tensor], limit: float | None = None) -> Tensor:
    """True (bool scalar) when any element of any floating tensor is NaN or infinite (complex: in
    its real or imaginary part), or, given a limit, has a magnitude >= limit (compared exactly, in
    float64); integer and bool tensors are never flagged."""
    check_any_nonfinite(tensors, limit)

    def flag(t: Tensor) -> Tensor:
        # 1-byte floats through float32 (torch.isfinite has no kernel for some, and misreads e8m0's NaN)
        t = t.float() if t.is_floating_point() and t.element_size() == 1 else t
        bad = ~torch.isfinite(t)
        if limit is not None:
            mag = torch.view_as_real(t.resolve_conj()).abs() if t.is_complex() else t.abs()
            over = mag.double() >= limit
            bad = bad | (over.any(-1) if t.is_complex() else over)
        return bad.any()

    flags = [flag(t) for t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel()]
    if not flags:
        dev = tensors[0].device if len(tensors) else "cpu"
        return torch.zeros((), dtype=torch.bool, device=dev)
    return torch.stack([f.to(flags[0].device) for f in flags]).any()
