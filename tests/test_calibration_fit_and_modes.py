"""Review findings on calibration (twelfth session), each a test that failed before its fix:
VectorScaling drove a class absent from the validation targets to a bias of ~-22 (never predicted
again); the LBFGS fits failed on logits made under inference_mode; a fit that ran out of
iterations said nothing; binary [N] half-precision probabilities formed 1 - p in half precision;
num_classes was not checked unless classwise; sync() summed top-label and binary bins."""
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import exit_without_teardown
from pyfastbayes import calibration as cal


def _val(C=5, absent=None, n=400):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (n,), generator=g)
    if absent is not None:
        y[y == absent] = 0
    z = torch.randn(n, C, generator=g, dtype=torch.float64) + 2.0 * torch.nn.functional.one_hot(y, C)
    return z, y


def test_vector_scaling_refuses_a_class_absent_from_the_targets():
    z, y = _val(absent=4)
    with pytest.raises(ValueError, match=r"targets never contain class\(es\) \[4\] of the C = 5"):
        cal.VectorScaling().fit(z, y)


@pytest.mark.parametrize("make", [lambda: cal.TemperatureScaling(method="lbfgs"), cal.VectorScaling])
def test_fits_take_logits_made_under_inference_mode(make):
    z, y = _val()
    ref = make().fit(z, y)
    with torch.inference_mode():
        zi, yi = z.clone(), y.clone()
        inside = make().fit(zi, yi)
    outside = make().fit(zi, yi)
    for fit in (inside, outside):
        for name in ("temperature", "weight", "bias"):
            if hasattr(ref, name):
                torch.testing.assert_close(getattr(fit, name).clone(), getattr(ref, name))


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_a_fit_that_runs_out_of_iterations_says_so(method):
    z, y = _val()
    with pytest.warns(RuntimeWarning, match="max_iter = 1 iterations ran out"):
        ts = cal.TemperatureScaling(method=method, max_iter=1).fit(z, y)
    assert ts.converged is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cal.TemperatureScaling(method=method).fit(z, y).converged is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_binary_half_precision_probabilities_keep_class_0_exact(dtype):
    p = torch.tensor([0.001, 0.003, 0.02], dtype=dtype)
    y = torch.zeros(3, dtype=torch.long)
    q = p.double()
    nll = [cal.nll(p[i:i + 1], y[i:i + 1]).item() for i in range(3)]
    assert nll == pytest.approx([-math.log1p(-v) for v in q.tolist()], rel=1e-5)
    torch.testing.assert_close(cal.predictive_entropy(p).double(), cal.predictive_entropy(q), rtol=1e-5, atol=0)


def test_num_classes_is_checked_without_classwise():
    m = cal.CalibrationError(num_classes=10)
    with pytest.raises(ValueError, match="C = 5 classes but num_classes = 10"):
        m.update(torch.softmax(torch.randn(20, 5), -1), torch.randint(0, 5, (20,)))


def _mixed_worker(rank, init_file, out_file):
    import torch._dynamo  # noqa: F401  (before the group: see tests/test_vi_distributed.py)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m = cal.CalibrationError()
        g = torch.Generator().manual_seed(rank)
        if rank == 0:
            m.update(torch.rand(8, generator=g), torch.randint(0, 2, (8,), generator=g))  # binary [N]
        else:
            m.update(torch.softmax(torch.randn(8, 2, generator=g), -1), torch.randint(0, 2, (8,), generator=g))
        try:
            m.sync()
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        torch.save(msg, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


def test_sync_refuses_top_label_and_binary_bins_on_different_ranks():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        mp.spawn(_mixed_worker, args=(os.path.join(d, "init"), out), nprocs=2, join=True)
        msgs = [torch.load(f"{out}.{r}") for r in (0, 1)]
    for msg in msgs:
        assert "1 rank(s) added [N, C] probs" in msg and "1 binary [N] probs" in msg


def test_equal_mass_bins_do_not_depend_on_the_rows_order():
    g = torch.Generator().manual_seed(0)
    conf = torch.where(torch.rand(1000, generator=g) < 0.4, torch.ones(1000), 0.5 + 0.5 * torch.rand(1000, generator=g))
    probs = torch.stack([1 - conf, conf], -1)
    y = (torch.rand(1000, generator=g) < conf).long()
    values = set()
    for seed in range(4):
        perm = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))
        for norm in ("l1", "l2", "max"):
            values.add((norm, round(float(cal.ece(probs[perm], y[perm], binning="adaptive", norm=norm)), 12)))
    assert len(values) == 3  # one value per norm, whatever the order
    # four rows, two tie groups: no cut through a group (the cut at 2 of 4 fell inside the 0.9s)
    p = torch.tensor([0.6, 0.9, 0.9, 0.9])
    y4 = torch.tensor([1, 1, 0, 0])
    a = float(cal.ece(p, y4, binning="adaptive", n_bins=2))
    b = float(cal.ece(p.flip(0), y4.flip(0), binning="adaptive", n_bins=2))
    assert a == pytest.approx(b, abs=1e-15)


@pytest.mark.parametrize("fn", [cal.expected_entropy, cal.mutual_information])
def test_per_draw_metrics_check_every_draw(fn):
    draws = torch.tensor([[[0.6, 0.6]], [[0.4, 0.4]]], dtype=torch.float64)  # mean row (0.5, 0.5) is valid
    with pytest.raises(ValueError, match="draw 0, row 0 sums to 1.2"):
        fn(draws)
    fn(draws, validate=False)  # the caller's choice
    fn(torch.tensor([[[0.7, 0.3]], [[0.2, 0.8]]], dtype=torch.float64))
