// Arguments of the Bellman ops (docs/design.md §4.5), parsed and checked once for the CPU kernels
// (csrc/cpu/bellman_*.cpp) and the CUDA kernels (csrc/cuda/bellman_*.cu). Each backend adds only what is its
// own (the CUDA kernels' device and index-width limits, the CPU's flag dtype). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string_view>

#include "rlkernels/bellman.h"
#include "rlkernels/checks.h"

namespace rlkernels {
inline namespace RLK_ISA {
namespace bellman {

inline QKind q_kind_of(std::string_view kind) {
  return choice_of<QKind>(kind, "kind", {{"max", QKind::kMax},
                                         {"double", QKind::kDouble},
                                         {"expected", QKind::kExpected},
                                         {"soft", QKind::kSoft}});
}

inline TdLoss td_kind_of(std::string_view loss) {
  return choice_of<TdLoss>(loss, "loss", {{"huber", TdLoss::kHuber}, {"squared", TdLoss::kSquared}});
}

inline Reduction reduction_of(std::string_view reduction) {
  return choice_of<Reduction>(reduction, "reduction",
                              {{"mean", Reduction::kMean}, {"sum", Reduction::kSum}, {"none", Reduction::kNone}});
}

// q_targets: next_q [B, A] (A >= 1), rewards [B], and the input its kind reads, all of one dtype and device.
// terminated is checked by the caller, which reads it.
inline void check_q_targets(const at::Tensor& rewards, const at::Tensor& next_q, const OptTensor& next_q_online,
                            const OptTensor& next_probs, QKind kind, double temperature) {
  TORCH_CHECK_VALUE(next_q.dim() == 2, "rlkernels: next_q must be [B, A], got ", next_q.sizes());
  check_float(next_q, "next_q");
  const int64_t B = next_q.size(0);
  TORCH_CHECK_VALUE(next_q.size(1) >= 1, "rlkernels: next_q needs at least one action, got shape ", next_q.sizes());
  check_like(rewards, "rewards", next_q, "next_q", {B});
  if (kind == QKind::kDouble) {
    TORCH_CHECK_VALUE(given(next_q_online), "rlkernels: kind='double' needs next_q_online");
    check_like(*next_q_online, "next_q_online", next_q, "next_q", next_q.sizes());
  }
  if (kind == QKind::kExpected) {
    TORCH_CHECK_VALUE(given(next_probs), "rlkernels: kind='expected' needs next_probs");
    check_like(*next_probs, "next_probs", next_q, "next_q", next_q.sizes());
  }
  // 1 / temperature a finite float32 (the kernels divide by it in float32; docs/design.md §4.5)
  TORCH_CHECK_VALUE(kind != QKind::kSoft ||
                        (temperature >= 2.938735877055719e-39 && temperature <= std::numeric_limits<double>::max()),
                    "rlkernels: kind='soft' needs a finite temperature >= 2.938735877055719e-39, got ", temperature);
}

// td_loss and its backward: q [B, A], actions int64 [B], targets and weights [B] of q's dtype and device.
inline void check_td(const at::Tensor& q, const at::Tensor& actions, const at::Tensor& targets,
                     const OptTensor& weights) {
  TORCH_CHECK_VALUE(q.dim() == 2, "rlkernels: q must be [B, A], got ", q.sizes());
  check_float(q, "q");
  const int64_t B = q.size(0);
  check_index(actions, "actions", q, "q", {B});
  check_like(targets, "targets", q, "q", {B});
  if (given(weights)) check_like(*weights, "weights", q, "q", {B});
}

// td_loss_backward's upstream gradients: one per row (reduction='none') or one for the loss; one per row for
// the td_errors.
inline void check_td_grads(const OptTensor& grad_loss, const OptTensor& grad_td, const at::Tensor& q,
                           bool per_sample) {
  const int64_t B = q.size(0);
  if (given(grad_loss)) {
    TORCH_CHECK_VALUE(per_sample ? grad_loss->numel() == B : grad_loss->numel() == 1,
                      "rlkernels: grad_loss has the wrong number of elements: ", grad_loss->sizes());
    check_same_device(*grad_loss, "grad_loss", q, "q");
  }
  if (given(grad_td)) {
    check_shape(*grad_td, "grad_td_errors", {B});
    check_same_device(*grad_td, "grad_td_errors", q, "q");
  }
}

// n_step_returns: canonical [O, T, I] rewards, values and next_values of one dtype and device, bootstrap_value
// [O, I]. Flags are checked by the caller, which reads them.
inline void check_n_step(const at::Tensor& rewards, const at::Tensor& values, const OptTensor& next_values,
                         const OptTensor& bootstrap, int64_t n) {
  TORCH_CHECK_VALUE(n >= 1, "rlkernels: n must be >= 1, got ", n);
  TORCH_CHECK_VALUE(rewards.dim() == 3, "rlkernels: rewards must be canonical [O, T, I], got ", rewards.sizes());
  check_float(rewards, "rewards");
  check_like(values, "values", rewards, "rewards");
  if (given(next_values)) check_like(*next_values, "next_values", rewards, "rewards");
  if (given(bootstrap))
    check_like(*bootstrap, "bootstrap_value", rewards, "rewards", {rewards.size(0), rewards.size(2)});
}

inline void check_n_step_backward(const at::Tensor& grad, const at::Tensor& rewards_like, int64_t n) {
  TORCH_CHECK_VALUE(n >= 1, "rlkernels: n must be >= 1, got ", n);
  TORCH_CHECK_VALUE(rewards_like.dim() == 3, "rlkernels: rewards_like must be canonical [O, T, I], got ",
                    rewards_like.sizes());
  check_shape(grad, "grad", rewards_like.sizes());
  check_same_device(grad, "grad", rewards_like, "rewards_like");
}

// bellman_backup and value_iteration: P [B, S, A, S], R [B, S, A] and V (named v_name) [B, S], one dtype and
// device.
inline void check_mdp(const at::Tensor& P, const at::Tensor& R, const OptTensor& V, const char* v_name) {
  TORCH_CHECK_VALUE(P.dim() == 4 && P.size(1) == P.size(3), "rlkernels: P must be [B, S, A, S], got ", P.sizes());
  check_float(P, "P");
  check_like(R, "R", P, "P", {P.size(0), P.size(1), P.size(2)});
  if (given(V)) check_like(*V, v_name, P, "P", {P.size(0), P.size(1)});
}

inline void check_value_iteration(const at::Tensor& P, const at::Tensor& R, const OptTensor& V0, int64_t max_iters) {
  check_mdp(P, R, V0, "V0");
  TORCH_CHECK_VALUE(max_iters >= 1, "rlkernels: max_iters must be >= 1, got ", max_iters);
}

}  // namespace bellman
}  // namespace RLK_ISA
}  // namespace rlkernels
