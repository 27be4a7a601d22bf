r"""The one :class:`Posterior` interface and the one Bayesian-model-averaging loop.

A posterior over a network's trainable weights (P numbers, flattened by
:class:`pyfastbayes.nn.ParamLayout`) provides its draws; this base class does the rest:

- :meth:`Posterior.sample` ``(n, *, generator=None) -> [n, P]`` (abstract: the posterior's draws),
- :meth:`Posterior.sample_` ``(model=None, *, generator=None) -> model``: one draw written into
  the model in place,
- :meth:`Posterior.predict` ``(x, n_samples=30, *, likelihood='classification', bn_loader=None,
  batch_size=1024, progress=False, generator=None, input_fn=None, output_fn=None)``: the Bayesian
  model average :math:`\frac1S\sum_s p(y \mid x, \theta_s)` over S draws,
- :meth:`Posterior.state_dict` / :meth:`Posterior.load_state_dict` (abstract).

The averaging loop (:meth:`Posterior._average`) runs every draw through
``torch.func.functional_call`` (the model's own parameters and buffers are never written), in eval
mode (every submodule's own flag restored afterwards, also on error), with the BatchNorm
statistics recomputed for each draw when ``bn_loader`` is given (on copies of the buffers), the
inputs batched and moved to the model's device once, and an optional tqdm bar over the draws.

Likelihoods: ``'classification'`` averages softmax probabilities of outputs [N, C] (C >= 2) ->
[N, C]; ``'binary'`` averages sigmoid probabilities of class 1 of outputs [N] or [N, 1] -> [N];
``'regression'`` returns (mean [N, ...], variance over draws [N, ...], divided by S as the
variance of the S-draw mixture; ``samples.var(0)`` divides by S - 1) of the outputs (the
epistemic part: add the noise variance for the predictive one).
"""
from __future__ import annotations

import abc
import numbers
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration._checks import check_int, check_generator  # noqa: F401 (the posteriors import them from here)
from .._warnings import warn_user
from ..nn import ModeGuard, ParamLayout, bn_modules, refresh_bn
from ..nn.inputs import call_model, check_reiterable, dtype_mismatch, iterate_inputs, model_output, to_device
from ..nn.stateless import functional_call

__all__ = ["Posterior", "LIKELIHOODS"]

LIKELIHOODS = ("classification", "regression", "binary")
_DRAW_BYTES = 256 << 20  # iter_samples keeps each batch of draws [batch, P] under this size

# (where the draws go, the flat draws [P]) or (..., the weight of each of those draws: default 1)
Source = tuple[ParamLayout, Iterable[Tensor]] | tuple[ParamLayout, Iterable[Tensor], float]


def check_likelihood(likelihood) -> str:
    """``likelihood`` if it is one of :data:`LIKELIHOODS`, else a ValueError listing them."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


class _Average:
    """Running Bayesian model average of one likelihood over draws (see the module docstring).

    Each draw carries a weight (1 unless a mixture weighs its components' draws, see
    :class:`~pyfastbayes.posteriors.MultiSWAG`); the average is normalised by the total weight.
    Probabilities are summed and divided at the end; regression outputs use the weighted form of
    Welford's update (mean and weighted sum of squared deviations, West 1979), which does not
    cancel catastrophically like E[f^2] - E[f]^2. Half-precision outputs are promoted to float32.
    """

    def __init__(self, likelihood: str):
        self.likelihood = likelihood
        self.count = 0
        self.weight = 0.0
        self.acc: Tensor | None = None
        self.m2: Tensor | None = None

    def _transform(self, out: Tensor) -> Tensor:
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        shape = tuple(out.shape)
        if self.likelihood == "classification":
            if out.dim() < 2 or shape[-1] < 2:
                raise ValueError(f"likelihood='classification' needs logits [N, C] with C >= 2 classes; the model "
                                 f"outputs {shape} (softmax over it would be meaningless): for one logit per point "
                                 "use likelihood='binary'")
            if out.dim() > 2:  # [N, C, H, W] (torch's class dim 1) or [N, T, C] (classes last): not guessed
                raise ValueError(f"likelihood='classification' needs logits [N, C]; the model outputs {shape}, where "
                                 "the class dimension is ambiguous: pass output_fn=lambda out: "
                                 "out.movedim(1, -1).flatten(0, -2) for classes in dim 1 (as F.cross_entropy takes "
                                 "[N, C, d1, ...]) or output_fn=lambda out: out.flatten(0, -2) for classes last")
            return out.softmax(-1)
        if self.likelihood == "binary":
            if out.dim() == 2 and shape[1] == 1:
                out = out[:, 0]
            if out.dim() != 1:
                raise ValueError(f"likelihood='binary' needs one logit per point, [N] or [N, 1]; the model outputs "
                                 f"{shape}: for C >= 2 classes use likelihood='classification'")
            return out.sigmoid()
        return out

    def add(self, out: Tensor, weight: float = 1.0) -> None:
        """Add the outputs [N, ...] of one draw with ``weight`` > 0."""
        out = self._transform(out)
        self.count += 1
        self.weight += weight
        if self.acc is None:
            self.acc = out * weight if self.likelihood != "regression" else out.clone()
            if self.likelihood == "regression":
                self.m2 = torch.zeros_like(out)
            return
        out = out.to(self.acc.device)
        if self.likelihood != "regression":
            self.acc.add_(out, alpha=weight)
            return
        delta = out - self.acc
        self.acc += delta * (weight / self.weight)
        self.m2 += delta * (out - self.acc) * weight

    def result(self) -> Tensor | tuple[Tensor, Tensor]:
        """The average: probabilities [N, C] / [N], or (mean, variance over draws) [N, ...]."""
        if self.likelihood != "regression":
            return self.acc / self.weight
        return self.acc, self.m2 / self.weight


def storage_device(device, default: torch.device, name: str, hint: str) -> torch.device:
    """``device`` (a posterior's storage) as a torch.device that exists here and holds values (None:
    ``default``), else an error naming the argument ``name``, with ``hint``; 'meta' is refused
    (no values: every collect would be dropped)."""
    if device is None:
        return default
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError, AssertionError) as e:
        raise type(e)(f"{name}={device!r} is not a usable device here ({e}): {hint}") from None
    if dev.type == "meta":
        raise ValueError(f"{name}='meta' holds no values (every collected draw would be dropped): {hint}")
    return dev


class Posterior(abc.ABC):
    """A distribution over the trainable weights of ``model`` (P numbers, see
    :class:`pyfastbayes.nn.ParamLayout`), with Bayesian model averaging over its draws.

    Subclasses implement :meth:`sample`, :meth:`state_dict` and :meth:`load_state_dict`; they get
    :meth:`sample_`, :meth:`iter_samples` and :meth:`predict` (the one averaging loop), and may
    override :meth:`predict` to add sampling options (their own keyword arguments) while calling
    :meth:`_average` with their draws.

    Attributes:
        layout: the :class:`~pyfastbayes.nn.ParamLayout` of the model.  model: ``layout.model``.
        numel: P.
    """

    kind = "Posterior"

    def __init__(self, model: nn.Module):
        self.layout = ParamLayout(model, owner=self.kind)

    @property
    def model(self) -> nn.Module:
        """The network the posterior was built for (default target of ``sample_`` and ``predict``)."""
        return self.layout.model

    @property
    def numel(self) -> int:
        """P, the number of trainable parameters."""
        return self.layout.numel

    # ---- draws ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws [n, P] from the posterior (``generator``: the torch generator the randomness
        comes from; default the global one)."""

    @torch.no_grad()
    def sample_(self, model: nn.Module | None = None, *, generator: torch.Generator | None = None) -> nn.Module:
        """Write one draw into the parameters of ``model`` (default: :attr:`model`) in place (one
        [P] temporary, no deep copy); returns the model. The model is checked first; BatchNorm
        statistics are not touched (call :func:`pyfastbayes.nn.update_bn` afterwards)."""
        self.layout.params(model)
        return self.layout.write_(self.sample(1, generator=generator)[0], model)

    def iter_samples(self, n: int, *, generator: torch.Generator | None = None, **options) -> Iterator[Tensor]:
        """Yield ``n`` draws [P] one by one, generated by :meth:`sample` (``options`` passed on) in
        batches whose [batch, P] stays under 256 MB."""
        n = check_int(n, "n", 0)
        check_generator(generator)
        return self._iter_samples(n, generator, options)

    def _iter_samples(self, n: int, generator, options: dict) -> Iterator[Tensor]:
        per = max(1, min(n, _DRAW_BYTES // max(1, self.numel * 8)))
        for s0 in range(0, n, per):
            yield from self.sample(min(per, n - s0), generator=generator, **options)

    # ---- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x, n_samples: int = 30, *, likelihood: str = "classification", bn_loader=None,
                batch_size: int = 1024, progress: bool = False, generator: torch.Generator | None = None,
                input_fn: Callable | None = None, output_fn: Callable | None = None):
        """Bayesian model average over ``n_samples`` draws of :meth:`sample`.

        Args:
            x: inputs [N, ...] (split into ``batch_size`` rows) or an iterable of batches: tensors
                or (input, target, ...) tuples; ``input_fn`` (item -> tensor or tuple of model
                arguments) for anything else, e.g. dict batches. ``x`` is read once and its
                batches are kept on the model's device for every draw, so memory grows with N:
                for a test set that does not fit, call ``predict`` per part with a generator
                seeded the same way each time (the same draws for every part).
            n_samples: S >= 1 draws.
            likelihood: 'classification' -> mean of softmax(outputs) [N, C]; 'binary' -> mean of
                sigmoid(outputs) [N] for outputs [N] or [N, 1]; 'regression' -> (mean [N, ...],
                variance over draws [N, ...]) of the outputs.
            bn_loader: when given, the BatchNorm statistics are recomputed for every draw in one
                pass over it (same accepted forms as ``x``; copies of the buffers); None: the
                model's running statistics (SWA / SWAG / MultiSWAG warn then: their draws are far
                from the weights those were computed for); False: the model's, without warning.
            batch_size: rows per forward pass when ``x`` / ``bn_loader`` are tensors.
            progress: tqdm bar over the draws.  generator: the randomness of the draws.
            output_fn: model output -> the tensor [N, ...] (e.g. ``lambda out: out[0]`` for a model
                returning a tuple).
        """
        n = check_int(n_samples, "n_samples", 1)
        check_generator(generator)
        return self._average([(self.layout, self.iter_samples(n, generator=generator))], x, total=n,
                             likelihood=likelihood, bn_loader=bn_loader, batch_size=batch_size, progress=progress,
                             input_fn=input_fn, output_fn=output_fn)

    # SWA / SWAG / MultiSWAG: draws far from the weights the running BatchNorm statistics were
    # computed for (Izmailov et al. and Maddox et al. recompute them per draw): warn without bn_loader
    _bn_refresh_advised = False

    def _bn_loader(self, bn_loader, models: list, buffers: dict | None = None):
        """``bn_loader`` for the BMA loop: False -> None (the running statistics, kept on purpose);
        None on a BatchNorm model of a posterior whose draws need recomputed statistics -> a
        warning saying how to recompute or keep them."""
        if bn_loader is False:
            return None
        if bn_loader is None and buffers is None and self._bn_refresh_advised and any(bn_modules(m) for m in models):
            warn_user(f"{self.kind}: the model has BatchNorm layers and no bn_loader was given, so every draw runs "
                      f"with the running statistics the model holds now, computed for other weights (for SWA, the "
                      f"last iterate's); pass bn_loader=<training batches> to recompute them per draw (Izmailov et "
                      f"al. 2018; SWA: or update_bn(loader) once), or bn_loader=False to keep them and silence this")
        return bn_loader

    @torch.no_grad()
    def _average(self, sources: Iterable[Source], x, *, total: int, likelihood: str, bn_loader, batch_size: int,
                 progress: bool, input_fn: Callable | None, output_fn: Callable | None, buffers: dict | None = None):
        """THE Bayesian-model-averaging loop: every flat draw [P] of every (layout, draws) source
        runs through its layout's model (see the module docstring); ``total`` sizes the bar.
        ``bn_loader=False``: the model's running statistics, without the warning a BatchNorm model
        gets where recomputing them is advised; ``buffers``: name -> tensor in place of the model's
        buffers (statistics already recomputed for the draw, e.g. :meth:`SWA.update_bn`'s)."""
        check_likelihood(likelihood)
        batch_size = check_int(batch_size, "batch_size", 1)
        sources = list(sources)
        bn_loader = self._bn_loader(bn_loader, [layout.model for layout, *_ in sources], buffers)
        if bn_loader is not None and total > 1:
            check_reiterable(bn_loader, "bn_loader")
        for layout, *_ in sources:
            layout.params()  # the model still has the recorded parameters
        inputs = list(iterate_inputs(x, batch_size, input_fn))
        if not inputs:
            raise ValueError("x yielded no inputs: pass a tensor [N, ...] with N >= 1 or a non-empty loader")
        on_device: dict[torch.device, list] = {}
        avg = _Average(likelihood)
        with tqdm(total=total, desc=f"{self.kind} BMA", leave=False, disable=not progress) as bar:
            for layout, draws, *weight in sources:
                batches = on_device.setdefault(layout.device, [to_device(b, layout.device) for b in inputs])
                with ModeGuard(layout.model, False):
                    for theta in draws:
                        try:
                            out = _forward(layout, theta, batches, bn_loader, batch_size, input_fn, output_fn,
                                           buffers)
                        except RuntimeError as e:
                            wrong = dtype_mismatch(batches, layout.dtype, e, refit=", then build the posterior again")
                            if wrong is not None:
                                raise wrong from e
                            raise
                        avg.add(out, *weight)
                        bar.update()
        if avg.count == 0:
            raise RuntimeError(f"the {self.kind} produced no draws to average")
        return avg.result()

    # ---- state ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to restore the posterior (tensors cloned), with its kind and layout."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (checked first; nothing changes when it does not fit)."""

    def _state_header(self) -> dict:
        return {"kind": self.kind, "layout": self.layout.describe()}

    def _check_header(self, state) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict (from {self.kind}.state_dict()), got {type(state).__name__}")
        if state.get("kind") != self.kind:
            raise ValueError(f"state_dict is of a {state.get('kind')!r}, expected {self.kind!r}")
        self.layout.check_description(state.get("layout"))

    def _check_state_count(self, state: dict, key: str, minimum: int = 0) -> int:
        """``state[key]``: an int (not a bool; NumPy integers too) >= ``minimum``, else a
        ValueError naming the key (a float, a string or None must not be truncated by int())."""
        if key not in state:
            raise ValueError(f"state_dict has no {key!r}: it was not saved by {self.kind}.state_dict()")
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            raise ValueError(f"state_dict[{key!r}] must be an int >= {minimum}, got {v!r}")
        return int(v)

    def _check_state_tensor(self, state: dict, key: str, shape: tuple, dtype: torch.dtype | None = None) -> Tensor:
        """``state[key]``: a floating-point tensor of ``shape`` holding finite values (what a
        collect would have refused to store) that stay finite in ``dtype``, the dtype they will be
        stored in (when given), else a clear error; nothing is changed here."""
        if key not in state:
            raise ValueError(f"state_dict has no {key!r}: it was not saved by {self.kind}.state_dict()")
        t = state[key]
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(f"state_dict[{key!r}] must be a floating-point tensor, got "
                            f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
        if t.is_meta:
            raise ValueError(f"state_dict[{key!r}] is a meta tensor (a shape without values): load a state dict "
                             "saved with its data")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"state_dict[{key!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"state_dict[{key!r}] holds NaN or inf values; {self.kind} refuses them (they would "
                             "poison every prediction)")
        if dtype is not None and t.numel() and torch.finfo(t.dtype).max > torch.finfo(dtype).max:
            big, top = float(t.abs().max()), torch.finfo(dtype).max
            if not big <= top:  # the copy into the state would round these to inf
                raise ValueError(f"state_dict[{key!r}] holds values up to {big:.6g}, beyond the largest finite "
                                 f"{dtype} ({top:.6g}) that this {self.kind} stores it in: they would load as inf")
        return t


def _forward(layout: ParamLayout, theta: Tensor, batches: list, bn_loader, batch_size: int,
             input_fn: Callable | None, output_fn: Callable | None, buffers: dict | None = None) -> Tensor:
    """Outputs [N, ...] of the model at the flat draw ``theta`` [P] (eval mode is set by the
    caller), the BatchNorm statistics recomputed on copies of the buffers when ``bn_loader`` is
    given (``buffers``: in place of the model's own)."""
    model = layout.model
    tensors = layout.unflatten(theta.to(layout.device))
    buffers = dict(model.named_buffers()) if buffers is None else dict(buffers)
    if bn_loader is not None and bn_modules(model):
        buffers = {k: v.clone() for k, v in buffers.items()}
        tensors.update(buffers)
        refresh_bn(model, bn_loader, tensors, layout.device, batch_size, input_fn)
    else:
        tensors.update(buffers)

    def fn(*args):
        """The model at ``tensors`` (parameters of the draw, buffers)."""
        return functional_call(model, tensors, args)

    outs = []
    for b in batches:
        out = model_output(call_model(fn, b), output_fn)
        first = b[0] if isinstance(b, tuple) else b
        if (output_fn is None and torch.is_tensor(first) and first.dim()  # output_fn may reshape rows on purpose
                and (out.dim() == 0 or out.shape[0] != first.shape[0])):
            raise ValueError(f"x: the model returned outputs of shape {tuple(out.shape)} for inputs of shape "
                             f"{tuple(first.shape)}; the outputs need the inputs' rows [N, ...]: pass the inputs as a "
                             "batch (one example: x.unsqueeze(0)), or output_fn to pick [N, ...] outputs")
        outs.append(out)
    return torch.cat(outs)
