"""Curvature of a model's loss: Hessian, GGN and Fisher operators applied to blocks of vectors,
and the spectral tools on them (see docs/ARCHITECTURE.md)."""
from .models import FisherOperator, GGNOperator, HessianOperator, fisher, ggn, hessian
from .operator import DenseOperator, LinearOperator
from .density import SpectralDensity, plot_spectral_density, spectral_density
from .spectral import eigenvalues
from .trace import TraceEstimate, trace
from .sharpness import Sharpness, sharpness

__all__ = ["LinearOperator", "DenseOperator", "hessian", "ggn", "fisher", "HessianOperator", "GGNOperator",
           "FisherOperator"]
__all__ += ["eigenvalues", "trace", "TraceEstimate", "spectral_density", "SpectralDensity", "plot_spectral_density"]
__all__ += ["sharpness", "Sharpness"]
