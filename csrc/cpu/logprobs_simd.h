// gather_logprobs' float32 and bfloat16 rows on explicit vectors (docs/design.md §4.3). Included by
// csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h.
//
// Forward, per row: an online (max, sum-exp, entropy) state, m = running max of z = x / T,
// s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m), folded chunk by chunk. The first chunk takes two passes
// (its max, then its exps from L1); every later chunk one: its exps against the running max m, its own max
// alongside, the state moved to the new max once per chunk. A chunk whose max passes m by more than kSlack
// (exps that could overflow) is folded again, in two passes. Every exp is a vector polynomial of simd.h; under
// SSE2 the fold's are taken in base 2 (kBase2Fold), at AVX2 against a reference next to m (kAbsoluteFold).
// bfloat16 logits are widened in registers (two vectors from one load by interleaving with zeros), never
// copied. A row's ragged end runs as one padded vector (-inf: weighs nothing).
#pragma once

namespace rlkernels::cpu::simd::RLK_ISA {

using namespace ::rlkernels::vec;

// Elements per chunk: 8 KB of float32 stays in L1 between the two passes.
constexpr int64_t kLogitChunk = 2048;

// The one-pass fold takes exps of z - m for z up to m + kSlack: e^32 per term keeps every chunk's sums far from
// float's overflow, and moving a chunk's entropy sum to its own max cancels at most kSlack's worth of it.
constexpr float kSlack = 32.0f;

// exp(x) for x <= kSlack (x = z - m or z - lse): 0 for -inf, NaN stays NaN (simd.h's exp_clamped_v). The range
// reduction takes one FMA (exp_reduce: an error of k * 1.9e-9 relative, only in terms 2^-k below the largest).
// bfloat16 logits (Src::kExpDegree 5) take the degree-5 polynomial (exp_poly.h's exp_poly<5>; at AVX-512 simd.h's
// exp_table of the same accuracy).
template <class Src>
RLK_INLINE vf exp_logit(vf x, vf& arg) {
  return exp_clamped_v<true, Src::kExpDegree>(x, arg);
}
template <class Src>
RLK_INLINE vf exp_logit(vf x) {
  return exp_nonpositive_v<true, Src::kExpDegree>(x);
}
// Vectors folded per loop step into their own sums: two under AVX-512 (32 registers), one below it, where a
// second set of sums, maxima and the exp's constants would not fit in 16 registers.
constexpr bool kTwoSums = RLK_AVX512;
// Under SSE2 (no FMA) the one-pass fold takes its exps in base 2, of u = (z - m) log2 e (simd.h exp2_clamped_v):
// three additions and no multiply where exp_logit reduces by ln 2 in two steps (two multiplies, two subtractions)
// and multiplies by 2^k; 5-30% faster there (docs/performance.md). Its exp's relative error grows with |u| (the
// rounding of u, about |z - m| 6e-8), so AVX2, where it measured within the noise of exp_logit, and AVX-512
// keep exp_logit.
constexpr bool kBase2Fold = RLK_VEC_BYTES == 16;
// At AVX2 the one-pass fold takes no z - m for its exps: with j = round(m log2 e), one FMA
// y = z log2 e + (kRoundBiased - j) rounds z log2 e to an integer k (k = y - (kRoundBiased - j), exact) and leaves
// k - j + 127 in y's low bits, so 2^(k - j) p(z - k ln 2) = exp(z - R) exp((k - j) 1.9e-9) with R = j ln 2 (ln 2 as
// the one-step reduction rounds it to float): exp_reduce's one-step error, in k - j. The chunk's sums are moved
// from R to m once (|R - m| <= ln 2 / 2). The entropy's z - m, one subtraction, comes back with return_entropy
// (exactly 0 at the max, as in exp_logit's fold), and the sum-exp is the same FMA either way, so logp does not
// depend on return_entropy. 13 operations a vector for bfloat16 logits without entropy where exp_logit takes
// 14: 10% faster on the AVX2 machine (docs/performance.md). z is clamped at R - 127 ln 2, where k - j = -127 and
// 2^(k - j) is exactly +0 (so -inf weighs nothing, as in exp_clamped_v). Under AVX-512 vscalefps takes k - j
// itself, so the subtraction would come back there; SSE2 takes base 2. For |m| <= kAbsoluteMax only, where j,
// y's sum and k ln 2 stay exact.
constexpr bool kAbsoluteFold = RLK_VEC_BYTES == 32;
constexpr float kAbsoluteMax = 65536.0f;

// The constants of an absolute chunk against m: cj = kRoundBiased - j, lo = R - 127 ln 2, to_m = exp(R - m).
struct AbsoluteRef {
  float m, cj, lo, to_m;
  explicit AbsoluteRef(float m_) : m(m_) {
    constexpr double kLn2f = 0.693147182464599609375;  // 0.693147182f, the reduction's ln 2
    const double j = __builtin_nearbyint(static_cast<double>(m) * 1.4426950408889634);
    const double r = j * kLn2f;  // exact: j has at most 17 bits
    cj = static_cast<float>(12583039.0 - j);
    lo = static_cast<float>(r - 127.0 * kLn2f);
    to_m = __builtin_expf(static_cast<float>(r - static_cast<double>(m)));  // r - m: exact in double
  }
};

// a * b + c with one rounding (where the absolute fold runs, an FMA by name, not left to contraction).
RLK_INLINE vf fused_mul_add(vf a, vf b, vf c) {
#if RLK_VEC_BYTES == 32 && defined(__x86_64__)
  return reinterpret_cast<vf>(
      _mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// The one-pass fold prefetches its logits (simd.h's kPrefetchBytes ahead): its exps keep the core's window full
// of arithmetic, so without it a cold row runs at memory latency, not bandwidth. The lines of 2 kW values from
// element i on.
template <typename T>
RLK_INLINE void prefetch_pair(const T* p, int64_t i) {
  const char* a = reinterpret_cast<const char*>(p + i) + kPrefetchBytes;
  for (int64_t o = 0; o < static_cast<int64_t>(2 * kW * sizeof(T)); o += 64) __builtin_prefetch(a + o);
}

struct F32Logits {
  static constexpr int kExpDegree = 6;
  static constexpr bool kNanLowBitsZero = false;  // a float32 NaN may carry any payload (exp2_clamped_v)
  const float* p;
  RLK_INLINE void prefetch(int64_t i) const { prefetch_pair(p, i); }
  RLK_INLINE vf load(int64_t i) const { return loadu(p + i); }
  // 2 kW values from i, in any order (for sums and maxima)
  RLK_INLINE void load2(int64_t i, vf& a, vf& b) const {
    a = loadu(p + i);
    b = loadu(p + i + kW);
  }
  RLK_INLINE float at(int64_t i) const { return p[i]; }
};

// One register of bfloat16 (2 kW values) as two vectors of float32: each 128-bit lane's low (kHigh = 0) or high
// four values interleaved with zeros (punpcklwd / punpckhwd with a zero register), so a value lands in the
// high half of a 32-bit lane: its float32 bits. The lane order differs from memory's.
template <int kHigh>
RLK_INLINE vf interleave_zero(const uint16_t* p) {
#if RLK_VEC_BYTES == 64 && defined(__x86_64__)
  const __m512i h = _mm512_loadu_si512(p), z = _mm512_setzero_si512();
  return reinterpret_cast<vf>(kHigh ? _mm512_unpackhi_epi16(z, h) : _mm512_unpacklo_epi16(z, h));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
  return reinterpret_cast<vf>(kHigh ? _mm256_unpackhi_epi16(z, h) : _mm256_unpacklo_epi16(z, h));
#elif RLK_VEC_BYTES == 16 && defined(__x86_64__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), z = _mm_setzero_si128();
  return reinterpret_cast<vf>(kHigh ? _mm_unpackhi_epi16(z, h) : _mm_unpacklo_epi16(z, h));
#else
  return load_bf16(p + kHigh * kW);
#endif
}

struct Bf16Logits {
  static constexpr int kExpDegree = 5;
  static constexpr bool kNanLowBitsZero = true;  // widened: the low 16 bits of every value are 0
  const uint16_t* p;
  RLK_INLINE void prefetch(int64_t i) const { prefetch_pair(p, i); }
  RLK_INLINE vf load(int64_t i) const { return load_bf16(p + i); }
  RLK_INLINE void load2(int64_t i, vf& a, vf& b) const {
    a = interleave_zero<0>(p + i);
    b = interleave_zero<1>(p + i);
  }
  RLK_INLINE float at(int64_t i) const { return __builtin_bit_cast(float, static_cast<uint32_t>(p[i]) << 16); }
};

// The last rem (< kW) values from i, times inv_t, padded with `pad`.
template <class Src>
RLK_INLINE vf load_ragged(const Src& x, int64_t i, int64_t rem, float inv_t, float pad) {
  alignas(64) float buf[kW];
  for (int j = 0; j < kW; ++j) buf[j] = j < rem ? x.at(i + j) * inv_t : pad;
  return loadu(buf);
}

struct RowState {
  float m, s0, s1;
};

// Sums of one chunk [c0, c1): e = sum exp(z - m), h = sum exp(z - m) (z - m); with kMax also the chunk's max
// (NaN skipped). `full`: c0 + a whole number of vectors.
struct ChunkSums {
  float e, h, max;
};
// kAbs: the exps against ref's R (kAbsoluteFold); the caller moves the sums to m.
template <bool kEntropy, bool kMax, bool kScale, bool kAbs = false, class Src>
RLK_INLINE ChunkSums fold_chunk(const Src& x, int64_t c0, int64_t full, int64_t c1, vf it, float inv_t, float m,
                                const AbsoluteRef* ref = nullptr) {
  static_assert(!kAbs || kAbsoluteFold, "fold_chunk: the absolute fold is AVX2's");
  const float ninf = -__builtin_inff();
  const vf mv = splat(m);
  const vf cj = splat(kAbs ? ref->cj : 0.0f), lo = splat(kAbs ? ref->lo : 0.0f);
  vf e0 = vf{}, e1 = vf{}, h0 = vf{}, h1 = vf{}, mx0 = splat(ninf), mx1 = mx0;
  auto fold = [&](vf v, vf& e, vf& h, vf& mx) {  // v: logits as loaded
    if constexpr (kMax) mx = max_v(v, mx);      // times inv_t at the end (rounding keeps the order)
    if constexpr (kAbs) {
      const vf z = at_least(kScale ? v * it : v, lo);                    // NaN stays
      const vf y = fused_mul_add(z, splat(1.44269504088896341f), cj);    // k - j + kRoundBiased
      const vf r = fused_mul_add(y - cj, splat(-0.693147182f), z);       // z - k ln 2
      const vf q = exp_poly<Src::kExpDegree>(r), s = pow2i_of_biased(y);  // exp(z - R) = q s
      e = fused_mul_add(q, s, e);
      if constexpr (kEntropy) h += (q * s) * (z - mv);  // 0 where z was clamped (k - j = -127, s = 0)
      return;
    }
    // z - m is exactly 0 at the max (z not contracted into an FMA with the subtraction), so its term is 1
    const vf d = (kScale ? rounded(v * it) : v) - mv;
    vf p, arg;  // p * arg = p (z - m), 0 for z = -inf
    if constexpr (kBase2Fold) {
      const vf u = at_least(d * 1.44269504088896341f, splat(-127.0f));  // (z - m) log2 e
      p = exp2_clamped_v<Src::kExpDegree, !Src::kNanLowBitsZero>(u);
      if constexpr (kEntropy) arg = at_least(d, splat(-100.0f));  // p = +0 below -88.03 and for -inf
    } else {
      p = exp_logit<Src>(d, arg);
    }
    e += p;
    if constexpr (kEntropy) h += p * arg;
  };
  int64_t i = c0;
  for (; i + 2 * kW <= full; i += 2 * kW) {
    vf a, b;
    x.prefetch(i);
    x.load2(i, a, b);
    fold(a, e0, h0, mx0);
    if constexpr (kTwoSums) {
      fold(b, e1, h1, mx1);
    } else {
      fold(b, e0, h0, mx0);
    }
  }
  if (i < full) fold(x.load(i), e0, h0, mx0);
  if (full < c1) fold(load_ragged(x, full, c1 - full, 1.0f, ninf), e1, h1, mx1);  // padded with -inf
  ChunkSums r{sum_lanes_f(e0 + e1), kEntropy ? sum_lanes_f(h0 + h1) : 0.0f, ninf};
  if constexpr (kMax) r.max = max_lanes(max_v(mx0, mx1)) * inv_t;
  return r;
}

// The max of a chunk (NaN skipped; -inf if every value is -inf or NaN).
template <bool kScale, class Src>
RLK_INLINE float chunk_max(const Src& x, int64_t c0, int64_t full, int64_t c1, vf it, float inv_t) {
  const float ninf = -__builtin_inff();
  vf mx0 = splat(ninf), mx1 = mx0;
  int64_t i = c0;
  for (; i + 2 * kW <= full; i += 2 * kW) {
    vf a, b;
    x.load2(i, a, b);
    if constexpr (kScale) {
      a = a * it;
      b = b * it;
    }
    mx0 = max_v(a, mx0);
    mx1 = max_v(b, mx1);
  }
  if (i < full) mx0 = max_v(kScale ? x.load(i) * it : x.load(i), mx0);
  float m = max_lanes(max_v(mx0, mx1));
  for (int64_t j = full; j < c1; ++j) {
    const float z = x.at(j) * inv_t;
    m = z > m ? z : m;
  }
  return m;
}

// Whether [c0, c1) holds a NaN (for a chunk whose max is -inf: rare, scalar).
template <class Src>
__attribute__((noinline, cold)) bool chunk_has_nan(const Src& x, int64_t c0, int64_t c1) {
  for (int64_t j = c0; j < c1; ++j) {
    const float z = x.at(j);
    if (z != z) return true;
  }
  return false;
}

// Moves sums taken against m_from (e, h) to m_to >= m_from: e' = e exp(m_from - m_to),
// h' = e' (h / e + m_from - m_to).
RLK_INLINE void rebase(float& e, float& h, float m_from, float m_to) {
  if (m_from == m_to || m_from == -__builtin_inff()) return;
  const float shift = m_from - m_to;  // < 0
  const float scale = __builtin_expf(shift);
  h = scale * (h + shift * e);
  e = scale * e;
}

template <bool kEntropy, bool kScale, class Src>
RLK_INLINE RowState logprob_row_state(const Src& x, int64_t V, float inv_t) {
  const float ninf = -__builtin_inff();
  const vf it = splat(inv_t);
  RowState st{ninf, 0.0f, 0.0f};
  AbsoluteRef abs_ref(0.0f);  // the absolute fold's constants for abs_ref.m
  for (int64_t c0 = 0; c0 < V; c0 += kLogitChunk) {
    const int64_t c1 = c0 + kLogitChunk < V ? c0 + kLogitChunk : V;
    const int64_t full = c0 + (c1 - c0) / kW * kW;
    ChunkSums c{0.0f, 0.0f, ninf};
    float ref = st.m;  // what the chunk's sums are taken against
    if (kAbsoluteFold && st.m != ninf && __builtin_fabsf(st.m) <= kAbsoluteMax) {
      if (abs_ref.m != st.m) abs_ref = AbsoluteRef(st.m);
      c = fold_chunk<kEntropy, true, kScale, kAbsoluteFold>(x, c0, full, c1, it, inv_t, st.m, &abs_ref);
      c.e *= abs_ref.to_m;  // from R to st.m (the entropy's z - m are st.m's already)
      c.h *= abs_ref.to_m;
    } else if (st.m != ninf) {
      c = fold_chunk<kEntropy, true, kScale>(x, c0, full, c1, it, inv_t, st.m);
    }
    if (st.m == ninf || !(c.max <= st.m + kSlack)) {  // no running max yet, or the chunk's passes it too far
      float cm = c.max;
      if (st.m == ninf) {
        cm = chunk_max<kScale>(x, c0, full, c1, it, inv_t);
        if (cm == ninf) {
          // every logit -inf (weighs nothing) or NaN
          if (chunk_has_nan(x, c0, c1)) st.s0 = st.s1 = __builtin_nanf("");
          continue;
        }
      }
      ref = cm;  // > st.m
      c = fold_chunk<kEntropy, false, kScale>(x, c0, full, c1, it, inv_t, ref);
      c.max = cm;
    }
    const float m = c.max > st.m ? c.max : st.m;
    rebase(st.s0, st.s1, st.m, m);
    rebase(c.e, c.h, ref, m);
    st.m = m;
    st.s0 += c.e;
    if constexpr (kEntropy) st.s1 += c.h;
  }
  return st;
}

// The lse of a row whose largest scaled logit is +inf: +inf, or NaN if the row also holds a NaN
// (docs/design.md §4.3; the max skips NaN). Rare: a scalar walk outside the kernel's loops.
template <class Src>
__attribute__((noinline, cold)) float lse_of_inf_row(const Src& x, int64_t V) {
  for (int64_t v = 0; v < V; ++v) {
    const float z = x.at(v);
    if (z != z) return __builtin_nanf("");
  }
  return __builtin_inff();
}

template <class Src>
RLK_INLINE void logprob_rows(const Src& base, int64_t row_stride, int64_t V, const int64_t* tok, bool has_ignore,
                             int64_t ignore, float inv_t, int64_t begin, int64_t end, float* logp, float* ent,
                             float* lse) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = tok[r];
    if (has_ignore && t == ignore) {
      logp[r] = 0;
      lse[r] = 0;
      if (ent != nullptr) ent[r] = 0;
      continue;
    }
    const Src x{base.p + r * row_stride};
    const bool scale = inv_t != 1.0f;
    const RowState st = ent != nullptr ? (scale ? logprob_row_state<true, true>(x, V, inv_t)
                                                : logprob_row_state<true, false>(x, V, inv_t))
                                       : (scale ? logprob_row_state<false, true>(x, V, inv_t)
                                                : logprob_row_state<false, false>(x, V, inv_t));
    const float log_s0 = __builtin_logf(st.s0);
    float l = st.m + log_s0;  // all -inf: -inf + log 0 = -inf, so logp = NaN as in the reference
    if (st.m == __builtin_inff()) l = lse_of_inf_row(x, V);
    lse[r] = l;
    float zt = x.at(t) * inv_t;
#if defined(__x86_64__) && defined(__GNUC__)
    // The product rounded as the chunks saw it: contracted into an FMA with the subtraction below, its exact
    // value minus the rounded lse leaves a residual (a V = 1 row would give logp != 0).
    asm("" : "+x"(zt));
#endif
    logp[r] = zt - l;
    // H = lse - sum p z = log s0 - s1 / s0 (z shifted by m, so no cancellation for logits of 1e4)
    if (ent != nullptr) ent[r] = log_s0 - st.s1 / st.s0;
  }
}

void logprob_rows_f32(const float* x, int64_t row_stride, int64_t V, const int64_t* tok, bool has_ignore,
                      int64_t ignore, float inv_t, int64_t begin, int64_t end, float* logp, float* ent, float* lse) {
  logprob_rows(F32Logits{x}, row_stride, V, tok, has_ignore, ignore, inv_t, begin, end, logp, ent, lse);
}

void logprob_rows_bf16(const uint16_t* x, int64_t row_stride, int64_t V, const int64_t* tok, bool has_ignore,
                       int64_t ignore, float inv_t, int64_t begin, int64_t end, float* logp, float* ent,
                       float* lse) {
  logprob_rows(Bf16Logits{x}, row_stride, V, tok, has_ignore, ignore, inv_t, begin, end, logp, ent, lse);
}

// y_v = -a p_v - b p_v (z_v + c) (the entropy term only with `entropy`; 0 where p_v = 0), p_v = exp(z_v - lse),
// z = x * inv_t: the gradient of one row except its target's one-hot term, which the caller adds. y may be x.
template <class Src, class Store>
RLK_INLINE void logprob_grad_row(const Src& x, Store store, int64_t V, float inv_t, float lse, float a, bool entropy,
                                 float b, float c) {
  const vf it = splat(inv_t), l = splat(lse), na = splat(-a), nb = splat(-b), cv = splat(c);
  auto grad = [&](vf z) {
    const vf p = exp_logit<Src>(z - l);
    return na * p;
  };
  auto grad_h = [&](vf z) {
    const vf p = exp_logit<Src>(z - l);
    return na * p + nb * (p != 0.0f ? p * (z + cv) : vf{});
  };
  const int64_t full = V / kW * kW;
  int64_t i = 0;
  if (entropy) {
    for (; i < full; i += kW) store(i, grad_h(x.load(i) * it));
  } else {
    for (; i < full; i += kW) store(i, grad(x.load(i) * it));
  }
  if (i < V) {
    alignas(64) float out[kW];
    const vf z = load_ragged(x, i, V - i, inv_t, 0.0f);
    storeu(out, entropy ? grad_h(z) : grad(z));
    for (int64_t j = 0; j < V - i; ++j) store.one(i + j, out[j]);
  }
}

struct F32Out {
  float* p;
  RLK_INLINE void operator()(int64_t i, vf v) const { storeu(p + i, v); }
  RLK_INLINE void one(int64_t i, float v) const { p[i] = v; }
};
struct Bf16Out {
  uint16_t* p;
  RLK_INLINE void operator()(int64_t i, vf v) const { store_bf16(p + i, v); }
  RLK_INLINE void one(int64_t i, float v) const {
    alignas(64) uint16_t h[kW];
    store_bf16(h, splat(v));
    p[i] = h[0];
  }
};

void logprob_grad_row_f32(const float* x, float* y, int64_t V, float inv_t, float lse, float a, bool entropy, float b,
                          float c) {
  logprob_grad_row(F32Logits{x}, F32Out{y}, V, inv_t, lse, a, entropy, b, c);
}

void logprob_grad_row_bf16(const uint16_t* x, uint16_t* y, int64_t V, float inv_t, float lse, float a, bool entropy,
                           float b, float c) {
  logprob_grad_row(Bf16Logits{x}, Bf16Out{y}, V, inv_t, lse, a, entropy, b, c);
}

}  // namespace rlkernels::cpu::simd::RLK_ISA

