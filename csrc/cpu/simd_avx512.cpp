// The CPU SIMD kernels of simd_kernels.h built for avx512 (64-byte vectors); simd::kernels() picks this
// build at run time (isa.h).
#if defined(__x86_64__) && defined(__GNUC__)
// No FP exception flags are read, so the scalar selects left in these kernels may evaluate both sides. It
// precedes every include, so the helpers the kernels inline are compiled with the same options.
#pragma GCC optimize("no-trapping-math")

// GCC 12's AVX-512 intrinsics leave their unused pass-through operands undefined (`__m512i __Y = __Y;`),
// which -Wmaybe-uninitialized reports at each inlined use: a false positive, silenced for this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Everything shared with other translation units is included before the target is switched, so no inline
// function compiled for this instruction set can be merged into code that runs elsewhere; the vector helpers
// are always_inline and take the target of the kernel that inlines them.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#define RLK_ISA isa_avx512
#define RLK_VEC_BYTES 64
#include "rlkernels/bellman.h"
#include "rlkernels/ppo.h"
#include "rlkernels/scan.h"
#include "simd.h"
#include "simd_kernels.h"

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#include "bellman_simd.h"
#include "gae_rows_simd.h"
#include "logprobs_simd.h"
#include "ppo_simd.h"

RLK_SIMD_DEFINE_TABLE
#endif
