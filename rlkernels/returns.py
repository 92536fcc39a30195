"""The reverse linear scan family: linear_scan, discounted_returns, gae, vtrace.

Each estimator is one reverse scan x_t = b_t + a_t x_next with a fused prologue (the coefficients from
rewards, values and flags) and epilogue (the outputs); docs/design.md §4.1-4.2 is the definition. The wrappers
here check arguments, map any layout to the kernels' canonical one ([O, T, I] contiguous, or packed 1-D
with cu_seqlens), pick the backend and register autograd and fake kernels for the custom ops declared in
csrc/ops.cpp.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the kernels and the schemas)
from . import _checks as checks
from ._backend import resolve

_ops = torch.ops.rlkernels


# ----------------------------------------------------------------------------------------------------
# Layout and argument handling shared by the family
# ----------------------------------------------------------------------------------------------------


class _Scan:
    """The checked, canonical inputs of one scan call, and the way back to the caller's layout.

    Kept lean: it runs on every call, and each torch call it makes (a dtype conversion, a reshape) costs
    microseconds, more than the kernel itself on small problems, so tensors already in the canonical dtype
    and layout pass through untouched.
    """

    def __init__(self, op, rewards_name, rewards, *, time_dim, cu_seqlens, floats, flags, per_seq):
        self.op = op
        checks.float_tensor(op, rewards_name, rewards)
        shape, device, dtype = rewards.shape, rewards.device, rewards.dtype
        mixed = False
        for name, x in floats.items():
            checks.float_tensor(op, name, x, optional=name in ("next_values",))
            if x is not None:
                mixed = mixed or x.dtype != dtype
        for name, x in per_seq.items():
            if isinstance(x, torch.Tensor):
                checks.float_tensor(op, name, x)
                mixed = mixed or x.dtype != dtype
            elif x is not None and not isinstance(x, (int, float)):
                checks.float_tensor(op, name, x)  # raises: not a tensor
        flag_values = {name: checks.flag_tensor(op, name, x) for name, x in flags.items()}
        checks.tensor(op, "cu_seqlens", cu_seqlens, optional=True)
        for group in (floats, flag_values, per_seq):
            for name, x in group.items():
                if isinstance(x, torch.Tensor) and x.device != device:
                    checks.same_device(op, rewards_name, rewards, **{name: x})  # raises, naming the argument
        if cu_seqlens is not None and cu_seqlens.device != device:
            checks.same_device(op, rewards_name, rewards, cu_seqlens=cu_seqlens)
        for group in (floats, flag_values):
            for name, x in group.items():
                if x is not None and x.shape != shape:
                    checks.same_shape(op, rewards_name, rewards, **{name: x})  # raises
        self.shape = shape
        self.device = device
        self.dtype = dtype
        if mixed:
            self.dtype = checks.common_float_dtype(rewards, *floats.values(),
                                                   *(v for v in per_seq.values() if isinstance(v, torch.Tensor)))
        if cu_seqlens is not None:
            if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
                raise TypeError(
                    f"rlkernels.{op}: cu_seqlens must be a 1-D int32 or int64 tensor of n + 1 offsets, got "
                    f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
                )
            if rewards.dim() != 1:
                raise ValueError(
                    f"rlkernels.{op}: with cu_seqlens, {rewards_name} must be 1-D packed sequences, "
                    f"got shape {tuple(rewards.shape)}"
                )
            self.canon = (rewards.shape[0],)
            self.seq_shape = (cu_seqlens.shape[0] - 1,)
            self.canon_seq = self.seq_shape
        else:
            if rewards.dim() == 0:
                raise ValueError(f"rlkernels.{op}: {rewards_name} must have a time dimension, got a 0-d tensor")
            td = checks.dim_index(op, "time_dim", time_dim, rewards.dim())
            shape = tuple(shape)
            outer, inner = math.prod(shape[:td]), math.prod(shape[td + 1 :])
            self.canon = (outer, shape[td], inner)
            self.seq_shape = shape[:td] + shape[td + 1 :]
            self.canon_seq = (outer, inner)
        self.cu_seqlens = cu_seqlens
        self.rewards = self.seq(rewards)
        self.floats = {name: self.seq(x) for name, x in floats.items()}
        self.flags = {name: self.seq(x, flag=True) for name, x in flag_values.items()}
        self.per_seq = {name: self._per_seq(name, x) for name, x in per_seq.items()}

    def _canonical(self, x, shape):
        if x.shape != shape:
            x = x.reshape(shape)
        return x if x.is_contiguous() else x.contiguous()

    def seq(self, x, flag=False):
        if x is None:
            return None
        if not flag and x.dtype != self.dtype:
            x = x.to(self.dtype)
        return self._canonical(x, self.canon)

    def _per_seq(self, name, x):
        if x is None:
            return None
        if not isinstance(x, torch.Tensor):
            return torch.full(self.canon_seq, float(x), dtype=self.dtype, device=self.device)
        if x.shape != self.seq_shape and not (x.dim() == 0 and self.seq_shape in ((), (1,))):
            raise ValueError(
                f"rlkernels.{self.op}: {name} must hold one value per sequence, shape {tuple(self.seq_shape)}, "
                f"got {tuple(x.shape)}"
            )
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return self._canonical(x, self.canon_seq)

    def restore(self, y):
        return y if y.shape == self.shape else y.reshape(self.shape)

    def last_valid_as_truncated(self, truncated, mask):
        """With next_values given, the last valid step of each sequence bootstraps from next_values exactly
        like a truncated step; marking it so keeps one rule in the kernels. Tensor ops only: no host sync."""
        shape = self.rewards.shape
        if self.cu_seqlens is None and mask is None:
            last = torch.zeros(shape, dtype=torch.bool, device=self.device)
            if shape[1] > 0:
                last[:, -1, :] = True
        elif self.cu_seqlens is None:
            # Valid steps at or after t; the last valid step is the valid one that sees exactly one.
            after = mask.flip(1).to(torch.int32).cumsum(1).flip(1)
            last = mask & (after == 1)
        else:
            n = shape[0]
            m = torch.ones(n, dtype=torch.int64, device=self.device) if mask is None else mask.to(torch.int64)
            after = torch.cat([m.flip(0).cumsum(0).flip(0), m.new_zeros(1)])  # valid steps at or after t
            # Clamped so that malformed offsets reach the kernel instead of failing here on an index: the
            # CPU kernel raises a ValueError naming cu_seqlens; the CUDA kernels cannot read the offsets
            # without a host sync, stay in bounds and leave zeros where no segment covers a position.
            cu = self.cu_seqlens.to(torch.int64).clamp(0, n)
            positions = torch.arange(n, device=self.device)
            segment = (torch.searchsorted(cu[1:], positions, right=True) + 1).clamp(max=cu.shape[0] - 1)
            last = (m != 0) & (after[:n] - after[cu[segment]] == 1)
        return last if truncated is None else truncated | last


def _direct_cpu(op, rewards, time_dim, cu_seqlens, backend, floats, flags, per_seq, optional_floats=()):
    """Whether the C++ CPU op can take the caller's tensors as they are: time-first [T, B] or [T] CPU tensors
    of one float dtype, bool flags of the same shape, per-sequence values shaped [B] (or []) or None, and the
    cpu backend chosen. The general path's reshapes, casts and checks cost ~70 us a call on a slow 2-core VM,
    more than GAE on [2048, 64] itself; the op checks shapes and dtypes again and names the argument."""
    if cu_seqlens is not None or time_dim != 0 or type(rewards) is not torch.Tensor:
        return False
    if not rewards.is_cpu or rewards.dim() not in (1, 2) or rewards.dtype not in checks.FLOAT_DTYPES:
        return False
    shape, dtype = rewards.shape, rewards.dtype
    for x in (*floats, *(x for x in optional_floats if x is not None)):
        if type(x) is not torch.Tensor or not x.is_cpu or x.dtype != dtype or x.shape != shape:
            return False
    for x in flags:
        if x is not None and (type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.bool
                              or x.shape != shape):
            return False
    if per_seq is not None and (type(per_seq) is not torch.Tensor or not per_seq.is_cpu or per_seq.dtype != dtype
                                or per_seq.shape != shape[1:]):
        return False
    return resolve(backend, rewards.device, op) == "cpu"


def _gamma_lam(op, gamma, *lam):
    gamma = checks.unit_interval(op, "gamma", gamma)
    if not lam:
        return gamma
    return gamma, checks.unit_interval(op, "lam", lam[0])


def _check_truncated(op, truncated, next_values):
    if truncated is not None and next_values is None:
        raise ValueError(
            f"rlkernels.{op}: truncated requires next_values: without them the value after a truncated step "
            "would be values[t+1], the first state of the next episode"
        )


def _reference(name):
    from . import reference

    return getattr(reference, name)


def _as_output(array, device, dtype):
    return torch.as_tensor(array, dtype=checks.accumulate_dtype(dtype), device=device)


def _triton():
    from .triton import returns as triton_returns

    return triton_returns


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def linear_scan(a, b, *, reverse=True, initial=None, time_dim=0, backend=None):
    """x_t = b_t + a_t * x_{t+1} (``reverse=True``) or x_t = b_t + a_t * x_{t-1}, with x beyond the end equal
    to ``initial`` (one value per sequence, 0 if None). Differentiable in a, b and initial.

    The engine under every estimator of this module: long sequences are split into chunks whose affine maps
    are combined, so one sequence of millions of steps is not bound by its serial dependency chain.
    """
    op = "linear_scan"
    s = _Scan(op, "b", b, time_dim=time_dim, cu_seqlens=None, floats={"a": a}, flags={}, per_seq={"initial": initial})
    reverse = bool(reverse)
    impl = resolve(backend, s.device, op)
    if impl == "reference":
        out = _reference(op)(a, b, reverse=reverse, initial=initial, time_dim=time_dim)
        return _as_output(out, s.device, s.dtype)
    fn = _triton().linear_scan if impl == "triton" else _ops.linear_scan
    return s.restore(fn(s.floats["a"], s.rewards, s.per_seq["initial"], reverse))


def discounted_returns(rewards, *, gamma=0.99, terminated=None, truncated=None, next_values=None,
                       bootstrap_value=None, mask=None, cu_seqlens=None, time_dim=0, backend=None):
    """Discounted returns G_t = r_t + gamma (1 - term_t) (trunc_t ? V'_t : G_{t+1}).

    At the last step G = r + gamma (1 - term) V', with V' = next_values[t] if given, else ``bootstrap_value``
    (0 if None). ``terminated``: s_{t+1} is terminal (no bootstrap); ``truncated``: the episode stopped after t
    without terminating (bootstrap from ``next_values``, required then). ``mask`` (LLM token-level RL): masked
    positions are skipped and give 0. ``cu_seqlens``: packed 1-D sequences. ``time_dim`` picks the time axis.
    Differentiable in rewards, next_values and bootstrap_value.
    """
    op = "discounted_returns"
    gamma = _gamma_lam(op, gamma)
    _check_truncated(op, truncated, next_values)
    flags = (terminated, truncated, mask)
    if next_values is None and _direct_cpu(op, rewards, time_dim, cu_seqlens, backend, (), flags, bootstrap_value):
        return _ops.discounted_returns(rewards, None, bootstrap_value, terminated, truncated, mask, None, gamma)
    s = _Scan(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens, floats={"next_values": next_values},
              flags={"terminated": terminated, "truncated": truncated, "mask": mask},
              per_seq={"bootstrap_value": bootstrap_value})
    impl = resolve(backend, s.device, op)
    if impl == "reference":
        out = _reference(op)(rewards, gamma=gamma, terminated=terminated, truncated=truncated,
                             next_values=next_values, bootstrap_value=bootstrap_value, mask=mask,
                             cu_seqlens=cu_seqlens, time_dim=time_dim)
        return _as_output(out, s.device, s.dtype)
    next_v, mask_c = s.floats["next_values"], s.flags["mask"]
    trunc = s.flags["truncated"]
    if next_v is not None:
        trunc = s.last_valid_as_truncated(trunc, mask_c)
    fn = _triton().discounted_returns if impl == "triton" else _ops.discounted_returns
    out = fn(s.rewards, next_v, s.per_seq["bootstrap_value"], s.flags["terminated"], trunc, mask_c,
             s.cu_seqlens, gamma)
    return s.restore(out)


def gae(rewards, values, *, gamma=0.99, lam=0.95, terminated=None, truncated=None, next_values=None,
        bootstrap_value=None, mask=None, cu_seqlens=None, time_dim=0, backend=None):
    """Generalized advantage estimation (Schulman et al. 2016). Returns (advantages, returns).

    delta_t = r_t + gamma (1 - term_t) V'_t - V_t;  A_t = delta_t + gamma lam (1 - done_t) A_{t+1};
    returns_t = A_t + V_t (the TD(lambda) return). V'_t = next_values[t] if given, else values[t+1], and
    ``bootstrap_value`` (0 if None) after the last step; done = terminated or truncated. With ``mask``, masked
    positions are skipped ("next" is the next unmasked position, verl's convention) and give 0.
    Differentiable in rewards, values, next_values and bootstrap_value.
    """
    op = "gae"
    gamma, lam = _gamma_lam(op, gamma, lam)
    _check_truncated(op, truncated, next_values)
    if _direct_cpu(op, rewards, time_dim, cu_seqlens, backend, (values,), (terminated, truncated, mask),
                   bootstrap_value, optional_floats=(next_values,)):
        return _ops.gae(rewards, values, next_values, bootstrap_value, terminated, truncated, mask, None, gamma, lam)
    s = _Scan(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens,
              floats={"values": values, "next_values": next_values},
              flags={"terminated": terminated, "truncated": truncated, "mask": mask},
              per_seq={"bootstrap_value": bootstrap_value})
    impl = resolve(backend, s.device, op)
    if impl == "reference":
        adv, ret = _reference(op)(rewards, values, gamma=gamma, lam=lam, terminated=terminated,
                                  truncated=truncated, next_values=next_values, bootstrap_value=bootstrap_value,
                                  mask=mask, cu_seqlens=cu_seqlens, time_dim=time_dim)
        return _as_output(adv, s.device, s.dtype), _as_output(ret, s.device, s.dtype)
    fn = _triton().gae if impl == "triton" else _ops.gae
    adv, ret = fn(s.rewards, s.floats["values"], s.floats["next_values"], s.per_seq["bootstrap_value"],
                  s.flags["terminated"], s.flags["truncated"], s.flags["mask"], s.cu_seqlens, gamma, lam)
    return s.restore(adv), s.restore(ret)


def vtrace(rewards, values, log_rhos, *, gamma=0.99, lam=1.0, rho_clip=1.0, c_clip=1.0, pg_rho_clip=1.0,
           terminated=None, truncated=None, next_values=None, bootstrap_value=None, mask=None, cu_seqlens=None,
           time_dim=0, backend=None):
    """V-trace targets and policy-gradient advantages (IMPALA, Espeholt et al. 2018). Returns (vs, pg_advantages).

    rho_t = min(rho_clip, e^{log_rho}), c_t = lam min(c_clip, e^{log_rho});
    vs_t - V_t = rho_t delta_t + gamma (1 - done_t) c_t (vs_{t+1} - V_{t+1});
    pg_t = min(pg_rho_clip, e^{log_rho}) (r_t + gamma (1 - term_t) v'_t - V_t), v'_t = vs_{t+1}, or V'_t where t
    is the last step or done. delta, V', flags, mask and layouts as in :func:`gae`.
    Differentiable in rewards, values, log_rhos, next_values and bootstrap_value.
    """
    op = "vtrace"
    gamma, lam = _gamma_lam(op, gamma, lam)
    rho_clip = checks.positive(op, "rho_clip", rho_clip)
    c_clip = checks.positive(op, "c_clip", c_clip)
    pg_rho_clip = checks.positive(op, "pg_rho_clip", pg_rho_clip)
    _check_truncated(op, truncated, next_values)
    s = _Scan(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens,
              floats={"values": values, "log_rhos": log_rhos, "next_values": next_values},
              flags={"terminated": terminated, "truncated": truncated, "mask": mask},
              per_seq={"bootstrap_value": bootstrap_value})
    impl = resolve(backend, s.device, op)
    if impl == "reference":
        vs, pg = _reference(op)(rewards, values, log_rhos, gamma=gamma, lam=lam, rho_clip=rho_clip,
                                c_clip=c_clip, pg_rho_clip=pg_rho_clip, terminated=terminated,
                                truncated=truncated, next_values=next_values, bootstrap_value=bootstrap_value,
                                mask=mask, cu_seqlens=cu_seqlens, time_dim=time_dim)
        return _as_output(vs, s.device, s.dtype), _as_output(pg, s.device, s.dtype)
    next_v, mask_c = s.floats["next_values"], s.flags["mask"]
    trunc = s.flags["truncated"]
    if next_v is not None:
        trunc = s.last_valid_as_truncated(trunc, mask_c)
    save_carries = torch.is_grad_enabled() and s.floats["log_rhos"].requires_grad
    fn = _triton().vtrace if impl == "triton" else _ops.vtrace
    vs, pg, _, _ = fn(s.rewards, s.floats["values"], s.floats["log_rhos"], next_v, s.per_seq["bootstrap_value"],
                      s.flags["terminated"], trunc, mask_c, s.cu_seqlens, gamma, lam, rho_clip, c_clip,
                      pg_rho_clip, save_carries)
    return s.restore(vs), s.restore(pg)


# ----------------------------------------------------------------------------------------------------
# Fake kernels and autograd of the C++/CUDA ops
# ----------------------------------------------------------------------------------------------------


def _acc_like(x):
    return x.new_empty(x.shape, dtype=checks.accumulate_dtype(x.dtype))


def _per_seq_like(x, cu_seqlens, dtype):
    if cu_seqlens is not None:
        shape = (cu_seqlens.shape[0] - 1,)
    else:  # canonical [O, T, I], or [T, I] / [T] as the CPU fast path passes them
        shape = (x.shape[0], x.shape[2]) if x.dim() == 3 else tuple(x.shape[1:])
    return x.new_empty(shape, dtype=dtype)


def _maybe(x, like):
    return _acc_like(like) if x else like.new_empty((0,), dtype=checks.accumulate_dtype(like.dtype))


@torch.library.register_fake("rlkernels::linear_scan")
def _(a, b, initial, reverse):
    return _acc_like(b)


@torch.library.register_fake("rlkernels::discounted_returns")
def _(rewards, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma):
    return _acc_like(rewards)


@torch.library.register_fake("rlkernels::discounted_returns_backward")
def _(grad, terminated, truncated, mask, cu_seqlens, rewards_like, gamma, has_next_values):
    acc = checks.accumulate_dtype(rewards_like.dtype)
    return (_acc_like(rewards_like), _maybe(has_next_values, rewards_like),
            _per_seq_like(rewards_like, cu_seqlens, acc))


@torch.library.register_fake("rlkernels::gae")
def _(rewards, values, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma, lam):
    return _acc_like(rewards), _acc_like(rewards)


@torch.library.register_fake("rlkernels::gae_backward")
def _(grad_advantages, grad_returns, terminated, truncated, mask, cu_seqlens, rewards_like, gamma, lam,
      has_next_values):
    acc = checks.accumulate_dtype(rewards_like.dtype)
    return (_acc_like(rewards_like), _acc_like(rewards_like), _maybe(has_next_values, rewards_like),
            _per_seq_like(rewards_like, cu_seqlens, acc))


@torch.library.register_fake("rlkernels::vtrace")
def _(rewards, values, log_rhos, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma,
      lam, rho_clip, c_clip, pg_rho_clip, save_carries):
    return _acc_like(rewards), _acc_like(rewards), _maybe(save_carries, rewards), _maybe(save_carries, rewards)


@torch.library.register_fake("rlkernels::vtrace_backward")
def _(grad_vs, grad_pg_advantages, rewards, values, log_rhos, next_values, saved_next_x, saved_next_v,
      terminated, truncated, mask, cu_seqlens, gamma, lam, rho_clip, c_clip, pg_rho_clip):
    acc = checks.accumulate_dtype(rewards.dtype)
    return (_acc_like(rewards), _acc_like(rewards), _acc_like(rewards), _maybe(next_values is not None, rewards),
            _per_seq_like(rewards, cu_seqlens, acc))


def _cast(grad, like):
    return None if like is None else grad.to(like.dtype)


def _shift(x, forward):
    """x moved one step along time (dim 1) towards the future (forward=True) or the past, zero-filled."""
    zero = torch.zeros_like(x[:, :1])
    return torch.cat([zero, x[:, :-1]], 1) if forward else torch.cat([x[:, 1:], zero], 1)


def _linear_scan_setup(ctx, inputs, output):
    a, b, initial, reverse = inputs
    ctx.reverse = reverse
    ctx.has_initial = initial is not None
    ctx.save_for_backward(a, initial if initial is not None else a.new_zeros(a.shape[0], a.shape[2]), output)


def _linear_scan_backward(ctx, grad):
    # The adjoint of a reverse scan is a forward scan with the same coefficients, one step shifted.
    a, initial, x = ctx.saved_tensors
    if a.shape[1] == 0:
        return torch.zeros_like(a), torch.zeros_like(a), (torch.zeros_like(initial) if ctx.has_initial else None), None
    grad = grad.to(x.dtype)
    a_acc = a.to(x.dtype)
    y = torch.ops.rlkernels.linear_scan(_shift(a_acc, ctx.reverse), grad.contiguous(), None, not ctx.reverse)
    init = initial.to(x.dtype).unsqueeze(1)
    if ctx.reverse:
        x_neighbour = torch.cat([x[:, 1:], init], 1)
        grad_initial = a_acc[:, -1] * y[:, -1]
    else:
        x_neighbour = torch.cat([init, x[:, :-1]], 1)
        grad_initial = a_acc[:, 0] * y[:, 0]
    grad_a = (y * x_neighbour).to(a.dtype)
    return grad_a, y.to(a.dtype), (grad_initial.to(initial.dtype) if ctx.has_initial else None), None


torch.library.register_autograd("rlkernels::linear_scan", _linear_scan_backward, setup_context=_linear_scan_setup)


def _returns_setup(ctx, inputs, output):
    rewards, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma = inputs
    ctx.gamma = gamma
    ctx.has_next = next_values is not None
    ctx.dtypes = (rewards.dtype, next_values, bootstrap_value)
    ctx.save_for_backward(rewards, terminated, truncated, mask, cu_seqlens)


def _returns_backward_using(backward_op):
    """The autograd formula of discounted_returns around a backward op (C++/CUDA or Triton: one schema)."""

    def backward(ctx, grad):
        rewards, terminated, truncated, mask, cu_seqlens = ctx.saved_tensors
        g_r, g_next, g_boot = backward_op(grad, terminated, truncated, mask, cu_seqlens, rewards, ctx.gamma,
                                          ctx.has_next)
        _, next_values, bootstrap_value = ctx.dtypes
        return (g_r.to(rewards.dtype), _cast(g_next, next_values) if ctx.has_next else None,
                _cast(g_boot, bootstrap_value), None, None, None, None, None)

    return backward


# rlkernels::discounted_returns and rlkernels::gae (the C++/CUDA ops) have their autograd kernels in C++
# (csrc/autograd.cpp, the same formulas): torch.library's Python autograd layer cost tens of microseconds per
# call. The Triton ops register the formulas here (rlkernels/triton/returns.py).


def _gae_setup(ctx, inputs, output):
    rewards, values, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma, lam = inputs
    ctx.gamma, ctx.lam = gamma, lam
    ctx.has_next = next_values is not None
    ctx.likes = (values, next_values, bootstrap_value)
    ctx.save_for_backward(rewards, terminated, truncated, mask, cu_seqlens)


def _gae_backward_using(backward_op):
    """The autograd formula of gae around a backward op (C++/CUDA or Triton: one schema)."""

    def backward(ctx, grad_adv, grad_ret):
        rewards, terminated, truncated, mask, cu_seqlens = ctx.saved_tensors
        g_r, g_v, g_next, g_boot = backward_op(grad_adv, grad_ret, terminated, truncated, mask, cu_seqlens, rewards,
                                               ctx.gamma, ctx.lam, ctx.has_next)
        values, next_values, bootstrap_value = ctx.likes
        return (g_r.to(rewards.dtype), g_v.to(values.dtype), _cast(g_next, next_values) if ctx.has_next else None,
                _cast(g_boot, bootstrap_value), None, None, None, None, None, None)

    return backward




def _vtrace_setup(ctx, inputs, output):
    (rewards, values, log_rhos, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma, lam,
     rho_clip, c_clip, pg_rho_clip, save_carries) = inputs
    ctx.scalars = (gamma, lam, rho_clip, c_clip, pg_rho_clip)
    ctx.save_carries = save_carries
    ctx.bootstrap_like = bootstrap_value
    _, _, next_x, next_v = output
    ctx.save_for_backward(rewards, values, log_rhos, next_values, next_x, next_v, terminated, truncated, mask,
                          cu_seqlens)


def _vtrace_backward_using(backward_op):
    """The autograd formula of vtrace around a backward op (C++/CUDA or Triton: one schema)."""

    def backward(ctx, grad_vs, grad_pg, _grad_x, _grad_v):
        (rewards, values, log_rhos, next_values, next_x, next_v, terminated, truncated, mask,
         cu_seqlens) = ctx.saved_tensors
        saved = ctx.save_carries
        g_r, g_v, g_lr, g_next, g_boot = backward_op(
            grad_vs, grad_pg, rewards, values, log_rhos, next_values, next_x if saved else None,
            next_v if saved else None, terminated, truncated, mask, cu_seqlens, *ctx.scalars)
        return (g_r.to(rewards.dtype), g_v.to(values.dtype), g_lr.to(log_rhos.dtype) if saved else None,
                _cast(g_next, next_values) if next_values is not None else None, _cast(g_boot, ctx.bootstrap_like),
                None, None, None, None, None, None, None, None, None, None)

    return backward


torch.library.register_autograd("rlkernels::vtrace", _vtrace_backward_using(torch.ops.rlkernels.vtrace_backward),
                                setup_context=_vtrace_setup)
