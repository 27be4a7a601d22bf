"""Cyclical step-size schedule of cSG-MCMC (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020)."""
from __future__ import annotations

import math

import torch

from ._checks import Interval, check_integer, check_number

__all__ = ["CyclicalSchedule", "SAMPLING_TEMPERATURE"]

SAMPLING_TEMPERATURE = "sampling_temperature"  # param-group key: the temperature while sampling
LR_SCALE = "lr_scale"  # param-group key: the group's step size relative to the schedule's
LR_REFERENCE = "lr_reference"  # param-group key: the lr that lr_scale 1 stood for (the first groups' largest)
_CONFIG = ("total_steps", "n_cycles", "lr_max", "explore_fraction")


def _assign(group: dict, key: str, value) -> None:
    """group[key] = value; a 0-dim tensor already there is updated in place (no host copy), so a
    step captured in a CUDA graph reads the new value at its next replay."""
    cur = group[key]
    if torch.is_tensor(cur):
        cur.copy_(value) if torch.is_tensor(value) else cur.fill_(value)
    else:
        group[key] = value.clone() if torch.is_tensor(value) else value


class CyclicalSchedule:
    r"""Cosine cycles of the step size, noise off while exploring, samples at the end of a cycle.

    With cycle length L = ceil(total_steps / n_cycles) and r(t) = (t mod L) / L for t = 0, 1, ...::

        lr(t) = lr_max / 2 * (cos(pi * r(t)) + 1)

    While r(t) < ``explore_fraction`` the chain explores (temperature 0: optimisation); after
    that it samples. :meth:`apply` writes both into an optimizer's param groups and returns whether
    the step is in the sampling phase, i.e. whether to keep the draw. The last step of a cycle, or
    of the run (the last cycle may be shorter), is :meth:`is_cycle_end`.

    The sampling temperature of each param group is kept in the group itself, under the key
    ``'sampling_temperature'``, set once from the group's ``temperature`` the first time
    :meth:`apply` sees the group. So a group added later samples at its own temperature, and an
    optimizer ``state_dict`` saved while exploring (temperature 0) resumes with the right one, even
    under a fresh schedule. To change it during a run, set ``group['sampling_temperature']``.
    Param groups keep their step sizes' ratios: the first time :meth:`apply` sees groups, each
    gets ``group['lr_scale']`` = its ``lr`` / the reference (the largest ``lr`` among the first
    groups seen, kept as ``group['lr_reference']``; a group added later is scaled against it), and
    its step size is ``lr_scale * lr(t)``; set the key to change it. (Before this, every group got
    ``lr(t)``: multi-group chains now take their groups' own step sizes.)
    A group whose ``lr`` / ``temperature`` are 0-dim tensors has them updated in place, so a
    sampler step captured in a CUDA graph follows the schedule (:mod:`pyfastbayes.optim.sgmcmc`, "CUDA graphs").

    Args:
        total_steps: T >= 1, steps of the whole run.  n_cycles: M, 1 <= M <= T.
        lr_max: peak step size (> 0) of the group with the largest ``lr``.
        explore_fraction: beta in [0, 1) (1 would never sample).
    """

    def __init__(self, total_steps: int, n_cycles: int, lr_max: float, explore_fraction: float = 0.8):
        self._configure(total_steps, n_cycles, lr_max, explore_fraction)
        self._legacy: dict[int, float] = {}  # sampling temperatures from a state_dict of the old format

    def _configure(self, total_steps, n_cycles, lr_max, explore_fraction) -> None:
        total = check_integer("total_steps", total_steps, 1)
        cycles = check_integer("n_cycles", n_cycles, 1)
        if cycles > total:
            raise ValueError(f"n_cycles must be in [1, total_steps={total}], got {n_cycles}")
        lr = check_number("lr_max", lr_max, Interval())
        beta = check_number("explore_fraction", explore_fraction, Interval(0.0, 1.0, True, False))  # 1: never samples
        length = math.ceil(total / cycles)
        if (length - 1) / length < beta:  # r(t) takes the values k / L: none reaches beta
            raise ValueError(f"explore_fraction={explore_fraction} never samples with cycles of L = {length} steps "
                             f"(total_steps={total} / n_cycles={cycles}): a cycle's last step is at r = {length - 1}/"
                             f"{length} = {(length - 1) / length:.3g} < explore_fraction; use fewer, longer cycles or "
                             f"an explore_fraction <= {(length - 1) / length:.3g}")
        self.total_steps, self.n_cycles, self.lr_max, self.explore_fraction = total, cycles, lr, beta
        self.cycle_length = length

    def phase(self, step: int) -> float:
        """r(t) in [0, 1): position of ``step`` (0-based) inside its cycle."""
        return (check_integer("step", step, 0) % self.cycle_length) / self.cycle_length

    def lr(self, step: int) -> float:
        """The step size at ``step`` (0-based)."""
        return 0.5 * self.lr_max * (math.cos(math.pi * self.phase(step)) + 1.0)

    def is_sampling(self, step: int) -> bool:
        """True in the sampling phase (noise on) of the cycle."""
        return self.phase(step) >= self.explore_fraction

    def is_cycle_end(self, step: int) -> bool:
        """True on the last step of a cycle (or of the run)."""
        step = check_integer("step", step, 0)
        return (step + 1) % self.cycle_length == 0 or step + 1 == self.total_steps

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Set lr and temperature of every param group for ``step`` (0-based); returns :meth:`is_sampling`.

        Each group's lr is its ``'lr_scale'`` times :meth:`lr` (the key set the first time, see
        the class docstring). Groups with a ``temperature`` get their ``'sampling_temperature'``
        while sampling and 0 while exploring; the key is set from ``temperature`` when a group
        does not have it yet.
        """
        check_integer("step", step, 0)
        if not isinstance(getattr(optimizer, "param_groups", None), list):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (it needs param_groups), got "
                            f"{type(optimizer).__name__}")
        sampling, lr = self.is_sampling(step), self.lr(step)
        new = [g for g in optimizer.param_groups if LR_SCALE not in g]
        if new:  # the groups' own step sizes, relative to the reference: their ratios are kept
            lrs = [float(g["lr"]) for g in new]
            known = [g[LR_REFERENCE] for g in optimizer.param_groups if LR_REFERENCE in g]
            ref = known[0] if known else max(lrs)  # a group added later: against the first groups' reference
            for g, v in zip(new, lrs):
                g[LR_SCALE] = v / ref if ref > 0 else 1.0
                g[LR_REFERENCE] = ref
        for i, group in enumerate(optimizer.param_groups):
            scale = group[LR_SCALE]
            _assign(group, "lr", lr if scale == 1.0 else lr * scale)
            if "temperature" in group:
                if SAMPLING_TEMPERATURE not in group:
                    t = self._legacy.get(i, group["temperature"])
                    group[SAMPLING_TEMPERATURE] = t.clone() if torch.is_tensor(t) else t  # never the live slot
                _assign(group, "temperature", group[SAMPLING_TEMPERATURE] if sampling else 0.0)
        return sampling

    def state_dict(self) -> dict:
        """The schedule's configuration (the sampling temperatures live in the optimizer's groups)."""
        return {k: getattr(self, k) for k in _CONFIG}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (checked first: a refused state changes nothing). A state of
        the old format ({'temperatures': {group: T}}) supplies the sampling temperatures of groups
        that do not have one yet."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from CyclicalSchedule.state_dict(), got {type(state).__name__}")
        if "temperatures" in state and not set(_CONFIG) & state.keys():
            temps = state["temperatures"] or {}
            if not isinstance(temps, dict) or not all(isinstance(i, (int, str)) and str(i).isdigit() for i in temps):
                raise ValueError(f"state['temperatures'] must map param-group indices to temperatures, got "
                                 f"{temps!r:.200}; pass the dict of CyclicalSchedule.state_dict()")
            self._legacy = {int(i): t for i, t in temps.items()}
            return
        missing = [k for k in _CONFIG if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}; pass the dict of CyclicalSchedule.state_dict()")
        self._configure(*(state[k] for k in _CONFIG))
