// Kernels of the V-trace backward (csrc/cuda/scan_engine.cuh). It reads rewards, values and log_rhos again,
// so it is instantiated for every input dtype.
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(VtraceBackwardStep)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
