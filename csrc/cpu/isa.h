// The one CPU instruction-set dispatcher: every SIMD kernel is compiled once per level in its own translation
// units (csrc/cpu/simd_{default,avx2,avx512}.cpp and the scan engine's scan_block_*.cpp, each defining RLK_ISA
// and switching its target), never with -march, and every call picks its level here:
//   - detection: the widest level this CPU runs (__builtin_cpu_supports), once per process;
//   - the cap: RLKERNELS_CPU_ISA=default|avx2|avx512 read at first use, or set_cpu_isa_cap (the benchmark's
//     --isa, through torch.ops.rlkernels._cpu_isa); a level above what the CPU runs is capped to that;
//   - the level: min(detected, cap), read by every dispatch (one relaxed atomic load), so a kernel never
//     caches its choice.
// Levels: 0 = baseline x86-64 (SSE2), 1 = AVX2 with FMA and F16C, 2 = AVX-512 F/VL/BW/DQ.
#pragma once

#include <atomic>
#include <cstdlib>
#include <string_view>

namespace rlkernels::cpu {

enum IsaLevel : int { kIsaDefault = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline constexpr const char* kIsaNames[] = {"default", "avx2", "avx512"};

// -1 for a name that is none of the levels.
inline int isa_level_of(std::string_view name) {
  for (int l = 0; l < 3; ++l)
    if (name == kIsaNames[l]) return l;
  return -1;
}

// The widest level this CPU runs.
inline int detected_isa_level() {
  static const int level = [] {
    int best = kIsaDefault;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      best = kIsaAvx2;
    if (best == kIsaAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = kIsaAvx512;
#endif
    return best;
  }();
  return level;
}

// Whether the CPU's L2 prefetcher completes 128-byte line pairs (Intel's spatial prefetcher): the scan engine
// then gives threads whole pairs of time-major rows, and splits narrow rows' time between threads instead of
// their lanes (scan_engine.h). set_line_pairs (1 or 0; -1 detects again) lets the tests walk both ways on any CPU.
namespace isa_detail {
inline std::atomic<int>& line_pairs() {
  static std::atomic<int> pairs{-1};
  return pairs;
}
inline bool detect_line_pairs() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel") != 0;
#else
  return false;
#endif
}
}  // namespace isa_detail

inline bool cpu_prefetches_line_pairs() {
  static const bool detected = isa_detail::detect_line_pairs();
  const int set = isa_detail::line_pairs().load(std::memory_order_relaxed);
  return set < 0 ? detected : set != 0;
}

inline void set_line_pairs(int pairs) { isa_detail::line_pairs().store(pairs, std::memory_order_relaxed); }

namespace isa_detail {
inline int env_cap() {
  const char* cap = std::getenv("RLKERNELS_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return kIsaAvx512;
  const int level = isa_level_of(cap);
  return level < 0 ? kIsaDefault : level;  // an unknown name takes the portable build
}
inline std::atomic<int>& level() {
  static std::atomic<int> current{[] {
    const int cap = env_cap(), best = detected_isa_level();
    return cap < best ? cap : best;
  }()};
  return current;
}
}  // namespace isa_detail

// The level every CPU kernel runs now.
inline int cpu_isa_level() { return isa_detail::level().load(std::memory_order_relaxed); }
inline const char* cpu_isa_name() { return kIsaNames[cpu_isa_level()]; }

// Caps the level (at most what the CPU runs) for the calls that follow; returns the level in effect.
inline int set_cpu_isa_cap(int cap) {
  const int best = detected_isa_level();
  const int level = cap < best ? cap : best;
  isa_detail::level().store(level, std::memory_order_relaxed);
  return level;
}

}  // namespace rlkernels::cpu
