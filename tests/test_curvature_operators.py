"""The model curvature operators (pyfastbayes.curvature.hessian / ggn / fisher) against dense
matrices built independently with torch.autograd.functional (Hessian, Jacobians) and per-example
gradient loops, against curvlinops, over batches, parameter subsets, modes, processes and bad
input."""
from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pyfastbayes import curvature as cv
from pyfastbayes import ops
from pyfastbayes.nn import ParamLayout

from _helpers import exit_without_teardown, needs_cuda, require

LOSSES = {"ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss, "mse": nn.MSELoss}


# ---- problems -----------------------------------------------------------------------------------
def mlp(d=4, h=6, c=3):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))


class SmallCNN(nn.Module):
    """Conv(1->3, 3x3) - tanh - Conv(3->4, 3x3, stride 2) - softplus - Linear: P = 30 + 112 + 4 * 4 * 3 + 3 = 193."""

    def __init__(self, c=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(16, c)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = F.softplus(self.conv2(x))
        return self.fc(x.flatten(1))


def problem(arch="mlp", loss="ce", n=9, c=3, dtype=torch.float64, seed=0):
    """(model, loss_fn, x, y) with a deterministic model and data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = (mlp(c=c) if arch == "mlp" else SmallCNN(c=c)).to(dtype)
    x = torch.randn(n, 4, generator=g, dtype=dtype) if arch == "mlp" else torch.randn(n, 1, 7, 7, generator=g, dtype=dtype)
    if loss == "ce":
        y = torch.randint(0, c, (n,), generator=g)
    elif loss == "bce":
        y = torch.randint(0, 2, (n, c), generator=g).to(dtype)
    else:
        y = torch.randn(n, c, generator=g, dtype=dtype)
    return model, LOSSES[loss](), x, y


def flat_fn(model, fn):
    """theta [P] -> fn(model outputs for theta) via functional_call (the oracle's parametrisation)."""
    layout = ParamLayout(model)
    theta = layout.flatten().detach()
    return theta, lambda t: fn(lambda x: functional_call(model, layout.unflatten(t), (x,)))


def dense_hessian(model, loss_fn, x, y):
    theta, f = flat_fn(model, lambda net: loss_fn(net(x), y))
    return torch.autograd.functional.hessian(f, theta, vectorize=True)


def output_hessians(loss, out):
    """Per-example Hessians of l_n w.r.t. the outputs [N, C, C] and the mean-reduction factor c."""
    N, C = out.shape
    if loss == "ce":
        p = torch.softmax(out, 1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :], 1.0 / N
    if loss == "bce":
        s = torch.sigmoid(out)
        return torch.diag_embed(s * (1 - s)), 1.0 / (N * C)
    return 2 * torch.eye(C, dtype=out.dtype).expand(N, C, C), 1.0 / (N * C)


def dense_ggn(model, loss, x):
    """c sum_n J_n^T H_n J_n with J from torch.autograd.functional.jacobian."""
    theta, f = flat_fn(model, lambda net: net(x))
    J = torch.autograd.functional.jacobian(f, theta, vectorize=True)  # [N, C, P]
    H, c = output_hessians(loss, model(x).detach())
    return c * torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def per_example_loss(loss, out, y):
    """l_n: cross-entropy of the row; BCE / MSE summed over the example's outputs."""
    if loss == "ce":
        return F.cross_entropy(out, y, reduction="sum")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(out, y, reduction="sum")
    return ((out - y) ** 2).sum()


def dense_ef(model, loss, x, y):
    """c sum_n g_n g_n^T with g_n = grad_theta l_n, one autograd call per example."""
    layout = ParamLayout(model)
    theta = layout.flatten().detach()
    N, C = model(x).reshape(len(x), -1).shape
    G = torch.stack([torch.autograd.functional.jacobian(
        lambda t: per_example_loss(loss, functional_call(model, layout.unflatten(t), (x[i:i + 1],)), y[i:i + 1]), theta)
        for i in range(N)])
    c = 1.0 / N if loss == "ce" else 1.0 / (N * C)
    return c * G.t() @ G


@functools.lru_cache(maxsize=None)
def reference(which, arch, loss, n=9):
    """The dense fp64 oracle of ``problem(arch, loss, n)``, computed once per session."""
    model, loss_fn, x, y = problem(arch, loss, n=n)
    if which == "hessian":
        return dense_hessian(model, loss_fn, x, y)
    return dense_ggn(model, loss, x) if which == "ggn" else dense_ef(model, loss, x, y)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def block(P, k, dtype=torch.float64, seed=1):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- against dense matrices (fp64) -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_hessian_matches_autograd(arch, loss):
    model, loss_fn, x, y = problem(arch, loss)
    H = reference("hessian", arch, loss)
    op = cv.hessian(model, loss_fn, (x, y))
    assert op.shape == H.shape and op.dtype == torch.float64 and op.device == x.device
    V = block(op.shape[0], 5)
    assert rel(op @ V, H @ V) <= 1e-8
    assert rel(op @ V[:, 2], H @ V[:, 2]) <= 1e-8
    # MSELoss: F.mse_loss's forward-over-reverse fails in PyTorch (#123996), the operator falls back
    if loss != "mse":
        assert op.hvp_mode == "forward-over-reverse"


def test_hessian_any_scalar_loss():
    """The Hessian takes any mean-reduced scalar loss, e.g. a smooth L1 plus a weight on the outputs."""
    model, _, x, y = problem("mlp", "mse")

    def loss_fn(out, t):
        return F.smooth_l1_loss(out, t) + 0.1 * out.pow(2).mean()
    H = dense_hessian(model, loss_fn, x, y)
    V = block(H.shape[0], 3)
    assert rel(cv.hessian(model, loss_fn, (x, y)) @ V, H @ V) <= 1e-8


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_ggn_matches_jacobians(arch, loss):
    model, loss_fn, x, y = problem(arch, loss)
    G = reference("ggn", arch, loss)
    op = cv.ggn(model, loss_fn, (x, y))
    V = block(op.shape[0], 4)
    assert rel(op @ V, G @ V) <= 1e-8


def test_ggn_uses_ops_loss_hessian(monkeypatch):
    calls = []
    real = ops.loss_hessian

    def spy(kind, outputs, V, mode="hessian", **kw):
        calls.append((kind, tuple(outputs.shape), tuple(V.shape), mode))
        return real(kind, outputs, V, mode, **kw)
    monkeypatch.setattr(ops, "loss_hessian", spy)
    model, loss_fn, x, y = problem("mlp", "ce")
    cv.ggn(model, loss_fn, (x, y)) @ block(ParamLayout(model).numel, 3)
    assert calls == [("cross_entropy", (9, 3), (9, 3, 3), "hessian")]  # one call per batch for all k


def test_ggn_functional_losses_and_1d_outputs():
    """F.cross_entropy / F.mse_loss are recognised like the modules; MSE on [N] outputs and [N]
    targets (C = 1) is the same as on [N, 1]."""
    model, loss_fn, x, y = problem("mlp", "ce")
    V = block(ParamLayout(model).numel, 2)
    assert torch.equal(cv.ggn(model, F.cross_entropy, (x, y)) @ V, cv.ggn(model, loss_fn, (x, y)) @ V)
    model1, _, x1, y1 = problem("mlp", "mse", c=1)
    squeeze = nn.Sequential(model1, nn.Flatten(0))
    op1 = cv.ggn(squeeze, F.mse_loss, (x1, y1[:, 0]))
    V1 = block(op1.shape[0], 2)
    assert rel(op1 @ V1, dense_ggn(model1, "mse", x1) @ V1) <= 1e-8


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_empirical_fisher_matches_outer_products(arch, loss):
    model, loss_fn, x, y = problem(arch, loss)
    E = reference("ef", arch, loss)
    op = cv.fisher(model, loss_fn, (x, y), kind="empirical")
    V = block(op.shape[0], 4)
    assert rel(op @ V, E @ V) <= 1e-8


def test_empirical_fisher_one_output_is_mean_of_gradient_outer_products():
    """With one output per example the EF is literally mean_n g_n g_n^T of the per-example losses'
    gradients (torch.func.vmap(grad)), whatever the loss."""
    model, loss_fn, x, y = problem("mlp", "bce", c=1)
    layout = ParamLayout(model)
    theta = layout.flatten().detach()

    def loss_one(t, xi, yi):
        return loss_fn(functional_call(model, layout.unflatten(t), (xi[None],)), yi[None])
    G = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(theta, x, y)  # [N, P]
    V = block(layout.numel, 3)
    assert rel(cv.fisher(model, loss_fn, (x, y), kind="empirical") @ V, G.t() @ (G @ V) / len(x)) <= 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_mc_fisher_is_unbiased(loss):
    """The mean of T = 300 one-sample MC Fishers (one seed each) approaches the GGN: every entry
    within 5 standard errors (the empirical std over seeds / sqrt(T)) plus 1e-12. A wrong scale or
    a wrong sampling distribution moves the mean by O(|GGN|), far outside (checked: x1.5 fails)."""
    model, loss_fn, x, y = problem("mlp", loss, n=6, c=3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()  # P = 27
    G = dense_ggn(model, loss, x)
    T = 300
    draws = torch.stack([cv.fisher(model, loss_fn, (x, y), generator=torch.Generator().manual_seed(s)).to_dense()
                         for s in range(T)])
    mean, se = draws.mean(0), draws.std(0) / T ** 0.5
    assert ((mean - G).abs() <= 5 * se + 1e-12).all()
    assert not ((1.5 * mean - G).abs() <= 5 * se + 1e-12).all()
    assert rel(mean, G) < 0.2


@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_mc_fisher_is_reproducible(loss):
    model, loss_fn, x, y = problem("mlp", loss)
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    op = cv.fisher(model, loss_fn, (x, y), mc_samples=3, generator=g)
    V = block(op.shape[0], 4)
    A = op @ V
    assert torch.equal(g.get_state(), before)  # the caller's generator is not advanced
    assert torch.equal(op @ V, A)  # every product applies the same draw
    assert torch.equal(cv.fisher(model, loss_fn, (x, y), mc_samples=3, generator=torch.Generator().manual_seed(5)) @ V, A)
    assert not torch.allclose(cv.fisher(model, loss_fn, (x, y), mc_samples=3,
                                        generator=torch.Generator().manual_seed(6)) @ V, A)
    torch.manual_seed(3)  # generator=None: seeded from torch's global RNG
    B = cv.fisher(model, loss_fn, (x, y)) @ V
    torch.manual_seed(3)
    assert torch.equal(cv.fisher(model, loss_fn, (x, y)) @ V, B)


def test_mc_fisher_refuses_a_shuffling_loader():
    model, loss_fn, x, y = problem("mlp", "ce")
    ds = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ValueError, match="same batches in the same order"):
        cv.fisher(model, loss_fn, torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True))
    # other random orders were taken, and every product applied another matrix
    u = torch.utils.data
    for loader in (u.DataLoader(ds, batch_size=3, sampler=u.SubsetRandomSampler(range(len(ds)))),
                   u.DataLoader(ds, batch_sampler=u.BatchSampler(u.RandomSampler(ds), 3, False)),
                   u.DataLoader(ds, batch_size=3, sampler=u.WeightedRandomSampler(torch.ones(len(ds)), len(ds)))):
        with pytest.raises(ValueError, match="same batches in the same order"):
            cv.fisher(model, loss_fn, loader)
    cv.fisher(model, loss_fn, u.DataLoader(ds, batch_size=3, sampler=u.SequentialSampler(ds)))
    # a DistributedSampler's order is its seed and epoch's: the same at every product, taken
    from torch.utils.data.distributed import DistributedSampler

    F = cv.fisher(model, loss_fn, u.DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, num_replicas=1, rank=0)),
                  generator=torch.Generator().manual_seed(0))
    v = block(F.shape[0], 1)
    torch.testing.assert_close(F @ v, F @ v, rtol=0, atol=0)
    cv.fisher(model, loss_fn, torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True), kind="empirical")


def test_mc_fisher_many_samples_is_the_mean_of_their_outer_products():
    """mc_samples = S: the exact matrix c sum_n J_n^T (1/S sum_s r r^T) J_n for the r drawn with the
    same generator in the same order (multinomial of softmax, one call per batch)."""
    model, loss_fn, x, y = problem("mlp", "ce")
    S = 4
    op = cv.fisher(model, loss_fn, (x, y), mc_samples=S, generator=torch.Generator().manual_seed(9))
    out = model(x).detach()
    p = torch.softmax(out, 1)
    draws = torch.multinomial(p, S, replacement=True, generator=torch.Generator().manual_seed(9))  # [N, S]
    r = p[None] - F.one_hot(draws.t(), 3).double()  # [S, N, C]
    theta, f = flat_fn(model, lambda net: net(x))
    J = torch.autograd.functional.jacobian(f, theta)
    M = torch.einsum("snc,snd->ncd", r, r) / S
    dense = torch.einsum("ncp,ncd,ndq->pq", J, M, J) / len(x)
    V = block(op.shape[0], 3)
    assert rel(op @ V, dense @ V) <= 1e-8


# ---- precision, batches, subsets, diagonal ---------------------------------------------------------------
@pytest.mark.parametrize("which", ["hessian", "ggn", "ef"])
def test_float32(which):
    _, loss_fn, x, y = problem("cnn", "ce")
    ref = reference(which, "cnn", "ce")
    m32 = problem("cnn", "ce", dtype=torch.float32)[0]
    make = {"hessian": cv.hessian, "ggn": cv.ggn, "ef": lambda *a: cv.fisher(*a, kind="empirical")}[which]
    op = make(m32, loss_fn, (x.float(), y))
    assert op.dtype == torch.float32
    V = block(op.shape[0], 3)
    assert rel((op @ V.float()).double(), ref @ V) <= 1e-4


MAKERS = {"hessian": cv.hessian, "ggn": cv.ggn, "ef": lambda *a, **k: cv.fisher(*a, kind="empirical", **k)}


@pytest.mark.parametrize("which", list(MAKERS))
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_batches_equal_one_concatenated_batch(which, loss):
    """Batches of 4, 1, 0 and 6 rows (weights N_b / N), as a list and as a DataLoader, give the
    operator of the single batch of all 11 rows."""
    model, loss_fn, x, y = problem("mlp", loss, n=11)
    V = block(ParamLayout(model).numel, 3)
    whole = MAKERS[which](model, loss_fn, (x, y)) @ V
    cuts = [(0, 4), (4, 5), (5, 5), (5, 11)]
    parts = MAKERS[which](model, loss_fn, [(x[a:b], y[a:b]) for a, b in cuts]) @ V
    assert rel(parts, whole) <= 1e-12
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert rel(MAKERS[which](model, loss_fn, loader) @ V, whole) <= 1e-12


@pytest.mark.parametrize("which", list(MAKERS) + ["mc"])
def test_params_subset_is_the_sub_block(which):
    model, loss_fn, x, y = problem("cnn", "ce")
    make = MAKERS.get(which) or (lambda *a, **k: cv.fisher(*a, generator=torch.Generator().manual_seed(2), **k))
    full = make(model, loss_fn, (x, y)).to_dense()
    layout = ParamLayout(model)
    names = ["fc.bias", "conv1.weight", "fc.weight"]  # any order in, model order out
    idx = torch.cat([torch.arange(o, o + s.numel()) for n, o, s in
                     zip(layout.names, layout.offsets, model.parameters()) if n in names])
    sub = make(model, loss_fn, (x, y), params=names)
    assert sub.shape == (len(idx), len(idx))
    assert sub.sel.names == ("conv1.weight", "fc.weight", "fc.bias")
    assert rel(sub.to_dense(), full[idx][:, idx]) <= 1e-12
    by_object = make(model, loss_fn, (x, y), params=[model.fc.weight, model.conv1.weight, model.fc.bias])
    assert torch.equal(by_object.to_dense(), sub.to_dense())


def test_frozen_parameters_are_left_out():
    model, loss_fn, x, y = problem("mlp", "ce")
    full = cv.ggn(model, loss_fn, (x, y)).to_dense()
    model[0].weight.requires_grad_(False)
    op = cv.ggn(model, loss_fn, (x, y))
    n0 = model[0].weight.numel()
    assert op.shape[0] == full.shape[0] - n0
    assert rel(op.to_dense(), full[n0:, n0:]) <= 1e-12


@pytest.mark.parametrize("which", list(MAKERS))
def test_diagonal_exact_is_the_dense_diagonal(which):
    model, loss_fn, x, y = problem("cnn", "bce")
    op = MAKERS[which](model, loss_fn, (x, y))
    assert rel(op.diagonal(block=50), op.to_dense().diagonal()) <= 1e-12
    assert rel(op.diagonal(), reference(which, "cnn", "bce").diagonal()) <= 1e-8


def test_weights_are_read_at_product_time():
    model, loss_fn, x, y = problem("mlp", "ce")
    op = cv.ggn(model, loss_fn, (x, y))
    with torch.no_grad():
        model[2].weight.mul_(2)
    V = block(op.shape[0], 2)
    assert rel(op @ V, dense_ggn(model, "ce", x) @ V) <= 1e-8


def test_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)
    torch.manual_seed(0)
    model = Two().double()
    u, v, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 2, (5,))
    op = cv.ggn(model, nn.CrossEntropyLoss(), ((u, v), y))
    layout = ParamLayout(model)
    theta = layout.flatten()
    J = torch.autograd.functional.jacobian(lambda t: functional_call(model, layout.unflatten(t), (u, v)), theta)
    H, c = output_hessians("ce", model(u, v).detach())
    assert rel(op.to_dense(), c * torch.einsum("ncp,ncd,ndq->pq", J, H, J)) <= 1e-8


# ---- train/eval mode ----------------------------------------------------------------------------------
def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("which", list(MAKERS))
def test_batchnorm_evaluated_in_eval_mode_and_modes_restored(which):
    model = bn_model()
    _, loss_fn, x, y = problem("mlp", "ce")
    model.train()
    model[4].eval()  # a submodule in another mode than the root keeps it
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="eval mode"):
        op = MAKERS[which](model, loss_fn, (x, y))
    V = block(op.shape[0], 3)
    got = op @ V
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())  # running stats untouched
    model.eval()
    ref = {"hessian": lambda: dense_hessian(model, loss_fn, x, y), "ggn": lambda: dense_ggn(model, "ce", x),
           "ef": lambda: dense_ef(model, "ce", x, y)}[which]()
    assert rel(got, ref @ V) <= 1e-8
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the model is already in eval mode
        assert torch.equal(MAKERS[which](model, loss_fn, (x, y)) @ V, got)


def test_no_warning_for_a_plain_model_in_training_mode():
    model, loss_fn, x, y = problem("mlp", "ce")
    model.train()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cv.ggn(model, loss_fn, (x, y)) @ block(ParamLayout(model).numel, 1)
    assert model.training


# ---- against curvlinops -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_against_curvlinops(arch, loss):
    """Same model, loss and batches (4 + 5 rows): curvlinops' Hessian, GGN, EF and MC Fisher
    (same seed: it draws r with the same torch calls in the same order, so the matrices agree to
    rounding, not just in expectation)."""
    curvlinops = require("curvlinops")
    model, loss_fn, x, y = problem(arch, loss)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    params = list(model.parameters())
    V = block(sum(p.numel() for p in params), 3)
    kw = dict(check_deterministic=False)
    pairs = [
        (curvlinops.HessianLinearOperator(model, loss_fn, params, data, **kw), cv.hessian(model, loss_fn, data)),
        (curvlinops.GGNLinearOperator(model, loss_fn, params, data, **kw), cv.ggn(model, loss_fn, data)),
        (curvlinops.EFLinearOperator(model, loss_fn, params, data, **kw),
         cv.fisher(model, loss_fn, data, kind="empirical")),
        (curvlinops.FisherMCLinearOperator(model, loss_fn, params, data, seed=17, mc_samples=3, **kw),
         cv.fisher(model, loss_fn, data, mc_samples=3, generator=torch.Generator().manual_seed(17))),
    ]
    for theirs, ours in pairs:
        # curvlinops' MSE sampler scales by a float32 sqrt(1/2) (torch.as_tensor of a Python
        # float), ours by the float64 one: 3e-8 apart; everything else agrees to rounding
        tol = 1e-7 if loss == "mse" and isinstance(theirs, curvlinops.FisherMCLinearOperator) else 1e-10
        assert rel(ours @ V, theirs @ V) <= tol, type(theirs).__name__


# ---- distributed (gloo, 2 processes on CPU) ----------------------------------------------------------
def _dist_worker(rank, world, init_file, out_dir):
    import torch._dynamo  # noqa: F401  (before the group: see tests/test_vi_distributed.py)

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls = []
        real = dist.all_reduce

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)
        dist.all_reduce = counting
        model, loss_fn, x, y = problem("cnn", "ce", n=12)
        mine = slice(0, 7) if rank == 0 else slice(7, 12)  # 7 and 5 rows: ranks weighted by their size
        data = [(x[mine][:4], y[mine][:4]), (x[mine][4:], y[mine][4:])]
        V = block(ParamLayout(model).numel, 3)
        res = {}
        for which, make in MAKERS.items():
            calls.clear()
            res[which] = make(model, loss_fn, data) @ V
            res[which + "_calls"] = len(calls)
            res[which + "_local"] = make(model, loss_fn, data, distributed=False) @ V
        # the randomised estimators with a different seed on each rank: rank 0's seed is shared
        H = cv.hessian(model, loss_fn, data)
        res["estimators"] = _estimators(H, lambda: torch.Generator().manual_seed(100 + rank))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


def _estimators(H, gen):
    return [cv.trace(H, n_probes=6, generator=gen()).estimate, cv.eigenvalues(H, k=2, generator=gen())[0],
            cv.spectral_density(H, n_probes=2, n_steps=5, generator=gen()).nodes,
            H.diagonal("hutchinson", n_probes=4, generator=gen())]


@pytest.mark.slow
def test_distributed_equals_one_process_over_the_union():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    model, loss_fn, x, y = problem("cnn", "ce", n=12)
    V = block(ParamLayout(model).numel, 3)
    for which, make in MAKERS.items():
        whole = make(model, loss_fn, (x, y)) @ V
        assert rel(r0[which], whole) <= 1e-12 and torch.equal(r0[which], r1[which]), which
        assert r0[which + "_calls"] == 1 and r1[which + "_calls"] == 1, which  # one all_reduce per block
        assert rel(r0[which + "_local"], make(model, loss_fn, (x[:7], y[:7])) @ V) <= 1e-12
    # every rank draws rank 0's probes (they differed by rank, and the all-reduce summed products of
    # different vectors): the estimates equal one process's with that seed over the union
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(100)))
    whole = _estimators(cv.hessian(model, loss_fn, (x, y)), lambda: torch.Generator().manual_seed(seed))
    for mine, other, ref in zip(r0["estimators"], r1["estimators"], whole):
        assert torch.equal(torch.as_tensor(mine), torch.as_tensor(other))
        torch.testing.assert_close(torch.as_tensor(mine), torch.as_tensor(ref), rtol=1e-9, atol=1e-12)


def test_distributed_true_without_a_process_group():
    model, loss_fn, x, y = problem("mlp", "ce")
    with pytest.raises(ValueError, match="not initialised"):
        cv.ggn(model, loss_fn, (x, y), distributed=True)


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", list(MAKERS) + ["mc"])
def test_bad_vectors(which):
    model, loss_fn, x, y = problem("mlp", "ce")
    make = MAKERS.get(which) or cv.fisher
    op = make(model, loss_fn, (x, y))
    P = op.shape[0]
    with pytest.raises(ValueError, match=f"must have shape \\[{P}\\]"):
        op @ torch.zeros(P + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32 but the operator is torch.float64"):
        op @ torch.zeros(P, dtype=torch.float32)
    with pytest.raises(ValueError, match="is on meta but the operator is on cpu"):
        op @ torch.zeros(P, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="empty block"):
        op @ torch.zeros(P, 0, dtype=torch.float64)


def test_loss_that_is_not_a_scalar():
    model, _, x, y = problem("mlp", "ce")
    with pytest.raises(ValueError, match=r"reduction='mean'.*got reduction='none'"):  # a torch loss: up front
        cv.hessian(model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    op = cv.hessian(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .*got \(9,\)"):
        op @ block(op.shape[0], 2)


@pytest.mark.parametrize("loss_fn, match", [
    (F.nll_loss, "supports only"),
    (lambda out, y: F.cross_entropy(out, y), "supports only"),
    (nn.L1Loss(), "supports only"),
    (nn.CrossEntropyLoss(reduction="sum"), "reduction='mean'"),
    (nn.MSELoss(reduction="none"), "reduction='mean'"),
    (nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), "weights"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=torch.float64)), "pos_weight"),
])
@pytest.mark.parametrize("make", [cv.ggn, cv.fisher, lambda *a: cv.fisher(*a, kind="empirical")])
def test_unsupported_losses(make, loss_fn, match):
    model, _, x, y = problem("mlp", "ce")
    with pytest.raises(ValueError, match=match):
        make(model, loss_fn, (x, y))


def test_cross_entropy_outputs_and_ignored_rows():
    model, loss_fn, x, y = problem("mlp", "ce")
    y2 = y.clone()
    y2[3] = -100
    op = cv.ggn(model, loss_fn, (x, y2))
    with pytest.raises(ValueError, match="ignore_index = -100"):
        op @ block(op.shape[0], 1)
    seg = nn.Sequential(model, nn.Unflatten(1, (3, 1)))  # [N, C, 1] outputs
    op = cv.ggn(seg, loss_fn, (x, y[:, None]))
    with pytest.raises(ValueError, match=r"needs outputs \[N, C\]"):
        op @ block(op.shape[0], 1)


@pytest.mark.parametrize("which", list(MAKERS))
def test_empty_data(which):
    model, loss_fn, x, y = problem("mlp", "ce")
    make = MAKERS[which]
    with pytest.raises(ValueError, match="no examples"):
        make(model, loss_fn, [])
    with pytest.raises(ValueError, match="no examples"):
        make(model, loss_fn, (x[:0], y[:0]))
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4)
    op = make(model, loss_fn, empty)  # a loader is only walked at product time
    with pytest.raises(ValueError, match="no examples"):
        op @ block(op.shape[0], 1)


def test_bad_data():
    model, loss_fn, x, y = problem("mlp", "ce")
    with pytest.raises(TypeError, match="one-shot iterator"):
        cv.ggn(model, loss_fn, ((x, y) for _ in range(2)))
    with pytest.raises(TypeError, match="data item 1"):
        cv.ggn(model, loss_fn, [(x, y), (x,), (x, y)])
    with pytest.raises(TypeError, match="re-iterable"):
        cv.ggn(model, loss_fn, x)


def test_bad_params():
    model, loss_fn, x, y = problem("mlp", "ce")
    other = mlp().double()
    with pytest.raises(ValueError, match="not a trainable parameter of the model"):
        cv.ggn(model, loss_fn, (x, y), params=[other[0].weight])
    with pytest.raises(ValueError, match="not a parameter name"):
        cv.ggn(model, loss_fn, (x, y), params=["4.weight"])
    with pytest.raises(ValueError, match="twice"):
        cv.ggn(model, loss_fn, (x, y), params=["0.bias", model[0].bias])
    with pytest.raises(ValueError, match="empty"):
        cv.ggn(model, loss_fn, (x, y), params=[])
    with pytest.raises(TypeError, match="list of the model's parameters"):
        cv.ggn(model, loss_fn, (x, y), params=model[0].weight)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        cv.ggn(model, loss_fn, (x, y), params=["0.bias"])


def test_bad_fisher_arguments():
    model, loss_fn, x, y = problem("mlp", "ce")
    with pytest.raises(ValueError, match="kind must be 'mc' or 'empirical'"):
        cv.fisher(model, loss_fn, (x, y), kind="type-2")
    with pytest.raises(ValueError, match="mc_samples must be an int >= 1, got 0"):
        cv.fisher(model, loss_fn, (x, y), mc_samples=0)
    for bad in (1.5, True):  # the one count check: a float or bool is a TypeError
        with pytest.raises(TypeError, match="mc_samples must be an int, got"):
            cv.fisher(model, loss_fn, (x, y), mc_samples=bad)
    with pytest.raises(TypeError, match="torch.Generator"):
        cv.fisher(model, loss_fn, (x, y), generator=3)
    with pytest.raises(ValueError, match="kind='mc' only"):
        cv.fisher(model, loss_fn, (x, y), kind="empirical", generator=torch.Generator())


@needs_cuda
def test_generator_on_another_device():
    model, loss_fn, x, y = problem("mlp", "ce")
    with pytest.raises(ValueError, match="generator is on cpu but the parameters are on cuda"):
        cv.fisher(model.cuda(), loss_fn, (x, y), generator=torch.Generator())
    op = cv.fisher(model, loss_fn, (x.cuda(), y.cuda()), generator=torch.Generator("cuda").manual_seed(1))
    V = block(op.shape[0], 2).cuda()
    assert torch.equal(op @ V, op @ V)


def test_model_changed_after_construction():
    model, loss_fn, x, y = problem("mlp", "ce")
    op = cv.ggn(model, loss_fn, (x, y))
    model[2] = nn.Linear(6, 4).double()
    with pytest.raises(RuntimeError, match="changed since the curvature operator was built"):
        op @ block(op.shape[0], 1)


class _Attention(nn.Module):
    """nn.MultiheadAttention or nn.TransformerEncoderLayer (dropout 0) on [N, 3, 4] sequences, then a linear head."""

    def __init__(self, kind):
        super().__init__()
        self.a = (nn.MultiheadAttention(4, 2, batch_first=True) if kind == "mha" else
                  nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True))
        self.kind, self.fc = kind, nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x, x, x)[0] if self.kind == "mha" else self.a(x)
        return self.fc(h.mean(1))


# in eval mode without grad-requiring inputs, attention took torch's fused inference path, which has no
# forward-mode formula: ggn / fisher failed there, and hessian of the encoder layer failed for want of a
# second derivative of the fused scaled-dot-product kernel
@pytest.mark.parametrize("kind", ["mha", "encoder"])
def test_attention_models(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _Attention(kind).double().eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):  # the oracles need the differentiable kernel too
        want = {"hessian": dense_hessian(model, loss_fn, x, y), "ggn": dense_ggn(model, "ce", x),
                "empirical": dense_ef(model, "ce", x, y)}
    V = block(want["ggn"].shape[0], 3)
    got = {"hessian": cv.hessian(model, loss_fn, (x, y)) @ V, "ggn": cv.ggn(model, loss_fn, (x, y)) @ V,
           "empirical": cv.fisher(model, loss_fn, (x, y), kind="empirical") @ V}
    for k in want:
        assert rel(got[k], want[k] @ V) < 1e-10, k
    assert torch.backends.mha.get_fastpath_enabled()  # put back
