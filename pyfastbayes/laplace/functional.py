"""Functional (GP) Laplace: the linearised network as a Gaussian process on a subset of the data
(Khan et al. 2019; Immer et al. 2021, "Improving predictions of Bayesian neural nets via local
linearization"; laplace-torch's ``FunctionalLaplace``, ``hessian_structure='gp'``).

The GGN posterior of the linearised network f(x; theta) ~ f(x; theta*) + J(x) (theta - theta*) is
a GP over functions with kernel k(x, x') = J(x) J(x')^T / delta. With M training points chosen at
random (subset of data, the prior variance scaled by M / N as laplace-torch does: kernel variance
s = (M / N) / delta), W = Lambda / (sigma^2 T) the loss Hessians' diagonal (>= 0) and L the Cholesky
factor of B = I + W^1/2 s K_MM W^1/2 (Rasmussen & Williams' algorithm 3.2: (s K_MM + W^-1)^-1 =
W^1/2 B^-1 W^1/2 without inverting W, so a saturated softmax, W = 0, is a point without
information; laplace-torch inverts W and takes 1 / 0 as 10, its only difference from ours):

- predictive (GLM): f_var(x) = s k(x, x) - v^T v, v = L^-1 W^1/2 s K_{M x}, no [P, P] matrix anywhere;
- evidence: classification (Rasmussen & Williams 2006, eq. 3.32, Lambda's diagonal W):
  log p(y | f*) - (log|I + W^1/2 s K_MM W^1/2| + mu^T (s K_MM + eps I)^-1 mu) / 2 with mu =
  J (theta* - theta_0); regression the exact GP evidence of the linearised model,
  -(log|s K_MM + sigma^2 T I| + r^T (s K_MM + sigma^2 T I)^-1 r + M C log(2 pi / T)) / 2 with r = y -
  f* - J (theta_0 - theta*) (the tempered noise sigma^2 T, its normaliser untempered as Laplace's):
  with M = N at a MAP it equals the weight-space Laplace evidence (``Laplace(..., 'full')``). laplace-torch adds its log-likelihood term to this for regression
  too, which counts the data twice (its numbers differ from ours there; classification agrees);
- draws of the weights by pathwise conditioning (Wilson et al. 2020): theta = theta* + e - J_M^T
  W^1/2 B^-1 (W^1/2 J_M e + z) / delta_M with e ~ N(0, I / delta_M), z ~ N(0, I), delta_M = delta N / M:
  N(theta*, (delta_M I + J_M^T W J_M)^-1) without a [P, P] matrix.

No Jacobian is formed. The per-example Jacobian of a layer comes from Laplace's batched backward of
the C output directions in the factored form of its GLM predictive (an unshared Linear's is
g_{n,c} (x) a_n: output gradient times input), so a kernel entry is a sum over layers of
(g . g') (a . a'), O((M C)^2 (out + in)) per layer instead of the O((M C)^2 out in) of J J^T
(laplace-torch's); shared layers (convolutions) give their [out, in] matrix per example and
direction, other modules their gradient rows. The subset's parts are kept under JACOBIAN_BYTES and
recomputed chunk by chunk otherwise. ``independent_outputs``: one kernel per output, the C x C
kernel's diagonal only (laplace-torch's option).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration._checks import check_generator, check_int
from . import marglik as ml
from ._likelihood import check_targets, log_likelihood, summed_loss
from ._linearised import LinearisedGP
from ._kernels import gram, jvp, kernel, kernel_same, part_bytes, self_kernel, self_same, vjp_

JACOBIAN_BYTES = 512 << 20  # the subset's Jacobian parts are kept below this, recomputed above it
_EPS = 1e-5  # classification's scatter: (s K_MM + eps I)^-1 (laplace-torch's)
# the GP algebra's dtype, whatever the model's: a float32 Gram matrix is indefinite at its rounding level
# once M C passes the Jacobians' rank (a last layer: M > its inputs + 1), where the evidence needs s K +
# eps I positive definite (laplace-torch's Cholesky raises there), and a float32 s k(x, x) - v^T v loses
# the posterior variance where it is much smaller than the prior's; the float32 parts are cast per product
F64 = torch.float64
# what fit assigns (put back when it fails)
_FIT_STATE = ("_fitted", "_prior_mean", "_prior_mean_value", "n_data", "n_outputs", "subset")


class FunctionalLaplace(LinearisedGP):
    """GP (functional) Laplace on a subset of the training data (module docstring).

    Args:
        model: the trained network, outputs [N, C] (logits for 'classification'; [N] or [N, C]
            for 'regression').
        likelihood: 'classification' or 'regression'.
        n_subset: M, the training points the GP conditions on (1 <= M <= N), drawn without
            replacement with NumPy's ``default_rng(seed)`` as laplace-torch's ``SoDSampler``.
        subset_of_weights: 'all' trainable parameters, or 'last_layer' (laplace-torch's
            FunctionalLLLaplace: the last nn.Linear the forward calls, found at fit, or
            ``last_layer_name``'s; ``feature_reduction`` as Laplace's, for heads over [N, T, D]);
            the GP's kernel is the covered parameters' J J^T.
        sigma_noise, prior_precision (a scalar: the GP view has an isotropic prior), prior_mean
            (a scalar or [P_c], the covered parameters'), temperature: as
            :class:`~pyfastbayes.laplace.Laplace`.
        independent_outputs: one kernel per output (the C x C kernel's diagonal).
        seed: the subset's seed.  batch_size: rows per Jacobian chunk.
        output_fn: model output -> the tensor [N, C] (as Laplace's).

    Attributes after :meth:`fit`: ``n_data`` (N), ``subset`` (the M row indices), ``n_outputs`` (C).
    """

    kind = "FunctionalLaplace"

    def __init__(self, model: nn.Module, likelihood: str = "classification", n_subset: int = 100, *,
                 subset_of_weights: str = "all", sigma_noise: float = 1.0, prior_precision: float = 1.0,
                 prior_mean=0.0, temperature: float = 1.0, independent_outputs: bool = False, seed: int = 0,
                 batch_size: int = 64, output_fn=None, last_layer_name: str | None = None,
                 feature_reduction: str | None = None):
        super().__init__(model, likelihood, subset_of_weights=subset_of_weights, sigma_noise=sigma_noise,
                         prior_precision=prior_precision, temperature=temperature, seed=seed, batch_size=batch_size,
                         output_fn=output_fn, last_layer_name=last_layer_name, feature_reduction=feature_reduction)
        self.n_subset = check_int(n_subset, "n_subset", 1)
        if not isinstance(independent_outputs, bool):
            raise TypeError(f"independent_outputs must be True or False, got {type(independent_outputs).__name__}")
        self.independent_outputs = independent_outputs
        self._fitted = None
        self.prior_mean = prior_mean

    # ---- hyper-parameters --------------------------------------------------------------------------
    @property
    def prior_mean(self) -> Tensor:
        """theta_0 [P_c] of the covered parameters (all trainable ones, or the last layer's, in
        Laplace's selection order); assignable (a finite scalar or [P_c]; a last layer's length is
        checked once fit has found the layer): after fit the evidence's offset J_M (theta* - theta_0)
        is recomputed (one pass over the subset's parts)."""
        pm = self.__dict__.get("_prior_mean")
        return pm if pm is not None else self._prior_mean_value

    @prior_mean.setter
    def prior_mean(self, value) -> None:
        P = self._n_covered()
        pm = torch.as_tensor(value, dtype=self.dtype, device=self.device).detach()
        if pm.dim() > 1 or (pm.dim() == 1 and pm.numel() != 1 and P is not None and pm.numel() != P) \
                or not pm.numel() or not bool(torch.isfinite(pm).all()):
            covered = f" = [{P}]" if P is not None else " (the last layer's, once fit has found it)"
            raise ValueError(f"prior_mean must be a finite scalar or a [P_c]{covered} tensor of the covered "
                             f"parameters, got shape {tuple(pm.shape)}")
        self._prior_mean_value = pm.clone()
        if P is not None:
            self._prior_mean = pm.reshape(-1).expand(P).clone() if pm.numel() == 1 else pm.clone()
        if self._fitted is not None:
            self._fitted["Jd"] = self._offset()

    def _offset(self) -> Tensor:
        """J_M (theta* - theta_0) per subset row [M, C] (the scatter's mean offset)."""
        d = (self._fitted["theta"][self.positions].to(F64) - self._prior_mean.to(F64))[None]
        return torch.cat([jvp(parts, d)[0] for _, parts in self._subset_parts()])

    def _subset_parts(self):
        """Yield (rows slice, parts) over the subset in chunks of batch_size (kept or recomputed)."""
        st = self._fitted
        for k, s in enumerate(range(0, st["M"], self.batch_size)):
            rows = slice(s, min(s + self.batch_size, st["M"]))
            yield rows, (st["parts"][k] if st["parts"] is not None else self._pieces(st["X"][rows])[1])

    # ---- fit -----------------------------------------------------------------------------------------
    def fit(self, loader, progress: bool = True) -> "FunctionalLaplace":
        """Condition on M rows of ``loader`` (a DataLoader over a map-style dataset, or any iterable
        of (inputs [B, ...], targets) batches, whose rows are gathered first): their Jacobians,
        the kernel K_MM, the loss Hessians' diagonal and the evidence terms. A last layer is found
        here (the last module with trainable parameters the forward calls, an nn.Linear; or
        ``last_layer_name``'s). Returns self; a failed fit changes nothing."""
        return self._atomically(_FIT_STATE, self._fit, loader, progress)

    def _fit(self, loader, progress: bool) -> "FunctionalLaplace":
        M = self.n_subset

        def draw(N, _targets):  # (laplace-torch's SoDSampler: NumPy's default_rng(seed))
            if M > N:
                raise ValueError(f"n_subset = {M} is larger than the {N} training rows")
            return torch.tensor(np.random.default_rng(self.seed).choice(N, M, replace=False), dtype=torch.long)

        idx, X, Y, N = self._draw_rows(loader, draw)
        X = X.to(self.device)
        if self._parts.layers is None:  # a last layer: found on the first rows, then the prior mean's length checked
            with self._parts._fitting_mode():
                self._parts._find_last_layer(X[:1])
            self._fitted = None
            self.prior_mean = self._prior_mean_value
        self._check_uses_on(X)  # (tied weights, parameters read outside their module: refused)
        fs, kept, nbytes = [], [], 0
        for s in tqdm(range(0, M, self.batch_size), desc="FunctionalLaplace.fit", disable=not progress, leave=False):
            f, parts = self._pieces(X[s:s + self.batch_size])
            fs.append(f)
            if kept is not None:
                kept.append(parts)
                nbytes += part_bytes([parts])
                if nbytes > JACOBIAN_BYTES:
                    kept = None
        f = torch.cat(fs)
        C = f.shape[1]
        y = check_targets(Y, f, self.likelihood)
        loss = summed_loss(f, y, self.likelihood).double()
        self._fitted = dict(M=M, N=N, C=C, X=X, y=y, f=f, parts=kept, loss=loss,
                            theta=self.layout.flatten().detach().clone())
        self.n_data, self.n_outputs, self.subset = N, C, idx
        self._fitted["K"] = gram(self._subset_parts, M, C, F64, self.device)
        self._fitted["Jd"] = self._offset()
        self._fitted["lam"] = self._loss_hessian_diag(f.to(F64))
        return self

    def _loss_hessian_diag(self, f: Tensor) -> Tensor:
        """Lambda's diagonal [M, C]: 1 (regression), p (1 - p) (classification)."""
        if self.likelihood == "regression":
            return torch.ones_like(f)
        p = f.softmax(-1)
        return p * (1 - p)

    def _need_fit(self) -> dict:
        if self._fitted is None:
            raise RuntimeError("FunctionalLaplace: call fit(train_loader) first")
        return self._fitted

    # ---- the GP algebra ------------------------------------------------------------------------------
    def _s(self, delta: Tensor | None = None) -> Tensor:
        """The kernel variance (M / N) / delta (float64)."""
        st = self._need_fit()
        return (st["M"] / st["N"]) / (self._delta if delta is None else delta).to(F64)

    def _h_factor(self, sigma: Tensor | None = None) -> Tensor:
        sigma = (self._sigma if sigma is None else sigma).to(F64)
        return 1.0 / (sigma.square() * self.temperature)

    def _blocks(self, K: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(kernel, its row indices into the flat [M C]) per independent GP: one for the joint kernel,
        C (the c-th outputs' rows) with independent_outputs."""
        st = self._need_fit()
        M, C = st["M"], st["C"]
        if not self.independent_outputs:
            return [(K, torch.arange(M * C, device=K.device))]
        out = []
        for c in range(C):
            rows = torch.arange(M, device=K.device) * C + c
            out.append((K[rows][:, rows], rows))
        return out

    def _w_sqrt(self, sigma: Tensor | None = None) -> Tensor:
        """W^1/2 [M C]: the square roots of the loss Hessians' diagonal / (sigma^2 T)."""
        return (self._need_fit()["lam"].reshape(-1) * self._h_factor(sigma)).sqrt()

    def _chol(self, K: Tensor, rows: Tensor, delta: Tensor | None = None, sigma: Tensor | None = None) -> Tensor:
        """The Cholesky factor of B = I + W^1/2 s K W^1/2 for the kernel K of the flat ``rows``."""
        w = self._w_sqrt(sigma)[rows]
        return torch.linalg.cholesky(w[:, None] * (self._s(delta) * K) * w
                                     + torch.eye(len(rows), dtype=K.dtype, device=self.device))

    def log_likelihood(self, sigma_noise=None) -> Tensor:
        """log p(y_M | f*) of the subset's rows (as Laplace's: tempered, regression's normaliser;
        ``sigma_noise``: at that noise instead of the stored one)."""
        st = self._need_fit()
        sigma = self._sigma if sigma_noise is None else sigma_noise
        return log_likelihood(st["loss"].to(self.dtype), st["M"], st["C"], self.likelihood, sigma, self.temperature)

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> Tensor:
        """The GP Laplace evidence of the subset (module docstring), computed in float64 (returned
        in the model's dtype); differentiable in the two tensors when given (they are used, not
        stored; checked as the setters check them)."""
        st = self._need_fit()
        f64 = dict(dtype=F64, device=self.device)
        delta = self._delta if prior_precision is None else _checked(prior_precision, "prior_precision", self.dtype,
                                                                     self.device)
        sigma = self._sigma if sigma_noise is None else _checked(sigma_noise, "sigma_noise", self.dtype, self.device)
        if sigma_noise is not None and self.likelihood != "regression" and float(sigma) != 1.0:
            raise ValueError(f"sigma_noise is the regression noise; likelihood={self.likelihood!r} needs sigma_noise=1")
        s = self._s(delta)
        total = torch.zeros((), **f64)
        if self.likelihood == "regression":
            r = (st["y"].to(F64) - st["f"].to(F64) + st["Jd"]).reshape(-1)  # y - (f* + J (theta_0 - theta*))
            noise = sigma.to(F64).square() * self.temperature
            for Kb, rows in self._blocks(st["K"]):
                Lc = torch.linalg.cholesky(s * Kb + noise * torch.eye(len(rows), **f64))
                v = torch.linalg.solve_triangular(Lc, r[rows, None], upper=False)
                total = total - 0.5 * (2 * torch.log(torch.diagonal(Lc)).sum() + v.square().sum()
                                       + len(rows) * math.log(2 * math.pi / self.temperature))
            return total.to(self.dtype)
        mu = st["Jd"].reshape(-1)
        for Kb, rows in self._blocks(st["K"]):
            logdet = 2 * torch.log(torch.diagonal(self._chol(Kb, rows, delta, sigma))).sum()  # log|I + W^1/2 s K W^1/2|
            Lc = torch.linalg.cholesky(s * Kb + _EPS * torch.eye(len(rows), **f64))
            v = torch.linalg.solve_triangular(Lc, mu[rows, None], upper=False)
            total = total - 0.5 * (logdet + v.square().sum())
        return self.log_likelihood(sigma) + total.to(self.dtype)

    # ---- predictives (LinearisedGP's functional_variance / functional_covariance) -------------------
    def _prep(self) -> list[tuple[Tensor, Tensor]]:
        """(the Cholesky factor L of B, its flat rows) per GP: the joint kernel's one, or the C
        independent ones."""
        return [(self._chol(Kb, rows), rows) for Kb, rows in self._blocks(self._need_fit()["K"])]

    def _moments(self, x: Tensor, gps: list, joint: bool) -> tuple[Tensor, Tensor]:
        """(f [n, C], the posterior covariance: per row [n, C, C], or joint [n C, n C]) of the rows x:
        s K_xx - v^T v with v = L^-1 W^1/2 s K_Mx per GP of ``gps`` (:meth:`_prep`; with
        independent outputs the cross-output entries are 0)."""
        st = self._need_fit()
        C = st["C"]
        s = self._s()
        w = self._w_sqrt()
        f, px = self._pieces(x)
        n = f.shape[0]
        if not self.independent_outputs:
            # W^1/2 s K_{M x} [M C, n C] (rows: subset row m, output e; columns: input row, output c)
            Kxs = torch.cat([kernel(pm, px, F64) for _, pm in self._subset_parts()], 0) * (s * w[:, None])
            v = torch.linalg.solve_triangular(gps[0][0], Kxs, upper=False)  # [MC, nC]
            if joint:
                return f, (s * kernel(px, px, F64) - v.t() @ v).to(self.dtype)
            v = v.t().reshape(n, C, -1)
            return f, (s * self_kernel(px, F64) - torch.einsum("ncm,ndm->ncd", v, v)).to(self.dtype)
        # independent outputs: only each output's own kernel entries are formed ([C, M, n], not [M C, n C])
        Kxs = torch.cat([kernel_same(pm, px, F64) for _, pm in self._subset_parts()], 1)
        prior = kernel_same(px, px, F64) if joint else self_same(px, F64)  # [C, n, n] / [n, C]
        out = torch.zeros((n * C, n * C) if joint else (n, C, C), dtype=F64, device=self.device)
        for c, (Lc, rows) in enumerate(gps):
            v = torch.linalg.solve_triangular(Lc, Kxs[c] * (s * w[rows])[:, None], upper=False)  # [M, n]
            if joint:
                rc = torch.arange(n, device=self.device) * C + c
                out[rc[:, None], rc] = s * prior[c] - v.t() @ v
            else:
                out[:, c, c] = s * prior[:, c] - v.square().sum(0)
        return f, out.to(self.dtype)

    # ---- weight draws ---------------------------------------------------------------------------------
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n draws [n, P] from N(theta*, (delta_M I + J_M^T W J_M)^-1), delta_M = delta N / M, by
        pathwise conditioning (module docstring): the weight-space posterior whose linearised
        network is this GP (with the joint kernel also under independent_outputs); for a last
        layer only its entries (``positions``) move, the others stay at the MAP. Inherited
        :meth:`predict` averages the network over them (the 'nn' predictive)."""
        st = self._need_fit()
        n = check_int(n, "n", 0)
        check_generator(generator)
        theta = st["theta"].to(self.dtype)
        pos = self.positions
        P, C = pos.numel(), st["C"]
        out = theta.unsqueeze(0).repeat(n, 1)
        if n == 0:
            return out
        delta_m = self._delta.to(F64) * st["N"] / st["M"]
        e = torch.randn(n, P, dtype=self.dtype, device=self.device, generator=generator).to(F64) / delta_m.sqrt()
        z = torch.randn(n, st["M"] * C, dtype=self.dtype, device=self.device, generator=generator).to(F64)
        Je = torch.cat([jvp(parts, e).reshape(n, -1) for _, parts in self._subset_parts()], 1)
        w = self._w_sqrt()
        rhs = (w * Je + z).t()  # [M C, n]: W^1/2 (J_M e + d) with d ~ N(0, W^-1)
        # the joint kernel always (independent_outputs approximates the GP in function space only;
        # a weight-space Gaussian needs the whole J_M J_M^T)
        Lj = self._chol(st["K"], torch.arange(st["M"] * C, device=self.device))
        sol = w[:, None] * torch.cholesky_solve(rhs, Lj)
        # J_M^T out / delta_M, chunk by chunk
        corr = torch.zeros(n, P, dtype=F64, device=self.device)
        for rows, parts in self._subset_parts():
            vjp_(parts, sol[rows.start * C:rows.stop * C].t().reshape(n, -1, C), corr)
        out[:, pos] += (e - corr / delta_m).to(self.dtype)
        return out

    # ---- tuning ----------------------------------------------------------------------------------------
    _METHODS = ("marglik", "gridsearch")

    def optimize_prior_precision(self, method: str = "marglik", prior_structure: str = "scalar", *,
                                 n_steps: int = 100, lr: float = 0.1, init_prior_prec: float | None = None,
                                 val_loader=None, log_prior_prec_range: tuple[float, float] = (-4.0, 4.0),
                                 grid_size: int = 21, link_approx: str = "probit", pred_type: str = "gp",
                                 progress: bool = False, log_prior_prec_min: float | None = None,
                                 log_prior_prec_max: float | None = None) -> Tensor:
        """Tune the scalar prior precision: 'marglik' (Adam on log delta over
        :meth:`log_marginal_likelihood`) or 'gridsearch' (the lowest validation NLL of the GP
        predictive on ``val_loader`` over 10**linspace(range, grid_size); laplace-torch's
        ``pred_type`` ('gp') and ``log_prior_prec_min`` / ``_max`` accepted). Returns it."""
        rng = self._tuning_range(method, prior_structure, pred_type, log_prior_prec_range, log_prior_prec_min,
                                 log_prior_prec_max)
        self._need_fit()
        if method == "gridsearch":
            return self._gridsearch(val_loader, rng, grid_size, link_approx)
        start = self._delta if init_prior_prec is None else torch.as_tensor(init_prior_prec, dtype=self.dtype)
        log_delta = torch.log(start.to(self.device).reshape(())).detach().clone()
        ml.adam(lambda: -self.log_marginal_likelihood(log_delta.exp()), [log_delta], n_steps, lr, progress,
                "FunctionalLaplace marglik")
        self.prior_precision = log_delta.detach().exp()
        return self.prior_precision

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = self._need_fit()
        state = self._state_header()
        state.update(likelihood=self.likelihood, subset_of_weights=self.subset_of_weights,
                     last_layer=self._parts.last_layer_name if self.subset_of_weights == "last_layer" else None,
                     n_subset=self.n_subset, seed=self.seed,
                     independent_outputs=self.independent_outputs, temperature=self.temperature,
                     prior_precision=self._delta.clone(), prior_mean=self.prior_mean.clone(),
                     sigma_noise=self._sigma.clone(), n_data=st["N"], n_outputs=st["C"], subset=self.subset.clone(),
                     X=st["X"].clone(), y=st["y"].clone(), f=st["f"].clone(), K=st["K"].clone(), Jd=st["Jd"].clone(),
                     lam=st["lam"].clone(), loss=st["loss"].clone(), theta=st["theta"].clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into this FunctionalLaplace, built with the same options
        over the same model at the same weights (checked; nothing changes when a check fails)."""
        self._load_guarded(state, ("likelihood", "subset_of_weights", "n_subset", "seed", "independent_outputs",
                                   "temperature"), dict(subset_of_weights="all"))

    def _load(self, state: dict) -> None:
        self._load_last_layer(state)
        theta = self._check_state_theta(state)
        N, C, M = (self._check_state_count(state, k, 1) for k in ("n_data", "n_outputs", "n_subset"))
        K = self._check_state_tensor(state, "K", (M * C, M * C))
        prior_mean = self._check_state_tensor(state, "prior_mean", (self._n_covered(),))
        for key, shape in (("f", (M, C)), ("Jd", (M, C)), ("lam", (M, C))):
            self._check_state_tensor(state, key, shape)
        loss = self._check_state_tensor(state, "loss", ())
        subset = self._check_state_subset(state, M)
        delta, sigma = self._checked_hyper(state)
        X, f, pieces = self._check_state_rows(state, M, C)
        y = state.get("y")
        if not torch.is_tensor(y) or y.dim() == 0 or y.shape[0] != M:
            raise ValueError(f"state_dict['y'] must be the subset's {M} targets")
        try:
            y = check_targets(y, f, self.likelihood)
        except (ValueError, TypeError) as e:
            raise ValueError(f"state_dict['y'] are not the subset's targets: {e}") from None
        self._check_uses_on(X)
        # every check passed: assign
        self._delta, self._sigma = delta, sigma
        self._prior_mean = prior_mean.to(self.device, self.dtype).clone()
        self._prior_mean_value = self._prior_mean.clone()
        kept = [p[1] for p in pieces]
        self._fitted = dict(M=M, N=N, C=C, X=X, y=y.to(self.device), f=f, loss=loss.detach().clone(),
                            parts=kept if part_bytes(kept) <= JACOBIAN_BYTES else None,
                            theta=theta.to(self.device).clone(), K=K.to(self.device, F64),
                            Jd=state["Jd"].to(self.device, F64), lam=state["lam"].to(self.device, F64))
        self.n_data, self.n_outputs, self.subset = N, C, subset



def _checked(value, name: str, dtype, device) -> Tensor:
    """A scalar hyper-parameter passed to the evidence: finite and > 0 (ValueError), kept
    differentiable."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    t = t.reshape(())
    v = float(t.detach())
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return t
