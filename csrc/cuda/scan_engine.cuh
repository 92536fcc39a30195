// The CUDA scan engine: walks sequences with an estimator's step function (csrc/include/rlkernels/scan.h),
// exactly like the CPU engine (csrc/cpu/scan_engine.h) and with its semantics: `valid` = mask and in range,
// carries pass through invalid steps, outputs are 0 there, initial carries from `init`, and for backward
// steps Step::bootstrap_grad of each sequence's final carry.
//
// Three regimes, chosen from the shape alone (plan_of), so results are bit-identical run to run:
//
//  * Lanes: a thread per lane, for the time-major layout [O, T, I > 1] (adjacent threads are adjacent
//    sequences, so every load is coalesced across the warp) and for contiguous rows too short to share a
//    warp. A lane is a whole sequence, or, when there are too few sequences to fill the GPU, one chunk of
//    kLaneChunk steps: pass 1 runs each chunk's step with Affine carries to get its map, pass 2
//    (compose_kernel) composes the maps along each sequence with a block scan, pass 3 re-walks each chunk
//    with its true carry.
//  * Warp per sequence: contiguous time (batch-major [O, T, 1], or packed segments), many sequences. A warp
//    walks its sequence in tiles of 32 x kWarpItems consecutive steps: each thread takes kWarpItems steps,
//    computes their map (Affine carries), the 32 maps are combined with a shuffle scan, and each thread
//    re-walks its steps from registers with its true carry. Inputs are read once.
//  * Global chunks: contiguous time with few sequences (one sequence of 16M steps) or packed segments of
//    unknown, possibly very uneven lengths. The flattened positions are cut into chunks of kWarpChunk, each
//    walked by one warp as above; segment starts inside a chunk reset the carry to the segment's initial
//    carry (a constant map), so chunks need not align with segments. Passes 1-3 as in the lanes regime,
//    with one group: the whole array.
//
// Maps are composed in scan order (reverse scans compose from the end); composition is associative, not
// commutative, and every combine order here depends only on the shape.
//
// Non-finite carries. A map's coefficient can be 0 where the sequential walk never multiplies (a segment
// reset, GAE's value carry, an underflowed (gamma lam)^n), so applying a map to an infinite carry can give
// 0 * inf = NaN where the sequential formula gives inf or a finite value. Whenever a carry fed into a map is
// not finite (and any non-finite intermediate makes the evaluated carry non-finite too), the engine walks
// sequentially instead: the 32 threads of a tile one after another, or a whole sequence (lanes) or the whole
// array (global chunks) in one thread or warp. Slow, but it only happens on Inf/NaN data, and then the
// results are the sequential formula's, as on the CPU.
#pragma once

#include "scan_problem.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cub/block/block_scan.cuh>

#include <climits>
#include <type_traits>
#include <utility>

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------
// Shape policy
// ---------------------------------------------------------------------------------------------------------

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kLaneThreads = 128;
constexpr int64_t kLaneChunk = 256;                    // steps per chunk of a chunked lane
constexpr int64_t kLaneChunkMinSteps = 4 * kLaneChunk;  // shorter sequences are walked whole
// With this many sequences, threads are plentiful (H100: 132 SMs x 2048 threads, and a sequence's serial
// walk is latency-bound: a few steps per DRAM round trip), so sequences are walked whole.
constexpr int64_t kLaneChunkMaxSeqs = 32768;
constexpr int64_t kShortRow = 64;  // contiguous rows this short get a thread each, not a warp each

constexpr int kWarpItems = 4;                       // consecutive steps per thread per tile
constexpr int64_t kTile = kWarpSize * kWarpItems;   // steps per warp tile
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kWarpChunk = 16 * kTile;          // steps per warp in the global-chunk regime
constexpr int64_t kWarpSeqsMin = 8192;              // warps that fill an H100 (132 SMs x 64 warps)

constexpr int kComposeThreads = 256;  // 512 spills the fp64 two-carry maps

// Steps loaded ahead of the dependent math per thread in the lanes regime (fewer for fp64: registers).
template <typename acc_t>
constexpr int kLaneUnroll = sizeof(acc_t) == 8 ? 4 : 8;

enum class Regime { kLanes, kLanesChunked, kWarpPerSeq, kWarpChunks };

struct Plan {
  Regime regime;
  int64_t units;   // lanes (thread regimes) or warps (warp regimes)
  int64_t chunks;  // chunks per sequence (kLanesChunked) or in all (kWarpChunks); else 1
};

template <typename scalar_t, typename acc_t>
Plan plan_of(const Problem<scalar_t, acc_t>& pb) {
  const bool contiguous = pb.cu_seqlens != nullptr || pb.inner == 1;
  if (!contiguous) {
    if (pb.steps >= kLaneChunkMinSteps && pb.num_seqs <= kLaneChunkMaxSeqs) {
      const int64_t chunks = (pb.steps + kLaneChunk - 1) / kLaneChunk;
      return {Regime::kLanesChunked, pb.num_seqs * chunks, chunks};
    }
    return {Regime::kLanes, pb.num_seqs, 1};
  }
  const int64_t chunks = (pb.numel + kWarpChunk - 1) / kWarpChunk;
  const Plan global{Regime::kWarpChunks, chunks, chunks};
  if (!pb.cu_seqlens) {
    if (pb.steps <= kShortRow) return {Regime::kLanes, pb.num_seqs, 1};
    if (pb.steps <= kWarpChunk || pb.num_seqs >= kWarpSeqsMin) return {Regime::kWarpPerSeq, pb.num_seqs, 1};
    return global;
  }
  // Packed: segment lengths are on the device; only their number and total are known here. A warp per
  // segment reads the inputs once, but its time is the longest segment's, so it is used only when segments
  // are many and not tiny on average; otherwise global chunks, whose cost does not depend on the lengths.
  if (chunks > 1 && pb.num_seqs >= kWarpSeqsMin && pb.numel >= kWarpSize * pb.num_seqs)
    return {Regime::kWarpPerSeq, pb.num_seqs, 1};
  return global;
}

RLK_FN int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
RLK_FN int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }

// x - x is 0 for finite x and NaN for inf and NaN (IEEE; these files are never built with fast math).
template <typename T>
RLK_FN bool all_finite(const T* x, int n) {
  bool ok = true;
  for (int j = 0; j < n; ++j) ok = ok && (x[j] - x[j] == T(0));
  return ok;
}

// ---------------------------------------------------------------------------------------------------------
// Chunk maps
// ---------------------------------------------------------------------------------------------------------

// The affine map of a run of steps: carry_out[j] = f[j](carry_in).
template <typename acc_t, int D>
struct ChunkMap {
  Affine<acc_t, D> f[D];

  RLK_FN static ChunkMap identity() {
    ChunkMap m;
#pragma unroll
    for (int j = 0; j < D; ++j) m.f[j] = Affine<acc_t, D>::variable(j);
    return m;
  }
};

// f evaluated at x, where x are concrete carries (C = acc_t) or affine forms (C = Affine: composition).
template <typename acc_t, int D, typename C>
RLK_FN C apply_form(const Affine<acc_t, D>& f, const C* x) {
  C r(f.c);
#pragma unroll
  for (int i = 0; i < D; ++i) r = r + f.k[i] * x[i];
  return r;
}

// y = m(x); y must not alias x.
template <typename acc_t, int D, typename C>
RLK_FN void apply_map(const ChunkMap<acc_t, D>& m, const C* x, C* y) {
#pragma unroll
  for (int j = 0; j < D; ++j) y[j] = apply_form(m.f[j], x);
}

// The map of `first` followed by `then` (then o first).
template <typename acc_t, int D>
RLK_FN ChunkMap<acc_t, D> compose(const ChunkMap<acc_t, D>& first, const ChunkMap<acc_t, D>& then) {
  ChunkMap<acc_t, D> r;
  apply_map(then, first.f, r.f);
  return r;
}

template <typename acc_t, int D>
struct ComposeOp {  // CUB scan operator: `a` precedes `b` in scan order
  __device__ __forceinline__ ChunkMap<acc_t, D> operator()(const ChunkMap<acc_t, D>& a,
                                                         const ChunkMap<acc_t, D>& b) const {
    return compose(a, b);
  }
};

template <typename acc_t, int D>
__device__ __forceinline__ ChunkMap<acc_t, D> shfl_up_map(const ChunkMap<acc_t, D>& m, int delta) {
  ChunkMap<acc_t, D> r;
#pragma unroll
  for (int j = 0; j < D; ++j) {
    r.f[j].c = __shfl_up_sync(kFullMask, m.f[j].c, delta);
#pragma unroll
    for (int i = 0; i < D; ++i) r.f[j].k[i] = __shfl_up_sync(kFullMask, m.f[j].k[i], delta);
  }
  return r;
}

// Inclusive scan of the warp's maps in lane order (Kogge-Stone: lane l ends with lanes 0..l composed).
template <typename acc_t, int D>
__device__ __forceinline__ ChunkMap<acc_t, D> warp_inclusive_scan(ChunkMap<acc_t, D> m, int lane) {
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const ChunkMap<acc_t, D> before = shfl_up_map(m, delta);
    if (lane >= delta) m = compose(before, m);
  }
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Loads and one step
// ---------------------------------------------------------------------------------------------------------

// Read-only loads through the non-coherent cache; 16-bit floats are loaded as their bits and widened here.
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_value(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    const T x(__ldg(reinterpret_cast<const unsigned short*>(p) + i), T::from_bits());
    return static_cast<acc_t>(static_cast<float>(x));
  } else {
    return static_cast<acc_t>(__ldg(p + i));
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_flag(const uint8_t* p, int64_t i) {
  return __ldg(p + i) ? acc_t(1) : acc_t(0);  // bool and uint8: nonzero is set
}

// The inputs of element e. Absent streams read 0 and an absent mask 1, as in the CPU engine.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ StepIn<acc_t> load_step(const Problem<scalar_t, acc_t>& pb, int64_t e) {
  StepIn<acc_t> in{};
  if (pb.r) in.r = load_value<acc_t>(pb.r, e);
  if (pb.v) in.v = load_value<acc_t>(pb.v, e);
  if (pb.nv) in.nv = load_value<acc_t>(pb.nv, e);
  if (pb.lr) in.lr = load_value<acc_t>(pb.lr, e);
  if (pb.a) in.a = load_value<acc_t>(pb.a, e);
  if (pb.b) in.b = load_value<acc_t>(pb.b, e);
  if (pb.term) in.term = load_flag<acc_t>(pb.term, e);
  if (pb.trunc) in.trunc = load_flag<acc_t>(pb.trunc, e);
  in.valid = pb.mask ? load_flag<acc_t>(pb.mask, e) : acc_t(1);
  if (pb.g0) in.g0 = load_value<acc_t>(pb.g0, e);
  if (pb.g1) in.g1 = load_value<acc_t>(pb.g1, e);
  if (pb.s0) in.s0 = load_value<acc_t>(pb.s0, e);
  if (pb.s1) in.s1 = load_value<acc_t>(pb.s1, e);
  return in;
}

// A step past the end of its lane: everything 0, so `valid` is 0 and the carry passes through.
template <typename acc_t>
__device__ __forceinline__ StepIn<acc_t> past_end() {
  return StepIn<acc_t>{};
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t initial_carry(const Problem<scalar_t, acc_t>& pb, int j, int64_t seq) {
  return pb.init ? pb.init[j * pb.num_seqs + seq] : acc_t(0);
}

// One step at element e. With kStore the outputs are written (0 where invalid); with C = Affine only the
// carry's map advances.
template <class Step, bool kStore, typename scalar_t, typename acc_t, typename C>
__device__ __forceinline__ void step_at(const Problem<scalar_t, acc_t>& pb, const ScanParams<acc_t>& params,
                                        const StepIn<acc_t>& in, int64_t e, C* carry) {
  C c[Step::kCarry];
  C o[Step::kOut];
#pragma unroll
  for (int j = 0; j < Step::kCarry; ++j) c[j] = carry[j];
  Step::step(params, in, c, o);
#pragma unroll
  for (int j = 0; j < Step::kCarry; ++j) carry[j] = select(in.valid, c[j], carry[j]);
  if constexpr (kStore) {
#pragma unroll
    for (int j = 0; j < Step::kOut; ++j)
      if (pb.out[j]) pb.out[j][e] = select(in.valid, o[j], acc_t(0));
  }
}

template <class Step, typename acc_t, typename = void>
struct HasBootstrapGrad : std::false_type {};
template <class Step, typename acc_t>
struct HasBootstrapGrad<Step, acc_t,
                        std::void_t<decltype(Step::bootstrap_grad(std::declval<const ScanParams<acc_t>&>(),
                                                                  std::declval<const acc_t*>()))>>
    : std::true_type {};
// The trait is what turns final carries into bootstrap gradients: a silent false would leave them zero.
static_assert(HasBootstrapGrad<GaeBackwardStep, float>::value && HasBootstrapGrad<VtraceBackwardStep, double>::value &&
              HasBootstrapGrad<DiscountedReturnsBackwardStep, float>::value &&
              !HasBootstrapGrad<GaeStep, float>::value);

// The end of sequence `seq` in scan order: backward steps turn the final carry into the bootstrap gradient.
template <class Step, typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_sequence(const Problem<scalar_t, acc_t>& pb, const ScanParams<acc_t>& params,
                                                int64_t seq, const acc_t* carry) {
  if constexpr (HasBootstrapGrad<Step, acc_t>::value) {
    if (pb.bootstrap_grad) pb.bootstrap_grad[seq] = Step::bootstrap_grad(params, carry);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Lanes regime: a thread per lane of the dense [O, T, I] layout
// ---------------------------------------------------------------------------------------------------------

struct Lane {
  int64_t seq;     // sequence index s = o * I + i
  int64_t base;    // element offset of the sequence's t = 0
  int64_t begin;   // first time step of the lane
  int64_t len;     // steps
  int64_t chunk;   // chunk index within the sequence
};

// Lane q = (o * chunks + c) * I + i: chunk c of sequence (o, i), so adjacent threads are adjacent i.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Lane dense_lane(const Problem<scalar_t, acc_t>& pb, int64_t chunks, int64_t chunk_len,
                                           int64_t q) {
  const int64_t i = q % pb.inner, rest = q / pb.inner;
  const int64_t c = rest % chunks, o = rest / chunks;
  Lane lane;
  lane.seq = o * pb.inner + i;
  lane.base = o * pb.steps * pb.inner + i;
  lane.begin = c * chunk_len;
  lane.len = min64(chunk_len, pb.steps - lane.begin);
  lane.chunk = c;
  return lane;
}

// kMap: pass 1, writes each lane's map to maps[q]. Otherwise walks with carry_in[q] (pass 3), or with the
// initial carries when carry_in is null (unchunked), storing outputs.
// `whole` (pass 3): per sequence, whether pass 2 met a non-finite carry; such a sequence is walked whole,
// from its initial carries, by the thread of its first chunk in scan order.
template <class Step, typename scalar_t, typename acc_t, bool kMap>
__global__ void __launch_bounds__(kLaneThreads)
    lanes_kernel(const Problem<scalar_t, acc_t> pb, const ScanParams<acc_t> params, const bool reverse,
                 const int64_t chunks, const int64_t chunk_len, ChunkMap<acc_t, Step::kCarry>* maps,
                 const acc_t* carry_in, const int* whole) {
  constexpr int D = Step::kCarry;
  constexpr int U = kLaneUnroll<acc_t>;
  using C = std::conditional_t<kMap, Affine<acc_t, D>, acc_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= pb.num_seqs * chunks) return;
  Lane lane = dense_lane(pb, chunks, chunk_len, q);
  const int64_t stride = pb.inner;
  bool walk_whole = false;
  if (whole && whole[lane.seq]) {
    if (lane.chunk != (reverse ? chunks - 1 : 0)) return;
    walk_whole = true;
    lane.begin = 0;
    lane.len = pb.steps;
    lane.chunk = reverse ? 0 : chunks - 1;  // it also ends the sequence
  }

  C carry[D];
#pragma unroll
  for (int j = 0; j < D; ++j) {
    if constexpr (kMap) {
      carry[j] = Affine<acc_t, D>::variable(j);
    } else {
      carry[j] = carry_in && !walk_whole ? carry_in[q * D + j] : initial_carry(pb, j, lane.seq);
    }
  }

  for (int64_t k0 = 0; k0 < lane.len; k0 += U) {
    // Issue the loads of U steps before the dependent math.
    StepIn<acc_t> in[U];
    int64_t e[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u;
      const int64_t t = reverse ? lane.begin + lane.len - 1 - k : lane.begin + k;
      e[u] = lane.base + t * stride;
      in[u] = k < lane.len ? load_step(pb, e[u]) : past_end<acc_t>();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u < lane.len) step_at<Step, !kMap>(pb, params, in[u], e[u], carry);
    }
  }

  if constexpr (kMap) {
    ChunkMap<acc_t, D> m;
#pragma unroll
    for (int j = 0; j < D; ++j) m.f[j] = carry[j];
    maps[q] = m;
  } else {
    if (lane.chunk == (reverse ? 0 : chunks - 1)) finish_sequence<Step>(pb, params, lane.seq, carry);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pass 2: compose chunk maps in scan order, a block per group
// ---------------------------------------------------------------------------------------------------------

// Group g is sequence (o, i) = (g / inner, g % inner) of the lanes regime, whose chunk c is lane
// (o * chunks + c) * inner + i; the global-chunk regime is one group with inner = 1 and chunk c = unit c.
// Writes carry_in[q * D + j], the true carry entering each chunk; the first chunk in scan order gets the
// group's initial carry (init[j * num_seqs + g], or zeros). whole[g] = 1 when any composed carry is not
// finite: the composed carries may then differ from the sequential ones, and pass 3 walks the group whole.
template <typename acc_t, int D>
__global__ void __launch_bounds__(kComposeThreads)
    compose_kernel(const ChunkMap<acc_t, D>* maps, acc_t* carry_in, int* whole, const acc_t* init,
                   const int64_t num_seqs, const int64_t inner, const int64_t chunks, const bool reverse) {
  using Map = ChunkMap<acc_t, D>;
  using BlockScan = cub::BlockScan<Map, kComposeThreads>;
  __shared__ typename BlockScan::TempStorage temp;

  const int64_t g = blockIdx.x;
  const int64_t o = g / inner, i = g % inner;
  auto lane_of = [&](int64_t k) {  // k-th chunk in scan order
    const int64_t c = reverse ? chunks - 1 - k : k;
    return (o * chunks + c) * inner + i;
  };
  // Each thread owns a run of consecutive chunks (in scan order).
  const int64_t per_thread = (chunks + kComposeThreads - 1) / kComposeThreads;
  const int64_t k_begin = min64(chunks, static_cast<int64_t>(threadIdx.x) * per_thread);
  const int64_t k_end = min64(chunks, k_begin + per_thread);

  Map run = Map::identity();
  for (int64_t k = k_begin; k < k_end; ++k) run = compose(run, maps[lane_of(k)]);
  Map before;  // the maps of every earlier run, composed
  BlockScan(temp).ExclusiveScan(run, before, Map::identity(), ComposeOp<acc_t, D>());

  acc_t x[D], y[D];
#pragma unroll
  for (int j = 0; j < D; ++j) x[j] = init ? init[j * num_seqs + g] : acc_t(0);
  apply_map(before, x, y);
  bool finite = true;
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t q = lane_of(k);
#pragma unroll
    for (int j = 0; j < D; ++j) carry_in[q * D + j] = y[j];
    // Every composed carry is checked, the last chunk's too: a map built by composing tiles can hold a
    // 0 * inf that the sequential walk never computes, so a non-finite carry entering any chunk may be wrong.
    finite = finite && all_finite(y, D);
    apply_map(maps[q], y, x);
#pragma unroll
    for (int j = 0; j < D; ++j) y[j] = x[j];
  }
  const int any_bad = __syncthreads_or(!finite);
  if (threadIdx.x == 0) whole[g] = any_bad;
}

// ---------------------------------------------------------------------------------------------------------
// Warp regimes: contiguous time, a warp per sequence or per global chunk
// ---------------------------------------------------------------------------------------------------------

// First position of segment s (s <= num_seqs): packed offsets clamped to [0, numel], or rows of T steps.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t seg_begin(const Problem<scalar_t, acc_t>& pb, int64_t s) {
  if (pb.cu_seqlens) return max64(int64_t(0), min64(pb.numel, pb.cu_seqlens[s]));
  return s * pb.steps;
}

// The segment holding position p: the last s in [lo, hi] with seg_begin(s) <= p (so empty segments, which
// begin where the next one does, are skipped), or lo if there is none.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t find_seg(const Problem<scalar_t, acc_t>& pb, int64_t p, int64_t lo, int64_t hi) {
  if (!pb.cu_seqlens) return max64(lo, min64(hi, p / pb.steps));
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (seg_begin(pb, mid) <= p) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Walks this thread's kWarpItems steps of a tile (scan-order offsets kl.. within the unit, positions pos[]),
// starting in segment `seg`. A segment's first step in scan order starts from its initial carry; after its
// last, stored walks write the bootstrap gradient. Returns the segment of the next position in scan order.
template <class Step, bool kStore, typename scalar_t, typename acc_t, typename C>
__device__ __forceinline__ int64_t walk_items(const Problem<scalar_t, acc_t>& pb, const ScanParams<acc_t>& params,
                                              const bool reverse, const StepIn<acc_t> (&in)[kWarpItems],
                                              const int64_t (&pos)[kWarpItems], const int64_t kl, const int64_t len,
                                              int64_t seg, const int64_t seg_lo, const int64_t seg_hi, C* carry) {
  int64_t sb = seg_begin(pb, seg), se = seg_begin(pb, seg + 1);
#pragma unroll
  for (int u = 0; u < kWarpItems; ++u) {
    if (kl + u >= len) break;
    const int64_t p = pos[u];
    if (p == (reverse ? se - 1 : sb)) {
#pragma unroll
      for (int j = 0; j < Step::kCarry; ++j) carry[j] = C(initial_carry(pb, j, seg));
    }
    step_at<Step, kStore>(pb, params, in[u], p, carry);
    if (p == (reverse ? sb : se - 1)) {
      if constexpr (kStore) finish_sequence<Step>(pb, params, seg, carry);
      if (reverse) {
        while (seg > seg_lo && seg_begin(pb, seg) > p - 1) --seg;
      } else {
        while (seg < seg_hi && seg_begin(pb, seg + 1) <= p + 1) ++seg;
      }
      sb = seg_begin(pb, seg);
      se = seg_begin(pb, seg + 1);
    }
  }
  return seg;
}

// Walks unit u (sequence u when per_seq, else the positions [u * kWarpChunk, (u + 1) * kWarpChunk)) with the
// whole warp, starting from tile_carry and leaving the unit's carry out there. kMap: tile_carry holds forms
// of the unit's carry in, and ends as the unit's map; otherwise outputs are stored.
template <class Step, bool kMap, typename scalar_t, typename acc_t, typename C>
__device__ __forceinline__ void walk_unit(const Problem<scalar_t, acc_t>& pb, const ScanParams<acc_t>& params,
                                          const bool reverse, const bool per_seq, const int64_t u, C* tile_carry) {
  constexpr int D = Step::kCarry;
  constexpr int K = kWarpItems;
  using Form = Affine<acc_t, D>;
  using Map = ChunkMap<acc_t, D>;
  const int lane = threadIdx.x % kWarpSize;

  int64_t p0, p1, seg_lo, seg_hi;
  if (per_seq) {
    p0 = seg_begin(pb, u);
    p1 = max64(p0, seg_begin(pb, u + 1));
    seg_lo = seg_hi = u;
  } else {
    p0 = u * kWarpChunk;
    p1 = min64(pb.numel, p0 + kWarpChunk);
    seg_lo = find_seg(pb, p0, 0, pb.num_seqs - 1);
    seg_hi = find_seg(pb, p1 - 1, seg_lo, pb.num_seqs - 1);
  }
  const int64_t len = p1 - p0;
  int64_t seg_tile = reverse ? seg_hi : seg_lo;  // segment of the tile's first position in scan order

  for (int64_t k0 = 0; k0 < len; k0 += kTile) {
    const int64_t kl = k0 + static_cast<int64_t>(lane) * K;
    StepIn<acc_t> in[K];
    int64_t pos[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int64_t k = kl + i;
      pos[i] = reverse ? p1 - 1 - k : p0 + k;
      in[i] = k < len ? load_step(pb, pos[i]) : past_end<acc_t>();
    }
    int64_t seg = seg_tile;
    if (kl < len) seg = reverse ? find_seg(pb, pos[0], seg_lo, seg_tile) : find_seg(pb, pos[0], seg_tile, seg_hi);

    // This thread's map, then the maps of the threads before it.
    Form f[D];
#pragma unroll
    for (int j = 0; j < D; ++j) f[j] = Form::variable(j);
    const int64_t seg_next = walk_items<Step, false>(pb, params, reverse, in, pos, kl, len, seg, seg_lo, seg_hi, f);
    Map mine;
#pragma unroll
    for (int j = 0; j < D; ++j) mine.f[j] = f[j];
    const Map inclusive = warp_inclusive_scan(mine, lane);

    if constexpr (kMap) {
      // Lane 31's inclusive map is the whole tile's: compose it onto the unit's map so far.
      Map tile;
#pragma unroll
      for (int j = 0; j < D; ++j) {
        tile.f[j].c = __shfl_sync(kFullMask, inclusive.f[j].c, kWarpSize - 1);
#pragma unroll
        for (int i = 0; i < D; ++i) tile.f[j].k[i] = __shfl_sync(kFullMask, inclusive.f[j].k[i], kWarpSize - 1);
      }
      C next[D];
      apply_map(tile, tile_carry, next);
#pragma unroll
      for (int j = 0; j < D; ++j) tile_carry[j] = next[j];
    } else {
      // The true carry entering this thread's steps; re-walk them from registers, storing outputs. Lane 31's
      // carry out (its steps past the end pass it through) enters the next tile.
      const Map exclusive = shfl_up_map(inclusive, 1);  // lane 0's is not used
      C x[D];
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < D; ++j) x[j] = tile_carry[j];
      } else {
        apply_map(exclusive, tile_carry, x);
      }
      if (!__any_sync(kFullMask, !all_finite(tile_carry, D) || !all_finite(x, D))) {
        walk_items<Step, true>(pb, params, reverse, in, pos, kl, len, seg, seg_lo, seg_hi, x);
#pragma unroll
        for (int j = 0; j < D; ++j) tile_carry[j] = __shfl_sync(kFullMask, x[j], kWarpSize - 1);
      } else {
        // A non-finite carry met a map: walk the tile's threads one after another instead (see the top).
        for (int l = 0; l < kWarpSize; ++l) {
          if (lane == l) {
#pragma unroll
            for (int j = 0; j < D; ++j) x[j] = tile_carry[j];
            walk_items<Step, true>(pb, params, reverse, in, pos, kl, len, seg, seg_lo, seg_hi, x);
          }
#pragma unroll
          for (int j = 0; j < D; ++j) tile_carry[j] = __shfl_sync(kFullMask, x[j], l);
        }
      }
    }
    seg_tile = __shfl_sync(kFullMask, static_cast<long long>(seg_next), kWarpSize - 1);
  }
}

// A warp per unit of `units` (walk_unit). kMap: pass 1, writes the unit's map to maps[u]. Otherwise stores
// outputs, starting from carry_in[u] (pass 3) or from zeros (per_seq, or a single chunk: the unit's first
// step starts a segment anyway). With *whole set (pass 2 met a non-finite carry), warp 0 walks every unit
// in scan order, carrying the true carry from one to the next.
template <class Step, typename scalar_t, typename acc_t, bool kMap>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    warps_kernel(const Problem<scalar_t, acc_t> pb, const ScanParams<acc_t> params, const bool reverse,
                 const bool per_seq, const int64_t units, ChunkMap<acc_t, Step::kCarry>* maps,
                 const acc_t* carry_in, const int* whole) {
  constexpr int D = Step::kCarry;
  using Form = Affine<acc_t, D>;
  using C = std::conditional_t<kMap, Form, acc_t>;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (u >= units) return;  // the whole warp: every shuffle has all 32 lanes

  C tile_carry[D];
  if constexpr (kMap) {
#pragma unroll
    for (int j = 0; j < D; ++j) tile_carry[j] = Form::variable(j);
    walk_unit<Step, true>(pb, params, reverse, per_seq, u, tile_carry);
    if (threadIdx.x % kWarpSize == 0) {
      ChunkMap<acc_t, D> m;
#pragma unroll
      for (int j = 0; j < D; ++j) m.f[j] = tile_carry[j];
      maps[u] = m;
    }
  } else if (whole && *whole) {
    if (u != 0) return;
#pragma unroll
    for (int j = 0; j < D; ++j) tile_carry[j] = acc_t(0);
    for (int64_t i = 0; i < units; ++i)
      walk_unit<Step, false>(pb, params, reverse, per_seq, reverse ? units - 1 - i : i, tile_carry);
  } else {
#pragma unroll
    for (int j = 0; j < D; ++j) tile_carry[j] = carry_in ? carry_in[u * D + j] : acc_t(0);
    walk_unit<Step, false>(pb, params, reverse, per_seq, u, tile_carry);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------------------

inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= INT_MAX, "rlkernels: scan too large for one launch (", work, " work items)");
  return static_cast<unsigned>(blocks);
}

template <class Step, typename scalar_t, typename acc_t>
void run_scan(const Problem<scalar_t, acc_t>& pb, const ScanParams<acc_t>& params, bool reverse,
              cudaStream_t stream) {
  constexpr int D = Step::kCarry;
  using Map = ChunkMap<acc_t, D>;
  if (pb.num_seqs == 0 || pb.numel == 0) return;
  TORCH_CHECK(!pb.bootstrap_grad || (HasBootstrapGrad<Step, acc_t>::value && !pb.init),
              "rlkernels: bootstrap gradients come from backward steps that start from zero carries");
  const Plan plan = plan_of(pb);
  c10::Allocator& allocator = *c10::cuda::CUDACachingAllocator::get();
  // Workspace for the chunked regimes: the maps (pass 1) and the carries entering each chunk (pass 2).
  // Freed here while the kernels may still run: the caching allocator reuses memory in stream order.
  struct Workspace {
    c10::DataPtr maps, carries, whole;
  };
  auto chunk_workspace = [&](int64_t chunks, int64_t groups) {
    return Workspace{allocator.allocate(chunks * sizeof(Map)), allocator.allocate(chunks * D * sizeof(acc_t)),
                     allocator.allocate(groups * sizeof(int))};
  };

  switch (plan.regime) {
    case Regime::kLanes: {
      lanes_kernel<Step, scalar_t, acc_t, false><<<grid_for(plan.units, kLaneThreads), kLaneThreads, 0, stream>>>(
          pb, params, reverse, 1, pb.steps, nullptr, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case Regime::kLanesChunked: {
      const Workspace ws = chunk_workspace(plan.units, pb.num_seqs);
      auto* maps = static_cast<Map*>(ws.maps.get());
      auto* carries = static_cast<acc_t*>(ws.carries.get());
      auto* whole = static_cast<int*>(ws.whole.get());
      const unsigned grid = grid_for(plan.units, kLaneThreads);
      lanes_kernel<Step, scalar_t, acc_t, true><<<grid, kLaneThreads, 0, stream>>>(
          pb, params, reverse, plan.chunks, kLaneChunk, maps, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      compose_kernel<acc_t, D><<<grid_for(pb.num_seqs, 1), kComposeThreads, 0, stream>>>(
          maps, carries, whole, pb.init, pb.num_seqs, pb.inner, plan.chunks, reverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      lanes_kernel<Step, scalar_t, acc_t, false><<<grid, kLaneThreads, 0, stream>>>(
          pb, params, reverse, plan.chunks, kLaneChunk, nullptr, carries, whole);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case Regime::kWarpPerSeq:
    case Regime::kWarpChunks: {
      const bool per_seq = plan.regime == Regime::kWarpPerSeq;
      const unsigned grid = grid_for(plan.units, kWarpsPerBlock);
      constexpr int threads = kWarpsPerBlock * kWarpSize;
      if (per_seq || plan.units == 1) {
        warps_kernel<Step, scalar_t, acc_t, false><<<grid, threads, 0, stream>>>(pb, params, reverse, per_seq,
                                                                                 plan.units, nullptr, nullptr, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      }
      const Workspace ws = chunk_workspace(plan.units, 1);
      auto* maps = static_cast<Map*>(ws.maps.get());
      auto* carries = static_cast<acc_t*>(ws.carries.get());
      auto* whole = static_cast<int*>(ws.whole.get());
      warps_kernel<Step, scalar_t, acc_t, true><<<grid, threads, 0, stream>>>(pb, params, reverse, false,
                                                                              plan.units, maps, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // One group: the whole array. Its initial carry does not matter (the first step starts a segment).
      compose_kernel<acc_t, D><<<1, kComposeThreads, 0, stream>>>(maps, carries, whole, nullptr, 1, 1,
                                                                  plan.chunks, reverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      warps_kernel<Step, scalar_t, acc_t, false><<<grid, threads, 0, stream>>>(pb, params, reverse, false,
                                                                               plan.units, nullptr, carries, whole);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
  }
}

}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
