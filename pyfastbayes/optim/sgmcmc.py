"""Fused stochastic-gradient MCMC samplers: SGLD, SGHMC and pSGLD.

Convention (all three): ``p.grad`` holds the gradient g of the MEAN negative log-likelihood of a
minibatch, and the potential is

    U(theta) = num_data * mean-NLL(theta) + prior_precision * |theta|^2 / 2,
    grad U   = num_data * g + prior_precision * theta,        xi ~ N(0, I).

One native call per parameter group and step updates every tensor of the group (one kernel
launch on CUDA); the noise xi comes from an in-kernel Philox4x32-10 stream keyed by a seed drawn
once from the torch generator, so ``torch.manual_seed`` (or ``generator=``) fixes the chain,
CPU and CUDA draw the same noise, and no noise tensor is ever allocated. Within a group, the i-th
parameter that has a gradient in a step draws from Philox stream i at that step's counter.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .. import _native, ops

_NONFINITE = ("raise", "skip", "ignore")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if torch.is_tensor(value):  # device-resident hyper-parameters are checked by the user
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")


class _SGMCMC(torch.optim.Optimizer):
    """Shared machinery: validation, device-resident hyper-parameters and RNG, fused dispatch."""

    _op_name: str = ""
    _buffer: str | None = None  # name of the per-parameter state buffer, if any
    _extra: tuple[str, ...] = ()  # method-specific hyper-parameters, in hyper[4:6]

    def __init__(self, params, defaults: dict, fused: bool | None, nonfinite: str,
                 generator: torch.Generator | None):
        self._check_hyper(defaults)
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if fused and not _native.available():
            raise RuntimeError(f"{type(self).__name__}(fused=True): the pyfastbayes native extension is not "
                               f"loaded ({_native.LOAD_ERROR}); use fused=None or rebuild it")
        defaults = dict(defaults, fused=fused, nonfinite=nonfinite)
        super().__init__(params, defaults)
        self._generator = generator

    # ---- validation ---------------------------------------------------------------------
    @classmethod
    def _check_hyper(cls, group: dict) -> None:
        _check_positive("lr", group["lr"])
        _check_positive("num_data", group["num_data"])
        _check_positive("temperature", group["temperature"], allow_zero=True)
        _check_positive("prior_precision", group["prior_precision"], allow_zero=True)

    def _explain(self, gi: int, group: dict) -> None:
        """Raise a clear error naming the first parameter that the fused op cannot take."""
        ref = None
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
            if p.grad.is_sparse or p.grad.layout != torch.strided:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients: {where}")
            if not p.is_floating_point():
                raise TypeError(f"{where} has dtype {p.dtype}; parameters must be floating point")
            if ref is None:
                ref = p
            elif p.device != ref.device or p.dtype != ref.dtype:
                raise ValueError(f"{where} is {p.dtype} on {p.device} but the group's first parameter is "
                                 f"{ref.dtype} on {ref.device}; put parameters of different devices or "
                                 f"dtypes in separate param groups")
            if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
                raise ValueError(f"{where}: gradient is {p.grad.dtype} {tuple(p.grad.shape)} on {p.grad.device}")

    # ---- device-resident state ----------------------------------------------------------
    def _hyper_values(self, group: dict) -> list:
        extra = [group[k] for k in self._extra] + [0.0] * (2 - len(self._extra))
        return [group["lr"], group["temperature"], group["num_data"], group["prior_precision"], *extra]

    def _group_state(self, group: dict, device: torch.device) -> dict:
        st = self.state[group["params"][0]]
        if "rng" not in st:
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=self._generator))
            st["rng"] = torch.tensor([seed, 0], dtype=torch.int64, device=device)
        elif st["rng"].device != device:
            st["rng"] = st["rng"].to(device)
        if "hyper" not in st or st["hyper"].device != device:
            st["hyper"] = torch.zeros(6, dtype=torch.float64, device=device)
            st["_hyper_cache"] = None
        vals = self._hyper_values(group)
        floats = tuple(0.0 if torch.is_tensor(v) else float(v) for v in vals)
        if floats != st.get("_hyper_cache"):
            st["hyper"].copy_(torch.tensor(floats, dtype=torch.float64))
            st["_hyper_cache"] = floats
        for i, v in enumerate(vals):
            if torch.is_tensor(v):  # device copy each step: graph-replay sees the live value
                st["hyper"][i].copy_(v)
        return st

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        out = []
        for p in params:
            st = self.state[p]
            if self._buffer not in st:
                st[self._buffer] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(st[self._buffer])
        return out

    # ---- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One sampler step for every parameter group; returns ``closure()`` if given.

        Raises ``RuntimeError`` (parameters untouched) when a gradient holds NaN/inf and
        the group's ``nonfinite`` is 'raise'; 'skip' skips the step on the device without a host
        sync (CUDA-graph friendly); 'ignore' does not check.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._check_hyper(group)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            dev = params[0].device
            if any(p.device != dev for p in params) or any(g.layout != torch.strided for g in grads):
                self._explain(gi, group)
            st = self._group_state(group, dev)
            skip = None
            if group["nonfinite"] != "ignore":
                skip = ops.any_nonfinite(grads)
                if group["nonfinite"] == "raise" and bool(skip):
                    bad = [i for i, g in enumerate(grads) if not bool(torch.isfinite(g).all())]
                    raise RuntimeError(
                        f"{type(self).__name__}: non-finite gradient in param_groups[{gi}] (tensors {bad} of "
                        f"those with gradients); parameters were not changed. Lower the learning rate, clip "
                        f"gradients, or pass nonfinite='skip'.")
            args = [params, grads] + ([self._buffers(params)] if self._buffer else [])
            args += [st["hyper"], st["rng"], skip]
            backend = {None: None, True: "native", False: "reference"}[group["fused"]]
            step_op = getattr(ops, self._op_name)
            if backend == "reference" or not _native.has_kernel(dev):
                self._explain(gi, group)  # the reference does not validate its arguments itself
            try:  # the op checks every argument before it writes anything
                step_op(*args, backend=backend)
            except RuntimeError:
                self._explain(gi, group)  # a clearer message naming the parameter, if it can
                raise
        return loss

    # ---- state_dict: keep the int64 RNG position exact ----------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load state; the RNG position (seed, step) is restored exactly, so a chain resumes its stream."""
        saved = {k: v["rng"].clone() for k, v in state_dict["state"].items() if "rng" in v}
        super().load_state_dict(state_dict)
        id_to_param = {}
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                id_to_param[idx] = p
                idx += 1
        for k, rng in saved.items():
            p = id_to_param[int(k)]
            self.state[p]["rng"] = rng.to(device=p.device, dtype=torch.int64)
            self.state[p].pop("hyper", None)
            self.state[p].pop("_hyper_cache", None)

    def seed(self, group: int = 0) -> int:
        """The 64-bit Philox seed of a parameter group (drawn at its first step)."""
        st = self.state[self.param_groups[group]["params"][0]]
        if "rng" not in st:
            raise RuntimeError("the seed is drawn at the first step; call step() first")
        return int(st["rng"][0])


class SGLD(_SGMCMC):
    r"""Stochastic-gradient Langevin dynamics (Welling & Teh 2011), fused over all tensors.

    Update, per element, with U as in the module docstring::

        theta <- theta - (lr / 2) * grad U + sqrt(lr * T) * xi,    xi ~ N(0, 1)

    At ``temperature`` T = 1 the chain targets the posterior exp(-U); T < 1 is a cold posterior,
    T = 0 is plain (noise-free) gradient descent on U.

    Args:
        params: iterable of tensors [any shape] or param-group dicts.
        lr: step size (> 0); may be changed per step (schedules) or be a 0-dim device tensor.
        num_data: N, the number of training points (> 0); scales the minibatch mean gradient.
        temperature: T >= 0.  prior_precision: alpha >= 0 of the Gaussian prior N(0, 1/alpha).
        fused: None picks the native kernel when it exists for the device, True insists, False
            runs the pure-PyTorch reference (same noise stream, slower).
        nonfinite: 'raise' (default), 'skip' or 'ignore' non-finite gradients (see :meth:`step`).
        generator: torch.Generator the seed is drawn from (default: the global CPU generator).
    """

    _op_name = "sgld_step_"

    def __init__(self, params: Iterable, lr: float, num_data: int, temperature: float = 1.0,
                 prior_precision: float = 0.0, fused: bool | None = None, nonfinite: str = "raise",
                 generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, num_data=num_data, temperature=temperature,
                                      prior_precision=prior_precision), fused, nonfinite, generator)


class SGHMC(_SGMCMC):
    r"""Stochastic-gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014), momentum form.

    Per element, with momentum v (state ``momentum_buffer``, zero at start)::

        v     <- (1 - friction) * v - lr * grad U + sqrt(2 * friction * lr * T) * xi
        theta <- theta + v

    Args as :class:`SGLD`, plus ``friction`` in (0, 1] (1 - friction is the momentum decay).
    """

    _op_name = "sghmc_step_"
    _buffer = "momentum_buffer"
    _extra = ("friction",)

    def __init__(self, params: Iterable, lr: float, num_data: int, friction: float = 0.1,
                 temperature: float = 1.0, prior_precision: float = 0.0, fused: bool | None = None,
                 nonfinite: str = "raise", generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, num_data=num_data, friction=friction, temperature=temperature,
                                      prior_precision=prior_precision), fused, nonfinite, generator)

    @classmethod
    def _check_hyper(cls, group: dict) -> None:
        super()._check_hyper(group)
        f = group["friction"]
        if not torch.is_tensor(f) and not (0.0 < float(f) <= 1.0):
            raise ValueError(f"friction must be in (0, 1], got {f}")


class PSGLD(_SGMCMC):
    r"""Preconditioned SGLD (Li, Chen, Carlson & Carin 2016), RMSprop preconditioner, without
    the Gamma correction term. Per element, with g the minibatch gradient (``.grad``) and V the
    state ``square_avg`` (zero at start)::

        V     <- alpha * V + (1 - alpha) * g^2
        G      = 1 / (eps + sqrt(V))
        theta <- theta - (lr / 2) * G * grad U + sqrt(lr * T * G) * xi

    Args as :class:`SGLD`, plus ``alpha`` in [0, 1) and ``eps`` > 0.
    """

    _op_name = "psgld_step_"
    _buffer = "square_avg"
    _extra = ("alpha", "eps")

    def __init__(self, params: Iterable, lr: float, num_data: int, alpha: float = 0.99, eps: float = 1e-5,
                 temperature: float = 1.0, prior_precision: float = 0.0, fused: bool | None = None,
                 nonfinite: str = "raise", generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, num_data=num_data, alpha=alpha, eps=eps, temperature=temperature,
                                      prior_precision=prior_precision), fused, nonfinite, generator)

    @classmethod
    def _check_hyper(cls, group: dict) -> None:
        super()._check_hyper(group)
        if not torch.is_tensor(group["alpha"]) and not (0.0 <= float(group["alpha"]) < 1.0):
            raise ValueError(f"alpha must be in [0, 1), got {group['alpha']}")
        _check_positive("eps", group["eps"])
