"""pyfastbayes: fast, trustworthy Bayesian deep learning for PyTorch.

Native (C++/CUDA) kernels under a thin Python API, with pure-PyTorch fallbacks everywhere:

- :mod:`pyfastbayes.optim`: fused SG-MCMC samplers (SGLD, SGHMC, pSGLD) and the cyclical schedule;
- :mod:`pyfastbayes.priors`: per-layer Gaussian priors N(0, scale / fan_in) as the samplers' param groups;
- :mod:`pyfastbayes.posteriors`: one :class:`~pyfastbayes.posteriors.Posterior` interface and its
  Bayesian-model-averaging loop, for stored draws (``SampleBuffer``), SWA, SWAG and MultiSWAG;
- :mod:`pyfastbayes.calibration`: calibration and uncertainty metrics, recalibration, plots;
- :mod:`pyfastbayes.nn`: ``ParamLayout`` (named parameters <-> one flat vector) and ``update_bn``;
- :mod:`pyfastbayes.ops`: typed wrappers of the ops under ``torch.ops.pyfastbayes``.

``python -m pyfastbayes demo`` runs the whole workflow on small embedded data. The layers and how
to add to them: docs/ARCHITECTURE.md.
"""
__version__ = "0.1.0"

from . import _native  # noqa: E402  (loads the extension or warns once)
from ._native import build_info  # noqa: E402
from ._memory import allocation_cache  # noqa: E402
from . import ops, nn, optim, posteriors, calibration, priors  # noqa: E402
from . import bma  # noqa: E402,F401  (former import path of SampleBuffer)
from .nn import update_bn  # noqa: E402
from .posteriors import SWA, SWAG, MultiSWAG, SampleBuffer  # noqa: E402

__all__ = ["build_info", "allocation_cache", "ops", "nn", "optim", "posteriors", "calibration", "priors", "bma",
           "SWAG", "SWA", "MultiSWAG", "SampleBuffer", "update_bn", "__version__", "curvature", "landscape",
           "laplace", "diagnostics", "vi", "data"]

# imported on first use: they pull in torch.func and matplotlib (data: scikit-learn)
_LAZY = ("curvature", "landscape", "laplace", "diagnostics", "vi", "data")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
