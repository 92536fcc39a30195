// The float32 row kernels of the Bellman family (docs/design.md §4.5): q_targets' rows, td_loss's gathers,
// losses and gradient factors, the dot products of bellman_backup. Compiled per instruction set by
// csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h. td_loss's
// losses and gradients and the dot products run on one register of the level; q_targets' rows and td_loss's
// gathers on vectors of 8 floats (two registers under SSE2, one under AVX2 and AVX-512).
#pragma once

namespace rlkernels::cpu::simd::RLK_ISA {
namespace bellman_rows {

using namespace ::rlkernels::bellman;

// Rows of q requested this far ahead of the row-by-row gathers of td_loss (as in bellman_sample.cpp).
constexpr int64_t kAhead = 32;

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

void q_rows_f32(const float* r, const float* q, const bool* term, const float* online,
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

void q_rows_f32_wide(const float* r, const float* q, const bool* term, const float* online,
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
        // A special row (its mx marked NaN) keeps the v set above.
        const f8 out = special ? (m8 == m8 ? soft : load8(v + i)) : soft;
        __builtin_memcpy(v + i, &out, sizeof(out));
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

// float32 per-sample losses of n errors, 8 at a time (Huber's two branches computed and selected: a branch on
// random errors mispredicts), times the weights if any, stored to per if not null; returns their sum, in
// double, in a fixed order (lanes summed pairwise at the end), so results never depend on the thread count.
// One register of errors (and weights) to their per-sample losses.
RLK_INLINE vec::vf td_losses_vec(vec::vf x, int huber, vec::vf dl, vec::vf half_delta) {
  if (!huber) return x * x;
  const vec::vf a = x < 0.0f ? -x : x;
  return a <= dl ? 0.5f * x * x : dl * (a - half_delta);
}

// Lanes in double, one register of floats widened (two registers of doubles).
typedef double vd __attribute__((vector_size(RLK_VEC_BYTES * 2)));

double td_losses_f32(const float* e, const float* w, float* per, int64_t n, int huber, float delta) {
  using namespace vec;
  vd acc = vd{};
  const vf dl = splat(delta), half_delta = splat(0.5f * delta);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    vf l = td_losses_vec(loadu(e + i), huber, dl, half_delta);
    if (w != nullptr) l = l * loadu(w + i);
    if (per != nullptr) storeu(per + i, l);
    acc += __builtin_convertvector(l, vd);
  }
  if (i < n) {  // the ragged end as one vector padded with zeros (a zero error and weight: a zero loss)
    alignas(64) float be[kW] = {}, bw[kW] = {}, bl[kW];
    for (int64_t j = 0; j < n - i; ++j) {
      be[j] = e[i + j];
      bw[j] = w != nullptr ? w[i + j] : 1.0f;
    }
    vf l = td_losses_vec(loadu(be), huber, dl, half_delta) * loadu(bw);
    storeu(bl, l);
    for (int64_t j = 0; j < n - i; ++j) {
      if (per != nullptr) per[i + j] = bl[j];
    }
    acc += __builtin_convertvector(l, vd);
  }
  double sum = 0;
  for (int l = 0; l < kW; ++l) sum += acc[l];
  return sum;
}

// e[i] = y[i] - q[i, act[i]] for n float32 rows of A (an out-of-range action reads column 0; returns the first
// such row, or -1): 8 rows per step with their 8 loads independent of each other and of the stores, from
// pointers held in registers (the generic loop reloaded them from its closure after every store, and its
// loads waited on each other's latency).
int64_t gather_errors_f32(const float* __restrict q, const int64_t* __restrict act,
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

// float32 gradient factors of n rows, one register at a time, branch-free: g = (grad_loss * weight) * dloss/de +
// grad_td, grad_loss per row (gl) or one value for all (shared; gl and has_gl false: no loss term), as the
// scalar rows.
RLK_INLINE vec::vf td_grads_vec(vec::vf x, vec::vf w, vec::vf gl, vec::vf gt, bool has_gl, bool has_gt, int huber,
                                vec::vf dl) {
  using namespace vec;
  vf r = vf{};
  if (has_gl) {
    vf d;
    if (huber) {
      const vf low = x < -dl ? -dl : x;  // NaN stays NaN
      d = x > dl ? dl : low;
    } else {
      d = x + x;
    }
    r = gl * w * d;
  }
  return has_gt ? r + gt : r;
}

void td_grads_f32(const float* e, const float* w, bool has_gl, const float* gl, float shared, const float* gt,
                  int64_t n, int huber, float delta, float* g) {
  using namespace vec;
  const vf dl = splat(delta), one = splat(1.0f), sh = splat(shared);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf r = td_grads_vec(loadu(e + i), w != nullptr ? loadu(w + i) : one, gl != nullptr ? loadu(gl + i) : sh,
                              gt != nullptr ? loadu(gt + i) : vf{}, has_gl, gt != nullptr, huber, dl);
    storeu(g + i, r);
  }
  if (i < n) {
    alignas(64) float be[kW] = {}, bw[kW], bgl[kW], bgt[kW] = {}, out[kW];
    for (int j = 0; j < kW; ++j) bw[j] = 1.0f, bgl[j] = shared;
    for (int64_t j = 0; j < n - i; ++j) {
      be[j] = e[i + j];
      if (w != nullptr) bw[j] = w[i + j];
      if (gl != nullptr) bgl[j] = gl[i + j];
      if (gt != nullptr) bgt[j] = gt[i + j];
    }
    storeu(out, td_grads_vec(loadu(be), loadu(bw), loadu(bgl), loadu(bgt), has_gl, gt != nullptr, huber, dl));
    for (int64_t j = 0; j < n - i; ++j) g[i + j] = out[j];
  }
}

// Dot products of a row of P with V: two registers of partial sums in flight, the ragged end as one padded
// vector, the lanes added in order.
template <typename T>
RLK_INLINE T dot(const T* __restrict p, const T* __restrict v, int64_t n) {
  typedef T vt __attribute__((vector_size(RLK_VEC_BYTES)));
  constexpr int L = RLK_VEC_BYTES / sizeof(T);
  const auto load = [](const T* x) {
    vt r;
    __builtin_memcpy(&r, x, sizeof(r));
    return r;
  };
  vt a0 = vt{}, a1 = vt{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    a0 += load(p + i) * load(v + i);
    a1 += load(p + i + L) * load(v + i + L);
  }
  for (; i + L <= n; i += L) a0 += load(p + i) * load(v + i);
  if (i < n) {
    alignas(64) T bp[L] = {}, bv[L] = {};
    for (int64_t j = 0; j < n - i; ++j) bp[j] = p[i + j], bv[j] = v[i + j];
    a1 += load(bp) * load(bv);
  }
  const vt a = a0 + a1;
  T s = 0;
  for (int l = 0; l < L; ++l) s += a[l];
  return s;
}

}  // namespace bellman_rows

void q_rows_f32(const float* r, const float* q, const bool* term, const float* online, const float* probs, int64_t b0,
                int64_t b1, int64_t A, int kind, float discount, float temp, float* out) {
  bellman_rows::q_rows_f32(r, q, term, online, probs, b0, b1, A, kind, discount, temp, out);
}
void q_rows_f32_wide(const float* r, const float* q, const bool* term, const float* online, const float* probs,
                     int64_t b0, int64_t b1, int64_t A, int kind, float discount, float temp, float* out) {
  bellman_rows::q_rows_f32_wide(r, q, term, online, probs, b0, b1, A, kind, discount, temp, out);
}
// float32 copies of 16-bit values: 16-bit batches run the float32 row kernels on blocks of widened rows.
void widen_bf16(const uint16_t* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + vec::kW <= n; i += vec::kW) vec::storeu(y + i, vec::load_bf16(x + i));
  for (; i < n; ++i) y[i] = __builtin_bit_cast(float, static_cast<uint32_t>(x[i]) << 16);
}
void widen_f16(const uint16_t* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = c10::detail::fp16_ieee_to_fp32_value(x[i]);
}
double td_losses_f32(const float* e, const float* w, float* per, int64_t n, int huber, float delta) {
  return bellman_rows::td_losses_f32(e, w, per, n, huber, delta);
}
int64_t gather_errors_f32(const float* q, const int64_t* act, const float* y, int64_t n, int64_t A, float* e) {
  return bellman_rows::gather_errors_f32(q, act, y, n, A, e);
}
void td_grads_f32(const float* e, const float* w, bool has_gl, const float* gl, float shared, const float* gt,
                  int64_t n, int huber, float delta, float* g) {
  bellman_rows::td_grads_f32(e, w, has_gl, gl, shared, gt, n, huber, delta, g);
}
float dot_f32(const float* p, const float* v, int64_t n) { return bellman_rows::dot(p, v, n); }
double dot_f64(const double* p, const double* v, int64_t n) { return bellman_rows::dot(p, v, n); }

}  // namespace rlkernels::cpu::simd::RLK_ISA
