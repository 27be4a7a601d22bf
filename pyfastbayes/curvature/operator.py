"""The linear-operator interface every curvature matrix of :mod:`pyfastbayes.curvature` has.

A :class:`LinearOperator` is a symmetric P x P matrix that is only ever applied: ``op @ v`` for a
vector v [P] and ``op @ V`` for a block V [P, k] of k vectors computed together (one pass over
the data for the model operators). ``diagonal`` and ``to_dense`` are built on the block product.
Operators combine as symmetric matrices do: ``H + G``, ``H - G``, ``c * H``, ``H / c``, ``H + c``
(= H + c I: damping), ``-H``, ``H.T`` (itself), ``v @ H``; the result applies its parts.
Subclasses implement :meth:`LinearOperator._matmat` ([P, k] -> [P, k]); the checks of the
argument live here, once.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..calibration._checks import check_generator as _check_generator, check_int

__all__ = ["LinearOperator", "DenseOperator"]

DENSE_LIMIT = 20_000  # to_dense() refuses larger P (P^2 numbers)


class LinearOperator:
    """A symmetric P x P matrix applied to vectors: ``op @ v`` ([P] -> [P]), ``op @ V``
    ([P, k] -> [P, k]).

    Attributes: ``shape`` (P, P), ``dtype``, ``device`` (what the vectors must have).
    """

    def __init__(self, P: int, dtype: torch.dtype, device: torch.device | str):
        P = check_int(P, "P", 1)  # numpy integers too
        self.shape = (P, P)
        self.dtype = dtype
        self.device = torch.device(device)

    # ---- to implement -----------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        """A V for V [P, k] (checked: dtype, device, k >= 1) -> [P, k]."""
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat")

    # ---- products ------------------------------------------------------------------------------------
    def __matmul__(self, v: Tensor) -> Tensor:
        """A v for v [P] -> [P], or A V for a block V [P, k] -> [P, k] (the k products together)."""
        V = self._check_vectors(v, "v")
        out = self._matmat(V)
        # a subclass's _matmat of another shape would come back as a wrong-length vector (op @ v
        # takes column 0) or fail deep inside the spectral tools: say whose method it is
        if not torch.is_tensor(out) or out.shape != V.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise RuntimeError(f"{type(self).__name__}._matmat returned {got} for a block of shape {tuple(V.shape)}; "
                               "it must return A V of the same shape [P, k]")
        return out[:, 0] if v.dim() == 1 else out

    def matvec(self, v: Tensor) -> Tensor:
        """A v for v [P] -> [P] (same as ``op @ v``)."""
        if not torch.is_tensor(v) or v.dim() != 1:
            raise ValueError(f"matvec takes one vector of shape [{self.shape[0]}], got "
                             f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}; use op @ V for a block")
        return self @ v

    def _check_vectors(self, v, name: str) -> Tensor:
        """v [P] or [P, k] (k >= 1) of the operator's dtype and device, as a [P, k] block."""
        P = self.shape[0]
        if not torch.is_tensor(v):
            raise TypeError(f"{name} must be a tensor of shape [{P}] or [{P}, k], got {type(v).__name__}")
        if v.dim() not in (1, 2) or v.shape[0] != P:
            raise ValueError(f"{name} must have shape [{P}] or [{P}, k] (P = {P} parameters), got {tuple(v.shape)}")
        if v.dim() == 2 and v.shape[1] == 0:
            raise ValueError(f"{name} is an empty block [{P}, 0]: pass k >= 1 vectors")
        if v.dtype != self.dtype:
            raise TypeError(f"{name} is {v.dtype} but the operator is {self.dtype}; convert it with "
                            f"{name}.to({self.dtype})")
        if v.device != self.device:
            raise ValueError(f"{name} is on {v.device} but the operator is on {self.device}; move it with "
                             f"{name}.to('{self.device}')")
        return v if v.dim() == 2 else v.unsqueeze(1)

    # ---- derived -----------------------------------------------------------------------------------------
    def diagonal(self, method: str = "exact", n_probes: int = 100, block: int = 32,
                 generator: torch.Generator | None = None) -> Tensor:
        """The diagonal [P].

        'exact': products with the unit vectors, ``block`` at a time (P products in all).
        'hutchinson': the unbiased estimate mean over n_probes Rademacher z of z * (A z)
        (``generator`` for the probes, on the operator's device)."""
        P = self.shape[0]
        if method not in ("exact", "hutchinson"):
            raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
        block = check_int(block, "block", 1)  # block <= 0 left out[] uninitialised / never ended
        if method == "exact":
            out = torch.empty(P, dtype=self.dtype, device=self.device)
            for j in range(0, P, block):
                b = min(block, P - j)
                out[j:j + b] = (self @ self._units(j, b))[j:j + b].diagonal()
            return out
        if method == "hutchinson":
            check_int(n_probes, "n_probes", 1)
            generator = shared_generator(self, generator)
            acc = torch.zeros(P, dtype=self.dtype, device=self.device)
            for j in range(0, n_probes, block):
                Z = rademacher(P, min(block, n_probes - j), self.dtype, self.device, generator)
                acc += (Z * (self @ Z)).sum(1)
            return acc / n_probes

    def to_dense(self, block: int = 64) -> Tensor:
        """The matrix [P, P] (products with the identity, ``block`` columns at a time); P <= 20 000."""
        P = self.shape[0]
        block = check_int(block, "block", 1)
        if P > DENSE_LIMIT:
            raise ValueError(f"to_dense() would hold a {P} x {P} matrix (P > {DENSE_LIMIT}); use products, "
                             f"diagonal() or the spectral tools instead")
        return torch.cat([self @ self._units(j, min(block, P - j)) for j in range(0, P, block)], 1)

    def _units(self, j: int, b: int) -> Tensor:
        """The unit vectors e_j .. e_{j+b-1} as a block [P, b]."""
        E = torch.zeros(self.shape[0], b, dtype=self.dtype, device=self.device)
        E[torch.arange(j, j + b, device=self.device), torch.arange(b, device=self.device)] = 1
        return E

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.shape[0]}, dtype={self.dtype}, device={self.device})"

    # ---- algebra: symmetric operators stay symmetric ----------------------------------------------------
    # a + b and a - b (operators of one shape, dtype and device), c * a, a * c, a / c and a + c
    # (c a real number: a + c I, e.g. damping), -a, a.T (the operator itself); each product of the
    # result applies its parts, so e.g. eigenvalues(H + 1e-3) runs the data passes of H only
    @property
    def T(self) -> "LinearOperator":
        """The transpose: the operator itself (it is symmetric)."""
        return self

    mT = T

    def __add__(self, other) -> "LinearOperator":
        """``A + B`` (another operator of the same shape, dtype and device) or ``A + c I`` (a real c)."""
        if isinstance(other, LinearOperator):
            return _Sum(self, other, 1.0)
        return _Affine(self, shift=_real(other, "the number added"))

    __radd__ = __add__

    def __sub__(self, other) -> "LinearOperator":
        """``A - B`` or ``A - c I``."""
        if isinstance(other, LinearOperator):
            return _Sum(self, other, -1.0)
        return _Affine(self, shift=-_real(other, "the number subtracted"))

    def __rsub__(self, other) -> "LinearOperator":
        return _Affine(self, -1.0, _real(other, "the number"))

    def __mul__(self, c) -> "LinearOperator":
        """``c A`` for a real number c (a matrix product is ``A @ V``)."""
        if isinstance(c, LinearOperator):
            raise TypeError("an operator times an operator is not supported: * scales by a real number; apply them "
                            "in turn to vectors (A @ (B @ V))")
        return _Affine(self, _real(c, "the factor (operators multiply vectors with @)"))

    __rmul__ = __mul__

    def __truediv__(self, c) -> "LinearOperator":
        c = _real(c, "the divisor")
        if c == 0:
            raise ZeroDivisionError("an operator divided by 0")
        return _Affine(self, 1.0 / c)

    def __neg__(self) -> "LinearOperator":
        return _Affine(self, -1.0)

    def __rmatmul__(self, v: Tensor) -> Tensor:
        """``v @ A`` = (A v)^T for v [P] or [k, P] (A is symmetric)."""
        if torch.is_tensor(v) and v.dim() == 2:
            return (self @ v.mT).mT
        return self @ v


def _real(c, what: str) -> float:
    """A real number (Python, NumPy or a 0-dim tensor) as a float, else TypeError / ValueError
    naming ``what``."""
    if torch.is_tensor(c) and c.dim() == 0 and not c.is_complex():
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"{what} must be a real number or a LinearOperator, got {type(c).__name__}")
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"{what} must be finite, got {c}")
    return c


class _Composite(LinearOperator):
    """An operator built from others (sum, scaling, shift): distributed when any part is."""

    def __init__(self, *parts: LinearOperator):
        super().__init__(parts[0].shape[0], parts[0].dtype, parts[0].device)
        self.parts = parts
        self.distributed = any(getattr(p, "distributed", False) for p in parts)


class _Sum(_Composite):
    def __init__(self, a: LinearOperator, b: LinearOperator, sign: float):
        if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
            raise ValueError(f"cannot add operators of shape {a.shape} {a.dtype} on {a.device} and {b.shape} "
                             f"{b.dtype} on {b.device}: they must agree")
        super().__init__(a, b)
        self.sign = sign

    def _matmat(self, V: Tensor) -> Tensor:
        a, b = self.parts
        return torch.add(a @ V, b @ V, alpha=self.sign)  # out of place: a part may return its own storage

    def __repr__(self) -> str:
        return f"({self.parts[0]!r} {'+' if self.sign > 0 else '-'} {self.parts[1]!r})"


class _Affine(_Composite):
    """scale * A + shift * I."""

    def __init__(self, a: LinearOperator, scale: float = 1.0, shift: float = 0.0):
        super().__init__(a)
        self.scale, self.shift = scale, shift

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.parts[0] @ V  # not written in place: a part may return its own storage (or V itself)
        if self.scale != 1.0:
            out = out * self.scale
        return torch.add(out, V, alpha=self.shift) if self.shift else out

    def __repr__(self) -> str:
        return f"({self.scale:g} * {self.parts[0]!r} + {self.shift:g} I)"


class DenseOperator(LinearOperator):
    """A given symmetric matrix A [P, P] as a :class:`LinearOperator` (tests, small problems);
    ValueError for a matrix that is not square, finite and symmetric (to rounding: max |A - A^T|
    <= sqrt(eps) max |A|), ``name`` being what the messages call it."""

    def __init__(self, A: Tensor, name: str = "A"):
        if not torch.is_tensor(A) or A.dim() != 2 or A.shape[0] != A.shape[1] or not A.is_floating_point():
            raise ValueError(f"{name} must be a square floating-point matrix [P, P], got "
                             f"{tuple(A.shape) if torch.is_tensor(A) else type(A).__name__}")
        if not bool(torch.isfinite(A).all()):  # else the symmetry test below reports max |A - A^T| = nan
            raise ValueError(f"{name} holds {int((~torch.isfinite(A)).sum())} NaN or inf entries: its eigenvalues "
                             "and trace are undefined; check how the matrix was computed")
        scale = float(A.abs().max()) if A.numel() else 0.0
        asym = float((A - A.mT).abs().max()) if A.numel() else 0.0
        if not asym <= math.sqrt(torch.finfo(A.dtype).eps) * scale:
            raise ValueError(f"{name} must be symmetric: max |A - A^T| = {asym:.3g} (max |A| = {scale:.3g}); "
                             f"pass (A + A.T) / 2")
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


def rademacher(P: int, k: int, dtype: torch.dtype, device, generator: torch.Generator | None) -> Tensor:
    """[P, k] of independent +-1 (the probes of the trace and diagonal estimators). Drawn probe by
    probe (each column from P consecutive draws), so a seed gives the same probes whatever the
    blocks they are drawn in."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randint(0, 2, (k, P), generator=generator, device=gen_device).mT
    return z.to(device=device, dtype=dtype, memory_format=torch.contiguous_format).mul_(2).sub_(1)


def shared_generator(op, generator: torch.Generator | None) -> torch.Generator | None:
    """The generator of a randomised estimator on ``op`` (checked): ``generator`` itself, or, for
    a model operator summed over torch.distributed processes, a fresh one on its device seeded
    with rank 0's draw from it (one broadcast), so that every process draws the same probes and
    start vectors: their products are all-reduced, so vectors differing by rank would be summed
    into nonsense (and make the ranks' stopping decisions, hence their collectives, differ)."""
    _check_generator(generator)
    if not getattr(op, "distributed", False):
        return generator
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device).to(op.device)
    torch.distributed.broadcast(seed, src=0)
    return torch.Generator(device=gen_device).manual_seed(int(seed.item()))

