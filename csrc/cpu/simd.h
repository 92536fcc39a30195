// The explicit vectors of every CPU SIMD kernel: GCC/Clang vector extensions, so the same source compiles to
// SSE2, AVX2 or AVX-512 depending on the target of the translation unit that includes it (csrc/cpu/simd_*.cpp,
// csrc/cpu/scan_block_*.cpp, each defining RLK_VEC_BYTES to its register width), and the instruction set is
// chosen at run time by csrc/cpu/isa.h, never by -march. The hot loops are written on these types, not left to
// the auto-vectorizer; scripts/check_simd.py checks the result in the built library's disassembly.
//
// Vec<T, N> is the scan engine's value type.
// The step functions of csrc/include/rlkernels/scan.h are templates over their value type; with Vec they
// process kLanes sequences at once. The overloads of select / min_ / max_ / select_lt below are found by
// argument-dependent lookup.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "exp_poly.h"
#include "rlkernels/macros.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // before a translation unit switches its target (load_flags in scan_block.h uses it)
#endif

namespace rlkernels {
inline namespace RLK_ISA {

template <typename T, int N>
struct Vec {
  typedef T native __attribute__((vector_size(sizeof(T) * N)));
  native v;

  Vec() = default;
  RLK_FN Vec(T s) : v(native{} + s) {}  // NOLINT: broadcast, so steps can write T(1) and gamma * x
  RLK_FN static Vec from(native x) {
    Vec r;
    r.v = x;
    return r;
  }

  RLK_FN static Vec load(const T* p) {
    Vec r;
    __builtin_memcpy(&r.v, p, sizeof(native));
    return r;
  }
  RLK_FN void store(T* p) const { __builtin_memcpy(p, &v, sizeof(native)); }

  friend RLK_FN Vec operator+(Vec a, Vec b) { return from(a.v + b.v); }
  friend RLK_FN Vec operator-(Vec a, Vec b) { return from(a.v - b.v); }
  friend RLK_FN Vec operator*(Vec a, Vec b) { return from(a.v * b.v); }
  friend RLK_FN Vec operator-(Vec a) { return from(-a.v); }
  RLK_FN Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
  RLK_FN Vec& operator-=(Vec b) {
    v -= b.v;
    return *this;
  }
};

// A real blend: the value not selected never reaches the result (NaN in a masked step stays out).
template <typename T, int N>
RLK_FN Vec<T, N> select(Vec<T, N> flag, Vec<T, N> a, Vec<T, N> b) {
  return Vec<T, N>::from(flag.v != T(0) ? a.v : b.v);
}
template <typename T, int N>
RLK_FN Vec<T, N> min_(Vec<T, N> a, Vec<T, N> b) {
  return Vec<T, N>::from(a.v < b.v ? a.v : b.v);
}
template <typename T, int N>
RLK_FN Vec<T, N> max_(Vec<T, N> a, Vec<T, N> b) {
  return Vec<T, N>::from(a.v > b.v ? a.v : b.v);
}
template <typename T, int N>
RLK_FN Vec<T, N> select_lt(Vec<T, N> a, Vec<T, N> b, Vec<T, N> x, Vec<T, N> y) {
  return Vec<T, N>::from(a.v < b.v ? x.v : y.v);
}
// Affine forms over vectors (the chunk maps of kLanes chunks at once) select componentwise.
template <typename T, int N, int D>
RLK_FN Affine<Vec<T, N>, D> select(Vec<T, N> flag, const Affine<Vec<T, N>, D>& a, const Affine<Vec<T, N>, D>& b) {
  Affine<Vec<T, N>, D> r;
  r.c = select(flag, a.c, b.c);
  for (int j = 0; j < D; ++j) r.k[j] = select(flag, a.k[j], b.k[j]);
  return r;
}

#ifdef RLK_VEC_BYTES
// One register of the translation unit's instruction set: kW floats (4 SSE2, 8 AVX2, 16 AVX-512). Compares
// give vi masks (-1 where true) and `m ? a : b` on them is a blend, evaluated on both sides: no branch, so a
// NaN in an unselected lane never reaches the result.
namespace vec {
constexpr int kW = RLK_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(RLK_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(RLK_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(RLK_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(RLK_VEC_BYTES / 2)));  // kW 16-bit values (bfloat16 bits)

#if RLK_VEC_BYTES == 64 && defined(__x86_64__)  // (the avx512 builds: their target pragma defines no __AVX512F__)
#define RLK_AVX512 1
// The helpers below that use AVX-512 intrinsics: this header precedes the translation unit's target switch, so
// they carry the target themselves (the kernels that inline them are compiled for it).
#define RLK_AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define RLK_AVX512 0
#define RLK_AVX512_TARGET
#endif
#if RLK_VEC_BYTES == 32 && defined(__x86_64__)
#define RLK_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define RLK_AVX2_TARGET
#endif

// Software prefetch kPrefetchBytes ahead of a stream. The kernels with long arithmetic per vector (exps,
// divisions, blends) keep the core's window full, so without it the loads of the next lines issue late and a
// cold stream runs at memory latency rather than bandwidth (docs/performance.md has the measurements).
constexpr int64_t kPrefetchBytes = 2048;
// The line kPrefetchBytes of float32 ahead of element i of p, for a stream of T (kPrefetchBytes / 4 elements
// ahead: streams of bytes, such as masks, keep pace with the float streams read beside them).
template <typename T>
RLK_INLINE void prefetch_ahead(const T* p, int64_t i) {
  __builtin_prefetch(p + i + kPrefetchBytes / 4);
}

// prefetch_ahead of element i of each stream.
template <typename... T>
RLK_INLINE void prefetch_streams(int64_t i, const T*... p) {
  (prefetch_ahead(p, i), ...);
}

RLK_INLINE vf loadu(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
RLK_INLINE void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
RLK_INLINE vf splat(float x) { return vf{} + x; }
// x as rounded: its uses cannot contract the operation that made it into an FMA (no instruction).
RLK_INLINE vf rounded(vf x) {
#if defined(__x86_64__) && defined(__GNUC__)
#if RLK_VEC_BYTES == 64
  asm("" : "+v"(x));
#else
  asm("" : "+x"(x));
#endif
#endif
  return x;
}
RLK_INLINE vf as_float(vi x) {
  vf r;
  __builtin_memcpy(&r, &x, sizeof(r));
  return r;
}
RLK_INLINE vf as_float(vu x) {
  vf r;
  __builtin_memcpy(&r, &x, sizeof(r));
  return r;
}
RLK_INLINE vu as_bits(vf x) {
  vu r;
  __builtin_memcpy(&r, &x, sizeof(r));
  return r;
}
// 0, 1, ..., kW - 1.
RLK_INLINE vi lane_index() {
  vi r;
  for (int l = 0; l < kW; ++l) r[l] = l;
  return r;
}
// kW flag bytes: -1 where nonzero. Byte j is moved to the low byte of lane j by one shuffle with zeros (a
// zero-extension GCC emits as pmovzxbd or pshufb): __builtin_convertvector from bytes, and under AVX-512 an
// integer compare's mask turned into a vector, were lowered lane by lane.
typedef uint8_t vbytes __attribute__((vector_size(RLK_VEC_BYTES)));
template <size_t... I>
RLK_INLINE vbytes spread_bytes(vbytes b, std::index_sequence<I...>) {
  return __builtin_shufflevector(b, vbytes{}, (I % 4 == 0 ? static_cast<int>(I / 4) : RLK_VEC_BYTES)...);
}
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vi flags_set(const uint8_t* p) {
#if RLK_AVX512
  // one vptestmb of the 16 bytes and vpmovm2d: no trip through the stack
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vi>(_mm512_movm_epi32(_mm_test_epi8_mask(bytes, bytes)));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  // the 8 bytes zero-extended by one vpmovzxbd, then -1 where nonzero by one vpcmpgtd
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vi>(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
#else
  vbytes b{};
  __builtin_memcpy(&b, p, kW);
  const vbytes wide = spread_bytes(b, std::make_index_sequence<RLK_VEC_BYTES>());
  vi r;
  __builtin_memcpy(&r, &wide, sizeof(r));
  return (0 - r) >> 31;  // -1 for 1..255, 0 for 0: arithmetic, as a compare's result was lowered lane by lane
#endif
}
// kW bfloat16 values (their bits) widened to float: exact, a shift into the high half. At AVX2 and AVX-512 one
// zero-extending load (vpmovzxwd) and the shift: GCC lowered the generic conversion of 8 or 16 lanes through
// two 128-bit halves and an insert.
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf load_bf16(const uint16_t* p) {
#if RLK_AVX512
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<vf>(_mm512_slli_epi32(wide, 16));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm256_slli_epi32(wide, 16));
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf r;
  __builtin_memcpy(&r, &bits, sizeof(r));
  return r;
#endif
}
// float to bfloat16 bits, rounded to nearest even as c10::BFloat16 does; NaN stays a quiet NaN.
RLK_INLINE void store_bf16(uint16_t* p, vf x) {
  const vu bits = as_bits(x);
  const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const vu out = x != x ? vu{} + 0x7fc0u : rounded;
  const vh h = __builtin_convertvector(out, vh);
  __builtin_memcpy(p, &h, sizeof(h));
}
// kW float16 values (their bits) widened to float: exact. AVX-512 and AVX2 (with F16C) convert in hardware
// (vcvtph2ps); SSE2 runs c10's branch-free conversion (fp16_ieee_to_fp32_value) on vectors: normal and special
// values move their exponent by a shift and one exact scaling, subnormals are rebuilt as a float with the
// mantissa in its low bits less 0.5. Both give every number's exact value; a NaN stays a NaN.
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf load_f16(const uint16_t* p) {
#if RLK_AVX512
  return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  const vu w = __builtin_convertvector(h, vu) << 16;
  const vu two_w = w + w;
  const vf normal = as_float((two_w >> 4) + (0xE0u << 23)) * splat(0x1.0p-112f);
  const vf subnormal = as_float((two_w >> 17) | (126u << 23)) - splat(0.5f);
  const vu bits = (w & 0x80000000u) | (two_w < (1u << 27) ? as_bits(subnormal) : as_bits(normal));
  return as_float(bits);
#endif
}
// float to float16 bits, rounded to nearest even as a cast to torch.float16 rounds (overflow gives inf). AVX-512
// and AVX2 round in hardware (vcvtps2ph); SSE2 runs c10's fp16_ieee_from_fp32_value on vectors: the magnitude,
// scaled so that the float16 rounding point falls on float's, is added to a power of two whose exponent puts
// the float16 mantissa in the low bits. A NaN stays a NaN (its payload bits may differ between the two, as they
// do between torch's vectorized and scalar casts).
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE void store_f16(uint16_t* p, vf x) {
#if RLK_AVX512
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<__m512>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  const vu w = as_bits(x);
  const vu shl1_w = w + w;
  const vf base = (as_float(w & 0x7fffffffu) * splat(0x1.0p+112f)) * splat(0x1.0p-110f);
  const vu bias_raw = shl1_w & 0xFF000000u;
  const vu bias = bias_raw < 0x71000000u ? vu{} + 0x71000000u : bias_raw;
  const vu bits = as_bits(as_float((bias >> 1) + 0x07800000u) + base);
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vu out = ((w & 0x80000000u) >> 16) | (shl1_w > 0xFF000000u ? vu{} + 0x7E00u : nonsign);
  const vh h = __builtin_convertvector(out, vh);
  __builtin_memcpy(p, &h, sizeof(h));
#endif
}
// min_v and max_v are minps / maxps: when either operand is NaN the result is b.
RLK_INLINE vf min_v(vf a, vf b) { return a < b ? a : b; }
RLK_INLINE vf max_v(vf a, vf b) { return a > b ? a : b; }

// Lane sets for sums taken under a condition (masked tokens, counts of a comparison): on AVX-512 a mask
// register and merge-masked arithmetic, one instruction per conditional sum (GCC kept masks made from flag
// bytes as vectors and converted them back at each use); elsewhere a vi of 0 / -1 and blends.
#if RLK_AVX512
typedef __mmask16 Lanes;
RLK_AVX512_TARGET RLK_INLINE Lanes all_lanes() { return static_cast<Lanes>(0xffff); }
// the lanes whose flag byte is nonzero
RLK_AVX512_TARGET RLK_INLINE Lanes flag_lanes(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm_test_epi8_mask(bytes, bytes);
}
// the lanes of m where a < b (eq_lanes: a == b); false for NaN
RLK_AVX512_TARGET RLK_INLINE Lanes lt_lanes(Lanes m, vf a, vf b) {
  return _mm512_mask_cmp_ps_mask(m, reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), _CMP_LT_OQ);
}
RLK_AVX512_TARGET RLK_INLINE Lanes eq_lanes(Lanes m, vf a, vf b) {
  return _mm512_mask_cmp_ps_mask(m, reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), _CMP_EQ_OQ);
}
// acc + x in the lanes of m, acc elsewhere (likewise sub_where, max_where: max_v(acc, x))
RLK_AVX512_TARGET RLK_INLINE vf add_where(Lanes m, vf acc, vf x) {
  return reinterpret_cast<vf>(_mm512_mask_add_ps(reinterpret_cast<__m512>(acc), m, reinterpret_cast<__m512>(acc),
                                                 reinterpret_cast<__m512>(x)));
}
RLK_AVX512_TARGET RLK_INLINE vf sub_where(Lanes m, vf acc, vf x) {
  return reinterpret_cast<vf>(_mm512_mask_sub_ps(reinterpret_cast<__m512>(acc), m, reinterpret_cast<__m512>(acc),
                                                 reinterpret_cast<__m512>(x)));
}
RLK_AVX512_TARGET RLK_INLINE vf max_where(Lanes m, vf acc, vf x) {
  return reinterpret_cast<vf>(_mm512_mask_max_ps(reinterpret_cast<__m512>(acc), m, reinterpret_cast<__m512>(acc),
                                                 reinterpret_cast<__m512>(x)));
}
// acc + 1 in the lanes of m (counts of the lanes that pass a test)
RLK_AVX512_TARGET RLK_INLINE vi count_where(Lanes m, vi acc) {
  return reinterpret_cast<vi>(_mm512_mask_sub_epi32(reinterpret_cast<__m512i>(acc), m, reinterpret_cast<__m512i>(acc),
                                                    _mm512_set1_epi32(-1)));
}
// a in the lanes of m, b elsewhere
RLK_AVX512_TARGET RLK_INLINE vf select_where(Lanes m, vf a, vf b) {
  return reinterpret_cast<vf>(_mm512_mask_blend_ps(m, reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(a)));
}
#else
// Every lane of a Lanes is 0 or -1 (the compares' results, flags_set, all_lanes), so the conditional sums are an
// and with the mask and the selects a blend on its sign bits. Not vector conditionals (`m ? x : 0`): for those GCC
// derives the mask again (m != 0: vpcmpeqd twice) at each use.
typedef vi Lanes;
RLK_INLINE Lanes all_lanes() { return vi{} - 1; }
RLK_AVX2_TARGET RLK_INLINE Lanes flag_lanes(const uint8_t* p) { return flags_set(p); }
RLK_INLINE Lanes lt_lanes(Lanes m, vf a, vf b) { return m & (a < b); }
RLK_INLINE Lanes eq_lanes(Lanes m, vf a, vf b) { return m & (a == b); }
// x in the lanes of m, +0 elsewhere
RLK_INLINE vf only_where(Lanes m, vf x) { return as_float(m & reinterpret_cast<vi>(as_bits(x))); }
RLK_INLINE vf add_where(Lanes m, vf acc, vf x) { return acc + only_where(m, x); }
RLK_INLINE vf sub_where(Lanes m, vf acc, vf x) { return acc - only_where(m, x); }
RLK_AVX2_TARGET RLK_INLINE vf select_where(Lanes m, vf a, vf b) {
#if RLK_VEC_BYTES == 32 && defined(__x86_64__)
  return reinterpret_cast<vf>(_mm256_blendv_ps(reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(a),
                                               reinterpret_cast<__m256>(m)));
#else
  return as_float((m & reinterpret_cast<vi>(as_bits(a))) | (~m & reinterpret_cast<vi>(as_bits(b))));
#endif
}
// max_v as one maxps at AVX2 (the same operand order, so the same NaN rule): as a vector select GCC merges it with
// the blend into a compare, an or and a blend of its own.
RLK_AVX2_TARGET RLK_INLINE vf max_where(Lanes m, vf acc, vf x) {
#if RLK_VEC_BYTES == 32 && defined(__x86_64__)
  return select_where(m, reinterpret_cast<vf>(_mm256_max_ps(reinterpret_cast<__m256>(acc), reinterpret_cast<__m256>(x))),
                      acc);
#else
  return select_where(m, max_v(acc, x), acc);
#endif
}
// acc + 1 in the lanes of m: one integer subtraction of the mask's -1
RLK_INLINE vi count_where(Lanes m, vi acc) { return acc - m; }
#endif
// max(lo, x) and min(hi, x) as maxps and minps compute them, one instruction each: x where either is NaN, so a
// NaN x stays (GCC keeps the vector select `x < lo ? lo : x` as a compare and a blend).
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf at_least(vf x, vf lo) {
#if RLK_AVX512
  return reinterpret_cast<vf>(_mm512_max_ps(reinterpret_cast<__m512>(lo), reinterpret_cast<__m512>(x)));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  return reinterpret_cast<vf>(_mm256_max_ps(reinterpret_cast<__m256>(lo), reinterpret_cast<__m256>(x)));
#elif RLK_VEC_BYTES == 16 && defined(__x86_64__)
  return reinterpret_cast<vf>(_mm_max_ps(reinterpret_cast<__m128>(lo), reinterpret_cast<__m128>(x)));
#else
  return x < lo ? lo : x;
#endif
}
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf at_most(vf x, vf hi) {
#if RLK_AVX512
  return reinterpret_cast<vf>(_mm512_min_ps(reinterpret_cast<__m512>(hi), reinterpret_cast<__m512>(x)));
#elif RLK_VEC_BYTES == 32 && defined(__x86_64__)
  return reinterpret_cast<vf>(_mm256_min_ps(reinterpret_cast<__m256>(hi), reinterpret_cast<__m256>(x)));
#elif RLK_VEC_BYTES == 16 && defined(__x86_64__)
  return reinterpret_cast<vf>(_mm_min_ps(reinterpret_cast<__m128>(hi), reinterpret_cast<__m128>(x)));
#else
  return x > hi ? hi : x;
#endif
}
// x clamped to [lo, hi]; NaN stays NaN.
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf clamp_v(vf x, vf lo, vf hi) { return at_most(at_least(x, lo), hi); }
// 1.5 * 2^23 + 127: x log2 e plus it rounds to an integer k (k = sum - kRoundBiased, exact while the sum stays
// in [2^23, 2^24), |k| < 2^22 - 127) and leaves k + 127, 2^k's biased exponent, in the sum's low mantissa bits.
constexpr float kRoundBiased = 12583039.0f;
// 2^k for y = k + kRoundBiased (k integral, -127 <= k <= 128): y's low mantissa bits shifted into the exponent
// field, the bits above them out (one integer operation, no conversion); k = -127 gives +0, k = 128 inf.
RLK_INLINE vf pow2i_of_biased(vf y) { return as_float(as_bits(y) << 23); }
// r = x - k ln 2, the argument of exp_poly (exp_poly.h). Two steps by default (Cody-Waite: ln 2 in two parts,
// two FMAs), exact to float rounding. kOneStep: one FMA with ln 2 rounded to float, whose 1.9e-9 error adds
// k * 1.9e-9 to exp's relative error (2e-8 at k = 10, 2.4e-7 at k = 126): for sums of exps that the largest
// terms (small k) dominate, as log-sum-exp's. Builds without FMA (SSE2) always take two steps.
template <bool kOneStep>
RLK_INLINE vf exp_reduce(vf x, vf k) {
  if constexpr (kOneStep && RLK_VEC_BYTES >= 32) {
    return x - k * 0.693147182f;
  } else {
    return (x - k * 0.693359375f) - k * -2.12194440e-4f;
  }
}
#if RLK_AVX512
// exp(x) for x in [-200, 88] (NaN gives NaN) on AVX-512: k rounded by vrndscaleps, 2^k written into the result by
// vscalefps (which underflows to 0 by itself), exp_poly by Horner's rule: 10 operations a vector (9 kOneStep).
template <bool kOneStep = false>
RLK_AVX512_TARGET RLK_INLINE vf exp_scalef(vf x) {
  const vf k = reinterpret_cast<vf>(_mm512_roundscale_ps(reinterpret_cast<__m512>(x * 1.44269504088896341f),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const vf r = exp_reduce<kOneStep>(x, k);
  const vf p = exp_poly(r);
  return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(k)));
}
// 2^(j/32) for j = 0..31, rounded to float: exp_table's lookup, two registers of vpermi2ps.
alignas(64) inline constexpr float kExp2Table[32] = {
    1.000000000e+00f, 1.021897197e+00f, 1.044273734e+00f, 1.067140460e+00f, 1.090507746e+00f, 1.114386797e+00f,
    1.138788581e+00f, 1.163724899e+00f, 1.189207077e+00f, 1.215247393e+00f, 1.241857767e+00f, 1.269050956e+00f,
    1.296839595e+00f, 1.325236678e+00f, 1.354255557e+00f, 1.383909941e+00f, 1.414213538e+00f, 1.445180774e+00f,
    1.476826191e+00f, 1.509164453e+00f, 1.542210817e+00f, 1.575980902e+00f, 1.610490322e+00f, 1.645755529e+00f,
    1.681792855e+00f, 1.718619347e+00f, 1.756252170e+00f, 1.794709086e+00f, 1.834008098e+00f, 1.874167681e+00f,
    1.915206552e+00f, 1.957144141e+00f};
// exp(x) for x in [-200, 88] (NaN gives NaN) on AVX-512 as accurate as exp_poly<5> (the exp of bfloat16 logits,
// logprobs_simd.h), by a table of 32 powers of two: x = (n / 32) ln 2 + r with n = round(32 x / ln 2) and
// |r| <= ln 2 / 64, exp(x) = 2^floor(n / 32) 2^((n mod 32) / 32) e^r. Adding 1.5 * 2^18 to x / ln 2 (one FMA)
// rounds it to a multiple of 2^-5, n / 32, and leaves n mod 32 in the low five bits of the sum, which index
// kExp2Table directly (vpermi2ps reads only those); e^r = 1 + r (c1 + c2 r), fitted (minimax, relative error
// 5.3e-8) on |r| <= ln 2 / 64; vscalefps applies 2^floor(n / 32) and underflows to 0 by itself. The reduction is
// exp_reduce's (n / 32 has at most 13 bits, so its product with the leading part of ln 2 is exact). 8
// operations a vector, 5 of them multiplies or multiply-adds, against exp_scalef's 9 and 7 with exp_poly<5>.
// Largest relative error over every float argument with a normal result, one-step, against exp in double:
// 2.16e-7 on [-20, 0], 4.0e-7 on [-87.3, 32] (exp_poly<5>'s: 2.31e-7, 4.1e-7). With a degree-2 q it could
// stand in for exp_poly<6> too, but at 1.13e-7 against exp_poly's 7.6e-8 (two-step reduction), most of it the
// table's own rounding, for a few percent of the float32 fold's time (docs/performance.md): not taken.
template <bool kOneStep>
RLK_AVX512_TARGET RLK_INLINE vf exp_table(vf x) {
  const vf y = x * 1.44269504088896341f + 393216.0f;  // 1.5 * 2^18: its float's last bit is 2^-5
  const vf kq = y - 393216.0f;                        // n / 32, exactly
  const vf r = exp_reduce<kOneStep>(x, kq);
  const __m512i j = _mm512_castps_si512(reinterpret_cast<__m512>(y));
  const vf t = reinterpret_cast<vf>(
      _mm512_permutex2var_ps(_mm512_load_ps(kExp2Table), j, _mm512_load_ps(kExp2Table + 16)));
  const vf q = r * 5.0000005960e-1f + 1.0000146627e+00f;
  const vf p = (t * r) * q + t;  // t e^r, the large term added last
  return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(kq)));
}
// exp_scalef with exp_poly<kDegree> (6 or 5), or exp_table in place of exp_poly<5>
template <bool kOneStep, int kDegree>
RLK_AVX512_TARGET RLK_INLINE vf exp_avx512(vf x) {
  static_assert(kDegree == 5 || kDegree == 6, "exp_avx512: exp_poly's degree, 5 or 6");
  if constexpr (kDegree == 5) {
    return exp_table<kOneStep>(x);
  } else {
    return exp_scalef<kOneStep>(x);
  }
}
#endif
// exp(x) for |x| <= 87 (NaN gives NaN): reduction by k = round(x / ln 2) and the polynomial of exp_poly.h; k
// rounds to nearest by the 1.5 * 2^23 trick (exp_scalef or exp_table on AVX-512). kShortChain (degree 6): the
// polynomial as exp_poly_short below AVX-512, for callers bound by latency (AVX-512 keeps exp_scalef).
template <bool kOneStep = false, int kDegree = 6, bool kShortChain = false>
RLK_AVX512_TARGET RLK_INLINE vf exp_v(vf x) {
  static_assert(!kShortChain || kDegree == 6, "exp_v: the short chain is exp_poly<6>'s");
#if RLK_AVX512
  return exp_avx512<kOneStep, kDegree>(x);
#else
  const vf y = x * 1.44269504088896341f + kRoundBiased;  // k + 127 + 1.5 * 2^23
  const vf k = y - kRoundBiased;
  const vf r = exp_reduce<kOneStep>(x, k);
  if constexpr (kShortChain) {
    return exp_poly_short(r) * pow2i_of_biased(y);
  } else {
    return exp_poly<kDegree>(r) * pow2i_of_biased(y);
  }
#endif
}
// exp(x) for x <= 87: exactly 0 below about -87.68 (below about -104 on AVX-512) and for -inf, NaN stays NaN. `arg`
// receives the argument the exp was taken of, x clamped from below (one maxps; NaN stays): p = 0 wherever the
// clamp moved x, so p * arg = p * x where p != 0 and 0 for x = -inf, for sums of p x (an entropy).
template <bool kOneStep = false, int kDegree = 6>
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf exp_clamped_v(vf x, vf& arg) {
#if RLK_AVX512
  // vscalefps gives the subnormal results down to about -104 and 0 below
  arg = at_least(x, splat(-200.0f));
  return exp_avx512<kOneStep, kDegree>(arg);
#else
  // No mask: from -88 k rounds to -127, whose 2^k pow2i_of_biased builds as +0, so the result is exactly 0 below about
  // -87.68 and for -inf; above it 2^-126 p rounds into the subnormals.
  arg = at_least(x, splat(-88.0f));
  return exp_v<kOneStep, kDegree>(arg);
#endif
}
template <bool kOneStep = false, int kDegree = 6>
RLK_AVX512_TARGET RLK_AVX2_TARGET RLK_INLINE vf exp_nonpositive_v(vf x) {
  vf arg;
  return exp_clamped_v<kOneStep, kDegree>(x, arg);
}
// 2^u for u in [-127, 127] (u clamped from below by the caller: at_least keeps NaN): u = k + f with k = round(u) by
// the 1.5 * 2^23 trick, 2^f by exp2_poly<kDegree> (exp_poly.h) for |f| <= 1/2, and k added into the exponent field
// of 2^f's bits by one integer add: no multiply, no mask, and no reduction by ln 2 (the SSE2 log-prob fold,
// logprobs_simd.h kBase2Fold). Its relative error is exp2_poly's plus the caller's rounding of u times ln 2.
// Below 2^-126 the add leaves the normal range, never to a NaN or a negative number (k <= -127 only for
// u <= -126.5, where 2^f >= 1 has exponent field 127): u = -127 gives exactly +0 (f = 0, 2^f = 1), u in
// (-127, -126) a value in [0, 2^-126) that is not 2^u. So a clamp at -127 sends -inf to 0, and every other term
// below 2^-126 is lost in one rounding of a sum that holds a term near 1 (log-sum-exp's sums hold the max's
// term, 1). NaN stays NaN: kFromInt takes k's bits from k converted to int32 (NaN gives
// 0x80000000, whose shift adds 0); otherwise they come from the sum itself, whose low 9 bits a NaN would carry
// as payload into the exponent field: for NaNs whose low 16 bits are 0 only, every widened bfloat16 value.
template <int kDegree, bool kFromInt>
RLK_INLINE vf exp2_clamped_v(vf u) {
  const vf y = u + 12582912.0f;  // k + 1.5 * 2^23
  const vf k = y - 12582912.0f;
  const vf q = exp2_poly<kDegree>(u - k);
  vu shift;
  if constexpr (kFromInt) {
    shift = reinterpret_cast<vu>(__builtin_convertvector(k, vi)) << 23;
  } else {
    shift = as_bits(y) << 23;  // y's low bits hold k; the bits above them leave by the shift
  }
  return as_float(as_bits(q) + shift);
}
// exp(x) for every float x, as expf gives it: inf above about 88.72 and at inf, subnormal results down to about
// -103.97 and 0 below, NaN stays NaN. For arguments a caller does not bound (V-trace's and Retrace's log-rhos).
// x is clamped to a range where the reduction stays exact (the compares are false for NaN, which stays) and 2^k
// is applied in two factors, each a normal number, so the product overflows to inf or rounds to a subnormal once,
// as a correctly scaled result does. Vector extensions only, no intrinsics: the scan steps that call it are
// compiled before their translation unit's target switch and take the target of the block that inlines them.
RLK_INLINE vf exp_any_v(vf x) {
  vf xc = x < -104.0f ? splat(-104.0f) : x;
  xc = xc > 89.0f ? splat(89.0f) : xc;  // k in [-150, 128]
  const vf k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vi ki = __builtin_convertvector(k, vi);
  const vi k1 = ki >> 1;  // k1 and k - k1 in [-75, 64]
  return (exp_poly(exp_reduce<false>(xc, k)) * as_float((k1 + 127) << 23)) * as_float((ki - k1 + 127) << 23);
}
// exp(x) for every double x, as exp gives it: inf above about 709.78 and at inf, subnormal results down to about
// -745.13 and 0 below, NaN stays NaN; for the scan steps' float64 weights. exp_any_v's scheme in double: x clamped
// to [-746, 710] (k in [-1076, 1024]), k = round(x / ln 2) by adding 1.5 * 2^52, whose sum holds k in its low
// mantissa bits; r = x - k ln 2 with ln 2 in two parts (fdlibm's: the leading one has 32 bits, so k times it is
// exact); e^r by its Taylor polynomial of degree 13 (truncation below 4.2e-18 relative on |r| <= ln 2 / 2); 2^k
// applied in two factors 2^k1 and 2^(k - k1), k1 = round(k / 2), each a normal number. Integer work is 64-bit
// adds and shifts only (SSE2 and AVX2 have no packed double-to-int64 conversion). Vector extensions only, as
// exp_any_v.
typedef double vd __attribute__((vector_size(RLK_VEC_BYTES)));
typedef uint64_t vul __attribute__((vector_size(RLK_VEC_BYTES)));
RLK_INLINE vd exp_any_vd(vd x) {
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52: the double whose last bit is 1
  constexpr uint64_t kShiftBits = 0x4338000000000000;
  vd xc = x < -746.0 ? vd{} - 746.0 : x;
  xc = xc > 710.0 ? vd{} + 710.0 : xc;
  const vd ks = xc * 1.4426950408889634074 + kShift;  // k + kShift, exactly
  const vd k = ks - kShift;
  const vd r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  constexpr double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                          1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                          1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5,
                          1.0,                1.0};  // 1 / n!, n = 13 .. 0
  vd p = vd{} + c[0];
#pragma GCC unroll 16
  for (int i = 1; i < 14; ++i) p = p * r + c[i];
  // k and k1 = round(k / 2) as 64-bit integers (two's complement, unsigned arithmetic): k1 and k - k1 in
  // [-538, 512]
  const vul kb = __builtin_bit_cast(vul, ks) - kShiftBits;
  const vul k1 = __builtin_bit_cast(vul, k * 0.5 + kShift) - kShiftBits;
  return (p * __builtin_bit_cast(vd, (k1 + 1023) << 52)) * __builtin_bit_cast(vd, (kb - k1 + 1023) << 52);
}
// The sum of the lanes, in lane order, in double.
RLK_INLINE double sum_lanes(vf v) {
  double s = 0;
  for (int l = 0; l < kW; ++l) s += static_cast<double>(v[l]);
  return s;
}
RLK_INLINE double sum_lanes(vi v) {
  int64_t s = 0;
  for (int l = 0; l < kW; ++l) s += v[l];
  return static_cast<double>(s);
}
RLK_INLINE float sum_lanes_f(vf v) {
  float s = 0;
  for (int l = 0; l < kW; ++l) s += v[l];
  return s;
}
// The largest lane, NaN lanes ignored (-inf when every lane is -inf or NaN).
RLK_INLINE float max_lanes(vf v) {
  float m = v[0] == v[0] ? v[0] : -__builtin_inff();
  for (int l = 1; l < kW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
}  // namespace vec
#endif

// exp for the scan steps' weights (V-trace's and Retrace's e^{log_rho}): float vectors of the build's width take
// vec::exp_any_v, double vectors vec::exp_any_vd from AVX2 up; other vectors a scalar exp per lane. Under SSE2
// (no FMA, two doubles a vector, 16 registers) exp_any_vd's degree-13 polynomial costs more than libm's exp, which
// takes its own FMA path at run time: float64 V-trace `[2048, 64]` 2.2 against 1.7 ms (docs/performance.md).
struct VecExp {
  template <typename V>
  RLK_FN V operator()(V x) const {
#ifdef RLK_VEC_BYTES
    if constexpr (std::is_same_v<decltype(x.v), vec::vf>) {
      x.v = vec::exp_any_v(x.v);
      return x;
    }
#if RLK_VEC_BYTES >= 32
    if constexpr (std::is_same_v<decltype(x.v), vec::vd>) {
      x.v = vec::exp_any_vd(x.v);
      return x;
    }
#endif
#endif
    for (int l = 0; l < int(sizeof(x.v) / sizeof(x.v[0])); ++l) {
      if constexpr (sizeof(x.v[0]) == sizeof(float)) {
        x.v[l] = __builtin_expf(x.v[l]);
      } else {
        x.v[l] = __builtin_exp(x.v[l]);
      }
    }
    return x;
  }
};

}  // namespace RLK_ISA
}  // namespace rlkernels
