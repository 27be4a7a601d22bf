"""Column sharding of a posterior's flat state over a torch.distributed group (used by
:class:`pyfastbayes.posteriors.SWAG`; see its module docstring). Two ways to own columns:

- ``shard=True`` (DDP: every rank holds the whole model): rank r keeps the columns [a_r, b_r) of
  :func:`shard_columns`;
- FSDP2 (the trainable parameters are DTensors of ``fully_shard``, placed Shard(0) or Replicate on
  a 1-D mesh): rank r keeps the columns of its local shards, one contiguous range
  [o_t + g_t, o_t + g_t + n_t) of the flat vector per parameter t (o_t: the parameter's offset in
  the layout, g_t: the shard's flat offset in the parameter), in parameter order.

Either way a rank's local state is a concatenation of *runs* (global start, local start, length)
of the flat [P] vector; :class:`ColumnShards` holds the group, every rank's runs and the
collectives (all-reduce, padded all-gather of columns, rank 0's seeds)."""
from __future__ import annotations

import math
import struct
import zlib

import torch
from torch import Tensor

from .._distributed import dtensor_type, is_dtensor, local_tensor, shard_offset
from .base import check_int
from .swa import PARAM_DTYPES

__all__ = ["SHARD_ALIGN", "shard_columns", "check_shard", "ColumnShards", "Run"]

Run = tuple[int, int, int]  # (global start in [P], start in the rank's local state, length)

# Shard boundaries are multiples of this: of 4 (swag_sample's aligned fast path: a Philox counter
# holds 4 normals) and of the CPU sampler's column block kCols = 256 (csrc/cpu/swag.cpp), so that a
# shard's blocks and 16-column tiles are the single-process call's and every column is computed by
# the same code path (no dependence on how the compiler treats tile and tail loops).
SHARD_ALIGN = 256


def shard_columns(numel: int, world: int, align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """The column ranges [a_r, b_r) of ``world`` shards of a vector of ``numel`` columns: the
    ceil(numel / align) blocks of ``align`` columns are split as evenly as possible (rank r gets
    blocks [r U // R, (r + 1) U // R)), so every a_r is a multiple of ``align`` and < numel (or 0),
    the ranges tile [0, numel) in rank order, and only the last non-empty one may end off the grid.
    More ranks than blocks leave some ranges empty."""
    numel, world, align = check_int(numel, "numel", 0), check_int(world, "world", 1), check_int(align, "align", 1)
    if align % 4:
        raise ValueError(f"align must be a multiple of 4 (swag_sample's aligned offsets), got {align}")
    units = -(-numel // align)
    cuts = [min(numel, (r * units // world) * align) for r in range(world + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def check_shard(shard) -> bool | None:
    if shard is not None and not isinstance(shard, bool):
        raise TypeError(f"shard must be None, True or False, got {type(shard).__name__}")
    return shard



def fsdp_group(layout) -> object | None:
    """The process group of a model whose trainable parameters are FSDP2 DTensors (None when none
    is a DTensor). Every trainable parameter must then be a DTensor on the same 1-D device mesh,
    placed Shard(0) or Replicate (ValueError naming the parameter and its placement otherwise)."""
    ps = [p for _, p in _named(layout)]
    if dtensor_type() is None or not any(is_dtensor(p) for p in ps):
        return None
    mesh = None
    for name, p in _named(layout):
        if not is_dtensor(p):
            raise ValueError(f"parameter {name!r} is a plain tensor while other trainable parameters are FSDP2 "
                             "DTensors: SWAG under FSDP2 needs every trainable parameter sharded by fully_shard "
                             "(apply fully_shard to the root module too)")
        if p.device_mesh.ndim != 1:
            raise ValueError(f"parameter {name!r} is a DTensor placed {tuple(p.placements)} on a "
                             f"{p.device_mesh.ndim}-D device mesh: SWAG under FSDP2 supports a 1-D mesh "
                             "(fully_shard(model, mesh=init_device_mesh(device, (world,))))")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} is on another device mesh than the first trainable parameter: "
                             "SWAG under FSDP2 needs one mesh for the whole model")
        try:
            shard_offset(p, user="SWAG tracks")
        except ValueError as exc:
            raise ValueError(f"parameter {name!r} {exc}") from None
    return mesh.get_group()


def _named(layout) -> list:
    return [(n, p) for n, p in layout.model.named_parameters() if p.requires_grad]


def _merge(spans: list[tuple[int, int]]) -> list[Run]:
    """Runs (global start, local start, length) of consecutive (global start, length) spans laid
    out one after the other in the local state; empty spans dropped, adjacent ones merged."""
    runs: list[list[int]] = []
    local = 0
    for g, n in spans:
        if n == 0:
            continue
        if runs and runs[-1][0] + runs[-1][2] == g:
            runs[-1][2] += n
        else:
            runs.append([g, local, n])
        local += n
    return [tuple(r) for r in runs]


class ColumnShards:
    """Mixin of a posterior over ``self.layout`` (``self.numel`` columns on ``self.device``) whose
    state may be sharded by columns; call :meth:`_setup_shards` in ``__init__``. Attributes:
    sharded, fsdp, process_group, shard_world, shard_index, shard_ranges, columns, runs,
    local_numel (see SWAG)."""

    def _setup_shards(self, shard: bool | None, group) -> None:
        """Resolve ``shard`` and set the shard attributes (see the class docstring)."""
        dist = torch.distributed
        active = dist.is_available() and dist.is_initialized()
        fsdp = fsdp_group(self.layout)
        if fsdp is not None:
            if shard:
                raise ValueError("SWAG(shard=True) is the column sharding of a model replicated on every rank (DDP), "
                                 "but this model's trainable parameters are FSDP2 DTensors (placed "
                                 f"{tuple(_named(self.layout)[0][1].placements)}): their SWAG state is sharded like the "
                                 "parameters already; leave shard=False (or None)")
            if group is not None:
                raise ValueError("process_group is not used with FSDP2 parameters (the device mesh's group is)")
        if shard is False and group is not None:
            raise ValueError("process_group is used only by a sharded SWAG: pass shard=True (or None)")
        if shard is True and not active:
            raise RuntimeError("SWAG(shard=True) needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group); use shard=False for one process")
        if shard is None:
            shard = fsdp is None and active and dist.get_world_size(group) > 1
        self.fsdp = fsdp is not None
        self.sharded = bool(shard) or self.fsdp
        self.process_group = fsdp if self.fsdp else group
        group = self.process_group
        sizes = list(map(math.prod, self.layout.shapes))
        if not self.sharded:
            self.shard_world, self.shard_index = 1, 0
            self.shard_ranges = [(0, self.numel)]
        else:
            self.shard_world = dist.get_world_size(group)
            self.shard_index = dist.get_rank(group)
            if self.shard_index < 0:
                raise ValueError("this process is not a member of process_group: only its members build the "
                                 "sharded SWAG")
            # where collectives run: NCCL needs CUDA tensors, gloo is given CPU ones
            self._comm = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
            self._src = dist.get_global_rank(group, 0) if group is not None else 0  # the seeds' source
        if self.fsdp:
            # this rank's local shard of parameter i: elements [lo, lo + n) of its flat view
            ps = [p for _, p in _named(self.layout)]
            mine = [(shard_offset(p), local_tensor(p).numel()) for p in ps]
            self._pieces = [(i, lo, lo + n) for i, (lo, n) in enumerate(mine)]  # empty ones included
            table = self._gather_table(mine)  # every rank's (lo, n) per parameter
            self._rank_runs = [_merge([(o + lo, n) for o, (lo, n) in zip(self.layout.offsets, row)]) for row in table]
            self.shard_ranges = None
            self.columns = None
        else:
            if self.sharded:
                self.shard_ranges = shard_columns(self.numel, self.shard_world)
            self._rank_runs = [[(a, 0, b - a)] if b > a else [] for a, b in self.shard_ranges]
            self.columns = self.shard_ranges[self.shard_index]
            # the pieces of the parameters in this rank's columns: (tensor index, start, end) in its flat view
            a, b = self.columns
            self._pieces = [(i, max(a, o) - o, min(b, o + n) - o) for i, (o, n) in enumerate(zip(self.layout.offsets, sizes))
                            if max(a, o) < min(b, o + n)]
        self.runs = self._rank_runs[self.shard_index]
        self.local_numel = sum(n for _, _, n in self.runs)
        self._max_width = max(sum(n for _, _, n in runs) for runs in self._rank_runs)

    def _gather_table(self, mine: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Every rank's list of (start, length) per parameter (one all-gather of ints)."""
        t = torch.tensor(mine, dtype=torch.int64, device=self._comm).view(-1, 2)
        table = [torch.empty_like(t) for _ in range(self.shard_world)]
        torch.distributed.all_gather(table, t, group=self.process_group)
        return [[tuple(r) for r in x.tolist()] for x in table]

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
        parameter unsharded; flat slices (views of contiguous parameters) under shard=True; the
        DTensors' local shards (flattened, non-empty ones) under FSDP2."""
        if not self.sharded:
            return list(zip(ps, self.layout.offsets))
        out, local = [], 0
        for i, lo, hi in self._pieces:
            if hi > lo:
                t = local_tensor(ps[i]).reshape(-1) if self.fsdp else ps[i].reshape(-1)[lo:hi]
                out.append((t, local))
                local += hi - lo
        return out

    def _take_columns(self, full: Tensor) -> Tensor:
        """This rank's columns (its runs, in local order) of ``full`` [..., P] -> [..., local_numel]
        (a view for one run or none, else a new tensor)."""
        if len(self.runs) == 1:
            g, _, n = self.runs[0]
            return full[..., g:g + n]
        if not self.runs:
            return full[..., :0]
        return torch.cat([full[..., g:g + n] for g, _, n in self.runs], -1)

    def _all_reduce(self, t: Tensor, op) -> Tensor:
        """``t`` reduced over the group with ``op`` (on the collective device), back on t's device."""
        x = t.to(self._comm).clone()
        torch.distributed.all_reduce(x, op=op, group=self.process_group)
        return x.to(t.device)

    def _gather_columns(self, local: Tensor) -> Tensor:
        """The [rows, P] (or [P]) assembled from every rank's [rows, local_numel_r] (or
        [local_numel_r]), on ``local``'s device: one all-gather of the local columns padded to the
        widest rank's. Columns held by several ranks (Replicate) are the same there and are written
        once per rank."""
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
        for runs, part in zip(self._rank_runs, parts):
            for g, lo, n in runs:
                out[:, g:g + n] = part[:, lo:lo + n]
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
