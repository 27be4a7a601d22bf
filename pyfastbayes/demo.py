"""``python -m pyfastbayes demo``: the whole workflow on small embedded data, in about a minute.

Part 1, the lecture's Bayesian linear regression: SGLD and SGHMC against the exact posterior, and
the split of the predictive variance into aleatoric (noise) and epistemic (weights) parts.
Part 2, sklearn's 8x8 digits (no download): a MAP network and every posterior method of the
package, evaluated in distribution, under a shift (rotated, noisy digits) and out of distribution
(digits of held-out classes). The SG-MCMC samplers' temperature (and SGLD's prior) is chosen on
the validation split, with the T = 1 Bayes posterior kept as labelled reference rows, and the
mixing of the chains is measured (R-hat, ESS). Then the loss-landscape pictures of
``demo_landscape.py`` (mode connectivity, SWA in the plane of the SGD iterates, skip connections).
Writes a report folder with the pictures, the table, the sweep and the mixing numbers.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import optim
from .bma import SampleBuffer
from .data import blr_posterior

# ------------------------------------------------------------------------------------------
# part 1: Bayesian linear regression
# ------------------------------------------------------------------------------------------
BLR_NOISE, BLR_ALPHA = 0.3, 1.0


def _features(x: Tensor) -> Tensor:
    return torch.stack([torch.ones_like(x), x], dim=-1)  # [.., 2]: bias and slope


def _blr_chains(make_opt, phi: Tensor, y: Tensor, lr: float, burn_in: int, spacing: int, snapshots: int,
                chains: int, progress: bool) -> Tensor:
    """Run `chains` independent chains as the rows of one parameter; returns draws [S, 2]."""
    n = phi.shape[0]
    ptp, pty = phi.T @ phi, phi.T @ y
    w = nn.Parameter(torch.zeros(chains, phi.shape[1], dtype=phi.dtype))
    opt = make_opt([w], lr)
    draws = []
    steps = range(burn_in + spacing * snapshots)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="  chains", leave=False)
    for t in steps:
        w.grad = (w.detach() @ ptp - pty) / (n * BLR_NOISE**2)  # gradient of the mean NLL
        opt.step()
        if t >= burn_in and (t - burn_in + 1) % spacing == 0:
            draws.append(w.detach().clone())
    return torch.cat(draws)


def regression_demo(out: str, quick: bool, seed: int, progress: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = 40
    x = 2 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    w_true = torch.tensor([0.5, 1.2], dtype=torch.float64)
    phi = _features(x)
    y = phi @ w_true + BLR_NOISE * torch.randn(n, generator=g, dtype=torch.float64)
    mean, cov = blr_posterior(phi, y, BLR_NOISE**2, BLR_ALPHA)
    lam = torch.linalg.eigvalsh(torch.linalg.inv(cov))
    lmin, lmax = lam.min().item(), lam.max().item()
    chains = 200 if quick else 1000
    h = 0.05 / lmax
    spacing = math.ceil(3 / (h * lmin / 2))
    burn = math.ceil(8 / (h * lmin / 2))
    torch.manual_seed(seed)
    draws = {
        "SGLD": _blr_chains(lambda p, lr: optim.SGLD(p, lr=lr, num_data=n, prior_precision=BLR_ALPHA),
                            phi, y, h, burn, spacing, 5, chains, progress),
        "SGHMC": _blr_chains(lambda p, lr: optim.SGHMC(p, lr=lr, num_data=n, friction=0.1,
                                                       prior_precision=BLR_ALPHA),
                             phi, y, 0.02 / lmax, 400, 100, 5, chains, progress),
    }
    print("\nBayesian linear regression y = w0 + w1 x + eps, eps ~ N(0, %.2f^2), prior w ~ N(0, I)" % BLR_NOISE)
    print(f"  {'':4} {'exact mean':>11} {'SGLD':>8} {'SGHMC':>8} | {'exact std':>10} {'SGLD':>8} {'SGHMC':>8}")
    for i, name in enumerate(["w0", "w1"]):
        print(f"  {name:4} {mean[i].item():11.4f} {draws['SGLD'][:, i].mean().item():8.4f} "
              f"{draws['SGHMC'][:, i].mean().item():8.4f} | {cov[i, i].sqrt().item():10.4f} "
              f"{draws['SGLD'][:, i].std().item():8.4f} {draws['SGHMC'][:, i].std().item():8.4f}")
    print("  predictive variance = aleatoric (noise) + epistemic (weights) at x*:")
    split = []
    for xs in [0.0, 2.0, 4.0]:
        f = _features(torch.tensor(xs, dtype=torch.float64))
        epi_exact = (f @ cov @ f).item()
        epi_sgld = (draws["SGLD"] @ f).var().item()
        split.append({"x": xs, "aleatoric": BLR_NOISE**2, "epistemic_exact": epi_exact, "epistemic_sgld": epi_sgld})
        print(f"    x* = {xs:3.1f}: aleatoric {BLR_NOISE**2:.4f}  epistemic exact {epi_exact:.4f}  SGLD {epi_sgld:.4f}")
    path = os.path.join(out, "regression_predictive.png")
    _plot_regression(x, y, mean, cov, draws["SGLD"], path)
    print(f"  picture: {path}")
    return {"posterior_mean": mean.tolist(), "posterior_std": cov.diag().sqrt().tolist(),
            "sgld_mean": draws["SGLD"].mean(0).tolist(), "sgld_std": draws["SGLD"].std(0).tolist(),
            "sghmc_mean": draws["SGHMC"].mean(0).tolist(), "sghmc_std": draws["SGHMC"].std(0).tolist(),
            "variance_split": split}


def _plot_regression(x, y, mean, cov, draws, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-4, 4, 200, dtype=torch.float64)
    f = _features(grid)
    fs = draws @ f.T  # [S, G] predictive means of the draws
    mu = fs.mean(0)
    epi = fs.var(0)
    exact_mu = f @ mean
    exact_epi = ((f @ cov) * f).sum(-1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(grid, mu - 2 * (epi + BLR_NOISE**2).sqrt(), mu + 2 * (epi + BLR_NOISE**2).sqrt(),
                    color="tab:orange", alpha=0.25, label="±2σ predictive (aleatoric + epistemic)")
    ax.fill_between(grid, mu - 2 * epi.sqrt(), mu + 2 * epi.sqrt(), color="tab:blue", alpha=0.35,
                    label="±2σ epistemic (SGLD draws)")
    ax.plot(grid, mu, color="tab:blue", lw=2, label="BMA mean (SGLD)")
    ax.plot(grid, exact_mu, "k--", lw=1, label="exact posterior mean")
    ax.plot(grid, exact_mu + 2 * exact_epi.sqrt(), "k:", lw=1, label="exact ±2σ epistemic")
    ax.plot(grid, exact_mu - 2 * exact_epi.sqrt(), "k:", lw=1)
    ax.scatter(x, y, s=14, color="k", zorder=3, label="data")
    ax.axvspan(-1, 1, color="grey", alpha=0.08)
    ax.set(xlabel="x", ylabel="y", title="Epistemic uncertainty grows away from the data; aleatoric stays constant")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# part 2: digits classification, every posterior method
# ------------------------------------------------------------------------------------------
ID_CLASSES = 8  # digits 0..7 in distribution; 8 and 9 held out as out-of-distribution inputs


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    x_shift: Tensor  # the test digits rotated and noisy
    x_ood: Tensor  # digits 8 and 9
    meta: dict = field(default_factory=dict)


def _rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate [N, 8, 8] images by per-image angles (bilinear, zero padding)."""
    th = degrees * math.pi / 180
    cos, sin = th.cos(), th.sin()
    mat = torch.stack([torch.stack([cos, -sin, torch.zeros_like(th)], -1),
                       torch.stack([sin, cos, torch.zeros_like(th)], -1)], 1)
    grid = nn.functional.affine_grid(mat, (images.shape[0], 1, 8, 8), align_corners=False)
    return nn.functional.grid_sample(images[:, None], grid, align_corners=False)[:, 0]


def load_digit_sets(seed: int, device: str) -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(y < ID_CLASSES).squeeze(1)
    idx = idx[torch.randperm(len(idx), generator=g)]
    n_train, n_val = int(0.6 * len(idx)), int(0.15 * len(idx))
    tr, va, te = idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]
    angles = (torch.rand(len(te), generator=g) * 2 - 1) * 35
    shifted = _rotate(x[te].view(-1, 8, 8), angles).reshape(-1, 64)
    shifted = (shifted + 0.15 * torch.randn(shifted.shape, generator=g)).clamp(0, 1)
    dev = torch.device(device)
    return Digits(x[tr].to(dev), y[tr].to(dev), x[va].to(dev), y[va].to(dev), x[te].to(dev), y[te].to(dev),
                  shifted.to(dev), x[y >= ID_CLASSES].to(dev),
                  {"train": len(tr), "val": len(va), "test": len(te), "ood": int((y >= ID_CLASSES).sum())})


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, ID_CLASSES))


def _epochs(n: int, desc: str, progress: bool):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(range(n), desc=f"  {desc}", leave=False)
    return range(n)


PRIOR_PRECISION = 1.0
BATCH = 64


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: Digits, epochs: int, seed: int, desc: str,
           progress: bool, prior_in_loss: bool, before_step=None, after_step=None, after_epoch=None) -> None:
    """Minibatch epochs over the training set. The loss is the mean NLL (the samplers' convention)
    plus, with ``prior_in_loss``, the Gaussian prior as weight decay prior_precision / (2 N) |theta|^2
    (the optimisers that do not add the prior themselves). Hooks get the global step index."""
    n = len(data.y_train)
    g = torch.Generator().manual_seed(seed)
    t = 0
    for epoch in _epochs(epochs, desc, progress):
        for b in torch.randperm(n, generator=g).to(data.x_train.device).split(BATCH):
            if before_step is not None:
                before_step(t, epoch)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[b]), data.y_train[b])
            if prior_in_loss:
                loss = loss + PRIOR_PRECISION / (2 * n) * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(t, epoch)
            t += 1
        if after_epoch is not None:
            after_epoch(epoch)


def train_map(data: Digits, epochs: int, seed: int, progress: bool) -> nn.Module:
    """MAP network: Adam on the mean NLL plus the prior's weight decay."""
    model = make_mlp(seed).to(data.x_train.device)
    _train(model, torch.optim.Adam(model.parameters(), lr=3e-3), data, epochs, seed, "MAP (Adam)", progress,
           prior_in_loss=True)
    return model


# SG-MCMC settings chosen on the validation split, the way temperature scaling is fitted: each
# method runs one chain per (prior, temperature) of its sweep from the MAP, the setting with the
# lowest validation NLL gets MCMC_CHAINS - 1 more chains (R-hat over all of them, the row averages
# all their draws); T = 1 under the MAP's prior gets as many chains and stays in the table as the
# reference row of the Bayes posterior (the cold-posterior evidence). The sweep's chains share one
# minibatch order and noise seed (common random numbers: the differences are the settings');
# chain k of a setting has its own order and noise.
SWEEP_TEMPERATURES = (1.0, 0.3, 0.1, 0.03)
MCMC_CHAINS = 4
FAN_IN_SCALE = 10.0  # SGLD's second prior: N(0, FAN_IN_SCALE / fan_in) per layer (pyfastbayes.priors)
ISO_PRIOR = f"N(0,{1 / PRIOR_PRECISION:g})"  # the MAP's prior, every weight and bias
FAN_IN_PRIOR = f"N(0,{FAN_IN_SCALE:g}/fan_in)"
SWEEP_PRIORS = {"SGLD": (ISO_PRIOR, FAN_IN_PRIOR), "cSGLD": (ISO_PRIOR,), "pSGLD": (ISO_PRIOR,), "SGHMC": (ISO_PRIOR,)}


def prior_groups(prior: str, model: nn.Module) -> list[dict]:
    """Sampler param groups of ``model`` for a prior of the sweep (``ISO_PRIOR`` or ``FAN_IN_PRIOR``)."""
    from .priors import scaled_groups

    if prior == ISO_PRIOR:
        return [{"params": list(model.parameters()), "prior_precision": PRIOR_PRECISION}]
    if prior == FAN_IN_PRIOR:
        return scaled_groups(model, FAN_IN_SCALE)  # weights N(0, s / fan_in), biases N(0, s)
    raise ValueError(f"unknown prior {prior!r}")


def run_sampler(name: str, map_model: nn.Module, data: Digits, epochs: int, seed: int, progress: bool,
                samples: int, temperature: float = 1.0, prior: str = ISO_PRIOR, chain: int = 0) -> SampleBuffer:
    """SG-MCMC from the MAP with minibatches at ``temperature`` under ``prior``; the last
    `samples` epochs each keep one draw (cSGLD: draws are kept twice per epoch in the sampling
    phase of each cycle, the newest `samples` stay). ``chain`` picks the minibatch order and noise."""
    import copy

    model = copy.deepcopy(map_model)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / BATCH)
    groups = prior_groups(prior, model)
    kw = dict(num_data=n, temperature=temperature)
    schedule = None
    if name == "SGLD":
        opt = optim.SGLD(groups, lr=5e-5, **kw)  # small: minibatch noise << injected noise
    elif name == "pSGLD":
        opt = optim.PSGLD(groups, lr=5e-7, eps=1e-3, **kw)  # G ~ 1/|g|: lr N / 2 ~ the step
    elif name == "SGHMC":
        opt = optim.SGHMC(groups, lr=1e-6, friction=0.05, **kw)  # lr / friction ~ SGLD lr
    elif name == "cSGLD":
        opt = optim.SGLD(groups, lr=4e-4, **kw)
        schedule = optim.CyclicalSchedule(epochs * steps_per_epoch, n_cycles=4, lr_max=4e-4, explore_fraction=0.7)
    else:
        raise ValueError(name)
    buf = SampleBuffer(model, max_samples=samples)
    chain_seed = seed + 1 + 1000 * chain
    torch.manual_seed(chain_seed)
    desc = f"{name} T={temperature:g} {prior} chain {chain}"
    if schedule is not None:
        sampling = {}

        def before(t, epoch):
            sampling["now"] = schedule.apply(opt, t)

        def after(t, epoch):
            if sampling["now"] and (t + 1) % max(1, steps_per_epoch // 2) == 0:
                buf.collect()

        _train(model, opt, data, epochs, chain_seed, desc, progress, False, before_step=before, after_step=after)
    else:
        _train(model, opt, data, epochs, chain_seed, desc, progress, False,
               after_epoch=lambda epoch: buf.collect() if epoch >= epochs - samples else None)
    return buf


@dataclass
class Chain:
    """One SG-MCMC chain, evaluated draw by draw on the validation, test, shifted and OOD inputs."""

    probs: Tensor  # [S, M, C] predictive probabilities of each draw on data's eval inputs
    tracked: Tensor  # [S, K] per draw: the TRACKED log-likelihoods, then the _tracked_weights
    time_s: float


def _eval_inputs(data: Digits) -> tuple[Tensor, dict[str, slice]]:
    """The validation, test, shifted and OOD inputs stacked, and each set's rows."""
    sets = {"val": data.x_val, "test": data.x_test, "shift": data.x_shift, "ood": data.x_ood}
    rows, start = {}, 0
    for k, v in sets.items():
        rows[k] = slice(start, start + len(v))
        start += len(v)
    return torch.cat(list(sets.values())), rows


def _tracked_weights(map_model: nn.Module) -> list[tuple[str, int]]:
    """(name, flat index) of the largest-magnitude MAP weight of each weight matrix: scalars of the
    chain that the data constrain (a corner pixel's weights, always multiplied by 0, would not)."""
    from .nn import ParamLayout

    layout = ParamLayout(map_model)
    out = []
    for name, offset, p in zip(layout.names, layout.offsets, [p for _, p in map_model.named_parameters()]):
        if p.dim() == 2:
            i = int(p.detach().abs().argmax())
            out.append((f"w[{name}{list(divmod(i, p.shape[1]))}]", offset + i))
    return out


TRACKED = ("test log-lik", "shift log-lik")  # + the tracked weights


def run_chain(name: str, map_model: nn.Module, data: Digits, epochs: int, seed: int, progress: bool, samples: int,
              temperature: float, prior: str, chain: int) -> Chain:
    """Run one chain and evaluate every stored draw: probabilities on the eval inputs, the mean
    log-likelihood of the test and shifted sets per draw and the tracked weights per draw."""
    from .nn.stateless import functional_call

    t = time.perf_counter()
    buf = run_sampler(name, map_model, data, epochs, seed, progress, samples, temperature, prior, chain)
    x, rows = _eval_inputs(data)
    model = buf.model
    with torch.no_grad():
        probs = torch.stack([functional_call(model, buf.params_of(i), (x,)).softmax(-1) for i in range(len(buf))])
    y = data.y_test[None, :, None].expand(len(probs), -1, 1)
    loglik = [probs[:, rows[k]].gather(-1, y).squeeze(-1).clamp_min(1e-12).log().mean(1) for k in ("test", "shift")]
    weights = buf.stored()[:, [i for _, i in _tracked_weights(map_model)]].to(probs.dtype)
    return Chain(probs, torch.cat([torch.stack(loglik, 1), weights], 1), time.perf_counter() - t)


def _chain_probs(chains: list[Chain], data: Digits) -> dict[str, Tensor]:
    """The Bayesian model average over every draw of ``chains``, split into the eval sets."""
    _, rows = _eval_inputs(data)
    p = torch.cat([c.probs for c in chains]).mean(0)
    return {k: p[r] for k, r in rows.items()}


def mixing(chains: list[Chain], names: list[str]) -> dict:
    """Rank-normalised split R-hat and bulk ESS of each tracked scalar over the chains (the
    newest common number of draws of each chain)."""
    from .diagnostics import ess, rhat

    s = min(len(c.tracked) for c in chains)
    x = torch.stack([c.tracked[-s:] for c in chains]).double()  # [chains, draws, K]
    r, e = rhat(x), ess(x, "bulk")
    return {"chains": len(chains), "draws_per_chain": s,
            "rhat": {n: float(v) for n, v in zip(names, r)}, "ess_bulk": {n: float(v) for n, v in zip(names, e)}}


def sgmcmc_sweep(name: str, map_model: nn.Module, data: Digits, epochs: int, seed: int, progress: bool,
                 samples: int) -> dict:
    """The validation sweep of one method: a chain per (prior, T), the choice by validation NLL,
    MCMC_CHAINS chains at the choice and at T = 1 under the MAP's prior (the reference row, the
    same budget). Returns the sweep rows, the choice, both sets of chains, their mixing and times
    (the choice's time counts the whole sweep)."""
    from . import calibration as cal

    sweep, chains0 = [], {}
    for prior in SWEEP_PRIORS[name]:
        for temp in SWEEP_TEMPERATURES:
            c = run_chain(name, map_model, data, epochs, seed, progress, samples, temp, prior, 0)
            chains0[prior, temp] = c
            p = _chain_probs([c], data)
            sweep.append({"method": name, "prior": prior, "temperature": temp,
                          "val_nll": float(cal.nll(p["val"], data.y_val)),
                          "test_nll": float(cal.nll(p["test"], data.y_test)),
                          "shift_nll": float(cal.nll(p["shift"], data.y_test)), "time_s": c.time_s})
    best = min(sweep, key=lambda r: r["val_nll"])
    prior, temp = best["prior"], best["temperature"]
    names = list(TRACKED) + [n for n, _ in _tracked_weights(map_model)]

    def chains_at(prior, temp):  # the sweep's chain and MCMC_CHAINS - 1 more
        return [chains0[prior, temp]] + [run_chain(name, map_model, data, epochs, seed, progress, samples, temp, prior,
                                                   k) for k in range(1, MCMC_CHAINS)]

    chosen = chains_at(prior, temp)
    reference = chosen if (prior, temp) == (ISO_PRIOR, 1.0) else chains_at(ISO_PRIOR, 1.0)
    return {"sweep": sweep, "prior": prior, "temperature": temp, "chains": chosen, "mixing": mixing(chosen, names),
            "reference": reference, "reference_mixing": mixing(reference, names),
            "time_s": sum(r["time_s"] for r in sweep) + sum(c.time_s for c in chosen[1:]),
            "reference_time_s": sum(c.time_s for c in reference)}


def run_swag(map_model: nn.Module, data: Digits, epochs: int, seed: int, progress: bool, iterates: list | None = None,
             lr: float = 0.05):
    """SGD (momentum 0.9) at the constant learning rate ``lr`` from the MAP, one SWAG snapshot per
    epoch (K = 20); with a list ``iterates``, the flat parameters after every epoch are appended to
    it (the SWA picture)."""
    import copy

    from .swag import SWAG

    model = copy.deepcopy(map_model)
    swag = SWAG(model, max_rank=20)

    def snapshot(epoch):
        swag.collect()
        if iterates is not None:
            iterates.append(nn.utils.parameters_to_vector(model.parameters()).detach().clone())

    _train(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), data, epochs, seed + 2,
           "SWAG (SGD)", progress, prior_in_loss=True, after_epoch=snapshot)
    return swag, model


def run_bbb(map_model: nn.Module, data: Digits, epochs: int, seed: int, progress: bool, samples: int):
    """Bayes by Backprop from the MAP: every Linear made Bayesian (mu = the MAP's weights, sigma
    1e-3 at the start, prior N(0, 1 / PRIOR_PRECISION)), flipout estimator, Adam on the ELBO
    (mean NLL + KL / N); returns the variational predictive x -> [N, C] over ``samples`` draws."""
    import copy

    from .vi import ELBO, VariationalPosterior, to_bayesian

    model = to_bayesian(copy.deepcopy(map_model), prior=PRIOR_PRECISION ** -0.5, init_std=1e-3, estimator="flipout")
    model.train()
    elbo = ELBO(model, len(data.y_train))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n, g = len(data.y_train), torch.Generator().manual_seed(seed + 3)
    for _ in _epochs(epochs, "Bayes by Backprop (ELBO)", progress):
        for b in torch.randperm(n, generator=g).to(data.x_train.device).split(BATCH):
            opt.zero_grad()
            elbo(model(data.x_train[b]), data.y_train[b]).backward()
            opt.step()
    post = VariationalPosterior(model)
    return lambda x: post.predict(x, n_samples=samples if samples > 5 else 30,
                                  generator=torch.Generator(device=x.device).manual_seed(seed))


# Post-hoc Laplace on the MAP (GLM probit predictive), one row per recipe.
# 'val': KFAC, the prior precision with the lowest validation NLL on a log grid 1e-4..1e4 (it keeps
# the in-distribution NLL of this well-calibrated MAP, but lands at the grid's upper end: nearly the
# MAP); 'subnet': subnetwork Laplace (Daxberger et al. 2021) over the SUBNET_SIZE weights of the
# largest marginal variance under a diagonal Laplace with the MAP's prior, a full covariance, its
# prior by the marginal likelihood (those weights are the ones the training data leave unsettled:
# their draws barely move the test outputs and widen the shifted ones); 'marglik': KFAC over all
# weights with the evidence-maximising prior (layerwise): on an overfit MAP the GGN vanishes where
# p is one-hot, so the evidence prefers a broad prior and the predictive variance swamps the
# logits (see the README).
LAPLACE_RECIPES = (("Laplace KFAC val", "gridsearch"), ("Laplace subnet ml", "subnet"),
                   ("Laplace KFAC ml [ref]", "marglik"))
SUBNET_SIZE = 2000  # of the MLP's 26 122 weights


def run_laplace(map_model: nn.Module, data: Digits, tune: str):
    """Fit a Laplace at the MAP on the training split and tune its prior (``tune``: 'gridsearch'
    on the validation split or 'marglik', KFAC over all weights; 'subnet', the subnetwork recipe
    above); returns its predictive x -> [N, C]."""
    from .laplace import Laplace, subnetmask

    train = [(data.x_train[i:i + 256], data.y_train[i:i + 256]) for i in range(0, len(data.y_train), 256)]
    if tune == "subnet":
        diag = Laplace(map_model, "classification", hessian_structure="diag", prior_precision=PRIOR_PRECISION)
        idx = subnetmask.LargestVarianceDiagLaplaceSubnetMask(map_model, SUBNET_SIZE, diag).select(train)
        la = Laplace(map_model, "classification", "subnetwork", "full", subnetwork_indices=idx,
                     prior_precision=PRIOR_PRECISION).fit(train, progress=False)
        la.optimize_prior_precision("marglik")
        return lambda x: la.la(x, link_approx="probit")
    la = Laplace(map_model, "classification", hessian_structure="kron", prior_precision=PRIOR_PRECISION)
    la.fit(train, progress=False)
    if tune == "gridsearch":
        with warnings.catch_warnings():  # the grid's upper end is the expected answer here (see above)
            warnings.simplefilter("ignore")
            la.optimize_prior_precision("gridsearch", val_loader=[(data.x_val, data.y_val)])
    else:
        la.optimize_prior_precision("marglik", "layerwise")
    return lambda x: la.la(x, link_approx="probit")


def flatness(sgd_model: nn.Module, swag, data: Digits, quick: bool, seed: int) -> dict:
    """The lecture's flatness comparison: top Hessian eigenvalue and Hessian trace of the mean
    training NLL at the last SGD iterate and at the SWA solution (the SWAG mean)."""
    import copy

    from .curvature import sharpness
    from .nn import ParamLayout

    swa_model = copy.deepcopy(sgd_model)
    ParamLayout(swa_model).write_(swag.mean.to(next(swa_model.parameters()).dtype))
    out = {}
    for name, model in (("SGD", sgd_model), ("SWA", swa_model)):
        t = time.perf_counter()
        s = sharpness(model, nn.CrossEntropyLoss(), (data.x_train, data.y_train), n_probes=30 if quick else 100,
                      generator=torch.Generator().manual_seed(seed))
        out[name] = {**s._asdict(), "time_s": time.perf_counter() - t}
    print("\nFlatness of the training loss (Hessian of the mean NLL): top eigenvalue (Lanczos), trace (Hutchinson)")
    for name, r in out.items():
        print(f"  {name}: lambda_max {r['top_eigenvalue']:8.3f}   trace {r['trace']:9.2f} +- "
              f"{r['trace_std_error']:.2f}   ({r['time_s']:.1f} s)")
    return out


def evaluate(probs: dict[str, Tensor], data: Digits) -> dict:
    """Metrics of one method from its predictive probabilities on the test, shifted and OOD sets."""
    from . import calibration as cal

    pt, ps, po = probs["test"], probs["shift"], probs["ood"]
    ent_in, ent_out = cal.predictive_entropy(pt), cal.predictive_entropy(po)
    metrics = {
        "acc": cal.accuracy(pt, data.y_test), "nll": cal.nll(pt, data.y_test), "ece": cal.ece(pt, data.y_test),
        "brier": cal.brier(pt, data.y_test), "shift_acc": cal.accuracy(ps, data.y_test),
        "shift_nll": cal.nll(ps, data.y_test), "shift_ece": cal.ece(ps, data.y_test),
        "ood_auroc": cal.ood_auroc(ent_in, ent_out),
    }
    return {k: float(v) for k, v in metrics.items()}


def _predict_sets(predict, data: Digits) -> dict[str, Tensor]:
    x = torch.cat([data.x_test, data.x_shift, data.x_ood])
    p = predict(x).float()
    a, b = len(data.x_test), len(data.x_shift)
    return {"test": p[:a], "shift": p[a:a + b], "ood": p[a + b:]}


SGMCMC_METHODS = ("SGLD", "cSGLD", "pSGLD", "SGHMC")
GOAL_IN, GOAL = 1.02, "test NLL <= 1.02 x the MAP's and shift NLL < the MAP's"


def _goal_met(row: dict, map_row: dict) -> bool:
    return row["nll"] <= GOAL_IN * map_row["nll"] and row["shift_nll"] < map_row["shift_nll"]


def classification_demo(out: str, device: str, quick: bool, seed: int,
                        progress: bool) -> tuple[list[dict], dict, dict, dict]:
    """Part 2; returns the table rows, the flatness comparison, the SG-MCMC sweeps and mixing, and
    what the landscape pictures reuse (data, MAP: keyword arguments of landscape_demo)."""
    from . import calibration as cal

    data = load_digit_sets(seed, device)
    ep = dict(map=15 if quick else 60, mcmc=8 if quick else 50, swag=8 if quick else 50, vi=8 if quick else 30)
    samples = 5 if quick else 25  # SWAG / VI predictive draws
    draws = 5 if quick else 20  # per SG-MCMC chain
    temps = ", ".join(f"{t:g}" for t in SWEEP_TEMPERATURES)
    print(f"\nDigits 8x8 (sklearn, embedded): classes 0-{ID_CLASSES - 1} in distribution "
          f"(train {data.meta['train']}, val {data.meta['val']}, test {data.meta['test']}); shifted = test "
          f"digits rotated by up to 35 degrees plus noise; OOD = {data.meta['ood']} digits of classes 8 and 9.\n"
          f"MLP 64-128-128-{ID_CLASSES}, MAP prior {ISO_PRIOR} on every weight and bias. SG-MCMC from the MAP, "
          f"{ep['mcmc']} epochs and {draws} draws per chain: temperature T in {{{temps}}} (SGLD also the prior "
          f"{FAN_IN_PRIOR}) chosen by validation NLL, {MCMC_CHAINS} chains at the choice; the T = 1 rows [ref] are "
          f"the Bayes posterior ({MCMC_CHAINS} chains too), kept as reference. SWAG from SGD, K = 20; temperature "
          f"scaling and the KFAC Laplace's prior fitted on the validation split; the subnetwork Laplace: the "
          f"{SUBNET_SIZE} weights of largest diagonal-Laplace variance, full covariance, prior by the evidence.")
    rows, probs_of = [], {}

    t0 = time.perf_counter()
    map_model = train_map(data, ep["map"], seed, progress)
    map_model.eval()
    map_time = time.perf_counter() - t0

    def add(name, probs, wall, role, **extra):
        probs_of[name] = probs
        rows.append({"method": name, "role": role, **evaluate(probs, data), "time_s": wall, **extra})

    def timed(name, fit_and_predict, base=0.0, role="bayes"):
        t = time.perf_counter()
        probs = fit_and_predict()
        add(name, probs, base + time.perf_counter() - t, role)

    with torch.no_grad():
        timed("MAP", lambda: _predict_sets(lambda x: map_model(x).softmax(-1), data), map_time, "baseline")
        map_val_nll = float(cal.nll(map_model(data.x_val).softmax(-1), data.y_val))

    def temperature():
        with torch.no_grad():
            ts = cal.TemperatureScaling().fit(map_model(data.x_val), data.y_val)
            return _predict_sets(lambda x: ts.transform(map_model(x)).softmax(-1), data)

    timed("MAP + temperature", temperature, map_time, "baseline")
    sweeps, references = {}, []
    for name in SGMCMC_METHODS:
        sw = sweeps[name] = sgmcmc_sweep(name, map_model, data, ep["mcmc"], seed, progress, draws)
        label = f"{name} T={sw['temperature']:g} {sw['prior']}"
        add(label, _chain_probs(sw["chains"], data), map_time + sw["time_s"], "bayes", sampler=name,
            temperature=sw["temperature"], prior=sw["prior"], chains=len(sw["chains"]),
            draws=sum(len(c.probs) for c in sw["chains"]))
        ref = sw["reference"]
        references.append((f"{name} T=1 {ISO_PRIOR} [ref]", _chain_probs(ref, data), map_time + sw["reference_time_s"],
                           dict(sampler=name, temperature=1.0, prior=ISO_PRIOR, chains=len(ref),
                                draws=sum(len(c.probs) for c in ref))))

    fitted = {}

    def swag():
        fitted["swag"], fitted["sgd"] = run_swag(map_model, data, ep["swag"], seed, progress)
        return _predict_sets(lambda x: fitted["swag"].predict(x, n_samples=samples if quick else 30, progress=False),
                             data)

    timed("SWAG", swag, map_time)
    timed("Bayes by Backprop", lambda: _predict_sets(run_bbb(map_model, data, ep["vi"], seed, progress, samples), data),
          map_time)
    for name, tune in LAPLACE_RECIPES:
        timed(name, lambda tune=tune: _predict_sets(run_laplace(map_model, data, tune), data), map_time,
              "reference" if name.endswith("[ref]") else "bayes")
    # the reference rows last: the T = 1 chains, then the marginal-likelihood Laplace
    laplace_refs = [r for r in rows if r["role"] == "reference"]
    rows = [r for r in rows if r["role"] != "reference"]
    for name, probs, wall, extra in references:
        add(name, probs, wall, "reference", **extra)
    rows += laplace_refs
    map_row = rows[0]
    for r in rows[1:]:
        r["goal_met"] = _goal_met(r, map_row)
    _print_table(rows)
    missed = [r["method"] for r in rows if r["role"] == "bayes" and not r["goal_met"]]
    print(f"  goal ({GOAL}): " + (f"MISSED by {', '.join(missed)}" if missed else "met by every Bayesian row")
          + "; [ref] rows are not tuned")
    sgmcmc = {"temperatures": list(SWEEP_TEMPERATURES), "map_val_nll": map_val_nll,
              "map_test_nll": map_row["nll"], "map_shift_nll": map_row["shift_nll"],
              "sweep": [r for sw in sweeps.values() for r in sw["sweep"]],
              "chosen": {n: {"temperature": sw["temperature"], "prior": sw["prior"], **sw["mixing"]}
                         for n, sw in sweeps.items()},
              "reference": {n: {"temperature": 1.0, "prior": ISO_PRIOR, **sw["reference_mixing"]}
                            for n, sw in sweeps.items()}}
    _print_sweep(sgmcmc)
    _sweep_figure(sgmcmc, os.path.join(out, "sweep.png"))
    _reliability_figure(probs_of, data, os.path.join(out, "reliability.png"))
    # what the loss-landscape pictures reuse: the data and the MAP (the SWA picture runs SGD at its own,
    # higher learning rate: demo_landscape.SWA_LR)
    reuse = dict(data=data, map_model=map_model, map_epochs=ep["map"])
    return rows, flatness(fitted["sgd"], fitted["swag"], data, quick, seed), sgmcmc, reuse


def _print_sweep(sgmcmc: dict) -> None:
    print(f"\nSG-MCMC settings by validation NLL (one chain each; MAP: val {sgmcmc['map_val_nll']:.4f}, test "
          f"{sgmcmc['map_test_nll']:.4f}, shift {sgmcmc['map_shift_nll']:.3f}):")
    print(f"  {'method':7} {'prior':15} " + " ".join(f"{'T=' + format(t, 'g'):>21}" for t in sgmcmc["temperatures"]))
    print(f"  {'':7} {'':15} " + " ".join(f"{'val / test / shift':>21}" for _ in sgmcmc["temperatures"]))
    by = {}
    for r in sgmcmc["sweep"]:
        by.setdefault((r["method"], r["prior"]), {})[r["temperature"]] = r
    for (method, prior), cells in by.items():
        chosen = sgmcmc["chosen"][method]
        out = []
        for t in sgmcmc["temperatures"]:
            r = cells[t]
            mark = "*" if (chosen["temperature"], chosen["prior"]) == (t, prior) else " "
            out.append(f"{r['val_nll']:.3f}/{r['test_nll']:.3f}/{r['shift_nll']:.2f}{mark}".rjust(21))
        print(f"  {method:7} {prior:15} " + " ".join(out))
    print("  (* = chosen.) Mixing at the choice and at T = 1: rank-normalised split R-hat (bulk ESS) over the "
          "chains x draws of\n  the mean test and shift log-likelihood of each draw and the largest MAP weight of each "
          "layer (R-hat < 1.01: the chains agree):")
    for method in sgmcmc["chosen"]:
        for c in (sgmcmc["chosen"][method], sgmcmc["reference"][method]):
            cells = "  ".join(f"{n} {c['rhat'][n]:.2f} ({c['ess_bulk'][n]:.0f})" for n in c["rhat"])
            print(f"  {method + ' T=' + format(c['temperature'], 'g'):12} {c['prior']:15} {c['chains']} x "
                  f"{c['draws_per_chain']}: {cells}")
    worst = max(v for group in ("chosen", "reference") for c in sgmcmc[group].values() for v in c["rhat"].values())
    print(f"  largest R-hat {worst:.2f}: " + ("the chains have not mixed (each stays in its own neighbourhood of the "
                                            "MAP): a row averages a few local explorations, not converged posterior "
                                            "draws" if worst > 1.1 else "the chains agree"))


def _sweep_figure(sgmcmc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(sgmcmc["chosen"])
    fig, axes = plt.subplots(2, len(methods), figsize=(4 * len(methods), 6.4), sharex=True, sharey="row")
    for col, method in enumerate(methods):
        chosen = sgmcmc["chosen"][method]
        top, bottom = axes[0, col], axes[1, col]
        for i, prior in enumerate(dict.fromkeys(r["prior"] for r in sgmcmc["sweep"] if r["method"] == method)):
            rs = sorted((r for r in sgmcmc["sweep"] if r["method"] == method and r["prior"] == prior),
                        key=lambda r: r["temperature"])
            ts = [r["temperature"] for r in rs]
            color = f"C{i}"
            top.plot(ts, [r["val_nll"] for r in rs], "o-", color=color, label=f"val, {prior}")
            top.plot(ts, [r["test_nll"] for r in rs], "s--", color=color, alpha=0.6, label=f"test, {prior}")
            bottom.plot(ts, [r["shift_nll"] for r in rs], "^-", color=color, label=f"shift, {prior}")
            if prior == chosen["prior"]:
                r = next(r for r in rs if r["temperature"] == chosen["temperature"])
                top.plot([r["temperature"]], [r["val_nll"]], "*", color="k", ms=14, zorder=5, label="chosen")
                bottom.plot([r["temperature"]], [r["shift_nll"]], "*", color="k", ms=14, zorder=5)
        top.axhline(sgmcmc["map_val_nll"], color="grey", lw=1, label="MAP val")
        top.axhline(sgmcmc["map_test_nll"], color="grey", lw=1, ls="--", label="MAP test")
        bottom.axhline(sgmcmc["map_shift_nll"], color="grey", lw=1, label="MAP shift")
        top.set_title(f"{method}: chosen T={chosen['temperature']:g}, {chosen['prior']}", fontsize=10)
        bottom.set(xscale="log", xlabel="temperature T")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("in-distribution NLL (one chain)")
    axes[1, 0].set_ylabel("shifted NLL (one chain)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("The cold-posterior effect: validation (solid) and test (dashed) NLL against the temperature; "
                 "the choice is the lowest validation NLL", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  sweep picture: {path}")


COLUMNS = [("method", "{:<28}"), ("acc", "{:6.3f}"), ("nll", "{:6.3f}"), ("ece", "{:6.3f}"), ("brier", "{:6.3f}"),
           ("shift_acc", "{:9.3f}"), ("shift_nll", "{:9.3f}"), ("shift_ece", "{:9.3f}"), ("ood_auroc", "{:9.3f}"),
           ("time_s", "{:7.2f}")]


def _format_rows(rows: list[dict]) -> list[str]:
    head = " | ".join(f"{c:<28}" if c == "method" else f"{c:>{max(6, len(c))}}" for c, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        if r.get("role") == "reference" and (i == 0 or rows[i - 1].get("role") != "reference"):
            lines.append("- reference rows, not tuned: the Bayes posterior (T = 1) and the marglik Laplace "
                         + "-" * max(0, len(head) - 82))
        cells = []
        for c, fmt in COLUMNS:
            cells.append(fmt.format(r[c]) if c == "method" else fmt.format(r[c]).rjust(max(6, len(c))))
        lines.append(" | ".join(cells))
    return lines


def _print_table(rows: list[dict]) -> None:
    print("\nIn distribution (acc, NLL, ECE, Brier), shifted (acc, NLL, ECE), OOD AUROC from predictive "
          "entropy; time = MAP + the method's own fit and prediction, seconds (a tuned SG-MCMC row: its whole "
          "sweep and its chains):")
    for line in _format_rows(rows):
        print("  " + line)


def _reliability_figure(probs_of: dict, data: Digits, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import calibration as cal

    names = list(probs_of)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig = plt.figure(figsize=(4 * cols, 5.2 * rows))
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1] * rows)
    for i, name in enumerate(names):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        ax_hist = fig.add_subplot(grid[2 * r + 1, c], sharex=ax)
        cal.reliability_diagram(probs_of[name]["test"].cpu(), data.y_test.cpu(), n_bins=10, ax=(ax, ax_hist),
                                title=name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  reliability diagrams: {path}")


def run_demo(out: str = "pyfastbayes-report", device: str = "cpu", quick: bool = False, seed: int = 0,
             progress: bool = True) -> dict:
    """Run both parts and the loss-landscape pictures, print the tables, write ``out``/{regression_predictive.png,
    reliability.png, sweep.png, mode_connectivity.png, swa_plane.png, residual_slices.png, results.json,
    results.md}; returns the results dict."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    os.makedirs(out, exist_ok=True)
    import pyfastbayes

    from .demo_landscape import landscape_demo, markdown as landscape_markdown

    t0 = time.perf_counter()
    info = pyfastbayes.build_info()
    print(f"pyfastbayes {info['version']} (native: {info['native']}, CUDA kernels: {info['cuda']}) "
          f"on {device}, torch {torch.__version__}{', quick run' if quick else ''}")
    results = {"build": info, "device": device, "quick": quick}
    results["regression"] = regression_demo(out, quick, seed, progress)
    results["classification"], results["flatness"], results["sgmcmc"], reuse = classification_demo(
        out, device, quick, seed, progress)
    results["landscape"] = landscape_demo(out, reuse.pop("data"), quick, seed, progress, **reuse)
    results["total_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("# pyfastbayes demo\n\n" + "\n".join(_format_rows(results["classification"])) + "\n")
        f.write("\n## Flatness of the training loss\n\n| solution | top Hessian eigenvalue | Hessian trace |\n|---|---|---|\n")
        for name, r in results["flatness"].items():
            f.write(f"| {name} | {r['top_eigenvalue']:.3f} | {r['trace']:.2f} +- {r['trace_std_error']:.2f} |\n")
        sg = results["sgmcmc"]
        f.write("\n## SG-MCMC temperature / prior sweep (one chain each; chosen by validation NLL)\n\n"
                "| method | prior | T | val NLL | test NLL | shift NLL |\n|---|---|---|---|---|---|\n")
        for r in sg["sweep"]:
            mark = " (chosen)" if (sg["chosen"][r["method"]]["temperature"], sg["chosen"][r["method"]]["prior"]) == (
                r["temperature"], r["prior"]) else ""
            f.write(f"| {r['method']} | {r['prior']} | {r['temperature']:g}{mark} | {r['val_nll']:.4f} | "
                    f"{r['test_nll']:.4f} | {r['shift_nll']:.3f} |\n")
        f.write(f"\nMAP: val {sg['map_val_nll']:.4f}, test {sg['map_test_nll']:.4f}, shift {sg['map_shift_nll']:.3f}\n"
                "\n## Mixing at the chosen settings and at T = 1: rank R-hat (bulk ESS)\n\n")
        for method in sg["chosen"]:
            for c in (sg["chosen"][method], sg["reference"][method]):
                cells = ", ".join(f"{n} {c['rhat'][n]:.2f} ({c['ess_bulk'][n]:.0f})" for n in c["rhat"])
                f.write(f"- {method} T={c['temperature']:g} {c['prior']}, {c['chains']} chains x "
                        f"{c['draws_per_chain']} draws: {cells}\n")
        f.write(landscape_markdown(results["landscape"]))
    print(f"\nreport written to {os.path.abspath(out)} in {results['total_s']:.1f} s")
    return results
