"""Stored parameter draws (e.g. from an SG-MCMC chain) as a posterior: :class:`SampleBuffer`."""
from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from .base import Posterior, check_int, check_generator, storage_device

__all__ = ["SampleBuffer"]

_ORDER = "oldest_first"  # state_dict layout of the draws since issue 8


class SampleBuffer(Posterior):
    """Flat copies of parameter draws of ``model`` and their Bayesian model average.

    Keeps the newest ``max_samples`` draws in a ring buffer :attr:`draws` [max_samples, P]
    (P = the trainable parameters, see :class:`pyfastbayes.nn.ParamLayout`); ``thin`` keeps every
    ``thin``-th call of :meth:`collect`. The posterior is the empirical distribution of the stored
    draws: :meth:`sample` picks stored draws uniformly at random, :meth:`predict` averages over
    all of them (or over ``n_samples`` random picks).

    A draw holding NaN or inf (a diverged chain) is stored without a host synchronisation (the
    collect stays asynchronous on the sampler's hot path): its finiteness is a device-side flag
    per ring row, and :meth:`sample`, :meth:`predict` and :meth:`state_dict` refuse the buffer
    with a ValueError naming the draw; :meth:`drop_nonfinite` removes such draws.

    Args:
        model: the network whose trainable parameters are drawn (any floating dtypes, one device).
        max_samples: capacity S_max >= 1.  thin: >= 1.
        device: where draws are kept (default: the parameters' device).
        dtype: storage dtype (default: the promoted dtype of the parameters, i.e. theirs when
            they all share one).

    Attributes:
        draws: [max_samples, P] ring storage (physical order; :meth:`stored` gives oldest to
            newest).  count: draws collected so far (also those overwritten since).
        finite: [max_samples] bool, per ring row: does the draw there hold only finite values.
    """

    kind = "SampleBuffer"

    def __init__(self, model: nn.Module, max_samples: int, thin: int = 1, device=None,
                 dtype: torch.dtype | None = None):
        max_samples = check_int(max_samples, "max_samples", 1)
        thin = check_int(thin, "thin", 1)
        super().__init__(model)
        dtype = self.layout.dtype if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device = storage_device(device, self.layout.device, "device",
                                     "pass 'cpu' to keep the draws in host memory, or None for the parameters' device")
        self.max_samples, self.thin = max_samples, thin
        self.draws = torch.empty(max_samples, self.numel, dtype=dtype, device=self.device)
        self.finite = torch.ones(max_samples, dtype=torch.bool, device=self.device)
        self.count = 0
        self._calls = 0
        self._len = 0  # rows holding draws
        self._next = 0  # ring row the next collect writes

    def __len__(self) -> int:
        return self._len

    def _rows(self) -> list[int]:
        """Physical rows of the stored draws, oldest first."""
        return [(self._next - self._len + i) % self.max_samples for i in range(self._len)]

    @torch.no_grad()
    def collect(self, model: nn.Module | None = None) -> bool:
        """Store the current parameters of ``model`` (default: :attr:`model`), subject to
        thinning; the oldest draw is overwritten when full. Returns True if stored.

        No host synchronisation: whether the stored draw is finite is recorded on the device (one
        fused read of the row, ``ops.any_nonfinite``) and checked when draws are used."""
        ps = self.layout.params(model)
        self._calls += 1
        if (self._calls - 1) % self.thin:
            return False
        row = self.draws[self._next]
        for p, o in zip(ps, self.layout.offsets):
            row[o:o + p.numel()].copy_(p.reshape(-1))
        # the stored row is checked, not the parameters: a storage dtype narrower than theirs
        # (fp16) can overflow to inf in the copy
        self.finite[self._next].copy_(ops.any_nonfinite([row]).logical_not())  # a device-side write, no sync
        self._next = (self._next + 1) % self.max_samples
        self._len = min(self._len + 1, self.max_samples)
        self.count += 1
        return True

    def stored(self) -> Tensor:
        """The stored draws [len, P], oldest first (a view when the ring has not wrapped)."""
        if self._len < self.max_samples or self._next == 0:  # rows 0 .. len - 1 in order
            return self.draws[:self._len]
        return torch.cat([self.draws[self._next:], self.draws[:self._next]])

    def params_of(self, index: int) -> dict[str, Tensor]:
        """Draw ``index`` (0 = oldest stored) as a dict name -> view [shape of the parameter]."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self):
            raise IndexError(f"draw {index!r} out of range: {len(self)} stored (0 = oldest)")
        return self.layout.unflatten(self.draws[self._rows()[index]])

    def _require_draws(self) -> None:
        """RuntimeError when empty; then :meth:`_require_finite`."""
        if len(self) == 0:
            raise RuntimeError("the SampleBuffer holds no draws yet: call collect() first")
        self._require_finite()

    def _require_finite(self) -> None:
        """ValueError naming the first stored draw with NaN/inf (one host sync; none when empty)."""
        # the stored rows are 0 .. len - 1 until the ring is full, then all of them
        if self._len and not bool(self.finite[:self._len].all()):
            bad = [i for i, f in enumerate(self.finite[self._rows()].tolist()) if not f]
            raise ValueError(f"stored draw {bad[0]} of {len(self)} (0 = oldest; {len(bad)} in all) holds NaN or inf "
                             "(a chain that diverged before the collect, or values beyond the range of the buffer's "
                             f"dtype {self.draws.dtype}), and it would poison every prediction. Call drop_nonfinite() "
                             "to remove such draws; then lower the step size (or use the sampler's nonfinite='skip'), "
                             "or store the draws in a wider dtype=")

    def drop_nonfinite(self) -> int:
        """Remove the stored draws that hold NaN or inf, keeping the others in order (oldest
        first, packed at the start of the ring); returns how many were removed. ``count`` (draws
        collected so far) is unchanged."""
        rows = self._rows()
        keep = [r for r, f in zip(rows, self.finite[rows].tolist()) if f]
        dropped = len(rows) - len(keep)
        if dropped:
            kept = self.draws[torch.tensor(keep, dtype=torch.long, device=self.device)]  # a copy: rows may move
            self.draws[:len(keep)].copy_(kept)
            self.finite.fill_(True)
            self._len, self._next = len(keep), len(keep) % self.max_samples
        return dropped

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws [n, P] picked uniformly at random (with replacement) from the stored ones
        (``generator``: a torch generator on any device, the indices drawn there; default the
        global CPU one)."""
        n = check_int(n, "n", 0)
        check_generator(generator)
        self._require_draws()
        dev = generator.device if generator is not None else "cpu"
        idx = torch.randint(len(self), (n,), generator=generator, device=dev).cpu()
        rows = torch.tensor(self._rows(), dtype=torch.long)[idx]
        return self.draws[rows.to(self.device)]

    @torch.no_grad()
    def predict(self, x, n_samples: int | None = None, *, likelihood: str = "classification", bn_loader=None,
                batch_size: int = 1024, progress: bool = False, generator: torch.Generator | None = None,
                input_fn: Callable | None = None, output_fn: Callable | None = None):
        """Bayesian model average over the stored draws: all of them, oldest first (``n_samples``
        None), or ``n_samples`` picks of :meth:`sample`. Other arguments and the outputs as in
        :meth:`Posterior.predict` ('classification' -> [N, C], 'binary' -> [N], 'regression' ->
        (mean, epistemic variance over draws)); eval mode, the model untouched."""
        self._require_draws()
        if n_samples is None:
            draws, total = (self.draws[r] for r in self._rows()), len(self)  # row views, no [S, P] copy
        else:
            total = check_int(n_samples, "n_samples", 1)
            draws = self.iter_samples(total, generator=generator)
        return self._average([(self.layout, draws)], x, total=total, likelihood=likelihood, bn_loader=bn_loader,
                             batch_size=batch_size, progress=progress, input_fn=input_fn, output_fn=output_fn)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Kind, layout, the stored draws [len, P] oldest first, count and thinning position."""
        self._require_finite()
        sd = self._state_header()
        sd.update(draws=self.stored().clone(), count=self.count, calls=self._calls, order=_ORDER)
        return sd

    def _logical_draws(self, state: dict, count: int) -> Tensor:
        """The saved draws oldest first (state dicts written before issue 8 kept the ring order)."""
        d = state.get("draws")
        if not torch.is_tensor(d) or d.dim() != 2 or d.shape[1] != self.numel:
            raise ValueError(f"state_dict draws must be a tensor [S, {self.numel}], got "
                             f"{tuple(d.shape) if torch.is_tensor(d) else type(d).__name__}")
        if "order" in state and state["order"] != _ORDER:
            raise ValueError(f"state_dict['order'] must be {_ORDER!r} (as SampleBuffer.state_dict() writes it), "
                             f"got {state['order']!r}")
        if state.get("order") == _ORDER or len(d) == 0:
            return d
        return d.roll(-(count % len(d)), 0) if count > len(d) else d

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into this buffer: exactly the saved draws, in their order.
        A buffer with fewer rows than saved draws keeps the newest ``max_samples`` of them.
        Checked first: nothing changes when the state does not fit."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        if "kind" in state:  # older state dicts had no header
            self._check_header(state)
        if "calls" in state and isinstance(state["calls"], numbers.Integral) and state["calls"] < 0:
            raise ValueError(f"state_dict calls must be >= 0 (collect() calls so far), got {state['calls']}")
        count, calls = self._check_state_count(state, "count"), self._check_state_count(state, "calls")
        d = self._logical_draws(state, count)
        if not d.is_floating_point() or d.is_meta or (d.numel() and not bool(torch.isfinite(d).all())):
            raise ValueError("state_dict draws must be floating point and finite (NaN/inf draws would poison "
                             f"every prediction), got {d.dtype}{' on meta' if d.is_meta else ''}")
        self._check_state_tensor({"draws": d}, "draws", tuple(d.shape), self.draws.dtype)
        if count < len(d):
            raise ValueError(f"state_dict count {count} is smaller than its {len(d)} draws")
        if calls < count:
            raise ValueError(f"state_dict calls {calls} is smaller than its count {count}: every stored draw "
                             "came from one collect() call")
        d = d[-self.max_samples:] if len(d) > self.max_samples else d
        with torch.no_grad():  # a saved tensor that requires grad must not make the draws part of a graph
            self.draws[:len(d)].copy_(d)
        self.finite.fill_(True)  # the loaded draws were checked finite above
        self._len, self._next = len(d), len(d) % self.max_samples
        self.count, self._calls = count, calls
