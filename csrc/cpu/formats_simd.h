// Stream elements of a simd::Format (simd_kernels.h): float32, or the bits of bfloat16 / float16, loaded as
// float32 vectors and stored back rounded. Shared by the kernels of every family that reads 16-bit streams
// (ppo_simd.h, gae_rows_simd.h); compiled per instruction set after the translation unit's target switch.
#pragma once

namespace rlkernels::cpu::simd::RLK_ISA {

using namespace ::rlkernels::vec;

// A stream element of format F: a float, or the bits of a bfloat16 / float16.
template <int F>
using elem_t = std::conditional_t<F == kF32, float, uint16_t>;

// kW elements of format F as floats, and kW floats stored in format F.
template <int F>
RLK_INLINE vf load_as(const elem_t<F>* p) {
  if constexpr (F == kF32)
    return loadu(p);
  else if constexpr (F == kBf16)
    return load_bf16(p);
  else
    return load_f16(p);
}
template <int F>
RLK_INLINE void store_as(elem_t<F>* p, vf x) {
  if constexpr (F == kF32)
    storeu(p, x);
  else if constexpr (F == kBf16)
    store_bf16(p, x);
  else
    store_f16(p, x);
}
// One element of format F as a float (exact).
template <int F>
RLK_INLINE float scalar_as(elem_t<F> x) {
  if constexpr (F == kF32)
    return x;
  else if constexpr (F == kBf16)
    return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
  else
    return c10::detail::fp16_ieee_to_fp32_value(x);
}
// The n elements of a ragged end copied into a zero-padded vector's worth.
template <typename E>
RLK_INLINE void pad_copy(E* to, const E* from, int64_t n) {
  for (int64_t j = 0; j < n; ++j) to[j] = from[j];
}
// The lambdas passed to by_format are inlined into the kernel (scripts/check_simd.py reads its loops there).
#define RLK_LAMBDA_INLINE __attribute__((always_inline))
// fn(format) for the format f, as a compile-time constant (std::integral_constant<int, F>).
template <typename Fn>
RLK_INLINE void by_format(Format f, Fn&& fn) {
  switch (f) {
    case kBf16:
      return fn(std::integral_constant<int, kBf16>{});
    case kF16:
      return fn(std::integral_constant<int, kF16>{});
    default:
      return fn(std::integral_constant<int, kF32>{});
  }
}
// p as a pointer to elements of format F.
template <int F>
RLK_INLINE const elem_t<F>* as_elems(const void* p) { return static_cast<const elem_t<F>*>(p); }
template <int F>
RLK_INLINE elem_t<F>* as_elems(void* p) { return static_cast<elem_t<F>*>(p); }

}  // namespace rlkernels::cpu::simd::RLK_ISA
