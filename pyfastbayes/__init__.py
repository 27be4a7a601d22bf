"""pyfastbayes: fast, trustworthy Bayesian deep learning for PyTorch.

Native (C++/CUDA) kernels under a thin Python API, with pure-PyTorch fallbacks everywhere:
fused SG-MCMC optimizers (:mod:`pyfastbayes.optim`), Bayesian model averaging over stored draws
(:mod:`pyfastbayes.bma`), SWA / SWAG / MultiSWAG (:mod:`pyfastbayes.swag`), calibration and
uncertainty metrics (:mod:`pyfastbayes.calibration`), and the ops themselves under
``torch.ops.pyfastbayes`` (typed wrappers in :mod:`pyfastbayes.ops`). ``python -m pyfastbayes demo``
runs the whole workflow on small embedded data.
"""
__version__ = "0.1.0"

from . import _native  # noqa: E402  (loads the extension or warns once)
from ._native import build_info  # noqa: E402
from . import ops, optim, bma  # noqa: E402
from . import calibration  # noqa: E402
from .swag import SWAG, SWA, MultiSWAG  # noqa: E402

__all__ = ["build_info", "ops", "optim", "bma", "calibration", "SWAG", "SWA", "MultiSWAG",
           "__version__"]
