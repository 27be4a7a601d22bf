"""Dict batches (HuggingFace style): Laplace (laplace-torch's ``dict_key_y``: the model takes the
whole dict, the targets sit under ``dict_key_y``) and the curvature operators ((dict, targets)
pairs). Everything equals the same network fed the same rows as (tensor, targets) pairs, whose
path the other tests check against references."""
import pytest
import torch
from torch import nn

from pyfastbayes.laplace import Laplace

DT = torch.float64
V, T, C = 9, 5, 3


class Body(nn.Module):
    """Token ids [N, T] and a 0/1 mask [N, T] -> logits [N, C] (mean of the kept embeddings)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, C)

    def forward(self, ids, mask):
        e = self.emb(ids) * mask[..., None]
        h = e.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.out(torch.tanh(self.hidden(h)))


class DictNet(nn.Module):
    """The HuggingFace-style wrapper laplace-torch asks for: forward(batch: dict) -> logits."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, batch):
        return self.body(batch["input_ids"], batch["attention_mask"])


class TensorNet(nn.Module):
    """The same network on a tensor [N, 2, T] (ids and mask stacked)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x[:, 0].long(), x[:, 1])


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = (torch.rand(n, T, generator=g) < 0.8).to(DT)
    mask[:, 0] = 1
    noise = torch.rand(n, generator=g) < 0.25  # labels from the first token, a quarter of them random
    y = torch.where(noise, torch.randint(0, C, (n,), generator=g), ids[:, 0] % C)
    return ids, mask, y


def _dicts(ids, mask, y, bs):
    return [{"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs], "labels": y[i:i + bs], "note": "x"}
            for i in range(0, len(y), bs)]


def _pairs(ids, mask, y, bs):
    x = torch.stack([ids.to(DT), mask], 1)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    body = Body().to(DT)
    ids, mask, y = _data(200, 7)
    opt = torch.optim.Adam(body.parameters(), 0.05)
    for _ in range(60):  # a briefly trained MAP: an interior best prior
        opt.zero_grad()
        nn.functional.cross_entropy(body(ids, mask), y).backward()
        opt.step()
    return DictNet(body), TensorNet(body)


@pytest.mark.parametrize("subset, structure", [("all", "kron"), ("all", "diag"), ("all", "full"),
                                               ("last_layer", "kron")])
def test_dict_batches_equal_tensor_batches(nets, subset, structure):
    dnet, tnet = nets
    ids, mask, y = _data(23, 1)
    ours = Laplace(dnet, "classification", subset, structure, prior_precision=0.5).fit(_dicts(ids, mask, y, 8),
                                                                                       progress=False)
    ref = Laplace(tnet, "classification", subset, structure, prior_precision=0.5).fit(_pairs(ids, mask, y, 8),
                                                                                      progress=False)
    assert ours.n_data == ref.n_data == 23
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-12, atol=0)
    ti, tm, ty = _data(11, 2)
    test = {"input_ids": ti, "attention_mask": tm}
    tx = torch.stack([ti.to(DT), tm], 1)
    # the GLM predictive: a dict split into row chunks, a loader of dicts
    want = ref.la(tx, batch_size=4)
    torch.testing.assert_close(ours.la(test, batch_size=4), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.la(_dicts(ti, tm, ty, 5)), want, rtol=1e-12, atol=1e-14)
    # sampled predictives with the same draws
    for pred in ("nn", "glm"):
        a = ours.predictive_samples(test, pred, 4, generator=torch.Generator().manual_seed(3), batch_size=4)
        b = ref.predictive_samples(tx, pred, 4, generator=torch.Generator().manual_seed(3), batch_size=4)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for data in (test, _dicts(ti, tm, ty, 4)):
        a = ours.la(data, "nn", n_samples=3, generator=torch.Generator().manual_seed(4), batch_size=4)
        b = ref.la(tx, "nn", n_samples=3, generator=torch.Generator().manual_seed(4), batch_size=4)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("curvature", ["ggn", "ef", "mc_fisher"])
def test_lowrank_on_dict_batches(nets, curvature):
    """'lowrank' walks dict batches through the curvature operators (the dict as the model's one
    argument, non-tensor values carried along): the eigenpairs of the pairs' fit."""
    dnet, tnet = nets
    ids, mask, y = _data(30, 4)
    kw = dict(hessian_structure="lowrank", low_rank=5, curvature=curvature, prior_precision=0.5)
    ours = Laplace(dnet, "classification", **kw).fit(_dicts(ids, mask, y, 12), progress=False,
                                                     generator=torch.Generator().manual_seed(2))
    ref = Laplace(tnet, "classification", **kw).fit(_pairs(ids, mask, y, 12), progress=False,
                                                    generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.to_dense(), ref.to_dense(), rtol=1e-8, atol=1e-10)


def test_dict_and_targets_pairs_fit_and_predict_as_dict_batches(nets):
    """(dict batch, targets) pairs, the curvature operators' form, work in Laplace as dict batches
    with the targets inside do."""
    dnet, _ = nets
    ids, mask, y = _data(17, 3)
    inside = _dicts(ids, mask, y, 6)
    pairs = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in inside]
    a = Laplace(dnet, "classification").fit(inside, progress=False)
    b = Laplace(dnet, "classification").fit(pairs, progress=False)
    torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood(), rtol=1e-14, atol=0)
    for pred_type in ("glm", "nn"):
        torch.testing.assert_close(b.la(pairs, pred_type, generator=torch.Generator().manual_seed(1)),
                                   a.la(inside, pred_type, generator=torch.Generator().manual_seed(1)))


@pytest.mark.filterwarnings("ignore:gridsearch")  # (the tiny net's best prior is at the grid's end)
@pytest.mark.filterwarnings("ignore:prior precision")
@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_gridsearch_on_dict_validation_batches(nets, pred_type):
    """The validation NLL over the grid from dict batches picks the prior the pairs pick; marglik
    on a dict-fitted Laplace moves the prior as on the pairs."""
    dnet, tnet = nets
    ids, mask, y = _data(200, 7)
    vi, vm, vy = _data(40, 5)
    kw = dict(method="gridsearch", grid_size=9, pred_type=pred_type, n_samples=3)
    ours = Laplace(dnet, "classification", hessian_structure="diag").fit(_dicts(ids, mask, y, 64), progress=False)
    ref = Laplace(tnet, "classification", hessian_structure="diag").fit(_pairs(ids, mask, y, 64), progress=False)
    torch.manual_seed(6)
    a = ours.optimize_prior_precision(val_loader=_dicts(vi, vm, vy, 16), **kw)
    torch.manual_seed(6)
    b = ref.optimize_prior_precision(val_loader=_pairs(vi, vm, vy, 16), **kw)
    torch.testing.assert_close(a, b)
    ours.optimize_prior_precision()  # marglik needs no data
    ref.optimize_prior_precision()
    torch.testing.assert_close(ours.prior_precision, ref.prior_precision, rtol=1e-8, atol=0)


def test_dict_batch_errors_name_the_fix(nets):
    dnet, _ = nets
    ids, mask, y = _data(6, 1)
    batch = {"input_ids": ids, "attention_mask": mask, "target": y}
    with pytest.raises(ValueError, match=r"dict_key_y='labels' \(keys \['input_ids', 'attention_mask', 'target'\]"):
        Laplace(dnet, "classification").fit([batch], progress=False)
    la = Laplace(dnet, "classification", dict_key_y="target").fit([batch], progress=False)
    assert la.n_data == 6
    bad = {"input_ids": ids, "attention_mask": mask[:4], "labels": y}
    with pytest.raises(ValueError, match="every tensor of a dict batch must hold the batch's rows"):
        Laplace(dnet, "classification").fit([bad], progress=False)
    with pytest.raises(ValueError, match="every tensor of a dict batch"):
        la.la({"input_ids": ids, "attention_mask": mask[:2]})


@pytest.mark.filterwarnings("ignore:prior precision")
def test_marglik_training_on_dict_batches():
    """marglik_training walks dict batches as it walks pairs: the same trained weights, priors and
    evidence from two copies of one initial network."""
    import copy

    from pyfastbayes.laplace import marglik_training
    torch.manual_seed(1)
    body = Body().to(DT)
    ids, mask, y = _data(60, 3)
    kw = dict(hessian_structure="kron", n_epochs=3, n_epochs_burnin=1, marglik_frequency=1, n_hypersteps=5,
              progress=False)
    la_d, ev_d = marglik_training(DictNet(copy.deepcopy(body)), _dicts(ids, mask, y, 20), **kw)
    la_t, ev_t = marglik_training(TensorNet(copy.deepcopy(body)), _pairs(ids, mask, y, 20), **kw)
    torch.testing.assert_close(la_d.mean, la_t.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.tensor(ev_d), torch.tensor(ev_t), rtol=1e-10, atol=0)
    torch.testing.assert_close(la_d.prior_precision, la_t.prior_precision, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical"])
def test_curvature_operators_take_dict_inputs(nets, kind):
    """pyfastbayes.curvature's operators on (dict batch, targets) pairs: the matrices of the same
    rows as tensors."""
    from pyfastbayes.curvature import fisher, ggn, hessian
    dnet, tnet = nets
    ids, mask, y = _data(14, 8)
    loss = nn.CrossEntropyLoss()
    make = {"hessian": hessian, "ggn": ggn, "empirical": lambda m, f, d: fisher(m, f, d, kind="empirical")}[kind]
    d = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in _dicts(ids, mask, y, 5)]
    got = make(dnet, loss, d).to_dense()
    want = make(tnet, loss, _pairs(ids, mask, y, 5)).to_dense()
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_landscape_takes_dict_inputs(nets):
    """landscape.grid, interpolate and a curve's evaluate on (dict batch, targets) pairs: the values
    of the same rows as tensors."""
    import copy

    from pyfastbayes.landscape import BezierCurve, grid, interpolate, random_directions
    dnet, tnet = nets
    ids, mask, y = _data(30, 9)
    d = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in _dicts(ids, mask, y, 10)]
    p = _pairs(ids, mask, y, 10)
    loss = nn.CrossEntropyLoss()
    D = random_directions(dnet, n=2, generator=torch.Generator().manual_seed(1))
    c = (torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 4))
    want = grid(tnet, loss, p, D, c, progress=False).loss
    assert float(want.std()) > 0
    torch.testing.assert_close(grid(dnet, loss, d, D, c, progress=False).loss, want, rtol=1e-12, atol=0)
    other = copy.deepcopy(dnet)
    with torch.no_grad():
        for q in other.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel()), dtype=q.dtype))
    other_t = TensorNet(other.body)
    torch.testing.assert_close(interpolate(dnet, other, 4, loss, d, progress=False).loss,
                               interpolate(tnet, other_t, 4, loss, p, progress=False).loss, rtol=1e-12, atol=0)
    ts = torch.linspace(0, 1, 3)
    torch.testing.assert_close(BezierCurve(dnet, other).evaluate(ts, loss, d)["loss"],
                               BezierCurve(tnet, other_t).evaluate(ts, loss, p)["loss"], rtol=1e-12, atol=0)


def _padded(ids, mask, T_to):
    """The same rows padded with masked tokens to T_to positions (Body ignores masked tokens)."""
    pad = T_to - ids.shape[1]
    return (torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1))


@pytest.mark.filterwarnings("ignore:gridsearch")
@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_gridsearch_on_dict_batches_padded_to_different_lengths(nets, pred_type):
    """Validation dict batches padded per batch (HuggingFace collation: [4, 5] and [5, 7] ids)
    score batch by batch: the prior chosen on the same rows all padded to one length."""
    dnet, _ = nets
    ids, mask, y = _data(40, 1)
    la = Laplace(dnet, "classification", hessian_structure="diag").fit(_dicts(ids, mask, y, 20), progress=False)
    vi, vm, vy = _data(9, 5)
    wi, wm = _padded(vi[4:], vm[4:], 7)
    ragged = [{"input_ids": vi[:4], "attention_mask": vm[:4], "labels": vy[:4]},
              {"input_ids": wi, "attention_mask": wm, "labels": vy[4:]}]
    pi, pm = _padded(vi, vm, 7)
    even = [{"input_ids": pi[:4], "attention_mask": pm[:4], "labels": vy[:4]},
            {"input_ids": pi[4:], "attention_mask": pm[4:], "labels": vy[4:]}]
    kw = dict(method="gridsearch", grid_size=9, pred_type=pred_type, n_samples=3, log_prior_prec_range=(-2, 2))
    torch.manual_seed(7)
    a = la.optimize_prior_precision(val_loader=ragged, **kw)
    torch.manual_seed(7)
    b = la.optimize_prior_precision(val_loader=even, **kw)
    torch.testing.assert_close(a, b)


class _Feat(nn.Module):
    """forward(d) -> lin(d['x']): a float32 'x' fails in a float64 Linear."""

    def __init__(self, out=C):
        super().__init__()
        self.hidden, self.lin = nn.Linear(5, 4), nn.Linear(4, out)

    def forward(self, d):
        return self.lin(torch.tanh(self.hidden(d["x"])))


def test_dict_inputs_of_another_dtype_get_the_dtype_message():
    """A float32 tensor in a dict fed to a float64 model: the library's TypeError on every path
    (fit, last-layer fit, glm and nn predictives, one dict or a loader of them); float32 targets
    under dict_key_y are never blamed for another error."""
    torch.manual_seed(0)
    model = _Feat().to(DT)
    X, y = torch.randn(8, 5, dtype=DT), torch.randint(0, C, (8,))
    good, bad = {"x": X, "labels": y}, {"x": X.float(), "labels": y}
    msg = "the inputs are torch.float32 but the model's parameters are torch.float64"
    with pytest.raises(TypeError, match=msg):
        Laplace(model, "classification").fit([bad], progress=False)
    with pytest.raises(TypeError, match=msg):
        Laplace(model, "classification", "last_layer").fit([bad], progress=False)
    la = Laplace(model, "classification", hessian_structure="diag").fit([good], progress=False)
    for data in (bad, [bad]):
        for pred_type in ("glm", "nn"):
            with pytest.raises(TypeError, match=msg):
                la.la(data, pred_type)
    reg = _Feat(out=2).to(DT)
    wrong_width = {"x": torch.randn(6, 7, dtype=DT), "labels": torch.randn(6, 2)}  # float32 targets
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        Laplace(reg, "regression").fit([wrong_width], progress=False)
    la = Laplace(reg, "regression", hessian_structure="diag").fit(
        [{"x": X, "labels": torch.randn(8, 2, dtype=DT)}], progress=False)
    for pred_type in ("glm", "nn"):  # (the nn predictive goes through the posteriors' BMA loop)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            la.la(wrong_width, pred_type)


def test_dict_batches_move_to_the_model_device():
    """to_device (the BMA loop's, bn_loader's) moves the tensors of a dict passed whole; a user
    input_fn gets the row chunks of one dict batch."""
    from pyfastbayes.nn.inputs import to_device
    d = {"a": torch.zeros(2), "n": 3}
    moved = to_device((d, torch.ones(1)), "meta")
    assert moved[0]["a"].device.type == "meta" and moved[0]["n"] == 3 and moved[1].device.type == "meta"
    assert d["a"].device.type == "cpu"  # the caller's dict is not changed


def test_nn_predict_on_one_dict_with_an_input_fn(nets):
    dnet, tnet = nets
    ids, mask, y = _data(10, 1)
    la = Laplace(dnet, "classification", hessian_structure="diag").fit(_dicts(ids, mask, y, 10), progress=False)
    test = {"input_ids": ids, "attention_mask": mask}
    a = la.predict(test, 3, pred_type="nn", input_fn=lambda b: (b,), batch_size=4,
                   generator=torch.Generator().manual_seed(1))
    b = la.predict(test, 3, pred_type="nn", batch_size=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


class _Branchy(nn.Module):
    """forward(d) with value-dependent control flow (vmap cannot batch it: grid falls back to one
    point at a time) that never reads d's float32 'extra'; ``seen`` records the rows it gets."""

    def __init__(self):
        super().__init__()
        self.lin, self.seen = nn.Linear(5, C), []

    def forward(self, d):
        x = d["x"]
        self.seen.append(x.shape[-2] if x.dim() > 1 else 1)
        return self.lin(x) if bool(x.sum() > -1e9) else -self.lin(x)


def test_dict_values_the_model_never_reads_are_not_blamed():
    """A float32 value in a dict batch that a float64 model never reads (targets, a mask): grid
    still falls back to one point at a time, and a real error (wrong width) is reported as
    itself, by the landscape and the curvature operators alike."""
    import warnings

    from pyfastbayes.curvature import ggn
    from pyfastbayes.landscape import grid, random_directions
    torch.manual_seed(0)
    model = _Branchy().to(DT)
    X, y = torch.randn(12, 5, dtype=DT), torch.randint(0, C, (12,))
    loss = nn.CrossEntropyLoss()
    D = random_directions(model, n=1, generator=torch.Generator().manual_seed(1))
    c = torch.linspace(-1, 1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the one-point-at-a-time warning)
        want = grid(model, loss, [({"x": X}, y)], D, c, progress=False).loss
        got = grid(model, loss, [({"x": X, "extra": torch.ones(12).float()}, y)], D, c, progress=False).loss
    torch.testing.assert_close(got, want)
    bad = [({"x": torch.randn(12, 7, dtype=DT), "extra": torch.ones(12).float()}, y)]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        grid(model, loss, bad, D, c, progress=False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        ggn(model, loss, bad).to_dense()


def test_grid_splits_dict_batches_into_row_blocks():
    """batch_rows applies to dict batches as to tensors: the model sees blocks of 8 rows, and the
    surface is the whole batches' one."""
    from pyfastbayes.landscape import grid, random_directions
    torch.manual_seed(0)
    model = _Feat().to(DT)
    seen = []
    model.hidden.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-2]))
    X, y = torch.randn(40, 5, dtype=DT), torch.randint(0, C, (40,))
    D = random_directions(model, n=1, generator=torch.Generator().manual_seed(1))
    c = torch.linspace(-1, 1, 3)
    whole = grid(model, nn.CrossEntropyLoss(), [({"x": X, "tag": "a"}, y)], D, c, progress=False, batch_rows=64).loss
    assert set(seen) == {40}
    seen.clear()
    blocks = grid(model, nn.CrossEntropyLoss(), [({"x": X, "tag": "a"}, y)], D, c, progress=False, batch_rows=8).loss
    assert set(seen) == {8}
    torch.testing.assert_close(blocks, whole, rtol=1e-12, atol=0)


def test_a_discarded_probe_on_other_rows_is_harmless():
    """A layer also called on one row whose output is discarded (a shape probe): the posterior of
    the model without the probe (the row-count check comes after discarded calls are dropped)."""

    class Net(nn.Module):
        def __init__(self, probe):
            super().__init__()
            self.probe, self.a, self.out = probe, nn.Linear(4, 5), nn.Linear(5, C)

        def forward(self, x):
            if self.probe:
                self.a(x[:1])
            return self.out(torch.tanh(self.a(x)))

    X, y = torch.randn(7, 4, dtype=DT), torch.randint(0, C, (7,))
    for structure in ("kron", "diag", "full"):
        torch.manual_seed(1)
        with_probe = Net(True).to(DT)
        plain = Net(False).to(DT)
        plain.load_state_dict(with_probe.state_dict())
        a = Laplace(with_probe, "classification", hessian_structure=structure).fit([(X, y)], progress=False)
        b = Laplace(plain, "classification", hessian_structure=structure).fit([(X, y)], progress=False)
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-12, atol=1e-14)


def test_a_bare_dict_as_curvature_data_says_how_to_pair_it(nets):
    from pyfastbayes.curvature import ggn
    dnet, _ = nets
    ids, mask, y = _data(6, 1)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    with pytest.raises(TypeError, match=r"data is one dict .*pass \(batch, batch\['labels'\]\)"):
        ggn(dnet, nn.CrossEntropyLoss(), batch)
    with pytest.raises(TypeError, match=r"data item 0 is a dict"):
        ggn(dnet, nn.CrossEntropyLoss(), [batch]).to_dense()


class _Wrapped(nn.Module):
    """A HuggingFace-style model: dict batch in, a dict with 'logits' out."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, batch):
        return {"logits": self.body(batch["input_ids"], batch["attention_mask"]), "aux": 1}


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
def test_output_fn_picks_the_logits_everywhere(nets, structure):
    """Laplace(output_fn=...) on a model returning a dict equals the model returning the logits:
    fit (every structure, 'lowrank' through the curvature operators), the glm and nn predictives;
    without output_fn the error says what to pass."""
    dnet, _ = nets
    wrapped = _Wrapped(dnet.body)
    ids, mask, y = _data(20, 2)
    data = _dicts(ids, mask, y, 8)
    kw = dict(hessian_structure=structure, low_rank=4, prior_precision=0.5)
    g = torch.Generator
    a = Laplace(wrapped, "classification", output_fn=lambda out: out["logits"], **kw).fit(
        data, progress=False, generator=g().manual_seed(1))
    b = Laplace(dnet, "classification", **kw).fit(data, progress=False, generator=g().manual_seed(1))
    torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood(), rtol=1e-10, atol=0)
    test = {"input_ids": ids[:6], "attention_mask": mask[:6]}
    for pred_type in ("glm", "nn"):
        torch.testing.assert_close(a.la(test, pred_type, generator=g().manual_seed(2)),
                                   b.la(test, pred_type, generator=g().manual_seed(2)), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.predictive_samples(test, "nn", 3, generator=g().manual_seed(3)),
                               b.predictive_samples(test, "nn", 3, generator=g().manual_seed(3)))
    with pytest.raises(TypeError, match=r"pass output_fn=lambda out: out\['logits'\]"):
        Laplace(wrapped, "classification", **kw).fit(data, progress=False)


def test_marglik_training_with_output_fn():
    import copy

    from pyfastbayes.laplace import marglik_training
    torch.manual_seed(1)
    body = Body().to(DT)
    ids, mask, y = _data(30, 3)
    kw = dict(hessian_structure="diag", n_epochs=2, n_epochs_burnin=1, marglik_frequency=1, n_hypersteps=3,
              progress=False)
    la_a, ev_a = marglik_training(_Wrapped(copy.deepcopy(body)), _dicts(ids, mask, y, 10),
                                  output_fn=lambda out: out["logits"], **kw)
    la_b, ev_b = marglik_training(DictNet(copy.deepcopy(body)), _dicts(ids, mask, y, 10), **kw)
    torch.testing.assert_close(la_a.mean, la_b.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.tensor(ev_a), torch.tensor(ev_b), rtol=1e-10, atol=0)
    with pytest.raises(TypeError, match="output_fn must be callable"):
        Laplace(DictNet(body), output_fn="logits")
