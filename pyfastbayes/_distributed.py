"""The one ``distributed=None|True|False`` rule of every API that can reduce over processes
(curvature products, landscape grids, sharded calibration metrics)."""
from __future__ import annotations

import torch


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
