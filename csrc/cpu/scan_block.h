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

#include "rlkernels/scan.h"
#include "scan_types.h"
#include "simd.h"

namespace rlkernels {
inline namespace RLK_ISA {

using namespace ::rlkernels::cpu;  // the types shared by every instruction-set build

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
  ScanParams<V> p;
  p.gamma = scalar_params.gamma;
  p.lam = scalar_params.lam;
  p.rho_clip = scalar_params.rho_clip;
  p.c_clip = scalar_params.c_clip;
  p.pg_rho_clip = scalar_params.pg_rho_clip;
  p.has_next = scalar_params.has_next;

  C carry[H][D];
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < D; ++j) {
      if constexpr (kSymbolic) {
        carry[h][j].c = V::load(carry_io + (j * (D + 1)) * kLanes + h * N);
        for (int i = 0; i < D; ++i) carry[h][j].k[i] = V::load(carry_io + (j * (D + 1) + 1 + i) * kLanes + h * N);
      } else {
        carry[h][j] = V::load(carry_io + j * kLanes + h * N);
      }
    }
  }
  for (int kk = 0; kk < kn; ++kk) {
    for (int h = 0; h < H; ++h) {
      const int row = kk * kLanes + h * N;
      StepIn<V> in;
      in.r = V::load(src[kR] + row);
      in.v = V::load(src[kV] + row);
      in.nv = V::load(src[kNV] + row);
      in.lr = V::load(src[kLR] + row);
      in.a = V::load(src[kA] + row);
      in.b = V::load(src[kB] + row);
      in.term = V::load(src[kTerm] + row);
      in.trunc = V::load(src[kTrunc] + row);
      in.valid = V::load(src[kMask] + row);
      in.g0 = V::load(src[kG0] + row);
      in.g1 = V::load(src[kG1] + row);
      in.s0 = V::load(src[kS0] + row);
      in.s1 = V::load(src[kS1] + row);
      C c[D];
      C o[Step::kOut];
      for (int j = 0; j < D; ++j) c[j] = carry[h][j];
      Step::step(p, in, c, o);
      // Invalid steps (masked, or past a lane's end) keep the carry and write 0.
      for (int j = 0; j < D; ++j) carry[h][j] = select(in.valid, c[j], carry[h][j]);
      if constexpr (!kSymbolic) {
        for (int j = 0; j < Step::kOut; ++j)
          select(in.valid, o[j], V(acc_t(0))).store(obuf + j * kBlock * kLanes + row);
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < D; ++j) {
      if constexpr (kSymbolic) {
        carry[h][j].c.store(carry_io + (j * (D + 1)) * kLanes + h * N);
        for (int i = 0; i < D; ++i) carry[h][j].k[i].store(carry_io + (j * (D + 1) + 1 + i) * kLanes + h * N);
      } else {
        carry[h][j].store(carry_io + j * kLanes + h * N);
      }
    }
  }
}

// run_block without the buffers: a time-major group reads its inputs in place and writes its outputs in
// place, one vector load or store per stream and lane vector, flags widened in registers. The kind switch of
// each stream is the same at every step (predicted), and streams a step never reads are dropped as dead code.
template <class Step, typename acc_t, bool kSymbolic>
void run_direct(const ScanParams<acc_t>& scalar_params, const DirectStreams& ds, int64_t off0, int64_t step,
                int64_t kn, acc_t* carry_io, acc_t* const* out) {
  constexpr int N = RLK_VEC_BYTES / sizeof(acc_t) < kLanes ? RLK_VEC_BYTES / sizeof(acc_t) : kLanes;
  constexpr int H = kLanes / N;
  using V = Vec<acc_t, N>;
  using native = typename V::native;
  typedef unsigned char bytes __attribute__((vector_size(N)));
  constexpr int D = Step::kCarry;
  using C = std::conditional_t<kSymbolic, Affine<V, D>, V>;
  ScanParams<V> p;
  p.gamma = scalar_params.gamma;
  p.lam = scalar_params.lam;
  p.rho_clip = scalar_params.rho_clip;
  p.c_clip = scalar_params.c_clip;
  p.pg_rho_clip = scalar_params.pg_rho_clip;
  p.has_next = scalar_params.has_next;

  auto load = [&](int s, int64_t off) -> V {
    switch (ds.kind[s]) {
      case 1:
        return V::load(static_cast<const acc_t*>(ds.p[s]) + off);
      case 2: {
        bytes b;
        __builtin_memcpy(&b, static_cast<const unsigned char*>(ds.p[s]) + off, sizeof(b));
        const native f = __builtin_convertvector(b, native);
        return V::from(f != acc_t(0) ? native{} + acc_t(1) : native{});  // nonzero means set
      }
      default:
        return V(acc_t(s == kMask ? 1 : 0));
    }
  };

  C carry[H][D];
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < D; ++j) {
      if constexpr (kSymbolic) {
        carry[h][j].c = V::load(carry_io + (j * (D + 1)) * kLanes + h * N);
        for (int i = 0; i < D; ++i) carry[h][j].k[i] = V::load(carry_io + (j * (D + 1) + 1 + i) * kLanes + h * N);
      } else {
        carry[h][j] = V::load(carry_io + j * kLanes + h * N);
      }
    }
  }
  for (int64_t kk = 0; kk < kn; ++kk) {
    for (int h = 0; h < H; ++h) {
      const int64_t off = off0 + kk * step + h * N;
      StepIn<V> in;
      in.r = load(kR, off);
      in.v = load(kV, off);
      in.nv = load(kNV, off);
      in.lr = load(kLR, off);
      in.a = load(kA, off);
      in.b = load(kB, off);
      in.term = load(kTerm, off);
      in.trunc = load(kTrunc, off);
      in.valid = load(kMask, off);
      in.g0 = load(kG0, off);
      in.g1 = load(kG1, off);
      in.s0 = load(kS0, off);
      in.s1 = load(kS1, off);
      C c[D];
      C o[Step::kOut];
      for (int j = 0; j < D; ++j) c[j] = carry[h][j];
      Step::step(p, in, c, o);
      for (int j = 0; j < D; ++j) carry[h][j] = select(in.valid, c[j], carry[h][j]);
      if constexpr (!kSymbolic) {
        for (int j = 0; j < Step::kOut; ++j)
          if (out[j] != nullptr) select(in.valid, o[j], V(acc_t(0))).store(out[j] + off);
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < D; ++j) {
      if constexpr (kSymbolic) {
        carry[h][j].c.store(carry_io + (j * (D + 1)) * kLanes + h * N);
        for (int i = 0; i < D; ++i) carry[h][j].k[i].store(carry_io + (j * (D + 1) + 1 + i) * kLanes + h * N);
      } else {
        carry[h][j].store(carry_io + j * kLanes + h * N);
      }
    }
  }
}

template <typename acc_t>
DirectFn<acc_t> direct_function(StepId id, bool symbolic) {
#define RLK_DIRECT(STEP) symbolic ? &run_direct<STEP, acc_t, true> : &run_direct<STEP, acc_t, false>
  switch (id) {
    case StepId::kLinearScan: return RLK_DIRECT(LinearScanStep);
    case StepId::kDiscountedReturns: return RLK_DIRECT(DiscountedReturnsStep);
    case StepId::kDiscountedReturnsBackward: return RLK_DIRECT(DiscountedReturnsBackwardStep);
    case StepId::kGae: return RLK_DIRECT(GaeStep);
    case StepId::kGaeBackward: return RLK_DIRECT(GaeBackwardStep);
    case StepId::kVtrace: return RLK_DIRECT(VtraceStepT<VecExp>);
    case StepId::kVtraceBackward: return RLK_DIRECT(VtraceBackwardStepT<VecExp>);
  }
#undef RLK_DIRECT
  return nullptr;
}

template <typename acc_t>
BlockFn<acc_t> block_function(StepId id, bool symbolic) {
#define RLK_BLOCK(STEP) symbolic ? &run_block<STEP, acc_t, true> : &run_block<STEP, acc_t, false>
  switch (id) {
    case StepId::kLinearScan: return RLK_BLOCK(LinearScanStep);
    case StepId::kDiscountedReturns: return RLK_BLOCK(DiscountedReturnsStep);
    case StepId::kDiscountedReturnsBackward: return RLK_BLOCK(DiscountedReturnsBackwardStep);
    case StepId::kGae: return RLK_BLOCK(GaeStep);
    case StepId::kGaeBackward: return RLK_BLOCK(GaeBackwardStep);
    case StepId::kVtrace: return RLK_BLOCK(VtraceStepT<VecExp>);
    case StepId::kVtraceBackward: return RLK_BLOCK(VtraceBackwardStepT<VecExp>);
  }
#undef RLK_BLOCK
  return nullptr;
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
      rlkernels::cpu::StepId, bool);
