"""The low-rank structure: P = s U diag(lambda) U^T + delta I, with (lambda, U) the top-k eigenpairs
of the likelihood curvature over the covered parameters, found matrix-free by block Lanczos on
:mod:`pyfastbayes.curvature`'s GGN / Fisher operator (one data pass per block of vectors; no
P x P matrix). The prior must be one scalar delta (the isotropic part is what makes the
complement of U exact). laplace-torch's ``LowRankLaplace`` counterpart.

With w_j = 1 / (s lambda_j + delta) - 1 / delta:
  log det P = sum_j log(s lambda_j + delta) + (P - k) log delta;
  draws: z / sqrt(delta) + U (w_j-scaled square roots) U^T z;
  J P^-1 J^T = J J^T / delta + (J U) diag(w) (J U)^T, both from the per-layer Jacobian parts (for
  an unshared layer <U_c (x) V, U_d (x) V> = (U_c . U_d) |V|^2 and U_c^T Theta_j V): no [N, C, P].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature import eigenvalues, fisher, ggn
from ..nn.inputs import model_output
from ..nn.gaussian import NaturalGaussianNLLLoss
from ..nn.loaders import batches

_LOSSES = {"classification": nn.CrossEntropyLoss, "binary": nn.BCEWithLogitsLoss, "regression": nn.MSELoss,
           "heteroscedastic_regression": NaturalGaussianNLLLoss}


class _Pairs:
    """A loader's items as (inputs, targets) pairs in the shape the curvature operators expect,
    walked anew at every pass: binary targets [N] (the outputs flattened by :class:`_Flat`),
    regression targets [N, C] (the outputs made 2-D by :class:`_Columns`: [N] or [N, 1] targets of
    a one-output model alike, as check_targets takes them), floating point in ``dtype``."""

    def __init__(self, loader, likelihood: str, dtype: torch.dtype, split):
        self.loader, self.likelihood, self.dtype, self.split = loader, likelihood, dtype, split

    def __iter__(self):
        for i, item in enumerate(batches(self.loader)):
            x, y = self.split(item, i)
            if self.likelihood == "binary":
                y = y.reshape(-1).to(torch.get_default_dtype() if not y.is_floating_point() else y.dtype)
            elif self.likelihood in ("regression", "heteroscedastic_regression"):
                y = y.reshape(y.shape[0], -1)
                y = y if y.is_floating_point() else y.to(self.dtype)
            yield x, y


class LowRankCurvature:
    """Top-k eigenpairs of the likelihood curvature (the summed loss's, laplace-torch's scale)."""

    structure = "lowrank"

    def __init__(self, blocks, dtype, device, k: int = 20):
        self.blocks = blocks
        P = sum(b.numel for b in blocks)
        self.k = min(k, P)
        self.eigvals = torch.zeros(self.k, dtype=dtype, device=device)
        self.eigvecs = torch.zeros(P, self.k, dtype=dtype, device=device)

    def add(self, layers, grads) -> None:
        raise RuntimeError("the low-rank curvature is computed matrix-free after the data pass (compute())")

    def compute(self, model, loader, likelihood: str, curvature: str, names: list[str], n_data: int,
                n_outputs: int, mc_samples: int, generator, split, output_fn=None) -> None:
        """Top-k eigenpairs of the curvature of the covered parameters ``names`` over ``loader``
        (walked once per block of Lanczos vectors); ``split(item, i)``: a loader item's (inputs,
        targets), Laplace's (pairs or dict batches); ``output_fn``: Laplace's, applied to the
        model's outputs."""
        data = _Pairs(loader, likelihood, self.eigvals.dtype, split)
        loss = _LOSSES[likelihood]()
        base = _Output(model, output_fn) if output_fn is not None else model
        wrapped = {"binary": _Flat, "regression": _Columns}.get(likelihood, lambda m: m)(base)
        own = dict(model.named_parameters())
        params = [own[n] for n in names]  # (the Parameters themselves: the wrappers prefix their names)
        if curvature == "ggn":
            op = ggn(wrapped, loss, data, params=params)
        elif curvature == "ef":  # (mc_samples and the generator are the MC Fisher's)
            op = fisher(wrapped, loss, data, kind="empirical", params=params)
        else:
            op = fisher(wrapped, loss, data, kind="mc", mc_samples=mc_samples, generator=generator, params=params)
        vals, vecs = eigenvalues(op, k=self.k, method="block_lanczos", generator=generator)
        # the operators curve the mean loss: the summed cross-entropy / BCE is N times it. Regression:
        # half the summed squared error is (N C / 2) times the mean squared error (its GGN and MC
        # Fisher); its per-example gradients J^T r are half those of the squared error, 2 J^T r, so
        # the empirical Fisher, a sum of their outer products over N C-averaged terms, is (N C / 4) times
        # the natural Gaussian's NLL is already the summed loss's per-target term: (N D) times its mean
        scale = n_data * n_outputs / (4 if curvature == "ef" else 2) if likelihood == "regression" else \
            n_data * n_outputs // 2 if likelihood == "heteroscedastic_regression" else n_data
        self.eigvals.copy_((vals * scale).clamp_min(0))
        self.eigvecs.copy_(vecs)

    def tensors(self):
        return [self.eigvals, self.eigvecs]

    def counts(self):
        return []

    def set_counts(self, counts):
        pass


class _Output(nn.Module):
    """output_fn(model(x)): the outputs tensor of a model that returns something else."""

    def __init__(self, model, output_fn):
        super().__init__()
        self.model, self.output_fn = model, output_fn

    def forward(self, x):
        return model_output(self.model(x), self.output_fn)


class _Columns(nn.Module):
    """model(x) as [N, C] (a one-output regression model may return [N])."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.unsqueeze(1) if torch.is_tensor(out) and out.dim() == 1 else out


class _Flat(nn.Module):
    """model(x) reshaped to [N] (BCEWithLogitsLoss targets are [N])."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).reshape(-1)


class LowRankPrecision:
    """s U diag(lambda) U^T + delta I (module docstring); delta must be uniform."""

    def __init__(self, curv: LowRankCurvature):
        self.blocks = curv.blocks
        self.vals, self.U = curv.eigvals, curv.eigvecs
        self.P = self.U.shape[0]

    def _delta(self, delta: Tensor) -> Tensor:
        d = delta.reshape(-1)
        if d.numel() > 1 and not bool((d.detach() == d.detach()[0]).all()):
            raise ValueError("hessian_structure='lowrank' needs one scalar prior precision (the complement of the "
                             "low-rank subspace is exact only for delta I); use prior_structure='scalar'")
        return d[0]

    def logdet(self, s, delta):
        d = self._delta(delta)
        return torch.log(s * self.vals + d).sum() + (self.P - self.vals.numel()) * torch.log(d)

    def sample(self, n, s, delta, generator=None):
        d = self._delta(delta)
        z = torch.randn(n, self.P, dtype=self.U.dtype, device=self.U.device, generator=generator)
        root = 1 / torch.sqrt(s * self.vals + d) - 1 / torch.sqrt(d)
        return z / torch.sqrt(d) + ((z @ self.U) * root) @ self.U.t()

    def variance(self, s, delta):
        """diag(P^-1) = 1 / delta + sum_k U_k^2 (1 / (s lambda_k + delta) - 1 / delta) [P]."""
        d = self._delta(delta)
        return 1 / d + self.U.square() @ (1 / (s * self.vals + d) - 1 / d)

    def quad(self, x, s, delta):
        """x^T P x [n] for rows x [n, P]."""
        return s * ((x @ self.U).square() * self.vals).sum(1) + self._delta(delta) * x.square().sum(1)

    def inv_quad(self, J, s, delta):
        """J P^-1 J^T [R, R] for rows J [R, P]: J J^T / delta + (J U) diag(w) (J U)^T."""
        d = self._delta(delta)
        JU = J @ self.U
        return J @ J.t() / d + (JU * (1 / (s * self.vals + d) - 1 / d)) @ JU.t()

    def functional_variance(self, parts, s, delta):
        d = self._delta(delta)
        w = 1 / (s * self.vals + d) - 1 / d  # [k]
        gram, proj = None, None
        for b, part in parts:
            kind, *t = part
            if b.kind == "kron":
                Th = self.U[b.sel.reshape(-1)].t().reshape(-1, b.p, b.q)  # [k, p, q]
            else:
                Th = self.U[b.sel.reshape(-1)].t()  # [k, p]
            if kind == "factored":
                Uc, V = t
                g = torch.einsum("cnp,dnp,n->ncd", Uc, Uc, V.square().sum(-1))
                pr = torch.einsum("cnp,jpq,nq->ncj", Uc, Th.reshape(-1, Uc.shape[-1], V.shape[-1]).to(Uc.dtype), V)
            elif kind == "matrix":
                M = t[0]
                g = torch.einsum("cnpq,dnpq->ncd", M, M)
                pr = torch.einsum("cnpq,jpq->ncj", M, Th.reshape(-1, M.shape[2], M.shape[3]).to(M.dtype))
            else:
                R = t[0]
                g = torch.einsum("cnp,dnp->ncd", R, R)
                pr = torch.einsum("cnp,jp->ncj", R, Th.reshape(-1, R.shape[-1]).to(R.dtype))
            gram = g if gram is None else gram + g
            proj = pr if proj is None else proj + pr
        return gram / d + torch.einsum("ncj,j,ndj->ncd", proj, w.to(proj.dtype), proj)
