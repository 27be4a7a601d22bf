"""The output-space directions drop entries negligible within their row (below 2^-50 of the row's
largest): the curvature they carry changes by less than 2^-100 of the row's largest entry, the
other entries are kept bit for bit, and a row of uniformly tiny entries is kept whole."""
import torch

from pyfastbayes.laplace._likelihood import NEGLIGIBLE, _directions, directions


def test_drops_only_what_is_negligible_in_its_row():
    # row 0 confident (probabilities down to ~e^-90), row 1 uniform, row 2 moderately peaked
    f = torch.tensor([[90.0, 0.0, -5.0, 3.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    raw = _directions(f, y, "classification", "ggn", 1, None)
    got = directions(f, y, "classification", "ggn", 1, None)
    dropped = (got == 0) & (raw != 0)
    assert bool(dropped[:, 0].any())  # the confident row loses its negligible entries
    assert not bool(dropped[:, 1:].any())  # the others keep every entry
    kept = ~dropped
    assert torch.equal(got[kept], raw[kept])  # bit for bit
    big = raw.abs().amax(dim=(0, 2))
    assert bool((raw[dropped].abs() < big[0] * NEGLIGIBLE).all())
    H_raw = torch.einsum("mnc,mnd->ncd", raw, raw)
    H_got = torch.einsum("mnc,mnd->ncd", got, got)
    for n in range(3):
        assert float((H_raw[n] - H_got[n]).abs().max()) <= 2 * NEGLIGIBLE * float(big[n]) ** 2


def test_a_row_of_tiny_entries_is_kept():
    R = torch.full((2, 3, 4), 1e-30, dtype=torch.float64)
    R[:, 0] = 1.0  # another row is large: the cut is per row, not per batch
    f = torch.zeros(3, 4, dtype=torch.float64)
    from pyfastbayes.laplace import _likelihood
    assert torch.equal(_likelihood._drop_negligible(R), R)
    assert torch.equal(directions(f, torch.zeros(3, dtype=torch.long), "regression", "ggn", 1, None),
                       _directions(f, None, "regression", "ggn", 1, None))
