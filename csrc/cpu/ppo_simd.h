// The float32 PPO loss family on explicit vectors (docs/design.md §4.4): the policy loss, the value loss and
// the KL penalty, forward and backward, the math of csrc/include/rlkernels/ppo.h written with blends, one
// register of tokens per step. Included by
// csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h.
//
// A vector of tokens is computed whole, masked tokens included, and the mask selects what reaches the sums
// and the gradient, so a masked token's inf or NaN never does. A ragged end is copied into padded buffers
// and run as one more vector whose extra lanes are masked off: no scalar tail.
#pragma once

namespace rlkernels::cpu::simd::RLK_ISA {

using namespace ::rlkernels::vec;

// Tokens per lane summed in float before the lanes are added into double (at most kSubBlock / kW each).
constexpr int64_t kSubBlock = 1024;

struct PolicyConsts {
  vf lo, hi, dual;
};

struct PolicyAcc {
  vf loss, count, clipped, lower, kl, ratio, ratio_max;
};

// exp of the log-ratio clamped to [-20, 20] (ppo::kLogRatioBound); NaN stays NaN.
RLK_INLINE vf policy_ratio(vf raw) {
  const float bound = static_cast<float>(ppo::kLogRatioBound);
  return exp_v(clamp_v(raw, splat(-bound), splat(bound)));
}

// One vector of tokens into the sums; ok: the lanes that count (kAll: every lane, no selects).
template <bool kAll>
RLK_INLINE void policy_forward_vec(vf lp, vf old, vf a, vi ok, const PolicyConsts& k, PolicyAcc& s) {
  const vf raw = lp - old;
  const vf ratio = policy_ratio(raw);
  const vf unclipped = -a * ratio;
  const vf clipped = -a * clamp_v(ratio, k.lo, k.hi);
  vf loss = (unclipped > clipped) | (unclipped != unclipped) ? unclipped : clipped;  // NaN as torch.maximum
  const vf dual = -a * k.dual;  // +inf without a dual clip: never binds
  const vi lower = (a < 0.0f) & (loss > dual);
  loss = lower ? dual : loss;
  const vi took_clip = clipped > unclipped;
  const vi bigger = (ratio > s.ratio_max) | (ratio != ratio);  // a NaN ratio sticks in ratio_max
  const vf one = splat(1.0f), zero = vf{};
  if constexpr (kAll) {
    s.loss += loss;
    s.count += one;
    s.clipped += took_clip ? one : zero;
    s.lower += lower ? one : zero;
    s.kl -= raw;
    s.ratio += ratio;
    s.ratio_max = bigger ? ratio : s.ratio_max;
  } else {
    // Nested blends, one mask each: GCC turned the AND of an integer and a float compare's masks into scalar
    // bit twiddling under AVX-512.
    s.loss += ok ? loss : zero;
    s.count += ok ? one : zero;
    s.clipped += ok ? (took_clip ? one : zero) : zero;
    s.lower += ok ? (lower ? one : zero) : zero;
    s.kl -= ok ? raw : zero;
    s.ratio += ok ? ratio : zero;
    s.ratio_max = ok ? (bigger ? ratio : s.ratio_max) : s.ratio_max;
  }
}

// d l / d logp of a vector of tokens, torch's tie conventions (ppo.h's policy_token_grad).
RLK_INLINE vf policy_grad_vec(vf lp, vf old, vf a, const PolicyConsts& k) {
  const float bound = static_cast<float>(ppo::kLogRatioBound);
  const vf raw = lp - old;
  const vf ratio = policy_ratio(raw);
  const vf unclipped = -a * ratio;
  const vf clipped = -a * clamp_v(ratio, k.lo, k.hi);
  const vf one = splat(1.0f), half = splat(0.5f), zero = vf{};
  const auto share = [&](vf x, vf y) { return (x > y ? one : zero) + (x == y ? half : zero); };
  const vf in_clip = (ratio > k.lo) & (ratio < k.hi) ? one : zero;
  vf d_ratio = -a * (share(unclipped, clipped) + share(clipped, unclipped) * in_clip);
  const vf loss = unclipped > clipped ? unclipped : clipped;
  d_ratio *= a < 0.0f ? share(-a * k.dual, loss) : one;
  const vf d_log = (raw > -bound) & (raw < bound) ? ratio : zero;
  return d_ratio * d_log;
}

template <bool kMasked>
RLK_INLINE void policy_forward_run(const float* lp, const float* old, const float* adv, const uint8_t* mask,
                                   int64_t n, const PolicyConsts& k, double* sums) {
  const float inf = __builtin_inff();
  vf ratio_max = splat(-inf);
  double tot[kRatioMax] = {};
  const vi all = vi{} - 1;
  for (int64_t i0 = 0; i0 < n; i0 += kSubBlock) {
    const int64_t i1 = i0 + kSubBlock < n ? i0 + kSubBlock : n;
    PolicyAcc s{vf{}, vf{}, vf{}, vf{}, vf{}, vf{}, ratio_max};
    int64_t i = i0;
    for (; i + kW <= i1; i += kW) {
      prefetch_streams(i, lp, old, adv);
      if constexpr (kMasked) prefetch_ahead(mask, i);
      const vf l = loadu(lp + i), o = loadu(old + i), a = loadu(adv + i);
      if constexpr (kMasked)
        policy_forward_vec<false>(l, o, a, flags_set(mask + i), k, s);
      else
        policy_forward_vec<true>(l, o, a, all, k, s);
    }
    if (i < i1) {  // the ragged end of the tokens (i1 == n here)
      alignas(64) float bl[kW] = {}, bo[kW] = {}, ba[kW] = {};
      alignas(64) uint8_t bm[kW] = {};
      const int64_t rem = i1 - i;
      for (int64_t j = 0; j < rem; ++j) {
        bl[j] = lp[i + j];
        bo[j] = old[i + j];
        ba[j] = adv[i + j];
        bm[j] = kMasked ? mask[i + j] : 1;
      }
      policy_forward_vec<false>(loadu(bl), loadu(bo), loadu(ba), flags_set(bm), k, s);
    }
    tot[kLoss] += sum_lanes(s.loss);
    tot[kCount] += sum_lanes(s.count);
    tot[kClipped] += sum_lanes(s.clipped);
    tot[kLower] += sum_lanes(s.lower);
    tot[kKl] += sum_lanes(s.kl);
    tot[kRatio] += sum_lanes(s.ratio);
    ratio_max = s.ratio_max;
  }
  for (int j = 0; j < kRatioMax; ++j) sums[j] = tot[j];
  double mx = -inf;
  for (int l = 0; l < kW; ++l) {
    const double r = ratio_max[l];
    if (r != r || r > mx) mx = r;
    if (mx != mx) break;
  }
  sums[kRatioMax] = mx;
}

void ppo_policy_forward(const float* lp, const float* old, const float* adv, const uint8_t* mask, int64_t n,
                        float clip_lo, float clip_hi, float dual_clip, double* sums) {
  const PolicyConsts k{splat(clip_lo), splat(clip_hi), splat(dual_clip)};
  if (mask != nullptr)
    policy_forward_run<true>(lp, old, adv, mask, n, k, sums);
  else
    policy_forward_run<false>(lp, old, adv, nullptr, n, k, sums);
}

// grad[i] = scale * d l_i / d logp_i for unmasked tokens, 0 for masked ones.
void ppo_policy_backward(const float* lp, const float* old, const float* adv, const uint8_t* mask, int64_t n,
                         float clip_lo, float clip_hi, float dual_clip, float scale, float* grad) {
  const PolicyConsts k{splat(clip_lo), splat(clip_hi), splat(dual_clip)};
  const vf sc = splat(scale);
  int64_t i = 0;
  if (mask != nullptr) {
    for (; i + kW <= n; i += kW) {
      prefetch_streams(i, lp, old, adv, mask);
      const vf g = sc * policy_grad_vec(loadu(lp + i), loadu(old + i), loadu(adv + i), k);
      storeu(grad + i, flags_set(mask + i) ? g : vf{});
    }
  } else {
    for (; i + kW <= n; i += kW) {
      prefetch_streams(i, lp, old, adv);
      storeu(grad + i, sc * policy_grad_vec(loadu(lp + i), loadu(old + i), loadu(adv + i), k));
    }
  }
  if (i < n) {
    alignas(64) float bl[kW] = {}, bo[kW] = {}, ba[kW] = {}, bg[kW];
    alignas(64) uint8_t bm[kW] = {};
    const int64_t rem = n - i;
    for (int64_t j = 0; j < rem; ++j) {
      bl[j] = lp[i + j];
      bo[j] = old[i + j];
      ba[j] = adv[i + j];
      bm[j] = mask != nullptr ? mask[i + j] : 1;
    }
    const vf g = sc * policy_grad_vec(loadu(bl), loadu(bo), loadu(ba), k);
    storeu(bg, flags_set(bm) ? g : vf{});
    for (int64_t j = 0; j < rem; ++j) grad[i + j] = bg[j];
  }
}

// ---- value loss ----

struct ValueAcc {
  vf loss, count, clipped;
};

// 0.5 max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2) of a vector of tokens; a NaN in either term (an
// old value of NaN gives a NaN clamp, as torch.clamp to tensor bounds) makes the loss NaN, as torch.maximum.
template <bool kAll>
RLK_INLINE void value_forward_vec(vf v, vf old, vf ret, vi ok, bool has_clip, vf clip, ValueAcc& s) {
  const vf err = (v - ret) * (v - ret);
  vf loss = err;
  vi clipped = vi{};
  if (has_clip) {
    const vf vc = old != old ? old : clamp_v(v, old - clip, old + clip);
    const vf clipped_err = (vc - ret) * (vc - ret);
    clipped = clipped_err > err;
    loss = clipped | (clipped_err != clipped_err) ? clipped_err : err;
  }
  loss = 0.5f * loss;
  const vf one = splat(1.0f), zero = vf{};
  if constexpr (kAll) {
    s.loss += loss;
    s.count += one;
    s.clipped += clipped ? one : zero;
  } else {
    s.loss += ok ? loss : zero;
    s.count += ok ? one : zero;
    s.clipped += ok & clipped ? one : zero;
  }
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

void ppo_value_forward(const float* v, const float* old, const float* ret, const uint8_t* mask, int64_t n,
                       bool has_clip, float clip, double* sums) {
  const vf c = splat(clip);
  const vi all = vi{} - 1;
  double tot[kValueSums] = {};
  for (int64_t i0 = 0; i0 < n; i0 += kSubBlock) {
    const int64_t i1 = i0 + kSubBlock < n ? i0 + kSubBlock : n;
    ValueAcc s{vf{}, vf{}, vf{}};
    int64_t i = i0;
    if (mask != nullptr) {
      for (; i + kW <= i1; i += kW) {
        prefetch_streams(i, v, old, ret, mask);
        value_forward_vec<false>(loadu(v + i), loadu(old + i), loadu(ret + i), flags_set(mask + i), has_clip, c, s);
      }
    } else {
      for (; i + kW <= i1; i += kW) {
        prefetch_streams(i, v, old, ret);
        value_forward_vec<true>(loadu(v + i), loadu(old + i), loadu(ret + i), all, has_clip, c, s);
      }
    }
    if (i < i1) {
      alignas(64) float bv[kW] = {}, bo[kW] = {}, br[kW] = {};
      alignas(64) uint8_t bm[kW] = {};
      for (int64_t j = 0; j < i1 - i; ++j) {
        bv[j] = v[i + j];
        bo[j] = old[i + j];
        br[j] = ret[i + j];
        bm[j] = mask != nullptr ? mask[i + j] : 1;
      }
      value_forward_vec<false>(loadu(bv), loadu(bo), loadu(br), flags_set(bm), has_clip, c, s);
    }
    tot[kValueLoss] += sum_lanes(s.loss);
    tot[kValueCount] += sum_lanes(s.count);
    tot[kValueClipped] += sum_lanes(s.clipped);
  }
  for (int j = 0; j < kValueSums; ++j) sums[j] = tot[j];
}

void ppo_value_backward(const float* v, const float* old, const float* ret, const uint8_t* mask, int64_t n,
                        bool has_clip, float clip, float scale, float* grad) {
  const vf c = splat(clip), sc = splat(scale);
  int64_t i = 0;
  if (mask != nullptr) {
    for (; i + kW <= n; i += kW) {
      prefetch_streams(i, v, old, ret, mask);
      const vf g = sc * value_grad_vec(loadu(v + i), loadu(old + i), loadu(ret + i), has_clip, c);
      storeu(grad + i, flags_set(mask + i) ? g : vf{});
    }
  } else {
    for (; i + kW <= n; i += kW) {
      prefetch_streams(i, v, old, ret);
      storeu(grad + i, sc * value_grad_vec(loadu(v + i), loadu(old + i), loadu(ret + i), has_clip, c));
    }
  }
  if (i < n) {
    alignas(64) float bv[kW] = {}, bo[kW] = {}, br[kW] = {}, bg[kW];
    alignas(64) uint8_t bm[kW] = {};
    for (int64_t j = 0; j < n - i; ++j) {
      bv[j] = v[i + j];
      bo[j] = old[i + j];
      br[j] = ret[i + j];
      bm[j] = mask != nullptr ? mask[i + j] : 1;
    }
    const vf g = sc * value_grad_vec(loadu(bv), loadu(bo), loadu(br), has_clip, c);
    storeu(bg, flags_set(bm) ? g : vf{});
    for (int64_t j = 0; j < n - i; ++j) grad[i + j] = bg[j];
  }
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

// out = kl (g null) or g * d kl / d logp, over n elements.
template <int kKind>
RLK_INLINE void kl_run(const float* g, const float* lp, const float* ref, int64_t n, float* out) {
  const auto value = [&](vf l, vf r, vf gv) { return g == nullptr ? kl_vec<kKind>(l, r) : gv * kl_grad_vec<kKind>(l, r); };
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    prefetch_streams(i, lp, ref);
    if (g != nullptr) prefetch_ahead(g, i);
    storeu(out + i, value(loadu(lp + i), loadu(ref + i), g == nullptr ? vf{} : loadu(g + i)));
  }
  if (i < n) {
    alignas(64) float bl[kW] = {}, br[kW] = {}, bg[kW] = {}, bo[kW];
    for (int64_t j = 0; j < n - i; ++j) {
      bl[j] = lp[i + j];
      br[j] = ref[i + j];
      if (g != nullptr) bg[j] = g[i + j];
    }
    storeu(bo, value(loadu(bl), loadu(br), loadu(bg)));
    for (int64_t j = 0; j < n - i; ++j) out[i + j] = bo[j];
  }
}

RLK_INLINE void kl_dispatch(const float* g, const float* lp, const float* ref, int64_t n, int kind, float* out) {
  switch (kind) {
    case static_cast<int>(ppo::KlKind::kK1):
      return kl_run<static_cast<int>(ppo::KlKind::kK1)>(g, lp, ref, n, out);
    case static_cast<int>(ppo::KlKind::kAbs):
      return kl_run<static_cast<int>(ppo::KlKind::kAbs)>(g, lp, ref, n, out);
    case static_cast<int>(ppo::KlKind::kK2):
      return kl_run<static_cast<int>(ppo::KlKind::kK2)>(g, lp, ref, n, out);
    default:
      return kl_run<static_cast<int>(ppo::KlKind::kK3)>(g, lp, ref, n, out);
  }
}

void ppo_kl_forward(const float* lp, const float* ref, int64_t n, int kind, float* out) {
  kl_dispatch(nullptr, lp, ref, n, kind, out);
}

void ppo_kl_backward(const float* g, const float* lp, const float* ref, int64_t n, int kind, float* out) {
  kl_dispatch(g, lp, ref, n, kind, out);
}

}  // namespace rlkernels::cpu::simd::RLK_ISA
