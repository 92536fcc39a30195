"""NumPy reference implementation of every rlkernels op: the oracle the kernels are tested against.

Every function here mirrors one public function of docs/design.md §4 and computes the
same quantity with plain Python loops in float64. Clarity wins over speed: each estimator
walks its sequences one step at a time, exactly as the formula in its docstring reads.

Conventions shared by all functions:

* Inputs may be numpy arrays, anything ``np.asarray`` accepts, or torch tensors (CPU or not;
  they are detached and copied to the host). Float values are converted to float64.
* Outputs are float64 numpy arrays (int64 for argmax / policy outputs); losses, statistics
  and iteration counts are Python floats and ints.
* Flags (``terminated``, ``truncated``, ``mask``) may be bool, integer or float arrays: any
  nonzero entry means true.
* The formulas are evaluated literally in IEEE arithmetic: a NaN or Inf propagates wherever
  the formula multiplies it in (for example ``0 * NaN`` across a ``done`` cut is NaN), while
  positions that are skipped (``mask`` 0, ``ignore_index`` rows) never read their inputs.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bellman_backup",
    "discounted_returns",
    "gae",
    "gather_logprobs",
    "kl_penalty",
    "linear_logprobs",
    "linear_scan",
    "n_step_returns",
    "ppo_policy_loss",
    "q_targets",
    "td_loss",
    "value_iteration",
    "value_loss",
    "vtrace",
]

_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------


def _np(x):
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the host)."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():  # covers bfloat16, which numpy cannot hold
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _float(x, name):
    """Return ``x`` as a float64 array.

    Python lists and numbers are read as floats; bool and integer arrays or tensors are rejected
    with a TypeError, as the public API rejects them (they are flags or indices, not values).
    """
    if x is None:
        return None
    if isinstance(x, (list, tuple, int, float)):  # plain Python numbers: read as floats
        return np.asarray(x, dtype=np.float64)
    a = _np(x)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold float values, got dtype {a.dtype}")
    return a.astype(np.float64)


def _flag(x, name, shape):
    """Return the flag ``x`` as a bool array of ``shape`` (nonzero means true)."""
    if x is None:
        return np.zeros(shape, dtype=bool)
    a = _np(x)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return a != 0


def _index(x, name):
    """Return ``x`` as an int64 array; float arrays are rejected."""
    a = _np(x)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


def _same_shape(x, name, shape):
    if x is not None and x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")


def _check_unit(value, name):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _time_axis(ndim, time_dim):
    if ndim == 0:
        raise ValueError("inputs need a time dimension, got a 0-d array")
    if not -ndim <= time_dim < ndim:
        raise ValueError(f"time_dim={time_dim} is out of range for {ndim}-d inputs")
    return time_dim % ndim


# --------------------------------------------------------------------------------------------
# sequence layout: every estimator is a loop over 1-D sequences
# --------------------------------------------------------------------------------------------


class _Layout:
    """Splits arrays shaped like ``rewards`` into 1-D sequences and puts results back.

    Without ``cu_seqlens`` the time axis is moved to the front and the other axes are
    flattened, giving a ``[T, N]`` table whose columns are the sequences. With ``cu_seqlens``
    the input is 1-D and segment ``cu[i]:cu[i+1]`` is sequence ``i``.
    """

    def __init__(self, shape, time_dim, cu_seqlens):
        self.shape = tuple(shape)
        if cu_seqlens is not None:
            cu = _index(cu_seqlens, "cu_seqlens")
            if len(self.shape) != 1:
                raise ValueError(f"with cu_seqlens the inputs must be 1-D, got shape {self.shape}")
            _time_axis(1, time_dim)  # 0 or -1 on 1-D packed inputs
            if cu.ndim != 1 or cu.shape[0] < 1 or cu[0] != 0 or np.any(np.diff(cu) < 0):
                raise ValueError("cu_seqlens must be a non-decreasing 1-D array starting at 0")
            if cu[-1] != self.shape[0]:
                raise ValueError(f"cu_seqlens[-1] = {cu[-1]} must equal the input length {self.shape[0]}")
            self.cu = cu
            self.batch_shape = (cu.shape[0] - 1,)
        else:
            self.cu = None
            self.axis = _time_axis(len(self.shape), time_dim)
            self.batch_shape = self.shape[: self.axis] + self.shape[self.axis + 1 :]

    @property
    def n_sequences(self):
        return int(np.prod(self.batch_shape, dtype=np.int64))

    def split(self, x):
        """``x`` (shaped like the inputs) as the per-sequence table (1-D or [T, N])."""
        if x is None or self.cu is not None:
            return x
        return np.moveaxis(x, self.axis, 0).reshape(self.shape[self.axis], self.n_sequences)

    def merge(self, table):
        """Inverse of ``split``."""
        if self.cu is not None:
            return table
        moved = (self.shape[self.axis], *self.batch_shape)
        return np.moveaxis(table.reshape(moved), 0, self.axis)

    def per_sequence(self, x, name):
        """``x`` (one value per sequence, or a scalar) as a flat array of length n_sequences."""
        if x is None:
            return np.zeros(self.n_sequences)
        a = _float(x, name)
        try:
            a = np.broadcast_to(a, self.batch_shape)
        except ValueError:
            raise ValueError(
                f"{name} must have shape {self.batch_shape} (one value per sequence), got {a.shape}"
            ) from None
        return a.reshape(-1)

    def sequences(self):
        """Yield ``(i, idx)``: sequence number and the index of its elements in the table."""
        for i in range(self.n_sequences):
            if self.cu is not None:
                yield i, slice(int(self.cu[i]), int(self.cu[i + 1]))
            else:
                yield i, (slice(None), i)


def _valid_steps(mask):
    """Positions of a sequence that take part in the recursion (all, or those with mask 1)."""
    return np.flatnonzero(mask)


def _next_value(k, steps, next_values, values, bootstrap):
    """V'_t for the k-th valid step t = steps[k] of a sequence (docs/design.md §4.2).

    next_values[t] if given; else the value at the next valid step; else (last valid step)
    the sequence's bootstrap value.
    """
    t = steps[k]
    if next_values is not None:
        return next_values[t]
    if k + 1 < len(steps):
        return values[steps[k + 1]]
    return bootstrap


def _scan_inputs(
    rewards,
    values,
    terminated,
    truncated,
    next_values,
    mask,
    time_dim,
    cu_seqlens,
    value_names=(),
    next_name="next_values",
):
    """Convert and check the inputs shared by the scan estimators; return the layout and tables
    (``next_values`` is tabled as "next_values", whatever ``next_name`` the estimator calls it)."""
    r = _float(rewards, "rewards")
    layout = _Layout(r.shape, time_dim, cu_seqlens)
    if truncated is not None and next_values is None:
        raise ValueError(
            "truncated needs next_values: without them values[t+1] after a truncation would be "
            "the next episode's first state"
        )
    tables = {"rewards": layout.split(r)}
    for name, key, x in (
        ("values", "values", values),
        (next_name, "next_values", next_values),
        *((name, name, x) for name, x in value_names),
    ):
        a = _float(x, name)
        _same_shape(a, name, r.shape)
        tables[key] = layout.split(a)
    tables["terminated"] = layout.split(_flag(terminated, "terminated", r.shape))
    tables["truncated"] = layout.split(_flag(truncated, "truncated", r.shape))
    mask_all = np.ones(r.shape, dtype=bool) if mask is None else _flag(mask, "mask", r.shape)
    tables["mask"] = layout.split(mask_all)
    return layout, tables


def _column(table, idx):
    return None if table is None else table[idx]


# --------------------------------------------------------------------------------------------
# 4.1 linear scan
# --------------------------------------------------------------------------------------------


def linear_scan(a, b, *, reverse=True, initial=None, time_dim=0):
    """First-order linear recurrence along ``time_dim``.

    reverse=True:  x_t = b_t + a_t * x_{t+1}, with x_T = initial;
    reverse=False: x_t = b_t + a_t * x_{t-1}, with x_{-1} = initial.
    ``initial`` has the shape of ``a`` without the time dimension (or broadcasts to it);
    None means 0. Returns x with the shape of ``a``.
    """
    a = _float(a, "a")
    b = _float(b, "b")
    _same_shape(b, "b", a.shape)
    layout = _Layout(a.shape, time_dim, None)
    A, B = layout.split(a), layout.split(b)
    x0 = layout.per_sequence(initial, "initial")
    out = np.zeros_like(A)
    T = A.shape[0]
    order = range(T - 1, -1, -1) if reverse else range(T)
    for i, idx in layout.sequences():
        ai, bi, xi = A[idx], B[idx], out[idx]
        carry = x0[i]
        for t in order:
            carry = bi[t] + ai[t] * carry
            xi[t] = carry
    return layout.merge(out)


# --------------------------------------------------------------------------------------------
# 4.2 discounted returns, GAE, V-trace
# --------------------------------------------------------------------------------------------


def discounted_returns(
    rewards,
    *,
    gamma=0.99,
    terminated=None,
    truncated=None,
    next_values=None,
    bootstrap_value=None,
    mask=None,
    cu_seqlens=None,
    time_dim=0,
):
    """Discounted returns, one reverse scan per sequence.

    G_t = r_t + gamma * (1 - term_t) * (trunc_t ? V'_t : G_next), and at the last valid step
    G = r + gamma * (1 - term) * V', where V'_t = next_values[t] if given, else (last step only)
    bootstrap_value (0 if None). G_next is G at the next valid step. With ``mask``, positions
    with mask 0 are skipped (the recursion passes through them) and get 0. ``cu_seqlens``
    splits 1-D inputs into packed sequences, one bootstrap value each.
    """
    _check_unit(gamma, "gamma")
    layout, tab = _scan_inputs(rewards, None, terminated, truncated, next_values, mask, time_dim, cu_seqlens)
    boot = layout.per_sequence(bootstrap_value, "bootstrap_value")
    out = np.zeros_like(tab["rewards"])
    for i, idx in layout.sequences():
        r, nv = tab["rewards"][idx], _column(tab["next_values"], idx)
        term, trunc = tab["terminated"][idx], tab["truncated"][idx]
        steps = _valid_steps(tab["mask"][idx])
        G = out[idx]
        g_next = None
        for k in range(len(steps) - 1, -1, -1):
            t = steps[k]
            last = k == len(steps) - 1
            # truncated implies next_values (checked), so V'_t never needs `values` here
            tail = _next_value(k, steps, nv, None, boot[i]) if (last or trunc[t]) else g_next
            G[t] = r[t] + gamma * (1.0 - float(term[t])) * tail
            g_next = G[t]
    return layout.merge(out)


def gae(
    rewards,
    values,
    *,
    gamma=0.99,
    lam=0.95,
    terminated=None,
    truncated=None,
    next_values=None,
    bootstrap_value=None,
    mask=None,
    cu_seqlens=None,
    time_dim=0,
):
    """Generalized advantage estimation; returns (advantages, returns).

    delta_t = r_t + gamma * (1 - term_t) * V'_t - V_t
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_next   (A after the last valid step = 0)
    returns_t = A_t + V_t
    with done_t = term_t or trunc_t; V'_t = next_values[t] if given, else V at the next valid
    step, else (last valid step) bootstrap_value (0 if None). Positions with mask 0 are skipped
    and get 0 in both outputs (verl's compute_gae_advantage_return, zeros at masked positions).
    """
    _check_unit(gamma, "gamma")
    _check_unit(lam, "lam")
    layout, tab = _scan_inputs(
        rewards, values, terminated, truncated, next_values, mask, time_dim, cu_seqlens
    )
    boot = layout.per_sequence(bootstrap_value, "bootstrap_value")
    adv = np.zeros_like(tab["rewards"])
    ret = np.zeros_like(tab["rewards"])
    for i, idx in layout.sequences():
        r, v, nv = tab["rewards"][idx], tab["values"][idx], _column(tab["next_values"], idx)
        term, trunc = tab["terminated"][idx], tab["truncated"][idx]
        steps = _valid_steps(tab["mask"][idx])
        A, R = adv[idx], ret[idx]
        a_next = 0.0
        for k in range(len(steps) - 1, -1, -1):
            t = steps[k]
            not_term, not_done = 1.0 - float(term[t]), 1.0 - float(term[t] or trunc[t])
            delta = r[t] + gamma * not_term * _next_value(k, steps, nv, v, boot[i]) - v[t]
            A[t] = delta + gamma * lam * not_done * a_next
            R[t] = A[t] + v[t]
            a_next = A[t]
    return layout.merge(adv), layout.merge(ret)


def vtrace(
    rewards,
    values,
    log_rhos,
    *,
    gamma=0.99,
    lam=1.0,
    rho_clip=1.0,
    c_clip=1.0,
    pg_rho_clip=1.0,
    terminated=None,
    truncated=None,
    next_values=None,
    bootstrap_value=None,
    mask=None,
    cu_seqlens=None,
    time_dim=0,
):
    """V-trace targets (IMPALA); returns (vs, pg_advantages).

    rho_t = min(rho_clip, exp(log_rho_t)),  c_t = lam * min(c_clip, exp(log_rho_t))
    delta_t = r_t + gamma * (1 - term_t) * V'_t - V_t
    x_t = vs_t - V_t = rho_t * delta_t + gamma * (1 - done_t) * c_t * x_next  (x after last = 0)
    pg_t = min(pg_rho_clip, exp(log_rho_t)) * (r_t + gamma * (1 - term_t) * v'_t - V_t)
    where v'_t = vs at the next valid step, or V'_t at the last valid step or where done_t.
    V'_t, done_t, mask and cu_seqlens as in ``gae``; outputs are 0 at masked positions.
    """
    _check_unit(gamma, "gamma")
    _check_unit(lam, "lam")
    layout, tab = _scan_inputs(
        rewards,
        values,
        terminated,
        truncated,
        next_values,
        mask,
        time_dim,
        cu_seqlens,
        value_names=(("log_rhos", log_rhos),),
    )
    boot = layout.per_sequence(bootstrap_value, "bootstrap_value")
    vs_out = np.zeros_like(tab["rewards"])
    pg_out = np.zeros_like(tab["rewards"])
    for i, idx in layout.sequences():
        r, v, nv = tab["rewards"][idx], tab["values"][idx], _column(tab["next_values"], idx)
        lr = tab["log_rhos"][idx]
        term, trunc = tab["terminated"][idx], tab["truncated"][idx]
        steps = _valid_steps(tab["mask"][idx])
        VS, PG = vs_out[idx], pg_out[idx]
        x_next, vs_next = 0.0, None
        for k in range(len(steps) - 1, -1, -1):
            t = steps[k]
            last = k == len(steps) - 1
            done = bool(term[t] or trunc[t])
            not_term, not_done = 1.0 - float(term[t]), 1.0 - float(done)
            ratio = np.exp(lr[t])
            rho = np.minimum(rho_clip, ratio)  # np.minimum propagates NaN, builtin min does not
            c = lam * np.minimum(c_clip, ratio)
            pg_rho = np.minimum(pg_rho_clip, ratio)
            v_next = _next_value(k, steps, nv, v, boot[i])
            delta = r[t] + gamma * not_term * v_next - v[t]
            x = rho * delta + gamma * not_done * c * x_next
            VS[t] = v[t] + x
            v_prime = v_next if (last or done) else vs_next
            PG[t] = pg_rho * (r[t] + gamma * not_term * v_prime - v[t])
            x_next, vs_next = x, VS[t]
    return layout.merge(vs_out), layout.merge(pg_out)


# --------------------------------------------------------------------------------------------
# 4.6 Retrace(lambda)
# --------------------------------------------------------------------------------------------


def retrace(
    rewards,
    q_taken,
    next_v,
    log_rhos,
    *,
    gamma,
    lam,
    c_clip=1.0,
    terminated=None,
    truncated=None,
    mask=None,
    cu_seqlens=None,
    time_dim=0,
):
    """Retrace(lambda) targets (Munos et al. 2016), one reverse scan per sequence.

    c_t = lam * min(c_clip, exp(log_rhos_t)); with u the next valid step after t,
    G_t = r_t + gamma * (1 - term_t) * next_v_t + gamma * (1 - done_t) * c_u * (G_u - q_taken_u),
    the last term 0 at the last valid step. So G_t = r_t where s_{t+1} is terminal and
    G_t = r_t + gamma * next_v_t where the episode is cut after t (truncated) or the data ends.
    Written with products, not branches, as the kernels compute it: a NaN after a cut still
    reaches G_t (0 * NaN), as in ``gae``. Mask and cu_seqlens as in ``gae``; 0 at masked positions.
    """
    _check_unit(gamma, "gamma")
    _check_unit(lam, "lam")
    for name, x in (("q_taken", q_taken), ("next_v", next_v), ("log_rhos", log_rhos)):
        if x is None:
            raise TypeError(f"{name} is required")
    layout, tab = _scan_inputs(
        rewards,
        None,
        terminated,
        truncated,
        next_v,
        mask,
        time_dim,
        cu_seqlens,
        value_names=(("q_taken", q_taken), ("log_rhos", log_rhos)),
        next_name="next_v",
    )
    out = np.zeros_like(tab["rewards"])
    for _, idx in layout.sequences():
        r, q, nv = tab["rewards"][idx], tab["q_taken"][idx], tab["next_values"][idx]
        lr = tab["log_rhos"][idx]
        term, trunc = tab["terminated"][idx], tab["truncated"][idx]
        steps = _valid_steps(tab["mask"][idx])
        G = out[idx]
        x_next = 0.0  # c_u * (G_u - q_u) of the next valid step u
        for k in range(len(steps) - 1, -1, -1):
            t = steps[k]
            not_term = 1.0 - float(term[t])
            not_done = not_term * (1.0 - float(trunc[t]))
            G[t] = r[t] + gamma * not_term * nv[t] + gamma * not_done * x_next
            c = lam * np.minimum(c_clip, np.exp(lr[t]))  # np.minimum propagates NaN, builtin min does not
            x_next = c * (G[t] - q[t])
    return layout.merge(out)


# --------------------------------------------------------------------------------------------
# 4.5 n-step returns
# --------------------------------------------------------------------------------------------


def n_step_returns(
    rewards,
    values,
    *,
    n,
    gamma=0.99,
    terminated=None,
    truncated=None,
    next_values=None,
    bootstrap_value=None,
    time_dim=0,
):
    """n-step bootstrapped returns.

    G_t = sum_{k<m} gamma^k r_{t+k} + gamma^m * (1 - term_j) * V'_j, with j = t + m - 1 the last
    step summed: m = n unless the sum stops early at a terminated step (its reward counts, no
    bootstrap), a truncated step or the last step of the data (bootstrap from V'_j there).
    V'_j = next_values[j] if given, else values[j+1], else (last step) bootstrap_value (0 if None).
    """
    _check_unit(gamma, "gamma")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    layout, tab = _scan_inputs(rewards, values, terminated, truncated, next_values, None, time_dim, None)
    boot = layout.per_sequence(bootstrap_value, "bootstrap_value")
    out = np.zeros_like(tab["rewards"])
    T = out.shape[0]
    steps = np.arange(T)
    for i, idx in layout.sequences():
        r, v, nv = tab["rewards"][idx], tab["values"][idx], _column(tab["next_values"], idx)
        term, trunc = tab["terminated"][idx], tab["truncated"][idx]
        G = out[idx]
        for t in range(T):
            total = 0.0
            for m in range(1, n + 1):
                j = t + m - 1
                total += gamma ** (m - 1) * r[j]
                if term[j] or trunc[j] or j == T - 1 or m == n:
                    v_next = _next_value(j, steps, nv, v, boot[i])
                    total += gamma**m * (1.0 - float(term[j])) * v_next
                    break
            G[t] = total
    return layout.merge(out)


# --------------------------------------------------------------------------------------------
# 4.3 log-prob gathering
# --------------------------------------------------------------------------------------------


# The smallest softmax temperature: 1 / temperature is a finite float32 (docs/design.md §4.3, §4.5).
_MIN_TEMPERATURE = 2.938735877055719e-39


def _logsumexp(z):
    """log(sum(exp(z))) of a 1-D float64 array, exact for -inf entries and all -inf rows."""
    m = np.max(z)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if np.isfinite(m):
            return float(m + np.log(np.sum(np.exp(z - m))))
        return float(np.log(np.sum(np.exp(z))))  # all -inf -> -inf; +inf -> +inf; NaN -> NaN


def gather_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, ignore_index=None):
    """Log-probability of ``tokens`` under softmax(logits / temperature), optionally its entropy.

    z = logits / temperature; logp = z[token] - logsumexp(z);
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v  (entries with z_v = -inf contribute 0).
    ``logits`` is [..., V], ``tokens`` is [...]. Rows whose token equals ``ignore_index`` give 0
    for both. Returns logp, or (logp, entropy), float64 with the shape of ``tokens``.
    """
    z_all = _float(logits, "logits")
    tok = _index(tokens, "tokens")
    if z_all.ndim < 1:
        raise ValueError("logits must have shape [..., V]")
    if tok.shape != z_all.shape[:-1]:
        raise ValueError(f"tokens must have shape {z_all.shape[:-1]}, got {tok.shape}")
    if not _MIN_TEMPERATURE <= temperature < np.inf:
        raise ValueError(f"temperature must be finite and >= {_MIN_TEMPERATURE}, got {temperature}")
    V = z_all.shape[-1]
    z_rows = z_all.reshape(tok.size, V) / temperature  # (not -1: V may be 0)
    if str(getattr(logits, "dtype", "float64")).rsplit(".", 1)[-1] != "float64":
        # z in float32, as the kernels scale the logits by 1 / temperature (§4.3): a large logit over a small
        # temperature overflows to inf there, and then here too
        with np.errstate(over="ignore", invalid="ignore"):
            z32 = z_all.reshape(tok.size, V).astype(np.float32) * np.float32(1.0 / temperature)
        z_rows = z32.astype(np.float64)
    tok_rows = tok.reshape(-1)
    ignored = np.zeros(len(tok_rows), dtype=bool)
    if ignore_index is not None:
        ignored = tok_rows == ignore_index
    bad = ~ignored & ((tok_rows < 0) | (tok_rows >= V))
    if np.any(bad):
        raise ValueError(f"tokens must be in [0, {V}) (or ignore_index), got {tok_rows[bad][0]}")
    logp = np.zeros(len(tok_rows))
    ent = np.zeros(len(tok_rows))
    for row in range(len(tok_rows)):
        if ignored[row]:
            continue
        z = z_rows[row]
        lse = _logsumexp(z)
        with np.errstate(invalid="ignore"):  # all -inf row: -inf - (-inf) = NaN, as intended
            logp[row] = z[tok_rows[row]] - lse
        if not np.isfinite(lse):  # all -inf, a +inf or a NaN logit: no distribution
            ent[row] = np.nan
            continue
        p = np.exp(z - lse)
        live = z != -np.inf  # p = 0 there, and 0 * (-inf) counts as 0
        ent[row] = lse - np.sum(p[live] * z[live])
    logp = logp.reshape(tok.shape)
    if return_entropy:
        return logp, ent.reshape(tok.shape)
    return logp


def linear_logprobs(hidden, weight, tokens, *, bias=None, temperature=1.0, return_entropy=False, ignore_index=None,
                    logit_scale=1.0, softcap=None):
    """Log-probability of ``tokens`` under the logits of a linear head, optionally its entropy.

    z = logit_scale * (hidden @ weight.T + bias); with softcap, z = softcap * tanh(z / softcap); then
    ``gather_logprobs(z, tokens, temperature=...)``. ``hidden`` is [..., H], ``weight`` [V, H], ``bias`` [V] or
    None, ``tokens`` [...]. Returns logp, or (logp, entropy), float64 with the shape of ``tokens``.
    """
    h = _float(hidden, "hidden")
    w = _float(weight, "weight")
    if h.ndim < 1:
        raise ValueError("hidden must have shape [..., H]")
    if w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must have shape [V, {h.shape[-1]}], got {w.shape}")
    z = h.reshape(-1, h.shape[-1]) @ w.T
    if bias is not None:
        b = _float(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
        z = z + b
    z = logit_scale * z
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    z = z.reshape(*h.shape[:-1], w.shape[0])
    return gather_logprobs(z, tokens, temperature=temperature, return_entropy=return_entropy,
                           ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------
# 4.4 PPO loss family
# --------------------------------------------------------------------------------------------


def _masked_mean(x, m):
    """Mean of x over positions where m is true; 0 when there are none (masked x is never read)."""
    count = int(np.sum(m))
    return float(np.sum(x[m]) / count) if count else 0.0


def _aggregate(loss, m, agg, norm_length=None):
    """Reduce a per-token loss [..., T] with bool mask m as in docs/design.md §4.4 (masked l never read).

    token-mean              = sum(l*m) / sum(m)
    seq-mean-token-sum      = mean over sequences of sum_t l*m
    seq-mean-token-mean     = mean over sequences with a token of sum_t l*m / sum_t m
    seq-mean-token-sum-norm = sum(l*m) / (B * norm_length), norm_length defaults to T
    Every form is 0 when nothing is unmasked.
    """
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    if agg == "token-mean":
        return _masked_mean(loss, m)
    if loss.ndim < 2:
        raise ValueError(f"agg={agg!r} needs [B, T] inputs, got shape {loss.shape}")
    T = loss.shape[-1]
    B = int(np.prod(loss.shape[:-1], dtype=np.int64))
    lm = np.where(m, loss, 0.0).reshape(B, T)
    counts = m.reshape(B, T).sum(axis=1)
    seq_sums = [float(np.sum(lm[b])) for b in range(B)]
    if agg == "seq-mean-token-sum":
        return sum(seq_sums) / B if B else 0.0
    if agg == "seq-mean-token-mean":
        per_seq = [seq_sums[b] / counts[b] for b in range(B) if counts[b] > 0]
        return sum(per_seq) / len(per_seq) if per_seq else 0.0
    L = T if norm_length is None else norm_length
    if not L > 0:
        raise ValueError(f"norm_length must be > 0, got {norm_length}")
    return sum(seq_sums) / (B * L) if B else 0.0


def ppo_policy_loss(
    logp,
    old_logp,
    advantages,
    mask=None,
    *,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    norm_length=None,
):
    """Clipped PPO policy loss; returns (loss, stats).

    ratio = exp(clamp(logp - old_logp, -20, 20))
    l = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))  (clip_high None: clip_low)
    dual clip c > 1: where A < 0, l = min(l, -A * c).
    Aggregated over unmasked tokens by ``agg`` (see ``_aggregate``). stats, masked means over
    tokens (0 when nothing is unmasked): clipfrac = [-A * clamp(ratio) > -A * ratio],
    clipfrac_lower = [A < 0 and max(...) > -A * c] (0 without dual clip),
    approx_kl = old_logp - logp, ratio_mean = ratio; ratio_max = masked max of ratio (0 if none).
    """
    lp = _float(logp, "logp")
    old = _float(old_logp, "old_logp")
    A = _float(advantages, "advantages")
    _same_shape(old, "old_logp", lp.shape)
    _same_shape(A, "advantages", lp.shape)
    m = np.ones(lp.shape, dtype=bool) if mask is None else _flag(mask, "mask", lp.shape)
    if clip_high is None:
        clip_high = clip_low
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    ratio = np.exp(np.clip(lp - old, -20.0, 20.0))
    unclipped = -A * ratio
    clipped = -A * np.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = np.maximum(unclipped, clipped)
    lower = np.zeros(lp.shape, dtype=bool)
    if dual_clip is not None:
        bound = -A * dual_clip
        lower = (A < 0) & (loss > bound)
        loss = np.where(A < 0, np.minimum(loss, bound), loss)

    stats = {
        "clipfrac": _masked_mean((clipped > unclipped).astype(np.float64), m),
        "clipfrac_lower": _masked_mean(lower.astype(np.float64), m),
        "approx_kl": _masked_mean(old - lp, m),
        "ratio_mean": _masked_mean(ratio, m),
        "ratio_max": float(np.max(ratio[m])) if np.any(m) else 0.0,
    }
    return _aggregate(loss, m, agg, norm_length), stats


def value_loss(values, old_values, returns, mask=None, *, clip=None, agg="token-mean"):
    """Clipped value loss; returns (loss, stats).

    l = 0.5 * max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2)   (no clip: 0.5 * (v - R)^2),
    aggregated like ``ppo_policy_loss``; stats: vf_clipfrac = masked mean of
    [(clamped v - R)^2 > (v - R)^2] (0 without clip or without unmasked tokens).
    """
    v = _float(values, "values")
    old = _float(old_values, "old_values")
    R = _float(returns, "returns")
    _same_shape(old, "old_values", v.shape)
    _same_shape(R, "returns", v.shape)
    m = np.ones(v.shape, dtype=bool) if mask is None else _flag(mask, "mask", v.shape)
    err = (v - R) ** 2
    clipped_err = err if clip is None else (np.clip(v, old - clip, old + clip) - R) ** 2
    loss = 0.5 * np.maximum(err, clipped_err)
    stats = {"vf_clipfrac": _masked_mean((clipped_err > err).astype(np.float64), m)}
    return _aggregate(loss, m, agg), stats


def kl_penalty(logp, ref_logp, kind):
    """Elementwise KL estimate between the policy and a reference policy.

    k1 = logp - ref;  abs = |k1|;  k2 = 0.5 * k1^2;
    k3 = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20), the result clamped to [-10, 10].
    """
    lp = _float(logp, "logp")
    ref = _float(ref_logp, "ref_logp")
    _same_shape(ref, "ref_logp", lp.shape)
    k1 = lp - ref
    if kind == "k1":
        return k1
    if kind == "abs":
        return np.abs(k1)
    if kind == "k2":
        return 0.5 * k1**2
    if kind == "k3":
        d = np.clip(ref - lp, -20.0, 20.0)
        return np.clip(np.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"kind must be one of 'k1', 'abs', 'k2', 'k3', got {kind!r}")


# --------------------------------------------------------------------------------------------
# 4.5 Bellman backups
# --------------------------------------------------------------------------------------------


def q_targets(
    rewards,
    next_q,
    *,
    terminated=None,
    gamma=0.99,
    kind="max",
    next_q_online=None,
    next_probs=None,
    temperature=None,
    n=1,
):
    """Sample-based Q-learning targets y = r + gamma^n * (1 - term) * v' (y = r where terminated).

    v' = max_a Q'(s', a)                              (kind="max")
       = Q'(s', argmax_a Q_online(s', a))             (kind="double"; first index on ties)
       = sum_a pi(a | s') Q'(s', a)                   (kind="expected", pi = next_probs)
       = temperature * logsumexp(Q'(s', .) / temperature)   (kind="soft"; temperature required)
    ``next_q`` is [..., A]; rewards and terminated are [...].
    """
    _check_unit(gamma, "gamma")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    r = _float(rewards, "rewards")
    q = _float(next_q, "next_q")
    if q.ndim < 1 or q.shape[:-1] != r.shape:
        raise ValueError(f"next_q must have shape {(*r.shape, 'A')}, got {q.shape}")
    term = _flag(terminated, "terminated", r.shape)
    q_rows = q.reshape(r.size, q.shape[-1])  # (not -1: A may be 0)
    v = np.zeros(q_rows.shape[0])
    if kind == "max":
        for b in range(len(v)):
            v[b] = np.max(q_rows[b])
    elif kind == "double":
        if next_q_online is None:
            raise ValueError("kind='double' needs next_q_online")
        online = _float(next_q_online, "next_q_online")
        _same_shape(online, "next_q_online", q.shape)
        online = online.reshape(q_rows.shape)
        for b in range(len(v)):
            v[b] = q_rows[b, int(np.argmax(online[b]))]
    elif kind == "expected":
        if next_probs is None:
            raise ValueError("kind='expected' needs next_probs")
        probs = _float(next_probs, "next_probs")
        _same_shape(probs, "next_probs", q.shape)
        probs = probs.reshape(q_rows.shape)
        for b in range(len(v)):
            v[b] = np.sum(probs[b] * q_rows[b])
    elif kind == "soft":
        if temperature is None or not _MIN_TEMPERATURE <= temperature < np.inf:
            raise ValueError(f"kind='soft' needs a finite temperature >= {_MIN_TEMPERATURE}, got {temperature}")
        for b in range(len(v)):
            v[b] = temperature * _logsumexp(q_rows[b] / temperature)
    else:
        raise ValueError(f"kind must be one of 'max', 'double', 'expected', 'soft', got {kind!r}")
    # A terminated transition's target is its reward, whatever next_q holds (it may be garbage, even inf).
    return np.where(term, r, r + gamma**n * v.reshape(r.shape))


def td_loss(q, actions, targets, *, loss="huber", delta=1.0, weights=None, reduction="mean"):
    """TD loss on Q(s, a); returns (loss, td_errors).

    e = targets - q[b, actions[b]];
    per-sample loss: huber = 0.5 e^2 if |e| <= delta else delta * (|e| - 0.5 delta); squared = e^2;
    times ``weights`` if given; then mean (0 for an empty batch), sum, or none (per-sample array).
    td_errors = e.
    """
    q = _float(q, "q")
    if q.ndim != 2:
        raise ValueError(f"q must have shape [B, A], got {q.shape}")
    B, A = q.shape
    act = _index(actions, "actions")
    y = _float(targets, "targets")
    _same_shape(act, "actions", (B,))
    _same_shape(y, "targets", (B,))
    if np.any((act < 0) | (act >= A)):
        raise ValueError(f"actions must be in [0, {A})")
    if loss not in ("huber", "squared"):
        raise ValueError(f"loss must be 'huber' or 'squared', got {loss!r}")
    if loss == "huber" and not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    w = None if weights is None else _float(weights, "weights")
    _same_shape(w, "weights", (B,))

    e = np.zeros(B)
    per = np.zeros(B)
    for b in range(B):
        e[b] = y[b] - q[b, act[b]]
        if loss == "squared":
            per[b] = e[b] ** 2
        elif abs(e[b]) <= delta:
            per[b] = 0.5 * e[b] ** 2
        else:
            per[b] = delta * (abs(e[b]) - 0.5 * delta)
        if w is not None:
            per[b] *= w[b]
    if reduction == "none":
        return per, e
    if reduction == "sum":
        return float(np.sum(per)), e
    return (float(np.sum(per) / B) if B else 0.0), e


def bellman_backup(P, R, V, gamma):
    """One Bellman optimality backup per MDP; returns (Q, V_new, policy).

    Q[s, a] = R[s, a] + gamma * sum_s' P[s, a, s'] * V[s'];  V_new = max_a Q;  policy = argmax_a Q
    (first index on ties, int64). Shapes: P [..., S, A, S], R [..., S, A], V [..., S].
    """
    _check_unit(gamma, "gamma")
    P = _float(P, "P")
    R = _float(R, "R")
    V = _float(V, "V")
    if P.ndim < 3 or P.shape[-1] != P.shape[-3]:
        raise ValueError(f"P must have shape [..., S, A, S], got {P.shape}")
    _same_shape(R, "R", P.shape[:-1])
    _same_shape(V, "V", P.shape[:-2])
    batch, (S, A) = P.shape[:-3], P.shape[-3:-1]
    nb = int(np.prod(batch, dtype=np.int64))  # (not -1: S or A may be 0)
    Pf, Rf, Vf = P.reshape(nb, S, A, S), R.reshape(nb, S, A), V.reshape(nb, S)
    Q = np.zeros_like(Rf)
    for b in range(Pf.shape[0]):
        for s in range(S):
            for a in range(A):
                Q[b, s, a] = Rf[b, s, a] + gamma * np.dot(Pf[b, s, a], Vf[b])
    V_new = Q.max(axis=-1) if A else np.full(Q.shape[:-1], -np.inf)
    policy = Q.argmax(axis=-1) if A else np.zeros(Q.shape[:-1], dtype=np.int64)
    return (
        Q.reshape((*batch, S, A)),
        V_new.reshape((*batch, S)),
        policy.astype(np.int64).reshape((*batch, S)),
    )


def value_iteration(P, R, gamma, *, tol=1e-6, max_iters=1000, V0=None):
    """Value iteration; returns (V, Q, policy, iters, residual).

    Repeats (Q, V_new, policy) = bellman_backup(P, R, V, gamma), V <- V_new, starting from V0
    (zeros if None), until every MDP of the batch has converged (max_s |V_new - V_old| < tol for
    all of them) or ``max_iters`` backups were made. All MDPs iterate together, so ``iters`` (a
    Python int) is the number of backups made. ``residual`` is max_s |V_new - V_old| of the last
    backup, one per MDP (float64 array of the batch shape, 0-d for a single MDP). V, Q and policy
    come from the last backup (V = max_a Q).
    """
    _check_unit(gamma, "gamma")
    if isinstance(max_iters, bool) or not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    P = _float(P, "P")
    if P.ndim < 3:
        raise ValueError(f"P must have shape [..., S, A, S], got {P.shape}")
    V = np.zeros(P.shape[:-2]) if V0 is None else _float(V0, "V0")
    iters = 0
    while True:
        Q, V_new, policy = bellman_backup(P, R, V, gamma)
        diff = np.abs(V_new - V)
        residual = diff.max(axis=-1) if V.shape[-1] else np.zeros(V.shape[:-1])
        residual = np.asarray(residual, dtype=np.float64)
        V = V_new
        iters += 1
        if np.all(residual < tol) or iters >= max_iters:
            return V, Q, policy, iters, residual
