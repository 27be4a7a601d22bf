r"""``pyfastbayes.laplace.Laplace``: a Gaussian posterior N(theta_MAP, P^-1) around a trained network,
P = s H + P_0 (see :mod:`~pyfastbayes.laplace.marglik`), as a :class:`~pyfastbayes.posteriors.Posterior`.

Names follow laplace-torch (``fit``, ``log_marginal_likelihood``, ``optimize_prior_precision``,
``la(x, pred_type, link_approx)``), and so do the numbers: the curvature of the summed loss, KFAC
factors A = mean a a^T and G = sum g g^T, the log marginal likelihood term by term. What differs is
how they are computed: one forward and one batched backward of the m output-space directions per
batch (C - 1 for the exact GGN of a softmax: its rank), Kronecker factors accumulated in place by
a native op, and a GLM predictive built from Kronecker quadratic forms of each input's
activations and output gradients instead of [N, C, P] Jacobians.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._memory import allocation_cache
from ..nn import ModeGuard
from ..nn.calls import parameter_calls
from ..nn.gaussian import NotNatural, check_natural, natural_targets, natural_to_mean_var
from ..nn.inputs import dtype_mismatch, iterate_inputs, model_input, model_output
from ..nn.rows import cat_rows, is_rows, row_count, rows_to, same_row_shapes, split_rows, take_rows
from ..nn.stateless import functional_call
from ..nn.loaders import batches as loader_batches
from ..calibration._checks import check_int, check_positive_float
from ..posteriors.base import Posterior
from . import marglik as ml
from ._layers import build_layers
from ._uses import used_outside
from ._likelihood import (CURVATURES, GAUSSIAN, HETERO, LIKELIHOODS, check_targets, directions, log_likelihood,
                          outputs_2d, summed_loss)
from .eigenbasis import METHODS as EIGH_METHODS
from .factors import STRUCTURES, Recorder, backprop, block_parts
from .lowrank import LowRankCurvature, LowRankPrecision
from . import subnetwork as subnet
from .precision import PRECISIONS
from .predictive import LINKS, draws, probabilities
from .._warnings import warn_user

__all__ = ["Laplace", "RegressionPredictive"]

SUBSETS = ("all", "last_layer", "subnetwork")
BIAS_BLOCKS = ("joint", "separate")
SHARING = ("expand", "reduce")
PRED_TYPES = ("glm", "nn")
# the GLM predictive's Jacobian parts of one chunk of input rows stay under this many bytes (on CUDA
# also under a quarter of the free memory): a layer with shared weights (a convolution, a Linear on
# [N, T, in], an Embedding) keeps [C, out, in] numbers per row, which at the default 256 rows per
# batch reached gigabytes for a CNN of a million weights
_GLM_BYTES = 256 << 20
COVARIANCE_BYTES = 1 << 30  # the largest dense posterior_covariance built for 'kron' / 'lowrank'
_BACKPROP_ROWS = 32  # input rows per torch.func.jacrev of the explicit-Jacobian GLM path (cost ~ rows^2 C)
_FIT_BYTES = 256 << 20  # fit's output gradients of one batched backward (Laplace._directions_per_pass)
_CONSTRUCTOR = object()  # Laplace._plan: the prior given to the constructor (or set before fit)
_STATE_NAMES = ("state_dict['prior_precision']", "state_dict['prior_mean']")


_STRUCTURES = {**STRUCTURES, "lowrank": LowRankCurvature}
_PRECISIONS = {**PRECISIONS, "lowrank": LowRankPrecision}


class RegressionPredictive(NamedTuple):
    """The regression predictive of :meth:`Laplace.predict`: mean [N, C] and total variance [N, C] =
    aleatoric (sigma^2) + epistemic (the functional variance's diagonal)."""
    mean: Tensor
    variance: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def heteroscedastic_glm(f_mu: Tensor, f_var: Tensor) -> RegressionPredictive:
    """The GLM predictive of y for natural parameters eta ~ N(f_mu [N, 2D], f_var [N, 2D, 2D]) by
    the delta method (first order, the linearisation of the GLM carried through eta -> (mu, s2)):
    mean mu(f_mu) and aleatoric s2(f_mu) [N, D]; epistemic g^T f_var g per target, g = d mu / d
    (eta1, eta2) = s2 (1, 2 mu), i.e. the linearised network's variance of the mean. A draw-based
    alternative: predict(..., pred_type='nn')."""
    mu, s2 = natural_to_mean_var(f_mu)
    D = mu.shape[1]
    d = torch.arange(D, device=f_mu.device)
    v11, v12, v22 = f_var[:, d, d], f_var[:, d, d + D], f_var[:, d + D, d + D]
    g2 = 2 * mu
    epi = s2.square() * (v11 + 2 * g2 * v12 + g2.square() * v22)
    return RegressionPredictive(mu, s2 + epi, s2, epi)


def _gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """The mean over rows of the Gaussian NLL of targets y [N, D] (summed over D) under N(mean, var)."""
    return float((0.5 * (torch.log(2 * math.pi * var) + (y - mean).square() / var)).sum(1).mean())


FEATURE_REDUCTIONS = ("pick_first", "pick_last", "average")


def _choice(value, options, name):
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _link(pred_type: str, link_approx: str | None) -> str:
    """The link of a predictive: ``link_approx`` (default 'probit') for 'glm'; 'nn' averages sampled
    networks, i.e. 'mc', and refuses another link (as laplace-torch does; it was silently ignored)."""
    if pred_type == "nn" and link_approx not in (None, "mc"):
        raise ValueError(f"pred_type='nn' averages sampled networks (link_approx='mc'); link_approx={link_approx!r} "
                         "applies to pred_type='glm'")
    if link_approx is not None and link_approx not in LINKS:  # regression ignores the link, but not a typo
        raise ValueError(f"link_approx must be one of {LINKS} (or None: probit), got {link_approx!r}")
    return "probit" if link_approx is None else link_approx


def _check_sigma(value, likelihood: str, dtype, device, name: str = "sigma_noise") -> Tensor:
    """sigma_noise (a float or a one-value tensor; a tensor keeps its autograd graph) as a tensor [],
    finite and > 0, and 1 unless the likelihood is 'regression'; one path for the constructor,
    the setter, log_marginal_likelihood and load_state_dict."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or torch.is_tensor(value)):
        raise TypeError(f"{name} must be a float > 0 or a one-value tensor, got {type(value).__name__}")
    if torch.is_tensor(value) and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real tensor (the noise standard deviation), got {value.dtype}")
    # a copy (its graph kept): the Laplace owns it (the caller's tensor changed in place later changes nothing)
    t = value.to(dtype=dtype, device=device, copy=True) if torch.is_tensor(value) else \
        torch.tensor(float(value), dtype=dtype, device=device)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar (a float or a tensor with one value), got shape "
                         f"{tuple(t.shape)}")
    t = t.reshape(())
    v = float(t.detach())
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    if likelihood != "regression" and v != 1.0:
        raise ValueError(f"sigma_noise is the regression noise; likelihood={likelihood!r} needs {name}=1, "
                         f"got {v}")
    return t


_PRINT_CHUNK = 1 << 22


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Laplace of a ``dtype`` model computes in: float32 for float16 / bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fingerprints(model: nn.Module, trainable: list[str]) -> dict[str, Tensor]:
    """Per frozen floating parameter and persistent floating buffer of ``model`` (the trainable
    parameters, named ``trainable``, are compared exactly through the mean) a float64
    fingerprint [7] on the CPU: over its finite values the sum, the sum of squares, a
    position-weighted sum and the sum of absolute values (the others' scale), then the counts of
    NaN, +inf and -inf entries (a sparse tensor: its coalesced indices and values), computed on
    its device in chunks. A Laplace records them at fit: its curvature and GLM predictive depend
    on those tensors too, and a state_dict loaded into a model whose frozen part differs is
    refused. Integer buffers (step counters, num_batches_tracked) and non-persistent ones (caches
    a forward may fill) are left out."""
    skip = set(trainable)
    persistent = set(model.state_dict(keep_vars=True))
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in skip or name not in persistent or not t.is_floating_point() or t.device.type == "meta":
            continue
        if t.layout != torch.strided:
            c = t.detach().to_sparse_coo().coalesce()
            flat = torch.cat([c.indices().reshape(-1).double(), c.values().reshape(-1).double()])
        else:
            flat = t.detach().reshape(-1)
        acc = torch.zeros(7, dtype=torch.float64, device=t.device)
        for k, c in enumerate(flat.split(_PRINT_CHUNK)):
            c = c.double()
            odd = torch.stack([c.isnan().sum(), c.isposinf().sum(), c.isneginf().sum()]).double()
            c = torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)
            w = torch.arange(c.numel(), dtype=torch.float64, device=c.device).remainder_(1021).add_(1 + k % 7)
            acc += torch.cat([torch.stack([c.sum(), c.square().sum(), (c * w).sum(), c.abs().sum()]), odd])
        out[name] = acc.cpu()
    return out


def _same_fingerprint(a, b) -> bool:
    """Whether two fingerprints (:func:`_fingerprints`) agree: the sums up to float64 rounding
    (sums on two devices may differ in their last bits: each within 1e-10 of its scale), the
    counts of non-finite entries exactly."""
    a, b = a.double().cpu(), b.double().cpu()
    scale = torch.stack([a[3], a[1], 1028 * a[3], a[3]]).abs()
    return bool(((a[:4] - b[:4]).abs() <= 1e-10 * scale).all()) and torch.equal(a[4:], b[4:])


def _check_prior_mean(value, P: int | None, dtype, device, name: str = "prior_mean") -> Tensor:
    """prior_mean (a float, or a tensor [] / [1] / [P]) as a finite tensor; ``P=None`` (a last-layer
    Laplace before fit) leaves the length of a 1-D tensor to fit."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or torch.is_tensor(value)):
        raise TypeError(f"{name} must be a float or a tensor [P], got {type(value).__name__}")
    if torch.is_tensor(value) and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
    # a detached copy, as the stored prior precision and noise: the Laplace owns it (the caller's
    # tensor changed in place later changes nothing; no graph is kept into its evidence or state)
    t = value.detach().to(dtype=dtype, device=device, copy=True) if torch.is_tensor(value) else \
        torch.tensor(float(value), dtype=dtype, device=device)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() != 1 and P is not None and t.numel() != P) or \
            (t.dim() == 1 and not t.numel()):
        raise ValueError(f"{name} must be a float or a tensor [P]{f' = [{P}]' if P is not None else ''}, got "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (no NaN or infinity)")
    return t


def _refuse_unbatched(x, out, name: str) -> None:
    """ValueError for inputs given without their batch dimension (one example [D] where [N, D] is
    meant): the model's outputs have rows, but not the inputs' number (0-dim outputs are left to
    the likelihood's shape message: a model squeezing a batch of one). ``x``: a tensor or a dict
    batch (:mod:`pyfastbayes.nn.rows`)."""
    if torch.is_tensor(out) and out.dim() > 0 and (_rows_or_none(x) != out.shape[0]):
        raise ValueError(f"{name}: the model returned {out.shape[0]} output rows for inputs of shape "
                         f"{_shape(x)}: pass the inputs as a batch [N, ...] (one example: x.unsqueeze(0))")


def _shape(x):
    """A batch's shape for messages: the tensor's, or a dict batch's per key."""
    return tuple(x.shape) if torch.is_tensor(x) else {k: tuple(v.shape) for k, v in x.items() if torch.is_tensor(v)}


def _rows_or_none(x) -> int | None:
    return None if torch.is_tensor(x) and x.dim() == 0 else row_count(x)




def _length(loader) -> int | None:
    """len(loader) where it has one: a DataLoader over an IterableDataset without __len__ has the
    attribute but raises TypeError."""
    try:
        return len(loader)
    except TypeError:
        return None



def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """model.get_submodule(name), None where there is no such module any more."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None

class Laplace(Posterior):
    """Laplace approximation of the posterior over a trained network's weights.

    Args:
        model: the trained network (its current weights are the MAP); outputs [N, C] logits for
            'classification', [N] or [N, 1] for 'binary', [N] or [N, C] for 'regression'.
        likelihood: 'classification' (cross-entropy), 'regression' (Gaussian with noise
            ``sigma_noise``), 'binary' (one logit, Bernoulli) or 'reward_modeling'
            (laplace-torch's): fitted as the 'classification' of preference pairs (the model
            maps inputs [N, 2, ...] to the pair's rewards [N, 2], targets: the preferred one) and
            predicted as the 'regression' of one reward per input ([N, ...] -> [N] or [N, 1];
            no observation noise); ``fitting=True`` in :meth:`la` / :meth:`predictive_samples`
            predicts pairs, and the gridsearch scores the validation pairs; or
            'heteroscedastic_regression' (Immer et al. 2023): the model outputs the natural
            parameters [N, 2D] of a Gaussian per target, eta1 = mu / s2 then eta2 = -1 / (2 s2) < 0
            (end it in :class:`pyfastbayes.nn.NaturalHead`), targets [N, D] ([N] for D = 1); the
            exact GGN is then the Fisher, the noise is the model's (sigma_noise stays 1), ``la``
            returns the natural parameters' (f_mu, f_var) and :meth:`predict` the moments of y
            (mean, aleatoric s2, epistemic variance of the mean).
        subset_of_weights: 'all' trainable weights, 'last_layer' (the last module with
            parameters called in the forward, which must be an ``nn.Linear``) or 'subnetwork'
            (the entries ``subnetwork_indices``, the others held at the MAP; Daxberger et al.
            2021, laplace-torch's SubnetLaplace; hessian_structure 'full' or 'diag').
        last_layer_name: for 'last_layer', the nn.Linear to cover (a name of
            ``model.named_modules()``, laplace-torch's option): set up at construction, so the
            covered parameters, ``n_params`` and a per-weight prior are known before fit; default:
            the last module with trainable parameters that the first batch's forward calls.
        subnetwork_indices: for 'subnetwork', a 1-D integer tensor [k] of flat positions in the
            trainable parameters (``parameters_to_vector`` of those with requires_grad; unique,
            sorted here: ``positions`` is their order), e.g. from
            :mod:`pyfastbayes.laplace.subnetmask`.
        hessian_structure: 'kron' (KFAC), 'diag' (exact diagonal), 'full', 'lowrank' (the top
            ``low_rank`` eigenpairs by block Lanczos on the matrix-free curvature plus a scalar
            prior; the loader must be re-iterable: several data passes).
        prior_precision: delta > 0: a float, or a tensor [] / [n_blocks] (layerwise) / [P] (diag;
            not for 'kron').  prior_mean: a float or a tensor [P] (default 0).
        sigma_noise: the regression noise standard deviation (must stay 1 for the others).
        temperature: T; the likelihood curvature is scaled by 1 / (sigma^2 T).
        curvature: 'ggn' (exact generalised Gauss-Newton = Fisher for these likelihoods),
            'mc_fisher' (``mc_samples`` sampled labels per input), 'ef' (empirical Fisher).
        bias_block: 'joint' (a layer's weight and bias form one Kronecker block: the activation
            factor gets the bias column) or 'separate' (laplace-torch's blocks).
        feature_reduction: for 'last_layer' over features [N, T, D] whose model reduces the layer's
            outputs over the T positions (laplace-torch's option, e.g. an LLM's classifier head):
            'pick_first' / 'pick_last' (the model reads that position's outputs: checked at fit),
            'average' (their mean) or None. Only the Kronecker factors depend on it: that
            position's features, or the mean feature with the summed output gradient (Eschenhagen
            et al.'s 'reduce'), i.e. the KFAC of the reduced model; 'diag', 'full' and the
            predictives use the exact Jacobians of whatever the model does, as laplace-torch's with
            the option. (laplace-torch's own 'kron' ignores the option: curvlinops' KFAC sees the
            head's inputs at all T positions, our None / 'expand'.)
        kfac_approx: 'expand' or 'reduce' for layers whose weights are shared over positions
            (convolutions, sequences).
        unsupported: for hessian_structure='kron', 'error' (default) or 'diag' (diagonal blocks,
            with a warning) for modules with parameters that have no Kronecker factorisation. The
            other structures take any module (PReLU, grouped or circular convolutions, ...)
            exactly, from per-example gradients of its own forward, provided its call returns one
            tensor and the forward reads its parameters only through that call (not nn.GRU /
            nn.LSTM, which return tuples, nor nn.MultiheadAttention, which reads its out_proj's
            weights itself: refused with an error; freeze them or use 'last_layer'). A module the
            forward calls several times is covered by all its calls (KFAC: their positions share
            the weight).
        eigh_method: how the Kronecker factors are eigendecomposed
            (:func:`pyfastbayes.laplace.eigenbasis.eigh_many`).
        dict_key_y: the targets' key when a loader yields dict batches (HuggingFace style, as
            laplace-torch's ``dict_key_y``): the model gets the whole dict, ``model(batch)``,
            and every tensor in it holds the batch's N rows first; predictives take such a dict
            (split into row chunks) or a loader of them.
        output_fn: model output -> the outputs tensor, for models that return something else
            (a HuggingFace ``ModelOutput``: ``lambda out: out.logits``); used in every forward
            (fit, predictives, 'lowrank', ``marglik_training``).
        enable_backprop: predictives differentiable in their inputs (laplace-torch's option, e.g.
            for Bayesian-optimisation acquisition functions): :meth:`la`, :meth:`predict`,
            :meth:`predictive_samples` and :meth:`functional_variance` keep the graph to x. The
            GLM predictive then builds each row chunk's explicit Jacobians [n, C, P_c] with
            torch.func.jacrev (memory as laplace-torch's; default False: no Jacobian tensor),
            the 'nn' one runs each draw through torch.func.functional_call.

    After :meth:`fit`: ``mean`` [P] (the MAP), ``n_data``, ``n_outputs``, :meth:`log_marginal_likelihood`,
    :meth:`optimize_prior_precision`, :meth:`la` (laplace-torch's ``__call__``, also ``la(x)``),
    :meth:`predict`, :meth:`predictive_samples`, :meth:`sample`, :meth:`to_dense`, ``posterior_precision``,
    ``posterior_variance``, ``posterior_covariance``, ``log_det_posterior_precision``,
    ``log_det_prior_precision``, ``log_det_ratio``, ``scatter``, ``state_dict``. ``positions`` [P_c]
    (int64): where the P_c covered parameters sit in the flat [P] layout of ``mean`` and
    :meth:`sample` (all of them for subset_of_weights='all'; the sorted ``subnetwork_indices``
    for 'subnetwork'); ``n_params`` = P_c.
    Everything after ``hessian_structure`` is keyword-only (laplace-torch's positional order
    differs).
    """

    kind = "Laplace"

    def __new__(cls, model=None, likelihood: str = "classification", subset_of_weights: str = "all",
                hessian_structure: str = "kron", **kwargs):
        """``hessian_structure='gp'`` (laplace-torch's functional Laplace, ``n_subset=`` given) builds a
        :class:`~pyfastbayes.laplace.FunctionalLaplace` instead, as laplace-torch's ``Laplace``
        factory does, over all weights or the last layer (its keyword options: n_subset,
        prior_precision, sigma_noise, prior_mean, temperature, independent_outputs, seed,
        batch_size, output_fn, last_layer_name, feature_reduction)."""
        if cls is Laplace and hessian_structure == "gp":
            if "n_subset" not in kwargs:
                raise ValueError("hessian_structure='gp' (the functional Laplace) needs n_subset=M, the training rows "
                                 "its GP conditions on")
            from .functional import FunctionalLaplace

            return FunctionalLaplace(model, likelihood, subset_of_weights=subset_of_weights, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, likelihood: str = "classification", subset_of_weights: str = "all",
                 hessian_structure: str = "kron", *, prior_precision=1.0, sigma_noise: float = 1.0,
                 temperature: float = 1.0, curvature: str = "ggn", prior_mean=0.0, bias_block: str = "joint",
                 kfac_approx: str = "expand", unsupported: str = "error", mc_samples: int = 1,
                 eigh_method: str = "auto", low_rank: int = 20, dict_key_y: str = "labels", output_fn=None,
                 enable_backprop: bool = False, subnetwork_indices=None, last_layer_name: str | None = None,
                 feature_reduction: str | None = None):
        super().__init__(model)
        self.likelihood = _choice(likelihood, LIKELIHOODS, "likelihood")
        self._fitting = False  # reward_modeling: the pairs' classification (fit, gridsearch, la(fitting=True))
        self.subset_of_weights = _choice(subset_of_weights, SUBSETS, "subset_of_weights")
        self.hessian_structure = _choice(hessian_structure, tuple(_STRUCTURES), "hessian_structure")
        self.low_rank = check_int(low_rank, "low_rank", 1)
        self.curvature = _choice(curvature, CURVATURES, "curvature")
        self.bias_block = _choice(bias_block, BIAS_BLOCKS, "bias_block")
        self.kfac_approx = _choice(kfac_approx, SHARING, "kfac_approx")
        self.unsupported = _choice(unsupported, ("error", "diag"), "unsupported")
        self.mc_samples = check_int(mc_samples, "mc_samples", 1)
        self.eigh_method = _choice(eigh_method, EIGH_METHODS, "eigh_method")
        self.dict_key_y = dict_key_y
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (model output -> tensor), got {type(output_fn).__name__}")
        self.output_fn = output_fn
        if not isinstance(enable_backprop, bool):
            raise TypeError(f"enable_backprop must be True or False, got {type(enable_backprop).__name__}")
        self.enable_backprop = enable_backprop
        self.temperature = temperature
        # float16 / bfloat16 models: curvature, posterior, evidence and predictive moments in float32
        # (sums of squared gradients overflow float16, torch has no half Cholesky / eigh on the CPU)
        self.model_dtype, self.device = self.layout.dtype, self.layout.device
        self.dtype = _accumulator_dtype(self.model_dtype)
        self._sigma = _check_sigma(sigma_noise, likelihood, self.dtype, self.device).detach().clone()
        self._prior_value, self._prior_mean_value = prior_precision, prior_mean
        self._prior: Tensor | None = None
        self.layers = None
        self._fitted = None  # (curvature, loss, n_data, n_outputs, mean, precision)
        self._frozen: dict[str, Tensor] = {}  # the frozen parameters' and buffers' fingerprints at fit
        self._glm_row_bytes = {}  # the GLM parts' bytes per input row, by the row's shape (_glm_rows)
        self.subnetwork_indices = self._check_subnetwork(subnetwork_indices)
        if feature_reduction is not None:
            _choice(feature_reduction, FEATURE_REDUCTIONS, "feature_reduction")
            if self.subset_of_weights != "last_layer":
                raise ValueError(f"feature_reduction is for subset_of_weights='last_layer' (how the model reduces its "
                                 f"last layer's outputs over positions), got subset_of_weights={self.subset_of_weights!r}")
        self.feature_reduction = feature_reduction
        self._named = last_layer_name is not None  # a last layer given by name, not found in fit
        if last_layer_name is not None and self.subset_of_weights != "last_layer":
            raise ValueError(f"last_layer_name is for subset_of_weights='last_layer', got "
                             f"subset_of_weights={self.subset_of_weights!r}")
        if self.subset_of_weights == "all":
            self._setup(set(self.layout.names))
        elif self.subset_of_weights == "subnetwork":
            self._setup(set(subnet.covered_names(self.layout, self.subnetwork_indices)))
        elif last_layer_name is not None:  # the last layer named: set up now, as laplace-torch's option
            self._setup_last_layer(last_layer_name, self._named_last_layer(last_layer_name, "last_layer_name"))
        else:  # the last layer is found in fit(): what can be checked without it is checked now
            self._prior_value = ml.check_prior(prior_precision, None, None, self.hessian_structure, self.dtype,
                                               self.device)
            self._prior_mean_value = _check_prior_mean(prior_mean, None, self.dtype, self.device)

    # ---- covered parameters ------------------------------------------------------------------------------
    # the attributes _setup assigns (a failed last-layer fit or load puts the previous ones back)
    _SETUP = ("layers", "blocks", "positions", "block_of", "n_params", "_prior", "_prior_mean", "last_layer_name")

    def _plan(self, selected: set[str], prior=_CONSTRUCTOR, prior_mean=_CONSTRUCTOR,
              names=("prior_precision", "prior_mean")) -> dict:
        """The layers and blocks of the covered parameters, their selection order and the checked
        prior (``prior`` / ``prior_mean``, default the constructor's), as the attributes
        :meth:`_setup` assigns; nothing on self changes here."""
        kron = self.hessian_structure == "kron"  # the only structure that approximates a generic module
        layers = build_layers(self.model, self.layout, selected, bias_block=self.bias_block,
                              sharing=self.kfac_approx, unsupported=self.unsupported if kron else "generic")
        if self.subnetwork_indices is not None:  # the covered layers' blocks cut to the subnetwork's entries
            layers = subnet.restrict(layers, self.subnetwork_indices)
        if self.feature_reduction is not None:  # (last_layer only: its one layer, at fit, construction or load)
            if self.feature_reduction == "average":  # the mean feature and the summed output gradient: 'reduce'
                layers[0].sharing = "reduce"
            else:
                layers[0].pick = 0 if self.feature_reduction == "pick_first" else -1
        blocks = [b for layer in layers for b in layer.blocks]
        positions = torch.cat([b.index.reshape(-1) for b in blocks]).sort().values
        rank = torch.full((self.layout.numel,), -1, dtype=torch.long)
        rank[positions] = torch.arange(positions.numel())
        n_params = positions.numel()
        block_of = torch.empty(n_params, dtype=torch.long)  # each covered parameter's block (selection order)
        for i, b in enumerate(blocks):
            b.sel = rank[b.index]
            block_of[b.sel.reshape(-1)] = i
            b.sel = b.sel.to(self.device)
        prior = ml.check_prior(self._prior_value if prior is _CONSTRUCTOR else prior, blocks, n_params,
                               self.hessian_structure, self.dtype, self.device, names[0])
        pm = _check_prior_mean(self._prior_mean_value if prior_mean is _CONSTRUCTOR else prior_mean, n_params,
                               self.dtype, self.device, names[1])
        return dict(layers=layers, blocks=blocks, positions=positions.to(self.device),
                    block_of=block_of.to(self.device), n_params=n_params, _prior=prior, _prior_mean=pm)

    def _setup(self, selected: set[str]) -> None:
        """Build the layers and blocks of the covered parameters and their selection order."""
        self.__dict__.update(self._plan(selected))

    def _setup_state(self) -> dict:
        return {k: self.__dict__[k] for k in self._SETUP if k in self.__dict__}

    def _restore_setup(self, saved: dict) -> None:
        for k in self._SETUP:
            if k in saved:
                self.__dict__[k] = saved[k]
            else:
                self.__dict__.pop(k, None)

    def _find_last_layer(self, x) -> None:
        """subset_of_weights='last_layer': the last module with trainable parameters the forward calls."""
        with ModeGuard(self.model, False):
            try:
                calls = parameter_calls(self.model, x)
            except RuntimeError as e:  # the same words as the forward of the 'all' fit
                wrong = dtype_mismatch(self._model_tensors(x), self.model_dtype, e, name="loader", refit=", then fit again")
                if wrong is not None:
                    raise wrong from e
                raise
            order = [(n, m) for n, m, _ in calls if any(p.requires_grad for p in m.parameters(recurse=False))]
        if not order:
            raise ValueError("subset_of_weights='last_layer': the forward called no module with trainable parameters")
        name, mod = order[-1]
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"subset_of_weights='last_layer' needs the last layer with parameters to be nn.Linear; "
                             f"it is {name!r} ({type(mod).__name__}): pass last_layer_name=<an nn.Linear's name> to "
                             "choose another")
        self._setup_last_layer(name, mod)

    def _setup_last_layer(self, name: str, mod: nn.Module) -> None:
        self._setup(_own_trainable(name, mod))
        self.last_layer_name = name

    # ---- prior -------------------------------------------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """delta: [] (scalar), [n_blocks] (layerwise) or [P] (diag)."""
        return self._prior if self._prior is not None else torch.as_tensor(self._prior_value)

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        if self.layers is None:  # a last-layer Laplace before fit: checked as far as possible now, its length at fit
            self._prior_value = ml.check_prior(value, None, None, self.hessian_structure, self.dtype, self.device)
            return
        self._prior = ml.check_prior(value, self.blocks, self.n_params, self.hessian_structure, self.dtype, self.device)

    @property
    def prior_precision_diag(self) -> Tensor:
        """The prior precision per covered parameter [P_c] (selection order), whatever its shape
        ([], [n_blocks] or [P_c]); laplace-torch's name."""
        if self._prior is None:
            raise RuntimeError("subset_of_weights='last_layer': the covered parameters are known after fit(train_loader)")
        return self._delta().detach()

    @property
    def prior_mean(self) -> Tensor:
        """The prior's mean: [] (one value for every weight) or [P] (per weight, the covered ones' order)."""
        pm = self.__dict__.get("_prior_mean")
        return pm if pm is not None else torch.as_tensor(self._prior_mean_value)

    @prior_mean.setter
    def prior_mean(self, value) -> None:
        if self.layers is None:  # a last-layer Laplace before fit: its length is checked at fit
            self._prior_mean_value = _check_prior_mean(value, None, self.dtype, self.device)
            return
        self._prior_mean = _check_prior_mean(value, self.n_params, self.dtype, self.device)

    @property
    def sigma_noise(self) -> Tensor:
        """The observation noise std sigma (float scalar tensor; regression only, 1 otherwise);
        assignable (checked: finite, > 0)."""
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        self._sigma = _check_sigma(value, self.likelihood, self.dtype, self.device)

    @property
    def temperature(self) -> float:
        """T > 0: the likelihood's curvature and log likelihood are divided by it; assignable
        (checked: a finite number > 0)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value) -> None:
        self._temperature = check_positive_float(value, "temperature")

    @property
    def _fit_likelihood(self) -> str:
        """The likelihood of the fitted data: 'classification' (of preference pairs) for
        'reward_modeling', else ``likelihood``."""
        return "classification" if self.likelihood == "reward_modeling" else self.likelihood

    @property
    def _lik(self) -> str:
        """The likelihood the outputs of the current call have: for 'reward_modeling' the pairs'
        'classification' in fitting mode (fit, gridsearch, ``la(..., fitting=True)``), else
        'regression' (one reward per input); ``likelihood`` otherwise."""
        if self.likelihood != "reward_modeling":
            return self.likelihood
        return "classification" if self._fitting else "regression"

    @contextlib.contextmanager
    def _fitting_mode(self, on: bool = True):
        saved, self._fitting = self._fitting, on or self._fitting
        try:
            yield
        finally:
            self._fitting = saved

    def _scale(self, sigma: Tensor | None = None) -> Tensor:
        """What the fitted curvature (accumulated at sigma = 1) is multiplied by: 1 / (sigma^2 T);
        for the empirical Fisher of a regression 1 / (sigma^4 T), its per-example gradients
        (f - y) J / sigma^2 being squared (laplace-torch 0.3's EF is 2 sigma^2 times this: its summed MSE
        has no 1/2 and it scales the squared gradients by 1 / sigma^2, like the GGN)."""
        sigma = self._sigma if sigma is None else sigma
        s2 = sigma.square()
        if self.curvature == "ef" and self._fit_likelihood == "regression":
            s2 = s2.square()
        return 1.0 / (s2 * self.temperature)

    @property
    def block_names(self) -> list[str]:
        """The names of the blocks (the layerwise prior's order)."""
        self._check_layers()
        return [b.name for b in self.blocks]

    def _check_layers(self):
        if self.layers is None:
            raise RuntimeError("subset_of_weights='last_layer' finds its layer in fit(): call fit(loader) first")

    # ---- fit ---------------------------------------------------------------------------------------------
    def fit(self, loader, *, progress: bool = True, override: bool = True,
            generator: torch.Generator | None = None) -> "Laplace":
        """Accumulate the curvature over ``loader`` (an iterable of (inputs [N, ...], targets) batches,
        e.g. a DataLoader) at the model's current weights, in eval mode; returns self.

        ``override=False`` (laplace-torch's online fitting, e.g. a sequence of tasks): the new
        batches' curvature, loss and rows are added to those of the previous fits, and the mean
        becomes the model's current weights; the curvature equals one fit over all the data at
        once (Kronecker factors: A averaged over every fitted row, G summed), each part computed
        at the weights of its own fit. Not for 'lowrank' (its eigenpairs do not add up).
        The options are keyword-only: laplace-torch's positional order is (override, progress_bar).

        One forward and one batched backward per batch (one per chunk of the m directions when
        their output gradients would pass 256 MiB, :meth:`_directions_per_pass`); under torch.distributed every process
        passes its own shard and the accumulated curvature, loss and counts are summed over
        processes (one all-reduce). Nothing changes when it fails (empty loader, bad targets,
        non-finite curvature)."""
        # a last-layer Laplace finds its layer here: a failed fit forgets it again (state unchanged)
        saved = self._setup_state() if self.layers is None else None
        if not isinstance(override, bool):
            raise TypeError(f"override must be True or False, got {type(override).__name__}")
        if not override and self.hessian_structure == "lowrank":
            raise ValueError("fit(override=False) adds curvature to the previous fit's, which 'lowrank' cannot (its "
                             "top eigenpairs do not add up): refit on all the data, or use 'kron', 'diag' or 'full'")
        try:
            return self._fit(loader, progress, generator, None if override else self._fitted)
        except BaseException:
            if saved is not None:
                self._restore_setup(saved)
            raise

    def _fit(self, loader, progress: bool, generator, previous=None) -> "Laplace":
        self.layout.params()
        replaced = [layer.name for layer in self.layers or () if _submodule(self.model, layer.name) is not layer.module]
        if replaced:  # the same names and shapes (the layout agrees), but the hooks would go to the old modules
            raise RuntimeError(f"fit: module(s) {replaced} of the model were replaced since this Laplace was built "
                               "(other module objects under the same names); build a new Laplace for the changed "
                               "model")
        if torch.is_tensor(loader):
            raise TypeError("fit needs an iterable of (inputs, targets) batches (e.g. a DataLoader), not a tensor")
        lowrank = self.hessian_structure == "lowrank"
        if lowrank and iter(loader) is loader:
            raise TypeError("hessian_structure='lowrank' walks the data several times: pass a re-iterable loader "
                            "(a DataLoader or a list of batches), not a one-shot iterator")
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        error, curv = None, None
        loss, n_data, n_out = torch.zeros((), dtype=torch.float64, device=self.device), 0, None
        try:
            batches = loader_batches(loader)
            first = next(batches, None)
            if first is None:
                raise ValueError("fit: the loader yielded no batches; pass a loader with at least one (inputs, targets) "
                                 "batch")
            if self.layers is None:
                with self._fitting_mode():
                    self._find_last_layer(rows_to(self._split(first, 0)[0], self.device))
            self._check_uses(self._split(first, 0)[0])
            curv = self._new_curvature()
            # every batch allocates the same MB-sized temporaries (output gradients of the m
            # directions, unfolded patches): on the CPU they are reused from exact-size free lists
            # instead of page-faulting afresh each batch (pyfastbayes._memory.allocation_cache)
            with allocation_cache(torch.device(self.device).type == "cpu"):
                total = _length(loader)  # (the bar's total, when known)
                with self._fitting_mode():
                    loss, n_data, n_out = self._local_pass(curv, first, batches, progress, generator, lowrank, total)
        except Exception as e:  # under torch.distributed the other ranks must learn of it, or they wait forever
            if not dist:
                raise
            error = e
        if dist:
            n_out = self._agree(error, n_out)
            if curv is None:
                curv = self._new_curvature()
        n_data, loss = self._all_reduce(curv, loss, n_data)
        if n_data == 0:
            raise ValueError("fit: the loader's batches hold no rows")
        if lowrank:
            names = self._covered_names()
            with ModeGuard(self.model, False):
                curv.compute(self.model, loader, self._fit_likelihood, self.curvature, names, n_data, n_out,
                             self.mc_samples, generator, self._split, self.output_fn)
        if previous is not None:  # override=False: the previous fits' sums and counts added (to the new tensors)
            p_curv, p_loss, p_n, p_out = previous[:4]
            if p_out != n_out:
                raise ValueError(f"fit(override=False): the model now outputs {n_out} columns, the previous fit saw "
                                 f"{p_out}")
            for t, p in zip(curv.tensors(), p_curv.tensors()):
                t += p
            curv.set_counts([a + b for a, b in zip(curv.counts(), p_curv.counts())])
            loss, n_data = loss + p_loss.double(), n_data + p_n
        for t, b in zip(curv.tensors(), self._tensor_owners(curv)):
            if not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"the curvature of block {b!r} is not finite (NaN or infinity): the model's outputs "
                                   "or gradients overflowed on the training data; check the inputs and the weights")
        mean = self.layout.flatten().to(self.dtype)
        precision = self._new_precision(curv)
        self._frozen = _fingerprints(self.model, self.layout.names)
        self._fitted = (curv, loss.to(self.dtype), n_data, n_out, mean, precision)
        return self

    def _local_pass(self, curv, first, batches, progress: bool, generator, lowrank: bool, total: int | None = None):
        """This process's batches: (summed loss, rows, output columns); ``total``: the number of
        batches for the progress bar, when the loader knows it."""
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        n_data, n_out = 0, None
        with ModeGuard(self.model, False), tqdm(desc="Laplace fit", total=total, unit="batch", leave=False,
                                                      disable=not progress) as bar:
            i, item = 0, first
            while item is not None:
                x, y = self._split(item, i)
                if y.shape[0]:
                    f, layers = self._forward(x, "loader")
                    n_out = f.shape[1] if n_out is None else n_out
                    if f.shape[1] != n_out:
                        raise ValueError(f"batch {i}: the model outputs {f.shape[1]} columns, earlier batches {n_out}")
                    fd = f.detach().to(self.dtype)  # (float32 for a half model: losses, loss-Hessian roots)
                    yt = check_targets(y, fd, self._fit_likelihood)
                    loss += summed_loss(fd, yt, self._fit_likelihood).double()
                    if not lowrank:
                        R = directions(fd, yt, self._fit_likelihood, self.curvature, self.mc_samples, generator).to(f.dtype)
                        # the m directions' output gradients (m x every covered layer's output) in
                        # chunks under _FIT_BYTES: G sums over directions, A is added once per batch
                        chunks = R.split(self._directions_per_pass(layers, R.shape[0]))
                        for k, Rc in enumerate(chunks):
                            curv.add(layers, backprop(f, layers, Rc, keep_graph=k + 1 < len(chunks)),
                                     activations=k == 0)
                    n_data += y.shape[0]
                    for layer in layers:
                        layer.clear()
                    # the graph (kept by backprop's retain_graph for its fallback) goes with f:
                    # not alive during the next batch's forward
                    del f
                bar.update()
                i, item = i + 1, next(batches, None)
        return loss, n_data, n_out

    def _directions_per_pass(self, layers, m: int) -> int:
        """Directions per batched backward of ``fit``: all m unless their output gradients (per
        direction every covered layer's output, counted twice for the backward's own
        temporaries) and, for 'diag' / 'full', the per-example Jacobian parts built from them
        (:meth:`Layer.jacobian_numel`: a weight shared over positions gives [N, out, in] per
        direction) would pass :data:`_FIT_BYTES` (on CUDA also a quarter of the free memory)."""
        per = 2 * sum(o.numel() * o.element_size() for layer in layers for o in layer.outs)
        if self.hessian_structure in ("diag", "full"):
            per += sum(layer.jacobian_numel() * layer.outs[0].element_size() for layer in layers if layer.outs)
        budget = _FIT_BYTES
        if torch.device(self.device).type == "cuda":
            budget = min(budget, torch.cuda.mem_get_info(self.device)[0] // 4)
        return max(1, min(m, budget // max(per, 1)))

    def _agree(self, error, n_out):
        """Under torch.distributed: one all-reduce of (failed, output columns) so that an error on
        any rank stops every rank, and the ranks agree on the number of outputs; returns it."""
        status = torch.tensor([1.0 if error is not None else 0.0, float(n_out or 0), -float(n_out or 1e9)],
                              dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if status[0] > 0:
            raise RuntimeError("Laplace.fit failed on another process (see its error); nothing was fitted here")
        hi, lo = int(status[1]), int(-status[2])
        if hi and lo != 1e9 and hi != lo:
            raise ValueError(f"the processes' models output different numbers of columns ({lo} and {hi})")
        return hi or None

    def _new_curvature(self, blocks=None):
        blocks = self.blocks if blocks is None else blocks
        if self.hessian_structure == "lowrank":
            return LowRankCurvature(blocks, self.dtype, self.device, self.low_rank)
        return STRUCTURES[self.hessian_structure](blocks, self.dtype, self.device)

    def _new_precision(self, curv):
        if self.hessian_structure == "kron":
            return PRECISIONS["kron"](curv, eigh_method=self.eigh_method)
        return _PRECISIONS[self.hessian_structure](curv)

    def _covered_names(self) -> list[str]:
        """The names, in layout order, of the parameters holding covered entries (whole tensors,
        but for a subnetwork), from one host copy of ``positions``."""
        return subnet.covered_names(self.layout, self.positions.cpu())

    def _check_subnetwork(self, indices) -> Tensor | None:
        """subnetwork_indices checked against subset_of_weights and hessian_structure: sorted [k]
        int64 on the CPU for 'subnetwork', None otherwise."""
        if self.subset_of_weights != "subnetwork":
            if indices is not None:
                raise ValueError("subnetwork_indices is for subset_of_weights='subnetwork', got "
                                 f"subset_of_weights={self.subset_of_weights!r}")
            return None
        if indices is None:
            raise ValueError("subset_of_weights='subnetwork' needs subnetwork_indices: flat positions in the trainable "
                             "parameters, e.g. pyfastbayes.laplace.subnetmask.LargestMagnitudeSubnetMask(model, "
                             "n_params_subnet=...).select()")
        if self.hessian_structure not in ("full", "diag"):
            raise ValueError("subset_of_weights='subnetwork' takes hessian_structure 'full' or 'diag' (part of a "
                             f"weight matrix has no Kronecker factors), got {self.hessian_structure!r}")
        return subnet.check_indices(indices, self.layout.numel)

    def _tensor_owners(self, curv) -> list[str]:
        if self.hessian_structure == "full":
            return ["full"]
        if self.hessian_structure == "lowrank":
            return ["low-rank eigenvalues", "low-rank eigenvectors"]
        if self.hessian_structure == "diag":
            return [b.name for b in self.blocks]
        names = [self.blocks[i].name for i in curv.G]
        return names + [self.blocks[i].name for i in curv.A] + [self.blocks[i].name for i in curv.h]

    def _model_tensors(self, x):
        """What the dtype message inspects: the tensor, or a dict batch without its targets (which
        the model may not read; a dict's other values are blamed only for errors that speak of
        dtypes, see :func:`~pyfastbayes.nn.inputs.dtype_mismatch`)."""
        return x if torch.is_tensor(x) else {k: v for k, v in x.items() if k != self.dict_key_y}

    def _split(self, item, i: int):
        """(inputs, targets) of loader item i: an (inputs, targets, ...) pair of tensors, a dict
        batch (the whole dict, item[dict_key_y]) or a (dict batch, targets) pair."""
        if isinstance(item, Mapping):
            if self.dict_key_y not in item or not torch.is_tensor(item[self.dict_key_y]):
                raise ValueError(f"batch {i} is a dict without a tensor under dict_key_y={self.dict_key_y!r} (keys "
                                 f"{list(item)[:8]}): pass Laplace(..., dict_key_y=<the targets' key>)")
            row_count(item, f"batch {i}")
            return item, item[self.dict_key_y]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and torch.is_tensor(item[1])
                and (torch.is_tensor(item[0]) or isinstance(item[0], Mapping))):
            hint = (" (a loader item that is one tensor: was (X, Y) passed itself? wrap it: [(X, Y)])"
                    if torch.is_tensor(item) else "")
            raise TypeError(f"batch {i} must be an (inputs, targets) pair of tensors (or a dict batch), got "
                            f"{type(item).__name__}{hint}: pass an iterable of (inputs, targets) batches, e.g. "
                            "[(X, Y)] or a DataLoader")
        if isinstance(item[0], Mapping):  # a (dict batch, targets) pair, as the curvature operators take
            row_count(item[0], f"batch {i}")
        return item[0], item[1]

    def _check_uses(self, x) -> None:
        """ValueError when the forward reads a covered parameter outside its own module's call
        (weight tying through ``F.linear(h, emb.weight)``, a parent using ``self.lin.weight``):
        that use's curvature would be missing from every block. One probe forward of two rows of
        ``x`` (a tensor) without gradients; a probe the model refuses is left to the real pass."""
        if not is_rows(x) or _rows_or_none(x) is None or hasattr(self.model, "_orig_mod"):
            return  # (a compiled model, torch.compile's OptimizedModule, would recompile for the probe)
        covered = [(layer.name, layer.module, list(layer.params)) for layer in self.layers]
        try:
            with ModeGuard(self.model, False):
                outside = used_outside(self.model, covered, rows_to(take_rows(x, slice(0, 2)), self.device))
        except Exception:  # noqa: BLE001  (the fit's own forward raises the error that explains it)
            return
        if outside:
            raise ValueError(f"the model's forward uses parameter(s) {outside} outside their own module's call (tied "
                             "weights, e.g. F.linear(h, self.emb.weight), or a parent module reading a layer's "
                             "weight): the curvature of that use would be missing from the posterior. Give the "
                             "second use its own module, or freeze the parameter (requires_grad=False) or use "
                             "subset_of_weights='last_layer' if the last layer is not tied")

    def _forward(self, x, name: str = "x") -> tuple[Tensor, list]:
        """Forward of inputs [N, ...] with the covered layers recorded; (outputs [N, C], layers).
        ``name``: the argument the inputs came from, for the dtype error."""
        x = rows_to(x, self.device)
        with torch.enable_grad(), Recorder(self.layers):
            try:
                out = self.model(x)
            except RuntimeError as e:
                wrong = dtype_mismatch(self._model_tensors(x), self.model_dtype, e, name=name, refit=", then fit again")
                if wrong is not None:
                    raise wrong from e
                raise
            out = model_output(out, self.output_fn)
            _refuse_unbatched(x, out, name)
            out = outputs_2d(out, self._lik)
        _refuse_unbatched(x, out, name)
        return out, self.layers

    def _all_reduce(self, curv, loss: Tensor, n: int):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return n, loss
        tensors = curv.tensors()
        counts = curv.counts()
        flat = torch.cat([t.reshape(-1).double() for t in tensors]
                         + [loss.reshape(1), loss.new_tensor([float(n)] + [float(c) for c in counts])])
        torch.distributed.all_reduce(flat)
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()
        loss = flat[o].clone()
        n = int(flat[o + 1].item())
        curv.set_counts([int(c) for c in flat[o + 2:].tolist()])
        return n, loss

    def _need_fit(self):
        if self._fitted is None:
            raise RuntimeError("the Laplace is not fitted: call fit(train_loader) first")
        return self._fitted

    @property
    def mean(self) -> Tensor:
        """theta_MAP [P] (all trainable parameters, flat layout order; with
        subset_of_weights='last_layer' the covered ones are ``mean[la.positions]``, the entries
        of :attr:`posterior_variance`)."""
        return self._need_fit()[4]

    @property
    def n_data(self) -> int:
        """N, the number of training rows :meth:`fit` summed over (all processes)."""
        return self._need_fit()[2]

    @property
    def n_outputs(self) -> int:
        """C, the model's output width (classes, or regression outputs) seen by :meth:`fit`."""
        return self._need_fit()[3]

    # ---- marginal likelihood -----------------------------------------------------------------------------
    def _current_as(self, structure: str) -> Tensor:
        """The current prior precision as a start for tuning a ``structure`` prior: per weight
        [P] for 'diag', each block's mean for 'layerwise', the mean for 'scalar' (so that a run
        may follow one of another structure)."""
        prior = self._prior.detach()
        if prior.numel() == 1 or structure == "diag":
            return prior if prior.numel() == 1 else self._delta(prior)
        if structure == "scalar":
            return self._delta(prior).mean()
        if prior.numel() == len(self.blocks) and prior.numel() != self.n_params:
            return prior
        per_weight = self._delta(prior)
        return torch.stack([per_weight[b.sel.reshape(-1)].mean() for b in self.blocks])

    def _delta(self, prior: Tensor | None = None) -> Tensor:
        prior = self._prior if prior is None else prior
        return ml.expand_prior(prior, self.blocks, self.n_params)

    def log_likelihood(self, sigma: Tensor | None = None) -> Tensor:
        """log p(D | theta_MAP) on the training data (laplace-torch's convention): a float64
        scalar, the summed log likelihood of the N fitted rows divided by the temperature.

        Args:
            sigma: the noise std for regression (a scalar tensor; default :attr:`sigma_noise`).
        """
        curv, loss, n, C, _, _ = self._need_fit()
        return log_likelihood(loss, n, C, self._fit_likelihood, self._sigma if sigma is None else sigma, self.temperature)

    def _prior_terms(self, prior: Tensor) -> tuple[Tensor, Tensor]:
        """(log det P_0, (theta_MAP - mu_0)^T P_0 (theta_MAP - mu_0)) for a prior of shape [],
        [n_blocks] or [P]; per block sums for the first two (no [P] vector per step)."""
        mean = self._need_fit()[4]
        d2 = (mean[self.positions] - self.prior_mean).square()
        if prior.numel() == 1:
            delta = prior.reshape(())
            return self.n_params * torch.log(delta), delta * d2.sum()
        if prior.numel() == len(self.blocks) and prior.numel() != self.n_params:
            numel = torch.bincount(self.block_of, minlength=len(self.blocks)).to(prior.dtype)
            # float64: index_add_ sums a block's terms one after another
            sq = d2.new_zeros(len(self.blocks), dtype=torch.float64).index_add_(0, self.block_of, d2.double())
            return (numel * torch.log(prior)).sum(), (prior * sq.to(d2.dtype)).sum()
        return torch.log(prior).sum(), (prior * d2).sum()

    def _lml(self, prior: Tensor, sigma: Tensor) -> Tensor:
        precision = self._need_fit()[5]
        logdet_prior, scatter = self._prior_terms(prior)
        logdet_ratio = precision.logdet(self._scale(sigma), prior) - logdet_prior
        return self.log_likelihood(sigma) - 0.5 * (logdet_ratio + scatter)

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> Tensor:
        """The Laplace log marginal likelihood (see :mod:`~pyfastbayes.laplace.marglik`), a scalar
        tensor differentiable in ``prior_precision`` and ``sigma_noise`` when they are tensors that
        require grad; given values replace the current ones (laplace-torch's behaviour), stored
        detached (draws and predictions made afterwards carry no graph of the caller's tensors)."""
        self._need_fit()
        # both checked, and the value computed, before either is stored: a call that fails changes nothing
        prior = None if prior_precision is None else ml.check_prior(
            prior_precision, self.blocks, self.n_params, self.hessian_structure, self.dtype, self.device)
        sigma = None if sigma_noise is None else _check_sigma(sigma_noise, self.likelihood, self.dtype, self.device)
        value = self._lml(self._prior if prior is None else prior, self._sigma if sigma is None else sigma)
        if prior is not None:
            self._prior = prior.detach()
        if sigma is not None:
            self._sigma = sigma.detach()
        return value

    def optimize_prior_precision(self, method: str = "marglik", prior_structure: str = "scalar", *,
                                 n_steps: int = 100, lr: float = 0.1, init_prior_prec=None, val_loader=None,
                                 log_prior_prec_range: tuple[float, float] = (-4.0, 4.0), grid_size: int = 21,
                                 pred_type: str = "glm", link_approx: str | None = None, n_samples: int = 100,
                                 tune_sigma: bool | None = None, progress: bool = False,
                                 log_prior_prec_min: float | None = None,
                                 log_prior_prec_max: float | None = None) -> Tensor:
        """Tune the prior precision (and for regression the noise) after :meth:`fit`; returns it.

        method='marglik': Adam on log delta (and log sigma when ``tune_sigma``, default True for
        regression) maximising the log marginal likelihood, ``n_steps`` steps of ``lr`` from
        ``init_prior_prec`` (default: the current prior), with ``prior_structure`` 'scalar',
        'layerwise' (one per block) or 'diag' (one per parameter; not for 'kron').
        method='gridsearch': the scalar delta among ``grid_size`` values log-spaced over
        10**log_prior_prec_range with the lowest predictive NLL on ``val_loader`` (classification,
        binary) or Gaussian NLL (regression), using ``pred_type`` / ``link_approx``
        (laplace-torch's ``log_prior_prec_min`` / ``log_prior_prec_max`` set the range's ends too).
        """
        if method in PRED_TYPES:
            raise ValueError(f"method must be one of {ml.TUNING}, got {method!r}: laplace-torch's first positional "
                             f"argument is pred_type, here a keyword (optimize_prior_precision(method='gridsearch', "
                             f"pred_type={method!r}, ...))")
        _choice(method, ml.TUNING, "method")
        if log_prior_prec_min is not None or log_prior_prec_max is not None:
            lo, hi = log_prior_prec_range
            log_prior_prec_range = (lo if log_prior_prec_min is None else log_prior_prec_min,
                                    hi if log_prior_prec_max is None else log_prior_prec_max)
        _choice(prior_structure, ml.PRIOR_STRUCTURES, "prior_structure")
        self._need_fit()
        if method == "gridsearch":
            if prior_structure != "scalar":
                raise ValueError(f"method='gridsearch' tunes one scalar prior precision over a 1-d grid; "
                                 f"prior_structure={prior_structure!r} needs method='marglik'")
            _choice(pred_type, PRED_TYPES, "pred_type")
            link_approx = _link(pred_type, link_approx)
            n_samples = check_int(n_samples, "n_samples", 1)  # (the predictive's draws: 'mc' link, 'nn')
            return self._gridsearch(val_loader, log_prior_prec_range, grid_size, pred_type, link_approx, n_samples)
        if prior_structure != "scalar" and self.hessian_structure == "lowrank":
            raise ValueError("hessian_structure='lowrank' tunes one scalar prior: use prior_structure='scalar'")
        if prior_structure == "diag" and self.hessian_structure == "kron":
            raise ValueError("prior_structure='diag' does not fit hessian_structure='kron' (one exact damping per "
                             "Kronecker block): use 'scalar' or 'layerwise'")
        n_steps = check_int(n_steps, "n_steps", 1)
        init = self._current_as(prior_structure) if init_prior_prec is None else ml.check_prior(
            init_prior_prec, self.blocks, self.n_params, "diag", self.dtype, self.device, "init_prior_prec")
        if init.dim() == 1 and init.numel() not in (1,) and prior_structure == "scalar":
            init = init.mean()
        log_prior = ml.initial(prior_structure, init, len(self.blocks), self.n_params)
        if tune_sigma is not None and not isinstance(tune_sigma, bool):
            raise TypeError(f"tune_sigma must be True, False or None (tune it for regression), got {tune_sigma!r}")
        tune = (self.likelihood == "regression") if tune_sigma is None else tune_sigma
        if tune and self.likelihood != "regression":
            raise ValueError("tune_sigma=True needs likelihood='regression'")
        log_sigma = self._sigma.detach().log().clone()
        tensors = [log_prior] + ([log_sigma] if tune else [])
        ml.adam(lambda: -self._lml(log_prior.exp(), log_sigma.exp()), tensors, n_steps, check_positive_float(lr, "lr"),
                progress, "prior precision (marglik)")
        self._prior = log_prior.detach().exp()
        if tune:
            self._sigma = log_sigma.detach().exp()
        return self._prior

    def _gridsearch(self, val_loader, rng, grid_size, pred_type, link_approx, n_samples) -> Tensor:
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader (an iterable of (inputs, targets) batches)")
        grid_size = check_int(grid_size, "grid_size", 2)
        _choice(pred_type, PRED_TYPES, "pred_type")
        grid = self._grid(rng, grid_size)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        # under torch.distributed (a collective: every rank calls it) each rank scores its own
        # validation shard (an empty one too) and the NLL sums and row counts of every grid point
        # are all-reduced: every rank picks the prior of the union's NLL (choosing by the local
        # shard made the ranks' priors differ); a rank's error is flagged in the same all-reduce
        error, sums, n_local = None, [0.0] * len(grid), 0
        try:
            batches = [self._split(item, i) for i, item in enumerate(loader_batches(val_loader))]
            n_local = sum(y.shape[0] for _, y in batches)
            if not dist and n_local == 0:
                raise ValueError("val_loader yielded no rows")
            if n_local:
                with self._fitting_mode():  # (reward_modeling: the validation pairs' classification NLL)
                    sums = self._grid_nll_sums(batches, grid, pred_type, link_approx, n_samples)
        except Exception as e:  # the other ranks must learn of it, or they wait in the all-reduce forever
            if not dist:
                raise
            error = e
        totals = torch.tensor([*sums, float(n_local), float(error is not None)], dtype=torch.float64)
        if dist:
            totals = totals.to(self.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        if error is not None:
            raise error
        if float(totals[-1]) > 0:
            raise RuntimeError("gridsearch failed on another process (see its error); the prior precision is unchanged")
        totals = totals[:-1]
        if float(totals[-1]) == 0:
            raise ValueError("val_loader yielded no rows" + (" on any process" if dist else ""))
        nlls = (totals[:-1] / totals[-1]).tolist()
        best, best_nll = None, math.inf
        for delta, nll in zip(grid, nlls):
            if nll < best_nll:  # a NaN or infinite NLL is never chosen
                best, best_nll = torch.as_tensor(delta, dtype=self.dtype, device=self.device), nll
        if best is None:
            raise RuntimeError("gridsearch: the validation NLL is NaN or infinite at every grid point (the "
                               "predictions overflowed); check the validation data, or narrow log_prior_prec_range; "
                               "the prior precision is unchanged")
        if float(best) in (grid[0], grid[-1]):
            edge = "upper" if float(best) == grid[-1] else "lower"
            warn_user(f"gridsearch: the validation NLL is lowest at the {edge} end of the grid "
                      f"(prior precision {float(best):g}); widen log_prior_prec_range"
                      + (". At the upper end the validation data prefer (nearly) no posterior variance: the Laplace "
                         "predictive is then close to the MAP's" if edge == "upper" else ""))
        self._prior = best
        return best

    def _grid_nll_sums(self, batches: list, grid: list[float], pred_type: str, link_approx, n_samples) -> list[float]:
        """The summed validation NLL of the local batches at every prior of ``grid``."""
        for i, (xb, yb) in enumerate(batches):
            if _rows_or_none(xb) is None or yb.dim() == 0 or yb.shape[0] != row_count(xb):
                raise ValueError(f"val_loader batch {i}: {tuple(yb.shape)} targets for inputs {_shape(xb)}; "
                                 "one target per input row")
        y = torch.cat([b[1] for b in batches])
        # the targets against outputs [N, C] of the fitted width before anything is predicted: class
        # indices (integers in [0, C)), 0/1 for 'binary', the outputs' shape for 'regression'
        try:
            y = check_targets(y, torch.empty(y.shape[0], self.n_outputs, dtype=self.dtype, device=self.device),
                              self._lik)
        except ValueError as e:
            raise ValueError(f"val_loader: {e}") from None
        # the rows joined once, unless the batches' rows differ in shape (dict batches padded to
        # each batch's longest sequence): then batch by batch
        xs = [b[0] for b in batches]
        groups = ([(cat_rows(xs, "val_loader"), y)] if same_row_shapes(xs)
                  else list(zip(xs, y.split([b[1].shape[0] for b in batches]))))
        priors = [torch.as_tensor(delta, dtype=self.dtype, device=self.device) for delta in grid]
        if pred_type == "glm":  # chunk by chunk of rows, every prior on a chunk's Jacobian parts
            self._check_at_mean("the GLM predictive")
            sums = [0.0] * len(grid)
            for xg, yg in groups:
                rows = self._glm_rows(xg, 1024)
                for xc, yc in zip(split_rows(xg, rows), split_rows(yg, rows)):
                    pieces = self._glm_pieces(xc, max(len(yc), 1))
                    for k, prior in enumerate(priors):
                        f_mu, f_var = self._glm_moments(pieces, prior)
                        sums[k] += self._nll(f_mu, f_var, yc, link_approx, n_samples) * yc.shape[0]
                    del pieces
            return sums
        x = groups[0][0] if len(groups) == 1 else xs  # (a loader of the batches)
        sums = []
        for prior in priors:
            old, self._prior = self._prior, prior
            try:
                nll = self._nll_nn(x, y, n_samples)
            except NotNatural:  # heteroscedastic: a draw at this (extreme) prior gave eta2 = 0: not a Gaussian
                nll = math.inf  # (scored as non-finite: never chosen, as a NaN NLL)
            finally:
                self._prior = old
            sums.append(float(nll) * y.shape[0])
        return sums

    def _grid(self, rng, grid_size: int) -> list[float]:
        """The grid 10**linspace(low, high) of the prior precision for ``log_prior_prec_range`` =
        (low, high): two finite numbers, low < high, inside the span where 10**x is a finite
        positive (normal) number of the model's dtype (ValueError saying the span otherwise)."""
        ok = isinstance(rng, (tuple, list)) and len(rng) == 2 and all(
            (isinstance(v, numbers.Real) and not isinstance(v, bool)) or (torch.is_tensor(v) and v.numel() == 1
                                                                          and not v.is_complex()) for v in rng)
        if not ok:
            raise TypeError(f"log_prior_prec_range must be two numbers (low, high), log10 of the prior precision, "
                            f"e.g. (-4, 4); got {rng!r}")
        lo, hi = float(rng[0]), float(rng[1])
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"log_prior_prec_range must be two finite numbers low < high (log10 of the prior "
                             f"precision), got {rng!r}")
        fi = torch.finfo(self.dtype)
        span = (math.log10(fi.tiny), math.log10(fi.max))
        grid = torch.logspace(lo, hi, grid_size, dtype=torch.float64).to(self.dtype)
        if lo < span[0] or hi > span[1] or not bool(torch.isfinite(grid).all() and (grid >= fi.tiny).all()):
            raise ValueError(f"log_prior_prec_range={tuple(rng)!r} leaves the usable span [{span[0]:.2f}, "
                             f"{span[1]:.2f}] of the model's {self.dtype}: 10**x must be a finite prior precision > 0")
        return grid.tolist()

    def _nll(self, f_mu, f_var, y, link_approx, n_samples) -> float:
        if self._lik == HETERO:
            pred = heteroscedastic_glm(f_mu, f_var)
            return _gaussian_nll(pred.mean, pred.variance, natural_targets(y, f_mu))
        if self._lik == "regression":
            yt = check_targets(y, f_mu, "regression")
            return _gaussian_nll(f_mu, torch.diagonal(f_var, dim1=1, dim2=2) + self._sigma.square(), yt)
        p = probabilities(f_mu, f_var, self._lik, link_approx, n_samples)
        return _class_nll(p, y, self._lik)

    def _nll_nn(self, x, y, n_samples) -> float:
        if self._lik == HETERO:
            pred = self.predict(x, n_samples, pred_type="nn", **({} if self.enable_backprop else dict(progress=False)))
            return _gaussian_nll(pred.mean, pred.variance, outputs_2d(y, "regression").to(pred.mean))
        out = self._nn_predict(x, n_samples)
        if self._lik == "regression":
            mean, var = out
            mean, var = outputs_2d(mean, "regression"), outputs_2d(var, "regression") + self._sigma.square()
            return _gaussian_nll(mean, var, check_targets(y, mean, "regression"))
        return _class_nll(out, y, self._lik)

    # ---- predictives -------------------------------------------------------------------------------------
    def _check_at_mean(self, what: str) -> None:
        """The GLM predictive linearises the model at its CURRENT weights: they must be the MAP the
        curvature was computed at (RuntimeError otherwise, saying how to fix it)."""
        mean = self._need_fit()[4]
        if not torch.equal(self.layout.flatten(), mean.to(self.model_dtype)):
            raise RuntimeError(f"{what}: the model's weights changed since the Laplace was fitted (or loaded); the GLM "
                               "predictive linearises at the fitted MAP: write it back with "
                               "la.layout.write_(la.mean) or fit again")

    def _glm_pieces(self, x, batch_size: int) -> list:
        """Per input batch: (f_mu [n, C], Jacobian parts per block) for the GLM predictive (the
        caller has checked the weights with :meth:`_check_at_mean`)."""
        pieces = []
        with ModeGuard(self.model, False):
            if self.enable_backprop:
                return [self._jacobian_pieces(xb) for xb in self._input_batches(x, batch_size)]
            for xb in self._input_batches(x, batch_size):
                f, layers = self._forward(xb)
                C = f.shape[1]
                eye = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, f.shape[0], C)
                grads = backprop(f, layers, eye)
                # (a half model's parts and outputs in float32, the posterior's dtype)
                parts = [(b, tuple(t.detach().to(self.dtype) if torch.is_tensor(t) and t.is_floating_point() else t
                                   for t in part)) for b, part in block_parts(layers, grads)]
                pieces.append((f.detach().to(self.dtype), parts))
                for layer in layers:
                    layer.clear()
                del f  # and its graph, before the next batch's forward (see _local_pass)
        return pieces

    def _jacobian_pieces(self, x) -> tuple[Tensor, list]:
        """(f_mu [n, C], Jacobian parts per block) of inputs x with the covered parameters'
        Jacobians explicit, [C, n, p, q] per Kronecker block and [C, n, numel] per diagonal block
        (torch.func.jacrev): differentiable in x (``enable_backprop``)."""
        f, J = self._explicit_jacobian(x)
        parts = [(b, ("matrix", J[:, :, b.sel]) if b.kind == "kron" else ("rows", J[:, :, b.sel.reshape(-1)]))
                 for b in self.blocks]
        return f, parts

    def _explicit_jacobian(self, x) -> tuple[Tensor, Tensor]:
        """(f [n, C], J [C, n, P_c]): the outputs and their Jacobians with respect to the covered
        parameters (selection order) by torch.func.jacrev, in the Laplace's dtype; differentiable
        in x where gradients are enabled."""
        x = rows_to(x, self.device)
        own = dict(self.model.named_parameters())
        names = self._covered_names()
        values = tuple(own[n].detach() for n in names)

        def outputs(*v):  # (the outputs twice: differentiated, and as jacrev's aux, f itself)
            out = model_output(functional_call(self.model, dict(zip(names, v)), (x,)), self.output_fn)
            _refuse_unbatched(x, out, "x")
            out = outputs_2d(out, self._lik)
            return out, out

        with ModeGuard(self.model, False):
            jac, f = torch.func.jacrev(outputs, argnums=tuple(range(len(values))), has_aux=True)(*values)
        n, C = f.shape
        # the covered parameters in layout order: their flat entries are the selection order
        J = torch.cat([j.reshape(n, C, -1) for j in jac], 2).permute(1, 0, 2).to(self.dtype)
        if self.subnetwork_indices is not None:  # the subnetwork's columns of its parameters' Jacobian
            J = J.index_select(2, subnet.covered_columns(self.layout, names, self.positions.cpu()).to(J.device))
        return f.to(self.dtype), J

    def _glm_rows(self, x, batch_size: int) -> int:
        """Rows per chunk of the GLM predictive: ``batch_size``, fewer when a chunk's Jacobian parts
        (measured on one row of ``x``, a tensor, and counted twice: the precision's rotated copy)
        would pass :data:`_GLM_BYTES` (on CUDA also a quarter of the free memory)."""
        if self.enable_backprop:  # jacrev of a chunk of n rows costs n C backward passes over all n rows
            batch_size = min(batch_size, _BACKPROP_ROWS)
        if not is_rows(x) or not _rows_or_none(x):
            return batch_size
        cache = self._glm_row_bytes  # the sizes depend on the row's shape only
        key = tuple((k, tuple(t.shape[1:]), t.dtype, t.device)
                    for k, t in (x.items() if isinstance(x, Mapping) else [(None, x)]) if torch.is_tensor(t))
        if key not in cache:
            try:
                parts = self._glm_pieces(take_rows(x, slice(0, 1)), 1)[0][1]
            except Exception:  # noqa: BLE001  (an input the model refuses: the real pass raises its own error)
                return batch_size
            cache[key] = 2 * sum(t.numel() * t.element_size() for _, part in parts for t in part if torch.is_tensor(t)) \
                + sum(getattr(layer, "inner_bytes", 0) for layer in self.layers)  # (a subnetwork's temporaries)
        per_row = cache[key]
        budget = _GLM_BYTES
        if torch.device(self.device).type == "cuda":  # (where the parts live: the model's device)
            budget = min(budget, torch.cuda.mem_get_info(self.device)[0] // 4)
        return max(1, min(batch_size, budget // max(per_row, 1)))

    def _glm_moments(self, pieces, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        precision = self._need_fit()[5]
        delta, s = self._delta(prior), self._scale()
        mus, vars_ = [], []
        for f, parts in pieces:
            mus.append(f)
            vars_.append(precision.functional_variance(parts, s, delta).to(f.dtype))
        return torch.cat(mus), torch.cat(vars_)

    def functional_variance(self, x, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """GLM predictive moments of the outputs: (f_mu [N, C], f_var [N, C, C]) = (f(x; theta_MAP),
        J P^-1 J^T), without [N, C, P] Jacobians for 'kron' and 'diag'. Rows go through in chunks of
        at most ``batch_size``, fewer where the layers with shared weights (convolutions, Linear on
        [N, T, in], Embedding), whose per-row parts are [C, out, in], would put a chunk's parts
        over 256 MiB (on CUDA also a quarter of the free memory)."""
        batch_size = check_int(batch_size, "batch_size", 1)
        self._check_at_mean("the GLM predictive")
        with torch.set_grad_enabled(self.enable_backprop and torch.is_grad_enabled()):
            return self._functional_variance(x, batch_size)

    def _functional_variance(self, x, batch_size: int) -> tuple[Tensor, Tensor]:
        mus, vars_, n_inputs = [], [], 0
        for xb in self._input_batches(x, batch_size):  # one chunk's Jacobian parts alive at a time
            n_inputs += 1
            if _rows_or_none(xb) == 0:  # no rows: nothing to linearise (the 'nn' path returns [0, C] too)
                continue
            rows = self._glm_rows(xb, batch_size)  # (measured once per row shape)
            for xc in split_rows(xb, rows) if is_rows(xb) else (xb,):
                f_mu, f_var = self._glm_moments(self._glm_pieces(xc, rows))
                mus.append(f_mu), vars_.append(f_var)
        if not n_inputs:
            raise ValueError("x yielded no inputs: pass a tensor [N, ...] with N >= 1 or a non-empty loader")
        if not mus:  # (reward_modeling outside fitting mode: one reward per input)
            C = self.n_outputs if self._lik == self._fit_likelihood else 1
            return (torch.empty(0, C, dtype=self.dtype, device=self.device),
                    torch.empty(0, C, C, dtype=self.dtype, device=self.device))
        return torch.cat(mus), torch.cat(vars_)

    def functional_covariance(self, x, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """The joint GLM predictive over all inputs (``la(x, joint=True)``): (f_mu [N C], f_cov
        [N C, N C]) = (f(x; theta_MAP) flattened row-major, J P^-1 J^T with J [N C, P_c] the
        outputs' Jacobians). laplace-torch's ``functional_covariance`` takes the Jacobians; this
        one takes the inputs (a tensor, a dict batch or an iterable of them). J is explicit
        (torch.func.jacrev, at most 32 input rows at a time); refused when J and f_cov together
        would pass COVARIANCE_BYTES: meant for the few inputs of a joint prediction, e.g. batched
        Bayesian optimisation. No rows: ([0], [0, 0])."""
        batch_size = check_int(batch_size, "batch_size", 1)
        self._check_at_mean("the GLM predictive")
        precision = self._need_fit()[5]
        step = min(batch_size, _BACKPROP_ROWS)  # (see _glm_rows)
        with torch.set_grad_enabled(self.enable_backprop and torch.is_grad_enabled()):
            fs, Js, n_inputs, rows = [], [], 0, 0
            for xb in self._input_batches(x, step):
                n_inputs += 1
                for xc in split_rows(xb, step) if is_rows(xb) else (xb,):
                    if _rows_or_none(xc) == 0:
                        continue
                    f, J = self._explicit_jacobian(xc)
                    fs.append(f), Js.append(J.permute(1, 0, 2).reshape(-1, J.shape[2]))  # rows n C + c
                    rows += Js[-1].shape[0]
                    need = (rows * J.shape[2] + rows * rows) * J.element_size()
                    if need > COVARIANCE_BYTES:
                        raise RuntimeError(f"functional_covariance: the Jacobians and the [N C, N C] covariance f_cov "
                                           f"of these inputs pass {need / 2**30:.2f} GiB; the joint predictive is for "
                                           "a few inputs: pass fewer (or use la(x) for each input's own covariance, "
                                           "which builds no Jacobian)")
            if not n_inputs:
                raise ValueError("x yielded no inputs: pass a tensor [N, ...] with N >= 1 or a non-empty loader")
            if not fs:
                return (torch.empty(0, dtype=self.dtype, device=self.device),
                        torch.empty(0, 0, dtype=self.dtype, device=self.device))
            return torch.cat(fs).reshape(-1), precision.inv_quad(torch.cat(Js), self._scale(), self._delta())

    def la(self, x, pred_type: str = "glm", link_approx: str | None = None, n_samples: int = 100, *,
           generator: torch.Generator | None = None, batch_size: int | None = None, joint: bool = False,
           diagonal_output: bool = False, fitting: bool = False):
        """laplace-torch's ``__call__``: classification -> probabilities [N, C] ('binary': [N]);
        regression -> (f_mu [N, C], f_var [N, C, C]) for 'glm' (the epistemic, functional variance:
        sigma^2 is not in it), (mean [N, C], variance [N, C] over the draws) for 'nn', the variance
        unbiased (divided by n_samples - 1, as laplace-torch's ``samples.var(0)``; one draw: 0; the
        posterior interface's :meth:`predict` divides by n_samples). ``link_approx``:
        'probit' (default), 'bridge', 'bridge_norm' or 'mc' for 'glm'; 'nn' averages ``n_samples``
        draws, i.e. 'mc' (the default there; another link is refused, as laplace-torch does).
        ``x``: a tensor [N, ...] or a dict batch (``batch_size`` rows per forward, default 256
        for 'glm', 1024 for 'nn'), or an iterable of batches. laplace-torch's ``joint`` (regression,
        'glm': (f_mu [N C], f_cov [N C, N C]) over all inputs, :meth:`functional_covariance`; it
        takes precedence over ``diagonal_output``) and
        ``diagonal_output`` ('glm': only the outputs' variances, f_var [N, C] for regression; for
        classification the 'mc' link's draws see a diagonal covariance, as laplace-torch's: probit
        reads only the diagonal anyway, the bridge links ignore the option). ``fitting`` (laplace-torch's):
        for 'reward_modeling', x holds preference pairs and the result is the pairs' classification
        predictive (probabilities [N, 2]); otherwise (the default) x holds single inputs and the
        result is the regression one of their rewards (f_mu, f_var). No effect for the others."""
        if not isinstance(fitting, bool):
            raise TypeError(f"fitting must be True or False, got {type(fitting).__name__}")
        with self._fitting_mode(fitting):
            return self._la(x, pred_type, link_approx, n_samples, generator, batch_size, joint, diagonal_output)

    def _la(self, x, pred_type, link_approx, n_samples, generator, batch_size, joint, diagonal_output):
        _choice(pred_type, PRED_TYPES, "pred_type")
        link_approx = _link(pred_type, link_approx)
        n_samples = check_int(n_samples, "n_samples", 1)
        batch_size = self._batch_size(batch_size, pred_type)
        _check_glm_flag("joint", joint, pred_type)
        _check_glm_flag("diagonal_output", diagonal_output, pred_type)
        if joint:  # (diagonal_output is ignored then, as laplace-torch does)
            if self._lik not in GAUSSIAN:
                raise ValueError("joint=True is the regression GLM predictive's joint covariance over all inputs "
                                 "(laplace-torch ignores it for classification)")
            return self.functional_covariance(x, batch_size)
        if pred_type == "nn" and self.enable_backprop:
            return self._nn_moments(x, n_samples, generator, batch_size, unbiased=True)
        if pred_type == "nn":
            checked = dict(output_fn=self._natural_fn()) if self._lik == HETERO else {}
            out = self._nn_predict(x, n_samples, generator=generator, batch_size=batch_size, **checked)
            if self._lik in GAUSSIAN:  # laplace-torch's samples.var(0): the unbiased variance
                var = out[1] * (n_samples / (n_samples - 1)) if n_samples > 1 else out[1]
                return outputs_2d(out[0], "regression"), outputs_2d(var, "regression")
            return out
        f_mu, f_var = self.functional_variance(x, batch_size)
        if self._lik in GAUSSIAN:
            return (f_mu, torch.diagonal(f_var, dim1=1, dim2=2)) if diagonal_output else (f_mu, f_var)
        if diagonal_output and link_approx == "mc":  # (probit reads the diagonal only; the bridge links ignore it,
            f_var = _diagonal_only(f_var)  # as laplace-torch's)
        return probabilities(f_mu, f_var, self._lik, link_approx, n_samples, generator)

    __call__ = la

    @staticmethod
    def _batch_size(batch_size, pred_type: str) -> int:
        if batch_size is None:
            return 256 if pred_type == "glm" else 1024  # the GLM path's and Posterior.predict's defaults
        return check_int(batch_size, "batch_size", 1)

    def _nn_predict(self, x, n_samples: int, **options):
        """Posterior.predict (the BMA over draws; it names inputs of another dtype than the model's);
        a dict batch, or a loader of them, goes in whole as the model's one argument (unless
        ``input_fn`` says otherwise)."""
        if isinstance(x, Mapping):  # one dict batch: its row chunks as a loader
            x = split_rows(x, options.get("batch_size") or 1024)
        if options.get("input_fn") is None and not is_rows(x):
            options["input_fn"] = _whole_dict
        if options.get("output_fn") is None and self.output_fn is not None:
            options["output_fn"] = self.output_fn
        # (heteroscedastic: the BMA of the natural parameters, or of what output_fn makes of them, as a regression's)
        return Posterior.predict(self, x, n_samples, likelihood="regression" if self._lik == HETERO else self._lik,
                                 **options)

    def _input_batches(self, x, batch_size: int):
        """Model inputs from ``x``: a tensor or a dict batch split into row chunks of at most
        ``batch_size``, or a loader's items (a tensor, a dict batch whole, or an (inputs, ...)
        tuple's inputs)."""
        if is_rows(x):
            yield from split_rows(x, batch_size)
            return
        for inp in iterate_inputs(x, batch_size, _whole_dict):
            yield inp[0] if isinstance(inp, tuple) else inp  # (a dict batch, whole)

    def predict(self, x, n_samples: int = 100, *, pred_type: str = "glm", link_approx: str | None = None,
                likelihood: str | None = None, generator: torch.Generator | None = None,
                batch_size: int | None = None, **options):
        """The posterior predictive: probabilities [N, C] (binary: [N]) for classification, and for
        regression a :class:`RegressionPredictive` (mean, total variance = sigma^2 + epistemic,
        aleatoric, epistemic; [N, C] each). ``pred_type='nn'`` averages ``n_samples`` weight draws
        through the one BMA loop of :class:`~pyfastbayes.posteriors.Posterior` (``options``: its
        ``bn_loader``, ``progress``, ``input_fn``, ``output_fn``); ``link_approx`` as in :meth:`la`;
        ``batch_size``: rows per forward when x is a tensor (default 256 for 'glm', 1024 for 'nn')."""
        if likelihood is not None and likelihood not in (self.likelihood, self._lik):
            raise ValueError(f"this Laplace was built for likelihood={self.likelihood!r}, got {likelihood!r}")
        _choice(pred_type, PRED_TYPES, "pred_type")
        batch_size = self._batch_size(batch_size, pred_type)
        if self._lik == HETERO:
            return self._predict_heteroscedastic(x, n_samples, pred_type, link_approx, generator, batch_size, options)
        if pred_type == "nn" and self.enable_backprop:
            _link(pred_type, link_approx)
            if options:
                raise TypeError(f"enable_backprop=True: pred_type='nn' runs each draw through torch.func.functional_call "
                                f"and takes no {sorted(options)} (the BMA loop's options)")
            out = self._nn_moments(x, n_samples, generator, batch_size, unbiased=False)
            if self._lik != "regression":
                return out
            mean, epi = out
        elif pred_type == "nn":
            _link(pred_type, link_approx)
            out = self._nn_predict(x, n_samples, generator=generator, batch_size=batch_size, **options)
            if self._lik != "regression":
                return out
            mean, epi = outputs_2d(out[0], "regression"), outputs_2d(out[1], "regression")
        else:
            if options:
                raise TypeError(f"pred_type='glm' takes no {sorted(options)}")
            out = self.la(x, "glm", link_approx, n_samples, generator=generator, batch_size=batch_size)
            if self._lik != "regression":
                return out
            mean, epi = out[0], torch.diagonal(out[1], dim1=1, dim2=2)
        # (reward_modeling: a reward has no observation noise, as laplace-torch's)
        alea = (self._sigma.detach().square() if self.likelihood == "regression" else self._sigma.new_zeros(())) \
            .to(mean.dtype).expand_as(mean)
        return RegressionPredictive(mean, alea + epi, alea, epi)

    def _predict_heteroscedastic(self, x, n_samples, pred_type, link_approx, generator, batch_size, options):
        """predict() for 'heteroscedastic_regression': the moments of y (module function
        heteroscedastic_glm for 'glm'; for 'nn' the mixture over the draws: mean E[mu], aleatoric
        E[s2], epistemic Var[mu], divided by n_samples)."""
        _link(pred_type, link_approx)
        if pred_type == "glm":
            if options:
                raise TypeError(f"pred_type='glm' takes no {sorted(options)}")
            return heteroscedastic_glm(*self.la(x, "glm", n_samples=n_samples, batch_size=batch_size))
        if self.enable_backprop:
            if options:
                raise TypeError(f"enable_backprop=True: pred_type='nn' runs each draw through torch.func.functional_call "
                                f"and takes no {sorted(options)} (the BMA loop's options)")
            mu, s2 = natural_to_mean_var(self.predictive_samples(x, "nn", n_samples, generator=generator,
                                                                 batch_size=batch_size))
            mean, epi = mu.mean(0), mu.var(0, correction=0)
            alea = s2.mean(0)
            return RegressionPredictive(mean, alea + epi, alea, epi)
        # a draw's natural parameters -> [mu, s2] [N, 2D]: the BMA loop averages them
        moments = self._natural_fn(lambda eta: torch.cat(natural_to_mean_var(eta), 1), options.pop("output_fn", None))
        m, v = self._nn_predict(x, n_samples, generator=generator, batch_size=batch_size, output_fn=moments, **options)
        m, v = outputs_2d(m, "regression"), outputs_2d(v, "regression")
        D = m.shape[1] // 2
        mean, alea, epi = m[:, :D], m[:, D:], v[:, :D]
        return RegressionPredictive(mean, alea + epi, alea, epi)

    def _natural_fn(self, transform=None, user_fn=None):
        """The BMA loop's output_fn for 'heteroscedastic_regression': a draw's outputs (through
        ``user_fn`` or the Laplace's output_fn) checked to be natural parameters (eta2 < 0, a
        ValueError naming the draw otherwise), then ``transform``-ed."""
        user_fn = user_fn or self.output_fn

        def fn(out):
            eta = model_output(out, user_fn)
            check_natural(eta, "likelihood='heteroscedastic_regression': a sampled network's outputs")
            return eta if transform is None else transform(eta)
        return fn

    # ---- draws and matrices ------------------------------------------------------------------------------
    def sample(self, n: int | None = None, *, generator: torch.Generator | None = None,
               n_samples: int | None = None) -> Tensor:
        """n draws [n, P] of N(theta_MAP, P^-1) over all trainable weights (the uncovered ones, with
        subset_of_weights='last_layer', stay at the MAP; ``sample(n)[:, la.positions]`` are the
        covered ones, laplace-torch's [n, P_c]), ready for :meth:`sample_`. ``n_samples``:
        laplace-torch's name for n."""
        if (n is None) == (n_samples is None):
            raise TypeError("sample takes the number of draws once: sample(n) or sample(n_samples=n)")
        n = check_int(n if n is not None else n_samples, "n", 0)
        _, _, _, _, mean, precision = self._need_fit()
        out = mean.unsqueeze(0).repeat(n, 1)
        if n:
            dev = precision.sample(n, self._scale(), self._delta(), generator)
            out[:, self.positions] += dev.to(out.dtype)
        return out

    def log_prob(self, theta: Tensor, normalized: bool = True) -> Tensor:
        """log N(theta; theta_MAP, P^-1) of the covered parameters (laplace-torch's ``log_prob``).

        Args:
            theta: [P] or [n, P] in the flat layout of :attr:`mean` and :meth:`sample` (with
                subset_of_weights='last_layer' only its covered entries ``theta[..., la.positions]``
                count), or [P_c] / [n, P_c], the covered ones alone.
            normalized: with the Gaussian's normaliser (log det P - P_c log 2 pi) / 2; False: only
                -(theta - theta_MAP)^T P (theta - theta_MAP) / 2.

        Returns: a scalar for one theta, [n] for n rows, in the Laplace's dtype (float32 for a
        float16 / bfloat16 model)."""
        _, _, _, _, mean, precision = self._need_fit()
        if not torch.is_tensor(theta):
            raise TypeError(f"theta must be a tensor [P] or [n, P], got {type(theta).__name__}")
        if not isinstance(normalized, bool):
            raise TypeError(f"normalized must be True or False, got {type(normalized).__name__}")
        if theta.dim() not in (1, 2) or theta.shape[-1] not in (mean.numel(), self.n_params):
            raise ValueError(f"theta must have shape [P] = [{mean.numel()}] or [n, P] (or the {self.n_params} covered "
                             f"parameters: [P_c] or [n, P_c]), got {tuple(theta.shape)}")
        if theta.device != mean.device or not theta.is_floating_point():
            raise ValueError(f"theta must be a floating tensor on {mean.device}, got {theta.dtype} on {theta.device}")
        rows = theta.reshape(-1, theta.shape[-1]).to(mean.dtype)
        if rows.shape[1] != self.n_params:
            rows = rows[:, self.positions]
        s, delta = self._scale(), self._delta()
        out = -0.5 * precision.quad(rows - mean[self.positions], s, delta)
        if normalized:
            out = out + 0.5 * (precision.logdet(s, self._prior) - self.n_params * math.log(2 * math.pi))
        return out.reshape(theta.shape[:-1])

    @property
    def posterior_variance(self) -> Tensor:
        """The marginal posterior variances diag(P^-1) [P_c] of the covered parameters (selection
        order: flat layout order), for every structure ('kron': from each block's eigenbases,
        no [P_c, P_c] matrix; 'full': the column norms of the Cholesky factor's inverse, a dense
        [P_c, P_c] like the covariance;
        'lowrank': the subspace correction of 1 / delta). laplace-torch's DiagLaplace
        ``posterior_variance``; its other structures have none."""
        precision = self._need_fit()[5]
        return precision.variance(self._scale(), self._delta())

    @property
    def posterior_covariance(self) -> Tensor:
        """The posterior covariance P^-1 [P_c, P_c] of the covered parameters (selection order, as
        :attr:`posterior_variance`), dense: 'full' from its Cholesky factor, 'diag' the diagonal
        matrix of the variances, 'kron' and 'lowrank' the inverse of :meth:`to_dense` (refused
        when the matrices built pass COVARIANCE_BYTES, 1 GiB: one for 'diag', three for 'kron' /
        'lowrank'; use :attr:`posterior_variance` or :meth:`sample`).
        laplace-torch's FullLaplace / DiagLaplace ``posterior_covariance``."""
        precision = self._need_fit()[5]
        if self.hessian_structure == "full":
            return precision.covariance(self._scale(), self._delta())
        # the result, and for 'kron' / 'lowrank' also to_dense() and its Cholesky factor
        need = (1 if self.hessian_structure == "diag" else 3) * self.n_params ** 2 * self.dtype.itemsize
        if need > COVARIANCE_BYTES:
            raise RuntimeError(f"posterior_covariance of {self.n_params} parameters is a dense {self.n_params} x "
                               f"{self.n_params} matrix ({need / 2**30:.1f} GiB with its work space) of a "
                               f"'{self.hessian_structure}' posterior: use posterior_variance (its diagonal), "
                               "sample(n), or hessian_structure='full' on a smaller subset")
        if self.hessian_structure == "diag":
            return torch.diag(self.posterior_variance)
        L, info = torch.linalg.cholesky_ex(self.to_dense())
        if int(info) != 0:
            raise RuntimeError("the posterior precision is not positive definite in "
                               f"{self.dtype}: raise prior_precision, or fit in float64")
        return torch.cholesky_inverse(L)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """log det P (a scalar) at the current prior precision and noise (laplace-torch's name)."""
        precision = self._need_fit()[5]
        return precision.logdet(self._scale(), self._prior)

    @property
    def log_det_prior_precision(self) -> Tensor:
        """log det P_0 (a scalar) of the current prior over the covered parameters."""
        self._need_fit()
        return self._prior_terms(self._prior)[0]

    @property
    def log_det_ratio(self) -> Tensor:
        """log det P - log det P_0: the Occam factor's log-determinant in
        :meth:`log_marginal_likelihood` = log_likelihood - (log_det_ratio + scatter) / 2."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    @property
    def scatter(self) -> Tensor:
        """(theta_MAP - mu_0)^T P_0 (theta_MAP - mu_0) (a scalar) over the covered parameters."""
        self._need_fit()
        return self._prior_terms(self._prior)[1]

    def predictive_samples(self, x, pred_type: str = "glm", n_samples: int = 100, *,
                           generator: torch.Generator | None = None, batch_size: int | None = None,
                           diagonal_output: bool = False, fitting: bool = False) -> Tensor:
        """Draws of the predictive (laplace-torch's ``predictive_samples``): [n_samples, N, C]
        class probabilities ('classification'), [n_samples, N] P(y = 1) ('binary') or outputs f
        [n_samples, N, C] ('regression' and 'reward_modeling', no observation noise; with
        ``fitting=True`` the latter's preference pairs' probabilities; 'heteroscedastic_regression':
        the natural parameters [n_samples, N, 2D]): the link applied to
        :meth:`functional_samples` (same arguments, same draws)."""
        if not isinstance(fitting, bool):
            raise TypeError(f"fitting must be True or False, got {type(fitting).__name__}")
        with self._fitting_mode(fitting):
            f = self.functional_samples(x, pred_type, n_samples, generator=generator, batch_size=batch_size,
                                        diagonal_output=diagonal_output)
            if self._lik == "classification":
                return f.softmax(-1)
            if self._lik == "binary":
                return f[..., 0].sigmoid()
            return f

    def functional_samples(self, x, pred_type: str = "glm", n_samples: int = 100, *,
                           generator: torch.Generator | None = None, batch_size: int | None = None,
                           diagonal_output: bool = False) -> Tensor:
        """Draws of the outputs f [n_samples, N, C] before the link (laplace-torch's
        ``functional_samples``, e.g. for Thompson sampling). 'glm': f ~ N(f_mu, f_var) of the
        linearised model per input (:meth:`functional_variance`; ``diagonal_output``: with the
        outputs' variances only); 'nn': the network at weight draws theta ~ N(theta_MAP, P^-1)
        (:meth:`sample`; torch.func.functional_call, eval mode). x: a tensor [N, ...] or a dict
        batch (rows in chunks of ``batch_size``, default 256 for 'glm', 1024 for 'nn') or an
        iterable of input batches."""
        _choice(pred_type, PRED_TYPES, "pred_type")
        n_samples = check_int(n_samples, "n_samples", 1)
        batch_size = self._batch_size(batch_size, pred_type)
        _check_glm_flag("diagonal_output", diagonal_output, pred_type)
        with torch.set_grad_enabled(self.enable_backprop and torch.is_grad_enabled()):
            if pred_type == "nn":
                return self._nn_outputs(x, n_samples, generator, batch_size)
            f_mu, f_var = self.functional_variance(x, batch_size)
            return draws(f_mu, _diagonal_only(f_var) if diagonal_output else f_var, n_samples, generator)

    def _nn_outputs(self, x, n_samples: int, generator, batch_size: int) -> Tensor:
        """The outputs [n_samples, N, C] at n_samples weight draws (torch.func.functional_call, eval
        mode; differentiable in x where gradients are enabled)."""
        self._need_fit()
        xs = [rows_to(xb, self.device) for xb in self._input_batches(x, batch_size)]
        if not xs:
            raise ValueError("x yielded no inputs: pass a tensor [N, ...] with N >= 1 or a non-empty loader")
        outs = []
        with ModeGuard(self.model, False):
            for theta in self.iter_samples(n_samples, generator=generator):
                params = self.layout.unflatten(theta.to(self.model_dtype))
                outs.append(torch.cat([self._call_at(params, xb) for xb in xs]))
        return torch.stack(outs)

    def _nn_moments(self, x, n_samples: int, generator, batch_size: int, unbiased: bool):
        """enable_backprop's 'nn' predictive (differentiable in x): probabilities averaged over the
        draws, or for regression (mean, variance over the draws) [N, C] each."""
        samples = self.predictive_samples(x, "nn", n_samples, generator=generator, batch_size=batch_size)
        if self._lik not in GAUSSIAN:
            return samples.mean(0)
        var = samples.var(0, correction=1 if unbiased and n_samples > 1 else 0)
        return samples.mean(0), var

    def _call_at(self, params: dict, x: Tensor) -> Tensor:
        """The model's outputs [N, C] on inputs x at the weights ``params`` (functional_call)."""
        try:
            out = functional_call(self.model, params, (x,))
        except RuntimeError as e:
            wrong = dtype_mismatch(self._model_tensors(x), self.model_dtype, e, name="x")
            if wrong is not None:
                raise wrong from e
            raise
        out = model_output(out, self.output_fn)
        _refuse_unbatched(x, out, "x")
        return outputs_2d(out, self._lik).to(self.dtype)  # (a half model's: in float32, as the GLM's)

    def to_dense(self) -> Tensor:
        """The posterior precision P [P_c, P_c] over the covered parameters (selection order: flat
        layout order), as a dense matrix (block-diagonal for 'kron'); for small models and tests."""
        curv, *_ = self._need_fit()
        s, delta = self._scale(), self._delta()
        if self.hessian_structure == "full":
            return s * curv.H + torch.diag(delta)
        if self.hessian_structure == "lowrank":
            return s * (curv.eigvecs * curv.eigvals) @ curv.eigvecs.t() + torch.diag(delta)
        out = torch.diag(delta.clone())
        for i, b in enumerate(self.blocks):
            idx = b.sel.reshape(-1)
            if b.kind == "diag" or self.hessian_structure == "diag":
                out[idx, idx] += s * curv.h[i]
                continue
            L, R = curv.factors(i)
            if b.left_diag:
                L = torch.diag(L)
            out[idx.unsqueeze(1), idx.unsqueeze(0)] += s * torch.kron(L, R)
        return out

    @property
    def posterior_precision(self):
        """'full': P [P_c, P_c]; 'diag': its diagonal [P_c]; 'lowrank': (U [P_c, k], lambda [k], s,
        delta) with P = s U diag(lambda) U^T + delta I; 'kron': a list per block of
        (name, L, R, s, delta) with P_block = s (L (x) R) + delta I (L a vector when diagonal;
        diagonal blocks: (name, h, None, s, delta))."""
        curv, *_ = self._need_fit()
        s, delta = self._scale(), self._delta()
        if self.hessian_structure == "full":
            return self.to_dense()
        if self.hessian_structure == "lowrank":
            return curv.eigvecs, curv.eigvals, s, delta[0]
        if self.hessian_structure == "diag":
            return s * self._need_fit()[5].h + delta
        out = []
        for i, b in enumerate(self.blocks):
            d = delta[b.sel.reshape(-1)[0]]
            if b.kind == "diag":
                out.append((b.name, curv.h[i], None, s, d))
            else:
                L, R = curv.factors(i)
                out.append((b.name, L, R, s, d))
        return out

    # ---- state -------------------------------------------------------------------------------------------
    def _config(self) -> dict:
        """The settings a saved state must have been fitted with."""
        config = dict(likelihood=self.likelihood, subset_of_weights=self.subset_of_weights,
                      hessian_structure=self.hessian_structure, curvature=self.curvature, bias_block=self.bias_block,
                      kfac_approx=self.kfac_approx, temperature=self.temperature)
        if self.hessian_structure == "lowrank":
            config["low_rank"] = self.low_rank
        if self.feature_reduction is not None:
            config["feature_reduction"] = self.feature_reduction
        return config

    def state_dict(self) -> dict:
        curv, loss, n, C, mean, _ = self._need_fit()
        state = self._state_header()
        state.update(config=self._config(),
                     blocks=[b.name for b in self.blocks], last_layer=getattr(self, "last_layer_name", None),
                     curvature_tensors=[t.detach().clone() for t in curv.tensors()], counts=curv.counts(),
                     loss=loss.detach().clone(), n_data=n, n_outputs=C, mean=mean.clone(),
                     prior_precision=self._prior.detach().clone(), prior_mean=self.prior_mean.detach().clone(),
                     sigma_noise=self._sigma.detach().clone(),
                     frozen={k: v.clone() for k, v in self._frozen.items()})
        if self.subnetwork_indices is not None:
            state["subnetwork_indices"] = self.subnetwork_indices.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` saved (the model must hold the same weights). Every entry is
        checked, and the eigendecomposition that may fail is done, before anything is assigned:
        a failed load leaves this Laplace as it was."""
        self._check_header(state)
        config, saved = self._config(), state.get("config")
        if isinstance(saved, dict) and "low_rank" in config and "low_rank" not in saved:
            saved = {**saved, "low_rank": config["low_rank"]}  # saved before low_rank was: the tensors' shapes check it
        if saved != config:
            raise ValueError(f"state_dict was saved by a Laplace with {saved}, this one has {config}")
        for key in ("blocks", "curvature_tensors", "counts", "loss", "n_data", "n_outputs", "mean", "prior_precision",
                    "prior_mean", "sigma_noise") + (("last_layer",) if self.subset_of_weights == "last_layer" else ()):
            if key not in state:
                raise ValueError(f"state_dict has no {key!r}: it was not saved by Laplace.state_dict()")
        if self.subnetwork_indices is not None:
            saved_idx = state.get("subnetwork_indices")
            if not (torch.is_tensor(saved_idx) and saved_idx.shape == self.subnetwork_indices.shape
                    and torch.equal(saved_idx.cpu().long(), self.subnetwork_indices)):
                raise ValueError("state_dict was saved by a subnetwork Laplace over other subnetwork_indices "
                                 f"({'none' if saved_idx is None else tuple(getattr(saved_idx, 'shape', ()))}) than "
                                 f"this one's [{self.subnetwork_indices.numel()}]: build it with the same indices")
        # the covered layers, blocks and prior, planned without touching self
        if self.subset_of_weights == "last_layer":
            name = state["last_layer"]
            mod = self._saved_last_layer(name)
            if self._named and name != self.last_layer_name:
                raise ValueError(f"state_dict was saved for the last layer {name!r}, this Laplace was built with "
                                 f"last_layer_name={self.last_layer_name!r}")
            plan = self._plan(_own_trainable(name, mod), state["prior_precision"], state["prior_mean"], _STATE_NAMES)
            plan["last_layer_name"] = name
        else:
            plan = dict(_prior=ml.check_prior(state["prior_precision"], self.blocks, self.n_params,
                                              self.hessian_structure, self.dtype, self.device, _STATE_NAMES[0]),
                        _prior_mean=_check_prior_mean(state["prior_mean"], self.n_params, self.dtype, self.device,
                                                     _STATE_NAMES[1]))
        blocks = plan.get("blocks", getattr(self, "blocks", None))
        if state["blocks"] != [b.name for b in blocks]:
            raise ValueError(f"state_dict has blocks {state['blocks']}, this model {[b.name for b in blocks]}")
        sigma = _check_sigma(state["sigma_noise"], self.likelihood, self.dtype, self.device,
                             "state_dict['sigma_noise']").detach().clone()
        loss = self._check_state_tensor(state, "loss", ())
        n_data = state["n_data"]
        n_outputs = state["n_outputs"]
        for key, v in (("n_data", n_data), ("n_outputs", n_outputs)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"state_dict[{key!r}] must be an int >= 1, got {v!r}")
        if self.likelihood == "binary" and n_outputs != 1:
            raise ValueError(f"state_dict['n_outputs'] must be 1 for likelihood='binary', got {n_outputs}")
        if self.likelihood == HETERO and n_outputs % 2:
            raise ValueError(f"state_dict['n_outputs'] must be even (2D natural parameters) for "
                             f"likelihood='heteroscedastic_regression', got {n_outputs}")
        mean = self._check_state_tensor(state, "mean", (self.layout.numel,))
        if not torch.equal(self.layout.flatten(), mean.to(self.device, self.model_dtype)):
            raise ValueError("state_dict was saved at other weights than the model's current ones: load the model's "
                             "own state_dict (the MAP the Laplace was fitted at) first")
        frozen = _fingerprints(self.model, self.layout.names)
        saved_frozen = state.get("frozen", frozen)  # (a state saved before the fingerprints were: not checked)
        if not isinstance(saved_frozen, dict):
            raise ValueError("state_dict['frozen'] must be the dict of fingerprints Laplace.state_dict() saves")
        # every frozen tensor of the model must have been seen at fit and agree; a saved entry of
        # another shape is of an older format (not compared), one the model lacks is not needed
        differ = [k for k, v in frozen.items()
                  if k not in saved_frozen or not torch.is_tensor(saved_frozen[k])
                  or (saved_frozen[k].shape == v.shape and not _same_fingerprint(v, saved_frozen[k]))]
        if differ:
            raise ValueError(f"state_dict was fitted with other frozen parameters or buffers than the model's current "
                             f"ones ({differ[:5]}{' ...' if len(differ) > 5 else ''}): the curvature and the GLM "
                             "predictive depend on them too; load the model's own state_dict first")
        curv = self._new_curvature(blocks)
        tensors = curv.tensors()
        saved = state["curvature_tensors"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(tensors) or any(
                not torch.is_tensor(a) or a.shape != b.shape for a, b in zip(saved, tensors)):
            raise ValueError("state_dict's curvature tensors do not fit this model's blocks")
        for t, v in zip(tensors, saved):
            if v.is_complex() or not bool(torch.isfinite(v).all()):
                raise ValueError("state_dict's curvature tensors hold NaN or infinity (or complex values); Laplace "
                                 "refuses them (fit would have refused such a curvature)")
            t.copy_(v)
        counts = state["counts"]
        if not isinstance(counts, (list, tuple)) or len(counts) != len(curv.counts()) or any(
                isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in counts):
            raise ValueError(f"state_dict['counts'] must be {len(curv.counts())} ints >= 0 (the Kronecker blocks' row "
                             f"counts), got {counts!r}")
        curv.set_counts(counts)
        precision = self._new_precision(curv)  # the eigendecomposition, the one step that may still fail
        # everything checked: assign
        self.__dict__.update(plan)
        self._sigma = sigma
        self._frozen = frozen
        self._fitted = (curv, loss.to(self.device, self.dtype, copy=True), int(n_data), int(n_outputs),
                        mean.to(self.device, self.dtype, copy=True), precision)  # (copies: owned, as the rest)

    def _saved_last_layer(self, name) -> nn.Module:
        """The module ``name`` a last-layer state_dict was saved for: an nn.Linear of this model."""
        return self._named_last_layer(name, "state_dict['last_layer']",
                                      ": the state_dict was saved for another architecture", not_str=ValueError)

    def _named_last_layer(self, name, what: str, hint: str = "", not_str: type = TypeError) -> nn.Module:
        """The module ``name`` (given as ``what``): an nn.Linear of this model with trainable
        parameters; ``not_str``: the error for a name that is not a str (a corrupt state: ValueError)."""
        if not isinstance(name, str):
            raise not_str(f"{what} must be a module name (str), got {type(name).__name__}")
        try:
            mod = self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{what} = {name!r} is not a module of this model{hint}") from None
        if not isinstance(mod, nn.Linear) or not any(p.requires_grad for p in mod.parameters(recurse=False)):
            raise ValueError(f"{what} = {name!r} is not an nn.Linear with trainable parameters in "
                             f"this model (it is {type(mod).__name__})")
        return mod


def _class_nll(p: Tensor, y: Tensor, likelihood: str) -> float:
    tiny = torch.finfo(p.dtype).tiny
    if likelihood == "binary":
        yb = y.reshape(-1).to(p.dtype)
        return float(-(yb * p.clamp_min(tiny).log() + (1 - yb) * (1 - p).clamp_min(tiny).log()).mean())
    return float(-p.gather(1, y.reshape(-1, 1).long()).clamp_min(tiny).log().mean())


def _own_trainable(name: str, mod: nn.Module) -> set[str]:
    """The model-level names of module ``name``'s own trainable parameters."""
    prefix = f"{name}." if name else ""
    return {prefix + k for k, p in mod.named_parameters(recurse=False) if p.requires_grad}


def _check_glm_flag(name: str, value, pred_type: str) -> None:
    """laplace-torch's ``joint`` / ``diagonal_output``: a bool, True only for pred_type='glm'."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    if value and pred_type != "glm":
        raise ValueError(f"{name}=True is for pred_type='glm' (laplace-torch ignores it for 'nn')")


def _diagonal_only(f_var: Tensor) -> Tensor:
    """[N, C, C] covariances with their off-diagonal entries zeroed (``diagonal_output``)."""
    return torch.diag_embed(torch.diagonal(f_var, dim1=1, dim2=2))


def _whole_dict(item):
    """input_fn for dict batches (alone or first in a (dict, targets) pair): the dict is the
    model's one positional argument."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Mapping):
        item = item[0]
    return (item,) if isinstance(item, Mapping) else model_input(item)
