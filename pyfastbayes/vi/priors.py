"""Priors over a Bayesian layer's weights: a zero-mean Gaussian N(0, std^2) (closed-form KL) or
Blundell et al.'s scale mixture pi N(0, std1^2) + (1 - pi) N(0, std2^2) (KL by Monte Carlo)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..calibration._checks import check_positive_float


class GaussianPrior:
    """N(0, std^2) per weight; KL(N(mu, sigma^2) || prior) in closed form."""

    def __init__(self, std: float = 1.0):
        self.std = check_positive_float(std, "prior_std")

    def log_prob(self, w: Tensor) -> Tensor:
        """log p(w) summed over the weights w [...] -> scalar (for a sampled-weight KL estimate)."""
        return (-0.5 * (w / self.std).square() - math.log(self.std) - 0.5 * math.log(2 * math.pi)).sum()

    def __repr__(self) -> str:
        return f"GaussianPrior(std={self.std:g})"


class ScaleMixturePrior:
    """pi N(0, std1^2) + (1 - pi) N(0, std2^2) (Blundell et al. 2015, section 3.3)."""

    def __init__(self, pi: float = 0.5, std1: float = 1.0, std2: float = math.exp(-6)):
        if isinstance(pi, bool) or not isinstance(pi, numbers.Real) or not 0 < pi < 1:
            raise ValueError(f"pi must be in (0, 1), got {pi!r}")
        self.pi, self.std1, self.std2 = float(pi), check_positive_float(std1, "std1"), check_positive_float(std2, "std2")

    def log_prob(self, w: Tensor) -> Tensor:
        """log p(w) of the two-component mixture, summed over the weights w [...] -> scalar."""
        a = math.log(self.pi) - 0.5 * (w / self.std1).square() - math.log(self.std1)
        b = math.log1p(-self.pi) - 0.5 * (w / self.std2).square() - math.log(self.std2)
        return (torch.logaddexp(a, b) - 0.5 * math.log(2 * math.pi)).sum()

    def __repr__(self) -> str:
        return f"ScaleMixturePrior(pi={self.pi:g}, std1={self.std1:g}, std2={self.std2:g})"


def as_prior(prior) -> GaussianPrior | ScaleMixturePrior:
    """A prior object from a prior or a positive number (the Gaussian prior's std)."""
    if isinstance(prior, (GaussianPrior, ScaleMixturePrior)):
        return prior
    if isinstance(prior, numbers.Real) and not isinstance(prior, bool):
        return GaussianPrior(prior)
    raise TypeError(f"prior must be a GaussianPrior, a ScaleMixturePrior or a positive float (the Gaussian std), "
                    f"got {type(prior).__name__}")
