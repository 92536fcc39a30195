// rlkernels::_evict_from_cache: writes back and evicts the cache lines of tensors' storage from every
// level of the CPU cache (clflush), for the benchmark's "cold data" timing: the inputs come from DRAM, as
// the byte model assumes, while code and interpreter state stay cached as they would in a training loop
// (rewriting a buffer larger than the last-level cache evicts those too). Not part of the API.
// rlkernels::_cpu_isa: the CPU kernels' instruction-set level (isa.h), read or capped, for the benchmark's
// --isa rows and the per-level tests. Not part of the API either; nor is rlkernels::_cpu_line_pairs (below).
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "alloc.h"
#include "isa.h"

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

// With a level name ("default", "avx2", "avx512"), caps the level of the calls that follow to it (at most what
// this CPU runs); with "", changes nothing. Returns the level in effect, and "|" with the widest this CPU runs:
// "avx2|avx512".
std::string cpu_isa(c10::string_view level) {
  using namespace rlkernels::cpu;
  if (!level.empty()) {
    const int wanted = isa_level_of(std::string_view(level.data(), level.size()));
    TORCH_CHECK_VALUE(wanted >= 0, "rlkernels: unknown CPU instruction set '", std::string(level),
                      "'; expected default, avx2 or avx512");
    set_cpu_isa_cap(wanted);
  }
  return std::string(cpu_isa_name()) + "|" + kIsaNames[detected_isa_level()];
}

// With "on" or "off", makes the scan engine walk as on a CPU whose prefetcher completes 128-byte line pairs or
// not (isa.h), whatever this CPU does; with "auto", as this CPU does; with "", changes nothing. Returns whether
// it walks as on such a CPU. For the tests of both walks.
bool cpu_line_pairs(c10::string_view mode) {
  using namespace rlkernels::cpu;
  const std::string m(mode.data(), mode.size());
  TORCH_CHECK_VALUE(m.empty() || m == "on" || m == "off" || m == "auto", "rlkernels: unknown line-pair mode '", m,
                    "'; expected on, off or auto");
  if (!m.empty()) set_line_pairs(m == "on" ? 1 : m == "off" ? 0 : -1);
  return cpu_prefetches_line_pairs();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkernels, m) {
  m.def("_cpu_isa(str level) -> str", &cpu_isa);
  m.def("_cpu_line_pairs(str mode) -> bool", &cpu_line_pairs);
  m.def("_evict_from_cache(Tensor[] tensors) -> bool", &evict_from_cache);
  m.def("_output_cache_bytes() -> int", &output_cache_bytes);
}
