"""Input validation of pyfastbayes.diagnostics: bad draws get a clear error naming the argument,
finite draws never give a NaN from an overflow, and the draws passed in are left unchanged."""
import numpy as np
import pytest
import torch

from pyfastbayes import diagnostics as D


def _draws(dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 100, 2, generator=g, dtype=dtype)


# ---- 1. finite draws of huge magnitude ------------------------------------------------------------------
@pytest.mark.parametrize("fn,method", [(D.rhat, "split"), (D.rhat, "rank"), (D.rhat, "folded"),
                                       (D.ess, "mean"), (D.ess, "bulk"), (D.ess, "tail")])
# (a scale that is not a power of two rounds |x - median| differently: two draws at the same distance
# from the median may tie or not, which moves the folded R-hat by ~1e-5 already for x * 3)
@pytest.mark.parametrize("scale,rtol", [(2.0 ** 300, 0), (2.0 ** -300, 0), (1e200, 1e-4), (1e-200, 1e-4)])
def test_every_method_is_scale_free_even_where_the_variance_would_overflow(fn, method, scale, rtol):
    # before: 'split' R-hat and 'mean' ESS of finite draws of |x| ~ 1e200 were NaN (the variances
    # overflow) and of |x| ~ 1e-200 wrong (they underflow); a power of two must change nothing at all
    x = _draws()
    big = x * scale
    kept = big.clone()
    got, want = fn(big, method), fn(x, method)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert torch.equal(big, kept)  # the draws passed in are not scaled in place


def test_a_constant_huge_element_is_still_constant():
    x = torch.full((2, 10, 1), 1e300, dtype=torch.float64)
    assert torch.isnan(D.rhat(x, "split")).all()
    assert D.ess(x, "mean").item() == 20.0


# ---- 2. numpy dtypes torch cannot hold --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["timedelta64[s]", np.longdouble])
@pytest.mark.parametrize("fn", [D.rhat, D.ess])
def test_numpy_dtypes_torch_has_no_dtype_for_are_named(fn, dtype):
    if np.dtype(dtype) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    x = np.zeros((2, 10), dtype=dtype)
    with pytest.raises(TypeError, match=r"x has numpy dtype .* which torch cannot hold; convert it with "
                                        r"x.astype\(np.float64\)"):  # was torch's "can't convert np.ndarray"
        fn(x)


def test_summary_names_the_entry_with_an_unconvertible_dtype():
    with pytest.raises(TypeError, match=r"samples\['t'\] has numpy dtype timedelta64"):
        D.summary({"a": np.random.randn(2, 10), "t": np.zeros((2, 10), dtype="timedelta64[s]")})


# ---- 3. the shapes and values that were already refused stay refused ---------------------------------------
@pytest.mark.parametrize("x,err,match", [
    (torch.tensor(1.0), ValueError, r"must have shape \[chains, draws, \.\.\.\], got shape \(\)"),
    (torch.randn(100), ValueError, r"for the draws of one chain pass x\[None\]"),
    (torch.zeros(0, 100), ValueError, "has no chains"),
    (torch.randn(4, 3), ValueError, "at least 4 are needed"),
    (torch.tensor([[1.0, float("nan"), 2.0, 3.0]]), ValueError, r"1 non-finite value\(s\)"),
    ([[1.0] * 10, [1.0] * 9], TypeError, "convert it with torch.as_tensor"),
    (np.array([np.ones(10), np.ones(9)], dtype=object), TypeError, "real numeric array"),
    (torch.ones(2, 10, dtype=torch.complex64), TypeError, "dense real tensor"),
])
@pytest.mark.parametrize("fn", [D.rhat, D.ess])
def test_bad_draws_get_errors_naming_x(fn, x, err, match):
    with pytest.raises(err, match=match):
        fn(x)


@pytest.mark.parametrize("fn", [D.rhat, D.ess])
def test_integer_and_bool_draws_equal_their_float64_values(fn):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (4, 50), generator=g)
    assert torch.equal(fn(x), fn(x.double()))
    assert torch.equal(fn(x > 2), fn((x > 2).double()))
