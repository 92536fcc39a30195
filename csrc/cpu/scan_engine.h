// The CPU scan engine: walks sequences with an estimator's step function (csrc/include/rlkernels/scan.h).
//
// Layout. Every input is a canonical contiguous tensor: [O, T, I] (sequence s = (o, i), element t at
// o*T*I + t*I + i) or 1-D packed with cu_seqlens (segment s = [cu[s], cu[s+1])). A "lane" is a run of
// time steps of one sequence: a whole sequence, or one chunk of a long one.
//
// Lanes are walked kLanes at a time in lockstep. Each block of kBlock steps is first loaded into small
// lane-contiguous buffers in the accumulation type (dtype conversion, flags to 0/1, the mask and the
// lanes' ragged ends folded into `valid`), then the step runs over the buffers with the lane loop innermost
// (the loop the compiler vectorizes), then outputs are stored back. The time-major layout loads whole
// vectors of adjacent sequences; the batch-major layout transposes through the buffer.
//
// Long sequences (few sequences, many steps) are cut into chunks of kChunk steps that run as independent
// lanes: pass 1 runs each chunk with a symbolic carry (Affine) to get the chunk's map, pass 2 composes the
// maps along each sequence (a few numbers per chunk), pass 3 re-runs each chunk with its true carry.
// Chunking depends only on the shape, never on the thread count, so results are bit-identical run to run.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "rlkernels/scan.h"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cpu {

enum Stream : int { kR, kV, kNV, kLR, kA, kB, kTerm, kTrunc, kMask, kG0, kG1, kS0, kS1, kNumStreams };
enum class Kind : uint8_t { kNone, kScalar, kFlag, kAcc };

constexpr int kLanes = 16;
constexpr int kBlock = 32;
constexpr int64_t kChunk = 4096;           // steps per chunk of a long sequence
constexpr int64_t kChunkMinSteps = 16384;  // shorter sequences are walked whole
constexpr int64_t kChunkMaxSeqs = 256;     // with more sequences than this, lanes are already plentiful

struct StdExp {
  template <typename T>
  T operator()(T x) const {
    return std::exp(x);
  }
};

// One scan problem: typed stream pointers sharing the canonical layout, and up to four outputs.
template <typename acc_t>
struct Problem {
  const void* in[kNumStreams] = {};
  Kind kind[kNumStreams] = {};
  acc_t* out[4] = {};
  // Geometry.
  int64_t outer = 1, steps = 0, inner = 1;  // dense [O, T, I]
  const int64_t* cu_seqlens = nullptr;      // packed: segment offsets, num_seqs + 1 of them
  int64_t num_seqs = 0;

  void set(Stream s, const void* p, Kind k) {
    in[s] = p;
    kind[s] = p ? k : Kind::kNone;
  }
  int64_t time_stride() const { return cu_seqlens ? 1 : inner; }
  int64_t seq_base(int64_t s) const { return cu_seqlens ? cu_seqlens[s] : (s / inner) * steps * inner + s % inner; }
  int64_t seq_len(int64_t s) const { return cu_seqlens ? cu_seqlens[s + 1] - cu_seqlens[s] : steps; }
};

struct Lane {
  int64_t base;   // element offset of the sequence's t = 0
  int64_t begin;  // first time step of the lane
  int64_t len;    // number of steps
};

template <Kind K, typename scalar_t, typename acc_t>
inline acc_t load_as(const void* p, int64_t i) {
  if constexpr (K == Kind::kScalar) return static_cast<acc_t>(static_cast<const scalar_t*>(p)[i]);
  if constexpr (K == Kind::kFlag) return static_cast<const uint8_t*>(p)[i] ? acc_t(1) : acc_t(0);
  if constexpr (K == Kind::kAcc) return static_cast<const acc_t*>(p)[i];
  return acc_t(1);  // kNone is only loaded for the mask: every in-range step is valid
}

// Walks up to kLanes lanes in lockstep, `reverse` in time. `carry[j][l]` holds the lanes' carries in and
// out. With C = acc_t outputs are stored; with C = Affine the walk only computes the lanes' maps.
template <class Step, typename scalar_t, typename acc_t, typename C>
void walk_lanes(const Problem<acc_t>& pb, const ScanParams<acc_t>& params, const Lane* lanes, int num_lanes,
                bool reverse, C (*carry)[kLanes]) {
  constexpr bool kStore = std::is_same_v<C, acc_t>;
  alignas(64) acc_t buf[kNumStreams][kBlock * kLanes];
  alignas(64) acc_t obuf[Step::kOut][kBlock * kLanes];
  static const acc_t kZeros[kBlock * kLanes] = {};
  const acc_t* src[kNumStreams];
  for (int s = 0; s < kNumStreams; ++s) src[s] = (pb.in[s] || s == kMask) ? buf[s] : kZeros;

  const int64_t ts = pb.time_stride();
  int64_t max_len = 0;
  for (int l = 0; l < num_lanes; ++l) max_len = std::max(max_len, lanes[l].len);
  // Time-major fast path: kLanes adjacent sequences with the same span load whole vectors per step.
  bool contiguous = num_lanes == kLanes && ts != 1;
  for (int l = 1; l < num_lanes && contiguous; ++l)
    contiguous = lanes[l].base == lanes[0].base + l && lanes[l].begin == lanes[0].begin && lanes[l].len == lanes[0].len;

  auto time_of = [&](const Lane& lane, int64_t k) {
    return reverse ? lane.begin + lane.len - 1 - k : lane.begin + k;
  };

  for (int64_t k0 = 0; k0 < max_len; k0 += kBlock) {
    const int kn = static_cast<int>(std::min<int64_t>(kBlock, max_len - k0));
    // Load.
    for (int s = 0; s < kNumStreams; ++s) {
      if (!pb.in[s] && s != kMask) continue;
      // One instantiation per input kind keeps the conversion out of the inner loops.
      auto load = [&]<Kind K>() {
        acc_t* dst = buf[s];
        const void* p = pb.in[s];
        if (contiguous) {
          for (int kk = 0; kk < kn; ++kk) {
            const int64_t off = lanes[0].base + time_of(lanes[0], k0 + kk) * ts;
            for (int l = 0; l < kLanes; ++l) dst[kk * kLanes + l] = load_as<K, scalar_t, acc_t>(p, off + l);
          }
          return;
        }
        for (int l = 0; l < kLanes; ++l) {
          const int64_t n = l < num_lanes ? std::min<int64_t>(kn, lanes[l].len - k0) : 0;
          int kk = 0;
          for (; kk < n; ++kk)
            dst[kk * kLanes + l] = load_as<K, scalar_t, acc_t>(p, lanes[l].base + time_of(lanes[l], k0 + kk) * ts);
          for (; kk < kn; ++kk) dst[kk * kLanes + l] = acc_t(0);  // past the lane's end: invalid
        }
      };
      switch (pb.kind[s]) {
        case Kind::kScalar: load.template operator()<Kind::kScalar>(); break;
        case Kind::kFlag: load.template operator()<Kind::kFlag>(); break;
        case Kind::kAcc: load.template operator()<Kind::kAcc>(); break;
        default: load.template operator()<Kind::kNone>(); break;  // an absent mask: 1 inside the lanes
      }
    }
    // Step, lanes innermost.
    for (int kk = 0; kk < kn; ++kk) {
      const int row = kk * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        StepIn<acc_t> in;
        in.r = src[kR][row + l];
        in.v = src[kV][row + l];
        in.nv = src[kNV][row + l];
        in.lr = src[kLR][row + l];
        in.a = src[kA][row + l];
        in.b = src[kB][row + l];
        in.term = src[kTerm][row + l];
        in.trunc = src[kTrunc][row + l];
        in.valid = src[kMask][row + l];
        in.g0 = src[kG0][row + l];
        in.g1 = src[kG1][row + l];
        in.s0 = src[kS0][row + l];
        in.s1 = src[kS1][row + l];
        C c[Step::kCarry];
        C o[Step::kOut];
        for (int j = 0; j < Step::kCarry; ++j) c[j] = carry[j][l];
        Step::step(params, in, c, o);
        for (int j = 0; j < Step::kCarry; ++j) carry[j][l] = select(in.valid, c[j], carry[j][l]);
        if constexpr (kStore) {
          for (int j = 0; j < Step::kOut; ++j) obuf[j][row + l] = select(in.valid, o[j], acc_t(0));
        }
      }
    }
    // Store.
    if constexpr (kStore) {
      for (int j = 0; j < Step::kOut; ++j) {
        acc_t* out = pb.out[j];
        if (!out) continue;
        if (contiguous) {
          for (int kk = 0; kk < kn; ++kk) {
            const int64_t off = lanes[0].base + time_of(lanes[0], k0 + kk) * ts;
            for (int l = 0; l < kLanes; ++l) out[off + l] = obuf[j][kk * kLanes + l];
          }
        } else {
          for (int l = 0; l < num_lanes; ++l) {
            const Lane& lane = lanes[l];
            const int64_t n = std::min<int64_t>(kn, lane.len - k0);
            for (int kk = 0; kk < n; ++kk) out[lane.base + time_of(lane, k0 + kk) * ts] = obuf[j][kk * kLanes + l];
          }
        }
      }
    }
  }
}

// Runs `Step` over every sequence of `pb`. `init[j * num_seqs + s]` is sequence s's initial carry j
// (nullptr: zeros); the final carries are written to `final_carry` the same way when it is not null.
template <class Step, typename scalar_t, typename acc_t>
void run_scan(const Problem<acc_t>& pb, const ScanParams<acc_t>& params, bool reverse, const acc_t* init,
              acc_t* final_carry) {
  constexpr int D = Step::kCarry;
  const int64_t num_seqs = pb.num_seqs;
  if (num_seqs == 0) return;
  const bool chunked = !pb.cu_seqlens && pb.steps >= kChunkMinSteps && num_seqs <= kChunkMaxSeqs;
  const int64_t chunks = chunked ? (pb.steps + kChunk - 1) / kChunk : 1;
  const int64_t num_lanes = num_seqs * chunks;
  // Lane q = s * chunks + c is chunk c of sequence s.
  auto lane_of = [&](int64_t q) {
    const int64_t s = q / chunks, c = q % chunks;
    const int64_t len = pb.seq_len(s);
    if (!chunked) return Lane{pb.seq_base(s), 0, len};
    const int64_t begin = c * kChunk;
    return Lane{pb.seq_base(s), begin, std::min(kChunk, len - begin)};
  };
  const int64_t groups = (num_lanes + kLanes - 1) / kLanes;

  // carry_in[q * D + j]: the carry entering lane q.
  std::vector<acc_t> carry_in(num_lanes * D, acc_t(0));
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = reverse ? s * chunks + chunks - 1 : s * chunks;
    for (int j = 0; j < D; ++j) carry_in[first * D + j] = init ? init[j * num_seqs + s] : acc_t(0);
  }

  if (chunked) {
    // Pass 1: each chunk's map from its carry in to its carry out.
    using Map = Affine<acc_t, D>;
    std::vector<Map> maps(num_lanes * D);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        Lane lanes[kLanes];
        const int n = static_cast<int>(std::min<int64_t>(kLanes, num_lanes - g * kLanes));
        for (int l = 0; l < n; ++l) lanes[l] = lane_of(g * kLanes + l);
        Map carry[D][kLanes];
        for (int j = 0; j < D; ++j)
          for (int l = 0; l < kLanes; ++l) carry[j][l] = Map::variable(j);
        walk_lanes<Step, scalar_t, acc_t, Map>(pb, params, lanes, n, reverse, carry);
        for (int l = 0; l < n; ++l)
          for (int j = 0; j < D; ++j) maps[(g * kLanes + l) * D + j] = carry[j][l];
      }
    });
    // Pass 2: compose along each sequence, in scan order.
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t i = 0; i + 1 < chunks; ++i) {
        const int64_t c = reverse ? chunks - 1 - i : i;
        const int64_t next = reverse ? c - 1 : c + 1;
        const int64_t q = s * chunks + c;
        for (int j = 0; j < D; ++j) carry_in[(s * chunks + next) * D + j] = maps[q * D + j](&carry_in[q * D]);
      }
    }
  }

  // Pass 3 (the only pass when not chunked): walk every lane with its true carry, storing outputs.
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      Lane lanes[kLanes];
      const int n = static_cast<int>(std::min<int64_t>(kLanes, num_lanes - g * kLanes));
      for (int l = 0; l < n; ++l) lanes[l] = lane_of(g * kLanes + l);
      acc_t carry[D][kLanes] = {};
      for (int l = 0; l < n; ++l)
        for (int j = 0; j < D; ++j) carry[j][l] = carry_in[(g * kLanes + l) * D + j];
      walk_lanes<Step, scalar_t, acc_t, acc_t>(pb, params, lanes, n, reverse, carry);
      if (final_carry) {
        for (int l = 0; l < n; ++l) {
          const int64_t q = g * kLanes + l, s = q / chunks, c = q % chunks;
          if (c != (reverse ? 0 : chunks - 1)) continue;
          for (int j = 0; j < D; ++j) final_carry[j * num_seqs + s] = carry[j][l];
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace RLK_ISA
}  // namespace rlkernels
