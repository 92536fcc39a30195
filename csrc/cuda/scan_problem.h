// The interface between the CUDA op entry points (returns.cu) and the CUDA scan engine (scan_engine.cuh):
// the problem description, the exp functor of the device, and the launcher's declaration. The launcher is
// defined in scan_engine.cuh and instantiated for every step of RLK_SCAN_STEPS in the scan_part_*.cu files
// (scan_parts.cuh), so the op entry points compile without any kernel code and the kernels compile two files
// at a time.
#pragma once

// CUDA translation units get their own inline namespace for the portable headers: the host-side copies
// of the RLK_HOST_DEVICE functions that nvcc emits must not merge with the CPU objects' (macros.h).
#ifndef RLK_ISA
#define RLK_ISA cuda_isa
#endif

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "rlkernels/scan.h"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {

// The device's exp for the off-policy estimators' importance weights: the precise expf/exp, never the
// fast-math __expf.
struct CudaExp {
  RLK_FN float operator()(float x) const { return ::expf(x); }
  RLK_FN double operator()(double x) const { return ::exp(x); }
};

using VtraceStep = VtraceStepT<CudaExp>;
using VtraceBackwardStep = VtraceBackwardStepT<CudaExp>;

// One scan problem, as device pointers into canonical contiguous tensors: [O, T, I] (sequence s = o * I + i,
// element t at o * T * I + t * I + i) or 1-D packed with cu_seqlens (segment s = [cu[s], cu[s + 1])).
//
// Each stream has the type the CPU engine gives it (csrc/cpu/scan_engine.h, Kind): model inputs are
// `scalar_t` (read as they are, converted to acc_t in registers), flags are bool or uint8 bytes, upstream
// gradients and the saved V-trace carries are acc_t. A null stream reads 0, except the mask: null means every
// in-range step is valid.
template <typename scalar_t, typename acc_t>
struct Problem {
  const scalar_t* r = nullptr;   // rewards
  const scalar_t* v = nullptr;   // values
  const scalar_t* nv = nullptr;  // next_values
  const scalar_t* lr = nullptr;  // log_rhos
  const scalar_t* a = nullptr;   // linear_scan coefficients
  const scalar_t* b = nullptr;
  const uint8_t* term = nullptr;
  const uint8_t* trunc = nullptr;
  const uint8_t* mask = nullptr;
  const acc_t* g0 = nullptr;  // upstream gradients of the two forward outputs
  const acc_t* g1 = nullptr;
  const acc_t* s0 = nullptr;  // carries saved by the V-trace forward
  const acc_t* s1 = nullptr;
  acc_t* out[4] = {};  // a null output is not written

  // Initial carries, laid out [carry j][sequence] (the CPU's `init`); null: zeros.
  const acc_t* init = nullptr;
  // Backward steps only: Step::bootstrap_grad of each sequence's final carry, one per sequence. The caller
  // zero-fills it: sequences with no steps are not visited (backward walks start from zero carries, and
  // bootstrap_grad of a zero carry is zero).
  acc_t* bootstrap_grad = nullptr;

  // Geometry.
  int64_t outer = 1, steps = 0, inner = 1;  // dense [O, T, I]
  int64_t numel = 0;                        // elements of each stream
  int64_t num_seqs = 0;                     // O * I, or the number of packed segments
  // Packed: num_seqs + 1 int64 offsets, on the device; never read by the host (no synchronization). They
  // are not validated: the caller guarantees 0 = cu[0] <= cu[1] <= ... <= cu[n] = numel. The kernels clamp
  // what they read to [0, numel], so bad offsets give wrong numbers, never out-of-bounds accesses.
  const int64_t* cu_seqlens = nullptr;
};

// Runs `Step` over every sequence of `pb` on `stream`, reverse or forward in time. Chooses the regime from
// the shape alone (never from values or the device), so results are bit-identical run to run.
template <class Step, typename scalar_t, typename acc_t>
void run_scan(const Problem<scalar_t, acc_t>& pb, const ScanParams<acc_t>& params, bool reverse,
              cudaStream_t stream);

}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
