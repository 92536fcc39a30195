// Shared by the CPU kernels of the Bellman family (docs/design.md §4.5): bellman_sample.cpp (q_targets,
// td_loss), bellman_nstep.cpp (n_step_returns) and bellman_mdp.cpp (bellman_backup, value_iteration). The
// per-element math lives in csrc/include/rlkernels/bellman.h, the argument checks in
// csrc/include/rlkernels/bellman_args.h. Include it first: the pragma below must precede every function
// the kernels inline.
//
// No FP exception flags are read here, so selects may evaluate both sides: under GCC's default
// -ftrapping-math the Huber and max selects stay branches, which mispredict on random data.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "alloc.h"
#include "rlkernels/bellman.h"
#include "rlkernels/bellman_args.h"
#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"

namespace rlkernels::cpu {

// A flag of `shape` (bool: the wrappers hand flags over as bool, and the kernels read them as bool), or null
// when absent; `keep` holds the contiguous copy while the kernel reads it.
inline const bool* flag_data(const OptTensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                             at::IntArrayRef shape, at::Tensor& keep) {
  if (!given(t)) return nullptr;
  check_flag(*t, name, ref, ref_name, shape, FlagDtypes::kBool);
  keep = t->contiguous();
  return keep.data_ptr<bool>();
}

}  // namespace rlkernels::cpu
