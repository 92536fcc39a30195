// Arguments of gather_logprobs and its backwards (docs/design.md §4.3), checked once for the CPU kernels
// (csrc/cpu/logprobs.cpp) and the CUDA kernels (csrc/cuda/logprobs.cu). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "rlkernels/checks.h"

namespace rlkernels::logprobs {

// logits [N, V] of a float dtype with unit stride along V, tokens int64 [N] on the logits' device.
inline void check_gather_logprobs(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "rlkernels.gather_logprobs: logits must be [N, V] here, got ", logits.dim(),
                    " dims");
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.size(0) == 0 || logits.size(1) <= 1 || logits.stride(1) == 1,
                    "rlkernels.gather_logprobs: logits must have a unit stride along V");
  check_index(tokens, "tokens", logits, "logits", {logits.size(0)});
  TORCH_CHECK_VALUE(temperature > 0, "rlkernels.gather_logprobs: temperature must be > 0, got ", temperature);
}

}  // namespace rlkernels::logprobs
