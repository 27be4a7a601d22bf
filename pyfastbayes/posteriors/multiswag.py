"""An equal-weight mixture of SWAG posteriors from independent runs (Wilson & Izmailov 2020):
:class:`MultiSWAG`. It goes through each component's public interface (``sample``,
``iter_samples``, ``state_dict``) and averages with the shared loop of
:class:`~pyfastbayes.posteriors.base.Posterior`."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .base import Posterior, check_int, check_generator
from .swag import SWAG, check_cov, check_scale

__all__ = ["MultiSWAG"]


def _device(generator: torch.Generator | None):
    """Where a draw from ``generator`` happens (its own device; the global generator's: CPU)."""
    return generator.device if generator is not None else "cpu"


class MultiSWAG(Posterior):
    """An equal-weight mixture of M SWAG posteriors over models with the same parameter layout.

    Draws are stratified: of S draws, every component gets S // M and the S % M left over go to
    as many components picked at random (from ``generator``), so each run's expected share is
    exactly 1 / M with little noise in the counts. :meth:`predict` then weighs the draws so that
    every component drawn from counts 1 / M (each draw of component i weighs 1 / k_i), the
    equal-weight mixture whenever S >= M; :meth:`sample` returns the draws in a random order, and
    :meth:`iter_samples` yields them in component blocks, the blocks in a random order. Each
    component's draws run through its own model (its own buffers); ``scale=None`` means each
    component's default for ``cov`` (see :class:`SWAG`).

    Args:
        posteriors: M >= 1 :class:`SWAG` objects whose layouts are equal (names, shapes and dtypes
            of the trainable parameters, :class:`pyfastbayes.nn.ParamLayout`).

    Attributes:
        layout, model: those of the first component (the default target of :meth:`sample_`).
    """

    kind = "MultiSWAG"
    _bn_refresh_advised = True

    def __init__(self, posteriors: Sequence[SWAG]):
        if isinstance(posteriors, (Posterior, str, bytes)) or not isinstance(posteriors, Iterable):
            raise TypeError(f"posteriors must be a list of SWAG objects (one per run), got "
                            f"{type(posteriors).__name__}: pass MultiSWAG([swag_1, ..., swag_M])")
        posteriors = list(posteriors)
        if not posteriors:
            raise ValueError("MultiSWAG needs at least one SWAG")
        for i, p in enumerate(posteriors):
            if not isinstance(p, SWAG):
                raise TypeError(f"posteriors[{i}] is a {type(p).__name__}, expected SWAG")
        first = posteriors[0].layout
        for i, p in enumerate(posteriors[1:], 1):
            if p.layout != first:
                raise ValueError(f"posteriors[{i}] tracks other parameters than posteriors[0] "
                                 f"({first.difference(p.layout)}): MultiSWAG mixes runs of one architecture")
        self.posteriors = posteriors
        self.layout = first

    def __len__(self) -> int:
        return len(self.posteriors)

    def __getitem__(self, i: int) -> SWAG:
        return self.posteriors[i]

    def _counts(self, n: int, generator) -> list[int]:
        """Draws per component: n // M each, one more for n % M components picked at random."""
        M = len(self.posteriors)
        counts = [n // M] * M
        if n % M:
            for i in torch.randperm(M, generator=generator, device=_device(generator))[:n % M].tolist():
                counts[i] += 1
        return counts

    def _check(self, n, scale, cov, generator, name: str = "n", minimum: int = 0) -> int:
        """Every argument (named as the caller's), then every component's ability to draw, before
        any component draws; a component's refusal names it (posteriors[i])."""
        n = check_int(n, name, minimum)
        check_generator(generator)
        check_scale(scale, check_cov(cov))
        for i, p in enumerate(self.posteriors):
            try:
                p._check_draw_args(0, scale, cov)
            except (ValueError, RuntimeError) as e:
                raise type(e)(f"posteriors[{i}]: {e}") from None
        return n

    def sample(self, n: int, *, scale: float | None = None, cov: str = "lowrank",
               generator: torch.Generator | None = None) -> Tensor:
        """S = n draws [n, P] from the mixture, in a random order, on the first component's
        device (see the class docstring)."""
        n = self._check(n, scale, cov, generator)
        parts = [p.sample(k, scale=scale, cov=cov, generator=generator)
                 for p, k in zip(self.posteriors, self._counts(n, generator)) if k]
        if not parts:
            return self.posteriors[0].sample(0, scale=scale, cov=cov)
        dev = parts[0].device
        out = torch.cat([q.to(dev) for q in parts])
        return out[torch.randperm(n, generator=generator, device=_device(generator)).to(dev)]

    def iter_samples(self, n: int, *, generator: torch.Generator | None = None, **options) -> Iterator[Tensor]:
        """Yield ``n`` draws [P] one by one: each component's stratified count (see the class
        docstring) from its own :meth:`SWAG.iter_samples`, the components in a random order."""
        n = self._check(n, options.get("scale"), options.get("cov", "lowrank"), generator)
        return (theta for _, draws, _ in self._sources(n, generator, options) for theta in draws)

    def _sources(self, n: int, generator, options: dict) -> list[tuple]:
        """(layout, lazy draws, weight of each draw) of every component with draws, in a random
        order; the weights 1 / k_i give every component drawn from the same total weight."""
        counts = self._counts(n, generator)
        order = torch.randperm(len(self), generator=generator, device=_device(generator)).tolist()
        return [(self.posteriors[i].layout, self.posteriors[i].iter_samples(counts[i], generator=generator, **options),
                 1.0 / counts[i]) for i in order if counts[i]]

    @torch.no_grad()
    def sample_(self, model: nn.Module | None = None, *, scale: float | None = None, cov: str = "lowrank",
                generator: torch.Generator | None = None) -> nn.Module:
        """Write one mixture draw into ``model`` (default: the first component's model) in place:
        a component picked uniformly at random (from ``generator``), then one of its draws."""
        self._check(1, scale, cov, generator)
        self.layout.params(model)
        i = int(torch.randint(len(self), (), generator=generator, device=_device(generator)))
        theta = self.posteriors[i].sample(1, scale=scale, cov=cov, generator=generator)[0]
        return self.layout.write_(theta, model)

    @torch.no_grad()
    def predict(self, x, n_samples: int = 30, *, scale: float | None = None, cov: str = "lowrank",
                likelihood: str = "classification", bn_loader=None, batch_size: int = 1024, progress: bool = False,
                generator: torch.Generator | None = None, input_fn: Callable | None = None,
                output_fn: Callable | None = None):
        """Bayesian model average over ``n_samples`` stratified mixture draws, each component's
        through its own model and weighted so that the components count equally (see the class
        docstring); arguments and outputs as in :meth:`SWAG.predict`."""
        n = self._check(n_samples, scale, cov, generator, "n_samples", 1)
        sources = self._sources(n, generator, {"scale": scale, "cov": cov})
        return self._average(sources, x, total=n, likelihood=likelihood, bn_loader=bn_loader, batch_size=batch_size,
                             progress=progress, input_fn=input_fn, output_fn=output_fn)

    def state_dict(self) -> dict:
        """The components' state dicts, in order."""
        return {"kind": self.kind, "components": [p.state_dict() for p in self.posteriors]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (all components checked before any is changed)."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict (from MultiSWAG.state_dict()), got {type(state).__name__}")
        comps = state.get("components")
        if state.get("kind") != self.kind or not isinstance(comps, (list, tuple)) or len(comps) != len(self.posteriors):
            raise ValueError(f"state_dict is not a MultiSWAG of {len(self.posteriors)} components (kind "
                             f"{state.get('kind')!r}, components a {type(comps).__name__}"
                             f"{f' of {len(comps)}' if isinstance(comps, (list, tuple)) else ''})")
        for i, (p, s) in enumerate(zip(self.posteriors, comps)):
            try:
                p._check_state(s)
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict['components'][{i}]: {e}") from None
        for p, s in zip(self.posteriors, comps):
            p.load_state_dict(s)
