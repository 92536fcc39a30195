// Types shared by the CPU scan engine and its per-instruction-set compute blocks (scan_block.h).
#pragma once

#include "rlkernels/scan.h"

namespace rlkernels {
namespace cpu {

enum Stream : int { kR, kV, kNV, kLR, kA, kB, kTerm, kTrunc, kMask, kG0, kG1, kS0, kS1, kNumStreams };
enum class StepId : int {
  kLinearScan,
  kDiscountedReturns,
  kDiscountedReturnsBackward,
  kGae,
  kGaeBackward,
  kVtrace,
  kVtraceBackward,
};
constexpr int kLanes = 16;
constexpr int kBlock = 32;
constexpr int kMaxCarry = 2;
constexpr int kMaxOut = 4;

// carry: [kCarry][kLanes] values, or with `symbolic` the chunk maps [kCarry][kCarry + 1][kLanes]
// (constant term first). obuf: [kOut][kBlock * kLanes]; not written when symbolic.
template <typename acc_t>
using BlockFn = void (*)(const ScanParams<acc_t>& params, const acc_t* const* src, int kn, acc_t* carry,
                         acc_t* obuf);

}  // namespace cpu

}  // namespace rlkernels
