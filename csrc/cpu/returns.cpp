// CPU kernels of the reverse linear scan family: linear_scan, discounted_returns, gae, vtrace, retrace and their
// backwards. Each op turns its tensors into a Problem (csrc/cpu/scan_engine.h) and runs its step.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "alloc.h"
#include "gae_rows.h"
#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"
#include "rlkernels/layout.h"
#include "rlkernels/returns_args.h"
#include "scan_engine.h"

namespace rlkernels::cpu {
namespace {

using rlkernels::Problem;

// The engine only reads the steps' carry and output counts here; the math runs in the ISA blocks.
struct ScalarExp {};

using at::Tensor;

// The canonical layout, with the packed offsets read once into int64.
struct Geometry : SeqLayout {
  std::vector<int64_t> cu;
};

Geometry geometry_of(const Tensor& ref, const char* ref_name, const OptTensor& cu_seqlens) {
  Geometry g;
  if (given(cu_seqlens)) {
    static_cast<SeqLayout&>(g) = packed_layout(ref, ref_name, *cu_seqlens);
    Tensor c = cu_seqlens->to(at::kLong).contiguous();
    g.cu.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
    TORCH_CHECK_VALUE(g.cu.front() == 0, "rlkernels: cu_seqlens[0] must be 0, got ", g.cu.front());
    for (size_t i = 1; i < g.cu.size(); ++i)
      TORCH_CHECK_VALUE(g.cu[i] >= g.cu[i - 1], "rlkernels: cu_seqlens must be non-decreasing, but cu_seqlens[", i,
                        "] = ", g.cu[i], " < cu_seqlens[", i - 1, "] = ", g.cu[i - 1]);
    TORCH_CHECK_VALUE(g.cu.back() == ref.numel(), "rlkernels: cu_seqlens[-1] = ", g.cu.back(),
                      " must equal the packed length ", ref.numel());
  } else if (ref.dim() == 3) {
    static_cast<SeqLayout&>(g) = dense_layout(ref, ref_name);
  } else {
    // [T, I] and [T] (time first) are [1, T, I] and [1, T, 1], with one value per sequence shaped [I] and []:
    // the Python wrappers pass such CPU tensors as they are, saving the reshapes of each call.
    TORCH_CHECK_VALUE(ref.dim() == 1 || ref.dim() == 2,
                      "rlkernels: scan ops take canonical [O, T, I] (or [T, I], [T]) tensors, got ", ref_name, " with ",
                      ref.dim(), " dims");
    g.steps = ref.size(0);
    g.inner = ref.dim() == 2 ? ref.size(1) : 1;
    g.num_seqs = g.inner;
    if (ref.dim() == 2) g.seq_shape = {g.inner};
  }
  return g;
}

template <typename acc_t>
Problem<acc_t> problem_of(const Geometry& g) {
  Problem<acc_t> pb;
  pb.outer = g.outer;
  pb.steps = g.steps;
  pb.inner = g.inner;
  pb.num_seqs = g.num_seqs;
  pb.cu_seqlens = g.cu.empty() ? nullptr : g.cu.data();
  return pb;
}

template <typename acc_t>
void set_scalar(Problem<acc_t>& pb, Inputs& keep, Stream s, const Tensor& ref, const char* ref_name, const OptTensor& t,
                const char* name) {
  if (!given(t)) return;
  check_like(*t, name, ref, ref_name);
  pb.set(s, keep.data(*t), Kind::kScalar);
}

template <typename acc_t>
void set_flag(Problem<acc_t>& pb, Inputs& keep, Stream s, const Tensor& ref, const char* ref_name, const OptTensor& t,
              const char* name) {
  if (!given(t)) return;
  check_flag(*t, name, ref, ref_name, ref.sizes());
  pb.set(s, keep.data(*t), Kind::kFlag);
}

template <typename acc_t>
void set_acc(Problem<acc_t>& pb, Inputs& keep, Stream s, const Tensor& ref, const char* ref_name, const OptTensor& t,
             const char* name) {
  if (!given(t)) return;
  check_same_shape(*t, name, ref, ref_name);
  check_same_device(*t, name, ref, ref_name);
  pb.set(s, keep.data(t->to(c10::CppTypeToScalarType<acc_t>::value)), Kind::kAcc);
}

// Per-sequence values ([O, I] or [n]) as acc_t, laid out [carry j][sequence].
template <typename acc_t>
void set_initial(std::vector<acc_t>& init, int j, const Geometry& g, const OptTensor& t, const char* name) {
  if (!given(t)) return;
  check_float(*t, name);
  check_per_sequence(*t, name, g);
  Tensor c = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  std::copy(c.data_ptr<acc_t>(), c.data_ptr<acc_t>() + g.num_seqs, init.begin() + j * g.num_seqs);
}

Tensor empty_out(const Tensor& ref) { return empty_output(ref.sizes(), acc_options(ref)); }

Tensor linear_scan_cpu(const Tensor& a, const Tensor& b, const OptTensor& initial, bool reverse) {
  check_float(b, "b");
  const Geometry g = geometry_of(b, "b", std::nullopt);
  Tensor out = empty_out(b);
  const bool empty = b.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(b.scalar_type(), "linear_scan", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kA, b, "b", a, "a");
    set_scalar(pb, keep, kB, b, "b", b, "b");
    pb.out[0] = out.data_ptr<acc_t>();
    std::vector<acc_t> init(g.num_seqs, acc_t(0));
    set_initial(init, 0, g, initial, "initial");
    if (empty) return;
    run_scan<LinearScanStep, scalar_t, acc_t>(StepId::kLinearScan, pb, ScanParams<acc_t>{}, reverse, init.data(), nullptr);
  });
  return out;
}

Tensor discounted_returns_cpu(const Tensor& rewards, const OptTensor& next_values, const OptTensor& bootstrap_value,
                              const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
                              const OptTensor& cu_seqlens, double gamma) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, "rewards", cu_seqlens);
  Tensor out = empty_out(rewards);
  const bool empty = rewards.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "discounted_returns", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kR, rewards, "rewards", rewards, "rewards");
    set_scalar(pb, keep, kNV, rewards, "rewards", next_values, "next_values");
    set_flag(pb, keep, kTerm, rewards, "rewards", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards, "rewards", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards, "rewards", mask, "mask");
    pb.out[0] = out.data_ptr<acc_t>();
    const bool has_next = given(next_values);
    std::vector<acc_t> init(g.num_seqs, acc_t(0));
    if (!has_next) set_initial(init, 0, g, bootstrap_value, "bootstrap_value");
    if (empty) return;
    run_scan<DiscountedReturnsStep, scalar_t, acc_t>(StepId::kDiscountedReturns, pb, params_of<acc_t>(gamma, 1.0, has_next), true, init.data(),
                                                     nullptr);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> discounted_returns_backward_cpu(
    const OptTensor& grad, const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
    const OptTensor& cu_seqlens, const Tensor& rewards_like, double gamma, bool has_next) {
  const Geometry g = geometry_of(rewards_like, "rewards_like", cu_seqlens);
  Tensor grad_rewards = empty_out(rewards_like);
  Tensor grad_next = has_next ? empty_out(rewards_like) : at::empty({0}, grad_rewards.options());
  Tensor grad_boot = at::zeros(g.seq_shape, grad_rewards.options());
  const bool empty = rewards_like.numel() == 0;  // checked below like any input, then nothing to compute
  AT_DISPATCH_FLOATING_TYPES(grad_rewards.scalar_type(), "discounted_returns_backward", [&] {
    using acc_t = scalar_t;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_acc(pb, keep, kG0, rewards_like, "rewards_like", grad, "grad");
    set_flag(pb, keep, kTerm, rewards_like, "rewards_like", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards_like, "rewards_like", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards_like, "rewards_like", mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = has_next ? grad_next.data_ptr<acc_t>() : nullptr;
    const auto params = params_of<acc_t>(gamma, 1.0, has_next);
    std::vector<acc_t> final_carry(g.num_seqs);
    if (empty) return;
    run_scan<DiscountedReturnsBackwardStep, acc_t, acc_t>(StepId::kDiscountedReturnsBackward, pb, params, false, nullptr, final_carry.data());
    acc_t* gb = grad_boot.data_ptr<acc_t>();
    for (int64_t s = 0; s < g.num_seqs; ++s)
      gb[s] = DiscountedReturnsBackwardStep::bootstrap_grad(params, &final_carry[s]);
  });
  return {grad_rewards, grad_next, grad_boot};
}

// Long sequences contiguous in time, without mask or packing, are vectorized along time (gae_rows.h):
// float32 inputs and 16-bit ones (widened as they load); false if this problem is not one of them.
template <typename scalar_t, typename acc_t>
bool gae_by_rows(const Geometry& g, const Problem<acc_t>& pb, const std::vector<acc_t>& init, bool has_next,
                 double gamma, double lam) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return false;
  } else {
    constexpr simd::Format format = simd::format_of<scalar_t>();
    if (!(g.cu.empty() && g.inner == 1 && gae_rows::suits(g.outer, g.steps) && pb.kind[kMask] == Kind::kNone &&
          pb.kind[kR] == Kind::kScalar && pb.kind[kV] == Kind::kScalar && gae_rows::enabled()))
      return false;
    auto d = [&](Stream s) { return static_cast<const scalar_t*>(pb.in[s]); };
    std::vector<gae_rows::Row> rows(g.outer);
    for (int64_t o = 0; o < g.outer; ++o) {
      const int64_t at = o * g.steps;
      auto flag = [&](Stream s) {
        return pb.kind[s] == Kind::kNone ? nullptr : static_cast<const unsigned char*>(pb.in[s]) + at;
      };
      rows[o] = {format, d(kR) + at, d(kV) + at, has_next ? d(kNV) + at : nullptr, flag(kTerm), flag(kTrunc),
                 has_next ? 0.0f : init[g.num_seqs + o], pb.out[0] + at, pb.out[1] + at, g.steps};
    }
    const int64_t out_bytes = 2 * g.outer * g.steps * static_cast<int64_t>(sizeof(float));
    const bool aligned = reinterpret_cast<uintptr_t>(pb.out[0]) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(pb.out[1]) % 16 == 0 && g.steps % 4 == 0;
    const float gf = static_cast<float>(gamma);
    gae_rows::run(rows, {gf, static_cast<float>(lam)}, aligned && streaming_stores_for(out_bytes));
    return true;
  }
}

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards, const Tensor& values, const OptTensor& next_values,
                                   const OptTensor& bootstrap_value, const OptTensor& terminated,
                                   const OptTensor& truncated, const OptTensor& mask, const OptTensor& cu_seqlens,
                                   double gamma, double lam) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, "rewards", cu_seqlens);
  Tensor adv = empty_out(rewards), ret = empty_out(rewards);
  const bool empty = rewards.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "gae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kR, rewards, "rewards", rewards, "rewards");
    set_scalar(pb, keep, kV, rewards, "rewards", values, "values");
    set_scalar(pb, keep, kNV, rewards, "rewards", next_values, "next_values");
    set_flag(pb, keep, kTerm, rewards, "rewards", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards, "rewards", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards, "rewards", mask, "mask");
    pb.out[0] = adv.data_ptr<acc_t>();
    pb.out[1] = ret.data_ptr<acc_t>();
    const bool has_next = given(next_values);
    std::vector<acc_t> init(2 * g.num_seqs, acc_t(0));
    if (!has_next) set_initial(init, 1, g, bootstrap_value, "bootstrap_value");
    if (empty) return;
    if (gae_by_rows<scalar_t>(g, pb, init, has_next, gamma, lam)) return;
    run_scan<GaeStep, scalar_t, acc_t>(StepId::kGae, pb, params_of<acc_t>(gamma, lam, has_next), true, init.data(), nullptr);
  });
  return {adv, ret};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gae_backward_cpu(const OptTensor& grad_adv, const OptTensor& grad_ret,
                                                            const OptTensor& terminated, const OptTensor& truncated,
                                                            const OptTensor& mask, const OptTensor& cu_seqlens,
                                                            const Tensor& rewards_like, double gamma, double lam,
                                                            bool has_next) {
  const Geometry g = geometry_of(rewards_like, "rewards_like", cu_seqlens);
  Tensor grad_rewards = empty_out(rewards_like), grad_values = empty_out(rewards_like);
  Tensor grad_next = has_next ? empty_out(rewards_like) : at::empty({0}, grad_rewards.options());
  Tensor grad_boot = at::zeros(g.seq_shape, grad_rewards.options());
  const bool empty = rewards_like.numel() == 0;  // checked below like any input, then nothing to compute
  AT_DISPATCH_FLOATING_TYPES(grad_rewards.scalar_type(), "gae_backward", [&] {
    using acc_t = scalar_t;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_acc(pb, keep, kG0, rewards_like, "rewards_like", grad_adv, "grad_advantages");
    set_acc(pb, keep, kG1, rewards_like, "rewards_like", grad_ret, "grad_returns");
    set_flag(pb, keep, kTerm, rewards_like, "rewards_like", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards_like, "rewards_like", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards_like, "rewards_like", mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = grad_values.data_ptr<acc_t>();
    pb.out[2] = has_next ? grad_next.data_ptr<acc_t>() : nullptr;
    const auto params = params_of<acc_t>(gamma, lam, has_next);
    std::vector<acc_t> final_carry(2 * g.num_seqs);
    if (empty) return;
    run_scan<GaeBackwardStep, acc_t, acc_t>(StepId::kGaeBackward, pb, params, false, nullptr, final_carry.data());
    acc_t* gb = grad_boot.data_ptr<acc_t>();
    for (int64_t s = 0; s < g.num_seqs; ++s) {
      const acc_t carry[2] = {final_carry[s], final_carry[g.num_seqs + s]};
      gb[s] = GaeBackwardStep::bootstrap_grad(params, carry);
    }
  });
  return {grad_rewards, grad_values, grad_next, grad_boot};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> vtrace_cpu(const Tensor& rewards, const Tensor& values,
                                                      const Tensor& log_rhos, const OptTensor& next_values,
                                                      const OptTensor& bootstrap_value, const OptTensor& terminated,
                                                      const OptTensor& truncated, const OptTensor& mask,
                                                      const OptTensor& cu_seqlens, double gamma, double lam,
                                                      double rho_clip, double c_clip, double pg_rho_clip,
                                                      bool save_carries) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, "rewards", cu_seqlens);
  Tensor vs = empty_out(rewards), pg = empty_out(rewards);
  Tensor next_x = save_carries ? empty_out(rewards) : at::empty({0}, vs.options());
  Tensor next_v = save_carries ? empty_out(rewards) : at::empty({0}, vs.options());
  const bool empty = rewards.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "vtrace", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kR, rewards, "rewards", rewards, "rewards");
    set_scalar(pb, keep, kV, rewards, "rewards", values, "values");
    set_scalar(pb, keep, kLR, rewards, "rewards", log_rhos, "log_rhos");
    set_scalar(pb, keep, kNV, rewards, "rewards", next_values, "next_values");
    set_flag(pb, keep, kTerm, rewards, "rewards", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards, "rewards", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards, "rewards", mask, "mask");
    pb.out[0] = vs.data_ptr<acc_t>();
    pb.out[1] = pg.data_ptr<acc_t>();
    pb.out[2] = save_carries ? next_x.data_ptr<acc_t>() : nullptr;
    pb.out[3] = save_carries ? next_v.data_ptr<acc_t>() : nullptr;
    const bool has_next = given(next_values);
    std::vector<acc_t> init(2 * g.num_seqs, acc_t(0));
    if (!has_next) set_initial(init, 1, g, bootstrap_value, "bootstrap_value");
    if (empty) return;
    run_scan<VtraceStepT<ScalarExp>, scalar_t, acc_t>(
        StepId::kVtrace, pb, vtrace_params_of<acc_t>(gamma, lam, rho_clip, c_clip, pg_rho_clip, has_next), true, init.data(), nullptr);
  });
  return {vs, pg, next_x, next_v};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vtrace_backward_cpu(
    const OptTensor& grad_vs, const OptTensor& grad_pg, const Tensor& rewards, const Tensor& values,
    const Tensor& log_rhos, const OptTensor& next_values, const OptTensor& saved_next_x,
    const OptTensor& saved_next_v, const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
    const OptTensor& cu_seqlens, double gamma, double lam, double rho_clip, double c_clip, double pg_rho_clip) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, "rewards", cu_seqlens);
  const bool has_next = given(next_values);
  Tensor grad_rewards = empty_out(rewards), grad_values = empty_out(rewards), grad_log_rhos = empty_out(rewards);
  Tensor grad_next = has_next ? empty_out(rewards) : at::empty({0}, grad_rewards.options());
  Tensor grad_boot = at::zeros(g.seq_shape, grad_rewards.options());
  const bool empty = rewards.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "vtrace_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kR, rewards, "rewards", rewards, "rewards");
    set_scalar(pb, keep, kV, rewards, "rewards", values, "values");
    set_scalar(pb, keep, kLR, rewards, "rewards", log_rhos, "log_rhos");
    set_scalar(pb, keep, kNV, rewards, "rewards", next_values, "next_values");
    set_acc(pb, keep, kG0, rewards, "rewards", grad_vs, "grad_vs");
    set_acc(pb, keep, kG1, rewards, "rewards", grad_pg, "grad_pg_advantages");
    set_acc(pb, keep, kS0, rewards, "rewards", saved_next_x, "saved_next_x");
    set_acc(pb, keep, kS1, rewards, "rewards", saved_next_v, "saved_next_v");
    set_flag(pb, keep, kTerm, rewards, "rewards", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards, "rewards", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards, "rewards", mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = grad_values.data_ptr<acc_t>();
    // Without the saved carries the log_rhos gradient is not needed (and not computable): not written.
    pb.out[2] = given(saved_next_x) && given(saved_next_v) ? grad_log_rhos.data_ptr<acc_t>() : nullptr;
    pb.out[3] = has_next ? grad_next.data_ptr<acc_t>() : nullptr;
    if (!pb.out[2]) grad_log_rhos.zero_();
    const auto params = vtrace_params_of<acc_t>(gamma, lam, rho_clip, c_clip, pg_rho_clip, has_next);
    std::vector<acc_t> final_carry(2 * g.num_seqs);
    if (empty) return;
    run_scan<VtraceBackwardStepT<ScalarExp>, scalar_t, acc_t>(StepId::kVtraceBackward, pb, params, false, nullptr, final_carry.data());
    acc_t* gb = grad_boot.data_ptr<acc_t>();
    for (int64_t s = 0; s < g.num_seqs; ++s) {
      const acc_t carry[2] = {final_carry[s], final_carry[g.num_seqs + s]};
      gb[s] = VtraceBackwardStepT<ScalarExp>::bootstrap_grad(params, carry);
    }
  });
  return {grad_rewards, grad_values, grad_log_rhos, grad_next, grad_boot};
}

Tensor retrace_cpu(const Tensor& rewards, const Tensor& q_taken, const Tensor& next_v, const Tensor& log_rhos,
                   const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
                   const OptTensor& cu_seqlens, double gamma, double lam, double c_clip) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, "rewards", cu_seqlens);
  Tensor out = empty_out(rewards);
  const bool empty = rewards.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "retrace", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kR, rewards, "rewards", rewards, "rewards");
    set_scalar(pb, keep, kV, rewards, "rewards", q_taken, "q_taken");
    set_scalar(pb, keep, kNV, rewards, "rewards", next_v, "next_v");
    set_scalar(pb, keep, kLR, rewards, "rewards", log_rhos, "log_rhos");
    set_flag(pb, keep, kTerm, rewards, "rewards", terminated, "terminated");
    set_flag(pb, keep, kTrunc, rewards, "rewards", truncated, "truncated");
    set_flag(pb, keep, kMask, rewards, "rewards", mask, "mask");
    pb.out[0] = out.data_ptr<acc_t>();
    // No bootstrap value: every sequence starts from a zero carry (init nullptr).
    if (empty) return;
    run_scan<RetraceStepT<ScalarExp>, scalar_t, acc_t>(
        StepId::kRetrace, pb, vtrace_params_of<acc_t>(gamma, lam, 1.0, c_clip, 1.0, false), true, nullptr, nullptr);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> retrace_backward_cpu(
    const Tensor& grad, const Tensor& targets, const Tensor& q_taken, const Tensor& log_rhos,
    const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask, const OptTensor& cu_seqlens,
    double gamma, double lam, double c_clip) {
  check_float(q_taken, "q_taken");
  const Geometry g = geometry_of(q_taken, "q_taken", cu_seqlens);
  Tensor grad_rewards = empty_out(q_taken), grad_q = empty_out(q_taken), grad_next = empty_out(q_taken),
         grad_log_rhos = empty_out(q_taken);
  const bool empty = q_taken.numel() == 0;  // checked below like any input, then nothing to compute
  RLK_DISPATCH_FLOATS(q_taken.scalar_type(), "retrace_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<acc_t> pb = problem_of<acc_t>(g);
    Inputs keep;
    set_scalar(pb, keep, kV, q_taken, "q_taken", q_taken, "q_taken");
    set_scalar(pb, keep, kLR, q_taken, "q_taken", log_rhos, "log_rhos");
    set_acc(pb, keep, kG0, q_taken, "q_taken", grad, "grad");
    set_acc(pb, keep, kS0, q_taken, "q_taken", targets, "targets");
    set_flag(pb, keep, kTerm, q_taken, "q_taken", terminated, "terminated");
    set_flag(pb, keep, kTrunc, q_taken, "q_taken", truncated, "truncated");
    set_flag(pb, keep, kMask, q_taken, "q_taken", mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = grad_q.data_ptr<acc_t>();
    pb.out[2] = grad_next.data_ptr<acc_t>();
    pb.out[3] = grad_log_rhos.data_ptr<acc_t>();
    if (empty) return;
    run_scan<RetraceBackwardStepT<ScalarExp>, scalar_t, acc_t>(
        StepId::kRetraceBackward, pb, vtrace_params_of<acc_t>(gamma, lam, 1.0, c_clip, 1.0, false), false, nullptr,
        nullptr);
  });
  return {grad_rewards, grad_q, grad_next, grad_log_rhos};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("linear_scan", &linear_scan_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cpu);
  m.impl("gae", &gae_cpu);
  m.impl("gae_backward", &gae_backward_cpu);
  m.impl("vtrace", &vtrace_cpu);
  m.impl("vtrace_backward", &vtrace_backward_cpu);
  m.impl("retrace", &retrace_cpu);
  m.impl("retrace_backward", &retrace_backward_cpu);
}

}  // namespace rlkernels::cpu
