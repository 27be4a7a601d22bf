"""Stochastic trace estimators of a curvature operator: Hutchinson and Hutch++.

Both only apply the operator, to blocks of ``block`` Rademacher probes at a time (``op @ Z``: one
data pass per block for the model operators).

- Hutchinson (1989): tr(A) ~ mean over n probes z of z^T A z; unbiased, variance
  2 (||A||_F^2 - sum_i A_ii^2) / n.
- Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA
  2021, Algorithm 1): with m = n_probes products, a sketch S of m/3 Rademacher columns gives
  Q = orth(A S); tr(Q^T A Q) is computed exactly (m/3 products) and Hutchinson with the remaining
  m/3 probes G estimates the trace of the deflated (I - QQ^T) A (I - QQ^T). Unbiased, and much
  lower variance when A's spectrum is dominated by a few large eigenvalues (curvature matrices).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..calibration._checks import check_int
from .operator import LinearOperator, rademacher, shared_generator
from .spectral import (_apply, _as_operator, _cgs2, _check_progress, _not_finite, _progress,
                       _work_dtype)

__all__ = ["trace", "TraceEstimate"]

TRACE_METHODS = ("hutchinson", "hutch++")


class TraceEstimate(NamedTuple):
    """A trace estimate: ``estimate, std_error = trace(op)`` unpacks it.

    estimate: the estimate of tr(A). std_error: the standard error of the Hutchinson average in it
    (sample standard deviation of the per-probe values / sqrt(number of probes); for Hutch++ the
    error of the deflated part given the sketch, whose exact part has no variance); nan with a
    single Hutchinson probe.
    """
    estimate: float
    std_error: float


def _products(op: LinearOperator, X: Tensor, block: int, work: torch.dtype, bar) -> Tensor:
    """op @ X for X [P, c], ``block`` columns at a time, in the working dtype."""
    out = []
    for j in range(0, X.shape[1], block):
        out.append(_apply(op, X[:, j:j + block], work))
        bar.update(out[-1].shape[1])
    return torch.cat(out, 1)


def _mean_and_error(values: Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-probe values [n] (float64)."""
    n = values.numel()
    mean = float(values.mean())
    return mean, (float(values.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan)


def trace(op, n_probes: int = 100, method: str = "hutchinson", generator: torch.Generator | None = None,
          block: int = 32, progress: bool | None = False) -> TraceEstimate:
    """Estimate tr(A) of a symmetric operator A [P, P] from products with random probes.

    Args:
        op: a :class:`LinearOperator` or a symmetric floating-point tensor [P, P].
        n_probes: the number of operator-vector products (n >= 1; 'hutch++' needs n >= 3: n // 3
            sketch columns, n // 3 products with their orthonormal basis Q, and the remaining
            n - 2 (n // 3) Hutchinson probes on the deflated operator).
        method: 'hutchinson' or 'hutch++'.
        generator: every probe (Rademacher +-1) is drawn from it, on its device (CPU without one).
        block: products per ``op @ Z`` call (Z [P, block]).
        progress: a tqdm bar over the products (None: tqdm's choice).

    Returns:
        :class:`TraceEstimate` (estimate, std_error), Python floats; the per-probe values are
        accumulated in float64 (the products in the operator's dtype, the bookkeeping in float32
        at least).
    """
    op = _as_operator(op)
    n = check_int(n_probes, "n_probes", 1)
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if method == "hutch++" and n < 3:
        raise ValueError(f"method='hutch++' needs n_probes >= 3 (a third each for the sketch, the products with "
                         f"its basis and the Hutchinson remainder), got {n}")
    block = check_int(block, "block", 1)
    generator = shared_generator(op, generator)
    _check_progress(progress)
    P = op.shape[0]
    work = _work_dtype(op.dtype)
    with _progress(progress, n, f"trace ({method})") as bar:
        if method == "hutchinson":
            values = []
            for j in range(0, n, block):
                Z = rademacher(P, min(block, n - j), work, op.device, generator)
                values.append((Z * _apply(op, Z, work)).sum(0).double())
                bar.update(Z.shape[1])
            return _finite(TraceEstimate(*_mean_and_error(torch.cat(values))), n)
        # Hutch++ (Algorithm 1 of Meyer et al.): S and G drawn up front, S first
        s = n // 3
        S = rademacher(P, s, work, op.device, generator)
        G = rademacher(P, n - 2 * s, work, op.device, generator)
        Q, _ = torch.linalg.qr(_products(op, S, block, work, bar))  # [P, min(P, s)] orthonormal
        exact = float((Q * _products(op, Q, block, work, bar)).sum(dtype=torch.float64))
        Gd, _ = _cgs2(Q, G)  # (I - QQ^T) G, two passes
        values = (Gd * _products(op, Gd, block, work, bar)).sum(0).double()
        mean, err = _mean_and_error(values)
        return _finite(TraceEstimate(exact + mean, err), n)


def _finite(result: TraceEstimate, n: int) -> TraceEstimate:
    """``result``, checked once at the end: a NaN/inf estimate means a non-finite product."""
    if not math.isfinite(result.estimate):
        raise _not_finite("trace", n)
    return result
