"""Post-hoc recalibration of logits: temperature scaling and vector scaling (Guo et al. 2017)."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .._warnings import warn_user
from ._checks import check_choice, check_int, check_logits, check_nonnegative_float, check_positive_float

__all__ = ["TemperatureScaling", "VectorScaling"]


def _separates(z: Tensor, y: Tensor) -> bool:
    """Every row's target logit is strictly the largest: then scaling the logits up drives the
    NLL to 0, and no finite temperature (or vector scale) minimises it."""
    zy = z.gather(1, y[:, None])
    others = z.scatter(1, y[:, None], float("-inf"))
    return bool((zy.squeeze(1) > others.amax(1)).all())


def _check_transform_input(logits) -> None:
    """transform() takes floating-point logits: integer ones would round the fitted scale to an
    integer (T = 1.5 read as 1, weights 0.9 as 0) and return wrong logits silently."""
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}; convert it with .float()")
    if logits.dim() == 0:
        raise ValueError("logits must be [..., C] (classes in the last dimension), got a 0-dim tensor")


class TemperatureScaling:
    """Temperature scaling (Guo et al. 2017): one scalar T > 0, softmax(logits / T), fitted by
    minimising the NLL on held-out data, with T kept in [t_min, t_max] (default [0.05, 20]).

    The NLL is convex in beta = 1/T, with derivative g(beta) = mean(E_p[z] - z_y) and second
    derivative mean(Var_p[z]) >= 0. So the minimiser over the range is at t_min when g is still
    <= 0 at beta = 1/t_min, at t_max when g is still >= 0 at beta = 1/t_max, and inside
    otherwise. Both ends are checked first; at an end the fit stops there (``at_bound`` says which)
    and a RuntimeWarning names the cause. The usual one at t_min: the logits separate the
    validation data (every target logit is the largest), so the NLL keeps falling as T -> 0 and
    has no finite minimiser; more or harder validation data is the cure. The default range allows
    a factor 20 either way on the logits the model was trained with; fitted temperatures of
    modern networks lie around 1 to 3 (Guo et al. 2017), so an optimum outside it points at the
    data rather than at the model.

    Inside the range: ``method='newton'`` takes damped Newton steps on beta (halved until the NLL
    does not increase, kept in the range); ``method='lbfgs'`` runs torch.optim.LBFGS on log T.
    Both run in float64 on the logits' device.

    Attributes: ``temperature`` (float64 scalar tensor, 1 before :meth:`fit`), ``n_iter`` (0 when
    the fit stopped at a bound), ``at_bound`` (None, 't_min' or 't_max'), ``converged`` (False,
    with a RuntimeWarning, when ``max_iter`` ran out before the ``tol`` test passed).

    Logits made under ``torch.inference_mode()`` are fine (the LBFGS fit differentiates copies).

    Args:
        method: 'newton' (default) or 'lbfgs'.  max_iter: iterations before the fit gives up
            (with a RuntimeWarning).  tol: the step (Newton, relative in beta) or NLL change
            (LBFGS) below which the fit has converged.  t_min, t_max: the range of T.
    """

    def __init__(self, method: str = "newton", max_iter: int = 100, tol: float = 1e-10, t_min: float = 0.05,
                 t_max: float = 20.0):
        self.method = check_choice(method, "method", ("newton", "lbfgs"))
        self.max_iter, self.tol = check_int(max_iter, "max_iter", 1), check_nonnegative_float(tol, "tol")
        self.t_min, self.t_max = check_positive_float(t_min, "t_min"), check_positive_float(t_max, "t_max")
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min must be < t_max, got t_min = {t_min}, t_max = {t_max}")
        self.temperature = torch.ones((), dtype=torch.float64)
        self.n_iter = 0
        self.at_bound: str | None = None
        self.converged = True

    @staticmethod
    def _nll(z: Tensor, zy: Tensor, beta: Tensor) -> Tensor:
        return (torch.logsumexp(beta * z, -1) - beta * zy).mean()

    @staticmethod
    def _grad(z: Tensor, zy: Tensor, beta: float) -> float:
        """d NLL / d beta = mean(E_p[z] - z_y) at p = softmax(beta z), summed as E_p[z - z_y] so that
        a saturated softmax keeps its tiny but non-zero slope (no cancellation)."""
        return float((torch.softmax(beta * z, -1) * (z - zy[:, None])).sum(-1).mean())

    def _bound(self, z: Tensor, zy: Tensor, y: Tensor) -> str | None:
        """Which end of [t_min, t_max] holds the constrained minimiser (None: inside); warns."""
        g_small_t, g_large_t = self._grad(z, zy, 1 / self.t_min), self._grad(z, zy, 1 / self.t_max)
        if g_small_t <= 0 <= g_large_t:  # g is non-decreasing in beta: zero on the whole range
            warn_user("TemperatureScaling: the NLL does not depend on T (every row's logits are equal); "
                      "keeping T = 1 (clamped to the range)", RuntimeWarning)
            return None
        if g_small_t <= 0:
            cause = ("the logits separate the validation data (every point's target logit is the largest), so "
                     "the NLL keeps falling as T -> 0 and has no finite minimiser; use more or harder validation "
                     "data (points the model gets wrong)" if _separates(z, y) else
                     "the NLL is still falling there, its minimiser lies below t_min (the logits are far too "
                     "small); lower t_min or check the logits")
            warn_user(f"TemperatureScaling: stopped at the bound T = t_min = {self.t_min:g}: {cause}",
                      RuntimeWarning)
            return "t_min"
        if g_large_t >= 0:
            warn_user(f"TemperatureScaling: stopped at the bound T = t_max = {self.t_max:g}: the NLL is still "
                      f"falling there, its minimiser lies above t_max (the logits carry little information "
                      f"about the targets, or are far too large); check that logits and targets belong "
                      f"together, or raise t_max", RuntimeWarning)
            return "t_max"
        return None

    def _fit_newton(self, z: Tensor, zy: Tensor) -> tuple[Tensor, int]:
        lo, hi = 1 / self.t_max, 1 / self.t_min  # the range of beta
        beta = torch.ones((), dtype=torch.float64, device=z.device).clamp(lo, hi)
        f = self._nll(z, zy, beta)
        it = 0
        for it in range(1, self.max_iter + 1):
            p = torch.softmax(beta * z, -1)
            d = (p * (z - zy[:, None])).sum(-1)  # E_p[z] - z_y without cancellation
            g = d.mean()
            h = (p * (z - zy[:, None] - d[:, None]) ** 2).sum(-1).mean()
            new = (beta - g / h.clamp_min(1e-300)).clamp(lo, hi)
            f_new = self._nll(z, zy, new)
            for _ in range(50):  # convex in beta: backtrack until no increase
                if bool(f_new <= f):
                    break
                new = (beta + new) / 2
                f_new = self._nll(z, zy, new)
            done = bool((new - beta).abs() <= self.tol * (1 + beta.abs()))
            beta, f = new, f_new
            if done:
                break
        self.converged = done
        return 1 / beta, it

    def _fit_lbfgs(self, z: Tensor, y: Tensor) -> tuple[Tensor, int]:
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        with torch.inference_mode(False), torch.enable_grad():  # the caller may be in either
            z, y = z.clone(), y.clone()  # normal tensors even when made under inference_mode
            log_t = torch.zeros((), dtype=torch.float64, device=z.device).clamp(lo, hi).requires_grad_()
            opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-12,
                                    tolerance_change=self.tol, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(z * torch.exp(-log_t), y)
                loss.backward()
                return loss

            opt.step(closure)  # the minimiser is inside the range (checked first): the clamp is a safeguard
        state = opt.state[log_t]
        n_iter = state["n_iter"]
        # converged: LBFGS stopped on its tolerances, not on its iteration or evaluation budget (it
        # also stops after max_eval = max_iter * 5 // 4 closure calls, with n_iter < max_iter)
        self.converged = n_iter < self.max_iter and state["func_evals"] < opt.param_groups[0]["max_eval"]
        return log_t.detach().clamp(lo, hi).exp(), n_iter

    def fit(self, logits: Tensor, targets: Tensor) -> "TemperatureScaling":
        """Fit T on logits [N, C] and integer targets [N]; returns self. Warns (RuntimeWarning)
        and stops when the minimiser is at t_min or t_max (see the class docstring)."""
        z, y = check_logits(logits, targets)
        zy = z.gather(1, y[:, None]).squeeze(1)
        self.at_bound = self._bound(z, zy, y)
        self.converged = True
        if self.at_bound is not None:
            t = self.t_min if self.at_bound == "t_min" else self.t_max
            self.temperature, self.n_iter = torch.tensor(t, dtype=torch.float64, device=z.device), 0
        elif self.method == "newton":
            self.temperature, self.n_iter = self._fit_newton(z, zy)
        else:
            self.temperature, self.n_iter = self._fit_lbfgs(z, y)
        if not self.converged:
            warn_user(f"TemperatureScaling: max_iter = {self.max_iter} iterations ran out before the fit converged "
                      f"(tol = {self.tol:g}); T = {float(self.temperature):.6g} may be off: raise max_iter",
                      RuntimeWarning)
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits [..., C] = logits / T (dtype and device of ``logits``)."""
        _check_transform_input(logits)
        return logits / self.temperature.to(device=logits.device, dtype=logits.dtype)


class VectorScaling:
    """Vector scaling (Guo et al. 2017): per-class scale w [C] and bias b [C], softmax(w * z + b),
    fitted by NLL with LBFGS in float64 on the logits' device (a convex problem). When the logits
    separate the validation data (every target logit is the largest) the NLL has no finite
    minimiser: the fit stops after ``max_iter`` with large weights and a RuntimeWarning.

    Attributes: ``weight`` [C], ``bias`` [C] (float64; None before :meth:`fit`).

    Args:
        max_iter: LBFGS iterations.  tol: the NLL change below which LBFGS stops.
    """

    def __init__(self, max_iter: int = 200, tol: float = 1e-12):
        self.max_iter, self.tol = check_int(max_iter, "max_iter", 1), check_nonnegative_float(tol, "tol")
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, logits: Tensor, targets: Tensor) -> "VectorScaling":
        """Fit on logits [N, C] and integer targets [N] in which every class occurs; returns self.

        A class absent from the targets is refused (ValueError naming it): its bias has no finite
        minimiser, the fit drives it towards -inf and the class would never be predicted again.
        Logits made under ``torch.inference_mode()`` are fine."""
        z, y = check_logits(logits, targets)
        C = z.shape[1]
        absent = (torch.bincount(y, minlength=C) == 0).nonzero().flatten().tolist()
        if absent:
            raise ValueError(f"targets never contain class(es) {absent[:10]}{' ...' if len(absent) > 10 else ''} "
                             f"of the C = {C}: vector scaling would drive their bias to -inf (no finite "
                             "minimiser) and never predict them again; fit on validation data holding every "
                             "class, or use TemperatureScaling (one T for all classes)")
        with torch.inference_mode(False), torch.enable_grad():  # the caller may be in either
            z, y = z.clone(), y.clone()  # normal tensors even when made under inference_mode
            w = torch.ones(C, dtype=torch.float64, device=z.device, requires_grad=True)
            b = torch.zeros(C, dtype=torch.float64, device=z.device, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-10,
                                    tolerance_change=self.tol, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(z * w + b, y)
                loss.backward()
                return loss

            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        if _separates(z, y):
            warn_user("VectorScaling: the logits separate the validation data (every point's target logit is "
                      "the largest), so the NLL keeps falling as the weights grow and has no finite minimiser; "
                      "the weights depend on max_iter. Use more or harder validation data (points the model "
                      "gets wrong), or TemperatureScaling, whose T is bounded", RuntimeWarning)
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits [..., C] = w * logits + b (dtype and device of ``logits``)."""
        if self.weight is None:
            raise RuntimeError("VectorScaling.transform() called before fit()")
        _check_transform_input(logits)
        if logits.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"logits has C = {logits.shape[-1]} classes but VectorScaling was fitted with "
                             f"C = {self.weight.shape[0]}; fit it on logits of the same classes")
        w = self.weight.to(device=logits.device, dtype=logits.dtype)
        return logits * w + self.bias.to(device=logits.device, dtype=logits.dtype)
