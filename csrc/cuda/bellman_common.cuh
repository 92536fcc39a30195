// Shared host and device helpers of the CUDA Bellman kernels (bellman_sample.cu, bellman_nstep.cu,
// bellman_mdp.cu): argument checks that mirror csrc/cpu/bellman.cpp, the accumulation type, the launch
// geometry and the warp-group shuffles. Only the light headers (docs/design.md §7).
#pragma once

// CUDA translation units get their own inline namespace for the portable headers (see scan_problem.h).
#ifndef RLK_ISA
#define RLK_ISA cuda_isa
#endif

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

#include "rlkernels/bellman.h"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda_bellman {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace rlkernels::bellman;

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "rlkernels: the CUDA kernels take CUDA tensors, got ", name, " on ", t.device());
}

inline void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                       at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "rlkernels: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "rlkernels: ", name, " must have the dtype of ", ref_name,
                   " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "rlkernels: ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

// Flags as bytes on the device (bool or uint8, nonzero = set), or null when absent. `keep` holds the
// contiguous copy until the op returns (the caching allocator reuses it only in stream order after that).
inline const uint8_t* flag_data(const OptTensor& t, const char* name, const Tensor& ref, at::IntArrayRef shape,
                                Tensor& keep) {
  if (!has(t)) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kBool || t->scalar_type() == at::kByte, "rlkernels: ", name,
                   " must be bool or uint8 here, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->sizes() == shape, "rlkernels: ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == ref.device(), "rlkernels: ", name, " is on ", t->device(), " but the inputs are on ",
                    ref.device());
  keep = t->contiguous();
  return static_cast<const uint8_t*>(keep.const_data_ptr());
}

inline QKind q_kind_of(std::string_view kind) {
  if (kind == "max") return QKind::kMax;
  if (kind == "double") return QKind::kDouble;
  if (kind == "expected") return QKind::kExpected;
  if (kind == "soft") return QKind::kSoft;
  TORCH_CHECK_VALUE(false, "rlkernels: kind must be one of 'max', 'double', 'expected', 'soft', got '", kind, "'");
  return QKind::kMax;
}

inline TdLoss td_kind_of(std::string_view loss) {
  if (loss == "huber") return TdLoss::kHuber;
  if (loss == "squared") return TdLoss::kSquared;
  TORCH_CHECK_VALUE(false, "rlkernels: loss must be 'huber' or 'squared', got '", loss, "'");
  return TdLoss::kHuber;
}

inline Reduction reduction_of(std::string_view r) {
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  if (r == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "rlkernels: reduction must be 'mean', 'sum' or 'none', got '", r, "'");
  return Reduction::kMean;
}

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride loops beyond this many blocks

inline unsigned int grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

// The smallest power of two >= n, clamped to [1, 32]: the lanes given to one row.
inline int group_width(int64_t n) {
  int g = 1;
  while (g < 32 && g < n) g *= 2;
  return g;
}

// Butterfly exchange within aligned groups of `width` lanes (a power of two <= 32). Every lane of the warp
// must call it (full mask); after log2(width) rounds every lane of a group holds the same combination, in an
// order fixed by the lane numbers, so results are bit-identical run to run.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int offset, int width) {
  return __shfl_xor_sync(0xffffffffu, v, offset, width);
}

}  // namespace cuda_bellman
}  // namespace RLK_ISA
}  // namespace rlkernels
