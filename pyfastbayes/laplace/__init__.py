"""Laplace approximations over a trained network's weights: KFAC (Kronecker-factored), diagonal and
full, all weights, the last layer or a subnetwork; the marginal likelihood and prior tuning; GLM (probit, bridge,
MC) and sampling predictives.

- :class:`Laplace` (laplace.py): the posterior (a :class:`pyfastbayes.posteriors.Posterior`).
- :class:`FunctionalLaplace` (functional.py): the GP view on a subset of the data (laplace-torch's
  ``hessian_structure='gp'``), over all weights or the last layer.
- :class:`ELLA` (ella.py): the accelerated linearised Laplace (a Nystrom feature map of the GP
  kernel, fitted on all the data; laplace-torch's ``ELLA``). _linearised.py: the two GPs' shared
  base; _kernels.py: kernels, J d and J^T w from the factored Jacobian parts.
- factors.py: the curvature accumulated over the data (one forward and one batched backward per
  batch, or one per chunk of directions under 256 MiB of output gradients; Kronecker factors through ``pyfastbayes.ops.kfac_factor_``).
- eigenbasis.py: eigendecomposition of many factors at once (:func:`eigh_many`).
- precision.py: the posterior precision per structure (log det, draws, J P^-1 J^T).
- marglik.py: the log marginal likelihood and prior structures; predictive.py: link approximations;
  training.py: :func:`marglik_training` (network and prior trained together); lowrank.py: 'lowrank'.
- subnetwork.py: 'subnetwork' (the covered layers cut to chosen entries); subnetmask.py: choosing
  them (laplace-torch's subnetwork masks).
- _layers.py: which layers are supported and how their blocks are formed; _likelihood.py: losses,
  targets, output-space directions.
"""
from .eigenbasis import eigh_many
from .ella import ELLA
from .functional import FunctionalLaplace
from .laplace import Laplace, RegressionPredictive
from .training import marglik_training
from . import subnetmask

__all__ = ["Laplace", "FunctionalLaplace", "ELLA", "RegressionPredictive", "eigh_many", "marglik_training", "subnetmask"]
