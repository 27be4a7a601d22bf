// A scoped cache of CPU tensor memory, for loops that allocate the same large temporaries again
// and again (the loss-landscape grid: every block of points x rows allocates activations of a few
// MB per layer, under vmap, with no way to pass out= buffers).
//
// Why: torch's default CPU allocator is posix_memalign / free. glibc serves blocks above its mmap
// threshold (128 KiB, raised dynamically up to 32 MiB) with fresh mmap()s and trims freed memory
// at the top of the heap, so a loop of 4-16 MB temporaries pays a page fault (and the kernel's
// zeroing) per 4 KiB page on every first touch: on 2 cores the grid's ReLUs ran at 3 GB/s
// instead of ~40 GB/s. Inside a scope (enter() ... exit(), nested scopes count), this allocator
// is the process's CPU allocator (c10::SetCPUAllocator); it keeps freed blocks in exact-size free
// lists and hands them out again, so a repeated shape reuses warm, already-mapped memory.
//
// Rules: blocks freed after the scope ends (a result tensor) go straight back to the system;
// at most kMaxCachedBytes are kept; exit() releases every cached block and restores the
// allocator that was there before (unless another one replaced ours meanwhile). Thread-safe (one
// mutex; intra-op threads allocate too). Memory is not reported to torch.profiler's memory view.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cpu/allocation_cache.h"

namespace pyfastbayes::cpu {
namespace {

constexpr size_t kMaxCachedBytes = size_t(1) << 30;  // free blocks kept for reuse, at most

struct Block {
  size_t size;
  uint64_t generation;  // the scope it was allocated in; stale after exit()
};

class AllocationCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {  // a cached block of this size: taken and recorded under one lock
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= n;
        live_[p] = Block{n, generation_};
      }
    }
    if (p == nullptr && n > 0) {  // a new block: the system allocation outside the lock
      p = c10::alloc_cpu(n);
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = Block{n, generation_};
    }
    // context == data (a "simple" data pointer: oneDNN and others assert it); the size lives in live_
    return {p, p, &AllocationCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate / raw_deallocate (oneDNN's scratch buffers) need the deleter of a simple pointer
  c10::DeleterFnPtr raw_deleter() const override { return &AllocationCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static AllocationCache& instance() {
    static auto* cache = new AllocationCache();  // never destroyed: tensors may outlive static teardown
    return *cache;
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_++ > 0) return;
    previous_ = c10::GetCPUAllocator();
    c10::SetCPUAllocator(this);
  }

  void exit() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      TORCH_CHECK(depth_ > 0, "allocation cache: exit() without enter()");
      if (--depth_ > 0) return;
      if (c10::GetCPUAllocator() == this) c10::SetCPUAllocator(previous_);
      ++generation_;
      for (auto& [size, ptrs] : free_) drop.insert(drop.end(), ptrs.begin(), ptrs.end());
      free_.clear();
      cached_ = 0;
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  bool active() {
    std::lock_guard<std::mutex> lock(mu_);
    return depth_ > 0 && c10::GetCPUAllocator() == this;
  }

 private:
  static void release(void* ptr) {
    if (ptr == nullptr) return;
    AllocationCache& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mu_);
      auto it = self.live_.find(ptr);
      TORCH_INTERNAL_ASSERT(it != self.live_.end(), "allocation cache: freeing a block it did not allocate");
      const Block b = it->second;
      self.live_.erase(it);
      if (self.depth_ > 0 && b.generation == self.generation_ && self.cached_ + b.size <= kMaxCachedBytes) {
        self.free_[b.size].push_back(ptr);
        self.cached_ += b.size;
        return;
      }
    }
    c10::free_cpu(ptr);
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // size -> cached free blocks
  std::unordered_map<void*, Block> live_;                 // blocks handed out (and not yet freed)
  size_t cached_ = 0;
  int depth_ = 0;
  uint64_t generation_ = 0;
  c10::Allocator* previous_ = nullptr;
};

}  // namespace

void allocation_cache_enter() { AllocationCache::instance().enter(); }
void allocation_cache_exit() { AllocationCache::instance().exit(); }
bool allocation_cache_active() { return AllocationCache::instance().active(); }

}  // namespace pyfastbayes::cpu
