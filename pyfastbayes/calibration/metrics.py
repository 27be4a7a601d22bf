"""Calibration error, proper scores and BMA uncertainty (shapes and conventions: see the package
docstring of :mod:`pyfastbayes.calibration`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._binning import (adaptive_bins, error_from_bins, error_from_host_bins, mean_probs, mode_of, require_binned,
                       uniform_bins)
from ._checks import BINNINGS, NORMS, Prepared, check_bool, check_choice, check_n_bins, check_scores, prepare, sum_tol

__all__ = ["ece", "nll", "brier", "accuracy", "predictive_entropy", "expected_entropy", "mutual_information",
           "ood_auroc"]

_LOG_TINY = math.log(torch.finfo(torch.float64).tiny)  # log of the smallest normal float64


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15, norm: str = "l1", binning: str = "uniform",
        classwise: bool = False, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Expected calibration error and its relatives, for one or S averaged predictive distributions.

    What is binned: for [N, C] and [S, N, C] inputs the top-label confidence max_c pbar_c against
    correctness [argmax_c pbar_c == y]; for binary [N] inputs the probability p of class 1 against
    the frequency of y == 1 (positive-class calibration, as torchmetrics'
    ``binary_calibration_error`` and netcal's ECE measure it; pass [N, 2] probabilities
    (1 - p, p) for the top-label calibration of a binary problem).

    Args:
        probs: [N, C] probabilities, [S, N, C] draws (averaged inside: the BMA predictive), or [N]
            binary probabilities of class 1; logits of the same shapes with ``from_logits=True``.
        targets: [N] integer (or bool) class indices in [0, C) (binary: 0 or 1).
        n_bins: number of bins B >= 1.
        norm: 'l1' -> ECE = sum_b (n_b / N) |acc_b - conf_b|; 'l2' -> RMSCE = sqrt(sum_b (n_b / N)
            (acc_b - conf_b)^2); 'max' -> MCE = max over non-empty bins of |acc_b - conf_b|.
        binning: 'uniform' (B equal-width bins on [0, 1], the rule in the module docstring) or
            'adaptive' (equal-mass bins: ACE; rows sorted by the binned value and cut into B runs
            of sizes differing by at most one, except that equal values stay together in the bin
            where their run starts, so bins may hold more or fewer rows, or none).
        classwise: bin every class probability p_c against the indicator [target == c] and average
            the per-class errors over the C classes (classwise-ECE; binary [N]: over both
            classes) instead of the top-label confidence (or, for [N], p) as above.
        from_logits: inputs are logits (softmax per draw before averaging).
        validate: check the values (probabilities non-negative and summing to 1 within 1e-4, or
            2e-2 for fp16/bf16; targets in range; finite; with logits: no NaN, no +inf, not all
            -inf in a row). The check reads the diagnostics of the same native pass that bins;
            it costs one host synchronisation. With ``validate=False`` bad rows are skipped.

    Returns:
        float64 scalar tensor on the device of ``probs``.

    Raises:
        TypeError / ValueError naming the offending argument and the fix; ValueError for
        N = 0 ("no data points (N = 0)").
    """
    n_bins = check_n_bins(n_bins)
    check_choice(norm, "norm", NORMS)
    check_choice(binning, "binning", BINNINGS)
    classwise, validate = check_bool(classwise, "classwise"), check_bool(validate, "validate")
    prep = prepare(probs, targets, from_logits=from_logits, validate=False)  # values: in the binning pass
    mode = mode_of(prep, classwise)
    if binning == "uniform" and mode != "classwise":  # one set of bins: the error in Python on the host
        rows = uniform_bins(prep, n_bins, from_logits, mode, validate, host=True).tolist()
        return torch.full((), error_from_host_bins(rows, norm), dtype=torch.float64, device=probs.device)
    if binning == "uniform":  # the bins come to the host with the checks' diagnostics (one sync),
        b = uniform_bins(prep, n_bins, from_logits, mode, validate, host=True)  # the error is taken there
    else:
        if validate:  # the value checks of the native pass (one bin: its bins are not used)
            uniform_bins(prep, 1, from_logits, mode, True)
        b = adaptive_bins(prep, n_bins, from_logits, mode)
    require_binned(b)
    err = error_from_bins(b, norm)
    err = err.mean() if mode == "classwise" or binning == "adaptive" else err
    return err.to(probs.device)


def nll(probs: Tensor, targets: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mean negative log-likelihood of the BMA predictive: -1/N sum_n log pbar(y_n | x_n).

    probs: [N, C], [S, N, C] (pbar = mean over draws) or binary [N]; targets: [N]. With logits the
    mean over draws is taken in log space (logsumexp), never exponentiating a whole [S, N, C].
    A probability of 0 (or a -inf logit of the target), log pbar = -inf, is taken as the log of
    the smallest normal float64, the same large finite value (708.4) on both paths; finite log
    probabilities are kept as they are (a logit gap of 1000 gives 1000).
    ``validate`` as in :func:`ece` (one native pass; NaN, +inf and all -inf logit rows raise);
    without it the target range is still checked, but a bad row is not skipped as in
    :func:`ece`: its NaN reaches the mean (brier and the entropies alike; accuracy counts such a
    row by its argmax). ``validate=False`` is for data known to be clean. Returns a float64 scalar.
    """
    prep = prepare(probs, targets, from_logits=from_logits, validate=validate, indexes_targets=True)
    return nll_terms(prep, from_logits).mean()


def brier(probs: Tensor, targets: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mean Brier score of the BMA predictive: 1/N sum_n sum_c (pbar_nc - [y_n = c])^2, in [0, 2].

    probs: [N, C], [S, N, C] or binary [N] (then the binary score 1/N sum_n (p_n - y_n)^2, in
    [0, 1]); targets: [N]. ``validate`` as in :func:`nll` (bad rows not skipped when False).
    Returns a float64 scalar.
    """
    prep = prepare(probs, targets, from_logits=from_logits, validate=validate, indexes_targets=True)
    return brier_terms(prep, from_logits).mean()


def accuracy(probs: Tensor, targets: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Fraction of points whose BMA prediction argmax_c pbar_nc (ties: lowest class) equals the
    target. probs: [N, C], [S, N, C] or binary [N] (class 1 predicted when p > 0.5); targets: [N].
    ``validate`` as in :func:`ece`. Returns a float64 scalar."""
    prep = prepare(probs, targets, from_logits=from_logits, validate=validate)
    return hits(prep, from_logits).double().mean()


# ---- per-point terms of nll, brier and accuracy: each metric is the mean of its terms; the ----------
# ---- sharded evaluation (:mod:`.sharded`) sums them on every process instead ------------------------
def nll_terms(prep: Prepared, from_logits: bool) -> Tensor:
    """-log pbar(y_n | x_n) per point, float64 [N] (N = 0 allowed), clamped as :func:`nll` says."""
    p3, y = prep.p3, prep.y
    S = p3.shape[0]
    idx = y.view(1, -1, 1).expand(S, -1, 1)
    if from_logits:
        x = p3.double()
        logp_y = x.gather(-1, idx).squeeze(-1) - torch.logsumexp(x, -1)  # [S, N]
        logp = torch.logsumexp(logp_y, 0) - math.log(S)
    else:
        logp = p3.gather(-1, idx).squeeze(-1).double().mean(0).log()
    return -torch.where(torch.isneginf(logp), _LOG_TINY, logp)  # (finite log-probabilities exact)


def brier_terms(prep: Prepared, from_logits: bool) -> Tensor:
    """Brier score per point, float64 [N]: sum_c (pbar_nc - [y_n = c])^2, halved for binary [N]."""
    pbar = mean_probs(prep.p3, from_logits)
    # (1 - p_y)^2 + sum_{c != y} p_c^2: no cancellation where p_y is near 1 (sum p^2 - 2 p_y + 1 had it)
    py = pbar.gather(-1, prep.y[:, None]).squeeze(-1)
    score = (1 - py).square() + pbar.square().scatter(-1, prep.y[:, None], 0).sum(-1)
    return score / 2 if prep.binary else score


def hits(prep: Prepared, from_logits: bool) -> Tensor:
    """[argmax_c pbar_nc == y_n] per point, bool [N] (ties: lowest class)."""
    p3 = prep.p3
    pred = (p3[0] if p3.shape[0] == 1 else mean_probs(p3, from_logits)).argmax(-1)
    return pred == prep.y


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def predictive_entropy(probs: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Entropy of the BMA predictive, H[pbar_n] = -sum_c pbar_nc log pbar_nc (nats): the total
    uncertainty. probs: [N, C], [S, N, C] or binary [N]; ``validate`` as in :func:`ece`.
    Returns float64 [N]."""
    p3 = prepare(probs, from_logits=from_logits, validate=validate).p3
    return _entropy(mean_probs(p3, from_logits))


def expected_entropy(probs: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mean entropy of the individual draws, 1/S sum_s H[p_sn] (nats): the aleatoric part.
    probs: [S, N, C] ([N, C] or [N] count as S = 1); ``validate`` as in :func:`ece`. Returns
    float64 [N]."""
    p3 = prepare(probs, from_logits=from_logits, validate=validate).p3
    _check_draws(p3, from_logits, validate)
    p3 = p3.double()
    return _entropy(p3.softmax(-1) if from_logits else p3).mean(0)


def mutual_information(probs: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mutual information between the prediction and the parameters (BALD), the epistemic part of
    the BMA uncertainty: H[pbar_n] - 1/S sum_s H[p_sn] >= 0 (clamped at 0 against rounding).
    probs: [S, N, C] (S = 1 gives 0); ``validate`` as in :func:`ece`. Returns float64 [N]."""
    p3 = prepare(probs, from_logits=from_logits, validate=validate).p3
    _check_draws(p3, from_logits, validate)
    p3 = p3.double()
    p = p3.softmax(-1) if from_logits else p3
    return (_entropy(p.mean(0)) - _entropy(p).mean(0)).clamp_min(0)


def _check_draws(p3: Tensor, from_logits: bool, validate: bool) -> None:
    """The validation pass checks the mean over draws; the per-draw entropies need every draw's
    rows to sum to 1 as well (two draws off by +-0.2 average to a valid row)."""
    if not validate or from_logits or p3.shape[0] < 2 or p3.shape[1] == 0:
        return
    off = (p3.double().sum(-1) - 1).abs() > sum_tol(p3.dtype)  # [S, N]
    if bool(off.any()):
        s, n = (int(i) for i in off.nonzero()[0])
        raise ValueError(f"probs rows must sum to 1 in every draw (within {sum_tol(p3.dtype):g}); draw {s}, row {n} "
                         f"sums to {float(p3[s, n].double().sum()):.6g} ({int(off.sum())} rows of the [S, N] draws do "
                         "not): normalise each draw with p / p.sum(-1, keepdim=True), or pass from_logits=True")


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the ROC curve for telling out-of-distribution points from in-distribution ones by
    a score that is larger for OOD points (e.g. predictive entropy or mutual information).

    scores_in: [N_in], scores_out: [N_out], both non-empty (else "no data points (N = 0)") and
    finite. Equals
    P(score_out > score_in) + 1/2 P(score_out = score_in) (Mann-Whitney U, ties counted half).
    Returns a float64 scalar on the inputs' device.
    """
    check_scores(scores_in, "scores_in")
    check_scores(scores_out, "scores_out")
    if scores_in.device != scores_out.device:
        raise ValueError(f"scores_in is on {scores_in.device} but scores_out on {scores_out.device}; move one of them")
    n_in, n_out = scores_in.numel(), scores_out.numel()
    # integer scores compared as int64 (as float64, distinct values beyond 2^53 would tie)
    common = torch.promote_types(scores_in.dtype, scores_out.dtype)
    common = torch.float64 if common.is_floating_point else torch.int64
    s = torch.cat([scores_in.to(common), scores_out.to(common)])
    _, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid_rank = ends - (counts.double() - 1) / 2  # 1-based rank, averaged over ties
    rank_out = mid_rank[inv[n_in:]].sum()
    return (rank_out - n_out * (n_out + 1) / 2) / (n_in * n_out)
