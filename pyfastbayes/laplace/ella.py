"""ELLA, the accelerated linearised Laplace (Deng, Zhou & Zhu 2022, "Accelerated Linearized Laplace
Approximation for Bayesian Deep Learning"; laplace-torch's ``ELLA``).

The linearised network's GP kernel J(x) J(x')^T is approximated by a Nystrom feature map of rank K
built on M training rows, each with one output chosen at random: with R = J_rows [M, P] and the
top K eigenpairs (lambda, V) of R R^T, the features are phi(x) = J(x) R^T V Lambda^-1/2 [C, K]
(J(x) D with laplace-torch's ``dual_directions`` D = R^T V Lambda^-1/2 [P, K]). A Bayesian linear
model in these K features, prior N(0, I / delta), is then fitted on ALL the training data:

    precision  A = G / (sigma^2 T) + delta I,  G = sum_n phi_n^T Lambda_n phi_n  (Lambda_n: the loss
               Hessian in the outputs, diag(p) - p p^T or I),
    predictive f_var(x) = phi(x) A^-1 phi(x)^T, the mean the network's own output f(x; theta*).

No Jacobian tensor and no [P, K] matrix: phi(x) = K(x, rows) V Lambda^-1/2 is a cross kernel, formed
from the factored per-example parts of the GLM predictive (:mod:`._kernels`) as FunctionalLaplace's
kernels are; weight draws theta* + D z, z ~ N(0, A^-1), are J_rows^T (V Lambda^-1/2 z), one
vector-Jacobian product on the M rows' parts. The subset kernel R R^T is formed and
eigendecomposed in float64. ELLA has no marginal likelihood: the prior precision (and, for
regression, the noise) are tuned on validation data (``optimize_prior_precision('gridsearch')``,
``optimize_hyperparameters``), as laplace-torch's.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration._checks import check_generator, check_int
from ..nn.loaders import batches as loader_batches
from ._kernels import gram, jvp, kernel, vjp_
from ._likelihood import check_targets
from ._linearised import LinearisedGP

DUAL_BYTES = 256 << 20  # the explicit basis D [K, P_c] is kept below this (cross kernels otherwise)
# what fit assigns (put back when it fails)
_FIT_STATE = ("_fitted", "n_data", "n_outputs", "subset", "fit_history_")


class ELLA(LinearisedGP):
    """The accelerated linearised Laplace (module docstring).

    Args:
        model: the trained network, outputs [N, C] (logits for 'classification'; [N] or [N, C]
            for 'regression').
        likelihood: 'classification' or 'regression'.
        subsample_size: M, the training rows of the Nystrom basis (drawn with
            ``torch.randperm`` from ``seed``, laplace-torch's draw; one output per row from
            ``seed + 1``).
        n_eigenvalues: K <= M, the rank of the feature map.
        subset_of_weights: 'all' trainable parameters or 'last_layer' (found at fit, or
            ``last_layer_name``'s), as :class:`~pyfastbayes.laplace.FunctionalLaplace`.
        sigma_noise, prior_precision (a scalar), temperature: as
            :class:`~pyfastbayes.laplace.Laplace`; prior_mean must be 0 (laplace-torch's too).
        batch_size: rows per Jacobian chunk of the subset and of predictions.
        output_fn: model output -> the tensor [N, C].

    Attributes after :meth:`fit`: ``n_data`` (the rows whose curvature G holds), ``subset`` (the M
    dataset indices), ``n_outputs`` (C), ``fit_history_`` (laplace-torch's: 'processed_examples',
    the rows seen after each batch; 'val_nll', the validation NLLs of ``fit(val_loader=)``;
    'tuning', one record {prior_precision, sigma_noise, val_nll} per candidate of
    :meth:`optimize_hyperparameters` / the grid search).
    """

    kind = "ELLA"

    def __init__(self, model: nn.Module, likelihood: str = "classification", subsample_size: int = 2000,
                 n_eigenvalues: int = 20, *, subset_of_weights: str = "all", sigma_noise: float = 1.0,
                 prior_precision: float = 1.0, prior_mean=0.0, temperature: float = 1.0, seed: int = 1234,
                 batch_size: int = 64, output_fn=None, last_layer_name: str | None = None,
                 feature_reduction: str | None = None):
        super().__init__(model, likelihood, subset_of_weights=subset_of_weights, sigma_noise=sigma_noise,
                         prior_precision=prior_precision, temperature=temperature, seed=seed, batch_size=batch_size,
                         output_fn=output_fn, last_layer_name=last_layer_name, feature_reduction=feature_reduction)
        self.subsample_size = check_int(subsample_size, "subsample_size", 1)
        self.n_eigenvalues = check_int(n_eigenvalues, "n_eigenvalues", 1)
        if self.n_eigenvalues > self.subsample_size:
            raise ValueError(f"n_eigenvalues = {n_eigenvalues} must be at most subsample_size = {subsample_size} (the "
                             f"Nystrom basis has one direction per subset row)")
        pm = torch.as_tensor(prior_mean)
        if pm.is_complex() or not bool((pm == 0).all()):
            raise ValueError("ELLA takes prior_mean=0 only (its feature-space prior is centred at the MAP's "
                             "linearisation; laplace-torch's ELLA refuses it too)")
        self._fitted = None
        self.fit_history_ = _empty_history()

    # ---- fit -----------------------------------------------------------------------------------------
    def fit(self, loader, progress: bool = True, *, balanced: bool = False, val_loader=None,
            val_steps: int | None = None) -> "ELLA":
        """Build the Nystrom basis on M rows of ``loader`` and accumulate the feature-space curvature
        G over all its batches. ``loader``: a DataLoader over a map-style dataset (the M rows read
        by index), or any re-iterable of (inputs [B, ...], targets) batches (its rows gathered for the
        subset). ``balanced`` (classification): the M rows drawn round-robin over the classes
        (laplace-torch's option). ``val_loader`` (batches of (inputs, targets)): the validation NLL
        of the GP predictive (probit for classification, with the noise for regression) at the
        current prior, recorded in ``fit_history_['val_nll']`` every ``val_steps`` batches of the
        curvature pass and after the last (laplace-torch ELLA's history: the NLL as G takes in
        more data, e.g. to see it overfit); ``fit_history_['processed_examples']`` gets the rows
        seen after each batch. Returns self; a failed fit changes nothing."""
        if not isinstance(balanced, bool):
            raise TypeError(f"balanced must be True or False, got {type(balanced).__name__}")
        if balanced and self.likelihood != "classification":
            raise ValueError("balanced=True draws the subset round-robin over the classes: classification only")
        if val_steps is not None:
            val_steps = check_int(val_steps, "val_steps", 1)
            if val_loader is None:
                raise ValueError("val_steps needs val_loader (the validation batches it scores)")
        return self._atomically(_FIT_STATE, self._fit, loader, progress, balanced, val_loader, val_steps)

    def _fit(self, loader, progress: bool, balanced: bool, val_loader=None, val_steps: int | None = None) -> "ELLA":
        if torch.is_tensor(loader):
            raise TypeError("fit needs an iterable of (inputs, targets) batches (e.g. a DataLoader), not a tensor")
        self.fit_history_ = history = _empty_history()
        val = None if val_loader is None else self._rows(val_loader)

        def score():  # the validation NLL with the curvature G holds so far
            history["val_nll"].append(self._val_nll(*val, "probit"))
        idx, X, Y = self._subset_rows(loader, balanced)
        M, K = self.subsample_size, self.n_eigenvalues
        X = X.to(self.device)
        if self._parts.layers is None:  # a last layer: found on the first subset row
            with self._parts._fitting_mode():
                self._parts._find_last_layer(X[:1])
        self._check_uses_on(X)  # (tied weights, parameters read outside their module: refused)
        # the M rows' Jacobian parts at one output each (seed + 1: laplace-torch's draw)
        picked, fs, choices = [], [], None
        for rows in self._chunk_rows(M):
            f, parts = self._pieces(X[rows])
            if choices is None:
                choices = torch.randint(f.shape[1], (M,), generator=torch.Generator().manual_seed(self.seed + 1))
            fs.append(f)
            picked.append(_pick(parts, choices[rows].to(self.device)))
        f = torch.cat(fs)
        check_targets(Y, f, self.likelihood)  # (the subset's targets: the likelihood's shape, early)
        C = f.shape[1]
        Kmm = gram(lambda: zip(self._chunk_rows(M), picked), M, 1, torch.float64, self.device)
        evals, evecs = torch.linalg.eigh(Kmm)
        order = torch.argsort(evals, descending=True)[:K]
        top = evals[order]
        P = self._n_covered()
        tol = torch.finfo(torch.float64).eps * max(M, P) * float(evals.abs().max())
        if not bool((top > tol).all()):
            usable = int((evals > tol).sum())
            raise ValueError(f"ELLA: the subset kernel has {usable} of {M} directions above the numerical tolerance, "
                             f"fewer than n_eigenvalues = {K}: lower n_eigenvalues, raise subsample_size or change "
                             f"seed (a last layer's kernel has rank at most its inputs + 1)")
        proj = evecs[:, order] / top.sqrt()  # V Lambda^-1/2 [M, K]
        self._fitted = dict(M=M, K=K, C=C, X=X, f=f, choices=choices, picked=picked, proj=proj,
                            G=torch.zeros(K, K, dtype=torch.float64, device=self.device),
                            theta=self.layout.flatten().detach().clone())
        self._fitted["dual"] = self._dual_directions()
        G, n = self._fitted["G"], 0
        batches = loader_batches(loader)
        for i, item in enumerate(tqdm(batches, desc="ELLA.fit", disable=not progress, leave=False)):
            xb, yb = self._check_batch(item, i)
            fb, phi = self._features(xb.to(self.device))
            check_targets(yb.to(self.device), fb, self.likelihood)
            phi = phi.to(torch.float64)
            if self.likelihood == "regression":
                G += torch.einsum("nck,ncl->kl", phi, phi)
            else:  # phi^T (diag(p) - p p^T) phi
                p = fb.to(torch.float64).softmax(-1)
                pphi = torch.einsum("nc,nck->nk", p, phi)
                G += torch.einsum("nck,nc,ncl->kl", phi, p, phi) - pphi.t() @ pphi
            n += fb.shape[0]
            history["processed_examples"].append(float(n))
            if val is not None and val_steps and (i + 1) % val_steps == 0:
                score()
        if n == 0:
            raise ValueError("ELLA.fit: the loader yielded no batches")
        if val is not None and (not val_steps or (i + 1) % val_steps):
            score()
        self.n_data, self.n_outputs, self.subset = n, C, idx
        return self

    def _subset_rows(self, loader, balanced: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(dataset indices [M], inputs, targets) of the subset among the rows the loader serves:
        torch.randperm from ``seed`` (laplace-torch's draw), or round-robin over the classes."""
        M = self.subsample_size

        def draw(N, targets):
            if M > N:
                raise ValueError(f"subsample_size = {M} is larger than the {N} training rows")
            g = torch.Generator().manual_seed(self.seed)
            return _balanced(targets(), M, g) if balanced else torch.randperm(N, generator=g)[:M]

        idx, X, Y, _ = self._draw_rows(loader, draw)
        return idx, X, Y

    def _need_fit(self) -> dict:
        if self._fitted is None:
            raise RuntimeError("ELLA: call fit(train_loader) first")
        return self._fitted

    # ---- features and the feature-space posterior -------------------------------------------------------
    def _dual_directions(self) -> Tensor | None:
        """D = R^T V Lambda^-1/2 [K, P_c] (laplace-torch's ``dual_directions``, transposed) when the
        features are cheaper as J(x) D than as cross kernels K(x, rows) V Lambda^-1/2 and D stays
        under DUAL_BYTES; else None. Per row and block, J(x) D costs K (p q + C p) multiply-adds for
        a factored Linear part (K C numel for the others) against C M (p + q) (C M numel)."""
        st = self._fitted
        M, K, C = st["M"], st["K"], st["C"]
        P = self._n_covered()
        dual_cost = cross_cost = 0
        for _, p in st["picked"][0]:
            if p[0] == "factored":
                a, b = p[1].shape[-1], p[2].shape[-1]
                dual_cost += K * (a * b + C * a)
                cross_cost += C * M * (a + b)
            else:
                k = p[1][0, 0].numel()
                dual_cost += K * C * k
                cross_cost += C * M * k
        if dual_cost >= cross_cost or P * K * torch.finfo(self.dtype).bits // 8 > DUAL_BYTES:
            return None
        return self._rows_vjp(st["proj"].t())

    def _chunk_rows(self, M: int):
        """The subset's row slices, chunk by chunk (those of ``picked``)."""
        return (slice(s, min(s + self.batch_size, M)) for s in range(0, M, self.batch_size))

    def _rows_vjp(self, w: Tensor) -> Tensor:
        """R^T w: [k, P_c] for weights w [k, M] of the subset's chosen rows (one J^T w per chunk);
        with w = (V Lambda^-1/2)^T the basis D [K, P_c]."""
        st = self._fitted
        out = torch.zeros(w.shape[0], self._n_covered(), dtype=self.dtype, device=self.device)
        w = w.to(self.dtype)
        for rows, part in zip(self._chunk_rows(st["M"]), st["picked"]):
            vjp_(part, w[:, rows].unsqueeze(-1), out)
        return out

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f [n, C], phi [n, C, K]) of input rows x: phi = J(x) D, or K(x, rows) V Lambda^-1/2 (the
        cheaper, :meth:`_dual_directions`)."""
        st = self._need_fit()
        f, px = self._pieces(x)
        if st["dual"] is not None:
            # (D's columns per block gathered once per fit or load: st goes with D)
            return f, jvp(px, st["dual"], st.setdefault("dual_cols", {})).permute(1, 2, 0)
        Kx = torch.cat([kernel(px, pm) for pm in st["picked"]], 1)  # [n C, M]
        return f, (Kx @ st["proj"].to(Kx.dtype)).reshape(f.shape[0], st["C"], -1)

    def _precision_factor(self) -> Tensor:
        """The Cholesky factor [K, K] (float64) of A = G / (sigma^2 T) + delta I."""
        st = self._need_fit()
        h = 1.0 / (self._sigma.double().square() * self.temperature)
        A = st["G"] * h + self._delta.double() * torch.eye(st["K"], dtype=torch.float64, device=self.device)
        return torch.linalg.cholesky(A)

    def _prep(self) -> Tensor:
        return self._precision_factor()

    def _moments(self, x: Tensor, L: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
        """(f [n, C], phi A^-1 phi^T: per row [n, C, C] or joint [n C, n C]) of the rows x, L the
        Cholesky factor of A."""
        f, phi = self._features(x)
        phi = phi.to(torch.float64)
        if joint:
            v = torch.linalg.solve_triangular(L, phi.reshape(-1, phi.shape[-1]).t(), upper=False)  # [K, n C]
            return f, (v.t() @ v).to(self.dtype)
        v = torch.linalg.solve_triangular(L, phi.transpose(1, 2), upper=False)  # [n, K, C]
        return f, (v.transpose(1, 2) @ v).to(self.dtype)

    def _scored(self, nll: float) -> None:
        self.fit_history_["tuning"].append(dict(prior_precision=float(self._delta), sigma_noise=float(self._sigma),
                                                val_nll=nll))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n draws [n, P] of the weights theta* + D z, z ~ N(0, A^-1) (the feature-space posterior;
        D z = J_rows^T V Lambda^-1/2 z); for a last layer only its entries (``positions``) move.
        Inherited :meth:`predict` averages the network over them (the 'nn' predictive)."""
        st = self._need_fit()
        n = check_int(n, "n", 0)
        check_generator(generator)
        out = st["theta"].to(self.dtype).unsqueeze(0).repeat(n, 1)
        if n == 0:
            return out
        eps = torch.randn(n, st["K"], dtype=self.dtype, device=self.device, generator=generator)
        z = torch.linalg.solve_triangular(self._precision_factor().t(), eps.t().to(torch.float64), upper=True)  # [K, n]
        zt = z.t().to(self.dtype)
        out[:, self.positions] += zt @ st["dual"] if st["dual"] is not None else self._rows_vjp(zt @ st["proj"].t())
        return out

    # ---- tuning --------------------------------------------------------------------------------------------
    def log_marginal_likelihood(self, *args, **kwargs):
        """ELLA defines no marginal likelihood (laplace-torch's raises too): tune the prior on
        validation data with :meth:`optimize_prior_precision` ('gridsearch')."""
        raise NotImplementedError("ELLA has no marginal likelihood: tune the prior with "
                                  "optimize_prior_precision('gridsearch', val_loader=...) or optimize_hyperparameters")

    def optimize_prior_precision(self, method: str = "gridsearch", prior_structure: str = "scalar", *,
                                 val_loader=None, log_prior_prec_range: tuple[float, float] = (-4.0, 4.0),
                                 grid_size: int = 21, link_approx: str = "probit", pred_type: str = "gp",
                                 log_prior_prec_min: float | None = None,
                                 log_prior_prec_max: float | None = None) -> Tensor:
        """The prior precision of the lowest validation NLL of the GP predictive on ``val_loader``
        over 10**linspace(range, grid_size) ('gridsearch', the only method: ELLA has no marginal
        likelihood; laplace-torch's ``pred_type`` ('gp') and ``log_prior_prec_min`` / ``_max``
        accepted). Returns it."""
        rng = self._tuning_range(method, prior_structure, pred_type, log_prior_prec_range, log_prior_prec_min,
                                 log_prior_prec_max)
        return self._gridsearch(val_loader, rng, grid_size, link_approx)

    @property
    def dual_directions(self) -> Tensor:
        """laplace-torch's basis D = R^T V Lambda^-1/2 [P_c, K] (formed here when the features use
        cross kernels)."""
        st = self._need_fit()
        return (st["dual"] if st["dual"] is not None else self._rows_vjp(st["proj"].t())).t()

    @property
    def feature_gram(self) -> Tensor:
        """G = sum_n phi_n^T Lambda_n phi_n [K, K] before the noise and temperature (laplace-torch's)."""
        return self._need_fit()["G"].to(self.dtype)

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = self._need_fit()
        state = self._state_header()
        state.update(likelihood=self.likelihood, subset_of_weights=self.subset_of_weights,
                     last_layer=self._parts.last_layer_name if self.subset_of_weights == "last_layer" else None,
                     subsample_size=self.subsample_size, n_eigenvalues=self.n_eigenvalues, seed=self.seed,
                     temperature=self.temperature, prior_precision=self._delta.clone(), sigma_noise=self._sigma.clone(),
                     n_data=self.n_data, n_outputs=st["C"], subset=self.subset.clone(), X=st["X"].clone(),
                     f=st["f"].clone(), choices=st["choices"].clone(), proj=st["proj"].clone(), G=st["G"].clone(),
                     theta=st["theta"].clone(), fit_history=copy.deepcopy(self.fit_history_))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into this ELLA, built with the same options over the same
        model at the same weights (checked; nothing changes when a check fails)."""
        self._load_guarded(state, ("likelihood", "subset_of_weights", "subsample_size", "n_eigenvalues", "seed",
                                   "temperature"))

    def _load(self, state: dict) -> None:
        self._load_last_layer(state)
        theta = self._check_state_theta(state)
        M, K = self.subsample_size, self.n_eigenvalues
        N, C = self._check_state_count(state, "n_data", 1), self._check_state_count(state, "n_outputs", 1)
        proj = self._check_state_tensor(state, "proj", (M, K))
        G = self._check_state_tensor(state, "G", (K, K))
        choices = state.get("choices")
        if not torch.is_tensor(choices) or choices.dtype != torch.long or tuple(choices.shape) != (M,) \
                or not bool(((choices >= 0) & (choices < C)).all()):
            raise ValueError(f"state_dict['choices'] must be the subset rows' {M} output indices (int64 in [0, {C}))")
        subset = self._check_state_subset(state, M)
        history = _checked_history(state.get("fit_history"))
        delta, sigma = self._checked_hyper(state)
        X, f, pieces = self._check_state_rows(state, M, C)
        self._check_uses_on(X)
        picked = [_pick(parts, choices[rows].to(self.device)) for rows, (_, parts) in zip(self._chunk_rows(M), pieces)]
        fitted = dict(M=M, K=K, C=C, X=X, f=f, choices=choices.clone(), picked=picked,
                      proj=proj.to(self.device, torch.float64), G=G.to(self.device, torch.float64),
                      theta=theta.to(self.device).clone())
        old, self._fitted = self._fitted, fitted
        try:
            fitted["dual"] = self._dual_directions()
        except BaseException:
            self._fitted = old
            raise
        # every check passed: assign
        self._delta, self._sigma = delta, sigma
        self.n_data, self.n_outputs, self.subset = N, C, subset
        self.fit_history_ = history


# ---- helpers -------------------------------------------------------------------------------------------
def _empty_history() -> dict:
    """A fresh ``fit_history_`` (laplace-torch ELLA's keys)."""
    return {"processed_examples": [], "val_nll": [], "tuning": []}


def _checked_history(h) -> dict:
    """A copy of a state's ``fit_history`` (absent in states saved before it: an empty one),
    else ValueError: a dict of laplace-torch's three lists."""
    if h is None:
        return _empty_history()
    if not isinstance(h, dict) or set(h) != set(_empty_history()) or not all(isinstance(v, list) for v in h.values()):
        raise ValueError("state_dict['fit_history'] must be a dict of the lists 'processed_examples', 'val_nll' and "
                         "'tuning' (ELLA.fit_history_)")
    return copy.deepcopy(h)


def _pick(parts: list, choices: Tensor) -> list:
    """The parts at one output per row (row n's output ``choices[n]``): one direction, C' = 1."""
    rows = torch.arange(choices.numel(), device=choices.device)
    out = []
    for sel, p in parts:
        if p[0] == "factored":
            out.append((sel, ("factored", p[1][choices, rows].unsqueeze(0), p[2])))
        else:
            out.append((sel, (p[0], p[1][choices, rows].unsqueeze(0)) + tuple(p[2:])))
    return out


def _balanced(labels: Tensor, M: int, g: torch.Generator) -> Tensor:
    """M row indices drawn round-robin over the sorted classes, each class's rows in a random order
    (laplace-torch's balanced draw, the same generator stream)."""
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"balanced=True needs class indices [N] (an integer tensor), got {tuple(labels.shape)} "
                         f"{labels.dtype}")
    queues = []
    for cls in labels.unique(sorted=True):
        cand = torch.where(labels == cls)[0]
        queues.append(cand[torch.randperm(len(cand), generator=g)].tolist())
    out, pos = [], [0] * len(queues)
    while len(out) < M and any(p < len(q) for p, q in zip(pos, queues)):
        for k, q in enumerate(queues):
            if pos[k] < len(q) and len(out) < M:
                out.append(q[pos[k]])
                pos[k] += 1
    if len(out) != M:
        raise ValueError(f"balanced=True: only {len(out)} rows for subsample_size = {M}")
    return torch.tensor(out, dtype=torch.long)

