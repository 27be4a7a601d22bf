r"""SWA-Gaussian (Maddox et al. 2019): :class:`SWAG`.

The posterior tracks the model's trainable parameters, flattened by
:class:`pyfastbayes.nn.ParamLayout` (P numbers). Each :meth:`SWAG.collect` is ONE fused op over all
parameter tensors (``pyfastbayes.ops.swag_collect_``) that updates the running mean and mean of
squares and writes the deviation of theta from the *updated* mean into row ``n % K`` of a
preallocated ring buffer D [K, P] (no ``torch.cat``, no reallocation; the oldest row is
overwritten).

**Covariance and scale.** ``scale`` multiplies the whole covariance, as in swa_gaussian:

.. math::
    \Sigma_{\text{lowrank}} = \text{scale}\,\Big(\mathrm{diag}(\sigma^2) + \tfrac{1}{K-1} D^\top D\Big),
    \qquad \Sigma_{\text{diag}} = \text{scale}\,\mathrm{diag}(\sigma^2),

with :math:`\sigma^2 = \max(\overline{\theta^2} - \bar\theta^2, \text{var\_clamp})` and K the number
of deviation rows collected so far (at most ``max_rank``). Before the ring is full this is the
paper's 1/(K - 1) with the K rows there are; swa_gaussian's code divides by ``max_num_models - 1``
always, so its low-rank part is (K - 1) / (max_rank - 1) of ours until then (equal once K =
``max_rank``). A draw is
:math:`\theta = \bar\theta + \sqrt{\text{scale}}\,\sigma\odot z_1 + \sqrt{\text{scale}/(K-1)}\,D^\top z_2`
(``cov='lowrank'``) or :math:`\bar\theta + \sqrt{\text{scale}}\,\sigma\odot z_1` (``cov='diag'``),
z1 ~ N(0, I_P), z2 ~ N(0, I_K). The default ``scale=None`` is the SWAG paper's posterior for each
covariance: 0.5 for ``'lowrank'`` (N(theta_SWA, (Sigma_diag + D^T D / (K - 1)) / 2)) and 1.0 for
``'diag'`` (N(theta_SWA, Sigma_diag), SWAG-Diagonal).

Randomness: each :meth:`SWAG.sample` call draws one 64-bit seed from the torch generator (the
global one, or ``generator=``) per block of at most ``ops.SWAG.max_draws`` draws, and the kernel
generates z1 in-kernel from the Philox4x32-10 stream (seed, ``ops.SWAG.diag_stream`` + draw index)
at the parameter's flat index, and z2 [S, K] from the stream (seed, ``ops.SWAG.lowrank_stream``),
element s * K + k (see ``csrc/common/swag.h``): CPU, CUDA and the pure-PyTorch reference draw the
same numbers, and ``torch.manual_seed`` fixes every draw.

**Sharding under torch.distributed** (``SWAG(..., shard=True)``). Under DDP the parameters, hence
the moments, are the same on every rank; a sharded SWAG keeps on rank r only the columns
[a_r, b_r) of the flattened parameter vector (:func:`shard_columns`: balanced ranges that start
at multiples of 256): mean, sq_mean [b_r - a_r] and D [K, b_r - a_r], about (K + 2) P / R numbers
per rank instead of (K + 2) P. :meth:`SWAG.collect` updates those columns only (every update is
per element, so they are the single-process columns to the bit). A draw needs no communication
of the moments: column j's diagonal noise is the Philox counter of its global index j and z2
[S, K] does not depend on the columns, so rank r samples its columns with ``offset=a_r`` (exactly
those columns of the single-process draw, the seed being rank 0's, broadcast) and one all-gather
per block of draws assembles [S, P] on every rank: the same draws as the single-process SWAG with
rank 0's generator. The column ranges start at multiples of the CPU sampler's column block (256),
so every column also takes the same instruction path (tile or tail) in the CPU kernel as in the
single-process call.

**FSDP2** (the trainable parameters are DTensors of ``torch.distributed.fsdp.fully_shard``,
placed Shard(0) or Replicate on a 1-D device mesh). The state is sharded like the parameters,
with no option to set: rank r keeps mean, sq_mean [P_r] and D [K, P_r] for the elements of its
local shards only (P_r: the concatenation of its local shard of every parameter, in layout
order). Each local shard is one contiguous range [g_t, g_t + n_t) of the full flat vector (the
layout over the FULL parameters), so :meth:`SWAG.collect` updates those columns from the local
shards (no gather; the same numbers as the single-process columns) and a draw takes, per range,
the single-process draw's columns: ``swag_sample`` with ``offset=g_t`` (any offset) and the same
z2 on every rank (rank 0's seed, broadcast). :meth:`SWAG.sample_` writes each rank's local shards
(one seed broadcast, no gather), :meth:`SWAG.predict` runs the BMA on the live FSDP model (each
draw written into the local shards, FSDP's own forward all-gathers; parameters restored
afterwards), :meth:`SWAG.sample` all-gathers to the full [n, P] (the single-process draws, rank
0's generator) and :meth:`SWAG.state_dict` gathers to the single-process format.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .. import ops
from .._distributed import local_tensor, shard_offset
from ..nn import ModeGuard, bn_modules, refresh_bn
from ..nn.inputs import call_model, check_reiterable, iterate_inputs, model_output, to_device
from .base import _DRAW_BYTES, _Average, check_int, check_generator, check_likelihood, storage_device
from ._sharding import ColumnShards, check_shard, shard_columns
from .swa import PARAM_DTYPES, SWA

__all__ = ["SWAG", "DEFAULT_SCALE", "shard_columns"]

COVS = ("lowrank", "diag")
DEFAULT_SCALE = {"lowrank": 0.5, "diag": 1.0}  # the SWAG paper's posterior for each covariance
FP16_MAX = 65504.0  # largest finite float16
_COLUMN_BLOCK = 1 << 22  # columns per block when D lives on another device than the mean (and in log_prob)


def check_cov(cov) -> str:
    """``cov`` if it is one of :data:`COVS`, else a ValueError listing them."""
    if cov not in COVS:
        raise ValueError(f"cov must be one of {COVS}, got {cov!r}")
    return cov


def check_var_clamp(var_clamp) -> float:
    """The variance floor: a finite number >= 0, else TypeError/ValueError naming var_clamp."""
    if isinstance(var_clamp, bool) or not isinstance(var_clamp, numbers.Real):
        raise TypeError(f"var_clamp must be a number, got {type(var_clamp).__name__}")
    if not (math.isfinite(float(var_clamp)) and float(var_clamp) >= 0):
        raise ValueError(f"var_clamp must be finite and >= 0, got {var_clamp}")
    return float(var_clamp)


def check_scale(scale, cov: str) -> float:
    """``scale`` as a float > 0; None -> :data:`DEFAULT_SCALE` of ``cov``."""
    if scale is None:
        return DEFAULT_SCALE[cov]
    if torch.is_tensor(scale) and scale.dim() == 0 and not scale.is_complex() and scale.dtype != torch.bool:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # (a string would pass float())
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a finite number > 0 (it multiplies the covariance), got {scale}")
    return s




def draw_seed(generator: torch.Generator | None) -> int:
    """One 64-bit seed from ``generator`` (default: the global CPU generator)."""
    check_generator(generator)
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=dev))


class SWAG(ColumnShards, SWA):
    r"""SWA-Gaussian posterior N(mean, Sigma) over the model's trainable parameters (see the module
    docstring for Sigma and ``scale``).

    Memory: mean and sq_mean [P] in ``dtype``, D [K, P] in ``deviation_dtype`` (the dominant
    term: 80 bytes per parameter at K = 20 in float32, 40 in bfloat16), plus a [P] staging row
    when D is kept on another device than the model.

    Args:
        model: the network (trainable parameters, order of ``model.named_parameters()``; mixed
            dtypes allowed, all on one device, CPU or CUDA).
        max_rank: K, rows of the deviation ring buffer; 0 keeps the diagonal only, else >= 2.
        deviation_dtype: float32, bfloat16, float16 (or float64) storage of D; default ``dtype``.
            float16 holds deviations up to 65504 only: :meth:`collect` refuses larger ones
            (bfloat16 has float32's range).
        store_device: where D lives; ``'cpu'`` with a CUDA model keeps it in pinned host memory
            (each collect writes the row on the GPU and copies it asynchronously; sampling streams
            D back in column blocks).
        var_clamp: eps of sigma^2 = max(sq_mean - mean^2, eps).
        dtype: float32 or float64 for mean and sq_mean (default float64 if any parameter is
            float64, else float32). sigma^2 = sq_mean - mean^2 cancels: its rounding error is about
            eps(dtype) * theta^2, so in float32 a weight whose spread over the collected models is
            below ~1e-3 of its size (|theta| / sigma > ~1e3, e.g. BatchNorm scales near 1 late in
            training) gets a variance of rounding noise, often clamped to ``var_clamp``; pass
            ``dtype=torch.float64`` there (8 more bytes per parameter; D keeps its own dtype).
        shard: under torch.distributed, keep only this rank's columns of the moments (see
            below). False (default): every rank keeps everything and nothing communicates; True:
            shard over ``process_group`` (needs an initialised process group; a group of one is
            allowed); None: shard when torch.distributed is initialised and the group has more
            than one rank.
        process_group: the group to shard over (default: the default group); only with
            ``shard`` True or None.

    **FSDP2** (``fsdp`` is True): when the trainable parameters are DTensors of ``fully_shard``
    (Shard(0) or Replicate on one 1-D mesh; every trainable parameter a DTensor), the state is
    sharded like them over the mesh's group (see the module docstring): ``mean``, ``sq_mean``
    [P_r] and ``D`` [K, P_r] hold this rank's local shards (``runs``: (global start, local
    start, length) of its columns; ``local_numel`` = P_r). ``shard=True`` (the DDP column
    sharding) and ``process_group`` are refused with FSDP2 parameters, as are other placements
    and meshes (ValueError naming them). Collective, all ranks in the same order: construction,
    ``collect`` (one all-reduce of the refusal flag), ``sample`` (seed broadcast, all-gather to
    the full [n, P]), ``sample_`` (seed broadcast only: each rank writes its local shards),
    ``predict`` and ``predict_mean`` (the model's forward passes, FSDP's all-gathers: give every
    rank inputs of the same number of batches), ``log_prob``, ``full_mean``, ``variance``,
    ``deviations`` and ``state_dict`` (gathered to the single-process format). ``load_state_dict``
    takes a full state (cut to the local columns, no communication); ``shard_state_dict`` is
    refused (use ``state_dict``). ``load_mean_`` writes the local shards (no communication).

    **Sharded** (``sharded`` is True): with R ranks in the group, rank ``shard_index`` keeps the
    columns ``columns`` = [a, b) of :func:`shard_columns` (P, R): ``mean``, ``sq_mean`` [b - a]
    and ``D`` [K, b - a] (memory about (K + 2) P / R numbers per rank). The parameters must be the
    same on every rank, as DDP keeps them. Every method that draws or reads the whole moments is
    then *collective*: all ranks of the group call it, in the same order, with the same arguments
    (``collect``: one small all-reduce of the refusal flag; ``sample``/``sample_``/``predict``/
    ``iter_samples``: one broadcast of rank 0's seeds per call and one all-gather per block of at
    most ``ops.SWAG.max_draws`` draws, after which every rank holds the same [S, P] draws,
    equal to the single-process SWAG's with rank 0's generator; ``log_prob``: two all-reduces;
    ``full_mean``, ``variance``, ``deviations``, ``load_mean_``, ``predict_mean`` and
    ``state_dict``: all-gathers, each rank then holding the [P] / [K, P] result). ``state_dict``
    is the single-process format (loadable by any SWAG of the same model, sharded or not);
    :meth:`shard_state_dict` saves only this rank's columns (loadable by the same rank of the
    same sharding). Construction is collective too: one all-gather checks that every rank built
    the same SWAG (layout, K, dtypes, var_clamp).

    Attributes:
        sharded: whether the moments are sharded (shard=True or FSDP2).  fsdp: whether by FSDP2's
            parameter shards.  process_group: the group (None: default).
        shard_world, shard_index: R and this rank's index in the group (1 and 0 unsharded).
        shard_ranges: [(a_r, b_r)] of every rank.  columns: (a, b) of this rank ((0, P) unsharded;
            None under FSDP2).  runs: this rank's (global start, local start, length) column
            runs.  local_numel: the width of the local state (P unsharded).
    """

    kind = "SWAG"

    def __init__(self, model: nn.Module, max_rank: int = 20, deviation_dtype: torch.dtype | None = None,
                 store_device=None, var_clamp: float = 1e-30, dtype: torch.dtype | None = None,
                 shard: bool | None = False, process_group=None):
        check_shard(shard)
        max_rank = check_int(max_rank, "max_rank", 0)
        if max_rank == 1:
            raise ValueError(f"max_rank must be 0 (diagonal only) or >= 2 (the low-rank part divides by K - 1), "
                             f"got {max_rank}")
        check_var_clamp(var_clamp)
        super().__init__(model, dtype)
        if float(var_clamp) > torch.finfo(self.dtype).max:  # (the op refuses it only when sampling)
            raise ValueError(f"var_clamp must be finite in the state dtype {self.dtype} (at most "
                             f"{torch.finfo(self.dtype).max:.3g}), got {var_clamp}")
        if deviation_dtype is None:
            deviation_dtype = self.dtype
        if deviation_dtype not in PARAM_DTYPES:
            raise TypeError(f"deviation_dtype must be one of float32, bfloat16, float16, float64; got {deviation_dtype}")
        self.max_rank = max_rank
        self.var_clamp = float(var_clamp)
        self.deviation_dtype = deviation_dtype
        self.store_device = storage_device(store_device, self.device, "store_device",
                                           "pass 'cpu' to keep the deviations in host memory, or None for the "
                                           "parameters' device")
        self._setup_shards(shard, process_group)
        width = self.local_numel
        if self.sharded:
            self.mean = self.mean.new_zeros(width)  # SWA allocated [P]; keep this rank's columns only
        pin = self.store_device.type == "cpu" and self.device.type == "cuda"
        self.sq_mean = torch.zeros(width, dtype=self.dtype, device=self.device)
        self.D = torch.zeros(max_rank, width, dtype=deviation_dtype, device=self.store_device, pin_memory=pin)
        self._stage = (torch.empty(width, dtype=deviation_dtype, device=self.device)
                       if max_rank and self.store_device != self.device else None)
        if self.sharded:
            self._check_same_everywhere()

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

    # ---- collecting ----------------------------------------------------------------------------
    def _local_max_deviation(self, ps: list[Tensor]) -> Tensor:
        """max_j |theta_j - mean'_j| [] over this rank's columns of the row this collect would
        write, without writing it: mean' = mean + w (theta - mean), so theta - mean' =
        (1 - w)(theta - mean), w = 1/(n + 1)."""
        pairs = [(p, o) for p, o in self._local(ps) if p.numel()]
        if not pairs:
            return self.mean.new_zeros(())
        views = [self.mean[o:o + p.numel()].view(p.shape) for p, o in pairs]
        diffs = torch._foreach_sub([p.to(self.dtype) for p, _ in pairs], views)
        w = 1.0 / (self.n_averaged + 1)
        return torch.stack(torch._foreach_norm(diffs, math.inf)).max() * (1 - w)

    def _max_deviation(self, ps: list[Tensor]) -> Tensor:
        """max_j |theta_j - mean'_j| [] over all P columns (sharded: an all-reduce of the ranks')."""
        big = self._local_max_deviation(ps)
        return self._all_reduce(big, torch.distributed.ReduceOp.MAX) if self.sharded else big

    def _fp16_check(self) -> bool:
        return bool(self.max_rank) and self.deviation_dtype == torch.float16

    def _limit(self) -> tuple[float, str]:
        """sqrt of the state dtype's largest value: a parameter at or beyond it in magnitude has a
        square that overflows sq_mean (float32: 1.84e19); below SWA's limit, so it covers the mean too."""
        return torch.finfo(self.dtype).max ** 0.5, (f"sqrt of {self.dtype}'s largest value: their squares overflow "
                                                    f"the {self.kind} second moment (sq_mean would be inf, and every "
                                                    "variance and draw inf or NaN)")

    def _magnitude_flag(self, ps: list[Tensor]) -> Tensor:
        """A parameter that is NaN, inf, or of magnitude >= sqrt(dtype max): one read of the
        parameters (``ops.any_nonfinite`` with that limit, in place of SWA's check without one): all
        of them, also sharded over columns (the replicas must agree: a NaN in another rank's
        columns of this replica refuses too), the local shards under FSDP2 (the DTensors
        themselves are not the op's inputs)."""
        ts = [t for t, _ in self._local(ps)] if self.fsdp else ps
        return ops.any_nonfinite(ts, self._limit()[0])

    def _collect_flag(self, ps: list[Tensor]) -> Tensor:
        """Parameters that are not finite or whose squares overflow ``dtype`` (sq_mean would hold
        inf and every variance and draw would be inf or NaN): one read of the parameters; with
        float16 D also the range check of the deviation row this collect would write,
        ``~(max |row| <= 65504)``. Its cost: ``torch._foreach_sub`` and ``_foreach_norm`` over the
        parameters, a transient [P] in ``dtype`` and about three passes over P (float16 D trades
        this for memory; bfloat16 D needs no range check). Sharded, the checks cover this rank's
        columns and the flag is all-reduced, so that every rank refuses or none does."""
        flag = self._magnitude_flag(ps)
        if self._fp16_check():
            flag = flag | ~(self._local_max_deviation(ps) <= FP16_MAX)
        if self.sharded:
            flag = self._all_reduce(flag.to(torch.int32), torch.distributed.ReduceOp.MAX).bool()
        return flag

    def _refuse_collect(self, ps: list[Tensor]) -> None:
        if not self.sharded:
            super()._refuse_collect(ps)  # (non-finite, then beyond the limit)
            self._refuse_fp16(float(self._max_deviation(ps)))
        # sharded: the global maximum (a collective) first, before any rank can raise
        big = float(self._max_deviation(ps)) if self._fp16_check() else None
        if self.fsdp:  # a non-finite element in this rank's shards, else in another rank's
            shards = [(self.layout.names[i], t) for (i, lo, hi), (t, _) in
                      zip([pc for pc in self._pieces if pc[2] > pc[1]], self._local(ps))]
            for name, t in shards:
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"parameter {name!r} holds NaN or inf (in this rank's shard): "
                                     f"collect() refuses it (it would poison the running mean for ever); the "
                                     f"{self.kind} state is unchanged")
            self._refuse_large(shards, " (in this rank's shard)")
            if big is not None and not big <= FP16_MAX:
                self._refuse_fp16(big)
            raise RuntimeError(f"another rank refused this collect (NaN or inf in its shards of the FSDP2 parameters, "
                               f"values whose squares overflow {self.dtype}, or a deviation beyond float16's range); "
                               f"the {self.kind} state is unchanged")
        super()._refuse_collect(ps)  # a non-finite or too large parameter (the same on every rank under DDP)
        if big is not None and not big <= FP16_MAX:
            self._refuse_fp16(big)
        raise RuntimeError(f"another rank refused this collect (non-finite parameters) while this rank's parameters "
                           f"pass: the replicas differ, but a sharded {self.kind} needs the same parameters on every "
                           f"rank (as DDP keeps them); the {self.kind} state is unchanged")

    def _refuse_fp16(self, big: float) -> None:
        raise ValueError(f"the deviation from the running mean reaches {big:.6g}, beyond float16's largest finite "
                         f"value {FP16_MAX:g}: D would hold inf and every draw would be non-finite. Use "
                         "deviation_dtype=torch.bfloat16 (same memory, float32's range) or torch.float32; "
                         f"the {self.kind} state is unchanged")

    def _update(self, ps: list[Tensor]) -> None:
        """One fused update: mean, sq_mean, and the deviation theta - mean (updated mean) into ring
        row ``position``; the oldest row is overwritten once K rows are full. Sharded, the op
        gets the parameters' slices in this rank's columns, under FSDP2 their local shards (all per
        element: the same numbers as those columns of the single-process update)."""
        if self.sharded:
            ps = [p for p, _ in self._local(ps)]
            if not ps:  # no columns on this rank (more ranks than 256-column blocks, or empty shards)
                return
        row = None
        if self.max_rank:
            row = self._stage if self._stage is not None else self.D[self.position]
        ops.swag_collect_(ps, self.mean, self.sq_mean, row, self.n_averaged)
        if self._stage is not None:
            self.D[self.position].copy_(self._stage, non_blocking=True)

    def variance(self) -> Tensor:
        """sigma^2 = max(sq_mean - mean^2, var_clamp) [P] (the diagonal part, before ``scale``;
        sharded: gathered, collective)."""
        self._require_collected()
        var = (self.sq_mean - self.mean * self.mean).clamp_min(self.var_clamp)
        return self._gather_columns(var) if self.sharded else var

    def deviations(self) -> Tensor:
        """The collected deviation rows D[:K] [K, P] (physical ring order): a view, no copy;
        sharded, a gathered copy (collective; K P numbers on every rank)."""
        self._sync_store()
        return self._gather_columns(self.D[: self.rank]) if self.sharded else self.D[: self.rank]

    # ---- sampling ------------------------------------------------------------------------------
    def _check_draw_args(self, n, scale, cov) -> tuple[int, float, str]:
        n = check_int(n, "n", 0)
        cov = check_cov(cov)
        scale = check_scale(scale, cov)
        self._require_collected()
        if cov == "lowrank" and self.rank < 2:
            if self.max_rank == 0:
                raise ValueError("cov='lowrank' needs max_rank >= 2; this SWAG keeps the diagonal only "
                                 "(use cov='diag')")
            raise RuntimeError(f"cov='lowrank' needs >= 2 collected deviations, have {self.rank}: collect more "
                               "or use cov='diag'")
        return n, scale, cov

    def _draw_block(self, n: int, scale: float, cov: str, seed: int) -> Tensor:
        """``n`` draws [n, local_numel] of this rank's columns (all P unsharded): each run of
        columns (global start g, local start l, length c) is drawn with swag_sample's
        ``offset=g``, so local column l + i takes the noise of global index g + i."""
        K = self.rank if cov == "lowrank" else 0
        if len(self.runs) == 1:
            return self._draw_run(n, scale, K, seed, *self.runs[0])
        out = torch.empty(n, self.local_numel, dtype=self.dtype, device=self.device)
        for g, lo, c in self.runs:
            out[:, lo:lo + c] = self._draw_run(n, scale, K, seed, g, lo, c)
        return out

    def _draw_run(self, n: int, scale: float, K: int, seed: int, g: int, lo: int, c: int) -> Tensor:
        """``n`` draws [n, c] of the local columns [lo, lo + c), global columns [g, g + c)."""
        mean, sq = self.mean[lo:lo + c], self.sq_mean[lo:lo + c]
        if K == 0 or self.D.device == self.device:
            return ops.swag_sample(mean, sq, self.D[:K, lo:lo + c] if K else None, n, scale, self.var_clamp,
                                   seed, 0, g)
        # D on another device: stream it to the mean's device in column blocks (noise indexed globally)
        self._sync_store()
        out = torch.empty(n, c, dtype=self.dtype, device=self.device)
        for c0 in range(0, c, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, c)
            blk = self.D[:K, lo + c0:lo + c1].to(self.device, non_blocking=True)
            out[:, c0:c1] = ops.swag_sample(mean[c0:c1], sq[c0:c1], blk, n, scale, self.var_clamp, seed, 0, g + c0)
        return out

    def sample(self, n: int, *, scale: float | None = None, cov: str = "lowrank",
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws [n, P] (dtype of the state, on the model's device) in one batched kernel:
        mean, variance and D are read once for all draws and the noise is generated in-kernel.
        Sharded (collective, the same ``n``, ``scale`` and ``cov`` on every rank): rank 0's seeds
        are broadcast, each rank draws its columns and one all-gather per block of
        ``ops.SWAG.max_draws`` draws gives every rank the same [n, P], equal to the
        single-process draws with rank 0's generator (every rank's generator advances as there).

        Args:
            n: S >= 0, number of draws.
            scale: > 0, multiplies the covariance; None: 0.5 for 'lowrank', 1.0 for 'diag'.
            cov: 'lowrank' (diagonal + low-rank, needs >= 2 collected rows) or 'diag'.
            generator: torch generator the draws' seeds come from (default: the global one).
        """
        n, scale, cov = self._check_draw_args(n, scale, cov)
        step = ops.SWAG.max_draws
        seeds = [draw_seed(generator) for _ in range(0, n, step)]
        if not seeds:
            return self.mean.new_empty(0, self.numel)
        if self.sharded:
            seeds = self._shared_seeds(seeds)
        parts = [self._draw_block(min(step, n - s0), scale, cov, seed) for s0, seed in zip(range(0, n, step), seeds)]
        # under FSDP2 too: one all-gather per block gives the full [n, P] (the posterior's contract)
        if self.sharded:
            parts = [self._gather_columns(p) for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def sample_(self, model: nn.Module | None = None, *, scale: float | None = None, cov: str = "lowrank",
                generator: torch.Generator | None = None) -> nn.Module:
        """Write one draw (``scale``, ``cov`` as in :meth:`sample`) into the parameters of ``model``
        (default: :attr:`model`) in place (one [P] temporary, no deep copy); returns the model.
        BatchNorm statistics are not touched: call :meth:`update_bn` afterwards. FSDP2
        (collective: one broadcast of rank 0's seed): each rank draws and writes its local shards
        only, the single-process draw's elements there; no gather."""
        if not self.fsdp:
            self.layout.params(model)
            return self.layout.write_(self.sample(1, scale=scale, cov=cov, generator=generator)[0], model)
        ps = self._fsdp_params(model)
        _, scale, cov = self._check_draw_args(1, scale, cov)
        seed = self._shared_seeds([draw_seed(generator)])[0]
        self._write_local_(self._draw_block(1, scale, cov, seed)[0], ps)
        return self.model if model is None else model

    # ---- FSDP2: the local shards of the live model ---------------------------------------------
    def _fsdp_params(self, model: nn.Module | None) -> list[Tensor]:
        """The DTensor parameters of ``model`` (checked against the layout), whose local shards
        must be this SWAG's (same offsets and sizes: the same sharding)."""
        ps = self.layout.params(model)
        for name, p, (i, lo, hi) in zip(self.layout.names, ps, self._pieces):
            t = local_tensor(p)
            if t is p:
                raise ValueError(f"parameter {name!r} of the model is a plain tensor, but this {self.kind} was built "
                                 "on FSDP2 DTensor parameters: pass the fully_shard model")
            if t.numel() != hi - lo or (t.numel() and shard_offset(p, user=f"{self.kind} tracks") != lo):
                raise ValueError(f"parameter {name!r}: the model's local shard holds elements [{shard_offset(p)}, "
                                 f"{shard_offset(p) + t.numel()}) of the parameter, this {self.kind}'s shard [{lo}, {hi}): "
                                 "shard the model the same way (the same mesh and fully_shard)")
        return ps

    def _write_local_(self, local: Tensor, ps: list[Tensor]) -> None:
        """Copy this rank's columns ``local`` [local_numel] into the local shards of the DTensors
        ``ps`` in place (cast to each parameter's dtype)."""
        lo = 0
        for i, a, b in self._pieces:
            if b > a:
                shard = local_tensor(ps[i])
                shard.copy_(local[lo:lo + b - a].view(shard.shape))
                lo += b - a

    def _local_draws(self, n: int, scale: float, cov: str, generator) -> Iterator[Tensor]:
        """``n`` draws of this rank's columns [local_numel], one by one, seeded as
        :meth:`iter_samples` seeds the single-process draws (the same batches of ``sample`` calls,
        rank 0's seeds broadcast per batch), so they are those draws' local columns."""
        per = max(1, min(n, _DRAW_BYTES // max(1, self.numel * 8)))
        step = ops.SWAG.max_draws
        for s0 in range(0, n, per):
            k = min(per, n - s0)
            seeds = self._shared_seeds([draw_seed(generator) for _ in range(0, k, step)])
            for b0, seed in zip(range(0, k, step), seeds):
                yield from self._draw_block(min(step, k - b0), scale, cov, seed)

    def _fsdp_average(self, draws, x, *, total: int, likelihood: str, bn_loader, batch_size: int, progress: bool,
                      input_fn, output_fn):
        """The Bayesian model average on the live FSDP2 model: every local draw [local_numel] is
        written into the local shards and the model runs its own forward (FSDP all-gathers the
        parameters), in eval mode; with ``bn_loader`` the BatchNorm statistics are recomputed in
        place per draw. The local shards and buffers are restored afterwards, also on error."""
        from tqdm.auto import tqdm

        check_likelihood(likelihood)
        batch_size = check_int(batch_size, "batch_size", 1)
        bn_loader = self._bn_loader(bn_loader, [self.model])
        if bn_loader is not None and total > 1:
            check_reiterable(bn_loader, "bn_loader")
        model = self.model
        ps = self._fsdp_params(None)
        inputs = [to_device(b, self.device) for b in iterate_inputs(x, batch_size, input_fn)]
        if not inputs:
            raise ValueError("x yielded no inputs: pass a tensor [N, ...] with N >= 1 or a non-empty loader")
        saved = [local_tensor(p).clone() for p in ps]
        bn = bn_loader is not None and bool(bn_modules(model))
        buffers = {k: v.clone() for k, v in model.named_buffers()} if bn else {}
        avg = _Average(likelihood)
        try:
            with ModeGuard(model, False), tqdm(total=total, desc=f"{self.kind} BMA", leave=False,
                                                 disable=not progress) as bar:
                for theta in draws:
                    self._write_local_(theta, ps)
                    if bn:
                        refresh_bn(model, bn_loader, None, self.device, batch_size, input_fn)
                    avg.add(torch.cat([model_output(call_model(model, b), output_fn) for b in inputs]))
                    bar.update()
        finally:
            for p, v in zip(ps, saved):
                local_tensor(p).copy_(v)
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        if avg.count == 0:
            raise RuntimeError(f"the {self.kind} produced no draws to average")
        return avg.result()

    def iter_samples(self, n: int, *, generator: torch.Generator | None = None, scale: float | None = None,
                     cov: str = "lowrank") -> Iterator[Tensor]:
        """Yield ``n`` draws [P] one by one (as :meth:`sample` draws them, in batches under 256 MB);
        the arguments are checked here, before the first draw is asked for."""
        self._check_draw_args(n, scale, cov)
        return super().iter_samples(n, generator=generator, scale=scale, cov=cov)

    # ---- density -------------------------------------------------------------------------------
    def log_prob(self, theta: Tensor, *, scale: float | None = None, cov: str = "lowrank") -> Tensor:
        r"""Log density of the SWAG Gaussian at ``theta`` [P] or [S, P] -> float64 [] or [S].

        Low rank: the covariance is A + U U^T with A = scale sigma^2 (diagonal) and
        U = sqrt(scale / (K - 1)) D^T [P, K]; the Woodbury identity and the matrix determinant
        lemma reduce it to a K x K Cholesky factor of I + U^T A^{-1} U (no P x P matrix; D is read
        in column blocks, in float64). A singular covariance (some sigma^2 = 0, possible only with
        ``var_clamp=0``) raises a RuntimeError saying how to avoid it. Sharded (collective, the
        same ``theta`` on every rank): each rank sums over its columns and two all-reduces
        combine the sums, so the result equals the single-process one up to rounding.

        Differentiable in ``theta`` (e.g. the SWAG posterior as the prior of a later task's loss);
        the SWAG state gets no gradient. Sharded, the all-reduces are not differentiable: a
        ``theta`` that requires grad is refused there.
        """
        _, scale, cov = self._check_draw_args(0, scale, cov)
        if not torch.is_tensor(theta) or not theta.is_floating_point():
            raise TypeError("theta must be a floating-point tensor [P] or [S, P]")
        if theta.dim() not in (1, 2) or theta.shape[-1] != self.numel:
            raise ValueError(f"theta must be [P] or [S, P] with P = {self.numel}, got {tuple(theta.shape)}")
        if self.sharded and theta.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("log_prob of a sharded SWAG is not differentiable (its sums are all-reduced): "
                               "pass theta.detach(), or build the SWAG with shard=False for a gradient")
        th = theta if theta.dim() == 2 else theta.unsqueeze(0)
        K = self.rank if cov == "lowrank" else 0
        logdet, quad, C, v, a_min = self._woodbury_sums(th, scale, K)
        if not a_min > 0:
            self._singular()
        if K:
            C += torch.eye(K, dtype=C.dtype, device=C.device)
            L, info = torch.linalg.cholesky_ex(C)
            if info.item():
                self._singular()
            logdet = logdet + 2 * torch.log(torch.diagonal(L)).sum()
            w = torch.cholesky_solve(v.T, L)  # [K, S]
            quad = quad - (v * w.T).sum(1)
        lp = -0.5 * (self.numel * math.log(2 * math.pi) + logdet + quad)
        return lp[0] if theta.dim() == 1 else lp

    def _woodbury_sums(self, th: Tensor, scale: float, K: int):
        """Over column blocks, in float64: log det A, sum r^2 / a, C = U^T A^-1 U [K, K],
        v = r A^-1 U [S, K] (r = theta - mean) and min(a) (a host float); sharded, this rank's
        columns are summed and the sums all-reduced over the ranks."""
        S, dev, f64 = th.shape[0], self.device, torch.float64
        width = self.local_numel
        th = self._take_columns(th) if self.sharded else th  # [S, width]: this rank's columns
        self._sync_store()
        logdet = torch.zeros((), dtype=f64, device=dev)
        quad = torch.zeros(S, dtype=f64, device=dev)
        C = torch.zeros(K, K, dtype=f64, device=dev)
        v = torch.zeros(S, K, dtype=f64, device=dev)
        a_min = torch.full((), math.inf, dtype=f64, device=dev)
        cu = math.sqrt(scale / (K - 1)) if K else 0.0
        for c0 in range(0, width, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, width)
            m = self.mean[c0:c1].to(f64)
            a = (self.sq_mean[c0:c1].to(f64) - m * m).clamp_min(self.var_clamp) * scale
            r = th[:, c0:c1].to(dev, f64) - m
            a_min = torch.minimum(a_min, a.min())
            logdet += torch.log(a).sum()
            quad += (r * r / a).sum(1)
            if K:
                U = self.D[:K, c0:c1].to(dev, f64).T * cu  # [c, K]
                Ua = U / a[:, None]
                C += U.T @ Ua
                v += r @ Ua
        if self.sharded:
            dist = torch.distributed
            flat = self._all_reduce(torch.cat([logdet.view(1), quad, C.view(-1), v.view(-1)]), dist.ReduceOp.SUM)
            logdet, quad = flat[0], flat[1:1 + S]
            C, v = flat[1 + S:1 + S + K * K].view(K, K), flat[1 + S + K * K:].view(S, K)
            a_min = self._all_reduce(a_min, dist.ReduceOp.MIN)
        return logdet, quad, C, v, float(a_min)

    def _singular(self):
        raise RuntimeError(f"the {self.kind} covariance is singular (some variance sigma^2 = sq_mean - mean^2 is 0: "
                           f"the collected models agree there, and var_clamp={self.var_clamp:g}), so it has no "
                           "density: build the SWAG with var_clamp > 0 (e.g. the default 1e-30) or collect more "
                           "varied models")

    # ---- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x, n_samples: int = 30, *, scale: float | None = None, cov: str = "lowrank",
                likelihood: str = "classification", bn_loader=None, batch_size: int = 1024, progress: bool = False,
                generator: torch.Generator | None = None, input_fn: Callable | None = None,
                output_fn: Callable | None = None):
        """Bayesian model average over ``n_samples`` SWAG draws (``scale``, ``cov``, ``generator``
        as in :meth:`sample`), in eval mode through ``functional_call`` (the model's own
        parameters and buffers are left alone); ``bn_loader`` recomputes the BatchNorm
        statistics for each draw. Other arguments and the outputs as in :meth:`Posterior.predict`
        ('classification' -> [N, C], 'binary' -> [N], 'regression' -> (mean, variance over draws)).
        FSDP2 (collective; every rank gives inputs of the same number of batches): each draw is
        written into the live model's local shards (:meth:`sample_`'s draws, seeded as the
        single-process ``predict``) and the model's own forward runs (FSDP all-gathers the
        parameters); ``bn_loader`` recomputes the statistics in place; the parameters' local
        shards and the buffers are restored afterwards.
        """
        n = check_int(n_samples, "n_samples", 1)
        _, scale, cov = self._check_draw_args(n, scale, cov)
        check_generator(generator)
        if self.fsdp:
            return self._fsdp_average(self._local_draws(n, scale, cov, generator), x, total=n, likelihood=likelihood,
                                      bn_loader=bn_loader, batch_size=batch_size, progress=progress, input_fn=input_fn,
                                      output_fn=output_fn)
        draws = self.iter_samples(n, generator=generator, scale=scale, cov=cov)
        return self._average([(self.layout, draws)], x, total=n, likelihood=likelihood, bn_loader=bn_loader,
                             batch_size=batch_size, progress=progress, input_fn=input_fn, output_fn=output_fn)

    # ---- the SWA solution (sharded: gathered) -------------------------------------------------
    def load_mean_(self, model: nn.Module | None = None) -> nn.Module:
        """Write the running average [P] into the parameters of ``model`` (default: :attr:`model`)
        in place, cast to each parameter's dtype; returns the model (sharded: collective; FSDP2:
        each rank writes its local shards, no communication)."""
        if self.fsdp:
            self._require_collected()
            self._write_local_(self.mean, self._fsdp_params(model))
            return self.model if model is None else model
        if not self.sharded:
            return super().load_mean_(model)
        self._require_collected()
        return self.layout.write_(self.full_mean(), model)

    def _whole_mean(self) -> Tensor:
        return self.full_mean() if self.sharded else self.mean

    def update_bn(self, loader, model: nn.Module | None = None, *, batch_size: int = 1024,
                  input_fn: Callable | None = None) -> None:
        """As :meth:`SWA.update_bn` (sharded: collective, the mean gathered once; not under FSDP2,
        whose model holds shards: pass ``bn_loader`` to :meth:`predict_mean` there)."""
        if model is None and self.fsdp:
            raise ValueError("an FSDP2-sharded SWAG keeps no recomputed statistics: pass bn_loader=<training batches> "
                             "to predict_mean / predict, or update_bn(loader, model) on a model holding the average")
        super().update_bn(loader, model, batch_size=batch_size, input_fn=input_fn)

    @torch.no_grad()
    def predict_mean(self, x, *, likelihood: str = "classification", bn_loader=None, batch_size: int = 1024,
                     progress: bool = False, input_fn: Callable | None = None, output_fn: Callable | None = None):
        """Predictions of the running average, as :meth:`SWA.predict_mean` (sharded: collective,
        the mean gathered once; FSDP2: the mean written into the live model's local shards, as
        :meth:`predict` does with draws)."""
        if self.fsdp:
            self._require_collected()
            return self._fsdp_average([self.mean], x, total=1, likelihood=likelihood, bn_loader=bn_loader,
                                      batch_size=batch_size, progress=progress, input_fn=input_fn, output_fn=output_fn)
        if not self.sharded:
            return super().predict_mean(x, likelihood=likelihood, bn_loader=bn_loader, batch_size=batch_size,
                                        progress=progress, input_fn=input_fn, output_fn=output_fn)
        self._require_collected()
        return self._average([(self.layout, [self.full_mean()])], x, total=1, likelihood=likelihood,
                             bn_loader=bn_loader, batch_size=batch_size, progress=progress, input_fn=input_fn,
                             output_fn=output_fn, buffers=self._kept_buffers(bn_loader))

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Kind, layout, mean, sq_mean, the collected rows of D, count and ring position (cloned).
        Sharded: the same single-process format, all columns gathered on every rank (collective;
        (K + 2) P numbers per rank): see :meth:`shard_state_dict` for this rank's columns only."""
        self._sync_store()
        if not self.sharded:
            sd = super().state_dict()
            sd.update(sq_mean=self.sq_mean.clone(), D=self.D[: self.rank].clone(), max_rank=self.max_rank,
                      position=self.position, var_clamp=self.var_clamp)
            return sd
        sd = self._state_header()
        sd.update(mean=self._gather_columns(self.mean), n_averaged=self.n_averaged,
                  sq_mean=self._gather_columns(self.sq_mean), D=self._gather_columns(self.D[: self.rank]),
                  max_rank=self.max_rank, position=self.position, var_clamp=self.var_clamp)
        return sd

    def shard_state_dict(self) -> dict:
        """This rank's columns only (sharded SWAG; no communication): the keys of
        :meth:`state_dict` with mean, sq_mean [b - a] and D [K, b - a], plus ``shard`` = {world,
        index, columns, numel}. :meth:`load_state_dict` takes it back on the same rank of a
        sharding of the same P over as many ranks, and refuses any other."""
        if not self.sharded:
            raise RuntimeError(f"shard_state_dict() is for a sharded {self.kind} (shard=True); this one keeps all "
                               "columns: use state_dict()")
        if self.fsdp:
            raise RuntimeError(f"shard_state_dict() is for SWAG(shard=True) under DDP; this {self.kind} is sharded by "
                               "FSDP2's parameter shards: use state_dict() (gathered to the single-process format, "
                               "collective) and load_state_dict() (cut to each rank's shards)")
        self._sync_store()
        sd = self._state_header()
        sd.update(mean=self.mean.clone(), n_averaged=self.n_averaged, sq_mean=self.sq_mean.clone(),
                  D=self.D[: self.rank].clone(), max_rank=self.max_rank, position=self.position,
                  var_clamp=self.var_clamp, shard=self._shard_meta())
        return sd

    def _shard_meta(self) -> dict:
        return {"world": self.shard_world, "index": self.shard_index, "columns": tuple(self.columns),
                "numel": self.numel}

    def _check_state(self, state: dict) -> None:
        shard = isinstance(state, dict) and "shard" in state
        if shard:
            self._check_shard_meta(state["shard"])
            self._check_header(state)
            self._check_state_count(state, "n_averaged")
        else:
            super()._check_state(state)  # header, count, mean [P]
        width = self.local_numel if shard else self.numel
        if shard:
            self._check_state_tensor(state, "mean", (width,), self.dtype)
        if self._check_state_count(state, "max_rank") != self.max_rank:
            raise ValueError(f"state_dict has max_rank {state['max_rank']}, this SWAG {self.max_rank}")
        rank = min(int(state["n_averaged"]), self.max_rank)
        self._check_state_tensor(state, "sq_mean", (width,), self.dtype)
        self._check_state_tensor(state, "D", (rank, width), self.deviation_dtype)
        if "var_clamp" not in state:
            raise ValueError("state_dict has no 'var_clamp': it was not saved by SWAG.state_dict()")
        check_var_clamp(state["var_clamp"])
        pos = int(state["n_averaged"]) % self.max_rank if self.max_rank else 0
        if self._check_state_count(state, "position") != pos:
            raise ValueError(f"state_dict ring position {state['position']} disagrees with n_averaged "
                             f"{state['n_averaged']} (expected {pos})")

    def _check_shard_meta(self, meta) -> None:
        """A shard state fits only the same rank of the same sharding."""
        try:
            theirs = {"world": int(meta["world"]), "index": int(meta["index"]),
                      "columns": tuple(int(c) for c in meta["columns"]), "numel": int(meta["numel"])}
        except (TypeError, KeyError, ValueError):
            raise ValueError("state_dict['shard'] must be {world, index, columns, numel} as saved by "
                             "shard_state_dict()") from None
        where = (f"rank {theirs['index']} of {theirs['world']} (columns [{theirs['columns'][0]}, "
                 f"{theirs['columns'][1]}) of P = {theirs['numel']})")
        if not self.sharded or self.fsdp:
            raise ValueError(f"state_dict holds one shard of a sharded {self.kind}, {where}: load it into the "
                             f"{self.kind}(shard=True) of that rank, or save state_dict() (all columns) instead")
        if theirs != self._shard_meta():
            a, b = self.columns
            raise ValueError(f"state_dict holds the shard of {where}, but this {self.kind} is rank "
                             f"{self.shard_index} of {self.shard_world} (columns [{a}, {b}) of P = {self.numel}): a "
                             "shard loads only on the same rank of the same world; save state_dict() (all columns) "
                             "to change the world size")

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`, ring position included (checked first; nothing changes when
        it does not fit). Sharded: a full state (any SWAG's :meth:`state_dict`) is cut to this
        rank's columns (FSDP2: its local shards), a :meth:`shard_state_dict` must come from the
        same rank and sharding (not under FSDP2). No communication: give every rank the same full
        state."""
        with torch.no_grad():  # a saved tensor that requires grad must not make the state part of a graph
            self._load_state(state)

    def _load_state(self, state: dict) -> None:
        self._check_state(state)
        self.bn_buffers = None
        self._sync_store()
        def cols(t: Tensor) -> Tensor:  # this rank's columns of a saved [..., P] (or local) tensor
            return t if not self.sharded or "shard" in state else self._take_columns(t)

        if not self.sharded:
            super().load_state_dict(state)
        else:
            self.mean.copy_(cols(state["mean"]))
            self.n_averaged = int(state["n_averaged"])
        self.sq_mean.copy_(cols(state["sq_mean"]))
        rank = state["D"].shape[0]
        self.D[:rank].copy_(cols(state["D"]))
        self.D[rank:].zero_()
        self.var_clamp = float(state["var_clamp"])
