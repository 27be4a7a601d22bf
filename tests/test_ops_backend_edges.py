"""Edge cases where the native kernels and the pure-PyTorch references disagreed (a stress test of
every op against its reference): each test runs both backends and demands the same result or the
same refusal, with every input unchanged after a refusal."""
import math

import pytest
import torch

from pyfastbayes import ops
from pyfastbayes.ops import HYPER, RNG

from _helpers import NATIVE

BACKENDS = ["native", "reference"] if NATIVE else ["reference"]


def _outcome(fn):
    """('ok', result) or (exception type, message) of fn()."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)


def _same_refusal(make_call, match):
    """Every backend refuses with the same message (matching ``match``); the inputs are unchanged."""
    msgs = set()
    for be in BACKENDS:
        call, inputs = make_call()
        before = [t.clone() for t in inputs]
        kind, msg = _outcome(lambda: call(be))
        assert kind == "RuntimeError", (be, kind, msg)
        assert all(torch.equal(a, b) for a, b in zip(inputs, before)), be
        msgs.add(msg)
    assert len(msgs) == 1, msgs
    import re
    assert re.search(match, msgs.pop())


def _hyper(lr=1e-3, temperature=1.0):
    h = torch.zeros(HYPER.size, dtype=torch.float64)
    h[HYPER.lr], h[HYPER.num_data], h[HYPER.temperature] = lr, 1.0, temperature
    return h


# native: offset + column overflowed int64 (different numbers from column 256 on); reference: fine
def test_swag_sample_offset_near_2_63_is_refused():
    def call():
        m, sq = torch.zeros(300), torch.ones(300)
        return (lambda be: ops.swag_sample(m, sq, None, 1, 1.0, 0.0, 1, 0, 2**63 - 100, backend=be)), [m, sq]
    _same_refusal(call, r"swag_sample: offset \+ 300 elements must be below 2\^63, got offset = 9223372036854775708")
    for be in BACKENDS:  # the largest offset that fits still draws
        assert ops.swag_sample(torch.zeros(300), torch.ones(300), None, 1, 1.0, 0.0, 1, 0, 2**63 - 301,
                               backend=be).isfinite().all()


# native: eps = 1e39 with float32 state gave [-inf, inf] draws; reference: a conversion error
def test_swag_sample_eps_beyond_float32_is_refused():
    def call():
        m, sq = torch.zeros(4), torch.ones(4)
        return (lambda be: ops.swag_sample(m, sq, None, 1, 1.0, 1e39, 0, 0, 0, backend=be)), [m, sq]
    _same_refusal(call, r"swag_sample: eps must be finite in float32 \(the state's dtype\), got 1e\+39")


# the reference gave 0 for rho in [-745, -710] (sigmoid underflows before softplus): the limit is -1
def test_vi_kl_backward_for_very_negative_rho():
    rho = torch.tensor([-40.0, -41.0, -709.0, -710.0, -720.0, -745.0, -746.0, -1e4], dtype=torch.float64)
    args = (torch.tensor(1.0, dtype=torch.float64), [torch.zeros(8, dtype=torch.float64)], [rho],
            torch.tensor([1.0], dtype=torch.float64))
    for be in BACKENDS:
        torch.testing.assert_close(ops.vi_kl_backward(*args, backend=be)[1][0], torch.full_like(rho, -1.0),
                                   rtol=0, atol=1e-15)


# the overlap check takes two strided views with more than 2^20 elements in their common window to
# share memory (the C++ sweep's cap); the reference checked exactly and accepted what native refused
@pytest.mark.parametrize("rows, refused", [(2**19 + 1, False), (2**20, True)])
def test_interleaved_views_are_judged_alike(rows, refused):
    for be in BACKENDS:
        x = torch.zeros(rows, 2)
        kind, msg = _outcome(lambda: ops.vi_sigma_sq_backward_(x[:, 0], x[:, 1], backend=be))
        assert (kind == "RuntimeError" and "rho overlaps grad" in msg) == refused, (be, kind, msg)


# the reference wrote the inference tensor, then torch raised; native refuses before any write
@pytest.mark.parametrize("op", ["sgld_step_", "philox_normal_", "swag_collect_", "kfac_factor_"])
def test_inference_tensors_are_refused_before_any_write(op):
    def call():
        with torch.inference_mode():
            t = torch.zeros(3) if op != "kfac_factor_" else torch.zeros(2, 2)
        if op == "sgld_step_":
            rng = torch.zeros(RNG.size, dtype=torch.int64)
            return (lambda be: ops.sgld_step_([t], [torch.ones(3)], _hyper(), rng, backend=be)), [t, rng], "params"
        if op == "philox_normal_":
            return (lambda be: ops.philox_normal_(t, 1, 0, 0, backend=be)), [t], "out"
        if op == "swag_collect_":
            return (lambda be: ops.swag_collect_([torch.ones(3)], t, backend=be)), [t], "mean"
        return (lambda be: ops.kfac_factor_(t, torch.ones(4, 2), backend=be)), [t], "factor"

    name = call()[2]
    _same_refusal(lambda: call()[:2], rf"{op}: {name} is an inference tensor \(made under torch.inference_mode\(\)\)")


# the op does not check hyper-parameter values (they may live on the device); the reference raised
# 'math domain error' where native gives NaN
@pytest.mark.parametrize("kind", ["lr", "temperature"])
def test_negative_noise_scale_gives_nan_on_both_backends(kind):
    for be in BACKENDS:
        p = torch.zeros(5)
        ops.sgld_step_([p], [torch.ones(5)], _hyper(**{kind: -1.0}), torch.zeros(RNG.size, dtype=torch.int64),
                       backend=be)
        assert torch.isnan(p).all(), be


# float8: the reference ran where native refuses, and named the dtypes otherwise than c10
@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_float8_is_refused_alike():
    f8 = torch.float8_e4m3fn

    def sgld():
        p = torch.zeros(4).to(f8)
        return (lambda be: ops.sgld_step_([p], [torch.zeros(4).to(f8)], _hyper(),
                                          torch.zeros(RNG.size, dtype=torch.int64), backend=be)), [p.view(torch.uint8)]

    def bins():
        probs = torch.full((1, 3, 2), 0.5).to(f8)
        return (lambda be: ops.calibration_bins(probs, torch.zeros(3, dtype=torch.long), 4, backend=be)), []

    _same_refusal(sgld, r"sgld_step_: params must be float64, float32, float16 or bfloat16, got Float8_e4m3fn")
    _same_refusal(bins, r"calibration_bins: probs must be float64, float32, float16 or bfloat16, got Float8_e4m3fn")


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="no float8_e8m0fnu in this torch")
def test_any_nonfinite_of_one_byte_floats():
    nan = torch.tensor([float("nan")]).to(torch.float8_e8m0fnu)  # torch.isfinite reads it as finite
    one = torch.tensor([1.0]).to(torch.float8_e4m3fnuz)  # torch.isfinite has no kernel for it
    for be in BACKENDS:
        assert bool(ops.any_nonfinite([nan], backend=be)) and not bool(ops.any_nonfinite([one], backend=be)), be
    assert math.isnan(float(nan.float()))
