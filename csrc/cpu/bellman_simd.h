// The float32 row kernels of the Bellman family (docs/design.md §4.5): q_targets' rows, td_loss's gathers,
// losses and gradient factors, the dot products of bellman_backup. Compiled per instruction set by
// csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h. td_loss's
// losses and gradients and the dot products run on one register of the level; q_targets' rows on vectors of kQW
// floats (8, or one SSE2 register of 4), td_loss's gathers 8 rows per step.
#pragma once

namespace rlkernels::cpu::simd::RLK_ISA {
namespace bellman_rows {

using namespace ::rlkernels::bellman;

// Rows of q whose gathered Q is requested this far ahead of the row-by-row gathers of td_loss (as in
// bellman_sample.cpp).
constexpr int64_t kAhead = 32;

// float32 rows, kQW actions per vector op: max (NaN wins), first argmax (NaN first), probability-weighted sum,
// and temperature * logsumexp with a polynomial exp. The generic rows below give the same results up to
// float rounding (the sums run in another order). kQW is 8 floats (one register under AVX2 and AVX-512: rows of
// a few to a few tens of actions, where 16 lanes would mostly overlap), 4 under SSE2, whose GCC lowers the
// compares and shuffles of 8-float vectors lane by lane.
constexpr int kQW = vec::kW < 8 ? vec::kW : 8;
typedef float fq __attribute__((vector_size(4 * kQW)));
typedef int iq __attribute__((vector_size(4 * kQW)));

__attribute__((always_inline)) inline fq loadq(const float* p) {
  fq v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// The lanes of v in the order of a halving reduction: swap halves, then quarters, (then pairs).
template <typename V>
__attribute__((always_inline)) inline V swap_half(V v) {
  if constexpr (kQW == 8) return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  else return __builtin_shufflevector(v, v, 2, 3, 0, 1);
}
template <typename V>
__attribute__((always_inline)) inline V swap_quarter(V v) {
  if constexpr (kQW == 8) return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  else return __builtin_shufflevector(v, v, 1, 0, 3, 2);
}
template <typename V>
__attribute__((always_inline)) inline V swap_pair(V v) {
  if constexpr (kQW == 8) return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  else return v;  // (a no-op under SSE2: its reductions take two steps)
}

// Horizontal reductions by halving shuffles (log2 kQW vector steps; lane-by-lane scalar loops here were most of
// a row's cost at A = 18). hmaxq ignores NaN (callers track it apart).
__attribute__((always_inline)) inline float hmaxq(fq v) {
  fq t = swap_half(v);
  v = t > v ? t : v;
  t = swap_quarter(v);
  v = t > v ? t : v;
  if constexpr (kQW == 8) {
    t = swap_pair(v);
    v = t > v ? t : v;
  }
  return v[0];
}

__attribute__((always_inline)) inline int horq(iq m) {
  m |= swap_half(m);
  m |= swap_quarter(m);
  if constexpr (kQW == 8) m |= swap_pair(m);
  return m[0];
}

// hmaxq of kQW vectors at once: lane k is hmaxq(v[k]) to the bit (the same pairs compared in the same order, so a
// row of +0 and -0 keeps the zero hmaxq keeps), from rounds of two-source shuffles taking the two rows' halves
// (quarters, pairs) where hmaxq shuffles each row alone: under AVX2 2 shuffles a row instead of 3 (GCC 12: 16 for
// 8 rows).
__attribute__((always_inline)) inline fq maxt(fq t, fq v) { return t > v ? t : v; }
#if RLK_VEC_BYTES >= 32
__attribute__((always_inline)) inline fq hmax_rows(const fq* v) {
  // Halves: [a0..a3 | b0..b3] of rows a, b, each lane the max of lanes l and l + 4 (hmaxq's first step). Rows
  // go in as (0, 4), (1, 5), (2, 6), (3, 7) so that the last step leaves row k in lane k.
  fq h[4];
  for (int k = 0; k < 4; ++k)
    h[k] = maxt(__builtin_shufflevector(v[k], v[k + 4], 4, 5, 6, 7, 12, 13, 14, 15),
                __builtin_shufflevector(v[k], v[k + 4], 0, 1, 2, 3, 8, 9, 10, 11));
  // Quarters, within 128-bit lanes (shufps): [r0 r0 r2 r2 | r4 r4 r6 r6] from h[0], h[2] and so on.
  const fq q0 = maxt(__builtin_shufflevector(h[0], h[2], 2, 3, 10, 11, 6, 7, 14, 15),
                     __builtin_shufflevector(h[0], h[2], 0, 1, 8, 9, 4, 5, 12, 13));
  const fq q1 = maxt(__builtin_shufflevector(h[1], h[3], 2, 3, 10, 11, 6, 7, 14, 15),
                     __builtin_shufflevector(h[1], h[3], 0, 1, 8, 9, 4, 5, 12, 13));
  // Pairs: [r0 r1 r2 r3 | r4 r5 r6 r7].
  return maxt(__builtin_shufflevector(q0, q1, 1, 9, 3, 11, 5, 13, 7, 15),
              __builtin_shufflevector(q0, q1, 0, 8, 2, 10, 4, 12, 6, 14));
}
#else
__attribute__((always_inline)) inline fq hmax_rows(const fq* v) {
  const fq ab = maxt(__builtin_shufflevector(v[0], v[1], 2, 3, 6, 7), __builtin_shufflevector(v[0], v[1], 0, 1, 4, 5));
  const fq cd = maxt(__builtin_shufflevector(v[2], v[3], 2, 3, 6, 7), __builtin_shufflevector(v[2], v[3], 0, 1, 4, 5));
  return maxt(__builtin_shufflevector(ab, cd, 1, 3, 5, 7), __builtin_shufflevector(ab, cd, 0, 2, 4, 6));
}
#endif

// Whether any lane of a compare's mask is set (its sign bits: one movemask).
__attribute__((always_inline)) inline bool anyq(iq m) {
#if defined(__x86_64__) && RLK_VEC_BYTES >= 32
  return _mm256_movemask_ps(reinterpret_cast<__m256>(m)) != 0;
#elif defined(__x86_64__)
  return _mm_movemask_ps(reinterpret_cast<__m128>(m)) != 0;
#else
  return horq(m) != 0;
#endif
}

// 0, 1, ..., kQW - 1, and 1, 2, 4, ... (lane l: bit l).
__attribute__((always_inline)) inline iq lane_q() {
  iq r;
  for (int l = 0; l < kQW; ++l) r[l] = l;
  return r;
}
__attribute__((always_inline)) inline iq lane_bit_q() {
  iq r;
  for (int l = 0; l < kQW; ++l) r[l] = 1 << l;
  return r;
}

// The first a < A with x[a] == m (A if none).
__attribute__((always_inline)) inline int64_t first_equal(const float* x, int64_t A, float m) {
  const iq bit = lane_bit_q();
  int64_t a = 0;
  for (; a + kQW <= A; a += kQW) {
    const int bits = horq((loadq(x + a) == m) & bit);
    if (bits != 0) return a + __builtin_ctz(static_cast<unsigned>(bits));
  }
  for (; a < A; ++a)
    if (x[a] == m) return a;
  return A;
}

__attribute__((always_inline)) inline int hminq(iq m) {
  iq t = swap_half(m);
  m = t < m ? t : m;
  t = swap_quarter(m);
  m = t < m ? t : m;
  if constexpr (kQW == 8) {
    t = swap_pair(m);
    m = t < m ? t : m;
  }
  return m[0];
}

__attribute__((always_inline)) inline float hsumq(fq v) {
#if RLK_VEC_BYTES >= 32
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
#else
  return (v[0] + v[1]) + (v[2] + v[3]);
#endif
}

// hsumq of kQW vectors at once (lane k: hsumq(v[k]), in the same order of additions, so the same bits): rounds
// of pairwise adds across the vectors (the form of vhaddps) instead of kQW reductions of scalar adds (those
// were about half of an expected-SARSA row's cost at A = 18).
#if RLK_VEC_BYTES >= 32
__attribute__((always_inline)) inline fq haddq(fq a, fq b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
__attribute__((always_inline)) inline fq hsum_rows(const fq* v) {
  const fq ab = haddq(haddq(v[0], v[1]), haddq(v[2], v[3]));  // [v0..v3: (0+1)+(2+3) | v0..v3: (4+5)+(6+7)]
  const fq cd = haddq(haddq(v[4], v[5]), haddq(v[6], v[7]));
  return __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15);
}
#else
__attribute__((always_inline)) inline fq haddq(fq a, fq b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
}
__attribute__((always_inline)) inline fq hsum_rows(const fq* v) {
  return haddq(haddq(v[0], v[1]), haddq(v[2], v[3]));  // lane k: (v[k]0 + v[k]1) + (v[k]2 + v[k]3)
}
#endif

// out[i] = hsumq(row(i)) for i < n, the rows' reductions done kQW at a time by hsum_rows (the same bits).
template <class RowVec>
__attribute__((always_inline)) inline void row_sums(int64_t n, RowVec row, float* out) {
  int64_t i = 0;
  for (; i + kQW <= n; i += kQW) {
    fq acc[kQW];
    for (int k = 0; k < kQW; ++k) acc[k] = row(i + k);
    const fq s = hsum_rows(acc);
    __builtin_memcpy(out + i, &s, sizeof(s));
  }
  for (; i < n; ++i) out[i] = hsumq(row(i));
}

// max of x[0:A] with NumPy's NaN rule; sets has_nan.
__attribute__((always_inline)) inline float row_max(const float* x, int64_t A, bool& has_nan) {
  const float ninf = -std::numeric_limits<float>::infinity();
  fq m = fq{} + ninf;
  iq nan = iq{};
  int64_t a = 0;
  for (; a + kQW <= A; a += kQW) {
    const fq v = loadq(x + a);
    m = v > m ? v : m;
    nan |= v != v;
  }
  float mx = hmaxq(m);
  bool any = anyq(nan);
  for (; a < A; ++a) {
    mx = x[a] > mx ? x[a] : mx;
    any |= x[a] != x[a];
  }
  has_nan = any;
  return mx;
}

// exp(x) for x <= 0 (x < -87.3 gives ~1e-38, -inf gives that too: negligible next to the row's exp(0) = 1).
// AVX-512 (8 lanes, AVX-512VL): the clamp in one vmaxps, k rounded by vrndscaleps and 2^k applied by vscalefps,
// 12 operations a vector against 14; the same reduction and polynomial (exp_poly.h).
__attribute__((always_inline)) inline fq exp_nonpositive(fq x) {
#if RLK_AVX512 && defined(__x86_64__)
  if constexpr (kQW == 8) {
    const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-87.3f), reinterpret_cast<__m256>(x));
    const __m256 k = _mm256_roundscale_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const fq p = exp_mantissa(reinterpret_cast<fq>(xc), reinterpret_cast<fq>(k));
    return reinterpret_cast<fq>(_mm256_scalef_ps(reinterpret_cast<__m256>(p), k));
  }
#endif
  x = x < -87.3f ? fq{} - 87.3f : x;
  // Adding kRoundBiased (simd.h) rounds x / ln 2 to the nearest integer k and leaves k + 127 in the sum's low
  // mantissa bits, shifted into 2^k's exponent field (k in [-126, 0]) without a conversion.
  const fq y = x * 1.44269504088896341f + vec::kRoundBiased;
  const fq p = exp_mantissa(x, y - vec::kRoundBiased);
  iq bits;
  __builtin_memcpy(&bits, &y, sizeof(bits));
  bits = bits << 23;
  fq scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

void q_rows_f32(const float* r, const float* q, const bool* term, const float* online,
                           const float* probs, int64_t b0, int64_t b1, int64_t A, int kind, float discount,
                           float temp, float* out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int64_t b = b0;
#if defined(__x86_64__) && RLK_VEC_BYTES >= 32
  // The max and double kinds' rows of fewer actions than a vector (A < 8; q_rows_f32_wide takes the others):
  // each row (of q, or of online for double) is one masked load, its lanes past A -inf, and 8 rows are reduced
  // together (hmax_rows): one action at a time would be slower than SSE2's vector of 4 and two. A zero max's sign
  // follows hmaxq's pairs, as in SSE2's rows of 4 to 7 and in every row of 8 or more. Double's action is the
  // first lane equal to its row's max (one compare and movemask a row; -0 == +0, as in first_equal). From a
  // group with a NaN on, rows go one by one.
  const bool is_double = kind == static_cast<int>(QKind::kDouble);
  if ((kind == static_cast<int>(QKind::kMax) || is_double) && A < kQW) {
    const iq on = lane_q() < static_cast<int>(A);
    const fq ninf = fq{} - std::numeric_limits<float>::infinity();
    const float* src = is_double ? online : q;
    for (; b + kQW <= b1; b += kQW) {
      fq m[kQW];
      iq isnan = iq{};
      for (int k = 0; k < kQW; ++k) {
        const fq x = reinterpret_cast<fq>(_mm256_maskload_ps(src + (b + k) * A, reinterpret_cast<__m256i>(on)));
        m[k] = on ? x : ninf;
        isnan |= x != x;  // lanes past A load 0
      }
      if (anyq(isnan)) break;
      const fq mx = hmax_rows(m);
      for (int k = 0; k < kQW; ++k) {
        float v = mx[k];
        if (is_double) {
          const iq eq = m[k] == (fq{} + mx[k]);
          const int arg = __builtin_ctz(static_cast<unsigned>(_mm256_movemask_ps(reinterpret_cast<__m256>(eq))));
          v = q[(b + k) * A + arg];
        }
        out[b + k] = q_target(r[b + k], term != nullptr && term[b + k], discount, v);
      }
    }
  }
#endif
  for (; b < b1; ++b) {
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
      fq acc = fq{};
      int64_t a = 0;
      for (; a + kQW <= A; a += kQW) acc += loadq(p + a) * loadq(row + a);
      v = hsumq(acc);
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
        fq acc = fq{};
        int64_t a = 0;
        for (; a + kQW <= A; a += kQW) acc += exp_nonpositive((loadq(row + a) - mx) * inv);
        float sum = hsumq(acc);
        for (; a < A; ++a) sum += std::exp((row[a] - mx) * inv);
        v = temp * (mx * inv + std::log(sum));
      }
    }
    out[b] = q_target(r[b], term != nullptr && term[b], discount, v);
  }
}

// Rows of A >= kQW actions, in blocks of kQBlock rows: whole vectors plus one at A - kQW overlapping the last
// (max and argmax may see a value twice; in sums its already-counted lanes are masked out), so no scalar tail
// and no libm call per row: soft's logs run kQW rows at a time (log_positive), after the block's sums.
constexpr int64_t kQBlock = 64;

void q_rows_f32_wide(const float* r, const float* q, const bool* term, const float* online,
                                const float* probs, int64_t b0, int64_t b1, int64_t A, int kind, float discount,
                                float temp, float* out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t whole = A / kQW * kQW, tail = A - kQW;
  const bool has_tail = whole != A;
  const iq lane = lane_q();
  const iq fresh = lane >= static_cast<int>(kQW - (A - whole));  // the tail's lanes no whole vector covers
  const float inv = 1.0f / temp;
  // A row's lanes of maxima (its max: their hmaxq); isnan gains the row's NaN lanes.
  auto row_max_lanes = [&](const float* x, iq& isnan) {
    fq m = loadq(x);
    isnan |= m != m;
    for (int64_t a = kQW; a < whole; a += kQW) {
      const fq v = loadq(x + a);
      m = v > m ? v : m;
      isnan |= v != v;
    }
    if (has_tail) {
      const fq v = loadq(x + tail);
      m = v > m ? v : m;
      isnan |= v != v;
    }
    return m;
  };
  // max over a row; nan_out: any NaN.
  auto row_max_wide = [&](const float* x, bool& nan_out) {
    iq isnan = iq{};
    const fq m = row_max_lanes(x, isnan);
    nan_out = anyq(isnan);
    return hmaxq(m);
  };
  alignas(32) float v[kQBlock], mx[kQBlock], sum[kQBlock];
  for (int64_t c = b0; c < b1; c += kQBlock) {
    const int64_t n = std::min(b1, c + kQBlock) - c;
    if (kind == static_cast<int>(QKind::kMax)) {
      // kQW rows at a time, their maxima reduced together (hmax_rows); from a group with a NaN on, the block's
      // rows go one by one.
      int64_t i = 0;
      for (; i + kQW <= n; i += kQW) {
        fq m[kQW];
        iq isnan = iq{};
        for (int k = 0; k < kQW; ++k) m[k] = row_max_lanes(q + (c + i + k) * A, isnan);
        if (anyq(isnan)) break;
        const fq mx_rows = hmax_rows(m);
        __builtin_memcpy(v + i, &mx_rows, sizeof(mx_rows));
      }
      for (; i < n; ++i) {
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
        fq best = loadq(on);
        iq at = lane, isnan = best != best;
        for (int64_t a = kQW; a < whole; a += kQW) {
          const fq x = loadq(on + a);
          const iq gt = x > best;
          best = gt ? x : best;
          at = gt ? lane + static_cast<int>(a) : at;
          isnan |= x != x;
        }
        if (has_tail) {
          const fq x = loadq(on + tail);
          const iq gt = x > best;
          best = gt ? x : best;
          at = gt ? lane + static_cast<int>(tail) : at;
          isnan |= x != x;
        }
        int64_t arg;
        if (anyq(isnan)) {
          arg = 0;
          while (on[arg] == on[arg]) ++arg;  // the first NaN
        } else {
          const fq mb = fq{} + hmaxq(best);
          const iq big = iq{} + std::numeric_limits<int>::max();
          arg = std::min<int64_t>(hminq(best == mb ? at : big), A - 1);
        }
        v[i] = q[(c + i) * A + arg];
      }
    } else if (kind == static_cast<int>(QKind::kExpected)) {
      auto dot = [&](int64_t b) {
        const float *x = q + b * A, *p = probs + b * A;
        fq acc = fq{};
        for (int64_t a = 0; a < whole; a += kQW) acc += loadq(p + a) * loadq(x + a);
        if (has_tail) {
          const fq t = loadq(p + tail) * loadq(x + tail);
          acc += fresh ? t : fq{};
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
        if (m != m) return fq{1.0f};
        // (x - max) / T, not x / T - max / T: see q_rows_f32.
        const fq mb = fq{} + m;
        fq acc = fq{};
        for (int64_t a = 0; a < whole; a += kQW) acc += exp_nonpositive((loadq(x + a) - mb) * inv);
        if (has_tail) {
          const fq t = exp_nonpositive((loadq(x + tail) - mb) * inv);
          acc += fresh ? t : fq{};
        }
        return acc;
      };
      row_sums(n, exps, sum);
      for (int64_t i = n; i < (n + kQW - 1) / kQW * kQW; ++i) mx[i] = 0.0f, sum[i] = 1.0f;
      for (int64_t i = 0; i < n; i += kQW) {
        const fq mq = loadq(mx + i);
        const fq soft = temp * (mq * inv + log_positive<fq, iq>(loadq(sum + i)));
        // A special row (its mx marked NaN) keeps the v set above.
        const fq out = special ? (mq == mq ? soft : loadq(v + i)) : soft;
        __builtin_memcpy(v + i, &out, sizeof(out));
      }
    }
    // q_target (bellman.h: the reward alone where terminated, else r + discount * v), kQW rows at a time.
    typedef unsigned char uq __attribute__((vector_size(kQW)));
    const fq disc = fq{} + discount;
    int64_t i = 0;
    for (; i + kQW <= n; i += kQW) {
      uq t8 = uq{};
      if (term != nullptr) __builtin_memcpy(&t8, term + c + i, sizeof(t8));
      const fq rr = loadq(r + c + i);
      const fq y = __builtin_convertvector(t8, iq) != 0 ? rr : rr + disc * loadq(v + i);
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
    for (int k = 0; k < 8; ++k) {  // the very Q each row ahead reads: its line, whichever of the row's lines
      const int64_t r = std::min(i + kAhead + k, n - 1);
      __builtin_prefetch(q + gathered_offset(r, act[r], A));
    }
    int64_t a[8];
    bool any_bad = false;
    for (int k = 0; k < 8; ++k) {
      const bool ok = static_cast<uint64_t>(act[i + k]) < static_cast<uint64_t>(A);
      any_bad |= !ok;
      a[k] = ok ? act[i + k] : 0;
    }
    typedef float f8 __attribute__((vector_size(32)));
    f8 g, yv;
    for (int k = 0; k < 8; ++k) g[k] = q[(i + k) * A + a[k]];
    __builtin_memcpy(&yv, y + i, sizeof(yv));
    const f8 r = yv - g;
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
// float32 copies of 16-bit values: q_targets' 16-bit batches run the float32 row kernels on blocks of widened
// rows (bellman_sample.cpp).
void widen_bf16(const uint16_t* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + vec::kW <= n; i += vec::kW) vec::storeu(y + i, vec::load_bf16(x + i));
  for (; i < n; ++i) y[i] = __builtin_bit_cast(float, static_cast<uint32_t>(x[i]) << 16);
}
void widen_f16(const uint16_t* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + vec::kW <= n; i += vec::kW) vec::storeu(y + i, vec::load_f16(x + i));
  for (; i < n; ++i) y[i] = c10::detail::fp16_ieee_to_fp32_value(x[i]);
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
