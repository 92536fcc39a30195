// Dtypes of the op entry points, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) sources: which input dtypes
// an op compiles for and the type it accumulates and answers in. Host code only, and only the light ATen
// headers, so the .cu files can include it (docs/design.md §7).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <type_traits>

// The four float dtypes every op takes: float32, float64, bfloat16 and float16.
#define RLK_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace rlkernels {

// Sums and outputs are float32 for 16-bit inputs, else the input's own dtype (docs/design.md §3).
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Options for an output in the accumulation type of `ref`'s dtype, on `ref`'s device.
inline at::TensorOptions acc_options(const at::Tensor& ref) {
  return ref.options().dtype(acc_type_of(ref.scalar_type()));
}

}  // namespace rlkernels
