"""From the GLM predictive's logit moments (f_mu [N, C], f_var [N, C, C]) to class probabilities.

- 'probit': softmax(f_mu / sqrt(1 + pi/8 diag(f_var))) (MacKay 1992; Gibbs 1997), one pass.
- 'bridge': the Laplace bridge to a Dirichlet (Hobbhahn et al. 2022), after the zero-mean
  correction of the logits (laplace-torch's 'bridge'); 'bridge_norm' adds its variance
  normalisation. Computed in logs, the corrected variances floored at their rounding level
  (probabilities stay in [0, 1] for variances near 0).
- 'mc': mean of softmax over n_samples draws f ~ N(f_mu, f_var) (Cholesky of f_var, a tiny jitter
  relative to its diagonal when it is singular).
For likelihood='binary' (C = 1) probit gives sigmoid(f / sqrt(1 + pi/8 var)) and mc the mean
sigmoid; the result is [N], the probability of class 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LINKS = ("probit", "bridge", "bridge_norm", "mc")


def probabilities(f_mu: Tensor, f_var: Tensor, likelihood: str, link_approx: str, n_samples: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Class probabilities [N, C] ('classification') or P(y = 1) [N] ('binary'); see module docstring."""
    if link_approx not in LINKS:
        raise ValueError(f"link_approx must be one of {LINKS}, got {link_approx!r}")
    var = torch.diagonal(f_var, dim1=1, dim2=2)
    if likelihood == "binary":
        if link_approx == "probit":
            return torch.sigmoid(f_mu[:, 0] / torch.sqrt(1 + math.pi / 8 * var[:, 0]))
        if link_approx != "mc":
            raise ValueError(f"link_approx={link_approx!r} needs C >= 2 classes; for likelihood='binary' use 'probit' "
                             "or 'mc'")
        return draws(f_mu, f_var, n_samples, generator).sigmoid().mean(0)[:, 0]
    if link_approx == "probit":
        return torch.softmax(f_mu / torch.sqrt(1 + math.pi / 8 * var), -1)
    if link_approx == "mc":
        return draws(f_mu, f_var, n_samples, generator).softmax(-1).mean(0)
    return _bridge(f_mu, f_var, normalise=link_approx == "bridge_norm")


def draws(f_mu: Tensor, f_var: Tensor, n: int, generator) -> Tensor:
    """n draws [n, N, C] of N(f_mu, f_var)."""
    C = f_mu.shape[1]
    scale = torch.diagonal(f_var, dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(f_var.dtype).tiny)
    eye = torch.eye(C, dtype=f_var.dtype, device=f_var.device)
    L, info = torch.linalg.cholesky_ex(f_var)
    jitter = 1e-10
    while bool((info != 0).any()) and jitter < 1:
        L, info = torch.linalg.cholesky_ex(f_var + jitter * scale[:, None, None] * eye)
        jitter *= 100
    z = torch.randn(n, *f_mu.shape, dtype=f_mu.dtype, device=f_mu.device, generator=generator)
    return f_mu + torch.einsum("nij,snj->sni", L, z)


def _bridge(f_mu: Tensor, f_var: Tensor, normalise: bool) -> Tensor:
    K = f_mu.shape[-1]
    eps = torch.finfo(f_var.dtype)
    # f_var + delta I, delta at f_var's rounding level (eps times its trace): a singular f_var (one
    # output varies, e.g. a subnetwork of one last-layer weight) has a zero-mean-corrected diagonal
    # of exactly 0, where the answer was decided by the floors' ratio (1e-293 for a plausible class);
    # with delta I it is the limit of f_var + c I as c -> 0, continuous in f_var
    delta = (eps.eps * torch.diagonal(f_var, dim1=1, dim2=2).abs().sum(-1)).clamp_min(eps.tiny)
    f_var = f_var + delta[:, None, None] * torch.eye(K, dtype=f_var.dtype, device=f_var.device)
    total = f_var.sum((1, 2)).clamp_min(eps.tiny)
    row = f_var.sum(-1)
    mu = f_mu - row * f_mu.sum(-1, keepdim=True) / total[:, None]
    var = f_var - torch.einsum("bi,bj->bij", row, f_var.sum(-2)) / total[:, None, None]
    # d, the diagonal of the zero-mean-corrected covariance f_var_kk - row_k^2 / total, is >= 0
    # mathematically (>= delta (1 - 1/K) with the delta I above), but the subtraction cancels: a
    # posterior near its MAP (variances ~1e-9) left d <= 0, i.e. negative or NaN "probabilities"
    # (laplace-torch's formula does the same). It is floored at half delta's share.
    floor = (0.5 * delta * (1 - 1 / K)).clamp_min(eps.tiny)[:, None]
    d = torch.maximum(torch.diagonal(var, dim1=1, dim2=2), floor)
    if normalise:
        m = d.mean(1) / math.sqrt(K / 2)
        mu = mu / m.sqrt()[:, None]
        d = d / m[:, None]
    # alpha_k = (1 - 2/K + e^mu_k sum_j e^-mu_j / K^2) / d_k, normalised, in logs (e^mu overflows
    # float32 beyond a logit range of ~88)
    lse = mu + torch.logsumexp(-mu, 1, keepdim=True)
    base = torch.log(torch.tensor(1 - 2 / K, dtype=mu.dtype, device=mu.device))  # -inf for K = 2
    log_num = torch.logaddexp(base.expand_as(lse), lse - 2 * math.log(K))
    return torch.softmax(log_num - torch.log(d), 1)
