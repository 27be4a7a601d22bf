"""Reference of the vi family (variational inference; csrc/ops/vi.cpp, math in csrc/common/vi.h).

Section 1, reparameterised noise. With rng = (seed, step) an int64 [2] tensor and a stream id s,
the noise of element i (row-major logical order) is element i of the float32 normal stream
``philox_normal(numel, seed, s, step)`` (:mod:`.random`, Philox4x32-10 in int64 tensor arithmetic,
Box-Muller in float64 rounded to float32): an independent computation of the numbers the kernels
draw with fp32 polynomials (equal to ~2e-6 absolute). The math then runs in float32 (float64 for
float64 tensors) with torch's own functions:

    vi_sample(mu, rho)                    mu + softplus(rho) * eps        (F.softplus: threshold 20)
    vi_sample_backward(grad_w, rho)       grad_w * eps * softplus'(rho)   (1 above 20, else sigmoid)
    vi_sample_and_backward(mu, rho, grad_w)  both of the above, one eps
    vi_local_noise(mean, var)             mean + sqrt(max(var, 0)) * eps
    vi_local_noise_backward(grad_out, var) grad_out * eps / (2 sqrt(var)), 0 where var <= 0
    vi_rademacher_(out)                   -1 where bit i % 32 of word (i // 32) % 4 of Philox block i // 128
                                          is set, else +1
    vi_rademacher_mul(x)                  x * those signs (exact), a new contiguous tensor

eps is float32 in every dtype (for float64 tensors too: the float32 value, converted exactly), so
float64 results agree with the kernels to ~1e-12 given the same eps, and to ~2e-6 * |the noise
term| with this module's eps. The checks (``check_vi_pair``, ``check_vi_rademacher_``) mirror
csrc/checks/vi.h with the same messages. Further ops of the family: a section of their own at the
end of this module.

Section 2, the closed-form KL of mean-field Gaussians q = N(mu, softplus(rho)^2) against zero-mean
Gaussian priors N(0, prior_var[t]), summed over a list of tensor pairs (``vi_kl``), and its
gradients (``vi_kl_backward``), computed here in float64 whatever the inputs' dtype (the kernels:
float32 terms and float32 sums of at most 65 terms, added in float64), cast to the result dtype
(float64 for float64 inputs, float32 otherwise; the gradients in the inputs' dtype). The checks
(``check_vi_kl``) mirror csrc/checks/vi.h: prior_var's values are checked (finite and > 0) only
for a CPU prior_var; on other devices a bad value gives a NaN KL and NaN gradients of its tensor,
as in the CUDA kernels.

Section 3, the local reparameterisation's weight variance, elementwise in float32 (float64 for
float64) with torch's functions: ``vi_sigma_sq(rho)`` = F.softplus(rho)^2, ``vi_sigma_sq_backward_(grad,
rho)`` grad <- grad * (2 softplus(rho) softplus'(rho)) in place (softplus' = 1 above 20, else
sigmoid: torch's softplus_backward), ``vi_sigma_sq_and_backward_(grad, rho)`` both (sigma^2
returned). The checks (``check_vi_sigma_sq``) mirror csrc/checks/vi.h.

Section 4, a layer's weight function with its KL term: ``vi_weight_kl`` (w = mu + sigma eps,
sigma eps or sigma^2 by ``kind``, with section 2's KL of the one tensor) and
``vi_weight_kl_backward_`` (grad_rho / grad_mu in place: the data gradient through w plus section
2's KL gradients), from the functions above. The checks mirror csrc/checks/vi.h.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.layouts import RNG
from ._checks import (KERNEL_DTYPES, OverlapCheck, check, check_dense, check_meta_mix, dispatch_device_type, is_fake,
                      num, scalar_type, sizes)
from .random import philox4x32, philox_normal

# ======================= Section 1: reparameterised noise =======================================

_SOFTPLUS_THRESHOLD = 20.0  # kViSoftplusThreshold (csrc/common/vi.h), torch's default
_MASK = 0xFFFFFFFF


def _check_rng(op: str, rng: Tensor, device) -> None:
    check(rng.dtype == torch.int64 and rng.dim() == 1 and rng.numel() == RNG.size and rng.is_contiguous()
          and rng.device == device, op, ": rng must be a contiguous int64 [2] = (seed, step) on ", device)


def _check_stream(op: str, stream: int) -> None:
    check(stream >= 0, op, ": stream must be in [0, 2^32), got ", stream)
    check(stream <= 0xFFFFFFFF, op, ": stream must be in [0, 2^32), got ", stream)


def check_vi_pair(op: str, a: Tensor, a_name: str, b: Tensor, b_name: str, rng: Tensor, stream: int, *,
                  fake: bool = False) -> None:
    """The checks of the two-input noisy ops (``check_vi_pair``, csrc/checks/vi.h): a and b dense,
    on one device (the kernel's device type), one kernel float dtype, equal shapes; rng a
    contiguous int64 [2] on their device; stream in [0, 2^32). Nothing is written in place."""
    check_meta_mix(op, **{a_name: a, b_name: b}, rng=rng)
    check_dense(op, **{a_name: a, b_name: b}, rng=rng)
    kernel = dispatch_device_type(a, b, rng)
    check(a.device.type.upper() == kernel, op, ": ", a_name, " is on ", a.device, ", expected ", kernel)
    check(b.device == a.device, op, ": ", b_name, " is on ", b.device, " but ", a_name, " is on ", a.device)
    _check_rng(op, rng, a.device)
    check(a.dtype in KERNEL_DTYPES, op, ": ", a_name, " must be float64, float32, float16 or bfloat16, got ",
          scalar_type(a.dtype))
    check(b.dtype == a.dtype, op, ": ", b_name, " has dtype ", scalar_type(b.dtype), " but ", a_name, " has ",
          scalar_type(a.dtype))
    check(b.shape == a.shape, op, ": ", b_name, " has shape ", sizes(b), " but ", a_name, " has shape ", sizes(a))
    _check_stream(op, stream)


def check_vi_sample_and_backward(mu: Tensor, rho: Tensor, grad_w: Tensor, rng: Tensor, stream: int, *,
                                 fake: bool = False) -> None:
    """The checks of ``vi_sample_and_backward`` (csrc/checks/vi.h): (mu, rho) and (grad_w, rho) as
    the pairs of vi_sample and vi_sample_backward."""
    check_vi_pair("vi_sample_and_backward", mu, "mu", rho, "rho", rng, stream, fake=fake)
    check_vi_pair("vi_sample_and_backward", grad_w, "grad_w", rho, "rho", rng, stream, fake=fake)


def check_vi_rademacher_(out: Tensor, rng: Tensor, stream: int, *, fake: bool = False) -> None:
    """The checks of ``vi_rademacher_`` (``check_vi_rademacher``, csrc/checks/vi.h): a floating out
    with memory of its own, not overlapping rng, on the kernel's device type; rng on out's device."""
    op = "vi_rademacher_"
    check_meta_mix(op, out=out, rng=rng)
    check_dense(op, out=out, rng=rng)
    kernel = dispatch_device_type(out, rng)
    check(out.device.type.upper() == kernel, op, ": out is on ", out.device, ", expected ", kernel)
    _check_rng(op, rng, out.device)
    check(out.is_floating_point(), op, ": out must be floating point, got ", scalar_type(out.dtype))
    _check_stream(op, stream)
    if fake and any(isinstance(v, torch.SymInt) for v in (*out.shape, *out.stride())):
        # symbolic sizes (torch.compile with dynamic shapes): _memory.overlaps_itself cannot order
        # symbolic strides; the kernel refuses an out with internal overlap when the graph runs
        return
    OverlapCheck(op, fake).add(out, "out", True).add(rng, "rng", False).run()


def check_vi_rademacher_mul(x: Tensor, rng: Tensor, stream: int, *, fake: bool = False) -> None:
    """The checks of ``vi_rademacher_mul`` (``check_vi_rademacher_mul``, csrc/checks/vi.h): x dense,
    a kernel float dtype, on the kernel's device type; rng on x's device. The result is new."""
    op = "vi_rademacher_mul"
    check_meta_mix(op, x=x, rng=rng)
    check_dense(op, x=x, rng=rng)
    kernel = dispatch_device_type(x, rng)
    check(x.device.type.upper() == kernel, op, ": x is on ", x.device, ", expected ", kernel)
    _check_rng(op, rng, x.device)
    check(x.dtype in KERNEL_DTYPES, op, ": x must be float64, float32, float16 or bfloat16, got ",
          scalar_type(x.dtype))
    _check_stream(op, stream)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _position(rng: Tensor) -> tuple[int, int]:
    """(seed, step) as Python ints (the kernels take the seed's 64 bits and the step's low 32)."""
    return int(rng[RNG.seed]), int(rng[RNG.step])


def _eps(like: Tensor, rng: Tensor, stream: int) -> Tensor:
    """The noise of every element of ``like`` (its shape, row-major order) in its math dtype."""
    seed, step = _position(rng)
    return philox_normal(like.numel(), seed, stream, step, like.device).view(like.shape).to(_opmath(like.dtype))


def _softplus_grad(rho: Tensor) -> Tensor:
    return torch.where(rho > _SOFTPLUS_THRESHOLD, torch.ones_like(rho), torch.sigmoid(rho))


def vi_sample(mu: Tensor, rho: Tensor, rng: Tensor, stream: int) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_sample``: mu + softplus(rho) * eps, a new contiguous tensor."""
    check_vi_pair("vi_sample", mu, "mu", rho, "rho", rng, stream)
    op = _opmath(mu.dtype)
    with torch.no_grad():
        w = mu.to(op) + F.softplus(rho.to(op)) * _eps(mu, rng, stream)
    return w.to(mu.dtype).contiguous()


def vi_sample_backward(grad_w: Tensor, rho: Tensor, rng: Tensor, stream: int) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_sample_backward``: grad_w * eps * softplus'(rho)."""
    check_vi_pair("vi_sample_backward", grad_w, "grad_w", rho, "rho", rng, stream)
    op = _opmath(grad_w.dtype)
    with torch.no_grad():
        g = grad_w.to(op) * _eps(grad_w, rng, stream) * _softplus_grad(rho.to(op))
    return g.to(grad_w.dtype).contiguous()


def vi_sample_and_backward(mu: Tensor, rho: Tensor, grad_w: Tensor, rng: Tensor, stream: int) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.pyfastbayes.vi_sample_and_backward``: (vi_sample(mu, rho),
    vi_sample_backward(grad_w, rho)) with the same eps."""
    check_vi_sample_and_backward(mu, rho, grad_w, rng, stream)
    return vi_sample(mu, rho, rng, stream), vi_sample_backward(grad_w, rho, rng, stream)


def vi_local_noise(mean: Tensor, var: Tensor, rng: Tensor, stream: int) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_local_noise``: mean + sqrt(max(var, 0)) * eps."""
    check_vi_pair("vi_local_noise", mean, "mean", var, "var", rng, stream)
    op = _opmath(mean.dtype)
    with torch.no_grad():
        v = var.to(op)
        v = torch.where(v < 0, torch.zeros_like(v), v)  # NaN stays NaN (as in the kernels)
        out = mean.to(op) + torch.sqrt(v) * _eps(mean, rng, stream)
    return out.to(mean.dtype).contiguous()


def vi_local_noise_backward(grad_out: Tensor, var: Tensor, rng: Tensor, stream: int) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_local_noise_backward``: grad_out * eps / (2 sqrt(var)),
    0 where var <= 0."""
    check_vi_pair("vi_local_noise_backward", grad_out, "grad_out", var, "var", rng, stream)
    op = _opmath(grad_out.dtype)
    with torch.no_grad():
        v = var.to(op)
        g = grad_out.to(op) * _eps(grad_out, rng, stream) / (2 * torch.sqrt(v))
        g = torch.where(v <= 0, torch.zeros_like(g), g)
    return g.to(grad_out.dtype).contiguous()


def rademacher(numel: int, seed: int, stream: int, step: int, device=None) -> Tensor:
    """The float32 sign stream [numel]: element i is -1 when bit i % 32 of word (i // 32) % 4 of
    Philox block i // 128 (counter (block lo, block hi, stream, step), key = the 64-bit seed) is
    set, else +1 (every bit of a block: 128 signs)."""
    nblocks = (numel + 127) // 128
    block = torch.arange(nblocks, dtype=torch.int64, device=device)
    ctr = torch.stack([block & _MASK, block >> 32, torch.full_like(block, stream & _MASK),
                       torch.full_like(block, step & _MASK)], dim=1)
    seed &= (1 << 64) - 1
    words = philox4x32(ctr, seed & _MASK, seed >> 32).reshape(-1, 1)  # [4 nblocks, 1], word order
    bits = (words >> torch.arange(32, dtype=torch.int64, device=device)) & 1  # [4 nblocks, 32]
    return 1.0 - 2.0 * bits.reshape(-1)[:numel].float()


def vi_rademacher_(out: Tensor, rng: Tensor, stream: int) -> None:
    """Reference of ``torch.ops.pyfastbayes.vi_rademacher_``: out filled with +1 / -1 in place."""
    check_vi_rademacher_(out, rng, stream)
    seed, step = _position(rng)
    with torch.no_grad():
        out.copy_(rademacher(out.numel(), seed, stream, step, out.device).view(out.shape))


def vi_rademacher_mul(x: Tensor, rng: Tensor, stream: int) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_rademacher_mul``: x times the signs of
    ``vi_rademacher_`` at (rng, stream), a new contiguous tensor of x's dtype (exact)."""
    check_vi_rademacher_mul(x, rng, stream)
    seed, step = _position(rng)
    with torch.no_grad():
        signs = rademacher(x.numel(), seed, stream, step, x.device).view(x.shape)
        return (x.to(_opmath(x.dtype)) * signs).to(x.dtype).contiguous()

# ======================= end of section 1 =======================================================


# ======================= Section 2: closed-form KL of mean-field Gaussians ========================


def check_vi_kl(op: str, mus: Sequence[Tensor], rhos: Sequence[Tensor], prior_var: Tensor, grad: Tensor | None = None,
                *, fake: bool = False) -> None:
    """The checks of ``vi_kl`` and ``vi_kl_backward`` (``check_vi_kl`` and ``check_vi_kl_grad``,
    csrc/checks/vi.h): mus and rhos of one length T >= 1, every tensor on mus[0]'s device (the
    kernel's device type) and of its dtype (a kernel float dtype), rhos[t] shaped as mus[t];
    prior_var a float64 [T] on that device, its values finite and > 0 when it is a real CPU tensor
    (not with ``fake``, not on other devices); grad (vi_kl_backward only) a 0-dim tensor of a kernel
    float dtype on the device."""
    args = dict(mus=mus, rhos=rhos, prior_var=prior_var)
    if grad is not None:
        args = dict(grad=grad, **args)
    check_meta_mix(op, **args)
    check_dense(op, **args)
    check(len(mus) > 0, op, ": mus is empty; pass at least one (mu, rho) pair")
    check(len(rhos) == len(mus), op, ": got ", len(mus), " mus but ", len(rhos), " rhos")
    device = mus[0].device
    kernel = dispatch_device_type(grad, mus, rhos, prior_var)
    check(device.type.upper() == kernel, op, ": mus[0] is on ", device, ", expected ", kernel)
    dtype = mus[0].dtype
    check(dtype in KERNEL_DTYPES, op, ": mus[0] must be float64, float32, float16 or bfloat16, got ",
          scalar_type(dtype))
    for i, (m, r) in enumerate(zip(mus, rhos)):
        for what, t in (("mus", m), ("rhos", r)):
            check(t.device == device, op, ": ", what, "[", i, "] is on ", t.device, " but mus[0] is on ", device)
            check(t.dtype == dtype, op, ": ", what, "[", i, "] has dtype ", scalar_type(t.dtype), " but mus[0] has ",
                  scalar_type(dtype))
        check(r.shape == m.shape, op, ": rhos[", i, "] has shape ", sizes(r), " but mus[", i, "] has shape ", sizes(m))
    n = len(mus)
    check(prior_var.dtype == torch.float64 and prior_var.dim() == 1 and prior_var.numel() == n
          and prior_var.device == device, op, ": prior_var must be a float64 vector of length ", n,
          " (one prior variance per tensor) on ", device, "; got ", scalar_type(prior_var.dtype), " of shape ",
          sizes(prior_var), " on ", prior_var.device)
    if not fake and not is_fake(prior_var) and prior_var.device.type == "cpu":
        for t, v in enumerate(prior_var.tolist()):
            check(math.isfinite(v) and v > 0, op, ": prior_var[", t, "] must be finite and > 0, got ", num(v))
    if grad is not None:
        check(grad.dim() == 0 and grad.dtype in KERNEL_DTYPES and grad.device == device, op,
              ": grad must be a 0-dim float64, float32, float16 or bfloat16 tensor on ", device, "; got ",
              scalar_type(grad.dtype), " of shape ", sizes(grad), " on ", grad.device)


def _kl_result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid_variance(prior_var: Tensor) -> Tensor:
    """Bool [T]: prior_var finite and > 0 (the kernels give NaN for the others, unchecked on CUDA)."""
    return torch.isfinite(prior_var) & (prior_var > 0)


def vi_kl(mus: Sequence[Tensor], rhos: Sequence[Tensor], prior_var: Tensor) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_kl``: sum over t and i of
    0.5 log v_t - log sigma + (sigma^2 + mu^2) / (2 v_t) - 0.5, sigma = softplus(rho) (torch's,
    threshold 20), in float64; log sigma = rho below rho = -20 (as the kernels define it: softplus
    underflows past rho ~ -745 in float64, and there log sigma = rho to 1e-9). 0-dim result."""
    check_vi_kl("vi_kl", mus, rhos, prior_var)
    with torch.no_grad():
        v = prior_var.to(torch.float64)
        ok = _valid_variance(v)
        total = torch.zeros((), dtype=torch.float64, device=mus[0].device)
        for t, (m, r) in enumerate(zip(mus, rhos)):
            mu, rho = m.to(torch.float64), r.to(torch.float64)
            sigma = F.softplus(rho)
            log_sigma = torch.where(rho < -_SOFTPLUS_THRESHOLD, rho, torch.log(sigma))
            terms = 0.5 * torch.log(v[t]) - log_sigma + (sigma * sigma + mu * mu) / (2 * v[t]) - 0.5
            part = terms.sum()
            total = total + torch.where(ok[t], part, torch.full_like(part, math.nan))
    return total.to(_kl_result_dtype(mus[0].dtype))


def vi_kl_backward(grad: Tensor, mus: Sequence[Tensor], rhos: Sequence[Tensor],
                   prior_var: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Reference of ``torch.ops.pyfastbayes.vi_kl_backward``: grad_mu = g mu / v_t and
    grad_rho = g (sigma / v_t - 1 / sigma) softplus'(rho), in float64; softplus' = sigmoid below the
    threshold 20 and 1 above it (torch's softplus backward), sigmoid(rho) / sigma taken as 1 for
    rho < -40 (there it is 1 - e^rho / 2 = 1 in float64, and below ~-709 sigmoid underflows to 0 while
    sigma is still subnormal: the plain quotient gave 0). New contiguous tensors in the inputs' dtype."""
    check_vi_kl("vi_kl_backward", mus, rhos, prior_var, grad)
    gms, grs = [], []
    with torch.no_grad():
        v = prior_var.to(torch.float64)
        ok = _valid_variance(v)
        g = grad.to(torch.float64)
        for t, (m, r) in enumerate(zip(mus, rhos)):
            mu, rho = m.to(torch.float64), r.to(torch.float64)
            sigma = F.softplus(rho)
            ds = torch.where(rho > _SOFTPLUS_THRESHOLD, torch.ones_like(rho), torch.sigmoid(rho))
            ratio = torch.where(rho > -40, ds / torch.where(rho > -40, sigma, torch.ones_like(sigma)),
                                torch.ones_like(sigma))
            gm = g * mu / v[t]
            gr = g * (sigma * ds / v[t] - ratio)
            nan = torch.full_like(gm, math.nan)
            gms.append(torch.where(ok[t], gm, nan).to(m.dtype).contiguous())
            grs.append(torch.where(ok[t], gr, nan).to(m.dtype).contiguous())
    return gms, grs

# ======================= end of section 2 =======================================================


# ======================= Section 3: the local reparameterisation's weight variance =================


def check_vi_sigma_sq(op: str, rho: Tensor, grad: Tensor | None = None, *, fake: bool = False) -> None:
    """The checks of the section 3 ops (``check_vi_sigma_sq``, csrc/checks/vi.h): rho dense, a kernel
    float dtype, on the kernel's device type; grad (when given: the schema's first tensor, written in
    place) on rho's device with its dtype and shape, not overlapping itself or rho."""
    named = {"rho": rho} if grad is None else {"grad": grad, "rho": rho}
    check_meta_mix(op, **named)
    check_dense(op, **named)
    kernel = dispatch_device_type(*named.values())
    check(rho.device.type.upper() == kernel, op, ": rho is on ", rho.device, ", expected ", kernel)
    check(rho.dtype in KERNEL_DTYPES, op, ": rho must be float64, float32, float16 or bfloat16, got ",
          scalar_type(rho.dtype))
    if grad is None:
        return
    check(grad.device == rho.device, op, ": grad is on ", grad.device, " but rho is on ", rho.device)
    check(grad.dtype == rho.dtype, op, ": grad has dtype ", scalar_type(grad.dtype), " but rho has ",
          scalar_type(rho.dtype))
    check(grad.shape == rho.shape, op, ": grad has shape ", sizes(grad), " but rho has shape ", sizes(rho))
    if fake and any(isinstance(v, torch.SymInt) for v in (*grad.shape, *grad.stride())):
        return  # symbolic strides cannot be ordered (as check_vi_rademacher_); the kernel checks when it runs
    OverlapCheck(op, fake).add(grad, "grad", True).add(rho, "rho", False).run()


def vi_sigma_sq(rho: Tensor) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_sigma_sq``: softplus(rho)^2, a new contiguous tensor."""
    check_vi_sigma_sq("vi_sigma_sq", rho)
    with torch.no_grad():
        s = F.softplus(rho.to(_opmath(rho.dtype)))
        return (s * s).to(rho.dtype).contiguous()


def _sigma_sq_grad(grad: Tensor, rho: Tensor) -> Tensor:
    op = _opmath(rho.dtype)
    with torch.no_grad():
        r = rho.to(op)
        return (grad.to(op) * (2 * F.softplus(r) * _softplus_grad(r))).to(rho.dtype)


def vi_sigma_sq_backward_(grad: Tensor, rho: Tensor) -> None:
    """Reference of ``torch.ops.pyfastbayes.vi_sigma_sq_backward_``: grad <- grad * (2 softplus(rho) softplus'(rho))."""
    check_vi_sigma_sq("vi_sigma_sq_backward_", rho, grad)
    with torch.no_grad():
        grad.copy_(_sigma_sq_grad(grad, rho))


def vi_sigma_sq_and_backward_(grad: Tensor, rho: Tensor) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_sigma_sq_and_backward_``: vi_sigma_sq_backward_(grad, rho)
    and vi_sigma_sq(rho), returned."""
    check_vi_sigma_sq("vi_sigma_sq_and_backward_", rho, grad)
    s2 = vi_sigma_sq(rho)
    with torch.no_grad():
        grad.copy_(_sigma_sq_grad(grad, rho))
    return s2

# ======================= end of section 3 =======================================================


# ======================= Section 4: a layer's weight function with its KL term ======================

_WEIGHT_KINDS = ("mu + sigma eps", "sigma eps", "sigma^2")


def _check_weight_options(op: str, prior_var: float, kind: int) -> None:
    check(math.isfinite(prior_var) and prior_var > 0, op, ": prior_var must be finite and > 0, got ", num(prior_var))
    check(kind in (0, 1, 2), op, ": kind must be 0 (mu + sigma eps), 1 (sigma eps) or 2 (sigma^2), got ", kind)


def check_vi_weight_kl(mu: Tensor, rho: Tensor, rng: Tensor, stream: int, prior_var: float, kind: int, *,
                       fake: bool = False) -> None:
    """The checks of ``vi_weight_kl`` (``check_vi_weight_kl``, csrc/checks/vi.h): mu, rho a vi_sample
    pair, prior_var finite and > 0, kind 0, 1 or 2."""
    op = "vi_weight_kl"
    check_vi_pair(op, mu, "mu", rho, "rho", rng, stream, fake=fake)
    _check_weight_options(op, prior_var, kind)


def check_vi_weight_kl_backward_(grad_rho: Tensor, grad_mu: Tensor, mu: Tensor, rho: Tensor, rng: Tensor, stream: int,
                                 kl_grad: Tensor, prior_var: float, kind: int, *, fake: bool = False) -> None:
    """The checks of ``vi_weight_kl_backward_`` (``check_vi_weight_kl_backward``, csrc/checks/vi.h):
    grad_rho, grad_mu, mu, rho vi_sample pairs with rho, kl_grad a 0-dim kernel float tensor on their
    device, prior_var and kind as vi_weight_kl's; grad_rho and grad_mu (written in place) overlap
    neither themselves, each other nor any input."""
    op = "vi_weight_kl_backward_"
    check_meta_mix(op, grad_rho=grad_rho, grad_mu=grad_mu, mu=mu, rho=rho, rng=rng, kl_grad=kl_grad)
    check_dense(op, kl_grad=kl_grad)
    check_vi_pair(op, mu, "mu", rho, "rho", rng, stream, fake=fake)
    check_vi_pair(op, grad_rho, "grad_rho", rho, "rho", rng, stream, fake=fake)
    check_vi_pair(op, grad_mu, "grad_mu", rho, "rho", rng, stream, fake=fake)
    check(kl_grad.dim() == 0 and kl_grad.dtype in KERNEL_DTYPES and kl_grad.device == rho.device, op,
          ": kl_grad must be a 0-dim float64, float32, float16 or bfloat16 tensor on ", rho.device, "; got ",
          scalar_type(kl_grad.dtype), " of shape ", sizes(kl_grad), " on ", kl_grad.device)
    _check_weight_options(op, prior_var, kind)
    if fake and any(isinstance(v, torch.SymInt) for t in (grad_rho, grad_mu) for v in (*t.shape, *t.stride())):
        return  # symbolic strides cannot be ordered; the kernel checks when it runs
    (OverlapCheck(op, fake).add(grad_rho, "grad_rho", True).add(grad_mu, "grad_mu", True).add(mu, "mu", False)
     .add(rho, "rho", False).add(rng, "rng", False).add(kl_grad, "kl_grad", False).run())


def _weight_parts(mu: Tensor, rho: Tensor, rng: Tensor, stream: int, kind: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mu, rho, sigma, eps) in the math dtype (eps zeros for kind 2: no noise)."""
    op = _opmath(mu.dtype)
    m, r = mu.to(op), rho.to(op)
    eps = torch.zeros_like(m) if kind == 2 else _eps(mu, rng, stream)
    return m, r, F.softplus(r), eps


def _weight_value(m: Tensor, sigma: Tensor, eps: Tensor, kind: int) -> Tensor:
    return (m + sigma * eps, sigma * eps, sigma * sigma)[kind]


def vi_weight_kl(mu: Tensor, rho: Tensor, rng: Tensor, stream: int, prior_var: float, kind: int) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.pyfastbayes.vi_weight_kl``: (w, kl), w = mu + sigma eps (kind 0),
    sigma eps (1) or sigma^2 (2) in the math dtype, a new contiguous tensor in mu's dtype; kl the
    closed form of :func:`vi_kl` for the one tensor (float64 sums)."""
    check_vi_weight_kl(mu, rho, rng, stream, prior_var, kind)
    with torch.no_grad():
        m, _, sigma, eps = _weight_parts(mu, rho, rng, stream, kind)
        w = _weight_value(m, sigma, eps, kind).to(mu.dtype).contiguous()
        kl = vi_kl([mu], [rho], torch.tensor([float(prior_var)], dtype=torch.float64, device=mu.device))
    return w, kl


def vi_weight_kl_backward_(grad_rho: Tensor, grad_mu: Tensor, mu: Tensor, rho: Tensor, rng: Tensor, stream: int,
                           kl_grad: Tensor, prior_var: float, kind: int, want_w: bool) -> Tensor:
    """Reference of ``torch.ops.pyfastbayes.vi_weight_kl_backward_``: with d = grad_rho's entry value
    (dL/dw) and g = kl_grad, grad_rho <- d eps softplus'(rho) (kinds 0, 1) or d 2 sigma softplus'(rho)
    (kind 2), plus g dKL/drho; grad_mu <- (d for kind 0, else its entry value) + g mu / v (the
    KL gradients of :func:`vi_kl_backward`); returns w (as :func:`vi_weight_kl`) when want_w, else
    an empty [0] tensor."""
    check_vi_weight_kl_backward_(grad_rho, grad_mu, mu, rho, rng, stream, kl_grad, prior_var, kind)
    with torch.no_grad():
        m, r, sigma, eps = _weight_parts(mu, rho, rng, stream, kind)
        op = m.dtype
        d = grad_rho.to(op)
        ds = _softplus_grad(r)
        data = d * (2 * sigma * ds) if kind == 2 else d * eps * ds
        kl_mu, kl_rho = vi_kl_backward(kl_grad, [mu], [rho],
                                       torch.tensor([float(prior_var)], dtype=torch.float64, device=mu.device))
        new_rho = data + kl_rho[0].to(op)
        new_mu = (d if kind == 0 else grad_mu.to(op)) + kl_mu[0].to(op)
        w = _weight_value(m, sigma, eps, kind).to(mu.dtype).contiguous() if want_w else mu.new_empty(0)
        grad_rho.copy_(new_rho.to(grad_rho.dtype))
        grad_mu.copy_(new_mu.to(grad_mu.dtype))
    return w
