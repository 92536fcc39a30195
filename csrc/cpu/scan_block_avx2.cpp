// The scan engine's compute blocks built for avx2; scan_engine.h picks one at run time.
#if defined(__x86_64__) && defined(__GNUC__)
// Everything shared with other translation units is included before the target is switched, so no
// inline function compiled for this instruction set can be merged into code that runs elsewhere; the
// step math is always_inline and takes the target of the block that inlines it.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define RLK_ISA isa_avx2
#define RLK_VEC_BYTES 32
#include "rlkernels/scan.h"
#include "scan_types.h"
#include "simd.h"

#pragma GCC target("avx2,fma,f16c")
#include "scan_block.h"

RLK_EXPORT_BLOCK_FUNCTIONS
#endif
