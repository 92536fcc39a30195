// CPU kernels of gather_logprobs and its backward (docs/design.md §4.3).
//
// Forward: one pass per row over the logits with an online (max, sum-exp, entropy) state, read in the
// logits' own dtype chunk by chunk into a small float buffer on the stack, so nothing of the logits' size is
// ever allocated. The state is the one a vocab-sharded or chunked-lm_head caller (§4.6) would merge:
//   m = running max of z, s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m).
// Rows are split across threads with at::parallel_for. float32 and bfloat16 logits, the hot cases, run the
// explicit-vector rows of logprobs_simd.h, built per instruction set (simd_kernels.h). float16 and float64
// (the gradcheck path) run the generic rows below, whose inner loops over kLanes partial sums are left to the
// compiler. Without no-trapping-math GCC keeps every select of those loops as a branch (a float operation in
// a select arm "may trap"); it goes before the includes, so the header functions they inline get the same
// options. The kernels never read floating-point exception flags; NaN and Inf still propagate (this is not
// -ffinite-math-only).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "alloc.h"
#include "exp_poly.h"
#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"
#include "rlkernels/logprobs_args.h"
#include "simd_kernels.h"

namespace rlkernels::cpu {
namespace {

using at::Tensor;
using namespace rlkernels::logprobs;

constexpr int64_t kLanes = 16;
// Elements per chunk of the online pass: the float buffer stays in L1, and the max of a chunk is known
// before its exps, so the running sums are rescaled once per chunk, not per element.
constexpr int64_t kChunk = 512;

// v where c holds, else +0, as a bit mask (no select for the vectorizer to refuse).
__attribute__((always_inline)) inline float keep_if(bool c, float v) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) & (0u - static_cast<uint32_t>(c)));
}
__attribute__((always_inline)) inline double keep_if(bool c, double v) {
  return std::bit_cast<double>(std::bit_cast<uint64_t>(v) & (uint64_t{0} - static_cast<uint64_t>(c)));
}

// exp(x) for float, accurate to a few ulp on the range that matters (x <= 0 here): x = n ln2 + r with
// |r| <= ln2/2 and the polynomial of exp_poly.h (the SIMD rows' exp), 2^n built in the exponent bits. Below the
// float range the result is exactly 0, so -inf logits weigh nothing; NaN propagates (every comparison with it
// is false).
__attribute__((always_inline)) inline float exp_acc(float x) {
  const float xc = std::max(x, -87.0f);  // NaN stays NaN: std::max returns its first argument then
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return keep_if(!(x < -87.0f), exp_mantissa(xc, n) * scale);
}
__attribute__((always_inline)) inline double exp_acc(double x) { return std::exp(x); }

template <typename acc_t>
struct RowState {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s0 = 0;  // sum exp(z - m)
  acc_t s1 = 0;  // sum exp(z - m) (z - m); 0 for entries with z = -inf
};

// Folds buf[0, n) (n a multiple of kLanes, padded with -inf) into the state.
template <typename acc_t, bool kEntropy>
__attribute__((always_inline)) inline void fold_chunk(RowState<acc_t>& st, const acc_t* buf, int64_t n) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t lane_max[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) lane_max[j] = kNegInf;
  for (int64_t i = 0; i < n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lane_max[j] = buf[i + j] > lane_max[j] ? buf[i + j] : lane_max[j];
  acc_t chunk_max = kNegInf;
  for (int64_t j = 0; j < kLanes; ++j) chunk_max = std::max(chunk_max, lane_max[j]);
  if (chunk_max == kNegInf) {
    // all -inf: weighs nothing (and exp(-inf - -inf) would be NaN); all -inf or NaN with a NaN: the sums are NaN
    for (int64_t i = 0; i < n; ++i)
      if (buf[i] != buf[i]) st.s0 = st.s1 = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const acc_t m = std::max(st.m, chunk_max);
  if (st.m != kNegInf && m != st.m) {  // (with no max yet the sums are 0, or NaN after a chunk of NaN)
    const acc_t shift = st.m - m;  // < 0
    const acc_t scale = std::exp(shift);
    st.s1 = scale * (st.s1 + shift * st.s0);
    st.s0 = scale * st.s0;
  }
  st.m = m;
  acc_t e0[kLanes], e1[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) e0[j] = e1[j] = 0;
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = buf[i + j] - m;
      const acc_t e = exp_acc(d);
      e0[j] += e;
      if constexpr (kEntropy) e1[j] += keep_if(e != 0, e * d);  // 0 * -inf counts as 0
    }
  }
  acc_t a0 = 0, a1 = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    a0 += e0[j];
    a1 += e1[j];
  }
  st.s0 += a0;
  st.s1 += a1;
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__attribute__((always_inline)) inline RowState<acc_t> row_state(const scalar_t* x, int64_t V, acc_t inv_t) {
  RowState<acc_t> st;
  alignas(64) acc_t buf[kChunk];
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[off + i]) * inv_t;
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = n; i < padded; ++i) buf[i] = -std::numeric_limits<acc_t>::infinity();
    fold_chunk<acc_t, kEntropy>(st, buf, padded);
  }
  return st;
}

void check_token_range(const int64_t* tok, int64_t N, int64_t V, std::optional<int64_t> ignore_index) {
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = tok[r];
    if (ignore_index.has_value() && t == *ignore_index) continue;
    TORCH_CHECK_VALUE(t >= 0 && t < V, "rlkernels.gather_logprobs: tokens must be in [0, ", V,
                      ") (or ignore_index), got ", t, " at row ", r);
  }
}

// The lse of a row holding a +inf logit: +inf, or NaN if the row also holds a NaN.
template <typename scalar_t>
float row_lse_inf(const scalar_t* row, int64_t V) {
  for (int64_t v = 0; v < V; ++v)
    if (static_cast<float>(row[v]) != static_cast<float>(row[v])) return std::numeric_limits<float>::quiet_NaN();
  return std::numeric_limits<float>::infinity();
}

// The forward over rows [begin, end): logp, lse and (ent != null) entropy.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void forward_rows(const scalar_t* x, int64_t row_stride, int64_t V,
                                                        const int64_t* tok_p, bool has_ignore, int64_t ignore,
                                                        acc_t inv_t, int64_t begin, int64_t end, acc_t* logp_p,
                                                        acc_t* ent_p, acc_t* lse_p) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = tok_p[r];
    if (has_ignore && t == ignore) {
      logp_p[r] = 0;
      lse_p[r] = 0;
      if (ent_p) ent_p[r] = 0;
      continue;
    }
    const scalar_t* row = x + r * row_stride;
    const auto st = ent_p ? row_state<scalar_t, acc_t, true>(row, V, inv_t) : row_state<scalar_t, acc_t, false>(row, V, inv_t);
    const acc_t log_s0 = std::log(st.s0);
    acc_t l = st.m + log_s0;  // all -inf: -inf + log 0 = -inf, so logp = NaN as in the reference
    // A +inf logit: lse = +inf (logp = -inf for a finite logit, NaN for a +inf one), unless a NaN is in the row
    // (docs/design.md §4.3). exp(inf - inf) made the sums NaN; this row is rare, so it is read again.
    if (st.m == std::numeric_limits<acc_t>::infinity()) l = row_lse_inf(row, V);
    lse_p[r] = l;
    acc_t zt = static_cast<acc_t>(row[t]) * inv_t;
#if defined(__x86_64__) && defined(__GNUC__)
    // The product rounded as the folded buffer holds it: contracted into an FMA with the subtraction below,
    // its exact value minus the rounded lse leaves a residual (a V = 1 row would give logp != 0).
    asm("" : "+x"(zt));
#endif
    logp_p[r] = zt - l;
    // H = lse - sum p z = log s0 - s1 / s0 (z shifted by m, so no cancellation for logits of 1e4)
    if (ent_p) ent_p[r] = log_s0 - st.s1 / st.s0;
  }
}

std::tuple<Tensor, Tensor, Tensor> gather_logprobs_cpu(const Tensor& logits, const Tensor& tokens,
                                                       double temperature, bool return_entropy,
                                                       std::optional<int64_t> ignore_index, bool inplace_backward) {
  (void)inplace_backward;  // read by the autograd formula only
  check_gather_logprobs(logits, tokens, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = acc_options(logits);
  Tensor logp = at::empty({N}, opts);
  Tensor entropy = at::empty({return_entropy ? N : 0}, opts);
  Tensor lse = at::empty({N}, opts);
  if (N == 0) return {logp, entropy, lse};
  const Tensor tok = tokens.contiguous();
  const int64_t* tok_p = tok.data_ptr<int64_t>();
  check_token_range(tok_p, N, V, ignore_index);
  const int64_t row_stride = logits.stride(0);
  RLK_DISPATCH_FLOATS(logits.scalar_type(), "gather_logprobs_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* logp_p = logp.data_ptr<acc_t>();
    acc_t* ent_p = return_entropy ? entropy.data_ptr<acc_t>() : nullptr;
    acc_t* lse_p = lse.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    // ~V exps per row: a grain of a few rows keeps threads busy even for short vocabularies.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
    const bool has_ignore = ignore_index.has_value();
    const int64_t ignore = ignore_index.value_or(0);
    const simd::Kernels& kernels = simd::kernels();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      // The dispatch lambda is not a template: every dtype compiles these calls, only float32 and bfloat16
      // reach them.
      if (std::is_same_v<scalar_t, float>) {
        kernels.logprob_rows_f32(reinterpret_cast<const float*>(x), row_stride, V, tok_p, has_ignore, ignore,
                                 static_cast<float>(inv_t), begin, end, reinterpret_cast<float*>(logp_p),
                                 reinterpret_cast<float*>(ent_p), reinterpret_cast<float*>(lse_p));
      } else if (std::is_same_v<scalar_t, c10::BFloat16>) {
        kernels.logprob_rows_bf16(reinterpret_cast<const uint16_t*>(x), row_stride, V, tok_p, has_ignore, ignore,
                                  static_cast<float>(inv_t), begin, end, reinterpret_cast<float*>(logp_p),
                                  reinterpret_cast<float*>(ent_p), reinterpret_cast<float*>(lse_p));
      } else {
        forward_rows<scalar_t, acc_t>(x, row_stride, V, tok_p, has_ignore, ignore, inv_t, begin, end, logp_p,
                                      ent_p, lse_p);
      }
    });
  });
  return {logp, entropy, lse};
}

// d z_v = g_logp (onehot_v - p_v) - g_H p_v (z_v - lse + H);  d logits = d z / T; written in the logits'
// dtype into `out` (which may be the logits themselves: each element is read before it is written).
template <typename scalar_t, typename acc_t>
void backward_rows(const Tensor& logits, const Tensor& out, const OptTensor& grad_logp, const OptTensor& grad_entropy,
                   const Tensor& tokens, const Tensor& lse, const Tensor& entropy, double temperature,
                   std::optional<int64_t> ignore_index) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  const int64_t xs = logits.stride(0), ys = out.stride(0);
  const Tensor gl = grad_logp.has_value() && grad_logp->defined() ? grad_logp->to(lse.scalar_type()).contiguous()
                                                                   : Tensor();
  const bool use_h = grad_entropy.has_value() && grad_entropy->defined() && entropy.numel() == N;
  const Tensor gh = use_h ? grad_entropy->to(lse.scalar_type()).contiguous() : Tensor();
  const acc_t* gl_p = gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr;
  const acc_t* gh_p = use_h ? gh.const_data_ptr<acc_t>() : nullptr;
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* ent_p = use_h ? entropy.const_data_ptr<acc_t>() : nullptr;
  const int64_t* tok_p = tokens.const_data_ptr<int64_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  const simd::Kernels& kernels = simd::kernels();
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* yr = y + r * ys;
      const scalar_t* xr = x + r * xs;
      const int64_t t = tok_p[r];
      if (ignore_index.has_value() && t == *ignore_index) {
        for (int64_t v = 0; v < V; ++v) yr[v] = scalar_t(0);
        continue;
      }
      const acc_t g_lp = gl_p ? gl_p[r] : acc_t(0);
      const acc_t l = lse_p[r];
      const acc_t z_t = static_cast<acc_t>(xr[t]) * inv_t;  // read before the row may be overwritten
      const acc_t a = g_lp * inv_t;
      const acc_t b = gh_p ? gh_p[r] * inv_t : acc_t(0);
      const acc_t c = gh_p ? ent_p[r] - l : acc_t(0);
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
        // Explicit vectors (logprobs_simd.h); the row is rewritten whole, its target fixed below.
        const float fa = static_cast<float>(a), fb = static_cast<float>(b), fc = static_cast<float>(c);
        if constexpr (std::is_same_v<scalar_t, float>)
          kernels.logprob_grad_row_f32(xr, yr, V, static_cast<float>(inv_t), static_cast<float>(l), fa, gh_p != nullptr,
                                       fb, fc);
        else
          kernels.logprob_grad_row_bf16(reinterpret_cast<const uint16_t*>(xr), reinterpret_cast<uint16_t*>(yr), V,
                                        static_cast<float>(inv_t), static_cast<float>(l), fa, gh_p != nullptr, fb, fc);
      } else {
      // Chunks through a stack buffer: plain loops over it vectorize, and the conversions to and from
      // 16-bit types stay in their own loops.
      alignas(64) acc_t buf[kChunk];
      for (int64_t off = 0; off < V; off += kChunk) {
        const int64_t n = std::min(kChunk, V - off);
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(xr[off + i]) * inv_t;
        if (gh_p) {
          for (int64_t i = 0; i < n; ++i) {
            const acc_t z = buf[i];
            const acc_t p = exp_acc(z - l);
            buf[i] = -a * p - b * keep_if(p != 0, p * (z + c));  // p = 0 where z = -inf: no entropy term
          }
        } else {
          for (int64_t i = 0; i < n; ++i) buf[i] = -a * exp_acc(buf[i] - l);
        }
        for (int64_t i = 0; i < n; ++i) yr[off + i] = static_cast<scalar_t>(buf[i]);
      }
      }
      // The target's one-hot term, from its value read above.
      const acc_t p_t = exp_acc(z_t - l);
      acc_t g_t = a * (1 - p_t);
      if (gh_p) g_t -= gh_p[r] * inv_t * (p_t == 0 ? acc_t(0) : p_t * (z_t + ent_p[r] - l));
      yr[t] = static_cast<scalar_t>(g_t);
    }
  });
}

void backward_into(const OptTensor& grad_logp, const OptTensor& grad_entropy, const Tensor& logits,
                   const Tensor& out, const Tensor& tokens, const Tensor& lse, const Tensor& entropy,
                   double temperature, std::optional<int64_t> ignore_index) {
  check_gather_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature);
  if (logits.size(0) == 0 || logits.size(1) == 0) return;
  const Tensor tok = tokens.contiguous();
  check_token_range(tok.const_data_ptr<int64_t>(), logits.size(0), logits.size(1), ignore_index);
  const auto acc = acc_type_of(logits.scalar_type());
  RLK_DISPATCH_FLOATS(logits.scalar_type(), "gather_logprobs_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    backward_rows<scalar_t, acc_t>(logits, out, grad_logp, grad_entropy, tok, lse.to(acc).contiguous(),
                                   entropy.to(acc).contiguous(), temperature, ignore_index);
  });
}

Tensor gather_logprobs_backward_cpu(const OptTensor& grad_logp, const OptTensor& grad_entropy, const Tensor& logits,
                                    const Tensor& tokens, const Tensor& lse, const Tensor& entropy,
                                    double temperature, std::optional<int64_t> ignore_index) {
  // The gradient is the logits' size: a fresh one page-faults on every 4 KiB at its first write, which cost
  // about as much as the kernel; the output cache (alloc.h) maps it on huge pages and reuses it.
  Tensor out = empty_output(logits.sizes(), logits.options());
  backward_into(grad_logp, grad_entropy, logits, out, tokens, lse, entropy, temperature, ignore_index);
  return out;
}

void gather_logprobs_backward_inplace_cpu(const OptTensor& grad_logp, const OptTensor& grad_entropy,
                                          const Tensor& logits, const Tensor& tokens, const Tensor& lse,
                                          const Tensor& entropy, double temperature,
                                          std::optional<int64_t> ignore_index) {
  check_writable_rows(logits);
  backward_into(grad_logp, grad_entropy, logits, logits, tokens, lse, entropy, temperature, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("gather_logprobs", &gather_logprobs_cpu);
  m.impl("gather_logprobs_backward", &gather_logprobs_backward_cpu);
  m.impl("gather_logprobs_backward_inplace", &gather_logprobs_backward_inplace_cpu);
}

}  // namespace rlkernels::cpu
