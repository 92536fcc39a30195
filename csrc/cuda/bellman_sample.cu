// CUDA kernels of the sample-based Bellman ops (docs/design.md §4.5): q_targets, td_loss and td_loss_backward.
// Signatures, dtypes and semantics are those of csrc/cpu/bellman_sample.cpp; the per-element math is the shared
// csrc/include/rlkernels/bellman.h.
//
// Kernel layout:
//  * q_targets: a group of G lanes per row of next_q, G = the smallest power of two >= A, at most 32 (a
//    warp per row for A = 18, a thread per row for A = 1, eight rows per warp for A = 4). Lanes read the
//    row strided by G (coalesced) and combine with a butterfly of shuffles: max (NaN sticks), argmax (NaN
//    counts as the maximum, first index on ties: an exact total order, so the result is the CPU's), the
//    expected-value sum, or the online (max, sum-exp) state of logsumexp.
//  * td_loss: a thread per row gathers q[b, actions[b]]; "mean"/"sum" add the per-sample losses in double
//    (as the CPU does): each block reduces its rows with a fixed shared-memory tree into a partial, then a
//    one-block kernel adds the partials in a fixed order. No atomics: bit-identical run to run.
//  * td_loss_backward: a thread per element of the dense grad_q [B, A], so the row writes are coalesced;
//    the element on the taken action holds -g, the others 0; the a = 0 thread of a row also writes
//    grad_targets[b] = g.
//
// Differences from the CPU ops, forced by "no host synchronization" (docs/design.md §2): actions are not read on
// the host. An action outside [0, A) fires a device-side assert (CUDA_KERNEL_ASSERT) and, where asserts are
// compiled out, gives NaN for that row's td_error, loss and gradients instead of reading out of bounds.
#include "bellman_common.cuh"

#include <algorithm>
#include <climits>

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda_bellman {
namespace {

// ------------------------------------------------------------------------------------------------------
// q_targets
// ------------------------------------------------------------------------------------------------------

// Is (x, xi) ahead of (best, bi) in argmax order? NaN first, then larger values, then the smaller index;
// bi = INT_MAX marks an empty state. A strict total order, so the butterfly gives the sequential answer.
template <typename acc_t>
__device__ __forceinline__ bool argmax_ahead(acc_t x, int xi, acc_t best, int bi) {
  if (xi == INT_MAX) return false;
  if (bi == INT_MAX) return true;
  const bool xn = x != x, bn = best != best;
  if (xn != bn) return xn;
  if (!xn && x != best) return x > best;
  return xi < bi;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    q_targets_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ next_q,
                     const uint8_t* __restrict__ term, const scalar_t* __restrict__ online,
                     const scalar_t* __restrict__ probs, int64_t B, int64_t A, int G, QKind kind,
                     acc_of<scalar_t> discount, acc_of<scalar_t> temperature, acc_of<scalar_t>* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  const int rows_per_block = kThreads / G;
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int64_t group = threadIdx.x / G;
  // The loop bound is uniform over the block: every lane reaches every shuffle.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < B;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t b = base + group;
    const bool valid = b < B;
    const int64_t row = (valid ? b : 0) * A;
    acc_t v = 0;
    switch (kind) {
      case QKind::kMax: {
        acc_t m = acc_t(-INFINITY);
        if (valid)
          for (int64_t a = lane; a < A; a += G) m = nan_max(m, static_cast<acc_t>(next_q[row + a]));
        for (int off = G / 2; off > 0; off /= 2) m = nan_max(m, shfl_xor(m, off, G));
        v = m;
        break;
      }
      case QKind::kDouble: {
        acc_t best = acc_t(-INFINITY);
        int arg = INT_MAX;
        if (valid)
          for (int64_t a = lane; a < A; a += G) {
            const acc_t x = static_cast<acc_t>(online[row + a]);
            if (argmax_ahead(x, static_cast<int>(a), best, arg)) best = x, arg = static_cast<int>(a);
          }
        for (int off = G / 2; off > 0; off /= 2) {
          const acc_t ob = shfl_xor(best, off, G);
          const int oa = shfl_xor(arg, off, G);
          if (argmax_ahead(ob, oa, best, arg)) best = ob, arg = oa;
        }
        if (valid && lane == 0) v = static_cast<acc_t>(next_q[row + arg]);  // A >= 1: arg is a real index
        break;
      }
      case QKind::kExpected: {
        acc_t s = 0;
        if (valid)
          for (int64_t a = lane; a < A; a += G)
            s += static_cast<acc_t>(probs[row + a]) * static_cast<acc_t>(next_q[row + a]);
        for (int off = G / 2; off > 0; off /= 2) s += shfl_xor(s, off, G);
        v = s;
        break;
      }
      default: {
        SoftState<acc_t> st{acc_t(-INFINITY), acc_t(0)};
        if (valid)
          for (int64_t a = lane; a < A; a += G) soft_add(st, static_cast<acc_t>(next_q[row + a]) / temperature);
        for (int off = G / 2; off > 0; off /= 2) {
          const SoftState<acc_t> other{shfl_xor(st.m, off, G), shfl_xor(st.s, off, G)};
          st = soft_merge(st, other);
        }
        v = soft_value(st, temperature);
      }
    }
    if (valid && lane == 0)
      out[b] = q_target(static_cast<acc_t>(rewards[b]), term != nullptr && term[b] != 0, discount, v);
  }
}

Tensor q_targets_cuda(const Tensor& rewards, const Tensor& next_q, const OptTensor& terminated,
                      const OptTensor& next_q_online, const OptTensor& next_probs, double discount,
                      std::string_view kind_name, double temperature) {
  const QKind kind = q_kind_of(kind_name);
  check_cuda(next_q, "next_q");
  check_q_targets(rewards, next_q, next_q_online, next_probs, kind, temperature);
  const int64_t B = next_q.size(0), A = next_q.size(1);
  TORCH_CHECK_VALUE(A < INT_MAX, "rlkernels: next_q has too many actions for the CUDA kernel: ", A);
  const c10::cuda::CUDAGuard guard(next_q.device());
  Tensor keep_term, q = next_q.contiguous(), r = rewards.contiguous(), online, probs;
  const uint8_t* term = flag_data(terminated, "terminated", next_q, "next_q", {B}, keep_term);
  if (kind == QKind::kDouble) online = next_q_online->contiguous();
  if (kind == QKind::kExpected) probs = next_probs->contiguous();
  Tensor out = at::empty({B}, acc_options(next_q));
  if (B == 0) return out;
  const int G = group_width(A);
  RLK_DISPATCH_FLOATS(q.scalar_type(), "q_targets_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    q_targets_kernel<scalar_t><<<grid_for(B, kThreads / G), kThreads, 0, current_stream()>>>(
        r.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), term,
        online.defined() ? online.const_data_ptr<scalar_t>() : nullptr,
        probs.defined() ? probs.const_data_ptr<scalar_t>() : nullptr, B, A, G, kind, static_cast<acc_t>(discount),
        static_cast<acc_t>(temperature), out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------
// td_loss
// ------------------------------------------------------------------------------------------------------

constexpr int kMaxPartials = 1024;  // blocks of the reducing td_loss kernel (a grid-stride loop beyond)
constexpr int kRowsPerThread = 4;   // rows each thread adds before the block tree, at full grids

// check_td (bellman_args.h) on CUDA tensors, and the one range check that needs no device values: with no
// actions at all, no action is in range.
void check_td_cuda(const Tensor& q, const Tensor& actions, const Tensor& targets, const OptTensor& weights) {
  check_cuda(q, "q");
  check_td(q, actions, targets, weights);
  TORCH_CHECK_VALUE(q.size(0) == 0 || q.size(1) >= 1, "rlkernels: actions must be in [0, ", q.size(1),
                    "), but q has no actions");
}

// e = targets[b] - q[b, actions[b]], NaN (after a device assert) for an action outside [0, A).
template <typename scalar_t>
__device__ __forceinline__ acc_of<scalar_t> td_error(const scalar_t* __restrict__ q, const int64_t* __restrict__ act,
                                                     const scalar_t* __restrict__ y, int64_t b, int64_t A) {
  using acc_t = acc_of<scalar_t>;
  const int64_t a = act[b];
  const bool in_range = a >= 0 && a < A;
  CUDA_KERNEL_ASSERT(in_range && "rlkernels: td_loss: actions must be in [0, A)");
  return in_range ? static_cast<acc_t>(y[b]) - static_cast<acc_t>(q[b * A + a]) : acc_t(NAN);
}

// Per-row td_errors (and per-sample losses for reduction="none"); with `partials`, the block's sum of the
// losses in double, by a fixed tree.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    td_loss_kernel(const scalar_t* __restrict__ q, const int64_t* __restrict__ act, const scalar_t* __restrict__ y,
                   const scalar_t* __restrict__ w, int64_t B, int64_t A, TdLoss kind, acc_of<scalar_t> delta,
                   acc_of<scalar_t>* __restrict__ e_out, acc_of<scalar_t>* __restrict__ per_out,
                   double* __restrict__ partials) {
  using acc_t = acc_of<scalar_t>;
  double s = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t e = td_error(q, act, y, b, A);
    acc_t l = td_sample_loss(e, kind, delta);
    if (w != nullptr) l *= static_cast<acc_t>(w[b]);
    e_out[b] = e;
    if (per_out != nullptr) per_out[b] = l;
    s += static_cast<double>(l);
  }
  if (partials == nullptr) return;
  __shared__ double sh[kThreads];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sh[threadIdx.x] += sh[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

// One block: the sum of the partials in a fixed order, divided by B for the mean, in the output type.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    td_loss_total_kernel(const double* __restrict__ partials, int n, double divisor, acc_t* __restrict__ out) {
  __shared__ double sh[kThreads];
  double s = 0;
  for (int k = threadIdx.x; k < n; k += kThreads) s += partials[k];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sh[threadIdx.x] += sh[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<acc_t>(sh[0] / divisor);
}

std::tuple<Tensor, Tensor> td_loss_cuda(const Tensor& q_in, const Tensor& actions_in, const Tensor& targets_in,
                                        const OptTensor& weights_in, std::string_view loss, double delta,
                                        std::string_view reduction_name) {
  const TdLoss kind = td_kind_of(loss);
  const Reduction reduction = reduction_of(reduction_name);
  check_td_cuda(q_in, actions_in, targets_in, weights_in);
  TORCH_CHECK_VALUE(kind != TdLoss::kHuber || delta > 0, "rlkernels: delta must be > 0, got ", delta);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = q_in.contiguous(), actions = actions_in.contiguous(), targets = targets_in.contiguous();
  const Tensor weights = given(weights_in) ? weights_in->contiguous() : Tensor();
  const int64_t B = q.size(0), A = q.size(1);
  const auto opts = acc_options(q);
  Tensor td = at::empty({B}, opts);
  const bool per_sample = reduction == Reduction::kNone;
  Tensor per = per_sample ? at::empty({B}, opts) : Tensor();
  const cudaStream_t stream = current_stream();
  if (B == 0) return {per_sample ? per : at::zeros({}, opts), td};  // the mean and the sum of nothing are 0
  Tensor out = per_sample ? Tensor() : at::empty({}, opts);
  const unsigned int grid =
      per_sample ? grid_for(B, kThreads) : std::min<unsigned int>(grid_for(B, kThreads * kRowsPerThread), kMaxPartials);
  Tensor partials = per_sample ? Tensor() : at::empty({static_cast<int64_t>(grid)}, q.options().dtype(at::kDouble));
  RLK_DISPATCH_FLOATS(q.scalar_type(), "td_loss_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    td_loss_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), actions.const_data_ptr<int64_t>(), targets.const_data_ptr<scalar_t>(),
        weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr, B, A, kind, static_cast<acc_t>(delta),
        td.mutable_data_ptr<acc_t>(), per_sample ? per.mutable_data_ptr<acc_t>() : nullptr,
        per_sample ? nullptr : partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!per_sample) {
      const double divisor = reduction == Reduction::kMean ? static_cast<double>(B) : 1.0;
      td_loss_total_kernel<acc_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(),
                                                              static_cast<int>(grid), divisor,
                                                              out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {per_sample ? per : out, td};
}

// ------------------------------------------------------------------------------------------------------
// td_loss_backward
// ------------------------------------------------------------------------------------------------------

// One thread per element of grad_q [B, A]: -g on the taken action, 0 elsewhere; the a = 0 thread also writes
// grad_targets[b] = g. g = (grad_loss * scale * weight) * dloss/de + grad_td_errors, as on the CPU.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    td_loss_backward_kernel(const double* __restrict__ gl, bool gl_per_sample, const double* __restrict__ gt,
                            double scale, const scalar_t* __restrict__ q, const int64_t* __restrict__ act,
                            const scalar_t* __restrict__ y, const scalar_t* __restrict__ w, int64_t B, int64_t A,
                            TdLoss kind, acc_of<scalar_t> delta, scalar_t* __restrict__ gq,
                            scalar_t* __restrict__ gy) {
  using acc_t = acc_of<scalar_t>;
  const int64_t n = B * A;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / A, a = idx - b * A;
    const int64_t taken = act[b];
    const bool mine = a == taken;
    acc_t g = 0;
    if (mine || a == 0) {
      const acc_t e = td_error(q, act, y, b, A);
      if (gl != nullptr) {
        acc_t gw = static_cast<acc_t>((gl_per_sample ? gl[b] : gl[0]) * scale);
        if (w != nullptr) gw *= static_cast<acc_t>(w[b]);
        g = gw * td_sample_grad(e, kind, delta);
      }
      if (gt != nullptr) g += static_cast<acc_t>(gt[b]);
      if (!(taken >= 0 && taken < A)) g = acc_t(NAN);
      if (a == 0) gy[b] = static_cast<scalar_t>(g);
    }
    gq[idx] = static_cast<scalar_t>(mine ? -g : acc_t(0));  // e = y - q
  }
}

std::tuple<Tensor, Tensor> td_loss_backward_cuda(const OptTensor& grad_loss, const OptTensor& grad_td,
                                                 const Tensor& q_in, const Tensor& actions_in,
                                                 const Tensor& targets_in, const OptTensor& weights_in,
                                                 std::string_view loss, double delta,
                                                 std::string_view reduction_name,
                                                 const OptTensor& /*td_errors: gathered from q here*/) {
  const TdLoss kind = td_kind_of(loss);
  const Reduction reduction = reduction_of(reduction_name);
  check_td_cuda(q_in, actions_in, targets_in, weights_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = q_in.contiguous(), actions = actions_in.contiguous(), targets = targets_in.contiguous();
  const Tensor weights = given(weights_in) ? weights_in->contiguous() : Tensor();
  const int64_t B = q.size(0), A = q.size(1);
  const bool per_sample = reduction == Reduction::kNone;
  check_td_grads(grad_loss, grad_td, q, per_sample);
  const Tensor gl = given(grad_loss) ? grad_loss->to(at::kDouble).contiguous() : Tensor();
  const Tensor gt = given(grad_td) ? grad_td->to(at::kDouble).contiguous() : Tensor();
  const double scale = reduction == Reduction::kMean ? (B > 0 ? 1.0 / static_cast<double>(B) : 0.0) : 1.0;
  Tensor grad_q = at::empty({B, A}, q.options());
  Tensor grad_targets = at::empty({B}, targets.options());
  if (B == 0) return {grad_q, grad_targets};
  RLK_DISPATCH_FLOATS(q.scalar_type(), "td_loss_backward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    td_loss_backward_kernel<scalar_t><<<grid_for(B * A, kThreads), kThreads, 0, current_stream()>>>(
        gl.defined() ? gl.const_data_ptr<double>() : nullptr, per_sample,
        gt.defined() ? gt.const_data_ptr<double>() : nullptr, scale, q.const_data_ptr<scalar_t>(),
        actions.const_data_ptr<int64_t>(), targets.const_data_ptr<scalar_t>(),
        weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr, B, A, kind, static_cast<acc_t>(delta),
        grad_q.mutable_data_ptr<scalar_t>(), grad_targets.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("q_targets", &q_targets_cuda);
  m.impl("td_loss", &td_loss_cuda);
  m.impl("td_loss_backward", &td_loss_backward_cuda);
}

}  // namespace cuda_bellman
}  // namespace RLK_ISA
}  // namespace rlkernels
