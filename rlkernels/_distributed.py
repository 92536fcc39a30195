"""Across processes with torch.distributed: vocab-parallel log-probs and global loss counts (docs/design.md §4.8).

Vocab-parallel: every rank of ``process_group`` holds a contiguous shard [start_r, start_r + V_r) of the
vocabulary, in the group's rank order. The per-row state of a shard, its logsumexp lse_r and entropy H_r over
the shard's entries and the target's logit where the shard holds the target, combines into the full
vocabulary's with two all-reduces (``combine_vocab_shards``): MAX of lse_r, then one SUM of the stacked
[exp(lse_r - max), target logit, exp(lse_r - max) (lse_r - H_r)]. Nothing of the logits' size is exchanged.
``combine_vocab_shards`` is the piece any producer of shard states (gather_logprobs here, a fused LM head)
calls; ``shard_layout`` is the one small all-gather per call that gives each rank its shard's start and
checks that every rank passes matching arguments, so that a mismatch is an error on every rank instead of a
collective that hangs.

Global loss counts: ``local_count`` is what an aggregation of the PPO family divides by on one call;
``global_share`` turns a call's loss into its share of the loss of the whole global batch.
"""

from __future__ import annotations

import math
import struct

import torch

from . import _dispatch as dispatch
from ._ops._util import accumulate_dtype


def _dist():
    import torch.distributed as dist

    return dist


def check_group(op, group):
    """``group`` must be an initialized torch.distributed ProcessGroup this process belongs to."""
    if not torch.distributed.is_available():
        raise RuntimeError(f"rlkernels.{op}: process_group needs torch.distributed, which this torch build lacks")
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"rlkernels.{op}: process_group must be a torch.distributed.ProcessGroup, "
                        f"got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"rlkernels.{op}: this process (global rank {dist.get_rank()}) is not a member of "
                         "process_group")


def _meta_device(group):
    """Where the layout exchange runs: CPU when the group has a CPU backend (gloo), else the current GPU."""
    backend = str(_dist().get_backend(group)).lower()
    if "gloo" in backend or "cpu:" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------------
# The shard layout: one all-gather of a few integers per rank and call
# ----------------------------------------------------------------------------------------------------

# One row per rank: ok, V_r, N, acc float64, return_entropy, ignore_index given, ignore_index, temperature
# (float64 bits), smallest and largest token not ignored, a checksum of the tokens, then two op-specific
# integers that must match too (a fused head's logit_scale and softcap).
_META = 13
_NO_TOKEN_MIN, _NO_TOKEN_MAX = 2**62, -(2**62)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _token_summary(tokens, ignore_index):
    """(min, max, checksum) of the tokens on their device; ignored rows do not count for min and max."""
    t = tokens.reshape(-1).to(torch.int64)
    n = t.shape[0]
    if n == 0:
        return torch.tensor([_NO_TOKEN_MIN, _NO_TOKEN_MAX, 0], dtype=torch.int64, device=t.device)
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    lo = torch.where(keep, t, torch.full_like(t, _NO_TOKEN_MIN)).min()
    hi = torch.where(keep, t, torch.full_like(t, _NO_TOKEN_MAX)).max()
    # Integer arithmetic wraps identically on every device: equal checksums on every rank, or a mismatch.
    weights = torch.arange(n, dtype=torch.int64, device=t.device) * 2654435761 + 97
    return torch.stack([lo, hi, (t * weights).sum()])


class ShardLayout:
    """The vocabulary shards of a process group, as every rank passed them to one call."""

    def __init__(self, rank, sizes):
        self.sizes = sizes
        self.start = sum(sizes[:rank])
        self.local_vocab = sizes[rank]
        self.vocab = sum(sizes)


def _exchange(group, row, device):
    dist = _dist()
    world = dist.get_world_size(group)
    mine = row.to(device=device, dtype=torch.int64)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    return [[int(v) for v in r] for r in torch.stack(table).tolist()]


def fail_together(op, group, error):
    """Tells the other ranks of ``group`` that this rank's arguments were refused, then raises ``error``:
    they raise too instead of waiting in a collective this rank never enters."""
    row = torch.zeros(_META, dtype=torch.int64)
    _exchange(group, row, _meta_device(group))
    raise error


_NO_VALUE = -1  # an extra argument that is None (no float64 has these bits but one NaN)


def _show_extra(bits):
    return None if bits == _NO_VALUE else _bits_float(bits)


def shard_layout(op, group, local_vocab, rows, acc_dtype, tokens, *, temperature, return_entropy, ignore_index,
                 extra=()):
    """Exchanges the per-rank arguments (the one host synchronization of a vocab-parallel call) and checks
    that they match on every rank; every rank sees the same table and raises the same error. ``extra``: up to
    two (name, float or None) arguments of the op's own that must match as well."""
    extra = list(extra) + [("", None)] * (2 - len(extra))
    summary = _token_summary(tokens, ignore_index)
    head = torch.tensor([1, local_vocab, rows, int(acc_dtype == torch.float64), int(return_entropy),
                         int(ignore_index is not None), 0 if ignore_index is None else ignore_index,
                         _float_bits(temperature)], dtype=torch.int64)
    tail = torch.tensor([_NO_VALUE if v is None else _float_bits(v) for _, v in extra], dtype=torch.int64)
    device = _meta_device(group)
    table = _exchange(group, torch.cat([head.to(device), summary.to(device), tail.to(device)]), device)
    rank = _dist().get_rank(group)
    failed = [r for r, entry in enumerate(table) if entry[0] == 0]
    if failed:
        raise RuntimeError(f"rlkernels.{op}: rank(s) {failed} of process_group refused their arguments (their own "
                           "errors say why); no rank ran the op")
    where = f"rlkernels.{op}: with process_group,"

    def same(index, what, show=lambda v: v):
        values = [entry[index] for entry in table]
        if any(v != values[0] for v in values):
            raise ValueError(f"{where} {what} must be the same on every rank; by rank: {[show(v) for v in values]}")

    same(2, "the number of rows (tokens.numel(), the logits' leading dimensions)")
    same(3, "the logits' float64-ness (float64 logits accumulate in float64)")
    same(4, "return_entropy")
    same(5, "whether ignore_index is given")
    same(6, "ignore_index")
    same(7, "temperature", _bits_float)
    same(10, "tokens (global ids, identical on every rank of the vocab-parallel group)")
    same(11, extra[0][0], _show_extra)
    same(12, extra[1][0], _show_extra)
    sizes = [entry[1] for entry in table]
    if sum(sizes) == 0:
        raise ValueError(f"{where} the shards hold no vocabulary entry (every rank has a logits' last dim of 0)")
    layout = ShardLayout(rank, sizes)
    token_min, token_max = table[0][8], table[0][9]  # equal on every rank: the tokens' checksums are
    if token_min < 0 or token_max >= layout.vocab:
        bad = token_min if token_min < 0 else token_max
        raise ValueError(f"{where} tokens must be global ids in [0, {layout.vocab}) (the shards {sizes} of the "
                         f"ranks together, in rank order) or ignore_index, got {bad}")
    return layout


# ----------------------------------------------------------------------------------------------------
# The combination of shard states: the reusable piece of every vocab-parallel op
# ----------------------------------------------------------------------------------------------------


def combine_vocab_shards(lse, entropy, target, group):
    """Per-row (logp, entropy, lse) over the whole vocabulary from each rank's shard state.

    ``lse``: the logsumexp of the row's z over this rank's entries (-inf for none); ``entropy``: the entropy
    of softmax over those entries (None when not wanted); ``target``: z at the row's token where this rank
    holds it, 0 elsewhere. All [N] in the accumulation dtype. Two all-reduces over ``group``: MAX of lse, then
    one SUM of the stacked weights, target logits and entropy terms:
    lse = M + log sum_r e^{lse_r - M};  logp = target - lse;
    entropy = lse - sum_r e^{lse_r - lse} (lse_r - H_r)  (the mean of z under softmax, shard by shard).
    """
    dist = _dist()
    peak = lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    # A shift by the largest shard lse keeps the exps in range; +-inf or NaN rows are not shifted, so they
    # propagate as in the unsharded formula (all -inf: 0 weights, lse = -inf, logp and entropy NaN).
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weight = torch.exp(lse - shift)
    parts = [weight, target]
    if entropy is not None:
        # A shard with weight 0 (all its entries -inf) adds nothing, whatever its own entropy (NaN) says.
        parts.append(torch.where(weight == 0, torch.zeros_like(weight), weight * (lse - entropy)))
    sums = torch.stack(parts)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    full_lse = shift + torch.log(sums[0])
    logp = sums[1] - full_lse
    full_entropy = None if entropy is None else full_lse - sums[2] / sums[0]
    return logp, full_entropy, full_lse


# ----------------------------------------------------------------------------------------------------
# gather_logprobs over vocabulary shards
# ----------------------------------------------------------------------------------------------------


def _local_tokens(tokens, layout, ignore_index):
    """(local ids, held, ignored): the token's id in this shard where the shard holds it, 0 where another
    shard does, -1 where the row is ignored (the local ignore_index then); ignored is None without
    ignore_index."""
    ignored = None if ignore_index is None else tokens == ignore_index
    local = tokens - layout.start
    held = (local >= 0) & (local < layout.local_vocab)
    if ignored is not None:
        held = held & ~ignored
    local_tokens = torch.where(held, local, torch.zeros_like(local))
    if ignored is not None:
        local_tokens = torch.where(ignored, torch.full_like(local, -1), local_tokens)
    return local_tokens, held, ignored


def _combine_rows(lse, entropy, target, ignored, return_entropy, group):
    """combine_vocab_shards with ignored rows: 0 for logp and entropy there. The entropy output is empty
    without return_entropy."""
    if ignored is not None:  # ignored rows are never read; their state is set so nothing leaks into the sums
        lse = torch.where(ignored, torch.zeros_like(lse), lse)
        if return_entropy:
            entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    logp, full_entropy, full_lse = combine_vocab_shards(lse, entropy if return_entropy else None, target, group)
    if ignored is not None:
        logp = torch.where(ignored, torch.zeros_like(logp), logp)
        if return_entropy:
            full_entropy = torch.where(ignored, torch.zeros_like(full_entropy), full_entropy)
    if full_entropy is None:
        full_entropy = logp.new_empty((0,))
    return logp, full_entropy, full_lse


def _backward_kernel(impl, inplace):
    name = "gather_logprobs_backward_inplace" if inplace else "gather_logprobs_backward"
    return getattr(torch.ops.rlkernels, f"triton_{name}" if impl == "triton" else name)


class _VocabParallelGather(torch.autograd.Function):
    """logits [N, V_r] (this rank's shard) -> (logp [N], entropy [N] or empty) over the whole vocabulary.

    The local kernels run on the shard with local token ids; rows whose target another rank holds are given
    the local id 0, whose one-hot term the backward takes back out. The backward needs no communication:
    every rank receives the same output gradients (the outputs are replicated) and writes its own shard's
    gradient from the global lse and entropy.
    """

    @staticmethod
    def forward(ctx, logits, local_tokens, held, ignored, impl, temperature, return_entropy, inplace_backward,
                group):
        acc = accumulate_dtype(logits.dtype)
        n, v_local = logits.shape
        local_ignore = -1 if ignored is not None else None
        if v_local > 0:
            fn = dispatch.kernel("gather_logprobs", impl)
            _, entropy, lse = fn(logits, local_tokens, temperature, return_entropy, local_ignore, False)
            # The target logit read directly (z = x / T as the kernels scale it), rather than logp + lse.
            picked = logits.gather(1, local_tokens.clamp(min=0).unsqueeze(1)).squeeze(1).to(acc)
            target = torch.where(held, picked * (1.0 / temperature), torch.zeros_like(picked))
        else:  # an empty shard: no entries, weight 0
            lse = torch.full((n,), -math.inf, dtype=acc, device=logits.device)
            entropy = torch.zeros((n if return_entropy else 0,), dtype=acc, device=logits.device)
            target = torch.zeros((n,), dtype=acc, device=logits.device)
        logp, full_entropy, full_lse = _combine_rows(lse, entropy, target, ignored, return_entropy, group)
        ctx.scalars = (impl, temperature, local_ignore, inplace_backward, return_entropy)
        # The rows whose one-hot term the local kernel put at id 0 but which this shard does not hold.
        elsewhere = ~held if ignored is None else ~held & ~ignored
        ctx.save_for_backward(logits, local_tokens, full_lse, full_entropy, elsewhere)
        ctx.mark_non_differentiable(full_lse)
        return logp, full_entropy, full_lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, local_tokens, lse, entropy, elsewhere = ctx.saved_tensors
        impl, temperature, local_ignore, inplace, return_entropy = ctx.scalars
        n, v_local = logits.shape
        if v_local == 0 or n == 0:
            return torch.zeros_like(logits), None, None, None, None, None, None, None, None
        grad_entropy = grad_entropy if return_entropy else None
        acc = lse.dtype
        # The correct value at id 0 of the rows held elsewhere: -g_logp p_0 - g_H p_0 (z_0 - lse + H), over T;
        # read before an in-place backward overwrites the logits.
        inv_t = 1.0 / temperature
        z0 = logits[:, 0].to(acc) * inv_t
        p0 = torch.exp(z0 - lse)
        fix = -grad_logp.to(acc) * p0
        if grad_entropy is not None:
            term = torch.where(p0 == 0, torch.zeros_like(p0), p0 * (z0 - lse + entropy))
            fix = fix - grad_entropy.to(acc) * term
        fix = fix * inv_t
        if inplace:
            _backward_kernel(impl, True)(grad_logp, grad_entropy, logits, local_tokens, lse, entropy, temperature,
                                         local_ignore)
            grad = logits
        else:
            grad = _backward_kernel(impl, False)(grad_logp, grad_entropy, logits, local_tokens, lse, entropy,
                                                 temperature, local_ignore)
        grad[:, 0] = torch.where(elsewhere, fix.to(grad.dtype), grad[:, 0])
        return grad, None, None, None, None, None, None, None, None


@torch.compiler.disable
def gather_logprobs(op, rows, tokens, *, temperature, return_entropy, ignore_index, inplace_backward, impl, group):
    """Vocab-parallel gather_logprobs on canonical rows [N, V_r] and int64 tokens [N] (global ids)."""
    layout = shard_layout(op, group, rows.shape[1], rows.shape[0], accumulate_dtype(rows.dtype), tokens,
                          temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index)
    local_tokens, held, ignored = _local_tokens(tokens, layout, ignore_index)
    logp, entropy, _ = _VocabParallelGather.apply(rows, local_tokens, held, ignored, impl, temperature,
                                                  return_entropy, inplace_backward, group)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------
# linear_logprobs over vocabulary shards of the LM head
# ----------------------------------------------------------------------------------------------------


def _linear_backward_kernel(impl):
    return getattr(torch.ops.rlkernels, "triton_linear_logprobs_backward" if impl == "triton"
                   else "linear_logprobs_backward")


class _VocabParallelLinear(torch.autograd.Function):
    """hidden [N, H] and this rank's head rows weight [V_r, H] (bias [V_r]) -> (logp, entropy) over the whole
    vocabulary. As _VocabParallelGather: local ids, 0 for targets another rank holds, whose one-hot term the
    backward takes back out (here through the head: -g_logp / T dz/dy at id 0, onto grad_hidden, the weight's
    row 0 and the bias' entry 0). grad_hidden is this shard's part: the trainer sums it over the group, as it
    does for a column-parallel layer's input (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local_tokens, held, ignored, impl, temperature, return_entropy,
                logit_scale, softcap, chunk_size, vocab_tile, group):
        acc = accumulate_dtype(hidden.dtype)
        n, v_local = hidden.shape[0], weight.shape[0]
        local_ignore = -1 if ignored is not None else None
        if v_local > 0:
            fn = dispatch.kernel("linear_logprobs", impl)
            logp, entropy, lse = fn(hidden, weight, local_tokens, bias, temperature, return_entropy, local_ignore,
                                    logit_scale, softcap, chunk_size, vocab_tile)
            target = torch.where(held, logp + lse, torch.zeros_like(lse))  # z[token] / T where this shard holds it
        else:
            lse = torch.full((n,), -math.inf, dtype=acc, device=hidden.device)
            entropy = torch.zeros((n if return_entropy else 0,), dtype=acc, device=hidden.device)
            target = torch.zeros((n,), dtype=acc, device=hidden.device)
        logp, full_entropy, full_lse = _combine_rows(lse, entropy, target, ignored, return_entropy, group)
        ctx.scalars = (impl, temperature, local_ignore, logit_scale, softcap, chunk_size, vocab_tile, return_entropy)
        elsewhere = ~held if ignored is None else ~held & ~ignored
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, local_tokens, full_lse, full_entropy, elsewhere)
        ctx.mark_non_differentiable(full_lse)
        return logp, full_entropy, full_lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, local_tokens, lse, entropy, elsewhere = ctx.saved_tensors
        impl, temperature, local_ignore, logit_scale, softcap, chunk_size, vocab_tile, return_entropy = ctx.scalars
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        nones = (None,) * 11
        if weight.shape[0] == 0 or hidden.shape[0] == 0:
            return (torch.zeros_like(hidden) if need_hidden else None, torch.zeros_like(weight) if need_weight
                    else None, torch.zeros_like(bias) if need_bias else None, *nones)
        grad_entropy = grad_entropy if return_entropy else None
        gh, gw, gb = _linear_backward_kernel(impl)(grad_logp, grad_entropy, hidden, weight, local_tokens, bias, lse,
                                                   entropy, temperature, local_ignore, logit_scale, softcap,
                                                   chunk_size, vocab_tile, need_hidden, need_weight, need_bias)
        # Rows whose target another shard holds got +g_logp / T at local id 0 in d z; through the head that is
        # c = -g_logp / T * dz/dy at y = hidden . weight[0] (+ bias[0]) to take back out.
        acc = lse.dtype
        w0 = weight[0].to(acc)
        h = hidden.to(acc)
        y0 = h @ w0 + (bias[0].to(acc) if bias is not None else 0.0)
        slope = torch.full_like(y0, logit_scale)
        if softcap is not None:
            slope = slope * (1 - torch.tanh(logit_scale * y0 / softcap) ** 2)
        c = torch.where(elsewhere, -grad_logp.to(acc) / temperature * slope, torch.zeros_like(y0))
        if need_hidden:
            gh = (gh.to(acc) + c[:, None] * w0).to(hidden.dtype)
        if need_weight:
            gw = gw.clone()
            gw[0] = (gw[0].to(acc) + c @ h).to(gw.dtype)
        if need_bias:
            gb = gb.clone()
            gb[0] = (gb[0].to(acc) + c.sum()).to(gb.dtype)
        return (gh if need_hidden else None, gw if need_weight else None, gb if need_bias else None, *nones)


@torch.compiler.disable
def linear_logprobs(op, hidden, weight, bias, tokens, *, temperature, return_entropy, ignore_index, logit_scale,
                    softcap, chunk_size, vocab_tile, impl, group):
    """Vocab-parallel linear_logprobs on rows hidden [N, H], this rank's weight [V_r, H] and bias [V_r] (or
    None), int64 global tokens [N]."""
    layout = shard_layout(op, group, weight.shape[0], hidden.shape[0], accumulate_dtype(hidden.dtype), tokens,
                          temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
                          extra=(("logit_scale", logit_scale), ("softcap", softcap)))
    local_tokens, held, ignored = _local_tokens(tokens, layout, ignore_index)
    logp, entropy, _ = _VocabParallelLinear.apply(hidden, weight, bias, local_tokens, held, ignored, impl,
                                                  temperature, return_entropy, logit_scale, softcap, chunk_size,
                                                  vocab_tile, group)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------
# Global loss counts of the PPO family
# ----------------------------------------------------------------------------------------------------


def local_count(agg, mask, shape):
    """What ``agg`` divides by on one call with canonical [B, T] inputs and a bool mask (or None): the unmasked
    tokens (token-mean), the rows (seq-mean-token-sum, seq-mean-token-sum-norm) or the rows with an unmasked
    token (seq-mean-token-mean). An int64 0-d tensor, or a Python int where the shape alone says."""
    B, T = shape
    if agg == "token-mean":
        return B * T if mask is None else mask.sum(dtype=torch.int64)
    if agg == "seq-mean-token-mean":
        if mask is None:
            return B if T > 0 else 0
        return mask.any(dim=1).sum(dtype=torch.int64)
    return B


@torch.compiler.disable
def all_reduce_count(count, device, group):
    """The sum of ``count`` over the ranks of ``group``, an int64 0-d tensor on ``device`` (one all-reduce)."""
    dist = _dist()
    total = torch.as_tensor(count, dtype=torch.int64, device=device).clone().reshape(())
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def global_share(loss, count, total):
    """loss * count / total (0 where total is 0): a call's loss as its share of the global batch's loss."""
    if isinstance(count, int) and not isinstance(total, torch.Tensor):
        return loss * (count / total) if total > 0 else loss * 0.0
    count = torch.as_tensor(count, device=loss.device).to(loss.dtype)
    total = torch.as_tensor(total, device=loss.device).to(loss.dtype)
    scale = torch.where(total > 0, count / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(total))
    return loss * scale
