// Per-token math of the PPO loss family (docs/design.md §4.4): the clipped policy loss, the clipped value loss
// and the KL penalty estimators, with their derivatives. Compiled by g++ for the CPU kernels and meant for
// nvcc as well, so every function is RLK_FN and free of ATen.
//
// Derivatives follow torch autograd's conventions exactly, so that a fused backward equals autograd of the
// plain torch formula: clamp passes the gradient on the closed interval [lo, hi], and max/min split it
// half and half between equal arguments.
#pragma once

#include <cmath>

#include "macros.h"

namespace rlkernels::ppo {

// The log-ratio is clamped before exp so that one stale token cannot overflow the ratio (verl's bound).
constexpr double kLogRatioBound = 20.0;
// k3's value is clamped to this range (verl's bound).
constexpr double kK3Bound = 10.0;

template <typename acc_t>
struct PolicyParams {
  acc_t clip_lo;    // 1 - clip_low
  acc_t clip_hi;    // 1 + clip_high
  acc_t dual_clip;  // c > 1; only read when has_dual_clip
  bool has_dual_clip;
};

template <typename acc_t>
struct PolicyToken {
  acc_t loss;       // per-token loss l
  acc_t ratio;      // exp(clamp(logp - old_logp))
  bool clipped;     // -A * clamp(ratio) > -A * ratio
  bool lower;       // A < 0 and the dual clip binds
};

template <typename acc_t>
RLK_FN acc_t clamp_value(acc_t x, acc_t lo, acc_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// clamp(x, lo, hi) to tensor bounds as torch.clamp computes it: a NaN bound gives NaN (docs/design.md §3).
template <typename acc_t>
RLK_FN acc_t clamp_nan(acc_t x, acc_t lo, acc_t hi) {
  return lo != lo ? lo : (hi != hi ? hi : clamp_value(x, lo, hi));
}

// d(max(a, b))/da as torch computes it: 1, 0, or 1/2 on a tie.
template <typename acc_t>
RLK_FN acc_t max_share(acc_t a, acc_t b) {
  return a > b ? acc_t(1) : (a == b ? acc_t(0.5) : acc_t(0));
}

template <typename acc_t>
RLK_FN bool in_open(acc_t x, acc_t lo, acc_t hi) {
  return x > lo && x < hi;
}

// d clamp(x, lo, hi) / dx for tensor bounds (torch splits a tie between x and the bound).
template <typename acc_t>
RLK_FN acc_t clamp_share(acc_t x, acc_t lo, acc_t hi) {
  return (in_open(x, lo, hi) ? acc_t(1) : acc_t(0)) + (x == lo ? acc_t(0.5) : acc_t(0)) +
         (x == hi ? acc_t(0.5) : acc_t(0));
}

template <typename acc_t>
RLK_FN PolicyToken<acc_t> policy_token(acc_t logp, acc_t old_logp, acc_t adv, const PolicyParams<acc_t>& p) {
  const acc_t bound = acc_t(kLogRatioBound);
  PolicyToken<acc_t> out;
  out.ratio = std::exp(clamp_value(logp - old_logp, -bound, bound));
  const acc_t unclipped = -adv * out.ratio;
  const acc_t clipped = -adv * clamp_value(out.ratio, p.clip_lo, p.clip_hi);
  out.clipped = clipped > unclipped;
  acc_t loss = unclipped > clipped ? unclipped : clipped;
  if (!(unclipped == unclipped)) loss = unclipped;  // NaN propagates like torch.maximum
  out.lower = false;
  if (p.has_dual_clip && adv < acc_t(0)) {
    const acc_t dual = -adv * p.dual_clip;
    out.lower = loss > dual;
    loss = out.lower ? dual : loss;
  }
  out.loss = loss;
  return out;
}

// d l / d logp of one token, the derivative of exactly the expression in policy_token.
template <typename acc_t>
RLK_FN acc_t policy_token_grad(acc_t logp, acc_t old_logp, acc_t adv, const PolicyParams<acc_t>& p) {
  const acc_t bound = acc_t(kLogRatioBound);
  const acc_t log_ratio = logp - old_logp;
  const acc_t ratio = std::exp(clamp_value(log_ratio, -bound, bound));
  const acc_t unclipped = -adv * ratio;
  const acc_t clipped = -adv * clamp_value(ratio, p.clip_lo, p.clip_hi);
  const acc_t in_clip = in_open(ratio, p.clip_lo, p.clip_hi) ? acc_t(1) : acc_t(0);
  // d l / d ratio through max(unclipped, clipped).
  acc_t d_ratio = -adv * (max_share(unclipped, clipped) + max_share(clipped, unclipped) * in_clip);
  if (p.has_dual_clip && adv < acc_t(0)) {
    const acc_t loss = unclipped > clipped ? unclipped : clipped;
    d_ratio *= max_share(-adv * p.dual_clip, loss);  // min(loss, dual): loss's share
  }
  const acc_t d_log_ratio = in_open(log_ratio, -bound, bound) ? ratio : acc_t(0);
  return d_ratio * d_log_ratio;
}

// Value loss 0.5 * max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2); no clip: 0.5 * (v - R)^2.
template <typename acc_t>
struct ValueToken {
  acc_t loss;
  bool clipped;  // (clamped v - R)^2 > (v - R)^2
};

template <typename acc_t>
RLK_FN ValueToken<acc_t> value_token(acc_t v, acc_t old_v, acc_t ret, bool has_clip, acc_t clip) {
  const acc_t err = (v - ret) * (v - ret);
  ValueToken<acc_t> out{acc_t(0.5) * err, false};
  if (has_clip) {
    const acc_t vc = clamp_nan(v, old_v - clip, old_v + clip);
    const acc_t clipped_err = (vc - ret) * (vc - ret);
    out.clipped = clipped_err > err;
    out.loss = acc_t(0.5) * (out.clipped ? clipped_err : err);
    if (!(err == err)) out.loss = acc_t(0.5) * err;
    if (!(clipped_err == clipped_err)) out.loss = acc_t(0.5) * clipped_err;  // a NaN old value (torch.clamp)
  }
  return out;
}

template <typename acc_t>
RLK_FN acc_t value_token_grad(acc_t v, acc_t old_v, acc_t ret, bool has_clip, acc_t clip) {
  const acc_t err = (v - ret) * (v - ret);
  if (!has_clip) return v - ret;
  const acc_t lo = old_v - clip, hi = old_v + clip;
  const acc_t vc = clamp_nan(v, lo, hi);
  const acc_t clipped_err = (vc - ret) * (vc - ret);
  const acc_t in_clip = clamp_share(v, lo, hi);
  return max_share(err, clipped_err) * (v - ret) + max_share(clipped_err, err) * (vc - ret) * in_clip;
}

enum class KlKind : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

template <typename acc_t>
RLK_FN acc_t kl_token(acc_t logp, acc_t ref, KlKind kind) {
  const acc_t k1 = logp - ref;
  switch (kind) {
    case KlKind::kK1:
      return k1;
    case KlKind::kAbs:
      return std::abs(k1);
    case KlKind::kK2:
      return acc_t(0.5) * k1 * k1;
    default: {
      const acc_t d = clamp_value(ref - logp, acc_t(-kLogRatioBound), acc_t(kLogRatioBound));
      return clamp_value(std::exp(d) - d - acc_t(1), acc_t(-kK3Bound), acc_t(kK3Bound));
    }
  }
}

// d kl / d logp.
template <typename acc_t>
RLK_FN acc_t kl_token_grad(acc_t logp, acc_t ref, KlKind kind) {
  const acc_t k1 = logp - ref;
  switch (kind) {
    case KlKind::kK1:
      return acc_t(1);
    case KlKind::kAbs:  // torch's sign: 0 at 0
      return k1 > acc_t(0) ? acc_t(1) : (k1 < acc_t(0) ? acc_t(-1) : (k1 == k1 ? acc_t(0) : k1));
    case KlKind::kK2:
      return k1;
    default: {
      const acc_t raw = ref - logp;
      const acc_t bound = acc_t(kLogRatioBound);
      const acc_t d = clamp_value(raw, -bound, bound);
      const acc_t value = std::exp(d) - d - acc_t(1);
      const bool passes = in_open(raw, -bound, bound) && in_open(value, acc_t(-kK3Bound), acc_t(kK3Bound));
      return passes ? -(std::exp(d) - acc_t(1)) : acc_t(0);
    }
  }
}

}  // namespace rlkernels::ppo
