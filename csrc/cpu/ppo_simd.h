// The float32 PPO loss family on explicit vectors (docs/design.md §4.4): the policy loss, the value loss and
// the KL penalty, forward and backward, the math of csrc/include/rlkernels/ppo.h written with blends and
// conditional sums (simd.h Lanes), one register of tokens per step. Included by
// csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h.
//
// A vector of tokens is computed whole, masked tokens included, and the mask selects what reaches the sums
// and the gradient, so a masked token's inf or NaN never does. A ragged end is copied into padded buffers
// and run as one more vector whose extra lanes are masked off: no scalar tail.
//
// The streams are float32, bfloat16 or float16 (simd::Format): 16-bit values are widened to float32 as they are
// loaded (exact) and 16-bit gradients rounded to nearest even as they are stored, so a 16-bit call computes
// what the float32 call on the widened values computes, bit for bit, reading half the bytes.
#pragma once

#include "formats_simd.h"

namespace rlkernels::cpu::simd::RLK_ISA {

using namespace ::rlkernels::vec;

// Tokens per lane summed in float before the lanes are added into double (at most kSubBlock / kW each).
constexpr int64_t kSubBlock = 1024;

struct PolicyConsts {
  vf lo, hi, dual;
};

struct PolicyAcc {
  vf loss;
  vi count, clipped, lower;  // integer counts: one instruction a vector each (simd.h count_where)
  vf kl, ratio, ratio_max;
};

// A vector of tokens' log-ratio logp - old and its ratio: the exp of the log-ratio clamped to [-20, 20]
// (ppo::kLogRatioBound), NaN staying NaN. The longest chain of a token's computation, so the loops issue the next
// vector's ratio before this one's sums or gradient (run_ahead), and its exp takes the shorter polynomial chain
// (simd.h exp_v kShortChain): these loops are bound by latency more than by operation count below AVX-512.
struct Ratio {
  vf raw, ratio;
};
RLK_INLINE Ratio policy_ratio(vf lp, vf old) {
  const float bound = static_cast<float>(ppo::kLogRatioBound);
  const vf raw = lp - old;
  return {raw, exp_v<false, 6, true>(clamp_v(raw, splat(-bound), splat(bound)))};
}
template <int F>
RLK_INLINE Ratio policy_ratio_at(const elem_t<F>* lp, const elem_t<F>* old, int64_t i) {
  return policy_ratio(load_as<F>(lp + i), load_as<F>(old + i));
}

// tail(i, head(i)) for every whole vector i = i0, i0 + kW, ... of [i0, i1), head(i + kW) issued before tail(i, ..):
// the next vector's long chain overlaps this one's rest, which the core's window alone does not reach (its
// scheduler fills with the waiting operations of fewer vectors). Returns the first i not run.
template <class Head, class Tail>
RLK_INLINE int64_t run_ahead(int64_t i0, int64_t i1, Head&& head, Tail&& tail) {
  int64_t i = i0;
  if (i + kW > i1) return i;
  auto h = head(i);
  for (; i + 2 * kW <= i1; i += kW) {
    const auto next = head(i + kW);
    tail(i, h);
    h = next;
  }
  tail(i, h);
  return i + kW;
}

// One vector of tokens into the sums; ok: the lanes that count. Computed with the signs flipped, on
// u = A ratio and c = A clamp(ratio) (the loss terms are -u and -c): l = -min(u, c) and the dual clip binds
// where A < 0 and min(u, c) < A dual. u and c are NaN together (A or the ratio NaN; the clamped ratio is never
// 0), so l is NaN where either term is, as torch.maximum gives.
// ratio_max takes maxps, which drops a NaN ratio once a later one replaces it; a NaN ratio comes from a NaN
// log-ratio, which also makes the kl sum NaN, so policy_forward_run looks for it only then.
RLK_INLINE void policy_forward_vec(Ratio r, vf a, Lanes ok, const PolicyConsts& k, PolicyAcc& s) {
  const vf raw = r.raw, ratio = r.ratio;
  const vf u = a * ratio;
  const vf c = a * clamp_v(ratio, k.lo, k.hi);
  const vf neg_loss = min_v(u, c);
  const vf a_dual = a * k.dual;  // -inf where A < 0 without a dual clip: never binds
  const Lanes lower = lt_lanes(lt_lanes(ok, a, vf{}), neg_loss, a_dual);
  s.loss = sub_where(ok, s.loss, select_where(lower, a_dual, neg_loss));
  s.count = count_where(ok, s.count);
  s.clipped = count_where(lt_lanes(ok, c, u), s.clipped);  // the clipped term is the larger
  s.lower = count_where(lower, s.lower);
  s.kl = sub_where(ok, s.kl, raw);
  s.ratio = add_where(ok, s.ratio, ratio);
  s.ratio_max = max_where(ok, s.ratio_max, ratio);
}

// Whether a token of [i0, i1) that counts has a NaN log-ratio (a NaN ratio).
template <int F>
RLK_INLINE bool any_nan_ratio(const elem_t<F>* lp, const elem_t<F>* old, const uint8_t* mask, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float raw = scalar_as<F>(lp[i]) - scalar_as<F>(old[i]);
    if (raw != raw && (mask == nullptr || mask[i] != 0)) return true;
  }
  return false;
}

// -scale * d l / d logp of a vector of tokens, torch's tie conventions (ppo.h's policy_token_grad), on u and c
// as in policy_forward_vec: d l / d ratio = -A w, where w is 1 inside the clip range (there c == u) or where
// the unclipped term is the larger (u < c), 1/2 at a tie and 0 otherwise (NaN too); where A < 0 the dual
// clip's min(l, -A dual) passes l's share of it (1 where l is smaller, 1/2 at a tie, 0 where larger). The
// shares are powers of two, so ((A w) d_log) (-scale) rounds as ppo.h's scale (((-A w) w_dual) d_log).
RLK_INLINE vf policy_grad_vec(Ratio r, vf a, const PolicyConsts& k, vf neg_scale) {
  const float bound = static_cast<float>(ppo::kLogRatioBound);
  const vf raw = r.raw, ratio = r.ratio;
  const vf u = a * ratio;
  const vf c = a * clamp_v(ratio, k.lo, k.hi);
  const vf one = splat(1.0f), half = splat(0.5f), zero = vf{};
  const Lanes all = all_lanes();
  vf w = select_where(eq_lanes(all, u, c), half, zero);
  w = select_where(lt_lanes(all, u, c), one, w);
  w = select_where(lt_lanes(lt_lanes(all, k.lo, ratio), ratio, k.hi), one, w);
  const vf neg_loss = min_v(u, c), a_dual = a * k.dual;
  const Lanes neg = lt_lanes(all, a, zero);
  w = select_where(lt_lanes(neg, neg_loss, a_dual), zero, w);
  w = select_where(eq_lanes(neg, neg_loss, a_dual), w * half, w);
  const vf d_log = select_where(lt_lanes(lt_lanes(all, splat(-bound), raw), raw, splat(bound)), ratio, zero);
  return ((a * w) * d_log) * neg_scale;
}

template <int F, bool kMasked>
RLK_INLINE void policy_forward_run(const elem_t<F>* lp, const elem_t<F>* old, const elem_t<F>* adv,
                                   const uint8_t* mask, int64_t n, const PolicyConsts& k, double* sums) {
  const float inf = __builtin_inff();
  vf ratio_max = splat(-inf);
  double tot[kRatioMax] = {};
  bool nan_ratio = false;
  for (int64_t i0 = 0; i0 < n; i0 += kSubBlock) {
    const int64_t i1 = i0 + kSubBlock < n ? i0 + kSubBlock : n;
    PolicyAcc s{vf{}, vi{}, vi{}, vi{}, vf{}, vf{}, ratio_max};
    const int64_t i = run_ahead(
        i0, i1, [&](int64_t j) RLK_LAMBDA_INLINE { return policy_ratio_at<F>(lp, old, j); },
        [&](int64_t j, Ratio r) RLK_LAMBDA_INLINE {
          prefetch_streams(j, lp, old, adv);
          if constexpr (kMasked) prefetch_ahead(mask, j);
          policy_forward_vec(r, load_as<F>(adv + j), kMasked ? flag_lanes(mask + j) : all_lanes(), k, s);
        });
    if (i < i1) {  // the ragged end of the tokens (i1 == n here)
      alignas(64) elem_t<F> bl[kW] = {}, bo[kW] = {}, ba[kW] = {};
      alignas(64) uint8_t bm[kW] = {};
      const int64_t rem = i1 - i;
      pad_copy(bl, lp + i, rem);
      pad_copy(bo, old + i, rem);
      pad_copy(ba, adv + i, rem);
      for (int64_t j = 0; j < rem; ++j) bm[j] = kMasked ? mask[i + j] : 1;
      policy_forward_vec(policy_ratio_at<F>(bl, bo, 0), load_as<F>(ba), flag_lanes(bm), k, s);
    }
    tot[kLoss] += sum_lanes(s.loss);
    tot[kCount] += sum_lanes(s.count);
    tot[kClipped] += sum_lanes(s.clipped);
    tot[kLower] += sum_lanes(s.lower);
    const double kl = sum_lanes(s.kl);
    if (kl != kl && !nan_ratio) nan_ratio = any_nan_ratio<F>(lp, old, kMasked ? mask : nullptr, i0, i1);
    tot[kKl] += kl;
    tot[kRatio] += sum_lanes(s.ratio);
    ratio_max = s.ratio_max;
  }
  for (int j = 0; j < kRatioMax; ++j) sums[j] = tot[j];
  double mx = -inf;
  for (int l = 0; l < kW; ++l) mx = ratio_max[l] > mx ? ratio_max[l] : mx;
  sums[kRatioMax] = nan_ratio ? __builtin_nan("") : mx;
}

void ppo_policy_forward(Format f, const void* lp, const void* old, const void* adv, const uint8_t* mask, int64_t n,
                        float clip_lo, float clip_hi, float dual_clip, double* sums) {
  const PolicyConsts k{splat(clip_lo), splat(clip_hi), splat(dual_clip)};
  by_format(f, [&](auto F) RLK_LAMBDA_INLINE {
    if (mask != nullptr)
      policy_forward_run<F, true>(as_elems<F>(lp), as_elems<F>(old), as_elems<F>(adv), mask, n, k, sums);
    else
      policy_forward_run<F, false>(as_elems<F>(lp), as_elems<F>(old), as_elems<F>(adv), nullptr, n, k, sums);
  });
}

// grad[i] = scale * d l_i / d logp_i for unmasked tokens, 0 for masked ones.
template <int F>
RLK_INLINE void policy_backward_run(const elem_t<F>* lp, const elem_t<F>* old, const elem_t<F>* adv,
                                    const uint8_t* mask, int64_t n, const PolicyConsts& k, vf nsc, elem_t<F>* grad) {
  auto ratio_at = [&](int64_t j) RLK_LAMBDA_INLINE { return policy_ratio_at<F>(lp, old, j); };
  int64_t i = 0;
  if (mask != nullptr) {
    i = run_ahead(0, n, ratio_at, [&](int64_t j, Ratio r) RLK_LAMBDA_INLINE {
      prefetch_streams(j, lp, old, adv, mask);
      const vf g = policy_grad_vec(r, load_as<F>(adv + j), k, nsc);
      store_as<F>(grad + j, select_where(flag_lanes(mask + j), g, vf{}));
    });
  } else {
    i = run_ahead(0, n, ratio_at, [&](int64_t j, Ratio r) RLK_LAMBDA_INLINE {
      prefetch_streams(j, lp, old, adv);
      store_as<F>(grad + j, policy_grad_vec(r, load_as<F>(adv + j), k, nsc));
    });
  }
  if (i < n) {
    alignas(64) elem_t<F> bl[kW] = {}, bo[kW] = {}, ba[kW] = {}, bg[kW];
    alignas(64) uint8_t bm[kW] = {};
    const int64_t rem = n - i;
    pad_copy(bl, lp + i, rem);
    pad_copy(bo, old + i, rem);
    pad_copy(ba, adv + i, rem);
    for (int64_t j = 0; j < rem; ++j) bm[j] = mask != nullptr ? mask[i + j] : 1;
    const vf g = policy_grad_vec(policy_ratio_at<F>(bl, bo, 0), load_as<F>(ba), k, nsc);
    store_as<F>(bg, select_where(flag_lanes(bm), g, vf{}));
    pad_copy(grad + i, bg, rem);
  }
}

void ppo_policy_backward(Format f, const void* lp, const void* old, const void* adv, const uint8_t* mask, int64_t n,
                         float clip_lo, float clip_hi, float dual_clip, float scale, void* grad) {
  const PolicyConsts k{splat(clip_lo), splat(clip_hi), splat(dual_clip)};
  by_format(f, [&](auto F) RLK_LAMBDA_INLINE {
    policy_backward_run<F>(as_elems<F>(lp), as_elems<F>(old), as_elems<F>(adv), mask, n, k, splat(-scale),
                           as_elems<F>(grad));
  });
}

// ---- value loss ----

struct ValueAcc {
  vf loss;
  vi count, clipped;
};

// 0.5 max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2) of a vector of tokens; a NaN in either term (an
// old value of NaN gives a NaN clamp, as torch.clamp to tensor bounds) makes the loss NaN, as torch.maximum:
// a NaN v or R makes both terms NaN, so max_v's NaN rule (its second operand) never picks a number.
RLK_INLINE void value_forward_vec(vf v, vf old, vf ret, Lanes ok, bool has_clip, vf clip, ValueAcc& s) {
  const vf err = (v - ret) * (v - ret);
  vf loss = err;
  if (has_clip) {
    const vf vc = old != old ? old : clamp_v(v, old - clip, old + clip);
    const vf clipped_err = (vc - ret) * (vc - ret);
    s.clipped = count_where(lt_lanes(ok, err, clipped_err), s.clipped);
    loss = max_v(err, clipped_err);
  }
  s.loss = add_where(ok, s.loss, 0.5f * loss);
  s.count = count_where(ok, s.count);
}

// d l / d v (ppo.h's value_token_grad): max and the clamp to tensor bounds split ties half and half.
RLK_INLINE vf value_grad_vec(vf v, vf old, vf ret, bool has_clip, vf clip) {
  if (!has_clip) return v - ret;
  const vf one = splat(1.0f), half = splat(0.5f), zero = vf{};
  const auto share = [&](vf x, vf y) { return (x > y ? one : zero) + (x == y ? half : zero); };
  const vf err = (v - ret) * (v - ret);
  const vf lo = old - clip, hi = old + clip;
  const vf vc = v < lo ? lo : (v > hi ? hi : v);
  const vf clipped_err = (vc - ret) * (vc - ret);
  const vf in_clip = ((v > lo) & (v < hi) ? one : zero) + (v == lo ? half : zero) + (v == hi ? half : zero);
  return share(err, clipped_err) * (v - ret) + share(clipped_err, err) * (vc - ret) * in_clip;
}

template <int F>
RLK_INLINE void value_forward_run(const elem_t<F>* v, const elem_t<F>* old, const elem_t<F>* ret, const uint8_t* mask,
                                  int64_t n, bool has_clip, vf c, double* sums) {
  double tot[kValueSums] = {};
  for (int64_t i0 = 0; i0 < n; i0 += kSubBlock) {
    const int64_t i1 = i0 + kSubBlock < n ? i0 + kSubBlock : n;
    ValueAcc s{vf{}, vi{}, vi{}};
    int64_t i = i0;
    if (mask != nullptr) {
      for (; i + kW <= i1; i += kW) {
        prefetch_streams(i, v, old, ret, mask);
        value_forward_vec(load_as<F>(v + i), load_as<F>(old + i), load_as<F>(ret + i), flag_lanes(mask + i),
                          has_clip, c, s);
      }
    } else {
      for (; i + kW <= i1; i += kW) {
        prefetch_streams(i, v, old, ret);
        value_forward_vec(load_as<F>(v + i), load_as<F>(old + i), load_as<F>(ret + i), all_lanes(), has_clip, c, s);
      }
    }
    if (i < i1) {
      alignas(64) elem_t<F> bv[kW] = {}, bo[kW] = {}, br[kW] = {};
      alignas(64) uint8_t bm[kW] = {};
      pad_copy(bv, v + i, i1 - i);
      pad_copy(bo, old + i, i1 - i);
      pad_copy(br, ret + i, i1 - i);
      for (int64_t j = 0; j < i1 - i; ++j) bm[j] = mask != nullptr ? mask[i + j] : 1;
      value_forward_vec(load_as<F>(bv), load_as<F>(bo), load_as<F>(br), flag_lanes(bm), has_clip, c, s);
    }
    tot[kValueLoss] += sum_lanes(s.loss);
    tot[kValueCount] += sum_lanes(s.count);
    tot[kValueClipped] += sum_lanes(s.clipped);
  }
  for (int j = 0; j < kValueSums; ++j) sums[j] = tot[j];
}

void ppo_value_forward(Format f, const void* v, const void* old, const void* ret, const uint8_t* mask, int64_t n,
                       bool has_clip, float clip, double* sums) {
  by_format(f, [&](auto F) RLK_LAMBDA_INLINE {
    value_forward_run<F>(as_elems<F>(v), as_elems<F>(old), as_elems<F>(ret), mask, n, has_clip, splat(clip), sums);
  });
}

template <int F>
RLK_INLINE void value_backward_run(const elem_t<F>* v, const elem_t<F>* old, const elem_t<F>* ret,
                                   const uint8_t* mask, int64_t n, bool has_clip, vf c, vf sc, elem_t<F>* grad) {
  int64_t i = 0;
  if (mask != nullptr) {
    for (; i + kW <= n; i += kW) {
      prefetch_streams(i, v, old, ret, mask);
      const vf g = sc * value_grad_vec(load_as<F>(v + i), load_as<F>(old + i), load_as<F>(ret + i), has_clip, c);
      store_as<F>(grad + i, select_where(flag_lanes(mask + i), g, vf{}));
    }
  } else {
    for (; i + kW <= n; i += kW) {
      prefetch_streams(i, v, old, ret);
      store_as<F>(grad + i,
                  sc * value_grad_vec(load_as<F>(v + i), load_as<F>(old + i), load_as<F>(ret + i), has_clip, c));
    }
  }
  if (i < n) {
    alignas(64) elem_t<F> bv[kW] = {}, bo[kW] = {}, br[kW] = {}, bg[kW];
    alignas(64) uint8_t bm[kW] = {};
    pad_copy(bv, v + i, n - i);
    pad_copy(bo, old + i, n - i);
    pad_copy(br, ret + i, n - i);
    for (int64_t j = 0; j < n - i; ++j) bm[j] = mask != nullptr ? mask[i + j] : 1;
    const vf g = sc * value_grad_vec(load_as<F>(bv), load_as<F>(bo), load_as<F>(br), has_clip, c);
    store_as<F>(bg, select_where(flag_lanes(bm), g, vf{}));
    pad_copy(grad + i, bg, n - i);
  }
}

void ppo_value_backward(Format f, const void* v, const void* old, const void* ret, const uint8_t* mask, int64_t n,
                        bool has_clip, float clip, float scale, void* grad) {
  by_format(f, [&](auto F) RLK_LAMBDA_INLINE {
    value_backward_run<F>(as_elems<F>(v), as_elems<F>(old), as_elems<F>(ret), mask, n, has_clip, splat(clip),
                          splat(scale), as_elems<F>(grad));
  });
}

// ---- KL penalty (ppo.h's kl_token and kl_token_grad; kind: ppo::KlKind) ----

template <int kKind>
RLK_INLINE vf kl_vec(vf lp, vf ref) {
  const vf k1 = lp - ref;
  if constexpr (kKind == static_cast<int>(ppo::KlKind::kK1)) {
    return k1;
  } else if constexpr (kKind == static_cast<int>(ppo::KlKind::kAbs)) {
    return k1 < 0.0f ? -k1 : k1;
  } else if constexpr (kKind == static_cast<int>(ppo::KlKind::kK2)) {
    return 0.5f * k1 * k1;
  } else {
    const float bound = static_cast<float>(ppo::kLogRatioBound), k3 = static_cast<float>(ppo::kK3Bound);
    const vf d = clamp_v(ref - lp, splat(-bound), splat(bound));
    return clamp_v(exp_v(d) - d - 1.0f, splat(-k3), splat(k3));
  }
}

template <int kKind>
RLK_INLINE vf kl_grad_vec(vf lp, vf ref) {
  const vf k1 = lp - ref, one = splat(1.0f), zero = vf{};
  if constexpr (kKind == static_cast<int>(ppo::KlKind::kK1)) {
    return one;
  } else if constexpr (kKind == static_cast<int>(ppo::KlKind::kAbs)) {  // torch's sign: 0 at 0, NaN stays
    return k1 > 0.0f ? one : (k1 < 0.0f ? -one : (k1 == k1 ? zero : k1));
  } else if constexpr (kKind == static_cast<int>(ppo::KlKind::kK2)) {
    return k1;
  } else {
    const float bound = static_cast<float>(ppo::kLogRatioBound), k3 = static_cast<float>(ppo::kK3Bound);
    const vf raw = ref - lp;
    const vf d = clamp_v(raw, splat(-bound), splat(bound));
    const vf e = exp_v(d);
    const vf value = e - d - 1.0f;
    const vi passes = (raw > -bound) & (raw < bound) & (value > -k3) & (value < k3);
    return passes ? -(e - 1.0f) : zero;
  }
}

// out = kl (g null) or g * d kl / d logp, over n elements; out is float32 for the kl, format F for its gradient.
template <int F, int kKind, typename Out>
RLK_INLINE void kl_run(const float* g, const elem_t<F>* lp, const elem_t<F>* ref, int64_t n, Out* out) {
  constexpr int kOut = std::is_same_v<Out, float> ? kF32 : F;
  const auto value = [&](vf l, vf r, vf gv) { return g == nullptr ? kl_vec<kKind>(l, r) : gv * kl_grad_vec<kKind>(l, r); };
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    prefetch_streams(i, lp, ref);
    if (g != nullptr) prefetch_ahead(g, i);
    store_as<kOut>(out + i, value(load_as<F>(lp + i), load_as<F>(ref + i), g == nullptr ? vf{} : loadu(g + i)));
  }
  if (i < n) {
    alignas(64) elem_t<F> bl[kW] = {}, br[kW] = {};
    alignas(64) float bg[kW] = {};
    alignas(64) Out bo[kW];
    pad_copy(bl, lp + i, n - i);
    pad_copy(br, ref + i, n - i);
    if (g != nullptr) pad_copy(bg, g + i, n - i);
    store_as<kOut>(bo, value(load_as<F>(bl), load_as<F>(br), loadu(bg)));
    pad_copy(out + i, bo, n - i);
  }
}

template <int F, typename Out>
RLK_INLINE void kl_kind(const float* g, const elem_t<F>* lp, const elem_t<F>* ref, int64_t n, int kind, Out* out) {
  switch (kind) {
    case static_cast<int>(ppo::KlKind::kK1):
      return kl_run<F, static_cast<int>(ppo::KlKind::kK1)>(g, lp, ref, n, out);
    case static_cast<int>(ppo::KlKind::kAbs):
      return kl_run<F, static_cast<int>(ppo::KlKind::kAbs)>(g, lp, ref, n, out);
    case static_cast<int>(ppo::KlKind::kK2):
      return kl_run<F, static_cast<int>(ppo::KlKind::kK2)>(g, lp, ref, n, out);
    default:
      return kl_run<F, static_cast<int>(ppo::KlKind::kK3)>(g, lp, ref, n, out);
  }
}

void ppo_kl_forward(Format f, const void* lp, const void* ref, int64_t n, int kind, float* out) {
  by_format(f, [&](auto F) RLK_LAMBDA_INLINE { kl_kind<F>(nullptr, as_elems<F>(lp), as_elems<F>(ref), n, kind, out); });
}

void ppo_kl_backward(Format f, const float* g, const void* lp, const void* ref, int64_t n, int kind, void* out) {
  by_format(f, [&](auto F) RLK_LAMBDA_INLINE {
    kl_kind<F>(g, as_elems<F>(lp), as_elems<F>(ref), n, kind, as_elems<F>(out));
  });
}

}  // namespace rlkernels::cpu::simd::RLK_ISA
