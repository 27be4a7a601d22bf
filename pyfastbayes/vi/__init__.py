"""Variational inference: Bayes by Backprop (Blundell et al. 2015) with layers whose noise is
regenerated in the backward pass from an in-kernel Philox stream, never stored.

- layers.py: :class:`BayesianLinear`, :class:`BayesianConv2d` (estimators 'reparam', 'local',
  'flipout'); _functions.py: their autograd functions; priors.py: Gaussian and scale-mixture priors.
- kl.py: :func:`kl_divergence` (all layers in one fused reduction), :class:`ELBO`, :class:`linear_anneal`.
- convert.py: :func:`to_bayesian`; posterior.py: :class:`VariationalPosterior`.
"""
from .convert import to_bayesian
from .kl import ELBO, bayesian_layers, kl_divergence, linear_anneal
from .layers import BayesianConv2d, BayesianLayer, BayesianLinear
from .posterior import VariationalPosterior
from .priors import GaussianPrior, ScaleMixturePrior

__all__ = ["BayesianLinear", "BayesianConv2d", "BayesianLayer", "to_bayesian", "kl_divergence", "ELBO",
           "linear_anneal", "VariationalPosterior", "GaussianPrior", "ScaleMixturePrior", "bayesian_layers"]
