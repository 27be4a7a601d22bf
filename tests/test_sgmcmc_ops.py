"""Fused SG-MCMC ops vs their pure-PyTorch references (same Philox stream)."""
import pytest
import torch

from pyfastbayes import _reference as R
from pyfastbayes import ops

from conftest import ALL_DTYPES, DEVICES, needs_cuda, needs_native

OPS = {"sgld": (ops.sgld_step_, R.sgld_step_, False),
       "sghmc": (ops.sghmc_step_, R.sghmc_step_, True),
       "psgld": (ops.psgld_step_, R.psgld_step_, True)}
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-6, atol=1e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make_lists(dtype, device, gen):
    """Mixed sizes: empty, odd, aligned, an unaligned view, a non-contiguous view, a big one."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    params = [rnd(0), rnd(1), rnd(3), rnd(4, 5), rnd(1027)[1:], rnd(17, 9).t(), rnd(3, 4, 5), rnd(70_001)]
    grads = [rnd(*p.shape) for p in params]
    bufs = [rnd(*p.shape).abs() for p in params]  # |.|: pSGLD's square_avg must be >= 0
    return params, grads, bufs


def hyper_for(kind, device):
    extra = {"sgld": [0.0, 0.0], "sghmc": [0.1, 0.0], "psgld": [0.9, 1e-3]}[kind]
    return torch.tensor([1e-3, 0.7, 500.0, 2.0] + extra, dtype=torch.float64, device=device)


def run(fn, has_buf, params, grads, bufs, hyper, rng, skip=None):
    args = [params, grads] + ([bufs] if has_buf else []) + [hyper, rng, skip]
    fn(*args)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kind", list(OPS))
def test_fused_matches_reference(kind, dtype, device):
    fused, ref, has_buf = OPS[kind]
    gen = torch.Generator().manual_seed(hash((kind, str(dtype))) % 2**31)
    p1, g, b1 = make_lists(dtype, device, gen)
    p2 = [p.clone() for p in p1]
    b2 = [b.clone() for b in b1]
    hyper = hyper_for(kind, device)
    rng1 = torch.tensor([123456789012345, 5], dtype=torch.int64, device=device)
    rng2 = rng1.clone()
    for _ in range(3):
        run(fused, has_buf, p1, g, b1, hyper, rng1)
        run(ref, has_buf, p2, g, b2, hyper, rng2)
    assert rng1.tolist() == rng2.tolist() == [123456789012345, 8]
    for a, e in zip(p1 + (b1 if has_buf else []), p2 + (b2 if has_buf else [])):
        assert a.dtype == dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, **TOL[dtype])


@needs_native
@pytest.mark.parametrize("kind", list(OPS))
def test_noise_is_injected_with_the_right_scale(kind):
    """Zero gradient, zero prior: the update is pure noise of known standard deviation."""
    fused, _, has_buf = OPS[kind]
    n = 400_000
    p, g, b = [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)]
    lr, temp = 1e-2, 0.5
    hyper = torch.tensor([lr, temp, 10.0, 0.0, 0.1 if kind == "sghmc" else 0.0, 1.0], dtype=torch.float64)
    run(fused, has_buf, p, g, b, hyper, torch.tensor([7, 0]))
    expected = {"sgld": (lr * temp) ** 0.5, "sghmc": (2 * 0.1 * lr * temp) ** 0.5,
                "psgld": (lr * temp / (1.0 + 0.0)) ** 0.5}[kind]  # pSGLD: V = 0 -> G = 1/eps = 1
    assert abs(p[0].std().item() / expected - 1) < 5 * (0.5 / n) ** 0.5


@needs_native
@pytest.mark.parametrize("kind", list(OPS))
def test_skip_flag_changes_nothing(kind):
    fused, _, has_buf = OPS[kind]
    p, g, b = make_lists(torch.float32, "cpu", torch.Generator().manual_seed(3))
    p0, b0 = [x.clone() for x in p], [x.clone() for x in b]
    rng = torch.tensor([1, 2])
    run(fused, has_buf, p, g, b, hyper_for(kind, "cpu"), rng, torch.tensor(True))
    assert rng.tolist() == [1, 2]
    for a, e in zip(p + b, p0 + b0):
        assert torch.equal(a, e)
    run(fused, has_buf, p, g, b, hyper_for(kind, "cpu"), rng, torch.tensor(False))
    assert rng.tolist() == [1, 3] and not torch.equal(p[-1], p0[-1])


@needs_native
@pytest.mark.parametrize("kind", list(OPS))
def test_opcheck(kind):
    op = getattr(torch.ops.pyfastbayes, f"{kind}_step_").default
    _, _, has_buf = OPS[kind]
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    g = [torch.randn_like(x) for x in p]
    b = [torch.rand_like(x) for x in p]
    args = [p, g] + ([b] if has_buf else []) + [hyper_for(kind, "cpu"), torch.tensor([3, 0])]
    torch.library.opcheck(op, tuple(args))
    torch.library.opcheck(op, tuple(args), {"skip": torch.tensor(False)})


@needs_native
def test_any_nonfinite():
    ts = [torch.zeros(10), torch.ones(3, dtype=torch.float64), torch.zeros(0), torch.ones(70_000, dtype=torch.bfloat16)]
    assert not ops.any_nonfinite(ts).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        ts[3][65_537] = bad
        assert ops.any_nonfinite(ts).item() and R.any_nonfinite(ts).item()
        ts[3][65_537] = 0
    ts[1][0] = 1e300  # large but finite double: not flagged
    assert not ops.any_nonfinite(ts).item()
    torch.library.opcheck(torch.ops.pyfastbayes.any_nonfinite.default, ([torch.randn(4), torch.randn(3)],))


@needs_native
def test_op_level_argument_checks():
    p, g = [torch.zeros(3)], [torch.zeros(3)]
    hyper, rng = hyper_for("sgld", "cpu"), torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="1 params but 2 grads"):
        ops.sgld_step_(p, g + g, hyper, rng)
    with pytest.raises(RuntimeError, match="one dtype per call"):
        ops.sgld_step_(p + [torch.zeros(2, dtype=torch.float64)], g + [torch.zeros(2, dtype=torch.float64)], hyper, rng)
    with pytest.raises(RuntimeError, match="shape"):
        ops.sgld_step_(p, [torch.zeros(4)], hyper, rng)
    with pytest.raises(RuntimeError, match="hyper must be"):
        ops.sgld_step_(p, g, hyper.float(), rng)
    with pytest.raises(RuntimeError, match="rng must be"):
        ops.sgld_step_(p, g, hyper, torch.tensor([0, 0, 0]))
    assert torch.equal(p[0], torch.zeros(3)) and rng.tolist() == [0, 0]


@needs_cuda
@pytest.mark.parametrize("kind", list(OPS))
def test_cuda_matches_cpu(kind):
    fused, _, has_buf = OPS[kind]
    p, g, b = make_lists(torch.float32, "cpu", torch.Generator().manual_seed(5))
    pc, gc, bc = ([x.cuda() for x in lst] for lst in (p, g, b))
    run(fused, has_buf, p, g, b, hyper_for(kind, "cpu"), torch.tensor([9, 1]))
    run(fused, has_buf, pc, gc, bc, hyper_for(kind, "cuda"), torch.tensor([9, 1], device="cuda"))
    for a, e in zip(pc, p):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_graph_capture_with_changing_lr():
    """A captured step replays with the live lr/temperature and advances the RNG each replay."""
    n = 10_000
    p = [torch.zeros(n, device="cuda")]
    g = [torch.ones(n, device="cuda")]
    hyper = torch.tensor([1e-3, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64, device="cuda")
    rng = torch.tensor([1, 0], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.sgld_step_(p, g, hyper, rng)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sgld_step_(p, g, hyper, rng)
    p[0].zero_()
    rng[1] = 0
    lrs = [1e-3, 2e-3, 5e-3]
    for lr in lrs:
        hyper[0] = lr
        graph.replay()
    torch.cuda.synchronize()
    # T = 0: deterministic, theta = -sum(lr/2 * g)
    torch.testing.assert_close(p[0], torch.full_like(p[0], -sum(lrs) / 2))
    assert rng[1].item() == 3


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_empty_group_still_checks_and_advances_rng(device):
    hyper, rng = hyper_for("sgld", device), torch.tensor([4, 7], device=device)
    ops.sgld_step_([], [], hyper, rng)
    assert rng.tolist() == [4, 8]
    with pytest.raises(RuntimeError, match="rng must be"):
        ops.sgld_step_([], [], hyper, torch.tensor([4], device=device))
    with pytest.raises(RuntimeError, match="skip must be"):
        ops.sgld_step_([], [], hyper, rng, torch.tensor(1.0, device=device))
    assert rng.tolist() == [4, 8]


@needs_native
def test_ops_trace_under_torch_compile():
    """The fake kernels let dynamo/AOT trace the mutating ops (fullgraph), with eager numbers."""
    def step_and_score(ps, gs, bufs, hyper, rng):
        torch.ops.pyfastbayes.sghmc_step_.default(ps, gs, bufs, hyper, rng)
        return sum((p * p).sum() for p in ps) + ops.any_nonfinite(gs).float()

    gen = torch.Generator().manual_seed(2)
    make = lambda: ([torch.randn(7, generator=gen), torch.randn(3, 5, generator=gen)],)  # noqa: E731
    (p1,) = make()
    g = [torch.randn_like(x) for x in p1]
    p2, b1, b2 = [x.clone() for x in p1], [torch.zeros_like(x) for x in p1], [torch.zeros_like(x) for x in p1]
    hyper = hyper_for("sghmc", "cpu")
    rng1, rng2 = torch.tensor([5, 0]), torch.tensor([5, 0])
    compiled = torch.compile(step_and_score, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        out_c = compiled(p1, g, b1, hyper, rng1)
        out_e = step_and_score(p2, g, b2, hyper, rng2)
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(p1 + b1, p2 + b2):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert rng1.tolist() == rng2.tolist() == [5, 2]
