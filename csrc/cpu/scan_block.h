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

// The step's inputs, stream by stream from get(stream) (absent streams arrive as 0, the mask as 1).
template <typename V, typename Get>
RLK_FN StepIn<V> stream_in(Get get) {
  StepIn<V> in;
  in.r = get(kR);
  in.v = get(kV);
  in.nv = get(kNV);
  in.lr = get(kLR);
  in.a = get(kA);
  in.b = get(kB);
  in.term = get(kTerm);
  in.trunc = get(kTrunc);
  in.valid = get(kMask);
  in.g0 = get(kG0);
  in.g1 = get(kG1);
  in.s0 = get(kS0);
  in.s1 = get(kS1);
  return in;
}

// One step of the lanes: outputs into o, the carry kept where the step is invalid (masked or past the end).
template <class Step, typename V, typename C>
RLK_FN void advance(const ScanParams<V>& p, const StepIn<V>& in, C (&carry)[Step::kCarry], C (&o)[Step::kOut]) {
  C c[Step::kCarry];
  for (int j = 0; j < Step::kCarry; ++j) c[j] = carry[j];
  Step::step(p, in, c, o);
  for (int j = 0; j < Step::kCarry; ++j) carry[j] = select(in.valid, c[j], carry[j]);
}

// The step of each StepId, as FN(Step) (one table for the three walks).
#define RLK_STEP_TABLE(FN)                                                   \
  switch (id) {                                                              \
    case StepId::kLinearScan: return FN(LinearScanStep);                     \
    case StepId::kDiscountedReturns: return FN(DiscountedReturnsStep);       \
    case StepId::kDiscountedReturnsBackward: return FN(DiscountedReturnsBackwardStep); \
    case StepId::kGae: return FN(GaeStep);                                   \
    case StepId::kGaeBackward: return FN(GaeBackwardStep);                   \
    case StepId::kVtrace: return FN(VtraceStepT<VecExp>);                    \
    case StepId::kVtraceBackward: return FN(VtraceBackwardStepT<VecExp>);    \
  }                                                                          \
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
  const ScanParams<V> p = vec_params<V>(scalar_params);

  C carry[H][D];
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/false);
  for (int kk = 0; kk < kn; ++kk) {
    for (int h = 0; h < H; ++h) {
      const int row = kk * kLanes + h * N;
      const StepIn<V> in = stream_in<V>([&](int s) { return V::load(src[s] + row); });
      C o[Step::kOut];
      advance<Step>(p, in, carry[h], o);  // invalid steps (masked, past a lane's end) keep the carry, write 0
      if constexpr (!kSymbolic) {
        for (int j = 0; j < Step::kOut; ++j)
          select(in.valid, o[j], V(acc_t(0))).store(obuf + j * kBlock * kLanes + row);
      }
    }
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
    const __m128i w = _mm_set_epi32(0, 0, p[1] != 0, p[0] != 0);
    return V::from((native)_mm_cvtepi32_pd(w));
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
// loads of streams a step never reads are dead code. Flags (terminated, truncated, mask) are one byte.
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

  // Stream s's element at element offset off0 is the origin; one scan step moves by step_elems elements.
  RLK_FN StreamTable(const DirectStreams& ds, int64_t off0, int64_t step_elems) {
    for (int s = 0; s < kNumStreams; ++s) {
      const int64_t size = is_flag(s) ? 1 : sizeof(acc_t);
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

  template <typename V>
  RLK_FN V load(int s, int64_t kk, int64_t lane) const {
    return load<V>(s, kk, lane, base[s]);
  }
  // The same from another origin than base[s].
  template <typename V>
  RLK_FN V load(int s, int64_t kk, int64_t lane, const unsigned char* origin) const {
    const unsigned char* a = origin + kk * step[s] + lane * unit[s];
    if (is_flag(s)) return load_flags<V>(a);
    return V::load(reinterpret_cast<const acc_t*>(a));
  }
};

// run_block without the buffers: a time-major group reads its inputs in place and writes its outputs in
// place, one vector load or store per stream and lane vector, flags widened in registers. The lane vectors
// are unrolled so their carries stay in registers.
template <class Step, typename acc_t, bool kSymbolic>
void run_direct(const ScanParams<acc_t>& scalar_params, const DirectStreams& ds, int64_t off0, int64_t step,
                int64_t kn, acc_t* carry_io, acc_t* const* out) {
  constexpr int N = RLK_VEC_BYTES / sizeof(acc_t) < kLanes ? RLK_VEC_BYTES / sizeof(acc_t) : kLanes;
  constexpr int H = kLanes / N;
  using V = Vec<acc_t, N>;
  constexpr int D = Step::kCarry;
  using C = std::conditional_t<kSymbolic, Affine<V, D>, V>;
  const ScanParams<V> p = vec_params<V>(scalar_params);
  const StreamTable<acc_t> st(ds, off0, step);
  acc_t* o_ptr[Step::kOut];
  for (int j = 0; j < Step::kOut; ++j) o_ptr[j] = kSymbolic ? nullptr : out[j];

  C carry[H][D];
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/false);
  for (int64_t kk = 0; kk < kn; ++kk) {
#pragma GCC unroll 16
    for (int h = 0; h < H; ++h) {
      const StepIn<V> in = stream_in<V>([&](int s) { return st.template load<V>(s, kk, h * N); });
      C o[Step::kOut];
      advance<Step>(p, in, carry[h], o);
      if constexpr (!kSymbolic) {
        const int64_t off = off0 + kk * step + h * N;
        for (int j = 0; j < Step::kOut; ++j)
          if (o_ptr[j] != nullptr) select(in.valid, o[j], V(acc_t(0))).store(o_ptr[j] + off);
      }
    }
  }
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

template <class Step, typename acc_t, bool kSymbolic>
void run_transposed(const ScanParams<acc_t>& scalar_params, const DirectStreams& ds, const int64_t* lane_off,
                    int64_t dir, int64_t kn, acc_t* carry_io, acc_t* const* out) {
  constexpr int N = RLK_VEC_BYTES / sizeof(acc_t) < kLanes ? RLK_VEC_BYTES / sizeof(acc_t) : kLanes;
  constexpr int H = kLanes / N;
  using V = Vec<acc_t, N>;
  using native = typename V::native;
  constexpr int D = Step::kCarry;
  using C = std::conditional_t<kSymbolic, Affine<V, D>, V>;
  const ScanParams<V> p = vec_params<V>(scalar_params);
  // Origin 0: lane l's N steps from scan step kk0 start at element lane_off[l] + dir * kk0 (lowest address
  // pos - (N - 1) when walking backwards); absent streams read their constant, the same for every lane.
  const StreamTable<acc_t> st(ds, 0, dir);
  acc_t* o_ptr[Step::kOut];
  for (int j = 0; j < Step::kOut; ++j) o_ptr[j] = kSymbolic ? nullptr : out[j];
  const int64_t low = dir > 0 ? 0 : N - 1;  // from a lane's position to the lowest address of its N steps
  // Each stream's address of each lane's first N steps, made once (absent streams: their constant); the walk
  // then moves every lane by the same dir * N steps per iteration.
  const unsigned char* at[kNumStreams][kLanes];
  for (int s = 0; s < kNumStreams; ++s)
    for (int l = 0; l < kLanes; ++l) at[s][l] = st.base[s] + (lane_off[l] - low) * st.unit[s];
  acc_t* o_at[Step::kOut][kLanes];
  for (int j = 0; j < Step::kOut; ++j)
    for (int l = 0; l < kLanes; ++l) o_at[j][l] = o_ptr[j] ? o_ptr[j] + (lane_off[l] - low) : nullptr;

  C carry[H][D];
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/false);
  // After the transpose, row i holds memory offset i of every lane's N steps: scan order is i = 0..N-1
  // forwards and N-1..0 backwards, so walking backwards needs no shuffles, only the row order reversed.
  auto walk = [&]<bool kForward>() {
    for (int64_t kk0 = 0; kk0 < kn; kk0 += N) {
      const int64_t moved = (kForward ? kk0 : -kk0);  // elements moved since the start
#pragma GCC unroll 16
      for (int h = 0; h < H; ++h) {
        native cols[kNumStreams][N];
#pragma GCC unroll 16
        for (int s = 0; s < kNumStreams; ++s) {
          const int64_t shift = moved * st.unit[s];
          for (int l = 0; l < N; ++l) cols[s][l] = st.template load<V>(s, 0, 0, at[s][h * N + l] + shift).v;
          if (ds.kind[s] != 0) transpose<native, N>(cols[s]);  // an absent stream's constant needs none
        }
        native outs[Step::kOut][N];
#if RLK_VEC_BYTES < 64  // (unrolled in the AVX-512 build, GCC 12 crashes: internal compiler error in do_store_flag)
#pragma GCC unroll 16
#endif
        for (int k = 0; k < N; ++k) {
          const int i = kForward ? k : N - 1 - k;
          const StepIn<V> in = stream_in<V>([&](int s) { return V::from(cols[s][i]); });
          C o[Step::kOut];
          advance<Step>(p, in, carry[h], o);
          if constexpr (!kSymbolic) {
            for (int j = 0; j < Step::kOut; ++j) outs[j][i] = select(in.valid, o[j], V(acc_t(0))).v;
          }
        }
        if constexpr (!kSymbolic) {
          for (int j = 0; j < Step::kOut; ++j) {
            if (o_ptr[j] == nullptr) continue;
            transpose<native, N>(outs[j]);
            for (int l = 0; l < N; ++l) __builtin_memcpy(o_at[j][h * N + l] + moved, &outs[j][l], sizeof(native));
          }
        }
      }
    }
  };
  if (dir > 0) {
    walk.template operator()<true>();
  } else {
    walk.template operator()<false>();
  }
  carry_io_lanes<kSymbolic, V, N, H, D>(carry, carry_io, /*store=*/true);
}

template <typename acc_t>
TransposedFn<acc_t> transposed_function(StepId id, bool symbolic) {
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
#define RLK_TRANSPOSED(STEP) symbolic ? &run_transposed<STEP, acc_t, true> : &run_transposed<STEP, acc_t, false>
    RLK_STEP_TABLE(RLK_TRANSPOSED);
#undef RLK_TRANSPOSED
  }
}

template <typename acc_t>
DirectFn<acc_t> direct_function(StepId id, bool symbolic) {
#define RLK_DIRECT(STEP) symbolic ? &run_direct<STEP, acc_t, true> : &run_direct<STEP, acc_t, false>
  RLK_STEP_TABLE(RLK_DIRECT);
#undef RLK_DIRECT
}

template <typename acc_t>
BlockFn<acc_t> block_function(StepId id, bool symbolic) {
#define RLK_BLOCK(STEP) symbolic ? &run_block<STEP, acc_t, true> : &run_block<STEP, acc_t, false>
  RLK_STEP_TABLE(RLK_BLOCK);
#undef RLK_BLOCK
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
      rlkernels::cpu::StepId, bool);                                                                   \
  template rlkernels::cpu::DirectFn<double> rlkernels::RLK_ISA::direct_function<double>(        \
      rlkernels::cpu::StepId, bool);                                                                   \
  template rlkernels::cpu::TransposedFn<float> rlkernels::RLK_ISA::transposed_function<float>(  \
      rlkernels::cpu::StepId, bool);                                                                   \
  template rlkernels::cpu::TransposedFn<double> rlkernels::RLK_ISA::transposed_function<double>( \
      rlkernels::cpu::StepId, bool);
