// CUDA kernels of the reverse linear scan family: linear_scan, discounted_returns, gae, vtrace, retrace and their
// backwards. Each op checks its arguments and builds a Problem exactly as csrc/cpu/returns.cpp does, then
// runs the estimator's step with the CUDA engine (scan_engine.cuh, instantiated in the scan_part_*.cu files).
//
// Differences from the CPU ops, all forced by "no host synchronization" (docs/design.md §2):
//  * cu_seqlens stay on the device. Their dtype, shape and device are checked here; their values
//    (cu[0] = 0, non-decreasing, cu[-1] = the packed length) are the caller's responsibility. The kernels
//    clamp what they read, so bad offsets give wrong numbers, never out-of-bounds accesses.
//  * Everything runs on the current stream; temporaries come from the caching allocator.
#include "scan_problem.h"  // first: it names the inline namespace of the portable headers

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"
#include "rlkernels/layout.h"
#include "rlkernels/returns_args.h"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
namespace {

using at::Tensor;

// The canonical layout. Packed offsets are converted to int64 on the device, never read here.
struct Geometry : SeqLayout {
  int64_t numel = 0;
  Tensor cu;  // int64 offsets on the device, or undefined (dense)
};

Geometry geometry_of(const Tensor& ref, const OptTensor& cu_seqlens) {
  check_cuda(ref, "the inputs");
  Geometry g;
  if (given(cu_seqlens)) {
    static_cast<SeqLayout&>(g) = packed_layout(ref, "rewards", *cu_seqlens);
    g.cu = cu_seqlens->to(at::kLong).contiguous();
  } else {
    static_cast<SeqLayout&>(g) = dense_layout(ref);
  }
  g.numel = ref.numel();
  return g;
}

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> problem_of(const Geometry& g) {
  Problem<scalar_t, acc_t> pb;
  pb.outer = g.outer;
  pb.steps = g.steps;
  pb.inner = g.inner;
  pb.numel = g.numel;
  pb.num_seqs = g.num_seqs;
  pb.cu_seqlens = g.cu.defined() ? g.cu.data_ptr<int64_t>() : nullptr;
  return pb;
}

template <typename scalar_t>
const scalar_t* scalar_stream(Inputs& keep, const Tensor& ref, const OptTensor& t, const char* name) {
  if (!given(t)) return nullptr;
  check_like(*t, name, ref, "rewards");
  return static_cast<const scalar_t*>(keep.data(*t));
}

const uint8_t* flag_stream(Inputs& keep, const Tensor& ref, const OptTensor& t, const char* name) {
  if (!given(t)) return nullptr;
  check_flag(*t, name, ref, "rewards", ref.sizes());
  return static_cast<const uint8_t*>(keep.data(*t));
}

template <typename acc_t>
const acc_t* acc_stream(Inputs& keep, const Tensor& ref, const OptTensor& t, const char* name) {
  if (!given(t)) return nullptr;
  check_same_shape(*t, name, ref, "rewards");
  check_same_device(*t, name, ref, "rewards");
  return static_cast<const acc_t*>(keep.data(t->to(c10::CppTypeToScalarType<acc_t>::value)));
}

// Initial carries [D][num_seqs] in acc_t with `t` (one value per sequence) as carry j and zeros elsewhere;
// null when `t` is absent (all zeros).
template <typename acc_t>
const acc_t* initial_carries(Inputs& keep, int num_carries, int j, const Geometry& g, const Tensor& ref,
                             const OptTensor& t, const char* name) {
  if (!given(t)) return nullptr;
  check_per_sequence(*t, name, g);
  check_same_device(*t, name, ref, "rewards");
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  Tensor values = t->to(acc).reshape({g.num_seqs});
  Tensor init = at::zeros({num_carries, g.num_seqs}, ref.options().dtype(acc));
  init.select(0, j).copy_(values);
  keep.keep.push_back(init);
  return init.data_ptr<acc_t>();
}

// Packed outputs start zeroed: malformed cu_seqlens (not checked on the device, which would need a host sync)
// then leave zeros, never stale memory, at positions no segment covers.
Tensor empty_out(const Tensor& ref, const OptTensor& cu_seqlens = std::nullopt) {
  const auto opts = acc_options(ref);
  return given(cu_seqlens) ? at::zeros(ref.sizes(), opts) : at::empty(ref.sizes(), opts);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor linear_scan_cuda(const Tensor& a, const Tensor& b, const OptTensor& initial, bool reverse) {
  check_float(b, "b");
  const Geometry g = geometry_of(b, std::nullopt);
  const c10::cuda::CUDAGuard guard(b.device());
  Tensor out = empty_out(b);
  if (b.numel() == 0) return out;
  RLK_DISPATCH_FLOATS(b.scalar_type(), "linear_scan", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.a = scalar_stream<scalar_t>(keep, b, a, "a");
    pb.b = scalar_stream<scalar_t>(keep, b, b, "b");
    pb.out[0] = out.data_ptr<acc_t>();
    pb.init = initial_carries<acc_t>(keep, 1, 0, g, b, initial, "initial");
    run_scan<LinearScanStep>(pb, ScanParams<acc_t>{}, reverse, current_stream());
  });
  return out;
}

Tensor discounted_returns_cuda(const Tensor& rewards, const OptTensor& next_values, const OptTensor& bootstrap_value,
                               const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
                               const OptTensor& cu_seqlens, double gamma) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor out = empty_out(rewards, cu_seqlens);
  if (rewards.numel() == 0) return out;
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "discounted_returns", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.r = scalar_stream<scalar_t>(keep, rewards, rewards, "rewards");
    pb.nv = scalar_stream<scalar_t>(keep, rewards, next_values, "next_values");
    pb.term = flag_stream(keep, rewards, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards, mask, "mask");
    pb.out[0] = out.data_ptr<acc_t>();
    const bool has_next = given(next_values);
    if (!has_next) pb.init = initial_carries<acc_t>(keep, 1, 0, g, rewards, bootstrap_value, "bootstrap_value");
    run_scan<DiscountedReturnsStep>(pb, params_of<acc_t>(gamma, 1.0, has_next), true, current_stream());
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> discounted_returns_backward_cuda(
    const OptTensor& grad, const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
    const OptTensor& cu_seqlens, const Tensor& rewards_like, double gamma, bool has_next) {
  const Geometry g = geometry_of(rewards_like, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards_like.device());
  Tensor grad_rewards = empty_out(rewards_like, cu_seqlens);
  Tensor grad_next = has_next ? empty_out(rewards_like, cu_seqlens) : at::empty({0}, grad_rewards.options());
  Tensor grad_boot = at::zeros(g.seq_shape, grad_rewards.options());
  if (rewards_like.numel() == 0) return {grad_rewards, grad_next, grad_boot};
  AT_DISPATCH_FLOATING_TYPES(grad_rewards.scalar_type(), "discounted_returns_backward", [&] {
    using acc_t = scalar_t;
    auto pb = problem_of<acc_t, acc_t>(g);
    Inputs keep;
    pb.g0 = acc_stream<acc_t>(keep, rewards_like, grad, "grad");
    pb.term = flag_stream(keep, rewards_like, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards_like, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards_like, mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = has_next ? grad_next.data_ptr<acc_t>() : nullptr;
    pb.bootstrap_grad = grad_boot.data_ptr<acc_t>();
    run_scan<DiscountedReturnsBackwardStep>(pb, params_of<acc_t>(gamma, 1.0, has_next), false, current_stream());
  });
  return {grad_rewards, grad_next, grad_boot};
}

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards, const Tensor& values, const OptTensor& next_values,
                                    const OptTensor& bootstrap_value, const OptTensor& terminated,
                                    const OptTensor& truncated, const OptTensor& mask, const OptTensor& cu_seqlens,
                                    double gamma, double lam) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor adv = empty_out(rewards, cu_seqlens), ret = empty_out(rewards, cu_seqlens);
  if (rewards.numel() == 0) return {adv, ret};
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "gae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.r = scalar_stream<scalar_t>(keep, rewards, rewards, "rewards");
    pb.v = scalar_stream<scalar_t>(keep, rewards, values, "values");
    pb.nv = scalar_stream<scalar_t>(keep, rewards, next_values, "next_values");
    pb.term = flag_stream(keep, rewards, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards, mask, "mask");
    pb.out[0] = adv.data_ptr<acc_t>();
    pb.out[1] = ret.data_ptr<acc_t>();
    const bool has_next = given(next_values);
    if (!has_next) pb.init = initial_carries<acc_t>(keep, 2, 1, g, rewards, bootstrap_value, "bootstrap_value");
    run_scan<GaeStep>(pb, params_of<acc_t>(gamma, lam, has_next), true, current_stream());
  });
  return {adv, ret};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gae_backward_cuda(const OptTensor& grad_adv, const OptTensor& grad_ret,
                                                             const OptTensor& terminated, const OptTensor& truncated,
                                                             const OptTensor& mask, const OptTensor& cu_seqlens,
                                                             const Tensor& rewards_like, double gamma, double lam,
                                                             bool has_next) {
  const Geometry g = geometry_of(rewards_like, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards_like.device());
  Tensor grad_rewards = empty_out(rewards_like, cu_seqlens), grad_values = empty_out(rewards_like, cu_seqlens);
  Tensor grad_next = has_next ? empty_out(rewards_like, cu_seqlens) : at::empty({0}, grad_rewards.options());
  Tensor grad_boot = at::zeros(g.seq_shape, grad_rewards.options());
  if (rewards_like.numel() == 0) return {grad_rewards, grad_values, grad_next, grad_boot};
  AT_DISPATCH_FLOATING_TYPES(grad_rewards.scalar_type(), "gae_backward", [&] {
    using acc_t = scalar_t;
    auto pb = problem_of<acc_t, acc_t>(g);
    Inputs keep;
    pb.g0 = acc_stream<acc_t>(keep, rewards_like, grad_adv, "grad_advantages");
    pb.g1 = acc_stream<acc_t>(keep, rewards_like, grad_ret, "grad_returns");
    pb.term = flag_stream(keep, rewards_like, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards_like, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards_like, mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = grad_values.data_ptr<acc_t>();
    pb.out[2] = has_next ? grad_next.data_ptr<acc_t>() : nullptr;
    pb.bootstrap_grad = grad_boot.data_ptr<acc_t>();
    run_scan<GaeBackwardStep>(pb, params_of<acc_t>(gamma, lam, has_next), false, current_stream());
  });
  return {grad_rewards, grad_values, grad_next, grad_boot};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> vtrace_cuda(const Tensor& rewards, const Tensor& values,
                                                       const Tensor& log_rhos, const OptTensor& next_values,
                                                       const OptTensor& bootstrap_value, const OptTensor& terminated,
                                                       const OptTensor& truncated, const OptTensor& mask,
                                                       const OptTensor& cu_seqlens, double gamma, double lam,
                                                       double rho_clip, double c_clip, double pg_rho_clip,
                                                       bool save_carries) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor vs = empty_out(rewards, cu_seqlens), pg = empty_out(rewards, cu_seqlens);
  Tensor next_x = save_carries ? empty_out(rewards, cu_seqlens) : at::empty({0}, vs.options());
  Tensor next_v = save_carries ? empty_out(rewards, cu_seqlens) : at::empty({0}, vs.options());
  if (rewards.numel() == 0) return {vs, pg, next_x, next_v};
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "vtrace", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.r = scalar_stream<scalar_t>(keep, rewards, rewards, "rewards");
    pb.v = scalar_stream<scalar_t>(keep, rewards, values, "values");
    pb.lr = scalar_stream<scalar_t>(keep, rewards, log_rhos, "log_rhos");
    pb.nv = scalar_stream<scalar_t>(keep, rewards, next_values, "next_values");
    pb.term = flag_stream(keep, rewards, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards, mask, "mask");
    pb.out[0] = vs.data_ptr<acc_t>();
    pb.out[1] = pg.data_ptr<acc_t>();
    pb.out[2] = save_carries ? next_x.data_ptr<acc_t>() : nullptr;
    pb.out[3] = save_carries ? next_v.data_ptr<acc_t>() : nullptr;
    const bool has_next = given(next_values);
    if (!has_next) pb.init = initial_carries<acc_t>(keep, 2, 1, g, rewards, bootstrap_value, "bootstrap_value");
    run_scan<VtraceStep>(pb, vtrace_params_of<acc_t>(gamma, lam, rho_clip, c_clip, pg_rho_clip, has_next), true,
                         current_stream());
  });
  return {vs, pg, next_x, next_v};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vtrace_backward_cuda(
    const OptTensor& grad_vs, const OptTensor& grad_pg, const Tensor& rewards, const Tensor& values,
    const Tensor& log_rhos, const OptTensor& next_values, const OptTensor& saved_next_x,
    const OptTensor& saved_next_v, const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
    const OptTensor& cu_seqlens, double gamma, double lam, double rho_clip, double c_clip, double pg_rho_clip) {
  const Geometry g = geometry_of(rewards, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const bool has_next = given(next_values);
  Tensor grad_rewards = empty_out(rewards, cu_seqlens), grad_values = empty_out(rewards, cu_seqlens);
  Tensor grad_log_rhos = empty_out(rewards, cu_seqlens);
  Tensor grad_next = has_next ? empty_out(rewards, cu_seqlens) : at::empty({0}, grad_rewards.options());
  Tensor grad_boot = at::zeros(g.seq_shape, grad_rewards.options());
  if (rewards.numel() == 0) return {grad_rewards, grad_values, grad_log_rhos, grad_next, grad_boot};
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "vtrace_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.r = scalar_stream<scalar_t>(keep, rewards, rewards, "rewards");
    pb.v = scalar_stream<scalar_t>(keep, rewards, values, "values");
    pb.lr = scalar_stream<scalar_t>(keep, rewards, log_rhos, "log_rhos");
    pb.nv = scalar_stream<scalar_t>(keep, rewards, next_values, "next_values");
    pb.g0 = acc_stream<acc_t>(keep, rewards, grad_vs, "grad_vs");
    pb.g1 = acc_stream<acc_t>(keep, rewards, grad_pg, "grad_pg_advantages");
    pb.s0 = acc_stream<acc_t>(keep, rewards, saved_next_x, "saved_next_x");
    pb.s1 = acc_stream<acc_t>(keep, rewards, saved_next_v, "saved_next_v");
    pb.term = flag_stream(keep, rewards, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards, mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = grad_values.data_ptr<acc_t>();
    // Without the saved carries the log_rhos gradient is not needed (and not computable): not written.
    pb.out[2] = given(saved_next_x) && given(saved_next_v) ? grad_log_rhos.data_ptr<acc_t>() : nullptr;
    pb.out[3] = has_next ? grad_next.data_ptr<acc_t>() : nullptr;
    if (!pb.out[2]) grad_log_rhos.zero_();
    pb.bootstrap_grad = grad_boot.data_ptr<acc_t>();
    run_scan<VtraceBackwardStep>(pb, vtrace_params_of<acc_t>(gamma, lam, rho_clip, c_clip, pg_rho_clip, has_next),
                                 false, current_stream());
  });
  return {grad_rewards, grad_values, grad_log_rhos, grad_next, grad_boot};
}

Tensor retrace_cuda(const Tensor& rewards, const Tensor& q_taken, const Tensor& next_v, const Tensor& log_rhos,
                    const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
                    const OptTensor& cu_seqlens, double gamma, double lam, double c_clip) {
  check_float(rewards, "rewards");
  const Geometry g = geometry_of(rewards, cu_seqlens);
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor out = empty_out(rewards, cu_seqlens);
  if (rewards.numel() == 0) return out;
  RLK_DISPATCH_FLOATS(rewards.scalar_type(), "retrace", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.r = scalar_stream<scalar_t>(keep, rewards, rewards, "rewards");
    pb.v = scalar_stream<scalar_t>(keep, rewards, q_taken, "q_taken");
    pb.nv = scalar_stream<scalar_t>(keep, rewards, next_v, "next_v");
    pb.lr = scalar_stream<scalar_t>(keep, rewards, log_rhos, "log_rhos");
    pb.term = flag_stream(keep, rewards, terminated, "terminated");
    pb.trunc = flag_stream(keep, rewards, truncated, "truncated");
    pb.mask = flag_stream(keep, rewards, mask, "mask");
    pb.out[0] = out.data_ptr<acc_t>();
    run_scan<RetraceStepT<CudaExp>>(pb, vtrace_params_of<acc_t>(gamma, lam, 1.0, c_clip, 1.0, false), true, current_stream());
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> retrace_backward_cuda(
    const Tensor& grad, const Tensor& targets, const Tensor& q_taken, const Tensor& log_rhos,
    const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask, const OptTensor& cu_seqlens,
    double gamma, double lam, double c_clip) {
  check_float(q_taken, "q_taken");
  const Geometry g = geometry_of(q_taken, cu_seqlens);
  const c10::cuda::CUDAGuard guard(q_taken.device());
  Tensor grad_rewards = empty_out(q_taken, cu_seqlens), grad_q = empty_out(q_taken, cu_seqlens);
  Tensor grad_next = empty_out(q_taken, cu_seqlens), grad_log_rhos = empty_out(q_taken, cu_seqlens);
  if (q_taken.numel() == 0) return {grad_rewards, grad_q, grad_next, grad_log_rhos};
  RLK_DISPATCH_FLOATS(q_taken.scalar_type(), "retrace_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pb = problem_of<scalar_t, acc_t>(g);
    Inputs keep;
    pb.v = scalar_stream<scalar_t>(keep, q_taken, q_taken, "q_taken");
    pb.lr = scalar_stream<scalar_t>(keep, q_taken, log_rhos, "log_rhos");
    pb.g0 = acc_stream<acc_t>(keep, q_taken, grad, "grad");
    pb.s0 = acc_stream<acc_t>(keep, q_taken, targets, "targets");
    pb.term = flag_stream(keep, q_taken, terminated, "terminated");
    pb.trunc = flag_stream(keep, q_taken, truncated, "truncated");
    pb.mask = flag_stream(keep, q_taken, mask, "mask");
    pb.out[0] = grad_rewards.data_ptr<acc_t>();
    pb.out[1] = grad_q.data_ptr<acc_t>();
    pb.out[2] = grad_next.data_ptr<acc_t>();
    pb.out[3] = grad_log_rhos.data_ptr<acc_t>();
    run_scan<RetraceBackwardStepT<CudaExp>>(pb, vtrace_params_of<acc_t>(gamma, lam, 1.0, c_clip, 1.0, false), false,
                                  current_stream());
  });
  return {grad_rewards, grad_q, grad_next, grad_log_rhos};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("linear_scan", &linear_scan_cuda);
  m.impl("discounted_returns", &discounted_returns_cuda);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cuda);
  m.impl("gae", &gae_cuda);
  m.impl("gae_backward", &gae_backward_cuda);
  m.impl("vtrace", &vtrace_cuda);
  m.impl("vtrace_backward", &vtrace_backward_cuda);
  m.impl("retrace", &retrace_cuda);
  m.impl("retrace_backward", &retrace_backward_cuda);
}

}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
