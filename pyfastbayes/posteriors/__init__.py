"""Posteriors over a network's weights, all behind one interface (:class:`Posterior`, base.py):
``sample(n) -> [n, P]``, ``sample_(model)``, ``predict(x, n_samples, *, likelihood, bn_loader,
batch_size, progress, generator, input_fn, output_fn)`` (the one Bayesian-model-averaging loop),
``state_dict()`` / ``load_state_dict()``.

- :class:`SampleBuffer` (samples.py): stored draws, e.g. of an SG-MCMC chain.
- :class:`SWA` (swa.py): the running mean of the weights (a point mass).
- :class:`SWAG` (swag.py): SWA-Gaussian, diagonal plus low-rank covariance.
- :class:`MultiSWAG` (multiswag.py): an equal-weight mixture of SWAGs from independent runs.
"""
from .base import LIKELIHOODS, Posterior
from .multiswag import MultiSWAG
from .samples import SampleBuffer
from .swa import SWA
from .swag import SWAG

__all__ = ["Posterior", "LIKELIHOODS", "SampleBuffer", "SWA", "SWAG", "MultiSWAG"]
