"""Triton kernels of the PPO loss family: ppo_policy_loss, value_loss, kl_penalty (docs/design.md §4.4).

The per-token math mirrors csrc/include/rlkernels/ppo.h, derivative conventions included (scalar clamps pass
the gradient on the open interval, tensor clamps and max/min split ties), so the backends agree up to rounding.
The losses take canonical contiguous [B, T] inputs. A program reduces one BLOCK-token chunk of one row to a
few partial sums; the chunk partials are then combined by torch reductions of fixed shape. There are no
atomics, so results are deterministic run to run, and nothing reads a value on the host.

The ops are `torch.library.triton_op`s named ``rlkernels::triton_<name>``; their autograd is the family's
formula (rlkernels/_ops/ppo.py) around ``rlkernels::triton_<name>_backward``.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._ops import ppo as _formulas
from ._common import acc_dtype, keep_whole_under_interpreter, skip_launch, tl_acc, wrap_triton

Tensor = torch.Tensor

BLOCK = 1024
ELEMENT_BLOCK = 1024
# Partial sums per chunk: loss, count, clipped, lower, kl, ratio, ratio_max (and one pad).
_NUM_PARTIALS = 8

_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_KINDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


@triton.jit
def _share(a, b):
    """d max(a, b) / da as torch computes it: 1, 1/2 on a tie, else 0."""
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _policy_terms(lp, old, adv, clip_lo, clip_hi, dual_clip, HAS_DUAL: tl.constexpr):
    log_ratio = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    # NaN propagates like torch.maximum (tl.maximum may drop it).
    loss = tl.where(unclipped != unclipped, unclipped, tl.maximum(unclipped, clipped))  # noqa: PLR0124
    lower = ratio < 0.0  # all False (NaN too), with the right shape
    if HAS_DUAL:
        dual = -adv * dual_clip
        lower = (adv < 0) & (loss > dual)
        loss = tl.where(lower, dual, loss)
    return log_ratio, ratio, unclipped, clipped, loss, lower


@triton.jit
def _policy_forward_kernel(LP_ptr, OLD_ptr, ADV_ptr, MASK_ptr, PART_ptr, T, num_chunks, clip_lo: tl.float64,
                           clip_hi: tl.float64, dual_clip: tl.float64, HAS_MASK: tl.constexpr, HAS_DUAL: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Chunk partials of l = max(-A r, -A clamp(r, 1 - eps_lo, 1 + eps_hi)) (dual clip: min with -A c where
    A < 0), r = exp(clamp(logp - old, -20, 20)) (Schulman et al. 2017; Ye et al. 2020)."""
    # One grid axis of B * num_chunks programs (axis 1 of a GPU grid stops at 65535 blocks); int64 before pointer
    # arithmetic: B * T may exceed 2^31.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_chunks
    chunk = pid % num_chunks
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < T
    ptr = row * T + offs
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ptr + ptr, mask=ok, other=0) != 0)
    # Loads in the input dtype, math in the accumulation type (fp32 for 16-bit inputs).
    lp = tl.load(LP_ptr + ptr, mask=ok, other=0).to(ACC)
    old = tl.load(OLD_ptr + ptr, mask=ok, other=0).to(ACC)
    adv = tl.load(ADV_ptr + ptr, mask=ok, other=0).to(ACC)
    clip_lo = tl.full([], clip_lo, tl.float64).to(ACC)
    clip_hi = tl.full([], clip_hi, tl.float64).to(ACC)
    dual_clip = tl.full([], dual_clip, tl.float64).to(ACC)
    log_ratio, ratio, unclipped, clipped, loss, lower = _policy_terms(lp, old, adv, clip_lo, clip_hi, dual_clip,
                                                                      HAS_DUAL)
    zero = tl.zeros_like(ratio)
    out = PART_ptr + (row * num_chunks + chunk) * 8
    tl.store(out + 0, tl.sum(tl.where(ok, loss, zero), axis=0))
    tl.store(out + 1, tl.sum(tl.where(ok, 1.0, zero), axis=0))
    tl.store(out + 2, tl.sum(tl.where(ok & (clipped > unclipped), 1.0, zero), axis=0))
    tl.store(out + 3, tl.sum(tl.where(ok & lower, 1.0, zero), axis=0))
    tl.store(out + 4, tl.sum(tl.where(ok, -log_ratio, zero), axis=0))
    tl.store(out + 5, tl.sum(tl.where(ok, ratio, zero), axis=0))
    # The masked max; a NaN ratio sticks, as in torch's amax (tl.max may drop it).
    rmax = tl.max(tl.where(ok, ratio, zero - float("inf")), axis=0)
    nan_seen = tl.max(tl.where(ok & (ratio != ratio), 1, 0), axis=0)  # noqa: PLR0124
    tl.store(out + 6, tl.where(nan_seen > 0, float("nan"), rmax))


@triton.jit
def _policy_backward_kernel(LP_ptr, OLD_ptr, ADV_ptr, MASK_ptr, W_ptr, GRAD_ptr, T, num_chunks, clip_lo: tl.float64,
                            clip_hi: tl.float64, dual_clip: tl.float64,
                            HAS_MASK: tl.constexpr, HAS_DUAL: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    """d loss / d logp = w_row dl/dr r [|log r| < 20]; w_row = d loss / d l_t of the aggregation times the
    upstream gradient (computed by the caller)."""
    pid = tl.program_id(0).to(tl.int64)  # one grid axis of B * num_chunks programs
    row = pid // num_chunks
    offs = (pid % num_chunks) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < T
    ptr = row * T + offs
    ok = inside
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ptr + ptr, mask=inside, other=0) != 0)
    lp = tl.load(LP_ptr + ptr, mask=ok, other=0).to(ACC)
    old = tl.load(OLD_ptr + ptr, mask=ok, other=0).to(ACC)
    adv = tl.load(ADV_ptr + ptr, mask=ok, other=0).to(ACC)
    clip_lo = tl.full([], clip_lo, tl.float64).to(ACC)
    clip_hi = tl.full([], clip_hi, tl.float64).to(ACC)
    dual_clip = tl.full([], dual_clip, tl.float64).to(ACC)
    log_ratio, ratio, unclipped, clipped, loss, _ = _policy_terms(lp, old, adv, clip_lo, clip_hi, dual_clip,
                                                                  False)
    in_clip = tl.where((ratio > clip_lo) & (ratio < clip_hi), 1.0, 0.0)
    d_ratio = -adv * (_share(unclipped, clipped) + _share(clipped, unclipped) * in_clip)
    if HAS_DUAL:
        d_ratio = tl.where(adv < 0, d_ratio * _share(-adv * dual_clip, loss), d_ratio)
    d_log = tl.where((log_ratio > -20.0) & (log_ratio < 20.0), ratio, 0.0)
    w = tl.load(W_ptr + row).to(ACC)
    grad = tl.where(ok, w * d_ratio * d_log, 0.0)
    tl.store(GRAD_ptr + ptr, grad.to(GRAD_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _value_terms(v, old, ret, clip, HAS_CLIP: tl.constexpr):
    err = (v - ret) * (v - ret)
    loss = 0.5 * err
    clipped = err < 0.0  # all False (NaN too)
    if HAS_CLIP:
        # torch.clamp: a NaN bound (old value) gives NaN
        vc = tl.where(old != old, old, tl.minimum(tl.maximum(v, old - clip), old + clip))  # noqa: PLR0124
        clipped_err = (vc - ret) * (vc - ret)
        clipped = clipped_err > err
        loss = tl.where(clipped | (clipped_err != clipped_err), 0.5 * clipped_err, loss)  # noqa: PLR0124
    return loss, clipped


@triton.jit
def _value_forward_kernel(V_ptr, OLD_ptr, RET_ptr, MASK_ptr, PART_ptr, T, num_chunks, clip: tl.float64,
                          HAS_MASK: tl.constexpr, HAS_CLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk partials of l = 0.5 max((v - R)^2, (clamp(v, old - c, old + c) - R)^2)."""
    pid = tl.program_id(0).to(tl.int64)  # one grid axis of B * num_chunks programs, as the policy kernel
    row = pid // num_chunks
    chunk = pid % num_chunks
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < T
    ptr = row * T + offs
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ptr + ptr, mask=ok, other=0) != 0)
    v = tl.load(V_ptr + ptr, mask=ok, other=0).to(ACC)
    old = tl.load(OLD_ptr + ptr, mask=ok, other=0).to(ACC)
    ret = tl.load(RET_ptr + ptr, mask=ok, other=0).to(ACC)
    loss, clipped = _value_terms(v, old, ret, tl.full([], clip, tl.float64).to(ACC), HAS_CLIP)
    zero = tl.zeros_like(v)
    out = PART_ptr + (row * num_chunks + chunk) * 8
    tl.store(out + 0, tl.sum(tl.where(ok, loss, zero), axis=0))
    tl.store(out + 1, tl.sum(tl.where(ok, 1.0, zero), axis=0))
    tl.store(out + 2, tl.sum(tl.where(ok & clipped, 1.0, zero), axis=0))


@triton.jit
def _value_backward_kernel(V_ptr, OLD_ptr, RET_ptr, MASK_ptr, W_ptr, GRAD_ptr, T, num_chunks, clip: tl.float64,
                           HAS_MASK: tl.constexpr,
                           HAS_CLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one grid axis of B * num_chunks programs
    row = pid // num_chunks
    offs = (pid % num_chunks) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < T
    ptr = row * T + offs
    ok = inside
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ptr + ptr, mask=inside, other=0) != 0)
    v = tl.load(V_ptr + ptr, mask=ok, other=0).to(ACC)
    old = tl.load(OLD_ptr + ptr, mask=ok, other=0).to(ACC)
    ret = tl.load(RET_ptr + ptr, mask=ok, other=0).to(ACC)
    d = v - ret
    if HAS_CLIP:
        c = tl.full([], clip, tl.float64).to(ACC)
        lo = old - c
        hi = old + c
        vc = tl.where(old != old, old, tl.minimum(tl.maximum(v, lo), hi))  # noqa: PLR0124
        err = d * d
        clipped_err = (vc - ret) * (vc - ret)
        share = tl.where((v > lo) & (v < hi), 1.0, 0.0) + tl.where(v == lo, 0.5, 0.0) + tl.where(v == hi, 0.5, 0.0)
        d = _share(err, clipped_err) * d + _share(clipped_err, err) * (vc - ret) * share
    w = tl.load(W_ptr + row).to(ACC)
    tl.store(GRAD_ptr + ptr, tl.where(ok, w * d, 0.0).to(GRAD_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _kl_kernel(LP_ptr, REF_ptr, G_ptr, OUT_ptr, n, KIND: tl.constexpr, BACKWARD: tl.constexpr,
               ACC: tl.constexpr, BLOCK: tl.constexpr):
    """k1 = logp - ref; abs = |k1|; k2 = k1^2 / 2; k3 = clamp(e^d - d - 1, -10, 10), d = clamp(ref - logp, ±20)
    (Schulman 2020). BACKWARD: G * d kl / d logp instead."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lp = tl.load(LP_ptr + offs, mask=ok, other=0).to(ACC)
    ref = tl.load(REF_ptr + offs, mask=ok, other=0).to(ACC)
    k1 = lp - ref
    if KIND == 0:
        value = k1
        slope = tl.full(k1.shape, 1.0, ACC)
    elif KIND == 1:
        value = tl.abs(k1)
        slope = tl.where(k1 > 0, 1.0, tl.where(k1 < 0, -1.0, k1 * 0.0))
    elif KIND == 2:
        value = 0.5 * k1 * k1
        slope = k1
    else:
        raw = ref - lp
        d = tl.minimum(tl.maximum(raw, -20.0), 20.0)
        e = tl.exp(d)
        unclamped = e - d - 1.0
        value = tl.minimum(tl.maximum(unclamped, -10.0), 10.0)
        passes = (raw > -20.0) & (raw < 20.0) & (unclamped > -10.0) & (unclamped < 10.0)
        slope = tl.where(passes, -(e - 1.0), 0.0)
    if BACKWARD:
        g = tl.load(G_ptr + offs, mask=ok, other=0).to(ACC)
        tl.store(OUT_ptr + offs, (g * slope).to(OUT_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(OUT_ptr + offs, value.to(OUT_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Aggregation (torch ops of fixed shape: deterministic, no host sync)
# ----------------------------------------------------------------------------------------------------


def _mean_or_zero(total, count):
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _aggregate(rows, agg, norm_length):
    """rows: [B, >=2] per-row (loss sum, count, ...). The aggregated loss of docs/design.md §4.4, 0 when empty."""
    B = rows.shape[0]
    loss, count = rows[:, 0], rows[:, 1]
    if agg == "token-mean":
        return _mean_or_zero(loss.sum(), count.sum())
    if agg == "seq-mean-token-sum":
        return loss.sum() / max(B, 1)
    if agg == "seq-mean-token-mean":
        has = count > 0
        per = torch.where(has, loss / count.clamp(min=1), torch.zeros_like(loss))
        return _mean_or_zero(per.sum(), has.to(per.dtype).sum())
    return loss.sum() / max(B * norm_length, 1e-300)


def _row_weights(ref, mask, agg, norm_length, grad_loss, acc):
    """[B] d loss / d l_t for an unmasked token of each row, times the upstream gradient."""
    B, T = ref.shape
    counts = (torch.full((B,), float(T), dtype=acc, device=ref.device) if mask is None
              else (mask != 0).sum(-1).to(acc))
    g = grad_loss.to(acc)
    if agg == "token-mean":
        total = counts.sum()
        w = torch.where(total > 0, 1.0 / total.clamp(min=1), torch.zeros_like(total)).expand(B)
    elif agg == "seq-mean-token-sum":
        w = torch.full((B,), 1.0 / max(B, 1), dtype=acc, device=ref.device)
    elif agg == "seq-mean-token-mean":
        nonempty = (counts > 0).to(acc).sum()
        w = torch.where(counts > 0, 1.0 / (counts.clamp(min=1) * nonempty.clamp(min=1)), torch.zeros_like(counts))
    else:
        w = torch.full((B,), 1.0 / (B * norm_length), dtype=acc, device=ref.device)
    return (w * g).contiguous()


def _partials(ref):
    B, T = ref.shape
    num_chunks = max(triton.cdiv(T, BLOCK), 1)
    return torch.zeros((B, num_chunks, _NUM_PARTIALS), dtype=acc_dtype(ref.dtype), device=ref.device), num_chunks


def _rows_of(parts):
    rows = parts[:, :, :6].sum(1)
    return rows, parts[:, :, 6].amax(1) if parts.shape[1] > 0 else parts.new_zeros(parts.shape[0])


# ---- ppo_policy_loss ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_ppo_policy_loss", mutates_args=())
def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None, clip_low: float,
                    clip_high: float, dual_clip: float | None, agg: str,
                    norm_length: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Canonical [B, T] inputs; returns (loss, clipfrac, clipfrac_lower, approx_kl, ratio_mean, ratio_max)."""
    B, T = logp.shape
    parts, num_chunks = _partials(logp)
    if B > 0 and T > 0 and not skip_launch(parts):
        wrap_triton(_policy_forward_kernel)[(B * num_chunks,)](
            logp, old_logp, advantages, mask, parts, T, num_chunks, 1.0 - clip_low, 1.0 + clip_high,
            1.0 if dual_clip is None else dual_clip, HAS_MASK=mask is not None, HAS_DUAL=dual_clip is not None,
            ACC=tl_acc(logp.dtype), BLOCK=BLOCK)
    rows, row_max = _rows_of(parts)
    total = rows.sum(0)
    count = total[1]
    ratio_max = torch.where(count > 0, row_max.amax() if B > 0 else count, torch.zeros_like(count))
    stats = [_mean_or_zero(total[k], count) for k in (2, 3, 4, 5)]
    return (_aggregate(rows, agg, norm_length), *stats, ratio_max)


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_ppo_policy_loss_backward", mutates_args=())
def ppo_policy_loss_backward(grad_loss: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                             mask: Tensor | None, clip_low: float, clip_high: float, dual_clip: float | None,
                             agg: str, norm_length: float) -> Tensor:
    B, T = logp.shape
    grad = torch.empty_like(logp)
    w = _row_weights(logp, mask, agg, norm_length, grad_loss, acc_dtype(logp.dtype))
    if B > 0 and T > 0 and not skip_launch(grad):
        num_chunks = triton.cdiv(T, BLOCK)
        wrap_triton(_policy_backward_kernel)[(B * num_chunks,)](
            logp, old_logp, advantages, mask, w, grad, T, num_chunks, 1.0 - clip_low, 1.0 + clip_high,
            1.0 if dual_clip is None else dual_clip, HAS_MASK=mask is not None, HAS_DUAL=dual_clip is not None,
            ACC=tl_acc(logp.dtype), BLOCK=BLOCK)
    return grad


_formulas.register_policy_loss(ppo_policy_loss, torch.ops.rlkernels.triton_ppo_policy_loss_backward)


# ---- value_loss ----


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_value_loss", mutates_args=())
def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor | None, clip: float | None,
               agg: str) -> tuple[Tensor, Tensor]:
    """Canonical [B, T] inputs; returns (loss, vf_clipfrac)."""
    B, T = values.shape
    parts, num_chunks = _partials(values)
    if B > 0 and T > 0 and not skip_launch(parts):
        wrap_triton(_value_forward_kernel)[(B * num_chunks,)](
            values, old_values, returns, mask, parts, T, num_chunks, 0.0 if clip is None else clip,
            HAS_MASK=mask is not None, HAS_CLIP=clip is not None, ACC=tl_acc(values.dtype), BLOCK=BLOCK)
    rows, _ = _rows_of(parts)
    total = rows.sum(0)
    return _aggregate(rows, agg, float(T)), _mean_or_zero(total[2], total[1])


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_value_loss_backward", mutates_args=())
def value_loss_backward(grad_loss: Tensor, values: Tensor, old_values: Tensor, returns: Tensor,
                        mask: Tensor | None, clip: float | None, agg: str) -> Tensor:
    B, T = values.shape
    grad = torch.empty_like(values)
    w = _row_weights(values, mask, agg, float(T), grad_loss, acc_dtype(values.dtype))
    if B > 0 and T > 0 and not skip_launch(grad):
        num_chunks = triton.cdiv(T, BLOCK)
        wrap_triton(_value_backward_kernel)[(B * num_chunks,)](
            values, old_values, returns, mask, w, grad, T, num_chunks, 0.0 if clip is None else clip,
            HAS_MASK=mask is not None, HAS_CLIP=clip is not None, ACC=tl_acc(values.dtype), BLOCK=BLOCK)
    return grad


_formulas.register_value_loss(value_loss, torch.ops.rlkernels.triton_value_loss_backward)


# ---- kl_penalty ----


def _kl_launch(logp, ref_logp, grad, out, kind, backward):
    n = logp.numel()
    if n > 0 and not skip_launch(out):
        wrap_triton(_kl_kernel)[(triton.cdiv(n, ELEMENT_BLOCK),)](
            logp, ref_logp, grad, out, n, KIND=_KL_KINDS[kind], BACKWARD=backward, ACC=tl_acc(logp.dtype),
            BLOCK=ELEMENT_BLOCK)
    return out


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_kl_penalty", mutates_args=())
def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    logp, ref_logp = logp.contiguous(), ref_logp.contiguous()
    out = torch.empty(logp.shape, dtype=acc_dtype(logp.dtype), device=logp.device)
    return _kl_launch(logp, ref_logp, None, out, kind, False)


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_kl_penalty_backward", mutates_args=())
def kl_penalty_backward(grad: Tensor, logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    logp, ref_logp = logp.contiguous(), ref_logp.contiguous()
    out = torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)
    return _kl_launch(logp, ref_logp, grad.contiguous(), out, kind, True)


_formulas.register_kl_penalty(kl_penalty, torch.ops.rlkernels.triton_kl_penalty_backward)
