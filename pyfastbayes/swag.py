"""Former home of SWA, SWAG, MultiSWAG and update_bn (kept as an import path).

They live in :mod:`pyfastbayes.posteriors` (``swa.py``, ``swag.py``, ``multiswag.py``) and
:mod:`pyfastbayes.nn` (``update_bn``) since the restructure of issue 7.
"""
from .nn import update_bn
from .posteriors.multiswag import MultiSWAG
from .posteriors.swa import SWA
from .posteriors.swag import SWAG

__all__ = ["SWA", "SWAG", "MultiSWAG", "update_bn"]
