// The PPO policy loss's float32 lane kernels built for default; ppo_lanes_dispatch.h picks one at run time.
// Shared headers come before the target switch, so no inline function compiled for this instruction set
// can be merged into code that runs elsewhere.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#define RLK_ISA isa_default
#include "rlkernels/ppo.h"
#include "ppo_lanes.h"
