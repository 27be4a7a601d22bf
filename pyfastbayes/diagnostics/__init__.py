"""Convergence diagnostics for MCMC draws [chains, draws, ...]: R-hat, ESS and a summary table.

- :func:`rhat`: rank-normalised split R-hat (Vehtari et al. 2021; also ``'split'``, ``'folded'``);
- :func:`ess`: bulk, tail and mean effective sample size (Geyer's initial monotone sequence);
- :func:`summary`: both for a dict of named draws, printable as a table.

Computed with torch ops on the draws' device, every trailing element at once; the tests compare
every method with ArviZ 0.23.4 to 1e-8. Draws of several :class:`~pyfastbayes.SampleBuffer`
chains: ``torch.stack([buf.stored() for buf in buffers])`` is [chains, draws, P].
"""
from .convergence import ESS_METHODS, RHAT_METHODS, ess, rhat
from .summary import Diagnostics, Summary, summary

__all__ = ["rhat", "ess", "summary", "Diagnostics", "Summary", "RHAT_METHODS", "ESS_METHODS"]
