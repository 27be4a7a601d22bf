"""Choosing a subnetwork for ``Laplace(..., subset_of_weights='subnetwork')``: laplace-torch's
subnetwork masks under the same names (``select(train_loader)`` returns the sorted flat indices
[k], int64), over the flat vector of the model's trainable parameters
(:class:`pyfastbayes.nn.ParamLayout`, the order of ``model.named_parameters()``, frozen ones
left out: the vector :class:`~pyfastbayes.laplace.Laplace` indexes).

- :class:`LargestMagnitudeSubnetMask`, :class:`RandomSubnetMask`: the k largest |theta| / k at random.
- :class:`LargestVarianceDiagLaplaceSubnetMask`: the k largest marginal variances of a diagonal
  Laplace over all weights (Daxberger et al. 2021's choice).
- :class:`LargestVarianceSWAGSubnetMask`: the k largest diagonal SWAG variances (of a collected
  :class:`~pyfastbayes.posteriors.SWAG`, or collected here by SGD from a copy of the model).
- :class:`ParamNameSubnetMask`, :class:`ModuleNameSubnetMask`, :class:`LastLayerSubnetMask`: whole
  parameters, modules, or the last module with parameters the forward calls.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration._checks import check_int, check_positive_float
from ..nn import ModeGuard, ParamLayout
from ..nn.calls import parameter_calls

__all__ = ["SubnetMask", "ScoreBasedSubnetMask", "RandomSubnetMask", "LargestMagnitudeSubnetMask",
           "LargestVarianceDiagLaplaceSubnetMask", "LargestVarianceSWAGSubnetMask", "ParamNameSubnetMask",
           "ModuleNameSubnetMask", "LastLayerSubnetMask"]


class SubnetMask:
    """Base class: ``select(train_loader=None)`` -> indices [k] (sorted int64, on the model's
    device), once; then ``indices`` and ``n_params_subnet``. ``n_params``: P, the trainable
    parameters' count."""

    needs_loader = False

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.layout = ParamLayout(model, owner="subnetwork mask")
        self.n_params = self.layout.numel
        self._indices: Tensor | None = None

    @property
    def indices(self) -> Tensor:
        if self._indices is None:
            raise RuntimeError("the subnetwork is not selected yet: call select(train_loader) first")
        return self._indices

    @property
    def n_params_subnet(self) -> int:
        return self.indices.numel()

    def select(self, train_loader=None) -> Tensor:
        """The subnetwork's flat indices [k] (sorted int64); ``train_loader`` (batches (x, y)) for
        the masks that need data. A mask selects once (a second call raises)."""
        if self._indices is not None:
            raise RuntimeError("this mask has selected its subnetwork already (see .indices): make a new mask to "
                               "select again")
        if self.needs_loader and train_loader is None:
            raise ValueError(f"{type(self).__name__}.select needs train_loader (batches of (inputs, targets))")
        mask = self.get_subnet_mask(train_loader)
        if not bool(mask.any()):
            raise ValueError("the subnetwork mask selects no parameter")
        self._indices = mask.nonzero().flatten()
        return self._indices

    def get_subnet_mask(self, train_loader) -> Tensor:
        """A boolean mask [P] of the selected entries."""
        raise NotImplementedError(f"{type(self).__name__} must define get_subnet_mask")

    def _mask_of(self, names: set[str]) -> Tensor:
        parts = [torch.full((int(torch.Size(s).numel()),), n in names, dtype=torch.bool, device=self.layout.device)
                 for n, s in zip(self.layout.names, self.layout.shapes)]
        return torch.cat(parts)


class ScoreBasedSubnetMask(SubnetMask):
    """The ``n_params_subnet`` entries of the highest score (:meth:`compute_param_scores` [P]);
    among equal scores the lower indices."""

    def __init__(self, model: nn.Module, n_params_subnet: int):
        super().__init__(model)
        self._n = check_int(n_params_subnet, "n_params_subnet", 1)
        if self._n > self.n_params:
            raise ValueError(f"n_params_subnet = {self._n} is more than the model's {self.n_params} trainable "
                             "parameters")

    def compute_param_scores(self, train_loader) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define compute_param_scores")

    def get_subnet_mask(self, train_loader) -> Tensor:
        scores = self.compute_param_scores(train_loader)
        if scores.shape != (self.n_params,):
            raise ValueError(f"parameter scores must have shape [{self.n_params}], got {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("parameter scores must be finite (a NaN weight or variance?)")
        # ties (e.g. the prior's variance of every weight without curvature) go to the lower index:
        # a stable sort, the same choice on every device
        top = torch.sort(scores.double(), descending=True, stable=True).indices[:self._n]
        mask = torch.zeros(self.n_params, dtype=torch.bool, device=scores.device)
        mask[top] = True
        return mask


class RandomSubnetMask(ScoreBasedSubnetMask):
    """``n_params_subnet`` entries uniformly at random (``generator``: a torch.Generator on the
    model's device, for reproducible draws)."""

    def __init__(self, model: nn.Module, n_params_subnet: int, generator: torch.Generator | None = None):
        super().__init__(model, n_params_subnet)
        self.generator = generator

    def compute_param_scores(self, train_loader) -> Tensor:
        return torch.rand(self.n_params, generator=self.generator, device=self.layout.device)


class LargestMagnitudeSubnetMask(ScoreBasedSubnetMask):
    """The ``n_params_subnet`` weights of the largest |theta|."""

    def compute_param_scores(self, train_loader) -> Tensor:
        return self.layout.flatten(self.model).detach().abs()


class LargestVarianceDiagLaplaceSubnetMask(ScoreBasedSubnetMask):
    """The ``n_params_subnet`` weights of the largest marginal variance under
    ``diag_laplace_model``, a :class:`~pyfastbayes.laplace.Laplace` with
    hessian_structure='diag' over all weights of ``model``, fitted on ``train_loader`` here."""

    needs_loader = True

    def __init__(self, model: nn.Module, n_params_subnet: int, diag_laplace_model):
        super().__init__(model, n_params_subnet)
        if getattr(diag_laplace_model, "kind", None) != "Laplace" or \
                getattr(diag_laplace_model, "hessian_structure", None) != "diag" or \
                getattr(diag_laplace_model, "subset_of_weights", None) != "all":
            raise TypeError("diag_laplace_model must be a pyfastbayes.laplace.Laplace(model, ..., subset_of_weights="
                            "'all', hessian_structure='diag')")
        if diag_laplace_model.model is not model:
            raise ValueError("diag_laplace_model must be a Laplace of this same model")
        self.diag_laplace_model = diag_laplace_model

    def compute_param_scores(self, train_loader) -> Tensor:
        la = self.diag_laplace_model
        la.fit(train_loader, progress=False)
        scores = torch.zeros(self.n_params, dtype=la.dtype, device=la.device)
        scores[la.positions] = la.posterior_variance.detach()
        return scores


class LargestVarianceSWAGSubnetMask(ScoreBasedSubnetMask):
    """The ``n_params_subnet`` weights of the largest diagonal SWAG variance.

    ``swag``: a :class:`~pyfastbayes.posteriors.SWAG` of ``model`` with collected models (its
    ``variance()`` is used; no data needed). Without it, as laplace-torch does, a copy of the
    model is trained by SGD (``swag_lr``, momentum 0.9, weight decay 3e-4; cross-entropy for
    'classification', mean squared error for 'regression') on ``train_loader`` for
    ``swag_n_snapshots * swag_snapshot_freq`` epochs, one snapshot every ``swag_snapshot_freq``
    epochs; the model itself is not changed."""

    def __init__(self, model: nn.Module, n_params_subnet: int, likelihood: str = "classification",
                 swag_n_snapshots: int = 40, swag_snapshot_freq: int = 1, swag_lr: float = 0.01, swag=None,
                 progress: bool = False):
        super().__init__(model, n_params_subnet)
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"likelihood must be 'classification' or 'regression', got {likelihood!r}")
        self.likelihood = likelihood
        self.swag_n_snapshots = check_int(swag_n_snapshots, "swag_n_snapshots", 2)
        self.swag_snapshot_freq = check_int(swag_snapshot_freq, "swag_snapshot_freq", 1)
        self.swag_lr = check_positive_float(swag_lr, "swag_lr")
        if swag is not None and getattr(swag, "kind", None) != "SWAG":
            raise TypeError(f"swag must be a pyfastbayes.posteriors.SWAG, got {type(swag).__name__}")
        if swag is not None and swag.layout != self.layout:
            raise ValueError(f"swag is not a SWAG of this model: {swag.layout.difference(self.layout, 'swag', 'model')}")
        self.swag, self.progress = swag, progress
        self.needs_loader = swag is None

    def compute_param_scores(self, train_loader) -> Tensor:
        if self.swag is None:
            self.swag = self._collect(train_loader)
        return self.swag.variance().to(self.layout.device)

    def _collect(self, train_loader):
        from ..posteriors import SWAG
        net = copy.deepcopy(self.model)
        swag = SWAG(net, max_rank=0)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=self.swag_lr, momentum=0.9,
                              weight_decay=3e-4)
        loss_fn = nn.CrossEntropyLoss() if self.likelihood == "classification" else nn.MSELoss()
        epochs = self.swag_n_snapshots * self.swag_snapshot_freq
        with ModeGuard(net, True):
            for epoch in tqdm(range(epochs), desc="SWAG snapshots", disable=not self.progress):
                for x, y in ((b[0], b[1]) for b in train_loader):
                    opt.zero_grad(set_to_none=True)
                    out = net(x.to(self.layout.device))
                    y = y.to(out.device)
                    loss_fn(out, y if self.likelihood == "classification" else y.reshape(out.shape)).backward()
                    opt.step()
                if (epoch + 1) % self.swag_snapshot_freq == 0:
                    swag.collect(net)
        return swag


def _names(value, name: str, what: str) -> list[str]:
    if isinstance(value, str) or not hasattr(value, "__iter__") or not all(isinstance(n, str) for n in value):
        raise TypeError(f"{name} must be a list of {what} names (str)")
    return list(value)


class ParamNameSubnetMask(SubnetMask):
    """Every entry of the named trainable parameters (names as in ``model.named_parameters()``)."""

    def __init__(self, model: nn.Module, parameter_names: list[str]):
        super().__init__(model)
        self.parameter_names = _names(parameter_names, "parameter_names", "parameter")

    def get_subnet_mask(self, train_loader) -> Tensor:
        if not self.parameter_names:
            raise ValueError("parameter_names is empty")
        unknown = [n for n in self.parameter_names if n not in self.layout.names]
        if unknown:
            raise ValueError(f"parameters {unknown} are not trainable parameters of the model (trainable: "
                             f"{list(self.layout.names)[:12]})")
        return self._mask_of(set(self.parameter_names))


class ModuleNameSubnetMask(SubnetMask):
    """Every trainable entry of the named modules (names as in ``model.named_modules()``; a module
    covers its own parameters and its children's)."""

    def __init__(self, model: nn.Module, module_names: list[str]):
        super().__init__(model)
        self.module_names = _names(module_names, "module_names", "module")

    def get_subnet_mask(self, train_loader) -> Tensor:
        if not self.module_names:
            raise ValueError("module_names is empty")
        modules = dict(self.model.named_modules())
        names = set()
        for m in self.module_names:
            if m not in modules:
                raise ValueError(f"module {m!r} is not a module of the model")
            prefix = f"{m}." if m else ""
            own = {prefix + k for k, _ in modules[m].named_parameters()} & set(self.layout.names)
            if not own:
                raise ValueError(f"module {m!r} has no trainable parameters")
            names |= own
        return self._mask_of(names)


class LastLayerSubnetMask(ModuleNameSubnetMask):
    """The last module with trainable parameters that the forward calls (found on the first
    batch of ``train_loader``), or the module ``last_layer_name``."""

    def __init__(self, model: nn.Module, last_layer_name: str | None = None):
        super().__init__(model, [] if last_layer_name is None else [last_layer_name])
        self.needs_loader = last_layer_name is None

    def get_subnet_mask(self, train_loader) -> Tensor:
        if not self.module_names:
            batch = next(iter(train_loader), None)
            if batch is None:
                raise ValueError("train_loader is empty")
            x = batch if isinstance(batch, Mapping) else batch[0]
            x = x.to(self.layout.device) if torch.is_tensor(x) else x
            with ModeGuard(self.model, False):
                calls = parameter_calls(self.model, x)
            trainable = set(self.layout.names)
            found = [n for n, m, _ in calls
                     if any((f"{n}.{k}" if n else k) in trainable for k, _ in m.named_parameters(recurse=False))]
            if not found:
                raise ValueError("the forward called no module with trainable parameters")
            self.module_names = [found[-1]]
        return super().get_subnet_mask(train_loader)
