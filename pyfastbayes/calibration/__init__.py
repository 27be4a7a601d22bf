"""Calibration and Bayesian-model-averaging (BMA) metrics.

Shapes: ``N`` data points, ``C`` classes, ``S`` posterior draws. Wherever ``probs`` is accepted it
may be

- ``[N, C]``: one predictive distribution per point,
- ``[S, N, C]``: S draws; the BMA predictive is their mean, computed inside (for the binned
  metrics the native op averages each row on the fly: no ``[N, C]`` mean is materialised),
- ``[N]``: binary, the probability p of class 1 (class 1 is predicted when p > 0.5).

Binary ``[N]`` inputs are calibrated for the positive class: :func:`ece`,
:class:`CalibrationError` and :func:`reliability_diagram` bin p and compare each bin's mean p
with the frequency of y == 1 in it, as torchmetrics' ``binary_calibration_error`` and netcal's
ECE do. ``[N, C]`` inputs are calibrated for the top label (max_c p_c against correctness); the
top-label calibration of a binary problem is that of its ``[N, 2]`` input (1 - p, p).

With ``from_logits=True`` the inputs are logits (softmax per draw, then the mean over draws; a
binary ``[N]`` input is the logit of class 1). Metrics are computed in float64 and returned as
float64 tensors on the input's device.

Binning rule (uniform bins, ``n_bins = B``): bin k holds confidences x with ``k/B <= x < (k+1)/B``
evaluated exactly (not in rounded floating point); the last bin is closed, so confidence exactly
1.0 lands in bin B - 1 and confidence 0 in bin 0; a value exactly on an interior edge k/B goes to
bin k (the bin above the edge).

A test set split by rows over the processes of a ``torch.distributed`` group: :func:`evaluate`
(probs [N_r, C] / [S, N_r, C] / [N_r] and targets [N_r] on process r, N_r >= 0) returns on every
process the nll, accuracy, ece and Brier score of the whole test set, from one all-reduce of
their sufficient statistics; without torch.distributed it is the local metrics.

Modules: :mod:`.metrics` (ece, nll, brier, accuracy, entropies, mutual information, OOD AUROC),
:mod:`.streaming` (:class:`CalibrationError`), :mod:`.sharded` (:func:`evaluate`),
:mod:`.recalibration` (temperature and vector
scaling), :mod:`.plot` (reliability diagram); argument and value checks shared by all live in
:mod:`._checks`, the binning shared by ece, the streaming metric and the plot in :mod:`._binning`.
"""
from .metrics import (accuracy, brier, ece, expected_entropy, mutual_information, nll, ood_auroc,
                      predictive_entropy)
from .plot import reliability_diagram
from .recalibration import TemperatureScaling, VectorScaling
from .sharded import evaluate
from .streaming import CalibrationError

__all__ = ["ece", "CalibrationError", "nll", "brier", "predictive_entropy", "expected_entropy",
           "mutual_information", "accuracy", "ood_auroc", "TemperatureScaling", "VectorScaling",
           "reliability_diagram", "evaluate"]
