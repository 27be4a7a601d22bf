"""Curvature of a model's loss: Hessian, GGN and Fisher operators applied to blocks of vectors,
and the spectral tools on them (see docs/ARCHITECTURE.md)."""
from .operator import DenseOperator, LinearOperator

__all__ = ["LinearOperator", "DenseOperator"]
