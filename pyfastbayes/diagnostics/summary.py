"""R-hat and bulk / tail ESS of several named quantities at once, and a short table of them."""
from __future__ import annotations

from typing import Mapping, NamedTuple

from torch import Tensor

from .convergence import _prepare, ess, rhat

__all__ = ["Diagnostics", "Summary", "summary"]

RHAT_OK = 1.01  # Vehtari et al. (2021): use the draws when R-hat < 1.01 ...
ESS_PER_CHAIN_OK = 100  # ... and bulk and tail ESS >= 100 per chain


class Diagnostics(NamedTuple):
    """The diagnostics of one named quantity; each a float64 tensor of its trailing shape."""
    rhat: Tensor
    ess_bulk: Tensor
    ess_tail: Tensor


class Summary(dict):
    """``{name: Diagnostics}``; ``str(summary)`` is a table with one row per name (the worst
    element: largest R-hat, smallest ESS) that flags names failing R-hat < 1.01 or
    ESS >= 100 per chain."""

    def __init__(self, items, chains: dict[str, int]):
        super().__init__(items)
        self.chains = chains

    def table(self) -> str:
        """The summary as text: one row per name with its shape, the worst element's R-hat and
        ESS, and ``check`` where R-hat >= 1.01 or an ESS < 100 per chain. Elements whose R-hat is
        NaN (constant draws) are left out of the worst values and counted ("k constant"), so one
        constant element does not hide the others."""
        rows = [("name", "shape", "max rhat", "min ess_bulk", "min ess_tail", "")]
        for name, d in self.items():
            if d.rhat.numel() == 0:
                rows.append((name, str(list(d.rhat.shape)), "-", "-", "-", ""))
                continue
            nan = d.rhat.isnan()
            n_const = int(nan.sum())
            if n_const == d.rhat.numel():
                rows.append((name, str(list(d.rhat.shape)), "nan", "-", "-", "all constant"))
                continue
            keep = ~nan
            r, b, t = float(d.rhat[keep].max()), float(d.ess_bulk[keep].min()), float(d.ess_tail[keep].min())
            low = ESS_PER_CHAIN_OK * self.chains[name]
            flag = "" if (r < RHAT_OK and b >= low and t >= low) else "check"
            if n_const:
                flag = f"{flag} ({n_const} constant)".strip()
            rows.append((name, str(list(d.rhat.shape)), f"{r:.3f}", f"{b:.0f}", f"{t:.0f}", flag))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def summary(samples: Mapping[str, Tensor]) -> Summary:
    """Rank R-hat, bulk ESS and tail ESS of every named quantity.

    Args:
        samples: ``{name: draws [chains, draws, ...]}`` (tensors or numpy arrays; each as
            :func:`~pyfastbayes.diagnostics.rhat` takes it; names may differ in chains, draws
            and trailing shape).

    Returns:
        :class:`Summary`: ``{name: Diagnostics(rhat, ess_bulk, ess_tail)}``, each a float64
        tensor of that name's trailing shape; ``print(result)`` shows the table.
    """
    if not isinstance(samples, Mapping):
        raise TypeError(f"samples must be a dict {{name: draws [chains, draws, ...]}}, "
                        f"got {type(samples).__name__}")
    if not samples:
        raise ValueError("samples is empty; pass at least one {name: draws [chains, draws, ...]}")
    out, chains = {}, {}
    for name, x in samples.items():
        if not isinstance(name, str):
            raise TypeError(f"samples' keys must be str names, got {name!r}")
        _prepare(x, f"samples[{name!r}]")  # the errors name the entry
        out[name] = Diagnostics(rhat(x), ess(x, "bulk"), ess(x, "tail"))
        chains[name] = int(x.shape[0])
    return Summary(out, chains)
