"""Column sharding of a posterior's flat state over a torch.distributed group (used by
:class:`pyfastbayes.posteriors.SWAG` with ``shard=True``; see its module docstring): rank r keeps the
columns [a_r, b_r) of :func:`shard_columns`; :class:`ColumnShards` holds the group, the ranges and
the collectives (all-reduce, padded all-gather of columns, rank 0's seeds)."""
from __future__ import annotations

import math
import struct
import zlib

import torch
from torch import Tensor

from .base import check_count
from .swa import PARAM_DTYPES

__all__ = ["SHARD_ALIGN", "shard_columns", "check_shard", "ColumnShards"]

# Shard boundaries are multiples of this: of 4 (swag_sample's offset: a Philox counter holds 4
# normals) and of the CPU sampler's column block kCols = 256 (csrc/cpu/swag.cpp), so that a
# shard's blocks and 16-column tiles are the single-process call's and every column is computed by
# the same code path (no dependence on how the compiler treats tile and tail loops).
SHARD_ALIGN = 256


def shard_columns(numel: int, world: int, align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """The column ranges [a_r, b_r) of ``world`` shards of a vector of ``numel`` columns: the
    ceil(numel / align) blocks of ``align`` columns are split as evenly as possible (rank r gets
    blocks [r U // R, (r + 1) U // R)), so every a_r is a multiple of ``align`` and < numel (or 0),
    the ranges tile [0, numel) in rank order, and only the last non-empty one may end off the grid.
    More ranks than blocks leave some ranges empty."""
    numel, world, align = check_count(numel, "numel", 0), check_count(world, "world", 1), check_count(align, "align", 1)
    if align % 4:
        raise ValueError(f"align must be a multiple of 4 (swag_sample's offset), got {align}")
    units = -(-numel // align)
    cuts = [min(numel, (r * units // world) * align) for r in range(world + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def check_shard(shard) -> bool | None:
    if shard is not None and not isinstance(shard, bool):
        raise TypeError(f"shard must be None, True or False, got {type(shard).__name__}")
    return shard



class ColumnShards:
    """Mixin of a posterior over ``self.layout`` (``self.numel`` columns on ``self.device``) whose
    state may be sharded by columns; call :meth:`_setup_shards` in ``__init__``. Attributes:
    sharded, process_group, shard_world, shard_index, shard_ranges, columns (see SWAG)."""

    def _setup_shards(self, shard: bool | None, group) -> None:
        """Resolve ``shard`` and set the shard attributes (see the class docstring)."""
        dist = torch.distributed
        active = dist.is_available() and dist.is_initialized()
        if shard is False and group is not None:
            raise ValueError("process_group is used only by a sharded SWAG: pass shard=True (or None)")
        if shard is True and not active:
            raise RuntimeError("SWAG(shard=True) needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group); use shard=False for one process")
        if shard is None:
            shard = active and dist.get_world_size(group) > 1
        self.sharded = bool(shard)
        self.process_group = group
        if not self.sharded:
            self.shard_world, self.shard_index = 1, 0
            self.shard_ranges = [(0, self.numel)]
        else:
            self.shard_world = dist.get_world_size(group)
            self.shard_index = dist.get_rank(group)
            if self.shard_index < 0:
                raise ValueError("this process is not a member of process_group: only its members build the "
                                 "sharded SWAG")
            self.shard_ranges = shard_columns(self.numel, self.shard_world)
            # where collectives run: NCCL needs CUDA tensors, gloo is given CPU ones
            self._comm = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
            self._src = dist.get_global_rank(group, 0) if group is not None else 0  # the seeds' source
        self.columns = self.shard_ranges[self.shard_index]
        self._max_width = max(b - a for a, b in self.shard_ranges)
        # the pieces of the parameters in this rank's columns: (tensor index, start, end) in its flat view
        a, b = self.columns
        self._pieces = [(i, max(a, o) - o, min(b, o + n) - o)
                        for i, (o, n) in enumerate(zip(self.layout.offsets, map(math.prod, self.layout.shapes)))
                        if max(a, o) < min(b, o + n)]

    def _fingerprint(self) -> list[int]:
        """What every rank of a sharded SWAG must agree on, as int64s: P, K, the layout (crc32 of
        its description), the two dtypes and var_clamp (its float64 bits)."""
        desc = zlib.crc32(repr(self.layout.describe()).encode())
        clamp = struct.unpack("<q", struct.pack("<d", self.var_clamp))[0]
        return [self.numel, self.max_rank, desc, PARAM_DTYPES.index(self.dtype),
                PARAM_DTYPES.index(self.deviation_dtype), clamp]

    def _check_same_everywhere(self) -> None:
        """One all-gather of :meth:`_fingerprint`; every rank sees the same table, so either all
        ranks raise the same error or none does."""
        dist = torch.distributed
        mine = torch.tensor(self._fingerprint(), dtype=torch.int64, device=self._comm)
        table = [torch.empty_like(mine) for _ in range(self.shard_world)]
        dist.all_gather(table, mine, group=self.process_group)
        rows = [t.tolist() for t in table]
        names = ("P", "max_rank", "layout checksum", "dtype", "deviation_dtype", "var_clamp bits")
        for r, row in enumerate(rows):
            diff = [f"{n} {x} vs {y}" for n, x, y in zip(names, rows[0], row) if x != y]
            if diff:
                raise ValueError(f"SWAG(shard=True) must be built identically on every rank of the group: rank {r} "
                                 f"differs from rank 0 ({', '.join(diff)}); build it from the same model and "
                                 "arguments everywhere")

    def _local(self, ps: list[Tensor]) -> list[tuple[Tensor, int]]:
        """(tensor, offset in the local state) of the parameters in this rank's columns: every
        parameter unsharded; flat slices (views of contiguous parameters) when sharded."""
        if not self.sharded:
            return list(zip(ps, self.layout.offsets))
        a = self.columns[0]
        return [(ps[i].reshape(-1)[lo:hi], self.layout.offsets[i] + lo - a) for i, lo, hi in self._pieces]

    def _all_reduce(self, t: Tensor, op) -> Tensor:
        """``t`` reduced over the group with ``op`` (on the collective device), back on t's device."""
        x = t.to(self._comm).clone()
        torch.distributed.all_reduce(x, op=op, group=self.process_group)
        return x.to(t.device)

    def _gather_columns(self, local: Tensor) -> Tensor:
        """The [rows, P] (or [P]) assembled from every rank's [rows, b_r - a_r] (or [b_r - a_r]),
        on ``local``'s device: one all-gather of the shards padded to the widest one."""
        if local.dim() == 1:
            return self._gather_columns(local.unsqueeze(0))[0]
        rows, width = local.shape
        send = local.to(self._comm)
        if width != self._max_width:
            padded = send.new_zeros(rows, self._max_width)
            padded[:, :width] = send
            send = padded
        send = send.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.shard_world)]
        torch.distributed.all_gather(parts, send, group=self.process_group)
        out = local.new_empty(rows, self.numel)
        for (a, b), part in zip(self.shard_ranges, parts):
            out[:, a:b] = part[:, : b - a]
        return out

    def _shared_seeds(self, seeds: list[int]) -> list[int]:
        """Rank 0's seeds on every rank (one broadcast): the shards of a draw share its noise."""
        t = torch.tensor(seeds, dtype=torch.int64, device=self._comm)
        torch.distributed.broadcast(t, src=self._src, group=self.process_group)
        return t.tolist()

    def full_mean(self) -> Tensor:
        """The running mean [P] (the SWA solution once collected): :attr:`mean` itself unsharded
        (no copy), else gathered (collective)."""
        return self._gather_columns(self.mean) if self.sharded else self.mean
