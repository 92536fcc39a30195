// Arguments of the reverse linear scan ops (docs/design.md §4.1, §4.2), shared by the CPU entry points
// (csrc/cpu/returns.cpp) and the CUDA ones (csrc/cuda/returns.cu): the step parameters and the contiguous
// inputs the kernels read by pointer. The layout and its checks are layout.h's. Host code only.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "rlkernels/scan.h"

namespace rlkernels {

template <typename acc_t>
ScanParams<acc_t> params_of(double gamma, double lam, bool has_next) {
  ScanParams<acc_t> p;
  p.gamma = static_cast<acc_t>(gamma);
  p.lam = static_cast<acc_t>(lam);
  p.has_next = has_next;
  return p;
}

template <typename acc_t>
ScanParams<acc_t> vtrace_params_of(double gamma, double lam, double rho_clip, double c_clip, double pg_rho_clip,
                                   bool has_next) {
  ScanParams<acc_t> p = params_of<acc_t>(gamma, lam, has_next);
  p.rho_clip = static_cast<acc_t>(rho_clip);
  p.c_clip = static_cast<acc_t>(c_clip);
  p.pg_rho_clip = static_cast<acc_t>(pg_rho_clip);
  return p;
}

// The contiguous inputs a Problem points into, held until the op returns: on the CPU while the scan runs;
// on CUDA until the launches are queued, after which the caching allocator reuses their memory only in
// stream order.
struct Inputs {
  std::vector<at::Tensor> keep;
  const void* data(const at::Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr();
  }
};

}  // namespace rlkernels
