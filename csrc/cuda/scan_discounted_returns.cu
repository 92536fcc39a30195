// Kernels of discounted_returns and its backward (csrc/cuda/scan_engine.cuh).
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(DiscountedReturnsStep)
// Backward steps read upstream gradients in the accumulation type.
RLK_INSTANTIATE_SCAN(DiscountedReturnsBackwardStep, float, float)
RLK_INSTANTIATE_SCAN(DiscountedReturnsBackwardStep, double, double)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
