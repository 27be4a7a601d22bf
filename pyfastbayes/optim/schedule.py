"""Cyclical step-size schedule of cSG-MCMC (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020)."""
from __future__ import annotations

import math

import torch


class CyclicalSchedule:
    r"""Cosine cycles of the step size, noise off while exploring, samples at the end of a cycle.

    With cycle length L = ceil(total_steps / n_cycles) and r(t) = (t mod L) / L for t = 0, 1, ...::

        lr(t) = lr_max / 2 * (cos(pi * r(t)) + 1)

    While r(t) < ``explore_fraction`` the chain explores (temperature 0: optimisation); after
    that it samples (the optimizer's own temperature). :meth:`apply` writes both into an
    optimizer's param groups and returns whether the step is in the sampling phase, i.e. whether
    to keep the draw.

    Args:
        total_steps: T > 0, steps of the whole run.  n_cycles: M, 1 <= M <= T.
        lr_max: peak step size (> 0).  explore_fraction: beta in [0, 1].
    """

    def __init__(self, total_steps: int, n_cycles: int, lr_max: float, explore_fraction: float = 0.8):
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 1 <= int(n_cycles) <= int(total_steps):
            raise ValueError(f"n_cycles must be in [1, total_steps={total_steps}], got {n_cycles}")
        if not (math.isfinite(lr_max) and lr_max > 0):
            raise ValueError(f"lr_max must be > 0, got {lr_max}")
        if not 0.0 <= explore_fraction <= 1.0:
            raise ValueError(f"explore_fraction must be in [0, 1], got {explore_fraction}")
        self.total_steps, self.n_cycles = int(total_steps), int(n_cycles)
        self.lr_max, self.explore_fraction = float(lr_max), float(explore_fraction)
        self.cycle_length = math.ceil(self.total_steps / self.n_cycles)
        self._temperatures: dict[int, float] | None = None

    def phase(self, step: int) -> float:
        """r(t) in [0, 1): position of ``step`` (0-based) inside its cycle."""
        return (int(step) % self.cycle_length) / self.cycle_length

    def lr(self, step: int) -> float:
        """The step size at ``step`` (0-based)."""
        return 0.5 * self.lr_max * (math.cos(math.pi * self.phase(step)) + 1.0)

    def is_sampling(self, step: int) -> bool:
        """True in the sampling phase (noise on) of the cycle."""
        return self.phase(step) >= self.explore_fraction

    def is_cycle_end(self, step: int) -> bool:
        """True on the last step of a cycle (or of the run)."""
        return (int(step) + 1) % self.cycle_length == 0 or int(step) + 1 == self.total_steps

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Set lr and temperature of every param group for ``step``; returns :meth:`is_sampling`.

        The groups' temperatures at the first call are the sampling temperatures.
        """
        if self._temperatures is None:
            self._temperatures = {i: g.get("temperature", 1.0) for i, g in enumerate(optimizer.param_groups)}
        sampling = self.is_sampling(step)
        for i, g in enumerate(optimizer.param_groups):
            g["lr"] = self.lr(step)
            if "temperature" in g:
                g["temperature"] = self._temperatures.get(i, 1.0) if sampling else 0.0
        return sampling

    def state_dict(self) -> dict:
        """Picklable state (the remembered sampling temperatures)."""
        return {"temperatures": self._temperatures}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self._temperatures = state["temperatures"]
