"""Native-level reliability (issue 8): what the raw ops refuse before any write, and what they
must not cost. Every test calls ``torch.ops.pyfastbayes.*`` directly (no Python wrapper)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from pyfastbayes import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason="needs the compiled extension")

P = torch.ops.pyfastbayes
OVERLAP = r" \(the same memory twice in one call\); pass each tensor once"


def hyper(a=0.1, b=1e-5):
    return torch.tensor([1e-2, 1.0, 10.0, 1.0, a, b], dtype=torch.float64)


def step(kind, ps, gs, bs, rng):
    if kind == "sgld":
        P.sgld_step_(ps, gs, hyper(), rng)
    elif kind == "sghmc":
        P.sghmc_step_(ps, gs, bs, hyper(), rng)
    else:
        P.psgld_step_(ps, gs, bs, hyper(0.99), rng)


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def unchanged(tensors, before):
    return all(torch.equal(a, b) for a, b in zip(tensors, before))


# ---- item 3: the same memory twice in one call ---------------------------------------------------

def test_the_same_param_twice_is_refused_before_any_write():
    p, q, g = torch.randn(5), torch.randn(3), torch.randn(5)
    rng = torch.tensor([1, 0])
    before = snapshot(p, q)
    with pytest.raises(RuntimeError, match=r"^sgld_step_: params\[1\] overlaps params\[0\]" + OVERLAP):
        P.sgld_step_([p, p], [g, g], hyper(), rng)
    with pytest.raises(RuntimeError, match=r"sgld_step_: params\[2\] overlaps params\[0\]"):
        P.sgld_step_([p, q, p], [g, torch.randn(3), g], hyper(), rng)
    assert unchanged([p, q], before) and rng.tolist() == [1, 0]


def test_overlapping_views_of_one_tensor_are_refused():
    x = torch.randn(10)
    rng = torch.tensor([1, 0])
    before = snapshot(x)
    with pytest.raises(RuntimeError, match=r"params\[1\] overlaps params\[0\]"):
        P.sgld_step_([x[0:6], x[4:10]], [torch.randn(6), torch.randn(6)], hyper(), rng)
    m = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match=r"params\[1\] overlaps params\[0\]"):  # a row and a column cross
        P.sgld_step_([m[1], m[:, 2]], [torch.randn(4), torch.randn(4)], hyper(), rng)
    assert unchanged([x], before) and rng.tolist() == [1, 0]


@pytest.mark.parametrize("case", ["grad_is_param", "buf_is_param", "buf_views_param", "buf_is_grad", "buf_twice"])
def test_a_param_or_buffer_overlapping_another_argument_is_refused(case):
    p, g, b = [torch.randn(6), torch.randn(4)], [torch.randn(6), torch.randn(4)], [torch.rand(6), torch.rand(4)]
    kind, msg = "sghmc", None
    if case == "grad_is_param":
        kind, g[1], msg = "sgld", p[1], r"sgld_step_: grads\[1\] overlaps params\[1\]"
    elif case == "buf_is_param":
        b[0], msg = p[0], r"sghmc_step_: momenta\[0\] overlaps params\[0\]"
    elif case == "buf_views_param":
        big = torch.randn(10)
        p[0], b[1] = big[:6], big[5:9]
        msg = r"sghmc_step_: momenta\[1\] overlaps params\[0\]"
    elif case == "buf_is_grad":
        kind, b[1], msg = "psgld", g[0][:4], r"psgld_step_: square_avg\[1\] overlaps grads\[0\]"
    else:
        kind, b[1], msg = "psgld", b[0][2:], r"psgld_step_: square_avg\[1\] overlaps square_avg\[0\]"
    rng = torch.tensor([3, 4])
    before = snapshot(*p, *g, *b)
    with pytest.raises(RuntimeError, match=msg + OVERLAP):
        step(kind, p, g, b, rng)
    assert unchanged(p + g + b, before) and rng.tolist() == [3, 4]


def test_grads_may_share_memory_with_each_other():
    """Only what a call writes must be alone: read-only arguments may alias each other."""
    p, g = [torch.randn(5), torch.randn(5)], torch.randn(5)
    expect = snapshot(*p)
    P.sgld_step_(expect, [g.clone(), g.clone()], hyper(), torch.tensor([1, 0]))
    P.sgld_step_(p, [g, g], hyper(), torch.tensor([1, 0]))
    assert all(torch.equal(a, e) for a, e in zip(p, expect))


@pytest.mark.parametrize("kind", ["sgld", "sghmc", "psgld"])
def test_disjoint_views_of_one_storage_are_allowed(kind):
    """Rows 0-1 and 2-3 of one matrix, and its interleaved columns, are distinct memory."""
    x, m = torch.randn(4, 3), torch.rand(4, 3)
    y = torch.randn(3, 4)
    ps = [x[0:2], x[2:4], y[:, 0], y[:, 1], y[:, 3]]
    bs = [m[0:2], m[2:4], torch.rand(3), torch.rand(3), torch.rand(3)]
    gs = [torch.randn(t.shape) for t in ps]
    ref_p, ref_b, col2 = snapshot(*ps), snapshot(*bs), y[:, 2].clone()
    step(kind, ref_p, gs, ref_b, torch.tensor([5, 2]))
    rng = torch.tensor([5, 2])
    step(kind, ps, gs, bs, rng)
    assert all(torch.equal(a, e) for a, e in zip(ps, ref_p)) and rng.tolist() == [5, 3]
    if kind != "sgld":
        assert all(torch.equal(a, e) for a, e in zip(bs, ref_b))
    assert torch.equal(x, torch.cat(ref_p[:2])) and torch.equal(y[:, 2], col2), "nothing else written"


def test_many_row_views_of_one_storage():
    """Hundreds of disjoint views: accepted, and an overlap among them is found wherever it is."""
    x = torch.randn(600, 8)
    order = torch.randperm(600).tolist()
    rows = [x[i] for i in order]
    grads = [torch.randn(8) for _ in rows]
    P.sgld_step_(rows, grads, hyper(), torch.tensor([0, 0]))
    at = order.index(3)
    j = 417 if at != 417 else 418
    rows[j], grads[j] = x[3, 1:], torch.randn(7)  # inside row 3, shorter: the memory of rows[at] again
    first, second = sorted([at, j])
    with pytest.raises(RuntimeError, match=rf"params\[{second}\] overlaps params\[{first}\]"):
        P.sgld_step_(rows, grads, hyper(), torch.tensor([0, 0]))


def random_view(base, gen, shape):
    """A view of `base` (1-D) with the given 1-D or 2-D shape, random offset and strides."""
    if len(shape) == 1:
        step = int(torch.randint(1, 4, (), generator=gen))
        span = (shape[0] - 1) * step + 1
        off = int(torch.randint(0, base.numel() - span + 1, (), generator=gen))
        return base.as_strided(shape, (step,), off)
    inner = int(torch.randint(1, 3, (), generator=gen))
    outer = shape[1] * inner + int(torch.randint(0, 3, (), generator=gen))
    strides = (outer, inner) if torch.rand((), generator=gen) < 0.7 else (inner, outer)  # or column-major
    span = (shape[0] - 1) * strides[0] + (shape[1] - 1) * strides[1] + 1
    off = int(torch.randint(0, base.numel() - span + 1, (), generator=gen))
    return base.as_strided(shape, strides, off)


def offsets(view, base):
    idx = torch.arange(base.numel()).as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())
    return set(idx.flatten().tolist())


def test_overlap_check_agrees_with_brute_force():
    """Random strided views of two buffers: refused exactly when a param shares an element with another
    param or any grad (read-only grads may share with each other)."""
    gen = torch.Generator().manual_seed(0)
    refused = accepted = 0
    for trial in range(300):
        bufs = [torch.zeros(64), torch.zeros(64)]
        n = int(torch.randint(1, 5, (), generator=gen))
        shapes = [(int(torch.randint(1, 6, (), generator=gen)),) if torch.rand((), generator=gen) < 0.5
                  else tuple(int(v) for v in torch.randint(1, 4, (2,), generator=gen)) for _ in range(n)]
        pick = lambda: bufs[int(torch.randint(0, 2, (), generator=gen))]
        ps = [random_view(pick(), gen, sh) for sh in shapes]
        gs = [random_view(pick(), gen, sh) for sh in shapes]
        sets = [(offsets(v, v._base), v._base.data_ptr()) for v in ps + gs]

        def meet(a, b):
            return sets[a][1] == sets[b][1] and bool(sets[a][0] & sets[b][0])

        # a param sharing an element with another argument, or with itself (e.g. the column-major
        # view (3, 2) with strides (1, 2): elements [2, 0] and [0, 1] are one; found in review)
        self_overlap = any(len(sets[i][0]) < ps[i].numel() for i in range(n))
        expect = self_overlap or any(meet(i, j) for i in range(n) for j in range(2 * n) if j != i)
        before = [b.clone() for b in bufs]
        try:
            P.sgld_step_(ps, gs, hyper(), torch.tensor([1, 0]))
            assert not expect, f"trial {trial}: an overlap went through"
            accepted += 1
        except RuntimeError as e:
            assert expect, f"trial {trial}: refused without an overlap: {e}"
            assert "overlap" in str(e) and all(torch.equal(a, b) for a, b in zip(bufs, before))
            refused += 1
    assert refused > 30 and accepted > 30, (refused, accepted)


def test_swag_collect_state_overlapping_anything_is_refused():
    ps = [torch.randn(3), torch.randn(2)]
    mean, sq, dev = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    big = torch.zeros(10)
    bad = [
        ((ps, mean, mean, dev, 1), r"swag_collect_: sq_mean overlaps mean"),
        ((ps, mean, sq, sq, 1), r"swag_collect_: deviation overlaps sq_mean"),
        ((ps, big[:5], sq, big[4:9], 1), r"swag_collect_: deviation overlaps mean"),
        (([mean[:3], ps[1]], mean, sq, dev, 1), r"swag_collect_: mean overlaps params\[0\]"),
        (([ps[0], dev[3:]], mean, sq, dev, 1), r"swag_collect_: deviation overlaps params\[1\]"),
    ]
    before = snapshot(*ps, mean, sq, dev, big)
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg + OVERLAP):
            P.swag_collect_(*args)
    assert unchanged([*ps, mean, sq, dev, big], before)
    P.swag_collect_([big[:3], big[3:5]], big[5:10], None, None, 0)  # disjoint parts of one buffer: fine
    assert torch.equal(big[5:], big[:5])


# ---- item 2c: a mutated tensor with internal overlap -----------------------------------------------

@pytest.mark.parametrize("kind", ["sgld", "sghmc"])
def test_expanded_mutated_tensor_is_refused_up_front(kind):
    q, e = torch.randn(4), torch.zeros(1).expand(4)
    ps, bs = ([q, e], [torch.rand(4), torch.rand(4)]) if kind == "sgld" else ([q, torch.randn(4)], [torch.rand(4), e])
    what = r"params\[1\]" if kind == "sgld" else r"momenta\[1\]"
    rng = torch.tensor([1, 6])
    before = snapshot(q, *bs)
    with pytest.raises(RuntimeError, match=rf"{kind}_step_: {what} has internal overlap .*\.clone\(\)"):
        step(kind, ps, [torch.randn(4), torch.randn(4)], bs, rng)
    assert unchanged([q, *bs], before) and rng.tolist() == [1, 6], "nothing written, the RNG did not advance"


def test_expanded_out_of_philox_normal_is_refused():
    out = torch.zeros(1).expand(8)
    with pytest.raises(RuntimeError, match=r"philox_normal_: out has internal overlap"):
        P.philox_normal_(out, 1, 2, 3)
    assert out.eq(0).all()


def test_mutated_non_contiguous_tensors_without_overlap_still_work():
    p, m = torch.randn(3, 4).t(), torch.rand(3, 4).t()
    g = torch.randn(4, 3)
    ref_p, ref_m = p.contiguous(), m.contiguous()
    P.sghmc_step_([ref_p], [g], [ref_m], hyper(), torch.tensor([2, 0]))
    P.sghmc_step_([p], [g], [m], hyper(), torch.tensor([2, 0]))
    assert torch.equal(p, ref_p) and torch.equal(m, ref_m)
    out, ref = torch.zeros(6, 4)[:, 1], torch.zeros(6)
    P.philox_normal_(ref, 1, 2, 3)
    P.philox_normal_(out, 1, 2, 3)
    assert torch.equal(out, ref)


# ---- item 12 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2**53, 2**62, 2**63 - 1])
def test_swag_collect_refuses_n_it_cannot_weigh(n):
    ps, mean, sq = [torch.randn(4)], torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"swag_collect_: n \(models averaged so far\) must be < 2\*\*53"):
        P.swag_collect_(ps, mean, sq, None, n)
    assert mean.eq(0).all() and sq.eq(0).all()


def test_swag_collect_takes_the_largest_n():
    ps, mean = [torch.ones(4, dtype=torch.float64)], torch.zeros(4, dtype=torch.float64)
    P.swag_collect_(ps, mean, None, None, 2**53 - 1)
    assert torch.equal(mean, torch.full((4,), 2.0**-53, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.complex32])
def test_any_nonfinite_sees_complex_nan_and_inf(dtype):
    ok = torch.randn(7, dtype=torch.complex64).to(dtype)
    assert not P.any_nonfinite([ok]).item()
    for bad in [complex(float("nan"), 0.0), complex(1.0, float("nan")), complex(0.0, float("inf")),
                complex(float("-inf"), 2.0)]:
        x = ok.clone()
        x[3] = bad
        assert P.any_nonfinite([torch.randn(3), x]).item(), bad
        assert P.any_nonfinite([x[1::2]]).item(), "non-contiguous"
        assert P.any_nonfinite([x.conj()]).item(), "conjugate view"


# ---- clear errors: sparse inputs, no tensor ------------------------------------------------------------

def sparse_calls():
    s1, s2 = torch.zeros(4).to_sparse(), torch.eye(3).to_sparse()
    d4 = torch.zeros(4)
    h, r = hyper(), torch.tensor([0, 0])
    return [
        ("sgld_step_", "grads[0]", lambda: P.sgld_step_([d4], [s1], h, r)),
        ("sghmc_step_", "params[0]", lambda: P.sghmc_step_([s1], [d4], [d4.clone()], h, r)),
        ("psgld_step_", "square_avg[0]", lambda: P.psgld_step_([d4], [d4.clone()], [s1], h, r)),
        ("any_nonfinite", "tensors[1]", lambda: P.any_nonfinite([d4, s1])),
        ("philox4x32", "counters", lambda: P.philox4x32(torch.zeros(2, 4, dtype=torch.long).to_sparse(), 1, 2)),
        ("philox_normal_", "out", lambda: P.philox_normal_(s1, 1, 2, 3)),
        ("calibration_bins", "probs", lambda: P.calibration_bins(torch.ones(1, 2, 1).to_sparse(),
                                                                  torch.zeros(2, dtype=torch.long), 5)),
        ("swag_collect_", "deviation", lambda: P.swag_collect_([d4], d4.clone(), d4.clone(), s1, 0)),
        ("swag_sample", "D", lambda: P.swag_sample(torch.zeros(3), torch.ones(3), s2, 2, 1.0, 0.0, 1)),
        ("swag_sample", "D", lambda: P.swag_sample(torch.zeros(3), torch.ones(3), torch.eye(3).to_sparse_csr(),
                                                    2, 1.0, 0.0, 1)),
        ("loss_hessian", "V", lambda: P.loss_hessian("mse", torch.zeros(2, 3), torch.zeros(2, 3, 1).to_sparse())),
        ("landscape_points_", "coords", lambda: P.landscape_points_(d4, torch.zeros(1, 4), torch.zeros(2, 1).to_sparse(),
                                                                    torch.zeros(2, 4))),
        ("kfac_factor_", "x", lambda: P.kfac_factor_(torch.zeros(5, 5), torch.zeros(3, 4).to_sparse(), 1.0, True)),
        ("vi_sample", "rho", lambda: P.vi_sample(d4, s1, r, 0)),
        ("vi_sample_backward", "grad_w", lambda: P.vi_sample_backward(s1, d4, r, 0)),
        ("vi_local_noise", "mean", lambda: P.vi_local_noise(s1, d4, r, 0)),
        ("vi_local_noise_backward", "var", lambda: P.vi_local_noise_backward(d4, s1, r, 0)),
        ("vi_rademacher_", "out", lambda: P.vi_rademacher_(s1, r, 0)),
        ("vi_rademacher_", "rng", lambda: P.vi_rademacher_(d4.clone(), r.to_sparse(), 0)),
        ("vi_rademacher_mul", "x", lambda: P.vi_rademacher_mul(s1, r, 0)),
        ("vi_kl", "mus[1]", lambda: P.vi_kl([d4, s1], [d4, d4], torch.ones(2, dtype=torch.float64))),
        ("vi_kl", "prior_var", lambda: P.vi_kl([d4], [d4], torch.ones(1, dtype=torch.float64).to_sparse())),
        ("vi_kl_backward", "rhos[0]", lambda: P.vi_kl_backward(torch.tensor(1.0), [d4], [s1],
                                                               torch.ones(1, dtype=torch.float64))),
        ("vi_sigma_sq", "rho", lambda: P.vi_sigma_sq(s1)),
        ("vi_sigma_sq_backward_", "rho", lambda: P.vi_sigma_sq_backward_(d4.clone(), s1)),
        ("vi_sigma_sq_and_backward_", "grad", lambda: P.vi_sigma_sq_and_backward_(s1, d4)),
    ]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("op,arg,call", sparse_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_sparse_inputs_raise_a_clear_error(op, arg, call):
    with pytest.raises(RuntimeError, match=rf"^{op}: {arg.replace('[', '.').replace(']', '.')} is a sparse tensor "
                                           r"\(torch\.sparse_c..\); .*pass dense tensors \(\.to_dense\(\)\)"):
        call()


def test_every_op_refuses_sparse_inputs():
    ops = sorted({n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyfastbayes::")})
    assert len(ops) >= 19
    for name in ops:
        for key in ["SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfastbayes::{name}", key), (name, key)


def test_any_nonfinite_of_no_tensor_is_false():
    out = P.any_nonfinite.default([])
    assert out.dtype == torch.bool and out.device.type == "cpu" and out.dim() == 0 and not out.item()


# ---- item 17: CPU scratch of calibration_bins bounded by the input ------------------------------

MEASURE = textwrap.dedent("""
    import sys, torch, pyfastbayes
    torch.set_num_threads(int(sys.argv[3]))
    P = torch.ops.pyfastbayes
    P.calibration_bins(torch.full((2, 4, 3), 1 / 3), torch.zeros(4, dtype=torch.long), 15)  # start the pool
    S, N, C = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
    probs, y = torch.full((S, N, C), 1.0 / C), torch.zeros(N, dtype=torch.long)

    def status(key):  # KiB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    # the peak RSS (VmHWM) restarts from the current RSS: ru_maxrss would also count the parent's
    # RSS at the fork, which an exec keeps
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    bins, diag = P.calibration_bins(probs, y, 15)
    peak = status("VmHWM")
    assert bins[:, 0].sum().item() == N and diag.sum().item() == 0
    print((peak - before) / 1024)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("S,N,C", [(2, 1, 256_000), (2, 2, 1_000_000)])
def test_calibration_bins_scratch_is_bounded(S, N, C):
    """S > 1 draws used to cost 256 * C doubles per thread whatever N: +502 MiB for a 2 MiB input."""
    res = subprocess.run([sys.executable, "-c", MEASURE, str(S), str(N), "4", str(C)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    grew_mib = float(res.stdout.split()[-1])
    assert grew_mib < 64, f"peak memory grew by {grew_mib:.0f} MiB for a {S * N * C * 4 / 2**20:.0f} MiB input"


# ---- every argument checked before the first write ----------------------------------------------------

def test_float8_tensors_get_a_clear_error_or_are_checked():
    f8 = torch.tensor([0.5, float("nan"), 1.0]).to(torch.float8_e4m3fn)
    rng = torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match=r"sgld_step_: params must be float64, float32, float16 or bfloat16, "
                                           r"got Float8_e4m3fn"):
        P.sgld_step_([f8], [f8.clone()], hyper(), rng)
    with pytest.raises(RuntimeError, match=r"calibration_bins: probs must be float64, float32, float16 or bfloat16"):
        P.calibration_bins(torch.ones(1, 2, 1).to(torch.float8_e5m2), torch.zeros(2, dtype=torch.long), 4)
    assert rng.tolist() == [0, 0]
    assert P.any_nonfinite([f8]).item() and not P.any_nonfinite([f8[::2]]).item()
    assert P.any_nonfinite([torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2)]).item()


@pytest.mark.parametrize("kind", ["sgld", "sghmc", "psgld"])
def test_a_bad_last_argument_leaves_every_tensor_and_the_rng_unchanged(kind):
    def lists():
        return [torch.randn(5) for _ in range(3)], [torch.randn(5) for _ in range(3)], [torch.rand(5) for _ in range(3)]

    bad = {
        "grads[2] dtype": lambda p, g, b: g.__setitem__(2, g[2].double()),
        "grads[2] shape": lambda p, g, b: g.__setitem__(2, torch.randn(6)),
        "params[2] expanded": lambda p, g, b: p.__setitem__(2, torch.zeros(1).expand(5)),
        "params[2] is params[0]": lambda p, g, b: p.__setitem__(2, p[0]),
    }
    if kind != "sgld":
        bad["state[2] shape"] = lambda p, g, b: b.__setitem__(2, torch.rand(4))
        bad["state[2] is grads[1]"] = lambda p, g, b: b.__setitem__(2, g[1])
    for what, spoil in bad.items():
        p, g, b = lists()
        spoil(p, g, b)
        before = snapshot(*p, *b)
        rng = torch.tensor([7, 11])
        with pytest.raises(RuntimeError):
            step(kind, p, g, b, rng)
        assert unchanged(p + b, before) and rng.tolist() == [7, 11], what


def test_the_rng_step_wraps_like_torch_int64():
    rng = torch.tensor([3, 2**63 - 1])
    P.sgld_step_([torch.zeros(4)], [torch.zeros(4)], hyper(), rng)
    assert rng.tolist() == [3, -(2**63)] == (torch.tensor([3, 2**63 - 1]) + torch.tensor([0, 1])).tolist()


# ---- layouts ----------------------------------------------------------------------------------------------

def test_layouts_have_the_agreed_shape():
    assert _native._C.layouts() == {
        "sgmcmc_hyper": {"lr": 0, "temperature": 1, "num_data": 2, "prior_precision": 3, "a": 4, "b": 5, "size": 6},
        "rng": {"seed": 0, "step": 1, "size": 2},
        "calibration_stats": {"count": 0, "confidence": 1, "correct": 2, "size": 3},
        "calibration_diag": {"bad_sum": 0, "negative": 1, "bad_target": 2, "nonfinite": 3, "size": 4},
        "swag": {"diag_stream": 0x53570000, "lowrank_stream": 0x5357FFFF, "max_draws": 0xFFFF},
    }
