// rlkernels::_evict_from_cache: writes back and evicts the cache lines of tensors' storage from every
// level of the CPU cache (clflush), for the benchmark's "cold data" timing: the inputs come from DRAM, as
// the byte model assumes, while code and interpreter state stay cached as they would in a training loop
// (rewriting a buffer larger than the last-level cache evicts those too). Not part of the API.
#include <torch/library.h>

#include <cstdint>

#include "alloc.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace {

bool evict_from_cache(at::TensorList tensors) {
#if defined(__x86_64__) && defined(__GNUC__)
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || !t.has_storage() || t.device().type() != c10::DeviceType::CPU) continue;
    const auto& storage = t.storage();
    const char* p = static_cast<const char*>(storage.data());
    if (p == nullptr) continue;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + storage.nbytes();
    for (uintptr_t a = begin; a < end; a += 64) _mm_clflush(reinterpret_cast<const void*>(a));
  }
  _mm_mfence();
  return true;
#else
  (void)tensors;
  return false;  // no portable way here: the benchmark falls back to rewriting a large buffer
#endif
}

// Bytes of freed output buffers held by the output cache (alloc.h), for its tests. Not part of the API.
int64_t output_cache_bytes() {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
  return static_cast<int64_t>(rlkernels::OutputCache::instance().cached_bytes());
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkernels, m) {
  m.def("_evict_from_cache(Tensor[] tensors) -> bool", &evict_from_cache);
  m.def("_output_cache_bytes() -> int", &output_cache_bytes);
}
