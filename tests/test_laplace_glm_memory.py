"""The GLM predictive's memory bound: a layer with shared weights keeps [C, out, in] Jacobian
numbers per input row, so rows go through in chunks whose parts stay under the budget; chunking
changes nothing but the chunk size (the predictive and the validation grid search against the
unchunked run, and against J P^-1 J^T built from explicit Jacobians)."""
import pytest
import torch
from torch import nn

import _laplace_reference as ref
import pyfastbayes.laplace.laplace as lap
from pyfastbayes.laplace import Laplace


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, x, y


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_chunked_glm_predictive_equals_the_unchunked_and_the_explicit_jacobians(structure, monkeypatch):
    model, x, y = _cnn()
    la = Laplace(model, "classification", hessian_structure=structure, prior_precision=0.5).fit([(x, y)],
                                                                                                progress=False)
    whole = la.functional_variance(x, batch_size=64)
    seen = []
    real = la._glm_pieces

    def spy(xb, batch_size):
        seen.append(xb.shape[0])
        return real(xb, batch_size)
    monkeypatch.setattr(la, "_glm_pieces", spy)
    per_row = 2 * sum(t.numel() * t.element_size() for _, part in real(x[:1], 1)[0][1] for t in part
                      if torch.is_tensor(t))
    monkeypatch.setattr(lap, "_GLM_BYTES", 7 * per_row)  # 7 rows per chunk
    chunked = la.functional_variance(x, batch_size=64)
    assert max(seen) <= 7 and sum(seen) == 40, seen  # (the one-row probe ran in the first call: cached)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if structure == "diag":  # against explicit Jacobians and the dense posterior precision
        J = ref.jacobians(model, x)
        torch.testing.assert_close(whole[1], ref.logits_var(J, torch.linalg.inv(la.to_dense())), rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.filterwarnings("ignore:gridsearch")
def test_chunked_grid_search_chooses_the_same_prior(monkeypatch):
    model, x, y = _cnn()
    la = Laplace(model, "classification", hessian_structure="kron").fit([(x, y)], progress=False)
    val = [(x[:25], y[:25])]
    want = la.optimize_prior_precision("gridsearch", val_loader=val, log_prior_prec_range=(-2, 2), grid_size=9)
    nll_whole = la._grid_nll_sums(val, [0.1, 1.0, 10.0], "glm", "probit", 100)
    monkeypatch.setattr(lap, "_GLM_BYTES", 1)  # one row per chunk
    got = la.optimize_prior_precision("gridsearch", val_loader=val, log_prior_prec_range=(-2, 2), grid_size=9)
    torch.testing.assert_close(got, want)
    nll_rows = la._grid_nll_sums(val, [0.1, 1.0, 10.0], "glm", "probit", 100)
    assert nll_rows == pytest.approx(nll_whole, rel=1e-10)
