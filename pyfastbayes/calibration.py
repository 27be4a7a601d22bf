"""Calibration and Bayesian-model-averaging (BMA) metrics.

Shapes: ``N`` data points, ``C`` classes, ``S`` posterior draws. Wherever ``probs`` is accepted it
may be

- ``[N, C]``: one predictive distribution per point,
- ``[S, N, C]``: S draws; the BMA predictive is their mean, computed inside (for the binned
  metrics the native op averages each row on the fly: no ``[N, C]`` mean is materialised),
- ``[N]``: binary, the probability of class 1 (class 1 is predicted when p > 0.5).

With ``from_logits=True`` the inputs are logits (softmax per draw, then the mean over draws; a
binary ``[N]`` input is the logit of class 1). Metrics are computed in float64 and returned as
float64 tensors on the input's device.

Binning rule (uniform bins, ``n_bins = B``): bin k holds confidences x with ``k/B <= x < (k+1)/B``
evaluated exactly (not in rounded floating point); the last bin is closed, so confidence exactly
1.0 lands in bin B - 1 and confidence 0 in bin 0; a value exactly on an interior edge k/B goes to
bin k (the bin above the edge).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch.nn import functional as F

from . import ops

__all__ = ["ece", "CalibrationError", "nll", "brier", "predictive_entropy", "expected_entropy",
           "mutual_information", "accuracy", "ood_auroc", "TemperatureScaling", "VectorScaling",
           "reliability_diagram"]

_NORMS = ("l1", "l2", "max")
_BINNINGS = ("uniform", "adaptive")
_MAX_BINS = 2**24


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------
def _sum_tol(dtype: torch.dtype) -> float:
    """How far a row of probabilities may sum from 1: loose enough for rows rounded to dtype."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def _check_probs(probs, name: str = "probs") -> None:
    if not torch.is_tensor(probs):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {probs.dtype}")
    if probs.dim() not in (1, 2, 3):
        raise ValueError(f"{name} must be [N] (binary), [N, C] or [S, N, C], got shape {tuple(probs.shape)}")
    if probs.dim() >= 2 and probs.shape[-1] < 2:
        raise ValueError(f"{name} needs C >= 2 classes in its last dimension, got shape {tuple(probs.shape)}; "
                         "pass binary problems as [N] probabilities of class 1")
    if probs.dim() == 3 and probs.shape[0] < 1:
        raise ValueError(f"{name} needs S >= 1 draws, got shape {tuple(probs.shape)}")


def _as_3d(probs: Tensor, from_logits: bool) -> Tensor:
    """[N] / [N, C] / [S, N, C] -> [S, N, C] (binary [N] -> [1, N, 2]: (1 - p, p) or logits (0, l))."""
    _check_probs(probs)
    if probs.dim() == 1:
        first = torch.zeros_like(probs) if from_logits else 1 - probs
        return torch.stack([first, probs], -1).unsqueeze(0)
    return probs.unsqueeze(0) if probs.dim() == 2 else probs


def _check_targets(targets, n: int, device, name: str = "targets") -> Tensor:
    if not torch.is_tensor(targets):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{name} must hold integer class indices (or bool), got {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"{name} must be [N], got shape {tuple(targets.shape)}")
    if targets.shape[0] != n:
        raise ValueError(f"{name} has N = {targets.shape[0]} entries but probs has N = {n} points")
    if targets.device != torch.device(device):
        raise ValueError(f"{name} is on {targets.device} but probs is on {device}")
    return targets.long()


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if not 1 <= int(n_bins) <= _MAX_BINS:
        raise ValueError(f"n_bins must be in [1, {_MAX_BINS}], got {n_bins}")
    return int(n_bins)


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _raise_on_diag(diag: Tensor, p3: Tensor, y: Tensor, from_logits: bool, tol: float) -> None:
    bad_sum, neg, bad_target, nonfinite = (int(v) for v in diag.tolist())
    if nonfinite:
        raise ValueError(f"probs has NaN or infinite values in {nonfinite} rows")
    if bad_target:
        C = p3.shape[-1]
        raise ValueError(f"targets must lie in [0, {C}) (C = {C} classes); {bad_target} do not "
                         f"(min {int(y.min())}, max {int(y.max())})")
    if not from_logits and neg:
        raise ValueError(f"probs must be non-negative probabilities; {neg} rows hold negative values "
                         "(pass from_logits=True for logits)")
    if not from_logits and bad_sum:
        raise ValueError(f"probs rows must sum to 1 (within {tol:g}); {bad_sum} rows do not "
                         "(pass from_logits=True for logits)")


def _bins(probs, targets, n_bins: int, from_logits: bool, classwise: bool, validate: bool):
    """Check arguments, run the binning op. Returns (bins, p3, y)."""
    p3 = _as_3d(probs, from_logits)
    y = _check_targets(targets, p3.shape[1], p3.device)
    tol = _sum_tol(p3.dtype)
    bins, diag = ops.calibration_bins(p3, y, n_bins, from_logits, classwise, tol)
    if validate:
        _raise_on_diag(diag, p3, y, from_logits, tol)
    return bins, p3, y


def _error_from_bins(bins: Tensor, norm: str) -> Tensor:
    """Calibration error of bins [..., B, 3] -> [...] (weights: bin count over the total count)."""
    cnt, conf, hit = bins.unbind(-1)
    total = cnt.sum(-1, keepdim=True).clamp_min(1)
    gap = (hit - conf).abs() / cnt.clamp_min(1)  # |accuracy - mean confidence|; 0 for empty bins
    w = cnt / total
    if norm == "l1":
        return (w * gap).sum(-1)
    if norm == "l2":
        return (w * gap * gap).sum(-1).sqrt()
    return torch.where(cnt > 0, gap, torch.zeros_like(gap)).amax(-1)


def _mean_probs(p3: Tensor, from_logits: bool) -> Tensor:
    """BMA predictive [N, C] in float64 of [S, N, C] probabilities or logits."""
    x = p3.double()
    return (x.softmax(-1) if from_logits else x).mean(0)


def _adaptive_bins(p3: Tensor, y: Tensor, n_bins: int, from_logits: bool, classwise: bool) -> Tensor:
    """Equal-mass bins: sort by confidence (stable, ties by input order) and cut the sorted rows into
    n_bins runs whose sizes differ by at most one (the first N % n_bins runs one longer); returns
    [K, n_bins, 3] with K = C (classwise) or 1. Rows with non-finite values or bad targets are
    dropped first (they only exist when validate=False)."""
    avg = _mean_probs(p3, from_logits)
    C = avg.shape[-1]
    keep = torch.isfinite(avg).all(-1) & (y >= 0) & (y < C)
    avg, y = avg[keep], y[keep]
    if classwise:
        vals, hit = avg, F.one_hot(y, C).double()
    else:
        conf, pred = avg.max(-1)
        vals, hit = conf[:, None], (pred == y).double()[:, None]
    n, k = vals.shape
    order = vals.argsort(dim=0, stable=True)
    v, h = vals.gather(0, order), hit.gather(0, order)
    sizes = torch.full((n_bins,), n // n_bins, dtype=torch.long)
    sizes[: n % n_bins] += 1
    bin_of = torch.repeat_interleave(torch.arange(n_bins), sizes).to(avg.device)
    idx = bin_of[:, None].expand(n, k)
    out = torch.zeros(n_bins, k, 3, dtype=torch.float64, device=avg.device)
    out[..., 0].scatter_add_(0, idx, torch.ones_like(v))
    out[..., 1].scatter_add_(0, idx, v)
    out[..., 2].scatter_add_(0, idx, h)
    return out.permute(1, 0, 2)


# ---------------------------------------------------------------------------------------------
# calibration error
# ---------------------------------------------------------------------------------------------
def ece(probs: Tensor, targets: Tensor, n_bins: int = 15, norm: str = "l1", binning: str = "uniform",
        classwise: bool = False, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Expected calibration error and its relatives, for one or S averaged predictive distributions.

    Args:
        probs: [N, C] probabilities, [S, N, C] draws (averaged inside: the BMA predictive), or [N]
            binary probabilities of class 1; logits of the same shapes with ``from_logits=True``.
        targets: [N] integer (or bool) class indices in [0, C).
        n_bins: number of bins B >= 1.
        norm: 'l1' -> ECE = sum_b (n_b / N) |acc_b - conf_b|; 'l2' -> RMSCE = sqrt(sum_b (n_b / N)
            (acc_b - conf_b)^2); 'max' -> MCE = max over non-empty bins of |acc_b - conf_b|.
        binning: 'uniform' (B equal-width bins on [0, 1], the rule in the module docstring) or
            'adaptive' (equal-mass bins: ACE; rows sorted by confidence, ties kept in input order,
            cut into B runs of sizes differing by at most one).
        classwise: bin every class probability p_c against the indicator [target == c] and average
            the per-class errors over the C classes (classwise-ECE) instead of the top-label
            confidence against correctness.
        from_logits: inputs are logits (softmax per draw before averaging).
        validate: check the values (probabilities non-negative and summing to 1 within 1e-4, or
            2e-2 for fp16/bf16; targets in range; finite). Costs one host synchronisation.

    Returns:
        float64 scalar tensor on the device of ``probs``.

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    n_bins = _check_n_bins(n_bins)
    _check_choice(norm, "norm", _NORMS)
    _check_choice(binning, "binning", _BINNINGS)
    bins, p3, y = _bins(probs, targets, n_bins, from_logits, classwise, validate)
    if p3.shape[1] == 0:
        raise ValueError("probs has no data points (N = 0)")
    if binning == "adaptive":
        bins = _adaptive_bins(p3, y, n_bins, from_logits, classwise)
    if bins[..., 0].sum() == 0:
        raise ValueError("no valid rows to bin (all had bad targets or non-finite values)")
    err = _error_from_bins(bins, norm)
    return err.mean() if classwise or binning == "adaptive" else err


class CalibrationError:
    """Streaming calibration error with O(bins) state (uniform bins).

    ``update(probs, targets)`` adds a batch (shapes as in :func:`ece`: [N, C], [S, N, C] or [N]);
    ``compute()`` returns the error of everything added; ``reset()`` clears; ``sync()`` sums the
    state over the processes of a ``torch.distributed`` group, after which every rank's
    ``compute()`` gives the global value (``sync`` is idempotent: it always reduces the local
    state; a later ``update`` falls back to the local state until the next ``sync``).

    State: float64 [B, 3] (count, confidence sum, correct sum per bin), or [C, B, 3] with
    ``classwise`` (then ``num_classes`` is required, so every rank has the same shape).
    Equal-mass ('adaptive') bins need every confidence, not O(bins) state: use :func:`ece`.
    """

    def __init__(self, n_bins: int = 15, norm: str = "l1", classwise: bool = False, num_classes: int | None = None,
                 from_logits: bool = False, validate: bool = True):
        self.n_bins = _check_n_bins(n_bins)
        self.norm = _check_choice(norm, "norm", _NORMS)
        if classwise:
            if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
                raise ValueError(f"num_classes must be an int >= 2 when classwise=True, got {num_classes!r}")
            num_classes = int(num_classes)
        self.classwise, self.num_classes = bool(classwise), num_classes
        self.from_logits, self.validate = bool(from_logits), bool(validate)
        self.reset()

    def _shape(self) -> tuple[int, ...]:
        return (self.num_classes, self.n_bins, 3) if self.classwise else (self.n_bins, 3)

    def reset(self) -> None:
        """Forget everything added (local and synchronised state)."""
        self._local: Tensor | None = None
        self._global: Tensor | None = None

    @property
    def state(self) -> Tensor:
        """The bins that :meth:`compute` reads: synchronised if :meth:`sync` ran since the last update."""
        if self._global is not None:
            return self._global
        if self._local is None:
            return torch.zeros(self._shape(), dtype=torch.float64)
        return self._local

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch: probs [N, C] / [S, N, C] / [N] (see :func:`ece`), targets [N]."""
        if self.classwise and probs.dim() >= 2 and probs.shape[-1] != self.num_classes:
            raise ValueError(f"probs has C = {probs.shape[-1]} classes but num_classes = {self.num_classes}")
        if self.classwise and probs.dim() == 1 and self.num_classes != 2:
            raise ValueError(f"binary [N] probs need num_classes = 2, got {self.num_classes}")
        bins, _, _ = _bins(probs, targets, self.n_bins, self.from_logits, self.classwise, self.validate)
        if self._local is None:
            self._local = bins
        else:
            self._local += bins.to(self._local.device)
        self._global = None

    def compute(self) -> Tensor:
        """Calibration error (float64 scalar) of all data added (and synchronised)."""
        bins = self.state
        if bins[..., 0].sum() == 0:
            raise RuntimeError("CalibrationError.compute() called before any data was added")
        err = _error_from_bins(bins, self.norm)
        return err.mean() if self.classwise else err

    def sync(self, group=None) -> "CalibrationError":
        """All-reduce (sum) the local state over ``group`` (default: the world). Collective: every
        rank must call it. A rank without data contributes zeros (on the CPU for gloo, else on
        the current CUDA device)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync() needs an initialised torch.distributed process group")
        local = self._local
        if local is None:
            dev = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            local = torch.zeros(self._shape(), dtype=torch.float64, device=dev)
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        self._global = total
        return self


# ---------------------------------------------------------------------------------------------
# proper scores and BMA uncertainty
# ---------------------------------------------------------------------------------------------
def _prep(probs, from_logits: bool, validate: bool) -> Tensor:
    p3 = _as_3d(probs, from_logits)
    if validate and not from_logits:
        tol = _sum_tol(p3.dtype)
        if bool((p3 < 0).any()):
            raise ValueError("probs must be non-negative probabilities (pass from_logits=True for logits)")
        if not bool(((p3.double().sum(-1) - 1).abs() <= tol).all()):
            raise ValueError(f"probs rows must sum to 1 (within {tol:g}); pass from_logits=True for logits")
    return p3


def _check_target_range(y: Tensor, C: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError(f"targets must lie in [0, {C}), got min {int(y.min())}, max {int(y.max())}")


def nll(probs: Tensor, targets: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mean negative log-likelihood of the BMA predictive: -1/N sum_n log pbar(y_n | x_n).

    probs: [N, C], [S, N, C] (pbar = mean over draws) or binary [N]; targets: [N]. With logits the
    mean over draws is taken in log space (logsumexp), never exponentiating a whole [S, N, C].
    Probabilities are clamped at the smallest normal float64 so a zero gives a large finite value.
    Returns a float64 scalar.
    """
    p3 = _prep(probs, from_logits, validate)
    y = _check_targets(targets, p3.shape[1], p3.device)
    _check_target_range(y, p3.shape[-1])
    S = p3.shape[0]
    idx = y.view(1, -1, 1).expand(S, -1, 1)
    if from_logits:
        x = p3.double()
        logp_y = x.gather(-1, idx).squeeze(-1) - torch.logsumexp(x, -1)  # [S, N]
        logp = torch.logsumexp(logp_y, 0) - math.log(S)
    else:
        pbar = p3.gather(-1, idx).squeeze(-1).double().mean(0)
        logp = pbar.clamp_min(torch.finfo(torch.float64).tiny).log()
    return -logp.mean()


def brier(probs: Tensor, targets: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mean Brier score of the BMA predictive: 1/N sum_n sum_c (pbar_nc - [y_n = c])^2, in [0, 2].

    probs: [N, C], [S, N, C] or binary [N] (then the binary score 1/N sum_n (p_n - y_n)^2, in
    [0, 1]); targets: [N]. Returns a float64 scalar.
    """
    binary = torch.is_tensor(probs) and probs.dim() == 1
    p3 = _prep(probs, from_logits, validate)
    y = _check_targets(targets, p3.shape[1], p3.device)
    C = p3.shape[-1]
    _check_target_range(y, C)
    pbar = _mean_probs(p3, from_logits)
    score = (pbar - F.one_hot(y, C).double()).pow(2).sum(-1)
    return (score / 2 if binary else score).mean()


def accuracy(probs: Tensor, targets: Tensor, from_logits: bool = False) -> Tensor:
    """Fraction of points whose BMA prediction argmax_c pbar_nc (ties: lowest class) equals the
    target. probs: [N, C], [S, N, C] or binary [N]; targets: [N]. Returns a float64 scalar."""
    p3 = _as_3d(probs, from_logits)
    y = _check_targets(targets, p3.shape[1], p3.device)
    _check_target_range(y, p3.shape[-1])
    pred = (p3[0] if p3.shape[0] == 1 else _mean_probs(p3, from_logits)).argmax(-1)
    return (pred == y).double().mean()


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def predictive_entropy(probs: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Entropy of the BMA predictive, H[pbar_n] = -sum_c pbar_nc log pbar_nc (nats): the total
    uncertainty. probs: [N, C], [S, N, C] or binary [N]. Returns float64 [N]."""
    return _entropy(_mean_probs(_prep(probs, from_logits, validate), from_logits))


def expected_entropy(probs: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mean entropy of the individual draws, 1/S sum_s H[p_sn] (nats): the aleatoric part.
    probs: [S, N, C] ([N, C] or [N] count as S = 1). Returns float64 [N]."""
    p3 = _prep(probs, from_logits, validate).double()
    return _entropy(p3.softmax(-1) if from_logits else p3).mean(0)


def mutual_information(probs: Tensor, from_logits: bool = False, validate: bool = True) -> Tensor:
    """Mutual information between the prediction and the parameters (BALD), the epistemic part of
    the BMA uncertainty: H[pbar_n] - 1/S sum_s H[p_sn] >= 0 (clamped at 0 against rounding).
    probs: [S, N, C] (S = 1 gives 0). Returns float64 [N]."""
    p3 = _prep(probs, from_logits, validate).double()
    p = p3.softmax(-1) if from_logits else p3
    return (_entropy(p.mean(0)) - _entropy(p).mean(0)).clamp_min(0)


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the ROC curve for telling out-of-distribution points from in-distribution ones by
    a score that is larger for OOD points (e.g. predictive entropy or mutual information).

    scores_in: [N_in], scores_out: [N_out], both non-empty and finite. Equals
    P(score_out > score_in) + 1/2 P(score_out = score_in) (Mann-Whitney U, ties counted half).
    Returns a float64 scalar on the inputs' device.
    """
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        if not torch.is_tensor(s):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
        if s.is_complex() or s.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got {s.dtype}")
        if s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
        if s.is_floating_point() and not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
    if scores_in.device != scores_out.device:
        raise ValueError(f"scores_in is on {scores_in.device} but scores_out on {scores_out.device}")
    n_in, n_out = scores_in.numel(), scores_out.numel()
    s = torch.cat([scores_in.double(), scores_out.double()])
    _, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid_rank = ends - (counts.double() - 1) / 2  # 1-based rank, averaged over ties
    rank_out = mid_rank[inv[n_in:]].sum()
    return (rank_out - n_out * (n_out + 1) / 2) / (n_in * n_out)


# ---------------------------------------------------------------------------------------------
# recalibration
# ---------------------------------------------------------------------------------------------
def _check_logits(logits, targets) -> tuple[Tensor, Tensor]:
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with N >= 1, C >= 2, got shape {tuple(logits.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits holds NaN or infinite values")
    y = _check_targets(targets, logits.shape[0], logits.device)
    _check_target_range(y, logits.shape[1])
    return logits.detach().double(), y


class TemperatureScaling:
    """Temperature scaling (Guo et al. 2017): one scalar T > 0, softmax(logits / T), fitted by
    minimising the NLL on held-out data.

    ``method='newton'``: the NLL is convex in beta = 1/T, with derivative mean(E_p[z] - z_y) and
    second derivative mean(Var_p[z]); damped Newton steps on beta (halved until the NLL does not
    increase, beta kept > 0). ``method='lbfgs'``: torch.optim.LBFGS on log T. Both run in float64
    on the logits' device.

    Attributes: ``temperature`` (float64 scalar tensor, 1 before :meth:`fit`), ``n_iter``.
    """

    def __init__(self, method: str = "newton", max_iter: int = 100, tol: float = 1e-10):
        self.method = _check_choice(method, "method", ("newton", "lbfgs"))
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.temperature = torch.ones((), dtype=torch.float64)
        self.n_iter = 0

    @staticmethod
    def _nll(z: Tensor, zy: Tensor, beta: Tensor) -> Tensor:
        return (torch.logsumexp(beta * z, -1) - beta * zy).mean()

    def fit(self, logits: Tensor, targets: Tensor) -> "TemperatureScaling":
        """Fit T on logits [N, C] and integer targets [N]; returns self."""
        z, y = _check_logits(logits, targets)
        zy = z.gather(1, y[:, None]).squeeze(1)
        if self.method == "newton":
            beta = torch.ones((), dtype=torch.float64, device=z.device)
            f = self._nll(z, zy, beta)
            it = 0
            for it in range(1, self.max_iter + 1):
                p = torch.softmax(beta * z, -1)
                ez = (p * z).sum(-1)
                g = (ez - zy).mean()
                h = (p * (z - ez[:, None]) ** 2).sum(-1).mean()
                step = g / h.clamp_min(1e-300)
                new = beta - step
                new = torch.where(new > 0, new, beta / 4)  # keep beta > 0
                f_new = self._nll(z, zy, new)
                for _ in range(50):  # convex in beta: backtrack until no increase
                    if bool(f_new <= f):
                        break
                    new = (beta + new) / 2
                    f_new = self._nll(z, zy, new)
                done = bool((new - beta).abs() <= self.tol * (1 + beta.abs()))
                beta, f = new, f_new
                if done:
                    break
            self.temperature, self.n_iter = 1 / beta, it
        else:
            log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
            opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-12,
                                    tolerance_change=self.tol, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(z * torch.exp(-log_t), y)
                loss.backward()
                return loss

            opt.step(closure)
            self.temperature = log_t.detach().exp()
            self.n_iter = opt.state[log_t]["n_iter"]
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits [..., C] = logits / T (dtype and device of ``logits``)."""
        return logits / self.temperature.to(device=logits.device, dtype=logits.dtype)


class VectorScaling:
    """Vector scaling (Guo et al. 2017): per-class scale w [C] and bias b [C], softmax(w * z + b),
    fitted by NLL with LBFGS in float64 on the logits' device (a convex problem).

    Attributes: ``weight`` [C], ``bias`` [C] (float64; None before :meth:`fit`).
    """

    def __init__(self, max_iter: int = 200, tol: float = 1e-12):
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, logits: Tensor, targets: Tensor) -> "VectorScaling":
        """Fit on logits [N, C] and integer targets [N]; returns self."""
        z, y = _check_logits(logits, targets)
        C = z.shape[1]
        w = torch.ones(C, dtype=torch.float64, device=z.device, requires_grad=True)
        b = torch.zeros(C, dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-10,
                                tolerance_change=self.tol, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z * w + b, y)
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits [..., C] = w * logits + b (dtype and device of ``logits``)."""
        if self.weight is None:
            raise RuntimeError("VectorScaling.transform() called before fit()")
        if logits.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"logits has C = {logits.shape[-1]} classes, fitted with {self.weight.shape[0]}")
        w = self.weight.to(device=logits.device, dtype=logits.dtype)
        return logits * w + self.bias.to(device=logits.device, dtype=logits.dtype)


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def reliability_diagram(probs: Tensor, targets: Tensor, n_bins: int = 15, ax=None, from_logits: bool = False,
                        title: str | None = None):
    """Reliability diagram of the top-label confidence (uniform bins, as :func:`ece`).

    Bars: accuracy per confidence bin, over the diagonal (perfect calibration); shaded: the gap
    between each bin's accuracy and its mean confidence; below: the histogram of confidences
    (fraction of points per bin). ``ax`` may be None (a new figure with both panels), a pair
    (bars axis, histogram axis), or one axis (the histogram then sits in its lower quarter, on a
    twin axis without ticks). The ECE is in the legend. probs: [N, C], [S, N, C] or [N]; targets: [N]. Returns the matplotlib Figure;
    never calls ``show()``.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    n_bins = _check_n_bins(n_bins)
    bins, _, _ = _bins(probs, targets, n_bins, from_logits, False, True)
    bins = bins.cpu()
    cnt, conf_sum, hit_sum = bins.unbind(-1)
    nonempty = cnt > 0
    acc = torch.where(nonempty, hit_sum / cnt.clamp_min(1), torch.zeros_like(cnt))
    conf = torch.where(nonempty, conf_sum / cnt.clamp_min(1), torch.zeros_like(cnt))
    frac = cnt / cnt.sum().clamp_min(1)
    err = float(_error_from_bins(bins, "l1"))
    width = 1.0 / n_bins
    left = torch.arange(n_bins, dtype=torch.float64) * width
    acc, conf, frac, left = acc.numpy(), conf.numpy(), frac.numpy(), left.numpy()
    twin = False
    if ax is None:
        fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
    elif isinstance(ax, (tuple, list)):
        if len(ax) != 2:
            raise ValueError(f"ax must be one matplotlib Axes or a pair of them, got {len(ax)} items")
        ax, ax_hist = ax
        fig = ax.figure
    else:
        fig, ax_hist, twin = ax.figure, ax.twinx(), True
    m = nonempty.numpy()
    ax.bar(left[m], acc[m], width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
           label=f"accuracy (ECE = {err:.4f})")
    lo, hi = np.minimum(acc, conf), np.maximum(acc, conf)
    ax.bar(left[m], (hi - lo)[m], bottom=lo[m], width=width, align="edge", color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    if title:
        ax.set_title(title)
    ax_hist.bar(left, frac, width=width, align="edge", color="tab:gray", alpha=0.5)
    ax_hist.set_ylabel("fraction of points")
    ax_hist.set_xlim(0, 1)
    if twin:  # keep the histogram in the lower quarter, under the bars
        ax_hist.set_ylim(0, 4 * max(float(frac.max()), 1e-12))
        ax_hist.set_yticks([])
        ax_hist.set_ylabel("")
        ax.set_xlabel("confidence (grey: histogram)")
    else:
        ax_hist.set_xlabel("confidence")
    return fig
