// The CUDA scan kernels of every step of RLK_SCAN_STEPS (csrc/include/rlkernels/scan.h), split across the
// scan_part_<k>.cu files by the step's position in the list, so they compile in parallel (the mamba
// selective_scan split) and a new estimator needs no file here: each part file holds one line, RLK_SCAN_PART(k).
#pragma once

#include "scan_engine.cuh"

#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {

constexpr std::size_t kScanParts = 4;

template <class... Steps>
struct StepList {};
#define RLK_STEP_TYPE(id, Step) , Step
using ScanSteps = StepList<void RLK_SCAN_STEPS(RLK_STEP_TYPE, CudaExp)>;  // void: the list's head, not a step
#undef RLK_STEP_TYPE

using Launcher = void (*)();

template <class Step>
void add_instances(std::vector<Launcher>& out) {
  out.push_back(reinterpret_cast<Launcher>(&run_scan<Step, float, float>));
  out.push_back(reinterpret_cast<Launcher>(&run_scan<Step, double, double>));
  if constexpr (!AccInputsOnly<Step>::value) {
    out.push_back(reinterpret_cast<Launcher>(&run_scan<Step, c10::Half, float>));
    out.push_back(reinterpret_cast<Launcher>(&run_scan<Step, c10::BFloat16, float>));
  }
}

template <bool kHere, class Step>
void add_instances_if(std::vector<Launcher>& out) {
  if constexpr (kHere) add_instances<Step>(out);
}

template <std::size_t kPart, class... Steps, std::size_t... I>
std::vector<Launcher> part_instances(std::index_sequence<I...>) {
  std::vector<Launcher> out;
  (add_instances_if<I % kScanParts == kPart, Steps>(out), ...);
  return out;
}

template <std::size_t kPart, class... Steps>
std::vector<Launcher> part_instances(StepList<void, Steps...>) {
  return part_instances<kPart, Steps...>(std::index_sequence_for<Steps...>{});
}

}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels

// The run_scan instances of part K, as pointers held by a global that nothing reads: storing their addresses
// keeps them emitted in this translation unit, where returns.cu's calls find them at link time.
#define RLK_SCAN_PART(K)                                                                   \
  namespace rlkernels {                                                                    \
  inline namespace RLK_ISA {                                                               \
  namespace cuda {                                                                         \
  std::vector<Launcher> scan_part_##K##_instances = part_instances<K>(ScanSteps{});        \
  }                                                                                        \
  }                                                                                        \
  }
