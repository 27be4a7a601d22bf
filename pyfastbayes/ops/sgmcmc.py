"""Fused SG-MCMC steps over lists of tensors, and the non-finite check the optimizers use.

Slots of ``hyper`` and ``rng``: :data:`pyfastbayes.ops.layouts.HYPER` and ``RNG``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _native
from .._reference.sgmcmc import check_any_nonfinite, check_step_args
from ._dispatch import device_of, select

__all__ = ["sgld_step_", "sghmc_step_", "psgld_step_", "any_nonfinite"]


def _offsets(offsets: Sequence[int] | None) -> list[int] | None:
    return None if offsets is None else list(offsets)


def sgld_step_(params: Sequence[Tensor], grads: Sequence[Tensor], hyper: Tensor, rng: Tensor,
               skip: Tensor | None = None, offsets: Sequence[int] | None = None, *,
               backend: str | None = None) -> None:
    """Fused SGLD step over lists of tensors (see :class:`pyfastbayes.optim.SGLD`).

    params, grads: equal-length lists of tensors [any shape], one floating dtype, one device;
    params updated in place. hyper: float64 [6] (``layouts.HYPER``: lr, temperature, num_data,
    prior_precision, -, -); rng: int64 [2] = (seed, step), step incremented; skip: optional
    bool scalar that turns the call into a no-op. Tensor i draws from Philox stream i: its
    element e (row-major) takes normal ``offsets[i] + e`` of that stream. offsets: None (all 0)
    or len(params) ints >= 0; for a tensor that is the contiguous piece [off, off + numel) of a
    larger row-major tensor (a rank's FSDP shard), offset off gives it the noise that piece gets
    when the whole tensor is stepped, so stepping the pieces equals stepping the whole.
    """
    select("sgld_step_", device_of(params, hyper), backend)(params, grads, hyper, rng, skip, _offsets(offsets))


def sghmc_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor], hyper: Tensor,
                rng: Tensor, skip: Tensor | None = None, offsets: Sequence[int] | None = None, *,
                backend: str | None = None) -> None:
    """Fused SGHMC step; ``momenta`` like ``params`` (updated in place); hyper slot ``a`` = friction
    (see :class:`pyfastbayes.optim.SGHMC`); other arguments as :func:`sgld_step_`."""
    select("sghmc_step_", device_of(params, hyper), backend)(params, grads, momenta, hyper, rng, skip,
                                                             _offsets(offsets))


def psgld_step_(params: Sequence[Tensor], grads: Sequence[Tensor], square_avg: Sequence[Tensor], hyper: Tensor,
                rng: Tensor, skip: Tensor | None = None, offsets: Sequence[int] | None = None, *,
                backend: str | None = None) -> None:
    """Fused pSGLD step; ``square_avg`` like ``params`` (updated in place); hyper slots
    ``a, b`` = (alpha, eps) (see :class:`pyfastbayes.optim.PSGLD`); others as :func:`sgld_step_`."""
    select("psgld_step_", device_of(params, hyper), backend)(params, grads, square_avg, hyper, rng, skip,
                                                             _offsets(offsets))


def any_nonfinite(tensors: Sequence[Tensor], limit: float | None = None, *, backend: str | None = None) -> Tensor:
    """Bool scalar on the tensors' device: does any element of any tensor [any shape] hold NaN or
    +-inf (complex: in its real or imaginary part)? With ``limit`` (a float > 0), also: has any a
    magnitude >= limit (compared exactly), e.g. the square root of a dtype's largest value, beyond
    which squares overflow. One read of the tensors (a test on their bits). Integer and bool
    tensors are never flagged. An empty list gives False on the CPU."""
    tensors = list(tensors)
    if limit is not None and not limit > 0:
        check_any_nonfinite(tensors, float(limit))  # refused as the op refuses it, an empty list too
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    return select("any_nonfinite", tensors[0].device, backend)(tensors, None if limit is None else float(limit))


# ---- fake (meta) kernels: the references' checks (same messages), then shapes only, so
# torch.compile / export trace through the ops ---------------------------------------------------
if _native.available():

    @torch.library.register_fake("pyfastbayes::sgld_step_")
    def _(params, grads, hyper, rng, skip=None, offsets=None):
        check_step_args("sgld_step_", params, grads, None, hyper, rng, skip, offsets, fake=True)

    @torch.library.register_fake("pyfastbayes::sghmc_step_")
    def _(params, grads, momenta, hyper, rng, skip=None, offsets=None):
        check_step_args("sghmc_step_", params, grads, momenta, hyper, rng, skip, offsets, fake=True)

    @torch.library.register_fake("pyfastbayes::psgld_step_")
    def _(params, grads, square_avg, hyper, rng, skip=None, offsets=None):
        check_step_args("psgld_step_", params, grads, square_avg, hyper, rng, skip, offsets, fake=True)

    @torch.library.register_fake("pyfastbayes::any_nonfinite")
    def _(tensors, limit=None):
        check_any_nonfinite(tensors, limit, fake=True)
        return torch.empty((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
