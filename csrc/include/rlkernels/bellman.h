// Per-element math of the Bellman family (docs/design.md §4.5): the next-state value of each q_targets kind, the
// TD losses and their derivatives, and the n-step return window. Compiled by g++ for the CPU kernels and by
// nvcc for the CUDA kernels, so every function is RLK_FN and free of ATen.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

// The inline namespace (macros.h) keeps the host copies that nvcc emits for the CUDA translation units apart
// from the CPU objects' at link time.
namespace rlkernels {
inline namespace RLK_ISA {
namespace bellman {

enum class QKind : int { kMax = 0, kDouble = 1, kExpected = 2, kSoft = 3 };
enum class TdLoss : int { kHuber = 0, kSquared = 1 };
enum class Reduction : int { kMean = 0, kSum = 1, kNone = 2 };

// max with NumPy's NaN rule: a NaN anywhere in the row is the result.
template <typename acc_t>
RLK_FN acc_t nan_max(acc_t m, acc_t x) {
  return (x > m || x != x) ? x : m;
}

// argmax with NumPy's rule: the first index of the maximum, a NaN counting as the maximum.
template <typename acc_t>
RLK_FN bool takes_argmax(acc_t best, acc_t x) {
  return x > best || (x != x && best == best);
}

// The online state of a row reduction for the "soft" kind: max and sum of exp(z - max), z = q / temperature.
template <typename acc_t>
struct SoftState {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
RLK_FN void soft_add(SoftState<acc_t>& st, acc_t z) {
  if (z != z) {
    st.m = z;  // NaN sticks: nothing compares greater than it afterwards
  } else if (z > st.m) {
    st.s = st.s * std::exp(st.m - z) + acc_t(1);  // from m = -inf, s = 0: exp(-inf) = 0, s = 1
    st.m = z;
  } else if (z != -INFINITY) {
    st.s += std::exp(z - st.m);  // -inf entries add nothing (and would give exp(nan) when m = -inf)
  }
}

// Merges two soft states (a parallel reduction): the result sums exp(z - m) over both halves. A NaN max
// sticks; an empty half (m = -inf) adds nothing.
template <typename acc_t>
RLK_FN SoftState<acc_t> soft_merge(const SoftState<acc_t>& x, const SoftState<acc_t>& y) {
  if (x.m != x.m) return x;
  if (y.m != y.m) return y;
  if (y.m == -INFINITY) return x;
  if (x.m == -INFINITY) return y;
  const acc_t m = x.m > y.m ? x.m : y.m;
  return {m, x.s * std::exp(x.m - m) + y.s * std::exp(y.m - m)};
}

// temperature * logsumexp(z): -inf for a row of -inf, NaN for a row with a NaN.
template <typename acc_t>
RLK_FN acc_t soft_value(const SoftState<acc_t>& st, acc_t temperature) {
  if (st.m != st.m) return st.m;
  if (std::isinf(st.m)) return st.m;  // all -inf (or +inf present): the max is the answer
  return temperature * (st.m + std::log(st.s));
}

// y = r + discount * v' where not terminated; r where terminated, whatever next_q holds there (a terminal
// observation's Q-values are often garbage: they must not turn the target into NaN).
template <typename acc_t>
RLK_FN acc_t q_target(acc_t r, bool terminated, acc_t discount, acc_t v_next) {
  return terminated ? r : r + discount * v_next;
}

// td_loss's gathers: the offset of Q(s, a) in row `row` of a [rows, A] q, an out-of-range action read as column 0
// (the kernels report it; reading column 0 keeps every load inside q).
RLK_FN int64_t gathered_offset(int64_t row, int64_t action, int64_t A) {
  return row * A + (static_cast<uint64_t>(action) < static_cast<uint64_t>(A) ? action : 0);
}

// Per-sample loss of the TD error e: Huber 0.5 e^2 (|e| <= delta) or delta (|e| - 0.5 delta); squared e^2.
template <typename acc_t>
RLK_FN acc_t td_sample_loss(acc_t e, TdLoss kind, acc_t delta) {
  if (kind == TdLoss::kSquared) return e * e;
  const acc_t a = std::fabs(e);
  const acc_t quadratic = acc_t(0.5) * e * e, linear = delta * (a - acc_t(0.5) * delta);
  return a <= delta ? quadratic : linear;  // both computed: a select, not a branch on random data
}

// d loss / d e (torch's huber_loss / mse_loss conventions: e at |e| <= delta, delta * sign(e) beyond).
template <typename acc_t>
RLK_FN acc_t td_sample_grad(acc_t e, TdLoss kind, acc_t delta) {
  if (kind == TdLoss::kSquared) return acc_t(2) * e;
  const acc_t low = e < -delta ? -delta : e;  // NaN stays NaN
  return e > delta ? delta : low;
}

}  // namespace bellman
}  // namespace RLK_ISA
}  // namespace rlkernels
