// The CPU scan engine: walks sequences with an estimator's step function (csrc/include/rlkernels/scan.h).
//
// Layout. Every input is a canonical contiguous tensor: [O, T, I] (sequence s = (o, i), element t at
// o*T*I + t*I + i) or 1-D packed with cu_seqlens (segment s = [cu[s], cu[s+1])). A "lane" is a run of
// time steps of one sequence: a whole sequence, or one chunk of a long one.
//
// Lanes are walked kLanes at a time in lockstep. Each block of kBlock steps is first loaded into small
// lane-contiguous buffers in the accumulation type (dtype conversion, flags to 0/1, the mask and the
// lanes' ragged ends folded into `valid`), then the step runs over the buffers with the lane loop innermost
// (the loop the compiler vectorizes), then outputs are stored back. The time-major layout loads whole
// vectors of adjacent sequences; the batch-major layout transposes through the buffer.
//
// Long sequences (few sequences, many steps) are cut into chunks of kChunk steps that run as independent
// lanes: pass 1 runs each chunk with a symbolic carry (Affine) to get the chunk's map, pass 2 composes the
// maps along each sequence (a few numbers per chunk), pass 3 re-runs each chunk with its true carry.
// Time-major problems with narrow rows are cut the same way on CPUs whose prefetcher completes line pairs
// (kSplitElements), so that threads walk disjoint runs of time. Chunking depends only on the shape and the
// CPU, never on the thread count, so results are bit-identical run to run and for any number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "alloc.h"

#include "isa.h"
#include "rlkernels/scan.h"
#include "scan_types.h"

namespace rlkernels {

// The compute blocks of each instruction-set build (csrc/cpu/scan_block_*.cpp).
#define RLK_DECLARE_BLOCKS(ISA)                                                     \
  namespace ISA {                                                                   \
  template <typename acc_t>                                                         \
  cpu::BlockFn<acc_t> block_function(cpu::StepId id, bool symbolic);                \
  template <typename acc_t>                                                         \
  cpu::DirectFn<acc_t> direct_function(cpu::StepId id, bool symbolic, uint32_t present);            \
  template <typename acc_t>                                                         \
  cpu::TransposedFn<acc_t> transposed_function(cpu::StepId id, bool symbolic, uint32_t present);    \
  }
RLK_DECLARE_BLOCKS(isa_default)
#if defined(__x86_64__) && defined(__GNUC__)
RLK_DECLARE_BLOCKS(isa_avx2)
RLK_DECLARE_BLOCKS(isa_avx512)
#endif
#undef RLK_DECLARE_BLOCKS

inline namespace RLK_ISA {
using namespace ::rlkernels::cpu;

// The blocks of the instruction set in effect (isa.h: detection and the RLKERNELS_CPU_ISA cap), read per call.
template <typename acc_t>
BlockFn<acc_t> pick_block(StepId id, bool symbolic) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (::rlkernels::cpu::cpu_isa_level()) {
    case 2: return isa_avx512::block_function<acc_t>(id, symbolic);
    case 1: return isa_avx2::block_function<acc_t>(id, symbolic);
    default: break;
  }
#endif
  return isa_default::block_function<acc_t>(id, symbolic);
}

template <typename acc_t>
DirectFn<acc_t> pick_direct(StepId id, bool symbolic, uint32_t present) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (::rlkernels::cpu::cpu_isa_level()) {
    case 2: return isa_avx512::direct_function<acc_t>(id, symbolic, present);
    case 1: return isa_avx2::direct_function<acc_t>(id, symbolic, present);
    default: break;
  }
#endif
  return isa_default::direct_function<acc_t>(id, symbolic, present);
}

template <typename acc_t>
TransposedFn<acc_t> pick_transposed(StepId id, bool symbolic, uint32_t present) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (::rlkernels::cpu::cpu_isa_level()) {
    case 2: return isa_avx512::transposed_function<acc_t>(id, symbolic, present);
    case 1: return isa_avx2::transposed_function<acc_t>(id, symbolic, present);
    default: break;
  }
#endif
  return isa_default::transposed_function<acc_t>(id, symbolic, present);
}

// How the in-place walks read a problem's inputs of dtype scalar_t (DirectKind): as acc_t, widened from
// bfloat16 or float16 to float as they load, or not at all (the buffered walk converts them).
template <typename scalar_t, typename acc_t>
constexpr DirectKind direct_kind() {
  if constexpr (std::is_same_v<scalar_t, acc_t>) return kAccValue;
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) return kBf16Value;
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) return kF16Value;
  return kNotInPlace;
}

// The in-place walks (no staging buffers).
template <typename acc_t>
struct InPlace {
  DirectFn<acc_t> direct = nullptr;          // time-major groups
  TransposedFn<acc_t> transposed = nullptr;  // lanes contiguous in time
};

// `present`: the problem's inputs (presence_of), which may pick a walk specialized for them.
template <typename scalar_t, typename acc_t>
InPlace<acc_t> pick_in_place(StepId id, bool symbolic, uint32_t present) {
  if constexpr (direct_kind<scalar_t, acc_t>() == kNotInPlace) return {};
  return {pick_direct<acc_t>(id, symbolic, present), pick_transposed<acc_t>(id, symbolic, present)};
}

// Outputs of at least this many bytes are written with streaming stores: half the L3 of one core complex
// of recent x86 server parts (16-32 MiB shared by its cores); sysconf's L3 size is the whole socket's.
constexpr int64_t kStreamOutBytes = int64_t(16) << 20;

// Whether outputs of `bytes` bytes are written with streaming stores: from kStreamOutBytes on, unless
// RLKERNELS_STREAMING_STORES=0 (never) or =always (at any size: how the tests reach that path).
inline bool streaming_stores_for(int64_t bytes) {
  const char* v = std::getenv("RLKERNELS_STREAMING_STORES");
  if (v != nullptr && std::string(v) == "0") return false;
  if (v != nullptr && std::string(v) == "always") return true;
  return bytes >= kStreamOutBytes;
}

constexpr int kTileGroups = 8;           // lane groups walked together (see walk_tile)
constexpr int kTileLanes = kTileGroups * kLanes;
constexpr int64_t kSerialElements = 1 << 15;  // below this, no threads
// Time-major rows narrower than kNarrowRowBytes on a CPU whose prefetcher completes line pairs (isa.h): threads
// that split such rows between them write lines a few hundred bytes apart at every step, and on the Intel
// machines of docs/performance.md the cores' prefetchers pulled each other's lines (two threads took twice one
// thread's time up to [2048, 64] float32). There, from kSplitFromElements to kSplitBelowElements elements (and
// from kSplitFromElements on for rows of one line pair, a single tile), threads split time instead: the
// sequences are chunked every kSplitElements elements (pass 1's inputs then stay in a core's L2 for pass 3).
// The passes cost one thread a quarter to a half more; two threads save a fifth (docs/performance.md). Smaller
// problems stay on one thread; larger ones split their rows into tiles of whole line pairs, which beat the
// passes there.
// On the AMD machines threads split the rows at every size (cold inputs).
constexpr int64_t kNarrowRowBytes = 1024;
constexpr int64_t kSplitElements = int64_t(1) << 15;
constexpr int64_t kSplitFromElements = int64_t(1) << 17;
constexpr int64_t kSplitBelowElements = int64_t(1) << 18;
constexpr int64_t kChunk = 4096;           // steps per chunk of a long sequence
constexpr int64_t kChunkMinSteps = 16384;  // shorter sequences are walked whole
constexpr int64_t kChunkMaxSeqs = 256;     // with more sequences than this, lanes are already plentiful
constexpr int64_t kByChunkSeqs = 4;         // time-major chunks are grouped by chunk from this many sequences on
constexpr int64_t kWindowChunks = 64;      // chunks per window of the chunked passes (~2.4 MB of fp32 GAE inputs)

enum class Kind : uint8_t { kNone, kScalar, kFlag, kAcc };

// One scan problem: typed stream pointers sharing the canonical layout, and up to four outputs.
template <typename acc_t>
struct Problem {
  const void* in[kNumStreams] = {};
  Kind kind[kNumStreams] = {};
  acc_t* out[4] = {};
  // Geometry.
  int64_t outer = 1, steps = 0, inner = 1;  // dense [O, T, I]
  const int64_t* cu_seqlens = nullptr;      // packed: segment offsets, num_seqs + 1 of them
  int64_t num_seqs = 0;

  void set(Stream s, const void* p, Kind k) {
    in[s] = p;
    kind[s] = p ? k : Kind::kNone;
  }
  int64_t time_stride() const { return cu_seqlens ? 1 : inner; }
  // The streams as the in-place walks read them (DirectKind), kScalar ones as `scalar_kind`.
  DirectStreams direct_streams(DirectKind scalar_kind) const {
    DirectStreams ds;
    for (int s = 0; s < kNumStreams; ++s) {
      ds.p[s] = in[s];
      ds.kind[s] = kind[s] == Kind::kFlag     ? kFlagByte
                   : kind[s] == Kind::kNone   ? kAbsent
                   : kind[s] == Kind::kScalar ? scalar_kind
                                              : kAccValue;
    }
    return ds;
  }
  int64_t seq_base(int64_t s) const { return cu_seqlens ? cu_seqlens[s] : (s / inner) * steps * inner + s % inner; }
  int64_t seq_len(int64_t s) const { return cu_seqlens ? cu_seqlens[s + 1] - cu_seqlens[s] : steps; }
};

// Requests `count` consecutive elements at element offset `i` of an input of kind `kind` into the cache.
template <typename scalar_t, typename acc_t>
inline void prefetch_bytes(const void* p, int64_t byte_offset, int64_t bytes) {
  const char* base = static_cast<const char*>(p) + byte_offset;
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + b);
}

struct Lane {
  int64_t base;   // element offset of the sequence's t = 0
  int64_t begin;  // first time step of the lane
  int64_t len;    // number of steps
};

template <Kind K, typename scalar_t, typename acc_t>
inline acc_t load_as(const void* p, int64_t i) {
  if constexpr (K == Kind::kScalar) return static_cast<acc_t>(static_cast<const scalar_t*>(p)[i]);
  if constexpr (K == Kind::kFlag) return static_cast<acc_t>(static_cast<const uint8_t*>(p)[i] != 0);
  if constexpr (K == Kind::kAcc) return static_cast<const acc_t*>(p)[i];
  return acc_t(1);  // kNone is only loaded for the mask: every in-range step is valid
}

#if defined(__SSE2__)
// 16 one-byte flags to 16 values 1 (flag set) or 0: each byte's compare with 0 widened to its lane's mask by
// unpacking it with itself, then ANDed with 1.0's bits.
template <typename acc_t>
inline void flags_to_ones(acc_t* __restrict row, const uint8_t* flags) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(flags));
  const __m128i set = _mm_xor_si128(_mm_cmpeq_epi8(b, _mm_setzero_si128()), _mm_set1_epi8(-1));
  const __m128i w[2] = {_mm_unpacklo_epi8(set, set), _mm_unpackhi_epi8(set, set)};
  __m128i d[4];
  for (int h = 0; h < 2; ++h) d[2 * h] = _mm_unpacklo_epi16(w[h], w[h]), d[2 * h + 1] = _mm_unpackhi_epi16(w[h], w[h]);
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m128i one = _mm_castps_si128(_mm_set1_ps(1.0f));
    for (int i = 0; i < 4; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 4 * i), _mm_and_si128(d[i], one));
  } else {
    static_assert(std::is_same_v<acc_t, double>);
    const __m128i one = _mm_castpd_si128(_mm_set1_pd(1.0));
    for (int i = 0; i < 4; ++i) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 4 * i), _mm_and_si128(_mm_unpacklo_epi32(d[i], d[i]), one));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 4 * i + 2),
                       _mm_and_si128(_mm_unpackhi_epi32(d[i], d[i]), one));
    }
  }
}
#endif

// The rows of a time-major group into a block buffer: row kk (of kn) is kLanes values of input p from element
// off0 + kk * step on, converted to acc_t; a row that would pass the input's end (`extent` elements) loads its
// group's n values and zeros. Values, not captures, so that GCC keeps them in registers and vectorizes the rows.
template <Kind K, typename scalar_t, typename acc_t>
__attribute__((noinline)) void load_rows(acc_t* __restrict dst, const void* p, int64_t off0, int64_t step, int kn,
                                         int n, int64_t extent) {
  for (int kk = 0; kk < kn; ++kk) {
    const int64_t off = off0 + kk * step;
    acc_t* __restrict row = dst + kk * kLanes;
    if (off + kLanes > extent) {
      for (int l = 0; l < kLanes; ++l) row[l] = l < n ? load_as<K, scalar_t, acc_t>(p, off + l) : acc_t(0);
    } else if constexpr ((K == Kind::kScalar && std::is_same_v<scalar_t, acc_t>) || K == Kind::kAcc) {
      std::memcpy(row, static_cast<const acc_t*>(p) + off, kLanes * sizeof(acc_t));
    } else if constexpr (K == Kind::kFlag) {  // on vectors: GCC turns the per-element form into branches
#if defined(__SSE2__)
      // (the vector-extension form below is lowered byte by byte, a test and setne each, without SSE4.1's
      // pmovzx: this engine's walks are built for the baseline instruction set)
      if constexpr (kLanes == 16) {
        flags_to_ones(row, static_cast<const uint8_t*>(p) + off);
        continue;
      }
#endif
      typedef uint8_t Bytes __attribute__((vector_size(kLanes)));
      typedef int32_t Ints __attribute__((vector_size(kLanes * 4)));
      typedef acc_t Accs __attribute__((vector_size(kLanes * sizeof(acc_t))));
      Bytes b;
      std::memcpy(&b, static_cast<const uint8_t*>(p) + off, kLanes);
      const Accs v = __builtin_convertvector(-(__builtin_convertvector(b, Ints) != 0), Accs);  // 1 or 0
      std::memcpy(row, &v, sizeof(v));
    } else {
      for (int l = 0; l < kLanes; ++l) row[l] = load_as<K, scalar_t, acc_t>(p, off + l);
    }
  }
}

// The first n values of each of kn buffer rows to out from element off0 + kk * step on.
template <typename acc_t>
__attribute__((noinline)) void store_rows(acc_t* __restrict out, const acc_t* __restrict ob, int64_t off0, int64_t step,
                                          int kn, int n) {
  for (int kk = 0; kk < kn; ++kk) {
    acc_t* __restrict o = out + off0 + kk * step;
    const acc_t* __restrict b = ob + kk * kLanes;
    if (n == kLanes) {
      std::memcpy(o, b, kLanes * sizeof(acc_t));
    } else {  // fixed-size copies of 4 (a memcpy of a run-time size is a library call a row)
      int l = 0;
      for (; l + 4 <= n; l += 4) std::memcpy(o + l, b + l, 4 * sizeof(acc_t));
      for (; l < n; ++l) o[l] = b[l];
    }
  }
}

// Walks a tile of up to kTileGroups groups of kLanes lanes, `reverse` in time, through the block function
// `block`. All groups advance one block of kBlock steps at a time, so in the time-major layout each step
// reads one contiguous run of kTileGroups * kLanes values per input: long runs keep the hardware
// prefetchers busy, where one 64-byte segment per row would leave every load waiting on DRAM.
// `carry` holds group g's carries at g * carry_size: [kCarry][kLanes] values, or with `symbolic` the
// lanes' chunk maps [kCarry][kCarry + 1][kLanes] (then nothing is stored).
// `stream_out`: the in-place transposed walk writes its outputs with streaming stores.
template <class Step, typename scalar_t, typename acc_t>
void walk_tile(const Problem<acc_t>& pb, const ScanParams<acc_t>& params, BlockFn<acc_t> block,
               InPlace<acc_t> in_place, bool symbolic, const Lane* lanes, int num_lanes, bool reverse, acc_t* carry,
               int carry_size, bool stream_out) {
  alignas(64) acc_t buf[kNumStreams][kBlock * kLanes];
  alignas(64) acc_t obuf[kMaxOut][kBlock * kLanes];
  static const acc_t kZeros[kBlock * kLanes] = {};
  const acc_t* src[kNumStreams];
  for (int s = 0; s < kNumStreams; ++s) src[s] = (pb.in[s] || s == kMask) ? buf[s] : kZeros;

  const int64_t ts = pb.time_stride();
  const int groups = (num_lanes + kLanes - 1) / kLanes;
  int64_t group_len[kTileGroups] = {};
  int group_n[kTileGroups] = {};  // the group's lanes, less empty ones at its end (run_scan's padding)
  bool contiguous[kTileGroups] = {};
  for (int g = 0; g < groups; ++g) {
    const Lane* gl = lanes + g * kLanes;
    int n = std::min(kLanes, num_lanes - g * kLanes);
    while (n > 1 && gl[n - 1].len == 0) --n;
    group_n[g] = n;
    // Time-major fast path: n adjacent sequences with the same span load one row of kLanes values per step
    // (whole vectors). With fewer sequences than lanes (a few environments) the lanes past n then hold the next
    // sequences' or steps' values wherever the input extends that far: computed, never stored (lanes are
    // independent; a group's carries and outputs are its first n lanes'); only the last rows, where a row of
    // kLanes would pass the input's end, load n values and zeros.
    bool same = ts != 1;
    for (int l = 0; l < n; ++l) {
      group_len[g] = std::max(group_len[g], gl[l].len);
      if (l > 0) same = same && gl[l].base == gl[0].base + l && gl[l].begin == gl[0].begin && gl[l].len == gl[0].len;
    }
    contiguous[g] = same;
  }
  const int64_t max_len = *std::max_element(group_len, group_len + groups);
  const int64_t extent = pb.outer * pb.steps * pb.inner;  // elements of each input (dense: ts != 1)
  // A tile of one group narrower than kLanes walked lane by lane (contiguous in time, e.g. one sequence): its
  // buffers' unused lanes are zeroed once here instead of at every block.
  const bool zeroed = groups == 1 && num_lanes < kLanes && !contiguous[0];
  if (zeroed) {
    for (int s = 0; s < kNumStreams; ++s)
      if (pb.in[s] || s == kMask) std::fill(buf[s], buf[s] + kBlock * kLanes, acc_t(0));
  }
  // Contiguous groups skip the buffers where the in-place walks read every input (in_place_layout).
  const DirectStreams ds = pb.direct_streams(direct_kind<scalar_t, acc_t>());
  acc_t* const no_out[kMaxOut] = {};
  if (!in_place_layout(ds)) in_place = {};

  auto prefetch = [](const void* p, Kind kind, int64_t i, int64_t count) {
    const int64_t size = kind == Kind::kScalar ? sizeof(scalar_t) : kind == Kind::kFlag ? 1 : sizeof(acc_t);
    if (p) prefetch_bytes<scalar_t, acc_t>(p, i * size, count * size);
  };
  auto time_of = [reverse](const Lane& lane, int64_t k) {
    return reverse ? lane.begin + lane.len - 1 - k : lane.begin + k;
  };

  // Lanes contiguous in time need no interleaving of groups: a group whose lanes all have at least `whole`
  // steps walks them in one call (per-call set-up amortized over thousands of steps, not kBlock), and only
  // the ragged rest goes block by block below.
  int64_t walked[kTileGroups] = {};
  if (in_place.transposed != nullptr && ts == 1) {
    for (int g = 0; g < groups; ++g) {
      const Lane* gl = lanes + g * kLanes;
      if (num_lanes - g * kLanes < kLanes) continue;
      int64_t shortest = gl[0].len;
      for (int l = 1; l < kLanes; ++l) shortest = std::min(shortest, gl[l].len);
      const int64_t whole = shortest / kBlock * kBlock;
      if (whole == 0) continue;
      int64_t lane_off[kLanes];
      for (int l = 0; l < kLanes; ++l) lane_off[l] = gl[l].base + time_of(gl[l], 0);
      in_place.transposed(params, ds, lane_off, reverse ? -1 : 1, whole, carry + g * carry_size,
                          symbolic ? no_out : pb.out, stream_out);
      walked[g] = whole;
    }
  }

  for (int64_t k0 = 0; k0 < max_len; k0 += kBlock) {
    for (int g = 0; g < groups; ++g) {
      if (k0 >= group_len[g] || k0 < walked[g]) continue;
      const Lane* gl = lanes + g * kLanes;
      const int n = group_n[g];
      const int kn = static_cast<int>(std::min<int64_t>(kBlock, group_len[g] - k0));
      // (the direct walk requests its rows ahead itself; a group of fewer than kLanes sequences reads whole rows
      // of kLanes values, so its last rows, which would pass the inputs' end, go through the buffers)
      if (in_place.direct != nullptr && contiguous[g] &&
          (n == kLanes ||
           gl[0].base + std::max(time_of(gl[0], k0), time_of(gl[0], k0 + kn - 1)) * ts + kLanes <= extent)) {
        in_place.direct(params, ds, gl[0].base + time_of(gl[0], k0) * ts, reverse ? -ts : ts, kn, n,
                        carry + g * carry_size, symbolic ? no_out : pb.out);
        continue;
      }
      // Load, converting to acc_t; flags become 0/1; steps past a lane's end are invalid.
      for (int s = 0; s < kNumStreams; ++s) {
        if (!pb.in[s] && s != kMask) continue;
        auto load = [&]<Kind K>() {
          acc_t* __restrict dst = buf[s];
          const void* p = pb.in[s];
          if (contiguous[g]) {
            // The next block's rows are requested now, so DRAM serves many rows at once instead of one
            // miss per 64-byte segment at a time.
            const int64_t ahead = std::min<int64_t>(kBlock, group_len[g] - k0 - kBlock);
            for (int kk = 0; kk < ahead; ++kk)
              prefetch(p, K, gl[0].base + time_of(gl[0], k0 + kBlock + kk) * ts, kLanes);
            load_rows<K, scalar_t, acc_t>(dst, p, gl[0].base + time_of(gl[0], k0) * ts, reverse ? -ts : ts, kn, n,
                                          n == kLanes ? std::numeric_limits<int64_t>::max() : extent);
            return;
          }
          for (int l = 0; l < (zeroed ? n : kLanes); ++l) {
            const int64_t m = l < n ? std::max<int64_t>(0, std::min<int64_t>(kn, gl[l].len - k0)) : 0;
            const int64_t ahead = l < n ? std::min<int64_t>(kBlock, gl[l].len - k0 - kBlock) : 0;
            if (ahead > 0) {
              const int64_t t_a = time_of(gl[l], k0 + kBlock), t_b = time_of(gl[l], k0 + kBlock + ahead - 1);
              prefetch(p, K, gl[l].base + std::min(t_a, t_b) * ts, ts == 1 ? ahead : 1);
            }
            int kk = 0;
            for (; kk < m; ++kk)
              dst[kk * kLanes + l] = load_as<K, scalar_t, acc_t>(p, gl[l].base + time_of(gl[l], k0 + kk) * ts);
            for (; kk < kn; ++kk) dst[kk * kLanes + l] = acc_t(0);
          }
        };
        switch (pb.kind[s]) {
          case Kind::kScalar: load.template operator()<Kind::kScalar>(); break;
          case Kind::kFlag: load.template operator()<Kind::kFlag>(); break;
          case Kind::kAcc: load.template operator()<Kind::kAcc>(); break;
          default: load.template operator()<Kind::kNone>(); break;  // an absent mask: 1 inside the lanes
        }
      }
      block(params, src, kn, carry + g * carry_size, obuf[0]);
      if (symbolic) continue;
      // Store.
      for (int j = 0; j < Step::kOut; ++j) {
        acc_t* __restrict out = pb.out[j];
        if (!out) continue;
        const acc_t* __restrict ob = obuf[j];
        if (contiguous[g]) {
          const int64_t ahead = std::min<int64_t>(kBlock, group_len[g] - k0 - kBlock);
          for (int kk = 0; kk < ahead; ++kk)
            __builtin_prefetch(out + gl[0].base + time_of(gl[0], k0 + kBlock + kk) * ts, 1);
          store_rows(out, ob, gl[0].base + time_of(gl[0], k0) * ts, reverse ? -ts : ts, kn, n);
        } else {
          for (int l = 0; l < n; ++l) {
            const int64_t m = std::min<int64_t>(kn, gl[l].len - k0);
            for (int kk = 0; kk < m; ++kk) out[gl[l].base + time_of(gl[l], k0 + kk) * ts] = ob[kk * kLanes + l];
          }
        }
      }
    }
  }
}

// Runs `Step` over every sequence of `pb`. `init[j * num_seqs + s]` is sequence s's initial carry j
// (nullptr: zeros); the final carries are written to `final_carry` the same way when it is not null.
//
// Chunked sequences (few and long) take three passes: each chunk's map (pass 1), the maps composed along the
// sequence (pass 2), each chunk walked with its true carry (pass 3). With more than kWindowChunks chunks the
// passes run window by window in scan order, so pass 3 re-reads a window's inputs from the cache pass 1 just
// filled instead of from DRAM: one sequence of millions of steps reads its inputs from memory once, not twice.
//
// Inputs of kind kScalar are scalar_t; 16-bit ones are widened to float as the walks load them (in registers,
// or into the staging buffers), never copied whole.
template <class Step, typename scalar_t, typename acc_t>
void run_scan(StepId id, const Problem<acc_t>& pb, const ScanParams<acc_t>& params, bool reverse, const acc_t* init,
              acc_t* final_carry) {
  constexpr int D = Step::kCarry;
  static_assert(D <= kMaxCarry && Step::kOut <= kMaxOut, "raise kMaxCarry / kMaxOut");
  const int64_t num_seqs = pb.num_seqs;
  if (num_seqs == 0) return;
  // Small problems stay on the calling thread: waking the pool costs more than they take.
  const int64_t elements = pb.cu_seqlens ? pb.steps : num_seqs * pb.steps;
  const bool time_major = pb.time_stride() != 1;
  const bool narrow = time_major && pb.time_stride() * int64_t(sizeof(acc_t)) < kNarrowRowBytes &&
                      cpu_prefetches_line_pairs();
  const bool long_seqs = !pb.cu_seqlens && pb.steps >= kChunkMinSteps && num_seqs <= kChunkMaxSeqs;
  const bool split = !pb.cu_seqlens && !long_seqs && narrow && elements >= kSplitFromElements &&
                     (elements < kSplitBelowElements || pb.time_stride() * sizeof(acc_t) <= kOutputAlign);
  const bool chunked = long_seqs || split;
  const int64_t chunk_steps = long_seqs ? kChunk : split ? (kSplitElements + num_seqs - 1) / num_seqs : pb.steps;
  const int64_t chunks = chunked ? (pb.steps + chunk_steps - 1) / chunk_steps : 1;
  // Lanes: lane q = s * chunks + c is chunk c of sequence s, except in the time-major layout with up to
  // kWindowChunks chunks and at least kByChunkSeqs sequences, where q = c * seq_stride + s (`by_chunk`): then a
  // group's lanes are adjacent sequences at the same steps, which load whole rows, and a tile is one chunk's rows
  // (or an equal part of them), so threads walk disjoint runs of time. seq_stride pads the sequences to whole
  // tiles; the padding lanes are empty. (With fewer sequences, a group of one sequence's chunks, loaded lane by
  // lane, uses more of its 16 lanes: `[16384, 2]` takes 1.6 times as long by chunk; docs/performance.md.)
  const bool by_chunk = chunked && time_major && chunks <= kWindowChunks && num_seqs >= kByChunkSeqs;
  int64_t chunk_tile_groups = 0, seq_stride = num_seqs;
  if (by_chunk) {
    const int64_t groups = (num_seqs + kLanes - 1) / kLanes;
    const int64_t tiles = (groups + kTileGroups - 1) / kTileGroups;
    chunk_tile_groups = (groups + tiles - 1) / tiles;
    // whole 128-byte line pairs per tile where the prefetcher completes pairs (see walk_lanes)
    if (tiles > 1 && sizeof(acc_t) * kLanes < kOutputAlign && chunk_tile_groups % 2 == 1 &&
        cpu_prefetches_line_pairs())
      ++chunk_tile_groups;
    seq_stride = tiles * chunk_tile_groups * kLanes;
  }
  const int64_t num_lanes = by_chunk ? chunks * seq_stride : num_seqs * chunks;
  // Packed sequences (never chunked) of several lane groups are laid in lanes by length, longest first
  // (`order[q]` the sequence of lane q, `rank` its inverse): a group's lanes are walked in place for as many
  // steps as its shortest has, and its longer lanes' rest through the buffers, so groups of similar lengths
  // walk most of their steps in place (docs/performance.md). The full groups then alternate between the
  // longest and the shortest left, so that the threads' shares of tiles (contiguous runs) carry similar work;
  // the group of the shortest remainder, if partial, comes last. Lanes are independent: no value changes.
  std::vector<int64_t> order, rank;
  if (pb.cu_seqlens && num_seqs > kLanes) {
    std::vector<int64_t> by_len(num_seqs);
    for (int64_t s = 0; s < num_seqs; ++s) by_len[s] = s;
    std::stable_sort(by_len.begin(), by_len.end(),
                     [&](int64_t a, int64_t b) { return pb.seq_len(a) > pb.seq_len(b); });
    const int64_t full = num_seqs / kLanes;
    order.reserve(num_seqs);
    for (int64_t i = 0; i < full; ++i) {
      const int64_t g = i % 2 == 0 ? i / 2 : full - 1 - i / 2;
      order.insert(order.end(), by_len.begin() + g * kLanes, by_len.begin() + (g + 1) * kLanes);
    }
    order.insert(order.end(), by_len.begin() + full * kLanes, by_len.end());
    rank.resize(num_seqs);
    for (int64_t q = 0; q < num_seqs; ++q) rank[order[q]] = q;
  }
  auto lane_at = [&](int64_t s, int64_t c) {
    return !rank.empty() ? rank[s] : by_chunk ? c * seq_stride + s : s * chunks + c;
  };
  std::vector<uint8_t> whole(chunked ? num_seqs : 0, 0);  // sequences walked unchunked (see pass 2)
  auto lane_of = [&](int64_t q) {
    if (!order.empty()) {
      const int64_t s = order[q];
      return Lane{pb.seq_base(s), 0, pb.seq_len(s)};
    }
    const int64_t s = by_chunk ? q % seq_stride : q / chunks, c = by_chunk ? q / seq_stride : q % chunks;
    if (s >= num_seqs) return Lane{0, 0, 0};
    const int64_t len = pb.seq_len(s);
    if (!chunked) return Lane{pb.seq_base(s), 0, len};
    if (whole[s]) return Lane{pb.seq_base(s), 0, c == (reverse ? 0 : chunks - 1) ? len : 0};
    const int64_t begin = c * chunk_steps;
    return Lane{pb.seq_base(s), begin, std::min(chunk_steps, len - begin)};
  };
  // Outputs too big to stay in cache until something reads them: streaming stores write them without first
  // reading every line (for GAE, 17 bytes a step moved instead of 25).
  // RLKERNELS_STREAMING_STORES=0 keeps them in cache (for a caller that reads them back at once).
  const bool stream_out = streaming_stores_for(elements * Step::kOut * static_cast<int64_t>(sizeof(acc_t)));
  const BlockFn<acc_t> map_block = pick_block<acc_t>(id, /*symbolic=*/true);
  const uint32_t present = presence_of(pb.direct_streams(direct_kind<scalar_t, acc_t>()), params.has_next);
  const InPlace<acc_t> map_in_place = pick_in_place<scalar_t, acc_t>(id, true, present);
  const BlockFn<acc_t> block = pick_block<acc_t>(id, /*symbolic=*/false);
  const InPlace<acc_t> in_place = pick_in_place<scalar_t, acc_t>(id, false, present);
  using Map = Affine<acc_t, D>;

  // Walks n lanes, lane k being lane_of(lane_id(k)), in parallel tiles as wide as kTileGroups groups (narrower
  // when that would leave threads idle; lanes are independent, so the tiling never changes the results).
  // symbolic: maps[k * D + j] receives lane k's map; else carries[k * D + j] is lane k's carry in, and its carry
  // out afterwards.
  auto walk_lanes = [&](int64_t n_lanes, auto lane_id, bool symbolic, Map* maps, acc_t* carries) {
    const int64_t lane_groups = (n_lanes + kLanes - 1) / kLanes;
    int64_t tile_groups =
        by_chunk ? chunk_tile_groups
                 : std::clamp<int64_t>(lane_groups / (2 * std::max<int64_t>(1, at::get_num_threads())), 1, kTileGroups);
    // Tiles of whole 128-byte line pairs of a time-major row (outputs start on one, csrc/cpu/alloc.h) where the
    // prefetcher completes pairs: threads split the rows between tiles, and a pair written by two cores would
    // bounce between them at every step. Elsewhere tiles of single lines leave more tiles to share out.
    if (!by_chunk && sizeof(acc_t) * kLanes < kOutputAlign && tile_groups % 2 == 1 && lane_groups > 1 &&
        cpu_prefetches_line_pairs())
      ++tile_groups;
    const int64_t tile_lanes = tile_groups * kLanes;
    const int64_t tiles = (n_lanes + tile_lanes - 1) / tile_lanes;
    const bool serial = elements < kSerialElements || (narrow && !chunked && elements < kSplitBelowElements);
    const int64_t grain = serial ? std::max<int64_t>(tiles, 1) : 1;
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        Lane lanes[kTileLanes];
        const int64_t first = t * tile_lanes;
        const int n = static_cast<int>(std::min<int64_t>(tile_lanes, n_lanes - first));
        for (int l = 0; l < n; ++l) lanes[l] = lane_of(lane_id(first + l));
        if (symbolic) {
          // Seed each carry j with the identity form "carry_in[j]": form[g][j][1 + i][l] = (i == j).
          constexpr int kForm = D * (D + 1) * kLanes;
          alignas(64) acc_t form[kTileGroups][D][D + 1][kLanes] = {};
          for (int g = 0; g < kTileGroups; ++g)
            for (int j = 0; j < D; ++j)
              for (int l = 0; l < kLanes; ++l) form[g][j][1 + j][l] = acc_t(1);
          walk_tile<Step, scalar_t, acc_t>(pb, params, map_block, map_in_place, true, lanes, n, reverse,
                                           &form[0][0][0][0], kForm, false);
          for (int q = 0; q < n; ++q) {
            const int g = q / kLanes, l = q % kLanes;
            for (int j = 0; j < D; ++j) {
              Map& m = maps[(first + q) * D + j];
              m.c = form[g][j][0][l];
              for (int i = 0; i < D; ++i) m.k[i] = form[g][j][1 + i][l];
            }
          }
        } else {
          alignas(64) acc_t carry[kTileGroups][D][kLanes] = {};
          for (int q = 0; q < n; ++q)
            for (int j = 0; j < D; ++j) carry[q / kLanes][j][q % kLanes] = carries[(first + q) * D + j];
          walk_tile<Step, scalar_t, acc_t>(pb, params, block, in_place, false, lanes, n, reverse, &carry[0][0][0],
                                           D * kLanes, stream_out);
          for (int q = 0; q < n; ++q)
            for (int j = 0; j < D; ++j) carries[(first + q) * D + j] = carry[q / kLanes][j][q % kLanes];
        }
      }
    });
  };
  auto init_of = [&](int64_t s, int j) { return init ? init[j * num_seqs + s] : acc_t(0); };

  if (chunked && chunks > kWindowChunks) {
    // Windows of up to kWindowChunks chunks of every sequence, in scan order. carry[s * D + j]: the carry
    // entering sequence s's next window.
    std::vector<acc_t> carry(num_seqs * D);
    for (int64_t s = 0; s < num_seqs; ++s)
      for (int j = 0; j < D; ++j) carry[s * D + j] = init_of(s, j);
    std::vector<Map> maps(num_seqs * kWindowChunks * D);
    std::vector<acc_t> carry_in(num_seqs * kWindowChunks * D);
    bool finite = true;
    for (int64_t done = 0; done < chunks && finite; done += kWindowChunks) {
      const int64_t wn = std::min(kWindowChunks, chunks - done);
      const int64_t c_lo = reverse ? chunks - done - wn : done;  // the window's chunks [c_lo, c_lo + wn)
      auto lane_id = [&](int64_t k) { return (k / wn) * chunks + c_lo + k % wn; };
      walk_lanes(num_seqs * wn, lane_id, true, maps.data(), nullptr);
      for (int64_t s = 0; s < num_seqs && finite; ++s) {
        for (int64_t i = 0; i < wn; ++i) {  // i-th chunk of the window in scan order
          const int64_t k = s * wn + (reverse ? wn - 1 - i : i);
          const int64_t next = reverse ? k - 1 : k + 1;
          for (int j = 0; j < D; ++j) {
            carry_in[k * D + j] = i == 0 ? carry[s * D + j] : carry_in[k * D + j];
            finite = finite && std::isfinite(carry_in[k * D + j]);
          }
          if (i + 1 < wn)
            for (int j = 0; j < D; ++j) carry_in[next * D + j] = maps[k * D + j](&carry_in[k * D]);
        }
      }
      if (!finite) break;  // 0 * inf in a map would give NaN: start over with the whole-sequence walks below
      walk_lanes(num_seqs * wn, lane_id, false, nullptr, carry_in.data());
      for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t last = s * wn + (reverse ? 0 : wn - 1);  // the window's last chunk in scan order
        for (int j = 0; j < D; ++j) carry[s * D + j] = carry_in[last * D + j];
      }
    }
    if (finite) {
      if (final_carry)
        for (int64_t s = 0; s < num_seqs; ++s)
          for (int j = 0; j < D; ++j) final_carry[j * num_seqs + s] = carry[s * D + j];
      return;
    }
  }

  // carry_in[q * D + j]: the carry entering lane q.
  std::vector<acc_t> carry_in(num_lanes * D, acc_t(0));
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = lane_at(s, reverse ? chunks - 1 : 0);
    for (int j = 0; j < D; ++j) carry_in[first * D + j] = init_of(s, j);
  }
  auto every_lane = [](int64_t q) { return q; };
  if (chunked) {
    std::vector<Map> maps(num_lanes * D);
    walk_lanes(num_lanes, every_lane, true, maps.data(), nullptr);  // pass 1
    // Pass 2: compose along each sequence, in scan order. A chunk map's coefficients can underflow to 0
    // (e.g. (gamma lam)^4096), which is harmless for finite carries but would turn an infinite carry into
    // 0 * inf = NaN; a sequence whose carries stop being finite is walked whole instead, which propagates
    // Inf exactly as the sequential formula does.
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t i = 0; i + 1 < chunks; ++i) {
        const int64_t c = reverse ? chunks - 1 - i : i;
        const int64_t next = reverse ? c - 1 : c + 1;
        const int64_t q = lane_at(s, c);
        for (int j = 0; j < D; ++j) {
          if (!std::isfinite(carry_in[q * D + j])) whole[s] = 1;
          carry_in[lane_at(s, next) * D + j] = maps[q * D + j](&carry_in[q * D]);
        }
      }
      if (whole[s]) {
        const int64_t first = lane_at(s, reverse ? chunks - 1 : 0);
        const int64_t last = lane_at(s, reverse ? 0 : chunks - 1);
        for (int j = 0; j < D; ++j) carry_in[last * D + j] = carry_in[first * D + j];
      }
    }
  }
  // Pass 3 (the only pass when not chunked): walk every lane with its true carry, storing outputs.
  walk_lanes(num_lanes, every_lane, false, nullptr, carry_in.data());
  if (final_carry) {
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t q = lane_at(s, reverse ? 0 : chunks - 1);
      for (int j = 0; j < D; ++j) final_carry[j * num_seqs + s] = carry_in[q * D + j];
    }
  }
}

}  // namespace RLK_ISA
}  // namespace rlkernels
