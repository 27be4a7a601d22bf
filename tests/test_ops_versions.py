"""Version counters of the tensors an op writes (csrc/ops/version_bump.cpp): ATen's in-place ops
bump them so that autograd refuses a backward through a saved tensor changed since; every
pyfastbayes op with a written argument does the same (the per-op check is the contract's (g) in
tests/_helpers.py). Here: the registration covers exactly the writing ops, the silent wrong
gradient it prevents, and inference tensors."""
import pytest
import torch

import pyfastbayes.optim
from pyfastbayes import ops
from _helpers import needs_native

pytestmark = needs_native


def _library_ops():
    return {s.name.split("::", 1)[1]: s for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyfastbayes::")}


def test_exactly_the_ops_that_write_have_the_version_kernel():
    schemas = _library_ops()
    assert len(schemas) >= 20
    for name, schema in schemas.items():
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfastbayes::{name}", "ADInplaceOrView")
        assert has == writes, f"{name}: writes={writes} but ADInplaceOrView kernel={has}"


def test_a_step_on_parameters_a_graph_saved_is_caught_by_backward():
    """Before: the backward silently used the stepped values (grad 2 w_new instead of 2 w_old)."""
    w = torch.nn.Parameter(torch.randn(6))
    loss = (w * w).sum()  # saves w
    opt = pyfastbayes.optim.SGLD([w], lr=1e-3, num_data=10)
    w.grad = torch.ones(6)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_written_inference_tensor_is_refused_unchanged_outside_inference_mode():
    with torch.inference_mode():
        out = torch.zeros(8)
        ops.philox_normal_(out, 1, 0, 0)  # inside inference mode: allowed, as for ATen's ops
    assert out.abs().sum() > 0
    before = out.clone()
    with pytest.raises(RuntimeError, match=r"philox_normal_: out is an inference tensor .*torch.inference_mode\(\)"):
        ops.philox_normal_(out, 1, 0, 1)
    assert torch.equal(out, before)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        out.normal_()  # ATen's own rule, for comparison
    # an inference tensor that is only read is fine
    with torch.inference_mode():
        src = torch.randn(8)
    ops.any_nonfinite([src])


def test_the_version_kernel_leaves_the_numbers_unchanged():
    """The step's numbers with the kernel in front: equal to the reference backend's."""
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    q = [t.clone() for t in p]
    grads = [torch.randn_like(t) for t in p]
    hyper = torch.tensor([1e-3, 1.0, 100.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    ops.sgld_step_(p, grads, hyper, torch.tensor([3, 0]), backend="native")
    ops.sgld_step_(q, grads, hyper, torch.tensor([3, 0]), backend="reference")
    for a, b in zip(p, q):
        torch.testing.assert_close(a, b)


def test_inside_inference_mode_inference_tensors_are_written_beside_normal_ones():
    """Review finding: the kernel runs when any argument is a normal tensor, also inside inference
    mode; an inference tensor written there is legal (as for ATen's ops) and was refused."""
    rng = torch.tensor([3, 0])  # a normal tensor (made outside): the kernel runs
    with torch.inference_mode():
        p, g = [torch.randn(5)], [torch.randn(5)]
        before = p[0].clone()
        hyper = torch.tensor([1e-3, 1.0, 100.0, 1.0, 0.0, 0.0], dtype=torch.float64)
        ops.sgld_step_(p, g, hyper, rng)
    assert not torch.equal(p[0], before)
    assert rng._version > 0 and int(rng[1]) == 1  # the normal tensor's version is bumped


def test_a_landscape_grid_runs_inside_inference_mode():
    from pyfastbayes import landscape as L
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    d = L.random_directions(model, 1)
    want = L.grid(model, torch.nn.CrossEntropyLoss(), (x, y), d, [-1, 0, 1], progress=False).loss
    with torch.inference_mode():
        got = L.grid(model, torch.nn.CrossEntropyLoss(), (x, y), d, [-1, 0, 1], progress=False).loss
    torch.testing.assert_close(got, want)
