"""Subnetwork Laplace (subset_of_weights='subnetwork') and the subnetwork masks.

References: the exact GGN of torch.func Jacobians (tests/_laplace_reference.py), whose [S, S]
submatrix is the subnetwork posterior's curvature; the GLM predictive J_S P^-1 J_S^T from the
same Jacobians' columns; laplace-torch 0.3's SubnetLaplace and subnetwork masks on the same model,
data and indices (log marginal likelihood, probit probabilities, the selected indices).
"""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _laplace_reference as ref
from _helpers import require
from pyfastbayes.laplace import Laplace, subnetmask as sm


def _mlp(seed=0, C=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(),
                         nn.Linear(6, C)).double()


class _Seq(nn.Module):
    """A Linear over [N, T, in] (its per-example Jacobian is a sum over positions: a 'matrix' part)
    and a convolution, then a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [N, 5, 3]
        return self.head(torch.tanh(self.lin(h)).flatten(1))


class _Tokens(nn.Module):
    """An Embedding (with a padding token) over [N, T] tokens, a Linear called twice on [N, T, D]
    (separate bias block), a strided padded Conv2d, then a head: every entry-wise Jacobian path."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.lin = nn.Linear(4, 4)
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 4 + 2 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(torch.tanh(self.lin(self.emb(x)))))  # [N, 4, 4]
        c = torch.tanh(self.conv(h.unsqueeze(1)))  # [N, 2, 2, 2]
        return self.head(torch.cat([h.flatten(1), c.flatten(1)], 1))


def _data(N=24, D=4, C=3, seed=1, shape=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, *(shape or (D,)), generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return X, y, DataLoader(TensorDataset(X, y), batch_size=10)


def _indices(P, k, seed=3):
    """k random positions of P, sorted (unsorted ones warn: test_copy_pickle_..._unsorted_warning)."""
    return torch.randperm(P, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _exact_precision(model, loader, idx, prior, structure, likelihood="classification", sigma=1.0):
    H = ref.exact_curvature(model, loader, likelihood)[idx][:, idx] / sigma ** 2
    if structure == "diag":
        H = torch.diag(torch.diagonal(H))
    return H + torch.diag(torch.as_tensor(prior, dtype=H.dtype).expand(idx.numel()))


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("make", ["mlp", "seq", "tokens"])
def test_precision_and_glm_predictive_equal_the_exact_submatrix(structure, make):
    if make == "tokens":
        torch.manual_seed(0)
        model = _Tokens().double()
        g = torch.Generator().manual_seed(1)
        X, y = torch.randint(0, 7, (24, 4), generator=g), torch.randint(0, 3, (24,), generator=g)
        loader = DataLoader(TensorDataset(X, y), batch_size=10)
        kw = dict(bias_block="separate")
    else:
        model = _mlp() if make == "mlp" else _Seq().double()
        X, y, loader = _data(shape=None if make == "mlp" else (2, 5))
        kw = {}
    P = sum(p.numel() for p in model.parameters())
    idx = _indices(P, 23)
    la = Laplace(model, "classification", "subnetwork", structure, subnetwork_indices=idx, prior_precision=0.6, **kw)
    la.fit(loader, progress=False)
    s = idx.sort().values
    assert torch.equal(la.positions.cpu(), s) and la.n_params == 23
    Pm = _exact_precision(model, loader, s, 0.6, structure)
    torch.testing.assert_close(la.to_dense(), Pm, rtol=1e-10, atol=1e-12)
    # the evidence: log p(D | theta) - 1/2 scatter - 1/2 log det(P) / det(P_0)
    ll = -nn.functional.cross_entropy(model(X), y, reduction="sum")
    theta = ref.flat(model)[s]
    lml = ll - 0.5 * 0.6 * theta.square().sum() - 0.5 * (torch.logdet(Pm) - 23 * torch.log(torch.tensor(0.6, dtype=torch.float64)))
    torch.testing.assert_close(la.log_marginal_likelihood(), lml.detach(), rtol=1e-10, atol=1e-10)
    # GLM predictive: f_var = J_S P^-1 J_S^T
    Xt = X[:7]
    J = ref.jacobians(model, Xt)[:, :, s]
    f_var = torch.einsum("ncp,pq,ndq->ncd", J, torch.linalg.inv(Pm), J)
    f_mu, f_var_ours = la.functional_variance(Xt)
    torch.testing.assert_close(f_mu, ref.outputs(model, Xt))
    torch.testing.assert_close(f_var_ours, f_var, rtol=1e-9, atol=1e-12)
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
    probs = torch.softmax(kappa * ref.outputs(model, Xt), -1)
    torch.testing.assert_close(la(Xt, pred_type="glm", link_approx="probit"), probs, rtol=1e-9, atol=1e-12)


def test_samples_move_only_the_subnetwork_and_have_its_covariance():
    model = _mlp()
    _, _, loader = _data()
    P = sum(p.numel() for p in model.parameters())
    idx = _indices(P, 15)
    la = Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=idx, prior_precision=2.0)
    la.fit(loader, progress=False)
    theta = la.sample(4000, generator=torch.Generator().manual_seed(0))
    mean = ref.flat(model)
    rest = torch.ones(P, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(theta[:, rest], mean[rest].expand(4000, -1))
    cov = torch.cov(theta[:, idx.sort().values].t())
    Sigma = torch.linalg.inv(la.to_dense())
    assert (cov - Sigma).abs().max() < 6 * Sigma.diagonal().max() / 4000 ** 0.5
    # 'nn' predictive: the draws run through the model (functional_call)
    out = la.predictive_samples(_data()[0][:5], "nn", 3, generator=torch.Generator().manual_seed(1))
    assert out.shape == (3, 5, 3) and torch.allclose(out.sum(-1), torch.ones(3, 5, dtype=out.dtype))


def test_regression_and_the_diag_prior_and_marglik_tuning():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(30, 3, dtype=torch.float64)
    Y = torch.randn(30, 2, dtype=torch.float64)
    loader = DataLoader(TensorDataset(X, Y), batch_size=10)
    idx = _indices(sum(p.numel() for p in model.parameters()), 12)
    prior = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    la = Laplace(model, "regression", "subnetwork", "full", subnetwork_indices=idx, prior_precision=prior,
                 sigma_noise=0.7)
    la.fit(loader, progress=False)
    Pm = ref.exact_curvature(model, loader, "regression")[idx.sort().values][:, idx.sort().values] / 0.49 \
        + torch.diag(prior)
    torch.testing.assert_close(la.to_dense(), Pm, rtol=1e-10, atol=1e-12)
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", prior_structure="diag", n_steps=200)
    assert la.prior_precision.shape == (12,) and la.log_marginal_likelihood().item() > before


def test_enable_backprop_and_joint_equal_the_default_path():
    model = _mlp()
    X, _, loader = _data()
    idx = _indices(sum(p.numel() for p in model.parameters()), 19)
    kw = dict(subnetwork_indices=idx, prior_precision=0.8)
    la = Laplace(model, "classification", "subnetwork", "full", **kw).fit(loader, progress=False)
    lb = Laplace(model, "classification", "subnetwork", "full", enable_backprop=True, **kw).fit(loader, progress=False)
    x = X[:6].clone().requires_grad_(True)
    pa = la(X[:6], pred_type="glm", link_approx="probit")
    pb = lb(x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(pb.detach(), pa, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(pb[:, 0].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # the joint covariance's diagonal blocks are the marginal functional variances
    _, f_cov = la.functional_covariance(X[:6])
    _, f_var = la.functional_variance(X[:6])
    C = 3
    for n in range(6):
        torch.testing.assert_close(f_cov[n * C:(n + 1) * C, n * C:(n + 1) * C], f_var[n], rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_and_other_indices_refused():
    model = _mlp()
    _, _, loader = _data()
    P = sum(p.numel() for p in model.parameters())
    idx = _indices(P, 10)
    la = Laplace(model, "classification", "subnetwork", "diag", subnetwork_indices=idx).fit(loader, progress=False)
    state = la.state_dict()
    with pytest.warns(UserWarning, match="used sorted"):  # (the same set, given in another order)
        lb = Laplace(model, "classification", "subnetwork", "diag", subnetwork_indices=idx.flip(0))
    lb.load_state_dict(state)
    torch.testing.assert_close(lb.log_marginal_likelihood(), la.log_marginal_likelihood())
    lc = Laplace(model, "classification", "subnetwork", "diag", subnetwork_indices=_indices(P, 10, seed=9))
    with pytest.raises(ValueError, match="other subnetwork_indices"):
        lc.load_state_dict(state)
    with pytest.raises(RuntimeError):
        lc.log_marginal_likelihood()  # nothing was loaded


def test_bad_indices_and_structures_are_refused():
    model = _mlp()
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="needs subnetwork_indices"):
        Laplace(model, "classification", "subnetwork", "full")
    with pytest.raises(ValueError, match="subnetwork_indices is for"):
        Laplace(model, "classification", "all", "full", subnetwork_indices=torch.arange(3))
    with pytest.raises(ValueError, match="'full' or 'diag'"):
        Laplace(model, "classification", "subnetwork", "kron", subnetwork_indices=torch.arange(3))
    for bad, err, words in [(torch.tensor([1, 1, 2]), ValueError, "duplicate"),
                            (torch.tensor([0, P]), ValueError, r"\[0, %d\)" % P),
                            (torch.tensor([-1, 2]), ValueError, "must lie in"),
                            (torch.tensor([], dtype=torch.long), ValueError, "non-empty"),
                            (torch.arange(4).view(2, 2), ValueError, "1-D"),
                            (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
                            (torch.zeros(P, dtype=torch.bool), TypeError, "nonzero"),
                            ("0:5", TypeError, "1-D integer tensor")]:
        with pytest.raises(err, match=words):
            Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=bad)
    la = Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=[0, 5, 9])
    assert la.positions.tolist() == [0, 5, 9]


def test_masks_select_what_they_say():
    model = _mlp()
    X, y, loader = _data()
    theta = ref.flat(model)
    P = theta.numel()
    top = sm.LargestMagnitudeSubnetMask(model, 11).select()
    assert top.tolist() == sorted(torch.argsort(theta.abs(), descending=True)[:11].tolist())
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()

    def span(name):
        i = names.index(name)
        return list(range(starts[i], starts[i] + sizes[i]))

    assert sm.ParamNameSubnetMask(model, ["2.weight", "5.bias"]).select().tolist() == span("2.weight") + span("5.bias")
    assert sm.ModuleNameSubnetMask(model, ["3"]).select().tolist() == span("3.weight") + span("3.bias")
    assert sm.LastLayerSubnetMask(model).select(loader).tolist() == span("5.weight") + span("5.bias")
    r1 = sm.RandomSubnetMask(model, 9, generator=torch.Generator().manual_seed(4)).select()
    r2 = sm.RandomSubnetMask(model, 9, generator=torch.Generator().manual_seed(4)).select()
    assert torch.equal(r1, r2) and r1.numel() == 9 and bool((r1[1:] > r1[:-1]).all())
    diag = Laplace(model, "classification", "all", "diag")
    sel = sm.LargestVarianceDiagLaplaceSubnetMask(model, 7, diag).select(loader)
    assert sel.tolist() == sorted(torch.argsort(diag.posterior_variance, descending=True)[:7].tolist())
    before = ref.flat(model).clone()
    swag_sel = sm.LargestVarianceSWAGSubnetMask(model, 8, swag_n_snapshots=3).select(loader)
    assert swag_sel.numel() == 8 and torch.equal(ref.flat(model), before)  # trained a copy
    # the selected indices drive a subnetwork Laplace directly
    Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=sel).fit(loader, progress=False)
    # errors
    with pytest.raises(ValueError, match="more than the model's"):
        sm.LargestMagnitudeSubnetMask(model, P + 1)
    mask = sm.LargestMagnitudeSubnetMask(model, 3)
    mask.select()
    with pytest.raises(RuntimeError, match="selected its subnetwork already"):
        mask.select()
    with pytest.raises(ValueError, match="not trainable parameters"):
        sm.ParamNameSubnetMask(model, ["nope.weight"]).select()
    with pytest.raises(ValueError, match="not a module"):
        sm.ModuleNameSubnetMask(model, ["9"]).select()
    with pytest.raises(ValueError, match="has no trainable parameters"):
        sm.ModuleNameSubnetMask(model, ["1"]).select()
    with pytest.raises(ValueError, match="needs train_loader"):
        sm.LargestVarianceDiagLaplaceSubnetMask(model, 3, Laplace(model, "classification", "all", "diag")).select()
    with pytest.raises(TypeError, match="hessian_structure='diag'"):
        sm.LargestVarianceDiagLaplaceSubnetMask(model, 3, Laplace(model, "classification", "all", "kron"))
    with pytest.raises(RuntimeError, match="not selected yet"):
        sm.RandomSubnetMask(model, 3).indices


def test_against_laplace_torch():
    laplace = require("laplace", "laplace-torch's SubnetLaplace and subnetwork masks are the reference")
    import laplace.utils.subnetmask as lsm

    model = _mlp()
    X, y, loader = _data(N=30)
    P = sum(p.numel() for p in model.parameters())
    idx = _indices(P, 25).sort().values
    for structure in ("full", "diag"):
        ours = Laplace(model, "classification", "subnetwork", structure, subnetwork_indices=idx,
                       prior_precision=0.7).fit(loader, progress=False)
        theirs = laplace.Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure=structure,
                                 subnetwork_indices=idx, prior_precision=0.7)
        theirs.fit(loader)
        torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood().detach(),
                                   rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ours(X[:9], pred_type="glm", link_approx="probit"),
                                   theirs(X[:9], pred_type="glm", link_approx="probit"), rtol=1e-8, atol=1e-10)
    for make in (lambda m, L: m.LargestMagnitudeSubnetMask(model, 17), lambda m, L: m.ModuleNameSubnetMask(model, ["2"]),
                 lambda m, L: m.ParamNameSubnetMask(model, ["2.weight", "5.bias"]),
                 lambda m, L: m.LastLayerSubnetMask(model)):
        assert torch.equal(make(sm, Laplace).select(loader), make(lsm, laplace.Laplace).select(loader))
    a = sm.LargestVarianceDiagLaplaceSubnetMask(model, 20, Laplace(model, "classification", "all", "diag"))
    b = lsm.LargestVarianceDiagLaplaceSubnetMask(
        model, 20, laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag"))
    assert torch.equal(a.select(loader), b.select(loader))


@pytest.mark.parametrize("curvature", ["ggn", "ef", "mc_fisher"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_curvatures_on_a_cnn_with_a_frozen_parameter(curvature, structure):
    """Conv2d (its Jacobian a 'matrix' part) with a frozen bias (not in the flat vector): the
    subnetwork's precision is the [S, S] submatrix of the exact curvature ('ggn', 'ef': torch.func
    Jacobians; 'mc_fisher': the all-weights 'full' Laplace drawing the same labels)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double()
    model[0].bias.requires_grad_(False)
    X, y, loader = _data(N=20, shape=(1, 6, 6))
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idx = _indices(P, 30)
    s = idx.sort().values
    def fit(la):  # (the same label draws for both: a fresh generator each)
        return la.fit(loader, progress=False, generator=torch.Generator().manual_seed(0))

    la = fit(Laplace(model, "classification", "subnetwork", structure, subnetwork_indices=idx, curvature=curvature,
                     prior_precision=0.5))
    if curvature == "mc_fisher":
        H = fit(Laplace(model, "classification", "all", "full", curvature=curvature, prior_precision=0.5)) \
            .to_dense()[s][:, s] - 0.5 * torch.eye(30, dtype=torch.float64)
    else:
        H = ref.exact_curvature(model, loader, "classification", curvature)[s][:, s]
    if structure == "diag":
        H = torch.diag(torch.diagonal(H))
    torch.testing.assert_close(la.to_dense(), H + 0.5 * torch.eye(30, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_copy_pickle_numpy_indices_and_the_unsorted_warning():
    """(review) a subnetwork Laplace survives copy.deepcopy and torch.save / load (SubsetLayer's
    attribute forwarding raised KeyError while they rebuilt it); a list of numpy integers is
    taken; unsorted indices warn that the sorted order is used (a per-weight prior follows it)."""
    import copy

    import numpy as np

    model = _mlp()
    X, _, loader = _data()
    P = sum(p.numel() for p in model.parameters())
    idx = _indices(P, 12).sort().values
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sorted indices: no warning
        la = Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=idx).fit(loader, progress=False)
    for other in (copy.deepcopy(la), _pickled(la)):
        torch.testing.assert_close(other(X[:4]), la(X[:4]), rtol=0, atol=0)
        torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0)
    lb = Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=[np.int64(i) for i in idx.tolist()])
    assert torch.equal(lb.positions.cpu(), idx)
    with pytest.raises(TypeError, match="must hold integers"):
        Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=[0, 1.5])
    with pytest.warns(UserWarning, match="used sorted"):
        Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=idx.flip(0))


def _pickled(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_wide_layers_give_their_entries_columns_alone():
    """(review) a few weights of a wide convolution: their Jacobian columns are built alone
    (m N T k numbers), not cut from the layer's [m, N, out, in k] matrix (the GLM predictive's
    chunks are the whole batch); a layer without entry-wise columns (a generic module's
    per-example gradients) has its whole parts counted in the chunk budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 3))
    X = torch.randn(16, 8, 8, 8)
    y = torch.randint(0, 3, (16,))
    la = Laplace(model, "classification", "subnetwork", "diag", subnetwork_indices=torch.arange(11)) \
        .fit([(X, y)], progress=False)
    assert la._glm_rows(X, 256) == 256
    la._forward(X[:2])  # (a recorded forward: the layer decides its path on it)
    assert la.layers[0]._entrywise()
    la.layers[0].clear()
    _, f_var = la.functional_variance(X[:5])
    J = ref.jacobians(model, X[:5])[:, :, :11]
    var = 1.0 / torch.diagonal(la.to_dense())
    torch.testing.assert_close(f_var, torch.einsum("ncp,p,ndp->ncd", J, var, J), rtol=1e-5, atol=1e-7)

    class Scale(nn.Module):  # a module with its own parameters: generic per-example gradients
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4096))

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(Scale(), nn.Linear(4096, 3))
    X = torch.randn(8, 4096)
    la = Laplace(model, "classification", "subnetwork", "diag", subnetwork_indices=torch.arange(5)) \
        .fit([(X, torch.randint(0, 3, (8,)))], progress=False)
    la._glm_rows(X, 256)
    assert next(iter(la._glm_row_bytes.values())) >= 3 * 4096 * 4  # the module's [C, 1 row, 4096] gradients

class _Wide(nn.Module):
    """Layers wide enough that a few chosen entries take the entry-wise path: an Embedding over 3
    tokens (padding token 0), a Linear over the 3 positions, a Conv2d, a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.lin = nn.Linear(8, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(3 * 16 + 8 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(self.emb(x)))  # [N, 3, 16]
        c = torch.tanh(self.conv(h.reshape(-1, 3, 4, 4).repeat(1, 1, 2, 2)[:, :, :6, :6]))  # [N, 8, 4, 4]
        return self.head(torch.cat([h.flatten(1), c.flatten(1)], 1))


@pytest.mark.parametrize("bias_block", ["joint", "separate"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_entrywise_columns_equal_the_exact_ones(structure, bias_block):
    """A few entries of each wide layer (Embedding with padding, Linear over positions, Conv2d;
    weight, bias and joint blocks): built entry by entry (asserted), the precision and the GLM
    variance equal the exact GGN's submatrix and J_S P^-1 J_S^T."""
    torch.manual_seed(0)
    model = _Wide().double()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randint(0, 50, (20, 3), generator=g), torch.randint(0, 3, (20,), generator=g)
    X[:4, 0] = 0  # padding tokens
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    offsets, o = {}, 0
    for n, p in model.named_parameters():
        offsets[n], o = o, o + p.numel()
    idx = torch.tensor([offsets["emb.weight"] + 8 * 3 + 1, offsets["emb.weight"] + 8 * 17 + 5, offsets["emb.weight"] + 2,
                        offsets["lin.weight"] + 7, offsets["lin.weight"] + 100, offsets["lin.bias"] + 4,
                        offsets["conv.weight"] + 11, offsets["conv.weight"] + 150, offsets["conv.bias"] + 6,
                        offsets["head.weight"] + 3]).sort().values
    la = Laplace(model, "classification", "subnetwork", structure, subnetwork_indices=idx, prior_precision=0.9,
                 bias_block=bias_block).fit(loader, progress=False)
    f, _ = la._forward(X[:8])  # (a recorded forward, as fit's: the layers decide their path on it)
    wide = [layer for layer in la.layers if layer.inner.name in ("emb", "lin", "conv")]
    assert len(wide) == 3 and all(layer._entrywise() for layer in wide)
    for layer in la.layers:
        layer.clear()
    H = ref.exact_curvature(model, loader, "classification")[idx][:, idx]
    if structure == "diag":
        H = torch.diag(H.diagonal())
    Pm = H + 0.9 * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(la.to_dense(), Pm, rtol=1e-10, atol=1e-12)
    _, f_var = la.functional_variance(X[:6])
    J = ref.jacobians(model, X[:6])[:, :, idx]
    torch.testing.assert_close(f_var, torch.einsum("ncp,pq,ndq->ncd", J, torch.linalg.inv(Pm), J), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("bias, bias_block", [(False, "joint"), (True, "separate"), (True, "joint")])
def test_entrywise_one_input_linear(bias, bias_block):
    """(final read) a Linear with ONE input over positions: its weight block has one column, like a
    bias block, but its entries' columns are sum_t g a, not sum_t g (the entry-wise path had
    told the two apart by the column count)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 64, bias=bias)
            self.head = nn.Linear(64 * 3, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(x.unsqueeze(-1))).flatten(1))

    torch.manual_seed(0)
    model = M().double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    idx = torch.tensor([5, 40, 70]) if bias else torch.tensor([5, 40])
    la = Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=idx, bias_block=bias_block) \
        .fit([(X, y)], progress=False)
    la._forward(X[:2])
    assert la.layers[0]._entrywise()
    for layer in la.layers:
        layer.clear()
    H = ref.exact_curvature(model, [(X, y)], "classification")[idx][:, idx]
    torch.testing.assert_close(la.to_dense(), H + torch.eye(len(idx), dtype=torch.float64), rtol=1e-10, atol=1e-12)
