"""Heteroscedastic regression with a Laplace posterior (Immer et al. 2023), on a 1-D toy problem
whose noise grows with |x|: y = sin(2x) + (0.05 + 0.3 |x|) eps, x in [-2, 2].

The network ends in pyfastbayes.nn.NaturalHead (outputs: the natural parameters of a Gaussian per
input), is trained by online marginal likelihood (marglik_training: the prior precision learnt with
the weights), and its KFAC Laplace gives the predictive of y: the mean, the aleatoric variance (the
learnt noise) and the epistemic variance (the weights' uncertainty), which grows off the data.
A homoscedastic network trained the same way is printed beside it.

    python examples/heteroscedastic_laplace.py --out heteroscedastic.png
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from pyfastbayes.laplace import marglik_training
from pyfastbayes.nn import NaturalHead


def data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, 1] uniform on [-2, 2], y [n, 1] and the true noise sd [n, 1]."""
    x = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 4 - 2
    sd = 0.05 + 0.3 * x.abs()
    return x, torch.sin(2 * x) + sd * torch.randn(n, 1, generator=generator, dtype=torch.float64), sd


def mlp(out: int, head: nn.Module | None = None) -> nn.Module:
    layers = [nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, out)]
    return nn.Sequential(*layers, *([head] if head is not None else [])).double()


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    return float((0.5 * (torch.log(2 * math.pi * var) + (y - mean).square() / var)).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="training points")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--out", default=None, help="a PNG of the predictive bands (matplotlib)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x, y, _ = data(args.n, g)
    xt, yt, sdt = data(1000, g)
    loader = [(x[i:i + 100], y[i:i + 100]) for i in range(0, args.n, 100)]
    fits = {}
    for name, likelihood, model in (("heteroscedastic", "heteroscedastic_regression", mlp(2, NaturalHead())),
                                    ("homoscedastic", "regression", mlp(1))):
        torch.manual_seed(0)
        la, _ = marglik_training(model, loader, likelihood, hessian_structure="kron", n_epochs=args.epochs, lr=1e-2,
                                 n_epochs_burnin=min(50, args.epochs), marglik_frequency=25, progress=False)
        pred = la.predict(xt)
        fits[name] = (la, pred)
        print(f"{name:16s} test NLL {gaussian_nll(pred.mean, pred.variance, yt):.3f}   prior precision "
              f"{float(la.prior_precision.mean()):.3g}   mean |sd - true sd| "
              f"{float((pred.aleatoric.sqrt() - sdt).abs().mean()):.3f}")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = torch.linspace(-3, 3, 300, dtype=torch.float64)[:, None]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, (name, (la, _)) in zip(axes, fits.items()):
            p = la.predict(grid)
            m, tot, epi = p.mean[:, 0], p.variance[:, 0].sqrt(), p.epistemic[:, 0].sqrt()
            ax.scatter(x[:, 0], y[:, 0], s=4, c="k", alpha=0.4, label="training data")
            ax.fill_between(grid[:, 0], m - 2 * tot, m + 2 * tot, alpha=0.25, label="±2 sd, total")
            ax.fill_between(grid[:, 0], m - 2 * epi, m + 2 * epi, alpha=0.5, label="±2 sd, epistemic")
            ax.plot(grid[:, 0], m, lw=1.5, label="predictive mean")
            ax.plot(grid[:, 0], torch.sin(2 * grid[:, 0]), "k--", lw=0.8, label="sin(2x)")
            ax.set_title(f"{name} Laplace (KFAC, marglik-trained)")
            ax.set_xlabel("x")
        axes[0].legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    return fits


if __name__ == "__main__":
    main()
