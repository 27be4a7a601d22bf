"""Review findings on the curvature estimators (twelfth session), each a test that failed before
its fix: a summed loss taken by hessian() / sharpness() (the result scaled with the batch size),
probes that depended on the block size, NumPy numbers refused as tol / sigma, integrate() taking a
function that is not elementwise, and sharpness() without the Lanczos settings its warning names."""
import numpy as np
import pytest
import torch
from torch import nn

import pyfastbayes.curvature as cv


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    return model, x, y


@pytest.mark.parametrize("make", [lambda m, l, d: cv.hessian(m, l, d), lambda m, l, d: cv.sharpness(m, l, d)])
def test_a_summed_loss_is_refused(make):
    model, x, y = _problem()
    with pytest.raises(ValueError, match="reduction='mean'.*got reduction='sum'"):
        make(model, nn.CrossEntropyLoss(reduction="sum"), (x, y))


def test_probes_do_not_depend_on_the_block_size():
    model, x, y = _problem()
    H = cv.hessian(model, nn.CrossEntropyLoss(), (x, y))
    est = [cv.trace(H, n_probes=10, block=b, generator=torch.Generator().manual_seed(0)).estimate for b in (1, 3, 32)]
    assert est[0] == pytest.approx(est[1], rel=1e-12) and est[0] == pytest.approx(est[2], rel=1e-12)
    d = [H.diagonal("hutchinson", n_probes=6, block=b, generator=torch.Generator().manual_seed(0)) for b in (1, 4)]
    torch.testing.assert_close(d[0], d[1], rtol=1e-12, atol=1e-14)
    nodes = [cv.spectral_density(H, n_probes=4, n_steps=5, block=b, generator=torch.Generator().manual_seed(0)).nodes
             for b in (1, 4)]
    torch.testing.assert_close(nodes[0].sort().values, nodes[1].sort().values, rtol=1e-9, atol=1e-12)


def test_numpy_numbers_are_taken_and_integrate_checks_its_function():
    model, x, y = _problem()
    H = cv.hessian(model, nn.CrossEntropyLoss(), (x, y))
    vals, _ = cv.eigenvalues(H, k=1, tol=np.float32(1e-6), generator=torch.Generator().manual_seed(0))
    dense = torch.linalg.eigvalsh(H.to_dense())
    assert float(vals[0]) == pytest.approx(float(dense[-1]), rel=1e-6)
    with pytest.raises(TypeError, match="tol must be a number"):
        cv.eigenvalues(H, k=1, tol="1e-6")
    d = cv.spectral_density(H, n_probes=2, n_steps=5, generator=torch.Generator().manual_seed(0))
    d.density(sigma=np.float64(0.1))
    with pytest.raises(ValueError, match="elementwise"):
        d.integrate(lambda t: t.sum())


def test_sharpness_takes_the_lanczos_settings():
    model, x, y = _problem()
    s = cv.sharpness(model, nn.CrossEntropyLoss(), (x, y), n_probes=3, n_iter=400, tol=0,
                     generator=torch.Generator().manual_seed(0))
    dense = torch.linalg.eigvalsh(cv.hessian(model, nn.CrossEntropyLoss(), (x, y)).to_dense())
    assert s.top_eigenvalue == pytest.approx(float(dense[-1]), rel=1e-10)


def test_hessian_weighs_batches_by_their_kept_rows():
    # cross-entropy's ignore_index: each batch's mean runs over its kept rows, so batches weigh by
    # them (by all rows, the result depended on how the data was batched)
    model, x, y = _problem()
    y = y.clone()
    y[[1, 2, 3, 13]] = -100
    keep = y != -100
    loss = nn.CrossEntropyLoss()
    V = torch.randn(cv.hessian(model, loss, (x, y)).shape[0], 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    want = cv.hessian(model, loss, (x[keep], y[keep])) @ V
    for data in ([(x, y)], [(x[:10], y[:10]), (x[10:], y[10:])], [(x[1:4], y[1:4]), (x, y)][1:]):
        torch.testing.assert_close(cv.hessian(model, loss, data) @ V, want, rtol=1e-10, atol=1e-12)
    only_ignored = [(x[1:4], y[1:4]), (x[4:], y[4:])]  # a batch of ignored rows only adds nothing
    torch.testing.assert_close(cv.hessian(model, loss, only_ignored) @ V,
                               cv.hessian(model, loss, (x[4:][keep[4:]], y[4:][keep[4:]])) @ V, rtol=1e-10, atol=1e-12)


def test_density_warns_when_its_grid_aliases_the_kernels():
    model, x, y = _problem()
    d = cv.spectral_density(cv.hessian(model, nn.CrossEntropyLoss(), (x, y)), n_probes=2, n_steps=5,
                            generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="aliases the kernels"):
        d.density(sigma=d.default_sigma() / 100)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid, dens = d.density()
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)


def test_operator_algebra():
    model, x, y = _problem()
    loss = nn.CrossEntropyLoss()
    H, G = cv.hessian(model, loss, (x, y)), cv.ggn(model, loss, (x, y))
    Hd, Gd = H.to_dense(), G.to_dense()
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cases = [(H + G, Hd + Gd), (H - G, Hd - Gd), (2.0 * H, 2 * Hd), (H * np.float32(0.5), Hd * 0.5),
             (H / 4, Hd / 4), (H + 1e-3, Hd + 1e-3 * eye), (torch.tensor(2.0) - G, 2 * eye - Gd), (-G, -Gd),
             (H.T, Hd), (3 * (G + 0.1) - H, 3 * (Gd + 0.1 * eye) - Hd)]
    for op, dense in cases:
        torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(V.mT @ G, (Gd @ V).mT, rtol=1e-10, atol=1e-12)
    vals, _ = cv.eigenvalues(G + 1e-3, k=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(Gd + 1e-3 * eye).flip(0)[:2], rtol=1e-8, atol=1e-10)
    with pytest.raises(TypeError, match="real number or a LinearOperator"):
        H + "damping"
    with pytest.raises(ValueError, match="must agree"):
        H + cv.DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be finite"):
        H * float("nan")


def test_hessian_of_sequence_targets_and_class_weights_does_not_depend_on_the_batching():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(12, 5, 4, dtype=torch.float64)

    class Seq(nn.Module):  # [N, T, F] -> [N, C, T]: torch's class dim 1
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x).transpose(1, 2)
    seq = Seq()
    y = torch.randint(0, 3, (12, 5))
    y[0, :3] = -100
    y[5] = -100
    V = torch.randn(sum(p.numel() for p in seq.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))):
        whole = cv.hessian(seq, loss, (x, y)) @ V
        split = cv.hessian(seq, loss, [(x[:4], y[:4]), (x[4:], y[4:])]) @ V
        torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)


def test_fp16_hessian_weighs_kept_rows_in_the_accumulator_dtype():
    # batch parts x kept rows was formed in fp16 before the float32 accumulation: |HV| 32 x 4086
    # kept rows overflowed to inf (the integer-weight path multiplies in float32)
    torch.manual_seed(0)
    m32 = nn.Linear(4, 3)
    x, y = torch.randn(4096, 4) * 16, torch.randint(0, 3, (4096,))
    y[:10] = -100
    V = torch.randn(15, 2)
    ref = cv.hessian(m32, nn.CrossEntropyLoss(), [(x, y)]) @ V
    m16 = nn.Linear(4, 3).half()
    m16.load_state_dict(m32.state_dict())
    got = cv.hessian(m16, nn.CrossEntropyLoss(), [(x.half(), y)]) @ V.half()
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.float(), ref, rtol=2e-3, atol=0.05)  # fp16 products of |HV| ~ 32


def test_operator_algebra_leaves_the_parts_results_alone():
    class Identity(cv.LinearOperator):  # returns the block it was given
        def _matmat(self, V):
            return V
    I = Identity(3, torch.float64, "cpu")
    V = torch.ones(3, 2, dtype=torch.float64)
    torch.testing.assert_close((2 * I + 1) @ V, torch.full((3, 2), 3.0, dtype=torch.float64))
    torch.testing.assert_close((I - I) @ V, torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(V, torch.ones(3, 2, dtype=torch.float64))  # the caller's block was written in place
