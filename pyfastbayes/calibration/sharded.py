"""Metrics of a test set whose rows are split over the processes of a ``torch.distributed`` group.

Every process computes the sufficient statistics of its shard: the sums of the per-point terms of
:func:`~.metrics.nll`, :func:`~.metrics.brier` and :func:`~.metrics.accuracy` (the functions those
metrics take the mean of) and the uniform bins of a :class:`~.streaming.CalibrationError` (the state
its ``sync`` reduces). ONE all-reduce (sum) of one flat float64 buffer then gives every process the
totals, from which each metric is finished exactly as the single-process metric finishes it.

Buffer layout: ``[header (6) | one sum per nll / accuracy / brier asked for, in the order asked |
the CalibrationError state, flattened, when 'ece' is asked for]``. The header carries what the
processes must agree on, summed: a failure flag, the number of non-empty shards, N, and, over the
non-empty shards, C, C^2 and the binary flag (all C equal iff k * sum C^2 == (sum C)^2 for k
shards). The buffer's length depends only on the options, never on the data, so a process that
fails or has no rows still takes part in the all-reduce with zeros (its flag set): no process is
left waiting in the collective.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._binning import require_binned
from ._checks import check_bool, check_not_empty, prepare
from .metrics import brier_terms, hits, nll_terms
from .streaming import CalibrationError, collective_device
from .._distributed import distributed_active

__all__ = ["evaluate", "METRICS"]

METRICS = ("nll", "accuracy", "ece", "brier")
_TERMS = {"nll": nll_terms, "brier": brier_terms, "accuracy": lambda prep, fl: hits(prep, fl).double()}
_FAILED, _SHARDS, _N, _C, _C2, _BINARY = range(6)  # header slots
_HEADER = 6


def evaluate(probs: Tensor, targets: Tensor, metrics: str | Sequence[str] = METRICS, *, n_bins: int = 15,
             norm: str = "l1", classwise: bool = False, num_classes: int | None = None, from_logits: bool = False,
             validate: bool = True, group=None, distributed: bool | None = None) -> dict[str, Tensor]:
    """Calibration and BMA metrics of a test set split by rows over processes.

    Each process passes its shard (e.g. the output of ``SWAG.predict`` / ``SampleBuffer.predict`` on
    its part of the test set, or the [S, N, C] draws) and gets back the metrics of the whole test
    set, equal (up to float64 rounding) to the metric computed in one process on the rows of all
    shards concatenated. Collective under torch.distributed: every process of ``group`` must call it
    with the same ``metrics`` and options. The draws must be those of the same model average on
    every process (with a sampled posterior: the same generator seed on every process).

    Args:
        probs: this process's shard: [N, C] probabilities, [S, N, C] draws (the BMA predictive is
            their mean, taken inside as in :func:`ece`), or [N] binary probabilities of class 1;
            logits of the same shapes with ``from_logits=True``. N may differ between processes and
            may be 0 (an empty shard, e.g. ``torch.empty(0, C)``), but not on every process. C
            (and being binary [N] or not) must be the same on every process with rows.
        targets: [N] integer (or bool) class indices in [0, C) (binary: 0 or 1).
        metrics: names among ``'nll'``, ``'accuracy'``, ``'ece'``, ``'brier'`` (or one name).
        n_bins, norm, classwise, num_classes: of the calibration error, as in
            :class:`CalibrationError` (uniform bins; ``classwise`` needs ``num_classes``). For
            equal-mass ('adaptive') bins, gather the shards and use :func:`ece`.
        from_logits: inputs are logits (softmax per draw before averaging).
        validate: the value checks of the metrics (one native pass on this process's rows).
        group: the ``torch.distributed`` process group (default: the world).
        distributed: None: reduce over ``group`` when torch.distributed is initialised, else
            compute the local metrics; False: always local; True: insist on torch.distributed.

    Returns:
        ``{name: float64 scalar tensor on the device of probs}`` in the order of ``metrics``; the
        same values on every process.

    Raises:
        TypeError / ValueError with the messages of the metrics (naming the argument) on the
        process whose input is bad; RuntimeError "evaluate failed on another process" on the
        others. ValueError "no data points (N = 0)" when no process has a row, and when the
        processes disagree on C or on binary [N] against [N, C] inputs.
    """
    names = _check_metrics(metrics)
    from_logits, validate = check_bool(from_logits, "from_logits"), check_bool(validate, "validate")
    if distributed is not None:  # distributed='no' must not read as True
        check_bool(distributed, "distributed")
    # option checks (the same on every process, so they may raise before the collective)
    calib = (CalibrationError(n_bins, norm, classwise, num_classes, from_logits, validate) if "ece" in names
             else None)
    sums = [m for m in names if m != "ece"]
    reduce = distributed_active(distributed)
    error = None
    try:
        local = _local_stats(probs, targets, sums, calib, from_logits, validate)
    except Exception as e:  # any failure: the other processes must learn of it, not wait
        if not reduce:
            raise
        error = e  # this process takes part with zeros of the same length, its failure flag set
        size = _HEADER + len(sums) + (torch.Size(calib._shape()).numel() if calib is not None else 0)
        local = torch.zeros(size, dtype=torch.float64)
        local[_FAILED] = 1
    if reduce:
        import torch.distributed as dist

        buf = local.to(collective_device(group), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    else:
        buf = local
    header = buf[:_HEADER].tolist()  # the one host synchronisation of the reduction
    if error is not None:
        raise error
    if header[_FAILED]:
        raise RuntimeError("evaluate failed on another process (see its error); no metric was computed here")
    n, shards = int(header[_N]), int(header[_SHARDS])
    if not reduce:
        check_not_empty(n, "probs", probs.shape)
    elif n == 0:
        raise ValueError("no data points (N = 0) on any process: every shard of probs is empty; pass at least "
                         "one data point")
    if shards * header[_C2] != header[_C] ** 2:
        raise ValueError(f"the processes' probs have different numbers of classes C (this one: C = "
                         f"{_classes(probs)}); pass the same C on every process (an empty shard may have any C)")
    if header[_BINARY] not in (0, shards):
        raise ValueError("some processes pass binary [N] probs and others [N, C]: pass one form on every process "
                         "(a binary problem as [N, 2] probs (1 - p, p) for top-label calibration)")
    out, off = {}, _HEADER
    for m in sums:
        out[m] = buf[off] / n
        off += 1
    if calib is not None:
        calib._set_global(buf[off:])
        require_binned(calib.state)
        out["ece"] = calib.compute()
    return {m: out[m].to(probs.device) for m in names}


def _local_stats(probs, targets, sums: list[str], calib: CalibrationError | None, from_logits: bool,
                 validate: bool) -> Tensor:
    """This process's flat float64 buffer (layout: module docstring), on the device of probs."""
    if calib is not None:  # the checks, the native pass (validating with ``validate``) and the bins
        calib.update(probs, targets)
    prep = prepare(probs, targets, from_logits=from_logits, validate=validate and calib is None, allow_empty=True,
                   indexes_targets=not validate and ("nll" in sums or "brier" in sums))
    p3 = prep.p3
    N, C = p3.shape[1], p3.shape[2]
    rows = float(N > 0)
    header = [0.0, rows, float(N), C * rows, C * C * rows, float(prep.binary) * rows]
    parts = [torch.tensor(header, dtype=torch.float64, device=p3.device)]
    parts += [_TERMS[m](prep, from_logits).sum().reshape(1) for m in sums]
    if calib is not None:
        parts.append(calib._local_state(p3.device).reshape(-1))
    return torch.cat(parts)


def _check_metrics(metrics) -> list[str]:
    """metrics as a list of distinct names from METRICS."""
    names = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(names, Sequence) or not all(isinstance(m, str) for m in names):
        raise TypeError(f"metrics must be a name or a sequence of names from {METRICS}, got {metrics!r}")
    names = list(names)
    if not names:
        raise ValueError(f"metrics is empty; pass names from {METRICS}")
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise ValueError(f"metrics has unknown names {bad}; choose from {METRICS}")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics names a metric twice: {names}")
    return names


def _classes(probs) -> int:
    return 2 if probs.dim() == 1 else probs.shape[-1]
