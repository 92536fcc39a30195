// Arguments of gather_logprobs and its backwards (docs/design.md §4.3), checked once for the CPU kernels
// (csrc/cpu/logprobs.cpp) and the CUDA kernels (csrc/cuda/logprobs.cu). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "rlkernels/checks.h"

namespace rlkernels::logprobs {

// The largest 1 / temperature: the kernels scale by 1 / temperature in float32 (float64 for float64 logits), so
// a temperature under 1 / FLT_MAX would scale every logit by infinity (docs/design.md §4.3).
constexpr double kMaxInverseTemperature = 3.4028234663852886e38;

// logits [N, V] of a float dtype with unit stride along V, tokens int64 [N] on the logits' device.
inline void check_gather_logprobs(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "rlkernels.gather_logprobs: logits must be [N, V] here, got ", logits.dim(),
                    " dims");
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.size(0) == 0 || logits.size(1) <= 1 || logits.stride(1) == 1,
                    "rlkernels.gather_logprobs: logits must have a unit stride along V");
  check_index(tokens, "tokens", logits, "logits", {logits.size(0)});
  TORCH_CHECK_VALUE(temperature > 0 && temperature < std::numeric_limits<double>::infinity() &&
                        1.0 / temperature <= kMaxInverseTemperature,
                    "rlkernels.gather_logprobs: temperature must be finite and >= ", 1.0 / kMaxInverseTemperature,
                    " (1 / temperature a finite float32), got ", temperature);
}

// The backwards: the forward's arguments, and per row (N = logits.size(0)) the saved lse, the entropy (N values,
// or none when the forward did not compute it) and the upstream gradients (grad_entropy is read only with N
// entropy values), float tensors on the logits' device. The kernels read tokens as indices into a row: their
// range is checked where the caller can read them (on the CPU; §2).
inline void check_gather_logprobs_backward(const OptTensor& grad_logp, const OptTensor& grad_entropy,
                                           const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& lse,
                                           const at::Tensor& entropy, double temperature) {
  check_gather_logprobs(logits, tokens, temperature);
  const int64_t N = logits.size(0);
  auto per_row = [&](const at::Tensor& t, const char* name, bool may_be_empty) {
    TORCH_CHECK_VALUE(t.dim() == 1 && (t.size(0) == N || (may_be_empty && t.size(0) == 0)),
                      "rlkernels.gather_logprobs_backward: ", name, " must have shape [", N, "]",
                      may_be_empty ? " (or [0])" : "", ", got ", t.sizes());
    check_float(t, name);
    check_same_device(t, name, logits, "logits");
  };
  per_row(lse, "lse", false);
  per_row(entropy, "entropy", true);
  if (given(grad_logp)) per_row(*grad_logp, "grad_logp", false);
  if (given(grad_entropy)) per_row(*grad_entropy, "grad_entropy", entropy.numel() == 0);
}

// The in-place backward writes each row over itself: the logits' rows must not share memory.
inline void check_writable_rows(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.size(1) == 0 || logits.stride(0) >= logits.size(1),
                    "rlkernels.gather_logprobs_backward_inplace: the rows of logits overlap in memory (stride ",
                    logits.strides(), " for shape ", logits.sizes(), ", e.g. an expanded tensor): the gradient cannot "
                    "be written over them");
}

}  // namespace rlkernels::logprobs
