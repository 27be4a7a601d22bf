"""Heteroscedastic Gaussian regression in natural parameters (Immer et al. 2023, "Effective
Bayesian heteroscedastic regression with deep neural networks").

A network predicts, per input and target dimension d, a Gaussian N(mu, s2) through its natural
parameters eta1 = mu / s2 and eta2 = -1 / (2 s2) < 0, as outputs [N, 2D]: the D eta1 first, then
the D eta2. In these coordinates the negative log-likelihood

    nll(y; eta) = -eta1 y - eta2 y^2 - eta1^2 / (4 eta2) - log(-2 eta2) / 2 + log(2 pi) / 2

is convex in eta and its Hessian, the covariance of (y, y^2), does not depend on y: the exact GGN
of the network equals its Fisher (``pyfastbayes.ops.loss_hessian('gaussian_natural', ...)``).

- :class:`NaturalHead`: raw outputs [N, 2D] -> natural parameters, eta2 kept negative by a link.
- :class:`NaturalGaussianNLLLoss`: the NLL above, mean or summed over the N D targets; the loss
  the curvature operators (``pyfastbayes.curvature.ggn`` / ``fisher``) and
  ``Laplace(likelihood='heteroscedastic_regression')`` understand.
- :func:`natural_to_mean_var` / :func:`mean_var_to_natural`: the two parameterisations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NaturalHead", "NaturalGaussianNLLLoss", "natural_to_mean_var", "mean_var_to_natural",
           "check_natural", "natural_targets"]

LINKS = ("exp", "softplus")


class NotNatural(ValueError):
    """Outputs whose eta2 half is not < 0 (or NaN): not the natural parameters of a Gaussian."""


def check_natural(eta: Tensor, what: str = "the natural parameters") -> int:
    """D for natural parameters eta [N, 2D] whose second half (eta2) is < 0; ValueError otherwise
    (:class:`NotNatural` for the values; one host read of the check)."""
    if not torch.is_tensor(eta) or not eta.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor [N, 2D], got "
                        f"{type(eta).__name__ if not torch.is_tensor(eta) else eta.dtype}")
    if eta.dim() != 2 or eta.shape[1] < 2 or eta.shape[1] % 2:
        raise ValueError(f"{what} must be [N, 2D] (the D eta1 = mu / sigma^2, then the D eta2 = -1 / (2 sigma^2)), "
                         f"got shape {tuple(eta.shape)}")
    D = eta.shape[1] // 2
    if eta.shape[0] and not bool((eta[:, D:] < 0).all()):
        raise NotNatural(f"{what}: the second half of the columns, eta2 = -1 / (2 sigma^2), must be < 0 (and not "
                         "NaN); end the network with pyfastbayes.nn.NaturalHead, which keeps it negative")
    return D


def natural_targets(y: Tensor, eta: Tensor) -> Tensor:
    """Targets [N, D] (or [N] when D = 1) for natural parameters eta [N, 2D], as [N, D] of eta's
    dtype; ValueError for another shape or non-finite values."""
    N, D = eta.shape[0], eta.shape[1] // 2
    if not torch.is_tensor(y):
        raise TypeError(f"targets must be a tensor, got {type(y).__name__}")
    if y.dim() == 1 and D == 1:
        y = y.unsqueeze(1)
    if y.shape != (N, D):
        raise ValueError(f"targets must be [N, D] = {(N, D)} for natural parameters {tuple(eta.shape)} "
                         f"({'or [N] ' if D == 1 else ''}one value per target dimension), got {tuple(y.shape)}")
    y = y.to(device=eta.device, dtype=eta.dtype)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("regression targets contain NaN or infinity")
    return y


def natural_to_mean_var(eta: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, s2) [N, D] each from natural parameters eta [N, 2D]: s2 = -1 / (2 eta2), mu = eta1 s2."""
    D = eta.shape[-1] // 2
    s2 = -0.5 / eta[..., D:]
    return eta[..., :D] * s2, s2


def mean_var_to_natural(mu: Tensor, var: Tensor) -> Tensor:
    """Natural parameters [N, 2D] from means and variances [N, D]: (mu / var, -1 / (2 var))."""
    return torch.cat([mu / var, -0.5 / var], -1)


class NaturalHead(nn.Module):
    """Raw outputs [N, 2D] -> natural parameters [N, 2D]: eta1 = raw[:, :D] and
    eta2 = -link(raw[:, D:]) / 2, so that 1 / sigma^2 = link(raw[:, D:]) > 0 (``link='exp'``:
    raw[:, D:] is the log precision; ``'softplus'``: grows linearly, for wide output ranges).
    Put it last in the network: ``nn.Sequential(body, nn.Linear(h, 2 * D), NaturalHead())``."""

    def __init__(self, link: str = "exp"):
        super().__init__()
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        self.link = link

    def forward(self, raw: Tensor) -> Tensor:
        if raw.dim() < 1 or raw.shape[-1] % 2:
            raise ValueError(f"NaturalHead needs an even number of outputs 2D in the last dimension, got "
                             f"{tuple(raw.shape)}")
        D = raw.shape[-1] // 2
        prec = torch.exp(raw[..., D:]) if self.link == "exp" else F.softplus(raw[..., D:])
        return torch.cat([raw[..., :D], -0.5 * prec], -1)

    def extra_repr(self) -> str:
        return f"link={self.link!r}"


class NaturalGaussianNLLLoss(nn.Module):
    """Gaussian negative log-likelihood of targets y [N, D] (or [N] for D = 1) under natural
    parameters eta [N, 2D] (module docstring), with its constant log(2 pi) / 2; ``reduction``:
    'mean' over the N D targets (as ``nn.MSELoss`` and ``nn.GaussianNLLLoss``), 'sum' or 'none'
    ([N, D]). ValueError when eta2 >= 0 or the shapes do not match (one host read per call, as
    ``nn.GaussianNLLLoss``'s check of its variances)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, eta: Tensor, y: Tensor) -> Tensor:
        check_natural(eta, "NaturalGaussianNLLLoss's input")
        y = natural_targets(y, eta)
        nll = natural_nll(eta, y)
        return nll.mean() if self.reduction == "mean" else nll.sum() if self.reduction == "sum" else nll


def natural_nll(eta: Tensor, y: Tensor) -> Tensor:
    """The NLL [N, D] of targets y [N, D] under natural parameters eta [N, 2D] (no checks)."""
    D = eta.shape[-1] // 2
    eta1, eta2 = eta[..., :D], eta[..., D:]
    return -eta1 * y - eta2 * y.square() - eta1.square() / (4 * eta2) - 0.5 * torch.log(-2 * eta2) \
        + 0.5 * math.log(2 * math.pi)


def natural_gradient(eta: Tensor, y: Tensor) -> Tensor:
    """d nll / d eta [N, 2D] at targets y [N, D]: (mu - y, mu^2 + s2 - y^2)."""
    mu, s2 = natural_to_mean_var(eta)
    return torch.cat([mu - y, mu.square() + s2 - y.square()], -1)
