// exp(x) = 2^k * p(r) with r = x - k ln 2 (Cody-Waite: ln 2 in two parts) and a degree-6 polynomial
// p(r) = 1 + r + r^2 q(r) fitted (minimax, relative error) on |r| <= ln 2 / 2: the one exp of the CPU kernels
// (PPO's ratio in ppo_simd.h, soft Q targets in bellman_simd.h, log-probs in logprobs_simd.h and the scalar rows
// of logprobs.cpp, V-trace's and Retrace's weights in the scan steps: simd.h exp_any_v). At AVX-512 the vector
// exps of degree 5 (bfloat16 logits) take a table of 2^(j/32) and a degree-2 polynomial instead (simd.h exp_table).
// Evaluated by Horner's rule in float32 with FMAs its relative error is 6.3e-8, Cephes' degree-7 expf
// polynomial's 6.1e-8, one multiply-add fewer. T is float or a GCC float vector; always_inline, so it takes the
// target of its caller.
#pragma once

#include "rlkernels/macros.h"

namespace rlkernels {
inline namespace RLK_ISA {  // one copy per instruction-set build, never merged across them

// p(r) ~ exp(r) for |r| <= ln 2 / 2 (a little beyond it too), of degree kDegree: 6, or 5 (minimax on the same
// interval: relative error 1.8e-7 in float32, one multiply-add fewer). Degree 5 serves bfloat16 logits
// (logprobs_simd.h), whose exps the fused log-prob loop is bound by: their float32 outputs keep errors far below a
// logit's own rounding (2^-9 relative).
template <int kDegree>
struct ExpPolyCoefficients;
template <>
struct ExpPolyCoefficients<6> {  // highest degree first; p(r) = 1 + r + r^2 q(r)
  static constexpr float c[] = {1.3893402647e-3f, 8.3702625707e-3f, 4.1667088866e-2f, 1.6666506231e-1f,
                                4.9999997020e-1f, 1.0f, 1.0f};
};
template <>
struct ExpPolyCoefficients<5> {
  static constexpr float c[] = {8.3115677011e-3f, 4.1898926549e-2f, 1.6667152567e-1f, 4.9999170875e-1f, 1.0f,
                                1.0f};
};

// Horner's rule on the kDegree + 1 coefficients Coefficients::c, highest degree first.
template <class Coefficients, int kDegree, typename T>
__attribute__((always_inline)) inline T horner(T x) {
  constexpr const float* c = Coefficients::c;
  T p = T{} + c[0];
#pragma GCC unroll 8
  for (int i = 1; i <= kDegree; ++i) p = p * x + c[i];
  return p;
}

template <int kDegree = 6, typename T>
__attribute__((always_inline)) inline T exp_poly(T r) {
  return horner<ExpPolyCoefficients<kDegree>, kDegree>(r);
}

// exp_poly<6>'s polynomial by a shorter chain of dependent operations: 1 + (r + r^2 (c2 + c3 r + r^2 (c4 + c5 r +
// c6 r^2))), four multiply-adds deep after r^2 where Horner's rule is six, one operation more. For loops bound by
// the latency of one token's chain rather than by their operation count (the PPO ratio, ppo_simd.h). Relative
// error of the exp below AVX-512 (two-step reduction), every float in [-20, 20] against exp in double: 8.7e-8 at
// AVX2, 8.4e-8 under SSE2 (Horner's 7.6e-8).
template <typename T>
__attribute__((always_inline)) inline T exp_poly_short(T r) {
  constexpr const float* c = ExpPolyCoefficients<6>::c;  // c6 first; c1 = c0 = 1
  const T r2 = r * r;
  const T low = r * c[3] + c[4];                 // c3 r + c2
  const T high = r2 * c[0] + (r * c[1] + c[2]);  // c6 r^2 + c5 r + c4
  return ((high * r2 + low) * r2 + r) + 1.0f;
}

// q(f) ~ 2^f for |f| <= 1/2: exp_poly<kDegree>'s polynomial in r = f ln 2, its coefficients times powers of ln 2
// (the same approximation; the rounding of the coefficients to float adds at most 3e-8 relative), q(0) = 1
// exactly. For the base-2 exps of simd.h (exp2_clamped_v).
template <int kDegree>
struct Exp2PolyCoefficients;
template <>
struct Exp2PolyCoefficients<6> {
  static constexpr float c[] = {1.5408537001e-4f, 1.3392645633e-3f, 9.6182264388e-3f, 5.5503573269e-2f,
                                2.4022649229e-1f, 6.9314718246e-1f, 1.0f};
};
template <>
struct Exp2PolyCoefficients<5> {
  static constexpr float c[] = {1.3298732229e-3f, 9.6717430279e-3f, 5.5505726486e-2f, 2.4022252858e-1f,
                                6.9314718246e-1f, 1.0f};
};

template <int kDegree = 6, typename T>
__attribute__((always_inline)) inline T exp2_poly(T f) {
  return horner<Exp2PolyCoefficients<kDegree>, kDegree>(f);
}

// p(r) for the reduction of x by kf (k as a float of the same shape); the caller scales by 2^k.
template <typename T>
__attribute__((always_inline)) inline T exp_mantissa(T x, T kf) {
  return exp_poly((x - kf * 0.693359375f) - kf * -2.12194440e-4f);
}

// log(x) for positive normal x (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-8 polynomial
// in m - 1, ln 2 in two parts); T a GCC float vector, I the int vector of its shape. For soft Q targets, where
// x = sum of exps in [1, A].
template <typename T, typename I>
__attribute__((always_inline)) inline T log_positive(T x) {
  I bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  I e = (bits >> 23) - 126;  // x = m 2^e, m in [0.5, 1)
  const I mbits = (bits & 0x007fffff) | 0x3f000000;
  T m;
  __builtin_memcpy(&m, &mbits, sizeof(m));
  const I small = m < 0.707106781186547524f;  // then m = 2m, e = e - 1: m in [sqrt(1/2), sqrt(2))
  e = e + small;                                // (small is -1 where true)
  m = small ? m + m : m;
  const T z = m - 1.0f, z2 = z * z;
  T p = T{} + 7.0376836292e-2f;
  p = p * z - 1.1514610310e-1f;
  p = p * z + 1.1676998740e-1f;
  p = p * z - 1.2420140846e-1f;
  p = p * z + 1.4249322787e-1f;
  p = p * z - 1.6668057665e-1f;
  p = p * z + 2.0000714765e-1f;
  p = p * z - 2.4999993993e-1f;
  p = p * z + 3.3333331174e-1f;
  const T ef = __builtin_convertvector(e, T);
  T y = z * z2 * p + ef * -2.12194440e-4f;
  y = y - 0.5f * z2;
  return (z + y) + ef * 0.693359375f;
}

}  // namespace RLK_ISA
}  // namespace rlkernels
