// The PPO policy loss's float32 lane kernels built for avx2; ppo_lanes_dispatch.h picks one at run time.
#if defined(__x86_64__) && defined(__GNUC__)
// Shared headers come before the target switch, so no inline function compiled for this instruction set
// can be merged into code that runs elsewhere.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#define RLK_ISA isa_avx2
#include "rlkernels/ppo.h"
#pragma GCC target("avx2,fma")
#include "ppo_lanes.h"
#endif
