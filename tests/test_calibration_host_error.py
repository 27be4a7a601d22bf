"""ece's host path (error_from_host_bins, Python floats) agrees with the tensor path
(error_from_bins) on every norm, with empty bins, and refuses bins without rows the same way."""
import pytest
import torch

from pyfastbayes.calibration._binning import error_from_bins, error_from_host_bins


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("seed", range(5))
def test_host_error_equals_the_tensor_error(norm, seed):
    g = torch.Generator().manual_seed(seed)
    B = 15
    cnt = torch.randint(0, 50, (B,), generator=g).double()
    cnt[torch.randperm(B, generator=g)[:4]] = 0  # empty bins
    conf = cnt * torch.rand(B, generator=g, dtype=torch.float64)
    hit = torch.floor(cnt * torch.rand(B, generator=g, dtype=torch.float64))
    bins = torch.stack([cnt, conf, hit], -1)
    want = float(error_from_bins(bins, norm))
    assert error_from_host_bins(bins.tolist(), norm) == pytest.approx(want, rel=1e-14, abs=1e-16)


def test_host_error_refuses_bins_without_rows():
    with pytest.raises(ValueError, match="no valid rows to bin"):
        error_from_host_bins(torch.zeros(15, 3, dtype=torch.float64).tolist(), "l1")
