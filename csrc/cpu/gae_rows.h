// GAE over long float32 sequences that are contiguous in time (a [T] or [T, 1] rollout, batch-major [B, T]
// rows), vectorized along time instead of across sequences.
//
// The scan engine's layout for such sequences cuts each one into chunks, walks 16 chunks per thread in the
// lanes of a vector, and so transposes every 8 x 8 block of every input and output in registers and reads the
// inputs twice (once for the chunks' affine maps, once for the outputs); on one long sequence a third of that
// walk's instructions are shuffles and a third loads of the 100-odd lane pointers and spills. Here each thread
// walks one contiguous chunk of a sequence, 8 consecutive steps per vector:
//   - per step t, the map x_t = d_t + c_t x_{t+1} comes from GaeStep itself (scan.h) run on an affine carry,
//     8 steps at once from contiguous loads, with V'_t as data (next_values[t], V_{t+1} by a load one step
//     on, or bootstrap_value after the last step): the estimator's arithmetic is written once;
//   - the 8 maps composed in registers by 3 rounds of shift-and-compose (Hillis-Steele), so that
//     x = D + C * x_{t+8} for all 8 steps at once: the only serial dependency is one broadcast and one FMA
//     per 8 steps;
//   - each chunk is walked once, from carry 0 (the last chunk of a sequence: its true carry), writing its
//     outputs; the carry entering each other chunk then follows from the chunks' maps (x at its start and
//     the product of its c), and a fix-up adds C_t * carry to its outputs walking down from its end, where
//     C_t = c_t ... c_{e-1}: it stops as soon as C_t is exactly 0 (a terminated step, or float underflow
//     after ~1,600 steps at gamma lam = 0.94) while the carry is finite, so it touches a few hundred steps
//     per chunk, not the chunk. Inputs are read once and outputs written once (plus those few hundred).
// Results equal the engine's up to float rounding (the maps compose in another order); NaN and inf spread
// as in the step-by-step recurrence (0 * NaN is NaN: the fix-up never stops early on a non-finite carry).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "clones.h"
#include "rlkernels/affine.h"
#include "rlkernels/scan.h"

namespace rlkernels::cpu::gae_rows {

typedef float f8 __attribute__((vector_size(32)));
typedef int i8v __attribute__((vector_size(32)));
typedef unsigned char u8x8 __attribute__((vector_size(8)));

// One sequence, contiguous in time. nv, term, trunc may be null (absent); flags are bytes, nonzero = set.
struct Row {
  const float *r, *v, *nv;
  const unsigned char *term, *trunc;
  float boot;  // V after the last step when nv is null
  float *adv, *ret;
  int64_t T;
};

struct Params {
  float gamma, lam;
};

// Which problems take this path: those where it measured faster than the engine with cold inputs
// (docs/performance.md): from 1,024 steps per sequence on, and from 256 steps with few sequences; below that,
// or with many short sequences, the engine's lanes across sequences win.
inline bool suits(int64_t sequences, int64_t steps) {
  return steps >= 1024 || (steps >= 256 && sequences <= 64);
}
// A sequence is cut into T / kMinChunk chunks (at most kMaxChunks), whatever the number of threads, so
// results are bit-identical for any thread count; the threads share the chunks of all sequences.
constexpr int64_t kMinChunk = 32768;
constexpr int64_t kMaxChunks = 256;

__attribute__((always_inline)) inline f8 load8(const float* p) {
  f8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, f8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// A streaming (non-temporal) store of 8 floats at a 16-byte aligned p, as two SSE stores: valid in every
// target_clones variant, and the write-combining buffers merge them into whole lines.
__attribute__((always_inline)) inline void stream8(float* p, f8 v) {
#if defined(__x86_64__) && defined(__GNUC__)
  typedef float f4 __attribute__((vector_size(16)));
  const f4 lo = {v[0], v[1], v[2], v[3]}, hi = {v[4], v[5], v[6], v[7]};
  _mm_stream_ps(p, (__m128)lo);
  _mm_stream_ps(p + 4, (__m128)hi);
#else
  store8(p, v);
#endif
}

// 8 flag bytes as 0/1 floats (nonzero = set).
__attribute__((always_inline)) inline f8 is_set8(const unsigned char* f) {
  u8x8 b;
  __builtin_memcpy(&b, f, sizeof(b));
  const i8v set = __builtin_convertvector(b, i8v) != 0;
  return set ? f8{} + 1.0f : f8{};
}


// f8 with what the steps of scan.h use of their value type: a scalar constructor and arithmetic.
struct F8 {
  f8 v;
  F8() : v(f8{}) {}
  F8(float s) : v(f8{} + s) {}  // NOLINT: a scalar broadcasts, as for the engine's vectors
  F8(f8 x) : v(x) {}            // NOLINT
  F8& operator+=(F8 b) { v += b.v; return *this; }
  F8& operator-=(F8 b) { v -= b.v; return *this; }
};
__attribute__((always_inline)) inline F8 operator+(F8 a, F8 b) { return F8(a.v + b.v); }
__attribute__((always_inline)) inline F8 operator-(F8 a, F8 b) { return F8(a.v - b.v); }
__attribute__((always_inline)) inline F8 operator*(F8 a, F8 b) { return F8(a.v * b.v); }

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
__attribute__((always_inline)) inline void step1(const Row& row, const Params& p, int64_t t, float& d, float& c,
                                                  float& v) {
  StepIn<float> in{};
  in.r = row.r[t];
  in.v = v = row.v[t];
  in.term = row.term != nullptr && row.term[t] != 0 ? 1.0f : 0.0f;
  in.trunc = row.trunc != nullptr && row.trunc[t] != 0 ? 1.0f : 0.0f;
  const float vnext = row.nv != nullptr ? row.nv[t] : (t + 1 < row.T ? row.v[t + 1] : row.boot);
  gae_map(params_of<float>(p), in, vnext, d, c);
}

// The same for steps [t, t + 8); without nv, V_{t+8} must exist (t + 8 < T).
__attribute__((always_inline)) inline void step8(const Row& row, const Params& p, int64_t t, f8& d, f8& c, f8& v) {
  StepIn<F8> in{};
  in.r = load8(row.r + t);
  in.v = load8(row.v + t);
  if (row.term != nullptr) in.term = is_set8(row.term + t);
  if (row.trunc != nullptr) in.trunc = is_set8(row.trunc + t);
  F8 dd, cc;
  gae_map(params_of<F8>(p), in, F8(load8(row.nv != nullptr ? row.nv + t : row.v + t + 1)), dd, cc);
  d = dd.v;
  c = cc.v;
  v = in.v.v;
}

// Lane j of the result composes the maps of steps j..7: x_j = d_j + c_j x_{j+1} for all j at once, given
// x_8. Shifted lanes past the end are the identity map (c = 1, d = 0).
__attribute__((always_inline)) inline void compose8(f8& d, f8& c) {
  const f8 one = f8{} + 1.0f, zero = f8{};
  f8 cs = __builtin_shufflevector(c, one, 1, 2, 3, 4, 5, 6, 7, 8);
  f8 ds = __builtin_shufflevector(d, zero, 1, 2, 3, 4, 5, 6, 7, 8);
  d = d + c * ds;
  c = c * cs;
  cs = __builtin_shufflevector(c, one, 2, 3, 4, 5, 6, 7, 8, 8);
  ds = __builtin_shufflevector(d, zero, 2, 3, 4, 5, 6, 7, 8, 8);
  d = d + c * ds;
  c = c * cs;
  cs = __builtin_shufflevector(c, one, 4, 5, 6, 7, 8, 8, 8, 8);
  ds = __builtin_shufflevector(d, zero, 4, 5, 6, 7, 8, 8, 8, 8);
  d = d + c * ds;
  c = c * cs;
}

// The steps [s, e) walked down from e, the first ones one at a time until the rest are whole vectors with
// V_{t+8} in range: vec(t) for the vectors [t, t + 8), one(t) for single steps.
template <class One, class Vec>
__attribute__((always_inline)) inline void walk_down(const Row& row, int64_t s, int64_t e, One one, Vec vec) {
  int64_t t = e;
  while (t > s && ((t - s) % 8 != 0 || (row.nv == nullptr && t == row.T))) one(--t);
  for (; t > s; t -= 8) vec(t - 8);
}

// Walks [s, e) from x_e = 0, writing adv = x and ret = x + V; returns x_s in *x_s and prod c_t in *prod.
RLK_CLONES void walk_chunk(const Row& row, Params p, int64_t s, int64_t e, bool stream, float* x_s, float* prod) {
  float x = 0.0f, a = 1.0f;
  f8 carry = f8{};
  walk_down(
      row, s, e,
      [&](int64_t t) {
        float d, c, v;
        step1(row, p, t, d, c, v);
        x = d + c * x;
        a = a * c;
        row.adv[t] = x;
        row.ret[t] = x + v;
        carry = f8{} + x;
      },
      [&](int64_t t) {
        f8 d, c, v;
        step8(row, p, t, d, c, v);
        compose8(d, c);
        const f8 xs = d + c * carry;
        if (stream) {
          stream8(row.adv + t, xs);
          stream8(row.ret + t, xs + v);
        } else {
          store8(row.adv + t, xs);
          store8(row.ret + t, xs + v);
        }
        carry = __builtin_shufflevector(xs, xs, 0, 0, 0, 0, 0, 0, 0, 0);
        a = a * c[0];
      });
#if defined(__x86_64__) && defined(__GNUC__)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the walk returns
#endif
  *x_s = carry[0];
  *prod = a;
}

// Adds C_t * k to the outputs of [s, e), C_t = c_t ... c_{e-1}, walking down from e; stops once C_t is 0
// with k finite (nothing more to add).
RLK_CLONES void fix_chunk(const Row& row, Params p, int64_t s, int64_t e, float k) {
  const bool finite = std::isfinite(k);
  float run = 1.0f;
  bool done = false;
  walk_down(
      row, s, e,
      [&](int64_t t) {
        if (done) return;
        float d, c, v;
        step1(row, p, t, d, c, v);
        run = run * c;
        row.adv[t] += run * k;
        row.ret[t] += run * k;
        done = finite && run == 0.0f;
      },
      [&](int64_t t) {
        if (done) return;
        f8 d, c, v;
        step8(row, p, t, d, c, v);
        // Suffix products within the vector, times the product of everything above it.
        const f8 one = f8{} + 1.0f;
        c = c * __builtin_shufflevector(c, one, 1, 2, 3, 4, 5, 6, 7, 8);
        c = c * __builtin_shufflevector(c, one, 2, 3, 4, 5, 6, 7, 8, 8);
        c = c * __builtin_shufflevector(c, one, 4, 5, 6, 7, 8, 8, 8, 8);
        const f8 add = (c * run) * k;
        store8(row.adv + t, load8(row.adv + t) + add);
        store8(row.ret + t, load8(row.ret + t) + add);
        run = run * c[0];
        done = finite && run == 0.0f;
      });
}

// Whether gae takes this path: RLKERNELS_GAE_ROWS=0 keeps every call on the engine (to compare the two).
inline bool enabled() {
  const char* v = std::getenv("RLKERNELS_GAE_ROWS");
  return v == nullptr || std::string(v) != "0";
}

// GAE of rows (sequences) of length T each, all contiguous in time. stream: outputs with streaming stores
// (their addresses must be 16-byte aligned).
inline void run(const std::vector<Row>& rows, Params p, bool stream) {
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return;
  const int64_t T = rows[0].T;
  // Chunks per row, from the shape alone; boundaries on multiples of 8 steps.
  const int64_t P = std::clamp<int64_t>(T / kMinChunk, 1, kMaxChunks);
  auto bound = [&](int64_t k) { return k == P ? T : (T * k / P) / 8 * 8; };
  std::vector<float> x0(R * P), prod(R * P);
  at::parallel_for(0, R * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i % P;
      walk_chunk(rows[i / P], p, bound(k), bound(k + 1), stream, &x0[i], &prod[i]);
    }
  });
  if (P == 1) return;
  // The carry entering chunk k is x at the start of chunk k + 1: x0 + prod * (its own carry).
  std::vector<float> carry(R * P, 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = P - 2; k >= 0; --k)
      carry[r * P + k] = x0[r * P + k + 1] + prod[r * P + k + 1] * carry[r * P + k + 1];
  at::parallel_for(0, R * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i % P;
      if (k == P - 1 || carry[i] == 0.0f) continue;
      fix_chunk(rows[i / P], p, bound(k), bound(k + 1), carry[i]);
    }
  });
}

}  // namespace rlkernels::cpu::gae_rows
