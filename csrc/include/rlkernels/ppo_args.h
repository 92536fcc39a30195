// Arguments of the PPO loss ops (docs/design.md §4.4), parsed and checked once for the CPU kernels
// (csrc/cpu/ppo.cpp) and the CUDA kernels (csrc/cuda/ppo.cu): canonical [B, T] inputs of one float dtype and
// device, the mask, the aggregation mode, the KL estimator and the clip bounds. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string_view>

#include "rlkernels/checks.h"
#include "rlkernels/ppo.h"

namespace rlkernels::ppo {

// How the per-token losses become one loss (docs/design.md §4.4). The CUDA kernels take it as an int.
enum Agg : int { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };

inline Agg agg_of(std::string_view agg) {
  return choice_of<Agg>(agg, "agg", {{"token-mean", kTokenMean},
                                     {"seq-mean-token-sum", kSeqMeanTokenSum},
                                     {"seq-mean-token-mean", kSeqMeanTokenMean},
                                     {"seq-mean-token-sum-norm", kSeqMeanTokenSumNorm}});
}

inline KlKind kl_kind_of(std::string_view kind) {
  return choice_of<KlKind>(kind, "kind",
                           {{"k1", KlKind::kK1}, {"abs", KlKind::kAbs}, {"k2", KlKind::kK2}, {"k3", KlKind::kK3}});
}

// An input read alongside `ref`: a float tensor of ref's shape, dtype and device.
inline void check_input(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  check_float(t, name);
  check_like(t, name, ref, ref_name);
}

// The three [B, T] inputs of a loss (logp, old_logp, advantages or values, old_values, returns).
inline void check_loss_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& old, const char* old_name,
                              const at::Tensor& y, const char* y_name) {
  TORCH_CHECK_VALUE(x.dim() == 2, "rlkernels: ", x_name, " must be canonical [B, T], got ", x.dim(), " dims");
  check_input(x, x_name, old, old_name);
  check_input(x, x_name, y, y_name);
}

// The mask as bytes (bool or uint8, nonzero = counts), or null when absent; `keep` holds the contiguous copy
// while the kernels read it.
inline const uint8_t* mask_data(const at::Tensor& ref, const char* ref_name, const OptTensor& mask,
                                at::Tensor& keep) {
  if (!given(mask)) return nullptr;
  check_flag(*mask, "mask", ref, ref_name, ref.sizes());
  keep = mask->contiguous();
  return static_cast<const uint8_t*>(keep.const_data_ptr());
}

template <typename acc_t>
PolicyParams<acc_t> policy_params(double clip_low, double clip_high, std::optional<double> dual_clip) {
  TORCH_CHECK_VALUE(clip_low >= 0, "rlkernels: clip_low must be >= 0, got ", clip_low);
  TORCH_CHECK_VALUE(clip_high >= 0, "rlkernels: clip_high must be >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, "rlkernels: dual_clip must be > 1, got ",
                    dual_clip.value_or(0.0));
  PolicyParams<acc_t> p;
  p.clip_lo = static_cast<acc_t>(1.0 - clip_low);
  p.clip_hi = static_cast<acc_t>(1.0 + clip_high);
  p.has_dual_clip = dual_clip.has_value();
  p.dual_clip = static_cast<acc_t>(dual_clip.value_or(1.0));
  return p;
}

}  // namespace rlkernels::ppo
