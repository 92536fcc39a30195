// The chunk algebra of the scan engine.
//
// Every estimator step is affine in its carry: carry' = M_t carry + c_t. A chunk of steps is therefore one
// affine map of the carry that enters it. Instead of writing each estimator's composition rule by hand, the
// engine runs the *same* step function with `Affine<T, D>` values in place of the carry: an Affine holds
// c + sum_j k[j] * carry_in[j], so after the chunk the carry is the chunk's map, exactly (no subtraction of
// two runs, so no cancellation). Composing chunks is then evaluating one map at the next one's output.
#pragma once

#include "rlkernels/macros.h"

namespace rlkernels {
inline namespace RLK_ISA {

template <typename T, int D>
struct Affine {
  T c;
  T k[D];

  RLK_FN Affine() : c(T(0)) {
    for (int j = 0; j < D; ++j) k[j] = T(0);
  }
  RLK_FN Affine(T value) : c(value) {  // NOLINT: a constant is an affine form with zero coefficients
    for (int j = 0; j < D; ++j) k[j] = T(0);
  }
  // The j-th carry input itself: the seed of a chunk's symbolic run.
  RLK_FN static Affine variable(int j) {
    Affine a;
    a.k[j] = T(1);
    return a;
  }
  // Evaluate the form at concrete carry inputs.
  RLK_FN T operator()(const T* carry_in) const {
    T v = c;
    for (int j = 0; j < D; ++j) v += k[j] * carry_in[j];
    return v;
  }
};

template <typename T, int D>
RLK_FN Affine<T, D> operator+(const Affine<T, D>& a, const Affine<T, D>& b) {
  Affine<T, D> r;
  r.c = a.c + b.c;
  for (int j = 0; j < D; ++j) r.k[j] = a.k[j] + b.k[j];
  return r;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator-(const Affine<T, D>& a, const Affine<T, D>& b) {
  Affine<T, D> r;
  r.c = a.c - b.c;
  for (int j = 0; j < D; ++j) r.k[j] = a.k[j] - b.k[j];
  return r;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator+(const Affine<T, D>& a, T s) {
  Affine<T, D> r = a;
  r.c += s;
  return r;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator+(T s, const Affine<T, D>& a) {
  return a + s;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator-(const Affine<T, D>& a, T s) {
  Affine<T, D> r = a;
  r.c = r.c - s;  // (the SIMD vectors of csrc/cpu/simd.h have no -=)
  return r;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator-(T s, const Affine<T, D>& a) {
  Affine<T, D> r;
  r.c = s - a.c;
  for (int j = 0; j < D; ++j) r.k[j] = -a.k[j];
  return r;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator*(T s, const Affine<T, D>& a) {
  Affine<T, D> r;
  r.c = s * a.c;
  for (int j = 0; j < D; ++j) r.k[j] = s * a.k[j];
  return r;
}
template <typename T, int D>
RLK_FN Affine<T, D> operator*(const Affine<T, D>& a, T s) {
  return s * a;
}

// select(flag, a, b): flag is data (0 or 1), never a carry, so the result stays affine. A real select,
// not flag * a + (1 - flag) * b: a NaN in a skipped (masked) position must not leak into the carry.
template <typename T>
RLK_FN T select(T flag, T a, T b) {
  return flag != T(0) ? a : b;
}
template <typename T, int D>
RLK_FN Affine<T, D> select(T flag, const Affine<T, D>& a, const Affine<T, D>& b) {
  return flag != T(0) ? a : b;
}

template <typename T>
RLK_FN T min_(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
RLK_FN T max_(T a, T b) {
  return a > b ? a : b;
}
// a < b ? x : y, elementwise for SIMD types (csrc/cpu/simd.h overloads these for its vectors).
template <typename T>
RLK_FN T select_lt(T a, T b, T x, T y) {
  return a < b ? x : y;
}

}  // namespace RLK_ISA
}  // namespace rlkernels
