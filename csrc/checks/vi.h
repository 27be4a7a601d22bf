// Host-only argument checks of the vi family, shared by the CPU and CUDA entry points (mirrored,
// with the same messages, by pyfastbayes/_reference/vi.py: check_vi_*).
//
// Section 1: the reparameterised-noise ops (vi_sample, vi_sample_backward, vi_local_noise,
// vi_local_noise_backward, vi_rademacher_). Further ops of the family add a section below it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "checks/common.h"
#include "common/layouts.h"

namespace pyfastbayes {

// ======================= Section 1: reparameterised noise ======================================

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

// ======================= end of section 1 ======================================================

}  // namespace pyfastbayes
