"""calibration.evaluate (issue 14): metrics of a test set split by rows over processes (gloo, 2
and 3 processes, uneven shards, empty shards), equal on every process to the single-process
metrics of the concatenation; without torch.distributed, the plain metrics; bad input refused."""
import os

import pytest
import torch

from _helpers import spawn_gloo
from pyfastbayes import calibration as cal

N, C, S = 301, 4, 3
RTOL = 1e-12
SPLITS = {2: [0, 70, N], 3: [0, 0, 200, N]}  # world 3: rank 0 holds no row
METRIC_FNS = {"nll": cal.nll, "accuracy": cal.accuracy, "ece": cal.ece, "brier": cal.brier}


def _data():
    """Every case: (probs, targets, evaluate options) over the whole test set of N rows."""
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(S, N, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,), generator=g)
    yb = torch.randint(0, 2, (N,), generator=g)
    pb = torch.rand(N, generator=g, dtype=torch.float64)
    return {
        "draws": (logits.softmax(-1), y, {}),
        "logits": (logits, y, {"from_logits": True}),
        "one_draw": (logits[0].softmax(-1), y, {"n_bins": 10, "norm": "l2"}),
        "binary": (pb, yb, {"norm": "max"}),
        "classwise": (logits, y, {"from_logits": True, "classwise": True, "num_classes": C}),
    }


def _want(p, y, opts) -> dict:
    """The single-process metrics on the whole test set."""
    fl = opts.get("from_logits", False)
    ece_opts = {k: v for k, v in opts.items() if k != "num_classes"}
    return {"nll": float(cal.nll(p, y, from_logits=fl)), "accuracy": float(cal.accuracy(p, y, from_logits=fl)),
            "ece": float(cal.ece(p, y, **ece_opts)), "brier": float(cal.brier(p, y, from_logits=fl))}


def _rows(p, lo, hi):
    return p[..., lo:hi] if p.dim() == 1 else p[..., lo:hi, :]


def _outcome(fn):
    try:
        return {k: float(v) for k, v in fn().items()}
    except (ValueError, RuntimeError, TypeError) as e:
        return f"{type(e).__name__}: {e}"


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lo, hi = SPLITS[world][rank], SPLITS[world][rank + 1]
        res = {}
        for name, (p, y, opts) in _data().items():
            res[name] = _outcome(lambda: cal.evaluate(_rows(p, lo, hi), y[lo:hi], **opts))
            res[name + "/local"] = _outcome(lambda: cal.evaluate(_rows(p, lo, hi), y[lo:hi], distributed=False,
                                                                 **opts))
        p, y, _ = _data()["draws"]
        res["subset"] = _outcome(lambda: cal.evaluate(p[:, lo:hi], y[lo:hi], metrics=("brier", "nll")))
        # every shard empty
        res["all_empty"] = _outcome(lambda: cal.evaluate(p[:, :0], y[:0]))
        # a bad row on the last rank only: it names the argument, the others learn that it failed
        bad = p[:, lo:hi].clone()
        if rank == world - 1:
            bad[0, 0, 0] = -0.5
        res["bad_last"] = _outcome(lambda: cal.evaluate(bad, y[lo:hi]))
        # not a tensor on rank 0 (before any native pass)
        res["type_first"] = _outcome(lambda: cal.evaluate(p[:, lo:hi].tolist() if rank == 0 else p[:, lo:hi],
                                                          y[lo:hi]))
        # disagreeing C (every rank has rows), and binary [N] against [N, 2]
        k = 2 if rank == world - 1 else 3
        q = torch.full((5, k), 1.0 / k, dtype=torch.float64)
        res["classes"] = _outcome(lambda: cal.evaluate(q, torch.zeros(5, dtype=torch.long)))
        pb = torch.full((5,), 0.3, dtype=torch.float64)
        form = pb if rank == 0 else torch.stack([1 - pb, pb], -1)
        res["binary_mix"] = _outcome(lambda: cal.evaluate(form, torch.zeros(5, dtype=torch.long)))
        torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _close(got: dict, want: dict) -> None:
    assert isinstance(got, dict), got
    assert list(got) == list(want)
    for k, w in want.items():
        assert abs(got[k] - w) <= RTOL * abs(w), (k, got[k], w)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_metrics_of_the_concatenation(world):
    ranks = spawn_gloo(_worker, world)
    cases = _data()
    for name, (p, y, opts) in cases.items():
        want = _want(p, y, opts)
        for rank, res in enumerate(ranks):
            _close(res[name], want)
            lo, hi = SPLITS[world][rank], SPLITS[world][rank + 1]
            local = res[name + "/local"]
            if hi == lo:  # an empty shard alone has no metrics
                assert local.startswith("ValueError: no data points (N = 0)"), local
            else:  # the shard alone gives other values: the reduction mattered
                assert abs(local["nll"] - want["nll"]) > 1e-6, (name, rank)
    p, y, _ = cases["draws"]
    for res in ranks:
        _close(res["subset"], {"brier": float(cal.brier(p, y)), "nll": float(cal.nll(p, y))})
        assert res["all_empty"].startswith("ValueError: no data points (N = 0) on any process"), res["all_empty"]
        assert res["classes"].startswith("ValueError: the processes' probs have different numbers of classes C")
        assert res["binary_mix"].startswith("ValueError: some processes pass binary [N] probs and others [N, C]")
    last = ranks[-1]["bad_last"]
    assert last.startswith("ValueError: probs must be non-negative probabilities"), last
    assert ranks[0]["type_first"].startswith("TypeError: probs must be a torch.Tensor"), ranks[0]["type_first"]
    for res in ranks[:-1]:
        assert res["bad_last"].startswith("RuntimeError: evaluate failed on another process"), res["bad_last"]
    for res in ranks[1:]:
        assert res["type_first"].startswith("RuntimeError: evaluate failed on another process"), res["type_first"]


# ---- without torch.distributed: the plain metrics -----------------------------------------------
@pytest.mark.parametrize("case", list(_data()))
def test_local_equals_the_plain_metrics(case):
    p, y, opts = _data()[case]
    _close({k: float(v) for k, v in cal.evaluate(p, y, **opts).items()}, _want(p, y, opts))


def test_local_metric_subset_order_dtype_and_validate_false():
    p, y, _ = _data()["draws"]
    out = cal.evaluate(p.float(), y, metrics="ece")
    assert list(out) == ["ece"] and out["ece"].dtype == torch.float64 and out["ece"].dim() == 0
    assert float(out["ece"]) == pytest.approx(float(cal.ece(p.float(), y)), rel=1e-12)
    out = cal.evaluate(p, y, metrics=["accuracy", "nll"], validate=False)
    assert list(out) == ["accuracy", "nll"]
    assert float(out["accuracy"]) == float(cal.accuracy(p, y, validate=False))
    assert float(out["nll"]) == pytest.approx(float(cal.nll(p, y, validate=False)), rel=1e-12)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 3), (0,)])
def test_local_no_data_points(shape):
    with pytest.raises(ValueError, match=r"no data points \(N = 0\): probs has shape"):
        cal.evaluate(torch.empty(shape), torch.empty(0, dtype=torch.long))


P2 = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
Y2 = torch.tensor([1, 0, 1])


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"metrics": ("nll", "auroc")}, ValueError, r"metrics has unknown names \['auroc'\]"),
    ({"metrics": ()}, ValueError, "metrics is empty"),
    ({"metrics": ("nll", "nll")}, ValueError, "metrics names a metric twice"),
    ({"metrics": 3}, TypeError, "metrics must be a name or a sequence of names"),
    ({"n_bins": 0}, ValueError, r"n_bins must be in \[1, "),
    ({"norm": "l3"}, ValueError, "norm must be one of"),
    ({"classwise": True}, ValueError, "num_classes must be given when classwise=True"),
    ({"classwise": True, "num_classes": 3}, ValueError, "probs has C = 2 classes but num_classes = 3"),
    ({"distributed": True}, ValueError, "distributed=True but torch.distributed is not initialised"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cal.evaluate(P2, Y2, **kwargs)


@pytest.mark.parametrize("metrics", [("nll",), ("ece",), ("accuracy", "brier")])  # with and without the ECE pass
@pytest.mark.parametrize("probs, targets, exc, match", [
    (P2.tolist(), Y2, TypeError, "probs must be a torch.Tensor"),
    (P2.long(), Y2, TypeError, "probs must be a floating-point tensor"),
    (P2[:, :1], Y2, ValueError, "probs needs C >= 2 classes"),
    (P2, Y2.float(), TypeError, "targets must hold integer class indices"),
    (P2, Y2[:2], ValueError, "targets has N = 2 entries but probs has N = 3 points"),
    (P2, torch.tensor([1, 0, 2]), ValueError, r"targets must lie in \[0, 2\)"),
    (torch.tensor([[0.2, 0.8], [-0.1, 1.1], [0.5, 0.5]]), Y2, ValueError, "probs must be non-negative"),
    (torch.tensor([[0.2, 0.7], [0.6, 0.4], [0.5, 0.5]]), Y2, ValueError, "probs rows must sum to 1"),
    (torch.tensor([[0.2, float("nan")], [0.6, 0.4], [0.5, 0.5]]), Y2, ValueError, "probs has NaN or infinite"),
])
def test_bad_inputs_named(metrics, probs, targets, exc, match):
    with pytest.raises(exc, match=match):
        cal.evaluate(probs, targets, metrics=metrics)


def test_validate_false_still_checks_the_target_range_where_it_indexes():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        cal.evaluate(P2, torch.tensor([1, 0, 5]), metrics=("nll",), validate=False)
    with pytest.raises(ValueError, match="no valid rows to bin"):
        cal.evaluate(P2, torch.tensor([5, 5, 5]), metrics=("ece",), validate=False)
