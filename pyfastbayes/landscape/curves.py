"""Mode connectivity: low-loss curves between two trained networks (Garipov et al. 2018,
"Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs").

A curve is a path theta(t), t in [0, 1], in the flat [P] parameter space of one architecture
(:class:`~pyfastbayes.nn.params.ParamLayout`) with fixed ends theta(0) = the parameters of
``model_a`` and theta(1) = those of ``model_b``, and trainable interior control points, the
*bends* (one ``nn.Parameter`` [P] each, initialised on the straight line between the ends):

- :class:`BezierCurve`: theta(t) = sum_k B_k^n(t) theta_k with the Bernstein polynomials
  B_k^n(t) = C(n, k) t^k (1 - t)^(n - k) of degree n = n_bends + 1 (:func:`bezier_basis`);
  n_bends = 0 is the straight line (:func:`linear_path`), n_bends = 1 the quadratic curve of the
  paper.
- :class:`PolyChain`: the piecewise-linear path a -> bend_1 -> ... -> bend_m -> b, the nodes at
  t = k / (m + 1).

The architecture is not rewritten: ``curve(x, t)`` runs ``model_a``'s own forward through
``torch.func.functional_call`` with the parameters theta(t), so the gradients of a loss reach the
bends (and nothing else). :meth:`~_Curve.fit` trains the bends on the expected loss over
t ~ U(0, 1) (one t per batch, as in the paper); :meth:`~_Curve.evaluate` measures the loss along
the curve on a grid of t; :func:`plot_curve` draws it next to the straight line.

BatchNorm (Garipov et al.'s recipe): the ends' running statistics do not fit theta(t), so they are
not interpolated. :meth:`~_Curve.fit` trains with batch statistics (the template in train mode;
the running statistics it would update are scratch copies: model_a is not changed), and
:meth:`~_Curve.evaluate` recomputes them for every t over the data (``bn_data``, default the
evaluated data: one pass in train mode with the cumulative average, all t of a chunk in one
vmapped pass, as :func:`~pyfastbayes.landscape.grid`'s bn='recompute'). For outputs at one t in
eval mode, pass ``curve(x, t, bn_stats=curve.bn_statistics(t, data))``.

Not supported (refused with an error, never a silent wrong answer): other running statistics
(InstanceNorm with ``track_running_stats``), frozen (``requires_grad=False``) parameters or buffers
other than BatchNorm statistics that differ between the two models (their values along the curve
would be undefined), integer parameters.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..calibration._checks import check_generator, check_int
from ..curvature._model_data import as_batches, iterate, shuffles
from ..nn import ModeGuard
from ..nn.batchnorm import BN_STATS, bn_keys
from ..nn.params import ParamLayout, _difference
from ..nn.stateless import functional_call
from ._losses import refuse_sum
from ._pairs import same_fixed_tensors
from .directions import refuse_meta
from .grid import _failed_forward, _Plan, bn_statistics, data_sums, default_chunk, recompute_layers

__all__ = ["BezierCurve", "PolyChain", "linear_path", "bezier_basis", "plot_curve"]


# ---- checks ---------------------------------------------------------------------------------------------
def _check_t(t, name: str = "t") -> float:
    """t as a Python float in [0, 1] (a number or a 0-dim tensor)."""
    if torch.is_tensor(t):
        if t.numel() != 1 or t.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool:
            raise TypeError(f"{name} must be a number in [0, 1], got a bool tensor")
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(t).__name__}")
    t = float(t)
    if not (0.0 <= t <= 1.0):  # also catches nan
        raise ValueError(f"{name} must lie in [0, 1] (the curve is defined between the two models), got {t}")
    return t


def _check_ts(ts) -> list[float]:
    """The evaluation grid: a 1-D tensor or a sequence of numbers in [0, 1], at least one."""
    if torch.is_tensor(ts):
        if ts.dim() != 1:
            raise ValueError(f"ts must be a 1-D tensor [T] or a sequence of numbers, got shape {tuple(ts.shape)}")
        ts = ts.tolist()
    elif not isinstance(ts, Sequence) or isinstance(ts, (str, bytes)):
        raise TypeError(f"ts must be a 1-D tensor [T] or a sequence of numbers in [0, 1], got {type(ts).__name__}")
    if len(ts) == 0:
        raise ValueError("ts is empty: give at least one t in [0, 1]")
    return [_check_t(t, f"ts[{i}]") for i, t in enumerate(ts)]


def _check_pair(model_a: nn.Module, model_b: nn.Module) -> None:
    """Refuse what a curve in the flat trainable-parameter space cannot represent: other module
    structures, running statistics other than BatchNorm's, integer parameters, differing frozen
    tensors/buffers (BatchNorm statistics excepted)."""
    for which, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{which} must be a torch.nn.Module, got {type(m).__name__}")
        refuse_meta(m, which)
    mods_a, mods_b = list(model_a.named_modules()), list(model_b.named_modules())
    if len(mods_a) != len(mods_b):
        raise ValueError(f"model_a and model_b have different architectures: {len(mods_a)} modules vs {len(mods_b)}")
    for (na, ma), (nb, mb) in zip(mods_a, mods_b):
        if na != nb or type(ma) is not type(mb):
            raise ValueError(f"model_a and model_b have different architectures: module {na or '<root>'!r} "
                             f"({type(ma).__name__}) vs {nb or '<root>'!r} ({type(mb).__name__})")
        if (isinstance(ma, nn.modules.batchnorm._NormBase) and ma.track_running_stats
                and not isinstance(ma, nn.modules.batchnorm._BatchNorm)):
            raise ValueError(f"module {na!r} ({type(ma).__name__}) keeps running statistics: curves recompute "
                             "BatchNorm's along the curve, not these (use track_running_stats=False)")
    for which, m in (("model_a", model_a), ("model_b", model_b)):
        for n, p in m.named_parameters():
            if not p.is_floating_point():
                raise TypeError(f"{which} parameter {n!r} has dtype {p.dtype}: curves interpolate floating-point "
                                "parameters only")
    same_fixed_tensors(model_a, model_b, "the curve")


def bezier_basis(t, degree: int) -> Tensor:
    """Bernstein basis B_k^n(t) = C(n, k) t^k (1 - t)^(n - k), k = 0..n, n = ``degree`` >= 0.

    t: a number in [0, 1] (returns [n + 1]) or a 1-D tensor/sequence of them [T] (returns
    [T, n + 1]); float64. The rows sum to 1 and are exactly one-hot at t = 0 and t = 1.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    scalar = not (torch.is_tensor(t) and t.dim() > 0) and not isinstance(t, Sequence)
    ts = [_check_t(t)] if scalar else _check_ts(t)
    # Python floats: 0.0 ** 0 == 1, so the ends are exactly one-hot.
    rows = [[math.comb(degree, k) * (s ** k) * ((1.0 - s) ** (degree - k)) for k in range(degree + 1)] for s in ts]
    out = torch.tensor(rows, dtype=torch.float64)
    return out[0] if scalar else out


# ---- curves ---------------------------------------------------------------------------------------------
class _Curve(nn.Module):
    """What Bezier curves and polygonal chains share: the ends, the bends, forward, fit, evaluate.

    Subclasses define :meth:`weights` (t -> one float per control point [n_bends + 2]).
    """

    _min_bends = 0

    def __init__(self, model_a: nn.Module, model_b: nn.Module, n_bends: int = 1):
        super().__init__()
        if isinstance(n_bends, bool) or not isinstance(n_bends, int) or n_bends < self._min_bends:
            raise ValueError(f"n_bends must be an int >= {self._min_bends} for {type(self).__name__}, got {n_bends!r}")
        _check_pair(model_a, model_b)
        layout = ParamLayout(model_a, owner="curve")
        other = ParamLayout(model_b, owner="curve")
        if layout != other:
            why = _difference(other._entries(), layout._entries(), "in model_b", "in model_a")
            raise ValueError(f"model_a and model_b have different trainable parameters ({why})")
        if other.device != layout.device:
            raise ValueError(f"model_a is on {layout.device}, model_b on {other.device}: move both to one device")
        self.layout = layout
        # model_a is the template whose forward is run; a plain tuple keeps it (and model_b) out of
        # the registered submodules, so .parameters() are the bends only.
        self._models = (model_a, model_b)
        self.n_bends = n_bends
        a = layout.flatten(model_a)
        b = layout.flatten(model_b)
        # the BatchNorm layers, whose running statistics are recomputed for each t (module docstring)
        self._bn_layers = recompute_layers(model_a)
        self.register_buffer("theta_a", a.clone())
        self.register_buffer("theta_b", b.clone())
        m = n_bends + 1
        # Bends start on the straight line, evenly spaced: theta_k = a + k/m (b - a).
        self.bends = nn.ParameterList([nn.Parameter(torch.lerp(a, b, k / m)) for k in range(1, m)])

    # ---- geometry -------------------------------------------------------------------------------------
    @property
    def template(self) -> nn.Module:
        """model_a: the module whose forward :meth:`forward` runs with the curve's parameters."""
        return self._models[0]

    def control_points(self) -> list[Tensor]:
        """[theta_a, bend_1, ..., bend_n, theta_b], each [P] (the bends keep their autograd graph)."""
        return [self.theta_a, *self.bends, self.theta_b]

    def weights(self, t: float) -> list[float]:
        """The coefficient of each control point at t [n_bends + 2] (subclasses)."""
        raise NotImplementedError

    def point(self, t) -> Tensor:
        """theta(t) [P] for t in [0, 1] (a number or 0-dim tensor), differentiable w.r.t. the bends.
        theta(0) equals theta_a and theta(1) equals theta_b exactly."""
        w = self.weights(_check_t(t))
        out = None
        for wk, ck in zip(w, self.control_points()):
            if wk == 0.0:  # exact ends, and no graph through unused control points
                continue
            term = ck if wk == 1.0 else wk * ck
            out = term if out is None else out + term
        return out

    def forward(self, x, t, bn_stats: Mapping[str, Tensor] | None = None) -> Tensor:
        """The template model (model_a's forward) at parameters theta(t): ``x`` is its input (a
        tensor, or a tuple of positional arguments); returns its output, differentiable w.r.t. the
        bends. The template's current train/eval mode applies.

        With BatchNorm layers: in train mode they normalise with the batch's statistics and the
        running statistics they update are scratch copies (model_a keeps its own); in eval mode
        ``bn_stats`` (from :meth:`bn_statistics` at this t) is required: the ends' running
        statistics do not fit theta(t)."""
        args = x if isinstance(x, tuple) else (x,)
        tensors = self.layout.unflatten(self.point(t))
        if self._bn_layers:
            tensors.update(self._bn_buffers(bn_stats))
        elif bn_stats is not None:
            raise ValueError("bn_stats: the model has no BatchNorm layer with running statistics")
        return functional_call(self.template, tensors, args)

    def _bn_buffers(self, bn_stats) -> dict[str, Tensor]:
        """The running statistics forward passes to the template: ``bn_stats`` (checked against
        the layers), else in train mode scratch copies of model_a's; eval mode without them: a
        ValueError saying how to get them."""
        names = {k: getattr(m, b) for k, m, b in bn_keys(self._bn_layers, BN_STATS[:2])}
        if bn_stats is None:
            if any(m.training for _, m in self._bn_layers):
                return self._scratch_statistics()
            raise ValueError("the model has BatchNorm layers and is in eval mode: their running statistics (model_a's) "
                             "do not fit the parameters at t; pass bn_stats=curve.bn_statistics(t, data), or call "
                             "evaluate() (it recomputes them for every t), or put the model in train mode (batch "
                             "statistics)")
        if not isinstance(bn_stats, Mapping) or set(bn_stats) != set(names):
            raise ValueError(f"bn_stats must be the dict curve.bn_statistics(t, data) returns, with the keys "
                             f"{sorted(names)}; got {sorted(bn_stats) if isinstance(bn_stats, Mapping) else type(bn_stats).__name__}")
        for k, v in names.items():
            got = bn_stats[k]
            if not torch.is_tensor(got) or got.shape != v.shape:
                raise ValueError(f"bn_stats[{k!r}] must be a tensor of shape {tuple(v.shape)}, got "
                                 f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        if any(m.training for _, m in self._bn_layers):  # a train-mode BatchNorm would update them in place
            return {**self._scratch_statistics(), **{k: v.clone() for k, v in bn_stats.items()}}
        return dict(bn_stats)

    def _scratch_statistics(self) -> dict[str, Tensor]:
        """Copies of model_a's BatchNorm buffers (running mean, variance, batch count) for a
        train-mode forward to update instead of model_a's own."""
        return {k: getattr(m, b).clone() for k, m, b in bn_keys(self._bn_layers) if getattr(m, b) is not None}

    @torch.no_grad()
    def bn_statistics(self, t, data) -> dict[str, Tensor]:
        """The BatchNorm running statistics at theta(t) over ``data`` (one pass in train mode with
        the cumulative average: the mean over batches of each batch's mean and unbiased variance,
        as ``torch.optim.swa_utils.update_bn``; other layers in eval mode): name ('<layer>.running_mean'
        / '.running_var') -> tensor [C], for ``curve(x, t, bn_stats=...)`` in eval mode. data: one
        (inputs, targets) batch or a re-iterable of them, batches of at least 2 rows. {} without
        BatchNorm layers."""
        t = _check_t(t)
        if not self._bn_layers:
            return {}
        self.layout.params(self.template)
        stats = bn_statistics(self.template, self.layout, self.point(t).unsqueeze(0), as_batches(data),
                              self._bn_layers, None, _Plan(self.template, self.layout, False))
        return {k: v[0] for k, v in stats.items()}

    # ---- training -------------------------------------------------------------------------------------
    def fit(self, loss_fn: Callable[[Tensor, Tensor], Tensor], data, epochs: int = 1, lr: float | None = None,
            optimizer=None, generator: torch.Generator | None = None, progress: bool | None = True) -> Tensor:
        """Train the bends on E_{t ~ U(0, 1)} loss(theta(t)): per batch one t is drawn, the loss of
        the template at theta(t) is backpropagated to the bends and the optimizer steps.

        Args:
            loss_fn: loss_fn(outputs, targets) -> scalar (e.g. ``nn.CrossEntropyLoss()``).
            data: one (inputs, targets) batch or a re-iterable of them (list, DataLoader); inputs
                [N, ...] (or a tuple of positional arguments), targets [N, ...].
            epochs: passes over ``data`` (>= 1).
            lr: learning rate of the default optimizer, Adam over the bends, finite and > 0
                (required when ``optimizer`` is None, not allowed otherwise).
            optimizer: a ``torch.optim.Optimizer`` over (some of) ``self.parameters()``, or None.
            generator: the CPU torch.Generator the t are drawn from (reproducible runs).
            progress: show a tqdm bar (True), hide it (False), or tqdm's choice (None).

        The template is in train mode during training and back in its previous mode afterwards.
        Returns the mean training loss per epoch, float64 [epochs].

        A loss that is not finite (NaN or infinity: too large a step, or bad data) raises a
        RuntimeError at the end of its epoch (the check is read with the epoch's mean loss, no host
        sync per step), naming the epoch and the first such batch. On any error the bends, the other
        parameters the optimizer steps, their ``.grad``, a given optimizer's state and the
        generator's state are put back as they were before the call.
        """
        if len(self.bends) == 0:
            raise ValueError("this curve has no bends (n_bends=0, the straight line): nothing to train")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        check_generator(generator)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        if optimizer is None:
            if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
                raise ValueError(f"lr must be a finite number > 0 when no optimizer is given, got {lr!r}")
            optimizer = torch.optim.Adam(self.parameters(), lr=float(lr))
            own = True
        else:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
            if lr is not None:
                raise ValueError("give either lr (for the default Adam) or an optimizer (with its own lr), not both")
            mine = {id(p) for p in self.bends}
            if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("the optimizer holds none of the curve's bends: build it over curve.parameters()")
            own = False
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        data = as_batches(data)
        self.layout.params(self.template)  # the template still has the layout's parameters
        from tqdm.auto import tqdm

        history = torch.zeros(epochs, dtype=torch.float64)
        # What a failure must leave as it was (validated above; the rest can only fail mid-way): the
        # bends and every other parameter the optimizer steps, their .grad, the optimizer's state
        # (a user's optimizer; the default Adam is discarded) and the generator's state.
        params = {id(p): p for p in self.bends}
        params.update({id(p): p for g in optimizer.param_groups for p in g["params"]})
        saved = [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for p in params.values()]
        opt_state = None if own else copy.deepcopy(optimizer.state_dict())
        gen_state = None if generator is None else generator.get_state()
        x = None
        try:
            with ModeGuard(self.template, True):
                with tqdm(total=epochs, desc="curve fit", leave=False,
                          disable=None if progress is None else not progress) as bar:
                    for e in range(epochs):
                        total, count = 0.0, 0
                        # the first batch whose loss is not finite, kept on the device (no host sync
                        # per step): read with the epoch's mean, the one sync per epoch
                        first_bad = torch.full((), -1, dtype=torch.long, device=self.layout.device)
                        for k, (x, y, n) in enumerate(iterate(data, self.layout.device)):
                            t = float(torch.rand((), generator=generator, dtype=torch.float64))
                            loss = loss_fn(self(x, t), y)
                            if not torch.is_tensor(loss) or loss.numel() != 1:
                                raise ValueError("loss_fn must return a scalar tensor (reduction 'mean')")
                            optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                            optimizer.step()
                            total += loss.detach().double() * n  # on the device: no host sync per step
                            count += n
                            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()).reshape(()),
                                                    k, first_bad)
                        if count == 0:
                            raise ValueError("data has no rows: nothing to train on")
                        history[e] = float(total) / count
                        if not math.isfinite(history[e]):
                            x = None  # not a failed forward: no dtype hint
                            raise RuntimeError(
                                f"curve fit: the training loss is not finite (NaN or infinity) in epoch {e}, first "
                                f"at batch {int(first_bad)}: a step size too large for the bends (try a smaller "
                                "lr) or NaN, infinity or invalid values in the data / targets; the bends "
                                "are left as they were before fit")
                        bar.update(1)
                        bar.set_postfix(loss=f"{history[e]:.4g}")
        except BaseException as err:
            with torch.no_grad():
                for p, value, grad in saved:
                    p.copy_(value)
                    p.grad = grad
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
            if gen_state is not None:
                generator.set_state(gen_state)
            wrong = err if x is None else _failed_forward(err, x, self.layout.dtype)
            if wrong is err:
                raise
            raise wrong from err
        return history

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, ts, loss_fn: Callable[[Tensor, Tensor], Tensor], data,
                 metrics: Mapping[str, Callable[[Tensor, Tensor], Tensor]] | None = None, *,
                 batch_points: int | None = None, bn_data=None) -> dict[str, Tensor]:
        """The loss (and metrics) of the template at theta(t) for each t of ``ts``, in eval mode
        (BatchNorm statistics recomputed at each t over ``bn_data``, see the module docstring).

        Args:
            ts: the grid, a 1-D tensor [T] or a sequence of numbers in [0, 1].
            loss_fn: loss_fn(outputs, targets) -> the scalar mean over the batch.
            data: one (inputs, targets) batch or a re-iterable of them, at least one row in all.
            metrics: optional name -> fn(outputs, targets) -> scalar batch mean (e.g. accuracy).
            loss_fn and the metrics run under ``torch.vmap`` over the T points (torch's losses do).
            batch_points: values of t evaluated together, each chunk reading ``data`` once (default
            as in :func:`~pyfastbayes.landscape.grid`: their parameters under 256 MiB, at most 32 on
            the CPU, 64 on CUDA).
            bn_data: with BatchNorm layers, the data their statistics are recomputed over at every
            t (default ``data``; Garipov et al. use the training set), read once more per chunk;
            batches of at least 2 rows, not a shuffling DataLoader (each chunk would see other
            batches). Not allowed without BatchNorm layers.

        Returns a dict of float64 CPU tensors: 't' [T], 'loss' [T] (the mean over all rows of
        ``data``: batch means weighted by batch size) and one [T] entry per metric. The template's
        mode is restored afterwards. Deterministic for a deterministic model and data order.
        """
        grid = _check_ts(ts)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        metrics = dict(metrics or {})
        for name, fn in metrics.items():
            if not isinstance(name, str) or name in ("t", "loss") or not callable(fn):
                raise ValueError(f"metrics must map new names (not 't' or 'loss') to callables, got {name!r}")
        for label, fn in [("loss_fn", loss_fn), *((f"metrics[{k!r}]", f) for k, f in metrics.items())]:
            refuse_sum(fn, label)
        c = default_chunk(self.layout, len(grid)) if batch_points is None else check_int(batch_points,
                                                                                           "batch_points", 1)
        data = as_batches(data)
        if not self._bn_layers and bn_data is not None:
            raise ValueError("bn_data: the model has no BatchNorm layer with running statistics to recompute")
        bn_data = data if bn_data is None else as_batches(bn_data)
        if self._bn_layers and shuffles(bn_data):
            raise ValueError("the BatchNorm statistics are recomputed over " + ("bn_data" if bn_data is not data else
                             "data") + ", a DataLoader that shuffles: each chunk of t would see other batches; pass a "
                             "loader with shuffle=False")
        self.layout.params(self.template)
        plan = _Plan(self.template, self.layout, False)  # (an LSTM: one t at a time, decided once)
        parts = []
        with ModeGuard(self.template, False):
            for lo in range(0, len(grid), c):
                thetas = torch.stack([self.point(t) for t in grid[lo:lo + c]])  # [c, P]: each batch read once
                bufs = (bn_statistics(self.template, self.layout, thetas, bn_data, self._bn_layers, None, plan)
                        if self._bn_layers else None)
                sums, count = data_sums(self.template, self.layout, thetas, data, [loss_fn, *metrics.values()],
                                        None, buffers=bufs, labels=["loss_fn", *(f"metrics[{k!r}]" for k in metrics)],
                                        plan=plan)
                parts.append(sums / count)
        means = torch.cat(parts, dim=1).cpu()
        return {"t": torch.tensor(grid, dtype=torch.float64),
                **{k: means[i] for i, k in enumerate(["loss", *metrics])}}

    def extra_repr(self) -> str:
        return f"n_bends={self.n_bends}, P={self.layout.numel}"


class BezierCurve(_Curve):
    """Bezier curve theta(t) = sum_{k=0}^{n} B_k^n(t) theta_k between two models of one architecture.

    Args:
        model_a, model_b: the ends (theta_0 = model_a's trainable parameters, theta_n = model_b's),
            same module structure, on one device; model_a's forward is used along the curve.
        n_bends: trainable interior control points (degree n = n_bends + 1): 1 is the quadratic
            curve of Garipov et al., 0 the straight line.

    Attributes: ``bends`` (ParameterList of [P]; ``parameters()`` yields only these), ``theta_a``,
    ``theta_b`` (buffers [P], copies taken at construction), ``layout`` (ParamLayout).
    Call ``curve(x, t)`` for the outputs at theta(t); :meth:`point` gives theta(t) [P].
    """

    def weights(self, t: float) -> list[float]:
        """Bernstein weights B_k^n(t), k = 0..n [n_bends + 2]."""
        return bezier_basis(t, self.n_bends + 1).tolist()


class PolyChain(_Curve):
    """Piecewise-linear path theta_a -> bend_1 -> ... -> bend_m -> theta_b, node k at t = k / (m + 1).

    Args as :class:`BezierCurve`, with n_bends = m >= 1.
    """

    _min_bends = 1

    def weights(self, t: float) -> list[float]:
        """Weights of the two control points of t's segment (the others 0) [n_bends + 2]."""
        m = self.n_bends + 1  # segments
        i = min(int(math.floor(t * m)), m - 1)
        s = t * m - i  # local position in segment i, exactly 0 at t = 0 and 1 at t = 1
        w = [0.0] * (m + 1)
        w[i] = 1.0 - s
        w[i + 1] = s
        return w


def linear_path(model_a: nn.Module, model_b: nn.Module) -> BezierCurve:
    """The straight line theta(t) = (1 - t) theta_a + t theta_b as a curve without bends
    (``BezierCurve(model_a, model_b, n_bends=0)``): evaluate it with the same
    :meth:`~BezierCurve.evaluate` as a trained curve."""
    return BezierCurve(model_a, model_b, n_bends=0)


def plot_curve(result_curve: Mapping[str, Tensor], result_line: Mapping[str, Tensor] | None = None, ax=None,
               key: str = "loss"):
    """Plot ``result_curve[key]`` (from :meth:`BezierCurve.evaluate`, default the loss) against t,
    and the straight line's ``result_line[key]`` if given, on ``ax`` (default: a new figure).
    Returns the matplotlib Axes; never calls ``show()``."""
    for name, r in (("result_curve", result_curve), ("result_line", result_line)):
        if r is None and name == "result_line":
            continue
        if not isinstance(r, Mapping) or "t" not in r or key not in r:
            raise TypeError(f"{name} must be the dict that evaluate() returns (with 't' and {key!r})")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(torch.as_tensor(result_curve["t"]).numpy(), torch.as_tensor(result_curve[key]).numpy(),
            marker="o", ms=3, label="curve")
    if result_line is not None:
        ax.plot(torch.as_tensor(result_line["t"]).numpy(), torch.as_tensor(result_line[key]).numpy(),
                marker="o", ms=3, ls="--", label="straight line")
    ax.set_xlabel("t")
    ax.set_ylabel(key)
    ax.legend()
    return ax
