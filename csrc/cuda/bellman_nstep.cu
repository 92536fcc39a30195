// CUDA kernels of n_step_returns and its backward on the canonical [O, T, I] layout (docs/design.md §4.5), with
// the semantics of csrc/cpu/bellman_nstep.cpp.
//
// One thread per element (o, t, i), i fastest, so a warp reads 32 adjacent elements of each stream at every
// step of its window (coalesced for I >= 32; for I = 1 the windows of adjacent threads overlap and the
// reads are contiguous too). Forward: the thread walks its window of at most n steps (O(n) reads). Backward,
// as a gather (no atomics): the thread of step j sums the gradients of the windows t = j, j-1, ..., j-n+1
// that reach reward j, and writes the gradient of the one V'_j it owns (values[j + 1], next_values[j] or the
// bootstrap value): every output element has exactly one writer.
#include "bellman_common.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda_bellman {
namespace {

struct Geometry {
  int64_t O, T, I;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    n_step_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v, const scalar_t* __restrict__ nv,
                  const scalar_t* __restrict__ boot, const uint8_t* __restrict__ term,
                  const uint8_t* __restrict__ trunc, Geometry g, acc_of<scalar_t> gamma, int64_t n,
                  acc_of<scalar_t>* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  const int64_t numel = g.O * g.T * g.I;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t o = idx / (g.T * g.I), rem = idx - o * g.T * g.I;
    const int64_t t = rem / g.I, i = rem - t * g.I;
    acc_t G = 0, disc = 1;
    for (int64_t d = 0; d < n && t + d < g.T; ++d) {
      const int64_t j = t + d, k = idx + d * g.I;
      const bool last = j == g.T - 1 || d == n - 1;
      G += disc * static_cast<acc_t>(r[k]);
      const bool tm = term != nullptr && term[k] != 0;
      if (tm || (trunc != nullptr && trunc[k] != 0) || last) {
        acc_t vn;
        if (nv != nullptr)
          vn = static_cast<acc_t>(nv[k]);
        else if (j + 1 < g.T)
          vn = static_cast<acc_t>(v[k + g.I]);
        else
          vn = boot != nullptr ? static_cast<acc_t>(boot[o * g.I + i]) : acc_t(0);
        G += disc * gamma * (acc_t(1) - acc_t(tm)) * vn;  // as the CPU: a terminated inf V' gives NaN
        break;
      }
      disc *= gamma;
    }
    out[idx] = G;
  }
}

Tensor n_step_returns_cuda(const Tensor& rewards_in, const Tensor& values_in, const OptTensor& next_values_in,
                           const OptTensor& bootstrap_in, const OptTensor& terminated, const OptTensor& truncated,
                           double gamma_d, int64_t n) {
  check_cuda(rewards_in, "rewards");
  check_n_step(rewards_in, values_in, next_values_in, bootstrap_in, n);
  const Geometry g{rewards_in.size(0), rewards_in.size(1), rewards_in.size(2)};
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const Tensor r = rewards_in.contiguous(), v = values_in.contiguous();
  const Tensor nv = given(next_values_in) ? next_values_in->contiguous() : Tensor();
  const Tensor boot = given(bootstrap_in) ? bootstrap_in->contiguous() : Tensor();
  Tensor keep_term, keep_trunc;
  const uint8_t* term = flag_data(terminated, "terminated", r, "rewards", r.sizes(), keep_term);
  const uint8_t* trunc = flag_data(truncated, "truncated", r, "rewards", r.sizes(), keep_trunc);
  Tensor out = at::empty(r.sizes(), acc_options(r));
  if (r.numel() == 0) return out;
  RLK_DISPATCH_FLOATS(r.scalar_type(), "n_step_returns_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    n_step_kernel<scalar_t><<<grid_for(r.numel(), kThreads), kThreads, 0, current_stream()>>>(
        r.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        nv.defined() ? nv.const_data_ptr<scalar_t>() : nullptr,
        boot.defined() ? boot.const_data_ptr<scalar_t>() : nullptr, term, trunc, g, static_cast<acc_t>(gamma_d), n,
        out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The adjoint of n_step_kernel (the CPU's gather, one thread per (o, j, i)).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    n_step_backward_kernel(const acc_t* __restrict__ grad, const uint8_t* __restrict__ term,
                           const uint8_t* __restrict__ trunc, Geometry g, acc_t gamma, acc_t gamma_n, int64_t n,
                           bool has_next, acc_t* __restrict__ g_r, acc_t* __restrict__ g_v,
                           acc_t* __restrict__ g_nv, acc_t* __restrict__ g_boot) {
  const int64_t numel = g.O * g.T * g.I;
  for (int64_t kj = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; kj < numel;
       kj += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t o = kj / (g.T * g.I), rem = kj - o * g.T * g.I;
    const int64_t j = rem / g.I, i = rem - j * g.I;
    // Reward j is summed by window t = j - d with weight gamma^d while no step t..j-1 stops the window.
    acc_t acc_r = 0, disc = 1;
    bool full = true;
    for (int64_t d = 0; d < n; ++d) {
      const int64_t t = j - d;
      if (t < 0) {
        full = false;
        break;
      }
      const int64_t kt = kj - d * g.I;
      if (d > 0 && ((term != nullptr && term[kt] != 0) || (trunc != nullptr && trunc[kt] != 0))) {
        full = false;
        break;
      }
      acc_r += disc * grad[kt];
      disc *= gamma;
    }
    g_r[kj] = acc_r;
    // V'_j is read by the window that stops at j: every window reaching j when j stops naturally (terminated
    // windows read it times 0), else the full window that starts at j - n + 1.
    const bool tm = term != nullptr && term[kj] != 0;
    const bool natural = tm || (trunc != nullptr && trunc[kj] != 0) || j == g.T - 1;
    acc_t gvn = 0;
    if (!tm) {
      if (natural)
        gvn = gamma * acc_r;
      else if (full)
        gvn = gamma_n * grad[kj - (n - 1) * g.I];
    }
    const int64_t seq = o * g.I + i;
    if (has_next) {
      g_nv[kj] = gvn;
      g_v[kj] = 0;
      if (j == g.T - 1) g_boot[seq] = 0;
    } else {
      if (j == 0) g_v[kj] = 0;  // values[0] is nobody's V'
      if (j + 1 < g.T)
        g_v[kj + g.I] = gvn;
      else
        g_boot[seq] = gvn;
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> n_step_returns_backward_cuda(const Tensor& grad_in,
                                                                        const OptTensor& terminated,
                                                                        const OptTensor& truncated, const Tensor& like,
                                                                        double gamma_d, int64_t n,
                                                                        bool has_next_values) {
  check_cuda(like, "rewards_like");
  check_n_step_backward(grad_in, like, n);
  const Geometry g{like.size(0), like.size(1), like.size(2)};
  const auto acc = acc_type_of(like.scalar_type());
  const c10::cuda::CUDAGuard guard(like.device());
  const Tensor grad = grad_in.to(acc).contiguous();
  Tensor keep_term, keep_trunc;
  const uint8_t* term = flag_data(terminated, "terminated", like, "rewards_like", like.sizes(), keep_term);
  const uint8_t* trunc = flag_data(truncated, "truncated", like, "rewards_like", like.sizes(), keep_trunc);
  const auto opts = like.options().dtype(acc);
  Tensor g_r = at::empty(like.sizes(), opts);
  Tensor g_v = at::empty(like.sizes(), opts);
  Tensor g_nv = has_next_values ? at::empty(like.sizes(), opts) : at::empty({0}, opts);
  // Every (o, i) has a writer only when T > 0; with T = 0 the bootstrap gradient is all zeros.
  Tensor g_boot = g.T > 0 ? at::empty({g.O, g.I}, opts) : at::zeros({g.O, g.I}, opts);
  if (like.numel() == 0) return {g_r, g_v, g_nv, g_boot};
  AT_DISPATCH_FLOATING_TYPES(acc, "n_step_returns_backward_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t gamma = static_cast<acc_t>(gamma_d);
    acc_t gamma_n = 1;
    // gamma^n is read only where a window spans n steps, so n <= T there: at most T factors (n may be huge).
    for (int64_t k = 0; k < std::min<int64_t>(n, g.T); ++k) gamma_n *= gamma;
    n_step_backward_kernel<acc_t><<<grid_for(like.numel(), kThreads), kThreads, 0, current_stream()>>>(
        grad.const_data_ptr<acc_t>(), term, trunc, g, gamma, gamma_n, n, has_next_values,
        g_r.mutable_data_ptr<acc_t>(), g_v.mutable_data_ptr<acc_t>(),
        has_next_values ? g_nv.mutable_data_ptr<acc_t>() : nullptr, g_boot.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_r, g_v, g_nv, g_boot};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("n_step_returns", &n_step_returns_cuda);
  m.impl("n_step_returns_backward", &n_step_returns_backward_cuda);
}

}  // namespace cuda_bellman
}  // namespace RLK_ISA
}  // namespace rlkernels
