// A fixed-width SIMD value for the CPU scan engine: GCC/Clang vector extensions, so the same source
// compiles to SSE2, AVX2 or AVX-512 depending on the target of the translation unit that includes it
// (csrc/cpu/scan_block_*.cpp), and the instruction set is chosen at run time, never by -march.
//
// The step functions of csrc/include/rlkernels/scan.h are templates over their value type; with Vec they
// process kLanes sequences at once. The overloads of select / min_ / max_ / select_lt below are found by
// argument-dependent lookup.
#pragma once

#include "rlkernels/macros.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // before a translation unit switches its target (load_flags in scan_block.h uses it)
#endif

namespace rlkernels {
inline namespace RLK_ISA {

template <typename T, int N>
struct Vec {
  typedef T native __attribute__((vector_size(sizeof(T) * N)));
  native v;

  Vec() = default;
  RLK_FN Vec(T s) : v(native{} + s) {}  // NOLINT: broadcast, so steps can write T(1) and gamma * x
  RLK_FN static Vec from(native x) {
    Vec r;
    r.v = x;
    return r;
  }

  RLK_FN static Vec load(const T* p) {
    Vec r;
    __builtin_memcpy(&r.v, p, sizeof(native));
    return r;
  }
  RLK_FN void store(T* p) const { __builtin_memcpy(p, &v, sizeof(native)); }

  friend RLK_FN Vec operator+(Vec a, Vec b) { return from(a.v + b.v); }
  friend RLK_FN Vec operator-(Vec a, Vec b) { return from(a.v - b.v); }
  friend RLK_FN Vec operator*(Vec a, Vec b) { return from(a.v * b.v); }
  friend RLK_FN Vec operator-(Vec a) { return from(-a.v); }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
};

// A real blend: the value not selected never reaches the result (NaN in a masked step stays out).
template <typename T, int N>
RLK_FN Vec<T, N> select(Vec<T, N> flag, Vec<T, N> a, Vec<T, N> b) {
  return Vec<T, N>::from(flag.v != T(0) ? a.v : b.v);
}
template <typename T, int N>
RLK_FN Vec<T, N> min_(Vec<T, N> a, Vec<T, N> b) {
  return Vec<T, N>::from(a.v < b.v ? a.v : b.v);
}
template <typename T, int N>
RLK_FN Vec<T, N> max_(Vec<T, N> a, Vec<T, N> b) {
  return Vec<T, N>::from(a.v > b.v ? a.v : b.v);
}
template <typename T, int N>
RLK_FN Vec<T, N> select_lt(Vec<T, N> a, Vec<T, N> b, Vec<T, N> x, Vec<T, N> y) {
  return Vec<T, N>::from(a.v < b.v ? x.v : y.v);
}
// Affine forms over vectors (the chunk maps of kLanes chunks at once) select componentwise.
template <typename T, int N, int D>
RLK_FN Affine<Vec<T, N>, D> select(Vec<T, N> flag, const Affine<Vec<T, N>, D>& a, const Affine<Vec<T, N>, D>& b) {
  Affine<Vec<T, N>, D> r;
  r.c = select(flag, a.c, b.c);
  for (int j = 0; j < D; ++j) r.k[j] = select(flag, a.k[j], b.k[j]);
  return r;
}

// exp for vtrace's weights. vtrace is not the hot path: a scalar exp per lane.
struct VecExp {
  template <typename V>
  RLK_FN V operator()(V x) const {
    for (int l = 0; l < int(sizeof(x.v) / sizeof(x.v[0])); ++l) {
      if constexpr (sizeof(x.v[0]) == sizeof(float)) {
        x.v[l] = __builtin_expf(x.v[l]);
      } else {
        x.v[l] = __builtin_exp(x.v[l]);
      }
    }
    return x;
  }
};

}  // namespace RLK_ISA
}  // namespace rlkernels
