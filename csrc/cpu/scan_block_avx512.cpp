// The scan engine's compute blocks built for avx512; scan_engine.h picks one at run time.
#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics leave their unused pass-through operands undefined (`__m512i __Y = __Y;`),
// which -Wmaybe-uninitialized reports at each inlined use: a false positive, silenced for this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Everything shared with other translation units is included before the target is switched, so no
// inline function compiled for this instruction set can be merged into code that runs elsewhere; the
// step math is always_inline and takes the target of the block that inlines it.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define RLK_ISA isa_avx512
#define RLK_VEC_BYTES 64
#include "rlkernels/scan.h"
#include "scan_types.h"
#include "simd.h"

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#include "scan_block.h"

RLK_EXPORT_BLOCK_FUNCTIONS
#endif
