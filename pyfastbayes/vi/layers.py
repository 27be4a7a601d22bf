"""Mean-field Gaussian Bayesian layers (Bayes by Backprop, Blundell et al. 2015).

Each weight has q(w) = N(mu, sigma^2), sigma = softplus(rho); parameters ``weight_mu``,
``weight_rho``, ``bias_mu``, ``bias_rho`` (bayesian-torch's ``mu_weight`` / ``rho_weight`` names are
accepted by ``load_state_dict``). Every forward draws new noise from the layer's Philox position, a
buffer ``rng`` = (seed, step) advanced by one per successful forward (seeded from torch's global
generator at construction, so ``torch.manual_seed`` makes runs repeatable, and saved in the
state_dict, so a loaded layer draws the same noise; a deep copy draws its original's noise too:
``reseed_()`` gives a layer a fresh seed); the noise is regenerated in the backward, never stored
(see _functions.py).

Estimators: 'reparam' (one weight sample per forward, shared by the batch), 'local' (local
reparameterisation, Kingma et al. 2015: pre-activations sampled from N(x mu^T, x^2 sigma^2^T),
independent per example; on a convolution, or a Linear over [N, ..., F], independent per output
element too, i.e. as if each position had its own weight draw (as in Molchanov et al. 2017): its
gradients estimate a different objective from the model's shared-weight one where positions
interact), 'flipout' (Wen et al. 2018: the shared perturbation sigma eps multiplied by random
signs per example and feature on inputs and outputs, shared by a convolution's pixels, so every
position of an example sees one weight draw). Under torch.distributed each rank draws from its
own streams (DDP broadcasts rank 0's RNG position with the buffers).
"""
from __future__ import annotations

import math
import numbers
import weakref

import torch
from torch import Tensor, nn

from .. import ops
from ..calibration._checks import check_generator, check_int
from ..nn.inputs import dtype_mismatch
from ._functions import _FORWARD_KL, Affine, Flipout, LocalMoments, LocalNoise, SampledAffine
from .priors import GaussianPrior, as_prior

ESTIMATORS = ("reparam", "local", "flipout")
# streams of a layer's seed: 0 weight, 1 bias, 2 local-reparameterisation output, 3/4 flipout's
# input/output signs; every layer draws its own 64-bit seed


def _rho(std: float) -> float:
    """softplus^-1(std)."""
    return std + math.log(-math.expm1(-std))


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair; TypeError / ValueError naming ``name``
    (checked here rather than left to the first forward, which would fail after drawing noise)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(check_int(v, name, minimum) for v in pair)


def check_options(init_std, estimator) -> None:
    """The layer options every Bayesian layer shares (also checked by to_bayesian before it builds
    any layer): ``estimator`` one of ESTIMATORS, ``init_std`` a finite real > 0 (not a bool)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real):  # True would silently be sigma = 1
        raise TypeError(f"init_std must be a float > 0 (the initial sigma), got {type(init_std).__name__}")
    if not (math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std must be a finite number > 0 (the initial sigma), got {init_std!r}")


def _param_state(params) -> tuple:
    """What must not change for a carried KL to hold: versions, storage and requires_grad of each."""
    return tuple(None if p is None else (p._version, p.data_ptr(), p.requires_grad) for p in params)


_RANK_STREAMS: list[int] = []  # 5 * this process's rank, once torch.distributed is initialised


def _rank_streams() -> int:
    """The stream offset of this process: 5 * rank under torch.distributed (0 otherwise), so ranks
    draw independent noise. DDP broadcasts rank 0's buffers, the RNG position among them, at every
    forward: without the offset every rank drew rank 0's noise (one weight draw for the whole
    global batch). Streams are 32-bit: ranks up to 858 million."""
    if _RANK_STREAMS:
        return _RANK_STREAMS[0]
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    _RANK_STREAMS.append(5 * dist.get_rank())
    return _RANK_STREAMS[0]


class BayesianLayer(nn.Module):
    """What BayesianLinear and BayesianConv2d share: parameters, prior, RNG position, estimators."""

    def __init__(self, weight_shape: tuple, bias: bool, prior, init_std: float, estimator: str, affine: Affine,
                 fan_in: int):
        super().__init__()
        check_options(init_std, estimator)
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
        self.register_buffer("rng", torch.tensor([_draw_seed(None), 0], dtype=torch.int64))
        self.stream = 0  # streams 0..4 of the layer's own seed: (seed, step) in the state_dict fix its noise
        self.sample_weights = True
        self._register_load_state_dict_pre_hook(_accept_bayesian_torch_names, with_module=True)

    def reseed_(self, generator: torch.Generator | None = None) -> "BayesianLayer":
        """A new 64-bit seed (from the CPU ``generator``, or torch's global CPU generator) at step 0:
        from now on the layer draws noise independent of any copy's. ``copy.deepcopy`` (and a state
        dict loaded into another layer) keeps the RNG position, so a copy draws the same noise as its
        original, e.g. the members of an ensemble built by deep copies: reseed each. In place, no
        gradient; returns the layer."""
        seed = _draw_seed(check_generator(generator))
        with torch.no_grad():
            self.rng.copy_(torch.tensor([seed, 0], dtype=torch.int64))
        return self

    def _apply(self, fn, recurse=True):
        """nn.Module's (``.to``, ``.double()``, ``.cuda()``, ...), the RNG position kept int64:
        ``Module.type(dtype)`` casts every buffer, and a 64-bit seed does not survive a float."""
        rng = self.rng
        out = super()._apply(fn, recurse)
        if self.rng.dtype != torch.int64:
            self.rng = rng.to(self.rng.device)
        return out

    def _advance_rng(self) -> None:
        """Advance the RNG position by one step: one in-place add of (0, 1), no host sync, so a
        training step can be captured. Called once the forward has succeeded (it drew from a clone
        of the position), so a failed forward leaves the position, and so the next noise, as it was."""
        self.rng.add_(_step_one(self.rng.device))  # an int64 buffer: no autograd to switch off

    def forward(self, x: Tensor) -> Tensor:
        """x [N, ...] -> the layer's output with weights drawn from q (or at the means when
        ``sample_weights`` is False). TypeError when x's dtype is not the parameters' (outside autocast)."""
        mu = self.weight_mu  # read once: a parametrization recomputes it at every access
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: the input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != mu.dtype:  # one dtype comparison; the slow path only on a mismatch
            _check_input_dtype(x, mu)
        if x.dim() == 3 and self.affine.kind == "conv2d":  # an unbatched [C, H, W], as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        compiling = torch.compiler.is_compiling()
        if not compiling:
            _FORWARD_KL.pop(self, None)  # the previous forward's KL (and its graph) is of no more use
        if not self.sample_weights:
            return self.affine(x, mu, self.bias_mu)
        if not compiling:
            if torch._C._current_graph_task_id() != -1:
                _refuse_recomputation(self)
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"{type(self).__name__}: torch.func transforms (grad, vmap, jacrev, ...) over a layer that draws "
                    "its weights are not supported (its fused noise nodes are autograd Functions without functorch "
                    "rules); set layer.sample_weights = False for a deterministic pass at the means, or call the "
                    "model outside the transform (torch.func.functional_call alone works)")
        carries = not compiling and torch.is_grad_enabled()  # (under no_grad no KL gradient is wanted)
        rng = ops.rng_snapshot(self.rng)  # this forward's position; the buffer advances below, on success only
        s = self.stream + _rank_streams()
        rho, bias_mu, bias_rho = self.weight_rho, self.bias_mu, self.bias_rho
        # the layer's KL from this forward's own pass over mu and rho (kl_divergence takes it once;
        # torch.compile keeps the one-output nodes and kl_divergence's fused reduction)
        v = self.prior.std ** 2 if carries and isinstance(self.prior, GaussianPrior) else None
        owner = None if v is None else (weakref.ref(self), object())
        if self.estimator == "reparam":
            out = SampledAffine.apply(x, mu, rho, bias_mu, bias_rho, rng, s, s + 1, self.affine, v, owner)
        elif self.estimator == "local":
            out = LocalMoments.apply(x, mu, rho, bias_mu, bias_rho, self.affine, rng, v, owner)
            out = (LocalNoise.apply(out[0], out[1], rng, s + 2),) + out[2:]
        else:  # flipout: x mu + b + ((x * s_in) dW^T) * s_out, dW = sigma eps shared by the batch
            out = Flipout.apply(x, mu, rho, bias_mu, bias_rho, rng, s, self.affine, v, owner)
        if v is not None:
            out, kl = out
            params = (mu, rho, bias_mu, bias_rho)
            _FORWARD_KL[self] = (kl, params, _param_state(params), v, owner[1])
        elif isinstance(out, tuple):  # local without a KL: (noisy output,)
            out = out[0]
        self._advance_rng()
        return out

    def take_forward_kl(self) -> Tensor | None:
        """The closed-form KL(q || p) of this layer's weights and bias (a 0-dim tensor) as its last
        forward computed it, in the pass that drew the weights, differentiable in mu and rho through
        that forward's autograd node (whose backward adds the KL's gradient in its own pass over
        mu and rho); taken once (a second call gives None). None when there is none that still
        holds: no forward with grad mode on since the last take or backward, a parameter changed
        since (in place: its version; its storage, e.g. ``model.double()``; requires_grad), another
        tensor in place of a parameter, another prior, or a scale-mixture prior (no closed form).
        An in-place write that bumps no version (a write through ``.data`` into the same storage,
        torch.optim's fused Adam step) between the forward and this call goes unseen: take the KL
        right after the forward, as a loss does. :func:`~pyfastbayes.vi.kl_divergence` calls it and
        reduces the other layers' KLs itself."""
        entry = _FORWARD_KL.pop(self, None)
        if entry is None:
            return None
        kl, params, state, v, _ = entry
        current = (self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho)
        if (any(a is not b for a, b in zip(params, current)) or _param_state(params) != state
                or not isinstance(self.prior, GaussianPrior) or self.prior.std ** 2 != v):
            return None
        return kl if torch.is_grad_enabled() else kl.detach()

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, prior={self.prior!r}"


def _draw_seed(generator: torch.Generator | None) -> int:
    """A 64-bit seed from ``generator`` (a CPU one) or torch's global CPU generator, drawn on the CPU
    whatever the default device (under torch.device('meta') .item() would fail)."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (the seed is drawn on the CPU), got one on "
                         f"{generator.device}")
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device="cpu", generator=generator))


def _refuse_recomputation(layer: nn.Module) -> None:
    """A forward that runs inside a backward pass is activation checkpointing's recomputation
    (``torch.utils.checkpoint``, either variant): the layer's position has advanced since the
    original forward, so the regenerated noise, and every gradient, would belong to other draws."""
    raise RuntimeError(f"{type(layer).__name__}: its forward is running inside a backward pass, i.e. recomputed by "
                       "activation checkpointing (torch.utils.checkpoint); the layer draws new noise at every "
                       "forward, so the recomputation would differ from the forward the gradients belong to. "
                       "Keep Bayesian layers outside checkpointed regions (or set layer.sample_weights = False "
                       "for a deterministic pass)")


def _check_input_dtype(x: Tensor, mu: Tensor) -> None:
    """x's dtype differs from the parameters': :func:`~pyfastbayes.nn.inputs.dtype_mismatch`'s TypeError
    (instead of the op's 'mat1 and mat2 must have the same dtype'), except under autocast, which
    casts them itself."""
    if not torch.is_autocast_enabled(x.device.type):
        raise dtype_mismatch(x, mu.dtype, owner="the Bayesian layer")


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


def _accept_bayesian_torch_names(layer, state, prefix, *args):
    """load_state_dict pre-hook: bayesian-torch's mu_weight / rho_weight (mu_kernel / rho_kernel for
    its convolutions) / mu_bias / rho_bias keys are renamed to weight_mu / weight_rho / bias_mu /
    bias_rho, and its prior and eps buffers dropped; such a state, which has no RNG position,
    keeps the layer's own ``rng`` (so it loads with strict=True)."""
    theirs_found = False
    for theirs, ours in (("mu_weight", "weight_mu"), ("rho_weight", "weight_rho"), ("mu_kernel", "weight_mu"),
                         ("rho_kernel", "weight_rho"), ("mu_bias", "bias_mu"), ("rho_bias", "bias_rho")):
        if prefix + theirs in state and prefix + ours not in state:
            state[prefix + ours] = state.pop(prefix + theirs)
            theirs_found = True
    if theirs_found and prefix + "rng" not in state:
        state[prefix + "rng"] = layer.rng.detach().clone()
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
        in_features = check_int(in_features, "in_features", 1)  # 0 would divide by zero in the init
        out_features = check_int(out_features, "out_features", 1)
        super().__init__((out_features, in_features), bias, prior if prior is not None else prior_std, init_std,
                         estimator, Affine("linear"), in_features)
        self.in_features, self.out_features = in_features, out_features


class BayesianConv2d(BayesianLayer):
    """Bayesian ``nn.Conv2d``: x [N, C_in, H, W] -> [N, C_out, H', W'] (zero padding; arguments as
    ``nn.Conv2d`` plus those of :class:`BayesianLinear`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, prior_std: float = 1.0, *, prior=None, init_std: float = 0.05,
                 estimator: str = "reparam"):
        # every size checked here, before any parameter exists: 0 channels or a 0 kernel would divide
        # by zero in the init, groups=0 take a modulo by zero, a bad stride fail only at the first forward
        in_channels, out_channels = check_int(in_channels, "in_channels", 1), check_int(out_channels, "out_channels", 1)
        groups = check_int(groups, "groups", 1)
        k = _pair(kernel_size, "kernel_size", 1)
        if isinstance(padding, str):
            raise ValueError(f"BayesianConv2d takes numeric padding (int or pair), got {padding!r}")
        stride, padding, dilation = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        super().__init__((out_channels, in_channels // groups, *k), bias, prior if prior is not None else prior_std,
                         init_std, estimator, Affine("conv2d", stride, padding, dilation, groups),
                         in_channels // groups * k[0] * k[1])
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
