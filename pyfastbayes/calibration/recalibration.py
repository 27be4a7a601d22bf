"""Post-hoc recalibration of logits: temperature scaling and vector scaling (Guo et al. 2017)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ._checks import check_choice, check_int, check_logits

__all__ = ["TemperatureScaling", "VectorScaling"]


class TemperatureScaling:
    """Temperature scaling (Guo et al. 2017): one scalar T > 0, softmax(logits / T), fitted by
    minimising the NLL on held-out data.

    ``method='newton'``: the NLL is convex in beta = 1/T, with derivative mean(E_p[z] - z_y) and
    second derivative mean(Var_p[z]); damped Newton steps on beta (halved until the NLL does not
    increase, beta kept > 0). ``method='lbfgs'``: torch.optim.LBFGS on log T. Both run in float64
    on the logits' device.

    Attributes: ``temperature`` (float64 scalar tensor, 1 before :meth:`fit`), ``n_iter``.
    """

    def __init__(self, method: str = "newton", max_iter: int = 100, tol: float = 1e-10):
        self.method = check_choice(method, "method", ("newton", "lbfgs"))
        self.max_iter, self.tol = check_int(max_iter, "max_iter", 1), float(tol)
        self.temperature = torch.ones((), dtype=torch.float64)
        self.n_iter = 0

    @staticmethod
    def _nll(z: Tensor, zy: Tensor, beta: Tensor) -> Tensor:
        return (torch.logsumexp(beta * z, -1) - beta * zy).mean()

    def _fit_newton(self, z: Tensor, zy: Tensor) -> tuple[Tensor, int]:
        beta = torch.ones((), dtype=torch.float64, device=z.device)
        f = self._nll(z, zy, beta)
        it = 0
        for it in range(1, self.max_iter + 1):
            p = torch.softmax(beta * z, -1)
            ez = (p * z).sum(-1)
            g = (ez - zy).mean()
            h = (p * (z - ez[:, None]) ** 2).sum(-1).mean()
            step = g / h.clamp_min(1e-300)
            new = beta - step
            new = torch.where(new > 0, new, beta / 4)  # keep beta > 0
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
        return 1 / beta, it

    def _fit_lbfgs(self, z: Tensor, y: Tensor) -> tuple[Tensor, int]:
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-12,
                                tolerance_change=self.tol, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z * torch.exp(-log_t), y)
            loss.backward()
            return loss

        opt.step(closure)
        return log_t.detach().exp(), opt.state[log_t]["n_iter"]

    def fit(self, logits: Tensor, targets: Tensor) -> "TemperatureScaling":
        """Fit T on logits [N, C] and integer targets [N]; returns self."""
        z, y = check_logits(logits, targets)
        if self.method == "newton":
            zy = z.gather(1, y[:, None]).squeeze(1)
            self.temperature, self.n_iter = self._fit_newton(z, zy)
        else:
            self.temperature, self.n_iter = self._fit_lbfgs(z, y)
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits [..., C] = logits / T (dtype and device of ``logits``)."""
        return logits / self.temperature.to(device=logits.device, dtype=logits.dtype)


class VectorScaling:
    """Vector scaling (Guo et al. 2017): per-class scale w [C] and bias b [C], softmax(w * z + b),
    fitted by NLL with LBFGS in float64 on the logits' device (a convex problem).

    Attributes: ``weight`` [C], ``bias`` [C] (float64; None before :meth:`fit`).
    """

    def __init__(self, max_iter: int = 200, tol: float = 1e-12):
        self.max_iter, self.tol = check_int(max_iter, "max_iter", 1), float(tol)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, logits: Tensor, targets: Tensor) -> "VectorScaling":
        """Fit on logits [N, C] and integer targets [N]; returns self."""
        z, y = check_logits(logits, targets)
        C = z.shape[1]
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
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits [..., C] = w * logits + b (dtype and device of ``logits``)."""
        if self.weight is None:
            raise RuntimeError("VectorScaling.transform() called before fit()")
        if logits.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"logits has C = {logits.shape[-1]} classes but VectorScaling was fitted with "
                             f"C = {self.weight.shape[0]}; fit it on logits of the same classes")
        w = self.weight.to(device=logits.device, dtype=logits.dtype)
        return logits * w + self.bias.to(device=logits.device, dtype=logits.dtype)
