"""Independent pure-PyTorch references for the Laplace tests (fp64, small models).

Nothing here imports pyfastbayes.laplace: the curvature comes from explicit per-example
Jacobians (torch.func: vmap over examples of jacrev of the flat-parameter function) and the
closed-form output-space Hessians; the KFAC factors from forward hooks, one plain backward per
output column and the patch vectors of convolutions read off the Jacobian of the convolution with
respect to its own weight (no unfold).

Conventions (those the Laplace documents): the curvature of the SUMMED loss; classification =
cross-entropy of logits [N, C] (output Hessian diag(p) - p p^T), binary = BCE of one logit
(s (1 - s)), regression = 0.5 (f - y)^2 (identity).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap


class eval_mode:
    """Every submodule in eval mode inside the block, each one's own flag restored afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)])


def jacobians(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians [N, C, P] of the outputs (C = 1 for outputs [N]) with respect to the
    flat trainable parameters (named_parameters order), the model in eval mode."""
    named = trainable(model)
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    buffers = dict(model.named_buffers())
    theta = flat(model)

    def f(th, x):
        tensors = {n: t.view(s) for (n, _), t, s in zip(named, th.split(sizes), shapes)}
        tensors.update(buffers)
        return functional_call(model, tensors, (x.unsqueeze(0),)).reshape(-1)

    with eval_mode(model):
        return vmap(jacrev(f), in_dims=(None, 0))(theta, X)


def outputs(model, X) -> torch.Tensor:
    with eval_mode(model), torch.no_grad():
        f = model(X)
    return f.reshape(f.shape[0], -1)


def loss_gradient(f, y, likelihood):
    """d loss_n / d f_n [N, C] written out by hand."""
    if likelihood == "classification":
        return torch.softmax(f, -1) - F.one_hot(y.long(), f.shape[1]).to(f.dtype)
    if likelihood == "binary":
        return torch.sigmoid(f) - y.reshape(-1, 1).to(f.dtype)
    return f - y.reshape(f.shape).to(f.dtype)


def output_hessians(f, y, likelihood, curvature="ggn", mc_labels=None) -> torch.Tensor:
    """[N, C, C]: 'ggn' the closed-form Hessian of the per-example loss in the outputs; 'ef' the
    outer product of the loss gradient; 'mc_fisher' the mean outer product of the loss gradients
    at the sampled labels ``mc_labels`` (a list of label tensors)."""
    N, C = f.shape
    if curvature == "ggn":
        if likelihood == "classification":
            p = torch.softmax(f, -1)
            return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        if likelihood == "binary":
            s = torch.sigmoid(f)
            return (s * (1 - s)).reshape(N, 1, 1)
        return torch.eye(C, dtype=f.dtype).expand(N, C, C).clone()
    if curvature == "ef":
        g = loss_gradient(f, y, likelihood)
        return g[:, :, None] * g[:, None, :]
    gs = [loss_gradient(f, yl, likelihood) for yl in mc_labels]
    return sum(g[:, :, None] * g[:, None, :] for g in gs) / len(gs)


def mc_labels(f_batches, likelihood, mc_samples, generator):
    """The labels Laplace's 'mc_fisher' draws with ``generator``, batch by batch (its documented
    sequence: per batch, ``mc_samples`` draws from the model's predictive)."""
    out = []
    for f in f_batches:
        draws = []
        for _ in range(mc_samples):
            if likelihood == "classification":
                draws.append(torch.multinomial(f.softmax(-1), 1, generator=generator)[:, 0])
            elif likelihood == "binary":
                draws.append(torch.bernoulli(f.sigmoid(), generator=generator))
            else:
                draws.append(f + torch.randn(f.shape, dtype=f.dtype, generator=generator))
        out.append(draws)
    return out


def exact_curvature(model, loader, likelihood, curvature="ggn", mc_samples=1, generator=None) -> torch.Tensor:
    """sum_n J_n^T H_n J_n [P, P] over the loader's batches."""
    P = flat(model).numel()
    H = torch.zeros(P, P, dtype=torch.float64)
    batches = list(loader)
    fs = [outputs(model, x) for x, _ in batches]
    labels = mc_labels(fs, likelihood, mc_samples, generator) if curvature == "mc_fisher" else [None] * len(fs)
    for (x, y), f, lab in zip(batches, fs, labels):
        J = jacobians(model, x)
        Hout = output_hessians(f, y, likelihood, curvature, lab)
        H += torch.einsum("ncp,ncd,ndq->pq", J, Hout, J)
    return H


# ---- KFAC by hand ------------------------------------------------------------------------------------------
def _patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Input rows [N, T, in] of a Linear ([N, ..., in]) or the patch vectors of a convolution
    [N, T, in * kernel] (T output positions), the latter as the Jacobian of the convolution's
    output at output channel 0 with respect to weight[0] (no unfold)."""
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1])
    if isinstance(module, nn.Embedding):
        return a  # the token indices: the caller builds its one-hot rows
    w = module.weight.detach()

    def conv(wt):
        return module._conv_forward(a, wt, None)[:, 0]  # [N, *spatial]

    Jw = jacrev(conv)(w)  # [N, *spatial, out, in, *k]
    N = a.shape[0]
    Jw = Jw.select(1 + a.dim() - 2, 0)  # output channel 0 of weight
    return Jw.reshape(N, -1, w[0].numel())


def output_jacobians(model, X, modules):
    """For each module: (inputs rows [N, T, in], Jacobians [N, C, T, out] of the model's outputs
    with respect to the module's output at every position), by hooks and one backward per output
    column (the examples are independent in eval mode). A module called several times has the
    positions of all its calls, in call order."""
    rec = {}

    def hook(mod, inp, out):
        rec.setdefault(mod, []).append((inp[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with eval_mode(model):
            f = model(X)
    finally:
        for h in handles:
            h.remove()
    f = f.reshape(f.shape[0], -1)
    outs = [o for m in modules for _, o in rec[m]]
    cols = [torch.autograd.grad(f[:, c].sum(), outs, retain_graph=True) for c in range(f.shape[1])]
    result, k = [], 0
    for m in modules:
        a_calls, g_calls = [], []
        for a, _ in rec[m]:
            g = torch.stack([col[k] for col in cols], 1)  # [N, C, *out.shape[1:]]
            k += 1
            if isinstance(m, (nn.Linear, nn.Embedding)):
                g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
            else:
                g = g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)  # [N, C, T, out]
            a_calls.append(_patches(m, a))
            g_calls.append(g.detach())
        result.append((torch.cat(a_calls, 1), torch.cat(g_calls, 2)))
    return f.detach(), result


def kfac_factors(model, loader, likelihood, modules, approx="expand", curvature="ggn", bias=True):
    """Per module (G [out, out], A [in(+1), in(+1)]) of Eschenhagen et al. (2023):
    expand: A = 1/(N T) sum_{n,t} a a^T, G = sum_{n,t} J_nt^T H_n J_nt;
    reduce: A = 1/N sum_n abar abar^T (abar = mean_t a), G = sum_n (sum_t J_nt)^T H_n (sum_t J_nt);
    a with the bias 1 appended when ``bias``."""
    sums = [None] * len(modules)
    rows = [0] * len(modules)
    for x, y in loader:
        f, parts = output_jacobians(model, x, modules)
        Hout = output_hessians(f, y, likelihood, curvature)
        for k, (a, J) in enumerate(parts):
            if bias:
                a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], -1)
            if approx == "expand":
                A = torch.einsum("nti,ntj->ij", a, a)
                G = torch.einsum("ncto,ncd,ndtp->op", J, Hout, J)
                r = a.shape[0] * a.shape[1]
            else:
                ab, Js = a.mean(1), J.sum(2)
                A = ab.T @ ab
                G = torch.einsum("nco,ncd,ndp->op", Js, Hout, Js)
                r = a.shape[0]
            if sums[k] is None:
                sums[k] = [G, A]
            else:
                sums[k][0] += G
                sums[k][1] += A
            rows[k] += r
    return [(G, A / r) for (G, A), r in zip(sums, rows)]


def bridge(f_mu, f_var, normalise=False):
    """The Laplace bridge (Hobbhahn et al. 2022) after the zero-mean correction of the logits, as
    laplace-torch applies it, written from the formulas; ``normalise``: its variance normalisation
    (the mean corrected variance scaled to sqrt(K / 2), laplace-torch's 'bridge_norm')."""
    K = f_mu.shape[1]
    out = []
    for mu, S in zip(f_mu, f_var):
        one = torch.ones(K, dtype=mu.dtype)
        # condition the Gaussian on sum of logits = 0
        Sone = S @ one
        total = one @ Sone
        mu = mu - Sone * (one @ mu) / total
        S = S - torch.outer(Sone, Sone) / total
        d = torch.diagonal(S)
        if normalise:
            c = d.mean() / math.sqrt(K / 2)
            mu, d = mu / math.sqrt(c), d / c
        alpha = (1 - 2 / K + torch.exp(mu) * torch.exp(-mu).sum() / K ** 2) / d
        out.append(alpha / alpha.sum())
    return torch.stack(out)


def logits_var(J, Sigma):
    """J Sigma J^T [N, C, C] for J [N, C, P]."""
    return torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)


def kron_block(G, A):
    return torch.kron(G, A)


def statistical_bound(std, n, k=6.0):
    """k standard errors of a mean of n draws whose standard deviation is ``std``."""
    return k * std / math.sqrt(n)
