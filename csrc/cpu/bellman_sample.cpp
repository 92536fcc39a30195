// CPU kernels of the sample-based Bellman ops (docs/design.md §4.5): q_targets and td_loss (+ backward). The
// CUDA twin is csrc/cuda/bellman_sample.cu.
//
// td_loss's mean and sum run over a fixed grid of row chunks combined in order, so results are bit-identical
// for any number of threads.
#include "bellman_common.h"  // first: its pragma applies to everything below

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "exp_poly.h"

namespace rlkernels::cpu {
namespace {

using at::Tensor;
using namespace rlkernels::bellman;

constexpr int64_t kRowChunk = 4096;
// Rows of q requested this far ahead of the row-by-row gathers of td_loss: without it the gathers ran with
// little memory parallelism, at 4x the time of torch.gather on the same rows.
constexpr int64_t kAhead = 32;

// ------------------------------------------------------------------------------------------------------
// q_targets
// ------------------------------------------------------------------------------------------------------

// float32 rows, 8 actions per vector op: max (NaN wins), first argmax (NaN first), probability-weighted sum,
// and temperature * logsumexp with a polynomial exp. The generic rows below give the same results up to
// float rounding (the sums run in another order).
typedef float f8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline f8 load8(const float* p) {
  f8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Horizontal reductions by halving shuffles (three vector steps; lane-by-lane scalar loops here were most of
// a row's cost at A = 18). hmax8 ignores NaN (callers track it apart).
__attribute__((always_inline)) inline float hmax8(f8 v) {
  f8 t = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = t > v ? t : v;
  t = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = t > v ? t : v;
  t = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  v = t > v ? t : v;
  return v[0];
}

__attribute__((always_inline)) inline int hor8(i8 m) {
  m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
  m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
  return m[0];
}

// The first a < A with x[a] == m (A if none).
__attribute__((always_inline)) inline int64_t first_equal(const float* x, int64_t A, float m) {
  const i8 bit = {1, 2, 4, 8, 16, 32, 64, 128};
  int64_t a = 0;
  for (; a + 8 <= A; a += 8) {
    const int bits = hor8((load8(x + a) == m) & bit);
    if (bits != 0) return a + __builtin_ctz(static_cast<unsigned>(bits));
  }
  for (; a < A; ++a)
    if (x[a] == m) return a;
  return A;
}

__attribute__((always_inline)) inline int hmin8(i8 m) {
  i8 t = __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m = t < m ? t : m;
  t = __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
  m = t < m ? t : m;
  t = __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
  m = t < m ? t : m;
  return m[0];
}

__attribute__((always_inline)) inline float hsum8(f8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// hsum8 of 8 vectors at once (lane k: hsum8(v[k]), in the same order of additions, so the same bits): three
// rounds of pairwise adds across the vectors (the form of vhaddps) instead of 8 reductions of 7 scalar adds
// (those were about half of an expected-SARSA row's cost at A = 18).
__attribute__((always_inline)) inline f8 hadd8(f8 a, f8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
__attribute__((always_inline)) inline f8 hsum8x8(const f8* v) {
  const f8 ab = hadd8(hadd8(v[0], v[1]), hadd8(v[2], v[3]));  // [v0..v3: (0+1)+(2+3) | v0..v3: (4+5)+(6+7)]
  const f8 cd = hadd8(hadd8(v[4], v[5]), hadd8(v[6], v[7]));
  return __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15);
}

// out[i] = hsum8(row(i)) for i < n, the rows' reductions done 8 at a time by hsum8x8 (the same bits).
template <class RowVec>
__attribute__((always_inline)) inline void row_sums(int64_t n, RowVec row, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f8 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = row(i + k);
    const f8 s = hsum8x8(acc);
    __builtin_memcpy(out + i, &s, sizeof(s));
  }
  for (; i < n; ++i) out[i] = hsum8(row(i));
}

// max of x[0:A] with NumPy's NaN rule; sets has_nan.
__attribute__((always_inline)) inline float row_max(const float* x, int64_t A, bool& has_nan) {
  const float ninf = -std::numeric_limits<float>::infinity();
  f8 m = f8{} + ninf;
  i8 nan = i8{};
  int64_t a = 0;
  for (; a + 8 <= A; a += 8) {
    const f8 v = load8(x + a);
    m = v > m ? v : m;
    nan |= v != v;
  }
  float mx = hmax8(m);
  bool any = hor8(nan) != 0;
  for (; a < A; ++a) {
    mx = x[a] > mx ? x[a] : mx;
    any |= x[a] != x[a];
  }
  has_nan = any;
  return mx;
}

// exp(x) for x <= 0 (x < -87.3 gives ~1e-38, -inf gives that too: negligible next to the row's exp(0) = 1).
__attribute__((always_inline)) inline f8 exp_nonpositive(f8 x) {
  x = x < -87.3f ? f8{} - 87.3f : x;
  const f8 y = x * 1.44269504088896341f;
  const i8 k = __builtin_convertvector(y - 0.5f, i8);  // round to nearest for y <= 0 (trunc toward 0)
  const f8 p = exp_mantissa(x, __builtin_convertvector(k, f8));
  const i8 bits = (k + 127) << 23;
  f8 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

RLK_CLONES void q_rows_f32(const float* r, const float* q, const bool* term, const float* online,
                           const float* probs, int64_t b0, int64_t b1, int64_t A, int kind, float discount,
                           float temp, float* out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = q + b * A;
    float v;
    bool has_nan = false;
    if (kind == static_cast<int>(QKind::kMax)) {
      v = row_max(row, A, has_nan);
      v = has_nan ? nan : v;
    } else if (kind == static_cast<int>(QKind::kDouble)) {
      const float* on = online + b * A;
      const float m = row_max(on, A, has_nan);
      int64_t arg = 0;
      if (has_nan) {
        while (on[arg] == on[arg]) ++arg;  // the first NaN
      } else {
        arg = std::min(first_equal(on, A, m), A - 1);  // the first maximum
      }
      v = row[arg];
    } else if (kind == static_cast<int>(QKind::kExpected)) {
      const float* p = probs + b * A;
      f8 acc = f8{};
      int64_t a = 0;
      for (; a + 8 <= A; a += 8) acc += load8(p + a) * load8(row + a);
      v = hsum8(acc);
      for (; a < A; ++a) v += p[a] * row[a];
    } else {
      const float inv = 1.0f / temp;
      const float mx = row_max(row, A, has_nan);
      if (has_nan) {
        v = nan;
      } else if (std::isinf(mx)) {
        v = mx;  // all -inf, or a +inf present
      } else {
        // (x - max) / T, not x / T - max / T: that form contracts to an FMA whose exact product minus the
        // rounded max/T leaves a residual of max's rounding error (1e13 at 1e20), and exp of it overflows.
        f8 acc = f8{};
        int64_t a = 0;
        for (; a + 8 <= A; a += 8) acc += exp_nonpositive((load8(row + a) - mx) * inv);
        float sum = hsum8(acc);
        for (; a < A; ++a) sum += std::exp((row[a] - mx) * inv);
        v = temp * (mx * inv + std::log(sum));
      }
    }
    out[b] = q_target(r[b], term != nullptr && term[b], discount, v);
  }
}

// Rows of A >= 8 actions, in blocks of kQBlock rows: whole vectors plus one at A - 8 overlapping the last
// (max and argmax may see a value twice; in sums its already-counted lanes are masked out), so no scalar tail
// and no libm call per row: soft's logs run 8 rows at a time (log_positive), after the block's sums.
constexpr int64_t kQBlock = 64;

RLK_CLONES void q_rows_f32_wide(const float* r, const float* q, const bool* term, const float* online,
                                const float* probs, int64_t b0, int64_t b1, int64_t A, int kind, float discount,
                                float temp, float* out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t whole = A / 8 * 8, tail = A - 8;
  const bool has_tail = whole != A;
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const i8 fresh = lane >= static_cast<int>(8 - (A - whole));  // the tail's lanes no whole vector covers
  const float inv = 1.0f / temp;
  // max over a row; nan_out: any NaN.
  auto row_max_wide = [&](const float* x, bool& nan_out) {
    f8 m = load8(x);
    i8 isnan = m != m;
    for (int64_t a = 8; a < whole; a += 8) {
      const f8 v = load8(x + a);
      m = v > m ? v : m;
      isnan |= v != v;
    }
    if (has_tail) {
      const f8 v = load8(x + tail);
      m = v > m ? v : m;
      isnan |= v != v;
    }
    nan_out = hor8(isnan) != 0;
    return hmax8(m);
  };
  alignas(32) float v[kQBlock], mx[kQBlock], sum[kQBlock];
  for (int64_t c = b0; c < b1; c += kQBlock) {
    const int64_t n = std::min(b1, c + kQBlock) - c;
    if (kind == static_cast<int>(QKind::kMax)) {
      for (int64_t i = 0; i < n; ++i) {
        bool has_nan;
        const float m = row_max_wide(q + (c + i) * A, has_nan);
        v[i] = has_nan ? nan : m;
      }
    } else if (kind == static_cast<int>(QKind::kDouble)) {
      for (int64_t i = 0; i < n; ++i) {
        const float* on = online + (c + i) * A;
        // Per lane the first index holding its largest value (strict >: a later equal value, or the tail's
        // repeat of one, never replaces it), then the smallest index among lanes holding the row's max: no
        // branch on where the max sits (random on real Q values: such branches mispredicted).
        f8 best = load8(on);
        i8 at = lane, isnan = best != best;
        for (int64_t a = 8; a < whole; a += 8) {
          const f8 x = load8(on + a);
          const i8 gt = x > best;
          best = gt ? x : best;
          at = gt ? lane + static_cast<int>(a) : at;
          isnan |= x != x;
        }
        if (has_tail) {
          const f8 x = load8(on + tail);
          const i8 gt = x > best;
          best = gt ? x : best;
          at = gt ? lane + static_cast<int>(tail) : at;
          isnan |= x != x;
        }
        int64_t arg;
        if (hor8(isnan) != 0) {
          arg = 0;
          while (on[arg] == on[arg]) ++arg;  // the first NaN
        } else {
          const f8 mb = f8{} + hmax8(best);
          const i8 big = i8{} + std::numeric_limits<int>::max();
          arg = std::min<int64_t>(hmin8(best == mb ? at : big), A - 1);
        }
        v[i] = q[(c + i) * A + arg];
      }
    } else if (kind == static_cast<int>(QKind::kExpected)) {
      auto dot = [&](int64_t b) {
        const float *x = q + b * A, *p = probs + b * A;
        f8 acc = f8{};
        for (int64_t a = 0; a < whole; a += 8) acc += load8(p + a) * load8(x + a);
        if (has_tail) {
          const f8 t = load8(p + tail) * load8(x + tail);
          acc += fresh ? t : f8{};
        }
        return acc;
      };
      row_sums(n, [&](int64_t i) { return dot(c + i); }, v);
    } else {
      // The block's maxes first, then its sums of exps: rows then depend on nothing but memory, so the
      // out-of-order core overlaps several rows' exp chains (one row's max, broadcast, then exps in a row
      // left it waiting on latency).
      bool special = false;
      for (int64_t i = 0; i < n; ++i) {
        bool has_nan;
        const float m = row_max_wide(q + (c + i) * A, has_nan);
        if (has_nan || std::isinf(m)) {  // NaN; all -inf, or a +inf present: the value is the max itself
          v[i] = has_nan ? nan : m;
          mx[i] = nan;  // marks the row: its v is kept below
          special = true;
        } else {
          mx[i] = m;
        }
      }
      // Per row the vector of its exps (a special row: one 1, summing to 1).
      auto exps = [&](int64_t i) {
        const float* x = q + (c + i) * A;
        const float m = mx[i];
        if (m != m) return f8{1.0f};
        // (x - max) / T, not x / T - max / T: see q_rows_f32.
        const f8 mb = f8{} + m;
        f8 acc = f8{};
        for (int64_t a = 0; a < whole; a += 8) acc += exp_nonpositive((load8(x + a) - mb) * inv);
        if (has_tail) {
          const f8 t = exp_nonpositive((load8(x + tail) - mb) * inv);
          acc += fresh ? t : f8{};
        }
        return acc;
      };
      row_sums(n, exps, sum);
      for (int64_t i = n; i < (n + 7) / 8 * 8; ++i) mx[i] = 0.0f, sum[i] = 1.0f;
      for (int64_t i = 0; i < n; i += 8) {
        const f8 m8 = load8(mx + i);
        const f8 soft = temp * (m8 * inv + log_positive<f8, i8>(load8(sum + i)));
        if (!special) {
          __builtin_memcpy(v + i, &soft, sizeof(soft));
        } else {
          for (int k = 0; k < 8; ++k)
            if (m8[k] == m8[k]) v[i + k] = soft[k];
        }
      }
    }
    // q_target (bellman.h: the reward alone where terminated, else r + discount * v), 8 rows at a time.
    typedef unsigned char u8x8 __attribute__((vector_size(8)));
    const f8 disc = f8{} + discount;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      u8x8 t8 = u8x8{};
      if (term != nullptr) __builtin_memcpy(&t8, term + c + i, sizeof(t8));
      const f8 rr = load8(r + c + i);
      const f8 y = __builtin_convertvector(t8, i8) != 0 ? rr : rr + disc * load8(v + i);
      __builtin_memcpy(out + c + i, &y, sizeof(y));
    }
    for (; i < n; ++i) out[c + i] = q_target(r[c + i], term != nullptr && term[c + i], discount, v[i]);
  }
}

// float32 copies of 16-bit values: 16-bit batches run the float32 row kernels on blocks of widened rows (the
// generic rows below, one scalar at a time, were no faster than eager torch on bfloat16 and 3x slower on float16).
RLK_CLONES void widen_f32(const c10::BFloat16* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}
RLK_CLONES void widen_f32(const c10::Half* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

template <typename scalar_t>
void q_targets_16bit(const scalar_t* r, const scalar_t* q, const bool* term, const scalar_t* online,
                     const scalar_t* probs, int64_t B, int64_t A, QKind kind, double discount, double temp,
                     float* out) {
  // Rows per block: their widened copies (q, and online or probs) stay within ~32 KB.
  const int64_t rows = std::clamp<int64_t>(4096 / A, 1, kQBlock);
  const scalar_t* extra = kind == QKind::kDouble ? online : (kind == QKind::kExpected ? probs : nullptr);
  at::parallel_for(0, B, 1024, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(rows * (A * (extra != nullptr ? 2 : 1) + 1)));
    float* rb = buf.data();
    float* qb = rb + rows;
    float* xb = qb + rows * A;
    for (int64_t c = b0; c < b1; c += rows) {
      const int64_t n = std::min(b1, c + rows) - c;
      widen_f32(r + c, n, rb);
      widen_f32(q + c * A, n * A, qb);
      if (extra != nullptr) widen_f32(extra + c * A, n * A, xb);
      (A >= 8 ? q_rows_f32_wide : q_rows_f32)(rb, qb, term != nullptr ? term + c : nullptr,
                                               kind == QKind::kDouble ? xb : nullptr,
                                               kind == QKind::kExpected ? xb : nullptr, 0, n, A,
                                               static_cast<int>(kind), static_cast<float>(discount),
                                               static_cast<float>(temp), out + c);
    }
  });
}

template <typename scalar_t>
void q_targets_rows(const scalar_t* r, const scalar_t* q, const bool* term, const scalar_t* online,
                    const scalar_t* probs, int64_t B, int64_t A, QKind kind, double discount_d, double temp_d,
                    acc_of<scalar_t>* out) {
  using acc_t = acc_of<scalar_t>;
  const acc_t discount = static_cast<acc_t>(discount_d), temp = static_cast<acc_t>(temp_d);
  at::parallel_for(0, B, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = q + b * A;
      acc_t v;
      switch (kind) {
        case QKind::kMax: {
          v = -std::numeric_limits<acc_t>::infinity();
          for (int64_t a = 0; a < A; ++a) v = nan_max(v, static_cast<acc_t>(row[a]));
          break;
        }
        case QKind::kDouble: {
          const scalar_t* on = online + b * A;
          acc_t best = static_cast<acc_t>(on[0]);
          int64_t arg = 0;
          for (int64_t a = 1; a < A; ++a) {
            const acc_t x = static_cast<acc_t>(on[a]);
            if (takes_argmax(best, x)) best = x, arg = a;
          }
          v = static_cast<acc_t>(row[arg]);
          break;
        }
        case QKind::kExpected: {
          const scalar_t* p = probs + b * A;
          v = 0;
          for (int64_t a = 0; a < A; ++a) v += static_cast<acc_t>(p[a]) * static_cast<acc_t>(row[a]);
          break;
        }
        default: {
          SoftState<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
          for (int64_t a = 0; a < A; ++a) soft_add(st, static_cast<acc_t>(row[a]) / temp);
          v = soft_value(st, temp);
        }
      }
      out[b] = q_target(static_cast<acc_t>(r[b]), term != nullptr && term[b], discount, v);
    }
  });
}

Tensor q_targets_cpu(const Tensor& rewards, const Tensor& next_q, const OptTensor& terminated,
                     const OptTensor& next_q_online, const OptTensor& next_probs, double discount,
                     std::string_view kind_name, double temperature) {
  const QKind kind = q_kind_of(kind_name);
  check_q_targets(rewards, next_q, next_q_online, next_probs, kind, temperature);
  const int64_t B = next_q.size(0), A = next_q.size(1);
  Tensor keep_term, q = next_q.contiguous(), r = rewards.contiguous(), online, probs;
  const bool* term = flag_data(terminated, "terminated", next_q, "next_q", {B}, keep_term);
  if (kind == QKind::kDouble) online = next_q_online->contiguous();
  if (kind == QKind::kExpected) probs = next_probs->contiguous();
  Tensor out = at::empty({B}, acc_options(next_q));
  if (q.scalar_type() == at::kFloat) {
    const float *rp = r.data_ptr<float>(), *qp = q.data_ptr<float>();
    const float* on = online.defined() ? online.data_ptr<float>() : nullptr;
    const float* pr = probs.defined() ? probs.data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
      (A >= 8 ? q_rows_f32_wide : q_rows_f32)(rp, qp, term, on, pr, b0, b1, A, static_cast<int>(kind),
                                               static_cast<float>(discount), static_cast<float>(temperature), op);
    });
    return out;
  }
  if (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "q_targets", [&] {
      q_targets_16bit<scalar_t>(r.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), term,
                                online.defined() ? online.data_ptr<scalar_t>() : nullptr,
                                probs.defined() ? probs.data_ptr<scalar_t>() : nullptr, B, A, kind, discount,
                                temperature, out.data_ptr<float>());
    });
    return out;
  }
  RLK_DISPATCH_FLOATS(q.scalar_type(), "q_targets", [&] {
    q_targets_rows<scalar_t>(r.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), term,
                             online.defined() ? online.data_ptr<scalar_t>() : nullptr,
                             probs.defined() ? probs.data_ptr<scalar_t>() : nullptr, B, A, kind, discount,
                             temperature, out.data_ptr<acc_of<scalar_t>>());
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------
// td_loss
// ------------------------------------------------------------------------------------------------------

// float32 per-sample losses of n errors, 8 at a time (Huber's two branches computed and selected: a branch on
// random errors mispredicts), times the weights if any, stored to per if not null; returns their sum, in
// double, in a fixed order (lanes summed pairwise at the end), so results never depend on the thread count.
typedef double d4 __attribute__((vector_size(32)));

RLK_CLONES double td_losses_f32(const float* e, const float* w, float* per, int64_t n, int huber, float delta) {
  d4 lo = d4{}, hi = d4{};
  int64_t i = 0;
  const f8 half = f8{} + 0.5f, dl = f8{} + delta, half_delta = f8{} + 0.5f * delta;
  for (; i + 8 <= n; i += 8) {
    const f8 x = load8(e + i);
    f8 l;
    if (huber) {
      const f8 a = x < 0 ? -x : x;
      l = a <= dl ? half * x * x : dl * (a - half_delta);
    } else {
      l = x * x;
    }
    if (w != nullptr) l = l * load8(w + i);
    if (per != nullptr) __builtin_memcpy(per + i, &l, sizeof(l));
    typedef float f4 __attribute__((vector_size(16)));
    const f4 l_lo = {l[0], l[1], l[2], l[3]}, l_hi = {l[4], l[5], l[6], l[7]};
    lo += __builtin_convertvector(l_lo, d4);
    hi += __builtin_convertvector(l_hi, d4);
  }
  const d4 t = lo + hi;
  double sum = (t[0] + t[1]) + (t[2] + t[3]);
  for (; i < n; ++i) {
    float l = td_sample_loss(e[i], huber ? TdLoss::kHuber : TdLoss::kSquared, delta);
    if (w != nullptr) l *= w[i];
    if (per != nullptr) per[i] = l;
    sum += static_cast<double>(l);
  }
  return sum;
}

struct TdArgs {
  TdLoss kind;
  Reduction reduction;
  double delta;
};

// Fails naming the first out-of-range action, given each chunk's first (-1 if none), chunks in row order.
void report_bad_action(const std::vector<int64_t>& bad, const int64_t* act, int64_t A) {
  for (const int64_t b : bad)
    TORCH_CHECK_VALUE(b < 0, "rlkernels: actions must be in [0, ", A, "), got actions[", b, "] = ", act[b]);
}

// e[i] = y[i] - q[i, act[i]] for n float32 rows of A (an out-of-range action reads column 0; returns the first
// such row, or -1): 8 rows per step with their 8 loads independent of each other and of the stores, from
// pointers held in registers (the generic loop reloaded them from its closure after every store, and its
// loads waited on each other's latency).
RLK_CLONES int64_t gather_errors_f32(const float* __restrict q, const int64_t* __restrict act,
                                     const float* __restrict y, int64_t n, int64_t A, float* __restrict e) {
  int64_t bad = -1;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __builtin_prefetch(q + std::min(i + kAhead, n - 1) * A);
    __builtin_prefetch(q + std::min(i + kAhead + 4, n - 1) * A);
    int64_t a[8];
    bool any_bad = false;
    for (int k = 0; k < 8; ++k) {
      const bool ok = static_cast<uint64_t>(act[i + k]) < static_cast<uint64_t>(A);
      any_bad |= !ok;
      a[k] = ok ? act[i + k] : 0;
    }
    f8 g;
    for (int k = 0; k < 8; ++k) g[k] = q[(i + k) * A + a[k]];
    const f8 r = load8(y + i) - g;
    __builtin_memcpy(e + i, &r, sizeof(r));
    if (__builtin_expect(any_bad, 0) && bad < 0) {
      for (int k = 0; k < 8 && bad < 0; ++k)
        if (static_cast<uint64_t>(act[i + k]) >= static_cast<uint64_t>(A)) bad = i + k;
    }
  }
  for (; i < n; ++i) {
    int64_t a = act[i];
    if (static_cast<uint64_t>(a) >= static_cast<uint64_t>(A)) {
      if (bad < 0) bad = i;
      a = 0;
    }
    e[i] = y[i] - q[i * A + a];
  }
  return bad;
}

// The same for any dtype: gather_errors_f32 for float32, else this loop.
template <typename scalar_t, typename acc_t>
int64_t gather_errors(const scalar_t* q, const int64_t* act, const scalar_t* y, int64_t n, int64_t A, acc_t* e) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return gather_errors_f32(q, act, y, n, A, e);
  } else {
    int64_t bad = -1;
    for (int64_t i = 0; i < n; ++i) {
      __builtin_prefetch(q + std::min(i + kAhead, n - 1) * A);
      int64_t a = act[i];
      if (static_cast<uint64_t>(a) >= static_cast<uint64_t>(A)) {  // checked here, not in a pass of its own
        if (bad < 0) bad = i;
        a = 0;
      }
      e[i] = static_cast<acc_t>(y[i]) - static_cast<acc_t>(q[i * A + a]);
    }
    return bad;
  }
}

// The losses of one chunk: td_losses_f32 for float32; elsewhere branch-free scalars summed into 4
// independent double accumulators (one chain of dependent double adds limited the loop), in a fixed order.
template <typename scalar_t, typename acc_t>
double chunk_losses(const acc_t* e, const scalar_t* w, acc_t* per, int64_t n, TdLoss kind, acc_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return td_losses_f32(e, w, per, n, kind == TdLoss::kHuber, d);
  } else {
    double s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) {
        acc_t l = td_sample_loss(e[i + k], kind, d);
        if (w != nullptr) l *= static_cast<acc_t>(w[i + k]);
        if (per != nullptr) per[i + k] = l;
        s[k] += static_cast<double>(l);
      }
    }
    for (; i < n; ++i) {
      acc_t l = td_sample_loss(e[i], kind, d);
      if (w != nullptr) l *= static_cast<acc_t>(w[i]);
      if (per != nullptr) per[i] = l;
      s[0] += static_cast<double>(l);
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
  }
}

std::tuple<Tensor, Tensor> td_loss_cpu(const Tensor& q_in, const Tensor& actions_in, const Tensor& targets_in,
                                       const OptTensor& weights_in, std::string_view loss, double delta,
                                       std::string_view reduction) {
  const TdArgs args{td_kind_of(loss), reduction_of(reduction), delta};
  check_td(q_in, actions_in, targets_in, weights_in);
  TORCH_CHECK_VALUE(args.kind != TdLoss::kHuber || delta > 0, "rlkernels: delta must be > 0, got ", delta);
  const Tensor q = q_in.contiguous(), actions = actions_in.contiguous(), targets = targets_in.contiguous();
  const Tensor weights = given(weights_in) ? weights_in->contiguous() : Tensor();
  const int64_t B = q.size(0), A = q.size(1);
  const int64_t* act = actions.data_ptr<int64_t>();
  const auto acc_type = acc_type_of(q.scalar_type());
  Tensor td = at::empty({B}, q.options().dtype(acc_type));
  Tensor per = args.reduction == Reduction::kNone ? at::empty({B}, q.options().dtype(acc_type)) : Tensor();
  double total = 0;
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  std::vector<int64_t> bad(chunks, -1);  // per chunk, its first out-of-range action
  RLK_DISPATCH_FLOATS(q.scalar_type(), "td_loss", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* y = targets.data_ptr<scalar_t>();
    const scalar_t* w = weights.defined() ? weights.data_ptr<scalar_t>() : nullptr;
    acc_t* e_out = td.data_ptr<acc_t>();
    acc_t* per_out = per.defined() ? per.data_ptr<acc_t>() : nullptr;
    const acc_t d = static_cast<acc_t>(delta);
    std::vector<double> sums(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kRowChunk, end = std::min(B, begin + kRowChunk);
        // The gather first (one Q per row), then the losses over the chunk (chunk_losses: branch-free, and a
        // fixed summation order, so results do not depend on the thread count).
        const int64_t first_bad = gather_errors(qp + begin * A, act + begin, y + begin, end - begin, A,
                                                e_out + begin);
        if (first_bad >= 0) bad[c] = begin + first_bad;
        sums[c] = chunk_losses(e_out + begin, w == nullptr ? nullptr : w + begin,
                               per_out == nullptr ? nullptr : per_out + begin, end - begin, args.kind, d);
      }
    });
    for (double s : sums) total += s;
  });
  report_bad_action(bad, act, A);
  if (args.reduction == Reduction::kNone) return {per, td};
  if (args.reduction == Reduction::kMean) total = B > 0 ? total / static_cast<double>(B) : 0.0;
  Tensor out = at::empty({}, q.options().dtype(acc_type));
  if (acc_type == at::kDouble)
    *out.data_ptr<double>() = total;
  else
    *out.data_ptr<float>() = static_cast<float>(total);
  return {out, td};
}

// float32 gradient factors of n rows, 8 at a time, branch-free: g = (grad_loss * weight) * dloss/de + grad_td,
// grad_loss per row (gl) or one value for all (shared; gl and has_gl false: no loss term), as the scalar rows.
RLK_CLONES void td_grads_f32(const float* e, const float* w, bool has_gl, const float* gl, float shared,
                             const float* gt, int64_t n, int huber, float delta, float* g) {
  const f8 dl = f8{} + delta, ndl = f8{} - delta;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f8 r = f8{};
    if (has_gl) {
      const f8 x = load8(e + i);
      f8 d;
      if (huber) {
        const f8 low = x < ndl ? ndl : x;  // NaN stays NaN
        d = x > dl ? dl : low;
      } else {
        d = x + x;
      }
      f8 gw = gl != nullptr ? load8(gl + i) : f8{} + shared;
      if (w != nullptr) gw = gw * load8(w + i);
      r = gw * d;
    }
    if (gt != nullptr) r += load8(gt + i);
    __builtin_memcpy(g + i, &r, sizeof(r));
  }
  for (; i < n; ++i) {
    float r = 0;
    if (has_gl) {
      float gw = gl != nullptr ? gl[i] : shared;
      if (w != nullptr) gw *= w[i];
      r = gw * td_sample_grad(e[i], huber ? TdLoss::kHuber : TdLoss::kSquared, delta);
    }
    if (gt != nullptr) r += gt[i];
    g[i] = r;
  }
}

// The same for any dtype: td_grads_f32 for float32, else these scalar rows.
template <typename scalar_t, typename acc_t>
void td_grads(const acc_t* e, const scalar_t* w, bool has_gl, const acc_t* gl, acc_t shared, const acc_t* gt,
              int64_t n, TdLoss kind, acc_t d, acc_t* g) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    td_grads_f32(e, w, has_gl, gl, shared, gt, n, kind == TdLoss::kHuber, d, g);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      acc_t r = 0;
      if (has_gl) {
        acc_t gw = gl != nullptr ? gl[i] : shared;
        if (w != nullptr) gw *= static_cast<acc_t>(w[i]);
        r = gw * td_sample_grad(e[i], kind, d);
      }
      if (gt != nullptr) r += gt[i];
      g[i] = r;
    }
  }
}

// Rows per step of the backward: their errors and gradient factors fit in a few KB and their rows of grad_q
// (zeroed, then the one non-zero each) stay in L1/L2 between the two writes.
constexpr int64_t kGradRows = 256;

// n rows of grad_q (zeroed, then the one non-zero per row: -g, as e = y - q) and of grad_targets (g); returns the
// first row whose action is out of range (its row left zero), or -1. Zeroed ~1 KB at a time, each piece's
// non-zeros placed right after it: libc zeroes a piece that small with vector stores, which leave its lines in
// L1 for the placements, where one memset of the whole block (rep stosb) left every placement a miss (about
// 1.3x slower at B = 65536, A = 18).
template <typename scalar_t, typename acc_t>
int64_t place_grads(scalar_t* __restrict rows, const int64_t* __restrict act, const acc_t* __restrict g,
                    int64_t n, int64_t A, scalar_t* __restrict gy) {
  const int64_t piece = std::max<int64_t>(1, 1024 / (A * static_cast<int64_t>(sizeof(scalar_t))));
  int64_t bad = -1;
  for (int64_t i0 = 0; i0 < n; i0 += piece) {
    const int64_t i1 = std::min(n, i0 + piece);
    std::memset(static_cast<void*>(rows + i0 * A), 0, sizeof(scalar_t) * (i1 - i0) * A);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t a = act[i];
      if (static_cast<uint64_t>(a) >= static_cast<uint64_t>(A)) {
        if (bad < 0) bad = i;
        continue;
      }
      rows[i * A + a] = static_cast<scalar_t>(-g[i]);
      gy[i] = static_cast<scalar_t>(g[i]);
    }
  }
  return bad;
}

// grad_q and grad_targets from the per-row errors e = targets - q[b, actions[b]]: the td_errors the forward
// returned when the caller passes them (the autograd kernel does, while they are unmodified: csrc/autograd.cpp),
// so q is not read again; else gathered from q here.
std::tuple<Tensor, Tensor> td_loss_backward_cpu(const OptTensor& grad_loss, const OptTensor& grad_td,
                                                const Tensor& q_in, const Tensor& actions_in,
                                                const Tensor& targets_in, const OptTensor& weights_in,
                                                std::string_view loss, double delta, std::string_view reduction,
                                                const OptTensor& td_errors) {
  const TdArgs args{td_kind_of(loss), reduction_of(reduction), delta};
  check_td(q_in, actions_in, targets_in, weights_in);
  const Tensor q = q_in.contiguous(), actions = actions_in.contiguous(), targets = targets_in.contiguous();
  const Tensor weights = given(weights_in) ? weights_in->contiguous() : Tensor();
  const int64_t B = q.size(0), A = q.size(1);
  const int64_t* act = actions.data_ptr<int64_t>();
  const bool per_sample = args.reduction == Reduction::kNone;
  const auto acc_type = acc_type_of(q.scalar_type());
  // Per-row upstream gradients in the accumulation type: float32 values widened to double and back, as
  // before, are unchanged; the mean's 1/B is applied in double to the one shared value.
  check_td_grads(grad_loss, grad_td, q, per_sample);
  Tensor gl, gt, e_saved;
  // (A reduced loss's one gradient is read as a double by item(), without a tensor of its own.)
  if (given(grad_loss) && per_sample) gl = grad_loss->to(acc_type).contiguous();
  if (given(grad_td)) gt = grad_td->to(acc_type).contiguous();
  if (given(td_errors)) {
    TORCH_CHECK_VALUE(td_errors->numel() == B, "rlkernels: td_errors must have ", B, " elements, got ",
                      td_errors->sizes());
    e_saved = td_errors->to(acc_type).contiguous();
  }
  const double scale = args.reduction == Reduction::kMean ? (B > 0 ? 1.0 / static_cast<double>(B) : 0.0) : 1.0;
  const bool has_gl = given(grad_loss);
  const double shared_d = has_gl && !per_sample ? grad_loss->item<double>() * scale : 0.0;
  Tensor grad_q = empty_output({B, A}, q.options());  // (huge pages when large: alloc.h)
  Tensor grad_targets = at::empty({B}, targets.options());
  const int64_t blocks = (B + kGradRows - 1) / kGradRows;
  std::vector<int64_t> bad(blocks, -1);
  RLK_DISPATCH_FLOATS(q.scalar_type(), "td_loss_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* y = targets.data_ptr<scalar_t>();
    const scalar_t* w = weights.defined() ? weights.data_ptr<scalar_t>() : nullptr;
    const acc_t* glp = has_gl && per_sample ? gl.data_ptr<acc_t>() : nullptr;
    const acc_t* gtp = gt.defined() ? gt.data_ptr<acc_t>() : nullptr;
    const acc_t* ep = e_saved.defined() ? e_saved.data_ptr<acc_t>() : nullptr;
    const acc_t shared = static_cast<acc_t>(shared_d);
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gy = grad_targets.data_ptr<scalar_t>();
    const acc_t d = static_cast<acc_t>(delta);
    const TdLoss kind = args.kind;
    int64_t* bad_at = bad.data();
    at::parallel_for(0, blocks, 4, [=](int64_t k0, int64_t k1) {
      // (Captured by value: locals the stores below cannot alias, so they stay in registers.)
      acc_t e_buf[kGradRows], g_buf[kGradRows];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t begin = k * kGradRows, n = std::min(B, begin + kGradRows) - begin;
        const int64_t* ak = act + begin;
        const acc_t* e = ep != nullptr ? ep + begin : e_buf;
        if (ep == nullptr) {
          for (int64_t i = 0; i < n; ++i) {
            __builtin_prefetch(qp + std::min(begin + i + kAhead, B - 1) * A);
            const int64_t a = static_cast<uint64_t>(ak[i]) < static_cast<uint64_t>(A) ? ak[i] : 0;
            e_buf[i] = static_cast<acc_t>(y[begin + i]) - static_cast<acc_t>(qp[(begin + i) * A + a]);
          }
        }
        const scalar_t* wk = w != nullptr ? w + begin : nullptr;
        const acc_t* glk = glp != nullptr ? glp + begin : nullptr;
        const acc_t* gtk = gtp != nullptr ? gtp + begin : nullptr;
        td_grads(e, wk, has_gl, glk, shared, gtk, n, kind, d, g_buf);
        const int64_t first_bad = place_grads(gq + begin * A, ak, g_buf, n, A, gy + begin);
        if (first_bad >= 0) bad_at[k] = begin + first_bad;
      }
    });
  });
  report_bad_action(bad, act, A);
  return {grad_q, grad_targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("q_targets", &q_targets_cpu);
  m.impl("td_loss", &td_loss_cpu);
  m.impl("td_loss_backward", &td_loss_backward_cpu);
}

}  // namespace rlkernels::cpu
