"""Online marginal-likelihood training (Immer et al. 2021, "Scalable marginal likelihood
estimation for model selection in deep learning"; laplace-torch's ``marglik_training``): train the
network and its prior precision together, so the MAP is regularised by the prior the evidence
prefers and the Laplace posterior around it is consistent with that prior.

Why it matters: post-hoc Laplace on a network trained with a hand-picked weight decay can be
badly calibrated. Where the trained network is confidently right, the per-example GGN
p(1 - p) -> 0, so the curvature vanishes in most directions and the posterior falls back to the
prior there; when that prior is broad compared with the scale the weights were regularised to,
the predictive variance swamps the logits (test NLL several times the MAP's on the 8x8 digits),
and marginal-likelihood tuning after the fact cannot repair a MAP that was trained under another
prior. Training both together avoids the mismatch.

Each epoch: minibatch steps of ``optimizer`` on the negative log joint
(mean NLL + delta |theta|^2 / (2 N), delta per block); every ``marglik_frequency`` epochs after
``n_epochs_burnin``: a Laplace fit (KFAC by default: a fraction of an epoch here) and
``n_hypersteps`` Adam steps on log delta maximising the log marginal likelihood.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.gaussian import natural_nll, natural_targets
from ..nn.loaders import batches
from ..nn.inputs import model_output
from ..nn.rows import rows_to
from ..calibration._checks import check_int
from .laplace import Laplace
from .marglik import PRIOR_STRUCTURES


def marglik_training(model: nn.Module, train_loader, likelihood: str = "classification", *,
                     hessian_structure: str = "kron", prior_structure: str = "layerwise", n_epochs: int = 100,
                     lr: float = 1e-3, lr_hyp: float = 0.1, n_epochs_burnin: int = 0, marglik_frequency: int = 1,
                     n_hypersteps: int = 10, prior_precision: float = 1.0, sigma_noise: float = 1.0,
                     optimizer_cls=torch.optim.Adam, keep_best: bool = True, progress: bool = True,
                     **laplace_kwargs) -> tuple[Laplace, list[float]]:
    """Train ``model`` in place with its prior precision (and regression noise) learnt by the
    marginal likelihood; laplace-torch's ``marglik_training`` schedule.

    Args:
        model: the network (trained in place).  train_loader: re-iterable (inputs, targets) batches.
        likelihood: as :class:`Laplace` ('classification', 'binary'; 'regression' learns
            sigma_noise too; 'heteroscedastic_regression': the model outputs natural parameters
            [N, 2D], e.g. ending in :class:`pyfastbayes.nn.NaturalHead`, and learns the noise itself).
        hessian_structure: the Laplace used for the evidence ('kron' default, 'diag', 'full').
        prior_structure: 'scalar' or 'layerwise' (one delta per block; 'diag' for diag/full).
        n_epochs, lr, optimizer_cls: the network's training (mean NLL + T delta |theta - prior_mean|^2
            / (2 N): the mode of the returned Laplace's posterior, whose log density is the log
            likelihood / T plus the log prior; ``temperature`` and ``prior_mean`` come with
            ``laplace_kwargs``. laplace-torch divides by T instead: the same for T = 1).
        lr_hyp, n_hypersteps: one Adam optimiser on log delta (and log sigma) for the whole run,
            ``n_hypersteps`` steps per update.  n_epochs_burnin, marglik_frequency: when to update.
        prior_precision, sigma_noise: the initial values.  keep_best: end with the weights and
            hyper-parameters of the update with the highest marginal likelihood (laplace-torch's
            choice); False keeps the last.  progress: a tqdm bar over the epochs.
        laplace_kwargs: passed to :class:`Laplace`.

    Returns:
        (the Laplace fitted at the returned weights with the learnt prior, the log marginal
        likelihood after every update). The network trains in train mode, the Laplace fits in eval
        mode; every module's mode is then put back as it was at the call (laplace-torch leaves eval).
    """
    if prior_structure not in PRIOR_STRUCTURES:
        raise ValueError(f"prior_structure must be one of {PRIOR_STRUCTURES}, got {prior_structure!r}")
    n_epochs = check_int(n_epochs, "n_epochs", 1)
    marglik_frequency = check_int(marglik_frequency, "marglik_frequency", 1)
    n_epochs_burnin = check_int(n_epochs_burnin, "n_epochs_burnin", 0)
    n_hypersteps = check_int(n_hypersteps, "n_hypersteps", 1)
    la = Laplace(model, likelihood, hessian_structure=hessian_structure, prior_precision=prior_precision,
                 sigma_noise=sigma_noise, **laplace_kwargs)
    if la.subset_of_weights != "all":
        raise ValueError("marglik_training learns the prior of all weights: subset_of_weights must be 'all'")
    if prior_structure == "diag" and hessian_structure == "kron":
        raise ValueError("prior_structure='diag' does not fit hessian_structure='kron': use 'scalar' or 'layerwise'")
    if prior_structure != "scalar" and hessian_structure == "lowrank":  # before any epoch changes the weights
        raise ValueError(f"hessian_structure='lowrank' learns one scalar prior: use prior_structure='scalar' (got "
                         f"{prior_structure!r}, the default 'layerwise')")
    if torch.is_tensor(prior_precision) and prior_precision.numel() != 1:
        raise ValueError("prior_precision of marglik_training is the initial value of every learnt prior: one "
                         f"number > 0, got a tensor of shape {tuple(prior_precision.shape)}")
    if isinstance(train_loader, Iterator):
        raise TypeError("train_loader is a one-shot iterator (e.g. a generator): every epoch walks the data again, "
                        "pass a list of (inputs, targets) batches or a DataLoader")
    size = {"scalar": 1, "layerwise": len(la.blocks), "diag": la.n_params}[prior_structure]
    log_prior = torch.full((size,), math.log(float(prior_precision)), dtype=la.dtype, device=la.device)
    log_sigma = torch.full((), math.log(float(sigma_noise)), dtype=la.dtype, device=la.device)
    hyper = [log_prior] + ([log_sigma] if likelihood == "regression" else [])
    for t in hyper:
        t.requires_grad_(True)
    hyper_opt = torch.optim.Adam(hyper, lr=lr_hyp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_cls(params, lr=lr)
    # (inputs, targets) pairs or dict batches (the whole dict to the model, targets under dict_key_y)
    n = sum(int(la._split(item, i)[1].shape[0]) for i, item in enumerate(batches(train_loader)))
    if n == 0:
        raise ValueError("train_loader yielded no rows")
    prior_mean = la.prior_mean.detach()
    modes = [m.training for m in model.modules()]
    margliks: list[float] = []
    best = None
    for epoch in tqdm(range(1, n_epochs + 1), desc="marglik training", leave=False, disable=not progress):
        model.train()
        delta = la._delta(log_prior.detach().exp())
        sigma2 = log_sigma.detach().exp().square()
        for i, item in enumerate(batches(train_loader)):
            x, y = la._split(item, i)
            x, y = rows_to(x, la.device), y.to(la.device)
            opt.zero_grad()
            nll = _mean_nll(model_output(model(x), la.output_fn), y, la._fit_likelihood, sigma2)
            theta = torch.cat([p.reshape(-1) for p in params])
            # the mode of la's posterior (log likelihood / T + log prior): mean NLL + T delta
            # |theta - prior_mean|^2 / (2 N); laplace-torch divides by T instead, which trains
            # towards another point than the Laplace it returns for T != 1
            (nll + 0.5 * (delta * (theta - prior_mean).square()).sum() * la.temperature / n).backward()
            opt.step()
        if epoch < n_epochs_burnin or epoch % marglik_frequency:
            continue
        model.eval()
        la.prior_precision = log_prior.detach().exp()
        la.sigma_noise = log_sigma.detach().exp()
        la.fit(train_loader, progress=False)
        for _ in range(n_hypersteps):
            hyper_opt.zero_grad()
            (-la._lml(log_prior.exp(), log_sigma.exp())).backward()
            hyper_opt.step()
        with torch.no_grad():
            value = float(la._lml(log_prior.exp(), log_sigma.exp()))
        margliks.append(value)
        if keep_best and (best is None or value > best[0]):
            best = (value, copy.deepcopy(model.state_dict()), log_prior.detach().clone(), log_sigma.detach().clone())
    if best is not None:
        model.load_state_dict(best[1])
        log_prior, log_sigma = best[2], best[3]
    model.eval()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()
    la.fit(train_loader, progress=False)
    for m, was in zip(model.modules(), modes):  # the caller's train / eval modes, module by module
        m.training = was
    return la, margliks


def _mean_nll(f, y, likelihood: str, sigma2):
    if likelihood == "classification":
        return nn.functional.cross_entropy(f, y)
    if likelihood == "binary":
        return nn.functional.binary_cross_entropy_with_logits(f.reshape(-1), y.reshape(-1).to(f.dtype))
    if likelihood == "heteroscedastic_regression":  # the summed Gaussian NLL of a row, averaged over rows
        return natural_nll(f, natural_targets(y, f)).sum(1).mean()
    return 0.5 * (f - y.reshape(f.shape)).square().sum(1).mean() / sigma2
