// CPU kernels of n_step_returns and its backward on the canonical [O, T, I] layout (docs/design.md §4.5). The
// CUDA twin is csrc/cuda/bellman_nstep.cu.
#include "bellman_common.h"  // first: its pragma applies to everything below

#include <algorithm>
#include <tuple>

namespace rlkernels::cpu {
namespace {

using at::Tensor;
using namespace rlkernels::bellman;

constexpr int64_t kLaneBlock = 64;

struct NStepGeometry {
  int64_t O, T, I;
  int64_t idx(int64_t o, int64_t t, int64_t i) const { return (o * T + t) * I + i; }
};

Tensor n_step_returns_cpu(const Tensor& rewards_in, const Tensor& values_in, const OptTensor& next_values_in,
                          const OptTensor& bootstrap_in, const OptTensor& terminated, const OptTensor& truncated,
                          double gamma_d, int64_t n) {
  check_n_step(rewards_in, values_in, next_values_in, bootstrap_in, n);
  const NStepGeometry g{rewards_in.size(0), rewards_in.size(1), rewards_in.size(2)};
  const Tensor r = rewards_in.contiguous(), v = values_in.contiguous();
  const Tensor nv = given(next_values_in) ? next_values_in->contiguous() : Tensor();
  const Tensor boot = given(bootstrap_in) ? bootstrap_in->contiguous() : Tensor();
  Tensor keep_term, keep_trunc;
  const bool* term = flag_data(terminated, "terminated", r, "rewards", r.sizes(), keep_term);
  const bool* trunc = flag_data(truncated, "truncated", r, "rewards", r.sizes(), keep_trunc);
  Tensor out = empty_output(r.sizes(), acc_options(r));
  RLK_DISPATCH_FLOATS(r.scalar_type(), "n_step_returns", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* nvp = nv.defined() ? nv.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = boot.defined() ? boot.data_ptr<scalar_t>() : nullptr;
    acc_t* op = out.data_ptr<acc_t>();
    const acc_t gamma = static_cast<acc_t>(gamma_d);
    const int64_t blocks_per_o = (g.I + kLaneBlock - 1) / kLaneBlock;
    at::parallel_for(0, g.O * blocks_per_o, 1, [&](int64_t begin, int64_t end) {
      acc_t G[kLaneBlock];
      bool alive[kLaneBlock];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t o = blk / blocks_per_o, i0 = (blk % blocks_per_o) * kLaneBlock;
        const int64_t L = std::min(kLaneBlock, g.I - i0);
        for (int64_t t = 0; t < g.T; ++t) {
          for (int64_t l = 0; l < L; ++l) G[l] = 0, alive[l] = true;
          acc_t disc = 1;
          int64_t left = L;
          for (int64_t d = 0; d < n && t + d < g.T && left > 0; ++d) {
            const int64_t j = t + d;
            const bool last = j == g.T - 1 || d == n - 1;
            for (int64_t l = 0; l < L; ++l) {
              if (!alive[l]) continue;
              const int64_t k = g.idx(o, j, i0 + l);
              G[l] += disc * static_cast<acc_t>(rp[k]);
              const bool tm = term != nullptr && term[k];
              if (tm || (trunc != nullptr && trunc[k]) || last) {
                acc_t vn;
                if (nvp != nullptr)
                  vn = static_cast<acc_t>(nvp[k]);
                else if (j + 1 < g.T)
                  vn = static_cast<acc_t>(vp[k + g.I]);
                else
                  vn = bp != nullptr ? static_cast<acc_t>(bp[o * g.I + i0 + l]) : acc_t(0);
                G[l] += disc * gamma * (acc_t(1) - acc_t(tm)) * vn;
                alive[l] = false;
                --left;
              }
            }
            disc *= gamma;
          }
          for (int64_t l = 0; l < L; ++l) op[g.idx(o, t, i0 + l)] = G[l];
        }
      }
    });
  });
  return out;
}

// The adjoint, as a gather (no atomics): reward s is summed by the windows t = s, s-1, ... that reach it
// (none of the steps t..s-1 stops a window); V'_j is read by the windows that end at j.
std::tuple<Tensor, Tensor, Tensor, Tensor> n_step_returns_backward_cpu(
    const Tensor& grad_in, const OptTensor& terminated, const OptTensor& truncated, const Tensor& like,
    double gamma_d, int64_t n, bool has_next_values) {
  check_n_step_backward(grad_in, like, n);
  const NStepGeometry g{like.size(0), like.size(1), like.size(2)};
  const auto acc = acc_type_of(like.scalar_type());
  const Tensor grad = grad_in.to(acc).contiguous();
  Tensor keep_term, keep_trunc;
  const bool* term = flag_data(terminated, "terminated", like, "rewards_like", like.sizes(), keep_term);
  const bool* trunc = flag_data(truncated, "truncated", like, "rewards_like", like.sizes(), keep_trunc);
  const auto opts = like.options().dtype(acc);
  Tensor g_r = empty_output(like.sizes(), opts);
  Tensor g_v = empty_output(like.sizes(), opts);
  Tensor g_nv = has_next_values ? empty_output(like.sizes(), opts) : at::empty({0}, opts);
  Tensor g_boot = at::empty({g.O, g.I}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "n_step_returns_backward", [&] {
    using acc_t = scalar_t;
    const acc_t* gp = grad.data_ptr<acc_t>();
    acc_t* grp = g_r.data_ptr<acc_t>();
    acc_t* gvp = g_v.data_ptr<acc_t>();
    acc_t* gnvp = has_next_values ? g_nv.data_ptr<acc_t>() : nullptr;
    acc_t* gbp = g_boot.data_ptr<acc_t>();
    const acc_t gamma = static_cast<acc_t>(gamma_d);
    acc_t gamma_n = 1;
    // gamma^n is read only where a window spans n steps, so n <= T there: at most T factors (n may be huge).
    for (int64_t k = 0; k < std::min<int64_t>(n, g.T); ++k) gamma_n *= gamma;
    at::parallel_for(0, g.O * g.I, 256, [&](int64_t begin, int64_t end) {
      for (int64_t seq = begin; seq < end; ++seq) {
        const int64_t o = seq / g.I, i = seq % g.I;
        if (!has_next_values && g.T > 0) gvp[g.idx(o, 0, i)] = 0;
        gbp[seq] = 0;
        for (int64_t j = 0; j < g.T; ++j) {
          const int64_t kj = g.idx(o, j, i);
          acc_t acc_r = 0, disc = 1;
          bool full = true;
          for (int64_t d = 0; d < n; ++d) {
            const int64_t t = j - d;
            if (t < 0) {
              full = false;
              break;
            }
            const int64_t kt = g.idx(o, t, i);
            if (d > 0 && ((term != nullptr && term[kt]) || (trunc != nullptr && trunc[kt]))) {
              full = false;
              break;
            }
            acc_r += disc * gp[kt];
            disc *= gamma;
          }
          grp[kj] = acc_r;
          const bool tm = term != nullptr && term[kj];
          const bool natural = tm || (trunc != nullptr && trunc[kj]) || j == g.T - 1;
          acc_t gvn = 0;
          if (!tm) {
            if (natural)
              gvn = gamma * acc_r;
            else if (full)
              gvn = gamma_n * gp[g.idx(o, j - n + 1, i)];
          }
          if (has_next_values)
            gnvp[kj] = gvn;
          else if (j + 1 < g.T)
            gvp[g.idx(o, j + 1, i)] = gvn;
          else
            gbp[seq] = gvn;
        }
        if (has_next_values)
          for (int64_t t = 0; t < g.T; ++t) gvp[g.idx(o, t, i)] = 0;
      }
    });
  });
  return {g_r, g_v, g_nv, g_boot};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("n_step_returns", &n_step_returns_cpu);
  m.impl("n_step_returns_backward", &n_step_returns_backward_cpu);
}

}  // namespace rlkernels::cpu
