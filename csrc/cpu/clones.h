// RLK_CLONES: a function compiled for AVX-512, AVX2 and SSE2 and chosen when the library loads (GCC's
// target_clones), for small self-contained row kernels. Unlike the scan engine's and the PPO lanes' own
// dispatch, it does not read RLKERNELS_CPU_ISA.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLK_CLONES
#endif
