"""Loss-landscape tools."""
from .curves import BezierCurve, PolyChain, bezier_basis, linear_path, plot_curve

__all__ = ["BezierCurve", "PolyChain", "bezier_basis", "linear_path", "plot_curve"]
