// The float32 hot path of the PPO policy loss on CPU: branch-free loops over kLanes tokens at a time, so
// GCC vectorizes them. Compiled once per instruction set (csrc/cpu/ppo_lanes_{default,avx2,avx512}.cpp, each
// defining RLK_ISA and its target before including this header) and chosen at run time: no -march. The math is that of csrc/include/rlkernels/ppo.h, written with selects; exp
// is a Cephes-style polynomial (about 1 ulp on the clamped log-ratio range) because libm's expf is a call
// that stops vectorization.
#pragma once

// No FP exception flags are read here, so selects may evaluate both sides: under GCC's default
// -ftrapping-math the lane loops keep their compares as branches and stay scalar.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "exp_poly.h"
#include "rlkernels/ppo.h"

namespace rlkernels::cpu::lanes {
inline namespace RLK_ISA {

constexpr int kLanes = 16;

// exp(x) for x in [-20, 20] (the log-ratio clamp): 2^k * p(r), r = x - k ln 2 in [-ln2/2, ln2/2].
inline float exp_clamped(float x) {
  const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float p = exp_mantissa(x, k);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// Every compare below is evaluated unconditionally (no nested ternaries): under GCC's default
// -ftrapping-math a compare that runs only on one side of a branch cannot be if-converted, and the loops
// would stay scalar.
inline float share(float a, float b) { return (a > b ? 1.0f : 0.0f) + (a == b ? 0.5f : 0.0f); }

inline float clamp_lanes(float x, float lo, float hi) {
  const float y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

// One full block of kLanes tokens into lane-local sums. Inlined into each clone; kMasked is a template
// argument so that no lane reads a mask that is absent (a conditional load would stop vectorization).
template <bool kMasked>
__attribute__((always_inline)) inline void forward_block(const float* __restrict lp, const float* __restrict old,
                                                         const float* __restrict adv, const uint8_t* __restrict mask,
                                                         float clip_lo, float clip_hi, float dual_clip,
                                                         float* __restrict sums) {
  const float bound = static_cast<float>(ppo::kLogRatioBound);
  for (int l = 0; l < kLanes; ++l) {
    const bool ok = kMasked ? mask[l] != 0 : true;
    // Masked tokens are loaded but every use is a select, so their inf/NaN never reach a sum.
    const float a = adv[l];
    float log_ratio = lp[l] - old[l];
    const float kl = -log_ratio;
    log_ratio = clamp_lanes(log_ratio, -bound, bound);
    const float ratio = exp_clamped(log_ratio);
    const float unclipped = -a * ratio;
    const float clamped = clamp_lanes(ratio, clip_lo, clip_hi);
    const float clipped = -a * clamped;
    float loss = unclipped > clipped ? unclipped : clipped;
    const float dual = -a * dual_clip;
    const bool lower = (a < 0.0f) & (loss > dual);
    loss = lower ? dual : loss;
    sums[0 * kLanes + l] += ok ? loss : 0.0f;
    sums[1 * kLanes + l] += ok ? 1.0f : 0.0f;
    sums[2 * kLanes + l] += (ok & (clipped > unclipped)) ? 1.0f : 0.0f;
    sums[3 * kLanes + l] += (ok & lower) ? 1.0f : 0.0f;
    sums[4 * kLanes + l] += ok ? kl : 0.0f;
    sums[5 * kLanes + l] += ok ? ratio : 0.0f;
    const float mx = sums[6 * kLanes + l];
    sums[6 * kLanes + l] = (ok & ((ratio > mx) | (ratio != ratio))) ? ratio : mx;  // a NaN ratio sticks
  }
}

// Per-lane sums of one chunk (loss, count, clipped, lower, kl, ratio, ratio_max: kLanes each), in float; the
// caller adds the lanes in order into float64. dual_clip = +inf when there is none: -A * inf never binds for
// A < 0, and A >= 0 never reaches it.
void policy_forward_f32(const float* lp, const float* old, const float* adv, const uint8_t* mask,
                                          int64_t n, float clip_lo, float clip_hi, float dual_clip,
                                          float (&out)[7 * kLanes]) {
  alignas(64) float sums[7 * kLanes];
  for (int l = 0; l < 6 * kLanes; ++l) sums[l] = 0.0f;
  for (int l = 6 * kLanes; l < 7 * kLanes; ++l) sums[l] = -std::numeric_limits<float>::infinity();
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    if (mask != nullptr)
      forward_block<true>(lp + i, old + i, adv + i, mask + i, clip_lo, clip_hi, dual_clip, sums);
    else
      forward_block<false>(lp + i, old + i, adv + i, nullptr, clip_lo, clip_hi, dual_clip, sums);
  }
  // The tail, lane by lane with the portable scalar math (at most kLanes - 1 tokens per chunk).
  for (int64_t i = full; i < n; ++i) {
    if (mask != nullptr && mask[i] == 0) continue;
    const int l = static_cast<int>(i - full);
    const auto tok = ppo::policy_token<float>(lp[i], old[i], adv[i],
                                              {clip_lo, clip_hi, dual_clip, std::isfinite(dual_clip)});
    sums[0 * kLanes + l] += tok.loss;
    sums[1 * kLanes + l] += 1.0f;
    sums[2 * kLanes + l] += tok.clipped ? 1.0f : 0.0f;
    sums[3 * kLanes + l] += tok.lower ? 1.0f : 0.0f;
    sums[4 * kLanes + l] += old[i] - lp[i];
    sums[5 * kLanes + l] += tok.ratio;
    if (tok.ratio > sums[6 * kLanes + l] || tok.ratio != tok.ratio) sums[6 * kLanes + l] = tok.ratio;  // NaN sticks
  }
  for (int l = 0; l < 7 * kLanes; ++l) out[l] = sums[l];
}

template <bool kMasked>
__attribute__((always_inline)) inline void backward_block(const float* __restrict lp, const float* __restrict old,
                                                          const float* __restrict adv,
                                                          const uint8_t* __restrict mask, float clip_lo,
                                                          float clip_hi, float dual_clip, float scale,
                                                          float* __restrict grad) {
  const float bound = static_cast<float>(ppo::kLogRatioBound);
  for (int i = 0; i < kLanes; ++i) {
    const bool ok = kMasked ? mask[i] != 0 : true;
    const float a = adv[i];
    const float raw = lp[i] - old[i];
    const float log_ratio = clamp_lanes(raw, -bound, bound);
    const float ratio = exp_clamped(log_ratio);
    const float unclipped = -a * ratio;
    const float clamped = clamp_lanes(ratio, clip_lo, clip_hi);
    const float clipped = -a * clamped;
    const float in_clip = (ratio > clip_lo) & (ratio < clip_hi) ? 1.0f : 0.0f;
    float d_ratio = -a * (share(unclipped, clipped) + share(clipped, unclipped) * in_clip);
    const float loss = unclipped > clipped ? unclipped : clipped;
    d_ratio *= a < 0.0f ? share(-a * dual_clip, loss) : 1.0f;
    const float d_log = (raw > -bound) & (raw < bound) ? ratio : 0.0f;
    const float g = scale * d_ratio * d_log;
    grad[i] = ok ? g : 0.0f;
  }
}

// grad[i] = scale * d l_i / d logp_i for unmasked tokens, 0 for masked ones (torch's tie conventions).
void policy_backward_f32(const float* lp, const float* old, const float* adv, const uint8_t* mask,
                                           int64_t n, float clip_lo, float clip_hi, float dual_clip, float scale,
                                           float* grad) {
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    if (mask != nullptr)
      backward_block<true>(lp + i, old + i, adv + i, mask + i, clip_lo, clip_hi, dual_clip, scale, grad + i);
    else
      backward_block<false>(lp + i, old + i, adv + i, nullptr, clip_lo, clip_hi, dual_clip, scale, grad + i);
  }
  const ppo::PolicyParams<float> p{clip_lo, clip_hi, dual_clip, std::isfinite(dual_clip)};
  for (int64_t i = full; i < n; ++i)
    grad[i] = mask != nullptr && mask[i] == 0 ? 0.0f : scale * ppo::policy_token_grad<float>(lp[i], old[i], adv[i], p);
}

}  // namespace RLK_ISA
}  // namespace rlkernels::cpu::lanes

#pragma GCC pop_options
