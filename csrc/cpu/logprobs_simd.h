// gather_logprobs' float32 and bfloat16 rows on explicit vectors (docs/design.md §4.3). Included by
// csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h.
//
// Forward, per row: an online (max, sum-exp, entropy) state, m = running max of z = x / T,
// s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m), folded chunk by chunk: the chunk's max from one pass
// over it (from memory), then its exps from a second pass (from L1), so the state is rescaled once per chunk
// and every exp is the vector polynomial of simd.h. bfloat16 logits are widened in registers (a shift), never
// copied. A row's ragged end runs as one padded vector (-inf: weighs nothing).
#pragma once

namespace rlkernels::cpu::simd::RLK_ISA {

using namespace ::rlkernels::vec;

// Elements per chunk: 8 KB of float32 stays in L1 between the two passes.
constexpr int64_t kLogitChunk = 2048;

#if RLK_AVX512
#define RLK_EXP_SCALEF 1
// max(x, -200) in one vmaxps; NaN stays (the second operand is returned when either is NaN).
RLK_INLINE vf clamp_exp_arg(vf x) {
  return reinterpret_cast<vf>(_mm512_max_ps(_mm512_set1_ps(-200.0f), reinterpret_cast<__m512>(x)));
}
// exp(x) for x <= 0 (x - max or z - lse): clamped to -200 (-inf gives 2^-289 p, exactly 0; NaN stays NaN), then
// simd.h's vscalefps exp, 12 operations a vector: the exps are the kernel's cost.
RLK_INLINE vf exp_logit(vf x) { return exp_scalef(clamp_exp_arg(x)); }
#else
#define RLK_EXP_SCALEF 0
// exp(x) for x <= 0 (x - max or z - lse): exactly 0 for -inf, NaN stays NaN.
RLK_INLINE vf exp_logit(vf x) { return exp_nonpositive_v(x); }
#endif

struct F32Logits {
  const float* p;
  RLK_INLINE vf load(int64_t i) const { return loadu(p + i); }
  RLK_INLINE float at(int64_t i) const { return p[i]; }
};
struct Bf16Logits {
  const uint16_t* p;
  RLK_INLINE vf load(int64_t i) const { return load_bf16(p + i); }
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

template <bool kEntropy, class Src>
RLK_INLINE RowState logprob_row_state(const Src& x, int64_t V, float inv_t) {
  const float ninf = -__builtin_inff();
  const vf it = splat(inv_t);
  RowState st{ninf, 0.0f, 0.0f};
  for (int64_t c0 = 0; c0 < V; c0 += kLogitChunk) {
    const int64_t c1 = c0 + kLogitChunk < V ? c0 + kLogitChunk : V;
    const int64_t full = c0 + (c1 - c0) / kW * kW;
    vf mx0 = splat(ninf), mx1 = mx0;
    int64_t i = c0;
    for (; i + 2 * kW <= full; i += 2 * kW) {
      mx0 = max_v(x.load(i) * it, mx0);
      mx1 = max_v(x.load(i + kW) * it, mx1);
    }
    if (i < full) mx0 = max_v(x.load(i) * it, mx0);
    if (full < c1) mx1 = max_v(load_ragged(x, full, c1 - full, inv_t, ninf), mx1);
    const float chunk_max = max_lanes(max_v(mx0, mx1));
    if (chunk_max == ninf) continue;  // all -inf: weighs nothing (and exp(-inf - -inf) would be NaN)
    const float m = st.m > chunk_max ? st.m : chunk_max;
    if (st.m != ninf && m != st.m) {
      const float shift = st.m - m;  // < 0
      const float scale = __builtin_expf(shift);
      st.s1 = scale * (st.s1 + shift * st.s0);
      st.s0 = scale * st.s0;
    }
    st.m = m;
    const vf mv = splat(m);
    vf e0 = vf{}, e1 = vf{}, h0 = vf{}, h1 = vf{};
    auto fold = [&](vf z, vf& e, vf& h) {
#if RLK_EXP_SCALEF
      // p = 0 exactly wherever the clamp moved d, so p * dc = p * d, and 0 * -inf never occurs
      const vf dc = clamp_exp_arg(z - mv);
      const vf p = exp_scalef(dc);
      e += p;
      if constexpr (kEntropy) h += p * dc;
#else
      const vf d = z - mv;
      const vf p = exp_logit(d);
      e += p;
      if constexpr (kEntropy) h += p != 0.0f ? p * d : vf{};  // 0 * -inf counts as 0
#endif
    };
    for (i = c0; i + 2 * kW <= full; i += 2 * kW) {
      fold(x.load(i) * it, e0, h0);
      fold(x.load(i + kW) * it, e1, h1);
    }
    if (i < full) fold(x.load(i) * it, e0, h0);
    if (full < c1) fold(load_ragged(x, full, c1 - full, inv_t, ninf), e1, h1);
    st.s0 += sum_lanes_f(e0 + e1);
    if constexpr (kEntropy) st.s1 += sum_lanes_f(h0 + h1);
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
    const RowState st = ent != nullptr ? logprob_row_state<true>(x, V, inv_t) : logprob_row_state<false>(x, V, inv_t);
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
    const vf p = exp_logit(z - l);
    return na * p;
  };
  auto grad_h = [&](vf z) {
    const vf p = exp_logit(z - l);
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

#undef RLK_EXP_SCALEF
