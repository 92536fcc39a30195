// Output allocation of the CPU kernels.
//
// A large output is usually fresh memory: glibc hands out blocks over its mmap threshold (at most 32 MiB) as
// new mappings, and every 4 KiB page then faults on its first write. Measured on a 2-core EPYC VM: writing a
// fresh 32 MB tensor takes ~13 ms with 4 KiB pages (8,192 faults) and ~5 ms when the range is marked for
// transparent huge pages first, more than the GAE kernel itself takes on 4M steps. So outputs of
// kHugeOutputBytes or more are marked MADV_HUGEPAGE before anything touches them (Linux; best effort:
// where THP is off or the call fails, the pages stay 4 KiB). Memory that is already mapped is unaffected.
// RLKERNELS_HUGE_PAGES=0 turns this off.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlkernels {

constexpr int64_t kHugeOutputBytes = int64_t(4) << 20;

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("RLKERNELS_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// at::empty(sizes, options), with the whole 2 MiB pages inside a large result marked for huge pages.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (t.device().is_cpu() && bytes >= kHugeOutputBytes && huge_pages_enabled()) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace rlkernels
