"""pyfastbayes.optim: a step is all-or-nothing, and no memory is updated twice (issue 8, items 2, 3)."""
import pytest
import torch
from torch import nn

from pyfastbayes import optim

from _helpers import NATIVE

BACKENDS = [False] + ([True] if NATIVE else [])  # fused=False: reference, True: native kernel
SAMPLERS = {"SGLD": dict(), "SGHMC": dict(friction=0.2), "PSGLD": dict(alpha=0.9, eps=1e-2)}


def snapshot(opt):
    """Every parameter and every state tensor of ``opt``, cloned."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()}
    return params, state


def assert_unchanged(opt, snap):
    params, state = snapshot(opt)
    for a, b in zip(params, snap[0]):
        assert torch.equal(a, b)
    assert state.keys() == snap[1].keys()
    for k in state:
        assert state[k].keys() == snap[1][k].keys()
        for name in state[k]:
            assert torch.equal(state[k][name], snap[1][k][name]), name


def two_group_optimizer(name, fused):
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(4))
    opt = getattr(optim, name)([{"params": [a]}, {"params": [b], "lr": 2e-3}], lr=1e-3, num_data=10,
                               fused=fused, **SAMPLERS[name])
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.step()  # state (rng, buffers) exists for both groups
    return opt, a, b


# item 2a: a NaN gradient in the second group must not step the first group
@pytest.mark.parametrize("fused", BACKENDS)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nonfinite_in_second_group_changes_nothing(name, fused):
    opt, a, b = two_group_optimizer(name, fused)
    b.grad = torch.tensor([0.0, float("nan"), 1.0, 1.0])
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"non-finite gradient in param_groups\[1\].*not changed"):
        opt.step()
    assert_unchanged(opt, snap)
    # with nonfinite='skip' on every group, no group moves either (the chain never moves only partly)
    for g in opt.param_groups:
        g["nonfinite"] = "skip"
    opt.step()
    assert_unchanged(opt, snap)
    b.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(a.detach(), snap[0][0]) and not torch.equal(b.detach(), snap[0][1])


# item 2a, first step: no seed is drawn and no state is created by a failed step
def test_failed_first_step_creates_no_state():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(4))
    opt = optim.SGHMC([{"params": [a]}, {"params": [b]}], lr=1e-3, num_data=10)
    a.grad, b.grad = torch.ones(3), torch.full((4,), float("inf"))
    gen_state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(a.detach(), torch.ones(3))
    assert torch.equal(torch.get_rng_state(), gen_state)


# item 2b: a bad hyper-parameter in add_param_group is refused there, not in the next step
def test_add_param_group_validates_hyperparameters():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(4))
    opt = optim.SGLD([a], lr=1e-3, num_data=10)
    for bad, match in [({"lr": -1.0}, "lr must be"), ({"temperature": float("nan")}, "temperature must be"),
                       ({"num_data": "x"}, "num_data must be a number"),
                       ({"nonfinite": "warn"}, "nonfinite must be")]:
        with pytest.raises((ValueError, TypeError), match=match):
            opt.add_param_group({"params": [b], **bad})
        assert len(opt.param_groups) == 1
    a.grad = torch.ones(3)
    opt.step()  # the optimizer still works
    # a group made bad after it was added is caught by the next step before any write
    opt.add_param_group({"params": [b]})
    b.grad = torch.ones(4)
    opt.param_groups[1]["lr"] = -1.0
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"lr must be.*param_groups\[1\]"):
        opt.step()
    assert_unchanged(opt, snap)


# item 2c: an expanded (stride-0) parameter is refused before anything is written
@pytest.mark.parametrize("fused", BACKENDS)
def test_expanded_parameter_is_refused(fused):
    q, e = torch.zeros(4), torch.zeros(1).expand(4)
    q.grad, e.grad = torch.ones(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*overlaps itself.*clone"):
        optim.SGLD([q, e], lr=0.1, num_data=1, fused=fused)
    # a parameter re-pointed to an expanded tensor after construction: caught by step(), nothing written
    p = nn.Parameter(torch.zeros(4))
    opt = optim.SGLD([q, p], lr=0.1, num_data=1, fused=fused)
    p.grad = torch.ones(4)
    opt.step()
    p.data = torch.zeros(1).expand(4)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="overlaps itself"):
        opt.step()
    assert_unchanged(opt, snap)


# item 2c: an expanded gradient is read, not refused (it is never written)
@pytest.mark.parametrize("fused", BACKENDS)
def test_expanded_gradient_is_fine(fused):
    p1, p2 = torch.zeros(4), torch.zeros(4)
    o1 = optim.SGLD([p1], lr=0.1, num_data=1, temperature=0.0, fused=fused)
    o2 = optim.SGLD([p2], lr=0.1, num_data=1, temperature=0.0, fused=fused)
    p1.grad, p2.grad = torch.ones(1).expand(4), torch.ones(4)
    o1.step()
    o2.step()
    assert torch.equal(p1, p2) and torch.equal(p1, torch.full((4,), -0.05))


# item 3: the same memory twice in one optimizer is refused at construction / add_param_group
def test_same_memory_twice_is_refused():
    p = nn.Parameter(torch.zeros(6))
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*same tensor as.*\['params'\]\[0\]"):
        optim.SGLD([p, p], lr=0.1, num_data=1)
    w = torch.zeros(10)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] .*shares memory with.*\['params'\]\[0\]"):
        optim.SGLD([w[0:4], w[3:6]], lr=0.1, num_data=1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*shares memory with param_groups\[0\]"):
        optim.SGLD([{"params": [w[0:4]]}, {"params": [w[2:3]]}], lr=0.1, num_data=1)
    m = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="shares memory"):  # a row and a column cross at one element
        optim.SGLD([m[1], m[:, 2]], lr=0.1, num_data=1)
    opt = optim.SGLD([w[0:4]], lr=0.1, num_data=1)
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group({"params": [w[1:2]]})
    with pytest.raises(ValueError, match="same tensor"):  # torch only warns about this one
        opt.add_param_group({"params": [w[5:6], opt.param_groups[0]["params"][0]]})
    assert len(opt.param_groups) == 1


# item 3: disjoint views of one storage are fine, even interleaved ones, and step like separate tensors
@pytest.mark.parametrize("fused", BACKENDS)
def test_disjoint_views_of_one_storage(fused):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 6, generator=g)
    grad = torch.randn(5, 6, generator=g)
    w = base.clone()
    views = [w[:, 0::2], w[:, 1::2], w[4:5, :0]]  # interleaved columns, and an empty view
    for v, gv in zip(views, [grad[:, 0::2], grad[:, 1::2], grad[4:5, :0]]):
        v.grad = gv.clone()
    opt = optim.SGLD(views, lr=0.1, num_data=3, temperature=0.0, fused=fused)
    opt.step()
    torch.testing.assert_close(w, base - 0.05 * 3 * grad)


# item 3: a gradient that shares memory with a parameter is refused before anything is written
def test_gradient_aliasing_a_parameter_is_refused():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = optim.SGLD([{"params": [a]}, {"params": [b]}], lr=0.1, num_data=1)
    a.grad, b.grad = torch.ones(3), a.detach()
    with pytest.raises(ValueError, match=r"gradient of param_groups\[1\]\['params'\]\[0\].*shares memory"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and len(opt.state) == 0


# item 3: the O(n log n) overlap search (fast path for contiguous tensors, exact bytes otherwise)
# against brute force: the element offsets of random views of one storage
def test_memory_overlaps_matches_brute_force():
    from pyfastbayes._memory import memory_overlaps, overlaps_itself

    g = torch.Generator().manual_seed(9)
    base, offsets = torch.zeros(64), torch.arange(64)

    def rnd(n):
        return int(torch.randint(0, n, (), generator=g))

    def random_view(t):
        if rnd(2):  # a 1-d slice, stepped or not
            a = rnd(64)
            return t[a:a + 1 + rnd(64 - a):1 + rnd(3)]
        r, c = rnd(8), rnd(8)
        return t.view(8, 8)[r:r + 1 + rnd(8 - r), c:c + 1 + rnd(8 - c):1 + rnd(2)]

    for _ in range(300):
        seeds = [torch.randint(0, 2**31, (), generator=g).item() for _ in range(1 + rnd(5))]
        views, sets = [], []
        for s in seeds:
            g.manual_seed(s)
            views.append(random_view(base))
            g.manual_seed(s)
            sets.append(set(random_view(offsets).flatten().tolist()))
        assert not any(overlaps_itself(v) for v in views)
        expected = {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets)) if sets[i] & sets[j]}
        assert {tuple(sorted(p)) for p in memory_overlaps(views)} == expected


# a refused first step leaves no state and draws no seed (found in review after the one-group fast path)
@pytest.mark.parametrize("fused", BACKENDS)
def test_refused_first_step_leaves_no_state_and_no_seed(fused):
    a = nn.Parameter(torch.randn(4))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = optim.SGHMC([a, b], lr=0.1, num_data=10, fused=fused)
    a.grad, b.grad = torch.randn(4), torch.randn(3, dtype=torch.float64)
    rng_before = torch.get_rng_state()
    with pytest.raises(ValueError, match="separate param groups"):
        opt.step()
    assert len(opt.state) == 0
    assert torch.equal(torch.get_rng_state(), rng_before)
