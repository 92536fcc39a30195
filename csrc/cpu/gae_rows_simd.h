// GAE along time (csrc/cpu/gae_rows.h explains the method): the walks of one chunk, compiled per instruction
// set by csrc/cpu/simd_{default,avx2,avx512}.cpp after their target switch; declared in simd_kernels.h. One
// register holds N consecutive steps (4 SSE2, 8 AVX2, 16 AVX-512). Values are float32, or bfloat16 / float16
// widened to float32 as they load (a walk per format: Format is a template argument, not a test per load).
#pragma once

#include "formats_simd.h"

namespace rlkernels::cpu::simd::RLK_ISA {
namespace gae {

using gae_rows::Params;
using gae_rows::Row;

// N consecutive steps per vector: one register of the translation unit's instruction set.
constexpr int N = vec::kW;
using vec::vf;
using vec::vi;
// The value type the steps of scan.h run on here: simd.h's Vec (its operators are defined before the
// translation unit's target switch, as the steps are, and inlined into the kernels below).
using VF = ::rlkernels::Vec<float, N>;

RLK_INLINE vf load(const float* p) { return vec::loadu(p); }
RLK_INLINE void store(float* p, vf v) { vec::storeu(p, v); }

// N values of format F from element t of p, as float32 (exact), and one value (scalar code, for the single
// steps at a chunk's end).
template <int F>
RLK_INLINE vf load_at(const void* p, int64_t t) {
  return load_as<F>(as_elems<F>(p) + t);
}
template <int F>
RLK_INLINE float value_at(const void* p, int64_t t) {
  return scalar_as<F>(as_elems<F>(p)[t]);
}

// A streaming (non-temporal) store of N floats at a 16-byte aligned p, as N / 4 SSE stores: valid in every
// instruction-set build, and the write-combining buffers merge them into whole lines.
RLK_INLINE void stream(float* p, vf v) {
#if defined(__x86_64__) && defined(__GNUC__)
  for (int j = 0; j < N / 4; ++j) {
    __m128 q;
    __builtin_memcpy(&q, reinterpret_cast<const char*>(&v) + 16 * j, 16);
    _mm_stream_ps(p + 4 * j, q);
  }
#else
  store(p, v);
#endif
}

// N flag bytes as 0/1 floats (nonzero = set).
RLK_INLINE vf is_set(const unsigned char* f) { return vec::flags_set(f) ? vf{} + 1.0f : vf{}; }

// Lanes shifted down by K (lane j takes lane j + K), the lanes past the end from `fill`'s first lane.
template <int K, size_t... I>
RLK_INLINE vf shift_down(vf v, vf fill, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, fill, (static_cast<int>(I) + K < N ? static_cast<int>(I) + K : N)...);
}
template <int K>
RLK_INLINE vf shift_down(vf v, vf fill) {
  return shift_down<K>(v, fill, std::make_index_sequence<N>());
}
// Every lane of v set to its lane 0.
template <size_t... I>
RLK_INLINE vf broadcast0(vf v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (static_cast<int>(I) * 0)...);
}
RLK_INLINE vf broadcast0(vf v) { return broadcast0(v, std::make_index_sequence<N>()); }

// The step's map x_t = d + c x_{t+1}: GaeStep itself run on an affine carry (affine.h), with V'_t given as
// the data vnext (next_values[t], V_{t+1}, or bootstrap_value after the last step), so this path computes
// exactly the engine's estimator, only composed along time.
template <typename T>
__attribute__((always_inline)) inline void gae_map(const ScanParams<T>& p, const StepIn<T>& in, T vnext, T& d,
                                                   T& c) {
  using A = Affine<T, 1>;
  A carry[2] = {A::variable(0), A(vnext)}, out[2];
  GaeStep::step<T, A>(p, in, carry, out);
  d = out[0].c;
  c = out[0].k[0];
}

template <typename T>
__attribute__((always_inline)) inline ScanParams<T> params_of(const Params& p) {
  ScanParams<T> sp;
  sp.gamma = T(p.gamma);
  sp.lam = T(p.lam);
  sp.has_next = false;  // V'_t arrives as data (gae_map's vnext)
  return sp;
}

// d_t and c_t of one step, and V_t.
template <int F>
__attribute__((always_inline)) inline void step1(const Row& row, const Params& p, int64_t t, float& d, float& c,
                                                  float& v) {
  StepIn<float> in{};
  in.r = value_at<F>(row.r, t);
  in.v = v = value_at<F>(row.v, t);
  in.term = row.term != nullptr && row.term[t] != 0 ? 1.0f : 0.0f;
  in.trunc = row.trunc != nullptr && row.trunc[t] != 0 ? 1.0f : 0.0f;
  const float vnext = row.nv != nullptr ? value_at<F>(row.nv, t) : (t + 1 < row.T ? value_at<F>(row.v, t + 1)
                                                                                 : row.boot);
  gae_map(params_of<float>(p), in, vnext, d, c);
}

// The same for steps [t, t + N); without nv, V_{t+N} must exist (t + N < T).
template <int F>
RLK_INLINE void step_n(const Row& row, const Params& p, int64_t t, vf& d, vf& c, vf& v) {
  StepIn<VF> in{};
  in.r = VF::from(load_at<F>(row.r, t));
  in.v = VF::from(load_at<F>(row.v, t));
  if (row.term != nullptr) in.term = VF::from(is_set(row.term + t));
  if (row.trunc != nullptr) in.trunc = VF::from(is_set(row.trunc + t));
  VF dd, cc;
  gae_map(params_of<VF>(p), in, VF::from(row.nv != nullptr ? load_at<F>(row.nv, t) : load_at<F>(row.v, t + 1)),
          dd, cc);
  d = dd.v;
  c = cc.v;
  v = in.v.v;
}

// One round of shift-and-compose: lane j composes its map with that of lane j + K.
template <int K>
RLK_INLINE void compose_round(vf& d, vf& c) {
  const vf cs = shift_down<K>(c, vf{} + 1.0f), ds = shift_down<K>(d, vf{});
  d = d + c * ds;
  c = c * cs;
}

// Lane j of the result composes the maps of steps j..N-1: x_j = d_j + c_j x_{j+1} for all j at once, given
// x_N (Hillis-Steele, log2 N rounds). Shifted lanes past the end are the identity map (c = 1, d = 0).
RLK_INLINE void compose(vf& d, vf& c) {
  compose_round<1>(d, c);
  compose_round<2>(d, c);
  if constexpr (N > 4) compose_round<4>(d, c);
  if constexpr (N > 8) compose_round<8>(d, c);
}

// The steps [s, e) walked down from e, the first ones one at a time until the rest are whole vectors with
// V_{t+N} in range: vec(t) for the vectors [t, t + N), one(t) for single steps.
template <class One, class Vec>
RLK_INLINE void walk_down(const Row& row, int64_t s, int64_t e, One one, Vec vec) {
  int64_t t = e;
  while (t > s && ((t - s) % N != 0 || (row.nv == nullptr && t == row.T))) one(--t);
  for (; t > s; t -= N) vec(t - N);
}

// Walks [s, e) from x_e = 0, writing adv = x and ret = x + V; returns x_s in *x_s and prod c_t in *prod.
template <int F>
void walk_chunk(const Row& row, Params p, int64_t s, int64_t e, bool stream, float* x_s, float* prod) {
  float x = 0.0f, a = 1.0f;
  vf carry = vf{}, prod_v = vf{} + 1.0f;  // prod_v: the product of the vectors' c, in every lane
  walk_down(
      row, s, e,
      [&](int64_t t) {
        float d, c, v;
        step1<F>(row, p, t, d, c, v);
        x = d + c * x;
        a = a * c;
        row.adv[t] = x;
        row.ret[t] = x + v;
        carry = vf{} + x;
      },
      [&](int64_t t) {
        vf d, c, v;
        step_n<F>(row, p, t, d, c, v);
        compose(d, c);
        const vf xs = d + c * carry;
        if (stream) {
          gae::stream(row.adv + t, xs);
          gae::stream(row.ret + t, xs + v);
        } else {
          store(row.adv + t, xs);
          store(row.ret + t, xs + v);
        }
        carry = broadcast0(xs);
        prod_v = prod_v * broadcast0(c);
      });
#if defined(__x86_64__) && defined(__GNUC__)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the walk returns
#endif
  *x_s = carry[0];
  *prod = a * prod_v[0];
}

// Adds C_t * k to the outputs of [s, e), C_t = c_t ... c_{e-1}, walking down from e; stops once C_t is 0
// with k finite (nothing more to add).
template <int F>
void fix_chunk(const Row& row, Params p, int64_t s, int64_t e, float k) {
  const bool finite = std::isfinite(k);
  float run = 1.0f;
  bool done = false;
  walk_down(
      row, s, e,
      [&](int64_t t) {
        if (done) return;
        float d, c, v;
        step1<F>(row, p, t, d, c, v);
        run = run * c;
        row.adv[t] += run * k;
        row.ret[t] += run * k;
        done = finite && run == 0.0f;
      },
      [&](int64_t t) {
        if (done) return;
        vf d, c, v;
        step_n<F>(row, p, t, d, c, v);
        // Suffix products within the vector, times the product of everything above it.
        const vf one = vf{} + 1.0f;
        c = c * shift_down<1>(c, one);
        c = c * shift_down<2>(c, one);
        if constexpr (N > 4) c = c * shift_down<4>(c, one);
        if constexpr (N > 8) c = c * shift_down<8>(c, one);
        const vf add = (c * run) * k;
        store(row.adv + t, load(row.adv + t) + add);
        store(row.ret + t, load(row.ret + t) + add);
        run = run * c[0];
        done = finite && run == 0.0f;
      });
}

}  // namespace gae

void gae_walk_chunk(const gae_rows::Row& row, gae_rows::Params p, int64_t s, int64_t e, bool stream, float* x_s,
                    float* prod) {
  by_format(row.format, [&](auto f) RLK_LAMBDA_INLINE { gae::walk_chunk<f>(row, p, s, e, stream, x_s, prod); });
}

void gae_fix_chunk(const gae_rows::Row& row, gae_rows::Params p, int64_t s, int64_t e, float k) {
  by_format(row.format, [&](auto f) RLK_LAMBDA_INLINE { gae::fix_chunk<f>(row, p, s, e, k); });
}

}  // namespace rlkernels::cpu::simd::RLK_ISA
