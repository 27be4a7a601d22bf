"""The LinearOperator interface of pyfastbayes.curvature (operator.py): products of vectors and
blocks, argument checks, the exact and Hutchinson diagonals and to_dense, on DenseOperator."""
import math

import pytest
import torch

from pyfastbayes.curvature import DenseOperator, LinearOperator

from _helpers import DEVICES


def _sym(P, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    return (A + A.T).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_products_of_vectors_and_blocks(device):
    A = _sym(37, device=device)
    op = DenseOperator(A)
    assert op.shape == (37, 37) and op.dtype == torch.float64 and op.device.type == device
    v = torch.randn(37, dtype=torch.float64, device=device)
    V = torch.randn(37, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(op @ v, A @ v, rtol=0, atol=0)
    torch.testing.assert_close(op.matvec(v), A @ v, rtol=0, atol=0)
    torch.testing.assert_close(op @ V, A @ V, rtol=0, atol=0)
    assert (op @ V[:, :1]).shape == (37, 1)


def test_exact_diagonal_and_dense_in_blocks_of_any_size():
    A = _sym(50)
    op = DenseOperator(A)
    for block in (1, 7, 50, 64):
        torch.testing.assert_close(op.diagonal(block=block), A.diagonal(), rtol=0, atol=0)
        torch.testing.assert_close(op.to_dense(block=block), A, rtol=0, atol=0)


def test_hutchinson_diagonal_is_unbiased_and_reproducible():
    """Mean of the estimate over seeds is within 4 standard errors of the exact diagonal."""
    A = _sym(20)
    op = DenseOperator(A)
    est = torch.stack([op.diagonal("hutchinson", n_probes=10, generator=torch.Generator().manual_seed(s))
                       for s in range(200)])
    se = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - A.diagonal()).abs() <= 4 * se + 1e-12).all()
    a = op.diagonal("hutchinson", n_probes=33, block=8, generator=torch.Generator().manual_seed(3))
    b = op.diagonal("hutchinson", n_probes=33, block=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_diagonal_of_a_diagonal_matrix_is_exact_with_any_probe():
    """z * (D z) = diag(D) for every +-1 probe z: Hutchinson is exact on a diagonal matrix."""
    d = torch.arange(1.0, 11.0, dtype=torch.float64)
    op = DenseOperator(torch.diag(d))
    torch.testing.assert_close(op.diagonal("hutchinson", n_probes=3, generator=torch.Generator().manual_seed(0)), d)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda: torch.randn(36, dtype=torch.float64), ValueError, r"shape \[37\] or \[37, k\] \(P = 37 parameters\), got \(36,\)"),
    (lambda: torch.randn(37, 2, 1, dtype=torch.float64), ValueError, r"got \(37, 2, 1\)"),
    (lambda: torch.randn(37, 0, dtype=torch.float64), ValueError, r"empty block \[37, 0\]: pass k >= 1"),
    (lambda: torch.randn(37), TypeError, r"v is torch.float32 but the operator is torch.float64"),
    (lambda: [1.0] * 37, TypeError, r"v must be a tensor"),
])
def test_bad_vectors_are_refused_naming_the_problem(bad, exc, match):
    op = DenseOperator(_sym(37))
    with pytest.raises(exc, match=match):
        op @ bad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_vector_on_another_device_is_refused():
    op = DenseOperator(_sym(5))
    with pytest.raises(ValueError, match=r"v is on cuda:0 but the operator is on cpu; move it"):
        op @ torch.randn(5, dtype=torch.float64, device="cuda")


def test_bad_arguments_of_the_derived_methods():
    op = DenseOperator(_sym(5))
    with pytest.raises(ValueError, match="method must be 'exact' or 'hutchinson'"):
        op.diagonal("lanczos")
    with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
        op.diagonal("hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="matvec takes one vector"):
        op.matvec(torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="A must be a square floating-point matrix"):
        DenseOperator(torch.randn(3, 4))
    with pytest.raises(ValueError, match="P must be an int >= 1, got 0"):
        LinearOperator(0, torch.float32, "cpu")
    import numpy as np

    assert LinearOperator(np.int64(4), torch.float32, "cpu").shape == (4, 4)  # was refused as not an int
    # a non-symmetric or non-finite matrix was taken by DenseOperator (eigenvalues() refused it as a tensor)
    with pytest.raises(ValueError, match=r"A must be symmetric: max \|A - A\^T\|"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="A holds 1 NaN or inf entries"):
        DenseOperator(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]).triu())


def test_to_dense_refuses_a_huge_operator():
    class Huge(LinearOperator):
        def _matmat(self, V):  # never called
            raise AssertionError("to_dense must refuse before any product")

    with pytest.raises(ValueError, match=r"to_dense\(\) would hold a 30000 x 30000 matrix"):
        Huge(30_000, torch.float32, "cpu").to_dense()


def test_a_subclass_without_matmat_says_so():
    with pytest.raises(NotImplementedError, match="must implement _matmat"):
        LinearOperator(3, torch.float64, "cpu") @ torch.ones(3, dtype=torch.float64)
