// Host-only argument checks shared by every op family (CPU and CUDA entry points): the memory
// overlap check of the mutating ops, and contiguous stand-ins for read-only tensor lists.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pyfastbayes {

// The device type as the error messages spell it ("CPU", "CUDA"): streaming a c10::DeviceType
// prints "cuda" or "CUDA" depending on the torch version.
inline const char* device_type_name(c10::DeviceType t) {
  switch (t) {
    case c10::DeviceType::CPU: return "CPU";
    case c10::DeviceType::CUDA: return "CUDA";
    default: return "another device type";
  }
}

// The overlap check of one call. Every tensor argument is added (in schema order, list elements
// in list order); a tensor the call writes (`mutated`) must not share a byte with any other
// argument, and must not overlap itself (an expanded, stride-0 view). Either would be a data race
// (two threads updating one element, lost updates), so the call is refused before any write.
//
// Cost: O(n log n) in the number of tensors (the byte ranges [data_ptr, data_ptr + extent) are
// sorted and swept once). Only a pair whose ranges intersect while one of them is not dense (e.g.
// the interleaved columns x[:, 0] and x[:, 1]) is looked at element by element.
class OverlapCheck {
 public:
  explicit OverlapCheck(const char* op, size_t expected = 0) : op_(op) {
    args_.reserve(expected);
    keys_.reserve(expected);
  }

  void add(const at::Tensor& t, const char* name, int64_t index, bool mutated) {
    if (!t.defined()) return;
    if (t.layout() != at::kStrided) return;  // only strided tensors have a byte range (ops refuse the others)
    const bool dense = t.is_non_overlapping_and_dense();
    if (mutated && !dense) {
      TORCH_CHECK(!overlaps_itself(t), op_, ": ", label(name, index),
                  " has internal overlap (an expanded, stride-0 or as_strided view: several of its elements share "
                  "memory), so it cannot be written in place; pass a tensor with memory of its own (e.g. .clone())");
    }
    if (t.numel() == 0) return;
    const auto sizes = t.sizes(), strides = t.strides();
    int64_t last = 0;  // element offset of the last element (strides are >= 0 in torch)
    for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
    const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const auto item = static_cast<uintptr_t>(t.element_size());
    const auto order = static_cast<uint32_t>(args_.size());
    args_.push_back({&t, name, index, mutated, dense, start, start + static_cast<uintptr_t>(last) * item + item});
    keys_.push_back({start, order});
  }
  void add(at::TensorList ts, const char* name, bool mutated) {
    for (size_t i = 0; i < ts.size(); ++i) add(ts[i], name, static_cast<int64_t>(i), mutated);
  }

  // Throws naming both arguments when a mutated tensor overlaps another argument.
  void run() {
    sort_keys();  // by start, then by argument order
    // ranges still open at the current start (mutated / read-only): empty unless ranges intersect
    std::vector<uint32_t> open_mut, open_ro;
    uintptr_t max_end = 0;  // furthest end of the ranges so far
    auto close = [&](std::vector<uint32_t>& open, uintptr_t at) {
      open.erase(std::remove_if(open.begin(), open.end(), [&](uint32_t o) { return args_[o].end <= at; }),
                 open.end());
    };
    auto check = [&](const std::vector<uint32_t>& open, uint32_t i) {
      for (const uint32_t o : open) {
        if (!share_memory(args_[o], args_[i])) continue;
        const Arg& first = args_[std::min(o, i)];
        const Arg& second = args_[std::max(o, i)];
        TORCH_CHECK(false, op_, ": ", label(second.name, second.index), " overlaps ",
                    label(first.name, first.index), " (the same memory twice in one call); pass each tensor once");
      }
    };
    for (const auto& [start, i] : keys_) {
      const Arg& a = args_[i];
      if (start >= max_end) {  // the common case: every range so far has ended
        open_mut.clear();
        open_ro.clear();
      } else {
        close(open_mut, start);
        check(open_mut, i);
        if (a.mutated) {  // read-only ranges only matter to a mutated one
          close(open_ro, start);
          check(open_ro, i);
        }
      }
      (a.mutated ? open_mut : open_ro).push_back(i);
      max_end = std::max(max_end, a.end);
    }
  }

 private:
  // Sorts keys_. They come as a few sorted runs (each list is usually allocated in order, or in
  // reverse order, as gradients are during backward), so merging the runs costs about O(n).
  void sort_keys() {
    auto& k = keys_;
    const size_t n = k.size();
    std::vector<size_t> bounds{0};  // runs [bounds[r], bounds[r + 1])
    for (size_t i = 0; i < n;) {
      size_t j = i + 1;
      if (j < n && k[j] < k[i]) {  // a descending run: reversed
        while (j < n && k[j] < k[j - 1]) ++j;
        std::reverse(k.begin() + i, k.begin() + j);
      } else {
        while (j < n && k[j - 1] < k[j]) ++j;
      }
      bounds.push_back(j);
      i = j;
      if (bounds.size() > 64) {  // no such structure: a plain sort
        std::sort(k.begin(), k.end());
        return;
      }
    }
    while (bounds.size() > 2) {  // merge neighbouring runs pairwise
      std::vector<size_t> merged{0};
      size_t r = 0;
      for (; r + 2 < bounds.size(); r += 2) {
        std::inplace_merge(k.begin() + bounds[r], k.begin() + bounds[r + 1], k.begin() + bounds[r + 2]);
        merged.push_back(bounds[r + 2]);
      }
      if (r + 1 < bounds.size()) merged.push_back(bounds[r + 1]);  // an odd run out
      bounds = std::move(merged);
    }
  }

  struct Arg {  // args_[i]: the i-th argument added (the call's argument order)
    const at::Tensor* t;
    const char* name;
    int64_t index;  // position in its list, -1 for a single tensor
    bool mutated, dense;
    uintptr_t start, end;  // bytes [start, end) between the first and past the last element
  };

  static std::string label(const char* name, int64_t index) {
    return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
  }

  // Calls f(begin) for the first byte of each element of t, in memory order of its last dim.
  template <class F>
  static void for_each_element(const at::Tensor& t, F&& f) {
    const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const auto sizes = t.sizes(), strides = t.strides();
    const int64_t nd = t.dim(), item = t.element_size();
    std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
    for (int64_t n = 0, numel = t.numel(); n < numel; ++n) {
      int64_t off = 0;
      for (int64_t d = 0; d < nd; ++d) off += idx[d] * strides[d];
      f(base + static_cast<uintptr_t>(off * item));
      for (int64_t d = nd - 1; d >= 0 && ++idx[d] == sizes[d]; --d) idx[d] = 0;
    }
  }

  // Whether two elements of t share memory. at::has_internal_overlap decides only stride 0 (Yes)
  // and dense tensors (No), and says TooHard for every other view, e.g. as_strided((3, 2), (1, 2)),
  // whose elements [2, 0] and [0, 1] are one element. Sufficient for No: the dims of size > 1
  // sorted by stride, each stride reaches past the offsets the smaller dims cover; else the element
  // offsets are compared exactly (only odd views get there).
  static bool overlaps_itself(const at::Tensor& t) {
    const auto status = at::has_internal_overlap(t);
    if (status != at::MemOverlap::TooHard) return status == at::MemOverlap::Yes;
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
    for (int64_t d = 0; d < t.dim(); ++d)
      if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
    std::sort(dims.begin(), dims.end());
    int64_t span = 1;  // the smaller dims cover element offsets [0, span)
    bool separated = true;
    for (const auto& [stride, size] : dims) {
      separated = separated && stride >= span;
      span += stride * (size - 1);
    }
    if (separated) return false;
    std::vector<uintptr_t> addr;
    addr.reserve(static_cast<size_t>(t.numel()));
    for_each_element(t, [&](uintptr_t e) { addr.push_back(e); });
    std::sort(addr.begin(), addr.end());
    return std::adjacent_find(addr.begin(), addr.end()) != addr.end();
  }

  // Whether two tensors whose byte ranges intersect share a byte.
  static bool share_memory(const Arg& a, const Arg& b) {
    if (a.dense && b.dense) return true;  // each covers its whole range
    const uintptr_t lo = std::max(a.start, b.start), hi = std::min(a.end, b.end);
    if (a.dense || b.dense) {  // does an element of the strided one fall in the dense one's range?
      const Arg& s = a.dense ? b : a;
      const auto item = static_cast<uintptr_t>(s.t->element_size());
      bool hit = false;
      for_each_element(*s.t, [&](uintptr_t e) { hit |= e < hi && e + item > lo; });
      return hit;
    }
    // both strided: the elements of each inside the common window, sorted by address, swept
    struct Span {
      uintptr_t start, end;
      int owner;
      bool operator<(const Span& o) const { return start < o.start; }
    };
    constexpr size_t kMaxSpans = size_t(1) << 20;  // beyond this, assume the worst
    std::vector<Span> spans;
    for (int owner = 0; owner < 2; ++owner) {
      const at::Tensor& t = *(owner == 0 ? a : b).t;
      const auto item = static_cast<uintptr_t>(t.element_size());
      for_each_element(t, [&](uintptr_t e) {
        if (e < hi && e + item > lo && spans.size() <= kMaxSpans) spans.push_back({e, e + item, owner});
      });
    }
    if (spans.size() > kMaxSpans) return true;
    std::sort(spans.begin(), spans.end());
    uintptr_t end_of[2] = {0, 0};  // furthest end so far of a's and of b's elements
    for (const Span& s : spans) {
      if (s.start < end_of[1 - s.owner]) return true;
      end_of[s.owner] = std::max(end_of[s.owner], s.end);
    }
    return false;
  }

  const char* op_;
  std::vector<Arg> args_;
  std::vector<std::pair<uintptr_t, uint32_t>> keys_;  // (start, i): sorted, the sweep order
};

// The floating dtypes every kernel is compiled for (the math type of the half ones is float32).
inline bool kernel_float_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Contiguous stand-ins for a list of tensors that the op only reads.
inline std::vector<at::Tensor> contiguous_list(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace pyfastbayes
