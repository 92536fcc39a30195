// CUDA kernels of the model-based Bellman ops (docs/design.md §4.5): bellman_backup and value_iteration, with the
// semantics of csrc/cpu/bellman_mdp.cpp.
//
// backup_kernel (both ops): P [B, S, A, S] is the only large input and is read once, coalesced, with 16-byte
// vector loads where S allows. The rows (b, s, a) of P are dotted with V[b] by groups of G lanes, G = the
// smallest power of two >= the row's vector count, at most 32 (a warp per row for long rows, several rows
// per warp for short ones); V[b] comes through the read-only cache (it is reused by S * A rows). A block
// owns a chunk of consecutive states (b, s) with about 4 rows per group: it writes their Q values, then
// (after __syncthreads, which makes the block's global writes visible to the block) one thread per state
// takes max and argmax over A in the CPU's order (NaN propagates, first index on ties). The dot product of
// a row is summed lane-strided and then by a butterfly: a fixed order, bit-identical run to run (it differs
// from the CPU's order by rounding only).
//
// value_iteration iterates on the device with no host synchronization: the host launches max_iters pairs of
//   1. backup_kernel<VI>: returns at once when the device-side `done` flag is set; else one backup from
//      V_k to V_{k+1} (V double-buffered on the device), with each MDP's residual max_s |V_{k+1} - V_k|
//      reduced per block in shared memory and then across blocks with an atomicMax on the bits of the
//      non-negative residual (max is exact and order-free, so still deterministic; a NaN residual, whose
//      bits are larger than inf's, wins as NaN should);
//   2. vi_check_kernel (one block): when not done, publishes the residuals, resets the accumulators, adds
//      one to the iteration count and sets `done` when every residual is < tol (or at max_iters);
// then one kernel copies V from the buffer the last backup wrote (iters % 2). Cost: each iteration reads P
// once (B * S * A * S elements; P stays in L2 across iterations only when it fits, about 50 MB on an H100);
// once converged, each remaining pair is two launches of kernels that exit at once, about 2-5 us of GPU time
// per pair (the backup grid is capped at a few blocks per SM to keep this small) plus the host's launch
// cost, so a max_iters far above the iterations needed costs launch time (max_iters = 1000: a few ms). The
// launches are plain stream work: the whole op can be captured in a CUDA graph.
#include "bellman_common.cuh"

#include <algorithm>
#include <cstdint>

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda_bellman {
namespace {

constexpr int kRowsPerGroup = 4;       // rows of P per lane group in one chunk
constexpr int kMaxChunkStates = 1024;  // states per chunk (the shared residual slots of a block)
constexpr int kBlocksPerSM = 8;        // grid cap of the backup kernel (grid-stride over chunks)

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

// Residual bits: the IEEE bits of a non-negative float or double, widened to 64 bits, order like the values
// (NaN above inf), so an unsigned atomicMax is the max.
__device__ __forceinline__ unsigned long long residual_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned long long residual_bits(double x) {
  return static_cast<unsigned long long>(__double_as_longlong(x));
}
__device__ __forceinline__ void from_bits(unsigned long long b, float& x) {
  x = __uint_as_float(static_cast<unsigned int>(b));
}
__device__ __forceinline__ void from_bits(unsigned long long b, double& x) {
  x = __longlong_as_double(static_cast<long long>(b));
}

struct Mdp {
  int64_t B, S, A;
  int G;                     // lanes per row of P
  int64_t states_per_chunk;  // <= kMaxChunkStates
};

// One Bellman backup of the states of a grid-stride set of chunks: Q = R + gamma P V, V_new = max_a Q,
// policy = argmax_a Q. With kVI: first checks `done`, and adds each state's |V_new - V| into res_bits.
template <typename scalar_t, int VEC, bool kVI>
__global__ void __launch_bounds__(kThreads)
    backup_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ R,
                  const acc_of<scalar_t>* __restrict__ V, Mdp m, acc_of<scalar_t> gamma, acc_of<scalar_t>* Q,
                  acc_of<scalar_t>* __restrict__ V_new, int64_t* __restrict__ policy, const int* __restrict__ done,
                  unsigned long long* __restrict__ res_bits) {
  using acc_t = acc_of<scalar_t>;
  using vec_t = Vec<scalar_t, VEC>;
  if constexpr (kVI) {
    if (*done != 0) return;  // uniform over the grid: written by the previous kernel in stream order
  }
  extern __shared__ unsigned long long block_res[];  // kVI: kMaxChunkStates residual slots (dynamic)
  const int G = m.G;
  const int groups = kThreads / G;
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int64_t group = threadIdx.x / G;
  const int64_t total_states = m.B * m.S;
  const int64_t chunks = (total_states + m.states_per_chunk - 1) / m.states_per_chunk;
  const int64_t nvec = m.S / VEC;
  const int64_t row_len = m.S;             // elements of P per row (b, s, a)
  const int64_t mdp_rows = m.S * m.A;      // rows per MDP
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int64_t s0 = chunk * m.states_per_chunk;
    const int64_t s1 = std::min(s0 + m.states_per_chunk, total_states);
    const int64_t b0 = s0 / m.S;  // S >= 1 here: there are states
    if constexpr (kVI) {
      for (int k = threadIdx.x; k < kMaxChunkStates; k += kThreads) block_res[k] = 0;
    }
    // Q for the rows [s0 * A, s1 * A): the loop bound is uniform over the block, so every lane of a warp
    // reaches every shuffle.
    const int64_t row0 = s0 * m.A, row1 = s1 * m.A;
    for (int64_t base = row0; base < row1; base += groups) {
      const int64_t row = base + group;
      const bool valid = row < row1;
      acc_t dot = 0;
      if (valid) {
        const int64_t b = row / mdp_rows;
        const vec_t* prow = reinterpret_cast<const vec_t*>(P + row * row_len);
        const acc_t* vb = V + b * m.S;
#pragma unroll 4
        for (int64_t k = lane; k < nvec; k += G) {
          const vec_t p = prow[k];
#pragma unroll
          for (int u = 0; u < VEC; ++u) dot += static_cast<acc_t>(p.v[u]) * __ldg(vb + k * VEC + u);
        }
      }
      for (int off = G / 2; off > 0; off /= 2) dot += shfl_xor(dot, off, G);
      if (valid && lane == 0) Q[row] = static_cast<acc_t>(R[row]) + gamma * dot;
    }
    __syncthreads();  // the chunk's Q (global writes of this block) and the zeroed residual slots are visible
    for (int64_t st = s0 + threadIdx.x; st < s1; st += kThreads) {
      const acc_t* qs = Q + st * m.A;
      acc_t best = acc_t(-INFINITY), vmax = best;
      int64_t arg = 0;
      for (int64_t a = 0; a < m.A; ++a) {
        const acc_t q = qs[a];
        vmax = nan_max(vmax, q);
        if (a == 0 || takes_argmax(best, q)) best = q, arg = a;
      }
      V_new[st] = vmax;
      policy[st] = arg;
      if constexpr (kVI) {
        const acc_t diff = std::fabs(vmax - V[st]);
        atomicMax(&block_res[st / m.S - b0], residual_bits(diff));
      }
    }
    if constexpr (kVI) {
      __syncthreads();
      const int64_t mdps = (s1 - 1) / m.S - b0 + 1;
      for (int64_t k = threadIdx.x; k < mdps; k += kThreads) atomicMax(res_bits + b0 + k, block_res[k]);
    }
    __syncthreads();  // the next chunk reuses block_res
  }
}

// One block: after a backup, publish residual[b], reset the accumulators, count the backup and decide
// whether the batch is done (every residual < tol, NaN never is; or max_iters backups made).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    vi_check_kernel(int* __restrict__ done, int64_t* __restrict__ iters, unsigned long long* __restrict__ res_bits,
                    acc_t* __restrict__ residual, int64_t B, acc_t tol, int64_t max_iters) {
  if (*done != 0) return;
  int converged = 1;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    acc_t r;
    from_bits(res_bits[b], r);
    res_bits[b] = 0;
    residual[b] = r;
    converged = converged && (r < tol);
  }
  converged = __syncthreads_and(converged);  // every thread has read `done` before thread 0 writes it
  if (threadIdx.x == 0) {
    const int64_t it = *iters + 1;
    *iters = it;
    if (converged || it >= max_iters) *done = 1;
  }
}

// V_out = the buffer the last backup wrote: V_{iters} sits in buffer iters % 2.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    vi_select_kernel(const acc_t* __restrict__ V0, const acc_t* __restrict__ V1, const int64_t* __restrict__ iters,
                     acc_t* __restrict__ out, int64_t n) {
  const acc_t* src = (*iters & 1) ? V1 : V0;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * kThreads)
    out[k] = src[k];
}

int sm_count(const Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(sms, 1);
}

// The launch plan of backup_kernel for P: vector width, lanes per row, states per chunk and grid.
template <typename scalar_t>
struct Plan {
  static constexpr int kVec = 16 / sizeof(scalar_t);
  bool vec;
  Mdp m;
  unsigned int grid;
};

template <typename scalar_t>
Plan<scalar_t> plan_of(const Tensor& P, int sms) {
  Plan<scalar_t> p;
  const int64_t B = P.size(0), S = P.size(1), A = P.size(2);
  p.vec = S % Plan<scalar_t>::kVec == 0 && reinterpret_cast<uintptr_t>(P.const_data_ptr()) % 16 == 0;
  const int64_t nvec = p.vec ? S / Plan<scalar_t>::kVec : S;
  const int G = group_width(nvec);
  const int64_t rows_target = static_cast<int64_t>(kThreads / G) * kRowsPerGroup;
  const int64_t spc = std::clamp<int64_t>(rows_target / std::max<int64_t>(A, 1), 1, kMaxChunkStates);
  p.m = Mdp{B, S, A, G, spc};
  const int64_t chunks = (B * S + spc - 1) / spc;
  p.grid = static_cast<unsigned int>(std::clamp<int64_t>(chunks, 1, static_cast<int64_t>(sms) * kBlocksPerSM));
  return p;
}

template <typename scalar_t, bool kVI>
void launch_backup(const Plan<scalar_t>& p, const scalar_t* P, const scalar_t* R, const acc_of<scalar_t>* V,
                   double gamma, acc_of<scalar_t>* Q, acc_of<scalar_t>* V_new, int64_t* policy, const int* done,
                   unsigned long long* res_bits, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const size_t smem = kVI ? kMaxChunkStates * sizeof(unsigned long long) : 0;
  if (p.vec)
    backup_kernel<scalar_t, Plan<scalar_t>::kVec, kVI><<<p.grid, kThreads, smem, stream>>>(
        P, R, V, p.m, static_cast<acc_t>(gamma), Q, V_new, policy, done, res_bits);
  else
    backup_kernel<scalar_t, 1, kVI><<<p.grid, kThreads, smem, stream>>>(P, R, V, p.m, static_cast<acc_t>(gamma), Q,
                                                                        V_new, policy, done, res_bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor> bellman_backup_cuda(const Tensor& P_in, const Tensor& R_in, const Tensor& V_in,
                                                       double gamma) {
  check_cuda(P_in, "P");
  check_mdp(P_in, R_in, V_in, "V");
  const c10::cuda::CUDAGuard guard(P_in.device());
  const Tensor P = P_in.contiguous(), R = R_in.contiguous();
  const int64_t B = P.size(0), S = P.size(1), A = P.size(2);
  const auto acc = acc_type_of(P.scalar_type());
  const Tensor V = V_in.to(acc).contiguous();
  Tensor Q = at::empty({B, S, A}, P.options().dtype(acc));
  Tensor V_new = at::empty({B, S}, P.options().dtype(acc));
  Tensor policy = at::empty({B, S}, P.options().dtype(at::kLong));
  if (B * S == 0) return {Q, V_new, policy};
  const int sms = sm_count(P);
  RLK_DISPATCH_FLOATS(P.scalar_type(), "bellman_backup_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    launch_backup<scalar_t, false>(plan_of<scalar_t>(P, sms), P.const_data_ptr<scalar_t>(),
                                   R.const_data_ptr<scalar_t>(), V.const_data_ptr<acc_t>(), gamma,
                                   Q.mutable_data_ptr<acc_t>(), V_new.mutable_data_ptr<acc_t>(),
                                   policy.mutable_data_ptr<int64_t>(), nullptr, nullptr, current_stream());
  });
  return {Q, V_new, policy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> value_iteration_cuda(const Tensor& P_in, const Tensor& R_in,
                                                                        const OptTensor& V0, double gamma,
                                                                        double tol, int64_t max_iters) {
  check_cuda(P_in, "P");
  check_value_iteration(P_in, R_in, V0, max_iters);
  const c10::cuda::CUDAGuard guard(P_in.device());
  const Tensor P = P_in.contiguous(), R = R_in.contiguous();
  const int64_t B = P.size(0), S = P.size(1), A = P.size(2);
  const auto acc = acc_type_of(P.scalar_type());
  const auto opts = P.options().dtype(acc);
  // V_k lives in buffers[k % 2]; buffers[0] starts as V0 (zeros if None).
  Tensor buffers = at::empty({2, B, S}, opts);
  if (given(V0))
    buffers.select(0, 0).copy_(*V0);
  else
    buffers.select(0, 0).zero_();
  Tensor V = at::empty({B, S}, opts);
  Tensor Q = at::empty({B, S, A}, opts);
  Tensor policy = at::empty({B, S}, P.options().dtype(at::kLong));
  Tensor residual = at::empty({B}, opts);
  Tensor iters = at::zeros({}, P.options().dtype(at::kLong));
  Tensor done = at::zeros({1}, P.options().dtype(at::kInt));
  Tensor res_bits = at::zeros({std::max<int64_t>(B, 1)}, P.options().dtype(at::kLong));
  const cudaStream_t stream = current_stream();
  const int sms = B * S > 0 ? sm_count(P) : 1;
  RLK_DISPATCH_FLOATS(P.scalar_type(), "value_iteration_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const Plan<scalar_t> plan = plan_of<scalar_t>(P, sms);
    acc_t* buf[2] = {buffers.select(0, 0).mutable_data_ptr<acc_t>(), buffers.select(0, 1).mutable_data_ptr<acc_t>()};
    auto* bits = reinterpret_cast<unsigned long long*>(res_bits.mutable_data_ptr<int64_t>());
    int* done_p = done.mutable_data_ptr<int>();
    int64_t* iters_p = iters.mutable_data_ptr<int64_t>();
    for (int64_t k = 0; k < max_iters; ++k) {
      if (B * S > 0)
        launch_backup<scalar_t, true>(plan, P.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(), buf[k % 2],
                                      gamma, Q.mutable_data_ptr<acc_t>(), buf[(k + 1) % 2],
                                      policy.mutable_data_ptr<int64_t>(), done_p, bits, stream);
      vi_check_kernel<acc_t><<<1, kThreads, 0, stream>>>(done_p, iters_p, bits, residual.mutable_data_ptr<acc_t>(), B,
                                                         static_cast<acc_t>(tol), max_iters);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (B * S > 0) {
      vi_select_kernel<acc_t><<<grid_for(B * S, kThreads), kThreads, 0, stream>>>(buf[0], buf[1], iters_p,
                                                                                   V.mutable_data_ptr<acc_t>(), B * S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {V, Q, policy, iters, residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("bellman_backup", &bellman_backup_cuda);
  m.impl("value_iteration", &value_iteration_cuda);
}

}  // namespace cuda_bellman
}  // namespace RLK_ISA
}  // namespace rlkernels
