r"""Stochastic weight averaging: SWA (Izmailov et al. 2018), SWAG (Maddox et al. 2019), MultiSWAG.

The posterior tracks the model's trainable parameters, flattened in the order of
``model.parameters()`` (P numbers). Each :meth:`SWAG.collect` is ONE fused op over all parameter
tensors (``torch.ops.pyfastbayes.swag_collect_``) that updates the running mean and mean of
squares and writes the deviation of theta from the *updated* mean into row ``n % K`` of a
preallocated ring buffer D [K, P] (no ``torch.cat``, no reallocation; the oldest row is
overwritten).

**Scale convention.** Everywhere in this module ``scale`` multiplies the *covariance*:

.. math::
    \Sigma_{\text{lowrank}} = \text{scale}\,\Big(\tfrac12\,\mathrm{diag}(\sigma^2)
        + \tfrac{1}{2(K-1)} D^\top D\Big), \qquad
    \Sigma_{\text{diag}} = \text{scale}\,\mathrm{diag}(\sigma^2),

with :math:`\sigma^2 = \max(\overline{\theta^2} - \bar\theta^2, \text{var\_clamp})` and K the
number of deviation rows collected so far (at most ``max_rank``). A draw is
:math:`\theta = \bar\theta + \sqrt{\text{scale}}\,(\sigma\odot z_1/\sqrt2 + D^\top z_2/\sqrt{2(K-1)})`
(``cov='lowrank'``) or :math:`\bar\theta + \sqrt{\text{scale}}\,\sigma\odot z_1` (``cov='diag'``),
z1 ~ N(0, I_P), z2 ~ N(0, I_K). ``scale=0.5`` is the SWAG paper's recipe. (swa_gaussian multiplies
the standard deviation in one code path and the variance in another; ``scale`` here is always the
variance factor, so its ``scale=0.5`` sample matches ours only in the variance path.)

Randomness: each :meth:`SWAG.sample` draws one 64-bit seed from the torch generator (the global
one, or ``generator=``) and the kernel generates z1 in-kernel from the Philox4x32-10 stream
(seed, 0x53570000 + draw index) at the parameter's flat index, and z2 [S, K] from the stream
(seed, 0x5357FFFF), element s * K + k (see ``csrc/common/swag.h``): CPU, CUDA and the
pure-PyTorch reference draw the same numbers, and ``torch.manual_seed`` fixes every draw.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import ops
from .ops.layouts import SWAG as _SWAG_SLOTS
SWAG_MAX_DRAWS = _SWAG_SLOTS.max_draws
from .bma import iterate_inputs

__all__ = ["SWA", "SWAG", "MultiSWAG", "update_bn"]

_COVS = ("lowrank", "diag")
_LIKELIHOODS = ("classification", "regression")
_STATE_DTYPES = (torch.float32, torch.float64)
_DEV_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_COLUMN_BLOCK = 1 << 22  # columns per transfer when D lives on another device than the mean


def _check_scale(scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}") from None
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a finite number > 0 (it multiplies the covariance), got {scale}")
    return s


def _check_cov(cov: str) -> str:
    if cov not in _COVS:
        raise ValueError(f"cov must be one of {_COVS}, got {cov!r}")
    return cov


def _draw_seed(generator: torch.Generator | None) -> int:
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=dev))


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _ModeGuard:
    """Remember every submodule's train/eval flag and restore it on exit."""

    def __init__(self, model: nn.Module, training: bool):
        self.model, self.training = model, training

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


@torch.no_grad()
def _refresh_bn(model: nn.Module, loader, tensors: dict | None, device, batch_size: int) -> None:
    """Recompute the BatchNorm running statistics in one pass over ``loader`` (cumulative average).

    tensors=None: the model's own parameters and buffers are used and updated; else ``tensors``
    (name -> tensor, parameters and buffers) are swapped in with functional_call and its BN
    buffers are updated in place.
    """
    bns = _bn_modules(model)
    if not bns:
        return
    names = {m: n for n, m in model.named_modules()}
    for m in bns:
        if not m.track_running_stats:
            continue
        pre = names[m] + "." if names[m] else ""
        rm, rv, nb = (tensors[pre + k] if tensors is not None else getattr(m, k)
                      for k in ("running_mean", "running_var", "num_batches_tracked"))
        rm.zero_()
        rv.fill_(1)
        nb.zero_()
    momenta = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.momentum = None  # cumulative moving average over the pass
        with _ModeGuard(model, True):
            seen = False
            for b in iterate_inputs(loader, batch_size):
                b = b.to(device)
                if tensors is None:
                    model(b)
                else:
                    functional_call(model, tensors, (b,))
                seen = True
            if not seen:
                raise ValueError("the BatchNorm loader yielded no batches")
    finally:
        for m, mom in momenta:
            m.momentum = mom


def update_bn(loader, model: nn.Module, batch_size: int = 1024) -> None:
    """Recompute the BatchNorm running statistics of ``model`` for its current parameters.

    One pass over ``loader`` (a tensor [N, ...] split into ``batch_size`` rows, or a loader of
    inputs / (input, target) batches) in train mode with the cumulative average (momentum None);
    the momenta and every module's train/eval flag are restored. No-op without BatchNorm layers.
    """
    dev = next(iter(model.parameters())).device
    _refresh_bn(model, loader, None, dev, batch_size)


class SWA:
    """Stochastic weight averaging: the running mean [P] of the model's trainable parameters.

    Numerically equal to ``torch.optim.swa_utils.AveragedModel`` (weights lerp'ed with
    w = 1 / (n + 1), the first collect copies) for float32 / float64 parameters, updated by the
    same fused op as :class:`SWAG` (one pass over all parameter tensors). The mean is kept in
    ``dtype`` (default float64 if any parameter is float64, else float32), so half-precision
    parameters are averaged in float32 rather than rounded at every step.

    Args:
        model: the network; its trainable parameters (order of ``model.parameters()``, P numbers,
            all on one device, any floating dtypes) are tracked.
        dtype: float32 or float64 state.

    Attributes:
        mean: [P] running average.  n_averaged: number of collected models.
    """

    kind = "SWA"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters")
        for n, p in named:
            if p.dtype not in _DEV_DTYPES:
                raise TypeError(f"parameter {n!r} has dtype {p.dtype}; SWA/SWAG track float64/32/16 and bfloat16")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"the trainable parameters must be on one device, got {sorted(map(str, devices))}")
        if dtype is None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in named) else torch.float32
        if dtype not in _STATE_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.model = model
        self._layout = [(n, tuple(p.shape), p.dtype) for n, p in named]
        self.device = named[0][1].device
        self.dtype = dtype
        self.numel = sum(p.numel() for _, p in named)
        self.mean = torch.zeros(self.numel, dtype=dtype, device=self.device)
        self.n_averaged = 0

    # ---- parameters <-> flat vectors ---------------------------------------------------------
    def _params(self, model: nn.Module | None = None) -> list[Tensor]:
        """The trainable parameters of ``model`` (default: the tracked one), checked against the layout."""
        model = self.model if model is None else model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        now = [(n, tuple(p.shape), p.dtype) for n, p in named]
        if now != self._layout:
            if len(now) != len(self._layout):
                why = f"{len(now)} trainable tensors now, {len(self._layout)} at construction"
            else:
                i = next(i for i, (a, b) in enumerate(zip(now, self._layout)) if a != b)
                why = f"tensor {i}: {now[i]} now, {self._layout[i]} at construction"
            raise RuntimeError(f"the model's trainable parameters changed since the {self.kind} was built ({why})")
        for n, p in named:
            if p.device != self.device:
                raise RuntimeError(f"parameter {n!r} moved to {p.device}; the {self.kind} state is on {self.device}")
        return [p.detach() for _, p in named]

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Flat [P] -> dict name -> [shape] in each parameter's dtype (views where dtypes agree)."""
        out, off = {}, 0
        for n, shape, dt in self._layout:
            k = math.prod(shape)
            out[n] = flat[off:off + k].view(shape).to(dt)
            off += k
        return out

    @torch.no_grad()
    def _write(self, flat: Tensor, model: nn.Module | None) -> nn.Module:
        model = self.model if model is None else model
        ps = self._params(model)
        off = 0
        for p in ps:
            k = p.numel()
            p.copy_(flat[off:off + k].view(p.shape))
            off += k
        return model

    # ---- collecting ----------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, model: nn.Module | None = None) -> None:
        """Add the current parameters of ``model`` (default: the tracked model) to the average."""
        ps = self._params(model)
        ops.swag_collect_(ps, self.mean, None, None, self.n_averaged)
        self.n_averaged += 1

    def _require_collected(self) -> None:
        if self.n_averaged == 0:
            raise RuntimeError(f"the {self.kind} has no collected models yet: call collect() first")

    def load_mean_(self, model: nn.Module | None = None) -> nn.Module:
        """Write the running average [P] into the parameters of ``model`` (default: the tracked
        one) in place, cast to each parameter's dtype; returns the model."""
        self._require_collected()
        return self._write(self.mean, model)

    def update_bn(self, loader, model: nn.Module | None = None, batch_size: int = 1024) -> None:
        """Recompute the BatchNorm statistics of ``model`` (default: the tracked one) for its
        current parameters in one pass over ``loader`` (see :func:`update_bn`)."""
        update_bn(loader, self.model if model is None else model, batch_size)

    # ---- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def _moments(self, thetas: Iterable[Tensor], x, likelihood: str, bn_loader, batch_size: int):
        """Sum over draws of the outputs (probabilities for classification) and of their squares."""
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
        self._params()
        model, dev = self.model, self.device
        batches = [b.to(dev) for b in iterate_inputs(x, batch_size)]
        if not batches:
            raise ValueError("x yielded no inputs")
        base_buffers = dict(model.named_buffers())
        acc1 = acc2 = None
        count = 0
        for theta in thetas:
            tensors = self._unflatten(theta)
            if bn_loader is not None and _bn_modules(model):
                bufs = {k: v.clone() for k, v in base_buffers.items()}
                tensors.update(bufs)
                _refresh_bn(model, bn_loader, tensors, dev, batch_size)
            else:
                tensors.update(base_buffers)
            with _ModeGuard(model, False):
                out = torch.cat([functional_call(model, tensors, (b,)) for b in batches])
            if out.dtype in (torch.float16, torch.bfloat16):
                out = out.float()
            if likelihood == "classification":
                out = out.softmax(-1)
                acc1 = out if acc1 is None else acc1 + out
            else:
                acc1 = out.clone() if acc1 is None else acc1 + out
                acc2 = out * out if acc2 is None else acc2 + out * out
            count += 1
        return acc1, acc2, count

    @staticmethod
    def _finish(acc1, acc2, count, likelihood):
        mean = acc1 / count
        if likelihood == "classification":
            return mean
        return mean, (acc2 / count - mean * mean).clamp_min(0)

    def predict(self, x, bn_loader=None, likelihood: str = "classification", batch_size: int = 1024):
        """Predictions of the SWA solution: :meth:`predict_mean`."""
        return self.predict_mean(x, bn_loader, likelihood, batch_size)

    def predict_mean(self, x, bn_loader=None, likelihood: str = "classification", batch_size: int = 1024):
        """Predictions of the SWA solution (the running average) in eval mode, without touching
        the model's own parameters.

        Args:
            x: inputs [N, ...] or a loader of inputs / (input, target) batches.
            bn_loader: when given, the BatchNorm statistics are recomputed for the average first
                (on copies of the buffers; the model's own buffers are left alone).
            likelihood: 'classification' -> softmax probabilities [N, C]; 'regression' ->
                (outputs [N, D], zeros [N, D]) so that it composes with :meth:`SWAG.predict`.
        """
        self._require_collected()
        acc1, acc2, n = self._moments([self.mean], x, likelihood, bn_loader, batch_size)
        return self._finish(acc1, acc2, n, likelihood)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Layout, mean and count (tensors cloned)."""
        return {"kind": self.kind, "layout": [(n, s, str(d)) for n, s, d in self._layout],
                "mean": self.mean.clone(), "n_averaged": self.n_averaged}

    def _check_state(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"state_dict is of a {state.get('kind')!r}, expected {self.kind!r}")
        mine = [(n, tuple(s), str(d)) for n, s, d in self._layout]
        theirs = [(n, tuple(s), str(d)) for n, s, d in state["layout"]]
        if mine != theirs:
            raise ValueError("state_dict was saved for a model with other trainable parameters")
        if int(state["n_averaged"]) < 0 or tuple(state["mean"].shape) != (self.numel,):
            raise ValueError(f"state_dict mean has shape {tuple(state['mean'].shape)}, expected ({self.numel},)")

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (checked first; nothing changes when it does not fit)."""
        self._check_state(state)
        self.mean.copy_(state["mean"])
        self.n_averaged = int(state["n_averaged"])


class SWAG(SWA):
    r"""SWA-Gaussian posterior N(mean, scale * Sigma) over the model's trainable parameters.

    Memory: mean and sq_mean [P] in ``dtype``, D [K, P] in ``deviation_dtype`` (the dominant
    term: 80 bytes per parameter at K = 20 in float32, 40 in bfloat16), plus a [P] staging row
    when D is kept on another device than the model.

    Args:
        model: the network (trainable parameters, order of ``model.parameters()``; mixed dtypes
            allowed, all on one device, CPU or CUDA).
        max_rank: K, rows of the deviation ring buffer; 0 keeps the diagonal only, else >= 2.
        deviation_dtype: float32, bfloat16, float16 (or float64) storage of D; default ``dtype``.
        store_device: where D lives; ``'cpu'`` with a CUDA model keeps it in pinned host memory
            (each collect writes the row on the GPU and copies it asynchronously; sampling streams
            D back in column blocks).
        var_clamp: eps of sigma^2 = max(sq_mean - mean^2, eps).
        dtype: float32 or float64 for mean and sq_mean (default float64 if any parameter is
            float64, else float32).

    See the module docstring for the scale convention (``scale`` multiplies the covariance).
    """

    kind = "SWAG"

    def __init__(self, model: nn.Module, max_rank: int = 20, deviation_dtype: torch.dtype | None = None,
                 store_device=None, var_clamp: float = 1e-30, dtype: torch.dtype | None = None):
        if isinstance(max_rank, bool) or not isinstance(max_rank, int):
            raise TypeError(f"max_rank must be an int, got {type(max_rank).__name__}")
        if max_rank == 1 or max_rank < 0:
            raise ValueError(f"max_rank must be 0 (diagonal only) or >= 2 (the low-rank part divides by K - 1), "
                             f"got {max_rank}")
        if not (math.isfinite(float(var_clamp)) and float(var_clamp) >= 0):
            raise ValueError(f"var_clamp must be finite and >= 0, got {var_clamp}")
        super().__init__(model, dtype)
        if deviation_dtype is None:
            deviation_dtype = self.dtype
        if deviation_dtype not in _DEV_DTYPES:
            raise TypeError(f"deviation_dtype must be one of float32, bfloat16, float16, float64; got {deviation_dtype}")
        self.max_rank = max_rank
        self.var_clamp = float(var_clamp)
        self.deviation_dtype = deviation_dtype
        self.store_device = torch.device(store_device) if store_device is not None else self.device
        pin = self.store_device.type == "cpu" and self.device.type == "cuda"
        self.sq_mean = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.D = torch.zeros(max_rank, self.numel, dtype=deviation_dtype, device=self.store_device, pin_memory=pin)
        self._stage = (torch.empty(self.numel, dtype=deviation_dtype, device=self.device)
                       if max_rank and self.store_device != self.device else None)

    @property
    def rank(self) -> int:
        """Deviation rows collected so far, at most ``max_rank`` (the K used by sampling)."""
        return min(self.n_averaged, self.max_rank)

    @property
    def position(self) -> int:
        """Ring-buffer row that the next :meth:`collect` overwrites."""
        return self.n_averaged % self.max_rank if self.max_rank else 0

    def _sync_store(self) -> None:
        """Wait for pending device -> pinned-host copies of deviation rows."""
        if self._stage is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @torch.no_grad()
    def collect(self, model: nn.Module | None = None) -> None:
        """One fused update: mean, sq_mean, and the deviation theta - mean (updated mean) into ring
        row ``position``; the oldest row is overwritten once K rows are full."""
        ps = self._params(model)
        row = None
        if self.max_rank:
            row = self._stage if self._stage is not None else self.D[self.position]
        ops.swag_collect_(ps, self.mean, self.sq_mean, row, self.n_averaged)
        if self._stage is not None:
            self.D[self.position].copy_(self._stage, non_blocking=True)
        self.n_averaged += 1

    def variance(self) -> Tensor:
        """sigma^2 = max(sq_mean - mean^2, var_clamp) [P] (the diagonal part, before ``scale``)."""
        self._require_collected()
        return (self.sq_mean - self.mean * self.mean).clamp_min(self.var_clamp)

    def deviations(self) -> Tensor:
        """The collected deviation rows D[:K] [K, P] (a view, no copy; physical ring order)."""
        self._sync_store()
        return self.D[: self.rank]

    def _check_draw_args(self, n, scale, cov) -> tuple[int, float, str]:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        scale, cov = _check_scale(scale), _check_cov(cov)
        self._require_collected()
        if cov == "lowrank" and self.rank < 2:
            if self.max_rank == 0:
                raise ValueError("cov='lowrank' needs max_rank >= 2; this SWAG keeps the diagonal only "
                                 "(use cov='diag')")
            raise RuntimeError(f"cov='lowrank' needs >= 2 collected deviations, have {self.rank}: collect more "
                               "or use cov='diag'")
        return n, scale, cov

    def _draws(self, n: int, scale: float, cov: str, seed: int) -> Tensor:
        K = self.rank if cov == "lowrank" else 0
        if K == 0 or self.D.device == self.device:
            return ops.swag_sample(self.mean, self.sq_mean, self.D[:K] if K else None, n, scale, self.var_clamp,
                                   seed)
        # D on another device: stream it to the mean's device in column blocks (noise indexed globally)
        self._sync_store()
        out = torch.empty(n, self.numel, dtype=self.dtype, device=self.device)
        for c0 in range(0, self.numel, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, self.numel)
            blk = self.D[:K, c0:c1].to(self.device, non_blocking=True)
            out[:, c0:c1] = ops.swag_sample(self.mean[c0:c1], self.sq_mean[c0:c1], blk, n, scale, self.var_clamp,
                                            seed, 0, c0)
        return out

    def sample(self, n: int, scale: float = 0.5, cov: str = "lowrank",
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws [n, P] (dtype of the state, on the model's device) in one batched kernel:
        mean, variance and D are read once for all draws and the noise is generated in-kernel.

        Args:
            n: S, number of draws.  scale: > 0, multiplies the covariance.
            cov: 'lowrank' (diagonal + low-rank, needs >= 2 collected rows) or 'diag'.
            generator: torch generator the draw's seed comes from (default: the global one).
        """
        n, scale, cov = self._check_draw_args(n, scale, cov)
        parts = [self._draws(min(SWAG_MAX_DRAWS, n - s0), scale, cov, _draw_seed(generator))
                 for s0 in range(0, n, SWAG_MAX_DRAWS)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def sample_(self, model: nn.Module | None = None, scale: float = 0.5, cov: str = "lowrank",
                generator: torch.Generator | None = None) -> nn.Module:
        """Write one draw into the parameters of ``model`` (default: the tracked one) in place (one
        [P] temporary, no deep copy); returns the model. BatchNorm statistics are not touched:
        call :meth:`update_bn` afterwards for networks with BatchNorm."""
        self._params(model)
        theta = self.sample(1, scale, cov, generator)[0]
        return self._write(theta, model)

    @torch.no_grad()
    def log_prob(self, theta: Tensor, scale: float = 0.5, cov: str = "lowrank") -> Tensor:
        r"""Log density of the SWAG Gaussian at ``theta`` [P] or [S, P] -> float64 [] or [S].

        Low rank: the covariance is A + U U^T with A = scale sigma^2 / 2 (diagonal) and
        U = sqrt(scale / (2 (K - 1))) D^T [P, K]; the Woodbury identity and the matrix determinant
        lemma reduce it to a K x K Cholesky factor of I + U^T A^{-1} U (no P x P matrix; D is read
        in column blocks, in float64).
        """
        _, scale, cov = self._check_draw_args(0, scale, cov)
        if not torch.is_tensor(theta) or not theta.is_floating_point():
            raise TypeError("theta must be a floating-point tensor [P] or [S, P]")
        if theta.dim() not in (1, 2) or theta.shape[-1] != self.numel:
            raise ValueError(f"theta must be [P] or [S, P] with P = {self.numel}, got {tuple(theta.shape)}")
        single = theta.dim() == 1
        th = theta.reshape(-1, self.numel)
        S, dev, f64 = th.shape[0], self.device, torch.float64
        K = self.rank if cov == "lowrank" else 0
        self._sync_store()
        logdet = torch.zeros((), dtype=f64, device=dev)
        quad = torch.zeros(S, dtype=f64, device=dev)
        C = torch.zeros(K, K, dtype=f64, device=dev)
        v = torch.zeros(S, K, dtype=f64, device=dev)
        cu = math.sqrt(scale / (2 * (K - 1))) if K else 0.0
        for c0 in range(0, self.numel, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, self.numel)
            m = self.mean[c0:c1].to(f64)
            var = (self.sq_mean[c0:c1].to(f64) - m * m).clamp_min(self.var_clamp)
            a = var * (scale / 2 if K else scale)
            r = th[:, c0:c1].to(dev, f64) - m
            logdet += torch.log(a).sum()
            quad += (r * r / a).sum(1)
            if K:
                U = self.D[:K, c0:c1].to(dev, f64).T * cu  # [c, K]
                Ua = U / a[:, None]
                C += U.T @ Ua
                v += r @ Ua
        if K:
            C += torch.eye(K, dtype=f64, device=dev)
            L = torch.linalg.cholesky(C)
            logdet = logdet + 2 * torch.log(torch.diagonal(L)).sum()
            w = torch.cholesky_solve(v.T, L)  # [K, S]
            quad = quad - (v * w.T).sum(1)
        lp = -0.5 * (self.numel * math.log(2 * math.pi) + logdet + quad)
        return lp[0] if single else lp

    def _draw_stream(self, n_samples, scale, cov, generator, progress):
        """Yield n_samples flat draws [P], generated in batches that keep [batch, P] under ~256 MB."""
        per = max(1, min(n_samples, (256 << 20) // max(1, self.numel * self.mean.element_size())))
        it = range(n_samples)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="SWAG BMA", leave=False)
        batch = None
        for i in it:
            if i % per == 0:
                batch = self.sample(min(per, n_samples - i), scale, cov, generator)
            yield batch[i % per]

    @torch.no_grad()
    def predict(self, x, n_samples: int = 30, scale: float = 0.5, bn_loader=None, progress: bool = True,
                cov: str = "lowrank", likelihood: str = "classification", batch_size: int = 1024,
                generator: torch.Generator | None = None):
        """Bayesian model average over ``n_samples`` SWAG draws, in eval mode, through
        ``functional_call`` (the model's own parameters and buffers are left alone).

        Args:
            x: inputs [N, ...] or a loader of inputs / (input, target) batches.
            n_samples: S >= 1 draws.  scale, cov, generator: as in :meth:`sample`.
            bn_loader: when given, the BatchNorm statistics are recomputed for each draw in one
                pass over it (on copies of the buffers).
            progress: tqdm bar over the draws.
            likelihood: 'classification' -> mean over draws of softmax(outputs) [N, C];
                'regression' -> (mean [N, D], variance over draws [N, D]) of the outputs (the
                epistemic part; add the noise variance for the predictive one).
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        self._check_draw_args(n_samples, scale, cov)
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
        acc1, acc2, n = self._moments(self._draw_stream(n_samples, scale, cov, generator, progress), x, likelihood,
                                      bn_loader, batch_size)
        return self._finish(acc1, acc2, n, likelihood)

    def state_dict(self) -> dict:
        """Layout, mean, sq_mean, the collected rows of D, count and ring position (cloned)."""
        self._sync_store()
        sd = super().state_dict()
        sd.update(sq_mean=self.sq_mean.clone(), D=self.D[: self.rank].clone(), max_rank=self.max_rank,
                  position=self.position, var_clamp=self.var_clamp)
        return sd

    def _check_state(self, state: dict) -> None:
        super()._check_state(state)
        if int(state["max_rank"]) != self.max_rank:
            raise ValueError(f"state_dict has max_rank {state['max_rank']}, this SWAG {self.max_rank}")
        rank = min(int(state["n_averaged"]), self.max_rank)
        if tuple(state["sq_mean"].shape) != (self.numel,) or tuple(state["D"].shape) != (rank, self.numel):
            raise ValueError(f"state_dict sq_mean/D have shapes {tuple(state['sq_mean'].shape)}/"
                             f"{tuple(state['D'].shape)}, expected ({self.numel},)/({rank}, {self.numel})")
        pos = int(state["n_averaged"]) % self.max_rank if self.max_rank else 0
        if int(state["position"]) != pos:
            raise ValueError(f"state_dict ring position {state['position']} disagrees with n_averaged "
                             f"{state['n_averaged']} (expected {pos})")

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`, ring position included (checked first; nothing changes when
        it does not fit)."""
        self._check_state(state)
        self._sync_store()
        super().load_state_dict(state)
        self.sq_mean.copy_(state["sq_mean"])
        rank = state["D"].shape[0]
        self.D[:rank].copy_(state["D"])
        self.D[rank:].zero_()
        self.var_clamp = float(state["var_clamp"])


class MultiSWAG:
    """An equal-weight mixture of SWAG posteriors from independent runs (Wilson & Izmailov 2020).

    Draws are stratified: of S draws, component i gets S // M (+1 for the first S % M), so each
    run contributes in proportion to its weight 1 / M without sampling noise in the counts.

    Args:
        posteriors: M >= 1 :class:`SWAG` objects over models with the same parameter layout.
    """

    def __init__(self, posteriors: Sequence[SWAG]):
        posteriors = list(posteriors)
        if not posteriors:
            raise ValueError("MultiSWAG needs at least one SWAG")
        for i, p in enumerate(posteriors):
            if not isinstance(p, SWAG):
                raise TypeError(f"posteriors[{i}] is a {type(p).__name__}, expected SWAG")
        if any(p.numel != posteriors[0].numel for p in posteriors):
            raise ValueError(f"the SWAGs track different parameter counts: {[p.numel for p in posteriors]}")
        self.posteriors = posteriors

    def __len__(self) -> int:
        return len(self.posteriors)

    def __getitem__(self, i: int) -> SWAG:
        return self.posteriors[i]

    def _counts(self, n: int) -> list[int]:
        M = len(self.posteriors)
        return [n // M + (i < n % M) for i in range(M)]

    def sample(self, n: int, scale: float = 0.5, cov: str = "lowrank",
               generator: torch.Generator | None = None) -> Tensor:
        """S = n draws [n, P] from the mixture (component blocks in order; see the class docstring)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        for p in self.posteriors:
            p._check_draw_args(0, scale, cov)
        parts = [p.sample(k, scale, cov, generator) for p, k in zip(self.posteriors, self._counts(n)) if k]
        if not parts:
            return self.posteriors[0].mean.new_empty(0, self.posteriors[0].numel)
        dev = parts[0].device
        return torch.cat([q.to(dev) for q in parts])

    @torch.no_grad()
    def predict(self, x, n_samples: int = 30, scale: float = 0.5, bn_loader=None, progress: bool = True,
                cov: str = "lowrank", likelihood: str = "classification", batch_size: int = 1024,
                generator: torch.Generator | None = None):
        """Bayesian model average over ``n_samples`` draws of the mixture (each component through its
        own model); arguments and outputs as in :meth:`SWAG.predict`."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
        for p in self.posteriors:
            p._check_draw_args(0, scale, cov)
        acc1 = acc2 = None
        total = 0
        for p, k in zip(self.posteriors, self._counts(n_samples)):
            if not k:
                continue
            a1, a2, c = p._moments(p._draw_stream(k, scale, cov, generator, progress), x, likelihood, bn_loader,
                                   batch_size)
            acc1 = a1 if acc1 is None else acc1 + a1.to(acc1.device)
            if a2 is not None:
                acc2 = a2 if acc2 is None else acc2 + a2.to(acc2.device)
            total += c
        return SWA._finish(acc1, acc2, total, likelihood)

    def state_dict(self) -> dict:
        """The components' state dicts, in order."""
        return {"kind": "MultiSWAG", "components": [p.state_dict() for p in self.posteriors]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (all components checked before any is changed)."""
        comps = state.get("components", [])
        if state.get("kind") != "MultiSWAG" or len(comps) != len(self.posteriors):
            raise ValueError(f"state_dict is not a MultiSWAG of {len(self.posteriors)} components")
        for p, s in zip(self.posteriors, comps):
            p._check_state(s)
        for p, s in zip(self.posteriors, comps):
            p.load_state_dict(s)
