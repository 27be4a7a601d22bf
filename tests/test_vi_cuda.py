"""The Bayesian layers on a CUDA device equal the CPU ones: the same (seed, step, stream) gives the
same noise (Philox, ~1e-6 in float32 from contracted FMAs), so outputs, every gradient and the KL
agree; float32 and bfloat16 weights, every estimator, linear and conv. Skipped without CUDA."""
import copy

import pytest
import torch
from torch import nn

from _helpers import needs_cuda
from pyfastbayes.vi import BayesianConv2d, BayesianLinear, ELBO, kl_divergence

pytestmark = needs_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cuda_equals_cpu(kind, estimator, dtype):
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(BayesianLinear(20, 16, estimator=estimator, init_std=0.2), nn.Tanh(),
                                 BayesianLinear(16, 3, estimator=estimator, init_std=0.2)), torch.randn(9, 20)
    else:
        model, x = nn.Sequential(BayesianConv2d(2, 4, 3, padding=1, estimator=estimator, init_std=0.2), nn.Tanh(),
                                 nn.Flatten(), BayesianLinear(4 * 36, 3, estimator=estimator, init_std=0.2)), torch.randn(5, 2, 6, 6)
    y = torch.randint(0, 3, (x.shape[0],))
    out = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device=device, dtype=dtype)
        loss = ELBO(m, num_data=100)(m(x.to(device, dtype)), y.to(device))
        grads = torch.autograd.grad(loss, list(m.parameters()))
        out[device] = [loss.detach().float().cpu()] + [g.float().cpu() for g in grads] + [
            kl_divergence(m).detach().float().cpu()]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(a, b, **tol)
