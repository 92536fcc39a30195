// Types shared by the CPU scan engine and its per-instruction-set compute blocks (scan_block.h).
#pragma once

#include <cstdint>

#include "rlkernels/scan.h"

namespace rlkernels {
namespace cpu {

enum Stream : int { kR, kV, kNV, kLR, kA, kB, kTerm, kTrunc, kMask, kG0, kG1, kS0, kS1, kNumStreams };
#define RLK_STEP_ID(id, Step) id,
enum class StepId : int { RLK_SCAN_STEPS(RLK_STEP_ID, void) };
#undef RLK_STEP_ID
constexpr int kLanes = 16;
constexpr int kBlock = 32;
constexpr int kMaxCarry = 2;
constexpr int kMaxOut = 4;

// Which inputs a walk reads, as a bit set: bit s for stream s (present), and kHasNextBit for
// ScanParams::has_next. The in-place walks are compiled once for any inputs (presence looked up at run time)
// and again for each common set below, where every absent stream is a constant the compiler folds away
// (no loads, no (1 - truncated) multiplies, no selects on an all-valid mask) and the per-stream pointers fit
// in registers: the run-time version spends most of its time loading and transposing absent streams.
constexpr uint32_t kHasNextBit = 1u << 31;
constexpr uint32_t bit(int s) { return 1u << s; }
constexpr uint32_t kEveryBit = ((1u << kNumStreams) - 1) | kHasNextBit;

// The input sets the in-place walks are specialized for, per step: what the integrations and the
// benchmarks pass (CleanRL/SB3: terminated and a bootstrap value; TorchRL: next_values with terminated and
// truncated, the wrapper marking the last step truncated; verl/LLM: a token mask; backward: the grads).
// Every set here is reachable from the public functions (truncated always comes with next_values) and is
// exercised by tests/test_returns.py::test_specialized_walks_and_streaming_stores.
constexpr uint32_t kGaeSets[] = {
    bit(kR) | bit(kV) | bit(kTerm),
    bit(kR) | bit(kV) | bit(kNV) | bit(kTerm) | bit(kTrunc) | kHasNextBit,
    bit(kR) | bit(kV) | bit(kMask),
};
constexpr uint32_t kGaeBackwardSets[] = {
    bit(kG0) | bit(kG1) | bit(kTerm),
    bit(kG0) | bit(kG1) | bit(kTerm) | bit(kTrunc) | kHasNextBit,
    bit(kG0) | bit(kG1) | bit(kMask),
};
constexpr uint32_t kReturnsSets[] = {
    bit(kR) | bit(kTerm),
    bit(kR) | bit(kNV) | bit(kTerm) | bit(kTrunc) | kHasNextBit,
    bit(kR) | bit(kMask),
};
constexpr uint32_t kReturnsBackwardSets[] = {
    bit(kG0) | bit(kTerm),
    bit(kG0) | bit(kTerm) | bit(kTrunc) | kHasNextBit,
    bit(kG0) | bit(kMask),
};

// carry: [kCarry][kLanes] values, or with `symbolic` the chunk maps [kCarry][kCarry + 1][kLanes]
// (constant term first). obuf: [kOut][kBlock * kLanes]; not written when symbolic.
template <typename acc_t>
using BlockFn = void (*)(const ScanParams<acc_t>& params, const acc_t* const* src, int kn, acc_t* carry,
                         acc_t* obuf);

// The streams of an in-place walk: stream s is read in place at p[s] + offset, as a value of the kind kind[s]
// (widened to acc_t as it loads) or as 0/1 flags of one byte; absent streams read 0 (1 for the mask).
enum DirectKind : unsigned char {
  kAbsent = 0,
  kAccValue = 1,   // acc_t
  kFlagByte = 2,   // one byte, nonzero = set
  kBf16Value = 3,  // bfloat16, acc_t float
  kF16Value = 4,   // float16, acc_t float
  kNotInPlace = 255,
};
struct DirectStreams {
  const void* p[kNumStreams] = {};
  unsigned char kind[kNumStreams] = {};
};

// The in-place walks read terminated, truncated and mask as one byte per element (set_flag admits only bool and
// uint8 flags) and every other stream as acc_t, or as 16-bit values widened to float in registers; anything
// else takes the buffered path.
inline bool in_place_layout(const DirectStreams& ds) {
  for (int s = 0; s < kNumStreams; ++s) {
    const bool flag = s == kTerm || s == kTrunc || s == kMask;
    const unsigned char k = ds.kind[s];
    if (k == kAbsent) continue;
    if (flag ? k != kFlagByte : (k != kAccValue && k != kBf16Value && k != kF16Value)) return false;
  }
  return true;
}

// Whether any stream of `ds` is 16-bit (the walks then widen it as it loads).
inline bool has_16bit(const DirectStreams& ds) {
  for (int s = 0; s < kNumStreams; ++s)
    if (ds.kind[s] == kBf16Value || ds.kind[s] == kF16Value) return true;
  return false;
}

// The bit set (see kGaeSets) of the streams in `ds`, with has_next.
inline uint32_t presence_of(const DirectStreams& ds, bool has_next) {
  uint32_t m = has_next ? kHasNextBit : 0u;
  for (int s = 0; s < kNumStreams; ++s)
    if (ds.kind[s] != 0) m |= bit(s);
  return m;
}

// Walks `kn` steps of one group of n (1..kLanes) sequences: step kk reads the kLanes elements at off0 + kk * step
// (+ lane), which must lie inside the inputs, and writes the first n. `out[j]` are the outputs (null when absent,
// or when `symbolic`); carry as for BlockFn.
template <typename acc_t>
using DirectFn = void (*)(const ScanParams<acc_t>& params, const DirectStreams& in, int64_t off0, int64_t step,
                          int64_t kn, int n, acc_t* carry, acc_t* const* out);

// Walks `kn` steps (a multiple of kBlock) of kLanes lanes contiguous in time: lane l's step kk is at
// lane_off[l] + kk * dir (dir = +1 or -1). `out` and `carry` as for DirectFn. `stream`: write the outputs
// with streaming (non-temporal) stores where they are line-aligned, for outputs too big to stay in cache.
template <typename acc_t>
using TransposedFn = void (*)(const ScanParams<acc_t>& params, const DirectStreams& in, const int64_t* lane_off,
                              int64_t dir, int64_t kn, acc_t* carry, acc_t* const* out, bool stream);

}  // namespace cpu

}  // namespace rlkernels
