"""What the model curvature operators (models.py) are built from: the data, the loss, the
parameters, the train/eval mode and the cross-process reduction, each checked once here.

- :func:`as_batches`: ``data`` (one ``(inputs, targets)`` batch or a re-iterable of them) as
  something to walk once per product.
- :func:`loss_kind`: which of the supported losses ``loss_fn`` is ('cross_entropy', 'bce',
  'mse', the kinds of :func:`pyfastbayes.ops.loss_hessian`), refusing what the output-space
  Hessian cannot represent (class weights, ``pos_weight``, other reductions).
- :class:`Selection`: the differentiated parameters (all trainable ones, or ``params=``) in model
  order, and their flat [P] <-> per-tensor [k, *shape] conversions.
- :func:`mode_dependent`: the submodules whose forward depends on train/eval mode.
- :func:`all_reduce`: the one collective per product when torch.distributed is initialised.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.gaussian import NaturalGaussianNLLLoss
from ..nn.loaders import batches
from ..nn.rows import rows_to
from ..nn.params import ParamLayout
from .._distributed import distributed_active  # noqa: F401  (models.py imports it from here)

Batch = tuple  # (inputs, targets): inputs a tensor, a tuple of positional model arguments, or a dict batch


# ---- data ---------------------------------------------------------------------------------------------
def _is_batch(obj) -> bool:
    """One (inputs, targets) pair: a 2-tuple/list whose targets are a tensor and whose inputs are a
    tensor, a tuple or list of them (a DataLoader's default collation makes a list of a dataset's
    tuple of inputs; a list of two batches has a pair, not a tensor, second), or a dict batch
    (HuggingFace style, the model's one argument: a mapping holding tensors)."""
    return (isinstance(obj, (tuple, list)) and len(obj) == 2 and torch.is_tensor(obj[1])
            and (torch.is_tensor(obj[0]) or (isinstance(obj[0], (tuple, list)) and len(obj[0]) > 0
                                             and all(torch.is_tensor(a) for a in obj[0]))
                 or (isinstance(obj[0], Mapping) and any(torch.is_tensor(v) for v in obj[0].values()))))


def as_batches(data) -> Iterable:
    """``data`` as a re-iterable of (inputs, targets) batches: a single batch becomes a one-item
    list; a list/tuple of batches is checked now (each item a batch, at least one row in all); a
    DataLoader or other re-iterable is checked as it is walked (:func:`iterate`). One-shot
    iterators (generators) are refused: every product walks the data again."""
    if _is_batch(data):
        data = [tuple(data)]
    elif isinstance(data, tuple) and torch.is_tensor(data[0] if data else None) \
            and not isinstance(data[-1], (tuple, list, Mapping)):
        _refuse_untensored_targets(data, "data")
    if isinstance(data, Mapping):
        raise TypeError(f"data is one dict (keys {list(data)[:6]}); the curvature needs (inputs, targets) pairs: pass "
                        "(batch, batch['labels']) (the dict is the model's one argument), or a list / DataLoader "
                        "of such pairs")
    if isinstance(data, (str, bytes)) or torch.is_tensor(data) or not isinstance(data, Iterable):
        raise TypeError("data must be an (inputs, targets) tuple of tensors or a re-iterable of them (a list of "
                        f"batches, a DataLoader), got {type(data).__name__}")
    if isinstance(data, Iterator):
        raise TypeError("data is a one-shot iterator (e.g. a generator): every product walks the data again, "
                        "pass a list of (inputs, targets) batches or a DataLoader instead")
    if isinstance(data, Sequence):
        for i, item in enumerate(data):
            _check_batch(item, i)
    return data


def _refuse_untensored_targets(pair, what: str) -> None:
    """TypeError naming ``what`` for an (inputs, targets) pair whose targets are not a tensor (a
    numpy array would otherwise make the pair read as a list of batches, its inputs as 'item 0')."""
    if len(pair) == 2 and not torch.is_tensor(pair[1]):
        raise TypeError(f"{what}: the targets must be a tensor, got {type(pair[1]).__name__} (convert them, e.g. "
                        "torch.as_tensor(y))")


def _check_batch(item, i: int) -> None:
    if isinstance(item, Mapping):
        raise TypeError(f"data item {i} is a dict (keys {list(item)[:6]}): give (inputs, targets) pairs, e.g. a "
                        "collate_fn or a list of (batch, batch['labels']) (the dict is the model's one argument)")
    if isinstance(item, (tuple, list)) and (torch.is_tensor(item[0] if item else None)
                                            or isinstance(item[0] if item else None, (Mapping, tuple, list))):
        _refuse_untensored_targets(item, f"data item {i}")
    if not _is_batch(item):
        what = type(item).__name__ if not isinstance(item, (tuple, list)) else f"a {type(item).__name__} of {len(item)}"
        hint = ("; a DataLoader over TensorDataset(x1, x2, y) yields [x1, x2, y]: give the model's inputs as one "
                "item, a dataset of ((x1, x2), y) or a collate_fn returning ((x1, x2), y)"
                if isinstance(item, (tuple, list)) and len(item) > 2 else "")
        raise TypeError(f"data item {i} must be an (inputs, targets) pair of tensors (inputs may be a tuple or list "
                        f"of tensors, or a dict batch), got {what}{hint}")
    if item[1].dim() == 0:
        raise ValueError(f"data item {i}: targets must have a batch dimension [N, ...], got a 0-dim tensor")


def iterate(data: Iterable, device: torch.device) -> Iterator[tuple]:
    """Walk the batches once: (inputs, targets, N_b) moved to ``device``; batches of 0 rows are
    skipped (they add nothing to a sum over examples)."""
    for i, item in enumerate(batches(data)):
        _check_batch(item, i)
        x, y = item
        n = y.shape[0]
        if n == 0:
            continue
        x = tuple(a.to(device) for a in x) if isinstance(x, (tuple, list)) else rows_to(x, device)
        yield x, y.to(device), n


# ---- loss -----------------------------------------------------------------------------------------------
_FUNCTIONAL = {F.cross_entropy: "cross_entropy", F.binary_cross_entropy_with_logits: "bce", F.mse_loss: "mse"}
_MODULES = ((nn.CrossEntropyLoss, "cross_entropy"), (nn.BCEWithLogitsLoss, "bce"), (nn.MSELoss, "mse"),
            (NaturalGaussianNLLLoss, "gaussian_natural"))
SUPPORTED = ("torch.nn.CrossEntropyLoss / F.cross_entropy, torch.nn.BCEWithLogitsLoss / "
             "F.binary_cross_entropy_with_logits, torch.nn.MSELoss / F.mse_loss, "
             "pyfastbayes.nn.NaturalGaussianNLLLoss (reduction='mean')")


def loss_kind(loss_fn, what: str) -> str:
    """'cross_entropy', 'bce', 'mse' or 'gaussian_natural' for the supported losses (module
    instances or the torch functionals, called with their defaults); ValueError for anything else, or for settings that
    change the output-space Hessian (class ``weight``, ``pos_weight``, a reduction other than
    'mean')."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
    if loss_fn in _FUNCTIONAL:
        return _FUNCTIONAL[loss_fn]
    for cls, kind in _MODULES:
        if isinstance(loss_fn, cls):
            if loss_fn.reduction != "mean":
                raise ValueError(f"{what} needs loss_fn with reduction='mean' (the curvature of the mean loss), "
                                 f"got reduction={loss_fn.reduction!r}")
            if getattr(loss_fn, "weight", None) is not None:
                raise ValueError(f"{what} does not support a loss with class/element weights "
                                 f"({cls.__name__}(weight=...)): its output-space Hessian is not the supported one")
            if getattr(loss_fn, "pos_weight", None) is not None:
                raise ValueError(f"{what} does not support BCEWithLogitsLoss(pos_weight=...): the output-space "
                                 "Hessian then depends on the targets")
            return kind
    raise ValueError(f"{what} supports only {SUPPORTED}; got {loss_fn!r}. The Hessian operator "
                     "(pyfastbayes.curvature.hessian) takes any scalar loss")


def ignore_index(loss_fn) -> int | None:
    """The ``ignore_index`` that mean-reduced cross-entropy or NLL would skip rows for (None
    otherwise): their batch mean is over the kept targets (weighted by their classes' weights)."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and loss_fn.reduction == "mean":
        return loss_fn.ignore_index
    if loss_fn is F.cross_entropy or loss_fn is F.nll_loss:
        return -100
    return None


# ---- parameters ----------------------------------------------------------------------------------------
class Selection:
    """The differentiated parameters of ``model`` in model order: all trainable ones (``params``
    None) or the given subset (Parameters of the model or their names, any order, no repeats).

    Attributes: names, shapes, sizes, offsets (in the flat vector), numel (P), dtype (promoted),
    device, layout (the full :class:`ParamLayout`, which checks the model at every access)."""

    def __init__(self, model: nn.Module, params=None):
        self.layout = layout = ParamLayout(model, owner="curvature operator")
        index = {n: i for i, n in enumerate(layout.names)}
        if params is None:
            chosen = list(range(len(layout.names)))
        else:
            if torch.is_tensor(params) or isinstance(params, (str, nn.Module)) or not isinstance(params, Iterable):
                raise TypeError("params must be a list of the model's parameters or of their names "
                                f"(model.named_parameters()), got {type(params).__name__}")
            by_id = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            chosen = []
            for j, p in enumerate(params):
                if isinstance(p, str):
                    if p in frozen:
                        raise ValueError(f"params[{j}] = {p!r} has requires_grad=False: only trainable parameters "
                                         "can be selected")
                    if p not in index:
                        raise ValueError(f"params[{j}] = {p!r} is not a parameter name of the model (see "
                                         f"model.named_parameters(); e.g. {layout.names[-1]!r})")
                    name = p
                elif torch.is_tensor(p):
                    if id(p) not in by_id:
                        raise ValueError(f"params[{j}] (shape {tuple(p.shape)}) is not a trainable parameter of the "
                                         "model: pass the model's own Parameters (or their names)")
                    name = by_id[id(p)]
                else:
                    raise TypeError(f"params[{j}] must be a Parameter of the model or its name, got {type(p).__name__}")
                if index[name] in chosen:
                    raise ValueError(f"params names {name!r} twice")
                chosen.append(index[name])
            if not chosen:
                raise ValueError("params is empty: pass at least one parameter (or params=None for all)")
            chosen.sort()  # the flat vector follows model order whatever order params came in
        self.chosen = chosen
        self.names = tuple(layout.names[i] for i in chosen)
        self.shapes = tuple(layout.shapes[i] for i in chosen)
        self.dtypes = tuple(layout.dtypes[i] for i in chosen)
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.offsets = tuple(sum(self.sizes[:i]) for i in range(len(self.sizes)))
        self.numel = sum(self.sizes)
        dtype = self.dtypes[0]
        for d in self.dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        self.dtype = dtype
        self.device = layout.device

    def current(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(selected, fixed): name -> the model's current parameter values, detached (the model is
        checked against the layout first: RuntimeError if its parameters changed)."""
        ps = self.layout.params()
        sel = set(self.chosen)
        selected = {self.layout.names[i]: ps[i] for i in self.chosen}
        fixed = {n: p for i, (n, p) in enumerate(zip(self.layout.names, ps)) if i not in sel}
        return selected, fixed

    def split(self, V: Tensor) -> dict[str, Tensor]:
        """Block V [P, k] -> name -> [k, *shape] in each parameter's dtype (the vmapped tangents)."""
        k = V.shape[1]
        Vt = V.t()
        return {n: Vt[:, o:o + s].reshape(k, *shape).to(d)
                for n, shape, s, o, d in zip(self.names, self.shapes, self.sizes, self.offsets, self.dtypes)}

    def accumulate_(self, acc: Tensor, parts: dict[str, Tensor], alpha: float) -> None:
        """acc [k, P] += alpha * (name -> [k, *shape]) side by side, in place, slice by slice."""
        k = acc.shape[0]
        for n, s, o in zip(self.names, self.sizes, self.offsets):
            acc[:, o:o + s].add_(parts[n].reshape(k, s), alpha=alpha)


# ---- train/eval mode --------------------------------------------------------------------------------------
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.modules.dropout._DropoutNd, nn.MultiheadAttention, nn.RNNBase)


_KERNELS_LOCK = threading.Lock()
_KERNELS_STATE: dict = {"depth": 0, "fast": None, "sdpa": None}


@contextlib.contextmanager
def differentiable_kernels():
    """Context for the operators' passes: attention through kernels that have the derivatives the
    products take. In eval mode without grad-requiring inputs, nn.MultiheadAttention and
    nn.TransformerEncoderLayer take their fused inference path (``_native_multi_head_attention``,
    ``_transformer_encoder_layer_fwd``), which has no forward-mode derivative (jvp), and the fused
    CPU / CUDA ``scaled_dot_product_attention`` kernels have no second derivative; so the fast path
    is off and SDPA runs its math kernel for the duration. Both are process-wide settings of torch:
    other threads see them too while a pass runs; overlapping passes (threads) count themselves,
    and the last one out restores the settings the first one found."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with _KERNELS_LOCK:
        if _KERNELS_STATE["depth"] == 0:
            _KERNELS_STATE["fast"] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            ctx = sdpa_kernel(SDPBackend.MATH)
            ctx.__enter__()
            _KERNELS_STATE["sdpa"] = ctx
        _KERNELS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _KERNELS_LOCK:
            _KERNELS_STATE["depth"] -= 1
            if _KERNELS_STATE["depth"] == 0:
                _KERNELS_STATE["sdpa"].__exit__(None, None, None)
                torch.backends.mha.set_fastpath_enabled(_KERNELS_STATE["fast"])
                _KERNELS_STATE["sdpa"] = None


def mode_dependent(model: nn.Module) -> list[str]:
    """Names of the submodules in training mode whose forward depends on the mode (BatchNorm,
    InstanceNorm, Dropout, MultiheadAttention, RNNs)."""
    return [n or type(m).__name__ for n, m in model.named_modules()
            if m.training and isinstance(m, _MODE_DEPENDENT)]


def shuffles(data) -> bool:
    """Whether the DataLoader ``data`` draws its batches in a new random order at every pass: a
    random sampler of torch's (RandomSampler, SubsetRandomSampler, WeightedRandomSampler) as its
    sampler, its batch_sampler or the batch_sampler's sampler. (A DistributedSampler's order is
    fixed by its seed and epoch: the same at every pass until set_epoch is called.)"""
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    batch_sampler = getattr(data, "batch_sampler", None)
    for s in (getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if isinstance(s, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
            return True
    return False


# ---- distributed -----------------------------------------------------------------------------------------
def all_reduce(acc: Tensor, n: int) -> tuple[Tensor, float]:
    """Sum acc (any shape) and the example count n over all processes with ONE all_reduce (n travels
    as an extra element of the same buffer); returns (summed acc, total count)."""
    buf = torch.cat([acc.reshape(-1), acc.new_tensor([float(n)])])
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf[:-1].view_as(acc), float(buf[-1].item())
