"""The Laplace pipeline on a CUDA device equals the CPU one (fp64: the same math on other kernels):
fit for every structure and both bias blocks (and the heteroscedastic likelihood), evidence, dense
precision, GLM functional variance, probit probabilities, draws' device, marglik tuning; an MLP and
a CNN. Skipped without CUDA."""
import copy

import pytest
import torch
from torch import nn

from _helpers import needs_cuda
from pyfastbayes.laplace import Laplace

pytestmark = needs_cuda


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 4)).double()
    g = torch.Generator().manual_seed(1)
    x_mlp, x_cnn = torch.randn(40, 6, dtype=torch.float64, generator=g), torch.randn(40, 1, 8, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    return [(mlp, x_mlp, y), (cnn, x_cnn, y)]


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
@pytest.mark.parametrize("bias_block", ["joint", "separate"])
@pytest.mark.parametrize("which", [0, 1])
def test_cuda_equals_cpu(structure, bias_block, which):
    model, x, y = _models()[which]
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        la = Laplace(m, hessian_structure=structure, bias_block=bias_block, prior_precision=0.8, low_rank=8)
        la.fit([(a.to(device), b.to(device)) for a, b in loader], progress=False,
               generator=torch.Generator(device).manual_seed(0))
        f_mu, f_var = la.functional_variance(x[:7].to(device))
        draws = la.sample(3, generator=torch.Generator(device).manual_seed(0))
        assert draws.device.type == device and draws.shape == (3, la.numel)
        results[device] = dict(lml=la.log_marginal_likelihood().cpu(), dense=la.to_dense().cpu(), f_var=f_var.cpu(),
                               probs=la.la(x[:7].to(device)).cpu())
    cpu, gpu = results["cpu"], results["cuda"]
    tol = dict(rtol=1e-6, atol=1e-8) if structure == "lowrank" else dict(rtol=1e-9, atol=1e-11)  # Lanczos vs exact
    torch.testing.assert_close(gpu["lml"], cpu["lml"], **tol)
    torch.testing.assert_close(gpu["dense"], cpu["dense"], **tol)
    torch.testing.assert_close(gpu["f_var"], cpu["f_var"], **tol)
    torch.testing.assert_close(gpu["probs"], cpu["probs"], **tol)


def test_cuda_marglik_and_float32():
    model, x, y = _models()[0]
    m = copy.deepcopy(model).float().cuda()
    la = Laplace(m).fit([(x.float().cuda(), y.cuda())], progress=False)
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision("marglik", "layerwise")
    assert float(la.log_marginal_likelihood()) > before
    p = la.la(x[:5].float().cuda())
    assert p.device.type == "cuda" and torch.allclose(p.sum(1), torch.ones(5, device="cuda"))


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
@pytest.mark.parametrize("which", [0, 1])
def test_cuda_seventeenth_session_api_equals_cpu(structure, which):
    """log_prob, online fit, the joint covariance and enable_backprop input gradients on CUDA equal
    the CPU's (fp64)."""
    model, x, y = _models()[which]
    yr = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        batches = [(x[:25].to(device), yr[:25].to(device)), (x[25:].to(device), yr[25:].to(device))]
        gen = dict(generator=torch.Generator(device).manual_seed(0)) if structure == "lowrank" else {}
        la = Laplace(m, "regression", hessian_structure=structure, prior_precision=0.8, low_rank=8,
                     enable_backprop=True).fit(batches[:1], progress=False, **gen)
        if structure != "lowrank":
            la.fit(batches[1:], progress=False, override=False)
        theta = la.mean + 0.01 * torch.arange(la.mean.numel(), dtype=torch.float64, device=device).sin()
        xg = x[:5].to(device).clone().requires_grad_(True)
        f_mu, f_cov = la.la(xg, joint=True)
        grad = torch.autograd.grad(f_cov.sum() + f_mu.sum(), xg)[0]
        out[device] = [la.log_prob(theta), f_mu.detach(), f_cov.detach(), grad]
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_cuda_half_model_is_computed_in_float32(half):
    model, x, y = _models()[0]
    m = copy.deepcopy(model).to("cuda", half)
    la = Laplace(m, hessian_structure="kron").fit([(x.to("cuda", half), y.to("cuda"))], progress=False)
    assert la.log_marginal_likelihood().dtype == torch.float32
    p = la.la(x[:7].to("cuda", half))
    assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    assert la.predictive_samples(x[:7].to("cuda", half), n_samples=3).dtype == torch.float32


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("which", [0, 1])
def test_cuda_subnetwork_equals_cpu(structure, which):
    """Subnetwork Laplace and a mask's scores on CUDA: the same precision, evidence, GLM variance
    for the same indices (chosen on the CPU), the same diagonal-Laplace variances."""
    from pyfastbayes.laplace import subnetmask

    model, x, y = _models()[which]
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    idx = subnetmask.LargestVarianceDiagLaplaceSubnetMask(model, 30, Laplace(model, hessian_structure="diag")) \
        .select(loader)
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        data = [(a.to(device), b.to(device)) for a, b in loader]
        scores = subnetmask.LargestVarianceDiagLaplaceSubnetMask(
            m, 30, Laplace(m, hessian_structure="diag")).compute_param_scores(data)
        la = Laplace(m, "classification", "subnetwork", structure, subnetwork_indices=idx.to(device),
                     prior_precision=0.8).fit(data, progress=False)
        _, f_var = la.functional_variance(x[:7].to(device))
        results[device] = (scores.cpu(), la.to_dense().cpu(), la.log_marginal_likelihood().cpu(), f_var.cpu())
        assert la.sample(2).device.type == device
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
@pytest.mark.parametrize("curvature", ["ggn", "mc_fisher"])
def test_cuda_heteroscedastic_equals_cpu(structure, curvature):
    """likelihood='heteroscedastic_regression' (the gaussian_natural loss-Hessian kernel on CUDA):
    precision, evidence, the GLM predictive's moments and the curvature operator's GGN as on the CPU."""
    from pyfastbayes.curvature import ggn
    from pyfastbayes.nn import NaturalGaussianNLLLoss, NaturalHead

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4), NaturalHead()).double()  # D = 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, dtype=torch.float64, generator=g), torch.randn(40, 2, dtype=torch.float64, generator=g)
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        data = [(a.to(device), b.to(device)) for a, b in loader]
        la = Laplace(m, "heteroscedastic_regression", hessian_structure=structure, curvature=curvature, low_rank=8,
                     prior_precision=0.8).fit(data, progress=False, generator=torch.Generator(device).manual_seed(0))
        pred = la.predict(x[:7].to(device))
        op = ggn(m, NaturalGaussianNLLLoss(), data).to_dense() if structure == "full" else torch.zeros(())
        results[device] = [t.cpu() for t in (la.log_marginal_likelihood(), la.to_dense(), pred.mean, pred.aleatoric,
                                             pred.epistemic, op)]
    tol = dict(rtol=1e-6, atol=1e-8) if structure == "lowrank" else dict(rtol=1e-9, atol=1e-11)
    if curvature == "mc_fisher":  # the label draws come from each device's own generator
        assert all(torch.isfinite(t).all() for t in results["cuda"])
        results = {d: r[2:4] for d, r in results.items()}  # the MAP's outputs agree all the same
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("independent", [False, True])
def test_cuda_functional_laplace_equals_cpu(independent, subset):
    """FunctionalLaplace on CUDA: the kernel, the evidence, the GP predictive and the draws' device as
    on the CPU (the same subset; the kernel from the GLM parts on each device); the network at
    weight draws ('nn' samples) from the same CUDA generator."""
    from pyfastbayes.laplace import FunctionalLaplace

    model, x, y = _models()[0]
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        gp = FunctionalLaplace(m, "classification", 30, subset_of_weights=subset, prior_precision=0.8,
                               independent_outputs=independent, batch_size=16).fit(
            [(a.to(device), b.to(device)) for a, b in loader], progress=False)
        assert gp.sample(2).device.type == device
        if device == "cuda":
            g = lambda: torch.Generator(device).manual_seed(3)  # noqa: E731
            thetas = gp.sample(3, generator=g())
            want = torch.stack([torch.func.functional_call(m, gp.layout.unflatten(t), (x[:7].to(device),)) for t in thetas])
            torch.testing.assert_close(gp.functional_samples(x[:7].to(device), "nn", n_samples=3, generator=g()),
                                       want.detach(), rtol=1e-12, atol=1e-12)
        results[device] = [t.cpu() for t in (gp._fitted["K"], gp.log_marginal_likelihood(),
                                             gp.functional_variance(x[:7].to(device))[1], gp(x[:7].to(device)))]
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_cuda_ella_equals_cpu(lik):
    """ELLA on CUDA: the same subset and output draws (CPU generators), the basis (float64 eigh),
    the curvature G, the GP predictive and the weight draws' device as on the CPU."""
    from pyfastbayes.laplace import ELLA

    model, x, y = _models()[0]
    if lik == "regression":
        y = torch.sin(x[:, :4])
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        ella = ELLA(m, lik, 30, 12, prior_precision=0.8, batch_size=16).fit(
            [(a.to(device), b.to(device)) for a, b in loader], progress=False)
        assert ella.sample(2).device.type == device
        out = ella(x[:7].to(device))
        results[device] = [t.cpu() for t in (ella._fitted["G"], *(out if lik == "regression" else (out,)))]
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
