"""Split R-hat and effective sample size of MCMC draws [chains, draws, ...], in torch.

The formulas are those of Vehtari, Gelman, Simpson, Carpenter and Bürkner (2021), "Rank-
normalization, folding, and localization: an improved R-hat for assessing convergence of MCMC",
Bayesian Analysis 16(2), as ArviZ 0.23 computes them (``arviz.rhat``, ``arviz.ess``; the tests
compare to 1e-8): chains are split in halves (the middle draw of an odd count is dropped), ranks
are taken over all split draws with ties averaged and mapped to normal scores with Blom's offset
3/8, and the ESS sums autocorrelations (FFT, pooled over chains) up to Geyer's initial positive
sequence, made monotone. Every trailing element is an independent scalar quantity; all of them
are computed at once in float64 on the input's device, in chunks of about 2^22 values so that
millions of parameters need no more than a few hundred MiB of working memory.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["rhat", "ess", "RHAT_METHODS", "ESS_METHODS"]

RHAT_METHODS = ("rank", "split", "folded")
ESS_METHODS = ("bulk", "tail", "mean")
_MIN_DRAWS = 4  # as ArviZ: each split half needs two draws for an autocovariance at lag 1
_CHUNK_VALUES = 1 << 22  # float64 values per chunk of elements (32 MiB; FFT and sort take ~8x)
_TAIL_PROBS = (0.05, 0.95)
_RESOLUTION = float(np.finfo(np.float64).resolution)  # spread below this times max|draws| = constant draws


def _prepare(x, name: str = "x") -> tuple[Tensor, tuple[int, ...]]:
    """Validate x [chains, draws, ...]; return it as [chains, draws, M] (M = trailing elements,
    a view when it can be; :func:`_chunks` makes the float64 copies) and the trailing shape."""
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise TypeError(f"{name} must be a real numeric array, got numpy dtype {x.dtype}")
        if not x.dtype.isnative:  # big-endian data (e.g. read from a file): torch holds native order only
            x = x.astype(x.dtype.newbyteorder("="))
        try:
            x = torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:  # numpy number types torch has no dtype for (longdouble, timedelta64, ...)
            raise TypeError(f"{name} has numpy dtype {x.dtype}, which torch cannot hold; convert it with "
                            f"{name}.astype(np.float64)") from None
    elif not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray of shape [chains, draws, ...], "
                        f"got {type(x).__name__}; convert it with torch.as_tensor")
    if x.is_complex() or x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense real tensor, got dtype {x.dtype} and layout {x.layout}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [chains, draws, ...], got shape {tuple(x.shape)}; "
                         f"for the draws of one chain pass {name}[None]")
    chains, draws = x.shape[0], x.shape[1]
    if chains < 1:
        raise ValueError(f"{name} has no chains (shape {tuple(x.shape)}); pass at least one chain")
    if draws < _MIN_DRAWS:
        raise ValueError(f"{name} has {draws} draws per chain (shape {tuple(x.shape)}); at least "
                         f"{_MIN_DRAWS} are needed (dimension 1 is the draws: [chains, draws, ...])")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor: its values are needed")
    x = x.detach()
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf); drop the diverged "
                             f"chains or draws first (e.g. {name}[keep] with keep = "
                             f"{name}.flatten(1).isfinite().all(1))")
    return x.reshape(chains, draws, -1), tuple(x.shape[2:])


def _chunks(y: Tensor):
    """Blocks of elements of y [C, D, M] of about _CHUNK_VALUES values each, as float64
    [m, C, D] (m elements): each chunk is converted on its own, so a large float32 x is never
    copied whole."""
    step = max(1, _CHUNK_VALUES // max(1, y.shape[0] * y.shape[1]))
    for i in range(0, y.shape[2], step):
        c = y[:, :, i:i + step].permute(2, 0, 1).to(torch.float64).contiguous()
        # finite draws beyond ~1e154 overflow the variances of 'split' R-hat and 'mean' ESS to inf,
        # draws below ~1e-154 underflow them to 0 (NaN / wrong results); every statistic here is
        # scale-free, so such elements are scaled by a power of two (exact) to 1/2 <= max|x| < 1.
        # Elements with max|x| in [2^-256, 2^256] are left as they are (ArviZ's numbers exactly).
        _, e = torch.frexp(c.abs().amax((1, 2)))
        c = torch.ldexp(c, -torch.where((e > 256) | (e < -256), e, 0)[:, None, None])
        yield c


def _split(y: Tensor) -> Tensor:
    """[M, C, D] -> [M, 2C, D // 2]: first halves of every chain, then the second halves."""
    half = y.shape[-1] // 2
    return torch.cat([y[..., :half], y[..., y.shape[-1] - half:]], dim=1)


def _z_scale(y: Tensor, with_sorted: bool = False):
    """Normal scores of y [M, C, D], ranking all C * D values of an element together: average
    ranks for ties (scipy's rankdata 'average'), Blom's (r - 3/8) / (S + 1/4), then Phi^-1.
    With ``with_sorted``, also the sorted values [M, C * D] (for the median without a 2nd sort)."""
    flat = y.reshape(y.shape[0], -1)
    v, idx = torch.sort(flat, dim=-1)
    n = flat.shape[-1]
    pos = torch.arange(n, device=y.device).expand_as(idx)
    starts = torch.ones_like(v, dtype=torch.bool)
    starts[:, 1:] = v[:, 1:] != v[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(-1).values  # first sorted position of each tie group
    last = torch.where(ends, pos, n - 1).flip(-1).cummin(-1).values.flip(-1)  # ... and its last
    ranks_sorted = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty_like(ranks_sorted).scatter_(-1, idx, ranks_sorted)
    z = torch.special.ndtri((ranks - 0.375) / (n - 0.75 + 1)).reshape(y.shape)
    return (z, v) if with_sorted else z


def _median(sorted_values: Tensor) -> Tensor:
    """numpy's median of each row of sorted values [M, S] -> [M]."""
    n = sorted_values.shape[-1]
    if n % 2:
        return sorted_values[:, n // 2]
    return (sorted_values[:, n // 2 - 1] + sorted_values[:, n // 2]) / 2


def _folded(s: Tensor, sorted_values: Tensor | None = None) -> Tensor:
    """|s - median| per element of split draws s [M, C, D] (sorted_values: s's, if known)."""
    v = torch.sort(s.reshape(s.shape[0], -1), dim=-1).values if sorted_values is None else sorted_values
    return (s - _median(v)[:, None, None]).abs()


def _rhat_core(y: Tensor) -> Tensor:
    """Classic R-hat of y [M, C, n]: sqrt((B / W + n - 1) / n), B = n var(chain means),
    W = mean within-chain variance (both with n - 1); NaN for constant draws."""
    n = y.shape[-1]
    b = n * y.mean(-1).var(-1, correction=1)
    w = y.var(-1, correction=1).mean(-1)
    return torch.sqrt((b / w + n - 1) / n)


def _next_fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (a length the FFTs handle quickly)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _autocov(y: Tensor) -> Tensor:
    """Biased autocovariance of every chain of y [M, C, n] at lags 0 .. n - 1 (zero-padded FFT)."""
    n = y.shape[-1]
    f = torch.fft.rfft(y - y.mean(-1, keepdim=True), n=_next_fast_len(2 * n), dim=-1)
    return torch.fft.irfft(f * f.conj(), n=_next_fast_len(2 * n), dim=-1)[..., :n] / n


def _ess_core(y: Tensor) -> Tensor:
    """ESS of (already split) chains y [M, m, n], ArviZ's ``_ess`` for all M at once.

    rho_t = 1 - (W - mean_c acov_c(t)) / var_plus, pairs S_k = rho_2k + rho_2k+1 for the lags
    ArviZ visits (k <= kmax = (n - 3) // 2). Geyer's initial positive sequence stops at the first
    K with S_K <= 0 (else at kmax); the monotone sequence replaces S_k by min_{j<=k} S_j, and
    tau = -1 + 2 sum_{k<K} S'_k + rho_2K (kept when it was stored, S_K >= 0, or is positive).
    """
    n_el, m, n = y.shape
    acov = _autocov(y).mean(1)  # [M, n]: mean over chains
    mean_var = acov[:, 0] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if m > 1:
        var_plus = var_plus + y.mean(-1).var(-1, correction=1)
    rho = 1.0 - (mean_var[:, None] - acov) / var_plus[:, None]
    rho[:, 0] = 1.0
    kmax = max(0, (n - 3) // 2)
    pairs = rho[:, 0:2 * kmax + 2:2] + rho[:, 1:2 * kmax + 2:2]  # [M, kmax + 1]
    stop = pairs <= 0
    k = torch.where(stop.any(-1), stop.to(torch.int8).argmax(-1), kmax)[:, None]
    mono = torch.cat([pairs.new_zeros(n_el, 1), pairs.cummin(-1).values.cumsum(-1)], dim=-1)
    rho_k = rho.gather(-1, 2 * k)
    last = torch.where((pairs.gather(-1, k) >= 0) | (rho_k > 0), rho_k, 0.0)
    tau = -1.0 + 2.0 * mono.gather(-1, k) + last
    total = m * n
    tau = tau.squeeze(-1).clamp_min(1.0 / math.log10(total))
    out = total / tau
    out = torch.where(torch.isnan(rho[:, :2 * kmax + 2]).any(-1), math.nan, out)
    # constant draws (the draw count), judged relative to the draws' size: ArviZ's absolute test
    # (spread < 1e-15) would call a random walk of size 1e-17 'constant' (ESS = every draw)
    top = y.abs().amax((1, 2))
    spread = y.amax((1, 2)) - y.amin((1, 2))
    return torch.where(spread <= _RESOLUTION * top, float(total), out)


def _quantile(sorted_values: Tensor, p: float) -> Tensor:
    """Type-7 quantile of each row of sorted values [M, S] with scipy's mquantiles arithmetic."""
    n = sorted_values.shape[-1]
    aleph = n * p + (1.0 + p * (1.0 - 1.0 - 1.0))
    k = int(math.floor(min(max(aleph, 1), n - 1)))
    gamma = min(max(aleph - k, 0.0), 1.0)
    return (1.0 - gamma) * sorted_values[:, k - 1] + gamma * sorted_values[:, k]


def _method(method, valid: tuple[str, ...], what: str) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {valid}; got {type(method).__name__}")
    if method not in valid:
        raise ValueError(f"unknown {what} method {method!r}; choose one of {valid}")
    return method


def rhat(x, method: str = "rank") -> Tensor:
    """Potential scale reduction R-hat of MCMC draws, one value per trailing element.

    Args:
        x: draws [chains, draws, ...] (torch.Tensor or numpy array, real, finite; draws >= 4).
        method: ``'rank'`` (default; Vehtari et al. 2021: the larger of the bulk R-hat of the
            rank-normalised split chains and the tail R-hat of the rank-normalised split chains
            folded about their median), ``'split'`` (classic split R-hat of the raw values) or
            ``'folded'`` (the tail part alone).

    Returns:
        float64 tensor [...] on x's device (the trailing shape of x). Values near 1 mean the
        chains agree; Vehtari et al. recommend using the draws only when R-hat < 1.01. NaN where
        an element is constant over all draws (no variance to compare), inf where every split
        chain is constant but they differ. A single chain is split into two halves, which
        still detects a trend (ArviZ returns NaN for one chain; the R package posterior splits).
    """
    method = _method(method, RHAT_METHODS, "R-hat")
    y, trailing = _prepare(x)
    out = []
    for c in _chunks(y):
        s = _split(c)
        if method == "split":
            r = _rhat_core(s)
        elif method == "folded":
            r = _rhat_core(_z_scale(_folded(s)))
        else:  # the NaN of constant draws shows in both parts; fmax keeps the other one otherwise
            z, v = _z_scale(s, with_sorted=True)
            r = torch.fmax(_rhat_core(z), _rhat_core(_z_scale(_folded(s, v))))
        out.append(r)
    return _collect(out, y, trailing)


def ess(x, method: str = "bulk") -> Tensor:
    """Effective sample size of MCMC draws, one value per trailing element.

    Args:
        x: draws [chains, draws, ...] (torch.Tensor or numpy array, real, finite; draws >= 4;
            one chain is enough).
        method: ``'bulk'`` (default: ESS of the rank-normalised split chains, for the centre
            of the distribution, finite even for heavy tails), ``'tail'`` (the smaller ESS of
            the indicators x <= q5% and x <= q95%: how well the 90% interval's ends are known)
            or ``'mean'`` (ESS of the raw split chains: the classic ESS for estimating E[x]).

    Returns:
        float64 tensor [...] on x's device. Up to chains * draws for independent draws (more
        for antithetic chains); ``chains * (draws // 2) * 2`` where an element is constant.
        Vehtari et al. recommend bulk and tail ESS of at least 100 per chain.
    """
    method = _method(method, ESS_METHODS, "ESS")
    y, trailing = _prepare(x)
    out = []
    for c in _chunks(y):
        if method == "mean":
            out.append(_ess_core(_split(c)))
        elif method == "bulk":
            out.append(_ess_core(_z_scale(_split(c))))
        else:  # quantiles over all draws of the element (the middle draw of odd counts too)
            v, _ = torch.sort(c.reshape(c.shape[0], -1), dim=-1)
            e = [_ess_core(_split((c <= _quantile(v, p)[:, None, None]).to(torch.float64)))
                 for p in _TAIL_PROBS]
            out.append(torch.minimum(*e))
    return _collect(out, y, trailing)


def _collect(parts: list[Tensor], y: Tensor, trailing: tuple[int, ...]) -> Tensor:
    if not parts:  # no trailing elements
        return torch.empty(trailing, dtype=torch.float64, device=y.device)
    return torch.cat(parts).reshape(trailing)
