"""The reverse linear scan family: linear_scan, discounted_returns, gae, vtrace, retrace.

Each estimator is one reverse scan x_t = b_t + a_t x_next with a fused prologue (the coefficients from
rewards, values and flags) and epilogue (the outputs); docs/design.md §4.1, §4.2 and §4.6 are the definition. The wrappers
here check arguments and bring any layout to the kernels' canonical one (rlkernels/_layout.py), then run the
backend's op (rlkernels/_dispatch.py); the ops' autograd is in rlkernels/_ops/returns.py.
"""

from __future__ import annotations

import torch

from . import _checks as checks
from . import _dispatch as dispatch
from ._layout import ScanLayout, check_truncated, direct_cpu, gamma_lam

__all__ = ["discounted_returns", "gae", "linear_scan", "retrace", "vtrace"]
_native = torch.ops.rlkernels  # the C++ ops, called directly on the CPU fast path


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
    s = ScanLayout(op, "b", b, time_dim=time_dim, cu_seqlens=None, floats={"a": a}, flags={},
                   per_seq={"initial": initial})
    reverse = bool(reverse)
    impl = dispatch.resolve(backend, s.device, op)
    if impl == "reference":
        out = dispatch.reference(op)(a, b, reverse=reverse, initial=initial, time_dim=time_dim)
        return dispatch.from_reference(out, s.device, s.dtype)
    fn = dispatch.kernel(op, impl)
    return s.restore(fn(s.floats["a"], s.rewards, s.per_seq["initial"], reverse))


def discounted_returns(rewards, *, gamma=0.99, terminated=None, truncated=None, next_values=None,
                       bootstrap_value=None, mask=None, cu_seqlens=None, time_dim=0, backend=None):
    """Discounted returns G_t = r_t + gamma (1 - term_t) (trunc_t ? V'_t : G_{t+1}).

    At the last step G = r + gamma (1 - term) V', with V' = next_values[t] if given, else ``bootstrap_value``
    (0 if None). ``terminated``: s_{t+1} is terminal (no bootstrap); ``truncated``: the episode stopped after t
    without terminating (bootstrap from ``next_values``, required then). ``mask`` (LLM token-level RL): masked
    positions are skipped and give 0. ``cu_seqlens``: packed 1-D sequences. ``time_dim`` picks the time axis.
    Differentiable in rewards, next_values and bootstrap_value. Flags by trainer: as in :func:`gae` (CleanRL's
    ``dones[t]`` is step t - 1's outcome: pass ``terminated=torch.cat([dones[1:], next_done[None]])``).
    """
    op = "discounted_returns"
    if type(gamma) is not float and _on_device(gamma):
        return _discounted_returns_device_gamma(op, rewards, gamma, terminated, truncated, next_values,
                                                bootstrap_value, mask, cu_seqlens, time_dim, backend)
    gamma = gamma_lam(op, gamma)
    check_truncated(op, truncated, next_values)
    flags = (terminated, truncated, mask)
    if next_values is None and direct_cpu(op, rewards, time_dim, cu_seqlens, backend, (), flags, bootstrap_value):
        return _native.discounted_returns(rewards, None, bootstrap_value, terminated, truncated, mask, None, gamma)
    s = ScanLayout(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens,
                   floats={"next_values": next_values},
                   flags={"terminated": terminated, "truncated": truncated, "mask": mask},
                   per_seq={"bootstrap_value": bootstrap_value})
    impl = dispatch.resolve(backend, s.device, op)
    if impl == "reference":
        out = dispatch.reference(op)(rewards, gamma=gamma, terminated=terminated, truncated=truncated,
                                     next_values=next_values, bootstrap_value=bootstrap_value, mask=mask,
                                     cu_seqlens=cu_seqlens, time_dim=time_dim)
        return dispatch.from_reference(out, s.device, s.dtype)
    next_v, mask_c = s.floats["next_values"], s.flags["mask"]
    trunc = s.flags["truncated"]
    if next_v is not None:
        trunc = s.last_valid_as_truncated(trunc, mask_c)
    fn = dispatch.kernel(op, impl)
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

    Flags by trainer (one step off gives wrong advantages without an error): ``terminated[t]`` is the outcome of
    step t, as ``env.step(a_t)`` returns it (Gymnasium; TorchRL's ``("next", "terminated")``). CleanRL's ppo.py
    stores ``dones[t]`` with observation t, the outcome of step t - 1: pass
    ``terminated=torch.cat([dones[1:], next_done[None]]), bootstrap_value=next_value``, or call
    ``rlkernels.integrations.cleanrl.compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda)``.
    SB3's ``episode_starts`` are shifted the same way: use ``rlkernels.integrations.sb3.RolloutBuffer``.
    """
    op = "gae"
    if (type(gamma) is not float or type(lam) is not float) and _on_device(gamma, lam):
        return _gae_device_gamma(op, rewards, values, gamma, lam, terminated, truncated, next_values, bootstrap_value,
                                 mask, cu_seqlens, time_dim, backend)
    gamma, lam = gamma_lam(op, gamma, lam)
    check_truncated(op, truncated, next_values)
    if direct_cpu(op, rewards, time_dim, cu_seqlens, backend, (values,), (terminated, truncated, mask),
                   bootstrap_value, optional_floats=(next_values,)):
        return _native.gae(rewards, values, next_values, bootstrap_value, terminated, truncated, mask, None, gamma, lam)
    s = ScanLayout(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens,
                   floats={"values": values, "next_values": next_values},
                   flags={"terminated": terminated, "truncated": truncated, "mask": mask},
                   per_seq={"bootstrap_value": bootstrap_value})
    impl = dispatch.resolve(backend, s.device, op)
    if impl == "reference":
        adv, ret = dispatch.reference(op)(rewards, values, gamma=gamma, lam=lam, terminated=terminated,
                                          truncated=truncated, next_values=next_values, bootstrap_value=bootstrap_value,
                                          mask=mask, cu_seqlens=cu_seqlens, time_dim=time_dim)
        return dispatch.from_reference(adv, s.device, s.dtype), dispatch.from_reference(ret, s.device, s.dtype)
    fn = dispatch.kernel(op, impl)
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
    gamma, lam = gamma_lam(op, gamma, lam)
    rho_clip = checks.positive(op, "rho_clip", rho_clip)
    c_clip = checks.positive(op, "c_clip", c_clip)
    pg_rho_clip = checks.positive(op, "pg_rho_clip", pg_rho_clip)
    check_truncated(op, truncated, next_values)
    s = ScanLayout(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens,
                   floats={"values": values, "log_rhos": log_rhos, "next_values": next_values},
                   flags={"terminated": terminated, "truncated": truncated, "mask": mask},
                   per_seq={"bootstrap_value": bootstrap_value})
    impl = dispatch.resolve(backend, s.device, op)
    if impl == "reference":
        vs, pg = dispatch.reference(op)(rewards, values, log_rhos, gamma=gamma, lam=lam, rho_clip=rho_clip,
                                        c_clip=c_clip, pg_rho_clip=pg_rho_clip, terminated=terminated,
                                        truncated=truncated, next_values=next_values, bootstrap_value=bootstrap_value,
                                        mask=mask, cu_seqlens=cu_seqlens, time_dim=time_dim)
        return dispatch.from_reference(vs, s.device, s.dtype), dispatch.from_reference(pg, s.device, s.dtype)
    next_v, mask_c = s.floats["next_values"], s.flags["mask"]
    trunc = s.flags["truncated"]
    if next_v is not None:
        trunc = s.last_valid_as_truncated(trunc, mask_c)
    save_carries = torch.is_grad_enabled() and s.floats["log_rhos"].requires_grad
    fn = dispatch.kernel(op, impl)
    vs, pg, _, _ = fn(s.rewards, s.floats["values"], s.floats["log_rhos"], next_v, s.per_seq["bootstrap_value"],
                      s.flags["terminated"], trunc, mask_c, s.cu_seqlens, gamma, lam, rho_clip, c_clip,
                      pg_rho_clip, save_carries)
    return s.restore(vs), s.restore(pg)


def retrace(rewards, q_taken, next_v, log_rhos, *, gamma, lam, c_clip=1.0, terminated=None, truncated=None,
            mask=None, cu_seqlens=None, time_dim=0, backend=None):
    """Retrace(lambda) targets for Q-learning from off-policy sequences (Munos et al. 2016).

    ``q_taken[t]`` = Q(x_t, a_t), ``next_v[t]`` = E_pi Q(x_{t+1}, .) (from the target network),
    ``log_rhos[t]`` = log pi(a_t | x_t) / mu(a_t | x_t); c_t = lam min(c_clip, e^{log_rhos[t]}):
    G_t = r_t + gamma next_v[t] + gamma c_{t+1} (G_{t+1} - q_taken[t+1]) inside an episode;
    G_t = r_t where s_{t+1} is terminal (``terminated``); G_t = r_t + gamma next_v[t] where the episode is cut
    after t (``truncated``) or the data ends. rlax's ``retrace`` target (general_off_policy_returns_from_q_and_v)
    on our time-major layout. ``mask``, ``cu_seqlens`` and ``time_dim`` as in :func:`gae`: masked positions
    are skipped ("t + 1" is the next unmasked position) and give 0.
    Differentiable in rewards, q_taken, next_v and log_rhos (c's derivative is 0 where the clip binds).
    """
    op = "retrace"
    gamma, lam = gamma_lam(op, gamma, lam)
    c_clip = checks.positive(op, "c_clip", c_clip)
    s = ScanLayout(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=cu_seqlens,
                   floats={"q_taken": q_taken, "next_v": next_v, "log_rhos": log_rhos},
                   flags={"terminated": terminated, "truncated": truncated, "mask": mask}, per_seq={})
    impl = dispatch.resolve(backend, s.device, op)
    if impl == "reference":
        out = dispatch.reference(op)(rewards, q_taken, next_v, log_rhos, gamma=gamma, lam=lam, c_clip=c_clip,
                                     terminated=terminated, truncated=truncated, mask=mask, cu_seqlens=cu_seqlens,
                                     time_dim=time_dim)
        return dispatch.from_reference(out, s.device, s.dtype)
    fl = s.flags
    out = dispatch.kernel(op, impl)(s.rewards, s.floats["q_taken"], s.floats["next_v"], s.floats["log_rhos"],
                                    fl["terminated"], fl["truncated"], fl["mask"], s.cu_seqlens, gamma, lam, c_clip)
    return s.restore(out)


# ----------------------------------------------------------------------------------------------------
# gamma and lam as tensors on a GPU (docs/design.md §3): composed on the device, never read on the host
# ----------------------------------------------------------------------------------------------------


def _on_device(*scalars):
    return any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in scalars)


def _coefficient(op, name, x, device, dtype):
    """A Python real or CPU tensor as a checked float; a device tensor as a 0-d tensor of ``dtype`` (unread, so
    its range is not checked)."""
    if not isinstance(x, torch.Tensor) or x.device.type == "cpu":
        return checks.unit_interval(op, name, x)
    x = checks.scalar_tensor(op, name, x)
    if x.device != device:
        raise ValueError(f"rlkernels.{op}: {name} is on {x.device} but rewards is on {device}; all tensors must be "
                         "on one device")
    return x.to(dtype)


def _device_layout(op, rewards, floats, terminated, truncated, mask, cu_seqlens, bootstrap_value, time_dim):
    if mask is not None or cu_seqlens is not None:
        raise TypeError(f"rlkernels.{op}: gamma and lam as GPU tensors are taken without mask and cu_seqlens only; "
                        "pass Python floats (docs/design.md §3)")
    return ScanLayout(op, "rewards", rewards, time_dim=time_dim, cu_seqlens=None, floats=floats,
                      flags={"terminated": terminated, "truncated": truncated, "mask": None},
                      per_seq={"bootstrap_value": bootstrap_value})


def _gae_device_gamma(op, rewards, values, gamma, lam, terminated, truncated, next_values, bootstrap_value, mask,
                      cu_seqlens, time_dim, backend):
    """gae's formula with tensor coefficients on [O, T, I]: delta in torch, the advantage recursion as one
    linear_scan with a_t = gamma lam (1 - done_t)."""
    check_truncated(op, truncated, next_values)
    s = _device_layout(op, rewards, {"values": values, "next_values": next_values}, terminated, truncated, mask,
                       cu_seqlens, bootstrap_value, time_dim)
    acc = checks.accumulate_dtype(s.dtype)
    g, lam = _coefficient(op, "gamma", gamma, s.device, acc), _coefficient(op, "lam", lam, s.device, acc)
    r, v = s.rewards.to(acc), s.floats["values"].to(acc)
    nv = s.floats["next_values"]
    if nv is not None:
        nv = nv.to(acc)
    elif r.shape[1] == 0:
        nv = v
    else:
        boot = s.per_seq["bootstrap_value"]
        boot = torch.zeros(s.canon_seq, dtype=acc, device=s.device) if boot is None else boot.to(acc)
        nv = torch.cat([v[:, 1:], boot.unsqueeze(1)], 1)
    term, trunc = s.flags["terminated"], s.flags["truncated"]
    keep = 1.0 if term is None else (~term).to(acc)
    done = term if trunc is None else (trunc if term is None else term | trunc)
    cont = torch.ones_like(r) if done is None else (~done).to(acc)
    delta = r + g * keep * nv - v
    adv = linear_scan((g * lam) * cont, delta, reverse=True, time_dim=1, backend=backend)
    return s.restore(adv), s.restore(adv + v)


def _discounted_returns_device_gamma(op, rewards, gamma, terminated, truncated, next_values, bootstrap_value, mask,
                                     cu_seqlens, time_dim, backend):
    """discounted_returns with a tensor gamma on [O, T, I]: one linear_scan, a_t = gamma (1 - term_t) where the
    recursion continues, b_t = r_t (+ gamma (1 - term_t) V'_t where it is cut: truncated or the last step)."""
    check_truncated(op, truncated, next_values)
    s = _device_layout(op, rewards, {"next_values": next_values}, terminated, truncated, mask, cu_seqlens,
                       bootstrap_value, time_dim)
    acc = checks.accumulate_dtype(s.dtype)
    g = _coefficient(op, "gamma", gamma, s.device, acc)
    r = s.rewards.to(acc)
    term = s.flags["terminated"]
    keep = torch.ones_like(r) if term is None else (~term).to(acc)
    nv = s.floats["next_values"]
    if nv is None:
        boot = s.per_seq["bootstrap_value"]
        out = linear_scan(g * keep, r, reverse=True, initial=None if boot is None else boot.to(acc), time_dim=1,
                          backend=backend)
        return s.restore(out)
    cut = s.last_valid_as_truncated(s.flags["truncated"], None)
    b = r + g * keep * torch.where(cut, nv.to(acc), torch.zeros((), dtype=acc, device=s.device))
    out = linear_scan(g * keep * (~cut).to(acc), b, reverse=True, time_dim=1, backend=backend)
    return s.restore(out)
