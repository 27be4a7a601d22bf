"""Reference of the vi family (variational inference; csrc/ops/vi.cpp, math in csrc/common/vi.h).

Section 1, reparameterised noise. With rng = (seed, step) an int64 [2] tensor and a stream id s,
the noise of element i (row-major logical order) is element i of the float32 normal stream
``philox_normal(numel, seed, s, step)`` (:mod:`.random`, Philox4x32-10 in int64 tensor arithmetic,
Box-Muller in float64 rounded to float32): an independent computation of the numbers the kernels
draw with fp32 polynomials (equal to ~2e-6 absolute). The math then runs in float32 (float64 for
float64 tensors) with torch's own functions:

    vi_sample(mu, rho)                    mu + softplus(rho) * eps        (F.softplus: threshold 20)
    vi_sample_backward(grad_w, rho)       grad_w * eps * softplus'(rho)   (1 above 20, else sigmoid)
    vi_local_noise(mean, var)             mean + sqrt(max(var, 0)) * eps
    vi_local_noise_backward(grad_out, var) grad_out * eps / (2 sqrt(var)), 0 where var <= 0
    vi_rademacher_(out)                   -1 where bit 31 of word i % 4 of Philox block i // 4 is set, else +1

eps is float32 in every dtype (for float64 tensors too: the float32 value, converted exactly), so
float64 results agree with the kernels to ~1e-12 given the same eps, and to ~2e-6 * |the noise
term| with this module's eps. The checks (``check_vi_pair``, ``check_vi_rademacher_``) mirror
csrc/checks/vi.h with the same messages. Further ops of the family: a section of their own at the
end of this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.layouts import RNG
from ._checks import OverlapCheck, check, check_dense, check_meta_mix, dispatch_device_type, scalar_type, sizes
from .random import philox4x32, philox_normal

# ======================= Section 1: reparameterised noise =======================================

_KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
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
    check(a.dtype in _KERNEL_DTYPES, op, ": ", a_name, " must be float64, float32, float16 or bfloat16, got ",
          scalar_type(a.dtype))
    check(b.dtype == a.dtype, op, ": ", b_name, " has dtype ", scalar_type(b.dtype), " but ", a_name, " has ",
          scalar_type(a.dtype))
    check(b.shape == a.shape, op, ": ", b_name, " has shape ", sizes(b), " but ", a_name, " has shape ", sizes(a))
    _check_stream(op, stream)


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
    """The float32 sign stream [numel]: element i is -1 when bit 31 of word i % 4 of Philox block
    i // 4 (counter (block lo, block hi, stream, step), key = the 64-bit seed) is set, else +1."""
    nblocks = (numel + 3) // 4
    block = torch.arange(nblocks, dtype=torch.int64, device=device)
    ctr = torch.stack([block & _MASK, block >> 32, torch.full_like(block, stream & _MASK),
                       torch.full_like(block, step & _MASK)], dim=1)
    seed &= (1 << 64) - 1
    words = philox4x32(ctr, seed & _MASK, seed >> 32).reshape(-1)[:numel]
    return 1.0 - 2.0 * (words >> 31).float()


def vi_rademacher_(out: Tensor, rng: Tensor, stream: int) -> None:
    """Reference of ``torch.ops.pyfastbayes.vi_rademacher_``: out filled with +1 / -1 in place."""
    check_vi_rademacher_(out, rng, stream)
    seed, step = _position(rng)
    with torch.no_grad():
        out.copy_(rademacher(out.numel(), seed, stream, step, out.device).view(out.shape))

# ======================= end of section 1 =======================================================
