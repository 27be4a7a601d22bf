"""Model plumbing shared by every posterior.

- :class:`ParamLayout` (params.py): a model's trainable named parameters <-> one flat [P] vector
  (``flatten``, ``unflatten`` for ``torch.func.functional_call``, ``write_`` in place), checked
  against the model at every access.
- :func:`update_bn`, :func:`refresh_bn`, :class:`ModeGuard` (batchnorm.py): BatchNorm statistics
  for the current weights (torch's ``update_bn`` call form) and the train/eval mode guard.
- :func:`iterate_inputs` and the ``input_fn`` / ``output_fn`` adapters (inputs.py): what is fed to
  the model and what it returns.
- :class:`NaturalHead`, :class:`NaturalGaussianNLLLoss` (gaussian.py): heteroscedastic Gaussian
  regression in natural parameters (outputs [N, 2D]), the loss the curvature operators and
  ``Laplace(likelihood='heteroscedastic_regression')`` take.
- :func:`~pyfastbayes.nn.loaders.batches` (loaders.py): a loader's batches, a DataLoader over a
  TensorDataset taken from its tensors directly (the same batches and random draws).
"""
from .batchnorm import ModeGuard, bn_modules, refresh_bn, update_bn
from .gaussian import NaturalGaussianNLLLoss, NaturalHead, mean_var_to_natural, natural_to_mean_var
from .inputs import iterate_inputs
from .params import ParamLayout

__all__ = ["ParamLayout", "update_bn", "refresh_bn", "bn_modules", "ModeGuard", "iterate_inputs", "NaturalHead",
           "NaturalGaussianNLLLoss", "natural_to_mean_var", "mean_var_to_natural"]
