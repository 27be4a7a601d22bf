"""The one ``distributed=None|True|False`` rule of every API that can reduce over processes
(curvature products, landscape grids, sharded calibration metrics), and the helpers that locate a
DTensor parameter's local shard in its full tensor (FSDP2: the samplers and SWAG)."""
from __future__ import annotations

import math
import sys

import torch
from torch import Tensor


def distributed_active(distributed: bool | None) -> bool:
    """Whether to reduce over torch.distributed processes: ``distributed`` None -> when
    torch.distributed is initialised; True insists on it (ValueError when it is not); False never."""
    up = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        return up
    if distributed and not up:
        raise ValueError("distributed=True but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    return bool(distributed)


# ---- DTensor parameters (FSDP2's fully_shard) ---------------------------------------------------
# Shared by the SG-MCMC samplers (pyfastbayes.optim.sgmcmc) and SWAG (pyfastbayes.posteriors.swag):
# both work on a DTensor's local shard, located in the full tensor by its flat offset.
def dtensor_type() -> type | None:
    """torch.distributed.tensor.DTensor once that module is imported (no DTensor exists before)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t) -> bool:
    dt = dtensor_type()
    return dt is not None and isinstance(t, dt)


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard (the tensor itself, no autograd view); any other tensor unchanged."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor split over ranks (some placement a Shard)."""
    if not is_dtensor(p):
        return False
    from torch.distributed.tensor import Shard
    return any(isinstance(pl, Shard) for pl in p.placements)


def shard_offset(p: Tensor, user: str = "pyfastbayes handles") -> int:
    """The flat (row-major) offset in the full tensor of DTensor ``p``'s local shard, which must be
    one contiguous range of it: every placement Shard(0) or Replicate (FSDP2's fully_shard: Shard(0)
    on a 1-D mesh). Raises ValueError (completing the parameter's name; ``user`` starts the
    sentence saying what is supported, e.g. "The samplers step") for any other placement."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def rows(pl) -> bool:  # exactly Shard(0): _StridedShard (a Shard subclass) interleaves rows
        return type(pl) is Shard and pl.dim % max(p.dim(), 1) == 0

    bad = [pl for pl in p.placements if not (isinstance(pl, Replicate) or rows(pl))]
    if bad:
        raise ValueError(f"is a DTensor placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D device mesh: its "
                         f"local shard is not one contiguous range of the full tensor ({bad[0]} is neither "
                         f"Shard(0) nor Replicate). {user} DTensors placed Shard(0) (as FSDP2's "
                         f"fully_shard places them) or Replicate; redistribute it, e.g. p.redistribute("
                         f"placements=[Shard(0)])")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = local_tensor(p)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"is a DTensor whose local shard has shape {tuple(local.shape)} but its placements "
                         f"{tuple(p.placements)} give {tuple(shape)} on this rank (an uneven sharding whose "
                         f"place in the full tensor is unknown)")
    if p.dim() == 0 or local.numel() == 0:
        return 0  # a scalar is replicated; an empty shard draws nothing
    return int(offset[0]) * math.prod(p.shape[1:])
