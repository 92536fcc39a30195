// Kernels of linear_scan (csrc/cuda/scan_engine.cuh), one file per estimator so they compile in parallel.
#include "scan_engine.cuh"

namespace rlkernels {
inline namespace RLK_ISA {
namespace cuda {
RLK_INSTANTIATE_SCAN_ALL_DTYPES(LinearScanStep)
}  // namespace cuda
}  // namespace RLK_ISA
}  // namespace rlkernels
