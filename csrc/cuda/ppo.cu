// CUDA kernels of the PPO loss family (docs/design.md §4.4): ppo_policy_loss, value_loss, kl_penalty and their
// backwards. The per-token math is csrc/include/rlkernels/ppo.h, shared with the CPU kernels
// (csrc/cpu/ppo.cpp), whose semantics these follow: masked tokens are never read, float64 sums, the loss and
// every statistic 0 when no token counts, gradients with torch autograd's tie conventions.
//
// Reductions are deterministic, with no atomics: the [B, T] input is cut into a fixed grid of units, a unit
// being up to kUnitTokens tokens of one row and a warp's work. Each lane sums its strided tokens in order,
// the warp merges its lanes with a fixed shuffle tree and writes one Partial per unit. A second kernel of one
// block then sums the units of each row in order (the per-row sums that the seq-mean modes need), the rows
// in a fixed thread/tree order, and writes the loss and the statistics as 0-d device tensors. The grid
// depends only on the shape, so the results are bit-identical run to run.
//
// Backward: d loss / d l_t is a per-row weight (1 / sum(m), 1 / B, 1 / (count_b * rows with a token), or
// 1 / (B * norm_length)) times the upstream gradient, which stays on the device. Where the weights need
// token counts (a mask with token-mean or seq-mean-token-mean) one kernel counts each unit's mask, a
// one-block kernel turns the counts into per-row weights, and the elementwise kernel scales each token's
// derivative by its row's weight.
//
// kl_penalty and its backward are elementwise grid-stride kernels over any shape.
//
// Nothing here synchronizes with the host (a CPU grad_loss is copied to the device, which is the caller's
// choice); everything runs on the current stream. The ppo.h functions are called from device code only, so
// nvcc emits no host copies of them to merge with the CPU objects'.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"
#include "rlkernels/ppo.h"
#include "rlkernels/ppo_args.h"

namespace rlkernels {
namespace cuda_ppo {
namespace {

using at::Tensor;
using namespace rlkernels::ppo;

constexpr int kWarp = 32;
constexpr int kUnitsPerBlock = 8;  // warps per block of the unit kernels
constexpr int kUnitThreads = kWarp * kUnitsPerBlock;
constexpr int64_t kUnitTokens = 1024;  // tokens of one row per unit (per warp)
constexpr int kFinalThreads = 256;     // the one-block kernels
constexpr int kElementThreads = 256;   // kl_penalty

// ---- device side ----

// Sums of one unit, row or batch (float64, as on CPU). ratio_max is -inf until a token counts; NaN sticks.
struct Partial {
  double loss, count, clipped, lower, kl, ratio, ratio_max;
};

__device__ __forceinline__ Partial empty_partial() {
  return Partial{0, 0, 0, 0, 0, 0, -std::numeric_limits<double>::infinity()};
}

__device__ __forceinline__ void take_max(Partial& a, double r) {
  if (r != r || r > a.ratio_max) a.ratio_max = r;  // r != r: NaN
}

__device__ __forceinline__ void add(Partial& a, const Partial& b) {
  a.loss += b.loss;
  a.count += b.count;
  a.clipped += b.clipped;
  a.lower += b.lower;
  a.kl += b.kl;
  a.ratio += b.ratio;
  take_max(a, b.ratio_max);
}

__device__ __forceinline__ Partial warp_sum(Partial p) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    Partial o;
    o.loss = __shfl_down_sync(0xffffffffu, p.loss, off);
    o.count = __shfl_down_sync(0xffffffffu, p.count, off);
    o.clipped = __shfl_down_sync(0xffffffffu, p.clipped, off);
    o.lower = __shfl_down_sync(0xffffffffu, p.lower, off);
    o.kl = __shfl_down_sync(0xffffffffu, p.kl, off);
    o.ratio = __shfl_down_sync(0xffffffffu, p.ratio, off);
    o.ratio_max = __shfl_down_sync(0xffffffffu, p.ratio_max, off);
    add(p, o);
  }
  return p;  // lane 0 holds the warp's sums
}

template <typename scalar_t, typename acc_t>
struct PolicyOp {
  const scalar_t* logp;
  const scalar_t* old_logp;
  const scalar_t* adv;
  PolicyParams<acc_t> p;

  __device__ __forceinline__ void add_token(int64_t i, Partial& part) const {
    const acc_t l = static_cast<acc_t>(logp[i]), o = static_cast<acc_t>(old_logp[i]);
    const PolicyToken<acc_t> tok = policy_token<acc_t>(l, o, static_cast<acc_t>(adv[i]), p);
    part.loss += tok.loss;
    part.count += 1;
    part.clipped += tok.clipped ? 1.0 : 0.0;
    part.lower += tok.lower ? 1.0 : 0.0;
    part.kl += o - l;
    part.ratio += tok.ratio;
    take_max(part, tok.ratio);
  }
  __device__ __forceinline__ acc_t grad(int64_t i) const {
    return policy_token_grad<acc_t>(static_cast<acc_t>(logp[i]), static_cast<acc_t>(old_logp[i]),
                                    static_cast<acc_t>(adv[i]), p);
  }
};

template <typename scalar_t, typename acc_t>
struct ValueOp {
  const scalar_t* values;
  const scalar_t* old_values;
  const scalar_t* returns;
  bool has_clip;
  acc_t clip;

  __device__ __forceinline__ void add_token(int64_t i, Partial& part) const {
    const ValueToken<acc_t> tok = value_token<acc_t>(static_cast<acc_t>(values[i]), static_cast<acc_t>(old_values[i]),
                                                     static_cast<acc_t>(returns[i]), has_clip, clip);
    part.loss += tok.loss;
    part.count += 1;
    part.clipped += tok.clipped ? 1.0 : 0.0;
  }
  __device__ __forceinline__ acc_t grad(int64_t i) const {
    return value_token_grad<acc_t>(static_cast<acc_t>(values[i]), static_cast<acc_t>(old_values[i]),
                                   static_cast<acc_t>(returns[i]), has_clip, clip);
  }
};

// The unit grid: unit u covers tokens [t0, t1) of row b.
struct Units {
  int64_t B, T, per_row, count;
};

Units units_of(int64_t B, int64_t T) {
  Units u;
  u.B = B;
  u.T = T;
  u.per_row = (T + kUnitTokens - 1) / kUnitTokens;
  u.count = B * u.per_row;
  return u;
}

struct UnitPos {
  int64_t row, t0, t1;
};

__device__ __forceinline__ UnitPos unit_pos(const Units& g, int64_t u) {
  UnitPos p;
  p.row = u / g.per_row;
  p.t0 = (u % g.per_row) * kUnitTokens;
  p.t1 = p.t0 + kUnitTokens < g.T ? p.t0 + kUnitTokens : g.T;
  return p;
}

template <typename Op>
__global__ void __launch_bounds__(kUnitThreads)
    reduce_units(const Op op, const uint8_t* __restrict__ mask, const Units g, Partial* __restrict__ parts) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kUnitsPerBlock + threadIdx.x / kWarp;
  if (u >= g.count) return;  // the whole warp leaves together
  const int lane = threadIdx.x % kWarp;
  const UnitPos pos = unit_pos(g, u);
  const int64_t base = pos.row * g.T;
  Partial part = empty_partial();
#pragma unroll 4
  for (int64_t t = pos.t0 + lane; t < pos.t1; t += kWarp) {
    const int64_t i = base + t;
    if (mask != nullptr && mask[i] == 0) continue;  // masked tokens are never read
    op.add_token(i, part);
  }
  part = warp_sum(part);
  if (lane == 0) parts[u] = part;
}

template <typename acc_t>
struct Outputs {
  acc_t* out[6];  // policy: loss, clipfrac, clipfrac_lower, approx_kl, ratio_mean, ratio_max; value: loss, vf_clipfrac
  int n;
};

__device__ __forceinline__ double mean_or_zero(double sum, double count) { return count > 0 ? sum / count : 0.0; }

// One block: per-row sums of the units in order, the batch totals over a fixed tree, then the outputs.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    finalize(const Partial* __restrict__ parts, const Units g, const int agg, const double norm_length,
             const Outputs<acc_t> outs) {
  __shared__ Partial sp[kFinalThreads];
  __shared__ double s_seq[kFinalThreads], s_nonempty[kFinalThreads];
  const int tid = threadIdx.x;
  Partial total = empty_partial();
  double seq_sum = 0, nonempty = 0;
  for (int64_t b = tid; b < g.B; b += kFinalThreads) {
    Partial row = empty_partial();
    for (int64_t k = 0; k < g.per_row; ++k) add(row, parts[b * g.per_row + k]);
    add(total, row);
    if (row.count > 0) {
      seq_sum += row.loss / row.count;
      nonempty += 1;
    }
  }
  sp[tid] = total;
  s_seq[tid] = seq_sum;
  s_nonempty[tid] = nonempty;
  __syncthreads();
  for (int s = kFinalThreads / 2; s > 0; s /= 2) {
    if (tid < s) {
      add(sp[tid], sp[tid + s]);
      s_seq[tid] += s_seq[tid + s];
      s_nonempty[tid] += s_nonempty[tid + s];
    }
    __syncthreads();
  }
  if (tid != 0) return;
  const Partial t = sp[0];
  const double B = static_cast<double>(g.B);
  double loss;
  switch (agg) {
    case kTokenMean:
      loss = mean_or_zero(t.loss, t.count);
      break;
    case kSeqMeanTokenSum:
      loss = mean_or_zero(t.loss, B);
      break;
    case kSeqMeanTokenMean:
      loss = mean_or_zero(s_seq[0], s_nonempty[0]);
      break;
    default:
      loss = mean_or_zero(t.loss, B * norm_length);
  }
  outs.out[0][0] = static_cast<acc_t>(loss);
  if (outs.n == 2) {
    outs.out[1][0] = static_cast<acc_t>(mean_or_zero(t.clipped, t.count));
    return;
  }
  outs.out[1][0] = static_cast<acc_t>(mean_or_zero(t.clipped, t.count));
  outs.out[2][0] = static_cast<acc_t>(mean_or_zero(t.lower, t.count));
  outs.out[3][0] = static_cast<acc_t>(mean_or_zero(t.kl, t.count));
  outs.out[4][0] = static_cast<acc_t>(mean_or_zero(t.ratio, t.count));
  outs.out[5][0] = static_cast<acc_t>(t.count > 0 ? t.ratio_max : 0.0);
}

// Unmasked tokens of each unit (backward, when the weights need counts).
__global__ void __launch_bounds__(kUnitThreads)
    count_units(const uint8_t* __restrict__ mask, const Units g, double* __restrict__ counts) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kUnitsPerBlock + threadIdx.x / kWarp;
  if (u >= g.count) return;
  const int lane = threadIdx.x % kWarp;
  const UnitPos pos = unit_pos(g, u);
  const int64_t base = pos.row * g.T;
  int n = 0;
  for (int64_t t = pos.t0 + lane; t < pos.t1; t += kWarp) n += mask[base + t] != 0 ? 1 : 0;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) n += __shfl_down_sync(0xffffffffu, n, off);
  if (lane == 0) counts[u] = static_cast<double>(n);
}

__device__ __forceinline__ double row_count(const double* counts, const Units& g, int64_t b) {
  if (counts == nullptr) return static_cast<double>(g.T);
  double c = 0;
  for (int64_t k = 0; k < g.per_row; ++k) c += counts[b * g.per_row + k];
  return c;
}

// One block: w[b] = grad_loss * d loss / d l_t for the unmasked tokens of row b (csrc/cpu/ppo.cpp, token_weights).
__global__ void __launch_bounds__(kFinalThreads)
    row_weights(const double* __restrict__ counts, const Units g, const int agg, const double norm_length,
                const double* __restrict__ grad_loss, double* __restrict__ w) {
  __shared__ double s_total[kFinalThreads], s_nonempty[kFinalThreads];
  const int tid = threadIdx.x;
  double total = 0, nonempty = 0;
  if (agg == kTokenMean || agg == kSeqMeanTokenMean) {
    for (int64_t b = tid; b < g.B; b += kFinalThreads) {
      const double c = row_count(counts, g, b);
      total += c;
      nonempty += c > 0 ? 1.0 : 0.0;
    }
  }
  s_total[tid] = total;
  s_nonempty[tid] = nonempty;
  __syncthreads();
  for (int s = kFinalThreads / 2; s > 0; s /= 2) {
    if (tid < s) {
      s_total[tid] += s_total[tid + s];
      s_nonempty[tid] += s_nonempty[tid + s];
    }
    __syncthreads();
  }
  total = s_total[0];
  nonempty = s_nonempty[0];
  const double gl = grad_loss[0];
  const double B = static_cast<double>(g.B);
  for (int64_t b = tid; b < g.B; b += kFinalThreads) {
    double wb;
    switch (agg) {
      case kTokenMean:
        wb = total > 0 ? 1.0 / total : 0.0;
        break;
      case kSeqMeanTokenSum:
        wb = 1.0 / B;
        break;
      case kSeqMeanTokenMean: {
        const double c = row_count(counts, g, b);
        wb = c > 0 ? 1.0 / (c * nonempty) : 0.0;
        break;
      }
      default:
        wb = 1.0 / (B * norm_length);
    }
    w[b] = gl * wb;
  }
}

template <typename Op, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUnitThreads)
    grad_units(const Op op, const uint8_t* __restrict__ mask, const Units g, const double* __restrict__ w,
               scalar_t* __restrict__ out) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kUnitsPerBlock + threadIdx.x / kWarp;
  if (u >= g.count) return;
  const int lane = threadIdx.x % kWarp;
  const UnitPos pos = unit_pos(g, u);
  const int64_t base = pos.row * g.T;
  const acc_t scale = static_cast<acc_t>(w[pos.row]);
#pragma unroll 4
  for (int64_t t = pos.t0 + lane; t < pos.t1; t += kWarp) {
    const int64_t i = base + t;
    acc_t d = 0;
    if (mask == nullptr || mask[i] != 0) d = scale * op.grad(i);
    out[i] = static_cast<scalar_t>(d);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads)
    kl_forward(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ ref, int64_t n, KlKind kind,
               acc_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = kl_token<acc_t>(static_cast<acc_t>(logp[i]), static_cast<acc_t>(ref[i]), kind);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads)
    kl_backward(const acc_t* __restrict__ grad, const scalar_t* __restrict__ logp, const scalar_t* __restrict__ ref,
                int64_t n, KlKind kind, scalar_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = static_cast<scalar_t>(
        grad[i] * kl_token_grad<acc_t>(static_cast<acc_t>(logp[i]), static_cast<acc_t>(ref[i]), kind));
}

// ---- host side ----

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

unsigned unit_blocks(const Units& g) {
  const int64_t blocks = (g.count + kUnitsPerBlock - 1) / kUnitsPerBlock;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "rlkernels: too many tokens for one launch (",
                    g.B, " x ", g.T, ")");
  return static_cast<unsigned>(blocks);
}

unsigned element_blocks(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kElementThreads) * 4;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));  // grid-stride beyond
}

Tensor scalar_like(const Tensor& ref) { return at::empty({}, acc_options(ref)); }

// The upstream gradient of a loss as a float64 scalar on the inputs' device (no host read).
Tensor grad_scalar(const Tensor& grad_loss, const Tensor& ref) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "rlkernels: the loss gradient must be a scalar, got ", grad_loss.sizes());
  return grad_loss.to(ref.device(), at::kDouble).reshape({1}).contiguous();
}

// Runs the unit reduction of `op` and the finalize kernel into outs.
template <typename Op, typename acc_t>
void run_loss(const Op& op, const uint8_t* mask, const Units& g, Agg agg, double norm_length, const Tensor& ref,
              const Outputs<acc_t>& outs) {
  cudaStream_t stream = current_stream();
  Tensor parts = at::empty({g.count * static_cast<int64_t>(sizeof(Partial) / sizeof(double))},
                           ref.options().dtype(at::kDouble));
  Partial* parts_p = reinterpret_cast<Partial*>(parts.data_ptr<double>());
  if (g.count > 0) {
    reduce_units<Op><<<unit_blocks(g), kUnitThreads, 0, stream>>>(op, mask, g, parts_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize<acc_t><<<1, kFinalThreads, 0, stream>>>(parts_p, g, static_cast<int>(agg), norm_length, outs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-row weights times the upstream gradient, then the elementwise gradient of `op` into out.
template <typename Op, typename scalar_t, typename acc_t>
void run_grad(const Op& op, const uint8_t* mask, const Units& g, Agg agg, double norm_length, const Tensor& ref,
              const Tensor& grad_loss, scalar_t* out) {
  if (g.count == 0) return;
  cudaStream_t stream = current_stream();
  const auto dbl = ref.options().dtype(at::kDouble);
  Tensor counts;
  const bool need_counts = mask != nullptr && (agg == kTokenMean || agg == kSeqMeanTokenMean);
  if (need_counts) {
    counts = at::empty({g.count}, dbl);
    count_units<<<unit_blocks(g), kUnitThreads, 0, stream>>>(mask, g, counts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const Tensor gl = grad_scalar(grad_loss, ref);
  Tensor w = at::empty({g.B}, dbl);
  row_weights<<<1, kFinalThreads, 0, stream>>>(need_counts ? counts.const_data_ptr<double>() : nullptr, g,
                                               static_cast<int>(agg), norm_length, gl.const_data_ptr<double>(),
                                               w.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_units<Op, scalar_t, acc_t><<<unit_blocks(g), kUnitThreads, 0, stream>>>(op, mask, g, w.const_data_ptr<double>(),
                                                                                out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- ppo_policy_loss ----

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ppo_policy_loss_cuda(
    const Tensor& logp, const Tensor& old_logp, const Tensor& advantages, const OptTensor& mask, double clip_low,
    double clip_high, std::optional<double> dual_clip, c10::string_view agg_name, double norm_length) {
  check_cuda(logp, "logp");
  check_loss_inputs(logp, "logp", old_logp, "old_logp", advantages, "advantages");
  const Agg agg = agg_of(agg_name);
  TORCH_CHECK_VALUE(norm_length > 0, "rlkernels: norm_length must be > 0, got ", norm_length);
  const c10::cuda::CUDAGuard guard(logp.device());
  const Units g = units_of(logp.size(0), logp.size(1));
  Tensor lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(), mask_keep;
  const uint8_t* m = mask_data(logp, "logp", mask, mask_keep);
  Tensor outs[6];
  for (auto& o : outs) o = scalar_like(logp);
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "ppo_policy_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PolicyOp<scalar_t, acc_t> op{lp.const_data_ptr<scalar_t>(), old.const_data_ptr<scalar_t>(),
                                 adv.const_data_ptr<scalar_t>(), policy_params<acc_t>(clip_low, clip_high, dual_clip)};
    Outputs<acc_t> o;
    for (int i = 0; i < 6; ++i) o.out[i] = outs[i].data_ptr<acc_t>();
    o.n = 6;
    run_loss(op, m, g, agg, norm_length, logp, o);
  });
  return {outs[0], outs[1], outs[2], outs[3], outs[4], outs[5]};
}

Tensor ppo_policy_loss_backward_cuda(const Tensor& grad_loss, const Tensor& logp, const Tensor& old_logp,
                                     const Tensor& advantages, const OptTensor& mask, double clip_low,
                                     double clip_high, std::optional<double> dual_clip, c10::string_view agg_name,
                                     double norm_length) {
  check_cuda(logp, "logp");
  check_loss_inputs(logp, "logp", old_logp, "old_logp", advantages, "advantages");
  const Agg agg = agg_of(agg_name);
  TORCH_CHECK_VALUE(norm_length > 0, "rlkernels: norm_length must be > 0, got ", norm_length);
  const c10::cuda::CUDAGuard guard(logp.device());
  const Units g = units_of(logp.size(0), logp.size(1));
  Tensor lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(), mask_keep;
  const uint8_t* m = mask_data(logp, "logp", mask, mask_keep);
  Tensor grad = at::empty({g.B, g.T}, lp.options());
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "ppo_policy_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PolicyOp<scalar_t, acc_t> op{lp.const_data_ptr<scalar_t>(), old.const_data_ptr<scalar_t>(),
                                 adv.const_data_ptr<scalar_t>(), policy_params<acc_t>(clip_low, clip_high, dual_clip)};
    run_grad<PolicyOp<scalar_t, acc_t>, scalar_t, acc_t>(op, m, g, agg, norm_length, logp, grad_loss,
                                                         grad.data_ptr<scalar_t>());
  });
  return grad;
}

// ---- value_loss ----

std::tuple<Tensor, Tensor> value_loss_cuda(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                                           const OptTensor& mask, std::optional<double> clip,
                                           c10::string_view agg_name) {
  check_cuda(values, "values");
  check_loss_inputs(values, "values", old_values, "old_values", returns, "returns");
  TORCH_CHECK_VALUE(!clip.has_value() || *clip >= 0, "rlkernels: clip must be >= 0, got ", clip.value_or(0.0));
  const Agg agg = agg_of(agg_name);
  const c10::cuda::CUDAGuard guard(values.device());
  const Units g = units_of(values.size(0), values.size(1));
  Tensor v = values.contiguous(), old = old_values.contiguous(), ret = returns.contiguous(), mask_keep;
  const uint8_t* m = mask_data(values, "values", mask, mask_keep);
  Tensor loss = scalar_like(values), clipfrac = scalar_like(values);
  RLK_DISPATCH_FLOATS(v.scalar_type(), "value_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ValueOp<scalar_t, acc_t> op{v.const_data_ptr<scalar_t>(), old.const_data_ptr<scalar_t>(),
                                ret.const_data_ptr<scalar_t>(), clip.has_value(),
                                static_cast<acc_t>(clip.value_or(0.0))};
    Outputs<acc_t> o;
    o.out[0] = loss.data_ptr<acc_t>();
    o.out[1] = clipfrac.data_ptr<acc_t>();
    for (int i = 2; i < 6; ++i) o.out[i] = nullptr;
    o.n = 2;
    run_loss(op, m, g, agg, static_cast<double>(g.T), values, o);
  });
  return {loss, clipfrac};
}

Tensor value_loss_backward_cuda(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                                const Tensor& returns, const OptTensor& mask, std::optional<double> clip,
                                c10::string_view agg_name) {
  check_cuda(values, "values");
  check_loss_inputs(values, "values", old_values, "old_values", returns, "returns");
  const Agg agg = agg_of(agg_name);
  const c10::cuda::CUDAGuard guard(values.device());
  const Units g = units_of(values.size(0), values.size(1));
  Tensor v = values.contiguous(), old = old_values.contiguous(), ret = returns.contiguous(), mask_keep;
  const uint8_t* m = mask_data(values, "values", mask, mask_keep);
  Tensor grad = at::empty({g.B, g.T}, v.options());
  RLK_DISPATCH_FLOATS(v.scalar_type(), "value_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ValueOp<scalar_t, acc_t> op{v.const_data_ptr<scalar_t>(), old.const_data_ptr<scalar_t>(),
                                ret.const_data_ptr<scalar_t>(), clip.has_value(),
                                static_cast<acc_t>(clip.value_or(0.0))};
    run_grad<ValueOp<scalar_t, acc_t>, scalar_t, acc_t>(op, m, g, agg, static_cast<double>(g.T), values, grad_loss,
                                                        grad.data_ptr<scalar_t>());
  });
  return grad;
}

// ---- kl_penalty (elementwise, any shape) ----

Tensor kl_penalty_cuda(const Tensor& logp, const Tensor& ref_logp, c10::string_view kind_name) {
  check_cuda(logp, "logp");
  check_float(logp, "logp");
  check_input(logp, "logp", ref_logp, "ref_logp");
  const KlKind kind = kl_kind_of(kind_name);
  const c10::cuda::CUDAGuard guard(logp.device());
  Tensor lp = logp.contiguous(), ref = ref_logp.contiguous();
  Tensor out = at::empty(lp.sizes(), acc_options(lp));
  const int64_t n = lp.numel();
  if (n == 0) return out;
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "kl_penalty_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_forward<scalar_t, acc_t><<<element_blocks(n), kElementThreads, 0, current_stream()>>>(
        lp.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(), n, kind, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor kl_penalty_backward_cuda(const Tensor& grad, const Tensor& logp, const Tensor& ref_logp,
                                c10::string_view kind_name) {
  check_cuda(logp, "logp");
  check_input(logp, "logp", ref_logp, "ref_logp");
  check_same_shape(grad, "grad", logp, "logp");
  check_same_device(grad, "grad", logp, "logp");
  const KlKind kind = kl_kind_of(kind_name);
  const c10::cuda::CUDAGuard guard(logp.device());
  Tensor lp = logp.contiguous(), ref = ref_logp.contiguous();
  Tensor out = at::empty(lp.sizes(), lp.options());
  const int64_t n = lp.numel();
  if (n == 0) return out;
  RLK_DISPATCH_FLOATS(lp.scalar_type(), "kl_penalty_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    kl_backward<scalar_t, acc_t><<<element_blocks(n), kElementThreads, 0, current_stream()>>>(
        g.const_data_ptr<acc_t>(), lp.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(), n, kind,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cuda);
  m.impl("ppo_policy_loss_backward", &ppo_policy_loss_backward_cuda);
  m.impl("value_loss", &value_loss_cuda);
  m.impl("value_loss_backward", &value_loss_backward_cuda);
  m.impl("kl_penalty", &kl_penalty_cuda);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cuda);
}

}  // namespace cuda_ppo
}  // namespace rlkernels
