"""Streaming calibration error with O(bins) state, mergeable across processes."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import CALIB_STATS
from ._binning import error_from_bins, mode_of, split_stats, uniform_bins
from ._checks import NORMS, check_bool, check_choice, check_int, check_n_bins, prepare

__all__ = ["CalibrationError"]


class CalibrationError:
    """Streaming calibration error with O(bins) state (uniform bins).

    ``update(probs, targets)`` adds a batch (shapes as in :func:`ece`: [N, C], [S, N, C] or [N];
    binary [N] batches are binned as in :func:`ece`, p of class 1 against y == 1, so all batches
    of one metric must be binary [N] or all [N, C] unless ``classwise``);
    ``compute()`` returns the error of everything added; ``reset()`` clears; ``sync()`` sums the
    state over the processes of a ``torch.distributed`` group, after which every rank's
    ``compute()`` gives the global value (``sync`` is idempotent: it always reduces the local
    state; a later ``update`` falls back to the local state until the next ``sync``).

    State: float64 [B, 3] (count, confidence sum, correct sum per bin), or [C, B, 3] with
    ``classwise`` (then ``num_classes`` is required, so every rank has the same shape).
    Equal-mass ('adaptive') bins need every confidence, not O(bins) state: use :func:`ece`.

    Args:
        n_bins: B uniform bins on [0, 1].  norm: 'l1' (ECE), 'l2' (RMS) or 'max' (MCE).
        classwise: the mean over classes of each class's error (needs ``num_classes``).
        num_classes: C, checked against every batch when given.
        from_logits: the batches hold logits (softmax / sigmoid taken per draw).
        validate: check each batch's values as :func:`ece` does (one host sync per batch).
    """

    def __init__(self, n_bins: int = 15, norm: str = "l1", classwise: bool = False, num_classes: int | None = None,
                 from_logits: bool = False, validate: bool = True):
        self.n_bins = check_n_bins(n_bins)
        self.norm = check_choice(norm, "norm", NORMS)
        classwise = check_bool(classwise, "classwise")
        if classwise and num_classes is None:
            raise ValueError("num_classes must be given when classwise=True (every rank needs the same "
                             "[C, B, 3] state): pass num_classes=C")
        if num_classes is not None:
            num_classes = check_int(num_classes, "num_classes", 2)
        self.classwise, self.num_classes = classwise, num_classes
        self.from_logits, self.validate = check_bool(from_logits, "from_logits"), check_bool(validate, "validate")
        self.reset()

    def _shape(self) -> tuple[int, ...]:
        return ((self.num_classes, self.n_bins, CALIB_STATS.size) if self.classwise
                else (self.n_bins, CALIB_STATS.size))

    def reset(self) -> None:
        """Forget everything added (local and synchronised state)."""
        self._local: Tensor | None = None
        self._global: Tensor | None = None
        self._mode: str | None = None  # what the state bins: 'top', 'positive' or 'classwise'

    @property
    def state(self) -> Tensor:
        """The bins that :meth:`compute` reads: synchronised if :meth:`sync` ran since the last update."""
        if self._global is not None:
            return self._global
        if self._local is None:
            return torch.zeros(self._shape(), dtype=torch.float64)
        return self._local

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch: probs [N, C] / [S, N, C] / [N] (see :func:`ece`), targets [N]. The same
        checks as :func:`ece` (one native pass); an empty batch (N = 0) adds nothing."""
        prep = prepare(probs, targets, from_logits=self.from_logits, validate=False, allow_empty=True)
        C = prep.p3.shape[-1]
        if prep.p3.shape[1] == 0:  # (an empty shard may have any C: it adds nothing)
            return
        if self.num_classes is not None and C != self.num_classes:  # given: checked in every mode
            what = "binary [N] probs have" if prep.binary else "probs has"
            raise ValueError(f"{what} C = {C} classes but num_classes = {self.num_classes}; pass num_classes={C} "
                             f"to the constructor")
        mode = mode_of(prep, self.classwise)
        if self._mode is not None and mode != self._mode:
            kinds = {"top": "[N, C] probs (top-label calibration)", "positive": "binary [N] probs (calibration of "
                     "class 1)"}
            raise ValueError(f"CalibrationError got {kinds[mode]} after {kinds[self._mode]}; the two measure "
                             f"different things: pass every batch in one form (a binary problem as [N, 2] probs "
                             f"for top-label calibration) or call reset()")
        b = uniform_bins(prep, self.n_bins, self.from_logits, mode, self.validate)
        self._mode = mode
        if self._local is None:
            self._local = b
        else:
            self._local += b.to(self._local.device)
        self._global = None

    def compute(self) -> Tensor:
        """Calibration error (float64 scalar) of all data added (and synchronised)."""
        b = self.state
        if split_stats(b)[0].sum() == 0:
            raise RuntimeError("CalibrationError.compute() called before any data was added: no data points "
                               "(N = 0); call update(probs, targets) first")
        err = error_from_bins(b, self.norm)
        return err.mean() if self.classwise else err

    def sync(self, group=None) -> "CalibrationError":
        """All-reduce (sum) the local state over ``group`` (default: the world). Collective: every
        rank must call it. A rank without data contributes zeros (on the CPU for gloo, else on
        the current CUDA device)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync() needs an initialised torch.distributed process group")
        local = self._local_state(collective_device(group))
        # two more numbers in the same all-reduce: how many ranks bin top-label [N, C] batches and
        # how many binary [N] ones (their bins measure different things and must not be summed)
        modes = local.new_tensor([float(self._mode == "top"), float(self._mode == "positive")])
        total = torch.cat([local.flatten(), modes])
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        n_top, n_positive = (int(v) for v in total[-2:].tolist())
        if n_top and n_positive:  # every rank sees the same sums: all raise
            raise ValueError(f"CalibrationError.sync(): {n_top} rank(s) added [N, C] probs (top-label calibration) "
                             f"and {n_positive} binary [N] probs (calibration of class 1); the two measure different "
                             "things and cannot be summed: pass every batch on every rank in one form")
        self._global = total[:-2].view_as(local)
        return self

    # ---- what sync() reduces and stores; also used by :func:`~pyfastbayes.calibration.evaluate`,
    # ---- which reduces this state inside its one flat buffer ----------------------------------------
    def _local_state(self, device) -> Tensor:
        """The local bins (without ``sync``), or zeros of the state's shape on ``device`` when no
        data was added."""
        if self._local is None:
            return torch.zeros(self._shape(), dtype=torch.float64, device=device)
        return self._local

    def _set_global(self, total: Tensor) -> None:
        """Take ``total`` (the state summed over the processes) as the state :meth:`compute` reads."""
        self._global = total.reshape(self._shape())


def collective_device(group=None) -> str:
    """Where a tensor must live for a collective over ``group``: the current CUDA device for NCCL,
    else the CPU (gloo, mpi)."""
    import torch.distributed as dist

    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"
