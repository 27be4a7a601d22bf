"""Small data sets and closed-form posteriors used by the demo and the tests."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_regression_data", "blr_posterior"]


def linear_regression_data(n: int = 50, d: int = 3, noise_std: float = 1.0, seed: int = 0,
                           dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """y = X w + eps, eps ~ N(0, noise_std^2): returns X [n, d], y [n], the true w [d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, generator=g, dtype=dtype)
    y = x @ w + noise_std * torch.randn(n, generator=g, dtype=dtype)
    return x, y, w


def blr_posterior(x: Tensor, y: Tensor, noise_var: float, prior_precision: float) -> tuple[Tensor, Tensor]:
    """Exact posterior of Bayesian linear regression with prior w ~ N(0, I / prior_precision).

    Args: x [N, D], y [N].  Returns (mean [D], covariance [D, D]):
    Sigma = (X^T X / noise_var + prior_precision I)^-1, mu = Sigma X^T y / noise_var.
    """
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, D] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if noise_var <= 0 or prior_precision < 0:
        raise ValueError("noise_var must be > 0 and prior_precision >= 0")
    precision = x.T @ x / noise_var + prior_precision * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    cov = torch.linalg.inv(precision)
    cov = 0.5 * (cov + cov.T)
    return cov @ (x.T @ y) / noise_var, cov
