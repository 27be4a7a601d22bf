"""KL(q || p) of every Bayesian layer of a model, and the ELBO loss.

Gaussian-prior layers: the closed form sum_i log(s / sigma_i) + (sigma_i^2 + mu_i^2) / (2 s^2) - 1/2
(s the layer's prior std). A layer that sampled with grad mode on carries its own KL from that
forward (``BayesianLayer.take_forward_kl``: made in the pass that drew its weights, its gradient
added in the pass that forms d/d rho), taken once, while its parameters are unchanged; the other
layers' tensors go into ONE fused multi-tensor reduction (``ops.vi_kl``, float32 accumulation or
float64 for float64 parameters) with its fused backward. Scale-mixture layers: a one-draw Monte
Carlo estimate log q(w) - log p(w) at a fresh draw w (no closed form).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..calibration._checks import check_int
from ._functions import closed_form_kl, kl_grads_graph, prior_var_tensor
from .layers import BayesianLayer
from .priors import GaussianPrior


def bayesian_layers(model: nn.Module, required: bool = False) -> list[tuple[str, BayesianLayer]]:
    """(name, layer) of every Bayesian layer in ``model`` (model order); with ``required`` a
    ValueError saying how to convert the model when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BayesianLayer)]
    if required and not layers:
        raise ValueError("the model has no Bayesian layer (BayesianLinear / BayesianConv2d): convert it with "
                         "pyfastbayes.vi.to_bayesian(model) first")
    return layers


class _KL(torch.autograd.Function):
    """sum of the closed-form Gaussian KLs over tensors (mus, rhos, prior variance per tensor)."""

    @staticmethod
    def forward(ctx, prior_var: Tensor, *tensors):
        t = len(tensors) // 2
        mus, rhos = list(tensors[:t]), list(tensors[t:])
        ctx.save_for_backward(prior_var, *tensors)
        return ops.vi_kl(mus, rhos, prior_var)

    @staticmethod
    def backward(ctx, g):
        prior_var, *tensors = ctx.saved_tensors
        t = len(tensors) // 2
        if torch.is_grad_enabled():  # create_graph=True: the same gradients by differentiable ops (a second order)
            gmu, grho = kl_grads_graph(g, tensors[:t], tensors[t:], prior_var.tolist())
        else:
            gmu, grho = ops.vi_kl_backward(g, list(tensors[:t]), list(tensors[t:]), prior_var)
        return (None, *gmu, *grho)


def kl_divergence(model: nn.Module) -> Tensor:
    """KL(q || p) summed over every Bayesian layer of ``model`` (a scalar tensor, differentiable in
    every mu and rho). ValueError when the model has no Bayesian layer, or naming two layers whose
    parameters differ in dtype or device; RuntimeError naming the layer when a mu or rho is not
    finite (a diverged step: nothing is changed here).

    The finiteness check reads the KL itself (non-finite exactly when a mu or rho is, or when the
    float32 terms overflow), one 0-dim read per call instead of a pass over every parameter; on
    CUDA that read is the call's one host sync. Under ``torch.compile`` (also ``fullgraph=True``)
    and CUDA graph capture there is no host read and no check: a non-finite KL is returned as it is."""
    layers = bayesian_layers(model, required=True)
    mus, rhos, var, labels = [], [], [], []
    mc, carried = [], []
    compiling = torch.compiler.is_compiling()
    for name, layer in layers:
        kl = None if compiling else layer.take_forward_kl()
        if kl is not None:  # the layer's last forward made it (and its backward adds the gradient) in its own pass
            carried.append(kl)
            continue
        pairs = ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho))  # (read once each)
        if isinstance(layer.prior, GaussianPrior):
            v = layer.prior.std ** 2
            for (mu, rho), pname in zip(pairs, ("weight", "bias")):
                if mu is not None:
                    mus.append(mu), rhos.append(rho), var.append(v), labels.append((name, pname))
        else:
            mc.append((layer, [(mu, rho) for mu, rho in pairs if mu is not None]))
    total = None
    for kl in carried:
        total = kl if total is None else total + kl
    if mus and torch._C._are_functorch_transforms_active():
        # inside torch.func transforms (grad, vmap, jacrev over a functional_call; the layers then run at
        # their means, sample_weights = False): the closed form by plain torch ops, which functorch
        # differentiates and batches (the fused op's autograd.Function has no functorch rules)
        for mu, rho, v in zip(mus, rhos, var):
            term = closed_form_kl(mu, rho, v)
            total = term if total is None else total + term
    elif mus:
        try:
            prior_var = (prior_var_tensor.__wrapped__ if compiling else prior_var_tensor)(tuple(var), mus[0].device)
            fused = _KL.apply(prior_var, *mus, *rhos)  # (compiling: a constant of the graph, no cache)
            total = fused if total is None else total + fused
        except RuntimeError:  # the op's own words name tensors by index: name the layers when that is why
            _check_one_dtype(labels, mus + rhos)
            raise
    for layer, pairs in mc:
        for mu, rho in pairs:
            sigma = F.softplus(rho)
            w = mu + sigma * torch.randn_like(mu)
            log_q = (-0.5 * ((w - mu) / sigma).square() - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum()
            term = log_q - layer.prior.log_prob(w)
            total = term if total is None else total + term
    if not _tracing() and not math.isfinite(total.item()):  # one read of the 0-dim KL (isfinite + bool: two ops)
        _raise_nonfinite(layers, total)
    return total


def _tracing() -> bool:
    """Whether the KL is being compiled (torch.compile), captured into a CUDA graph or computed inside
    torch.func transforms: no host read then (it would break the graph or the capture, or refuse a
    batched or differentiated value); the non-finite check is left out."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_one_dtype(labels: list, tensors: list) -> None:
    """After the fused reduction failed: a ValueError naming two layers whose parameters differ in
    dtype or device (the op takes every mu and rho in one, and its own error says 'mus[2] has dtype
    Float'), saying how to match them; nothing when they agree (the op's error stands).
    ``tensors`` = mus + rhos, ``labels`` the (layer, weight/bias) of each mu."""
    labels = [(n, f"{p}_mu") for n, p in labels] + [(n, f"{p}_rho") for n, p in labels]
    first = (tensors[0].dtype, tensors[0].device)
    for (name, pname), t in zip(labels, tensors):
        if (t.dtype, t.device) != first:
            raise ValueError(f"the Bayesian layers' parameters differ in dtype or device: layer {labels[0][0]!r} "
                             f"{labels[0][1]} is {first[0]} on {first[1]}, layer {name!r} {pname} is {t.dtype} on "
                             f"{t.device}; the KL sums them in one op: convert the model with model.to(dtype) "
                             "(and model.to(device))")


def _raise_nonfinite(layers, total: Tensor) -> None:
    """The RuntimeError for a non-finite KL: the first layer and parameter holding NaN or infinity,
    else the overflow (every parameter finite)."""
    for name, layer in layers:
        for pname in ("weight_mu", "weight_rho", "bias_mu", "bias_rho"):
            t = getattr(layer, pname)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"layer {name!r}: {pname} holds NaN or infinity (a diverged step); lower the "
                                   "learning rate or restore a checkpoint")
    raise RuntimeError(f"the KL is {float(total)} though every mu and rho is finite: a mu or sigma too large for "
                       f"the parameters' dtype (a diverged step); lower the learning rate or restore a checkpoint")


class linear_anneal:
    """KL annealing for :class:`ELBO`: beta rises linearly from ``start`` at step 0 to ``end`` at
    step ``steps`` and stays there: beta(step) = start + (end - start) * min(step / steps, 1).

    Unlike a Python callable (whose Python-int step the ELBO reads on the host, a graph break under
    ``torch.compile``), the ELBO evaluates this schedule on its step tensor, so an annealed step
    compiles with ``fullgraph=True``. Calling it with an int gives the same value as a float.

    Args:
        steps: the warm-up length, an int >= 1.  start, end: finite floats >= 0.
    """

    def __init__(self, steps: int, start: float = 0.0, end: float = 1.0):
        self.steps = check_int(steps, "steps (the warm-up length)", 1)
        self.start = _check_beta(start, "start must be a finite float >= 0")
        self.end = _check_beta(end, "end must be a finite float >= 0")

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step / self.steps, 1.0)

    def at(self, step: Tensor) -> Tensor:
        """beta at the 0-dim integer tensor ``step``: a float64 0-dim tensor on its device."""
        return self.start + (self.end - self.start) * torch.clamp(step.to(torch.float64) / self.steps, max=1.0)

    def __repr__(self) -> str:
        return f"linear_anneal(steps={self.steps}, start={self.start}, end={self.end})"


class ELBO(nn.Module):
    """The negative ELBO per data point: mean NLL of the batch + kl_weight * KL(q || p) / num_data.

    Args:
        model: the model with Bayesian layers.  num_data: N, the training set size (> 0).
        kl_weight: beta, a finite float >= 0, or a callable step -> float for KL annealing
            (``step`` counts the successful calls of this loss; a failed call leaves it), e.g.
            :class:`linear_anneal` (which also compiles in one graph).
        likelihood: 'classification' (cross-entropy of logits [N, C], targets [N] class indices;
            logits [N, C, d1, ...] with targets [N, d1, ...]: summed over the positions of each
            data point) or 'regression' (Gaussian NLL with noise std ``sigma``, finite > 0, summed
            over each data point's outputs; targets of the outputs' shape [N, ...], or [N] for
            outputs [N, 1] and [N, 1] for outputs [N]).

    ``loss = elbo(outputs, targets)``; ``elbo.last`` holds (nll, kl) of the last call, detached.
    ``state_dict`` keeps ``step`` (a resumed run goes on with the annealing schedule where it was).
    Under ``torch.compile`` a constant ``kl_weight`` or a :class:`linear_anneal` keeps the call in
    one graph; any other callable reads the step on the host (a graph break: compile without
    ``fullgraph``).
    """

    def __init__(self, model: nn.Module, num_data: int, kl_weight=1.0, likelihood: str = "classification",
                 sigma: float = 1.0):
        super().__init__()
        num_data = check_int(num_data, "num_data (the training set size)", 1)  # numpy integers too
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"likelihood must be 'classification' or 'regression', got {likelihood!r}")
        if not callable(kl_weight):
            _check_beta(kl_weight, "kl_weight must be a finite float >= 0 or a callable step -> float")
        if isinstance(sigma, bool) or not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0 (the regression noise std), got {sigma!r}")
        bayesian_layers(model, required=True)
        self.model, self.num_data, self.kl_weight, self.likelihood, self.sigma = model, num_data, kl_weight, likelihood, sigma
        # the step counter: a CPU int64 tensor advanced in place (a Python int would be a value
        # torch.compile guards on: a compiled ELBO call recompiled at every step and fullgraph=True
        # failed at the recompile limit); a plain attribute, so .to() leaves it on the CPU
        self._step = torch.zeros((), dtype=torch.int64)
        self.last = None

    @property
    def step(self) -> int:
        """The successful calls so far (the annealing clock; kept in the state_dict)."""
        return int(self._step)

    @step.setter
    def step(self, value) -> None:
        self._step.fill_(check_int(value, "step", 0))

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state saved before the step was kept has no '_extra_state': it loads strictly, the step as it is
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state) -> None:
        step = state.get("step") if isinstance(state, dict) else None
        self.step = check_int(step, "the ELBO state's step", 0)

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss (scalar): the NLL of ``outputs`` [N, ...] for ``targets`` [N] plus the weighted
        KL divided by ``num_data`` (see the class docstring); ``last`` keeps (nll, kl)."""
        if not torch.is_tensor(outputs) or not torch.is_tensor(targets):
            bad = "outputs" if not torch.is_tensor(outputs) else "targets"
            raise TypeError(f"{bad} must be a tensor, got {type(outputs if bad == 'outputs' else targets).__name__}")
        if isinstance(self.kl_weight, linear_anneal):  # on the step tensor: no host read
            beta = self.kl_weight.at(self._step)
        elif callable(self.kl_weight):  # (under torch.compile: a graph break, the callable runs eagerly)
            step = self.step
            beta = _check_beta(self.kl_weight(step), f"kl_weight({step}) must return a finite float >= 0")
        else:
            beta = self.kl_weight
        if self.likelihood == "classification" and outputs.dim() > 2:
            # [N, C, d1, ...] (segmentation, sequences): the NLL of one data point sums over its
            # positions, as regression's sums over its outputs (a mean over positions weighed the
            # KL / num_data d1 * ... times too heavily)
            nll = F.cross_entropy(outputs, targets, reduction="none").reshape(outputs.shape[0], -1).sum(1).mean()
        elif self.likelihood == "classification":
            nll = F.cross_entropy(outputs, targets)
        else:
            targets = _regression_targets(outputs, targets)
            nll = (0.5 * ((outputs - targets) / self.sigma).square()
                   + math.log(self.sigma) + 0.5 * math.log(2 * math.pi)).reshape(outputs.shape[0], -1).sum(1).mean()
        kl = kl_divergence(self.model)
        self._step.add_(1)  # only once the call has succeeded: a failed call does not move the annealing on
        self.last = (nll.detach(), kl.detach())
        return nll + (beta * kl).to(kl.dtype) / self.num_data  # (a float64 tensor beta kept in the KL's dtype)


def _check_beta(beta, message: str) -> float:
    """beta as a finite float >= 0 (not a bool), else a ValueError with ``message`` and the value."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"{message}, got {beta!r}")
    return float(beta)


def _regression_targets(outputs: Tensor, targets: Tensor) -> Tensor:
    """targets in the outputs' shape, for the regression NLL: the same shape, or [N] for outputs
    [N, 1] and [N, 1] for outputs [N] (the one reshape that keeps each target with its row);
    anything else is a ValueError (reshaping e.g. [3, 8] into [8, 3] would pair values with the
    wrong rows)."""
    if outputs.dim() == 0:
        raise ValueError("outputs must be a tensor [N, ...] (one row per data point), got a 0-dim tensor")
    if targets.shape == outputs.shape:
        return targets
    n = outputs.shape[0]
    if (outputs.shape == (n, 1) and targets.shape == (n,)) or (outputs.shape == (n,) and targets.shape == (n, 1)):
        return targets.reshape(outputs.shape)
    raise ValueError(f"targets must have the outputs' shape {tuple(outputs.shape)} (or [N] for outputs [N, 1]), "
                     f"got {tuple(targets.shape)}: reshape or transpose them to match the rows of outputs")
