"""Typed wrappers over ``torch.ops.pyfastbayes.*``, one module per op family.

This package is the only place that touches ``torch.ops.pyfastbayes`` or the pure-PyTorch
references (:mod:`pyfastbayes._reference`). Each wrapper runs the native kernel when the extension
has one for the tensors' device and the reference otherwise (same numbers, same random stream);
``backend='native'|'reference'`` forces one, :func:`default_backend` sets the default for a block.
Each module also registers the op's fake kernel (shapes only, with ``torch._check`` argument
checks) so ``torch.compile`` traces through it. Slot layouts: :mod:`pyfastbayes.ops.layouts`.
"""
from . import layouts
from ._dispatch import BACKENDS, default_backend, native_op, select
from .calibration import calibration_bins
from .curvature import loss_hessian
from .kfac import kfac_factor_
from .landscape import landscape_bias_act_, landscape_combine, landscape_points_
from .layouts import CALIB_DIAG, CALIB_STATS, HYPER, RNG, SWAG
from .._reference._checks import KERNEL_DTYPES  # the dtypes every kernel takes (defined once, with the reference)
from .random import philox4x32, philox_normal_, rng_snapshot
from .sgmcmc import any_nonfinite, psgld_step_, sghmc_step_, sgld_step_
from .swag import swag_collect_, swag_sample
from .vi import (vi_kl, vi_kl_backward, vi_local_noise, vi_local_noise_backward, vi_rademacher_, vi_rademacher_mul,
                 vi_sample, vi_sample_and_backward, vi_sample_backward, vi_sigma_sq, vi_sigma_sq_and_backward_,
                 vi_sigma_sq_backward_, vi_weight_kl, vi_weight_kl_backward_, WEIGHT_PERTURBATION, WEIGHT_SAMPLE,
                 WEIGHT_VARIANCE)

__all__ = ["philox4x32", "philox_normal_", "rng_snapshot", "sgld_step_", "sghmc_step_", "psgld_step_", "any_nonfinite",
           "calibration_bins", "loss_hessian", "swag_collect_", "swag_sample", "native_op", "select", "default_backend",
           "landscape_points_", "landscape_combine", "landscape_bias_act_", "kfac_factor_", "vi_sample",
           "vi_sample_backward", "vi_sample_and_backward", "vi_local_noise",
           "vi_local_noise_backward", "vi_rademacher_", "vi_rademacher_mul", "vi_kl", "vi_kl_backward",
           "vi_sigma_sq", "vi_sigma_sq_backward_", "vi_sigma_sq_and_backward_", "vi_weight_kl",
           "vi_weight_kl_backward_", "WEIGHT_SAMPLE", "WEIGHT_PERTURBATION", "WEIGHT_VARIANCE", "BACKENDS",
           "layouts", "HYPER", "RNG", "CALIB_STATS", "CALIB_DIAG", "SWAG", "KERNEL_DTYPES"]
