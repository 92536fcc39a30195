// exp(x) = 2^k * p(r) with r = x - k ln 2 (Cody-Waite: ln 2 in two parts) and Cephes' degree-6 expf
// polynomial: the one exp of the CPU kernels that vectorize it (PPO's ratio in ppo_lanes.h, soft Q targets in
// bellman.cpp). T is float or a GCC float vector; always_inline, so it takes the target of its caller.
#pragma once

#include "rlkernels/macros.h"

namespace rlkernels {
inline namespace RLK_ISA {  // one copy per instruction-set build, never merged across them

// p(r) for the reduction of x by kf (k as a float of the same shape); the caller scales by 2^k.
template <typename T>
__attribute__((always_inline)) inline T exp_mantissa(T x, T kf) {
  const T r = (x - kf * 0.693359375f) - kf * -2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

}  // namespace RLK_ISA
}  // namespace rlkernels
