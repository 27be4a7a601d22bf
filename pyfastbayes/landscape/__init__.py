"""Loss-landscape tools."""
from .curves import BezierCurve, PolyChain, bezier_basis, linear_path, plot_curve

__all__ = ["BezierCurve", "PolyChain", "bezier_basis", "linear_path", "plot_curve"]
from .directions import directions_to, pca_directions, project_trajectory, random_directions
from .grid import grid, interpolate
from .result import LandscapeResult

__all__ += ["random_directions", "directions_to", "pca_directions", "project_trajectory", "grid", "interpolate",
            "LandscapeResult"]
