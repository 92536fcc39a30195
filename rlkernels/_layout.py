"""The argument and layout layer: checked inputs brought to the kernels' canonical layouts, and back.

Every public function checks its arguments here (errors name the argument, docs/design.md §3) and gets the
tensors its registered op takes:
* the scan family (and n_step_returns): [O, T, I] contiguous with T the time axis, or 1-D packed segments
  with cu_seqlens; per-sequence values [O, I] or [n] (``ScanLayout``);
* the PPO losses: contiguous [B, T] rows of one dtype and a bool mask (``loss_rows``);
* log-probs: [N, V] rows with unit stride along V and int64 tokens (``logit_rows``);
* the model-based Bellman ops: [B, S, A, S] / [B, S, A] / [B, S] of one dtype (``mdp_tensors``).
Nothing here reads tensor values, so the checks cost nothing on the device and trace under torch.compile.
"""

from __future__ import annotations

import math

import torch

from . import _checks as checks
from ._backend import resolve


def int_arg(op, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"rlkernels.{op}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def index_arg(op, name, value):
    """An optional integer index (ignore_index)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"rlkernels.{op}: {name} must be an int or None, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------
# The scan family: [O, T, I] or packed
# ----------------------------------------------------------------------------------------------------


class ScanLayout:
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
            elif x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise TypeError(f"rlkernels.{op}: {name} must be a number or a float tensor, got {type(x).__name__}")
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
            checks.dim_index(op, "time_dim", time_dim, 1)  # 1-D: 0 or -1; anything else is a mistake, not ignored
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


def direct_cpu(op, rewards, time_dim, cu_seqlens, backend, floats, flags, per_seq, optional_floats=()):
    """Whether the C++ CPU op can take the caller's tensors as they are: time-first [T, B] or [T] CPU tensors
    of one float dtype, bool flags of the same shape, per-sequence values shaped [B] (or []) or None, and the
    cpu backend chosen. The general path's reshapes, casts and checks cost more than GAE itself on [2048, 64]
    CPU inputs; the op checks shapes and dtypes again and names the argument."""
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


def gamma_lam(op, gamma, *lam):
    gamma = checks.unit_interval(op, "gamma", gamma)
    if not lam:
        return gamma
    return gamma, checks.unit_interval(op, "lam", lam[0])


def check_truncated(op, truncated, next_values):
    if truncated is not None and next_values is None:
        raise ValueError(
            f"rlkernels.{op}: truncated requires next_values: without them the value after a truncated step "
            "would be values[t+1], the first state of the next episode"
        )


# ----------------------------------------------------------------------------------------------------
# The PPO losses: [B, T] rows
# ----------------------------------------------------------------------------------------------------

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_agg(op, agg):
    if agg not in AGGS:
        raise ValueError(f"rlkernels.{op}: agg must be one of {AGGS}, got {agg!r}")


def loss_rows(op, ref_name, ref, agg, floats, mask):
    """Checked inputs as canonical [B, T] tensors of one dtype (leading dims flattened into B; 1-D inputs are
    one row, token-mean only), and the mask as bool (or None)."""
    checks.float_tensor(op, ref_name, ref)
    for name, x in floats.items():
        checks.float_tensor(op, name, x)
    mask = checks.flag_tensor(op, "mask", mask)
    checks.same_device(op, ref_name, ref, **floats, mask=mask)
    checks.same_shape(op, ref_name, ref, **floats, mask=mask)
    check_agg(op, agg)
    if ref.dim() == 0:
        raise ValueError(f"rlkernels.{op}: {ref_name} must be [B, T] (or 1-D for token-mean), got a 0-d tensor")
    if ref.dim() == 1:
        if agg != "token-mean":
            raise ValueError(
                f"rlkernels.{op}: agg={agg!r} needs [B, T] inputs; {ref_name} has shape {tuple(ref.shape)}"
            )
        canon = (1, ref.shape[0])
    else:
        canon = (math.prod(ref.shape[:-1]), ref.shape[-1])
    dtype = checks.common_float_dtype(ref, *floats.values())
    tensors = [_canonical(x, canon, dtype) for x in (ref, *floats.values())]
    if mask is not None:
        mask = _canonical(mask, canon, torch.bool)
    return tensors, mask, dtype


def _canonical(x, shape, dtype):
    """x as a contiguous tensor of `shape` and `dtype`; x itself when it already is one (no calls: the checks
    cost less than the no-op conversions, which dominate a small batch's time)."""
    if x.dtype == dtype and x.shape == shape and x.is_contiguous():
        return x
    return x.to(dtype).reshape(shape).contiguous()


# ----------------------------------------------------------------------------------------------------
# Log-probs: [N, V] rows
# ----------------------------------------------------------------------------------------------------


def logit_rows(logits, tokens):
    """logits as [N, V] rows with unit stride along V (no copy for contiguous logits), tokens as int64 [N]."""
    V = logits.shape[-1]
    rows = logits.reshape(math.prod(logits.shape[:-1]), V) if logits.dim() != 2 else logits
    if rows.shape[0] > 0 and V > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()  # only for logits strided along V (a transposed view): no kernel reads those
    return rows, tokens.reshape(-1).to(torch.int64)


# ----------------------------------------------------------------------------------------------------
# Model-based Bellman ops: batches of MDPs
# ----------------------------------------------------------------------------------------------------


def mdp_tensors(op, P, R, V, v_name):
    """P [..., S, A, S], R [..., S, A] and V [..., S] (or None) checked and flattened to one batch dim of one
    dtype. Returns ((P, R, V), batch shape, dtype)."""
    checks.float_tensor(op, "P", P)
    checks.float_tensor(op, "R", R)
    checks.float_tensor(op, v_name, V, optional=True)
    checks.same_device(op, "P", P, R=R, **{v_name: V})
    if P.dim() < 3 or P.shape[-1] != P.shape[-3]:
        raise ValueError(f"rlkernels.{op}: P must have shape [..., S, A, S], got {tuple(P.shape)}")
    if tuple(R.shape) != tuple(P.shape[:-1]):
        raise ValueError(f"rlkernels.{op}: R must have shape {tuple(P.shape[:-1])} ([..., S, A]), got "
                         f"{tuple(R.shape)}")
    if V is not None and tuple(V.shape) != tuple(P.shape[:-2]):
        raise ValueError(f"rlkernels.{op}: {v_name} must have shape {tuple(P.shape[:-2])} ([..., S]), got "
                         f"{tuple(V.shape)}")
    batch, (S, A) = tuple(P.shape[:-3]), tuple(P.shape[-3:-1])
    if A == 0:
        raise ValueError(f"rlkernels.{op}: P must have at least one action (A >= 1), got shape {tuple(P.shape)}")
    B = math.prod(batch)
    dtype = checks.common_float_dtype(P, R, V)
    canon = (P.to(dtype).reshape(B, S, A, S).contiguous(), R.to(dtype).reshape(B, S, A).contiguous(),
             None if V is None else V.to(dtype).reshape(B, S).contiguous())
    return canon, batch, dtype
