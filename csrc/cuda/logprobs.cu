// CUDA kernels of gather_logprobs and its backwards (docs/design.md §4.3); the CPU twin is csrc/cpu/logprobs.cpp
// and these follow its semantics rule for rule.
//
// Forward: one pass over each row with an online state, never a tensor of the logits' size:
//   m = running max of z = logits / T, s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m)
// (s1 only with return_entropy). m starts at -inf (docs/design.md §8). Each thread folds 16-byte vectors of
// the row, read in the logits' own dtype (8 bf16/fp16, 4 fp32, 2 fp64 per load), into its own state:
// the vector's max is taken first, so the state is rescaled at most once per vector, then one exp per
// element. The threads' states are merged with a fixed warp-shuffle tree and, for a block per row, a fixed
// tree over the warps' states, so results are bit-identical run to run. Two geometries:
//   * V <= kWarpRowMaxV: a warp per row, kRowsPerBlock rows per block (no __syncthreads);
//   * larger V: a block of kBlockThreads threads per row.
// Rows whose start is not 16-byte aligned (odd V, views) fold their first elements one by one up to the
// alignment boundary, then vectors, then the tail one by one.
//
// Then lse = m + log s0, logp = z[token] - lse, entropy = log s0 - s1 / s0 (z shifted by m: no cancellation
// for logits of 1e4), all in float32 (float64 for float64 logits). Rows of ignore_index give 0 (and lse 0).
// Token ids outside [0, V) give NaN for logp (docs/design.md §4.3; the host check is check_tokens=True in
// rlkernels/logprobs.py), never an out-of-bounds read; their backward has no one-hot term.
//
// exp: float rows use exp2f(d * log2(e)) (MUFU.EX2, about 2 ulp on the d <= 0 range used here; the precise
// expf would make the bf16 pass compute-bound at large V); double rows use exp.
//
// Backward: d z_v = g_logp (onehot_v - p_v) - g_H p_v (z_v - lse + H), p_v = exp(z_v - lse); d logits = d z / T
// in the logits' dtype, elementwise over the same geometry. Each element is read and written by the same
// thread, so the in-place variant (output = the logits) needs no extra care: the target's z is the element
// itself. Rows of ignore_index get zeros.
//
// Nothing here synchronizes with the host; everything runs on the current stream.
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
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"
#include "rlkernels/logprobs_args.h"

namespace rlkernels {
namespace cuda_logprobs {
namespace {

using at::Tensor;
using namespace rlkernels::logprobs;

constexpr int kWarp = 32;
constexpr int kBlockThreads = 512;  // a block per row (large V)
constexpr int kRowsPerBlock = 8;    // a warp per row (small V): 8 warps of 32 threads
constexpr int64_t kWarpRowMaxV = 4096;
constexpr int kUnroll = 4;  // vectors loaded before any of them is folded: more bytes in flight per thread
constexpr int kVecBytes = 16;

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

__device__ __forceinline__ float exp_dev(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double exp_dev(double x) { return ::exp(x); }
__device__ __forceinline__ float log_dev(float x) { return ::logf(x); }
__device__ __forceinline__ double log_dev(double x) { return ::log(x); }

template <typename acc_t>
struct State {
  acc_t m, s0, s1;
};

template <typename acc_t>
__device__ __forceinline__ State<acc_t> empty_state() {
  return State<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

// Folds k values of z into the state: the same update as fold_chunk in csrc/cpu/logprobs.cpp. A group whose
// max is -inf (all -inf) weighs nothing; NaN is never taken as the max, so it reaches s0 through its exp, or
// (a group of NaN and -inf) directly; a state with m = -inf has sums of 0, or NaN once a NaN was seen.
template <typename acc_t, bool kEntropy, int k>
__device__ __forceinline__ void fold(State<acc_t>& st, const acc_t (&z)[k]) {
  acc_t vmax = neg_inf<acc_t>();
  bool nan = false;
#pragma unroll
  for (int j = 0; j < k; ++j) {
    vmax = z[j] > vmax ? z[j] : vmax;
    nan |= z[j] != z[j];
  }
  if (vmax == neg_inf<acc_t>()) {
    if (nan) st.s0 = st.s1 = acc_t(NAN);
    return;
  }
  if (vmax > st.m) {
    if (st.m != neg_inf<acc_t>()) {
      const acc_t shift = st.m - vmax;  // < 0
      const acc_t scale = exp_dev(shift);
      if (kEntropy) st.s1 = scale * (st.s1 + shift * st.s0);
      st.s0 = scale * st.s0;
    }
    st.m = vmax;
  }
  acc_t e0 = 0, e1 = 0;
#pragma unroll
  for (int j = 0; j < k; ++j) {
    const acc_t d = z[j] - st.m;
    const acc_t e = exp_dev(d);
    e0 += e;
    if (kEntropy) e1 += e != acc_t(0) ? e * d : acc_t(0);  // 0 * -inf counts as 0
  }
  st.s0 += e0;
  if (kEntropy) st.s1 += e1;
}

// Merges two states (symmetric in a and b, so the fixed trees below give one bit pattern).
template <typename acc_t, bool kEntropy>
__device__ __forceinline__ State<acc_t> merge(const State<acc_t>& a, const State<acc_t>& b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<acc_t>()) return State<acc_t>{m, a.s0 + b.s0, a.s1 + b.s1};  // 0, or NaN from either
  State<acc_t> out{m, acc_t(0), acc_t(0)};
  // a state with m = -inf adds its sums as they are: 0, or NaN
  acc_t sa0 = a.s0, sa1 = a.s1, sb0 = b.s0, sb1 = b.s1;
  if (a.m != neg_inf<acc_t>()) {
    const acc_t shift = a.m - m, scale = exp_dev(shift);
    sa0 = scale * a.s0;
    if (kEntropy) sa1 = scale * (a.s1 + shift * a.s0);
  }
  if (b.m != neg_inf<acc_t>()) {
    const acc_t shift = b.m - m, scale = exp_dev(shift);
    sb0 = scale * b.s0;
    if (kEntropy) sb1 = scale * (b.s1 + shift * b.s0);
  }
  out.s0 = sa0 + sb0;
  out.s1 = sa1 + sb1;
  return out;
}

template <typename acc_t, bool kEntropy>
__device__ __forceinline__ State<acc_t> warp_merge(State<acc_t> st) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    State<acc_t> o;
    o.m = __shfl_down_sync(0xffffffffu, st.m, off);
    o.s0 = __shfl_down_sync(0xffffffffu, st.s0, off);
    o.s1 = kEntropy ? __shfl_down_sync(0xffffffffu, st.s1, off) : acc_t(0);
    st = merge<acc_t, kEntropy>(st, o);
  }
  return st;  // lane 0 holds the warp's state
}

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int kVec = kVecBytes / static_cast<int>(sizeof(scalar_t));

// Elements from the row start to the first 16-byte boundary (at most V).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_of(const void* row, int64_t V) {
  const auto mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % kVecBytes);
  const int64_t head = mis == 0 ? 0 : (kVecBytes - mis) / static_cast<int64_t>(sizeof(scalar_t));
  return head < V ? head : V;
}

template <typename scalar_t>
struct Vec {
  scalar_t v[kVec<scalar_t>];
};

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_vec(const scalar_t* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Vec<scalar_t> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
}

// One thread's share of a row: elements tid, tid + nthreads, ... (coalesced across the threads of a row).
template <typename scalar_t, typename acc_t, bool kEntropy>
__device__ __forceinline__ State<acc_t> thread_state(const scalar_t* row, int64_t V, acc_t inv_t, int tid,
                                                     int nthreads) {
  constexpr int K = kVec<scalar_t>;
  State<acc_t> st = empty_state<acc_t>();
  const int64_t head = head_of<scalar_t>(row, V);
  for (int64_t i = tid; i < head; i += nthreads) {
    const acc_t z[1] = {static_cast<acc_t>(row[i]) * inv_t};
    fold<acc_t, kEntropy, 1>(st, z);
  }
  const scalar_t* body = row + head;
  const int64_t nvec = (V - head) / K;
  for (int64_t base = tid; base < nvec; base += static_cast<int64_t>(kUnroll) * nthreads) {
    Vec<scalar_t> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
      if (idx < nvec) v[u] = load_vec(body + idx * K);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
      if (idx < nvec) {
        acc_t z[K];
#pragma unroll
        for (int j = 0; j < K; ++j) z[j] = static_cast<acc_t>(v[u].v[j]) * inv_t;
        fold<acc_t, kEntropy, K>(st, z);
      }
    }
  }
  for (int64_t i = head + nvec * K + tid; i < V; i += nthreads) {
    const acc_t z[1] = {static_cast<acc_t>(row[i]) * inv_t};
    fold<acc_t, kEntropy, 1>(st, z);
  }
  return st;
}

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* logits;
  const int64_t* tokens;
  acc_t* logp;
  acc_t* entropy;  // null without return_entropy
  acc_t* lse;
  int64_t N, V, row_stride;
  acc_t inv_t;
  bool has_ignore;
  int64_t ignore_index;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_row(const FwdArgs<scalar_t, acc_t>& a, int64_t r, const scalar_t* row,
                                           int64_t t, const State<acc_t>& st) {
  const acc_t log_s0 = log_dev(st.s0);
  acc_t l = st.m + log_s0;  // all -inf: -inf + log 0 = -inf, and logp is NaN as on CPU
  // A +inf logit: lse = +inf (exp(inf - inf) made the sums NaN), or NaN if the row also holds a NaN
  // (docs/design.md §4.3); such a row is rare, so one thread reads it again.
  if (st.m == std::numeric_limits<acc_t>::infinity()) {
    l = st.m;
    for (int64_t v = 0; v < a.V && l == l; ++v) {
      const acc_t x = static_cast<acc_t>(row[v]);
      if (x != x) l = x;
    }
  }
  a.lse[r] = l;
  const bool in_range = t >= 0 && t < a.V;
  a.logp[r] = in_range ? static_cast<acc_t>(row[in_range ? t : 0]) * a.inv_t - l
                       : std::numeric_limits<acc_t>::quiet_NaN();
  if (a.entropy != nullptr) a.entropy[r] = log_s0 - st.s1 / st.s0;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool ignored(const FwdArgs<scalar_t, acc_t>& a, int64_t t) {
  return a.has_ignore && t == a.ignore_index;
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    forward_warp_rows(const FwdArgs<scalar_t, acc_t> a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= a.N) return;  // the whole warp leaves together
  const int64_t t = a.tokens[r];
  if (ignored(a, t)) {
    if (lane == 0) {
      a.logp[r] = 0;
      a.lse[r] = 0;
      if (a.entropy != nullptr) a.entropy[r] = 0;
    }
    return;
  }
  const scalar_t* row = a.logits + r * a.row_stride;
  State<acc_t> st = thread_state<scalar_t, acc_t, kEntropy>(row, a.V, a.inv_t, lane, kWarp);
  st = warp_merge<acc_t, kEntropy>(st);
  if (lane == 0) finish_row(a, r, row, t, st);
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kBlockThreads) forward_block_rows(const FwdArgs<scalar_t, acc_t> a) {
  constexpr int kWarps = kBlockThreads / kWarp;
  __shared__ State<acc_t> warp_states[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t t = a.tokens[r];
  if (ignored(a, t)) {  // uniform across the block: no thread reaches the barrier below
    if (threadIdx.x == 0) {
      a.logp[r] = 0;
      a.lse[r] = 0;
      if (a.entropy != nullptr) a.entropy[r] = 0;
    }
    return;
  }
  const scalar_t* row = a.logits + r * a.row_stride;
  State<acc_t> st = thread_state<scalar_t, acc_t, kEntropy>(row, a.V, a.inv_t, threadIdx.x, kBlockThreads);
  st = warp_merge<acc_t, kEntropy>(st);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_states[lane] : empty_state<acc_t>();
    st = warp_merge<acc_t, kEntropy>(st);
    if (lane == 0) finish_row(a, r, row, t, st);
  }
}

// ---- backward ----

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const scalar_t* logits;
  scalar_t* out;  // may equal logits (in place)
  const int64_t* tokens;
  const acc_t* grad_logp;     // null: 0
  const acc_t* grad_entropy;  // null: no entropy term
  const acc_t* lse;
  const acc_t* entropy;
  int64_t N, V, in_stride, out_stride;
  acc_t inv_t;
  bool has_ignore;
  int64_t ignore_index;
};

// The gradient of one element v of a row (per-row constants a = g_logp / T, b = g_H / T, c = H - lse).
template <typename acc_t, bool kEntropy>
__device__ __forceinline__ acc_t grad_of(acc_t z, acc_t l, acc_t a, acc_t b, acc_t c, bool is_target) {
  const acc_t p = exp_dev(z - l);
  acc_t g = is_target ? a * (acc_t(1) - p) : -a * p;
  if (kEntropy) g -= b * (p != acc_t(0) ? p * (z + c) : acc_t(0));  // p = 0 where z = -inf: no entropy term
  return g;
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__device__ __forceinline__ void backward_row(const BwdArgs<scalar_t, acc_t>& A, int64_t r, int tid, int nthreads) {
  constexpr int K = kVec<scalar_t>;
  const int64_t V = A.V;
  const scalar_t* xr = A.logits + r * A.in_stride;
  scalar_t* yr = A.out + r * A.out_stride;
  const int64_t t = A.tokens[r];
  if (A.has_ignore && t == A.ignore_index) {
    for (int64_t v = tid; v < V; v += nthreads) yr[v] = static_cast<scalar_t>(0.0f);
    return;
  }
  const acc_t l = A.lse[r];
  const acc_t a = A.grad_logp != nullptr ? A.grad_logp[r] * A.inv_t : acc_t(0);
  const acc_t b = kEntropy ? A.grad_entropy[r] * A.inv_t : acc_t(0);
  const acc_t c = kEntropy ? A.entropy[r] - l : acc_t(0);
  const acc_t inv_t = A.inv_t;
  // Vectors only where the input and the output rows share their alignment (always for in place, and for a
  // contiguous output whenever the rows are 16-byte multiples); else element by element.
  const int64_t head = head_of<scalar_t>(xr, V);
  const bool vec_ok = head_of<scalar_t>(yr, V) == head;
  const int64_t nvec = vec_ok ? (V - head) / K : 0;
  const int64_t first_tail = vec_ok ? head + nvec * K : 0;
  if (vec_ok) {
    for (int64_t i = tid; i < head; i += nthreads)
      yr[i] = static_cast<scalar_t>(grad_of<acc_t, kEntropy>(static_cast<acc_t>(xr[i]) * inv_t, l, a, b, c, i == t));
    const scalar_t* xb = xr + head;
    scalar_t* yb = yr + head;
    for (int64_t base = tid; base < nvec; base += static_cast<int64_t>(kUnroll) * nthreads) {
      Vec<scalar_t> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
        if (idx < nvec) v[u] = load_vec(xb + idx * K);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
        if (idx < nvec) {
          Vec<scalar_t> o;
#pragma unroll
          for (int j = 0; j < K; ++j) {
            const int64_t vi = head + idx * K + j;
            o.v[j] = static_cast<scalar_t>(
                grad_of<acc_t, kEntropy>(static_cast<acc_t>(v[u].v[j]) * inv_t, l, a, b, c, vi == t));
          }
          uint4 raw;
          memcpy(&raw, &o, sizeof(raw));
          *reinterpret_cast<uint4*>(yb + idx * K) = raw;
        }
      }
    }
  }
  for (int64_t i = first_tail + tid; i < V; i += nthreads)
    yr[i] = static_cast<scalar_t>(grad_of<acc_t, kEntropy>(static_cast<acc_t>(xr[i]) * inv_t, l, a, b, c, i == t));
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock) backward_warp_rows(const BwdArgs<scalar_t, acc_t> A) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= A.N) return;
  backward_row<scalar_t, acc_t, kEntropy>(A, r, threadIdx.x % kWarp, kWarp);
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kBlockThreads) backward_block_rows(const BwdArgs<scalar_t, acc_t> A) {
  backward_row<scalar_t, acc_t, kEntropy>(A, blockIdx.x, threadIdx.x, kBlockThreads);
}

// ---- host side ----

void check_inputs(const Tensor& logits, const Tensor& tokens, double temperature) {
  check_cuda(logits, "logits");
  check_gather_logprobs(logits, tokens, temperature);
}

int64_t blocks_for(int64_t N, bool warp_rows) { return warp_rows ? (N + kRowsPerBlock - 1) / kRowsPerBlock : N; }

std::tuple<Tensor, Tensor, Tensor> gather_logprobs_cuda(const Tensor& logits, const Tensor& tokens,
                                                        double temperature, bool return_entropy,
                                                        std::optional<int64_t> ignore_index, bool inplace_backward) {
  (void)inplace_backward;  // read by the autograd formula only
  check_inputs(logits, tokens, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = acc_options(logits);
  Tensor logp = at::empty({N}, opts);
  Tensor entropy = at::empty({return_entropy ? N : 0}, opts);
  Tensor lse = at::empty({N}, opts);
  if (N == 0) return {logp, entropy, lse};
  const Tensor tok = tokens.contiguous();
  const bool warp_rows = V <= kWarpRowMaxV;
  const int64_t blocks = blocks_for(N, warp_rows);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "rlkernels.gather_logprobs: too many rows (",
                    N, ")");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  RLK_DISPATCH_FLOATS(logits.scalar_type(), "gather_logprobs_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    FwdArgs<scalar_t, acc_t> a;
    a.logits = logits.const_data_ptr<scalar_t>();
    a.tokens = tok.const_data_ptr<int64_t>();
    a.logp = logp.data_ptr<acc_t>();
    a.entropy = return_entropy ? entropy.data_ptr<acc_t>() : nullptr;
    a.lse = lse.data_ptr<acc_t>();
    a.N = N;
    a.V = V;
    a.row_stride = logits.stride(0);
    a.inv_t = static_cast<acc_t>(1.0 / temperature);
    a.has_ignore = ignore_index.has_value();
    a.ignore_index = ignore_index.value_or(0);
    const auto grid = static_cast<unsigned>(blocks);
    if (warp_rows) {
      if (return_entropy)
        forward_warp_rows<scalar_t, acc_t, true><<<grid, kWarp * kRowsPerBlock, 0, stream>>>(a);
      else
        forward_warp_rows<scalar_t, acc_t, false><<<grid, kWarp * kRowsPerBlock, 0, stream>>>(a);
    } else {
      if (return_entropy)
        forward_block_rows<scalar_t, acc_t, true><<<grid, kBlockThreads, 0, stream>>>(a);
      else
        forward_block_rows<scalar_t, acc_t, false><<<grid, kBlockThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, entropy, lse};
}

void backward_into(const OptTensor& grad_logp, const OptTensor& grad_entropy, const Tensor& logits, const Tensor& out,
                   const Tensor& tokens, const Tensor& lse, const Tensor& entropy, double temperature,
                   std::optional<int64_t> ignore_index) {
  check_cuda(logits, "logits");
  check_gather_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0 || V == 0) return;
  const auto acc = acc_type_of(logits.scalar_type());
  TORCH_CHECK_VALUE(lse.numel() == N, "rlkernels.gather_logprobs_backward: lse must have N = ", N, " values, got ",
                    lse.numel());
  const Tensor tok = tokens.contiguous();
  const Tensor l = lse.to(acc).contiguous();
  const Tensor gl = given(grad_logp) ? grad_logp->to(acc).contiguous() : Tensor();
  const bool use_h = given(grad_entropy) && entropy.numel() == N;
  const Tensor gh = use_h ? grad_entropy->to(acc).contiguous() : Tensor();
  const Tensor ent = use_h ? entropy.to(acc).contiguous() : Tensor();
  if (gl.defined())
    TORCH_CHECK_VALUE(gl.numel() == N, "rlkernels.gather_logprobs_backward: grad_logp must have N = ", N,
                      " values, got ", gl.numel());
  if (use_h)
    TORCH_CHECK_VALUE(gh.numel() == N, "rlkernels.gather_logprobs_backward: grad_entropy must have N = ", N,
                      " values, got ", gh.numel());
  const bool warp_rows = V <= kWarpRowMaxV;
  const int64_t blocks = blocks_for(N, warp_rows);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
                    "rlkernels.gather_logprobs_backward: too many rows (", N, ")");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  RLK_DISPATCH_FLOATS(logits.scalar_type(), "gather_logprobs_backward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    BwdArgs<scalar_t, acc_t> A;
    A.logits = logits.const_data_ptr<scalar_t>();
    A.out = out.data_ptr<scalar_t>();
    A.tokens = tok.const_data_ptr<int64_t>();
    A.grad_logp = gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr;
    A.grad_entropy = use_h ? gh.const_data_ptr<acc_t>() : nullptr;
    A.lse = l.const_data_ptr<acc_t>();
    A.entropy = use_h ? ent.const_data_ptr<acc_t>() : nullptr;
    A.N = N;
    A.V = V;
    A.in_stride = logits.stride(0);
    A.out_stride = out.stride(0);
    A.inv_t = static_cast<acc_t>(1.0 / temperature);
    A.has_ignore = ignore_index.has_value();
    A.ignore_index = ignore_index.value_or(0);
    const auto grid = static_cast<unsigned>(blocks);
    if (warp_rows) {
      if (use_h)
        backward_warp_rows<scalar_t, acc_t, true><<<grid, kWarp * kRowsPerBlock, 0, stream>>>(A);
      else
        backward_warp_rows<scalar_t, acc_t, false><<<grid, kWarp * kRowsPerBlock, 0, stream>>>(A);
    } else {
      if (use_h)
        backward_block_rows<scalar_t, acc_t, true><<<grid, kBlockThreads, 0, stream>>>(A);
      else
        backward_block_rows<scalar_t, acc_t, false><<<grid, kBlockThreads, 0, stream>>>(A);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor gather_logprobs_backward_cuda(const OptTensor& grad_logp, const OptTensor& grad_entropy, const Tensor& logits,
                                     const Tensor& tokens, const Tensor& lse, const Tensor& entropy,
                                     double temperature, std::optional<int64_t> ignore_index) {
  Tensor out = at::empty(logits.sizes(), logits.options());  // contiguous, like the fake kernel
  backward_into(grad_logp, grad_entropy, logits, out, tokens, lse, entropy, temperature, ignore_index);
  return out;
}

void gather_logprobs_backward_inplace_cuda(const OptTensor& grad_logp, const OptTensor& grad_entropy,
                                           const Tensor& logits, const Tensor& tokens, const Tensor& lse,
                                           const Tensor& entropy, double temperature,
                                           std::optional<int64_t> ignore_index) {
  check_writable_rows(logits);
  backward_into(grad_logp, grad_entropy, logits, logits, tokens, lse, entropy, temperature, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("gather_logprobs", &gather_logprobs_cuda);
  m.impl("gather_logprobs_backward", &gather_logprobs_backward_cuda);
  m.impl("gather_logprobs_backward_inplace", &gather_logprobs_backward_inplace_cuda);
}

}  // namespace cuda_logprobs
}  // namespace rlkernels
