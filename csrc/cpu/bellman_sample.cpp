// CPU kernels of the sample-based Bellman ops (docs/design.md §4.5): q_targets and td_loss (+ backward). The
// CUDA twin is csrc/cuda/bellman_sample.cu.
//
// td_loss's mean and sum run over a fixed grid of row chunks combined in order, so results are bit-identical
// for any number of threads.
#include "bellman_common.h"  // first: its pragma applies to everything below

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_kernels.h"

namespace rlkernels::cpu {
namespace {

using at::Tensor;
using namespace rlkernels::bellman;

constexpr int64_t kRowChunk = 4096;
// Rows whose gathered Q (its line: a row of q may span two) is requested this far ahead of the row-by-row
// gathers of td_loss: without it the gathers ran with little memory parallelism, at 4x the time of torch.gather
// on the same rows.
constexpr int64_t kAhead = 32;
// Rows per block of q_rows_f32_wide (bellman_simd.h): the 16-bit path widens at most this many rows at a time.
constexpr int64_t kQBlock = 64;

// ------------------------------------------------------------------------------------------------------
// q_targets
// ------------------------------------------------------------------------------------------------------

template <typename scalar_t>
void q_targets_16bit(const scalar_t* r, const scalar_t* q, const bool* term, const scalar_t* online,
                     const scalar_t* probs, int64_t B, int64_t A, QKind kind, double discount, double temp,
                     float* out) {
  // Rows per block: their widened copies (q, and online or probs) stay within ~32 KB.
  const int64_t rows = std::clamp<int64_t>(4096 / A, 1, kQBlock);
  const scalar_t* extra = kind == QKind::kDouble ? online : (kind == QKind::kExpected ? probs : nullptr);
  const simd::Kernels& kernels = simd::kernels();
  // float32 copies of 16-bit values: the float32 row kernels then run on blocks of widened rows (the generic
  // rows below, one scalar at a time, were no faster than eager torch on bfloat16 and 3x slower on float16).
  const auto widen = [&](const scalar_t* x, int64_t n, float* y) { simd::widen(kernels, x, n, y); };
  at::parallel_for(0, B, 1024, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(rows * (A * (extra != nullptr ? 2 : 1) + 1)));
    float* rb = buf.data();
    float* qb = rb + rows;
    float* xb = qb + rows * A;
    for (int64_t c = b0; c < b1; c += rows) {
      const int64_t n = std::min(b1, c + rows) - c;
      widen(r + c, n, rb);
      widen(q + c * A, n * A, qb);
      if (extra != nullptr) widen(extra + c * A, n * A, xb);
      (A >= 8 ? kernels.q_rows_f32_wide : kernels.q_rows_f32)(rb, qb, term != nullptr ? term + c : nullptr,
                                               kind == QKind::kDouble ? xb : nullptr,
                                               kind == QKind::kExpected ? xb : nullptr, 0, n, A,
                                               static_cast<int>(kind), static_cast<float>(discount),
                                               static_cast<float>(temp), out + c);
    }
  });
}

template <typename scalar_t>
void q_targets_rows(const scalar_t* r, const scalar_t* q, const bool* term, const scalar_t* online,
                    const scalar_t* probs, int64_t B, int64_t A, QKind kind, double discount_d, double temp_d,
                    acc_of<scalar_t>* out) {
  using acc_t = acc_of<scalar_t>;
  const acc_t discount = static_cast<acc_t>(discount_d), temp = static_cast<acc_t>(temp_d);
  at::parallel_for(0, B, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = q + b * A;
      acc_t v;
      switch (kind) {
        case QKind::kMax: {
          v = -std::numeric_limits<acc_t>::infinity();
          for (int64_t a = 0; a < A; ++a) v = nan_max(v, static_cast<acc_t>(row[a]));
          break;
        }
        case QKind::kDouble: {
          const scalar_t* on = online + b * A;
          acc_t best = static_cast<acc_t>(on[0]);
          int64_t arg = 0;
          for (int64_t a = 1; a < A; ++a) {
            const acc_t x = static_cast<acc_t>(on[a]);
            if (takes_argmax(best, x)) best = x, arg = a;
          }
          v = static_cast<acc_t>(row[arg]);
          break;
        }
        case QKind::kExpected: {
          const scalar_t* p = probs + b * A;
          v = 0;
          for (int64_t a = 0; a < A; ++a) v += static_cast<acc_t>(p[a]) * static_cast<acc_t>(row[a]);
          break;
        }
        default: {
          SoftState<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
          for (int64_t a = 0; a < A; ++a) soft_add(st, static_cast<acc_t>(row[a]) / temp);
          v = soft_value(st, temp);
        }
      }
      out[b] = q_target(static_cast<acc_t>(r[b]), term != nullptr && term[b], discount, v);
    }
  });
}

Tensor q_targets_cpu(const Tensor& rewards, const Tensor& next_q, const OptTensor& terminated,
                     const OptTensor& next_q_online, const OptTensor& next_probs, double discount,
                     std::string_view kind_name, double temperature) {
  const QKind kind = q_kind_of(kind_name);
  check_q_targets(rewards, next_q, next_q_online, next_probs, kind, temperature);
  const int64_t B = next_q.size(0), A = next_q.size(1);
  Tensor keep_term, q = next_q.contiguous(), r = rewards.contiguous(), online, probs;
  const bool* term = flag_data(terminated, "terminated", next_q, "next_q", {B}, keep_term);
  if (kind == QKind::kDouble) online = next_q_online->contiguous();
  if (kind == QKind::kExpected) probs = next_probs->contiguous();
  Tensor out = at::empty({B}, acc_options(next_q));
  if (q.scalar_type() == at::kFloat) {
    const float *rp = r.data_ptr<float>(), *qp = q.data_ptr<float>();
    const float* on = online.defined() ? online.data_ptr<float>() : nullptr;
    const float* pr = probs.defined() ? probs.data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
      const simd::Kernels& kernels = simd::kernels();
      (A >= 8 ? kernels.q_rows_f32_wide : kernels.q_rows_f32)(rp, qp, term, on, pr, b0, b1, A, static_cast<int>(kind),
                                               static_cast<float>(discount), static_cast<float>(temperature), op);
    });
    return out;
  }
  if (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "q_targets", [&] {
      q_targets_16bit<scalar_t>(r.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), term,
                                online.defined() ? online.data_ptr<scalar_t>() : nullptr,
                                probs.defined() ? probs.data_ptr<scalar_t>() : nullptr, B, A, kind, discount,
                                temperature, out.data_ptr<float>());
    });
    return out;
  }
  RLK_DISPATCH_FLOATS(q.scalar_type(), "q_targets", [&] {
    q_targets_rows<scalar_t>(r.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), term,
                             online.defined() ? online.data_ptr<scalar_t>() : nullptr,
                             probs.defined() ? probs.data_ptr<scalar_t>() : nullptr, B, A, kind, discount,
                             temperature, out.data_ptr<acc_of<scalar_t>>());
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------
// td_loss
// ------------------------------------------------------------------------------------------------------

struct TdArgs {
  TdLoss kind;
  Reduction reduction;
  double delta;
};

// Fails naming the first out-of-range action, given each chunk's first (-1 if none), chunks in row order.
void report_bad_action(const std::vector<int64_t>& bad, const int64_t* act, int64_t A) {
  for (const int64_t b : bad)
    TORCH_CHECK_VALUE(b < 0, "rlkernels: actions must be in [0, ", A, "), got actions[", b, "] = ", act[b]);
}

// The same for any dtype: gather_errors_f32 for float32, else this loop.
template <typename scalar_t, typename acc_t>
int64_t gather_errors(const scalar_t* q, const int64_t* act, const scalar_t* y, int64_t n, int64_t A, acc_t* e) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return simd::kernels().gather_errors_f32(q, act, y, n, A, e);
  } else {
    int64_t bad = -1;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ahead = std::min(i + kAhead, n - 1);
      __builtin_prefetch(q + gathered_offset(ahead, act[ahead], A));
      int64_t a = act[i];
      if (static_cast<uint64_t>(a) >= static_cast<uint64_t>(A)) {  // checked here, not in a pass of its own
        if (bad < 0) bad = i;
        a = 0;
      }
      e[i] = static_cast<acc_t>(y[i]) - static_cast<acc_t>(q[i * A + a]);
    }
    return bad;
  }
}

// The losses of one chunk: td_losses_f32 for float32; elsewhere branch-free scalars summed into 4
// independent double accumulators (one chain of dependent double adds limited the loop), in a fixed order.
template <typename scalar_t, typename acc_t>
double chunk_losses(const acc_t* e, const scalar_t* w, acc_t* per, int64_t n, TdLoss kind, acc_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return simd::kernels().td_losses_f32(e, w, per, n, kind == TdLoss::kHuber, d);
  } else {
    double s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) {
        acc_t l = td_sample_loss(e[i + k], kind, d);
        if (w != nullptr) l *= static_cast<acc_t>(w[i + k]);
        if (per != nullptr) per[i + k] = l;
        s[k] += static_cast<double>(l);
      }
    }
    for (; i < n; ++i) {
      acc_t l = td_sample_loss(e[i], kind, d);
      if (w != nullptr) l *= static_cast<acc_t>(w[i]);
      if (per != nullptr) per[i] = l;
      s[0] += static_cast<double>(l);
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
  }
}

std::tuple<Tensor, Tensor> td_loss_cpu(const Tensor& q_in, const Tensor& actions_in, const Tensor& targets_in,
                                       const OptTensor& weights_in, std::string_view loss, double delta,
                                       std::string_view reduction) {
  const TdArgs args{td_kind_of(loss), reduction_of(reduction), delta};
  check_td(q_in, actions_in, targets_in, weights_in);
  TORCH_CHECK_VALUE(args.kind != TdLoss::kHuber || delta > 0, "rlkernels: delta must be > 0, got ", delta);
  const Tensor q = q_in.contiguous(), actions = actions_in.contiguous(), targets = targets_in.contiguous();
  const Tensor weights = given(weights_in) ? weights_in->contiguous() : Tensor();
  const int64_t B = q.size(0), A = q.size(1);
  const int64_t* act = actions.data_ptr<int64_t>();
  const auto acc_type = acc_type_of(q.scalar_type());
  Tensor td = at::empty({B}, q.options().dtype(acc_type));
  Tensor per = args.reduction == Reduction::kNone ? at::empty({B}, q.options().dtype(acc_type)) : Tensor();
  double total = 0;
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  std::vector<int64_t> bad(chunks, -1);  // per chunk, its first out-of-range action
  RLK_DISPATCH_FLOATS(q.scalar_type(), "td_loss", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* y = targets.data_ptr<scalar_t>();
    const scalar_t* w = weights.defined() ? weights.data_ptr<scalar_t>() : nullptr;
    acc_t* e_out = td.data_ptr<acc_t>();
    acc_t* per_out = per.defined() ? per.data_ptr<acc_t>() : nullptr;
    const acc_t d = static_cast<acc_t>(delta);
    std::vector<double> sums(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kRowChunk, end = std::min(B, begin + kRowChunk);
        // The gather first (one Q per row), then the losses over the chunk (chunk_losses: branch-free, and a
        // fixed summation order, so results do not depend on the thread count).
        const int64_t first_bad = gather_errors(qp + begin * A, act + begin, y + begin, end - begin, A,
                                                e_out + begin);
        if (first_bad >= 0) bad[c] = begin + first_bad;
        sums[c] = chunk_losses(e_out + begin, w == nullptr ? nullptr : w + begin,
                               per_out == nullptr ? nullptr : per_out + begin, end - begin, args.kind, d);
      }
    });
    for (double s : sums) total += s;
  });
  report_bad_action(bad, act, A);
  if (args.reduction == Reduction::kNone) return {per, td};
  if (args.reduction == Reduction::kMean) total = B > 0 ? total / static_cast<double>(B) : 0.0;
  Tensor out = at::empty({}, q.options().dtype(acc_type));
  if (acc_type == at::kDouble)
    *out.data_ptr<double>() = total;
  else
    *out.data_ptr<float>() = static_cast<float>(total);
  return {out, td};
}

// The same for any dtype: td_grads_f32 for float32, else these scalar rows.
template <typename scalar_t, typename acc_t>
void td_grads(const acc_t* e, const scalar_t* w, bool has_gl, const acc_t* gl, acc_t shared, const acc_t* gt,
              int64_t n, TdLoss kind, acc_t d, acc_t* g) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    simd::kernels().td_grads_f32(e, w, has_gl, gl, shared, gt, n, kind == TdLoss::kHuber, d, g);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      acc_t r = 0;
      if (has_gl) {
        acc_t gw = gl != nullptr ? gl[i] : shared;
        if (w != nullptr) gw *= static_cast<acc_t>(w[i]);
        r = gw * td_sample_grad(e[i], kind, d);
      }
      if (gt != nullptr) r += gt[i];
      g[i] = r;
    }
  }
}

// Rows per step of the backward: their errors and gradient factors fit in a few KB and their rows of grad_q
// (zeroed, then the one non-zero each) stay in L1/L2 between the two writes.
constexpr int64_t kGradRows = 256;

// n rows of grad_q (zeroed, then the one non-zero per row: -g, as e = y - q) and of grad_targets (g); returns the
// first row whose action is out of range (its row left zero), or -1. Zeroed ~1 KB at a time, each piece's
// non-zeros placed right after it: libc zeroes a piece that small with vector stores, which leave its lines in
// L1 for the placements, where one memset of the whole block (rep stosb) left every placement a miss (about
// 1.3x slower at B = 65536, A = 18).
template <typename scalar_t, typename acc_t>
int64_t place_grads(scalar_t* __restrict rows, const int64_t* __restrict act, const acc_t* __restrict g,
                    int64_t n, int64_t A, scalar_t* __restrict gy) {
  const int64_t piece = std::max<int64_t>(1, 1024 / (A * static_cast<int64_t>(sizeof(scalar_t))));
  int64_t bad = -1;
  for (int64_t i0 = 0; i0 < n; i0 += piece) {
    const int64_t i1 = std::min(n, i0 + piece);
    std::memset(static_cast<void*>(rows + i0 * A), 0, sizeof(scalar_t) * (i1 - i0) * A);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t a = act[i];
      if (static_cast<uint64_t>(a) >= static_cast<uint64_t>(A)) {
        if (bad < 0) bad = i;
        continue;
      }
      rows[i * A + a] = static_cast<scalar_t>(-g[i]);
      gy[i] = static_cast<scalar_t>(g[i]);
    }
  }
  return bad;
}

// grad_q and grad_targets from the per-row errors e = targets - q[b, actions[b]]: the td_errors the forward
// returned when the caller passes them, so q is not read again; else gathered from q here (the autograd
// formula passes none: a caller may have modified them in place, as priority updates do).
std::tuple<Tensor, Tensor> td_loss_backward_cpu(const OptTensor& grad_loss, const OptTensor& grad_td,
                                                const Tensor& q_in, const Tensor& actions_in,
                                                const Tensor& targets_in, const OptTensor& weights_in,
                                                std::string_view loss, double delta, std::string_view reduction,
                                                const OptTensor& td_errors) {
  const TdArgs args{td_kind_of(loss), reduction_of(reduction), delta};
  check_td(q_in, actions_in, targets_in, weights_in);
  const Tensor q = q_in.contiguous(), actions = actions_in.contiguous(), targets = targets_in.contiguous();
  const Tensor weights = given(weights_in) ? weights_in->contiguous() : Tensor();
  const int64_t B = q.size(0), A = q.size(1);
  const int64_t* act = actions.data_ptr<int64_t>();
  const bool per_sample = args.reduction == Reduction::kNone;
  const auto acc_type = acc_type_of(q.scalar_type());
  // Per-row upstream gradients in the accumulation type: float32 values widened to double and back, as
  // before, are unchanged; the mean's 1/B is applied in double to the one shared value.
  check_td_grads(grad_loss, grad_td, q, per_sample);
  Tensor gl, gt, e_saved;
  // (A reduced loss's one gradient is read as a double by item(), without a tensor of its own.)
  if (given(grad_loss) && per_sample) gl = grad_loss->to(acc_type).contiguous();
  if (given(grad_td)) gt = grad_td->to(acc_type).contiguous();
  if (given(td_errors)) {
    TORCH_CHECK_VALUE(td_errors->numel() == B, "rlkernels: td_errors must have ", B, " elements, got ",
                      td_errors->sizes());
    e_saved = td_errors->to(acc_type).contiguous();
  }
  const double scale = args.reduction == Reduction::kMean ? (B > 0 ? 1.0 / static_cast<double>(B) : 0.0) : 1.0;
  const bool has_gl = given(grad_loss);
  const double shared_d = has_gl && !per_sample ? grad_loss->item<double>() * scale : 0.0;
  Tensor grad_q = empty_output({B, A}, q.options());  // (huge pages when large: alloc.h)
  Tensor grad_targets = at::empty({B}, targets.options());
  const int64_t blocks = (B + kGradRows - 1) / kGradRows;
  std::vector<int64_t> bad(blocks, -1);
  RLK_DISPATCH_FLOATS(q.scalar_type(), "td_loss_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* y = targets.data_ptr<scalar_t>();
    const scalar_t* w = weights.defined() ? weights.data_ptr<scalar_t>() : nullptr;
    const acc_t* glp = has_gl && per_sample ? gl.data_ptr<acc_t>() : nullptr;
    const acc_t* gtp = gt.defined() ? gt.data_ptr<acc_t>() : nullptr;
    const acc_t* ep = e_saved.defined() ? e_saved.data_ptr<acc_t>() : nullptr;
    const acc_t shared = static_cast<acc_t>(shared_d);
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gy = grad_targets.data_ptr<scalar_t>();
    const acc_t d = static_cast<acc_t>(delta);
    const TdLoss kind = args.kind;
    int64_t* bad_at = bad.data();
    at::parallel_for(0, blocks, 4, [=](int64_t k0, int64_t k1) {
      // (Captured by value: locals the stores below cannot alias, so they stay in registers.)
      acc_t e_buf[kGradRows], g_buf[kGradRows];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t begin = k * kGradRows, n = std::min(B, begin + kGradRows) - begin;
        const int64_t* ak = act + begin;
        const acc_t* e = ep != nullptr ? ep + begin : e_buf;
        if (ep == nullptr) {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t ahead = std::min(begin + i + kAhead, B - 1);
            __builtin_prefetch(qp + gathered_offset(ahead, act[ahead], A));
            e_buf[i] = static_cast<acc_t>(y[begin + i]) - static_cast<acc_t>(qp[gathered_offset(begin + i, ak[i], A)]);
          }
        }
        const scalar_t* wk = w != nullptr ? w + begin : nullptr;
        const acc_t* glk = glp != nullptr ? glp + begin : nullptr;
        const acc_t* gtk = gtp != nullptr ? gtp + begin : nullptr;
        td_grads(e, wk, has_gl, glk, shared, gtk, n, kind, d, g_buf);
        const int64_t first_bad = place_grads(gq + begin * A, ak, g_buf, n, A, gy + begin);
        if (first_bad >= 0) bad_at[k] = begin + first_bad;
      }
    });
  });
  report_bad_action(bad, act, A);
  return {grad_q, grad_targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("q_targets", &q_targets_cpu);
  m.impl("td_loss", &td_loss_cpu);
  m.impl("td_loss_backward", &td_loss_backward_cpu);
}

}  // namespace rlkernels::cpu
