// Kernels of the off-policy estimators' forwards, V-trace and Retrace (csrc/cuda/scan_engine.cuh).
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(VtraceStep)
RLK_INSTANTIATE_SCAN_ALL_DTYPES(RetraceStep)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
