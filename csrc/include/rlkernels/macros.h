// Portable macros: this header and the others in csrc/include/rlkernels are compiled by g++ (CPU kernels)
// and by nvcc (CUDA kernels), so the per-element math exists once.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLK_HOST_DEVICE __host__ __device__
#define RLK_INLINE __forceinline__
#else
#define RLK_HOST_DEVICE
#define RLK_INLINE inline __attribute__((always_inline))
#endif

#define RLK_FN RLK_HOST_DEVICE RLK_INLINE

// Each translation unit that compiles the kernels for one instruction set defines RLK_ISA to a
// distinct name, so the inline functions of different ISAs never merge at link time.
#ifndef RLK_ISA
#define RLK_ISA generic
#endif
