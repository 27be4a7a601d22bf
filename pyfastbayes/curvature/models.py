"""Curvature of a model's mean loss as matrix-free operators: :func:`hessian`, :func:`ggn`,
:func:`fisher` (MC or empirical).

Each returns a :class:`~pyfastbayes.curvature.LinearOperator` of shape (P, P) over the model's
trainable parameters in ``model.parameters()`` order (or the ``params=`` subset, still in model
order), with the parameters' dtype and device. ``op @ V`` for a block V [P, k] walks the data
once and computes the k products together (``torch.func.vmap`` over the k vectors).

What the matrix is. With N examples in all and batches b of N_b rows, ``loss_fn`` (mean
reduction) gives the batch loss L_b; the operator is the curvature of the mean loss over the whole
dataset, L = sum_b (N_b / N) L_b, i.e. each batch's curvature weighted by N_b / N (batch sums
of N_b * curvature_b, divided by N at the end of the pass). With f_n the outputs of example n
flattened to C numbers, J_n = d f_n / d theta, and l_n the example's loss (cross-entropy: its
row's loss; BCE-with-logits and MSE: the SUM over its C output elements, so the mean loss is
L = 1 / (N C) sum_n l_n for these two and L = 1 / N sum_n l_n for cross-entropy;
``pyfastbayes.nn.NaturalGaussianNLLLoss``: outputs are C = 2D natural parameters of D Gaussians,
l_n the sum of its D NLLs, L = 1 / (N D) sum_n l_n):

- Hessian: d^2 L / d theta^2, any ``loss_fn`` returning a scalar (rows counted as N_b = the
  targets' first dimension).
- GGN: c sum_n J_n^T H_n J_n, H_n = d^2 l_n / d f_n^2 (``pyfastbayes.ops.loss_hessian``),
  c = 1 / N (cross-entropy), 1 / (N C) (BCE, MSE) or 1 / (N D) (natural Gaussian, whose H_n, the
  covariance of (y, y^2), has no y in it: there the GGN is the Fisher and the Hessian of the loss
  in the outputs).
- Fisher, 'empirical': c sum_n J_n^T g_n g_n^T J_n = c sum_n grad_theta l_n grad_theta l_n^T with
  g_n = d l_n / d f_n at the data's targets (from ``loss_fn`` itself, so label smoothing counts).
- Fisher, 'mc': c sum_n J_n^T (1 / S sum_s r_ns r_ns^T) J_n with S = ``mc_samples`` draws per
  example of r = d l_n / d f_n at targets sampled from the model's predictive: cross-entropy
  y ~ Categorical(softmax f_n), r = softmax(f_n) - onehot(y); BCE y ~ Bernoulli(sigmoid f_n)
  per element, r = sigmoid(f_n) - y; MSE the Gaussian of which (f - y)^2 is the NLL up to
  constants, y ~ N(f_n, I / 2), r = 2 (f_n - y); natural Gaussian y ~ N(mu, s2) per target,
  r = (mu - y, mu^2 + s2 - y^2). E[r r^T] = H_n in all four cases, so the
  MC Fisher is an unbiased estimate of the GGN. The draws come from a fixed generator state
  (``generator`` at construction), so every product applies the same matrix; batches must come
  in the same order in every pass (no shuffling). Same definitions and scalings as curvlinops'
  EF / MC-Fisher operators.

Train/eval mode: every product runs the model in eval mode (BatchNorm with its running
statistics, no dropout; nothing is updated) and gives every submodule its own mode back after;
a model with mode-dependent submodules in training mode gets one warning at construction.

Distributed: when torch.distributed is initialised (or ``distributed=True``), each process walks
its own data and every product ends with ONE all_reduce of the batch sums and the example count,
so every process gets the curvature of the mean loss over the union of the data (each rank
weighted by its number of examples).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from .. import ops
from .._warnings import warn_user
from ..calibration._checks import check_generator, check_int
from ..nn.batchnorm import ModeGuard
from ..nn.gaussian import check_natural, natural_gradient, natural_targets, natural_to_mean_var
from ..nn.inputs import dtype_mismatch
from ..nn.stateless import functional_call
from ._model_data import (Selection, all_reduce, as_batches, differentiable_kernels, distributed_active, ignore_index,
                          iterate, loss_kind, mode_dependent, shuffles)
from .operator import LinearOperator

__all__ = ["hessian", "ggn", "fisher", "HessianOperator", "GGNOperator", "FisherOperator"]


class _ModelCurvature(LinearOperator):
    """Shared by the model operators: parameters, data, mode guard, one pass per block, the
    N_b / N weighting and the cross-process sum. Subclasses implement :meth:`_batch`."""

    what = "curvature operator"

    def __init__(self, model: nn.Module, loss_fn, data, params=None, distributed: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        if getattr(loss_fn, "reduction", "mean") != "mean":  # torch's loss modules: a summed loss scales with N_b
            raise ValueError(f"{type(self).__name__} needs loss_fn with reduction='mean' (the curvature of the mean "
                             f"loss; batches are weighted by their rows), got reduction={loss_fn.reduction!r}: with "
                             "'sum' the result would scale with the batch size")
        self.sel = Selection(model, params)
        super().__init__(self.sel.numel, self.sel.dtype, self.sel.device)
        self.model, self.loss_fn = model, loss_fn
        self.data = as_batches(data)
        self.distributed = distributed_active(distributed)
        if (not self.distributed and isinstance(self.data, Sequence)
                and sum(item[1].shape[0] for item in self.data) == 0):
            raise ValueError("data has no examples (every batch has 0 rows): the mean loss is undefined")
        busy = mode_dependent(model)
        if busy:
            warn_user(f"{type(self).__name__}: the model has submodules in training mode whose forward depends on "
                      f"it ({', '.join(busy[:4])}{', ...' if len(busy) > 4 else ''}); the curvature is evaluated "
                      "in eval mode (BatchNorm running statistics, no dropout) and every submodule's mode is "
                      "restored after each product", UserWarning)

    # the model as a function of the selected parameters
    def _forward(self, x, fixed: dict[str, Tensor]):
        args = x if isinstance(x, tuple) else (x,)

        def f(p: dict[str, Tensor]) -> Tensor:
            try:
                out = functional_call(self.model, {**fixed, **p}, args)
            except RuntimeError as exc:
                wrong = dtype_mismatch(args, self.dtype, exc, name="data")
                if wrong is not None:
                    raise wrong from exc
                raise
            if not torch.is_tensor(out):
                raise TypeError(f"the model must return a tensor [N, ...] of outputs, got {type(out).__name__}")
            return out
        return f

    def _batch(self, x, y: Tensor, nb: int, selected: dict, fixed: dict, tangents: dict) -> tuple[dict, float]:
        """The batch's term applied to the block (tangents: name -> [k, *shape]) as (name -> [k, *shape],
        alpha): alpha times the parts is N_b times the batch curvature times the block."""
        raise NotImplementedError

    def _rows(self, y, nb: int) -> int | Tensor:
        """The batch's weight: what its mean loss averages over (default N_b, its rows; a 0-dim
        tensor where it is counted on the device)."""
        return nb

    def _start_pass(self) -> None:
        """Called before each walk over the data (the MC Fisher resets its generator here)."""

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        tangents = self.sel.split(V)
        selected, fixed = self.sel.current()
        # batch sums in float32 at least (a count and many batches in fp16/bf16 would round)
        acc_dtype = torch.promote_types(self.dtype, torch.float32)
        # [k, P]: each batch's parts are added in place as contiguous [k, size] slices (no [P, k]
        # transposed copies per batch); the result is returned as the [P, k] view
        acc = torch.zeros(k, self.shape[0], dtype=acc_dtype, device=self.device)
        n = 0
        self._start_pass()
        with ModeGuard(self.model, False), differentiable_kernels():
            for x, y, nb in iterate(self.data, self.device):
                rows = self._rows(y, nb)
                if isinstance(rows, int):
                    self.sel.accumulate_(acc, *self._batch(x, y, rows, selected, fixed, tangents))
                else:  # a weight on the device (no host read per batch): a batch weighing 0 adds nothing
                    parts, _ = self._batch(x, y, nb, selected, fixed, tangents)
                    w = rows.to(acc_dtype)  # the product in the accumulator's dtype (fp16: |HV| x rows overflows)
                    self.sel.accumulate_(acc, {k: torch.where(w > 0, v.to(acc_dtype) * w, 0)
                                               for k, v in parts.items()}, 1)
                n = n + rows
        n = float(n)  # one host read per pass
        if self.distributed:
            acc, n = all_reduce(acc, n)
        if n == 0:
            raise ValueError("data has no examples (no batch with rows"
                             f"{' on any process' if self.distributed else ''}): the mean loss is undefined")
        return acc.div_(n).to(self.dtype).t()


# forward-over-reverse errors of PyTorch ops, answered by reverse-over-reverse instead:
# F.mse_loss(reduction='mean') mutates a ZeroTensor in its double backward (pytorch/pytorch#123996)
_NO_FORWARD_OVER_REVERSE = ("ZeroTensors are immutable", "forward AD", "forward-mode AD")


def _warn_if_asymmetric(vjp_g, selected) -> None:
    """After the switch to reverse-over-reverse (the model has an op without a forward-over-reverse
    formula), one check that PyTorch's second derivatives are those of a Hessian: u^T (H v) =
    v^T (H u) for two fixed random u, v (the first batch's, two more products). A double backward
    that is wrong (torch.nn.utils.parametrizations.weight_norm's: 35 % asymmetric on an MLP) breaks
    it far beyond rounding: a warning then, as every product, eigenvalue and trace is wrong."""
    leaves, spec = torch.utils._pytree.tree_flatten(selected)
    gen = torch.Generator(device=leaves[0].device).manual_seed(0)
    u, v = ([torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in leaves] for _ in range(2))
    hu, hv = (torch.utils._pytree.tree_flatten(vjp_g(torch.utils._pytree.tree_unflatten(w, spec))[0])[0]
              for w in (u, v))
    dot = lambda a, b: sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))  # noqa: E731
    norm = lambda a: math.sqrt(dot(a, a))  # noqa: E731
    scale = norm(u) * norm(hv) + norm(v) * norm(hu)
    gap = abs(dot(u, hv) - dot(v, hu)) / scale if scale > 0 else 0.0
    if gap > 10 * math.sqrt(torch.finfo(leaves[0].dtype).eps):
        warn_user(f"hessian: the model needs reverse-over-reverse products (an op without a forward-over-reverse "
                  f"formula), and PyTorch's second derivatives of it are not symmetric (u^T H v and v^T H u differ by "
                  f"{gap:.2g} of their scale): a double backward in the model is wrong (e.g. "
                  "torch.nn.utils.parametrizations.weight_norm's), so are the products, eigenvalues and traces; "
                  "write that op out with plain torch ops (weight norm: g * v / v.norm(dim=1, keepdim=True))",
                  RuntimeWarning)


class HessianOperator(_ModelCurvature):
    """The Hessian of the mean loss (see the module docstring); built by :func:`hessian`.

    Products are forward-over-reverse (jvp of the gradient) by default; when the model or loss
    uses an op whose forward-over-reverse derivative PyTorch cannot compute (e.g. ``F.mse_loss``,
    pytorch/pytorch#123996), the operator switches to reverse-over-reverse (vjp of the gradient,
    the same matrix by symmetry) for good. ``hvp_mode`` says which one is in use."""

    hvp_mode = "forward-over-reverse"
    _check_symmetry = False  # set once by the switch to reverse-over-reverse (_warn_if_asymmetric)

    def __init__(self, model, loss_fn, data, params=None, distributed=None):
        super().__init__(model, loss_fn, data, params, distributed)
        self._ignore = ignore_index(loss_fn)

    def _rows(self, y, nb: int) -> int | Tensor:
        """What a batch's mean loss averages over: for cross-entropy with class targets ([N] or
        [N, d1, ...]), the class weights (1 without) of the targets that are not ``ignore_index``,
        summed on the device, so batches weigh by them and the operator is the Hessian of the
        mean over every kept target of the data, however it is batched; else N_b."""
        if self._ignore is None or not torch.is_tensor(y) or y.is_floating_point() or y.dtype == torch.bool:
            return nb
        kept = y != self._ignore
        weight = getattr(self.loss_fn, "weight", None)
        if weight is None:
            return kept.sum().to(torch.float64)
        return torch.where(kept, weight.to(torch.float64)[torch.where(kept, y, 0)], 0).sum()

    def _batch(self, x, y, nb, selected, fixed, tangents):
        f = self._forward(x, fixed)
        loss_fn = self.loss_fn

        def loss(p):
            value = loss_fn(f(p), y)
            if not torch.is_tensor(value) or value.dim() != 0:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar (the batch's mean loss), got {shape}; use "
                                 "reduction='mean'")
            return value
        g = grad(loss)
        if self.hvp_mode == "forward-over-reverse":
            # d/dt grad(loss)(theta + t v), vmapped over the k tangents
            try:
                HV = vmap(lambda t: jvp(g, (selected,), (t,))[1])(tangents)
                return HV, nb
            except RuntimeError as exc:  # ops without a working forward-over-reverse formula
                if not any(s in str(exc) for s in _NO_FORWARD_OVER_REVERSE):
                    raise
                self.hvp_mode = "reverse-over-reverse"
                self._check_symmetry = True
        # the vjp of the gradient (H is symmetric: v^T H = (H v)^T), vmapped over the k tangents
        _, vjp_g = vjp(g, selected)
        if self._check_symmetry:
            self._check_symmetry = False
            _warn_if_asymmetric(vjp_g, selected)
        (HV,) = vmap(vjp_g)(tangents)
        return HV, nb


class _OutputSpaceOperator(_ModelCurvature):
    """J^T M J operators: J V by jvp (vmapped over k), an output-space matrix M per example, J^T by
    vjp (vmapped over k). Subclasses give M through :meth:`_output_matrix`."""

    def __init__(self, model, loss_fn, data, params=None, distributed=None):
        self.kind = loss_kind(loss_fn, self.what)
        self._ignore = ignore_index(loss_fn)
        super().__init__(model, loss_fn, data, params, distributed)

    def _output_matrix(self, out: Tensor, out2: Tensor, y: Tensor, nb: int):
        """Return M: U [N, C, k] -> [N, C, k], the batch's N_b-weighted output-space matrix (out
        as the model returned it, out2 the same [N, C])."""
        raise NotImplementedError

    def _check_targets(self, out: Tensor, y: Tensor) -> None:
        """The batch's targets against the outputs. The GGN and the MC Fisher never read the
        targets, so without this wrong ones (class 7 of 3, MSE targets [N] for outputs [N, 1]
        that the loss would broadcast to [N, N]) would pass silently. One host read per batch
        (integer class targets only), as the ignore_index check needs anyway."""
        if self.kind == "gaussian_natural":  # natural parameters [N, 2D] (eta2 < 0), targets [N, D] or [N] for D = 1
            D = check_natural(out.detach().reshape(out.shape[0], -1), f"{self.what}: the model's outputs")
            natural_targets(y, out.detach().reshape(out.shape[0], 2 * D))
            return
        if self.kind != "cross_entropy" or y.is_floating_point():
            if y.shape != out.shape:
                what = "class probabilities" if self.kind == "cross_entropy" else "targets"
                raise ValueError(f"{self.what}: the {what} must have the outputs' shape {tuple(out.shape)}, got "
                                 f"{tuple(y.shape)}{' (y.view_as(outputs))' if y.numel() == out.numel() else ''}")
            return
        C = out.shape[1]
        if y.shape != out.shape[:1] or y.dtype == torch.bool:
            raise ValueError(f"{self.what} with cross-entropy needs class targets [N] = {tuple(out.shape[:1])} of "
                             f"integers in [0, {C}) or probabilities [N, C] like the outputs, got {y.dtype} "
                             f"{tuple(y.shape)}")
        bad = (y < 0) | (y >= C)
        if self._ignore is not None:
            bad = bad | (y == self._ignore)
        if bool(bad.any()):  # the one host read; the error's details only on this path
            if self._ignore is not None and bool((y == self._ignore).any()):
                raise ValueError(f"targets contain ignore_index = {self._ignore}: mean-reduced cross-entropy then "
                                 f"averages over fewer rows than the batch has, which {self.what} does not model; "
                                 "drop those rows from the data")
            raise ValueError(f"{self.what}: class targets must be in [0, {C}) for outputs with {C} classes, got "
                             f"values from {int(y.min())} to {int(y.max())}")

    def _batch(self, x, y, nb, selected, fixed, tangents):
        f = self._forward(x, fixed)
        out, vjp_fn = vjp(f, selected)
        if out.dim() == 0 or out.shape[0] != nb:
            raise ValueError(f"the model's outputs must be [N, ...] with N = {nb} rows (the targets' batch size), "
                             f"got {tuple(out.shape)}")
        if self.kind == "cross_entropy" and out.dim() != 2:
            raise ValueError(f"{self.what} with cross-entropy needs outputs [N, C] (logits), got {tuple(out.shape)}")
        self._check_targets(out, y)
        out2 = out.detach().reshape(nb, -1)
        M = self._output_matrix(out, out2, y, nb)
        JV = vmap(lambda t: jvp(f, (selected,), (t,))[1])(tangents)  # [k, *out.shape]
        k = JV.shape[0]
        MJV = M(JV.reshape(k, nb, -1).permute(1, 2, 0))  # [N, C, k]
        cot = MJV.permute(2, 0, 1).reshape(k, *out.shape).to(out.dtype)
        (JtMJV,) = vmap(vjp_fn)(cot)
        return JtMJV, 1.0

    def _scale(self, C: int) -> float:
        """Weight of one example's term in the batch sum: 1 for cross-entropy (the mean runs over
        rows), 1 / C for BCE and MSE (the mean runs over all N C elements), 1 / D for the Gaussian
        in natural parameters (over the N D targets of its C = 2D outputs)."""
        return 1.0 if self.kind == "cross_entropy" else 1.0 / self._per_row(C)

    def _per_row(self, C: int) -> int:
        """Terms of the mean loss per row: C (BCE, MSE), C / 2 (natural Gaussian), 1 (cross-entropy)."""
        return 1 if self.kind == "cross_entropy" else C // 2 if self.kind == "gaussian_natural" else C


class GGNOperator(_OutputSpaceOperator):
    """The generalised Gauss-Newton matrix of the mean loss (module docstring); built by :func:`ggn`."""

    what = "ggn"

    def _output_matrix(self, out, out2, y, nb):
        scale = self._scale(out2.shape[1])
        kind = self.kind
        return lambda U: ops.loss_hessian(kind, out2, U.contiguous(), "hessian") * scale


class FisherOperator(_OutputSpaceOperator):
    """The empirical or Monte-Carlo Fisher of the mean loss (module docstring); built by :func:`fisher`."""

    what = "fisher"

    def __init__(self, model, loss_fn, data, kind="mc", mc_samples=1, generator=None, params=None,
                 distributed=None):
        if kind not in ("mc", "empirical"):
            raise ValueError(f"kind must be 'mc' or 'empirical', got {kind!r}")
        mc_samples = check_int(mc_samples, "mc_samples", 1)
        check_generator(generator)
        super().__init__(model, loss_fn, data, params, distributed)
        self.fisher_kind, self.mc_samples = kind, mc_samples
        if kind == "mc":
            if shuffles(self.data):
                raise ValueError("the MC Fisher draws its targets batch by batch from one generator state, so every "
                                 "product needs the same batches in the same order: pass a DataLoader with "
                                 "shuffle=False and a sequential sampler (or a list of batches)")
            if generator is None:  # a seed from torch's global RNG: torch.manual_seed makes it reproducible
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(torch.randint(0, 2 ** 62, ())))
            if generator.device.type != self.device.type:
                raise ValueError(f"generator is on {generator.device} but the parameters are on {self.device}: "
                                 f"pass torch.Generator(device='{self.device}')")
            # every product restarts from this state: the operator is one fixed draw of the MC Fisher
            self._gen = torch.Generator(device=generator.device)
            self._gen_state = generator.get_state()
        elif generator is not None or mc_samples != 1:
            raise ValueError("generator and mc_samples apply to kind='mc' only")

    def _start_pass(self):
        if self.fisher_kind == "mc":
            self._gen.set_state(self._gen_state)

    def _output_matrix(self, out, out2, y, nb):
        N, C = out2.shape
        scale = self._scale(C)
        if self.fisher_kind == "empirical":
            # g_n = d l_n / d f_n at the data's targets: the batch loss's gradient times N_b (CE)
            # or N_b C (BCE, MSE; N_b D for the natural Gaussian), undoing the mean reduction (l_n sums
            # over its elements)
            loss_fn = self.loss_fn
            g = grad(lambda o: loss_fn(o, y))(out.detach()).reshape(N, C)
            g = g * (nb * self._per_row(C))
            return lambda U: (g.unsqueeze(-1) * torch.einsum("nc,nck->nk", g, U).unsqueeze(1)) * scale
        r = self._draw(out2)  # [S, N, C]
        S = r.shape[0]
        return lambda U: torch.einsum("snc,snk->nck", r, torch.einsum("snc,nck->snk", r, U)) * (scale / S)

    def _draw(self, out2: Tensor) -> Tensor:
        """r = d l / d f at S targets per example sampled from the predictive: [S, N, C]."""
        S, (N, C), g = self.mc_samples, out2.shape, self._gen
        work = torch.promote_types(out2.dtype, torch.float32)  # sampling in float32 at least
        f = out2.to(work)
        if self.kind == "cross_entropy":
            p = torch.softmax(f, 1)
            y = torch.multinomial(p, S, replacement=True, generator=g)  # [N, S]
            r = p.unsqueeze(0) - torch.nn.functional.one_hot(y.t(), C).to(work)
        elif self.kind == "bce":
            s = torch.sigmoid(f).unsqueeze(0).expand(S, N, C)
            r = s - torch.bernoulli(s, generator=g)
        elif self.kind == "gaussian_natural":  # y ~ N(mu, s2), r = (mu - y, mu^2 + s2 - y^2)
            mu, s2 = natural_to_mean_var(f)
            y = mu + s2.sqrt() * torch.randn(S, N, C // 2, generator=g, dtype=work, device=f.device)
            r = natural_gradient(f.expand(S, N, C), y)
        else:  # y ~ N(f, I / 2), r = 2 (f - y) ~ 2 N(0, I / 2)
            r = 2 * math.sqrt(0.5) * torch.randn(S, N, C, generator=g, dtype=work, device=f.device)
        return r.to(out2.dtype)


# ---- public constructors ------------------------------------------------------------------------------
def hessian(model: nn.Module, loss_fn, data, params=None, *, distributed: bool | None = None) -> HessianOperator:
    """The Hessian of the mean loss over ``data`` w.r.t. the model's parameters, as an operator.

    Args:
        model: the network; outputs = ``model(inputs)`` (or ``model(*inputs)`` for a tuple).
        loss_fn: ``(outputs, targets) -> scalar`` with mean reduction (any loss).
        data: one ``(inputs, targets)`` batch (inputs [N_b, ...], a tuple / list of tensors, or a
            dict batch passed whole as the model's one argument; targets [N_b, ...]) or a
            re-iterable of them (list, DataLoader); batch b weighted N_b / N.
        params: None (all trainable parameters) or a list of the model's Parameters / their names;
            the flat vector follows model order.
        distributed: None: sum over processes when torch.distributed is initialised; False: never.

    Returns:
        :class:`HessianOperator`, shape (P, P): ``op @ v`` ([P] -> [P]), ``op @ V`` ([P, k] ->
        [P, k], one data pass by forward-over-reverse vmapped over the k vectors), ``diagonal()``
        [P], ``to_dense()`` [P, P]. Evaluated at the model's weights at product time, in eval mode.
    """
    return HessianOperator(model, loss_fn, data, params, distributed)


def ggn(model: nn.Module, loss_fn, data, params=None, *, distributed: bool | None = None) -> GGNOperator:
    """The generalised Gauss-Newton matrix c sum_n J_n^T H_n J_n of the mean loss (module docstring).

    Args: as :func:`hessian`, but ``loss_fn`` must be cross-entropy (outputs [N, C] logits,
    targets [N] classes or [N, C] probabilities), BCE-with-logits or MSE (outputs [N, ...],
    flattened to C numbers per example), mean reduction, no class weights.

    Returns:
        :class:`GGNOperator`, shape (P, P): ``op @ V`` for V [P, k] -> [P, k] computes J V by
        jvp, the output-space Hessian with ``pyfastbayes.ops.loss_hessian`` and J^T by vjp, each
        vmapped over the k vectors; ``diagonal()`` [P], ``to_dense()`` [P, P].
    """
    return GGNOperator(model, loss_fn, data, params, distributed)


def fisher(model: nn.Module, loss_fn, data, kind: str = "mc", mc_samples: int = 1,
           generator: torch.Generator | None = None, params=None, *,
           distributed: bool | None = None) -> FisherOperator:
    """The Fisher of the mean loss: 'empirical' (gradient outer products at the data's targets) or
    'mc' (at targets sampled from the model's predictive, ``mc_samples`` per example; unbiased
    for the GGN). Definitions and scalings in the module docstring.

    Args: as :func:`ggn`, plus ``kind`` ('mc' | 'empirical'), ``mc_samples`` (S >= 1, 'mc' only)
    and ``generator`` (a torch.Generator on the parameters' device type, 'mc' only; its state
    at construction fixes the draws, it is not advanced; None: seeded from torch's global RNG).
    With several processes, seed each rank's generator differently for independent draws.

    Returns:
        :class:`FisherOperator`, shape (P, P): ``op @ V`` ([P, k] -> [P, k]) in one data pass
        without forming any P x P matrix or per-example gradient; ``diagonal()``, ``to_dense()``.
    """
    return FisherOperator(model, loss_fn, data, kind, mc_samples, generator, params, distributed)
