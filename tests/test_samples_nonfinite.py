"""SampleBuffer and draws holding NaN or inf (a diverged chain): collect stays free of host syncs
(the finiteness is a device-side flag per ring row); sample, predict and state_dict refuse the
buffer with a ValueError naming the draw; drop_nonfinite removes such draws, keeping the order."""
import pytest
import torch
from torch import nn

from pyfastbayes.posteriors import SampleBuffer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _set(model, value):
    """Write a recognisable draw: every parameter filled with ``value`` (one entry NaN/inf if given)."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _poison(model, bad):
    with torch.no_grad():
        model[2].bias[1] = bad


def _fill(buf, model, values, bad_at=(), bad=float("nan")):
    for i, v in enumerate(values):
        _set(model, v)
        if i in bad_at:
            _poison(model, bad)
        buf.collect(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_draw_is_refused_where_it_is_used(bad):
    model, x = _model(), torch.randn(5, 4)
    buf = SampleBuffer(model, max_samples=4)
    _fill(buf, model, [0.1, 0.2, 0.3], bad_at=(1,), bad=bad)
    assert len(buf) == 3 and buf.finite[:3].tolist() == [True, False, True]
    for use in (lambda: buf.predict(x), lambda: buf.predict(x, 4), lambda: buf.sample(2), buf.state_dict):
        with pytest.raises(ValueError, match=r"stored draw 1 of 3 \(0 = oldest; 1 in all\) holds NaN or inf.*"
                                             r"drop_nonfinite\(\)"):
            use()


def test_drop_nonfinite_keeps_the_finite_draws_in_order_and_predicts_like_a_clean_buffer():
    model, x = _model(), torch.randn(5, 4)
    buf = SampleBuffer(model, max_samples=3)
    # 5 collects into 3 rows: the ring wraps; stored oldest first: 0.3 (NaN), 0.4, 0.5 (NaN)
    _fill(buf, model, [0.1, 0.2, 0.3, 0.4, 0.5], bad_at=(2, 4))
    assert buf.drop_nonfinite() == 2
    assert len(buf) == 1 and buf.count == 5
    torch.testing.assert_close(buf.stored(), torch.full((1, buf.numel), 0.4))
    clean = SampleBuffer(model, max_samples=3)
    _fill(clean, model, [0.4])
    torch.testing.assert_close(buf.predict(x), clean.predict(x))
    # the ring goes on from the packed rows: the next two collects are stored after 0.4, in order
    _fill(buf, model, [0.6, 0.7])
    torch.testing.assert_close(buf.stored()[:, 0], torch.tensor([0.4, 0.6, 0.7]))
    assert buf.drop_nonfinite() == 0


def test_a_nonfinite_draw_that_leaves_the_ring_no_longer_blocks():
    model = _model()
    buf = SampleBuffer(model, max_samples=2)
    _fill(buf, model, [0.1, 0.2, 0.3], bad_at=(0,))  # the NaN draw 0.1 is overwritten by 0.3
    assert buf.sample(3).isfinite().all()


def test_a_thinned_out_nonfinite_call_is_not_stored_or_flagged():
    model = _model()
    buf = SampleBuffer(model, max_samples=4, thin=2)
    _fill(buf, model, [0.1, 0.2, 0.3], bad_at=(1,))  # call 2 is thinned out
    assert len(buf) == 2 and buf.finite.all()
    buf.predict(torch.randn(2, 4))


def test_loading_a_state_clears_the_flags_of_the_rows_it_overwrites():
    model = _model()
    good = SampleBuffer(model, max_samples=3)
    _fill(good, model, [0.1, 0.2])
    buf = SampleBuffer(model, max_samples=3)
    _fill(buf, model, [0.5, 0.6], bad_at=(0,))
    buf.load_state_dict(good.state_dict())
    torch.testing.assert_close(buf.sample(4, generator=torch.Generator().manual_seed(0)),
                               good.sample(4, generator=torch.Generator().manual_seed(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("buffer_device", ["cuda", "cpu"])
def test_cuda_collect_flags_nonfinite_draws(buffer_device):
    """On the GPU a collect into a GPU buffer makes no host synchronisation (torch's sync debug
    mode raises on one); a CPU buffer of GPU parameters flags the same way."""
    model = _model().cuda()
    buf = SampleBuffer(model, max_samples=3, device=buffer_device)
    _fill(buf, model, [0.1])
    torch.cuda.synchronize()
    _set(model, 0.2)
    _poison(model, float("nan"))
    if buffer_device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        buf.collect(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert buf.finite[:2].tolist() == [True, False]
    with pytest.raises(ValueError, match="stored draw 1 of 2"):
        buf.predict(torch.randn(2, 4, device="cuda"))
    assert buf.drop_nonfinite() == 1 and len(buf) == 1


def test_a_draw_that_overflows_the_storage_dtype_is_flagged():
    """Finite float32 parameters beyond float16's range are stored as inf: the stored row is what counts."""
    model = _model()
    buf = SampleBuffer(model, max_samples=2, dtype=torch.float16)
    _fill(buf, model, [0.5, 1e5])
    assert buf.finite[:2].tolist() == [True, False]
    with pytest.raises(ValueError, match="stored draw 1 of 2"):
        buf.sample(1)
