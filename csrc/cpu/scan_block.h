// The compute core of the CPU scan engine: one block of up to kBlock steps of kLanes lanes, held in
// lane-contiguous buffers, run with SIMD values (csrc/cpu/simd.h) so one instruction steps every lane.
//
// This header is compiled once per instruction set (csrc/cpu/scan_block_{default,avx2,avx512}.cpp, each
// defining RLK_ISA and a target) and free of torch headers, so nothing compiled for AVX-512 can leak into
// code that runs on other CPUs. csrc/cpu/scan_engine.h (loads, stores, chunking, threads) picks the
// instruction set at run time through `block_function`.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "rlkernels/scan.h"
#include "scan_types.h"
#include "simd.h"

namespace rlkernels {
inline namespace RLK_ISA {

using namespace ::rlkernels::cpu;  // the types shared by every instruction-set build

// The step parameters as vectors (every lane the same).
template <typename V, typename acc_t>
RLK_FN ScanParams<V> vec_params(const ScanParams<acc_t>& s) {
  ScanParams<V> p;
  p.gamma = s.gamma;
  p.lam = s.lam;
  p.rho_clip = s.rho_clip;
  p.c_clip = s.c_clip;
  p.pg_rho_clip = s.pg_rho_clip;
  p.has_next = s.has_next;
  return p;
}

// Loads (store=false) or stores the carries of kLanes lanes as H vectors of N: [kCarry][kLanes] values, or with
// kSymbolic the chunk maps [kCarry][kCarry + 1][kLanes] (constant term first).
template <bool kSymbolic, typename V, int N, int H, int D, typename C, typename acc_t>
RLK_FN void carry_io_lanes(C (&carry)[H][D], acc_t* io, bool store) {
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < D; ++j) {
      if constexpr (kSymbolic) {
        acc_t* base = io + (j * (D + 1)) * kLanes + h * N;
        if (store) {
          carry[h][j].c.store(base);
          for (int i = 0; i < D; ++i) carry[h][j].k[i].store(base + (1 + i) * kLanes);
        } else {
          carry[h][j].c = V::load(base);
          for (int i = 0; i < D; ++i) carry[h][j].k[i] = V::load(base + (1 + i) * kLanes);
        }
      } else if (store) {
        carry[h][j].store(io + j * kLanes + h * N);
      } else {
        carry[h][j] = V::load(io + j * kLanes + h * N);
      }
    }
  }
}

// The step's inputs, stream by stream from get.operator()<stream>() (absent streams arrive as 0, the mask
// as 1). The stream is a constant, so a walk that knows a stream is absent returns a constant for it.
template <typename V, typename Get>
RLK_FN StepIn<V> stream_in(Get get) {
  StepIn<V> in;
  in.r = get.template operator()<kR>();
  in.v = get.template operator()<kV>();
  in.nv = get.template operator()<kNV>();
  in.lr = get.template operator()<kLR>();
  in.a = get.template operator()<kA>();
  in.b = get.template operator()<kB>();
  in.term = get.template operator()<kTerm>();
  in.trunc = get.template operator()<kTrunc>();
  in.valid = get.template operator()<kMask>();
  in.g0 = get.template operator()<kG0>();
  in.g1 = get.template operator()<kG1>();
  in.s0 = get.template operator()<kS0>();
  in.s1 = get.template operator()<kS1>();
  return in;
}

template <typename F, int... S>
RLK_FN void for_each_stream(F& f, std::integer_sequence<int, S...>) {
  (f.template operator()<S>(), ...);
}
// f.operator()<s>() for every stream s, s a constant.
template <typename F>
RLK_FN void for_each_stream(F&& f) {
  for_each_stream(f, std::make_integer_sequence<int, kNumStreams>{});
}

// What an in-place walk knows at compile time about its inputs (see kGaeSets in scan_types.h): a stream in
// kKnown is present iff it is in kPresent; the others are looked up at run time. AnyInputs knows nothing.
template <uint32_t kKnown, uint32_t kPresent>
struct Presence {
  static constexpr bool absent(int s) { return ((kKnown >> s) & 1u) && !((kPresent >> s) & 1u); }
  static constexpr bool present(int s) { return ((kKnown >> s) & 1u) && ((kPresent >> s) & 1u); }
  // The value an absent stream reads: 1 for the mask (every step valid), else 0.
  static constexpr int constant(int s) { return s == kMask ? 1 : 0; }
  // The step parameters as vectors, has_next a constant where it is known.
  template <typename V, typename acc_t>
  RLK_FN static ScanParams<V> params(const ScanParams<acc_t>& scalar) {
    ScanParams<V> p = vec_params<V>(scalar);
    if constexpr ((kKnown & kHasNextBit) != 0) p.has_next = (kPresent & kHasNextBit) != 0;
    return p;
  }
};
using AnyInputs = Presence<0u, 0u>;

// One step of the lanes: outputs into o, the carry kept where the step is invalid (masked or past the end).
template <class Step, typename V, typename C>
RLK_FN void advance(const ScanParams<V>& p, const StepIn<V>& in, C (&carry)[Step::kCarry], C (&o)[Step::kOut]) {
  C c[Step::kCarry];
  for (int j = 0; j < Step::kCarry; ++j) c[j] = carry[j];
  Step::step(p, in, c, o);
  for (int j = 0; j < Step::kCarry; ++j) carry[j] = select(in.valid, c[j], carry[j]);
}

// The switch over every StepId (RLK_SCAN_STEPS in scan.h): each case returns RLK_STEP_FN(Step, sets), a macro
// the caller defines, with the step's in-place input sets (InPlaceSets below).
#define RLK_STEP_CASE(id, STEP) \
  case StepId::id:              \
    return RLK_STEP_FN(STEP, InPlaceSets<STEP>::value);
#define RLK_STEP_SWITCH                          \
  switch (id) { RLK_SCAN_STEPS(RLK_STEP_CASE, VecExp) } \
  return nullptr

// The kLanes lanes are processed as kLanes / N native vectors (N = RLK_VEC_BYTES / sizeof(acc_t)):
// vectors wider than the hardware's would be lowered element by element.
template <class Step, typename acc_t, bool kSymbolic>
void run_block(const ScanParams<acc_t>& scalar_params, const acc_t* const* src, int kn, acc_t* carry_io,
               acc_t* obuf) {
  constexpr int N = RLK_VEC_BYTES / sizeof(acc_t) < kLanes ? RLK_VEC_BYTES / sizeof(acc_t) : kLanes;
  constexpr int H = kLanes / N;
  static_assert(kLanes % N == 0, "kLanes must be a multiple of the vector width");
  using V = Vec<acc_t, N>;
  constexpr int D = Step::kCarry;
  using C = std::conditional_t<kSymbolic, Affine<V, D>, V>;

  C carry[H][D];
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/false);
  // has_next is a constant in each copy of the loop: left as a run-time branch inside it, GCC turned the float64
  // backward steps' `has_next ? x : 0` under AVX-512 into a blend with a mask built lane by lane.
  auto walk = [&](auto has_next) {
    ScanParams<V> p = vec_params<V>(scalar_params);
    p.has_next = decltype(has_next)::value;
    for (int kk = 0; kk < kn; ++kk) {
      for (int h = 0; h < H; ++h) {
        const int row = kk * kLanes + h * N;
        const StepIn<V> in = stream_in<V>([&]<int S>() { return V::load(src[S] + row); });
        C o[Step::kOut];
        advance<Step>(p, in, carry[h], o);  // invalid steps (masked, past a lane's end) keep the carry, write 0
        if constexpr (!kSymbolic) {
          for (int j = 0; j < Step::kOut; ++j)
            select(in.valid, o[j], V(acc_t(0))).store(obuf + j * kBlock * kLanes + row);
        }
      }
    }
  };
  if (scalar_params.has_next) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/true);
}

// N one-byte flags at p as N values 0/1 (nonzero means set): one zero-extending load and one conversion
// where the instruction set has them (vector-extension code for this stayed byte-by-byte scalar). Defined
// here, after the translation unit's target switch, so the intrinsics inline.
// N flag bytes to N values 0/1, through int32 lanes: GCC turns that into one zero-extension and one
// int-to-float conversion, where a direct char-to-float conversion stayed scalar.
template <typename native, typename bytes>
RLK_FN native flags_to(bytes b) {
  constexpr int N = sizeof(bytes);
  typedef int wide __attribute__((vector_size(N * sizeof(int))));
  const wide w = __builtin_convertvector(b, wide);
  return __builtin_convertvector(w != 0, native) != 0 ? native{} + 1 : native{};
}

template <typename V>
RLK_FN V load_flags(const unsigned char* p) {
  using native = typename V::native;
  using T = decltype(V().v[0] + 0);
  constexpr int N = sizeof(native) / sizeof(T);
#if defined(__x86_64__) && defined(__GNUC__) && defined(RLK_VEC_BYTES)
  if constexpr (RLK_VEC_BYTES == 64 && N == 16 && sizeof(T) == 4) {
    const __m512i w = _mm512_min_epu32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), _mm512_set1_epi32(1));
    return V::from((native)_mm512_cvtepi32_ps(w));
  } else if constexpr (RLK_VEC_BYTES == 32 && N == 8 && sizeof(T) == 4) {
    const __m256i w = _mm256_min_epu32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)), _mm256_set1_epi32(1));
    return V::from((native)_mm256_cvtepi32_ps(w));
  } else if constexpr (RLK_VEC_BYTES == 32 && N == 4 && sizeof(T) == 8) {
    int bytes;
    __builtin_memcpy(&bytes, p, 4);
    const __m128i w = _mm_min_epu32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes)), _mm_set1_epi32(1));
    return V::from((native)_mm256_cvtepi32_pd(w));
  } else if constexpr (RLK_VEC_BYTES == 16 && N == 4 && sizeof(T) == 4) {
    int bytes;
    __builtin_memcpy(&bytes, p, 4);
    const __m128i zero = _mm_setzero_si128();
    const __m128i w = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(bytes), zero), zero);
    return V::from((native)_mm_andnot_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(w, zero)), _mm_set1_ps(1.0f)));
  } else if constexpr (RLK_VEC_BYTES == 16 && N == 2 && sizeof(T) == 8) {
    // the two bytes widened to the low two 32-bit lanes, 1 where nonzero, converted: no compare per lane
    uint16_t bytes;
    __builtin_memcpy(&bytes, p, 2);
    const __m128i zero = _mm_setzero_si128();
    const __m128i w = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(bytes), zero), zero);
    return V::from((native)_mm_cvtepi32_pd(_mm_andnot_si128(_mm_cmpeq_epi32(w, zero), _mm_set1_epi32(1))));
  }
#endif
  typedef unsigned char bytes __attribute__((vector_size(N)));
  bytes b;
  __builtin_memcpy(&b, p, sizeof(b));
  return V::from(flags_to<native>(b));
}

// The streams of an in-place walk as byte addresses: stream s's value for (step kk, lane vector h) is at
// at(s) + kk * step[s] + h * lane[s]. An absent stream points at a constant (0, or 1 for the mask) with both
// strides 0, so every step loads every stream the same way: no per-step switch on what is present, and the
// loads of streams a step never reads are dead code. Flags (terminated, truncated, mask) are one byte; values
// are acc_t, or bfloat16 / float16 widened to float as they load (`kind`, DirectKind).
template <typename acc_t>
struct StreamTable {
  alignas(64) static constexpr acc_t kZero[kLanes] = {};
  alignas(64) static constexpr unsigned char kNoFlag[kLanes] = {};
  alignas(64) static constexpr unsigned char kAllValid[kLanes] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  static_assert(kLanes == 16, "kAllValid spells out kLanes ones");

  static constexpr bool is_flag(int s) { return s == kTerm || s == kTrunc || s == kMask; }

  const unsigned char* base[kNumStreams];
  int64_t step[kNumStreams];  // bytes per scan step
  int64_t unit[kNumStreams];  // bytes per element along the lanes (0 for an absent stream)
  unsigned char kind[kNumStreams];

  // Stream s's element at element offset off0 is the origin; one scan step moves by step_elems elements.
  RLK_FN StreamTable(const DirectStreams& ds, int64_t off0, int64_t step_elems) {
    for (int s = 0; s < kNumStreams; ++s) {
      kind[s] = ds.kind[s];
      const int64_t size = is_flag(s) ? 1 : (kind[s] == kBf16Value || kind[s] == kF16Value) ? 2 : sizeof(acc_t);
      if (ds.kind[s] == 0) {
        base[s] = is_flag(s) ? (s == kMask ? kAllValid : kNoFlag) : reinterpret_cast<const unsigned char*>(kZero);
        // Opaque to the optimizer: folding these constants into the steps' selects made GCC 12 crash
        // (internal compiler error in do_store_flag, AVX-512 double); a load from L1 costs next to nothing.
        __asm__("" : "+r"(base[s]));
        step[s] = unit[s] = 0;
      } else {
        base[s] = static_cast<const unsigned char*>(ds.p[s]) + off0 * size;
        step[s] = step_elems * size;
        unit[s] = size;
      }
    }
  }

  // k16: the stream may be 16-bit (a walk compiled for problems with 16-bit streams; the others load acc_t).
  template <typename V, bool k16>
  RLK_FN V load(int s, int64_t kk, int64_t lane) const {
    return load<V, k16>(s, kk, lane, base[s]);
  }
  // The same from another origin than base[s].
  template <typename V, bool k16>
  RLK_FN V load(int s, int64_t kk, int64_t lane, const unsigned char* origin) const {
    const unsigned char* a = origin + kk * step[s] + lane * unit[s];
    if (is_flag(s)) return load_flags<V>(a);
    if constexpr (k16) {
      static_assert(std::is_same_v<acc_t, float> && sizeof(typename V::native) == sizeof(vec::vf));
      if (kind[s] == kBf16Value) return V::from(vec::load_bf16(reinterpret_cast<const uint16_t*>(a)));
      if (kind[s] == kF16Value) return V::from(vec::load_f16(reinterpret_cast<const uint16_t*>(a)));
    }
    return V::load(reinterpret_cast<const acc_t*>(a));
  }
};

// The first m (0 < m < N) values of v to p, nothing past them: a masked store on AVX-512 and AVX2, element by
// element under SSE2 (whose masked store bypasses the cache). The values past m belong to other sequences'
// rows, which a load-blend-store would race with.
template <typename T, int N>
RLK_FN void store_first(Vec<T, N> v, T* p, int m) {
#if defined(__x86_64__) && defined(__GNUC__) && defined(RLK_VEC_BYTES)
  if constexpr (RLK_VEC_BYTES == 64 && N * sizeof(T) == 64) {
    const __mmask16 k = static_cast<__mmask16>((1u << m) - 1);
    if constexpr (sizeof(T) == 4) {
      _mm512_mask_storeu_ps(p, k, reinterpret_cast<__m512>(v.v));
    } else {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>(k), reinterpret_cast<__m512d>(v.v));
    }
    return;
  } else if constexpr (RLK_VEC_BYTES == 32 && N * sizeof(T) == 32) {
    if constexpr (sizeof(T) == 4) {
      const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_ps(p, k, reinterpret_cast<__m256>(v.v));
    } else {
      const __m256i k = _mm256_cmpgt_epi64(_mm256_set1_epi64x(m), _mm256_setr_epi64x(0, 1, 2, 3));
      _mm256_maskstore_pd(p, k, reinterpret_cast<__m256d>(v.v));
    }
    return;
  }
#endif
  T tmp[N];
  v.store(tmp);
  for (int i = 0; i < m; ++i) p[i] = tmp[i];
}

// walk.operator()<k16>() with k16 = whether a stream of `ds` is 16-bit: the in-place walks' instance that widens
// 16-bit streams as they load is compiled for float walks of steps that read the model's inputs only (steps of
// gradients and flags, AccInputsOnly, never see 16-bit streams).
template <class Step, typename acc_t, class W>
RLK_FN void with_16bit(const DirectStreams& ds, W& walk) {
  if constexpr (std::is_same_v<acc_t, float> && !AccInputsOnly<Step>::value) {
    if (has_16bit(ds)) return walk.template operator()<true>();
  }
  walk.template operator()<false>();
}

// Steps ahead at which run_direct requests its output rows, and its input rows.
constexpr int64_t kOutAhead = 8;
constexpr int64_t kInAhead = 16;

// run_block without the buffers: a time-major group reads its inputs in place and writes its outputs in
// place, one vector load or store per stream and lane vector, flags widened in registers. The lane vectors
// are unrolled so their carries stay in registers. A group of n < kLanes sequences walks the lane vectors that
// hold them; a vector's lanes past n read the next values in the row (another step's, computed, never stored:
// lanes are independent), and its outputs are stored for its first lanes only (store_first).

template <class Step, typename acc_t, bool kSymbolic, class P>
void run_direct(const ScanParams<acc_t>& scalar_params, const DirectStreams& ds, int64_t off0, int64_t step,
                int64_t kn, int n, acc_t* carry_io, acc_t* const* out) {
  constexpr int N = RLK_VEC_BYTES / sizeof(acc_t) < kLanes ? RLK_VEC_BYTES / sizeof(acc_t) : kLanes;
  constexpr int H = kLanes / N;
  using V = Vec<acc_t, N>;
  constexpr int D = Step::kCarry;
  using C = std::conditional_t<kSymbolic, Affine<V, D>, V>;
  const ScanParams<V> p = P::template params<V>(scalar_params);
  const StreamTable<acc_t> st(ds, off0, step);
  acc_t* o_ptr[Step::kOut];
  for (int j = 0; j < Step::kOut; ++j) o_ptr[j] = kSymbolic ? nullptr : out[j];

  const int hn = (n + N - 1) / N;     // lane vectors in use
  const int last = n - (hn - 1) * N;  // lanes stored of the last one
  C carry[H][D];
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/false);
  // k16: some stream is 16-bit, widened as it loads (compiled apart, so the float walk is unchanged).
  auto walk = [&]<bool k16>() {
    for (int64_t kk = 0; kk < kn; ++kk) {
      // Each stream's row kInAhead steps on, requested now: one or two lines a stream and step, spread over the
      // steps, where requesting a whole block's rows at once would fill the line-fill buffers and stall the loads.
      for_each_stream([&]<int S>() {
        if constexpr (!P::absent(S)) {
          if (st.unit[S] != 0) {
            constexpr int kBytes = kLanes * (StreamTable<acc_t>::is_flag(S) ? 1 : static_cast<int>(sizeof(acc_t)));
            const int bytes = k16 ? kLanes * static_cast<int>(st.unit[S]) : kBytes;
            const unsigned char* a = st.base[S] + (kk + kInAhead) * st.step[S];
            for (int b = 0; b < bytes; b += 64) __builtin_prefetch(a + b);
          }
        }
      });
#pragma GCC unroll 16
      for (int h = 0; h < H; ++h) {
        if (h == hn) break;
        const StepIn<V> in = stream_in<V>([&]<int S>() -> V {
          if constexpr (P::absent(S)) {
            return V(acc_t(P::constant(S)));
          } else {
            return st.template load<V, k16>(S, kk, h * N);
          }
        });
        C o[Step::kOut];
        advance<Step>(p, in, carry[h], o);
        if constexpr (!kSymbolic) {
          const int64_t off = off0 + kk * step + h * N;
          for (int j = 0; j < Step::kOut; ++j) {
            if (o_ptr[j] == nullptr) continue;
            // The output rows kOutAhead steps on, requested for writing now: each step's stores go to new lines
            // (a row apart), whose reads would otherwise be waited for one at a time.
            __builtin_prefetch(o_ptr[j] + off + kOutAhead * step, 1);
            const V v = select(in.valid, o[j], V(acc_t(0)));
            if (h == hn - 1 && last < N) {
              store_first(v, o_ptr[j] + off, last);
            } else {
              v.store(o_ptr[j] + off);
            }
          }
        }
      }
    }
  };
  with_16bit<Step, acc_t>(ds, walk);
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/true);
}

// ---- Lanes contiguous in time (batch-major rows, chunks of one long sequence) -------------------------------
// Each lane's N consecutive steps are one vector load; an N x N transpose in registers turns N such vectors
// (N lanes) into N steps of N lanes, the step runs, and outputs go back the same way. Replaces the staging
// buffers' element-by-element transposes.

template <typename native, int N, std::size_t... J>
RLK_FN native zip_lo(native a, native b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, (J % 2 == 0 ? J / 2 : N + J / 2)...);
}
template <typename native, int N, std::size_t... J>
RLK_FN native zip_hi(native a, native b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, (J % 2 == 0 ? N / 2 + J / 2 : N + N / 2 + J / 2)...);
}

// In-place N x N transpose by log2(N) rounds of perfect shuffles: row i of the result is column i of the input.
template <typename native, int N>
RLK_FN void transpose(native (&m)[N]) {
  constexpr auto idx = std::make_index_sequence<N>{};
  for (int round = 1; round < N; round *= 2) {
    native t[N];
    for (int i = 0; i < N / 2; ++i) {
      t[2 * i] = zip_lo<native, N>(m[i], m[i + N / 2], idx);
      t[2 * i + 1] = zip_hi<native, N>(m[i], m[i + N / 2], idx);
    }
    for (int i = 0; i < N; ++i) m[i] = t[i];
  }
}

// The directions a step is walked in (Step::kWalk): only those are compiled.
template <class Step>
constexpr bool walks_backward() {
  return Step::kWalk != Walk::kForward;
}
template <class Step>
constexpr bool walks_forward() {
  return Step::kWalk != Walk::kReverse;
}

// Stores a vector at p, 64-byte aligned with the rest of its cache line written next, without reading the line
// first (a non-temporal store: no read-for-ownership, the line goes to memory in a write-combining buffer).
template <typename native>
RLK_FN void stream_store(void* p, native v) {
#if defined(__x86_64__) && defined(__GNUC__) && defined(RLK_VEC_BYTES)
  if constexpr (sizeof(native) == 64) {
    _mm512_stream_ps(static_cast<float*>(p), (__m512)v);
  } else if constexpr (sizeof(native) == 32) {
    _mm256_stream_ps(static_cast<float*>(p), (__m256)v);
  } else if constexpr (sizeof(native) == 16) {
    _mm_stream_ps(static_cast<float*>(p), (__m128)v);
  } else {
    __builtin_memcpy(p, &v, sizeof(native));
  }
#else
  __builtin_memcpy(p, &v, sizeof(native));
#endif
}

RLK_FN void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  _mm_sfence();  // streaming stores are weakly ordered: visible before the walk returns
#endif
}

template <class Step, typename acc_t, bool kSymbolic, class P>
void run_transposed(const ScanParams<acc_t>& scalar_params, const DirectStreams& ds, const int64_t* lane_off,
                    int64_t dir, int64_t kn, acc_t* carry_io, acc_t* const* out, bool stream) {
  constexpr int N = RLK_VEC_BYTES / sizeof(acc_t) < kLanes ? RLK_VEC_BYTES / sizeof(acc_t) : kLanes;
  constexpr int H = kLanes / N;
  using V = Vec<acc_t, N>;
  using native = typename V::native;
  constexpr int D = Step::kCarry;
  using C = std::conditional_t<kSymbolic, Affine<V, D>, V>;
  // Each iteration walks kSub blocks of N steps, so each lane writes a whole 64-byte line of each output at once.
  constexpr int kSub = N * sizeof(acc_t) >= 64 ? 1 : int(64 / (N * sizeof(acc_t)));
  static_assert(kBlock % (kSub * N) == 0, "walks are a multiple of kBlock steps");
  const ScanParams<V> p = P::template params<V>(scalar_params);
  // Origin 0: lane l's N steps from scan step kk0 start at element lane_off[l] + dir * kk0 (lowest address
  // pos - (N - 1) when walking backwards); absent streams read their constant, the same for every lane.
  const StreamTable<acc_t> st(ds, 0, dir);
  acc_t* o_ptr[Step::kOut];
  for (int j = 0; j < Step::kOut; ++j) o_ptr[j] = kSymbolic ? nullptr : out[j];
  const int64_t low = dir > 0 ? 0 : N - 1;  // from a lane's position to the lowest address of its N steps
  // Each stream's address of each lane's first N steps, made once (absent streams: their constant); the walk
  // then moves every lane by the same dir * N steps per block.
  const unsigned char* at[kNumStreams][kLanes];
  for (int s = 0; s < kNumStreams; ++s)
    for (int l = 0; l < kLanes; ++l) at[s][l] = st.base[s] + (lane_off[l] - low) * st.unit[s];
  acc_t* o_at[Step::kOut][kLanes];
  for (int j = 0; j < Step::kOut; ++j)
    for (int l = 0; l < kLanes; ++l) o_at[j][l] = o_ptr[j] ? o_ptr[j] + (lane_off[l] - low) : nullptr;
  // Streaming stores need each iteration's line of every lane and output to be a whole aligned line.
  if constexpr (!kSymbolic) {
    const int64_t line_start = dir > 0 ? 0 : -(kSub - 1) * N;  // the lowest block of the first iteration
    for (int j = 0; j < Step::kOut && stream; ++j)
      for (int l = 0; l < kLanes && o_at[j][l] != nullptr; ++l)
        stream = stream && reinterpret_cast<uintptr_t>(o_at[j][l] + line_start) % 64 == 0;
  }

  C carry[H][D];
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/false);
  // The lanes are 16 streams per input and output, too many for the hardware prefetchers to follow: each
  // lane's lines kPrefetchSteps ahead are requested by hand, one request per cache line.
  constexpr int64_t kPrefetchSteps = 128;
  auto prefetch_every = [](int64_t unit) { return unit * N * kSub >= 64 ? int64_t(1) : 64 / (unit * N * kSub); };
  // After the transpose, row i holds memory offset i of every lane's N steps: scan order is i = 0..N-1
  // forwards and N-1..0 backwards, so walking backwards needs no shuffles, only the row order reversed.
  // k16: some stream is 16-bit, widened as it loads (compiled apart, so the float walk is unchanged).
  auto walk = [&]<bool kForward, bool k16>() {
    for (int64_t kk0 = 0; kk0 < kn; kk0 += kSub * N) {
      const int64_t iter = kk0 / (kSub * N);
#pragma GCC unroll 16
      for (int h = 0; h < H; ++h) {
        native outs[Step::kOut][kSub][N];
        for (int b = 0; b < kSub; ++b) {
          const int64_t moved = kForward ? kk0 + b * N : -(kk0 + b * N);  // elements moved since the start
          native cols[kNumStreams][N];
          for_each_stream([&]<int S>() {
            if constexpr (!P::absent(S)) {
              constexpr int64_t kUnit = StreamTable<acc_t>::is_flag(S) ? 1 : sizeof(acc_t);
              const int64_t unit = P::present(S) && (!k16 || StreamTable<acc_t>::is_flag(S)) ? kUnit : st.unit[S];
              const int64_t shift = moved * unit;
              if (b == 0 && unit != 0 && iter % prefetch_every(unit) == 0) {
                const int64_t ahead = shift + (kForward ? kPrefetchSteps : -kPrefetchSteps) * unit;
                for (int l = 0; l < N; ++l) __builtin_prefetch(at[S][h * N + l] + ahead);
              }
              for (int l = 0; l < N; ++l)
                cols[S][l] = st.template load<V, k16>(S, 0, 0, at[S][h * N + l] + shift).v;
              if (P::present(S) || ds.kind[S] != 0) transpose<native, N>(cols[S]);  // a constant needs none
            }
          });
#if RLK_VEC_BYTES < 64  // (unrolled in the AVX-512 build, GCC 12 crashes: internal compiler error in do_store_flag)
#pragma GCC unroll 16
#endif
          for (int k = 0; k < N; ++k) {
            const int i = kForward ? k : N - 1 - k;
            const StepIn<V> in = stream_in<V>([&]<int S>() -> V {
              if constexpr (P::absent(S)) {
                return V(acc_t(P::constant(S)));
              } else {
                return V::from(cols[S][i]);
              }
            });
            C o[Step::kOut];
            advance<Step>(p, in, carry[h], o);
            if constexpr (!kSymbolic) {
              for (int j = 0; j < Step::kOut; ++j) outs[j][b][i] = select(in.valid, o[j], V(acc_t(0))).v;
            }
          }
        }
        if constexpr (!kSymbolic) {
          for (int j = 0; j < Step::kOut; ++j) {
            if (o_ptr[j] == nullptr) continue;
            if (!stream && iter % prefetch_every(sizeof(acc_t)) == 0)
              for (int l = 0; l < N; ++l)
                __builtin_prefetch(o_at[j][h * N + l] + (kForward ? kk0 + kPrefetchSteps : -kk0 - kPrefetchSteps), 1);
            for (int b = 0; b < kSub; ++b) transpose<native, N>(outs[j][b]);
            // Each lane's line, its blocks in address order: b = 0 first forwards, last backwards.
            auto dst = [&](int l, int bb) {
              const int b = kForward ? bb : kSub - 1 - bb;
              return o_at[j][h * N + l] + (kForward ? kk0 + b * N : -(kk0 + b * N));
            };
            auto row = [&](int l, int bb) -> const native& { return outs[j][kForward ? bb : kSub - 1 - bb][l]; };
            if (stream) {
              for (int l = 0; l < N; ++l)
                for (int bb = 0; bb < kSub; ++bb) stream_store(dst(l, bb), row(l, bb));
            } else {
              for (int l = 0; l < N; ++l)
                for (int bb = 0; bb < kSub; ++bb) __builtin_memcpy(dst(l, bb), &row(l, bb), sizeof(native));
            }
          }
        }
      }
    }
  };
  // Each step is compiled for the directions it is walked in (scan.h: forward estimators in reverse time,
  // their adjoints forwards).
  auto walk_dir = [&]<bool k16>() {
    if (dir > 0) {
      if constexpr (walks_forward<Step>()) walk.template operator()<true, k16>(); else __builtin_trap();
    } else {
      if constexpr (walks_backward<Step>()) walk.template operator()<false, k16>(); else __builtin_trap();
    }
  };
  with_16bit<Step, acc_t>(ds, walk_dir);
  if (!kSymbolic && stream) stream_fence();
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/true);
}

// The walk `Walk<P>` specialized for `present` when it is one of `kSets` (float only: the in-place walks of
// the other dtypes are rarer, and each specialization is compile time), else the one for any inputs.
template <typename acc_t, const auto& kSets, template <class> class Walk, std::size_t... I>
auto pick_presence(uint32_t present, std::index_sequence<I...>) {
  decltype(&Walk<AnyInputs>::template run<acc_t>) fn = &Walk<AnyInputs>::template run<acc_t>;
  if constexpr (std::is_same_v<acc_t, float> && kSets[0] != kEveryBit)
    ((present == kSets[I] ? (fn = &Walk<Presence<kEveryBit, kSets[I]>>::template run<acc_t>, 0) : 0), ...);
  return fn;
}
template <typename acc_t, const auto& kSets, template <class> class Walk>
auto pick_presence(uint32_t present) {
  return pick_presence<acc_t, kSets, Walk>(present, std::make_index_sequence<sizeof(kSets) / sizeof(kSets[0])>{});
}

// The input sets each step's in-place walks are specialized for (scan_types.h); a step not named here gets
// none: its walks look every input up at run time.
constexpr uint32_t kNoSets[] = {kEveryBit};
constexpr uint32_t kLinearScanSets[] = {bit(kA) | bit(kB)};
template <class Step>
struct InPlaceSets {
  static constexpr const auto& value = kNoSets;
};
#define RLK_IN_PLACE_SETS(STEP, SETS)               \
  template <>                                       \
  struct InPlaceSets<STEP> {                        \
    static constexpr const auto& value = SETS;      \
  };
RLK_IN_PLACE_SETS(LinearScanStep, kLinearScanSets)
RLK_IN_PLACE_SETS(DiscountedReturnsStep, kReturnsSets)
RLK_IN_PLACE_SETS(DiscountedReturnsBackwardStep, kReturnsBackwardSets)
RLK_IN_PLACE_SETS(GaeStep, kGaeSets)
RLK_IN_PLACE_SETS(GaeBackwardStep, kGaeBackwardSets)
#undef RLK_IN_PLACE_SETS

template <class Step, bool kSymbolic>
struct TransposedWalk {
  template <class P>
  struct With {
    template <typename acc_t>
    static void run(const ScanParams<acc_t>& params, const DirectStreams& ds, const int64_t* lane_off, int64_t dir,
                    int64_t kn, acc_t* carry, acc_t* const* out, bool stream) {
      run_transposed<Step, acc_t, kSymbolic, P>(params, ds, lane_off, dir, kn, carry, out, stream);
    }
  };
};
template <class Step, bool kSymbolic>
struct DirectWalk {
  template <class P>
  struct With {
    template <typename acc_t>
    static void run(const ScanParams<acc_t>& params, const DirectStreams& ds, int64_t off0, int64_t step, int64_t kn,
                    int n, acc_t* carry, acc_t* const* out) {
      run_direct<Step, acc_t, kSymbolic, P>(params, ds, off0, step, kn, n, carry, out);
    }
  };
};

// `present`: the walk's inputs (presence_of), for picking a specialized walk.
template <typename acc_t>
TransposedFn<acc_t> transposed_function(StepId id, bool symbolic, uint32_t present) {
#if RLK_VEC_BYTES == 64
  // GCC 12 crashes compiling the AVX-512 double transposed walks (internal compiler error in do_store_flag
  // on a select); double batch-major problems take the buffered walk there.
  constexpr bool kCompiled = !std::is_same_v<acc_t, double>;
#else
  constexpr bool kCompiled = true;
#endif
  if constexpr (!kCompiled) {
    return nullptr;
  } else {
#define RLK_STEP_FN(STEP, SETS)                                                             \
  symbolic ? pick_presence<acc_t, SETS, TransposedWalk<STEP, true>::template With>(present) \
           : pick_presence<acc_t, SETS, TransposedWalk<STEP, false>::template With>(present)
    RLK_STEP_SWITCH;
#undef RLK_STEP_FN
  }
}

template <typename acc_t>
DirectFn<acc_t> direct_function(StepId id, bool symbolic, uint32_t present) {
#define RLK_STEP_FN(STEP, SETS)                                                         \
  symbolic ? pick_presence<acc_t, SETS, DirectWalk<STEP, true>::template With>(present) \
           : pick_presence<acc_t, SETS, DirectWalk<STEP, false>::template With>(present)
  RLK_STEP_SWITCH;
#undef RLK_STEP_FN
}

template <typename acc_t>
BlockFn<acc_t> block_function(StepId id, bool symbolic) {
#define RLK_STEP_FN(STEP, SETS) symbolic ? &run_block<STEP, acc_t, true> : &run_block<STEP, acc_t, false>
  RLK_STEP_SWITCH;
#undef RLK_STEP_FN
}

}  // namespace RLK_ISA
}  // namespace rlkernels

// Each instruction-set build exports its table under its own namespace (csrc/cpu/scan_block_*.cpp).
#define RLK_EXPORT_BLOCK_FUNCTIONS                                                                     \
  template rlkernels::cpu::BlockFn<float> rlkernels::RLK_ISA::block_function<float>(            \
      rlkernels::cpu::StepId, bool);                                                                   \
  template rlkernels::cpu::BlockFn<double> rlkernels::RLK_ISA::block_function<double>(          \
      rlkernels::cpu::StepId, bool);                                                                   \
  template rlkernels::cpu::DirectFn<float> rlkernels::RLK_ISA::direct_function<float>(          \
      rlkernels::cpu::StepId, bool, uint32_t);                                                         \
  template rlkernels::cpu::DirectFn<double> rlkernels::RLK_ISA::direct_function<double>(        \
      rlkernels::cpu::StepId, bool, uint32_t);                                                         \
  template rlkernels::cpu::TransposedFn<float> rlkernels::RLK_ISA::transposed_function<float>(  \
      rlkernels::cpu::StepId, bool, uint32_t);                                                         \
  template rlkernels::cpu::TransposedFn<double> rlkernels::RLK_ISA::transposed_function<double>( \
      rlkernels::cpu::StepId, bool, uint32_t);
