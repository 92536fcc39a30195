// Argument checks of the op entry points, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) sources. They
// guard the ops when called directly (torch.ops.rlkernels.*) and wherever a Python wrapper hands tensors over
// without checking them itself, in the wording of rlkernels/_checks.py: every error names the argument and
// what was expected (docs/design.md §3), ValueError for shapes, devices and ranges, TypeError for dtypes.
// Host code only, light headers only (docs/design.md §7).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace rlkernels {

using OptTensor = std::optional<at::Tensor>;

// An optional tensor argument that was passed (torch may hand an undefined tensor for None).
inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The CUDA kernels run when any argument is on a CUDA device; `t` (the argument that sets the device) must be.
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "rlkernels: the CUDA kernels take CUDA tensors, got ", name, " on ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "rlkernels: ", name,
                   " must be a float tensor (float32, float64, bfloat16 or float16), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "rlkernels: ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "rlkernels: ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "rlkernels: ", name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "rlkernels: ", name, " must have the dtype of ", ref_name,
                   " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// A model input read alongside `ref`: the given shape, ref's dtype and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       at::IntArrayRef shape) {
  check_shape(t, name, shape);
  check_same_dtype(t, name, ref, ref_name);
  check_same_device(t, name, ref, ref_name);
}

// The same, shaped like `ref`.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_same_shape(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
  check_same_device(t, name, ref, ref_name);
}

// Which dtypes a kernel reads flags (terminated, truncated, mask) in. The wrappers hand every flag over as
// bool (rlkernels/_checks.py: flag_tensor); kernels that read flags as bytes also take uint8 (nonzero = set).
enum class FlagDtypes { kBool, kBoolOrUint8 };

inline void check_flag(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       at::IntArrayRef shape, FlagDtypes dtypes = FlagDtypes::kBoolOrUint8) {
  const bool ok = t.scalar_type() == at::kBool || (dtypes == FlagDtypes::kBoolOrUint8 && t.scalar_type() == at::kByte);
  TORCH_CHECK_TYPE(ok, "rlkernels: ", name, dtypes == FlagDtypes::kBool ? " must be bool here, got "
                                                                        : " must be bool or uint8 here, got ",
                   t.scalar_type());
  check_shape(t, name, shape);
  check_same_device(t, name, ref, ref_name);
}

// Indices into a dimension of `ref` (actions, tokens): int64 of the given shape.
inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                        at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "rlkernels: ", name, " must be int64 here, got ", t.scalar_type());
  check_shape(t, name, shape);
  check_same_device(t, name, ref, ref_name);
}

// A string option (kind, loss, reduction, agg...) as its enum value: `choices` lists every accepted string with
// its value; anything else is a ValueError naming the argument and the accepted strings.
template <typename E, size_t N>
E choice_of(std::string_view value, const char* name, const std::pair<std::string_view, E> (&choices)[N]) {
  for (const auto& [text, e] : choices)
    if (value == text) return e;
  std::string accepted;
  for (const auto& [text, e] : choices) accepted += (accepted.empty() ? "'" : ", '") + std::string(text) + "'";
  TORCH_CHECK_VALUE(false, "rlkernels: ", name, " must be one of ", accepted, ", got '", value, "'");
  return choices[0].second;
}

}  // namespace rlkernels
