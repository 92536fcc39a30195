// CPU kernels of the PPO loss family (docs/design.md §4.4): ppo_policy_loss, value_loss, kl_penalty and their
// backwards. The per-token math lives in csrc/include/rlkernels/ppo.h.
//
// The losses run one pass over [B, T]: each row is cut into fixed chunks, every chunk reduces its tokens
// into a Partial (sums in float64) on one thread, then the chunks of a row and the rows are combined in
// index order on one thread; the backwards walk the same chunk grid, so one long row (a 1-D input) spreads
// over the threads as a batch does. The grid depends only on the shape, so results are bit-identical for
// any number of threads. float32, bfloat16 and float16 run the explicit-vector kernels of ppo_simd.h (built
// per instruction set, simd_kernels.h); float64 runs the scalar math of ppo.h.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"
#include "rlkernels/ppo.h"
#include "rlkernels/ppo_args.h"
#include "alloc.h"
#include "simd_kernels.h"

namespace rlkernels::cpu {
namespace {

using at::Tensor;
using namespace rlkernels::ppo;

// Tokens per chunk: large enough that the per-chunk overhead vanishes, small enough that a single long
// row (1-D token-mean input) still spreads over the threads.
constexpr int64_t kChunk = 4096;

// Sums of one chunk, row or batch. Float64 sums keep 1M-token means exact to float32 rounding.
struct Partial {
  double loss = 0, count = 0, clipped = 0, lower = 0, kl = 0, ratio = 0;
  double ratio_max = -std::numeric_limits<double>::infinity();

  void add(const Partial& o) {
    loss += o.loss;
    count += o.count;
    clipped += o.clipped;
    lower += o.lower;
    kl += o.kl;
    ratio += o.ratio;
    take_max(o.ratio_max);
  }
  void take_max(double r) {  // NaN sticks
    if (std::isnan(r) || r > ratio_max) ratio_max = r;
  }
};

// Runs token_fn(row, t0, t1, partial) over the fixed chunk grid in parallel, then combines in order.
// Returns the per-row partials.
template <typename TokenFn>
std::vector<Partial> reduce_rows(int64_t B, int64_t T, const TokenFn& token_fn) {
  const int64_t chunks_per_row = (T + kChunk - 1) / kChunk;
  std::vector<Partial> chunks(B * chunks_per_row);
  at::parallel_for(0, B * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / chunks_per_row, t0 = (c % chunks_per_row) * kChunk;
      token_fn(row, t0, std::min(T, t0 + kChunk), chunks[c]);
    }
  });
  std::vector<Partial> rows(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < chunks_per_row; ++k) rows[b].add(chunks[b * chunks_per_row + k]);
  return rows;
}

double mean_or_zero(double sum, double count) { return count > 0 ? sum / count : 0.0; }

// The aggregated loss and the batch totals from per-row partials (docs/design.md §4.4; 0 when nothing counts).
double aggregate(const std::vector<Partial>& rows, Partial& total, Agg agg, double norm_length) {
  double seq_mean_sum = 0, nonempty = 0;
  for (const Partial& r : rows) {
    total.add(r);
    if (r.count > 0) {
      seq_mean_sum += r.loss / r.count;
      nonempty += 1;
    }
  }
  const double B = static_cast<double>(rows.size());
  switch (agg) {
    case Agg::kTokenMean:
      return mean_or_zero(total.loss, total.count);
    case Agg::kSeqMeanTokenSum:
      return mean_or_zero(total.loss, B);
    case Agg::kSeqMeanTokenMean:
      return mean_or_zero(seq_mean_sum, nonempty);
    default:
      return mean_or_zero(total.loss, B * norm_length);
  }
}

// Runs chunk_fn(row, t0, t1) over the chunk grid of reduce_rows in parallel: a single long row (1-D input)
// spreads over the threads as a batch of rows does.
template <typename ChunkFn>
void for_chunks(int64_t B, int64_t T, const ChunkFn& chunk_fn) {
  const int64_t chunks_per_row = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / chunks_per_row, t0 = (c % chunks_per_row) * kChunk;
      chunk_fn(row, t0, std::min(T, t0 + kChunk));
    }
  });
}

// Per-row d loss / d l_t for unmasked tokens (masked tokens get 0).
std::vector<double> token_weights(int64_t B, int64_t T, const uint8_t* mask, Agg agg, double norm_length) {
  std::vector<double> counts(B, static_cast<double>(T));
  if (mask != nullptr) {
    const int64_t chunks_per_row = (T + kChunk - 1) / kChunk;
    std::vector<int64_t> chunk_counts(B * chunks_per_row, 0);
    for_chunks(B, T, [&](int64_t b, int64_t t0, int64_t t1) {
      int64_t n = 0;
      for (int64_t t = t0; t < t1; ++t) n += mask[b * T + t] != 0;
      chunk_counts[b * chunks_per_row + t0 / kChunk] = n;
    });
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t k = 0; k < chunks_per_row; ++k) n += chunk_counts[b * chunks_per_row + k];
      counts[b] = static_cast<double>(n);
    }
  }
  double total = 0, nonempty = 0;
  for (double c : counts) {
    total += c;
    nonempty += c > 0;
  }
  std::vector<double> w(B, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    switch (agg) {
      case Agg::kTokenMean:
        w[b] = total > 0 ? 1.0 / total : 0.0;
        break;
      case Agg::kSeqMeanTokenSum:
        w[b] = 1.0 / static_cast<double>(B);
        break;
      case Agg::kSeqMeanTokenMean:
        w[b] = counts[b] > 0 ? 1.0 / (counts[b] * nonempty) : 0.0;
        break;
      default:
        w[b] = 1.0 / (static_cast<double>(B) * norm_length);
    }
  }
  return w;
}

Tensor scalar_out(const Tensor& ref, double value) {
  Tensor out = at::empty({}, acc_options(ref));
  if (out.scalar_type() == at::kDouble)
    *out.data_ptr<double>() = value;
  else
    *out.data_ptr<float>() = static_cast<float>(value);
  return out;
}

double scalar_in(const Tensor& grad) {
  TORCH_CHECK_VALUE(grad.numel() == 1, "rlkernels: the loss gradient must be a scalar, got ", grad.sizes());
  return grad.to(at::kDouble).contiguous().data_ptr<double>()[0];  // a CPU tensor: no device sync
}

// float32, bfloat16 and float16 run the explicit-vector kernels (16-bit values widened as they are loaded, their
// gradients rounded as a cast to the 16-bit type rounds); the generic loops below, one token at a time with a
// libm exp, serve float64.
template <typename T>
constexpr bool kOnVectors =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// ---- ppo_policy_loss ----

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ppo_policy_loss_cpu(
    const Tensor& logp, const Tensor& old_logp, const Tensor& advantages, const OptTensor& mask, double clip_low,
    double clip_high, std::optional<double> dual_clip, c10::string_view agg_name, double norm_length) {
  check_loss_inputs(logp, "logp", old_logp, "old_logp", advantages, "advantages");
  const Agg agg = agg_of(agg_name);
  TORCH_CHECK_VALUE(norm_length > 0, "rlkernels: norm_length must be > 0, got ", norm_length);
  const int64_t B = logp.size(0), T = logp.size(1);
  Tensor lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(), mask_keep;
  const uint8_t* m = mask_data(logp, "logp", mask, mask_keep);
  std::vector<Partial> rows;
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "ppo_policy_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = policy_params<acc_t>(clip_low, clip_high, dual_clip);
    const scalar_t *lp_d = lp.data_ptr<scalar_t>(), *old_d = old.data_ptr<scalar_t>(), *adv_d = adv.data_ptr<scalar_t>();
    if constexpr (kOnVectors<scalar_t>) {
      // Explicit vectors (ppo_simd.h), built per instruction set.
      const float dual = dual_clip.has_value() ? p.dual_clip : std::numeric_limits<float>::infinity();
      const simd::Kernels& kernels = simd::kernels();
      rows = reduce_rows(B, T, [&](int64_t row, int64_t t0, int64_t t1, Partial& part) {
        const int64_t at = row * T + t0;
        double s[simd::kPolicySums];
        kernels.ppo_policy_forward(simd::format_of<scalar_t>(), lp_d + at, old_d + at, adv_d + at,
                                   m == nullptr ? nullptr : m + at, t1 - t0, p.clip_lo, p.clip_hi, dual, s);
        part.loss += s[simd::kLoss];
        part.count += s[simd::kCount];
        part.clipped += s[simd::kClipped];
        part.lower += s[simd::kLower];
        part.kl += s[simd::kKl];
        part.ratio += s[simd::kRatio];
        part.take_max(s[simd::kRatioMax]);  // -inf when no token counts
      });
      return;
    }
    rows = reduce_rows(B, T, [&](int64_t row, int64_t t0, int64_t t1, Partial& part) {
      for (int64_t i = row * T + t0; i < row * T + t1; ++i) {
        if (m != nullptr && m[i] == 0) continue;  // masked tokens are never read
        const acc_t l = static_cast<acc_t>(lp_d[i]), o = static_cast<acc_t>(old_d[i]);
        const PolicyToken<acc_t> tok = policy_token<acc_t>(l, o, static_cast<acc_t>(adv_d[i]), p);
        part.loss += tok.loss;
        part.count += 1;
        part.clipped += tok.clipped;
        part.lower += tok.lower;
        part.kl += o - l;
        part.ratio += tok.ratio;
        part.take_max(tok.ratio);
      }
    });
  });
  Partial total;
  const double loss = aggregate(rows, total, agg, norm_length);
  const double ratio_max = total.count > 0 ? total.ratio_max : 0.0;
  return {scalar_out(logp, loss),
          scalar_out(logp, mean_or_zero(total.clipped, total.count)),
          scalar_out(logp, mean_or_zero(total.lower, total.count)),
          scalar_out(logp, mean_or_zero(total.kl, total.count)),
          scalar_out(logp, mean_or_zero(total.ratio, total.count)),
          scalar_out(logp, ratio_max)};
}

Tensor ppo_policy_loss_backward_cpu(const Tensor& grad_loss, const Tensor& logp, const Tensor& old_logp,
                                    const Tensor& advantages, const OptTensor& mask, double clip_low,
                                    double clip_high, std::optional<double> dual_clip, c10::string_view agg_name,
                                    double norm_length) {
  check_loss_inputs(logp, "logp", old_logp, "old_logp", advantages, "advantages");
  const Agg agg = agg_of(agg_name);
  const int64_t B = logp.size(0), T = logp.size(1);
  Tensor lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(), mask_keep;
  const uint8_t* m = mask_data(logp, "logp", mask, mask_keep);
  const std::vector<double> w = token_weights(B, T, m, agg, norm_length);
  const double g = scalar_in(grad_loss);
  Tensor grad = empty_output({B, T}, lp.options());
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "ppo_policy_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = policy_params<acc_t>(clip_low, clip_high, dual_clip);
    const scalar_t *lp_d = lp.data_ptr<scalar_t>(), *old_d = old.data_ptr<scalar_t>(), *adv_d = adv.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const float dual = dual_clip.has_value() ? static_cast<float>(p.dual_clip) : std::numeric_limits<float>::infinity();
    const simd::Kernels& kernels = simd::kernels();
    for_chunks(B, T, [&](int64_t b, int64_t t0, int64_t t1) {
      const acc_t scale = static_cast<acc_t>(g * w[b]);
      const int64_t at = b * T + t0;
      if constexpr (kOnVectors<scalar_t>) {  // explicit vectors (ppo_simd.h)
        kernels.ppo_policy_backward(simd::format_of<scalar_t>(), lp_d + at, old_d + at, adv_d + at,
                                    m == nullptr ? nullptr : m + at, t1 - t0, p.clip_lo, p.clip_hi, dual, scale,
                                    out + at);
        return;
      }
      for (int64_t i = at; i < b * T + t1; ++i) {
        acc_t d = 0;
        if (m == nullptr || m[i] != 0)
          d = scale * policy_token_grad<acc_t>(static_cast<acc_t>(lp_d[i]), static_cast<acc_t>(old_d[i]),
                                               static_cast<acc_t>(adv_d[i]), p);
        out[i] = static_cast<scalar_t>(d);
      }
    });
  });
  return grad;
}

// ---- value_loss ----

std::tuple<Tensor, Tensor> value_loss_cpu(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                                          const OptTensor& mask, std::optional<double> clip,
                                          c10::string_view agg_name) {
  check_loss_inputs(values, "values", old_values, "old_values", returns, "returns");
  TORCH_CHECK_VALUE(!clip.has_value() || *clip >= 0, "rlkernels: clip must be >= 0, got ", clip.value_or(0.0));
  const Agg agg = agg_of(agg_name);
  const int64_t B = values.size(0), T = values.size(1);
  Tensor v = values.contiguous(), old = old_values.contiguous(), ret = returns.contiguous(), mask_keep;
  const uint8_t* m = mask_data(values, "values", mask, mask_keep);
  std::vector<Partial> rows;
  RLK_DISPATCH_FLOATS(v.scalar_type(), "value_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool has_clip = clip.has_value();
    const acc_t c = static_cast<acc_t>(clip.value_or(0.0));
    const scalar_t *v_d = v.data_ptr<scalar_t>(), *old_d = old.data_ptr<scalar_t>(), *ret_d = ret.data_ptr<scalar_t>();
    if constexpr (kOnVectors<scalar_t>) {  // explicit vectors (ppo_simd.h)
      const simd::Kernels& kernels = simd::kernels();
      rows = reduce_rows(B, T, [&](int64_t row, int64_t t0, int64_t t1, Partial& part) {
        const int64_t at = row * T + t0;
        double s[simd::kValueSums];
        kernels.ppo_value_forward(simd::format_of<scalar_t>(), v_d + at, old_d + at, ret_d + at,
                                  m == nullptr ? nullptr : m + at, t1 - t0, has_clip, static_cast<float>(c), s);
        part.loss += s[simd::kValueLoss];
        part.count += s[simd::kValueCount];
        part.clipped += s[simd::kValueClipped];
      });
      return;
    }
    rows = reduce_rows(B, T, [&](int64_t row, int64_t t0, int64_t t1, Partial& part) {
      for (int64_t i = row * T + t0; i < row * T + t1; ++i) {
        if (m != nullptr && m[i] == 0) continue;
        const ValueToken<acc_t> tok = value_token<acc_t>(static_cast<acc_t>(v_d[i]), static_cast<acc_t>(old_d[i]),
                                                         static_cast<acc_t>(ret_d[i]), has_clip, c);
        part.loss += tok.loss;
        part.count += 1;
        part.clipped += tok.clipped;
      }
    });
  });
  Partial total;
  const double loss = aggregate(rows, total, agg, static_cast<double>(T));
  return {scalar_out(values, loss), scalar_out(values, mean_or_zero(total.clipped, total.count))};
}

Tensor value_loss_backward_cpu(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                               const Tensor& returns, const OptTensor& mask, std::optional<double> clip,
                               c10::string_view agg_name) {
  check_loss_inputs(values, "values", old_values, "old_values", returns, "returns");
  const Agg agg = agg_of(agg_name);
  const int64_t B = values.size(0), T = values.size(1);
  Tensor v = values.contiguous(), old = old_values.contiguous(), ret = returns.contiguous(), mask_keep;
  const uint8_t* m = mask_data(values, "values", mask, mask_keep);
  const std::vector<double> w = token_weights(B, T, m, agg, static_cast<double>(T));
  const double g = scalar_in(grad_loss);
  Tensor grad = empty_output({B, T}, v.options());
  RLK_DISPATCH_FLOATS(v.scalar_type(), "value_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool has_clip = clip.has_value();
    const acc_t c = static_cast<acc_t>(clip.value_or(0.0));
    const scalar_t *v_d = v.data_ptr<scalar_t>(), *old_d = old.data_ptr<scalar_t>(), *ret_d = ret.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const simd::Kernels& kernels = simd::kernels();
    for_chunks(B, T, [&](int64_t b, int64_t t0, int64_t t1) {
      const acc_t scale = static_cast<acc_t>(g * w[b]);
      const int64_t at = b * T + t0;
      if constexpr (kOnVectors<scalar_t>) {  // explicit vectors (ppo_simd.h)
        kernels.ppo_value_backward(simd::format_of<scalar_t>(), v_d + at, old_d + at, ret_d + at,
                                   m == nullptr ? nullptr : m + at, t1 - t0, has_clip, static_cast<float>(c),
                                   static_cast<float>(scale), out + at);
        return;
      }
      for (int64_t i = at; i < b * T + t1; ++i) {
        acc_t d = 0;
        if (m == nullptr || m[i] != 0)
          d = scale * value_token_grad<acc_t>(static_cast<acc_t>(v_d[i]), static_cast<acc_t>(old_d[i]),
                                              static_cast<acc_t>(ret_d[i]), has_clip, c);
        out[i] = static_cast<scalar_t>(d);
      }
    });
  });
  return grad;
}

// ---- kl_penalty (elementwise, any shape) ----

constexpr int64_t kElementGrain = 32768;

Tensor kl_penalty_cpu(const Tensor& logp, const Tensor& ref_logp, c10::string_view kind_name) {
  check_float(logp, "logp");
  check_input(logp, "logp", ref_logp, "ref_logp");
  const KlKind kind = kl_kind_of(kind_name);
  Tensor lp = logp.contiguous(), ref = ref_logp.contiguous();
  Tensor out = empty_output(lp.sizes(), acc_options(lp));
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "kl_penalty", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *lp_d = lp.data_ptr<scalar_t>(), *ref_d = ref.data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    const simd::Kernels& kernels = simd::kernels();
    at::parallel_for(0, lp.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      if constexpr (kOnVectors<scalar_t>) {  // explicit vectors (ppo_simd.h); acc_t is float
        kernels.ppo_kl_forward(simd::format_of<scalar_t>(), lp_d + begin, ref_d + begin, end - begin,
                               static_cast<int>(kind), reinterpret_cast<float*>(o + begin));
        return;
      }
      for (int64_t i = begin; i < end; ++i)
        o[i] = kl_token<acc_t>(static_cast<acc_t>(lp_d[i]), static_cast<acc_t>(ref_d[i]), kind);
    });
  });
  return out;
}

Tensor kl_penalty_backward_cpu(const Tensor& grad, const Tensor& logp, const Tensor& ref_logp,
                               c10::string_view kind_name) {
  check_input(logp, "logp", ref_logp, "ref_logp");
  check_same_shape(grad, "grad", logp, "logp");
  const KlKind kind = kl_kind_of(kind_name);
  Tensor lp = logp.contiguous(), ref = ref_logp.contiguous();
  Tensor out = empty_output(lp.sizes(), lp.options());
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "kl_penalty_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* g_d = g.data_ptr<acc_t>();
    const scalar_t *lp_d = lp.data_ptr<scalar_t>(), *ref_d = ref.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const simd::Kernels& kernels = simd::kernels();
    at::parallel_for(0, lp.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      if constexpr (kOnVectors<scalar_t>) {  // explicit vectors (ppo_simd.h); acc_t is float
        kernels.ppo_kl_backward(simd::format_of<scalar_t>(), reinterpret_cast<const float*>(g_d + begin),
                                lp_d + begin, ref_d + begin, end - begin, static_cast<int>(kind), o + begin);
        return;
      }
      for (int64_t i = begin; i < end; ++i)
        o[i] = static_cast<scalar_t>(
            g_d[i] * kl_token_grad<acc_t>(static_cast<acc_t>(lp_d[i]), static_cast<acc_t>(ref_d[i]), kind));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("ppo_policy_loss_backward", &ppo_policy_loss_backward_cpu);
  m.impl("value_loss", &value_loss_cpu);
  m.impl("value_loss_backward", &value_loss_backward_cpu);
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cpu);
}

}  // namespace rlkernels::cpu
