// Per-element math of the reverse-scan family: one step function per estimator (forward) and per
// adjoint (backward). The engines (csrc/cpu/scan_engine.h, the CUDA kernels) walk sequences and call
// these; they own layout, masking and chunking, so nothing here knows about memory.
//
// Conventions shared by every step:
//  * `C` is the carry type: the accumulation type T for a concrete walk, or Affine<T, kCarry> when the
//    engine computes a chunk's map (see affine.h). Steps are affine in the carry by construction.
//  * Inputs arrive as T; flags are 0 or 1. The engine applies `valid` (mask and in-range): at an invalid
//    position the carry passes through unchanged and the outputs are 0, so steps ignore it.
//  * Forward steps run in reverse time (carry = state of the next valid position); backward steps run in
//    forward time (carry = adjoint flowing from the previous valid position).
//  * With next_values given, the wrapper marks the last valid step of each sequence as truncated, so
//    "bootstrap from V' at the last step" and "bootstrap from V' at a truncation" are one rule.
#pragma once

#include <type_traits>

#include "rlkernels/affine.h"

namespace rlkernels {

// Plain data, shared by the builds of every instruction set (no functions, so no ODR hazard).
template <typename T>
struct ScanParams {
  T gamma = T(0.99);
  T lam = T(1);
  T rho_clip = T(1);
  T c_clip = T(1);
  T pg_rho_clip = T(1);
  bool has_next = false;  // next_values given (else V'_t is the next valid value, or the bootstrap)
};

template <typename T>
struct StepIn {
  T r, v, nv, lr;        // rewards, values, next_values, log_rhos
  T a, b;                // linear_scan coefficients
  T term, trunc, valid;  // flags; valid = mask and inside the sequence
  T g0, g1;              // upstream gradients of the two forward outputs
  T s0, s1;              // carries saved by the forward (vtrace)
};

// The time direction an engine walks a step in: estimators in reverse time, their adjoints forwards, the
// linear scan either way.
enum class Walk : int { kReverse, kForward, kBoth };

inline namespace RLK_ISA {

// x_t = b_t + a_t * x_next. Carry: x of the neighbour in scan order.
struct LinearScanStep {
  static constexpr Walk kWalk = Walk::kBoth;
  static constexpr int kCarry = 1;
  static constexpr int kOut = 1;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>&, const StepIn<T>& in, C* carry, C* out) {
    C x = in.b + in.a * carry[0];
    carry[0] = x;
    out[0] = x;
  }
};

// G_t = r_t + gamma (1 - term_t) (trunc_t ? V'_t : G_next). Carry: G of the next valid step, initially
// the bootstrap value (or 0 with next_values, where the last step is a truncation).
struct DiscountedReturnsStep {
  static constexpr Walk kWalk = Walk::kReverse;
  static constexpr int kCarry = 1;
  static constexpr int kOut = 1;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    C next = p.has_next ? select(in.trunc, C(in.nv), carry[0]) : carry[0];
    C g = in.r + (p.gamma * (T(1) - in.term)) * next;
    carry[0] = g;
    out[0] = g;
  }
};

// Adjoint of DiscountedReturnsStep. Carry: d loss / d G_next seen from the previous valid step.
// Outputs: grad rewards, grad next_values. The final carry is the bootstrap value's gradient.
struct DiscountedReturnsBackwardStep {
  static constexpr Walk kWalk = Walk::kForward;
  static constexpr bool kAccInputsOnly = true;  // reads upstream gradients and flags only
  static constexpr int kCarry = 1;
  static constexpr int kOut = 2;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    T disc = p.gamma * (T(1) - in.term);
    C y = in.g0 + carry[0];
    out[0] = y;
    out[1] = p.has_next ? (disc * in.trunc) * y : C(T(0));
    carry[0] = (disc * (T(1) - in.trunc)) * y;
  }
  template <typename T>
  RLK_FN static T bootstrap_grad(const ScanParams<T>& p, const T* carry) {
    return p.has_next ? T(0) : carry[0];
  }
};

// delta_t = r_t + gamma (1 - term_t) V'_t - V_t;  A_t = delta_t + gamma lam (1 - done_t) A_next.
// Carry: (A of the next valid step, V of the next valid step or the bootstrap value).
struct GaeStep {
  static constexpr Walk kWalk = Walk::kReverse;
  static constexpr int kCarry = 2;
  static constexpr int kOut = 2;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    C next_value = p.has_next ? C(in.nv) : carry[1];
    C delta = (in.r - in.v) + (p.gamma * (T(1) - in.term)) * next_value;
    C adv = delta + (p.gamma * p.lam * (T(1) - in.term) * (T(1) - in.trunc)) * carry[0];
    carry[0] = adv;
    carry[1] = C(in.v);
    out[0] = adv;
    out[1] = adv + in.v;
  }
};

// Adjoint of GaeStep. Carry: (d loss / d delta flowing forward through the A recursion,
// d loss / d V flowing from the previous step's V'). Outputs: grad rewards, values, next_values.
struct GaeBackwardStep {
  static constexpr Walk kWalk = Walk::kForward;
  static constexpr bool kAccInputsOnly = true;  // reads upstream gradients and flags only
  static constexpr int kCarry = 2;
  static constexpr int kOut = 3;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    T disc = p.gamma * (T(1) - in.term);
    C y = (in.g0 + in.g1) + carry[0];  // d loss / d delta_t
    out[0] = y;
    out[1] = p.has_next ? (in.g1 - y) : (in.g1 - y) + carry[1];
    out[2] = p.has_next ? disc * y : C(T(0));
    carry[0] = (disc * p.lam * (T(1) - in.trunc)) * y;
    carry[1] = disc * y;
  }
  template <typename T>
  RLK_FN static T bootstrap_grad(const ScanParams<T>& p, const T* carry) {
    return p.has_next ? T(0) : carry[1];
  }
};

template <typename T>
struct VtraceWeights {
  T rho, c, pg;      // min(rho_clip, e), lam * min(c_clip, e), min(pg_rho_clip, e)
  T drho, dc, dpg;   // their derivatives with respect to log_rho
};

template <typename T, typename MathExp>
RLK_FN VtraceWeights<T> vtrace_weights(const ScanParams<T>& p, T log_rho, MathExp exp_fn) {
  T e = exp_fn(log_rho);
  VtraceWeights<T> w;
  // Where the clip binds, equality included, the weight is constant in log_rho: torch.clamp(e, max=clip)'s
  // gradient, what eager IMPALA code computes (so on-policy data, e = clip = 1, gets no log_rho gradient).
  w.rho = min_(p.rho_clip, e);
  w.drho = select_lt(e, p.rho_clip, e, T(0));
  w.c = p.lam * min_(p.c_clip, e);
  w.dc = select_lt(e, p.c_clip, p.lam * e, T(0));
  w.pg = min_(p.pg_rho_clip, e);
  w.dpg = select_lt(e, p.pg_rho_clip, e, T(0));
  return w;
}

// V-trace (Espeholt et al. 2018). x_t = vs_t - V_t = rho_t delta_t + gamma (1 - done_t) c_t x_next;
// pg_t = min(pg_rho_clip, e^lr) (r_t + gamma (1 - term_t) v'_t - V_t), v'_t = vs_next, or V'_t where done.
// Carry: (x of the next valid step, V of the next valid step or the bootstrap value).
// Outputs: vs, pg_advantages, and the incoming carry (x_next, V_next) that the backward needs.
template <typename MathExp>
struct VtraceStepT {
  static constexpr Walk kWalk = Walk::kReverse;
  static constexpr int kCarry = 2;
  static constexpr int kOut = 4;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    VtraceWeights<T> w = vtrace_weights(p, in.lr, MathExp());
    T disc = p.gamma * (T(1) - in.term);
    T cut = max_(in.term, in.trunc);
    C next_value = p.has_next ? C(in.nv) : carry[1];
    C delta = (in.r - in.v) + disc * next_value;
    C v_next = select(cut, next_value, carry[1] + carry[0]);
    C x = w.rho * delta + (disc * (T(1) - in.trunc) * w.c) * carry[0];
    out[0] = x + in.v;
    out[1] = w.pg * ((in.r - in.v) + disc * v_next);
    out[2] = carry[0];
    out[3] = carry[1];
    carry[0] = x;
    carry[1] = C(in.v);
  }
};

// Adjoint of VtraceStep. Carry: (d loss / d x flowing from the previous step, d loss / d V likewise).
// Outputs: grad rewards, values, log_rhos, next_values. s0, s1 are the saved (x_next, V_next).
template <typename MathExp>
struct VtraceBackwardStepT {
  static constexpr Walk kWalk = Walk::kForward;
  static constexpr int kCarry = 2;
  static constexpr int kOut = 4;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    VtraceWeights<T> w = vtrace_weights(p, in.lr, MathExp());
    T disc = p.gamma * (T(1) - in.term);
    T cut = max_(in.term, in.trunc);
    T next_value = p.has_next ? in.nv : in.s1;
    T delta = (in.r - in.v) + disc * next_value;
    T v_next = select(cut, next_value, in.s1 + in.s0);
    T pg_g = w.pg * in.g1;     // d loss / d (r + disc v' - V) through pg
    C x_g = in.g0 + carry[0];  // d loss / d x_t
    C delta_g = w.rho * x_g;
    out[0] = delta_g + pg_g;
    out[1] = ((in.g0 - pg_g) - delta_g) + carry[1];
    out[2] = (w.drho * delta + disc * (T(1) - in.trunc) * w.dc * in.s0) * x_g +
             C(in.g1 * ((in.r - in.v) + disc * v_next) * w.dpg);
    out[3] = p.has_next ? disc * delta_g + C(disc * cut * pg_g) : C(T(0));
    carry[0] = (disc * (T(1) - in.trunc) * w.c) * x_g + (T(1) - cut) * disc * pg_g;
    T pg_to_v = p.has_next ? select(cut, T(0), disc * pg_g) : disc * pg_g;
    carry[1] = (p.has_next ? T(0) : disc) * delta_g + pg_to_v;
  }
  template <typename T>
  RLK_FN static T bootstrap_grad(const ScanParams<T>& p, const T* carry) {
    return p.has_next ? T(0) : carry[1];
  }
};

template <typename T>
struct TraceCoefficient {
  T c, dc;  // lam * min(c_clip, e) and its derivative with respect to log_rho
};

template <typename T, typename MathExp>
RLK_FN TraceCoefficient<T> trace_coefficient(const ScanParams<T>& p, T log_rho, MathExp exp_fn) {
  T e = exp_fn(log_rho);
  // As in vtrace_weights: constant in log_rho where the clip binds, equality included.
  return {p.lam * min_(p.c_clip, e), select_lt(e, p.c_clip, p.lam * e, T(0))};
}

// Retrace(lambda) (Munos et al. 2016; docs/design.md §4.6): G_t = r_t + gamma (1 - term_t) next_v_t
// + gamma (1 - done_t) X_next, with X = c (G - q_taken) of the next valid step, c = lam min(c_clip, e^lr).
// q_taken arrives as `v`, next_v as `nv`. Carry: X (0 after the last step). Output: G.
template <typename MathExp>
struct RetraceStepT {
  static constexpr Walk kWalk = Walk::kReverse;
  static constexpr int kCarry = 1;
  static constexpr int kOut = 1;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    TraceCoefficient<T> w = trace_coefficient(p, in.lr, MathExp());
    T disc = p.gamma * (T(1) - in.term);
    C g = (in.r + disc * in.nv) + (disc * (T(1) - in.trunc)) * carry[0];
    carry[0] = w.c * (g - in.v);
    out[0] = g;
  }
};

// Adjoint of RetraceStep. Carry: d loss / d X flowing from the previous valid step; s0 is the saved G.
// Outputs: grad rewards, q_taken, next_v, log_rhos.
template <typename MathExp>
struct RetraceBackwardStepT {
  static constexpr Walk kWalk = Walk::kForward;
  static constexpr int kCarry = 1;
  static constexpr int kOut = 4;
  template <typename T, typename C>
  RLK_FN static void step(const ScanParams<T>& p, const StepIn<T>& in, C* carry, C* out) {
    TraceCoefficient<T> w = trace_coefficient(p, in.lr, MathExp());
    T disc = p.gamma * (T(1) - in.term);
    C y = in.g0 + w.c * carry[0];  // d loss / d G_t
    out[0] = y;
    out[1] = (-w.c) * carry[0];
    out[2] = disc * y;
    out[3] = (carry[0] * (in.s0 - in.v)) * w.dc;
    carry[0] = (disc * (T(1) - in.trunc)) * y;
  }
};

// Steps that read only accumulation-type streams (upstream gradients and flags, Step::kAccInputsOnly) are
// called with scalar_t = acc_t alone; the others read the model's inputs in every float dtype.
template <class Step, typename = void>
struct AccInputsOnly : std::false_type {};
template <class Step>
struct AccInputsOnly<Step, std::void_t<decltype(Step::kAccInputsOnly)>> : std::bool_constant<Step::kAccInputsOnly> {};

// Every step of the family, once, as X(id, Step) with `Exp` the backend's exp functor: the CPU engine's StepId
// and dispatch tables are made from this list (csrc/cpu/scan_types.h, scan_block.h).
#define RLK_SCAN_STEPS(X, Exp)                                 \
  X(kLinearScan, LinearScanStep)                               \
  X(kDiscountedReturns, DiscountedReturnsStep)                 \
  X(kDiscountedReturnsBackward, DiscountedReturnsBackwardStep) \
  X(kGae, GaeStep)                                             \
  X(kGaeBackward, GaeBackwardStep)                             \
  X(kVtrace, VtraceStepT<Exp>)                                 \
  X(kVtraceBackward, VtraceBackwardStepT<Exp>)                 \
  X(kRetrace, RetraceStepT<Exp>)                               \
  X(kRetraceBackward, RetraceBackwardStepT<Exp>)

}  // namespace RLK_ISA
}  // namespace rlkernels
