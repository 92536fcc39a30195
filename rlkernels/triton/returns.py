"""Triton kernels of the reverse linear scan family: linear_scan, discounted_returns, gae, vtrace, retrace.

Every estimator is one scan x_t = b_t + a_t x_next whose per-step math is written once below, mirroring
csrc/include/rlkernels/scan.h line for line (same carries, same order of operations, same selects), so the
Triton backend computes what the CPU backend computes, up to rounding. The ops take the canonical layout of
csrc/ops.cpp: [O, T, I] contiguous (sequence s = (o, i), element t at o*T*I + t*I + i) or, with cu_seqlens,
1-D packed segments; per-sequence tensors are [O, I] or [n]; outputs are float32 for 16-bit inputs, else the
input dtype.

Two regimes, chosen from the shape alone (`_chunk_steps`):

* Many sequences: one lane per sequence, BLOCK lanes per program, each lane walks its sequence with the carry
  in registers (reverse time for forward ops, forward time for adjoints). In the time-major layout (I large)
  adjacent lanes read adjacent addresses, so every step's loads are coalesced across sequences.
* Few long sequences: each sequence is cut into chunks that run as independent lanes, as in the CPU engine
  (csrc/cpu/scan_engine.h). Pass 1 gives each chunk's affine map of the carry entering it (carry_out =
  M carry_in + c, a D x D matrix and an offset); pass 2 composes the maps along each sequence to find every
  chunk's true carry in; pass 3 is the first regime's walk, started from those carries.

Pass 1 needs no symbolic arithmetic: every step is linear jointly in the carry and the step's "source"
inputs (rewards, values, next_values, b, upstream gradients), with coefficients that depend only on flags, a
and log_rhos. So the chunk's offset c is the walk from carry 0 with the true sources, and column j of M is the
walk from the unit carry e_j with the sources set to 0: D + 1 concrete walks, run as the columns of one 2-D
walk, each the exact composition of the steps' maps (no difference of two runs, so no cancellation).

The ops are `torch.library.triton_op`s named ``rlkernels::triton_<name>``. Their autograd is the family's
formulas (rlkernels/_ops/returns.py) around ``rlkernels::triton_<name>_backward`` ops that run the adjoint
steps on the same kernels; linear_scan's adjoint is triton_linear_scan itself on shifted coefficients.
"""


import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._ops import returns as _formulas
from ._common import acc_dtype, flag, keep_whole_under_interpreter, pow2, skip_launch, wrap_triton

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------------
# Regime choice and launch shape (shape only: no host synchronization, so these trace under torch.compile)
# ----------------------------------------------------------------------------------------------------

# With at least this many sequences, one lane per sequence already gives the GPU enough independent walks.
MANY_SEQUENCES = 4096
# With fewer, chunks are sized so that about this many lanes run at once (an H100 holds ~16K resident lanes
# at BLOCK = 128 and 4 warps per program).
TARGET_LANES = 16384
# Chunks are never shorter than this: pass 2 walks a sequence's chunks one after the other, and each chunk
# costs its walk a few extra loads.
MIN_CHUNK_STEPS = 256
# Lanes per program, and time steps whose loads are issued together before the dependent carry math.
BLOCK_LANES = 128
UNROLL = 4


def _chunk_steps(num_seqs: int, steps: int) -> int:
    """Steps per lane: ``steps`` (one lane per sequence) or a chunk length < steps (the chunked regime)."""
    if num_seqs >= MANY_SEQUENCES or steps < 2 * MIN_CHUNK_STEPS:
        return max(steps, 1)
    chunk = max(MIN_CHUNK_STEPS, triton.cdiv(steps * num_seqs, TARGET_LANES))
    return chunk if chunk < steps else max(steps, 1)


# ----------------------------------------------------------------------------------------------------
# Step functions: one per estimator and per adjoint, mirroring csrc/include/rlkernels/scan.h.
# Carries and sources are accumulation-type tensors; flags are 0/1 in the accumulation type.
# Each returns (new carry..., outputs...).
# ----------------------------------------------------------------------------------------------------

_LINEAR_SCAN = tl.constexpr(0)
_RETURNS = tl.constexpr(1)
_RETURNS_BACKWARD = tl.constexpr(2)
_GAE = tl.constexpr(3)
_GAE_BACKWARD = tl.constexpr(4)
_VTRACE = tl.constexpr(5)
_VTRACE_BACKWARD = tl.constexpr(6)
_RETRACE = tl.constexpr(7)
_RETRACE_BACKWARD = tl.constexpr(8)


@triton.jit
def _linear_scan_step(c0, a, b):
    """x_t = b_t + a_t x_next (carry: x of the neighbour in scan order)."""
    x = b + a * c0
    return x, x


@triton.jit
def _returns_step(c0, r, nv, term, trunc, gamma, HAS_NEXT: tl.constexpr):
    """G_t = r_t + gamma (1 - term_t) (trunc_t ? V'_t : G_next)."""
    if HAS_NEXT:
        nxt = tl.where(trunc != 0, nv, c0)
    else:
        nxt = c0
    g = r + (gamma * (1.0 - term)) * nxt
    return g, g


@triton.jit
def _returns_backward_step(c0, g0, term, trunc, gamma, HAS_NEXT: tl.constexpr):
    """Adjoint of _returns_step. Carry: dL/dG_next from the previous valid step. Outputs: grad r, grad V'."""
    disc = gamma * (1.0 - term)
    y = g0 + c0
    if HAS_NEXT:
        grad_next = (disc * trunc) * y
    else:
        grad_next = tl.zeros_like(y)
    return (disc * (1.0 - trunc)) * y, y, grad_next


@triton.jit
def _gae_step(c0, c1, r, v, nv, term, trunc, gamma, lam, HAS_NEXT: tl.constexpr):
    """delta_t = r_t + gamma (1 - term_t) V'_t - V_t; A_t = delta_t + gamma lam (1 - done_t) A_next.
    Carry: (A of the next valid step, V of the next valid step or the bootstrap value)."""
    if HAS_NEXT:
        next_value = nv
    else:
        next_value = c1
    delta = (r - v) + (gamma * (1.0 - term)) * next_value
    adv = delta + (gamma * lam * (1.0 - term) * (1.0 - trunc)) * c0
    return adv, v, adv, adv + v


@triton.jit
def _gae_backward_step(c0, c1, g0, g1, term, trunc, gamma, lam, HAS_NEXT: tl.constexpr):
    """Adjoint of _gae_step. Carry: (dL/d delta through the A recursion, dL/dV from the previous step's V').
    Outputs: grad rewards, values, next_values."""
    disc = gamma * (1.0 - term)
    y = (g0 + g1) + c0
    if HAS_NEXT:
        grad_v = g1 - y
        grad_next = disc * y
    else:
        grad_v = (g1 - y) + c1
        grad_next = tl.zeros_like(y)
    return (disc * lam * (1.0 - trunc)) * y, disc * y, y, grad_v, grad_next


@triton.jit
def _vtrace_weights(lr, rho_clip, c_clip, pg_rho_clip, lam):
    """rho = min(rho_clip, e), c = lam min(c_clip, e), pg = min(pg_rho_clip, e), e = exp(log_rho), and their
    derivatives in log_rho (0 where the clip binds, torch.clamp's convention). min_(a, b) = a < b ? a : b, as
    in affine.h, so a NaN log_rho gives NaN weights."""
    e = tl.exp(lr)
    rho = tl.where(rho_clip < e, rho_clip, e)
    drho = tl.where(e < rho_clip, e, 0.0)
    c = lam * tl.where(c_clip < e, c_clip, e)
    dc = tl.where(e < c_clip, lam * e, 0.0)
    pg = tl.where(pg_rho_clip < e, pg_rho_clip, e)
    dpg = tl.where(e < pg_rho_clip, e, 0.0)
    return rho, c, pg, drho, dc, dpg


@triton.jit
def _vtrace_step(c0, c1, r, v, nv, lr, term, trunc, gamma, lam, rho_clip, c_clip, pg_rho_clip,
                 HAS_NEXT: tl.constexpr):
    """V-trace (Espeholt et al. 2018): x_t = vs_t - V_t = rho_t delta_t + gamma (1 - done_t) c_t x_next;
    pg_t = min(pg_rho_clip, e^lr) (r_t + gamma (1 - term_t) v'_t - V_t), v'_t = vs_next, or V'_t where done.
    Carry: (x of the next valid step, V of the next valid step or the bootstrap value).
    Outputs: vs, pg advantages, and the incoming carry (x_next, V_next) that the backward needs."""
    rho, c, pg, _drho, _dc, _dpg = _vtrace_weights(lr, rho_clip, c_clip, pg_rho_clip, lam)
    disc = gamma * (1.0 - term)
    cut = tl.where(term > trunc, term, trunc)
    if HAS_NEXT:
        next_value = nv
    else:
        next_value = c1
    delta = (r - v) + disc * next_value
    v_next = tl.where(cut != 0, next_value, c1 + c0)
    x = rho * delta + (disc * (1.0 - trunc) * c) * c0
    return x, v, x + v, pg * ((r - v) + disc * v_next), c0, c1


@triton.jit
def _vtrace_backward_step(c0, c1, r, v, nv, lr, g0, g1, s0, s1, term, trunc, gamma, lam, rho_clip, c_clip,
                          pg_rho_clip, HAS_NEXT: tl.constexpr):
    """Adjoint of _vtrace_step. Carry: (dL/dx and dL/dV flowing from the previous step). s0, s1 are the saved
    (x_next, V_next). Outputs: grad rewards, values, log_rhos, next_values."""
    rho, c, pg, drho, dc, dpg = _vtrace_weights(lr, rho_clip, c_clip, pg_rho_clip, lam)
    disc = gamma * (1.0 - term)
    cut = tl.where(term > trunc, term, trunc)
    if HAS_NEXT:
        next_value = nv
    else:
        next_value = s1
    delta = (r - v) + disc * next_value
    v_next = tl.where(cut != 0, next_value, s1 + s0)
    pg_g = pg * g1  # dL/d(r + disc v' - V) through pg
    x_g = g0 + c0  # dL/dx_t
    delta_g = rho * x_g
    grad_r = delta_g + pg_g
    grad_v = ((g0 - pg_g) - delta_g) + c1
    grad_lr = (drho * delta + disc * (1.0 - trunc) * dc * s0) * x_g + g1 * ((r - v) + disc * v_next) * dpg
    if HAS_NEXT:
        grad_next = disc * delta_g + disc * cut * pg_g
        pg_to_v = tl.where(cut == 0, disc * pg_g, 0.0)
        n1 = 0.0 * delta_g + pg_to_v
    else:
        grad_next = tl.zeros_like(x_g)
        n1 = disc * delta_g + disc * pg_g
    n0 = (disc * (1.0 - trunc) * c) * x_g + (1.0 - cut) * disc * pg_g
    return n0, n1, grad_r, grad_v, grad_lr, grad_next


@triton.jit
def _trace_coefficient(lr, c_clip, lam):
    """c = lam min(c_clip, e), e = exp(log_rho), and dc / d log_rho (0 where the clip binds)."""
    e = tl.exp(lr)
    return lam * tl.where(c_clip < e, c_clip, e), tl.where(e < c_clip, lam * e, 0.0)


@triton.jit
def _retrace_step(c0, r, q, nv, lr, term, trunc, gamma, lam, c_clip):
    """Retrace (Munos et al. 2016): G_t = r_t + gamma (1 - term_t) nv_t + gamma (1 - done_t) X_next.
    Carry: X = c (G - q_taken) of the next valid step. Outputs: G."""
    c, _dc = _trace_coefficient(lr, c_clip, lam)
    disc = gamma * (1.0 - term)
    g = r + disc * nv + (disc * (1.0 - trunc)) * c0
    return c * (g - q), g


@triton.jit
def _retrace_backward_step(c0, q, lr, g0, s0, term, trunc, gamma, lam, c_clip):
    """Adjoint of _retrace_step. Carry: dL/dX flowing from the previous valid step; s0 is the saved G.
    Outputs: grad rewards, q_taken, next_v, log_rhos."""
    c, dc = _trace_coefficient(lr, c_clip, lam)
    disc = gamma * (1.0 - term)
    y = g0 + c * c0  # dL/dG_t
    return (disc * (1.0 - trunc)) * y, y, -(c * c0), disc * y, (c0 * (s0 - q)) * dc


@triton.jit
def _step(STEP: tl.constexpr, c0, c1, r, v, nv, lr, a, b, g0, g1, s0, s1, term, trunc,
          gamma, lam, rho_clip, c_clip, pg_rho_clip, HAS_NEXT: tl.constexpr):
    """One step of estimator STEP: returns (carry0, carry1, out0, out1, out2, out3); unused slots repeat."""
    if STEP == _LINEAR_SCAN:
        n0, o0 = _linear_scan_step(c0, a, b)
        n1, o1, o2, o3 = c1, o0, o0, o0
    elif STEP == _RETURNS:
        n0, o0 = _returns_step(c0, r, nv, term, trunc, gamma, HAS_NEXT)
        n1, o1, o2, o3 = c1, o0, o0, o0
    elif STEP == _RETURNS_BACKWARD:
        n0, o0, o1 = _returns_backward_step(c0, g0, term, trunc, gamma, HAS_NEXT)
        n1, o2, o3 = c1, o0, o0
    elif STEP == _GAE:
        n0, n1, o0, o1 = _gae_step(c0, c1, r, v, nv, term, trunc, gamma, lam, HAS_NEXT)
        o2, o3 = o0, o0
    elif STEP == _GAE_BACKWARD:
        n0, n1, o0, o1, o2 = _gae_backward_step(c0, c1, g0, g1, term, trunc, gamma, lam, HAS_NEXT)
        o3 = o0
    elif STEP == _VTRACE:
        n0, n1, o0, o1, o2, o3 = _vtrace_step(c0, c1, r, v, nv, lr, term, trunc, gamma, lam, rho_clip, c_clip,
                                              pg_rho_clip, HAS_NEXT)
    elif STEP == _RETRACE:
        n0, o0 = _retrace_step(c0, r, v, nv, lr, term, trunc, gamma, lam, c_clip)
        n1, o1, o2, o3 = c1, o0, o0, o0
    elif STEP == _RETRACE_BACKWARD:
        n0, o0, o1, o2, o3 = _retrace_backward_step(c0, v, lr, g0, s0, term, trunc, gamma, lam, c_clip)
        n1 = c1
    else:
        n0, n1, o0, o1, o2, o3 = _vtrace_backward_step(c0, c1, r, v, nv, lr, g0, g1, s0, s1, term, trunc,
                                                       gamma, lam, rho_clip, c_clip, pg_rho_clip, HAS_NEXT)
    return n0, n1, o0, o1, o2, o3


# ----------------------------------------------------------------------------------------------------
# The engine: lanes, loads, masks, chunk maps
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_step(R_ptr, V_ptr, NV_ptr, LR_ptr, A_ptr, B_ptr, G0_ptr, G1_ptr, S0_ptr, S1_ptr, TERM_ptr,
               TRUNC_ptr, MASK_ptr, off, inb, zero, ACC: tl.constexpr):
    """Every stream at one time step of the lanes: values in ACC, flags as 0/1 in ACC, and `valid` (in range
    and mask 1). Absent streams read as 0, an absent mask as 1. One helper for all streams: the interpreter
    pays for every nested jit call."""
    # Values are read in their own dtype (16-bit inputs stay 16-bit in memory); .to(ACC) widens fp16/bf16 to
    # fp32 exactly and is a no-op for the fp32/fp64 streams, which already have the accumulation dtype.
    r = zero
    if R_ptr is not None:
        r = tl.load(R_ptr + off, mask=inb, other=0).to(ACC)
    v = zero
    if V_ptr is not None:
        v = tl.load(V_ptr + off, mask=inb, other=0).to(ACC)
    nv = zero
    if NV_ptr is not None:
        nv = tl.load(NV_ptr + off, mask=inb, other=0).to(ACC)
    lr = zero
    if LR_ptr is not None:
        lr = tl.load(LR_ptr + off, mask=inb, other=0).to(ACC)
    a = zero
    if A_ptr is not None:
        a = tl.load(A_ptr + off, mask=inb, other=0).to(ACC)
    b = zero
    if B_ptr is not None:
        b = tl.load(B_ptr + off, mask=inb, other=0).to(ACC)
    g0 = zero
    if G0_ptr is not None:
        g0 = tl.load(G0_ptr + off, mask=inb, other=0).to(ACC)
    g1 = zero
    if G1_ptr is not None:
        g1 = tl.load(G1_ptr + off, mask=inb, other=0).to(ACC)
    s0 = zero
    if S0_ptr is not None:
        s0 = tl.load(S0_ptr + off, mask=inb, other=0).to(ACC)
    s1 = zero
    if S1_ptr is not None:
        s1 = tl.load(S1_ptr + off, mask=inb, other=0).to(ACC)
    # Flags are uint8 (bool viewed as uint8); != 0 gives int1, and int1 -> ACC gives the 0/1 the steps
    # multiply by, as the CPU engine's acc_t flags.
    term = zero
    if TERM_ptr is not None:
        term = (tl.load(TERM_ptr + off, mask=inb, other=0) != 0).to(ACC)
    trunc = zero
    if TRUNC_ptr is not None:
        trunc = (tl.load(TRUNC_ptr + off, mask=inb, other=0) != 0).to(ACC)
    valid = inb
    if MASK_ptr is not None:
        valid = inb & (tl.load(MASK_ptr + off, mask=inb, other=0) != 0)
    return r, v, nv, lr, a, b, g0, g1, s0, s1, term, trunc, valid


@triton.jit
def _load_carry(PTR, j: tl.constexpr, q, num_lanes, ok, zero):
    """PTR[j, q] of a [D, num_lanes] accumulation-type tensor, or 0 without one. (One return: the compiler
    does not stop generating code at a return inside a constexpr branch.)"""
    carry = zero
    if PTR is not None:
        carry = tl.load(PTR + j * num_lanes + q, mask=ok, other=0)
    return carry


@triton.jit
def _params(gamma, lam, rho_clip, c_clip, pg_rho_clip, ACC: tl.constexpr):
    # Host floats arrive as float64 (the `tl.float64` annotations); the CPU engine rounds its parameters to
    # the accumulation type first (static_cast<acc_t>), so .to(ACC) does the same. tl.full keeps all 64 bits
    # under the interpreter too, where a bare Python float would be rounded to float32.
    return (tl.full([], gamma, tl.float64).to(ACC), tl.full([], lam, tl.float64).to(ACC),
            tl.full([], rho_clip, tl.float64).to(ACC), tl.full([], c_clip, tl.float64).to(ACC),
            tl.full([], pg_rho_clip, tl.float64).to(ACC))


# Width of a chunk map's walk in pass 1: column 0 is the offset, columns 1..D the matrix (D <= 2, padded).
_MAP_WIDTH = tl.constexpr(4)


@triton.jit
def _scan_kernel(
    R_ptr, V_ptr, NV_ptr, LR_ptr, A_ptr, B_ptr, G0_ptr, G1_ptr, S0_ptr, S1_ptr,
    TERM_ptr, TRUNC_ptr, MASK_ptr, CU_ptr,
    CARRY_IN_ptr, OUT0_ptr, OUT1_ptr, OUT2_ptr, OUT3_ptr, MAP_ptr, FINAL_ptr,
    num_lanes, num_seqs, num_chunks, steps, inner, chunk,
    gamma: tl.float64, lam: tl.float64, rho_clip: tl.float64, c_clip: tl.float64, pg_rho_clip: tl.float64,
    STEP: tl.constexpr, D: tl.constexpr, REVERSE: tl.constexpr, HAS_NEXT: tl.constexpr,
    MAP_ONLY: tl.constexpr, FINAL_J: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
):
    """Walks BLOCK lanes of estimator STEP in lockstep (REVERSE: backwards in time).

    Lane q is chunk c = q // num_seqs of sequence s = q % num_seqs (chunk-major, so adjacent lanes are
    adjacent sequences: coalesced in the time-major layout). Sequence s starts at (s // I) T I + s % I with
    time stride I, or at cu_seqlens[s] with stride 1 when packed. At an invalid step (mask 0) the carry is
    unchanged and every output is 0.

    MAP_ONLY (pass 1): no outputs; writes the lane's map carry_out = M carry_in + k to MAP[j, 0, q] = k[j] and
    MAP[j, 1 + i, q] = M[j, i]. The walk is 2-D, [BLOCK, 4]: column 0 starts from carry 0 with the true
    sources (giving k), column 1 + i from the unit carry e_i with the sources zeroed (giving M[:, i]).
    Otherwise (pass 3, or the whole scan with one chunk) the walk starts from CARRY_IN[j, q] (0 if None) and
    stores the outputs; with FINAL_J >= 0 the last lane of each sequence in scan order writes its final carry
    FINAL_J to FINAL[s] (the bootstrap value's gradient).
    """
    ACC: tl.constexpr = OUT0_ptr.dtype.element_ty
    # int64 before multiplying: lane and element offsets pass 2^31 on large inputs.
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = q < num_lanes
    s = q % num_seqs
    c = q // num_seqs
    if CU_ptr is None:
        base = (s // inner) * steps * inner + s % inner
        seq_len = tl.full(q.shape, steps, tl.int64)  # int64 like the packed lengths
        ts = inner
    else:
        # cu_seqlens may be int32 or int64; offsets are computed in int64.
        start = tl.load(CU_ptr + s, mask=lane_ok, other=0).to(tl.int64)
        seq_len = tl.load(CU_ptr + s + 1, mask=lane_ok, other=0).to(tl.int64) - start
        base = start
        ts = 1
    begin = c * chunk
    length = tl.where(lane_ok, tl.minimum(tl.maximum(seq_len - begin, 0), chunk), 0)
    n = tl.max(length, axis=0)

    gamma_, lam_, rho_clip_, c_clip_, pg_rho_clip_ = _params(gamma, lam, rho_clip, c_clip, pg_rho_clip, ACC)

    zero = tl.zeros([BLOCK], ACC)
    # int64: the map's column offsets are multiples of num_lanes.
    col = tl.arange(0, _MAP_WIDTH).to(tl.int64)[None, :]
    if MAP_ONLY:
        c0 = tl.where(col == 1, 1.0, 0.0) + tl.zeros([BLOCK, _MAP_WIDTH], ACC)
        c1 = tl.where(col == 2, 1.0, 0.0) + tl.zeros([BLOCK, _MAP_WIDTH], ACC)
    else:
        c0 = _load_carry(CARRY_IN_ptr, 0, q, num_lanes, lane_ok, zero)
        c1 = zero
        if D == 2:
            c1 = _load_carry(CARRY_IN_ptr, 1, q, num_lanes, lane_ok, zero)

    for k0 in range(0, n, UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u
            inb = k < length
            if REVERSE:
                t = begin + length - 1 - k
            else:
                t = begin + k
            off = base + t * ts
            r, v, nv, lr, a, b, g0, g1, s0, s1, term, trunc, valid = _load_step(
                R_ptr, V_ptr, NV_ptr, LR_ptr, A_ptr, B_ptr, G0_ptr, G1_ptr, S0_ptr, S1_ptr, TERM_ptr,
                TRUNC_ptr, MASK_ptr, off, inb, zero, ACC)

            if MAP_ONLY:
                # Sources only feed column 0; coefficients (flags, a, log_rhos) are shared by every column.
                src = col == 0
                r = tl.where(src, r[:, None], 0.0)
                v = tl.where(src, v[:, None], 0.0)
                nv = tl.where(src, nv[:, None], 0.0)
                b = tl.where(src, b[:, None], 0.0)
                g0 = tl.where(src, g0[:, None], 0.0)
                g1 = tl.where(src, g1[:, None], 0.0)
                lr, a, s0, s1 = lr[:, None], a[:, None], s0[:, None], s1[:, None]
                term, trunc, valid = term[:, None], trunc[:, None], valid[:, None]
            n0, n1, o0, o1, o2, o3 = _step(STEP, c0, c1, r, v, nv, lr, a, b, g0, g1, s0, s1, term, trunc,
                                           gamma_, lam_, rho_clip_, c_clip_, pg_rho_clip_, HAS_NEXT)
            c0 = tl.where(valid, n0, c0)
            c1 = tl.where(valid, n1, c1)
            if not MAP_ONLY:
                tl.store(OUT0_ptr + off, tl.where(valid, o0, 0.0), mask=inb)
                if OUT1_ptr is not None:
                    tl.store(OUT1_ptr + off, tl.where(valid, o1, 0.0), mask=inb)
                if OUT2_ptr is not None:
                    tl.store(OUT2_ptr + off, tl.where(valid, o2, 0.0), mask=inb)
                if OUT3_ptr is not None:
                    tl.store(OUT3_ptr + off, tl.where(valid, o3, 0.0), mask=inb)

    if MAP_ONLY:
        tl.store(MAP_ptr + col * num_lanes + q[:, None], c0, mask=lane_ok[:, None])
        if D == 2:
            tl.store(MAP_ptr + (col + _MAP_WIDTH) * num_lanes + q[:, None], c1, mask=lane_ok[:, None])
    elif FINAL_J >= 0:
        if REVERSE:
            last = lane_ok & (c == 0)
        else:
            last = lane_ok & (c == num_chunks - 1)
        if FINAL_J == 0:
            tl.store(FINAL_ptr + s, c0, mask=last)
        else:
            tl.store(FINAL_ptr + s, c1, mask=last)


@triton.jit
def _compose_kernel(MAP_ptr, INIT_ptr, CARRY_IN_ptr, num_seqs, num_chunks, num_lanes,
                    D: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: walks each sequence's chunks in scan order, carry <- k + M carry (evaluated as affine.h does:
    k + sum_i M[:, i] carry_i), writing every chunk's carry in to CARRY_IN[j, q]. INIT[j, s]: the sequence's
    initial carry (0 if None). MAP[j, 0, q] = k[j], MAP[j, 1 + i, q] = M[j, i]."""
    ACC: tl.constexpr = CARRY_IN_ptr.dtype.element_ty
    # int64 before multiplying: chunk-major lane indices reach num_chunks * num_seqs.
    pid = tl.program_id(0).to(tl.int64)
    s = pid * BLOCK + tl.arange(0, BLOCK)
    seq_stride = tl.full([], num_seqs, tl.int64)
    lanes = tl.full([], num_lanes, tl.int64)
    ok = s < num_seqs
    zero = tl.zeros([BLOCK], ACC)
    x0 = _load_carry(INIT_ptr, 0, s, num_seqs, ok, zero)
    x1 = zero
    if D == 2:
        x1 = _load_carry(INIT_ptr, 1, s, num_seqs, ok, zero)
    for i in range(num_chunks):
        if REVERSE:
            cidx = num_chunks - 1 - i
        else:
            cidx = i
        q = cidx * seq_stride + s
        tl.store(CARRY_IN_ptr + q, x0, mask=ok)
        k0 = tl.load(MAP_ptr + 0 * lanes + q, mask=ok, other=0)
        m00 = tl.load(MAP_ptr + 1 * lanes + q, mask=ok, other=0)
        if D == 2:
            tl.store(CARRY_IN_ptr + lanes + q, x1, mask=ok)
            m01 = tl.load(MAP_ptr + 2 * lanes + q, mask=ok, other=0)
            k1 = tl.load(MAP_ptr + (_MAP_WIDTH + 0) * lanes + q, mask=ok, other=0)
            m10 = tl.load(MAP_ptr + (_MAP_WIDTH + 1) * lanes + q, mask=ok, other=0)
            m11 = tl.load(MAP_ptr + (_MAP_WIDTH + 2) * lanes + q, mask=ok, other=0)
            y0 = k0 + m00 * x0 + m01 * x1
            x1 = k1 + m10 * x0 + m11 * x1
            x0 = y0
        else:
            x0 = k0 + m00 * x0


# ----------------------------------------------------------------------------------------------------
# Host side: geometry, the three passes, the ops
# ----------------------------------------------------------------------------------------------------


def _stream(x: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    if x is None:
        return None
    if dtype is not None:
        x = x.to(dtype)
    return x.contiguous()


def _geometry(ref: Tensor, cu_seqlens: Tensor | None):
    """(num_seqs, steps, inner, seq_shape) of the canonical layout; steps is the packed length when packed."""
    if cu_seqlens is not None:
        torch._check(ref.dim() == 1, lambda: "rlkernels: with cu_seqlens the inputs must be 1-D packed")
        n = cu_seqlens.shape[0] - 1
        return n, ref.shape[0], 1, (n,)
    torch._check(ref.dim() == 3, lambda: "rlkernels: scan ops take canonical [O, T, I] tensors")
    outer, steps, inner = ref.shape
    return outer * inner, steps, inner, (outer, inner)


def _run_scan(step, d, reverse, ref, cu_seqlens, streams, outs, init=None, final=None, final_j=-1,
              has_next=False, params=(0.0, 0.0, 0.0, 0.0, 0.0)):
    """Runs estimator `step` (carry size d) over every sequence of `ref`'s layout.

    streams: keyword inputs of _scan_kernel (R, V, NV, LR, A, B, G0, G1, S0, S1, TERM, TRUNC, MASK), each a
    contiguous tensor or None. outs: up to four outputs in the accumulation dtype (the first required). init:
    [d, num_seqs] initial carries or None (zeros). final: [num_seqs] output for the final carry `final_j` of
    each sequence.
    """
    num_seqs, steps, inner, _ = _geometry(ref, cu_seqlens)
    if num_seqs == 0 or skip_launch(outs[0]):
        # Nothing to walk; or a fake (meta) run under the interpreter, where only the outputs' shapes matter
        # (on a GPU, wrap_triton records the launch instead of running it).
        return
    chunk = _chunk_steps(num_seqs, steps)
    num_chunks = triton.cdiv(steps, chunk) if steps > 0 else 1
    num_lanes = num_seqs * num_chunks
    acc = outs[0].dtype
    outs = list(outs) + [None] * (4 - len(outs))
    ptrs = {f"{k}_ptr": streams.get(k) for k in
            ("R", "V", "NV", "LR", "A", "B", "G0", "G1", "S0", "S1", "TERM", "TRUNC", "MASK")}
    geometry = {"CU_ptr": cu_seqlens, "num_lanes": num_lanes, "num_seqs": num_seqs, "num_chunks": num_chunks,
                "steps": steps, "inner": inner, "chunk": chunk}
    scalars = dict(zip(("gamma", "lam", "rho_clip", "c_clip", "pg_rho_clip"), (float(p) for p in params)))
    block = pow2(num_lanes, 16, BLOCK_LANES)
    grid = (triton.cdiv(num_lanes, block),)
    num_warps = max(1, min(4, block // 32))
    carry_in = init
    if num_chunks > 1:
        maps = torch.empty((d, _MAP_WIDTH.value, num_lanes), dtype=acc, device=ref.device)
        wrap_triton(_scan_kernel)[grid](
            **ptrs, CARRY_IN_ptr=None, OUT0_ptr=outs[0], OUT1_ptr=None, OUT2_ptr=None, OUT3_ptr=None,
            MAP_ptr=maps, FINAL_ptr=None, **geometry, **scalars, STEP=step, D=d, REVERSE=reverse,
            HAS_NEXT=has_next, MAP_ONLY=True, FINAL_J=-1, BLOCK=block, UNROLL=UNROLL, num_warps=num_warps)
        carry_in = torch.empty((d, num_lanes), dtype=acc, device=ref.device)
        seq_block = pow2(num_seqs, 16, BLOCK_LANES)
        wrap_triton(_compose_kernel)[(triton.cdiv(num_seqs, seq_block),)](
            maps, init, carry_in, num_seqs, num_chunks, num_lanes, D=d, REVERSE=reverse, BLOCK=seq_block,
            num_warps=max(1, min(4, seq_block // 32)))
    wrap_triton(_scan_kernel)[grid](
        **ptrs, CARRY_IN_ptr=carry_in, OUT0_ptr=outs[0], OUT1_ptr=outs[1], OUT2_ptr=outs[2], OUT3_ptr=outs[3],
        MAP_ptr=None, FINAL_ptr=final, **geometry, **scalars, STEP=step, D=d, REVERSE=reverse,
        HAS_NEXT=has_next, MAP_ONLY=False, FINAL_J=final_j if final is not None else -1, BLOCK=block,
        UNROLL=UNROLL, num_warps=num_warps)


def _empty_acc(ref: Tensor) -> Tensor:
    return torch.empty(ref.shape, dtype=acc_dtype(ref.dtype), device=ref.device)


def _none_acc(ref: Tensor) -> Tensor:
    return torch.empty((0,), dtype=acc_dtype(ref.dtype), device=ref.device)


def _initial(d: int, j: int, value: Tensor | None, num_seqs: int, acc: torch.dtype) -> Tensor | None:
    """[d, num_seqs] initial carries: `value` as carry j, zeros elsewhere (None when all are zero)."""
    if value is None:
        return None
    value = value.reshape(1, num_seqs).to(acc)
    if d == 1:
        return value.contiguous()
    zeros = value.new_zeros((1, num_seqs))
    return torch.cat([value, zeros] if j == 0 else [zeros, value]).contiguous()


# ---- linear_scan ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_linear_scan", mutates_args=())
def linear_scan(a: Tensor, b: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    """x_t = b_t + a_t x_{t+1} (reverse) or b_t + a_t x_{t-1}, x beyond the end = initial (0 if None).
    a, b: [O, T, I]; initial: [O, I]. Output in the accumulation dtype."""
    out = _empty_acc(b)
    num_seqs = b.shape[0] * b.shape[2]
    _run_scan(_LINEAR_SCAN.value, 1, reverse, b, None, {"A": _stream(a), "B": _stream(b)}, [out],
              init=_initial(1, 0, initial, num_seqs, out.dtype))
    return out


_formulas.register_linear_scan(linear_scan, torch.ops.rlkernels.triton_linear_scan)


# ---- discounted_returns ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_discounted_returns", mutates_args=())
def discounted_returns(rewards: Tensor, next_values: Tensor | None, bootstrap_value: Tensor | None,
                       terminated: Tensor | None, truncated: Tensor | None, mask: Tensor | None,
                       cu_seqlens: Tensor | None, gamma: float) -> Tensor:
    """G_t = r_t + gamma (1 - term_t) (trunc_t ? V'_t : G_{t+1}); G after the last valid step is
    bootstrap_value (0 if None; unused with next_values, where the wrapper marks the last step truncated)."""
    out = _empty_acc(rewards)
    num_seqs = _geometry(rewards, cu_seqlens)[0]
    has_next = next_values is not None
    streams = {"R": _stream(rewards), "NV": _stream(next_values),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_RETURNS.value, 1, True, rewards, cu_seqlens, streams, [out],
              init=None if has_next else _initial(1, 0, bootstrap_value, num_seqs, out.dtype),
              has_next=has_next, params=(gamma, 1.0, 1.0, 1.0, 1.0))
    return out


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_discounted_returns_backward", mutates_args=())
def discounted_returns_backward(grad: Tensor | None, terminated: Tensor | None, truncated: Tensor | None,
                                mask: Tensor | None, cu_seqlens: Tensor | None, rewards_like: Tensor,
                                gamma: float, has_next_values: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Adjoint of discounted_returns (a forward-time walk). Returns (grad_rewards, grad_next_values (empty
    without next values), grad_bootstrap_value), in the accumulation dtype."""
    acc = acc_dtype(rewards_like.dtype)
    _, _, _, seq_shape = _geometry(rewards_like, cu_seqlens)
    grad_rewards = _empty_acc(rewards_like)
    grad_next = _empty_acc(rewards_like) if has_next_values else _none_acc(rewards_like)
    grad_boot = torch.zeros(seq_shape, dtype=acc, device=rewards_like.device)
    streams = {"G0": _stream(grad, acc),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_RETURNS_BACKWARD.value, 1, False, rewards_like, cu_seqlens, streams,
              [grad_rewards, grad_next if has_next_values else None],
              final=None if has_next_values else grad_boot, final_j=0, has_next=has_next_values,
              params=(gamma, 1.0, 1.0, 1.0, 1.0))
    return grad_rewards, grad_next, grad_boot


_formulas.register_discounted_returns(discounted_returns, torch.ops.rlkernels.triton_discounted_returns_backward)


# ---- gae ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_gae", mutates_args=())
def gae(rewards: Tensor, values: Tensor, next_values: Tensor | None, bootstrap_value: Tensor | None,
        terminated: Tensor | None, truncated: Tensor | None, mask: Tensor | None,
        cu_seqlens: Tensor | None, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016). delta_t = r_t + gamma (1 - term_t) V'_t - V_t,
    A_t = delta_t + gamma lam (1 - done_t) A_{t+1}, returns_t = A_t + V_t. Returns (advantages, returns)."""
    adv, ret = _empty_acc(rewards), _empty_acc(rewards)
    num_seqs = _geometry(rewards, cu_seqlens)[0]
    has_next = next_values is not None
    streams = {"R": _stream(rewards), "V": _stream(values), "NV": _stream(next_values),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_GAE.value, 2, True, rewards, cu_seqlens, streams, [adv, ret],
              init=None if has_next else _initial(2, 1, bootstrap_value, num_seqs, adv.dtype),
              has_next=has_next, params=(gamma, lam, 1.0, 1.0, 1.0))
    return adv, ret


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_gae_backward", mutates_args=())
def gae_backward(grad_advantages: Tensor | None, grad_returns: Tensor | None, terminated: Tensor | None,
                 truncated: Tensor | None, mask: Tensor | None, cu_seqlens: Tensor | None,
                 rewards_like: Tensor, gamma: float, lam: float,
                 has_next_values: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of gae. Returns (grad_rewards, grad_values, grad_next_values (empty without next values),
    grad_bootstrap_value), in the accumulation dtype."""
    acc = acc_dtype(rewards_like.dtype)
    _, _, _, seq_shape = _geometry(rewards_like, cu_seqlens)
    grad_rewards, grad_values = _empty_acc(rewards_like), _empty_acc(rewards_like)
    grad_next = _empty_acc(rewards_like) if has_next_values else _none_acc(rewards_like)
    grad_boot = torch.zeros(seq_shape, dtype=acc, device=rewards_like.device)
    streams = {"G0": _stream(grad_advantages, acc), "G1": _stream(grad_returns, acc),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_GAE_BACKWARD.value, 2, False, rewards_like, cu_seqlens, streams,
              [grad_rewards, grad_values, grad_next if has_next_values else None],
              final=None if has_next_values else grad_boot, final_j=1, has_next=has_next_values,
              params=(gamma, lam, 1.0, 1.0, 1.0))
    return grad_rewards, grad_values, grad_next, grad_boot


_formulas.register_gae(gae, torch.ops.rlkernels.triton_gae_backward)


# ---- vtrace ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_vtrace", mutates_args=())
def vtrace(rewards: Tensor, values: Tensor, log_rhos: Tensor, next_values: Tensor | None,
           bootstrap_value: Tensor | None, terminated: Tensor | None, truncated: Tensor | None,
           mask: Tensor | None, cu_seqlens: Tensor | None, gamma: float, lam: float, rho_clip: float,
           c_clip: float, pg_rho_clip: float, save_carries: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """V-trace (IMPALA, Espeholt et al. 2018): vs_t - V_t = rho_t delta_t + gamma (1 - done_t) c_t
    (vs_{t+1} - V_{t+1}); pg_t = min(pg_rho_clip, e^lr) (r_t + gamma (1 - term_t) v'_t - V_t).
    Returns (vs, pg_advantages, saved_next_x, saved_next_v); the last two are empty unless save_carries."""
    vs, pg = _empty_acc(rewards), _empty_acc(rewards)
    next_x = _empty_acc(rewards) if save_carries else _none_acc(rewards)
    next_v = _empty_acc(rewards) if save_carries else _none_acc(rewards)
    num_seqs = _geometry(rewards, cu_seqlens)[0]
    has_next = next_values is not None
    streams = {"R": _stream(rewards), "V": _stream(values), "LR": _stream(log_rhos),
               "NV": _stream(next_values),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    outs = [vs, pg] + ([next_x, next_v] if save_carries else [])
    _run_scan(_VTRACE.value, 2, True, rewards, cu_seqlens, streams, outs,
              init=None if has_next else _initial(2, 1, bootstrap_value, num_seqs, vs.dtype),
              has_next=has_next, params=(gamma, lam, rho_clip, c_clip, pg_rho_clip))
    return vs, pg, next_x, next_v


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_vtrace_backward", mutates_args=())
def vtrace_backward(grad_vs: Tensor | None, grad_pg_advantages: Tensor | None, rewards: Tensor,
                    values: Tensor, log_rhos: Tensor, next_values: Tensor | None,
                    saved_next_x: Tensor | None, saved_next_v: Tensor | None, terminated: Tensor | None,
                    truncated: Tensor | None, mask: Tensor | None, cu_seqlens: Tensor | None,
                    gamma: float, lam: float, rho_clip: float, c_clip: float,
                    pg_rho_clip: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of vtrace. Returns (grad_rewards, grad_values, grad_log_rhos (zeros without the saved carries,
    which it needs), grad_next_values (empty without next values), grad_bootstrap_value)."""
    acc = acc_dtype(rewards.dtype)
    _, _, _, seq_shape = _geometry(rewards, cu_seqlens)
    has_next = next_values is not None
    saved = saved_next_x is not None and saved_next_v is not None
    grad_rewards, grad_values = _empty_acc(rewards), _empty_acc(rewards)
    if saved:
        grad_log_rhos = _empty_acc(rewards)
    else:  # not computable without the saved carries, and not needed: log_rhos did not require grad
        grad_log_rhos = torch.zeros(rewards.shape, dtype=acc, device=rewards.device)
    grad_next = _empty_acc(rewards) if has_next else _none_acc(rewards)
    grad_boot = torch.zeros(seq_shape, dtype=acc, device=rewards.device)
    streams = {"R": _stream(rewards), "V": _stream(values), "LR": _stream(log_rhos),
               "NV": _stream(next_values),
               "G0": _stream(grad_vs, acc), "G1": _stream(grad_pg_advantages, acc),
               "S0": _stream(saved_next_x, acc) if saved else None,
               "S1": _stream(saved_next_v, acc) if saved else None,
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_VTRACE_BACKWARD.value, 2, False, rewards, cu_seqlens, streams,
              [grad_rewards, grad_values, grad_log_rhos if saved else None, grad_next if has_next else None],
              final=None if has_next else grad_boot, final_j=1, has_next=has_next,
              params=(gamma, lam, rho_clip, c_clip, pg_rho_clip))
    return grad_rewards, grad_values, grad_log_rhos, grad_next, grad_boot


_formulas.register_vtrace(vtrace, torch.ops.rlkernels.triton_vtrace_backward)


# ---- retrace ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_retrace", mutates_args=())
def retrace(rewards: Tensor, q_taken: Tensor, next_v: Tensor, log_rhos: Tensor, terminated: Tensor | None,
            truncated: Tensor | None, mask: Tensor | None, cu_seqlens: Tensor | None, gamma: float, lam: float,
            c_clip: float) -> Tensor:
    """Retrace(lambda) targets (Munos et al. 2016): G_t = r_t + gamma (1 - term_t) next_v_t
    + gamma (1 - done_t) c_{t+1} (G_{t+1} - q_taken_{t+1}), c = lam min(c_clip, e^log_rho)."""
    out = _empty_acc(rewards)
    streams = {"R": _stream(rewards), "V": _stream(q_taken), "NV": _stream(next_v), "LR": _stream(log_rhos),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_RETRACE.value, 1, True, rewards, cu_seqlens, streams, [out], params=(gamma, lam, 1.0, c_clip, 1.0))
    return out


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_retrace_backward", mutates_args=())
def retrace_backward(grad: Tensor, targets: Tensor, q_taken: Tensor, log_rhos: Tensor, terminated: Tensor | None,
                     truncated: Tensor | None, mask: Tensor | None, cu_seqlens: Tensor | None, gamma: float,
                     lam: float, c_clip: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of retrace (a forward-time walk) from the forward's targets. Returns (grad_rewards,
    grad_q_taken, grad_next_v, grad_log_rhos) in the accumulation dtype."""
    acc = targets.dtype
    outs = [torch.empty(targets.shape, dtype=acc, device=targets.device) for _ in range(4)]
    streams = {"V": _stream(q_taken), "LR": _stream(log_rhos), "G0": _stream(grad, acc), "S0": _stream(targets),
               "TERM": flag(terminated), "TRUNC": flag(truncated), "MASK": flag(mask)}
    _run_scan(_RETRACE_BACKWARD.value, 1, False, targets, cu_seqlens, streams, outs,
              params=(gamma, lam, 1.0, c_clip, 1.0))
    return tuple(outs)


_formulas.register_retrace(retrace, torch.ops.rlkernels.triton_retrace_backward)
