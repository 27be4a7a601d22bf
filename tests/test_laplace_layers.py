"""pyfastbayes.laplace layer by layer against independent references (tests/_laplace_reference.py,
fp64, small models):

- 'full' and 'diag' equal the exact GGN / empirical Fisher / MC Fisher (matrix and diagonal) built
  from per-example Jacobians (torch.func) and closed-form output Hessians, for Linear on [N, T, in]
  inputs, Conv1d, Conv2d (stride, padding, dilation, padding='same'; chains of them, whose input
  gradients the Laplace backward takes by transposed convolution), Embedding (padding_idx),
  LayerNorm, BatchNorm2d (eval), GroupNorm and a module with a raw nn.Parameter (unsupported='diag');
- 'kron' equals the explicit KFAC formulas (Eschenhagen et al. 2023: 'expand' and 'reduce'), is
  exact for one example, and agrees with curvlinops' KFACLinearOperator on a small CNN;
- the GLM functional variance equals J P^-1 J^T with explicit Jacobians and to_dense(), and the
  probit / bridge / MC links their formulas; draws of a CNN's kron posterior have inv(to_dense()).
"""
import math
import warnings

import pytest
import torch
from torch import nn

import _laplace_reference as ref
from _helpers import require
from pyfastbayes.laplace import Laplace
from pyfastbayes.laplace import _layers as layers_mod
from pyfastbayes.laplace import factors as factors_mod

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny fp64 models: a second thread only adds spin-waiting on a shared 2-core machine (10x
    slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

T_POS = 3  # positions of the sequence models
C = 3


class Scale(nn.Module):
    """An elementwise scale held in a raw nn.Parameter: no Kronecker factorisation exists for it."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d, dtype=DT))

    def forward(self, x):
        return x * self.scale


class EmbeddingNet(nn.Module):
    def __init__(self, V=7, D=3, T=T_POS, padding_idx=0, out=C):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.out = nn.Linear(T * D, out)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).flatten(1))


def _bn_net():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, C))
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.normal_()
        m[1].bias.normal_()
    return m


class Unrolled(nn.Module):
    """A recurrent cell unrolled over T_POS steps: ``inp`` and the LayerNorm are called T_POS
    times, ``cell`` T_POS - 1 times (modules called several times per forward)."""

    def __init__(self, D=3, H=4, out=C):
        super().__init__()
        self.inp, self.cell, self.norm, self.out = nn.Linear(D, H), nn.Linear(H, H, bias=False), nn.LayerNorm(H), \
            nn.Linear(H, out)

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x[:, 0])))
        for t in range(1, x.shape[1]):
            h = torch.tanh(self.norm(self.inp(x[:, t]) + self.cell(h)))
        return self.out(h)


class Siamese(nn.Module):
    """One convolution on the image and on its 2x subsampling (calls with different numbers of
    positions), one Embedding on two token fields, the features joined by a Linear."""

    def __init__(self, out=C, words=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.emb = nn.Embedding(5, 2, padding_idx=0) if words else None
        self.out = nn.Linear(3 * 25 + 3 * 9 + (2 * 4 if words else 0), out)

    def forward(self, x):
        img, tok = x[:, :50].view(-1, 2, 5, 5), x[:, 50:].long()
        fine, coarse = self.conv(img), self.conv(img[:, :, ::2, ::2])
        feats = [fine.flatten(1), coarse.flatten(1)]
        if self.emb is not None:
            feats.append(torch.cat([self.emb(tok[:, :2]), self.emb(tok[:, 2:])], 1).flatten(1))
        return self.out(torch.tanh(torch.cat(feats, 1)))


def _siamese_inputs(n, g):
    return torch.cat([torch.randn(n, 50, generator=g, dtype=DT), torch.randint(0, 5, (n, 4), generator=g).to(DT)], 1)


# name -> (model factory, inputs(n, generator), likelihood, outputs)
MODELS = {
    "seq_linear": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(T_POS * 4, C)),
                   lambda n, g: torch.randn(n, T_POS, 3, generator=g, dtype=DT), "classification"),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(),
                                     nn.Linear(12, 2)),
               lambda n, g: torch.randn(n, 2, 9, generator=g, dtype=DT), "regression"),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                                     nn.Conv2d(3, 4, 3, padding="same", dilation=2), nn.Tanh(),
                                     nn.Conv2d(4, 2, (2, 3), dilation=(2, 1), padding=(1, 0)), nn.Flatten(),
                                     nn.Linear(16, C)),
               lambda n, g: torch.randn(n, 2, 7, 7, generator=g, dtype=DT), "classification"),
    # convolutions whose inputs need gradients (their output gradients go through _ConvInputGrad), with
    # strides that drop input rows (output_padding 1)
    "conv2d_chain": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                           nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(36, C)),
                     lambda n, g: torch.randn(n, 2, 8, 8, generator=g, dtype=DT), "classification"),
    "conv1d_chain": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(),
                                           nn.Conv1d(3, 2, 2, stride=3, padding=1, dilation=2), nn.Flatten(),
                                           nn.Linear(8, 2)),
                     lambda n, g: torch.randn(n, 2, 13, generator=g, dtype=DT), "regression"),
    "embedding": (EmbeddingNet, lambda n, g: torch.randint(0, 7, (n, T_POS), generator=g), "classification"),
    "layernorm": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)),
                  lambda n, g: torch.randn(n, 4, generator=g, dtype=DT), "binary"),
    "batchnorm": (_bn_net, lambda n, g: torch.randn(n, 2, 5, 5, generator=g, dtype=DT), "classification"),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                                        nn.Linear(36, C)),
                  lambda n, g: torch.randn(n, 2, 5, 5, generator=g, dtype=DT), "classification"),
    "custom": (lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, C)),
               lambda n, g: torch.randn(n, 4, generator=g, dtype=DT), "classification"),
    # modules called several times per forward
    "unrolled": (Unrolled, lambda n, g: torch.randn(n, T_POS, 3, generator=g, dtype=DT), "classification"),
    "siamese": (Siamese, _siamese_inputs, "regression"),
    "siamese_conv": (lambda: Siamese(words=False), _siamese_inputs, "regression"),
}


def _targets(likelihood, f, g):
    if likelihood == "classification":
        return torch.randint(0, f.shape[1], (f.shape[0],), generator=g)
    if likelihood == "binary":
        return torch.randint(0, 2, (f.shape[0],), generator=g).to(DT)
    return f + torch.randn(f.shape, generator=g, dtype=DT)


def make(name, n=10, seed=1):
    """(model, loader of two uneven batches, likelihood): accumulation over batches must be exact."""
    factory, inputs, likelihood = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(DT)
    g = torch.Generator().manual_seed(seed)
    X = inputs(n, g)
    with torch.no_grad():
        f = model.eval()(X)
    y = _targets(likelihood, f, g)
    k = 6 * n // 10
    return model, [(X[:k], y[:k]), (X[k:], y[k:])], likelihood


def fit(model, loader, likelihood, **kw):
    progress = kw.pop("progress", False)
    generator = kw.pop("generator", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported='diag' warns; tested on its own below
        return Laplace(model, likelihood, **kw).fit(loader, progress=progress, generator=generator)


def curvature_part(la):
    """s H of to_dense() (the prior's diagonal removed)."""
    return la.to_dense() - torch.diag(la._delta())


# ---- exact GGN / EF / MC Fisher: 'full' and 'diag' ----------------------------------------------------------
_EXACT = {}


def exact(name, curvature, mc_samples=2, seed=5):
    key = (name, curvature)
    if key not in _EXACT:
        model, loader, lik = make(name)
        gen = torch.Generator().manual_seed(seed)
        _EXACT[key] = ref.exact_curvature(model, loader, lik, curvature, mc_samples, gen)
    return _EXACT[key]


@pytest.mark.parametrize("curvature", ["ggn", "ef", "mc_fisher"])
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("name", list(MODELS))
def test_full_and_diag_equal_the_exact_curvature(name, structure, curvature):
    model, loader, lik = make(name)
    H = exact(name, curvature)
    # 'reduce' must not matter here: it only changes how Kronecker factors are formed
    la = fit(model, loader, lik, hessian_structure=structure, curvature=curvature, mc_samples=2,
             generator=torch.Generator().manual_seed(5), prior_precision=0.5, kfac_approx="reduce",
             unsupported="diag" if name == "custom" else "error")
    got = curvature_part(la)
    want = H if structure == "full" else torch.diag(H.diagonal())
    assert float(H.abs().max()) > 0.1  # a real curvature, not a vacuous comparison
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if structure == "diag":
        torch.testing.assert_close(la.posterior_precision, H.diagonal() + 0.5, rtol=1e-10, atol=1e-12)


def test_padding_idx_row_has_no_curvature():
    model, loader, lik = make("embedding")
    H = exact("embedding", "ggn")
    la = fit(model, loader, lik, hessian_structure="full")
    pad_row = slice(0, 3)  # emb.weight[0] (padding_idx=0) is the first 3 flat parameters
    assert float(curvature_part(la)[pad_row].abs().max()) == 0.0
    assert float(H[3:6].abs().max()) > 0  # other rows do have curvature


def test_unsupported_module_error_lists_the_supported_layers():
    model, loader, lik = make("custom")
    with pytest.raises(ValueError, match=r"module '1' \(Scale\).*supported: Kronecker-factored: Linear, Conv1d, "
                                         r"Conv2d.*Embedding; diagonal: LayerNorm, GroupNorm, BatchNorm.*"
                                         r"unsupported='diag'"):
        Laplace(model, lik)
    with pytest.warns(UserWarning, match=r"diagonal blocks \(unsupported='diag'\) for \['1'\]"):
        la = Laplace(model, lik, unsupported="diag")
    assert [b.name for b in la.blocks] == ["0.weight+bias", "1.scale", "3.weight+bias"]
    # the fallback diagonal block equals the exact diagonal also inside a 'kron' posterior
    la.fit(loader, progress=False)
    H = exact("custom", "ggn")
    idx = slice(20, 25)  # 1.scale
    torch.testing.assert_close(torch.diagonal(curvature_part(la))[idx], H.diagonal()[idx], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module, why", [
    (lambda: nn.Conv2d(2, 2, 3, groups=2), r"groups=2"),
    (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect'"),
    (lambda: nn.Conv2d(2, 2, 2, padding="same"), r"padding='same'\) with an odd total padding"),
    (lambda: nn.InstanceNorm2d(2, affine=True), r"InstanceNorm2d"),
])
def test_unfactorable_variants_are_named_and_fall_back_exactly(module, why):
    torch.manual_seed(0)
    model = nn.Sequential(module(), nn.Flatten(), nn.LazyLinear(3)).to(DT)
    X = torch.randn(6, 2, 5, 5, dtype=DT)
    model(X)
    y = torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=why):
        Laplace(model)
    la = fit(model, [(X, y)], "classification", hessian_structure="kron", unsupported="diag")
    H = ref.exact_curvature(model, [(X, y)], "classification")
    n0 = sum(p.numel() for p in model[0].parameters())
    torch.testing.assert_close(torch.diagonal(curvature_part(la))[:n0], H.diagonal()[:n0], rtol=1e-10, atol=1e-12)
    # 'full' and 'diag' factor nothing: such a module is theirs exactly, without the option or a warning
    # (they raised "Laplace cannot factor" and, with unsupported='diag', warned of diagonal blocks)
    for structure in ("full", "diag"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            la = Laplace(model, hessian_structure=structure).fit([(X, y)], progress=False)
        torch.testing.assert_close(curvature_part(la), H if structure == "full" else torch.diag(H.diagonal()),
                                   rtol=1e-10, atol=1e-12)


def test_batchnorm_with_batch_statistics_is_refused():
    """BatchNorm without running statistics normalises with the batch's statistics even in eval
    mode: the examples are not independent, so no per-example likelihood exists."""
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                          nn.Linear(18, 3))
    for uns in ("error", "diag"):
        with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\(track_running_stats=False\)\).*not independent"):
            Laplace(model, unsupported=uns)


def _freeze(model, which):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            getattr(m, which).requires_grad_(False)
    return model


@pytest.mark.parametrize("variant", ["separate", "no_bias", "no_weight"])
@pytest.mark.parametrize("name", ["conv2d", "seq_linear"])
def test_bias_apart_or_frozen(name, variant):
    """bias_block='separate', bias-free layers and layers whose weight is frozen (the bias alone):
    full/diag exact, and the functional variance of every structure (both kfac_approx) J P^-1 J^T."""
    model, loader, lik = make(name)
    kw = {}
    if variant == "separate":
        kw["bias_block"] = "separate"
    else:
        _freeze(model, "bias" if variant == "no_bias" else "weight")
    H = ref.exact_curvature(model, loader, lik)
    Xs = MODELS[name][1](4, torch.Generator().manual_seed(2))
    J = ref.jacobians(model, Xs)
    for structure in ("full", "diag", "kron"):
        for approx in ("expand", "reduce"):
            la = fit(model, loader, lik, hessian_structure=structure, kfac_approx=approx, prior_precision=0.4, **kw)
            if structure != "kron":
                want = H if structure == "full" else torch.diag(H.diagonal())
                torch.testing.assert_close(curvature_part(la), want, rtol=1e-10, atol=1e-12)
            want = ref.logits_var(J, torch.linalg.inv(la.to_dense()))
            torch.testing.assert_close(la.functional_variance(Xs)[1], want, rtol=1e-9, atol=1e-12)
    if variant == "no_weight":  # the bias block of a shared layer: G over all positions, A = [[1]]
        la = fit(model, loader, lik, hessian_structure="kron")
        facs = ref.kfac_factors(model, loader, lik, kron_modules(model), "expand", bias=False)
        for (bname, L, R, _, _), (G, _) in zip(la.posterior_precision, facs):
            assert bname.endswith(".bias") and R.tolist() == [[1.0]]
            torch.testing.assert_close(L, G, rtol=1e-10, atol=1e-13)


def test_tied_parameters_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))

    for structure in ("kron", "full"):
        with pytest.raises(ValueError, match=r"'a.weight' is shared by \['a.weight', 'b.weight'\] \(tied weights\)"):
            Laplace(Tied(), hessian_structure=structure, unsupported="diag")
    Laplace(Tied(), subset_of_weights="last_layer")  # the tied pair is not covered: fine


def test_forward_contracts():
    """In-place activations after a covered layer change nothing (the recorded output is a clone);
    a covered layer called twice (one call's output discarded or not) has the exact curvature of
    all its uses; one not called at all is refused by name."""
    torch.manual_seed(0)
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(DT)
    la = fit(model, [(X, y)], "classification", hessian_structure="full")
    torch.testing.assert_close(curvature_part(la), ref.exact_curvature(model, [(X, y)], "classification"),
                               rtol=1e-10, atol=1e-12)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x, discard=False):
            if discard:
                self.lin(x.flip(0))  # a call whose output the model's outputs do not depend on
                return self.out(self.lin(x))
            return self.out(self.lin(torch.tanh(self.lin(x))))

    class Discard(Twice):
        def forward(self, x):
            return super().forward(x, discard=True)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.spare = nn.Linear(4, 3), nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    for cls in (Twice, Discard):
        model = cls().to(DT)
        la = fit(model, [(X, y)], "classification", hessian_structure="full")
        torch.testing.assert_close(curvature_part(la), ref.exact_curvature(model, [(X, y)], "classification"),
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="layer 'spare' did not take part in this batch's forward"):
        fit(Unused().to(DT), [(X, y)], "classification")


# ---- KFAC ---------------------------------------------------------------------------------------------------
def kron_modules(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def mlp(D=4, H=5, out=C):
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, out)).to(DT)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("bias_block", ["joint", "separate"])
def test_kron_mlp_is_the_blockwise_kfac_formula(bias_block, curvature):
    """Unshared layers: block = (sum_n J_n^T H_n J_n over the layer's outputs) (x) (mean_n a a^T),
    a with the bias 1 for 'joint'; with 'separate' W gets (G, mean a a^T) and b (G, [[1]])."""
    torch.manual_seed(3)
    model = mlp()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(11, 4, generator=g, dtype=DT), torch.randint(0, C, (11,), generator=g)
    loader = [(X[:4], y[:4]), (X[4:], y[4:])]
    la = fit(model, loader, "classification", hessian_structure="kron", bias_block=bias_block, curvature=curvature)
    want = _kfac_dense(model, loader, curvature, bias_block == "joint")
    torch.testing.assert_close(curvature_part(la), want, rtol=1e-10, atol=1e-12)


def _kfac_dense(model, loader, curvature, joint):
    """The Kronecker blocks of the explicit KFAC formulas as one dense [P, P] matrix (layout order)."""
    facs = ref.kfac_factors(model, loader, "classification", kron_modules(model), "expand", curvature, bias=joint)
    blocks = []
    for (G, A), m in zip(facs, kron_modules(model)):
        if joint:  # Theta = [W | b] row-major: columns W[o, :] then b[o]
            K = torch.kron(G.contiguous(), A.contiguous())
            out, inp = m.weight.shape
            order = torch.arange(out * (inp + 1)).view(out, inp + 1)
            flat_pos = torch.cat([order[:, :inp].reshape(-1), order[:, inp]])  # layout order: W then b
            blocks.append(K[flat_pos][:, flat_pos])
        else:
            blocks += [torch.kron(G.contiguous(), A.contiguous()), G]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("bias_block", ["joint", "separate"])
def test_kron_activation_rows_fewer_than_the_width(bias_block, monkeypatch):
    """Batches of fewer rows than a layer's inputs: their activation rows are buffered up to the
    factor's width and added when it is full (several times here) or when the factors are read.
    The factors equal the KFAC formulas; so does a loader that refills ONE batch tensor in place
    (the buffer holds copies), and a second fit(override=False) adds its rows to the first's."""
    torch.manual_seed(5)
    model = mlp(D=12, H=9)
    g = torch.Generator().manual_seed(5)
    sizes = [3, 5, 2, 7, 4, 1, 6, 11, 2]  # (11 > the first batch's 3 when the buffer is capped to it)
    X, y = torch.randn(sum(sizes), 12, generator=g, dtype=DT), torch.randint(0, C, (sum(sizes),), generator=g)
    loader = list(zip(X.split(sizes), y.split(sizes)))
    want = _kfac_dense(model, loader, "ggn", bias_block == "joint")
    la = fit(model, loader, "classification", hessian_structure="kron", bias_block=bias_block)
    torch.testing.assert_close(curvature_part(la), want, rtol=1e-10, atol=1e-12)

    def refilled():  # one tensor, overwritten for every batch
        xb = torch.empty(max(sizes), 12, dtype=DT)
        for xs, ys in loader:
            xb[:len(xs)].copy_(xs)
            yield xb[:len(xs)], ys
    la2 = fit(model, refilled(), "classification", hessian_structure="kron", bias_block=bias_block)
    torch.testing.assert_close(curvature_part(la2), want, rtol=1e-10, atol=1e-12)

    la3 = fit(model, loader[:3], "classification", hessian_structure="kron", bias_block=bias_block)
    la3.fit(loader[3:], override=False, progress=False)
    torch.testing.assert_close(curvature_part(la3), want, rtol=1e-10, atol=1e-12)

    # a buffer capped to the first batch (3 rows): full after every batch, and later batches larger
    monkeypatch.setattr(factors_mod, "_ROW_BUFFER_BYTES", 1)
    la4 = fit(model, loader, "classification", hessian_structure="kron", bias_block=bias_block)
    torch.testing.assert_close(curvature_part(la4), want, rtol=1e-10, atol=1e-12)


def test_kron_is_exact_for_one_example():
    """With one example KFAC of an unshared layer is the exact GGN block (one rank-C term)."""
    torch.manual_seed(4)
    model = mlp()
    X, y = torch.randn(1, 4, dtype=DT), torch.tensor([1])
    la = fit(model, [(X, y)], "classification", hessian_structure="kron")
    H = ref.exact_curvature(model, [(X, y)], "classification")
    sizes = [m.weight.numel() + m.bias.numel() for m in kron_modules(model)]
    mask = torch.block_diag(*[torch.ones(s, s, dtype=DT) for s in sizes])
    torch.testing.assert_close(curvature_part(la), H * mask, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("name", ["conv2d", "seq_linear", "embedding", "groupnorm", "unrolled", "siamese"])
def test_directions_in_chunks_give_the_same_curvature(name, structure, monkeypatch):
    """fit backpropagates the m directions in chunks under _FIT_BYTES: one direction per pass (a
    budget below one direction's gradients) gives the curvature of all m in one pass (G and the
    diagonal / full sums over directions; A and the row counts added once per batch)."""
    from pyfastbayes.laplace import laplace as laplace_mod
    model, loader, lik = make(name)
    whole = fit(model, loader, lik, hessian_structure=structure, unsupported="diag")
    monkeypatch.setattr(laplace_mod, "_FIT_BYTES", 1)
    chunked = fit(model, loader, lik, hessian_structure=structure, unsupported="diag")
    torch.testing.assert_close(chunked.to_dense(), whole.to_dense(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(chunked.log_marginal_likelihood(), whole.log_marginal_likelihood(), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name, patch_bytes", [("seq_linear", None), ("conv1d", None), ("conv2d", None),
                                               ("conv1d", 1), ("conv2d", 1)],
                         ids=["seq_linear", "conv1d", "conv2d", "conv1d-chunked", "conv2d-chunked"])
def test_kron_weight_sharing_is_the_expand_reduce_formula(name, approx, patch_bytes, monkeypatch):
    """Eschenhagen et al. (2023): 'expand' A over the N T positions averaged, G summed over them;
    'reduce' the inputs averaged and the output gradients summed over positions first. 'chunked':
    a convolution's patches built one example at a time (PATCH_BYTES below one example's; a
    Linear has no patches)."""
    if patch_bytes is not None:
        monkeypatch.setattr(layers_mod, "PATCH_BYTES", patch_bytes)
    model, loader, lik = make(name)
    assert all(x.shape[0] > 1 for x, _ in loader)  # several chunks per batch
    la = fit(model, loader, lik, hessian_structure="kron", kfac_approx=approx)
    facs = ref.kfac_factors(model, loader, lik, kron_modules(model), approx)
    pp = la.posterior_precision
    assert len(pp) == len(facs)
    for (bname, L, R, s, d), (G, A) in zip(pp, facs):
        assert float(s) == 1.0 and float(d) == 1.0
        torch.testing.assert_close(L, G, rtol=1e-10, atol=1e-13, msg=f"G of {bname}")
        torch.testing.assert_close(R, A, rtol=1e-10, atol=1e-13, msg=f"A of {bname}")
    if approx == "expand" and name != "seq_linear":
        # shared layers really are approximated: the weight blocks differ from the exact GGN's
        H = exact(name, "ggn")
        n0 = model[0].weight.numel() + model[0].bias.numel()
        assert float((curvature_part(la)[:n0, :n0] - H[:n0, :n0]).abs().max()) > 1e-3


def _embedding_factors(model, loader, lik, tokens=lambda x: x):
    """KFAC-expand of the embedding as a linear layer on one-hot inputs, padding tokens being no
    rows: A = diag(counts of non-padding tokens) / their number, G = sum over them of J^T H J.
    ``tokens``: the embedding's token indices [N, T] in an input batch (all calls, in order)."""
    emb = model.emb
    V, D = emb.weight.shape
    counts, G, n = torch.zeros(V, dtype=DT), torch.zeros(D, D, dtype=DT), 0
    for x, y in loader:
        f, [(_, J)] = ref.output_jacobians(model, x, [emb])  # J [N, C, T, D]
        Hout = ref.output_hessians(f, y, lik)
        x = tokens(x)
        keep = x != emb.padding_idx
        counts += torch.bincount(x[keep], minlength=V).to(DT)
        Jk = J.permute(0, 2, 1, 3)[keep]  # [n_tokens, C, D]
        Hk = Hout[:, None].expand(-1, x.shape[1], -1, -1)[keep]
        G += torch.einsum("kco,kcd,kdp->op", Jk, Hk, Jk)
        n += int(keep.sum())
    return counts / n, G


@pytest.mark.parametrize("name, approx, patch_bytes", [
    ("unrolled", "expand", None), ("unrolled", "reduce", None), ("siamese", "expand", None),
    ("siamese", "expand", 1), ("siamese_conv", "reduce", None), ("siamese_conv", "reduce", 1)])
def test_kron_of_modules_called_several_times_is_the_formula_over_all_calls(name, approx, patch_bytes, monkeypatch):
    """A module called several times per forward: the positions of all its calls share the weight
    ('expand': A averaged over the N x (all calls' positions) rows, G summed over them; 'reduce':
    the inputs averaged and output gradients summed over all of them first; an Embedding's tokens
    of all calls), convolution calls of different sizes too, patches in chunks or not; its
    diagonal blocks (the unrolled LayerNorm) are the exact diagonal of the GGN."""
    if patch_bytes is not None:
        monkeypatch.setattr(layers_mod, "PATCH_BYTES", patch_bytes)
    model, loader, lik = make(name)
    la = fit(model, loader, lik, hessian_structure="kron", kfac_approx=approx, bias_block="separate")
    got = {bname: (L, R) for bname, L, R, _, _ in la.posterior_precision}
    mods = kron_modules(model)
    for (G, A), m in zip(ref.kfac_factors(model, loader, lik, mods, approx, bias=False), mods):
        mname = next(k for k, v in model.named_modules() if v is m)
        torch.testing.assert_close(got[f"{mname}.weight"][0], G, rtol=1e-10, atol=1e-13, msg=f"G of {mname}")
        torch.testing.assert_close(got[f"{mname}.weight"][1], A, rtol=1e-10, atol=1e-13, msg=f"A of {mname}")
        if m.bias is not None:
            torch.testing.assert_close(got[f"{mname}.bias"][0], G, rtol=1e-10, atol=1e-13)
    if name == "siamese":
        L_want, R_want = _embedding_factors(model, loader, lik, tokens=lambda x: x[:, 50:].long())
        torch.testing.assert_close(got["emb.weight"][0], L_want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["emb.weight"][1], R_want, rtol=1e-10, atol=1e-13)
    if name == "unrolled":
        H = exact(name, "ggn").diagonal()
        offsets, o = {}, 0
        for pname, p in model.named_parameters():
            offsets[pname], o = (o, o + p.numel()), o + p.numel()
        norm = torch.cat([got["norm.weight"][0], got["norm.bias"][0]])
        torch.testing.assert_close(norm, H[offsets["norm.weight"][0]:offsets["norm.bias"][1]], rtol=1e-10, atol=1e-13)
        # the cell's calls are T_POS - 1 of its positions: G sums over them (not one call's)
        assert la.n_data == 10 and T_POS > 2


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_discarded_and_no_grad_calls_add_nothing(structure):
    """A call whose output is discarded, or one under torch.no_grad() (a stop-gradient branch, as
    in BYOL / SimSiam), has no curvature: the posterior is that of the same function with the
    call made by a frozen copy of the layer (one call each), for every structure (KFAC's
    activation factor too)."""
    import copy

    class Net(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.mode, self.lin, self.out = mode, nn.Linear(4, 5), nn.Linear(5, 3)
            self.frozen = None

        def forward(self, x):
            z = torch.tanh(self.lin(x))
            if self.mode == "discard":
                (self.frozen or self.lin)(3 * x)  # output unused
                return self.out(z)
            if self.frozen is not None:
                t = torch.tanh(self.frozen(x.flip(0)))
            else:
                with torch.no_grad():
                    t = torch.tanh(self.lin(x.flip(0)))
            return self.out(z * t)

    X, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    for mode in ("discard", "no_grad"):
        torch.manual_seed(2)
        model = Net(mode).to(DT)
        twin = copy.deepcopy(model)
        twin.frozen = copy.deepcopy(twin.lin).requires_grad_(False)
        kw = dict(hessian_structure=structure, kfac_approx="expand")
        got, want = fit(model, [(X, y)], "classification", **kw), fit(twin, [(X, y)], "classification", **kw)
        torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-12, atol=1e-14)
        if structure == "full" and mode == "discard":  # (torch.func's jacrev differentiates through no_grad)
            H = ref.exact_curvature(model, [(X, y)], "classification")
            torch.testing.assert_close(curvature_part(got), H, rtol=1e-10, atol=1e-12)


def test_embedding_on_a_scalar_index_is_refused_clearly():
    """An Embedding called on a 0-dim index (no batch rows) under 'diag' / 'full': the per-example
    error, not a TypeError from the memory budget."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) + self.emb(torch.tensor(1))[:2]

    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    for structure in ("diag", "full"):
        with pytest.raises(ValueError, match="layer 'emb' .* is not called on the batch's examples"):
            fit(Net().to(DT), [(X, y)], "classification", hessian_structure=structure)


def test_calls_on_different_batch_sizes_are_refused():
    """A covered layer called once on the batch and once on a single row (a learned query, a
    constant): per-example Jacobians cannot be added, the error says which layer and how to fix."""

    class Query(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.q = nn.Linear(4, 3), nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            return self.lin(x) * self.lin(self.q)

    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    model = Query().to(DT)
    model.q.requires_grad_(False)
    for structure in ("kron", "diag", "full"):
        with pytest.raises(ValueError, match=r"layer 'lin' \(Linear\) is called on inputs of \[1, 6\] rows"):
            fit(model, [(X, y)], "classification", hessian_structure=structure)


def test_kron_embedding_is_the_one_hot_kfac():
    model, loader, lik = make("embedding")
    la = fit(model, loader, lik, hessian_structure="kron")
    L_want, R_want = _embedding_factors(model, loader, lik)
    name, L, R, _, _ = la.posterior_precision[0]
    assert name == "emb.weight" and L.shape == (7,)
    torch.testing.assert_close(L, L_want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(R, R_want, rtol=1e-10, atol=1e-13)
    assert float(L[0]) == 0.0  # padding_idx
    torch.testing.assert_close(curvature_part(la)[:21, :21], torch.kron(torch.diag(L_want), R_want), rtol=1e-10,
                               atol=1e-13)


def test_kron_embedding_exact_with_padding():
    """One token per example, every non-padding token the same: the exact GGN block of that row is
    sum over its examples of J^T H J, which KFAC reproduces only when padding tokens leave both
    factors (a padding fraction in A's normalisation would shrink it)."""
    torch.manual_seed(0)
    model = EmbeddingNet(V=5, D=3, T=1, out=2).to(DT)
    model.out.requires_grad_(False)
    X = torch.tensor([[2], [0], [2], [0], [2], [2]])
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    loader = [(X[:3], y[:3]), (X[3:], y[3:])]
    la = fit(model, loader, "classification", hessian_structure="kron")
    H = ref.exact_curvature(model, loader, "classification")
    assert float(H.abs().max()) > 0.05
    torch.testing.assert_close(curvature_part(la), H, rtol=1e-10, atol=1e-13)


def test_kron_embedding_reduce_is_refused_clearly():
    model, loader, lik = make("embedding")
    with pytest.raises(ValueError, match=r"layer 'emb'.*kfac_approx='reduce'.*kfac_approx='expand'"):
        fit(model, loader, lik, hessian_structure="kron", kfac_approx="reduce")
    # one token per example: 'reduce' is 'expand'
    torch.manual_seed(0)
    m1 = EmbeddingNet(T=1).to(DT)
    X, y = torch.randint(0, 7, (8, 1)), torch.randint(0, C, (8,))
    a = fit(m1, [(X, y)], "classification", hessian_structure="kron", kfac_approx="reduce")
    b = fit(m1, [(X, y)], "classification", hessian_structure="kron", kfac_approx="expand")
    torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_factors_match_curvlinops(approx, separate):
    """curvlinops' KFACLinearOperator (type-2 Fisher = GGN, loss reduction 'sum') normalises as we
    do (curvlinops/kfac.py: input covariance sum a a^T / (N T) for expand, / N of the averaged
    patches for reduce; gradient covariance sum g g^T, no correction for 'sum'): its factors are
    ours without any rescaling."""
    curvlinops = require("curvlinops", "the KFAC reference (Eschenhagen et al. 2023)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, dilation=2),
                          nn.Flatten(), nn.Linear(16, 3)).to(DT)
    X, y = torch.randn(12, 2, 8, 8, dtype=DT), torch.randint(0, 3, (12,))
    loader = [(X[:5], y[:5]), (X[5:], y[5:])]
    op = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()), loader,
                                       fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=separate,
                                       check_deterministic=False)
    op.compute_kronecker_factors()
    la = fit(model, loader, "classification", hessian_structure="kron", kfac_approx=approx,
             bias_block="separate" if separate else "joint")
    ours = {name: (L, R) for name, L, R, _, _ in la.posterior_precision}
    assert len(op._input_covariances) == 3
    for mod, A in op._input_covariances.items():
        G = op._gradient_covariances[mod]
        L, R = ours[f"{mod}.weight" if separate else f"{mod}.weight+bias"]
        torch.testing.assert_close(L, G, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(R, A, rtol=1e-10, atol=1e-13)
        if separate:
            Lb, Rb = ours[f"{mod}.bias"]
            torch.testing.assert_close(Lb, G, rtol=1e-10, atol=1e-13)
            assert Rb.tolist() == [[1.0]]


# ---- GLM functional variance and links ----------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("name, approx", [("mlp", "expand"), ("conv2d", "expand"), ("conv2d", "reduce"),
                                          ("seq_linear", "reduce"), ("embedding", "expand"),
                                          ("layernorm", "expand"), ("batchnorm", "expand"),
                                          ("unrolled", "reduce"), ("siamese", "expand")])
def test_functional_variance_is_J_inverse_precision_Jt(name, approx, structure):
    """J P^-1 J^T with explicit Jacobians at new inputs; for 'reduce' the TRUE Jacobian (sum over
    positions of g a^T), not the one of the reduced factors."""
    if name == "mlp":
        torch.manual_seed(3)
        model = mlp()
        g = torch.Generator().manual_seed(3)
        X, y = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, C, (10,), generator=g)
        loader, lik = [(X[:6], y[:6]), (X[6:], y[6:])], "classification"
        Xs = torch.randn(5, 4, generator=g, dtype=DT)
    else:
        model, loader, lik = make(name)
        Xs = MODELS[name][1](5, torch.Generator().manual_seed(9))
    la = fit(model, loader, lik, hessian_structure=structure, kfac_approx=approx, prior_precision=0.3)
    f_mu, f_var = la.functional_variance(Xs, batch_size=3)  # two input batches
    J = ref.jacobians(model, Xs)
    want = ref.logits_var(J, torch.linalg.inv(la.to_dense()))
    torch.testing.assert_close(f_mu, ref.outputs(model, Xs))
    torch.testing.assert_close(f_var, want, rtol=1e-9, atol=1e-12)


def _glm_setup(lik="classification", out=C):
    torch.manual_seed(3)
    model = mlp(out=out)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randint(0, max(out, 2), (30,), generator=g)
    if lik == "binary":
        model = nn.Sequential(model, nn.Flatten(0))
        y = y.to(DT)
    la = fit(model, [(X, y)], lik, hessian_structure="kron", prior_precision=0.2)
    Xs = torch.randn(6, 4, generator=g, dtype=DT)
    f = ref.outputs(model, Xs)
    V = ref.logits_var(ref.jacobians(model, Xs), torch.linalg.inv(la.to_dense()))
    return la, Xs, f, V


def test_probit_bridge_and_mc_links():
    la, Xs, f, V = _glm_setup()
    d = torch.diagonal(V, dim1=1, dim2=2)
    assert float(d.min()) > 0.05  # a variance large enough for the links to differ from softmax(f)
    probit = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * d), -1)
    torch.testing.assert_close(la.la(Xs, link_approx="probit"), probit, rtol=1e-10, atol=1e-12)
    assert float((probit - torch.softmax(f, -1)).abs().max()) > 1e-3
    torch.testing.assert_close(la.la(Xs, link_approx="bridge"), ref.bridge(f, V), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.la(Xs, link_approx="bridge_norm"), ref.bridge(f, V, normalise=True), rtol=1e-9,
                               atol=1e-12)
    assert float((ref.bridge(f, V, normalise=True) - ref.bridge(f, V)).abs().max()) > 1e-3
    n = 20000
    mc = la.la(Xs, link_approx="mc", n_samples=n, generator=torch.Generator().manual_seed(0))
    # E softmax(f + L z) by brute force with independent draws; each MC mean has a standard
    # deviation <= 0.5 / sqrt(n) (a probability's spread is at most 1/2): 6 of them for both
    z = torch.randn(n, *f.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    brute = torch.softmax(f + torch.einsum("nij,snj->sni", torch.linalg.cholesky(V), z), -1).mean(0)
    assert float((mc - brute).abs().max()) <= 2 * 6 * 0.5 / math.sqrt(n)
    assert mc.shape == (6, C) and torch.allclose(mc.sum(1), torch.ones(6, dtype=DT))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bridge_stays_a_distribution_where_the_variances_vanish(dtype):
    """The bridge's corrected variances f_var_kk - row_k^2 / total cancel: near the MAP (variances
    ~1e-9 in float32) they came out <= 0 and gave negative or NaN probabilities, and all-zero
    f_var rows gave K ones (nan_to_num). Now: probabilities in [0, 1] summing to 1, equal to the
    formula wherever the variances are resolved, and large logits do not overflow."""
    from pyfastbayes.laplace.predictive import probabilities

    g = torch.Generator().manual_seed(0)
    N, C = 64, 5
    f = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).to(dtype)
    J = torch.randn(N, C, 3, generator=g, dtype=torch.float64)
    V = (1e-9 * J @ J.mT).to(dtype)   # rank 3 of 5, tiny
    V[:4] = 0                         # no variance at all
    f[4:8] *= 60                      # logit ranges beyond float32's exp
    for link in ("bridge", "bridge_norm"):
        p = probabilities(f, V, "classification", link, 1)
        assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        torch.testing.assert_close(p.sum(1), torch.ones(N, dtype=dtype))
    # resolved variances (float64, well above rounding): the formula exactly
    Vb = torch.randn(N, C, C, generator=g, dtype=torch.float64)
    Vb = Vb @ Vb.mT + torch.eye(C, dtype=torch.float64)
    fb = torch.randn(N, C, generator=g, dtype=torch.float64)
    torch.testing.assert_close(probabilities(fb, Vb, "classification", "bridge", 1), ref.bridge(fb, Vb),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(probabilities(fb, Vb, "classification", "bridge_norm", 1),
                               ref.bridge(fb, Vb, normalise=True), rtol=1e-12, atol=1e-14)


def test_binary_links_return_one_probability_per_row():
    la, Xs, f, V = _glm_setup("binary", out=1)
    assert V.shape == (6, 1, 1)
    p = la.la(Xs, link_approx="probit")
    assert p.shape == (6,)
    torch.testing.assert_close(p, torch.sigmoid(f[:, 0] / torch.sqrt(1 + math.pi / 8 * V[:, 0, 0])), rtol=1e-10,
                               atol=1e-12)
    n = 20000
    mc = la.la(Xs, link_approx="mc", n_samples=n, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    brute = torch.sigmoid(f[:, 0] + V[:, 0, 0].sqrt() * z).mean(0)
    assert mc.shape == (6,) and float((mc - brute).abs().max()) <= 2 * 6 * 0.5 / math.sqrt(n)
    with pytest.raises(ValueError, match="bridge"):
        la.la(Xs, link_approx="bridge")
    pred = la.predict(Xs)
    torch.testing.assert_close(pred, p)


def test_kron_cnn_draws_have_the_posterior_covariance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).to(DT)
    X, y = torch.randn(20, 1, 3, 3, dtype=DT), torch.randint(0, 2, (20,))
    la = fit(model, [(X, y)], "classification", hessian_structure="kron", prior_precision=0.5)
    n = 40000
    draws = la.sample(n, generator=torch.Generator().manual_seed(2))
    cov = torch.linalg.inv(la.to_dense())
    assert draws.shape == (n, 28)
    # the mean of n draws has standard error sqrt(S_ii / n); a sample covariance entry
    # sqrt((S_ii S_jj + S_ij^2) / n): 6 standard errors each (784 entries: a false alarm
    # has probability ~ 784 * 2e-9)
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((draws.mean(0) - la.mean).abs() <= 6 * se_mean).all()
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2) / n).sqrt()
    assert ((torch.cov(draws.T) - cov).abs() <= 6 * se).all()
    # the draws see the off-diagonal structure (the Kronecker blocks are not diagonal)
    off = cov - torch.diag(cov.diagonal())
    assert float(off.abs().max()) > 10 * float(se.max())


def test_full_structure_in_row_chunks(monkeypatch):
    """The full structure builds per-example Jacobian rows in chunks (and the functional variance
    too): one example per chunk gives the same matrix and variances as one chunk."""
    from pyfastbayes.laplace import factors, precision
    model, loader, lik = make("conv2d")
    Xs = MODELS["conv2d"][1](5, torch.Generator().manual_seed(9))
    whole = fit(model, loader, lik, hessian_structure="full")
    whole_var = whole.functional_variance(Xs)[1]
    monkeypatch.setattr(factors, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(precision, "_CHUNK_ELEMENTS", 1)
    chunked = fit(model, loader, lik, hessian_structure="full")
    torch.testing.assert_close(chunked.to_dense(), whole.to_dense(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(chunked.functional_variance(Xs)[1], whole_var, rtol=1e-12, atol=1e-14)


# ---- the batched backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(3, 4, 3),
    lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),            # drops an input row and column (output_padding 1)
    lambda: nn.Conv2d(3, 4, (2, 3), stride=(3, 2), padding=(1, 0), dilation=(2, 1)),
    lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2, bias=False),
    lambda: nn.Conv1d(3, 4, 2, stride=3, padding=1, dilation=2),
    lambda: nn.Conv1d(3, 4, 5, padding="valid"),
])
def test_conv_input_gradient_is_the_transposed_convolution(conv):
    """_Conv.input_grad (the backward of the node convolutions hand on) equals autograd's input
    gradient of the convolution, for strides that drop input rows, dilation and 'same' padding."""
    torch.manual_seed(0)
    m = conv().to(DT)
    x = torch.randn(2, 3, *((9, 8) if isinstance(m, nn.Conv2d) else (13,)), dtype=DT, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    want, = torch.autograd.grad(out, x, g)
    layer = next(layer for layer in Laplace(nn.Sequential(m), "regression").layers if layer.module is m)
    torch.testing.assert_close(layer.input_grad(g, tuple(x.shape[2:])), want, rtol=1e-12, atol=1e-12)


class HostTanh(torch.autograd.Function):
    """tanh whose backward reads a host value (.item()): torch.func.vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if not bool(torch.isfinite(g).all()):  # a host check on the incoming gradient
            raise FloatingPointError("non-finite gradient")
        return g * (1 - y * y)


class HostTanhNet(nn.Module):
    def __init__(self, host: bool):
        super().__init__()
        self.host = host
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)

    def forward(self, x):
        h = self.a(x)
        return self.b(HostTanh.apply(h) if self.host else torch.tanh(h))


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_backward_without_vmap_support_loops_over_directions(structure, chunked, monkeypatch):
    """An operation vmap cannot batch in the model's backward: the directions are taken one at a
    time, with the same curvature as the model written with torch.tanh. 'chunked': the directions
    also split into passes (_FIT_BYTES): the loop of one pass must keep the graph for the next
    (it freed it after its last direction: "backward through the graph a second time")."""
    if chunked:
        from pyfastbayes.laplace import laplace as laplace_mod
        monkeypatch.setattr(laplace_mod, "_FIT_BYTES", 1)
    torch.manual_seed(0)
    X, y = torch.randn(9, 4, dtype=DT), torch.randint(0, C, (9,))
    host = HostTanhNet(True).to(DT)
    plain = HostTanhNet(False).to(DT)
    plain.load_state_dict(host.state_dict())
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    got = fit(host, [(X, y)], "classification", hessian_structure=structure)
    assert len(calls) > 2  # the batched call failed: one call per direction followed
    calls.clear()
    want = fit(plain, [(X, y)], "classification", hessian_structure=structure)
    assert len(calls) == (C - 1 if chunked else 1)
    assert float(curvature_part(want).abs().max()) > 0.1
    torch.testing.assert_close(curvature_part(got), curvature_part(want), rtol=1e-12, atol=1e-12)
    if structure == "full":
        torch.testing.assert_close(curvature_part(got), ref.exact_curvature(plain, [(X, y)], "classification"),
                                   rtol=1e-10, atol=1e-12)


# ---- log det with a compact prior ---------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("name", ["conv2d", "layernorm", "custom"])
def test_logdet_of_a_scalar_or_per_block_prior_is_the_dense_one(name, structure):
    """precision.logdet takes the prior as [] or [n_blocks] (the tuning's shapes, no [P] vector per
    step): value and gradient equal log det of to_dense() and its derivative sum_{i in block}
    (P^-1)_ii, with Kronecker and diagonal blocks side by side."""
    model, loader, lik = make(name)
    la = fit(model, loader, lik, hessian_structure=structure, unsupported="diag" if name == "custom" else "error")
    precision, s = la._need_fit()[5], la._scale()
    n_blocks = len(la.blocks)
    # equal per-block values too: 'full' gave the whole gradient to block 0 there (the optimiser's start)
    for prior in (torch.tensor(0.7, dtype=DT), torch.rand(n_blocks, dtype=DT, generator=torch.Generator().manual_seed(3)) + 0.3,
                  torch.full((n_blocks,), 0.7, dtype=DT)):
        prior = prior.clone().requires_grad_(True)
        got = precision.logdet(s, prior)
        (grad,) = torch.autograd.grad(got, prior)
        la.prior_precision = prior.detach()
        dense = la.to_dense()
        torch.testing.assert_close(got.detach(), torch.linalg.slogdet(dense)[1], rtol=1e-12, atol=1e-10)
        inv_diag = torch.linalg.inv(dense).diagonal()
        want = torch.stack([inv_diag[b.sel.reshape(-1)].sum() for b in la.blocks])
        torch.testing.assert_close(grad, want.sum() if prior.dim() == 0 else want, rtol=1e-10, atol=1e-12)
        # the [P] vector gives the same
        torch.testing.assert_close(precision.logdet(s, la._delta(prior.detach())), got.detach(), rtol=1e-13, atol=1e-12)


def test_fp32_per_block_prior_gradient_is_accurate():
    """A float32 Laplace's log det gradient per block (thousands of entries each) equals the float64
    one to 1e-6: the sums behind it are accumulated in float64 (one after another in float32, the
    tuned layerwise priors moved by 1e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 10))
    X, y = torch.randn(200, 64), torch.randint(0, 10, (200,))
    grads = {}
    for dt in (torch.float32, torch.float64):
        la = fit(model.to(dt), [(X.to(dt), y)], "classification", hessian_structure="kron", bias_block="separate")
        prior = torch.linspace(0.5, 3.0, len(la.blocks), dtype=dt, requires_grad=True)
        (grads[dt],) = torch.autograd.grad(la._need_fit()[5].logdet(la._scale(), prior), prior)
    assert max(b.numel for b in la.blocks) > 6000
    torch.testing.assert_close(grads[torch.float32].double(), grads[torch.float64], rtol=1e-6, atol=0)


class _WatchHidden(nn.Module):
    """Records a weak reference to a hidden tensor only the autograd graph keeps (exp saves its
    output), and at every forward whether the previous call's one is still alive."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 40), nn.Linear(40, C)
        self.refs, self.alive = [], []

    def forward(self, x):
        import weakref

        self.alive += [r() is not None for r in self.refs]
        big = torch.exp(torch.tanh(self.a(x)))
        self.refs = [weakref.ref(big)]
        return self.b(big)


@pytest.mark.parametrize("call", ["fit", "glm"])
def test_a_batch_graph_is_freed_before_the_next_forward(call):
    """The batched backward retains the graph (for its per-direction fallback); fit and the GLM
    predictive drop it before the next batch's forward, so peak memory is one batch's graph."""
    torch.manual_seed(0)
    model = _WatchHidden().to(DT)
    X, y = torch.randn(30, 5, dtype=DT), torch.randint(0, C, (30,))
    la = fit(model, [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:], y[20:])], "classification")
    if call == "glm":
        model.alive.clear()
        la(X, pred_type="glm", batch_size=10)
    assert model.alive and not any(model.alive)


def test_weight_parametrized_conv():
    """A conv whose weight a parametrization computes (weight_norm) keeps its own graph (the
    transposed-convolution node would cut the parametrization off); the parametrization itself,
    called once per forward and not per example, is refused clearly under unsupported='diag', and
    with it frozen the curvature is the exact one."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), weight_norm(nn.Conv2d(3, 4, 3, stride=2)), nn.Flatten(),
                          nn.Linear(16, C)).to(DT)
    X, y = torch.randn(8, 2, 8, 8, dtype=DT), torch.randint(0, C, (8,))
    with pytest.raises(ValueError, match=r"layer '2.parametrizations.weight' \(ParametrizationList\) is not called "
                                         r"on the batch's examples"):
        fit(model, [(X, y)], "classification", hessian_structure="full", unsupported="diag")
    for p in model[2].parametrizations.parameters():
        p.requires_grad_(False)
    la = fit(model, [(X, y)], "classification", hessian_structure="full")
    torch.testing.assert_close(curvature_part(la), ref.exact_curvature(model, [(X, y)], "classification"),
                               rtol=1e-10, atol=1e-12)


class _TiedLinear(nn.Module):
    """A Linear weight read again by the parent's forward (F.linear): that use's curvature is in no
    block (the 'full' posterior was 0.33 off the exact GGN, entries up to 2.4)."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.o(torch.tanh(nn.functional.linear(torch.tanh(self.l(x)), self.l.weight)))


class _TiedEmbedding(nn.Module):
    """GPT-style tying: the output projection is the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix = nn.Embedding(5, 4), nn.Linear(4, 4)

    def forward(self, idx):
        return nn.functional.linear(torch.tanh(self.mix(self.emb(idx))), self.emb.weight)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("make", [_TiedLinear, _TiedEmbedding], ids=["linear", "embedding"])
def test_a_parameter_used_outside_its_module_is_refused(make, structure):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randint(0, 5, (8,)) if make is _TiedEmbedding else torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 5 if make is _TiedEmbedding else 2, (8,))
    name = "emb.weight" if make is _TiedEmbedding else "l.weight"
    with pytest.raises(ValueError, match=rf"uses parameter\(s\) \['{name}'\] outside their own module's call"):
        Laplace(model, "classification", hessian_structure=structure).fit([(x, y)], progress=False)
    # frozen, the tied parameter is no longer covered: the rest fits
    getattr(model, name.split(".")[0]).weight.requires_grad_(False)
    Laplace(model, "classification", hessian_structure=structure).fit([(x, y)], progress=False)


def test_uses_inside_nested_modules_are_their_own():
    # a covered layer called inside another module's forward (nn.Sequential, a block) is inside its
    # own call: no refusal
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    la = Laplace(model, "classification", hessian_structure="kron").fit([(x, y)], progress=False)
    assert la.n_params == 3 * 4 + 4 + 4 * 2 + 2


class _MetadataReads(nn.Module):
    """Reads of a covered parameter's dtype, shape, device and size outside its module: metadata,
    not values (x.to(p.dtype), the Hugging Face self.device idiom); these fit as before."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = x.to(dtype=self.a.weight.dtype, device=next(self.parameters()).device)
        assert x.shape[-1] == self.a.weight.shape[1] and self.a.weight.size(0) == 8 and self.a.weight.requires_grad
        return self.b(torch.relu(self.a(x)))


def test_metadata_reads_and_pre_hook_weights_are_not_outside_uses():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    Laplace(_MetadataReads(), "classification", hessian_structure="kron").fit([(x, y)], progress=False)
    # old-style weight_norm computes the weight in its own forward pre-hook, registered before the probe's
    from torch.nn.utils import weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch deprecates the old weight_norm)
        model = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    Laplace(model, "classification", hessian_structure="diag").fit([(x, y)], progress=False)


@pytest.mark.parametrize("name", ["embedding", "conv2d", "batchnorm"])
def test_marginal_variances_of_every_block_kind(name):
    """posterior_variance (diag(P^-1) from the eigenbases) on blocks with a diagonal left factor
    (Embedding), shared-weight Kronecker blocks and diagonal blocks (BatchNorm) equals the dense
    inverse's diagonal; log det P equals slogdet."""
    model, loader, lik = make(name)
    la = fit(model, loader, lik, hessian_structure="kron", prior_precision=0.3)
    P = la.to_dense()
    torch.testing.assert_close(la.posterior_variance, torch.linalg.inv(P).diagonal(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(la.log_det_posterior_precision, torch.linalg.slogdet(P)[1], rtol=1e-12, atol=1e-12)


def test_diag_and_full_budget_count_the_jacobian_parts_of_shared_weights(monkeypatch):
    """For 'diag' / 'full' a convolution's per-example Jacobian [N, out, C k + 1] per direction is
    built from its output gradients: fit's chunk of directions counts it (before: the output
    gradients only, so a chunk could build parts 18x the budget)."""
    from pyfastbayes.laplace import laplace as laplace_mod
    torch.manual_seed(0)
    N, Cin, H = 16, 3, 4
    model = nn.Sequential(nn.Conv2d(Cin, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * H * H, C)).to(DT)
    X, y = torch.randn(N, Cin, H, H, dtype=DT), torch.randint(0, C, (N,))
    outputs = N * 8 * H * H + N * C  # the two layers' outputs per direction
    jac = N * (8 * Cin * 9 + 8)  # the conv's shared-weight Jacobian per direction (the Linear's is factored)
    per = 8 * (2 * outputs + jac)
    seen = []
    real = laplace_mod.backprop
    monkeypatch.setattr(laplace_mod, "backprop", lambda f, layers, R, **k: seen.append(R.shape[0]) or real(f, layers, R, **k))
    monkeypatch.setattr(laplace_mod, "_FIT_BYTES", 2 * per - 1)  # room for one direction, not two
    whole = fit(model, [(X, y)], "classification", hessian_structure="diag")
    assert max(seen) == 1 and sum(seen) == C - 1
    seen.clear()
    monkeypatch.setattr(laplace_mod, "_FIT_BYTES", 2 * per)
    fit(model, [(X, y)], "classification", hessian_structure="diag")
    assert max(seen) == 2
    seen.clear()
    fit(model, [(X, y)], "classification", hessian_structure="kron")  # kron builds no Jacobian parts
    assert max(seen) >= 2
    monkeypatch.setattr(laplace_mod, "_FIT_BYTES", 1 << 40)
    torch.testing.assert_close(fit(model, [(X, y)], "classification", hessian_structure="diag").to_dense(),
                               whole.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bridge_of_a_singular_f_var_is_the_limit_of_a_regularised_one(dtype):
    """One output varies (a subnetwork of one last-layer weight): the corrected variances are exactly
    0 and per-class floors decided the answer by their ratio (a plausible class got 1e-293). Now the
    bridge is continuous there: f_var + c I for c -> 0 gives it."""
    from pyfastbayes.laplace.predictive import probabilities

    f = torch.tensor([[1.8943, -1.2722, 1.0371]], dtype=torch.float64)
    V = torch.zeros(1, 3, 3, dtype=torch.float64)
    V[0, 2, 2] = 0.2649
    want = probabilities(f, V + 1e-9 * torch.eye(3, dtype=torch.float64), "classification", "bridge", 1)
    got = probabilities(f.to(dtype), V.to(dtype), "classification", "bridge", 1)
    assert got.min().item() > 0.05
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0.005)
