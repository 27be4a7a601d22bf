from .sgmcmc import SGLD, SGHMC, PSGLD  # noqa: F401
from .schedule import CyclicalSchedule
__all__ = ["SGLD", "SGHMC", "PSGLD", "CyclicalSchedule"]
