// A CPU allocator wrapper that records live bytes, their peak and the largest single allocation, for memory
// assertions in tests and peak-memory counters in benchmarks. Header-only so benchmarks can use it too.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace sa_test {

/// Wraps the CPU allocator and records live bytes, their peak and the largest single allocation.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    const c10::Device device = inner.device();
    auto* ctx = new Ctx{std::move(inner), n, this};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ += n;
      peak_ = std::max(peak_, live_);
      largest_ = std::max(largest_, n);
    }
    return {data, ctx, &release, device};
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_ = live_;
    largest_ = 0;
  }
  size_t live() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_;
  }
  size_t peak() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }
  size_t largest() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return largest_;
  }

 private:
  struct Ctx {
    c10::DataPtr inner;
    size_t bytes;
    const TrackingAllocator* owner;
  };
  static void release(void* p) {
    auto* ctx = static_cast<Ctx*>(p);
    {
      std::lock_guard<std::mutex> lock(ctx->owner->mutex_);
      ctx->owner->live_ -= ctx->bytes;
    }
    delete ctx;
  }

  c10::Allocator* base_;
  mutable std::mutex mutex_;
  mutable size_t live_ = 0, peak_ = 0, largest_ = 0;
};

/// Installs the tracker for one scope. It stays alive for the process (tensors made under it may outlive the scope).
class ScopedTracking {
 public:
  static constexpr uint8_t kPriority = 100;
  ScopedTracking() : base_(c10::GetCPUAllocator()) {
    static TrackingAllocator* tracker = new TrackingAllocator(base_);
    tracker_ = tracker;
    c10::SetCPUAllocator(tracker_, kPriority);
  }
  ~ScopedTracking() { c10::SetCPUAllocator(base_, kPriority); }
  TrackingAllocator& tracker() { return *tracker_; }

 private:
  c10::Allocator* base_;
  TrackingAllocator* tracker_;
};

}  // namespace sa_test
