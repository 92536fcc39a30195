// Kernels of the V-trace forward (csrc/cuda/scan_engine.cuh).
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(VtraceStep)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
