"""Stochastic weight averaging (Izmailov et al. 2018): :class:`SWA`, the running mean of the weights.

The mean is updated by the same fused op as SWAG (``pyfastbayes.ops.swag_collect_``, one pass
over all parameter tensors). As a posterior SWA is a point mass at the mean: every draw is the
mean and the model average is the prediction of the averaged network.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import bn_modules, refresh_bn, update_bn
from .base import Posterior, check_int

__all__ = ["SWA"]

STATE_DTYPES = (torch.float32, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class SWA(Posterior):
    """Stochastic weight averaging: the running mean [P] of the model's trainable parameters.

    Each :meth:`collect` lerps the mean towards the parameters with weight w = 1 / (n + 1) (the
    first copies), as ``torch.optim.swa_utils.AveragedModel`` does. What holds against
    AveragedModel (tested, float32 and float64): not bit equality, since the two lerps round
    differently, which shows as many ulps where an average is near 0; but per element
    |ours - torch| <= eps * max_t |theta_t| (one rounding unit at the magnitude of the collected
    parameters; measured <= 0.74 eps), and both are within that of the exact average of the
    collected models (measured after 9 collects; neither is systematically the closer one). The
    mean is kept in ``dtype`` (default float64 if any parameter is float64, else float32), so
    half-precision parameters are averaged in float32 rather than rounded at every step.

    Args:
        model: the network; its trainable parameters (order of ``model.named_parameters()``, P
            numbers, one device; float64/32/16 or bfloat16) are tracked.
        dtype: float32 or float64 state.

    Attributes:
        mean: [P] running average.  n_averaged: number of collected models.
        bn_buffers: the model's buffers with BatchNorm statistics recomputed for the average by
            :meth:`update_bn` (None before, and again after the next collect).
        device: the parameters' device (where the state lives).  dtype: the state dtype.
    """

    kind = "SWA"
    _bn_refresh_advised = True

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        super().__init__(model)
        for n, d in zip(self.layout.names, self.layout.dtypes):
            if d not in PARAM_DTYPES:
                raise TypeError(f"parameter {n!r} has dtype {d}; SWA/SWAG track float64/32/16 and bfloat16")
        if dtype is None:
            dtype = torch.float64 if torch.float64 in self.layout.dtypes else torch.float32
        if dtype not in STATE_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = self.layout.device
        self.dtype = dtype
        self.mean = torch.zeros(self.numel, dtype=dtype, device=self.device)
        self.n_averaged = 0
        self.bn_buffers = None  # BatchNorm statistics for the current average (update_bn); reset by collect / load

    # ---- collecting ----------------------------------------------------------------------------
    def _limit(self) -> tuple[float, str]:
        """(the magnitude a collected parameter must stay below, why): half the state dtype's largest
        value, beyond which the running mean's update (theta - mean) can overflow, or the parameter
        not fit the state at all (a float64 1e39 in a float32 mean). SWAG's is lower (its square)."""
        return torch.finfo(self.dtype).max / 2, (f"half of {self.dtype}'s largest value: the running mean would "
                                                 "overflow to inf or NaN")

    def _collect_flag(self, ps: list[Tensor]) -> Tensor:
        """Bool scalar on the device: does this collect have to be refused? (parameters that are not
        finite or of magnitude >= :meth:`_limit`: one read, ``ops.any_nonfinite`` with a limit)"""
        return ops.any_nonfinite(ps, self._limit()[0])

    def _refuse_collect(self, ps: list[Tensor]) -> None:
        """Raise the error that :meth:`_collect_flag` found (slow path, only after a refusal): the
        first non-finite parameter, else the first beyond :meth:`_limit`."""
        for name, p in zip(self.layout.names, ps):
            if not torch.isfinite(p).all():
                raise ValueError(f"parameter {name!r} holds NaN or inf: collect() refuses it (it would poison the "
                                 f"running mean for ever); the {self.kind} state is unchanged")
        self._refuse_large(list(zip(self.layout.names, ps)))

    def _refuse_large(self, named: list[tuple[str, Tensor]], where: str = "") -> None:
        """The ValueError naming the first parameter at or beyond :meth:`_limit` in magnitude;
        nothing when there is none."""
        limit, why = self._limit()
        for name, t in named:
            big = float(t.detach().abs().max()) if t.numel() else 0.0
            if not big < limit:
                raise ValueError(f"parameter {name!r} holds values of magnitude {big:.4g}{where}, at or beyond "
                                 f"{limit:.4g} = {why}. collect() refuses it; the {self.kind} state is unchanged. "
                                 "Keep the state in dtype=torch.float64, or check the training (weights this large "
                                 "mean it diverged)")

    @torch.no_grad()
    def collect(self, model: nn.Module | None = None) -> None:
        """Add the current parameters of ``model`` (default: :attr:`model`) to the average.

        Non-finite parameters are refused (ValueError, state unchanged). The cost: one fused
        check over the parameters (``ops.any_nonfinite``, one read of P numbers next to the
        collect's three reads and three writes) and one host synchronisation per collect to
        learn its answer, negligible at one collect per epoch.
        """
        ps = self.layout.params(model)
        if bool(self._collect_flag(ps)):
            self._refuse_collect(ps)
        self._update(ps)
        self.n_averaged += 1
        self.bn_buffers = None  # (the average moved)

    def _update(self, ps: list[Tensor]) -> None:
        ops.swag_collect_(ps, self.mean, None, None, self.n_averaged)

    def _require_collected(self) -> None:
        if self.n_averaged == 0:
            raise RuntimeError(f"the {self.kind} has no collected models yet: call collect() first")

    def _whole_mean(self) -> Tensor:
        """The average [P] as one tensor (a sharded SWAG gathers its columns)."""
        return self.mean

    def _kept_buffers(self, bn_loader) -> dict | None:
        """:attr:`bn_buffers` where they serve this prediction (no ``bn_loader`` given)."""
        return self.bn_buffers if bn_loader is None else None

    def load_mean_(self, model: nn.Module | None = None) -> nn.Module:
        """Write the running average [P] into the parameters of ``model`` (default: :attr:`model`)
        in place, cast to each parameter's dtype; returns the model."""
        self._require_collected()
        return self.layout.write_(self.mean, model)

    @torch.no_grad()
    def update_bn(self, loader, model: nn.Module | None = None, *, batch_size: int = 1024,
                  input_fn: Callable | None = None) -> None:
        """Recompute BatchNorm statistics in one pass over ``loader`` (the cumulative average in
        train mode, as ``torch.optim.swa_utils.update_bn``).

        Without ``model``: for the running AVERAGE (on copies of the buffers, through
        ``functional_call``; the model's own buffers, those of its current weights, are left
        alone). They are kept in :attr:`bn_buffers` and used by :meth:`predict_mean` /
        :meth:`predict` when no ``bn_loader`` is given, until the next :meth:`collect`. With
        ``model`` (torch's ``update_bn(loader, swa_model)``, e.g. after :meth:`load_mean_`): that
        model's own statistics, for its current parameters, in place. A pass that fails (a batch
        the model refuses, an empty loader) changes nothing."""
        batch_size = check_int(batch_size, "batch_size", 1)
        if model is not None:
            update_bn(loader, model, batch_size=batch_size, input_fn=input_fn)
            return
        self._require_collected()
        if not bn_modules(self.model):
            self.bn_buffers = None
            return
        tensors = self.layout.unflatten(self._whole_mean().to(self.device))
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        tensors.update(buffers)
        refresh_bn(self.model, loader, tensors, self.device, batch_size, input_fn, name="loader")
        self.bn_buffers = buffers

    # ---- the Posterior interface (a point mass at the mean) ------------------------------------
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` copies of the mean [n, P] (SWA is a point mass; ``generator`` is not used)."""
        n = check_int(n, "n", 0)
        self._require_collected()
        return self.mean.expand(n, self.numel).clone()

    @torch.no_grad()
    def predict(self, x, n_samples: int = 1, *, likelihood: str = "classification", bn_loader=None,
                batch_size: int = 1024, progress: bool = False, generator: torch.Generator | None = None,
                input_fn: Callable | None = None, output_fn: Callable | None = None):
        """Predictions of the SWA solution (:meth:`predict_mean`): every draw of a point mass is the
        mean, so one forward pass serves any ``n_samples`` (accepted for the common interface);
        'regression' gives (outputs, zeros)."""
        check_int(n_samples, "n_samples", 1)
        return self.predict_mean(x, likelihood=likelihood, bn_loader=bn_loader, batch_size=batch_size,
                                 progress=progress, input_fn=input_fn, output_fn=output_fn)

    @torch.no_grad()
    def predict_mean(self, x, *, likelihood: str = "classification", bn_loader=None, batch_size: int = 1024,
                     progress: bool = False, input_fn: Callable | None = None, output_fn: Callable | None = None):
        """Predictions of the running average in eval mode through ``functional_call`` (the model's
        own parameters and buffers are left alone); ``bn_loader`` recomputes the BatchNorm
        statistics for the average first (on copies); without it, the statistics of the last
        :meth:`update_bn` (for the current average), else the model's own (with a warning, or
        ``bn_loader=False`` to keep them silently). Arguments and outputs as in
        :meth:`Posterior.predict`."""
        self._require_collected()
        return self._average([(self.layout, [self.mean])], x, total=1, likelihood=likelihood, bn_loader=bn_loader,
                             batch_size=batch_size, progress=progress, input_fn=input_fn, output_fn=output_fn,
                             buffers=self._kept_buffers(bn_loader))

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Kind, layout, mean and count (tensors cloned)."""
        sd = self._state_header()
        sd.update(mean=self.mean.clone(), n_averaged=self.n_averaged)
        return sd

    def _check_state(self, state: dict) -> None:
        self._check_header(state)
        self._check_state_count(state, "n_averaged")
        self._check_state_tensor(state, "mean", (self.numel,), self.dtype)

    @torch.no_grad()  # a saved tensor that requires grad must not make the state part of a graph
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (checked first; nothing changes when it does not fit)."""
        self._check_state(state)
        self.mean.copy_(state["mean"])
        self.n_averaged = int(state["n_averaged"])
        self.bn_buffers = None
