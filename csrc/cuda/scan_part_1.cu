// Part 1 of the CUDA scan kernels (csrc/cuda/scan_parts.cuh).
#include "scan_parts.cuh"

RLK_SCAN_PART(1)
