// Shared host and device helpers of the CUDA Bellman kernels (bellman_sample.cu, bellman_nstep.cu,
// bellman_mdp.cu): the flags as bytes, the launch geometry and the warp-group shuffles. The argument checks
// are the CPU kernels' (csrc/include/rlkernels/bellman_args.h). Only the light headers (docs/design.md §7).
#pragma once

// CUDA translation units get their own inline namespace for the portable headers (see scan_problem.h).
#ifndef RLK_ISA
#define RLK_ISA cuda_isa
#endif

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

#include "rlkernels/bellman.h"
#include "rlkernels/bellman_args.h"
#include "rlkernels/checks.h"
#include "rlkernels/dispatch.h"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda_bellman {

using at::Tensor;
using namespace rlkernels::bellman;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Flags as bytes on the device (bool or uint8, nonzero = set), or null when absent. `keep` holds the
// contiguous copy until the op returns (the caching allocator reuses it only in stream order after that).
inline const uint8_t* flag_data(const OptTensor& t, const char* name, const Tensor& ref, const char* ref_name,
                                at::IntArrayRef shape, Tensor& keep) {
  if (!given(t)) return nullptr;
  check_flag(*t, name, ref, ref_name, shape);
  keep = t->contiguous();
  return static_cast<const uint8_t*>(keep.const_data_ptr());
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
