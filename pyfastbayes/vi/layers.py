"""Mean-field Gaussian Bayesian layers (Bayes by Backprop, Blundell et al. 2015).

Each weight has q(w) = N(mu, sigma^2), sigma = softplus(rho); parameters ``weight_mu``,
``weight_rho``, ``bias_mu``, ``bias_rho`` (bayesian-torch's ``mu_weight`` / ``rho_weight`` names are
accepted by ``load_state_dict``). Every forward draws new noise from the layer's Philox position, a
buffer ``rng`` = (seed, step) advanced by one per forward (seeded from torch's global generator at
construction, so ``torch.manual_seed`` makes runs repeatable, and saved in the state_dict, so a
loaded layer draws the same noise); the noise is regenerated in the backward, never stored (see
_functions.py).

Estimators: 'reparam' (one weight sample per forward, shared by the batch), 'local' (local
reparameterisation, Kingma et al. 2015: pre-activations sampled from N(x mu^T, x^2 sigma^2^T),
independent per example), 'flipout' (Wen et al. 2018: the shared perturbation sigma eps multiplied
by per-example random signs on inputs and outputs).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._functions import Affine, Flipout, LocalMoments, LocalNoise, SampledAffine
from .priors import as_prior

ESTIMATORS = ("reparam", "local", "flipout")
# streams of a layer's seed: 0 weight, 1 bias, 2 local-reparameterisation output, 3/4 flipout's
# input/output signs; every layer draws its own 64-bit seed


def _rho(std: float) -> float:
    """softplus^-1(std)."""
    return std + math.log(-math.expm1(-std))


class BayesianLayer(nn.Module):
    """What BayesianLinear and BayesianConv2d share: parameters, prior, RNG position, estimators."""

    def __init__(self, weight_shape: tuple, bias: bool, prior, init_std: float, estimator: str, affine: Affine,
                 fan_in: int):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0 (the initial sigma), got {init_std!r}")
        self.prior = as_prior(prior)
        self.estimator, self.affine = estimator, affine
        self.weight_mu = nn.Parameter(torch.empty(weight_shape))
        self.weight_rho = nn.Parameter(torch.full(weight_shape, _rho(init_std)))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(weight_shape[0]))
            self.bias_rho = nn.Parameter(torch.full((weight_shape[0],), _rho(init_std)))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        bound = 1 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d's default init of weights and biases
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if bias:
            nn.init.uniform_(self.bias_mu, -bound, bound)
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
        self.register_buffer("rng", torch.tensor([seed, 0], dtype=torch.int64))
        self.stream = 0  # streams 0..4 of the layer's own seed: (seed, step) in the state_dict fix its noise
        self.sample_weights = True
        self._register_load_state_dict_pre_hook(_accept_bayesian_torch_names)

    def _next_rng(self) -> Tensor:
        """This forward's RNG position (a copy) and the buffer advanced by one step: two ops (a
        clone and an in-place add of (0, 1)), no host sync, so a training step can be captured."""
        rng = self.rng.clone()
        self.rng.add_(_step_one(self.rng.device))  # an int64 buffer: no autograd to switch off
        return rng

    def forward(self, x: Tensor) -> Tensor:
        """x [N, ...] -> the layer's output with weights drawn from q (or at the means when
        ``sample_weights`` is False)."""
        if not self.sample_weights:
            return self.affine(x, self.weight_mu, self.bias_mu)
        rng = self._next_rng()
        s = self.stream
        if self.estimator == "reparam":
            return SampledAffine.apply(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho, rng, s, s + 1,
                                       self.affine)
        if self.estimator == "local":
            mean, var = LocalMoments.apply(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho, self.affine)
            return LocalNoise.apply(mean, var, rng, s + 2)
        # flipout: x mu + b + ((x * s_in) dW^T) * s_out, dW = sigma eps shared by the batch
        return Flipout.apply(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho, rng, s, self.affine)

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, prior={self.prior!r}"


_STEP_ONE: dict = {}


def _step_one(device: torch.device) -> Tensor:
    """The int64 (0, 1) that advances an RNG position by one step, one tensor per device (made once:
    adding a Python int would take a select and a write-back, three ops instead of one)."""
    t = _STEP_ONE.get(device)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.arange(2, dtype=torch.int64, device=device)  # no host copy inside a capture; not kept
        t = _STEP_ONE[device] = torch.tensor([0, 1], dtype=torch.int64, device=device)
    return t


def _accept_bayesian_torch_names(state, prefix, *args):
    """load_state_dict pre-hook: bayesian-torch's mu_weight / rho_weight (mu_kernel / rho_kernel for
    its convolutions) / mu_bias / rho_bias keys are renamed to weight_mu / weight_rho / bias_mu /
    bias_rho, and its prior and eps buffers dropped."""
    for theirs, ours in (("mu_weight", "weight_mu"), ("rho_weight", "weight_rho"), ("mu_kernel", "weight_mu"),
                         ("rho_kernel", "weight_rho"), ("mu_bias", "bias_mu"), ("rho_bias", "bias_rho")):
        if prefix + theirs in state and prefix + ours not in state:
            state[prefix + ours] = state.pop(prefix + theirs)
    for extra in ("prior_weight_mu", "prior_weight_sigma", "prior_bias_mu", "prior_bias_sigma", "eps_weight",
                  "eps_bias", "prior_kernel_mu", "prior_kernel_sigma", "eps_kernel"):
        state.pop(prefix + extra, None)


class BayesianLinear(BayesianLayer):
    """Bayesian ``nn.Linear``: x [N, ..., in_features] -> [N, ..., out_features].

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        prior_std: the Gaussian prior's std (or ``prior=`` a GaussianPrior / ScaleMixturePrior).
        init_std: the initial sigma of every weight (rho = softplus^-1(init_std)); mu starts as
            nn.Linear's default init.
        estimator: 'reparam', 'local' or 'flipout' (module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_std: float = 1.0, *,
                 prior=None, init_std: float = 0.05, estimator: str = "reparam"):
        super().__init__((out_features, in_features), bias, prior if prior is not None else prior_std, init_std,
                         estimator, Affine("linear"), in_features)
        self.in_features, self.out_features = in_features, out_features


class BayesianConv2d(BayesianLayer):
    """Bayesian ``nn.Conv2d``: x [N, C_in, H, W] -> [N, C_out, H', W'] (zero padding; arguments as
    ``nn.Conv2d`` plus those of :class:`BayesianLinear`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, prior_std: float = 1.0, *, prior=None, init_std: float = 0.05,
                 estimator: str = "reparam"):
        k = nn.modules.utils._pair(kernel_size)
        if isinstance(padding, str):
            raise ValueError(f"BayesianConv2d takes numeric padding (int or pair), got {padding!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        super().__init__((out_channels, in_channels // groups, *k), bias, prior if prior is not None else prior_std,
                         init_std, estimator,
                         Affine("conv2d", nn.modules.utils._pair(stride), nn.modules.utils._pair(padding),
                                nn.modules.utils._pair(dilation), groups),
                         in_channels // groups * k[0] * k[1])
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
