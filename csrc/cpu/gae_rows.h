// GAE over long sequences that are contiguous in time (a [T] or [T, 1] rollout, batch-major [B, T] rows),
// vectorized along time instead of across sequences; float32 inputs, or 16-bit ones widened as they load.
//
// The scan engine's layout for such sequences cuts each one into chunks, walks 16 chunks per thread in the
// lanes of a vector, and so transposes every 8 x 8 block of every input and output in registers and reads the
// inputs twice (once for the chunks' affine maps, once for the outputs); on one long sequence a third of that
// walk's instructions are shuffles and a third loads of the 100-odd lane pointers and spills. Here each thread
// walks one contiguous chunk of a sequence, N consecutive steps per vector (one register: 4, 8 or 16):
//   - per step t, the map x_t = d_t + c_t x_{t+1} comes from GaeStep itself (scan.h) run on an affine carry,
//     N steps at once from contiguous loads, with V'_t as data (next_values[t], V_{t+1} by a load one step
//     on, or bootstrap_value after the last step): the estimator's arithmetic is written once;
//   - the N maps composed in registers by log2 N rounds of shift-and-compose (Hillis-Steele), so that
//     x = D + C * x_{t+N} for all N steps at once: the only serial dependency is one broadcast and one FMA
//     per N steps;
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

#include "simd_kernels.h"

// The walks of one chunk (walk_chunk, fix_chunk) are in gae_rows_simd.h, compiled once per instruction set and
// called through simd::kernels(); Row and Params are declared in simd_kernels.h.
namespace rlkernels::cpu::gae_rows {

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
  // Chunks per row, from the shape alone; boundaries on multiples of 16 steps (whole vectors at every level).
  const int64_t P = std::clamp<int64_t>(T / kMinChunk, 1, kMaxChunks);
  auto bound = [&](int64_t k) { return k == P ? T : (T * k / P) / 16 * 16; };
  std::vector<float> x0(R * P), prod(R * P);
  const simd::Kernels& kernels = simd::kernels();
  at::parallel_for(0, R * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i % P;
      kernels.gae_walk_chunk(rows[i / P], p, bound(k), bound(k + 1), stream, &x0[i], &prod[i]);
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
      kernels.gae_fix_chunk(rows[i / P], p, bound(k), bound(k + 1), carry[i]);
    }
  });
}

}  // namespace rlkernels::cpu::gae_rows
