// The scan engine's compute blocks built for default; scan_engine.h picks one at run time.
// Everything shared with other translation units is included before the target is switched, so no
// inline function compiled for this instruction set can be merged into code that runs elsewhere; the
// step math is always_inline and takes the target of the block that inlines it.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define RLK_ISA isa_default
#define RLK_VEC_BYTES 16
#include "rlkernels/scan.h"
#include "scan_types.h"
#include "simd.h"

#include "scan_block.h"

RLK_EXPORT_BLOCK_FUNCTIONS
