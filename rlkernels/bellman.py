"""Bellman backups (docs/design.md §4.5): q_targets, td_loss, n_step_returns, bellman_backup, value_iteration.

Sample-based ops work on a replay batch (``next_q [..., A]``, one reward per transition); model-based ops
on known MDPs (``P [..., S, A, S]``, ``R [..., S, A]``). The wrappers check arguments, bring inputs to the
kernels' canonical layout (flat rows, one dtype; rlkernels/_layout.py) and run the backend's op
(rlkernels/_dispatch.py); the ops' autograd is in rlkernels/_ops/bellman.py. Outputs are float32 for 16-bit
inputs, else the input dtype.
"""

from __future__ import annotations

import math

import torch

from . import _checks as checks
from . import _dispatch as dispatch
from ._layout import ScanLayout, check_truncated, int_arg, mdp_tensors
from .returns import _on_device

__all__ = ["bellman_backup", "n_step_returns", "q_targets", "td_loss", "value_iteration"]

Q_KINDS = ("max", "double", "expected", "soft")
TD_LOSSES = ("huber", "squared")
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------
# Sample-based: q_targets, td_loss
# ----------------------------------------------------------------------------------------------------


def _per_transition(op, name, x, lead, ref_name):
    """One entry per transition: ``lead`` (the leading shape of ``ref_name``, [..., A]) or ``lead + (1,)``, the
    [B, 1] columns in which CleanRL's and SB3's replay buffers store actions, rewards and dones (a view
    without the trailing 1 is returned)."""
    if x is None or x.shape == lead:
        return x
    if x.shape == (*lead, 1):
        return x.reshape(lead)
    raise ValueError(f"rlkernels.{op}: {name} must hold one entry per transition, shape {lead} or {(*lead, 1)} "
                     f"({ref_name}'s shape {(*lead, 'A')} without A), got {tuple(x.shape)}")


def q_targets(rewards, next_q, *, terminated=None, gamma=0.99, kind="max", next_q_online=None, next_probs=None,
              temperature=None, n=1, backend=None):
    """Q-learning targets y = r + gamma^n * (1 - terminated) * v' over a batch of transitions.

    v' = max_a Q'(s', a)                                  kind="max" (DQN)
       = Q'(s', argmax_a Q_online(s', a))                 kind="double" (Double DQN; first index on ties)
       = sum_a pi(a | s') Q'(s', a)                       kind="expected" (expected SARSA; pi = next_probs)
       = temperature * logsumexp(Q'(s', .) / temperature) kind="soft" (soft Q-learning / discrete SAC)

    ``next_q`` (and ``next_q_online``, ``next_probs``) are [..., A]; ``rewards`` and ``terminated`` are [...],
    or [..., 1] as CleanRL's and SB3's replay buffers store them (y then has that shape too).
    ``n`` discounts an n-step transition (rewards already summed over the n steps). Where ``terminated`` is
    set the target is the reward alone, whatever next_q holds (a terminal observation's Q-values may be
    garbage, even inf). Targets carry no gradient: every input is read as data.
    """
    op = "q_targets"
    if _on_device(gamma):
        # A GPU tensor is not read on the host (docs/design.md §3): y = r + gamma^n * (targets with r = 0, gamma = 1).
        g = checks.scalar_tensor(op, "gamma", gamma)
        checks.float_tensor(op, "rewards", rewards)
        v = q_targets(torch.zeros_like(rewards), next_q, terminated=terminated, gamma=1.0, kind=kind,
                      next_q_online=next_q_online, next_probs=next_probs, temperature=temperature, n=n,
                      backend=backend)
        checks.same_device(op, "next_q", next_q, gamma=g)
        return rewards.detach().to(v.dtype) + g.detach().to(v.dtype) ** n * v
    gamma = checks.unit_interval(op, "gamma", gamma)
    n = int_arg(op, "n", n, 1)
    if kind not in Q_KINDS:
        raise ValueError(f"rlkernels.{op}: kind must be one of {Q_KINDS}, got {kind!r}")
    checks.float_tensor(op, "rewards", rewards)
    checks.float_tensor(op, "next_q", next_q)
    online = checks.float_tensor(op, "next_q_online", next_q_online, optional=True)
    probs = checks.float_tensor(op, "next_probs", next_probs, optional=True)
    term = checks.flag_tensor(op, "terminated", terminated)
    if kind == "double" and online is None:
        raise ValueError(f"rlkernels.{op}: kind='double' needs next_q_online (the online network's Q(s', .))")
    if kind == "expected" and probs is None:
        raise ValueError(f"rlkernels.{op}: kind='expected' needs next_probs (the policy's pi(. | s'))")
    if kind == "soft":
        if temperature is None:
            raise ValueError(f"rlkernels.{op}: kind='soft' needs temperature > 0, got None")
        temperature = checks.temperature(op, temperature)
    else:
        temperature = 1.0
    checks.same_device(op, "next_q", next_q, rewards=rewards, next_q_online=online, next_probs=probs,
                       terminated=term)
    if next_q.dim() < 1:
        raise ValueError(f"rlkernels.{op}: next_q must have shape [..., A], got a 0-d tensor")
    if next_q.shape[-1] == 0:
        raise ValueError(f"rlkernels.{op}: next_q needs at least one action, got shape {tuple(next_q.shape)}")
    checks.same_shape(op, "next_q", next_q, next_q_online=online if kind == "double" else None,
                      next_probs=probs if kind == "expected" else None)
    out_shape = rewards.shape
    lead = tuple(next_q.shape[:-1])
    rewards = _per_transition(op, "rewards", rewards, lead, "next_q")
    term = _per_transition(op, "terminated", term, lead, "next_q")
    terminated = term
    impl = dispatch.resolve(backend, next_q.device, op)
    dtype = checks.common_float_dtype(rewards, next_q, online if kind == "double" else None,
                                      probs if kind == "expected" else None)
    if impl == "reference":
        y = dispatch.reference(op)(rewards, next_q, terminated=terminated, gamma=gamma, kind=kind,
                                   next_q_online=online, next_probs=probs,
                                   temperature=temperature if kind == "soft" else None, n=n)
        return dispatch.from_reference(y, next_q.device, dtype).reshape(out_shape)
    extra = online if kind == "double" else (probs if kind == "expected" else None)
    if (next_q.dim() == 2 and rewards.dtype == dtype and next_q.dtype == dtype
            and (extra is None or extra.dtype == dtype)
            and not (rewards.requires_grad or next_q.requires_grad or (extra is not None and extra.requires_grad))):
        # Already the op's layout: no reshapes, casts or copies (each a dispatcher call; the op makes its
        # inputs contiguous).
        y = dispatch.kernel(op, impl)(rewards, next_q, term, online if kind == "double" else None,
                                      probs if kind == "expected" else None, gamma**n, kind, temperature)
        return y if y.shape == out_shape else y.reshape(out_shape)
    A = next_q.shape[-1]
    B = math.prod(rewards.shape)

    def rows(x, shape):
        return None if x is None else x.detach().to(dtype).reshape(shape).contiguous()

    y = dispatch.kernel(op, impl)(rows(rewards, (B,)), rows(next_q, (B, A)),
                                  None if term is None else term.reshape(B).contiguous(),
                                  rows(online, (B, A)) if kind == "double" else None,
                                  rows(probs, (B, A)) if kind == "expected" else None, gamma**n, kind, temperature)
    return y.reshape(out_shape)


def td_loss(q, actions, targets, *, loss="huber", delta=1.0, weights=None, reduction="mean", backend=None):
    """TD loss on Q(s, a), gathered in the same pass. Returns (loss, td_errors).

    e = targets - q[..., actions]; per-sample loss Huber (0.5 e^2 where |e| <= delta, else
    delta * (|e| - 0.5 delta); torch's huber_loss, smooth_l1 times delta) or squared (e^2), times
    ``weights`` (importance weights of prioritized replay) if given; then the mean over the batch (0 for an
    empty batch), the sum, or none (per-sample losses shaped like ``targets``). ``td_errors`` = e, shaped like
    ``targets``, for priority updates. ``q`` is [..., A]; ``actions`` (integers), ``targets`` and ``weights`` are
    [...] or, each on its own, [..., 1] as CleanRL's and SB3's replay buffers store them (an ``actions`` column
    is read as torch.gather's index would be). Differentiable in q and targets;
    the gradient of q is dense with one non-zero per row, written without a scatter. weights are data.
    """
    op = "td_loss"
    checks.float_tensor(op, "q", q)
    checks.tensor(op, "actions", actions)
    checks.float_tensor(op, "targets", targets)
    w = checks.float_tensor(op, "weights", weights, optional=True)
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"rlkernels.{op}: actions must be an integer tensor, got {actions.dtype}")
    if loss not in TD_LOSSES:
        raise ValueError(f"rlkernels.{op}: loss must be one of {TD_LOSSES}, got {loss!r}")
    delta = checks.real(op, "delta", delta)
    if loss == "huber" and not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"rlkernels.{op}: delta must be a finite number > 0, got {delta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"rlkernels.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    checks.same_device(op, "q", q, actions=actions, targets=targets, weights=w)
    if q.dim() < 1:
        raise ValueError(f"rlkernels.{op}: q must have shape [..., A], got a 0-d tensor")
    out_shape = targets.shape
    lead = tuple(q.shape[:-1])
    actions = _per_transition(op, "actions", actions, lead, "q")
    targets = _per_transition(op, "targets", targets, lead, "q")
    w = _per_transition(op, "weights", w, lead, "q")
    impl = dispatch.resolve(backend, q.device, op)
    dtype = checks.common_float_dtype(q, targets, w)
    if impl == "reference":
        A = q.shape[-1]
        lo, e = dispatch.reference(op)(q.reshape(-1, A), actions.reshape(-1), targets.reshape(-1), loss=loss,
                                       delta=delta, weights=None if w is None else w.reshape(-1),
                                       reduction=reduction)
        lo = dispatch.from_reference(lo, q.device, dtype)
        e = dispatch.from_reference(e, q.device, dtype).reshape(out_shape)
        return (lo.reshape(out_shape) if reduction == "none" else lo), e
    if (q.dim() == 2 and actions.dim() == 1 and actions.dtype == torch.int64 and q.dtype == dtype
            and targets.dtype == dtype and w is None):
        # Already the op's layout (a replay batch): no reshapes, casts or copies, each a dispatcher call and,
        # with q requiring grad, a view node more for the backward (the op makes its inputs contiguous).
        lo, e = dispatch.kernel(op, impl)(q, actions, targets, None, loss, delta, reduction)
        if e.shape == out_shape:
            return lo, e
        return (lo.reshape(out_shape) if reduction == "none" else lo), e.reshape(out_shape)
    B, A = math.prod(actions.shape), q.shape[-1]
    lo, e = dispatch.kernel(op, impl)(q.to(dtype).reshape(B, A).contiguous(),
                                      actions.reshape(B).to(torch.int64).contiguous(),
                                      targets.to(dtype).reshape(B).contiguous(),
                                      None if w is None else w.detach().to(dtype).reshape(B).contiguous(), loss,
                                      delta, reduction)
    return (lo.reshape(out_shape) if reduction == "none" else lo), e.reshape(out_shape)


# ----------------------------------------------------------------------------------------------------
# n-step returns (on the scan family's conventions)
# ----------------------------------------------------------------------------------------------------


def n_step_returns(rewards, values, *, n, gamma=0.99, terminated=None, truncated=None, next_values=None,
                   bootstrap_value=None, time_dim=0, backend=None):
    """n-step bootstrapped returns G_t = sum_{k<m} gamma^k r_{t+k} + gamma^m (1 - term_j) V'_j.

    j = t + m - 1 is the last step summed: m = n unless the window stops early at a terminated step (its
    reward counts, no bootstrap), a truncated step or the last step of the data (bootstrap from V'_j there).
    V'_j = next_values[j] if given, else values[j+1], else (last step) ``bootstrap_value`` (0 if None), as in
    :func:`rlkernels.gae`. ``truncated`` needs ``next_values``. Any leading dims, ``time_dim`` picks the time
    axis. Differentiable in rewards, values, next_values and bootstrap_value. O(T n) work: meant for the n of
    n-step TD (1 to a few dozen), not for n of the order of T (use discounted_returns there).
    """
    op = "n_step_returns"
    n = int_arg(op, "n", n, 1)
    gamma = checks.unit_interval(op, "gamma", gamma)
    check_truncated(op, truncated, next_values)
    s = ScanLayout(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=None,
              floats={"values": values, "next_values": next_values},
              flags={"terminated": terminated, "truncated": truncated}, per_seq={"bootstrap_value": bootstrap_value})
    impl = dispatch.resolve(backend, s.device, op)
    if impl == "reference":
        out = dispatch.reference(op)(rewards, values, n=n, gamma=gamma, terminated=terminated, truncated=truncated,
                                     next_values=next_values, bootstrap_value=bootstrap_value, time_dim=time_dim)
        return dispatch.from_reference(out, s.device, s.dtype)
    fl = s.flags
    y = dispatch.kernel(op, impl)(s.rewards, s.floats["values"], s.floats["next_values"], s.per_seq["bootstrap_value"],
                                  fl["terminated"], fl["truncated"], gamma, n)
    return s.restore(y)


# ----------------------------------------------------------------------------------------------------
# Model-based: bellman_backup, value_iteration
# ----------------------------------------------------------------------------------------------------


def bellman_backup(P, R, V, gamma=0.99, *, backend=None):
    """One Bellman optimality backup per MDP. Returns (Q, V_new, policy).

    Q[s, a] = R[s, a] + gamma * sum_s' P[s, a, s'] V[s'];  V_new = max_a Q;  policy = argmax_a Q (int64, first
    index on ties). Shapes: P [..., S, A, S], R [..., S, A], V [..., S]; P @ V, the reward, the max and the
    argmax are one kernel. Differentiable in P, R and V through Q and V_new (V_new's gradient goes to the
    argmax action, as torch.max(dim) does).
    """
    op = "bellman_backup"
    gamma = checks.unit_interval(op, "gamma", gamma)
    checks.tensor(op, "V", V)
    (Pc, Rc, Vc), batch, dtype = mdp_tensors(op, P, R, V, "V")
    impl = dispatch.resolve(backend, P.device, op)
    S, A = P.shape[-3], P.shape[-2]
    if impl == "reference":
        Q, Vn, pol = dispatch.reference(op)(P, R, V, gamma)
        return (dispatch.from_reference(Q, P.device, dtype), dispatch.from_reference(Vn, P.device, dtype),
                torch.as_tensor(pol, dtype=torch.int64, device=P.device))
    Q, Vn, pol = dispatch.kernel(op, impl)(Pc, Rc, Vc, gamma)
    return Q.reshape(*batch, S, A), Vn.reshape(*batch, S), pol.reshape(*batch, S)


def value_iteration(P, R, gamma=0.99, *, tol=1e-6, max_iters=1000, V0=None, backend=None):
    """Value iteration on a batch of MDPs. Returns (V, Q, policy, iters, residual).

    Repeats (Q, V, policy) = bellman_backup(P, R, V, gamma) from V0 (zeros if None) until every MDP of the
    batch has converged, max_s |V_new - V_old| < tol for all of them, or ``max_iters`` backups were made. All
    MDPs iterate together: ``iters`` (a 0-d int64 tensor) is the number of backups made, ``residual`` (shaped
    like the batch) is max_s |V_new - V_old| of the last backup per MDP; V, Q and policy come from the last
    backup. The loop runs inside the op: no host synchronization per iteration (the CPU kernel keeps each
    MDP's P in cache across iterations). Not differentiable.
    """
    op = "value_iteration"
    gamma = checks.unit_interval(op, "gamma", gamma)
    tol = checks.real(op, "tol", tol)
    if not tol >= 0:
        raise ValueError(f"rlkernels.{op}: tol must be >= 0, got {tol}")
    max_iters = int_arg(op, "max_iters", max_iters, 1)
    (Pc, Rc, Vc), batch, dtype = mdp_tensors(op, P, R, V0, "V0")
    impl = dispatch.resolve(backend, P.device, op)
    S, A = P.shape[-3], P.shape[-2]
    if impl == "reference":
        V, Q, pol, iters, res = dispatch.reference(op)(P, R, gamma, tol=tol, max_iters=max_iters, V0=V0)
        return (dispatch.from_reference(V, P.device, dtype), dispatch.from_reference(Q, P.device, dtype),
                torch.as_tensor(pol, dtype=torch.int64, device=P.device),
                torch.tensor(iters, dtype=torch.int64, device=P.device), dispatch.from_reference(res, P.device, dtype))
    V, Q, pol, iters, res = dispatch.kernel(op, impl)(Pc.detach(), Rc.detach(), None if Vc is None else Vc.detach(), gamma,
                                                      tol, max_iters)
    return V.reshape(*batch, S), Q.reshape(*batch, S, A), pol.reshape(*batch, S), iters, res.reshape(batch)
