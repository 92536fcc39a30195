// Kernels of gae and its backward (csrc/cuda/scan_engine.cuh).
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(GaeStep)
// Backward steps read upstream gradients in the accumulation type.
RLK_INSTANTIATE_SCAN(GaeBackwardStep, float, float)
RLK_INSTANTIATE_SCAN(GaeBackwardStep, double, double)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
