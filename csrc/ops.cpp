// Every schema of the rlkernels library, in one place. Kernels register per backend in csrc/cpu/*.cpp
// and csrc/cuda/*.cu; autograd, fake (meta) kernels and Triton implementations register from Python
// (rlkernels/<family>.py).
//
// Layout convention of the scan family: the Python wrappers hand the ops canonical contiguous tensors,
// either [O, T, I] (time on dim 1; sequences are the (o, i) pairs) or, with cu_seqlens, 1-D packed
// sequences. Per-sequence tensors (bootstrap_value, initial) are then [O, I] or [num_segments].
// Outputs are float32 for 16-bit inputs, else the input dtype.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The module only has to exist so that `import rlkernels._C` loads the library and runs the
// registrations below; it has no Python functions, which keeps it on the stable ABI (abi3).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rlkernels, m) {
  // ---- reverse linear scan family (rlkernels/returns.py) ----
  m.def("linear_scan(Tensor a, Tensor b, Tensor? initial, bool reverse) -> Tensor");
  m.def(
      "discounted_returns(Tensor rewards, Tensor? next_values, Tensor? bootstrap_value, Tensor? terminated, "
      "Tensor? truncated, Tensor? mask, Tensor? cu_seqlens, float gamma) -> Tensor");
  m.def(
      "discounted_returns_backward(Tensor? grad, Tensor? terminated, Tensor? truncated, Tensor? mask, "
      "Tensor? cu_seqlens, Tensor rewards_like, float gamma, bool has_next_values) "
      "-> (Tensor grad_rewards, Tensor grad_next_values, Tensor grad_bootstrap_value)");
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor? next_values, Tensor? bootstrap_value, Tensor? terminated, "
      "Tensor? truncated, Tensor? mask, Tensor? cu_seqlens, float gamma, float lam) "
      "-> (Tensor advantages, Tensor returns)");
  m.def(
      "gae_backward(Tensor? grad_advantages, Tensor? grad_returns, Tensor? terminated, Tensor? truncated, "
      "Tensor? mask, Tensor? cu_seqlens, Tensor rewards_like, float gamma, float lam, bool has_next_values) "
      "-> (Tensor grad_rewards, Tensor grad_values, Tensor grad_next_values, Tensor grad_bootstrap_value)");
  m.def(
      "vtrace(Tensor rewards, Tensor values, Tensor log_rhos, Tensor? next_values, Tensor? bootstrap_value, "
      "Tensor? terminated, Tensor? truncated, Tensor? mask, Tensor? cu_seqlens, float gamma, float lam, "
      "float rho_clip, float c_clip, float pg_rho_clip, bool save_carries) "
      "-> (Tensor vs, Tensor pg_advantages, Tensor saved_next_x, Tensor saved_next_v)");
  m.def(
      "vtrace_backward(Tensor? grad_vs, Tensor? grad_pg_advantages, Tensor rewards, Tensor values, "
      "Tensor log_rhos, Tensor? next_values, Tensor? saved_next_x, Tensor? saved_next_v, Tensor? terminated, "
      "Tensor? truncated, Tensor? mask, Tensor? cu_seqlens, float gamma, float lam, float rho_clip, "
      "float c_clip, float pg_rho_clip) -> (Tensor grad_rewards, Tensor grad_values, Tensor grad_log_rhos, "
      "Tensor grad_next_values, Tensor grad_bootstrap_value)");
  m.def(
      "retrace(Tensor rewards, Tensor q_taken, Tensor next_v, Tensor log_rhos, Tensor? terminated, "
      "Tensor? truncated, Tensor? mask, Tensor? cu_seqlens, float gamma, float lam, float c_clip) -> Tensor");
  m.def(
      "retrace_backward(Tensor grad, Tensor targets, Tensor q_taken, Tensor log_rhos, Tensor? terminated, "
      "Tensor? truncated, Tensor? mask, Tensor? cu_seqlens, float gamma, float lam, float c_clip) "
      "-> (Tensor grad_rewards, Tensor grad_q_taken, Tensor grad_next_v, Tensor grad_log_rhos)");

  // ---- PPO loss family (rlkernels/ppo.py): canonical [B, T] inputs of one dtype, mask bool/uint8 or None.
  // The losses return 0-d tensors (loss, then the stats); backwards give the gradient w.r.t. logp / values.
  m.def(
      "ppo_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? mask, float clip_low, "
      "float clip_high, float? dual_clip, str agg, float norm_length) -> (Tensor loss, Tensor clipfrac, "
      "Tensor clipfrac_lower, Tensor approx_kl, Tensor ratio_mean, Tensor ratio_max)");
  m.def(
      "ppo_policy_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor? mask, "
      "float clip_low, float clip_high, float? dual_clip, str agg, float norm_length) -> Tensor");
  m.def(
      "value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor? mask, float? clip, str agg) "
      "-> (Tensor loss, Tensor vf_clipfrac)");
  m.def(
      "value_loss_backward(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor? mask, "
      "float? clip, str agg) -> Tensor");
  m.def("kl_penalty(Tensor logp, Tensor ref_logp, str kind) -> Tensor");
  m.def("kl_penalty_backward(Tensor grad, Tensor logp, Tensor ref_logp, str kind) -> Tensor");

  // ---- log-prob gathering (rlkernels/logprobs.py) ----
  // logits [N, V] with unit stride along V, tokens int64 [N]. Outputs in float32 (float64 for float64
  // logits): logp [N], entropy [N] (empty without return_entropy), lse [N] = logsumexp(logits / T), saved for
  // the backward. inplace_backward is read by the autograd formula only.
  m.def(
      "gather_logprobs(Tensor logits, Tensor tokens, float temperature, bool return_entropy, int? ignore_index, "
      "bool inplace_backward) -> (Tensor logp, Tensor entropy, Tensor lse)");
  // d logits = (g_logp (onehot - p) - g_entropy p (z - lse + entropy)) / T, in the logits' dtype.
  m.def(
      "gather_logprobs_backward(Tensor? grad_logp, Tensor? grad_entropy, Tensor logits, Tensor tokens, "
      "Tensor lse, Tensor entropy, float temperature, int? ignore_index) -> Tensor");
  // The same, written over the logits (inplace_backward=True).
  m.def(
      "gather_logprobs_backward_inplace(Tensor? grad_logp, Tensor? grad_entropy, Tensor(a!) logits, "
      "Tensor tokens, Tensor lse, Tensor entropy, float temperature, int? ignore_index) -> ()");

  // ---- Bellman backups (rlkernels/bellman.py) ----
  // Sample-based: rewards [B], next_q / next_q_online / next_probs [B, A] contiguous of one dtype, terminated
  // bool [B] or None; discount = gamma^n. Targets in float32 (float64 for float64 inputs), no autograd.
  m.def(
      "q_targets(Tensor rewards, Tensor next_q, Tensor? terminated, Tensor? next_q_online, Tensor? next_probs, "
      "float discount, str kind, float temperature) -> Tensor");
  // q [B, A], actions int64 [B], targets and weights [B] of q's dtype. loss is 0-d (mean, sum) or [B] (none);
  // td_errors [B] = targets - q[b, actions[b]]; both float32 (float64 for float64 q).
  m.def(
      "td_loss(Tensor q, Tensor actions, Tensor targets, Tensor? weights, str loss, float delta, str reduction) "
      "-> (Tensor loss, Tensor td_errors)");
  // Dense grad_q with one non-zero per row (in q's dtype) and grad_targets (in targets' dtype). td_errors, if
  // given, are the forward's (targets - q[b, actions[b]]): the CPU kernel then does not read q again (the CUDA
  // kernel gathers them from q either way).
  m.def(
      "td_loss_backward(Tensor? grad_loss, Tensor? grad_td_errors, Tensor q, Tensor actions, Tensor targets, "
      "Tensor? weights, str loss, float delta, str reduction, Tensor? td_errors=None) "
      "-> (Tensor grad_q, Tensor grad_targets)");
  // Canonical [O, T, I] like the scan family (no mask, no cu_seqlens); bootstrap_value [O, I].
  m.def(
      "n_step_returns(Tensor rewards, Tensor values, Tensor? next_values, Tensor? bootstrap_value, "
      "Tensor? terminated, Tensor? truncated, float gamma, int n) -> Tensor");
  m.def(
      "n_step_returns_backward(Tensor grad, Tensor? terminated, Tensor? truncated, Tensor rewards_like, "
      "float gamma, int n, bool has_next_values) "
      "-> (Tensor grad_rewards, Tensor grad_values, Tensor grad_next_values, Tensor grad_bootstrap_value)");
  // Model-based: P [B, S, A, S], R [B, S, A], V [B, S] contiguous of one dtype. Q and V in float32 (float64 for
  // float64 inputs), policy int64 (first maximizing action).
  m.def("bellman_backup(Tensor P, Tensor R, Tensor V, float gamma) -> (Tensor Q, Tensor V_new, Tensor policy)");
  // iters: 0-d int64, the number of backups made (all MDPs iterate together); residual [B].
  m.def(
      "value_iteration(Tensor P, Tensor R, Tensor? V0, float gamma, float tol, int max_iters) "
      "-> (Tensor V, Tensor Q, Tensor policy, Tensor iters, Tensor residual)");
}
