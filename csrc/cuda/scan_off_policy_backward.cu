// Kernels of the off-policy estimators' backwards, V-trace and Retrace (csrc/cuda/scan_engine.cuh). They read
// the model inputs (values or q_taken, log_rhos) again, so they are instantiated for every input dtype.
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(VtraceBackwardStep)
RLK_INSTANTIATE_SCAN_ALL_DTYPES(RetraceBackwardStep)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
