"""The shared base of the linearised-network Gaussian processes: :class:`~.functional.FunctionalLaplace`
(the GP on a subset of the data) and :class:`~.ella.ELLA` (its Nystrom feature map over all the data).

Both see the network through the per-example Jacobian parts of the covered parameters (all trainable
ones, or a last layer's), which an internal diagonal :class:`~.laplace.Laplace` computes for its GLM
predictive (one batched backward of the C output directions per chunk of rows); both have a scalar
prior precision, a regression noise and a temperature; both give the GP predictive (``la``,
``functional_samples``, ``predictive_samples``) from their ``functional_variance`` /
``functional_covariance`` and the network at weight draws from their ``sample``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import (DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset,
                              SubsetRandomSampler)

from .._warnings import warn_user
from ..calibration._checks import check_generator, check_int, check_positive_float
from ..nn import ModeGuard
from ..nn.loaders import batches as loader_batches
from ..posteriors.base import Posterior
from ._kernels import gp_pred_type
from ._likelihood import check_targets
from .laplace import Laplace, _class_nll, _diagonal_only, _gaussian_nll
from .predictive import LINKS, draws, probabilities

LIKELIHOODS = ("classification", "regression")
SUBSETS = ("all", "last_layer")


class LinearisedGP(Posterior):
    """The linearised network f(x; theta*) + J(x) (theta - theta*) under the prior N(0, I / delta)
    of the covered weights, seen as a GP (module docstring). Subclasses provide ``fit``, ``sample``,
    ``_need_fit`` and the predictive's ``_prep`` / ``_moments``."""

    kind = "LinearisedGP"

    def __init__(self, model: nn.Module, likelihood: str, *, subset_of_weights: str, sigma_noise, prior_precision,
                 temperature: float, seed: int, batch_size: int, output_fn, last_layer_name: str | None,
                 feature_reduction: str | None):
        super().__init__(model)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS} for {self.kind}, got {likelihood!r}")
        if subset_of_weights not in SUBSETS:
            raise ValueError(f"subset_of_weights must be one of {SUBSETS} for {self.kind}, got {subset_of_weights!r}")
        self.likelihood = likelihood
        self.subset_of_weights = subset_of_weights
        self.temperature = check_positive_float(temperature, "temperature")
        self.seed = check_int(seed, "seed", 0)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (model output -> tensor), got {type(output_fn).__name__}")
        self.output_fn = output_fn
        self.dtype, self.device = self.layout.dtype, self.layout.device
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{self.kind} needs a float32 or float64 model, got {self.dtype}")
        # the per-example Jacobian parts of the covered parameters (Laplace's GLM machinery; a module
        # without a Kronecker rule gives its per-example gradient rows); a last layer is found (or
        # checked, when named) as Laplace's: at fit
        self._parts = Laplace(model, likelihood, subset_of_weights, "diag", unsupported="diag", output_fn=output_fn,
                              last_layer_name=last_layer_name, feature_reduction=feature_reduction)
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision

    # ---- hyper-parameters --------------------------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """delta, a scalar tensor (the prior N(0, I / delta) of the covered weights); assignable."""
        return self._delta

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device).detach()
        if t.numel() != 1:
            raise ValueError(f"{self.kind} takes a scalar prior_precision (the GP view's isotropic prior), got "
                             f"shape {tuple(t.shape)}")
        if not math.isfinite(float(t)) or float(t) <= 0:
            raise ValueError(f"prior_precision must be a finite number > 0, got {float(t)}")
        self._delta = t.reshape(()).clone()

    def _n_covered(self) -> int | None:
        """P_c, the covered parameters' count (None: a last layer not found yet)."""
        return self._parts.n_params if self._parts.layers is not None else None

    @property
    def positions(self) -> Tensor:
        """The covered parameters' flat positions [P_c] in :meth:`sample`'s layout (all of them for
        'all'; a last layer's after fit)."""
        if self._parts.layers is None:
            raise RuntimeError("subset_of_weights='last_layer' finds its layer in fit(): call fit(loader) first")
        return self._parts.positions

    @property
    def sigma_noise(self) -> Tensor:
        """The regression noise sigma (a float scalar tensor; 1 for classification); assignable."""
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        v = float(value)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"sigma_noise must be a finite number > 0, got {v}")
        if self.likelihood != "regression" and v != 1.0:
            raise ValueError(f"sigma_noise is the regression noise; likelihood={self.likelihood!r} needs sigma_noise=1")
        self._sigma = torch.tensor(v, dtype=self.dtype, device=self.device)

    # ---- Jacobian parts ------------------------------------------------------------------------------
    def _pieces(self, x: Tensor) -> tuple[Tensor, list]:
        """(f [n, C], [(flat positions of the block, its part)]) for input rows x [n, ...]: the
        parts of Laplace's GLM predictive ('factored' U [C, n, p], V [n, q]; 'matrix' [C, n, p, q];
        'rows' [C, n, k]), one batched backward of the C output directions."""
        (f, parts), = self._parts._glm_pieces(x.to(self.device), x.shape[0])
        return f, [(b.sel, part) for b, part in parts]

    def _rows(self, loader) -> tuple[Tensor, Tensor]:
        """All (inputs, targets) rows the loader yields, joined (tensor inputs only)."""
        xs, ys = [], []
        for i, item in enumerate(loader_batches(loader)):
            x, y = self._check_batch(item, i)
            xs.append(x), ys.append(y)
        if not xs:
            raise ValueError(f"{self.kind}: the loader yielded no batches")
        return torch.cat(xs), torch.cat(ys)

    def _check_batch(self, item, i: int) -> tuple[Tensor, Tensor]:
        """Batch ``i`` as (inputs [B, ...], targets [B, ...]), else a clear error."""
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not torch.is_tensor(item[0]) \
                or not torch.is_tensor(item[1]):
            raise TypeError(f"{self.kind}: batch {i} must be (inputs tensor [B, ...], targets tensor [B, ...]), got "
                            f"{type(item).__name__}")
        if item[0].dim() == 0 or item[1].dim() == 0 or item[0].shape[0] != item[1].shape[0]:
            raise ValueError(f"{self.kind}: batch {i} has {tuple(item[1].shape)} targets for inputs "
                             f"{tuple(item[0].shape)}: one target per input row")
        return item[0], item[1]

    def _draw_rows(self, loader, draw) -> tuple[Tensor, Tensor, Tensor, int]:
        """(indices [M], inputs, targets, N) of the rows ``draw(N, targets)`` picks among the N rows
        the loader serves (``targets``: a callable giving their targets, for a balanced draw).
        A DataLoader over a map-style dataset: its sampler's dataset indices (:func:`served_indices`,
        as laplace-torch's ``training_indices``), the chosen rows read by index; anything else: its
        rows gathered, indices into them."""
        served = served_indices(loader)
        if served is None:
            X, Y = self._rows(loader)
            pos = draw(X.shape[0], lambda: Y)
            return pos, X[pos], Y[pos], X.shape[0]
        ds = loader.dataset
        pos = draw(served.numel(), lambda: torch.stack([torch.as_tensor(_target(ds[int(i)])) for i in served]))
        idx = served[pos]
        X, Y = self._rows(DataLoader(Subset(ds, idx.tolist()), batch_size=self.batch_size, collate_fn=loader.collate_fn))
        return idx, X, Y, served.numel()

    # ---- predictives: a subclass's _prep() (what every chunk of rows needs) and _moments(x, prep, joint) ----
    def functional_variance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f_mu [n, C], f_var [n, C, C]) of the posterior of the linearised network at input rows
        x [n, ...] (f_var: the epistemic, functional covariance; the noise is not in it), in chunks
        of batch_size rows."""
        if x.shape[0] == 0:
            return self._empty(False)
        prep = self._prep()
        mus, vars_ = zip(*(self._moments(x[r:r + self.batch_size], prep, False)
                           for r in range(0, x.shape[0], self.batch_size)))
        return torch.cat(mus), torch.cat(vars_)

    def functional_covariance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f_mu [n C], f_cov [n C, n C]): the joint covariance over all the input rows x [n, ...]
        and outputs (flat index i * C + c; laplace-torch's ``joint=True``)."""
        if x.shape[0] == 0:
            return self._empty(True)
        f, cov = self._moments(x, self._prep(), True)
        return f.reshape(-1), cov

    def la(self, x: Tensor, pred_type: str = "gp", link_approx: str = "probit", n_samples: int = 100, *,
           generator: torch.Generator | None = None, joint: bool = False, diagonal_output: bool = False):
        """laplace-torch's ``__call__`` (pred_type 'gp'; 'glm' is accepted as the same linearised
        predictive; the network averaged over weight draws is :meth:`predict`): classification
        probabilities [n, C] (``link_approx`` 'probit', 'bridge', 'bridge_norm' or 'mc' with
        ``n_samples`` draws), regression (f_mu [n, C], f_var [n, C, C]) (sigma^2 not in it;
        ``diagonal_output``: f_var [n, C]; ``joint``: (f_mu [n C], f_cov [n C, n C]) over all the
        rows, :meth:`functional_covariance`). x: input rows [n, ...]."""
        gp_pred_type(pred_type, nn_too=False)
        if link_approx not in LINKS:
            raise ValueError(f"link_approx must be one of {LINKS}, got {link_approx!r} (laplace-torch's positional "
                             f"order differs: pass joint= and link_approx= by keyword)")
        n_samples = check_int(n_samples, "n_samples", 1)
        check_generator(generator)
        _check_bools(joint=joint, diagonal_output=diagonal_output)
        if joint:
            if self.likelihood != "regression":
                raise ValueError("joint=True is the regression predictive's joint covariance over all inputs")
            return self.functional_covariance(x)
        f_mu, f_var = self.functional_variance(x)
        if self.likelihood == "regression":
            return (f_mu, torch.diagonal(f_var, dim1=1, dim2=2)) if diagonal_output else (f_mu, f_var)
        if diagonal_output and link_approx == "mc":
            f_var = _diagonal_only(f_var)
        return probabilities(f_mu, f_var, "classification", link_approx, n_samples, generator)

    __call__ = la

    def functional_samples(self, x: Tensor, pred_type: str = "gp", n_samples: int = 100, *,
                           generator: torch.Generator | None = None, diagonal_output: bool = False,
                           joint: bool = False) -> Tensor:
        """Draws [n_samples, n, C] of the outputs at input rows x [n, ...] (laplace-torch's
        ``functional_samples``, e.g. for Thompson sampling): 'gp' (or 'glm') from the GP predictive
        N(f_mu, f_var) per row (``diagonal_output``: the outputs' variances only; ``joint``: one
        draw of all rows together from the joint covariance, with ``diagonal_output`` its
        cross-output entries dropped); 'nn' the network at :meth:`sample`'s weight draws
        (torch.func.functional_call, eval mode; joint over the rows by construction)."""
        pred_type = gp_pred_type(pred_type, nn_too=True)
        n_samples = check_int(n_samples, "n_samples", 1)
        check_generator(generator)
        _check_bools(joint=joint, diagonal_output=diagonal_output)
        if pred_type == "nn":
            if diagonal_output:
                raise ValueError("diagonal_output is for the GP's draws (pred_type='gp'), not the network's")
            return self._network_at_draws(x, n_samples, generator)
        if joint:
            f_mu, f_cov = self.functional_covariance(x)
            C = self._need_fit()["C"]
            if diagonal_output:  # the outputs' blocks only: entries (i c, j d) with c == d
                out = torch.arange(f_mu.numel(), device=f_mu.device) % C
                f_cov = f_cov * (out[:, None] == out[None, :])
            if not f_mu.numel():
                return f_mu.new_zeros(n_samples, 0, C)
            return draws(f_mu[None], f_cov[None], n_samples, generator).reshape(n_samples, -1, C)
        f_mu, f_var = self.functional_variance(x)
        if diagonal_output:
            f_var = _diagonal_only(f_var)
        return draws(f_mu, f_var, n_samples, generator)

    def predictive_samples(self, x: Tensor, pred_type: str = "gp", n_samples: int = 100, *,
                           generator: torch.Generator | None = None, diagonal_output: bool = False,
                           joint: bool = False) -> Tensor:
        """:meth:`functional_samples` (same arguments, same draws) through the link: class
        probabilities [n_samples, n, C] (softmax) for classification, the outputs themselves for
        regression (no noise added)."""
        f = self.functional_samples(x, pred_type, n_samples, generator=generator, diagonal_output=diagonal_output,
                                    joint=joint)
        return f.softmax(-1) if self.likelihood == "classification" else f

    def _network_at_draws(self, x: Tensor, n: int, generator) -> Tensor:
        """The outputs [n, rows, C] of the network at n weight draws (:meth:`sample`)."""
        if x.shape[0] == 0:
            return torch.zeros(n, 0, self._need_fit()["C"], dtype=self.dtype, device=self.device)
        thetas = self.sample(n, generator=generator)
        x = x.to(self.device)
        outs = []
        with ModeGuard(self.model, False), torch.no_grad():
            for theta in thetas:
                params = self.layout.unflatten(theta.to(self.layout.dtype))
                outs.append(torch.cat([self._parts._call_at(params, x[r:r + self.batch_size])
                                       for r in range(0, x.shape[0], self.batch_size)]))
        return torch.stack(outs)

    def predict(self, x, n_samples: int = 30, *, likelihood: str | None = None, **options):
        """The network averaged over :meth:`sample`'s weight draws (the posterior interface's BMA
        loop; ``options`` as :meth:`pyfastbayes.posteriors.Posterior.predict`'s): probabilities
        [N, C] or, for regression, (mean, variance) [N, C] of the outputs; the GP predictive
        itself is :meth:`la` / :meth:`functional_variance`."""
        if options.get("output_fn") is None:
            options["output_fn"] = self.output_fn
        return Posterior.predict(self, x, n_samples, likelihood=likelihood or self.likelihood, **options)

    def _empty(self, joint: bool) -> tuple[Tensor, Tensor]:
        """The moments of no input rows: (f_mu [0, C], f_var [0, C, C]), or joint ([0], [0, 0])."""
        C = self._need_fit()["C"]
        z = dict(dtype=self.dtype, device=self.device)
        return (torch.zeros(0, **z), torch.zeros(0, 0, **z)) if joint else (torch.zeros(0, C, **z),
                                                                              torch.zeros(0, C, C, **z))

    # ---- tuning ---------------------------------------------------------------------------------------------
    _METHODS = ("gridsearch",)

    def _tuning_range(self, method: str, prior_structure: str, pred_type: str, rng, lo, hi) -> tuple:
        """Check optimize_prior_precision's shared arguments; the grid's log10 range (laplace-torch's
        ``log_prior_prec_min`` / ``log_prior_prec_max`` set its ends too)."""
        if method in ("gp", "glm", "nn"):
            raise ValueError(f"method must be one of {self._METHODS}, got {method!r}: laplace-torch's first positional "
                             f"argument is pred_type, here a keyword (optimize_prior_precision(method="
                             f"{self._METHODS[-1]!r}, pred_type={method!r}, ...))")
        if method not in self._METHODS:
            extra = f" ({self.kind} has no marginal likelihood)" if "marglik" not in self._METHODS else ""
            raise ValueError(f"method must be one of {self._METHODS}{extra}, got {method!r}")
        if prior_structure != "scalar":
            raise ValueError(f"{self.kind} tunes one scalar prior precision (the GP view's isotropic prior), got "
                             f"prior_structure={prior_structure!r}")
        gp_pred_type(pred_type, nn_too=False)
        if lo is not None or hi is not None:
            rng = (rng[0] if lo is None else lo, rng[1] if hi is None else hi)
        return rng

    def _gridsearch(self, val_loader, rng, grid_size: int, link_approx: str) -> Tensor:
        """The prior precision of the lowest validation NLL among 10**linspace(rng, grid_size)."""
        self._need_fit()
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader (batches of (inputs, targets))")
        grid = torch.logspace(float(rng[0]), float(rng[1]), check_int(grid_size, "grid_size", 1), dtype=torch.float64)
        self.optimize_hyperparameters(val_loader, grid.tolist(), link_approx=link_approx)
        return self.prior_precision

    # ---- tuning on validation data -------------------------------------------------------------------
    def optimize_hyperparameters(self, val_loader, grid, *, link_approx: str = "probit") -> tuple[Tensor, Tensor]:
        """The candidate of ``grid`` with the lowest validation NLL of the GP predictive on
        ``val_loader`` (batches of (inputs, targets)): prior precisions, or for regression
        (prior precision, sigma_noise) pairs (laplace-torch ELLA's ``optimize_hyperparameters``).
        Sets and returns (prior_precision, sigma_noise); when every candidate's NLL is non-finite
        both are kept (with a warning), an empty grid is a ValueError."""
        self._need_fit()
        Xv, Yv = self._rows(val_loader)
        old = (self._delta, self._sigma)
        best, best_nll, seen = None, math.inf, False
        try:
            for cand in grid:
                seen = True
                if isinstance(cand, (tuple, list)):
                    if self.likelihood != "regression" or len(cand) != 2:
                        raise ValueError(f"grid: (prior_precision, sigma_noise) pairs are for regression; got {cand!r} "
                                         f"for likelihood={self.likelihood!r}")
                    self.prior_precision, self.sigma_noise = cand
                else:
                    self.prior_precision = cand
                nll = self._val_nll(Xv, Yv, link_approx)
                self._scored(nll)
                if nll < best_nll:
                    best, best_nll = (self._delta, self._sigma), nll
        except BaseException:
            self._delta, self._sigma = old
            raise
        self._delta, self._sigma = best if best is not None else old
        if not seen:
            raise ValueError("grid is empty: pass prior precisions (or, for regression, (prior, sigma_noise) pairs)")
        if best is None:
            warn_user(f"{self.kind} grid search: every candidate gave a non-finite validation NLL; kept the previous "
                      f"hyper-parameters")
        return self._delta, self._sigma

    def _scored(self, nll: float) -> None:
        """A tuning candidate (the current hyper-parameters) got validation NLL ``nll`` (ELLA
        records it in its ``fit_history_``)."""

    def _val_nll(self, X: Tensor, Y: Tensor, link_approx: str) -> float:
        """The mean validation NLL of the GP predictive (regression: with the noise sigma^2)."""
        f_mu, f_var = self.functional_variance(X)
        y = check_targets(Y, f_mu, self.likelihood)
        if self.likelihood == "regression":
            nll = _gaussian_nll(f_mu, torch.diagonal(f_var, dim1=1, dim2=2) + self._sigma.square(), y)
        else:
            nll = _class_nll(probabilities(f_mu, f_var, "classification", link_approx, 100, None), y, self.likelihood)
        return nll if math.isfinite(nll) else math.inf

    def _atomically(self, keys: tuple, fn, *args):
        """``fn(*args)``; when it fails, the layer setup and the attributes ``keys`` are put back as
        they were (those it had not set removed again)."""
        saved = (self._parts._setup_state(), {k: self.__dict__[k] for k in keys if k in self.__dict__})
        try:
            return fn(*args)
        except BaseException:
            self._parts._restore_setup(saved[0])
            for k in keys:
                if k in saved[1]:
                    self.__dict__[k] = saved[1][k]
                else:
                    self.__dict__.pop(k, None)
            raise

    # ---- state: the checks both GPs' loads share (nothing on self changes in them) ----------------------
    def _load_guarded(self, state: dict, keys: tuple, defaults: dict | None = None) -> None:
        """Check the header and the options ``keys`` against self's, then ``self._load(state)``; the
        layer setup is put back when it fails (``_load`` assigns only after all its checks)."""
        self._check_header(state)
        defaults = defaults or {}
        for key in keys:
            if state.get(key, defaults.get(key)) != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={state.get(key)!r}, this {self.kind} has "
                                 f"{getattr(self, key)!r}")
        self._atomically((), self._load, state)

    def _load_last_layer(self, state: dict) -> None:
        """A last layer's module from state['last_layer'] set up (checked against a named one)."""
        if self.subset_of_weights != "last_layer":
            return
        name = state.get("last_layer")
        if self._parts._named and name != self._parts.last_layer_name:
            raise ValueError(f"state_dict was saved for the last layer {name!r}, this {self.kind} has "
                             f"last_layer_name={self._parts.last_layer_name!r}")
        self._parts._setup_last_layer(name, self._parts._named_last_layer(name, "state_dict['last_layer']",
                                                                          not_str=ValueError))

    def _check_state_theta(self, state: dict) -> Tensor:
        theta = self._check_state_tensor(state, "theta", (self.numel,))
        if not torch.equal(theta.to(self.device, self.dtype), self.layout.flatten().detach()):
            raise ValueError("state_dict was saved at other weights than the model's current ones: load the model's "
                             "own state_dict (the MAP the posterior was fitted at) first")
        return theta

    def _check_state_subset(self, state: dict, M: int) -> Tensor:
        """state['subset']: M distinct int64 dataset indices >= 0."""
        t = state.get("subset")
        ok = torch.is_tensor(t) and t.dtype == torch.long and tuple(t.shape) == (M,)
        if not (ok and bool((t >= 0).all()) and t.unique().numel() == M):
            raise ValueError(f"state_dict['subset'] must be the {M} distinct int64 row indices of the subset")
        return t.clone()

    def _checked_hyper(self, state: dict) -> tuple[Tensor, Tensor]:
        """(prior precision, sigma) of the state, checked by self's setters (self unchanged)."""
        for key in ("prior_precision", "sigma_noise"):
            if key not in state:
                raise ValueError(f"state_dict has no {key!r}: it was not saved by {self.kind}.state_dict()")
        old = (self._delta, self._sigma)
        try:
            self.prior_precision, self.sigma_noise = state["prior_precision"], float(state["sigma_noise"])
            return self._delta, self._sigma
        finally:
            self._delta, self._sigma = old

    def _check_state_rows(self, state: dict, M: int, C: int) -> tuple[Tensor, Tensor, list]:
        """(X on the device, the saved outputs f [M, C], [(f, parts)] per chunk): the subset's rows
        run through the model again, their outputs checked against the saved ones."""
        saved_f = self._check_state_tensor(state, "f", (M, C)).to(self.device, self.dtype)
        X = state.get("X")
        if not torch.is_tensor(X) or X.shape[:1] != (M,):
            raise ValueError(f"state_dict['X'] must be the subset's {M} input rows")
        X = X.to(self.device)
        pieces = [self._pieces(X[s:s + self.batch_size]) for s in range(0, M, self.batch_size)]
        f = torch.cat([p[0] for p in pieces])
        if f.shape != saved_f.shape or not torch.allclose(f, saved_f, rtol=1e-5,
                                                          atol=1e-6 * float(saved_f.abs().max().clamp_min(1))):
            raise ValueError("state_dict was fitted with another model than this one (its outputs on the subset "
                             "differ: frozen parameters or buffers, e.g. BatchNorm statistics): load the model's own "
                             "state_dict first")
        return X, saved_f, pieces

    def _check_uses_on(self, X: Tensor) -> None:
        """Refuse a model that reads a covered parameter outside its module's call (tied weights):
        its Jacobian parts would miss those uses (Laplace's check)."""
        self._parts._check_uses(X[:2])


def served_indices(loader) -> Tensor | None:
    """The dataset indices [N] a DataLoader over a map-style dataset serves in one epoch (first
    occurrences, in its sampler's order; laplace-torch's ``training_indices``): a sequential
    sampler's range (without the rows ``drop_last`` drops), a full random sampler's range, a
    SubsetRandomSampler's indices, any other sampler's (or batch sampler's) once iterated. None for
    anything else (a plain iterable of batches, an IterableDataset, a loader without automatic
    batching): its rows are gathered instead."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
            or not hasattr(loader.dataset, "__len__") or loader.batch_sampler is None:
        return None
    N, bs = len(loader.dataset), loader.batch_sampler
    sampler = getattr(bs, "sampler", None)
    if sampler is None:
        idx = [int(i) for b in bs for i in b]
    elif isinstance(sampler, SequentialSampler):
        idx = list(range(N))
        if getattr(bs, "drop_last", False):
            idx = idx[:len(bs) * bs.batch_size]
    elif isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == N:
        idx = list(range(N))  # (every row, without consuming the loader's generator)
    elif isinstance(sampler, SubsetRandomSampler):
        idx = [int(i) for i in sampler.indices]
    else:
        idx = [int(i) for i in sampler]
    t = torch.as_tensor(list(dict.fromkeys(idx)), dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("the loader's sampler serves no rows")
    if bool((t < 0).any()) or bool((t >= N).any()):
        raise ValueError(f"the loader's sampler serves indices outside the dataset's {N} rows")
    return t


def _target(item):
    """A dataset item's target (an (inputs, target) pair)."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"a balanced draw reads the dataset's (inputs, target) items, got {type(item).__name__}")
    return item[1]


def _check_bools(**flags) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
