// Declarations of the per-ISA float32 lane kernels of the PPO policy loss (definitions: ppo_lanes.h,
// compiled by csrc/cpu/ppo_lanes_{default,avx2,avx512}.cpp) and the run-time choice between them.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

namespace rlkernels::cpu::lanes {

constexpr int kLanesDecl = 16;

#define RLK_DECLARE_PPO_LANES(isa)                                                                             \
  namespace isa {                                                                                            \
  void policy_forward_f32(const float* lp, const float* old, const float* adv, const uint8_t* mask, int64_t n, \
                          float clip_lo, float clip_hi, float dual_clip, float (&out)[7 * kLanesDecl]);       \
  void policy_backward_f32(const float* lp, const float* old, const float* adv, const uint8_t* mask,           \
                           int64_t n, float clip_lo, float clip_hi, float dual_clip, float scale, float* grad); \
  }
RLK_DECLARE_PPO_LANES(isa_default)
#if defined(__x86_64__) && defined(__GNUC__)
RLK_DECLARE_PPO_LANES(isa_avx2)
RLK_DECLARE_PPO_LANES(isa_avx512)
#endif
#undef RLK_DECLARE_PPO_LANES

struct PolicyLanes {
  decltype(&isa_default::policy_forward_f32) forward;
  decltype(&isa_default::policy_backward_f32) backward;
};

// The widest instruction set this CPU runs, once per process (RLKERNELS_CPU_ISA=default|avx2|avx512 caps it,
// as for the scan engine).
inline PolicyLanes policy_lanes() {
  static const PolicyLanes chosen = [] {
    int best = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = 2;
#endif
    if (const char* cap = std::getenv("RLKERNELS_CPU_ISA")) {
      const std::string want(cap);
      const int asked = want == "avx512" ? 2 : want == "avx2" ? 1 : 0;
      best = best < asked ? best : asked;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    if (best == 2) return PolicyLanes{&isa_avx512::policy_forward_f32, &isa_avx512::policy_backward_f32};
    if (best == 1) return PolicyLanes{&isa_avx2::policy_forward_f32, &isa_avx2::policy_backward_f32};
#endif
    return PolicyLanes{&isa_default::policy_forward_f32, &isa_default::policy_backward_f32};
  }();
  return chosen;
}

}  // namespace rlkernels::cpu::lanes
