// Geometry of the scan family's canonical layout (csrc/ops.cpp; docs/design.md §4.1), shared by the CPU and
// CUDA op entry points: [O, T, I] with time on dim 1 and one sequence per (o, i), or 1-D packed sequences
// cut by cu_seqlens. Host code only, light headers only (docs/design.md §7).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "rlkernels/checks.h"

namespace rlkernels {

struct SeqLayout {
  int64_t outer = 1, steps = 0, inner = 1, num_seqs = 0;
  std::vector<int64_t> seq_shape;  // shape of one value per sequence (bootstrap_value, initial): [O, I] or [n]
};

// 1-D packed sequences: `ref` (named ref_name in errors) is a packed input, cu_seqlens the n + 1 offsets.
// Checks their form only (dtype, shape, device); their values are the caller's to check where it can read
// them without a device sync.
inline SeqLayout packed_layout(const at::Tensor& ref, const char* ref_name, const at::Tensor& cu_seqlens) {
  TORCH_CHECK_VALUE(ref.dim() == 1, "rlkernels: with cu_seqlens the inputs must be 1-D packed sequences, got ",
                    ref.dim(), " dims");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                   "rlkernels: cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "rlkernels: cu_seqlens must be 1-D with n + 1 >= 1 entries, got shape ", cu_seqlens.sizes());
  check_same_device(cu_seqlens, "cu_seqlens", ref, ref_name);
  SeqLayout g;
  g.num_seqs = cu_seqlens.numel() - 1;
  g.steps = ref.numel();
  g.seq_shape = {g.num_seqs};
  return g;
}

// Dense [O, T, I].
inline SeqLayout dense_layout(const at::Tensor& ref, const char* ref_name = "rewards") {
  TORCH_CHECK_VALUE(ref.dim() == 3, "rlkernels: scan ops take canonical [O, T, I] tensors, got ", ref_name, " with ",
                    ref.dim(), " dims");
  SeqLayout g;
  g.outer = ref.size(0);
  g.steps = ref.size(1);
  g.inner = ref.size(2);
  g.num_seqs = g.outer * g.inner;
  g.seq_shape = {g.outer, g.inner};
  return g;
}

// A tensor of one value per sequence.
inline void check_per_sequence(const at::Tensor& t, const char* name, const SeqLayout& g) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(g.seq_shape), "rlkernels: ", name,
                    " must have one value per sequence, shape ", at::IntArrayRef(g.seq_shape), ", got ", t.sizes());
}

}  // namespace rlkernels
