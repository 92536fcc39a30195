// Kernels of Retrace and its backward (csrc/cuda/scan_engine.cuh). The backward reads q_taken and log_rhos
// again, so both are instantiated for every input dtype.
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(RetraceStepT<CudaExp>)
RLK_INSTANTIATE_SCAN_ALL_DTYPES(RetraceBackwardStepT<CudaExp>)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
