// Host-only argument checks of the vi family, shared by the CPU and CUDA entry points (mirrored,
// with the same messages, by pyfastbayes/_reference/vi.py: check_vi_*).
//
// Section 1: the reparameterised-noise ops (vi_sample, vi_sample_backward, vi_local_noise,
// vi_local_noise_backward, vi_rademacher_). Further ops of the family add a section below it.
// Section 2: the closed-form KL (vi_kl, vi_kl_backward).
// Section 3: the local reparameterisation's weight variance (vi_sigma_sq, vi_sigma_sq_backward_,
// vi_sigma_sq_and_backward_).
// Section 4: a layer's weight function with its KL term (vi_weight_kl, vi_weight_kl_backward_).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "checks/common.h"
#include "common/layouts.h"

namespace pyfastbayes {

// ======================= Section 1: reparameterised noise ======================================

// A tensor of one value broadcast to every element (all strides 0, e.g. flipout's zero mean
// rho.new_zeros(()).expand(shape)): the kernels read that value instead of a materialised
// contiguous copy (CPU and CUDA alike).
inline bool broadcast_scalar(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  for (int64_t d = 0; d < t.dim(); ++d)  // a size-1 dimension's stride does not matter
    if (t.size(d) != 1 && t.stride(d) != 0) return false;
  return true;
}

// The contiguous stand-in of an input, or the tensor itself when it is one broadcast value.
inline at::Tensor input_stand_in(const at::Tensor& t) { return broadcast_scalar(t) ? t : t.contiguous(); }

// rng: the RNG position (seed, step), a contiguous int64 [kRngSize] on `device`, as the fused
// SG-MCMC steps take it; read by the kernel itself (on the device for CUDA, so a call can be
// captured in a CUDA graph while the step advances in place). Its values are not restricted: the
// seed is the int64's 64 bits, the step its low 32 bits (as in the SG-MCMC ops).
inline void check_vi_rng(const char* op, const at::Tensor& rng, const c10::Device& device) {
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.numel() == kRngSize && rng.is_contiguous() &&
                  rng.device() == device,
              op, ": rng must be a contiguous int64 [2] = (seed, step) on ", device);
}

// stream: the Philox stream id, a uint32 word of the counter
inline void check_vi_stream(const char* op, int64_t stream) {
  TORCH_CHECK(stream >= 0 && stream < (int64_t(1) << 32), op, ": stream must be in [0, 2^32), got ", stream);
}

// The two-input noisy ops: a (mu / grad_w / mean / grad_out) and b (rho / var) dense tensors on
// one device of `device_type`, one kernel float dtype, equal shapes (any strides); rng on their
// device; stream in [0, 2^32). Nothing is written in place (the result is a new tensor), so no
// overlap check. Non-finite values are not looked at (the rules propagate NaN).
inline void check_vi_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                          const char* b_name, const at::Tensor& rng, int64_t stream, c10::DeviceType device_type) {
  TORCH_CHECK(a.device().type() == device_type, op, ": ", a_name, " is on ", a.device(), ", expected ",
              device_type_name(device_type));
  TORCH_CHECK(b.device() == a.device(), op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
              a.device());
  check_vi_rng(op, rng, a.device());
  TORCH_CHECK(kernel_float_dtype(a.scalar_type()), op, ": ", a_name,
              " must be float64, float32, float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(), " but ", a_name,
              " has ", a.scalar_type());
  TORCH_CHECK(b.sizes() == a.sizes(), op, ": ", b_name, " has shape ", b.sizes(), " but ", a_name, " has shape ",
              a.sizes());
  check_vi_stream(op, stream);
}

// vi_sample_and_backward: mu, rho and grad_w as a vi_sample pair and a vi_sample_backward pair
inline void check_vi_sample_and_backward(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& grad_w,
                                         const at::Tensor& rng, int64_t stream, c10::DeviceType device_type) {
  const char* op = "vi_sample_and_backward";
  check_vi_pair(op, mu, "mu", rho, "rho", rng, stream, device_type);
  check_vi_pair(op, grad_w, "grad_w", rho, "rho", rng, stream, device_type);
}

// vi_rademacher_: out floating (any floating dtype: +-1 is exact in all of them) on `device_type`,
// written in place, so it must not overlap itself or rng; rng on out's device.
inline void check_vi_rademacher(const at::Tensor& out, const at::Tensor& rng, int64_t stream,
                                c10::DeviceType device_type) {
  const char* op = "vi_rademacher_";
  TORCH_CHECK(out.device().type() == device_type, op, ": out is on ", out.device(), ", expected ",
              device_type_name(device_type));
  check_vi_rng(op, rng, out.device());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), op, ": out must be floating point, got ", out.scalar_type());
  check_vi_stream(op, stream);
  OverlapCheck overlap(op, 2);
  overlap.add(out, "out", -1, true);
  overlap.add(rng, "rng", -1, false);
  overlap.run();
}

// vi_rademacher_mul: x dense on `device_type`, a kernel float dtype (any strides); rng on x's device.
// The result is a new tensor: no overlap check.
inline void check_vi_rademacher_mul(const at::Tensor& x, const at::Tensor& rng, int64_t stream,
                                    c10::DeviceType device_type) {
  const char* op = "vi_rademacher_mul";
  TORCH_CHECK(x.device().type() == device_type, op, ": x is on ", x.device(), ", expected ",
              device_type_name(device_type));
  check_vi_rng(op, rng, x.device());
  TORCH_CHECK(kernel_float_dtype(x.scalar_type()), op, ": x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_vi_stream(op, stream);
}

// ======================= end of section 1 ======================================================

// ======================= Section 2: closed-form KL of mean-field Gaussians =====================

// vi_kl and vi_kl_backward: mus and rhos lists of one length T >= 1 (an empty list has no device
// and no dtype); mus[0] on `device_type`, every tensor on mus[0]'s device and of its dtype (a kernel
// float dtype), rhos[t] of mus[t]'s shape (any strides; the kernels read contiguous stand-ins);
// prior_var a float64 vector [T] on the same device (any strides), whose values must be finite
// and > 0: checked here when it is a CPU tensor; a CUDA prior_var is NOT read on the host (that
// would synchronise with the device): a bad value makes the KL and tensor t's gradients NaN
// (common/vi.h: ViKlPrior). Nothing is written in place (new results): no overlap check.
inline void check_vi_kl(const char* op, at::TensorList mus, at::TensorList rhos, const at::Tensor& prior_var,
                        c10::DeviceType device_type) {
  TORCH_CHECK(!mus.empty(), op, ": mus is empty; pass at least one (mu, rho) pair");
  TORCH_CHECK(rhos.size() == mus.size(), op, ": got ", mus.size(), " mus but ", rhos.size(), " rhos");
  const auto device = mus[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": mus[0] is on ", device, ", expected ",
              device_type_name(device_type));
  const auto dtype = mus[0].scalar_type();
  TORCH_CHECK(kernel_float_dtype(dtype), op, ": mus[0] must be float64, float32, float16 or bfloat16, got ", dtype);
  auto like = [&](const at::Tensor& t, const char* what, size_t i) {
    TORCH_CHECK(t.device() == device, op, ": ", what, "[", i, "] is on ", t.device(), " but mus[0] is on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", what, "[", i, "] has dtype ", t.scalar_type(), " but mus[0] has ",
                dtype);
  };
  for (size_t i = 0; i < mus.size(); ++i) {
    like(mus[i], "mus", i);
    like(rhos[i], "rhos", i);
    TORCH_CHECK(rhos[i].sizes() == mus[i].sizes(), op, ": rhos[", i, "] has shape ", rhos[i].sizes(), " but mus[", i,
                "] has shape ", mus[i].sizes());
  }
  TORCH_CHECK(mus.size() < (size_t(1) << 31), op, ": too many tensors");
  const auto n = static_cast<int64_t>(mus.size());
  TORCH_CHECK(prior_var.scalar_type() == at::kDouble && prior_var.dim() == 1 && prior_var.numel() == n &&
                  prior_var.device() == device,
              op, ": prior_var must be a float64 vector of length ", n, " (one prior variance per tensor) on ", device,
              "; got ", prior_var.scalar_type(), " of shape ", prior_var.sizes(), " on ", prior_var.device());
  if (prior_var.is_cpu()) {
    const at::Tensor pv = prior_var.contiguous();
    const double* v = pv.const_data_ptr<double>();
    for (int64_t t = 0; t < n; ++t)
      TORCH_CHECK(std::isfinite(v[t]) && v[t] > 0.0, op, ": prior_var[", t, "] must be finite and > 0, got ", v[t]);
  }
}

// vi_kl_backward's grad (the gradient of vi_kl's 0-dim result): a 0-dim tensor of a kernel float
// dtype on the lists' device, read by the kernel (on the device for CUDA: no host sync). Checked
// after the lists (check_vi_kl), which fix the device.
inline void check_vi_kl_grad(const char* op, const at::Tensor& grad, const c10::Device& device,
                             const char* name = "grad") {
  TORCH_CHECK(grad.dim() == 0 && kernel_float_dtype(grad.scalar_type()) && grad.device() == device, op,
              ": ", name, " must be a 0-dim float64, float32, float16 or bfloat16 tensor on ", device, "; got ",
              grad.scalar_type(), " of shape ", grad.sizes(), " on ", grad.device());
}

// ======================= end of section 2 ======================================================

// ======================= Section 3: the local reparameterisation's weight variance ============

// vi_sigma_sq (rho), vi_sigma_sq_backward_ and vi_sigma_sq_and_backward_ (grad, rho): rho dense on
// `device_type`, a kernel float dtype (any strides); grad, when given, on rho's device with its
// dtype and shape, written in place: it must not overlap itself or rho. Values are not looked at
// (NaN propagates).
inline void check_vi_sigma_sq(const char* op, const at::Tensor& rho, const at::Tensor* grad,
                              c10::DeviceType device_type) {
  TORCH_CHECK(rho.device().type() == device_type, op, ": rho is on ", rho.device(), ", expected ",
              device_type_name(device_type));
  TORCH_CHECK(kernel_float_dtype(rho.scalar_type()), op, ": rho must be float64, float32, float16 or bfloat16, got ",
              rho.scalar_type());
  if (grad == nullptr) return;
  TORCH_CHECK(grad->device() == rho.device(), op, ": grad is on ", grad->device(), " but rho is on ", rho.device());
  TORCH_CHECK(grad->scalar_type() == rho.scalar_type(), op, ": grad has dtype ", grad->scalar_type(), " but rho has ",
              rho.scalar_type());
  TORCH_CHECK(grad->sizes() == rho.sizes(), op, ": grad has shape ", grad->sizes(), " but rho has shape ",
              rho.sizes());
  OverlapCheck overlap(op, 2);
  overlap.add(*grad, "grad", -1, true);
  overlap.add(rho, "rho", -1, false);
  overlap.run();
}

// ======================= end of section 3 ======================================================

// ======================= Section 4: a layer's weight function with its KL term =================

// prior_var (a host float: always checked) and kind
inline void check_vi_weight_options(const char* op, double prior_var, int64_t kind) {
  TORCH_CHECK(std::isfinite(prior_var) && prior_var > 0.0, op, ": prior_var must be finite and > 0, got ", prior_var);
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": kind must be 0 (mu + sigma eps), 1 (sigma eps) or 2 (sigma^2), got ",
              kind);
}

// vi_weight_kl: mu, rho as a vi_sample pair (section 1), prior_var and kind
inline void check_vi_weight_kl(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& rng, int64_t stream,
                               double prior_var, int64_t kind, c10::DeviceType device_type) {
  const char* op = "vi_weight_kl";
  check_vi_pair(op, mu, "mu", rho, "rho", rng, stream, device_type);
  check_vi_weight_options(op, prior_var, kind);
}

// vi_weight_kl_backward_: grad_rho, grad_mu, mu, rho of one device, dtype and shape (vi_sample
// pairs with rho), kl_grad as vi_kl_backward's grad; grad_rho and grad_mu written in place: neither
// may overlap itself, the other or any input
inline void check_vi_weight_kl_backward(const at::Tensor& grad_rho, const at::Tensor& grad_mu, const at::Tensor& mu,
                                        const at::Tensor& rho, const at::Tensor& rng, int64_t stream,
                                        const at::Tensor& kl_grad, double prior_var, int64_t kind,
                                        c10::DeviceType device_type) {
  const char* op = "vi_weight_kl_backward_";
  check_vi_pair(op, mu, "mu", rho, "rho", rng, stream, device_type);
  check_vi_pair(op, grad_rho, "grad_rho", rho, "rho", rng, stream, device_type);
  check_vi_pair(op, grad_mu, "grad_mu", rho, "rho", rng, stream, device_type);
  check_vi_kl_grad(op, kl_grad, rho.device(), "kl_grad");
  check_vi_weight_options(op, prior_var, kind);
  OverlapCheck overlap(op, 6);
  overlap.add(grad_rho, "grad_rho", -1, true);
  overlap.add(grad_mu, "grad_mu", -1, true);
  overlap.add(mu, "mu", -1, false);
  overlap.add(rho, "rho", -1, false);
  overlap.add(rng, "rng", -1, false);
  overlap.add(kl_grad, "kl_grad", -1, false);
  overlap.run();
}

// ======================= end of section 4 ======================================================

}  // namespace pyfastbayes
