// CPU kernels of the model-based Bellman ops (docs/design.md §4.5): bellman_backup and value_iteration. The
// CUDA twin is csrc/cuda/bellman_mdp.cu.
//
// value_iteration keeps each MDP's P in cache across iterations: an MDP is iterated by one thread (or, with
// fewer MDPs than threads, its states are split across threads), instead of streaming the whole batch of P
// from memory once per iteration as a batched einsum loop does.
#include "bellman_common.h"  // first: its pragma applies to everything below

#include <ATen/ops/zeros.h>

#include "simd_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace rlkernels::cpu {
namespace {

using at::Tensor;
using namespace rlkernels::bellman;

// Dot products of a row of P with V: simd_kernels.h, compiled per instruction set.
inline float dot(const float* p, const float* v, int64_t n) { return simd::kernels().dot_f32(p, v, n); }
inline double dot(const double* p, const double* v, int64_t n) { return simd::kernels().dot_f64(p, v, n); }

// Q[s, a] = R[s, a] + gamma P[s, a, :] . V for states [s0, s1) of one MDP, with V_new = max_a Q and the
// policy (first maximizing action, NaN counting as the maximum). P here is in the accumulation type (16-bit
// P is widened by the caller); R in its own type.
template <typename acc_t, typename r_t>
void backup_states(const acc_t* P, const r_t* R, const acc_t* V, int64_t S, int64_t A, acc_t gamma, int64_t s0,
                   int64_t s1, acc_t* Q, acc_t* V_new, int64_t* policy) {
  for (int64_t s = s0; s < s1; ++s) {
    acc_t best = -std::numeric_limits<acc_t>::infinity(), vmax = best;
    int64_t arg = 0;
    for (int64_t a = 0; a < A; ++a) {
      const int64_t sa = s * A + a;
      const acc_t q = static_cast<acc_t>(R[sa]) + gamma * dot(P + sa * S, V, S);
      Q[sa] = q;
      vmax = nan_max(vmax, q);
      if (a == 0 || takes_argmax(best, q)) best = q, arg = a;
    }
    V_new[s] = vmax;
    policy[s] = arg;
  }
}

// P[b] in the accumulation type: a view for float32/float64, a widened copy for 16-bit P.
template <typename scalar_t>
const acc_of<scalar_t>* widened(const scalar_t* P, int64_t n, std::vector<acc_of<scalar_t>>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_of<scalar_t>>) {
    return P;
  } else {
    buf.resize(n);
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_of<scalar_t>>(P[k]);
    return buf.data();
  }
}

std::tuple<Tensor, Tensor, Tensor> bellman_backup_cpu(const Tensor& P_in, const Tensor& R_in, const Tensor& V_in,
                                                      double gamma_d) {
  check_mdp(P_in, R_in, V_in, "V");
  const Tensor P = P_in.contiguous(), R = R_in.contiguous();
  const int64_t B = P.size(0), S = P.size(1), A = P.size(2);
  const auto acc = acc_type_of(P.scalar_type());
  const Tensor V = V_in.to(acc).contiguous();
  Tensor Q = at::empty({B, S, A}, P.options().dtype(acc));
  Tensor V_new = at::empty({B, S}, P.options().dtype(acc));
  Tensor policy = at::empty({B, S}, P.options().dtype(at::kLong));
  RLK_DISPATCH_FLOATS(P.scalar_type(), "bellman_backup", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* Pp = P.data_ptr<scalar_t>();
    const scalar_t* Rp = R.data_ptr<scalar_t>();
    const acc_t* Vp = V.data_ptr<acc_t>();
    acc_t* Qp = Q.data_ptr<acc_t>();
    acc_t* Vn = V_new.data_ptr<acc_t>();
    int64_t* pol = policy.data_ptr<int64_t>();
    const acc_t gamma = static_cast<acc_t>(gamma_d);
    const int64_t row = A * S;
    at::parallel_for(0, B * S, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row)), [&](int64_t begin,
                                                                                              int64_t end) {
      std::vector<acc_t> buf;
      for (int64_t bs = begin; bs < end; ++bs) {
        const int64_t b = bs / S;
        // State bs % S alone, as a one-state slice (index 0) of its MDP; V is the MDP's whole value vector.
        backup_states(widened(Pp + bs * row, row, buf), Rp + bs * A, Vp + b * S, S, A, gamma, 0, 1, Qp + bs * A,
                      Vn + bs, pol + bs);
      }
    });
  });
  return {Q, V_new, policy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> value_iteration_cpu(const Tensor& P_in, const Tensor& R_in,
                                                                       const OptTensor& V0, double gamma_d,
                                                                       double tol_d, int64_t max_iters) {
  check_value_iteration(P_in, R_in, V0, max_iters);
  const Tensor P = P_in.contiguous(), R = R_in.contiguous();
  const int64_t B = P.size(0), S = P.size(1), A = P.size(2);
  const auto acc = acc_type_of(P.scalar_type());
  const auto opts = P.options().dtype(acc);
  Tensor V = given(V0) ? V0->to(acc).contiguous().clone() : at::zeros({B, S}, opts);
  Tensor Q = at::empty({B, S, A}, opts);
  Tensor policy = at::empty({B, S}, P.options().dtype(at::kLong));
  Tensor residual = at::empty({B}, opts);
  std::vector<int64_t> iters(B, 0);
  int64_t K = 0;
  RLK_DISPATCH_FLOATS(P.scalar_type(), "value_iteration", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* Pp = P.data_ptr<scalar_t>();
    const scalar_t* Rp = R.data_ptr<scalar_t>();
    acc_t* Vp = V.data_ptr<acc_t>();
    acc_t* Qp = Q.data_ptr<acc_t>();
    int64_t* pol = policy.data_ptr<int64_t>();
    acc_t* res = residual.data_ptr<acc_t>();
    const acc_t gamma = static_cast<acc_t>(gamma_d), tol = static_cast<acc_t>(tol_d);
    const int64_t mdp = S * A * S;
    for (int64_t b = 0; b < B; ++b) res[b] = std::numeric_limits<acc_t>::infinity();
    // With at least as many MDPs as threads, each MDP is iterated by one thread with its P hot in cache;
    // otherwise the states of one MDP are split across the threads in every backup.
    const bool per_mdp = B >= at::get_num_threads();

    // One backup of MDP b: Q, policy and the residual max_s |V_new - V| (NaN propagates), then V <- V_new.
    auto iterate = [&](int64_t b, const acc_t* Pb, std::vector<acc_t>& V_new) {
      acc_t* Vb = Vp + b * S;
      const scalar_t* Rb = Rp + b * S * A;
      V_new.resize(S);
      if (per_mdp) {
        backup_states(Pb, Rb, Vb, S, A, gamma, 0, S, Qp + b * S * A, V_new.data(), pol + b * S);
      } else {
        at::parallel_for(0, S, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, A * S)), [&](int64_t s0, int64_t s1) {
          backup_states(Pb, Rb, Vb, S, A, gamma, s0, s1, Qp + b * S * A, V_new.data(), pol + b * S);
        });
      }
      acc_t r = 0;
      for (int64_t s = 0; s < S; ++s) r = nan_max(r, std::fabs(V_new[s] - Vb[s]));
      std::copy(V_new.begin(), V_new.end(), Vb);
      res[b] = r;
      ++iters[b];
    };
    // Brings MDP b to K backups, then on until it converges or reaches max_iters.
    auto run = [&](int64_t b, std::vector<acc_t>& P_buf, std::vector<acc_t>& V_new) {
      const acc_t* Pb = widened(Pp + b * mdp, mdp, P_buf);
      while (iters[b] < K) iterate(b, Pb, V_new);
      while (iters[b] < max_iters && !(res[b] < tol)) iterate(b, Pb, V_new);
    };
    // All MDPs iterate together (docs/design.md §4.5): the batch stops at the first backup after which every
    // residual is below tol. Each MDP runs on alone until it converges; the batch count K is the largest of
    // theirs; MDPs behind K catch up and, should one's residual have risen above tol again, the round repeats.
    while (true) {
      if (per_mdp) {
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
          std::vector<acc_t> P_buf, V_new;
          for (int64_t b = b0; b < b1; ++b) run(b, P_buf, V_new);
        });
      } else {
        std::vector<acc_t> P_buf, V_new;
        for (int64_t b = 0; b < B; ++b) run(b, P_buf, V_new);
      }
      int64_t K_new = 0;
      for (int64_t b = 0; b < B; ++b) K_new = std::max(K_new, iters[b]);
      bool level = true;
      for (int64_t b = 0; b < B; ++b) level = level && iters[b] == K_new;
      K = K_new;
      if (level) break;
    }
  });
  if (B == 0) K = 1;  // the reference makes one (empty) backup
  Tensor it = at::empty({}, P.options().dtype(at::kLong));
  *it.data_ptr<int64_t>() = K;
  return {V, Q, policy, it, residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("bellman_backup", &bellman_backup_cpu);
  m.impl("value_iteration", &value_iteration_cpu);
}

}  // namespace rlkernels::cpu
