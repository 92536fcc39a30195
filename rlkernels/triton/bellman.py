"""Triton kernels of the Bellman family (docs/design.md §4.5): q_targets, td_loss (+ backward), n_step_returns
(+ backward), bellman_backup and value_iteration.

Each op has the signature of its C++ schema in csrc/ops.cpp and mirrors the CPU kernels of csrc/cpu/bellman_*.cpp
(the per-element math of csrc/include/rlkernels/bellman.h: NaN rules, the terminated select, first-index
argmax), so the backends agree up to the rounding of a different summation order. Inputs are read in their
own dtype and widened in registers; arithmetic is float32 (float64 for float64 inputs). Float scalars
(gamma, delta, ...) are float64 kernel arguments (`: tl.float64`; Triton would pass a Python float as fp32),
rounded to the accumulation type in the kernel as the CPU kernel's static_cast does.

* q_targets: a program per BLOCK_B rows walks the actions in [BLOCK_B, BLOCK_A] tiles, folding each tile into
  a per-row state (max and NaN flag; running max, first index of it and first NaN for "double"; the sum for
  "expected"; the online (max, sum-exp) pair for "soft").
* td_loss: a program per BLOCK rows gathers Q(s, a) and writes td_errors (and per-sample losses); for "mean"
  and "sum" each program writes one float64 partial sum, combined by a torch sum of fixed shape (no atomics:
  deterministic). The backward writes the dense grad_q tile by tile (zeros, and -g in the action's column):
  no scatter. An action outside [0, A) cannot raise without a host sync: its row reads Q(s, a) as NaN (loss,
  td_error and grad_targets NaN, grad_q zeros) instead of the CPU backend's ValueError.
* n_step_returns on canonical [O, T, I]: a program per (o, BLOCK lanes of i) walks t and, for each t, the
  window d < n (O(T n), as the CPU kernel). The backward is the CPU kernel's gather (no atomics).
* bellman_backup: a program per (MDP b, BLOCK_S states) walks the actions; Q[s, a] = R + gamma P[s, a, :] . V
  over S in BLOCK_K chunks; V_new = max_a Q (NaN wins) and the policy (first maximizing index, NaN counting as
  the maximum) are folded in action order, exactly the CPU kernel's selects.
* value_iteration: see the op's docstring (a gated launch per iteration; no host synchronization).

The ops are `torch.library.triton_op`s named ``rlkernels::triton_<name>``; autograd is the family's formulas
(rlkernels/_ops/bellman.py) around the Triton backward ops.
"""

# ruff: noqa: PLR0124  (x != x is the NaN test inside Triton kernels)

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._ops import bellman as _formulas
from ._common import (
    acc_dtype,
    flag,
    keep_whole_under_interpreter,
    pow2,
    skip_launch,
    tl_acc,
    wrap_triton,
)

Tensor = torch.Tensor

_Q_KINDS = {"max": 0, "double": 1, "expected": 2, "soft": 3}
_TD_LOSSES = ("huber", "squared")
_REDUCTIONS = ("mean", "sum", "none")

# Tile sizes (powers of two; tests shrink them to cross every tile boundary with tiny shapes).
MAX_BLOCK_A = 64  # actions per tile of the [rows, actions] ops (q_targets, td_loss_backward)
ROW_TILE = 2048  # elements per [rows, actions] tile
MAX_BLOCK_ROWS = 1024  # rows per program of td_loss
LANE_BLOCK = 128  # lanes (sequences) per program of n_step_returns
BACKUP_MAX_K = 128  # next states per [states, actions, next states] tile of P
BACKUP_MAX_A = 16  # actions per tile of P
BACKUP_TILE = 4096  # elements per tile of P
RESIDUAL_BLOCK_B = 64  # MDPs per tile of value_iteration's residual reduction
RESIDUAL_BLOCK_N = 32  # state blocks per tile of it


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _q_targets_kernel(R_ptr, Q_ptr, TERM_ptr, ON_ptr, PR_ptr, OUT_ptr, B, A, discount: tl.float64,
                      temperature: tl.float64,
                      KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr):
    """y = r + discount * v' (r where terminated), v' of kind 0 max, 1 double, 2 expected, 3 soft."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols0 = tl.arange(0, BLOCK_A).to(tl.int64)
    disc = tl.full([], discount, tl.float64).to(ACC)
    temp = tl.full([], temperature, tl.float64).to(ACC)
    m = tl.full([BLOCK_B], float("-inf"), ACC)  # max (kinds 0, 1, 3)
    s = tl.zeros([BLOCK_B], ACC)  # sum (2) or sum of exp(z - m) (3)
    nan = rows < 0  # a NaN seen (0, 3)
    arg = tl.full([BLOCK_B], A, tl.int64)  # first index of the max of the non-NaN entries (1)
    first_nan = tl.full([BLOCK_B], A, tl.int64)  # first NaN index (1)
    for a0 in range(0, A, BLOCK_A):
        cols = a0 + cols0
        ok = row_ok[:, None] & (cols[None, :] < A)
        offs = rows[:, None] * A + cols[None, :]
        if KIND == 0:
            x = tl.load(Q_ptr + offs, mask=ok, other=0).to(ACC)
            nan = nan | (tl.max((ok & (x != x)).to(tl.int32), axis=1) > 0)
            m = tl.maximum(m, tl.max(tl.where(ok & (x == x), x, float("-inf")), axis=1))
        elif KIND == 1:
            x = tl.load(ON_ptr + offs, mask=ok, other=0).to(ACC)
            first_nan = tl.minimum(first_nan, tl.min(tl.where(ok & (x != x), cols[None, :], A), axis=1))
            good = ok & (x == x)
            tmax = tl.max(tl.where(good, x, float("-inf")), axis=1)
            targ = tl.min(tl.where(good & (x == tmax[:, None]), cols[None, :], A), axis=1)
            take = (tmax > m) | (arg == A)
            arg = tl.where(take, targ, arg)
            m = tl.maximum(m, tmax)
        elif KIND == 2:
            x = tl.load(Q_ptr + offs, mask=ok, other=0).to(ACC)
            p = tl.load(PR_ptr + offs, mask=ok, other=0).to(ACC)
            s += tl.sum(p * x, axis=1)
        else:
            z = tl.load(Q_ptr + offs, mask=ok, other=0).to(ACC) / temp
            nan = nan | (tl.max((ok & (z != z)).to(tl.int32), axis=1) > 0)
            good = ok & (z == z)
            new_m = tl.maximum(m, tl.max(tl.where(good, z, float("-inf")), axis=1))
            # m = new_m = -inf (nothing but -inf yet) or +inf: keep s as is, never exp(nan).
            scale = tl.where(m == new_m, 1.0, tl.exp(m - new_m))
            add = tl.sum(tl.where(good & (z != float("-inf")), tl.exp(z - new_m[:, None]), 0.0), axis=1)
            s = s * scale + add
            m = new_m
    if KIND == 0:
        v = tl.where(nan, float("nan"), m)
    elif KIND == 1:
        idx = tl.minimum(tl.where(first_nan < A, first_nan, arg), A - 1)  # A - 1: padding rows only
        v = tl.load(Q_ptr + rows * A + idx, mask=row_ok, other=0).to(ACC)
    elif KIND == 2:
        v = s
    else:
        # temperature * logsumexp: -inf for a row of -inf, +inf with a +inf, NaN with a NaN.
        v = tl.where((m == float("inf")) | (m == float("-inf")), m, temp * (m + tl.log(s)))
        v = tl.where(nan, float("nan"), v)
    r = tl.load(R_ptr + rows, mask=row_ok, other=0).to(ACC)
    y = r + disc * v
    if TERM_ptr is not None:
        y = tl.where(tl.load(TERM_ptr + rows, mask=row_ok, other=0) != 0, r, y)
    tl.store(OUT_ptr + rows, y, mask=row_ok)


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_q_targets", mutates_args=())
def q_targets(rewards: Tensor, next_q: Tensor, terminated: Tensor | None, next_q_online: Tensor | None,
              next_probs: Tensor | None, discount: float, kind: str, temperature: float) -> Tensor:
    """rewards [B], next_q (and next_q_online / next_probs) [B, A] of one dtype, terminated bool [B] or None;
    discount = gamma^n. Targets [B] in the accumulation dtype."""
    torch._check(kind in _Q_KINDS, lambda: f"rlkernels: kind must be one of {tuple(_Q_KINDS)}, got {kind!r}")
    B, A = next_q.shape
    torch._check(A >= 1, lambda: "rlkernels: next_q needs at least one action")
    code = _Q_KINDS[kind]
    torch._check(code != 1 or next_q_online is not None, lambda: "rlkernels: kind='double' needs next_q_online")
    torch._check(code != 2 or next_probs is not None, lambda: "rlkernels: kind='expected' needs next_probs")
    out = torch.empty((B,), dtype=acc_dtype(next_q.dtype), device=next_q.device)
    if B > 0 and not skip_launch(out):
        block_a = pow2(A, 2, MAX_BLOCK_A)
        block_b = pow2(B, 16, max(2, ROW_TILE // block_a))
        wrap_triton(_q_targets_kernel)[(triton.cdiv(B, block_b),)](
            rewards.contiguous(), next_q.contiguous(), flag(terminated),
            next_q_online.contiguous() if code == 1 else None, next_probs.contiguous() if code == 2 else None,
            out, B, A, float(discount), float(temperature), KIND=code, ACC=tl_acc(next_q.dtype),
            BLOCK_B=block_b, BLOCK_A=block_a)
    return out


# ----------------------------------------------------------------------------------------------------
# td_loss
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _td_error(Q_ptr, ACT_ptr, Y_ptr, rows, ok, A, ACC: tl.constexpr):
    """(e = y - Q[row, action], action); e is NaN for an action outside [0, A)."""
    act = tl.load(ACT_ptr + rows, mask=ok, other=0)
    valid = ok & (act >= 0) & (act < A)
    q = tl.load(Q_ptr + rows * A + act, mask=valid, other=0).to(ACC)
    q = tl.where(valid | ~ok, q, float("nan"))
    y = tl.load(Y_ptr + rows, mask=ok, other=0).to(ACC)
    return y - q, act


@triton.jit
def _td_forward_kernel(Q_ptr, ACT_ptr, Y_ptr, W_ptr, E_ptr, PER_ptr, PART_ptr, B, A, delta: tl.float64,
                       SQUARED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Huber 0.5 e^2 (|e| <= delta) or delta (|e| - 0.5 delta); squared e^2; times w. Writes e, and the
    per-sample losses (PER_ptr) or this block's float64 partial sum (PART_ptr)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    e, _ = _td_error(Q_ptr, ACT_ptr, Y_ptr, rows, ok, A, ACC)
    if SQUARED:
        loss = e * e
    else:
        d = tl.full([], delta, tl.float64).to(ACC)
        a = tl.abs(e)
        loss = tl.where(a <= d, 0.5 * e * e, d * (a - 0.5 * d))
    if W_ptr is not None:
        loss = loss * tl.load(W_ptr + rows, mask=ok, other=0).to(ACC)
    tl.store(E_ptr + rows, e, mask=ok)
    if PER_ptr is not None:
        tl.store(PER_ptr + rows, loss, mask=ok)
    else:
        tl.store(PART_ptr + pid, tl.sum(tl.where(ok, loss.to(tl.float64), 0.0), axis=0))


@triton.jit
def _td_backward_kernel(Q_ptr, ACT_ptr, Y_ptr, W_ptr, GL_ptr, GT_ptr, GQ_ptr, GY_ptr, B, A, delta: tl.float64,
                        SQUARED: tl.constexpr, GL_PER_ROW: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr):
    """g = gl * w * dloss/de (+ grad of td_errors); grad_targets = g, grad_q = -g at the action, 0 elsewhere.
    GL_ptr holds the reduction-scaled upstream gradient of the loss ([1] or [B], accumulation dtype)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = rows < B
    e, act = _td_error(Q_ptr, ACT_ptr, Y_ptr, rows, ok, A, ACC)
    g = tl.zeros([BLOCK_B], ACC)
    if GL_ptr is not None:
        if GL_PER_ROW:
            gw = tl.load(GL_ptr + rows, mask=ok, other=0).to(ACC)
        else:
            gw = tl.load(GL_ptr + rows * 0, mask=ok, other=0).to(ACC)
        if W_ptr is not None:
            gw = gw * tl.load(W_ptr + rows, mask=ok, other=0).to(ACC)
        if SQUARED:
            de = 2.0 * e
        else:
            d = tl.full([], delta, tl.float64).to(ACC)
            de = tl.where(e > d, d, tl.where(e < -d, -d, e))
        g = gw * de
    if GT_ptr is not None:
        g += tl.load(GT_ptr + rows, mask=ok, other=0).to(ACC)
    tl.store(GY_ptr + rows, g.to(GY_ptr.dtype.element_ty), mask=ok)
    neg = -g
    cols0 = tl.arange(0, BLOCK_A).to(tl.int64)
    for a0 in range(0, A, BLOCK_A):
        cols = a0 + cols0
        val = tl.where(cols[None, :] == act[:, None], neg[:, None], 0.0)
        tl.store(GQ_ptr + rows[:, None] * A + cols[None, :], val.to(GQ_ptr.dtype.element_ty),
                 mask=ok[:, None] & (cols[None, :] < A))


def _td_check(q, loss, reduction):
    torch._check(loss in _TD_LOSSES, lambda: f"rlkernels: loss must be 'huber' or 'squared', got {loss!r}")
    torch._check(reduction in _REDUCTIONS,
                 lambda: f"rlkernels: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    torch._check(q.dim() == 2, lambda: f"rlkernels: q must be [B, A], got {tuple(q.shape)}")


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_td_loss", mutates_args=())
def td_loss(q: Tensor, actions: Tensor, targets: Tensor, weights: Tensor | None, loss: str, delta: float,
            reduction: str) -> tuple[Tensor, Tensor]:
    """q [B, A], actions int64 [B], targets and weights [B] of q's dtype. Returns (loss: 0-d for mean and sum,
    [B] for none; td_errors [B]), both in the accumulation dtype."""
    _td_check(q, loss, reduction)
    B, A = q.shape
    acc = acc_dtype(q.dtype)
    block = pow2(B, 16, MAX_BLOCK_ROWS)
    num_blocks = triton.cdiv(B, block)
    td = torch.empty((B,), dtype=acc, device=q.device)
    per = torch.empty((B,), dtype=acc, device=q.device) if reduction == "none" else None
    parts = None if reduction == "none" else torch.zeros((num_blocks,), dtype=torch.float64, device=q.device)
    if B > 0 and not skip_launch(td):
        wrap_triton(_td_forward_kernel)[(num_blocks,)](
            q.contiguous(), actions.contiguous(), targets.contiguous(),
            None if weights is None else weights.contiguous(), td, per, parts, B, A, float(delta),
            SQUARED=loss == "squared", ACC=tl_acc(q.dtype), BLOCK=block)
    if per is not None:
        return per, td
    total = parts.sum()  # float64 partials of a fixed grid, summed in a fixed order
    if reduction == "mean" and B > 0:
        total = total / B
    return total.to(acc), td


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_td_loss_backward", mutates_args=())
def td_loss_backward(grad_loss: Tensor | None, grad_td_errors: Tensor | None, q: Tensor, actions: Tensor,
                     targets: Tensor, weights: Tensor | None, loss: str, delta: float,
                     reduction: str) -> tuple[Tensor, Tensor]:
    """Dense grad_q (q's dtype, one non-zero per row) and grad_targets (targets' dtype)."""
    _td_check(q, loss, reduction)
    B, A = q.shape
    acc = acc_dtype(q.dtype)
    grad_q = torch.empty((B, A), dtype=q.dtype, device=q.device)
    grad_y = torch.empty((B,), dtype=targets.dtype, device=targets.device)
    gl = None
    if grad_loss is not None:
        # The CPU kernel's (grad_loss * scale) in float64, then the accumulation dtype.
        gl = grad_loss.to(torch.float64).reshape(-1)
        if reduction == "mean":
            gl = gl * (1.0 / B if B > 0 else 0.0)
        gl = gl.to(acc).contiguous()
    gt = None if grad_td_errors is None else grad_td_errors.to(acc).reshape(-1).contiguous()
    if B > 0 and not skip_launch(grad_q):
        block_a = pow2(A, 2, MAX_BLOCK_A)
        block_b = pow2(B, 16, max(2, ROW_TILE // block_a))
        wrap_triton(_td_backward_kernel)[(triton.cdiv(B, block_b),)](
            q.contiguous(), actions.contiguous(), targets.contiguous(),
            None if weights is None else weights.contiguous(), gl, gt, grad_q, grad_y, B, A, float(delta),
            SQUARED=loss == "squared", GL_PER_ROW=reduction == "none", ACC=tl_acc(q.dtype), BLOCK_B=block_b,
            BLOCK_A=block_a)
    return grad_q, grad_y


_formulas.register_td_loss(td_loss, torch.ops.rlkernels.triton_td_loss_backward)


# ----------------------------------------------------------------------------------------------------
# n_step_returns on canonical [O, T, I]
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _n_step_kernel(R_ptr, V_ptr, NV_ptr, BOOT_ptr, TERM_ptr, TRUNC_ptr, OUT_ptr, T, I, num_blocks, gamma: tl.float64,
                   n,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    """G_t = sum_{d<m} gamma^d r_{t+d} + gamma^m (1 - term_j) V'_j, j = t + m - 1 the first step of the window
    that is terminated, truncated, the last of the data or the n-th; V'_j = next_values[j], values[j+1] or the
    bootstrap value (0 if None)."""
    pid = tl.program_id(0).to(tl.int64)  # one grid axis of O * num_blocks programs (GPU axis 1 stops at 65535)
    o = pid // num_blocks
    lanes = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < I
    base = o * T * I + lanes
    g = tl.full([], gamma, tl.float64).to(ACC)
    boot = tl.zeros([BLOCK], ACC)
    if BOOT_ptr is not None:
        boot = tl.load(BOOT_ptr + o * I + lanes, mask=ok, other=0).to(ACC)
    never = lanes < 0
    for t in range(T):
        G = tl.zeros([BLOCK], ACC)
        alive = ok
        disc = tl.full([], 1.0, ACC)
        for d in range(n):
            j = t + d
            alive = alive & (j < T)  # the window ended at T - 1 already (kept for the loads' masks)
            k = base + j * I
            G = tl.where(alive, G + disc * tl.load(R_ptr + k, mask=alive, other=0).to(ACC), G)
            tm = never
            if TERM_ptr is not None:
                tm = tl.load(TERM_ptr + k, mask=alive, other=0) != 0
            tr = never
            if TRUNC_ptr is not None:
                tr = tl.load(TRUNC_ptr + k, mask=alive, other=0) != 0
            stop = alive & (tm | tr | (j == T - 1) | (d == n - 1))
            if NV_ptr is not None:
                vn = tl.load(NV_ptr + k, mask=stop, other=0).to(ACC)
            else:
                vn = tl.load(V_ptr + k + I, mask=stop & (j + 1 < T), other=0).to(ACC)
                vn = tl.where(j + 1 < T, vn, boot)
            G = tl.where(stop, G + disc * g * (1.0 - tm.to(ACC)) * vn, G)
            alive = alive & ~stop
            disc = disc * g
        tl.store(OUT_ptr + base + t * I, G, mask=ok)


@triton.jit
def _n_step_backward_kernel(G_ptr, TERM_ptr, TRUNC_ptr, GR_ptr, GV_ptr, GNV_ptr, GB_ptr, T, I, num_blocks,
                            gamma: tl.float64,
                            n,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The adjoint as a gather (no atomics): reward j is summed by the windows t = j, j-1, ... that reach it
    (no step t..j-1 stops them); V'_j is read by the windows that end at j. GV and GB arrive zeroed."""
    pid = tl.program_id(0).to(tl.int64)  # one grid axis of O * num_blocks programs (GPU axis 1 stops at 65535)
    o = pid // num_blocks
    lanes = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < I
    base = o * T * I + lanes
    g = tl.full([], gamma, tl.float64).to(ACC)
    gamma_n = tl.full([], 1.0, ACC)
    for _ in range(n):
        gamma_n = gamma_n * g
    never = lanes < 0
    for j in range(T):
        kj = base + j * I
        acc_r = tl.zeros([BLOCK], ACC)
        disc = tl.full([], 1.0, ACC)
        going = ok
        for d in range(n):
            t = j - d
            kt = base + t * I
            going = going & (t >= 0)
            if TERM_ptr is not None:
                going = going & ~((tl.load(TERM_ptr + kt, mask=going, other=0) != 0) & (d > 0))
            if TRUNC_ptr is not None:
                going = going & ~((tl.load(TRUNC_ptr + kt, mask=going, other=0) != 0) & (d > 0))
            acc_r = tl.where(going, acc_r + disc * tl.load(G_ptr + kt, mask=going, other=0).to(ACC), acc_r)
            disc = disc * g
        tl.store(GR_ptr + kj, acc_r, mask=ok)
        tm = never
        if TERM_ptr is not None:
            tm = tl.load(TERM_ptr + kj, mask=ok, other=0) != 0
        natural = tm | (j == T - 1)
        if TRUNC_ptr is not None:
            natural = natural | (tl.load(TRUNC_ptr + kj, mask=ok, other=0) != 0)
        # going = the window of t = j - n + 1 reaches j in full (n steps, none stopped before j)
        g_first = tl.load(G_ptr + base + (j - n + 1) * I, mask=ok & going & ~natural, other=0).to(ACC)
        gvn = tl.where(natural, g * acc_r, tl.where(going, gamma_n * g_first, 0.0))
        gvn = tl.where(tm, 0.0, gvn)
        if GNV_ptr is not None:
            tl.store(GNV_ptr + kj, gvn, mask=ok)
        else:
            tl.store(GV_ptr + kj + I, gvn, mask=ok & (j + 1 < T))
            tl.store(GB_ptr + o * I + lanes, gvn, mask=ok & (j + 1 >= T))


def _lane_grid(O, I):
    """(lanes per program, programs per outer index, the 1-D grid of O times those programs)."""
    block = pow2(I, 16, LANE_BLOCK)
    num_blocks = triton.cdiv(I, block)
    return block, num_blocks, (O * num_blocks,)


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_n_step_returns", mutates_args=())
def n_step_returns(rewards: Tensor, values: Tensor, next_values: Tensor | None, bootstrap_value: Tensor | None,
                   terminated: Tensor | None, truncated: Tensor | None, gamma: float, n: int) -> Tensor:
    """Canonical [O, T, I] inputs of one dtype (bootstrap_value [O, I]); returns in the accumulation dtype."""
    torch._check(n >= 1, lambda: f"rlkernels: n must be >= 1, got {n}")
    torch._check(rewards.dim() == 3, lambda: "rlkernels: rewards must be canonical [O, T, I]")
    O, T, I = rewards.shape
    out = torch.empty(rewards.shape, dtype=acc_dtype(rewards.dtype), device=rewards.device)
    if O * T * I > 0 and not skip_launch(out):
        block, num_blocks, grid = _lane_grid(O, I)
        wrap_triton(_n_step_kernel)[grid](
            rewards.contiguous(), values.contiguous(), None if next_values is None else next_values.contiguous(),
            None if bootstrap_value is None else bootstrap_value.contiguous(), flag(terminated), flag(truncated),
            out, T, I, num_blocks, float(gamma), n, ACC=tl_acc(rewards.dtype), BLOCK=block)
    return out


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_n_step_returns_backward", mutates_args=())
def n_step_returns_backward(grad: Tensor, terminated: Tensor | None, truncated: Tensor | None,
                            rewards_like: Tensor, gamma: float, n: int,
                            has_next_values: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_rewards, grad_values, grad_next_values ([0] without next values), grad_bootstrap_value [O, I]),
    all in the accumulation dtype."""
    torch._check(n >= 1, lambda: f"rlkernels: n must be >= 1, got {n}")
    O, T, I = rewards_like.shape
    acc = acc_dtype(rewards_like.dtype)
    dev = rewards_like.device
    g_r = torch.empty((O, T, I), dtype=acc, device=dev)
    g_v = torch.zeros((O, T, I), dtype=acc, device=dev)
    g_nv = torch.empty((O, T, I) if has_next_values else (0,), dtype=acc, device=dev)
    g_b = torch.zeros((O, I), dtype=acc, device=dev)
    if O * T * I > 0 and not skip_launch(g_r):
        block, num_blocks, grid = _lane_grid(O, I)
        wrap_triton(_n_step_backward_kernel)[grid](
            grad.to(acc).contiguous(), flag(terminated), flag(truncated), g_r, g_v,
            g_nv if has_next_values else None, g_b, T, I, num_blocks, float(gamma), n, ACC=tl_acc(acc), BLOCK=block)
    return g_r, g_v, g_nv, g_b


_formulas.register_n_step_returns(n_step_returns, torch.ops.rlkernels.triton_n_step_returns_backward)


# ----------------------------------------------------------------------------------------------------
# bellman_backup and value_iteration
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _backup_kernel(P_ptr, R_ptr, V_ptr, Q_ptr, VN_ptr, POL_ptr, PART_ptr, STATE_ptr, S, A, gamma: tl.float64,
                   num_blocks,
                   ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q = R + gamma P @ V, V_new = max_a Q, policy = argmax_a Q for BLOCK_S states of MDP b, in
    [BLOCK_S, BLOCK_A, BLOCK_K] tiles of P. With STATE_ptr (value iteration) the program does nothing once
    STATE_ptr[0] (done) is set, and writes its block's part of the residual max_s |V_new - V| to PART_ptr."""
    run = True
    if STATE_ptr is not None:
        run = tl.load(STATE_ptr) == 0
    if run:
        pid = tl.program_id(0).to(tl.int64)  # one grid axis of B * num_blocks programs (GPU axis 1: <= 65535)
        b = pid // num_blocks
        blk = pid % num_blocks
        states = blk * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = states < S
        bs = b * S + states  # row of (b, s) in [B * S]
        cols0 = tl.arange(0, BLOCK_A).to(tl.int64)
        ks0 = tl.arange(0, BLOCK_K).to(tl.int64)
        g = tl.full([], gamma, tl.float64).to(ACC)
        # Folded over the action chunks as the CPU kernel folds over actions: V_new is NaN if any Q is,
        # else the max; the policy is the first NaN, else the first index of the max (0 when A = 0).
        m = tl.full([BLOCK_S], float("-inf"), ACC)
        arg = tl.full([BLOCK_S], A, tl.int64)
        first_nan = tl.full([BLOCK_S], A, tl.int64)
        for a0 in range(0, A, BLOCK_A):
            cols = a0 + cols0
            sa_ok = s_ok[:, None] & (cols[None, :] < A)
            sa = bs[:, None] * A + cols[None, :]  # [BLOCK_S, BLOCK_A] rows of P
            dot = tl.zeros([BLOCK_S, BLOCK_A], ACC)
            for k0 in range(0, S, BLOCK_K):
                ks = k0 + ks0
                k_ok = ks < S
                v = tl.load(V_ptr + b * S + ks, mask=k_ok, other=0).to(ACC)
                p = tl.load(P_ptr + sa[:, :, None] * S + ks[None, None, :],
                            mask=sa_ok[:, :, None] & k_ok[None, None, :], other=0).to(ACC)
                dot += tl.sum(p * v[None, None, :], axis=2)
            q = tl.load(R_ptr + sa, mask=sa_ok, other=0).to(ACC) + g * dot
            tl.store(Q_ptr + sa, q, mask=sa_ok)
            first_nan = tl.minimum(first_nan, tl.min(tl.where(sa_ok & (q != q), cols[None, :], A), axis=1))
            good = sa_ok & (q == q)
            tmax = tl.max(tl.where(good, q, float("-inf")), axis=1)
            targ = tl.min(tl.where(good & (q == tmax[:, None]), cols[None, :], A), axis=1)
            arg = tl.where((tmax > m) | (arg == A), targ, arg)
            m = tl.maximum(m, tmax)
        has_nan = first_nan < A
        v_new = tl.where(has_nan, float("nan"), m)
        tl.store(VN_ptr + bs, v_new, mask=s_ok)
        tl.store(POL_ptr + bs, tl.where(has_nan, first_nan, tl.where(arg == A, 0, arg)), mask=s_ok)
        if PART_ptr is not None:
            diff = tl.abs(v_new - tl.load(V_ptr + bs, mask=s_ok, other=0).to(ACC))
            nan_part = tl.max((s_ok & (diff != diff)).to(tl.int32), axis=0) > 0
            part = tl.max(tl.where(s_ok & (diff == diff), diff, 0.0), axis=0)
            tl.store(PART_ptr + b * num_blocks + blk, tl.where(nan_part, float("nan"), part))


@triton.jit
def _vi_residual_kernel(PART_ptr, RES_ptr, STATE_ptr, B, num_blocks, tol: tl.float64, max_iters,
                        ACC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program. Unless done: residual[b] = max of MDP b's block parts (NaN propagates), iters += 1, and
    done = every residual < tol (NaN is not) or iters == max_iters. STATE = [done, iters] (int64)."""
    if tl.load(STATE_ptr) == 0:
        tol_acc = tl.full([], tol, tl.float64).to(ACC)
        all_ok = tl.full([], 1, tl.int32)
        cols0 = tl.arange(0, BLOCK_N).to(tl.int64)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            b_ok = bs < B
            res = tl.zeros([BLOCK_B], ACC)
            has_nan = bs < 0
            for c0 in range(0, num_blocks, BLOCK_N):
                cols = c0 + cols0
                m = b_ok[:, None] & (cols[None, :] < num_blocks)
                x = tl.load(PART_ptr + bs[:, None] * num_blocks + cols[None, :], mask=m, other=0).to(ACC)
                has_nan = has_nan | (tl.max((m & (x != x)).to(tl.int32), axis=1) > 0)
                res = tl.maximum(res, tl.max(tl.where(m & (x == x), x, 0.0), axis=1))
            res = tl.where(has_nan, float("nan"), res)
            tl.store(RES_ptr + bs, res, mask=b_ok)
            all_ok = all_ok * tl.min(((res < tol_acc) | ~b_ok).to(tl.int32), axis=0)
        iters = tl.load(STATE_ptr + 1) + 1
        tl.store(STATE_ptr + 1, iters)
        tl.store(STATE_ptr, tl.where((all_ok != 0) | (iters >= max_iters), 1, 0).to(tl.int64))


def _backup_blocks(S, A):
    """(BLOCK_S, BLOCK_A, BLOCK_K, number of state blocks): tiles of about 4096 elements of P."""
    block_k = pow2(S, 16, BACKUP_MAX_K)
    block_a = pow2(A, 2, BACKUP_MAX_A)
    block_s = pow2(S, 2, max(2, BACKUP_TILE // (block_k * block_a)))
    return block_s, block_a, block_k, triton.cdiv(S, block_s)


# Under TRITON_INTERPRET=1 (CPU tensors) value_iteration stops enqueuing once done is set: every launch after
# it would do nothing, and interpreted launches are slow. Tests turn it off to run the gated launches too.
_STOP_EARLY_ON_CPU = True


def _launch_backup(P, R, V, Q, V_new, policy, parts, state, gamma):
    B, S, A, _ = P.shape
    block_s, block_a, block_k, num_blocks = _backup_blocks(S, A)
    wrap_triton(_backup_kernel)[(B * num_blocks,)](
        P, R, V, Q, V_new, policy, parts, state, S, A, float(gamma), num_blocks, ACC=tl_acc(P.dtype),
        BLOCK_S=block_s, BLOCK_A=block_a, BLOCK_K=block_k, num_warps=4)


def _check_mdp(P, R, V):
    torch._check(P.dim() == 4 and P.shape[1] == P.shape[3],
                 lambda: f"rlkernels: P must be [B, S, A, S], got {tuple(P.shape)}")
    torch._check(tuple(R.shape) == tuple(P.shape[:3]), lambda: f"rlkernels: R must be [B, S, A], got {tuple(R.shape)}")
    if V is not None:
        torch._check(tuple(V.shape) == tuple(P.shape[:2]), lambda: f"rlkernels: V must be [B, S], got {tuple(V.shape)}")


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_bellman_backup", mutates_args=())
def bellman_backup(P: Tensor, R: Tensor, V: Tensor, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """P [B, S, A, S], R [B, S, A], V [B, S] of one dtype. Q [B, S, A] and V_new [B, S] in the accumulation
    dtype, policy int64 [B, S]."""
    _check_mdp(P, R, V)
    B, S, A, _ = P.shape
    acc = acc_dtype(P.dtype)
    Q = torch.empty((B, S, A), dtype=acc, device=P.device)
    V_new = torch.empty((B, S), dtype=acc, device=P.device)
    policy = torch.empty((B, S), dtype=torch.int64, device=P.device)
    if B * S > 0 and not skip_launch(Q):
        _launch_backup(P.contiguous(), R.contiguous(), V.contiguous(), Q, V_new, policy, None, None, gamma)
    return Q, V_new, policy


_formulas.register_bellman_backup(bellman_backup)


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_value_iteration", mutates_args=())
def value_iteration(P: Tensor, R: Tensor, V0: Tensor | None, gamma: float, tol: float,
                    max_iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Value iteration with the reference's stopping rule and no host synchronization.

    All MDPs iterate together: ``iters`` is the first k after which every MDP's residual
    max_s |V_k - V_{k-1}| is < tol (a NaN residual never is), capped at ``max_iters``; V, Q, policy and
    residual come from backup ``iters``. Returns (V [B, S], Q [B, S, A], policy [B, S], iters (0-d int64),
    residual [B]).

    Design: the host enqueues exactly ``max_iters`` iterations without ever reading a value. An iteration is
    two launches: the backup kernel (a program per (MDP, block of states), as bellman_backup; V ping-pongs
    between two buffers, and each program also writes its block's part of the residual), then a one-program
    kernel that reduces the parts to residual[b], counts the iteration and sets a device-side "done" flag when
    every residual is < tol or max_iters is reached. Both kernels first read the flag and do nothing once it
    is set, so the iterations after convergence cost two near-empty launches each. The result is exact (each
    iteration is one full synchronous backup of every MDP, the rule evaluated after each) and the op can be
    captured in a CUDA graph. The cost: 2 * max_iters launches whatever the convergence (about 2 to 5 µs
    each on the GPU once enqueued, plus the host's enqueue time, tens of µs per Triton launch from Python;
    keep max_iters near what is needed, or capture the call in a CUDA graph), and P is streamed from memory
    once per iteration (no MDP stays in cache across iterations, unlike the CPU kernel). Under torch.compile
    on a GPU the loop unrolls into 2 * max_iters kernel nodes of the graph (compile time grows with
    max_iters). The alternative, a persistent program per MDP iterating in rounds as the CPU kernel does,
    needs the host (or a grid-wide barrier) to learn the batch's iteration count between rounds, so it was
    not taken. Under TRITON_INTERPRET=1 (CPU tensors, where a read synchronizes nothing) the host loop stops
    at the flag instead of enqueuing the no-op launches (`_STOP_EARLY_ON_CPU`).
    """
    _check_mdp(P, R, V0)
    torch._check(max_iters >= 1, lambda: f"rlkernels: max_iters must be >= 1, got {max_iters}")
    B, S, A, _ = P.shape
    acc = acc_dtype(P.dtype)
    dev = P.device
    buf = torch.zeros((2, B, S), dtype=acc, device=dev)  # V after an even / odd number of backups
    if V0 is not None:
        buf = torch.stack([V0.to(acc), buf[1]])
    Q = torch.zeros((B, S, A), dtype=acc, device=dev)
    policy = torch.zeros((B, S), dtype=torch.int64, device=dev)
    residual = torch.zeros((B,), dtype=acc, device=dev)
    state = torch.zeros((2,), dtype=torch.int64, device=dev)  # [done, iters]
    num_blocks = _backup_blocks(S, A)[3]
    parts = torch.zeros((B, num_blocks), dtype=acc, device=dev)
    if not skip_launch(Q):
        P, R = P.contiguous(), R.contiguous()
        block_b = pow2(B, 16, RESIDUAL_BLOCK_B)
        block_n = pow2(num_blocks, 2, RESIDUAL_BLOCK_N)
        for k in range(max_iters):
            if B * S > 0:
                _launch_backup(P, R, buf[k % 2], Q, buf[(k + 1) % 2], policy, parts, state, gamma)
            wrap_triton(_vi_residual_kernel)[(1,)](
                parts, residual, state, B, num_blocks, float(tol), max_iters, ACC=tl_acc(P.dtype),
                BLOCK_B=block_b, BLOCK_N=block_n)
            if _STOP_EARLY_ON_CPU and state.device.type == "cpu" and bool(state[0]):
                break  # interpreter only: a CPU tensor is read without a device sync; the launches left are no-ops
    iters = state[1].clone()
    V = torch.where(iters % 2 == 1, buf[1], buf[0])
    return V, Q, policy, iters, residual
