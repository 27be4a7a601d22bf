"""The kernels whose GPU targets were missed, once each at (close to) their benchmark sizes, for
Nsight Compute (bench/gpu_check.sh's ``ncu`` step):

    ncu --section SpeedOfLight --section Occupancy ... python scripts/ncu_targets.py

swag_sample: S = 32 draws, K = 20, P = 2^23 fp32 (the bench uses 2^25; a quarter keeps ncu's
memory save/restore per replay short); calibration_bins: 1 M x 10 fp32 probabilities, top-label.
No warm-up call: ncu times each launch alone.
"""
from __future__ import annotations

import torch

from pyfastbayes import ops


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    P, K, S = 1 << 23, 20, 32
    mean = torch.randn(P, device="cuda", generator=g)
    sq = mean * mean + torch.rand(P, device="cuda", generator=g)
    D = torch.randn(K, P, device="cuda", generator=g)
    ops.swag_sample(mean, sq, D, S, 0.5, 1e-30, 1, 1, 0, backend="native")
    p = torch.randn(1, 1_000_000, 10, device="cuda", generator=g).mul(3).softmax(-1)
    y = torch.randint(0, 10, (1_000_000,), device="cuda", generator=g)
    ops.calibration_bins(p, y, 15, backend="native")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
