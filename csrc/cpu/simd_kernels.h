// The CPU SIMD kernels outside the scan engine, listed once: each is compiled per instruction set in
// csrc/cpu/simd_{default,avx2,avx512}.cpp (namespace rlkernels::cpu::simd::isa_<level>, where
// scripts/check_simd.py finds them in the built library) and called through simd::kernels(), the table of the
// level isa.h says runs now. Their bodies are in the family headers ppo_simd.h, logprobs_simd.h,
// gae_rows_simd.h and bellman_simd.h. No ATen here: these headers are compiled under each target.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "isa.h"

namespace rlkernels::cpu {

namespace simd {
// The element format of the streams of the kernels that read 16-bit inputs (the PPO family, GAE along time):
// float32, or the bits of bfloat16 / float16, widened to float32 as they are loaded and rounded to nearest
// even where a gradient is stored (formats_simd.h).
enum Format : int { kF32, kBf16, kF16 };
// The format of T: float, c10::BFloat16 or c10::Half (the dtype dispatch also compiles, and never runs, the
// kernels' calls for float64, hence no static_assert).
template <typename T>
constexpr Format format_of() {
  return std::is_same_v<T, c10::BFloat16> ? kBf16 : (std::is_same_v<T, c10::Half> ? kF16 : kF32);
}
}  // namespace simd

namespace gae_rows {
// One sequence, contiguous in time. r, v, nv are values of `format` (nv, term, trunc may be null: absent);
// flags are bytes, nonzero = set.
struct Row {
  simd::Format format;
  const void *r, *v, *nv;
  const unsigned char *term, *trunc;
  float boot;  // V after the last step when nv is null
  float *adv, *ret;
  int64_t T;
};

struct Params {
  float gamma, lam;
};
}  // namespace gae_rows

namespace simd {

// Sums of the PPO policy loss over some tokens, in the order ppo_policy_forward writes them.
enum PolicySum : int { kLoss, kCount, kClipped, kLower, kKl, kRatio, kRatioMax, kPolicySums };
// Sums of the value loss.
enum ValueSum : int { kValueLoss, kValueCount, kValueClipped, kValueSums };


// X(return type, name, (parameters)) for every kernel.
#define RLK_SIMD_KERNELS(X)                                                                                      \
  /* ppo_simd.h: sums[kPolicySums] of n tokens (ratio_max: -inf when none counts; NaN sticks); the streams  */ \
  /* of format f, the KL's values float32 */                                                                   \
  X(void, ppo_policy_forward,                                                                                  \
    (Format f, const void* lp, const void* old, const void* adv, const uint8_t* mask, int64_t n, float clip_lo, \
     float clip_hi, float dual_clip, double* sums))                                                            \
  X(void, ppo_policy_backward,                                                                                 \
    (Format f, const void* lp, const void* old, const void* adv, const uint8_t* mask, int64_t n, float clip_lo, \
     float clip_hi, float dual_clip, float scale, void* grad))                                                 \
  X(void, ppo_value_forward,                                                                                   \
    (Format f, const void* v, const void* old, const void* ret, const uint8_t* mask, int64_t n, bool has_clip,  \
     float clip, double* sums))                                                                                \
  X(void, ppo_value_backward,                                                                                  \
    (Format f, const void* v, const void* old, const void* ret, const uint8_t* mask, int64_t n, bool has_clip,  \
     float clip, float scale, void* grad))                                                                     \
  X(void, ppo_kl_forward, (Format f, const void* lp, const void* ref, int64_t n, int kind, float* out))        \
  X(void, ppo_kl_backward,                                                                                     \
    (Format f, const float* g, const void* lp, const void* ref, int64_t n, int kind, void* out))               \
  /* logprobs_simd.h: rows [begin, end) of the forward; one row of the backward (without its target term) */  \
  X(void, logprob_rows_f32,                                                                                    \
    (const float* x, int64_t row_stride, int64_t V, const int64_t* tok, bool has_ignore, int64_t ignore,        \
     float inv_t, int64_t begin, int64_t end, float* logp, float* ent, float* lse))                            \
  X(void, logprob_rows_bf16,                                                                                   \
    (const uint16_t* x, int64_t row_stride, int64_t V, const int64_t* tok, bool has_ignore, int64_t ignore,     \
     float inv_t, int64_t begin, int64_t end, float* logp, float* ent, float* lse))                            \
  X(void, logprob_grad_row_f32,                                                                                \
    (const float* x, float* y, int64_t V, float inv_t, float lse, float a, bool entropy, float b, float c))     \
  X(void, logprob_grad_row_bf16,                                                                               \
    (const uint16_t* x, uint16_t* y, int64_t V, float inv_t, float lse, float a, bool entropy, float b,         \
     float c))                                                                                                 \
  /* gae_rows_simd.h */                                                                                        \
  X(void, gae_walk_chunk,                                                                                      \
    (const gae_rows::Row& row, gae_rows::Params p, int64_t s, int64_t e, bool stream, float* x_s, float* prod)) \
  X(void, gae_fix_chunk, (const gae_rows::Row& row, gae_rows::Params p, int64_t s, int64_t e, float k))         \
  /* bellman_simd.h */                                                                                         \
  X(void, q_rows_f32,                                                                                          \
    (const float* r, const float* q, const bool* term, const float* online, const float* probs, int64_t b0,     \
     int64_t b1, int64_t A, int kind, float discount, float temp, float* out))                                 \
  X(void, q_rows_f32_wide,                                                                                     \
    (const float* r, const float* q, const bool* term, const float* online, const float* probs, int64_t b0,     \
     int64_t b1, int64_t A, int kind, float discount, float temp, float* out))                                 \
  X(void, widen_bf16, (const uint16_t* x, int64_t n, float* y))                                                \
  X(void, widen_f16, (const uint16_t* x, int64_t n, float* y))                                                 \
  X(double, td_losses_f32, (const float* e, const float* w, float* per, int64_t n, int huber, float delta))   \
  X(int64_t, gather_errors_f32,                                                                                \
    (const float* q, const int64_t* act, const float* y, int64_t n, int64_t A, float* e))                      \
  X(void, td_grads_f32,                                                                                        \
    (const float* e, const float* w, bool has_gl, const float* gl, float shared, const float* gt, int64_t n,    \
     int huber, float delta, float* g))                                                                        \
  X(float, dot_f32, (const float* p, const float* v, int64_t n))                                               \
  X(double, dot_f64, (const double* p, const double* v, int64_t n))

struct Kernels {
#define RLK_SIMD_FIELD(ret, name, params) ret(*name) params;
  RLK_SIMD_KERNELS(RLK_SIMD_FIELD)
#undef RLK_SIMD_FIELD
};

#define RLK_SIMD_DECLARE(ret, name, params) ret name params;
namespace isa_default {
RLK_SIMD_KERNELS(RLK_SIMD_DECLARE)
extern const Kernels kTable;
}  // namespace isa_default
#if defined(__x86_64__) && defined(__GNUC__)
namespace isa_avx2 {
RLK_SIMD_KERNELS(RLK_SIMD_DECLARE)
extern const Kernels kTable;
}  // namespace isa_avx2
namespace isa_avx512 {
RLK_SIMD_KERNELS(RLK_SIMD_DECLARE)
extern const Kernels kTable;
}  // namespace isa_avx512
#endif
#undef RLK_SIMD_DECLARE

// The kernels of the level in effect (isa.h).
inline const Kernels& kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa_level()) {
    case kIsaAvx512:
      return isa_avx512::kTable;
    case kIsaAvx2:
      return isa_avx2::kTable;
    default:
      break;
  }
#endif
  return isa_default::kTable;
}

// n bfloat16 or float16 values widened to float32 by the kernels `k`: q_targets' 16-bit rows run the float32
// kernel on such copies.
template <typename T>
void widen(const Kernels& k, const T* x, int64_t n, float* y) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  const auto* bits = reinterpret_cast<const uint16_t*>(x);
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    k.widen_bf16(bits, n, y);
  else
    k.widen_f16(bits, n, y);
}

}  // namespace simd
}  // namespace rlkernels::cpu

// In a csrc/cpu/simd_<level>.cpp, after the kernels' definitions: that level's table.
#define RLK_SIMD_ADDRESS(ret, name, params) &name,
#define RLK_SIMD_DEFINE_TABLE \
  namespace rlkernels::cpu::simd::RLK_ISA { const Kernels kTable = {RLK_SIMD_KERNELS(RLK_SIMD_ADDRESS)}; }
