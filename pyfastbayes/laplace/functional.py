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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._warnings import warn_user
from ..calibration._checks import check_generator, check_int, check_positive_float
from ..nn.loaders import batches as loader_batches
from ..nn import ModeGuard
from ..posteriors.base import Posterior
from . import marglik as ml
from ._likelihood import check_targets, log_likelihood, outputs_2d, summed_loss
from .laplace import Laplace, _class_nll, _gaussian_nll
from .predictive import draws, probabilities

JACOBIAN_BYTES = 512 << 20  # the subset's Jacobian parts are kept below this, recomputed above it
_EPS = 1e-5  # classification's scatter: (s K_MM + eps I)^-1 (laplace-torch's)
LIKELIHOODS = ("classification", "regression")
SUBSETS = ("all", "last_layer")
# what fit assigns (put back when it fails)
_FIT_STATE = ("_fitted", "_prior_mean", "_prior_mean_value", "n_data", "n_outputs", "subset")


class FunctionalLaplace(Posterior):
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
        super().__init__(model)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS} for the functional (GP) Laplace, got "
                             f"{likelihood!r}")
        if subset_of_weights not in SUBSETS:
            raise ValueError(f"subset_of_weights must be one of {SUBSETS} for the functional (GP) Laplace, got "
                             f"{subset_of_weights!r}")
        self.likelihood = likelihood
        self.subset_of_weights = subset_of_weights
        self.n_subset = check_int(n_subset, "n_subset", 1)
        self.temperature = check_positive_float(temperature, "temperature")
        if not isinstance(independent_outputs, bool):
            raise TypeError(f"independent_outputs must be True or False, got {type(independent_outputs).__name__}")
        self.independent_outputs = independent_outputs
        self.seed = check_int(seed, "seed", 0)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (model output -> tensor), got {type(output_fn).__name__}")
        self.output_fn = output_fn
        self.dtype, self.device = self.layout.dtype, self.layout.device
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"FunctionalLaplace needs a float32 or float64 model, got {self.dtype}")
        # the per-example Jacobian parts of the covered parameters (Laplace's GLM machinery; a module
        # without a Kronecker rule gives its per-example gradient rows); a last layer is found (or
        # checked, when named) as Laplace's: at fit
        self._parts = Laplace(model, likelihood, subset_of_weights, "diag", unsupported="diag", output_fn=output_fn,
                              last_layer_name=last_layer_name, feature_reduction=feature_reduction)
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self._fitted = None
        self.prior_mean = prior_mean

    # ---- hyper-parameters --------------------------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """delta, a scalar tensor (the GP kernel's variance is (M / N) / delta); assignable."""
        return self._delta

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device).detach()
        if t.numel() != 1:
            raise ValueError(f"FunctionalLaplace takes a scalar prior_precision (the GP view's isotropic prior), got "
                             f"shape {tuple(t.shape)}")
        if not math.isfinite(float(t)) or float(t) <= 0:
            raise ValueError(f"prior_precision must be a finite number > 0, got {float(t)}")
        self._delta = t.reshape(()).clone()

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

    def _offset(self) -> Tensor:
        """J_M (theta* - theta_0) per subset row [M, C] (the scatter's mean offset)."""
        d = (self._fitted["theta"].to(self.dtype)[self.positions] - self._prior_mean)[None]
        return torch.cat([_jvp(parts, d)[0] for _, parts in self._subset_parts()])

    @property
    def sigma_noise(self) -> Tensor:
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
        saved = (self._parts._setup_state(), {k: self.__dict__[k] for k in _FIT_STATE if k in self.__dict__})
        try:
            return self._fit(loader, progress)
        except BaseException:
            self._parts._restore_setup(saved[0])
            for k in _FIT_STATE:
                if k in saved[1]:
                    self.__dict__[k] = saved[1][k]
                else:
                    self.__dict__.pop(k, None)
            raise

    def _fit(self, loader, progress: bool) -> "FunctionalLaplace":
        X, Y = self._rows(loader)
        N = X.shape[0]
        M = self.n_subset
        if M > N:
            raise ValueError(f"n_subset = {M} is larger than the {N} training rows")
        if self._parts.layers is None:  # a last layer: found on the first rows, then the prior mean's length checked
            with self._parts._fitting_mode():
                self._parts._find_last_layer(X[:1].to(self.device))
            self._fitted = None
            self.prior_mean = self._prior_mean_value
        idx = torch.tensor(np.random.default_rng(self.seed).choice(N, M, replace=False), dtype=torch.long)
        X, Y = X[idx].to(self.device), Y[idx]
        fs, kept, nbytes = [], [], 0
        for s in tqdm(range(0, M, self.batch_size), desc="FunctionalLaplace.fit", disable=not progress, leave=False):
            f, parts = self._pieces(X[s:s + self.batch_size])
            fs.append(f)
            if kept is not None:
                kept.append(parts)
                nbytes += _nbytes([parts])
                if nbytes > JACOBIAN_BYTES:
                    kept = None
        f = torch.cat(fs)
        C = f.shape[1]
        y = check_targets(Y, f, self.likelihood)
        loss = summed_loss(f, y, self.likelihood).double()
        self._fitted = dict(M=M, N=N, C=C, X=X, y=y, f=f, parts=kept, loss=loss,
                            theta=self.layout.flatten().detach().clone())
        self.n_data, self.n_outputs, self.subset = N, C, idx
        K = self._gram(self.dtype)
        self._fitted["K"] = K
        self._fitted["Jd"] = self._offset()
        self._fitted["lam"] = self._loss_hessian_diag(f)
        return self

    def _gram(self, dtype: torch.dtype) -> Tensor:
        """The kernel K_MM = J_M J_M^T [M C, M C] (rows m * C + c) in ``dtype``, each pair of the
        subset's chunks once, mirrored."""
        st = self._fitted
        M, C = st["M"], st["C"]
        K = torch.zeros(M * C, M * C, dtype=dtype, device=self.device)
        for ri, pi in self._subset_parts():  # (recomputed: the inner chunks anew for every outer one)
            for rj, pj in self._subset_parts():
                if rj.start < ri.start:
                    continue
                blk = _kernel(pi, pj, dtype)
                K[ri.start * C:ri.stop * C, rj.start * C:rj.stop * C] = blk
                K[rj.start * C:rj.stop * C, ri.start * C:ri.stop * C] = blk.t()
        return K

    def _evidence_kernel(self) -> Tensor:
        """K_MM in float64 for the evidence (formed once, on its first use): a float32 Gram matrix is
        indefinite at its rounding level once M C passes the Jacobians' rank (a last layer: M > its
        inputs + 1), where the evidence needs s K + eps I positive definite (laplace-torch's
        Cholesky raises there); the float64 Gram matrix of the same parts is positive
        semi-definite to float64 rounding."""
        st = self._need_fit()
        if st["K"].dtype == torch.float64:
            return st["K"]
        if "K64" not in st:
            st["K64"] = self._gram(torch.float64)
        return st["K64"]

    def _rows(self, loader) -> tuple[Tensor, Tensor]:
        """All (inputs, targets) rows of the loader, joined (tensor inputs only). A DataLoader over a
        map-style dataset is walked in the dataset's order (shuffle or not), so the subset's indices
        are dataset indices, as laplace-torch's sampler draws them."""
        if isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and hasattr(loader.dataset, "__getitem__"):
            loader = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                                collate_fn=loader.collate_fn)
        xs, ys = [], []
        for i, item in enumerate(loader_batches(loader)):
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not torch.is_tensor(item[0]) \
                    or not torch.is_tensor(item[1]):
                raise TypeError(f"FunctionalLaplace: batch {i} must be (inputs tensor [B, ...], targets tensor [B, ...]), "
                                f"got {type(item).__name__}")
            if item[0].dim() == 0 or item[1].dim() == 0 or item[0].shape[0] != item[1].shape[0]:
                raise ValueError(f"FunctionalLaplace: batch {i} has {tuple(item[1].shape)} targets for inputs "
                                 f"{tuple(item[0].shape)}: one target per input row")
            xs.append(item[0]), ys.append(item[1])
        if not xs:
            raise ValueError("FunctionalLaplace: the loader yielded no batches")
        return torch.cat(xs), torch.cat(ys)

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
        st = self._need_fit()
        return (st["M"] / st["N"]) / (self._delta if delta is None else delta)

    def _h_factor(self, sigma: Tensor | None = None) -> Tensor:
        sigma = self._sigma if sigma is None else sigma
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

    def _chol(self, K: Tensor, rows: Tensor) -> Tensor:
        """The Cholesky factor of B = I + W^1/2 s K W^1/2 for the kernel K of the flat ``rows`` (in
        K's dtype)."""
        w = self._w_sqrt()[rows].to(K.dtype)
        return torch.linalg.cholesky(w[:, None] * (self._s().to(K.dtype) * K) * w
                                     + torch.eye(len(rows), dtype=K.dtype, device=self.device))


    def log_likelihood(self) -> Tensor:
        """log p(y_M | f*) of the subset's rows (as Laplace's: tempered, regression's normaliser)."""
        st = self._need_fit()
        return log_likelihood(st["loss"].to(self.dtype), st["M"], st["C"], self.likelihood, self._sigma,
                              self.temperature)

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> Tensor:
        """The GP Laplace evidence of the subset (module docstring), computed in float64 (returned
        in the model's dtype); differentiable in the two tensors when given (they are used, not
        stored)."""
        st = self._need_fit()
        f64 = dict(dtype=torch.float64, device=self.device)
        delta = self._delta if prior_precision is None else torch.as_tensor(prior_precision, dtype=self.dtype,
                                                                            device=self.device).reshape(())
        sigma = self._sigma if sigma_noise is None else torch.as_tensor(sigma_noise, dtype=self.dtype,
                                                                        device=self.device).reshape(())
        s = self._s(delta.to(torch.float64))
        K = self._evidence_kernel()
        total = torch.zeros((), **f64)
        if self.likelihood == "regression":
            r = (st["y"].to(torch.float64) - st["f"] + st["Jd"]).reshape(-1)  # y - (f* + J (theta_0 - theta*))
            noise = sigma.to(torch.float64).square() * self.temperature
            for Kb, rows in self._blocks(K):
                Lc = torch.linalg.cholesky(s * Kb + noise * torch.eye(len(rows), **f64))
                v = torch.linalg.solve_triangular(Lc, r[rows, None], upper=False)
                total = total - 0.5 * (2 * torch.log(torch.diagonal(Lc)).sum() + v.square().sum()
                                       + len(rows) * math.log(2 * math.pi / self.temperature))
            return total.to(self.dtype)
        W = self._w_sqrt(sigma).to(torch.float64)
        mu = st["Jd"].reshape(-1).to(torch.float64)
        for Kb, rows in self._blocks(K):
            w = W[rows]
            I = torch.eye(len(rows), **f64)
            logdet = torch.logdet(w[:, None] * (s * Kb) * w + I)
            Lc = torch.linalg.cholesky(s * Kb + _EPS * I)
            v = torch.linalg.solve_triangular(Lc, mu[rows, None], upper=False)
            total = total - 0.5 * (logdet + v.square().sum())
        return self.log_likelihood() + total.to(self.dtype)

    # ---- predictives ---------------------------------------------------------------------------------
    def functional_variance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f_mu [n, C], f_var [n, C, C]) of the GP posterior at input rows x [n, ...]."""
        gps = self._gps()
        mus, vars_ = [], []
        for r0 in range(0, x.shape[0], self.batch_size):
            f, var = self._gp_moments(x[r0:r0 + self.batch_size], gps, joint=False)
            mus.append(f), vars_.append(var)
        return torch.cat(mus), torch.cat(vars_)

    def functional_covariance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f_mu [n C], f_cov [n C, n C]): the GP posterior's joint covariance over all the input
        rows x [n, ...] and outputs (flat index i * C + c; laplace-torch's ``joint=True``)."""
        f, cov = self._gp_moments(x, self._gps(), joint=True)
        return f.reshape(-1), cov

    def _gps(self) -> list[tuple[Tensor, Tensor]]:
        """(the Cholesky factor L of B, its flat rows) per GP: the joint kernel's one, or the C
        independent ones."""
        return [(self._chol(Kb, rows), rows) for Kb, rows in self._blocks(self._need_fit()["K"])]

    def _gp_moments(self, x: Tensor, gps: list, joint: bool) -> tuple[Tensor, Tensor]:
        """(f [n, C], the posterior covariance: per row [n, C, C], or joint [n C, n C]) of the rows x:
        s K_xx - v^T v with v = L^-1 W^1/2 s K_Mx per GP of ``gps`` (:meth:`_gps`; with
        independent outputs the cross-output entries are 0)."""
        st = self._need_fit()
        C = st["C"]
        s = self._s()
        w = self._w_sqrt()
        f, px = self._pieces(x)
        n = f.shape[0]
        if not self.independent_outputs:
            # W^1/2 s K_{M x} [M C, n C] (rows: subset row m, output e; columns: input row, output c)
            Kxs = torch.cat([_kernel(pm, px) for _, pm in self._subset_parts()], 0) * (s * w[:, None])
            v = torch.linalg.solve_triangular(gps[0][0], Kxs, upper=False)  # [MC, nC]
            if joint:
                return f, s * _kernel(px, px) - v.t() @ v
            v = v.t().reshape(n, C, -1)
            return f, s * _self_kernel(px) - torch.einsum("ncm,ndm->ncd", v, v)
        # independent outputs: only each output's own kernel entries are formed ([C, M, n], not [M C, n C])
        Kxs = torch.cat([_kernel_same(pm, px) for _, pm in self._subset_parts()], 1)
        prior = _kernel_same(px, px) if joint else _self_same(px)  # [C, n, n] / [n, C]
        out = f.new_zeros((n * C, n * C) if joint else (n, C, C))
        for c, (Lc, rows) in enumerate(gps):
            v = torch.linalg.solve_triangular(Lc, Kxs[c] * (s * w[rows])[:, None], upper=False)  # [M, n]
            if joint:
                rc = torch.arange(n, device=self.device) * C + c
                out[rc[:, None], rc] = s * prior[c] - v.t() @ v
            else:
                out[:, c, c] = s * prior[:, c] - v.square().sum(0)
        return f, out

    def la(self, x: Tensor, pred_type: str = "gp", link_approx: str = "probit", n_samples: int = 100, *,
           generator: torch.Generator | None = None, joint: bool = False, diagonal_output: bool = False):
        """laplace-torch's ``__call__`` (pred_type 'gp'; 'glm' is accepted as the same linearised
        predictive; the network averaged over weight draws is :meth:`predict`): classification
        probabilities [n, C] (``link_approx`` 'probit', 'bridge', 'bridge_norm' or 'mc' with
        ``n_samples`` draws), regression (f_mu [n, C], f_var [n, C, C]) (sigma^2 not in it;
        ``diagonal_output``: f_var [n, C]; ``joint``: (f_mu [n C], f_cov [n C, n C]) over all the
        rows, :meth:`functional_covariance`). x: input rows [n, ...]."""
        _gp_pred_type(pred_type, nn_too=False)
        n_samples = check_int(n_samples, "n_samples", 1)
        check_generator(generator)
        for name, flag in (("joint", joint), ("diagonal_output", diagonal_output)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
        if joint:
            if self.likelihood != "regression":
                raise ValueError("joint=True is the regression predictive's joint covariance over all inputs")
            return self.functional_covariance(x)
        f_mu, f_var = self.functional_variance(x)
        if self.likelihood == "regression":
            return (f_mu, torch.diagonal(f_var, dim1=1, dim2=2)) if diagonal_output else (f_mu, f_var)
        if diagonal_output and link_approx == "mc":
            f_var = torch.diag_embed(torch.diagonal(f_var, dim1=1, dim2=2))
        return probabilities(f_mu, f_var, "classification", link_approx, n_samples, generator)

    __call__ = la

    def functional_samples(self, x: Tensor, pred_type: str = "gp", n_samples: int = 100, *,
                           generator: torch.Generator | None = None, diagonal_output: bool = False) -> Tensor:
        """Draws [n_samples, n, C] of the outputs at input rows x [n, ...] (laplace-torch's
        ``functional_samples``, e.g. for Thompson sampling): 'gp' (or 'glm') from the GP predictive
        N(f_mu, f_var) per row (``diagonal_output``: the outputs' variances only); 'nn' the network
        at :meth:`sample`'s weight draws (torch.func.functional_call, eval mode)."""
        pred_type = _gp_pred_type(pred_type, nn_too=True)
        n_samples = check_int(n_samples, "n_samples", 1)
        check_generator(generator)
        if not isinstance(diagonal_output, bool):
            raise TypeError(f"diagonal_output must be True or False, got {type(diagonal_output).__name__}")
        if pred_type == "nn":
            if diagonal_output:
                raise ValueError("diagonal_output is for the GP's draws (pred_type='gp'), not the network's")
            return self._network_at_draws(x, n_samples, generator)
        f_mu, f_var = self.functional_variance(x)
        if diagonal_output:
            f_var = torch.diag_embed(torch.diagonal(f_var, dim1=1, dim2=2))
        return draws(f_mu, f_var, n_samples, generator)

    def predictive_samples(self, x: Tensor, pred_type: str = "gp", n_samples: int = 100, *,
                           generator: torch.Generator | None = None, diagonal_output: bool = False) -> Tensor:
        """:meth:`functional_samples` (same arguments, same draws) through the link: class
        probabilities [n_samples, n, C] (softmax) for classification, the outputs themselves for
        regression (no noise added)."""
        f = self.functional_samples(x, pred_type, n_samples, generator=generator, diagonal_output=diagonal_output)
        return f.softmax(-1) if self.likelihood == "classification" else f

    def _network_at_draws(self, x: Tensor, n: int, generator) -> Tensor:
        """The outputs [n, rows, C] of the network at n weight draws (:meth:`sample`)."""
        thetas = self.sample(n, generator=generator)
        x = x.to(self.device)
        outs = []
        with ModeGuard(self.model, False), torch.no_grad():
            for theta in thetas:
                params = self.layout.unflatten(theta.to(self.layout.dtype))
                outs.append(torch.cat([self._parts._call_at(params, x[r:r + self.batch_size])
                                       for r in range(0, x.shape[0], self.batch_size)]))
        return torch.stack(outs)

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
        delta_m = self._delta * st["N"] / st["M"]
        e = torch.randn(n, P, dtype=self.dtype, device=self.device, generator=generator) / delta_m.sqrt()
        z = torch.randn(n, st["M"] * C, dtype=self.dtype, device=self.device, generator=generator)
        Je = torch.cat([_jvp(parts, e).reshape(n, -1) for _, parts in self._subset_parts()], 1)
        w = self._w_sqrt()
        rhs = (w * Je + z).t()  # [M C, n]: W^1/2 (J_M e + d) with d ~ N(0, W^-1)
        # the joint kernel always (independent_outputs approximates the GP in function space only;
        # a weight-space Gaussian needs the whole J_M J_M^T)
        Lj = self._chol(st["K"], torch.arange(st["M"] * C, device=self.device))
        sol = w[:, None] * torch.cholesky_solve(rhs, Lj)
        # J_M^T out / delta_M, chunk by chunk
        corr = torch.zeros(n, P, dtype=self.dtype, device=self.device)
        for rows, parts in self._subset_parts():
            _vjp_(parts, sol[rows.start * C:rows.stop * C].t().reshape(n, -1, C), corr)
        out[:, pos] += e - corr / delta_m
        return out

    def predict(self, x, n_samples: int = 30, *, likelihood: str | None = None, **options):
        """The network averaged over :meth:`sample`'s weight draws (the posterior interface's BMA
        loop; ``options`` as :meth:`pyfastbayes.posteriors.Posterior.predict`'s): probabilities
        [N, C] or, for regression, (mean, variance) [N, C] of the outputs; the GP predictive
        itself is :meth:`la` / :meth:`functional_variance`."""
        if options.get("output_fn") is None:
            options["output_fn"] = self.output_fn
        return Posterior.predict(self, x, n_samples, likelihood=likelihood or self.likelihood, **options)

    # ---- tuning ----------------------------------------------------------------------------------------
    def optimize_prior_precision(self, method: str = "marglik", *, n_steps: int = 100, lr: float = 0.1,
                                 init_prior_prec: float | None = None, val_loader=None,
                                 log_prior_prec_range: tuple[float, float] = (-4.0, 4.0), grid_size: int = 21,
                                 link_approx: str = "probit", progress: bool = False) -> Tensor:
        """Tune the scalar prior precision: 'marglik' (Adam on log delta over
        :meth:`log_marginal_likelihood`) or 'gridsearch' (the lowest validation NLL of the GP
        predictive on ``val_loader`` over 10**linspace(range, grid_size)). Returns it."""
        if method not in ml.TUNING:
            raise ValueError(f"method must be one of {ml.TUNING}, got {method!r}")
        self._need_fit()
        if method == "marglik":
            start = self._delta if init_prior_prec is None else torch.as_tensor(init_prior_prec, dtype=self.dtype)
            log_delta = torch.log(start.to(self.device).reshape(())).detach().clone()
            ml.adam(lambda: -self.log_marginal_likelihood(log_delta.exp()), [log_delta], n_steps, lr, progress,
                    "FunctionalLaplace marglik")
            self.prior_precision = log_delta.detach().exp()
            return self.prior_precision
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader (batches of (inputs, targets))")
        Xv, Yv = self._rows(val_loader)
        grid = torch.logspace(float(log_prior_prec_range[0]), float(log_prior_prec_range[1]),
                              check_int(grid_size, "grid_size", 1), dtype=torch.float64)
        best, best_nll = None, math.inf
        old = self._delta
        for delta in grid:
            self.prior_precision = float(delta)
            nll = self._val_nll(Xv, Yv, link_approx)
            if nll < best_nll:
                best, best_nll = float(delta), nll
        self.prior_precision = best if best is not None else old
        if best is None:
            warn_user("FunctionalLaplace gridsearch: every prior gave a non-finite validation NLL; prior kept")
        return self.prior_precision

    def _val_nll(self, X: Tensor, Y: Tensor, link_approx: str) -> float:
        f_mu, f_var = self.functional_variance(X)
        y = check_targets(Y, f_mu, self.likelihood)
        if self.likelihood == "regression":
            nll = _gaussian_nll(f_mu, torch.diagonal(f_var, dim1=1, dim2=2) + self._sigma.square(), y)
        else:
            nll = _class_nll(probabilities(f_mu, f_var, "classification", link_approx, 100, None), y, self.likelihood)
        return nll if math.isfinite(nll) else math.inf

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
        self._check_header(state)
        for key in ("likelihood", "subset_of_weights", "n_subset", "seed", "independent_outputs", "temperature"):
            if state.get(key, "all" if key == "subset_of_weights" else None) != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={state.get(key)!r}, this FunctionalLaplace has "
                                 f"{getattr(self, key)!r}")
        saved = self._parts._setup_state()
        try:
            self._load(state)
        except BaseException:
            self._parts._restore_setup(saved)
            raise

    def _load(self, state: dict) -> None:
        if self.subset_of_weights == "last_layer":
            name = state.get("last_layer")
            named = self._parts._named
            if named and name != self._parts.last_layer_name:
                raise ValueError(f"state_dict was saved for the last layer {name!r}, this FunctionalLaplace has "
                                 f"last_layer_name={self._parts.last_layer_name!r}")
            mod = self._parts._named_last_layer(name, "state_dict['last_layer']", not_str=ValueError)
            self._parts._setup_last_layer(name, mod)
        theta = self._check_state_tensor(state, "theta", (self.numel,))
        if not torch.equal(theta.to(self.device, self.dtype), self.layout.flatten().detach()):
            raise ValueError("state_dict was saved at other weights than the model's current ones: load the model's "
                             "own state_dict (the MAP the posterior was fitted at) first")
        N, C, M = (self._check_state_count(state, k, 1) for k in ("n_data", "n_outputs", "n_subset"))
        K = self._check_state_tensor(state, "K", (M * C, M * C))
        prior_mean = self._check_state_tensor(state, "prior_mean", (self._n_covered(),))
        for key, shape in (("f", (M, C)), ("Jd", (M, C)), ("lam", (M, C))):
            self._check_state_tensor(state, key, shape)
        X = state["X"]
        if not torch.is_tensor(X) or X.shape[:1] != (M,):
            raise ValueError(f"state_dict['X'] must be the subset's {M} input rows")
        old = (self._delta, self._sigma)
        try:  # (checked on self's setters, then put back: nothing changes before every check has passed)
            self.prior_precision, self.sigma_noise = state["prior_precision"], float(state["sigma_noise"])
            new = (self._delta, self._sigma)
        finally:
            self._delta, self._sigma = old
        X = X.to(self.device)
        pieces = [self._pieces(X[s:s + self.batch_size]) for s in range(0, M, self.batch_size)]
        f = torch.cat([p[0] for p in pieces])
        saved_f = state["f"].to(self.device, self.dtype)
        if not torch.allclose(f, saved_f, rtol=1e-5, atol=1e-6 * float(saved_f.abs().max().clamp_min(1))):
            raise ValueError("state_dict was fitted with another model than this one (its outputs on the subset "
                             "differ: frozen parameters or buffers, e.g. BatchNorm statistics): load the model's own "
                             "state_dict first")
        self._delta, self._sigma = new
        self._prior_mean = prior_mean.to(self.device, self.dtype).clone()
        self._prior_mean_value = self._prior_mean.clone()
        kept = [p[1] for p in pieces]
        self._fitted = dict(M=M, N=N, C=C, X=X, y=state["y"].to(self.device), f=saved_f,
                            parts=kept if _nbytes(kept) <= JACOBIAN_BYTES else None, loss=state["loss"],
                            theta=theta.to(self.device).clone(), K=K.to(self.device, self.dtype),
                            Jd=state["Jd"].to(self.device, self.dtype), lam=state["lam"].to(self.device, self.dtype))
        self.n_data, self.n_outputs, self.subset = N, C, state["subset"].clone()


# ---- kernel algebra on the Jacobian parts (a block's Jacobian of example n, output c: U[c, n] (x) V[n],
# M[c, n] or R[c, n]) -----------------------------------------------------------------------------------
def _gp_pred_type(pred_type, nn_too: bool) -> str:
    """pred_type checked: 'gp' or 'glm' (the same GP predictive), and 'nn' where ``nn_too``."""
    allowed = ("gp", "glm", "nn") if nn_too else ("gp", "glm")
    if pred_type not in allowed:
        hint = "" if nn_too else " (the network averaged over weight draws: predict(x))"
        raise ValueError(f"pred_type must be one of {allowed} for the functional (GP) Laplace, got {pred_type!r}{hint}")
    return pred_type


def _nbytes(chunks: list) -> int:
    """The bytes of the Jacobian parts of chunks (each a list of (sel, part))."""
    return sum(t.numel() * t.element_size() for parts in chunks for _, part in parts for t in part[1:])


def _dense(part) -> Tensor:
    """A part's Jacobian rows [C, n, k] (k = the block's entries in its flat order)."""
    if part[0] == "factored":
        U, V = part[1], part[2]
        return (U[..., :, None] * V[None, :, None, :]).reshape(U.shape[0], U.shape[1], -1)
    return part[1].reshape(part[1].shape[0], part[1].shape[1], -1)


def _cross(a, b, dtype=None) -> Tensor:
    """<J_a[c, n], J_b[d, m]> [n, C, m, C] of one block's parts at two sets of rows (computed in
    ``dtype``, default the parts')."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    if a[0] == b[0] == "factored":
        return torch.einsum("cnp,dmp->ncmd", cast(a[1]), cast(b[1])) * (cast(a[2]) @ cast(b[2]).t())[:, None, :, None]
    return torch.einsum("cnk,dmk->ncmd", cast(_dense(a)), cast(_dense(b)))


def _kernel(pa: list, pb: list, dtype=None) -> Tensor:
    """J_a J_b^T [n C, m C] (rows n * C + c) summed over the blocks (in ``dtype``, default the parts')."""
    out = sum(_cross(a, b, dtype) for (_, a), (_, b) in zip(pa, pb))
    return out.reshape(out.shape[0] * out.shape[1], -1)


def _kernel_same(pa: list, pb: list) -> Tensor:
    """<J_a[c, n], J_b[c, m]> [C, n, m] summed over the blocks: each output's own kernel (the
    independent outputs' GPs), without the cross-output entries."""
    def one(a, b):
        if a[0] == b[0] == "factored":
            return torch.einsum("cnp,cmp->cnm", a[1], b[1]) * (a[2] @ b[2].t())
        return torch.einsum("cnk,cmk->cnm", _dense(a), _dense(b))
    return sum(one(a, b) for (_, a), (_, b) in zip(pa, pb))


def _self_same(parts: list) -> Tensor:
    """Each row's own kernel per output |J_c(x_n)|^2 [n, C]."""
    def one(p):
        if p[0] == "factored":
            return torch.einsum("cnp,cnp->nc", p[1], p[1]) * p[2].square().sum(1)[:, None]
        return _dense(p).square().sum(-1).t()
    return sum(one(p) for _, p in parts)


def _self_kernel(parts: list) -> Tensor:
    """Each row's own C x C kernel J_n J_n^T [n, C, C]."""
    def one(p):
        if p[0] == "factored":
            return torch.einsum("cnp,dnp->ncd", p[1], p[1]) * p[2].square().sum(1)[:, None, None]
        Jd = _dense(p)
        return torch.einsum("cnk,dnk->ncd", Jd, Jd)
    return sum(one(p) for _, p in parts)


def _jvp(parts: list, d: Tensor) -> Tensor:
    """J d [k, n, C] for k flat parameter vectors d [k, P] (positions: each block's ``sel``)."""
    def one(sel, p):
        ds = d[:, sel]  # [k, p, q] or [k, numel]
        if p[0] == "factored":
            return torch.einsum("cnp,kpq,nq->knc", p[1], ds, p[2])
        return torch.einsum("cnj,kj->knc", _dense(p), ds.reshape(ds.shape[0], -1))
    return sum(one(sel, p) for sel, p in parts)


def _vjp_(parts: list, w: Tensor, out: Tensor) -> None:
    """out [k, P] += J^T w for weights w [k, n, C] of the rows' outputs."""
    for sel, p in parts:
        if p[0] == "factored":
            t = torch.einsum("cnp,knc,nq->kpq", p[1], w, p[2])
        else:
            t = torch.einsum("cnj,knc->kj", _dense(p), w)
        out[:, sel.reshape(-1)] += t.reshape(t.shape[0], -1)
