"""Directions in parameter space for loss landscapes, each a flat [P] vector over the model's
trainable parameters in ``model.parameters()`` order (:class:`pyfastbayes.nn.ParamLayout`).

- :func:`random_directions`: Gaussian directions with filter/layer normalisation (Li et al. 2018,
  "Visualizing the Loss Landscape of Neural Nets"), so that a unit step has the scale of the weights.
- :func:`directions_to`: the vectors from the model to other models (other minima, SWA means).
- :func:`pca_directions`: the top principal directions of a training trajectory.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calibration._checks import check_generator, check_int
from ..nn.params import ParamLayout

__all__ = ["random_directions", "directions_to", "pca_directions", "project_trajectory"]

NORMALIZATIONS = ("filter", "layer", "none")
IGNORES = ("biasbn", None)
_EPS = 1e-10  # as Li et al.: a zero weight filter gives a zero direction filter, never NaN


def refuse_meta(model: nn.Module, name: str = "model") -> None:
    """ValueError naming ``name`` when a parameter or buffer of ``model`` is on the meta device (no
    values: nothing to flatten, perturb or evaluate)."""
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in tensors:
            if t.is_meta:
                raise ValueError(f"{name} has {kind} {n!r} on the meta device (no values): materialise the model "
                                 "first, e.g. model.to_empty(device='cpu') and then load its weights")


def layout_of(model: nn.Module, name: str = "model") -> ParamLayout:
    """The model's :class:`ParamLayout` after refusing integer parameters anywhere in the model
    (frozen ones included: a landscape moves floating-point weights only) and tensors on the meta
    device. ``name``: what the errors call the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    refuse_meta(model, name)
    for pname, p in model.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"{name}: parameter {pname!r} has dtype {p.dtype}; loss landscapes need floating-point "
                            "parameters (turn integer tensors into buffers)")
    return ParamLayout(model, owner="landscape")


def _count(n, name: str, low: int) -> int:
    """n as an int >= low (NumPy integers too): the one count check."""
    return check_int(n, name, low)


def random_directions(model: nn.Module, n: int = 2, normalization: str = "filter", ignore: str | None = "biasbn",
                      generator: torch.Generator | None = None) -> Tensor:
    """n Gaussian directions [n, P] over the model's trainable parameters, normalised per filter.

    Args:
        model: the network (its trainable parameters, ``model.parameters()`` order, set P).
        n: number of directions (>= 1).
        normalization: ``'filter'``: each filter of a weight of dim >= 2 (a row of a Linear weight,
            an output channel of a Conv weight: a slice along dim 0) is rescaled to the norm of the
            matching filter of the weight; ``'layer'``: each tensor is rescaled to the norm of its
            weight tensor; ``'none'``: the raw N(0, 1) draws.
        ignore: ``'biasbn'``: parameters of dim <= 1 (biases, BatchNorm affine weights) get zero
            direction; ``None``: they are normalised like a weight, by the whole vector's norm
            (for ``'filter'`` and ``'layer'``): a random direction of the parameter's norm, where
            Li et al.'s code (``normalize_directions_for_weights``) copies the parameter itself
            into the direction.
        generator: the random stream (its device is where the draws are made; default: the global
            CPU generator). The same generator state gives the same directions.

    Returns:
        Tensor [n, P] in the parameters' (promoted) dtype, on their device.
    """
    layout = layout_of(model)
    n = _count(n, "n", 1)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be 'biasbn' (zero direction for parameters of dim <= 1) or None, got {ignore!r}")
    check_generator(generator)
    weights = layout.params()
    if normalization != "none":  # the weights' norms scale the directions: NaN / inf would spread into them
        for name, w in zip(layout.names, weights):
            if (w.dim() >= 2 or ignore is None) and not bool(torch.isfinite(w).all()):
                raise ValueError(f"model parameter {name!r} holds NaN or infinity: its {normalization} normalisation "
                                 "would make the directions NaN; fix the model's weights (or use "
                                 "normalization='none')")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    # norms in float32 at least (fp16 weights would round the sums of squares)
    work = torch.promote_types(layout.dtype, torch.float32)
    out = torch.empty(n, layout.numel, dtype=layout.dtype, device=layout.device)
    for k in range(n):
        for w, o in zip(weights, layout.offsets):
            size = w.numel()
            # drawn tensor by tensor in layout order, so one generator state gives one result
            d = torch.randn(w.shape, generator=generator, device=gen_device, dtype=work).to(w.device)
            wf = w.to(work)
            if w.dim() <= 1 and ignore == "biasbn":
                d.zero_()
            elif normalization == "filter" and w.dim() >= 2:
                dr, wr = d.reshape(w.shape[0], -1), wf.reshape(w.shape[0], -1)
                dr.mul_(wr.norm(dim=1, keepdim=True) / (dr.norm(dim=1, keepdim=True) + _EPS))
            elif normalization != "none":  # 'layer', or a vector under 'filter': the whole tensor
                d.mul_(wf.norm() / (d.norm() + _EPS))
            out[k, o:o + size] = d.reshape(-1)
    return out


def directions_to(model: nn.Module, others) -> Tensor:
    """The vectors from ``model`` to each of ``others``: [len(others), P], row i = flat(others[i]) -
    flat(model) (so ``theta0 + 1 * row`` is the other model's parameters).

    Args:
        model: the centre (its trainable parameters set P).
        others: a sequence of models with the same trainable parameters (names, shapes, dtypes),
            or of flat [P] tensors, or one [k, P] tensor.
    """
    layout = layout_of(model)
    theta0 = layout.flatten()
    if torch.is_tensor(others):
        if others.dim() == 0:
            raise TypeError("others must be a sequence of models, flat [P] tensors, or one [k, P] tensor; got a "
                            "0-dim tensor")
        if others.dim() == 1:
            others = others[None]
        rows = list(others)
    elif isinstance(others, nn.Module) or isinstance(others, (str, bytes)):
        raise TypeError("others must be a sequence of models or flat [P] tensors (wrap one model in a list)")
    else:
        try:
            rows = list(others)
        except TypeError:
            raise TypeError("others must be a sequence of models or flat [P] tensors, "
                            f"got {type(others).__name__}") from None
    if not rows:
        raise ValueError("others is empty: pass at least one model (or flat [P] tensor)")
    out = torch.empty(len(rows), layout.numel, dtype=layout.dtype, device=layout.device)
    for i, other in enumerate(rows):
        if isinstance(other, nn.Module):
            why = layout.difference(layout_of(other, f"others[{i}]"))
            if why:
                raise ValueError(f"others[{i}] has other trainable parameters than model ({why})")
            flat = layout.flatten(other)
        elif torch.is_tensor(other) and other.is_floating_point():
            if other.shape != (layout.numel,):
                raise ValueError(f"others[{i}] must be a flat [P] tensor with P = {layout.numel}, "
                                 f"got {tuple(other.shape)}")
            flat = other
        else:
            raise TypeError(f"others[{i}] must be a model or a floating-point [P] tensor, got {type(other).__name__}")
        torch.sub(flat.to(out.device, out.dtype), theta0, out=out[i])
    return out


_GRAM_COLUMNS = 1 << 20  # columns of the centred trajectory per float64 block of pca_directions' Gram matrix


def pca_directions(trajectory: Tensor, n: int = 2) -> tuple[Tensor, Tensor]:
    """Top-n principal directions of a trajectory of flat parameters (e.g. saved every epoch).

    The trajectory is centred on its mean; its principal directions come from the eigenvectors of
    the T x T Gram matrix of the centred rows, accumulated in float64 (T small, P large: a few
    passes over the rows, no [T, P] float64 copy); each direction is a unit vector, its sign fixed
    so that its largest-magnitude entry is positive.

    Args:
        trajectory: [T, P] floating point, T >= 2 (one row per saved parameter vector).
        n: directions wanted, 1 <= n <= min(T - 1, P) (the centred rows span at most T - 1).

    Returns:
        (directions [n, P] in the trajectory's dtype, explained_variance_ratio [n] float64: the
        fraction of the trajectory's total variance along each direction).
    """
    if not torch.is_tensor(trajectory) or not trajectory.is_floating_point():
        raise TypeError(f"trajectory must be a floating-point tensor [T, P], got {type(trajectory).__name__}"
                        + (f" of dtype {trajectory.dtype}" if torch.is_tensor(trajectory) else ""))
    if trajectory.dim() != 2 or trajectory.shape[0] < 2:
        raise ValueError(f"trajectory must be [T, P] with T >= 2 rows, got {tuple(trajectory.shape)}")
    T, P = trajectory.shape
    n = _count(n, "n", 1)
    if n > min(T - 1, P):
        raise ValueError(f"n must be <= min(T - 1, P) = {min(T - 1, P)} for a trajectory of shape {(T, P)}, got {n}")
    if not bool(torch.isfinite(trajectory).all()):
        rows = torch.nonzero(~torch.isfinite(trajectory).all(dim=1)).flatten().tolist()
        raise ValueError(f"trajectory must be finite: row(s) {rows[:10]}{' ...' if len(rows) > 10 else ''} hold NaN "
                         "or infinity (a diverged checkpoint?); leave those rows out")
    work = torch.promote_types(trajectory.dtype, torch.float32)
    X = trajectory.to(work)
    size = float(torch.linalg.vector_norm(X))  # of the rows before centring (the tolerance below)
    X = X - X.mean(dim=0, keepdim=True)
    # the T x T Gram matrix X X^T in float64 (column blocks of the centred rows: no float64 copy of
    # them all), its eigenvectors U and values S^2, then directions X^T U / S: a float32 SVD of the
    # [T, P] rows themselves sums in float32 along P, and its spurious singular values grow as
    # eps sqrt(P) S[0] (a clean line of 9 M parameters showed a second one at 1e-4 S[0])
    G = X.new_zeros(T, T, dtype=torch.float64)
    for lo in range(0, P, _GRAM_COLUMNS):
        block = X[:, lo:lo + _GRAM_COLUMNS].double()
        G.addmm_(block, block.T)
    evals, U = torch.linalg.eigh(G)
    var, U = evals.flip(0).clamp_min(0), U.flip(1)  # descending
    total = var.sum()
    if not total > 0:
        raise ValueError("trajectory does not move: all its rows are equal, so it has no principal directions")
    S = var.sqrt()
    # a direction with no variance along it (rows on a line, or fewer distinct rows) is arbitrary.
    # What rounding can put there: storing and centring the rows perturbs each entry by about eps
    # times its size, a matrix E with ||E||_2 <= ||E||_F ~ eps ||rows||_F; the float64 Gram matrix
    # (sums of P products) and its eigenvalues add ~ (T + sqrt(P)) eps64 S[0]^2 to S^2. (The
    # matrix-rank rule S[0] max(T, P) eps grows with P: from P ~ 1 / eps, 8.4 M float32
    # parameters, it refused every direction.)
    tol = 2 * torch.finfo(work).eps * size + ((T + P ** 0.5) * torch.finfo(torch.float64).eps) ** 0.5 * float(S[0])
    spanned = int((S > tol).sum())
    if spanned < n:
        raise ValueError(f"trajectory spans only {spanned} direction(s) around its mean (its rows lie on a "
                         f"{'line' if spanned == 1 else f'{spanned}-D subspace'}), fewer than n = {n}: directions "
                         "beyond those would be arbitrary; ask for fewer")
    dirs = (U[:, :n].T / S[:n, None]).to(work) @ X  # [n, P]: unit length up to rounding, normalised below
    dirs /= torch.linalg.vector_norm(dirs, dim=1, keepdim=True)
    # deterministic signs: the largest-magnitude entry of each direction is positive
    idx = dirs.abs().argmax(dim=1, keepdim=True)
    dirs.mul_(torch.sign(dirs.gather(1, idx)))
    return dirs.to(trajectory.dtype), var[:n] / total


def project_trajectory(points, origin, directions: Tensor) -> Tensor:
    """Coordinates of parameter vectors in the plane (or line) origin + span(directions), to mark
    them on a :func:`~pyfastbayes.landscape.grid` result's plots (``points=`` of
    :meth:`~pyfastbayes.landscape.LandscapeResult.plot_contour`): the least-squares offsets, i.e.
    those of each point's orthogonal projection, exact for points in the plane and correct for
    directions that are not orthonormal (filter-normalised random ones are not).

    Args:
        points: [T, P] floating point (e.g. a saved trajectory), one [P] vector, or a sequence of
            models with the same trainable parameters as ``origin``.
        origin: the grid's centre: a model (its trainable parameters, flattened) or a [P] tensor.
        directions: [m, P], the directions the grid used (linearly independent).

    Returns:
        [T, m] float64 on the CPU: row t holds the offsets (alpha, beta, ...) of point t.
    """
    if isinstance(origin, nn.Module):
        theta0 = layout_of(origin, "origin").flatten()
    elif torch.is_tensor(origin) and origin.is_floating_point() and origin.dim() == 1:
        theta0 = origin
    else:
        raise TypeError("origin must be a model or a floating-point [P] tensor, got "
                        f"{type(origin).__name__}{f' of shape {tuple(origin.shape)}' if torch.is_tensor(origin) else ''}")
    P = theta0.shape[0]
    if isinstance(origin, nn.Module) and not torch.is_tensor(points):
        offsets = directions_to(origin, points)  # [T, P]: checks the models, names them others[i]
    elif torch.is_tensor(points) and points.is_floating_point():
        X = points[None] if points.dim() == 1 else points
        if X.dim() != 2 or X.shape[1] != P:
            raise ValueError(f"points must be [T, P] or [P] with P = {P} (the origin's), got {tuple(X.shape)}")
        offsets = X.to(theta0.device).double() - theta0.double()
    else:
        raise TypeError("points must be a floating-point tensor [T, P] or [P] (or, with a model as origin, a "
                        f"sequence of models), got {type(points).__name__}")
    if not torch.is_tensor(directions) or not directions.is_floating_point() or directions.dim() != 2 \
            or directions.shape[1] != P:
        raise ValueError(f"directions must be a floating-point [m, {P}] tensor, got "
                         f"{tuple(directions.shape) if torch.is_tensor(directions) else type(directions).__name__}")
    D = directions.double()
    norms = D.norm(dim=1)
    # independence judged on the unit directions (their lengths may differ by orders of magnitude)
    if not bool((norms > 0).all()) or torch.linalg.cond((D / norms[:, None]) @ (D / norms[:, None]).T) > 1e12:
        raise ValueError("directions are linearly dependent (or zero): they span no plane to project onto")
    rhs = offsets.to(D.device, torch.float64) @ D.T  # [T, m]
    return torch.linalg.solve(D @ D.T, rhs.T).T.cpu()
