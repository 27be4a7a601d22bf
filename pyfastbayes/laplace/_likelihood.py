"""The likelihoods of Laplace: targets checked against the outputs, the summed loss, and the
output-space directions whose back-propagation gives the curvature (the loss-Hessian square root
for the exact GGN, sampled labels for the MC Fisher, the loss gradient for the empirical Fisher).

Conventions (laplace-torch's, so numbers compare): 'classification' -> sum of cross-entropies of
logits [N, C]; 'binary' -> sum of binary cross-entropies of one logit per row [N, 1];
'regression' -> half the sum of squared errors of outputs [N, C] (the Gaussian log-likelihood is
-loss / sigma^2 - N C log(sigma sqrt(2 pi))); 'heteroscedastic_regression' -> the summed Gaussian NLL
(without its constant log(2 pi) / 2 per target, as regression's) of targets [N, D] under the natural parameters [N, 2D] the model
outputs (``pyfastbayes.nn.gaussian``; the noise is the model's, sigma_noise stays 1). The curvature
is that of these losses at sigma = 1 and temperature 1; the posterior precision scales it by
1 / (sigma^2 T).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..nn.gaussian import check_natural, natural_gradient, natural_nll, natural_targets, natural_to_mean_var

# 'reward_modeling' (laplace-torch's): fitted as the 'classification' of preference pairs, predicted
# as the 'regression' of one reward per input (Laplace._fit_likelihood / Laplace._lik)
LIKELIHOODS = ("classification", "regression", "binary", "reward_modeling", "heteroscedastic_regression")
CURVATURES = ("ggn", "ef", "mc_fisher")
HETERO = "heteroscedastic_regression"
GAUSSIAN = ("regression", HETERO)  # the likelihoods whose predictive is a Gaussian's moments


def outputs_2d(out, likelihood: str) -> Tensor:
    """The model output as [N, C] (regression/binary [N] -> [N, 1]); clear errors otherwise."""
    if not torch.is_tensor(out):
        raise TypeError(f"the model must return a tensor [N, C], got {type(out).__name__}")
    if likelihood == "classification":
        if out.dim() != 2 or out.shape[1] < 2:
            hint = ("one logit per row: likelihood='binary'" if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)
                    else "C logits per row, one row per example: a model with more output dimensions (a "
                    "sequence, an image) must flatten them into the rows, its targets alike" if out.dim() > 2 else "")
            raise ValueError(f"likelihood='classification' needs logits [N, C] with C >= 2; the model outputs "
                             f"{tuple(out.shape)}" + (f" ({hint})" if hint else ""))
        return out
    if likelihood == HETERO:
        check_natural(out, "likelihood='heteroscedastic_regression': the model's outputs")
        return out
    if out.dim() == 1:
        # a view in the graph even under no_grad (functional_variance runs under no_grad with the
        # model's forward alone under enable_grad; a [N] -> [N, 1] view taken in no_grad mode
        # would cut the outputs off the graph the GLM Jacobians are back-propagated through)
        with torch.enable_grad():
            out = out.unsqueeze(1)
    if out.dim() != 2:
        raise ValueError(f"likelihood={likelihood!r} needs outputs [N] or [N, C]; the model outputs {tuple(out.shape)}")
    if likelihood == "binary" and out.shape[1] != 1:
        raise ValueError(f"likelihood='binary' needs one logit per row ([N] or [N, 1]); the model outputs "
                         f"{tuple(out.shape)}: for C >= 2 classes use likelihood='classification'")
    return out


def check_targets(y, f: Tensor, likelihood: str) -> Tensor:
    """Targets for outputs f [N, C]: classification -> class indices [N] (int) in [0, C);
    binary -> [N] or [N, 1] of 0/1; regression -> the shape of f (or [N] when C = 1), finite.
    Returned on f's device in the form the loss uses."""
    if not torch.is_tensor(y):
        raise TypeError(f"targets must be a tensor, got {type(y).__name__}")
    N, C = f.shape
    if y.shape[:1] != (N,):
        raise ValueError(f"targets have {tuple(y.shape)} rows but the outputs {N}: one target per input row")
    y = y.to(f.device)
    if likelihood == HETERO:
        return natural_targets(y, f)
    if likelihood == "classification":
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"likelihood='classification' needs class indices [N] (an integer tensor), got "
                             f"{tuple(y.shape)} {y.dtype}")
        if N and (int(y.min()) < 0 or int(y.max()) >= C):
            raise ValueError(f"targets must be class indices in [0, {C}), got values in [{int(y.min())}, {int(y.max())}]")
        return y.long()  # int32 / int16 indices (NumPy's defaults on some platforms): the loss takes int64
    if likelihood == "binary":
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1:
            raise ValueError(f"likelihood='binary' needs targets [N] or [N, 1], got {tuple(y.shape)}")
        y = y.to(f.dtype)
        if N and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("likelihood='binary' needs targets 0 or 1")
        return y.unsqueeze(1)
    if y.dim() == 1 and C == 1:
        y = y.unsqueeze(1)
    if y.shape != f.shape:
        raise ValueError(f"likelihood='regression' needs targets of the outputs' shape {tuple(f.shape)}, got "
                         f"{tuple(y.shape)}")
    if not y.is_floating_point():
        y = y.to(f.dtype)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("regression targets contain NaN or infinity")
    return y.to(f.dtype)


def summed_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """The summed negative log-likelihood at sigma = 1 without constants (module docstring);
    RuntimeError when it is not finite (outputs that overflowed: the curvature can stay finite,
    e.g. regression outputs shifted by infinity, and the marginal likelihood would be -inf)."""
    if likelihood == "classification":
        loss = F.cross_entropy(f, y, reduction="sum")
    elif likelihood == "binary":
        loss = F.binary_cross_entropy_with_logits(f, y, reduction="sum")
    elif likelihood == HETERO:  # (without its log(2 pi) / 2 per target: log_likelihood adds it, untempered)
        loss = (natural_nll(f, y) - 0.5 * math.log(2 * math.pi)).sum()
    else:
        loss = 0.5 * (f - y).square().sum()
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(f"the loss of the model's outputs on the training data is {float(loss)} (not finite): the "
                           "outputs overflowed or are NaN; check the inputs and the weights")
    return loss


# entries of a row's directions below its largest times this are set to 0 (see _drop_negligible)
NEGLIGIBLE = 2.0 ** -50


def _drop_negligible(R: Tensor) -> Tensor:
    """R with the entries below NEGLIGIBLE x the largest |entry| of their row n (over directions
    and outputs) set to 0: their share of the row's curvature R R^T is below 2^-100 of its
    largest entry. A confident classifier's softmax directions reach ~1e-23 (sqrt p of an
    unlikely class) and their products, the curvature's terms, fall below float32's normal
    range: such subnormal operands slowed the dense GEMMs of a last-layer 'full' fit tenfold
    (CNN on digits: 270 ms -> 27 ms per batch for the same block once they are dropped)."""
    big = R.abs().amax(dim=(0, 2), keepdim=True)
    return R.masked_fill(R.abs() < big * NEGLIGIBLE, 0.0)


def directions(f: Tensor, y: Tensor, likelihood: str, curvature: str, mc_samples: int,
               generator: torch.Generator | None) -> Tensor:
    """Output-space directions R [m, N, C] with sum_j R[j, n] R[j, n]^T the per-row curvature
    (exactly for 'ggn', in expectation for 'mc_fisher', the gradient outer product for 'ef'),
    entries negligible within their row (below 2^-50 of its largest) dropped to 0 (not for
    'heteroscedastic_regression', nor for the regression GGN's identity)."""
    R = _directions(f.detach(), y, likelihood, curvature, mc_samples, generator)
    if (curvature == "ggn" and likelihood == "regression") or likelihood == HETERO:
        # regression's GGN: the identity's 0 / 1 entries, nothing to drop and no copy of the expanded
        # view. The natural Gaussian: a row's targets may live on scales far apart (and a tiny
        # sqrt(2) s2 entry meets a Jacobian of eta2 ~ 1 / s2), so no entry is negligible in its row
        return R
    return _drop_negligible(R)


def _directions(f: Tensor, y: Tensor, likelihood: str, curvature: str, mc_samples: int,
                generator: torch.Generator | None) -> Tensor:
    N, C = f.shape
    if curvature == "ggn":
        if likelihood == "regression":  # 0.5 (f - y)^2: Hessian I
            return torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, N, C)
        if likelihood == HETERO:  # the 2 x 2 Cholesky factor of each target's block: C = 2D directions
            eye = torch.eye(C, dtype=f.dtype, device=f.device).expand(N, C, C)
            return ops.loss_hessian("gaussian_natural", f, eye, "factor").permute(2, 0, 1)
        if likelihood == "classification" and C > 1:
            return _softmax_directions(f)
        eye = torch.eye(C, dtype=f.dtype, device=f.device).expand(N, C, C)
        B = ops.loss_hessian("bce", f, eye, "factor")  # [N, C, C]: H_n = B_n B_n^T (diagonal)
        return B.permute(2, 0, 1)
    if curvature == "ef":
        return _loss_gradient(f, y, likelihood).unsqueeze(0)
    draws = []
    for _ in range(mc_samples):
        if likelihood == "classification":
            ys = torch.multinomial(f.softmax(-1), 1, generator=generator)[:, 0]
        elif likelihood == "binary":
            ys = torch.bernoulli(f.sigmoid(), generator=generator)
        elif likelihood == HETERO:
            mu, s2 = natural_to_mean_var(f)
            ys = mu + s2.sqrt() * torch.randn(mu.shape, dtype=f.dtype, device=f.device, generator=generator)
        else:
            ys = f + torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
        draws.append(_loss_gradient(f, ys, likelihood))
    return torch.stack(draws) / math.sqrt(mc_samples)


def _softmax_directions(f: Tensor) -> Tensor:
    """C - 1 directions [C - 1, N, C] of the softmax cross-entropy's exact GGN (C >= 2).

    H_n = diag(p) - p p^T has rank C - 1, and so has the factor of ``ops.loss_hessian``,
    B_n = diag(q) - p q^T with q = sqrt(p): B_n q = p - p (q^T q) = 0. With the per-row Householder
    reflection Q_n = I - w w^T / (1 + q_C), w = q + e_C (orthogonal and symmetric, Q_n e_C = -q;
    1 + q_C >= 1, no cancellation), B_n Q_n (B_n Q_n)^T = B_n B_n^T = H_n and the last column of
    B_n Q_n is -B_n q = 0: the first C - 1 columns carry the whole curvature (to rounding), so the
    batched backward and the gradient factors see C - 1 directions instead of C."""
    N, C = f.shape
    q = f.double().softmax(-1).sqrt()
    w = q.clone()
    w[:, -1] += 1
    Q = torch.eye(C, dtype=torch.float64, device=f.device) - w.unsqueeze(2) * (w / (1 + q[:, -1:])).unsqueeze(1)
    B = ops.loss_hessian("cross_entropy", f, Q.to(f.dtype), "factor")  # [N, C, C]: B_n Q_n
    return B[:, :, :C - 1].permute(2, 0, 1)


def _loss_gradient(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """d loss_n / d f_n [N, C] in closed form."""
    if likelihood == "classification":
        return f.softmax(-1) - F.one_hot(y, f.shape[1]).to(f.dtype)
    if likelihood == "binary":
        return f.sigmoid() - y
    if likelihood == HETERO:
        return natural_gradient(f, y)
    return f - y


def log_likelihood(loss: Tensor, n_data: int, n_outputs: int, likelihood: str, sigma: Tensor,
                   temperature: float) -> Tensor:
    """log p(D | theta_MAP) from the summed loss (laplace-torch's convention, differentiable in
    sigma): -loss / (sigma^2 T), minus N C log(sigma sqrt(2 pi)) for regression and N D log(2 pi) / 2
    for 'heteroscedastic_regression' (its loss leaves that constant out: tempered alike)."""
    factor = 1.0 / (sigma.square() * temperature)
    if likelihood == HETERO:  # the Gaussians' normaliser log(2 pi) / 2 per target, untempered as regression's
        return -factor * loss - n_data * (n_outputs // 2) * (0.5 * math.log(2 * math.pi))
    if likelihood != "regression":
        return -factor * loss
    return -factor * loss - n_data * n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
