"""Pure-PyTorch references of every native op, one module per op family.

They are the oracles of the tests and the fallbacks when the extension is absent. Each function
has the signature, in-place behaviour and argument checks (same exception type) of the op of the
same name in ``torch.ops.pyfastbayes`` and draws the same Philox4x32-10 stream, computed here
with int64 tensor arithmetic. Only :mod:`pyfastbayes.ops` imports this package.
"""
from .calibration import calibration_bins, uniform_bin
from .curvature import loss_hessian
from .kfac import kfac_factor_
from .landscape import landscape_bias_act_, landscape_combine, landscape_points_
from .random import philox4x32, philox_normal, philox_normal_, philox_normal_range
from .sgmcmc import any_nonfinite, psgld_step_, sghmc_step_, sgld_step_
from .swag import swag_collect_, swag_sample
from .vi import (vi_kl, vi_kl_backward, vi_local_noise, vi_local_noise_backward, vi_rademacher_, vi_rademacher_mul,
                 vi_sample, vi_sample_and_backward, vi_sample_backward, vi_sigma_sq, vi_sigma_sq_and_backward_,
                 vi_sigma_sq_backward_, vi_weight_kl, vi_weight_kl_backward_)

__all__ = ["philox4x32", "philox_normal", "philox_normal_", "philox_normal_range", "sgld_step_", "sghmc_step_",
           "psgld_step_", "any_nonfinite", "calibration_bins", "uniform_bin", "loss_hessian", "swag_collect_", "swag_sample",
           "landscape_points_", "landscape_combine", "landscape_bias_act_", "kfac_factor_", "vi_sample",
           "vi_sample_backward", "vi_sample_and_backward", "vi_local_noise",
           "vi_local_noise_backward", "vi_rademacher_", "vi_rademacher_mul", "vi_kl", "vi_kl_backward",
           "vi_sigma_sq", "vi_sigma_sq_backward_", "vi_sigma_sq_and_backward_", "vi_weight_kl", "vi_weight_kl_backward_"]
