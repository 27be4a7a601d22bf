"""Former home of SampleBuffer and iterate_inputs (kept as an import path).

They live in :mod:`pyfastbayes.posteriors` (``samples.py``) and :mod:`pyfastbayes.nn`
(``inputs.py``) since the restructure of issue 7; the model-averaging loop is
:meth:`pyfastbayes.posteriors.Posterior.predict`.
"""
from .nn.inputs import iterate_inputs
from .posteriors.samples import SampleBuffer

__all__ = ["SampleBuffer", "iterate_inputs"]
