"""FullCurvature's block updates land at the block's positions of H however those are laid out:
a run in order (a whole parameter tensor), a permuted run (a joint weight+bias block), or scattered
positions (the general advanced-indexing path)."""
import pytest
import torch

from pyfastbayes.laplace._layers import Block
from pyfastbayes.laplace.factors import FullCurvature


def _block(sel):
    b = Block("b", "kron", torch.as_tensor(sel).reshape(len(sel), 1))
    b.sel = b.index.clone()
    return b


@pytest.mark.parametrize("sel_i,sel_j", [
    ([0, 1, 2], [3, 4]),            # runs in order
    ([2, 0, 1], [4, 3]),            # permuted runs
    ([0, 2, 4], [1, 3]),            # scattered positions
    ([1, 2, 3], [4, 0]),            # one run, one permuted run
])
def test_scatter_add_puts_every_entry_at_its_positions(sel_i, sel_j):
    bi, bj = _block(sel_i), _block(sel_j)
    curv = FullCurvature([bi, bj], torch.float64, "cpu")
    H0 = torch.randn(5, 5, dtype=torch.float64)
    curv.H.copy_(H0)
    U = torch.randn(len(sel_i), len(sel_j), dtype=torch.float64)
    curv._scatter_add(bi, bj, U)
    want = H0.clone()
    for a, p in enumerate(sel_i):
        for c, q in enumerate(sel_j):
            want[p, q] += U[a, c]
    assert torch.equal(curv.H, want)
    curv._scatter_add(bi, bj, U)  # the cached layout, a second time
    for a, p in enumerate(sel_i):
        for c, q in enumerate(sel_j):
            want[p, q] += U[a, c]
    assert torch.equal(curv.H, want)
