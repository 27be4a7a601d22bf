"""Input validation and state safety of pyfastbayes.curvature: bad input gets a clear error naming
the argument (never an uninitialised result, an obscure torch error or a silent NaN), and a call
that fails leaves the model as it was (parameters, grads, buffers, train/eval mode)."""
import pytest
import torch
from torch import nn

from pyfastbayes import curvature as cv

ce = nn.CrossEntropyLoss()


def _mlp(bn: bool = False, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(8), nn.Dropout(0.2)] if bn else []
    return nn.Sequential(nn.Linear(4, 8), *mid, nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _data(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _P(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _state(m: nn.Module):
    """Everything a failing call must leave alone (NaN-safe: compared as bit patterns)."""
    return ({k: v.detach().clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()],
            [None if p.grad is None else p.grad.clone() for p in m.parameters()])


def _same(a, b) -> bool:
    eq = lambda x, y: (x is None and y is None) or (x is not None and y is not None  # noqa: E731
                                                   and torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)))
    return (a[0].keys() == b[0].keys() and all(eq(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]
            and all(eq(x, y) for x, y in zip(a[2], b[2])))


# ---- 1. block / generator of diagonal() and to_dense() ---------------------------------------------------
@pytest.mark.parametrize("block, exc, text", [(0, ValueError, "block must be an int >= 1, got 0"),
                                               (-1, ValueError, "block must be an int >= 1, got -1"),
                                               (2.5, TypeError, "block must be an int, got float"),
                                               (True, TypeError, "block must be an int, got bool")])
@pytest.mark.parametrize("call", ["exact", "hutchinson", "to_dense"])
def test_diagonal_and_to_dense_refuse_a_bad_block(call, block, exc, text):
    # before: block=-1 returned torch.empty's uninitialised memory as the diagonal, 0 and 2.5 raised
    # range()'s own errors
    op = cv.DenseOperator(torch.eye(5))
    with pytest.raises(exc, match=text):
        op.to_dense(block=block) if call == "to_dense" else op.diagonal(call, n_probes=4, block=block)


def test_diagonal_refuses_a_generator_that_is_not_one():
    op = cv.DenseOperator(torch.eye(5))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):  # was AttributeError
        op.diagonal("hutchinson", n_probes=4, generator=3)
    with pytest.raises(ValueError, match="method must be 'exact' or 'hutchinson'"):
        op.diagonal("hutch", block=0)  # the method is named first


# ---- 2. a LinearOperator subclass whose _matmat has the wrong shape ---------------------------------------
class _Half(cv.LinearOperator):
    def __init__(self):
        super().__init__(4, torch.float32, "cpu")

    def _matmat(self, V):
        return V[:2]


@pytest.mark.parametrize("call", [lambda op: op @ torch.randn(4), lambda op: cv.eigenvalues(op, k=1),
                                  lambda op: cv.trace(op, n_probes=3), lambda op: cv.spectral_density(op)])
def test_a_matmat_of_the_wrong_shape_is_named(call):
    # before: op @ v silently returned a vector of 2 numbers; the spectral tools failed in torch
    with pytest.raises(RuntimeError, match=r"_Half._matmat returned \(2, \d+\) for a block of shape \(4, \d+\)"):
        call(_Half())


# ---- 3. non-finite operators and products ------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["eigenvalues", "trace", "spectral_density"])
def test_a_dense_matrix_with_nan_is_refused_as_such(tool):
    A = torch.eye(4)
    A[1, 2] = float("nan")
    with pytest.raises(ValueError, match="op holds 1 NaN or inf entries"):  # was "must be symmetric: ... nan"
        getattr(cv, tool)(A)


def _nan_model_and_data(where: str):
    m = _mlp(bn=True)
    m.train()
    x, y = _data()
    if where == "data":
        x[3, 1] = float("nan")
    else:
        with torch.no_grad():
            m[0].weight[0, 0] = float("nan")
    return m, (x, y)


@pytest.mark.parametrize("where", ["data", "weights"])
@pytest.mark.parametrize("call", [
    lambda H: cv.eigenvalues(H, k=1),
    lambda H: cv.eigenvalues(H, k=2, method="block_lanczos"),
    lambda H: cv.trace(H, n_probes=4),
    lambda H: cv.trace(H, n_probes=6, method="hutch++"),
    lambda H: cv.spectral_density(H, n_probes=2, n_steps=5),
])
@pytest.mark.parametrize("build", [cv.hessian, cv.ggn])
def test_nan_in_the_data_or_weights_raises_instead_of_a_nan_result(build, call, where):
    # before: eigenvalues and trace returned NaN silently, block Lanczos and SLQ failed in linalg.eigh
    m, data = _nan_model_and_data(where)
    before = _state(m)
    with pytest.warns(UserWarning, match="training mode"):
        H = build(m, ce, data)
    with pytest.raises(RuntimeError, match=r"not finite \(NaN or inf\) after \d+ products; check the model's"):
        call(H)
    assert _same(before, _state(m))


def test_sharpness_with_nan_weights_raises_and_leaves_the_model():
    m, data = _nan_model_and_data("weights")
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    before = _state(m)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="eigenvalues: a product of the operator"):
        cv.sharpness(m, ce, data, n_probes=4)
    assert _same(before, _state(m))


def test_sharpness_checks_its_arguments_before_the_lanczos_run(monkeypatch):
    import sys

    sh = sys.modules["pyfastbayes.curvature.sharpness"]  # the package attribute is the function

    def boom(*a, **k):
        raise AssertionError("the Lanczos run started before n_probes was checked")
    monkeypatch.setattr(sh, "eigenvalues", boom)
    m = _mlp()
    for kw, err in [(dict(n_probes=0), ValueError), (dict(generator=1), TypeError), (dict(progress="yes"), TypeError)]:
        with pytest.raises(err):
            cv.sharpness(m, ce, _data(), **kw)


# ---- 4. data of another dtype than the model ---------------------------------------------------------------
@pytest.mark.parametrize("build", [cv.hessian, cv.ggn, cv.fisher])
@pytest.mark.parametrize("xdtype,mdtype", [(torch.float64, torch.float32), (torch.float32, torch.float16),
                                           (torch.int64, torch.float32)])
def test_inputs_of_another_dtype_get_an_error_saying_the_fix(build, xdtype, mdtype):
    m = _mlp(dtype=mdtype)
    m.train()
    x, y = _data()
    before = _state(m)
    op = build(m, ce, (x.to(xdtype), y))
    with pytest.raises(TypeError, match=rf"inputs are {xdtype} but the model's parameters are {mdtype}: cast"):
        op @ torch.randn(_P(m), dtype=mdtype)  # was RuntimeError: mat1 and mat2 must have the same dtype
    assert _same(before, _state(m))


def test_a_model_that_casts_its_inputs_itself_still_works():
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.float())
    x, y = _data()
    op = cv.ggn(Casting(), ce, (x.double(), y))
    assert torch.isfinite(op @ torch.randn(15)).all()


# ---- 5. targets the GGN / MC Fisher never read -------------------------------------------------------------
@pytest.mark.parametrize("build", [cv.ggn, lambda *a: cv.fisher(*a, kind="mc"),
                                   lambda *a: cv.fisher(*a, kind="empirical")])
@pytest.mark.parametrize("y,match", [
    (torch.full((16,), 5), r"class targets must be in \[0, 3\) for outputs with 3 classes, got values from 5 to 5"),
    (torch.full((16,), -3), r"class targets must be in \[0, 3\)"),
    (torch.zeros(16, 1, dtype=torch.long), r"class targets \[N\] = \(16,\) of integers in \[0, 3\)"),
    (torch.zeros(16, 2), r"class probabilities must have the outputs' shape \(16, 3\), got \(16, 2\)"),
])
def test_cross_entropy_targets_out_of_range_or_shape_are_refused(build, y, match):
    # before: the GGN and the MC Fisher returned a product for class 5 of 3 (never reading y)
    m = _mlp()
    x, _ = _data()
    before = _state(m)
    with pytest.raises(ValueError, match=match):
        build(m, ce, (x, y)) @ torch.randn(_P(m))
    assert _same(before, _state(m))


def test_ignore_index_is_still_named_as_such():
    m = _mlp()
    x, y = _data()
    y[2] = -100
    with pytest.raises(ValueError, match="targets contain ignore_index = -100"):
        cv.ggn(m, ce, (x, y)) @ torch.randn(_P(m))
    y[2] = 1
    with pytest.raises(ValueError, match="targets contain ignore_index = 1"):
        cv.ggn(m, nn.CrossEntropyLoss(ignore_index=1), (x, y)) @ torch.randn(_P(m))


@pytest.mark.parametrize("build", [cv.ggn, cv.fisher, lambda *a: cv.fisher(*a, kind="empirical")])
def test_regression_targets_of_another_shape_than_the_outputs_are_refused(build):
    # before: MSE targets [N] for outputs [N, 3] passed (the empirical Fisher's loss broadcast them)
    m = _mlp()
    x, _ = _data()
    with pytest.raises(ValueError, match=r"targets must have the outputs' shape \(16, 3\), got \(16,\)"):
        build(m, nn.MSELoss(), (x, torch.randn(16))) @ torch.randn(_P(m))
    with pytest.raises(ValueError, match=r"got \(16, 3, 1\) \(y.view_as\(outputs\)\)"):
        build(m, nn.MSELoss(), (x, torch.randn(16, 3, 1))) @ torch.randn(_P(m))


# ---- 6. a failing product mid-way leaves the model as it was -----------------------------------------------
@pytest.mark.parametrize("build", [cv.hessian, cv.ggn, cv.fisher])
def test_an_error_in_the_second_batch_restores_the_train_mode(build):
    m = _mlp(bn=True)
    m.train()
    m[1].eval()  # a submodule in another mode than the root keeps it
    x, y = _data()
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = _state(m)
    with pytest.warns(UserWarning, match="training mode"):
        op = build(m, ce, [(x, y), (torch.randn(16, 5), y)])
    with pytest.raises(RuntimeError):
        op @ torch.randn(_P(m))
    assert _same(before, _state(m))


def test_training_mode_warning_points_at_the_caller():
    """The warning names the user's line for every operator (ggn and fisher stopped inside the
    library: a fixed stacklevel one level short), through pyfastbayes._warnings.warn_user."""
    import warnings

    from pyfastbayes import curvature as cv

    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    data = (torch.randn(4, 3), torch.randint(0, 3, (4,)))
    for make in (cv.hessian, cv.ggn, cv.fisher):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            make(model, nn.CrossEntropyLoss(), data)
        assert [w.filename for w in seen if "training mode" in str(w.message)] == [__file__], make.__name__


def test_a_three_tensor_batch_says_how_to_pass_two_inputs():
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(4, 3), torch.randn(4, 3), torch.randint(0, 2, (4,))), batch_size=2)
    with pytest.raises(TypeError, match=r"got a list of 3; a DataLoader over TensorDataset\(x1, x2, y\) yields "
                                        r"\[x1, x2, y\].*collate_fn returning \(\(x1, x2\), y\)"):
        cv.ggn(nn.Linear(3, 2), nn.CrossEntropyLoss(), loader) @ torch.randn(8)


def test_a_wrong_double_backward_is_reported_and_a_right_one_is_not():
    """After the switch to reverse-over-reverse products: weight_norm's double backward in PyTorch is
    not symmetric (a wrong Hessian, 35 % off): a RuntimeWarning; F.mse_loss (no forward-over-reverse
    formula either, a right double backward): none."""
    import warnings

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    nn.utils.parametrizations.weight_norm(m[0])
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch's "no batching rule" performance note
        with pytest.warns(RuntimeWarning, match="not symmetric.*weight_norm"):
            cv.hessian(m, ce, (x, y)) @ torch.randn(_P(m), dtype=torch.float64)
    plain = _mlp(dtype=torch.float64)
    op = cv.hessian(plain, nn.MSELoss(), (x, torch.randn(20, 3, dtype=torch.float64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        op @ torch.randn(_P(plain), dtype=torch.float64)
    assert op.hvp_mode == "reverse-over-reverse"


def test_nll_losses_weigh_batches_by_their_kept_targets():
    """NLLLoss / F.nll_loss average over the targets they keep (not ignore_index; by class weight), as
    cross-entropy does: the Hessian of the data's mean does not depend on the batching."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(1)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    y[:4] = -100
    V = torch.randn(_P(m), 3, dtype=torch.float64)
    for loss in (nn.NLLLoss(), nn.NLLLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)),
                 torch.nn.functional.nll_loss):
        one = cv.hessian(m, loss, (x, y)) @ V
        two = cv.hessian(m, loss, [(x[:5], y[:5]), (x[5:], y[5:])]) @ V
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)


def test_targets_that_are_not_tensors_and_operator_products_are_named():
    import numpy as np

    m = _mlp()
    x, y = _data()
    for data in ((x, y.numpy()), [(x, y.numpy())]):
        with pytest.raises(TypeError, match="the targets must be a tensor, got ndarray"):
            cv.hessian(m, ce, data)
    H = cv.hessian(m, ce, (x, y))
    with pytest.raises(TypeError, match="an operator times an operator is not supported"):
        H * H
    assert isinstance(np.float32(2.0) * H, type(2.0 * H))
