// Host-only argument checks of the fused SG-MCMC ops (CPU and CUDA entry points), the
// contiguous stand-ins of the lists they mutate, and the flat inputs of any_nonfinite.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/view_as_real.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>
#include <c10/util/OptionalArrayRef.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "checks/common.h"
#include "common/layouts.h"

namespace pyfastbayes {

// Check that params/grads/(bufs) are matching lists of dense tensors on `device_type`, one
// dtype, equal sizes; that hyper is float64 [>= nhyper] and rng int64 [kRngSize] on the same
// device; that offsets (when given) has one value >= 0 per tensor, small enough that the stream
// index offsets[i] + e of every element stays below 2^63; that no tensor the op writes (params,
// bufs, rng) overlaps another argument or itself.
// bufs_name: the schema name of the state buffers (nullptr: the op has none).
inline void check_step_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                            const char* bufs_name, const at::Tensor& hyper, int64_t nhyper, const at::Tensor& rng,
                            const std::optional<at::Tensor>& skip, c10::OptionalIntArrayRef offsets,
                            c10::DeviceType device_type) {
  const bool has_bufs = bufs_name != nullptr;
  TORCH_CHECK(params.size() == grads.size(), op, ": got ", params.size(), " params but ", grads.size(), " grads");
  TORCH_CHECK(!has_bufs || bufs.size() == params.size(), op, ": got ", params.size(), " params but ",
              bufs.size(), " state buffers");
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->size() == params.size(), op, ": got ", params.size(), " params but ", offsets->size(),
                " offsets");
    for (size_t i = 0; i < params.size(); ++i) {
      const int64_t off = (*offsets)[i];
      TORCH_CHECK(off >= 0, op, ": offsets[", i, "] must be >= 0, got ", off);
      TORCH_CHECK(off <= std::numeric_limits<int64_t>::max() - params[i].numel(), op, ": offsets[", i, "] + ",
                  params[i].numel(), " elements must be below 2^63, got offsets[", i, "] = ", off);
    }
  }
  // hyper, rng and skip are checked even for an empty list: the step still advances rng
  const auto device = params.empty() ? rng.device() : params[0].device();
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 1 && hyper.numel() >= nhyper &&
                  hyper.is_contiguous() && hyper.device() == device,
              op, ": hyper must be a contiguous float64 vector of length ", nhyper, " on ", device);
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.numel() == kRngSize && rng.is_contiguous() &&
                  rng.device() == device,
              op, ": rng must be a contiguous int64 [2] = (seed, step) on ", device);
  if (skip.has_value()) {
    TORCH_CHECK(skip->numel() == 1 && skip->scalar_type() == at::kBool && skip->device() == device, op,
                ": skip must be a bool scalar on ", device);
  }
  TORCH_CHECK(device.type() == device_type, op, ": tensors are on ", device, ", expected ", device_type_name(device_type));
  if (!params.empty()) {
    const auto dtype = params[0].scalar_type();
    TORCH_CHECK(at::isFloatingType(dtype), op, ": params must be floating point, got ", dtype);
    TORCH_CHECK(kernel_float_dtype(dtype), op, ": params must be float64, float32, float16 or bfloat16, got ", dtype);
    auto check_like = [&](const at::Tensor& t, const at::Tensor* p, const char* what, size_t i) {
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", what, "[", i, "] must be dense (strided), got ", t.layout());
      TORCH_CHECK(t.device() == device, op, ": ", what, "[", i, "] is on ", t.device(), " but params[0] is on ",
                  device);
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
                  " but params[0] has ", dtype, " (one dtype per call)");
      TORCH_CHECK(p == nullptr || t.sizes() == p->sizes(), op, ": ", what, "[", i, "] has shape ", t.sizes(),
                  " but params[", i, "] has shape ", p->sizes());
    };
    for (size_t i = 0; i < params.size(); ++i) {
      check_like(params[i], nullptr, "params", i);
      check_like(grads[i], &params[i], "grads", i);
      if (has_bufs) check_like(bufs[i], &params[i], "state", i);
    }
    TORCH_CHECK(params.size() < (size_t(1) << 31), op, ": too many tensors");
  }
  OverlapCheck overlap(op, (has_bufs ? 3 : 2) * params.size() + 3);
  overlap.add(params, "params", true);
  overlap.add(grads, "grads", false);
  if (has_bufs) overlap.add(bufs, bufs_name, true);
  overlap.add(hyper, "hyper", -1, false);
  overlap.add(rng, "rng", -1, true);
  if (skip.has_value()) overlap.add(*skip, "skip", -1, false);
  overlap.run();
}

// Contiguous stand-ins for a list of tensors that the op mutates: non-contiguous tensors are
// computed on a contiguous copy and written back afterwards (elements in logical order). The
// write-back cannot fail: check_step_args refused internal overlap and cross-argument overlap.
//
// Dense permuted tensors (channels_last weights, transposes) are copied too, although an
// elementwise update could walk their memory in place: the noise of element i is normal i of the
// tensor's Philox stream with i the LOGICAL (row-major) index, on the CPU, on CUDA and in the
// reference (pyfastbayes/_reference/sgmcmc.py: philox_normal(numel).view(shape)). Walking the
// memory order would hand such a tensor other normals than the reference's, and computing the
// logical index of each element in memory order would cost a Philox block per element. Changing
// the stream to memory order would remove these copies, but only together with the reference.
struct ContiguousList {
  std::vector<at::Tensor> originals, work;
  explicit ContiguousList(at::TensorList ts) {
    originals.reserve(ts.size());
    work.reserve(ts.size());
    for (const auto& t : ts) {
      originals.push_back(t);
      work.push_back(t.is_contiguous() ? t : t.contiguous());
    }
  }
  void write_back() {
    for (size_t i = 0; i < work.size(); ++i)
      if (!work[i].is_same(originals[i])) originals[i].copy_(work[i]);
  }
};

// A tensor whose elements are read as one flat array from data_ptr() by an op to which the
// order of the elements does not matter (any_nonfinite): a dense tensor in any memory order
// (non-overlapping and dense: its elements fill [data_ptr, data_ptr + numel), e.g. channels_last
// or transposed) as a 1-D view of that memory, in place; any other tensor as a contiguous copy.
inline at::Tensor flat_in_memory_order(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  if (t.is_non_overlapping_and_dense()) return t.as_strided({t.numel()}, {1});
  return t.contiguous();
}

// The inputs of any_nonfinite that can hold NaN / inf, as flat real tensors of a kernel dtype
// (flat_in_memory_order: dense ones in place): floating tensors as they are (float8 ones
// converted to float32, which keeps NaN and inf), complex ones as their (real, imaginary) pairs;
// integer, bool and float4 tensors (no NaN or inf to hold) are skipped. Every tensor must be on
// `device_type`, all on one device.
inline std::vector<at::Tensor> nonfinite_inputs(at::TensorList tensors, c10::DeviceType device_type) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (device_type == c10::DeviceType::CPU) {
      TORCH_CHECK(t.device().is_cpu(), "any_nonfinite: all tensors must be on the CPU, got ", t.device());
    } else {
      TORCH_CHECK(t.device() == tensors[0].device(), "any_nonfinite: tensors on ", t.device(), " and ",
                  tensors[0].device());
    }
    if (at::isComplexType(t.scalar_type())) {
      out.push_back(flat_in_memory_order(at::view_as_real(t.is_conj() ? t.resolve_conj() : t)));
    } else if (kernel_float_dtype(t.scalar_type())) {
      out.push_back(flat_in_memory_order(t));
    } else if (at::isFloat8Type(t.scalar_type())) {
      out.push_back(t.to(at::kFloat).contiguous());
    }
  }
  return out;
}

// any_nonfinite's limit: none (nullopt), or a number > 0 (inf: no bound beyond +-inf itself)
inline void check_nonfinite_limit(const std::optional<double>& limit) {
  TORCH_CHECK(!limit.has_value() || *limit > 0.0, "any_nonfinite: limit must be > 0 (a bound on the magnitude), got ",
              limit.has_value() ? *limit : 0.0);
}

// The threshold of any_nonfinite's bit test for a kernel float dtype: an element is flagged when
// (its bits with the sign cleared) >= the threshold, as unsigned integers (IEEE magnitudes order as
// their bits; NaN lies above inf). Without a limit: the bits of +inf (NaN and +-inf flagged); with
// one: the bits of the smallest value of the dtype >= limit (|x| >= that value exactly when
// |x| >= limit), +inf's when the limit exceeds the dtype's largest finite value.
inline uint64_t nonfinite_threshold(at::ScalarType dtype, const std::optional<double>& limit) {
  const double inf = std::numeric_limits<double>::infinity();
  const double lim = limit.has_value() ? *limit : inf;
  switch (dtype) {
    case at::kDouble: return c10::bit_cast<uint64_t>(lim);
    case at::kFloat: {
      float f = static_cast<float>(lim);  // nearest (inf beyond the range)
      if (static_cast<double>(f) < lim) f = std::nextafter(f, std::numeric_limits<float>::infinity());
      return c10::bit_cast<uint32_t>(f);
    }
    case at::kHalf: {
      c10::Half h(static_cast<float>(lim));  // nearest to the nearest float: floor or ceil of lim
      uint16_t bits = h.x;
      if (static_cast<double>(static_cast<float>(h)) < lim) ++bits;  // the next magnitude (inf past 65504)
      return bits;
    }
    case at::kBFloat16: {
      c10::BFloat16 b(static_cast<float>(lim));
      uint16_t bits = b.x;
      if (static_cast<double>(static_cast<float>(b)) < lim) ++bits;
      return bits;
    }
    default: TORCH_CHECK(false, "any_nonfinite: unexpected dtype ", dtype);
  }
}

}  // namespace pyfastbayes
