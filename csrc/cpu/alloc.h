// Output allocation of the CPU kernels: outputs of 128 KiB or more come from a small cache of mapped buffers
// (huge pages from 4 MiB), every output on a 128-byte boundary.
//
// A large output is otherwise fresh memory: glibc hands out blocks over its mmap threshold (128 KiB at first,
// moving up to 32 MiB as mapped blocks are freed) as new mappings, and every 4 KiB page faults on its first
// write: for a 32 MB output the faults cost more than GAE's kernel over 4M steps, and for the two 2 MiB outputs
// of a [128, 4096] GAE five times the kernel (docs/performance.md); whether glibc reuses a freed block instead
// depends on its heap's history, so it varies from process to process. So outputs of kCachedOutputBytes or more
// are mapped by us (from kHugeOutputBytes on 2 MiB-aligned and marked MADV_HUGEPAGE), and when the tensor is
// freed its buffer is kept for the next output of the same size, as PyTorch's caching allocator does on GPUs: a
// training loop calling the op every iteration writes into memory that is already mapped. At most
// RLKERNELS_OUTPUT_CACHE_MB (default 256) MiB of freed buffers are kept, least recently freed returned to the
// system first; RLKERNELS_OUTPUT_CACHE_MB=0 keeps none (each output is still mapped by us). The tensors are
// ordinary CPU tensors: their storage is resizable (resize_ past its size moves the data to a new buffer from
// the same allocator and returns the old one), since torch changes a tensor's shape before it finds that a
// storage cannot grow, which would leave a tensor larger than its memory.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlkernels {

constexpr int64_t kCachedOutputBytes = int64_t(128) << 10;  // glibc's first mmap threshold
constexpr int64_t kHugeOutputBytes = int64_t(4) << 20;
// Every output starts on a 128-byte boundary: a pair of cache lines, the unit Intel's adjacent-line prefetcher
// fetches. The kernels split an output's rows between threads at 128-byte offsets (csrc/cpu/scan_engine.h), so
// no pair is written by two cores; torch's allocator aligns to 64 bytes, and a pair shared at every row made
// two threads slower than one (docs/performance.md).
constexpr size_t kOutputAlign = 128;
// Successive outputs start at different offsets into their buffers (multiples of 1152 bytes, 9 line pairs),
// so the outputs of one call do not all sit at the same address modulo 2 MiB (cache sets, 4K aliasing).
constexpr size_t kColors = 16, kColorBytes = 1152;
inline thread_local size_t color = 0;

#if defined(__linux__) && defined(MAP_ANONYMOUS)
class OutputCache {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;

  // Never destroyed: tensors freed during interpreter shutdown still return their buffers.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }
  static constexpr size_t kPage = size_t(4) << 10;
  // The buffer size of an output of `bytes` bytes: whole huge pages from kHugeOutputBytes on, else whole pages.
  static size_t rounded(size_t bytes) {
    const size_t unit = bytes >= static_cast<size_t>(kHugeOutputBytes) ? kHuge : kPage;
    return (bytes + kColors * kColorBytes + unit - 1) / unit * unit;
  }

  // A buffer of `size` bytes (a multiple of kPage): a cached one of that size, else a new mapping (nullptr if
  // mmap fails), 2 MiB-aligned and marked for huge pages when `huge`.
  void* take(size_t size, bool huge) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].first == size) {
          void* p = free_[i].second;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= size;
          return p;
        }
      }
    }
    if (!huge) {
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      return p == MAP_FAILED ? nullptr : p;
    }
    // Map kHuge more than needed and unmap the ends, so the buffer starts on a 2 MiB boundary.
    void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t r = reinterpret_cast<uintptr_t>(raw), p = (r + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
    if (p > r) munmap(raw, p - r);
    if (r + kHuge > p) munmap(reinterpret_cast<void*>(p + size), r + kHuge - p);
#ifdef MADV_HUGEPAGE
    (void)madvise(reinterpret_cast<void*>(p), size, MADV_HUGEPAGE);  // best effort: else 4 KiB pages
#endif
    return reinterpret_cast<void*>(p);
  }

  void give(void* p, size_t size) {
    std::vector<std::pair<size_t, void*>> release;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace_back(size, p);
      cached_ += size;
      while (cached_ > capacity_ && !free_.empty()) {
        release.push_back(free_.front());
        cached_ -= free_.front().first;
        free_.erase(free_.begin());
      }
    }
    for (auto& [s, q] : release) munmap(q, s);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  OutputCache() {
    const char* v = std::getenv("RLKERNELS_OUTPUT_CACHE_MB");
    capacity_ = (v != nullptr ? static_cast<size_t>(std::max(0L, std::strtol(v, nullptr, 10))) : size_t(256)) << 20;
  }
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;  // (size, buffer), least recently freed first
  size_t cached_ = 0;
  size_t capacity_ = 0;
};
#endif

// The allocator of CPU outputs: buffers of kCachedOutputBytes or more from the OutputCache, smaller ones (a
// resize_ may ask for any size) from torch's CPU allocator, kOutputAlign-aligned.
class OutputAllocator final : public c10::Allocator {
 public:
  static OutputAllocator* get() {
    static OutputAllocator* a = new OutputAllocator();
    return a;
  }

  c10::DataPtr allocate(size_t bytes) override {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    if (bytes >= static_cast<size_t>(kCachedOutputBytes)) {
      const size_t size = OutputCache::rounded(bytes);
      if (void* p = OutputCache::instance().take(size, bytes >= static_cast<size_t>(kHugeOutputBytes))) {
        auto* block = new Block{p, size};
        return {static_cast<char*>(p) + kColorBytes * (color++ % kColors), block, &release,
                c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    // torch's allocator aligns to 64 bytes: ask for 64 more and start at the next 128-byte boundary.
    c10::DataPtr inner = c10::GetDefaultCPUAllocator()->allocate(bytes + kOutputAlign - 64);
    const uintptr_t raw = reinterpret_cast<uintptr_t>(inner.get());
    if (raw == 0) return inner;
    char* data = reinterpret_cast<char*>((raw + kOutputAlign - 1) & ~uintptr_t(kOutputAlign - 1));
    return {data, new c10::DataPtr(std::move(inner)), &release_inner, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* p;
    size_t size;
  };
  static void release_inner(void* ctx) { delete static_cast<c10::DataPtr*>(ctx); }
  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    OutputCache::instance().give(block->p, block->size);
#endif
    delete block;
  }
};

// at::empty(sizes, options) for a CPU output, from the OutputAllocator (128-byte aligned; large ones from the
// OutputCache).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) {
    return at::detail::empty_generic(sizes, OutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
  return at::empty(sizes, options);
}

}  // namespace rlkernels
