"""Capturing a sampler step in a CUDA graph (the recipe of pyfastbayes/optim/sgmcmc.py): replays
follow tensor hyper-parameters and the schedule, equal the eager chain, and what a capture
cannot hold is refused before anything is recorded. CPU part: CyclicalSchedule updates tensor
hyper-parameters in place."""
import warnings

import pytest
import torch

from pyfastbayes.optim import PSGLD, SGHMC, SGLD, CyclicalSchedule

from _helpers import needs_cuda

KINDS = {"sgld": SGLD, "sghmc": SGHMC, "psgld": PSGLD}


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)).to(device)


def _batches(device, n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 7, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device))
            for _ in range(n)]


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------
# CPU: the schedule writes tensor hyper-parameters in place
# ---------------------------------------------------------------------------------------------
def test_schedule_updates_tensor_hyper_parameters_in_place():
    p = torch.nn.Parameter(torch.zeros(3))
    lr, temp = torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    opt = SGLD([p], lr=lr, num_data=10, temperature=temp)
    sched = CyclicalSchedule(total_steps=10, n_cycles=2, lr_max=0.5, explore_fraction=0.4)
    for t in range(10):
        sampling = sched.apply(opt, t)
        assert opt.param_groups[0]["lr"] is lr and opt.param_groups[0]["temperature"] is temp
        assert lr.item() == pytest.approx(sched.lr(t))
        assert temp.item() == (2.0 if sampling else 0.0)  # the sampling temperature was not overwritten
    assert opt.param_groups[0]["sampling_temperature"] is not temp


def test_schedule_keeps_python_numbers_python_numbers():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SGLD([p], lr=1.0, num_data=10, temperature=1.5)
    CyclicalSchedule(total_steps=4, n_cycles=1, lr_max=0.5, explore_fraction=0.0).apply(opt, 1)
    assert isinstance(opt.param_groups[0]["lr"], float) and opt.param_groups[0]["temperature"] == 1.5


# ---------------------------------------------------------------------------------------------
# CUDA: capture and replay
# ---------------------------------------------------------------------------------------------
def _captured(kind, model, batches, lrs, **kw):
    """Run len(lrs) steps by graph replay: x/y and the lr tensor are updated in place."""
    lr = torch.tensor(lrs[0], dtype=torch.float64, device="cuda")
    opt = KINDS[kind](model.parameters(), lr=lr, num_data=100, nonfinite="skip",
                      generator=torch.Generator().manual_seed(5), **kw)
    x, y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step outside the capture (seed, state)
        _loss(model, x, y).backward()
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Python numbers in the captured step")  # num_data, ...
        with torch.cuda.graph(graph):
            for p in model.parameters():
                p.grad.zero_()
            _loss(model, x, y).backward()
            opt.step()
    for (xb, yb), v in zip(batches[1:], lrs[1:]):
        x.copy_(xb)
        y.copy_(yb)
        lr.fill_(v)
        graph.replay()
    torch.cuda.synchronize()
    return opt


def _eager(kind, model, batches, lrs, **kw):
    opt = KINDS[kind](model.parameters(), lr=lrs[0], num_data=100, nonfinite="skip",
                      generator=torch.Generator().manual_seed(5), **kw)
    for (x, y), v in zip(batches, lrs):
        opt.param_groups[0]["lr"] = v
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return opt


@needs_cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_replayed_steps_equal_eager_steps(kind):
    """Warm-up + 5 replays with a changing tensor lr = 6 eager steps with the same lrs, same seed."""
    batches, lrs = _batches("cuda"), [1e-3, 2e-3, 5e-4, 1e-3, 3e-3, 1e-4]
    m_graph, m_eager = _model("cuda"), _model("cuda")
    opt = _captured(kind, m_graph, batches, lrs)
    _eager(kind, m_eager, batches, lrs)
    for a, b in zip(m_graph.parameters(), m_eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(opt.state[next(m_graph.parameters())]["rng"][1]) == len(lrs)  # one RNG step per replay


@needs_cuda
def test_replay_follows_a_cyclical_schedule():
    """CyclicalSchedule.apply between replays changes tensor lr and temperature in place."""
    batches = _batches("cuda", 8)
    sched = CyclicalSchedule(total_steps=8, n_cycles=2, lr_max=1e-2, explore_fraction=0.5)
    m_graph, m_eager = _model("cuda"), _model("cuda")
    lr = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    temp = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    opt = SGLD(m_graph.parameters(), lr=lr, temperature=temp, num_data=100, nonfinite="skip",
               generator=torch.Generator().manual_seed(5))
    x, y = (t.clone() for t in batches[0])
    sched.apply(opt, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _loss(m_graph, x, y).backward()
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p in m_graph.parameters():
            p.grad.zero_()
        _loss(m_graph, x, y).backward()
        opt.step()
    for t in range(1, 8):
        x.copy_(batches[t][0])
        y.copy_(batches[t][1])
        sched.apply(opt, t)
        graph.replay()
    eager = SGLD(m_eager.parameters(), lr=1.0, temperature=1.0, num_data=100, nonfinite="skip",
                 generator=torch.Generator().manual_seed(5))
    for t in range(8):
        sched.apply(eager, t)
        eager.zero_grad()
        _loss(m_eager, *batches[t]).backward()
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(m_graph.parameters(), m_eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _capture_step(opt, model):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            opt.step()


@needs_cuda
def test_capture_refuses_nonfinite_raise_and_changes_nothing():
    model = _model("cuda")
    opt = SGLD(model.parameters(), lr=1e-3, num_data=10)  # nonfinite='raise', the default
    _loss(model, *_batches("cuda", 1)[0]).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="nonfinite='raise'.*pass nonfinite='skip'"):
        _capture_step(opt, model)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


@needs_cuda
def test_capture_refuses_a_first_step_and_a_changed_python_number():
    model = _model("cuda")
    _loss(model, *_batches("cuda", 1)[0]).backward()
    opt = SGLD(model.parameters(), lr=1e-3, num_data=10, nonfinite="skip")
    with pytest.raises(RuntimeError, match="take one step outside the capture first"):
        _capture_step(opt, model)
    opt.step()
    opt.param_groups[0]["lr"] = 2e-3
    with pytest.raises(RuntimeError, match=r"\['lr'\] of param_groups\[0\] changed as Python numbers"):
        _capture_step(opt, model)


@needs_cuda
def test_capture_warns_about_fixed_python_numbers():
    model = _model("cuda")
    _loss(model, *_batches("cuda", 1)[0]).backward()
    lr = torch.tensor(1e-3, dtype=torch.float64, device="cuda")
    opt = SGLD(model.parameters(), lr=lr, num_data=10, nonfinite="ignore")
    opt.step()
    with pytest.warns(UserWarning, match=r"\['num_data', 'prior_precision', 'temperature'\] are Python numbers"):
        _capture_step(opt, model)
