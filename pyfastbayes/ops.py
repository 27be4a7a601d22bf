"""Typed wrappers over ``torch.ops.pyfastbayes.*``, with fake kernels for ``torch.compile``.

Each wrapper runs the native kernel when the extension has one for the tensors' device and the
pure-PyTorch reference (:mod:`pyfastbayes._reference`, same random stream) otherwise.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _native, _reference

__all__ = ["philox4x32", "philox_normal_", "sgld_step_", "sghmc_step_", "psgld_step_", "any_nonfinite",
           "native_op"]


def native_op(name: str, device) -> object | None:
    """``torch.ops.pyfastbayes.<name>.default`` when the extension has a kernel for ``device``."""
    if device is not None and _native.has_kernel(device):
        return getattr(torch.ops.pyfastbayes, name).default
    return None


def _device_of(tensors: Sequence[Tensor], fallback: Tensor | None = None):
    if len(tensors):
        return tensors[0].device
    return fallback.device if fallback is not None else None


def philox4x32(counters: Tensor, key0: int, key1: int) -> Tensor:
    """Philox4x32-10 blocks: ``counters`` int64 [N, 4] of uint32 words -> int64 [N, 4]."""
    op = native_op("philox4x32", counters.device)
    return op(counters, key0, key1) if op else _reference.philox4x32(counters, key0, key1)


def philox_normal_(out: Tensor, seed: int, stream: int, step: int) -> Tensor:
    """Fill ``out`` [any shape] with the standard-normal stream (seed, stream, step) in place.

    Element i (logical order) is lane i % 4 of Philox4x32-10 block i // 4 with counter
    (block, stream, step) and key ``seed``; this is the noise the fused optimizers add.
    """
    op = native_op("philox_normal_", out.device)
    (op or _reference.philox_normal_)(out, seed, stream, step)
    return out


def sgld_step_(params: Sequence[Tensor], grads: Sequence[Tensor], hyper: Tensor, rng: Tensor,
               skip: Tensor | None = None) -> None:
    """Fused SGLD step over lists of P tensors (see :class:`pyfastbayes.optim.SGLD`).

    hyper: float64 [6] = (lr, temperature, num_data, prior_precision, -, -); rng: int64 [2] =
    (seed, step), step incremented; skip: optional bool scalar that turns the call into a no-op.
    """
    op = native_op("sgld_step_", _device_of(params, hyper))
    (op or _reference.sgld_step_)(params, grads, hyper, rng, skip)


def sghmc_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor], hyper: Tensor,
                rng: Tensor, skip: Tensor | None = None) -> None:
    """Fused SGHMC step; ``momenta`` like ``params``; hyper[4] = friction (see :class:`SGHMC`)."""
    op = native_op("sghmc_step_", _device_of(params, hyper))
    (op or _reference.sghmc_step_)(params, grads, momenta, hyper, rng, skip)


def psgld_step_(params: Sequence[Tensor], grads: Sequence[Tensor], square_avg: Sequence[Tensor], hyper: Tensor,
                rng: Tensor, skip: Tensor | None = None) -> None:
    """Fused pSGLD step; ``square_avg`` like ``params``; hyper[4:6] = (alpha, eps) (see :class:`PSGLD`)."""
    op = native_op("psgld_step_", _device_of(params, hyper))
    (op or _reference.psgld_step_)(params, grads, square_avg, hyper, rng, skip)


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """Bool scalar on the tensors' device: does any element of any tensor hold NaN or +-inf?"""
    op = native_op("any_nonfinite", _device_of(tensors)) if len(tensors) else None
    return op(list(tensors)) if op else _reference.any_nonfinite(tensors)


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels: shapes only, so torch.compile / export can trace through the ops
# ---------------------------------------------------------------------------------------------
if _native.available():

    @torch.library.register_fake("pyfastbayes::philox4x32")
    def _(counters, key0, key1):
        return torch.empty_like(counters)

    @torch.library.register_fake("pyfastbayes::philox_normal_")
    def _(out, seed, stream, step):
        return None

    @torch.library.register_fake("pyfastbayes::sgld_step_")
    def _(params, grads, hyper, rng, skip=None):
        return None

    @torch.library.register_fake("pyfastbayes::sghmc_step_")
    def _(params, grads, momenta, hyper, rng, skip=None):
        return None

    @torch.library.register_fake("pyfastbayes::psgld_step_")
    def _(params, grads, square_avg, hyper, rng, skip=None):
        return None

    @torch.library.register_fake("pyfastbayes::any_nonfinite")
    def _(tensors):
        return torch.empty((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")


# ---------------------------------------------------------------------------------------------
# calibration (pyfastbayes.calibration)
# ---------------------------------------------------------------------------------------------
__all__ += ["calibration_bins"]


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int, from_logits: bool = False,
                     classwise: bool = False, sum_tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """One pass of binning for calibration metrics (native op or its reference).

    probs: [S, N, C] probabilities (or logits with ``from_logits``), averaged over the S draws
    inside; targets: int64 [N]. Returns (bins, diag): bins float64 [n_bins, 3] (top-label) or
    [C, n_bins, 3] (``classwise``) holding per bin (count, sum of confidence, sum of correct);
    diag float64 [4] = row counts of (row sum off 1 by more than ``sum_tol``, negative entry,
    target outside [0, C), non-finite). Rows with a bad target or non-finite values are skipped.
    Bin k is [k/n_bins, (k+1)/n_bins), the last bin closed (see common/calibration.h).
    """
    op = native_op("calibration_bins", probs.device)
    fn = op or _reference.calibration_bins
    return fn(probs, targets, int(n_bins), bool(from_logits), bool(classwise), float(sum_tol))


# ---------------------------------------------------------------------------------------------
# SWA / SWAG (pyfastbayes.swag; math in csrc/common/swag.h)
# ---------------------------------------------------------------------------------------------
__all__ += ["swag_collect_", "swag_sample"]


def swag_collect_(params: Sequence[Tensor], mean: Tensor, sq_mean: Tensor | None = None,
                  deviation: Tensor | None = None, n: int = 0) -> None:
    """One fused SWA/SWAG collect over the parameter tensors (flat list order, P elements).

    mean, sq_mean: float32/float64 [P] running moments, updated in place with weight 1 / (n + 1)
    (n = models averaged before this call); deviation: a [P] row of D (float64/32/16, bfloat16)
    written with theta - mean (updated mean). sq_mean = deviation = None gives SWA.
    """
    op = native_op("swag_collect_", mean.device)
    (op or _reference.swag_collect_)(list(params), mean, sq_mean, deviation, int(n))


def swag_sample(mean: Tensor, sq_mean: Tensor, D: Tensor | None, n_draws: int, scale: float, eps: float,
                seed: int, step: int = 0, offset: int = 0) -> Tensor:
    """S = n_draws SWAG draws [S, P'] (mean's dtype) from mean, sq_mean [P'] and D [K, P'] (or None:
    diagonal covariance); scale multiplies the covariance; D is read once for all S draws and the
    noise comes from the Philox stream (seed, step); ``offset`` is the global index of column 0."""
    op = native_op("swag_sample", mean.device)
    return (op or _reference.swag_sample)(mean, sq_mean, D, int(n_draws), float(scale), float(eps), int(seed),
                                          int(step), int(offset))


if _native.available():

    @torch.library.register_fake("pyfastbayes::calibration_bins")
    def _(probs, targets, n_bins, from_logits=False, classwise=False, sum_tol=1e-4):
        shape = (probs.shape[2], n_bins, 3) if classwise else (n_bins, 3)
        return probs.new_empty(shape, dtype=torch.float64), probs.new_empty((4,), dtype=torch.float64)

    @torch.library.register_fake("pyfastbayes::swag_collect_")
    def _(params, mean, sq_mean, deviation, n):
        return None

    @torch.library.register_fake("pyfastbayes::swag_sample")
    def _(mean, sq_mean, D, n_draws, scale, eps, seed, step=0, offset=0):
        return mean.new_empty((n_draws, mean.shape[0]))
