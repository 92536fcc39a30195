"""Fake kernels and autograd of gather_logprobs' ops (docs/design.md §4.3)."""

from __future__ import annotations

import functools

import torch

from ._util import accumulate_dtype, register

FAMILY = "logprobs"
OPS = ("gather_logprobs", "linear_logprobs")


def _forward_fake(logits, tokens, temperature, return_entropy, ignore_index, inplace_backward):
    torch._check(logits.dim() == 2, lambda: "rlkernels.gather_logprobs: logits must be [N, V] here")
    torch._check(tokens.shape[0] == logits.shape[0], lambda: "rlkernels.gather_logprobs: tokens must be [N]")
    acc = accumulate_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n if return_entropy else 0,), dtype=acc),
            logits.new_empty((n,), dtype=acc))


torch.library.register_fake("rlkernels::gather_logprobs")(_forward_fake)


@torch.library.register_fake("rlkernels::gather_logprobs_backward")
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rlkernels::gather_logprobs_backward_inplace")
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index):
    return None


def register_fake_forward(op):
    """The forward's fake kernel for a Triton op (a triton_op's own fake run would launch its kernels)."""
    op.register_fake(_forward_fake)


def _setup(ctx, inputs, output):
    logits, tokens, temperature, return_entropy, ignore_index, inplace_backward = inputs
    _, entropy, lse = output
    ctx.scalars = (temperature, ignore_index)
    ctx.inplace = inplace_backward
    ctx.save_for_backward(logits, tokens, lse, entropy)


def _writable(logits):
    """Whether each element of the [N, V] logits (unit stride along V) has its own memory, so the backward may
    write over them: not an expanded tensor (stride 0) or another view whose rows overlap."""
    n, v = logits.shape
    return n <= 1 or v == 0 or logits.stride(0) >= v


def _grad_graph(grad_logp, grad_entropy, logits, tokens, temperature, ignore_index):
    """The same gradient in differentiable torch ops, recomputed from the logits: the backward with
    create_graph=True, so second-order gradients are those of the formula (docs/design.md §4.3)."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    keep = torch.ones_like(tokens, dtype=torch.bool) if ignore_index is None else tokens != ignore_index
    tok = torch.where(keep, tokens, 0)
    dz = torch.zeros_like(z)
    if grad_logp is not None:
        onehot = torch.nn.functional.one_hot(tok, z.shape[-1]).to(z.dtype)
        dz = dz + grad_logp.to(z.dtype).unsqueeze(-1) * (onehot - p)
    if grad_entropy is not None:
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))  # -inf logits add nothing to the entropy
        entropy = -plogp.sum(-1, keepdim=True)
        dz = dz - grad_entropy.to(z.dtype).unsqueeze(-1) * (plogp + p * entropy)
    dz = torch.where(keep.unsqueeze(-1), dz, torch.zeros_like(dz))
    return (dz / temperature).to(logits.dtype)


def register_gather_logprobs(op, backward_op, backward_inplace_op):
    """d logits = g_logp (onehot - p) / T + the entropy term, into a new tensor, or over the logits with
    inplace_backward (documented as destroying them) where each logit has its own memory. With
    create_graph=True the gradient is computed in differentiable torch ops instead."""

    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, tokens, lse, entropy = ctx.saved_tensors
        temperature, ignore_index = ctx.scalars
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad_logp, grad_entropy,
                                                                                      logits)):
            if entropy.numel() != tokens.numel():
                grad_entropy = None
            grad = _grad_graph(grad_logp, grad_entropy, logits, tokens, temperature, ignore_index)
        elif ctx.inplace and _writable(logits):
            backward_inplace_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
            grad = logits
        else:
            grad = backward_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
        return grad, None, None, None, None, None

    register(op, backward, _setup, backward_op)


_ops = torch.ops.rlkernels
register_gather_logprobs("gather_logprobs", _ops.gather_logprobs_backward, _ops.gather_logprobs_backward_inplace)


# ----------------------------------------------------------------------------------------------------
# linear_logprobs: log-probs from hidden states through a linear head, without the [N, V] logits
# (docs/design.md §4.7). The op is defined here, in Python: tiles of logits (rows x vocabulary columns) through
# torch's matmul (BLAS on CPU, cuBLAS on GPU), each folded by a gather_logprobs op (the C++ one for the cpu and
# cuda backends, the Triton one for triton, rlkernels/triton/logprobs.py). Per row the fold of a tile leaves
# (lse, entropy, target logit): the (max, sum-exp, entropy term) state of §4.3 in closed form, from which tiles,
# and later shards of the vocabulary (§4.8), combine: lse = logsumexp_r lse_r, E[z] = sum_r exp(lse_r - lse)
# (lse_r - H_r), H = lse - E[z].
# ----------------------------------------------------------------------------------------------------

Tensor = torch.Tensor

# Bytes of one tile of logits when chunk_size is None, and the bounds of its rows: on CPU 32 MiB, 4% of the
# unfused forward's memory at [2048, 32000] in float32; on GPUs 512 MiB, rows enough that each tile's GEMM is
# compute-bound (the weight is read once per row chunk).
_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
_TILE_ROWS = {"cpu": 2048, "cuda": 8192}
# The narrowest vocabulary tile of the default tiling, and the multiple its width is rounded to.
_MIN_VOCAB_TILE = 1024
_VOCAB_ALIGN = 256
# Vocabulary rows per 16-bit grad_weight product on CPU (the partial sums' staging buffer).
_GRAD_WEIGHT_BLOCK = 8192


def default_tiles(n: int, v: int, dtype: torch.dtype, device_type: str) -> tuple[int, int]:
    """(rows, vocabulary columns) of the tiles of logits when chunk_size is None: a fixed byte budget, so memory
    is flat in N, spent on many rows (up to the row bound: a GEMM over more rows runs closer to the speed of the
    whole one, and a tile over all rows gives grad_weight in one GEMM) and as many columns as fit. One tile
    spans V when the budget holds the rows' whole logits."""
    kind = "cpu" if device_type == "cpu" else "cuda"
    rows = max(1, min(n, _TILE_ROWS[kind]))
    cols = _CHUNK_BYTES[kind] // (rows * dtype.itemsize)
    cols = max(_MIN_VOCAB_TILE, cols // _VOCAB_ALIGN * _VOCAB_ALIGN)
    return rows, (min(v, cols))


def _kept_rows(tokens, ignore_index):
    """Row indices to compute on CPU, where ignored rows are dropped before the matmuls; None elsewhere (on a GPU
    that would read the tokens on the host) and when nothing is ignored."""
    if ignore_index is None or tokens.device.type != "cpu":
        return None
    keep = tokens != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def check_token_range(tokens, V, ignore_index):
    """CPU tokens in [0, V) (or ignore_index): a ValueError naming linear_logprobs, before any matmul runs."""
    if tokens.device.type != "cpu" or tokens.numel() == 0:
        return
    bad = (tokens < 0) | (tokens >= V)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bool(bad.any()):
        raise ValueError(f"rlkernels.linear_logprobs: tokens must be in [0, {V}) (or ignore_index), got "
                         f"{int(tokens[bad][0])} at row {int(bad.nonzero()[0, 0])}")


# Bytes of each float32 operand widened at a time when a CPU without a 16-bit GEMM takes 16-bit products in
# float32 (weight rows, and the tile's columns of as many vocabulary entries).
_WIDE_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def _cpu_has_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmul has a kernel for this 16-bit dtype (oneDNN on AVX-512 BF16 / FP16 or AMX).
    Without one its bfloat16 GEMMs ran at 1 to 18 GFLOP/s where float32's ran at 85 to 134 (an AVX2 CPU,
    docs/performance.md)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _wide_gemm(t: Tensor) -> bool:
    """16-bit CPU tensors whose GEMMs run in float32 on widened copies (exact: a 16-bit value is a float32 one,
    and so is the product of two), a block of vocabulary entries at a time (_wide_block)."""
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) and not _cpu_has_16bit_gemm(t.dtype)


def _wide_block(rows: int, hidden_size: int) -> int:
    """Vocabulary entries per float32 block: at most _WIDE_BYTES of widened weight rows and of tile columns."""
    return max(_VOCAB_ALIGN, _WIDE_BYTES // (4 * max(1, rows, hidden_size)))


def _chunk_logits(out, h, weight, bias, logit_scale, softcap, tanh_out=None):
    """out = logit_scale * (h @ weight.T + bias), softcapped; tanh_out (when given) receives tanh(z / softcap)."""
    if _wide_gemm(h):
        # in float32, rounded to 16 bits once, as a 16-bit GEMM with a float32 accumulator rounds its output
        hf, blk = h.float(), _wide_block(h.shape[0], weight.shape[1])
        for c0 in range(0, weight.shape[0], blk):
            c1 = min(weight.shape[0], c0 + blk)
            y = torch.mm(hf, weight[c0:c1].float().t())
            if bias is not None:
                y.add_(bias[c0:c1].float())
            if logit_scale != 1.0:
                y.mul_(logit_scale)
            out[:, c0:c1].copy_(y)
    elif bias is not None:
        torch.addmm(bias, h, weight.t(), beta=logit_scale, alpha=logit_scale, out=out)
    elif logit_scale != 1.0:
        torch.addmm(out, h, weight.t(), beta=0.0, alpha=logit_scale, out=out)
    else:
        torch.mm(h, weight.t(), out=out)
    if softcap is not None:
        if tanh_out is None:
            out.div_(softcap).tanh_().mul_(softcap)
        else:
            torch.div(out, softcap, out=tanh_out).tanh_()
            torch.mul(tanh_out, softcap, out=out)


def _fold_tiles(fold, z_tiles, tokens, vocab, temperature, return_entropy, ignore_index):
    """(logp, entropy, lse) of rows whose logits come in vocabulary tiles: each tile is folded by `fold` (a
    gather_logprobs op) into its own (lse_t, entropy_t) and its target's logit where the token falls in it, and
    the tiles' states are merged as vocabulary shards merge (docs/design.md §4.7): lse = logsumexp_t lse_t,
    E[z] = sum_t exp(lse_t - lse) (lse_t - H_t), H = lse - E[z]. `z_tiles` yields (v0, tile)."""
    lse = ez = zt = None
    ignored = None if ignore_index is None else tokens == ignore_index
    for v0, z in z_tiles:
        local = tokens - v0
        inside = (local >= 0) & (local < z.shape[1])
        if ignored is not None:
            inside = inside & ~ignored
        tok = torch.where(inside, local, torch.zeros_like(local))
        if ignored is not None:  # the fold skips ignored rows (their state is 0, merged away below)
            tok = torch.where(ignored, torch.full_like(local, ignore_index), tok)
        lp_t, en_t, ls_t = fold(z, tok, temperature, return_entropy, ignore_index, False)
        target = torch.where(inside, lp_t + ls_t, torch.zeros_like(ls_t))
        if lse is None:
            lse, zt = ls_t, target
            ez = (ls_t - en_t) if return_entropy else None
            continue
        new = torch.logaddexp(lse, ls_t)
        if return_entropy:
            ez = torch.exp(lse - new) * ez + torch.exp(ls_t - new) * (ls_t - en_t)
        lse, zt = new, zt + target
    entropy = (lse - ez) if return_entropy else lse.new_zeros((0,))
    return finish_rows(zt - lse, entropy, lse, tokens, vocab, return_entropy, ignore_index)


def finish_rows(logp, entropy, lse, tokens, vocab, return_entropy, ignore_index):
    """The rows' (logp, entropy, lse) as the gather_logprobs kernels leave them: NaN for a token id in no tile
    (outside [0, V), as on GPUs), 0 for a row whose token is ignore_index."""
    ignored = None if ignore_index is None else tokens == ignore_index
    bad = (tokens < 0) | (tokens >= vocab)
    if ignored is not None:
        bad = bad & ~ignored
    nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
    logp = torch.where(bad, nan, logp)
    if return_entropy:
        entropy = torch.where(bad, nan, entropy)
    if ignored is not None:
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logp, lse = torch.where(ignored, zero, logp), torch.where(ignored, zero, lse)
        if return_entropy:
            entropy = torch.where(ignored, zero, entropy)
    return logp, entropy, lse


def check_linear_args(op, hidden, weight, bias):
    """The op-boundary checks of the linear head's tensors (the registered op is public and torch.compile calls
    it without the wrapper): hidden [N, H] and weight [V, H] floating, bias [V] or None."""
    for name, t, dims in (("hidden", hidden, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"rlkernels.{op}: {name} must be a floating tensor, got {t.dtype}")
        if t.dim() != dims:
            raise ValueError(f"rlkernels.{op}: {name} must have {dims} dims here, got shape {tuple(t.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"rlkernels.{op}: weight must be [V, {hidden.shape[1]}] (hidden's H), got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"rlkernels.{op}: bias must have {weight.shape[0]} elements (weight's V), got "
                         f"{tuple(bias.shape)}")


def linear_forward(fold, hidden, weight, tokens, bias, temperature, return_entropy, ignore_index, logit_scale,
                   softcap, rows_per_tile, vocab_tile, check_tokens):
    """(logp, entropy, lse) of the rows, one tile of logits (rows_per_tile x vocab_tile) at a time; `fold` is a
    gather_logprobs op. A tile spanning V is folded directly; narrower tiles are merged by _fold_tiles."""
    check_linear_args("linear_logprobs", hidden, weight, bias)
    N, V = hidden.shape[0], weight.shape[0]
    if check_tokens:
        check_token_range(tokens, V, ignore_index)
    acc = accumulate_dtype(hidden.dtype)
    logp = hidden.new_zeros((N,), dtype=acc)
    entropy = hidden.new_zeros((N if return_entropy else 0,), dtype=acc)
    lse = hidden.new_zeros((N,), dtype=acc)
    rows = _kept_rows(tokens, ignore_index)
    if rows is not None:
        hidden, tokens = hidden.index_select(0, rows), tokens.index_select(0, rows)
    n = hidden.shape[0]
    if n == 0:
        return logp, entropy, lse
    step = max(1, min(rows_per_tile, n))
    width = max(1, min(vocab_tile, V))
    buf = hidden.new_empty((step, width))
    outs = []
    for start in range(0, n, step):
        end = min(n, start + step)
        h, tok = hidden[start:end], tokens[start:end]
        if width == V:
            z = buf[: end - start]
            _chunk_logits(z, h, weight, bias, logit_scale, softcap)
            outs.append(fold(z, tok, temperature, return_entropy, ignore_index, False))
            continue

        def tiles(h=h, rows=end - start):
            for v0 in range(0, V, width):
                v1 = min(V, v0 + width)
                z = buf[:rows, : v1 - v0]
                _chunk_logits(z, h, weight[v0:v1], None if bias is None else bias[v0:v1], logit_scale, softcap)
                yield v0, z

        outs.append(_fold_tiles(fold, tiles(), tok, V, temperature, return_entropy, ignore_index))
    if len(outs) == 1:
        lp, en, ls = outs[0]
    else:
        lp, en, ls = (torch.cat([o[k] for o in outs]) for k in range(3))
    if rows is None:
        return lp, en, ls
    logp.index_copy_(0, rows, lp)
    lse.index_copy_(0, rows, ls)
    if return_entropy:
        entropy.index_copy_(0, rows, en)
    return logp, entropy, lse


def _fold_tile_backward(fold_backward_inplace, z, v0, tokens, gl, ge, lse, entropy, temperature, ignore_index):
    """d z of one tile (columns v0.. of the rows' logits) written over it by the gather_logprobs backward, given the
    rows' lse and entropy over the whole vocabulary. Rows whose token lies outside the tile pass column 0 as their
    token, and that column is then rewritten without the one-hot term, from its logit read before."""
    width = z.shape[1]
    ignored = None if ignore_index is None else tokens == ignore_index
    local = tokens - v0
    inside = (local >= 0) & (local < width)
    tok = torch.where(inside, local, torch.zeros_like(local))
    if ignored is not None:
        tok = torch.where(ignored, torch.full_like(local, ignore_index), tok)
    outside = ~inside if ignored is None else ~inside & ~ignored
    acc = lse.dtype
    z0 = z[:, 0].to(acc, copy=True)  # before it is overwritten
    fold_backward_inplace(gl, ge, z, tok, lse, entropy if ge is not None else entropy[:0], temperature, ignore_index)
    inv_t = 1.0 / temperature
    zt = z0 * inv_t
    p = torch.exp(zt - lse)
    col = torch.zeros_like(p)
    if gl is not None:
        col = col - gl.to(acc) * inv_t * p
    if ge is not None:
        term = torch.where(p == 0, torch.zeros_like(p), p * (zt + entropy - lse))
        col = col - ge.to(acc) * inv_t * term
    z[:, 0] = torch.where(outside, col.to(z.dtype), z[:, 0])


def _unfused_tile(fold_backward_inplace, g, t, tiled, h, weight, bias, tokens, v0, gl, ge, lse, ent, temperature,
                  ignore_index, logit_scale, softcap):
    """d y of one tile written into g: its logits through torch's matmul, turned into d z in place by the
    gather_logprobs backward, then through the softcap and logit_scale (t: a float32 buffer for tanh, or None)."""
    _chunk_logits(g, h, weight, bias, logit_scale, softcap, t)
    if not tiled:
        fold_backward_inplace(gl, ge, g, tokens, lse, ent, temperature, ignore_index)
    else:
        _fold_tile_backward(fold_backward_inplace, g, v0, tokens, gl, ge, lse, ent, temperature, ignore_index)
    # d y = d z * (1 - tanh^2) for the softcap, times logit_scale: folded into d once
    if t is not None:
        t.square_().neg_().add_(1.0)
        if logit_scale != 1.0:
            t.mul_(logit_scale)
        g.mul_(t)
    elif logit_scale != 1.0:
        g.mul_(logit_scale)


def linear_backward(fold_backward_inplace, grad_logp, grad_entropy, hidden, weight, tokens, bias, lse, entropy,
                    temperature, ignore_index, logit_scale, softcap, chunk_size, vocab_tile, need_hidden, need_weight,
                    need_bias, fused_tile_for=None):
    """(grad_hidden, grad_weight, grad_bias), each empty when not needed. The logits are recomputed a tile
    (chunk_size rows x vocab_tile columns) at a time and turned into d logits in place
    (`fold_backward_inplace`, a gather_logprobs_backward_inplace op), then grad_hidden[rows] += d @ weight[tile]
    and grad_weight[tile] += d.T @ hidden[rows], summed over the tiles in float32 (float64 for float64): a tile
    spanning V gives grad_hidden in one GEMM, a tile spanning all rows gives grad_weight in one GEMM (written in
    the weight's dtype).
    fused_tile_for(hidden, weight), when given, returns a function (out, h, weight_tile, bias_tile, tokens, v0,
    grad_logp, grad_entropy, lse, entropy, temperature, ignore_index, logit_scale, softcap) that writes a tile's
    d y in one kernel (the GEMM with the gradient as its epilogue), or None for the unfused steps to run."""
    check_linear_args("linear_logprobs_backward", hidden, weight, bias)
    V = weight.shape[0]
    acc = accumulate_dtype(hidden.dtype)
    low = hidden.dtype in (torch.float16, torch.bfloat16)
    grad_hidden = hidden.new_zeros(hidden.shape if need_hidden else (0,))
    grad_bias = hidden.new_zeros((V if need_bias else 0,), dtype=acc)
    rows = _kept_rows(tokens, ignore_index)
    if rows is not None:
        hidden, tokens = hidden.index_select(0, rows), tokens.index_select(0, rows)
        lse, grad_logp = lse.index_select(0, rows), None if grad_logp is None else grad_logp.index_select(0, rows)
        if entropy.numel():
            entropy = entropy.index_select(0, rows)
            grad_entropy = None if grad_entropy is None else grad_entropy.index_select(0, rows)
    n = hidden.shape[0]
    step = max(1, min(chunk_size, n))
    width = max(1, min(vocab_tile, V))
    # grad_weight[tile] sums one product per row chunk: with one chunk of rows that is one GEMM (float32
    # accumulation inside it, one rounding), written straight into the weight's dtype; with more, the partial
    # sums go to a float32 (float64) accumulator
    one_chunk = n <= step
    grad_weight = weight.new_zeros(weight.shape if need_weight else (0,), dtype=weight.dtype if one_chunk else acc)
    if n == 0 or V == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(hidden.dtype if bias is None else bias.dtype)
    if entropy.numel() == 0:
        grad_entropy = None
    buf = hidden.new_empty((step, width))
    # tanh(z / softcap) of the tile, in float32 for 16-bit inputs: 1 - tanh^2 near saturation needs the bits
    fused = None if fused_tile_for is None else fused_tile_for(hidden, weight)
    tanh_buf = hidden.new_empty((step, width), dtype=acc) if softcap is not None and fused is None else None
    # grad_hidden: rows of a whole-V tile are one GEMM, written in place; with narrower tiles the partial sums go
    # to a float32 (float64) accumulator, each 16-bit product staged in the inputs' dtype first
    tiled = width < V
    gh = None
    if need_hidden:
        gh = hidden.new_zeros((n, hidden.shape[1]), dtype=acc) if tiled else (
            grad_hidden if rows is None else hidden.new_empty((n, hidden.shape[1])))
    # A CPU without a 16-bit GEMM: the products in float32 on widened copies, added to the float32 sums directly
    wide = _wide_gemm(hidden)
    blk = _wide_block(step, weight.shape[1]) if wide else 0
    gh_stage = hidden.new_empty((step, hidden.shape[1])) if (need_hidden and tiled and low and not wide) else None
    # 16-bit grad_weight on CPU: torch's CPU matmul has no float32 output for 16-bit inputs, so each tile's
    # product is staged in the inputs' dtype, a block of vocabulary rows at a time, and added in float32.
    fp32_out = low and hidden.device.type == "cuda"
    stage = None
    if need_weight and low and not fp32_out and not one_chunk and not wide:
        stage = weight.new_empty((min(width, _GRAD_WEIGHT_BLOCK), weight.shape[1]))
    for start in range(0, n, step):
        end = min(n, start + step)
        h = hidden[start:end]
        hf = h.float() if wide and need_weight else None
        gl = None if grad_logp is None else grad_logp[start:end]
        ge = None if grad_entropy is None else grad_entropy[start:end]
        ent = entropy[start:end] if entropy.numel() else entropy
        for v0 in range(0, V, width):
            v1 = min(V, v0 + width)
            g = buf[: end - start, : v1 - v0]
            t = None if tanh_buf is None else tanh_buf[: end - start, : v1 - v0]
            if fused is not None:
                fused(g, h, weight[v0:v1], None if bias is None else bias[v0:v1], tokens[start:end], v0, gl, ge,
                           lse[start:end], ent, temperature, ignore_index, logit_scale, softcap)
            else:
                _unfused_tile(fold_backward_inplace, g, t, tiled, h, weight[v0:v1],
                              None if bias is None else bias[v0:v1], tokens[start:end], v0, gl, ge, lse[start:end], ent,
                              temperature, ignore_index, logit_scale, softcap)
            if need_hidden and wide:
                part = None if tiled else torch.zeros((end - start, hidden.shape[1]), dtype=torch.float32)
                dst = gh[start:end] if tiled else part
                for b0 in range(0, v1 - v0, blk):
                    b1 = min(v1 - v0, b0 + blk)
                    dst.addmm_(g[:, b0:b1].float(), weight[v0 + b0:v0 + b1].float())
                if not tiled:
                    gh[start:end].copy_(part)
            elif need_hidden:
                if not tiled:
                    torch.mm(g, weight, out=gh[start:end])
                elif gh_stage is None:
                    gh[start:end].addmm_(g, weight[v0:v1])
                else:
                    part = gh_stage[: end - start]
                    torch.mm(g, weight[v0:v1], out=part)
                    gh[start:end].add_(part)
            if need_weight and wide:
                gw = grad_weight[v0:v1]
                for b0 in range(0, v1 - v0, blk):
                    b1 = min(v1 - v0, b0 + blk)
                    if one_chunk:
                        gw[b0:b1].copy_(torch.mm(g[:, b0:b1].t().float(), hf))
                    else:
                        gw[b0:b1].addmm_(g[:, b0:b1].t().float(), hf)
            elif need_weight:
                gw = grad_weight[v0:v1]
                if one_chunk:
                    torch.mm(g.t(), h, out=gw)
                elif not low:
                    gw.addmm_(g.t(), h)
                elif fp32_out:
                    torch.addmm(gw, g.t(), h, out_dtype=torch.float32, out=gw)
                else:
                    for b0 in range(0, v1 - v0, stage.shape[0]):
                        b1 = min(v1 - v0, b0 + stage.shape[0])
                        part = stage[: b1 - b0]
                        torch.mm(g[:, b0:b1].t(), h, out=part)
                        gw[b0:b1].add_(part)
            if need_bias:
                grad_bias[v0:v1].add_(g.sum(0, dtype=acc))
    if need_hidden and gh is not grad_hidden:
        if rows is None:
            grad_hidden.copy_(gh)
        else:
            grad_hidden.index_copy_(0, rows, gh.to(grad_hidden.dtype))
    return (grad_hidden, grad_weight.to(weight.dtype),
            grad_bias.to(hidden.dtype if bias is None else bias.dtype))


def _linear_fake(hidden, weight, tokens, bias, temperature, return_entropy, ignore_index, logit_scale, softcap,
                 chunk_size, vocab_tile):
    torch._check(hidden.dim() == 2, lambda: "rlkernels.linear_logprobs: hidden must be [N, H] here")
    torch._check(weight.dim() == 2, lambda: "rlkernels.linear_logprobs: weight must be [V, H] here")
    acc = accumulate_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((n if return_entropy else 0,), dtype=acc),
            hidden.new_empty((n,), dtype=acc))


def _linear_backward_fake(grad_logp, grad_entropy, hidden, weight, tokens, bias, lse, entropy, temperature,
                          ignore_index, logit_scale, softcap, chunk_size, vocab_tile, need_hidden, need_weight,
                          need_bias):
    V = weight.shape[0]
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty((V if need_bias else 0,), dtype=hidden.dtype if bias is None else bias.dtype))


def define_linear_logprobs(name, fold, fold_backward_inplace, device_types, check_tokens, fused_forward=None,
                           fused_tile_for=None):
    """Defines rlkernels::<name> and rlkernels::<name>_backward on the given gather_logprobs ops, with their fake
    kernels and autograd. Returns the forward op. check_tokens: CPU token ids out of range raise (docs/design.md
    §4.3: the cpu backend raises, the GPU backends give NaN). fused_forward(hidden, weight, tokens, bias,
    temperature, return_entropy, ignore_index, logit_scale, softcap), when given, makes the forward in one
    kernel, or returns None for the tiled path to run; fused_tile_for: linear_backward's."""

    @torch.library.custom_op(f"rlkernels::{name}_backward", mutates_args=(), device_types=device_types)
    def backward_op(grad_logp: Tensor | None, grad_entropy: Tensor | None, hidden: Tensor, weight: Tensor,
                    tokens: Tensor, bias: Tensor | None, lse: Tensor, entropy: Tensor, temperature: float,
                    ignore_index: int | None, logit_scale: float, softcap: float | None, chunk_size: int,
                    vocab_tile: int, need_hidden: bool, need_weight: bool,
                    need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
        return linear_backward(fold_backward_inplace, grad_logp, grad_entropy, hidden, weight, tokens, bias, lse,
                               entropy, temperature, ignore_index, logit_scale, softcap, chunk_size, vocab_tile,
                               need_hidden, need_weight, need_bias, fused_tile_for)

    @torch.library.custom_op(f"rlkernels::{name}", mutates_args=(), device_types=device_types)
    def forward_op(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None, temperature: float,
                   return_entropy: bool, ignore_index: int | None, logit_scale: float, softcap: float | None,
                   chunk_size: int, vocab_tile: int) -> tuple[Tensor, Tensor, Tensor]:
        """The logits are made in tiles of chunk_size rows x vocab_tile columns, forward and backward."""
        if fused_forward is not None:
            out = fused_forward(hidden, weight, tokens, bias, temperature, return_entropy, ignore_index, logit_scale,
                                softcap)
            if out is not None:
                return out
        return linear_forward(fold, hidden, weight, tokens, bias, temperature, return_entropy, ignore_index,
                              logit_scale, softcap, chunk_size, vocab_tile, check_tokens)

    backward_op.register_fake(_linear_backward_fake)
    forward_op.register_fake(_linear_fake)

    def setup(ctx, inputs, output):
        hidden, weight, tokens, bias, temperature, _, ignore_index, logit_scale, softcap, chunk_size, tile = inputs
        _, entropy, lse = output
        ctx.scalars = (temperature, ignore_index, logit_scale, softcap, chunk_size, tile)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, tokens, bias, lse, entropy)

    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, tokens, bias, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        need_bias = need_bias and ctx.has_bias
        gh, gw, gb = backward_op(grad_logp, grad_entropy, hidden, weight, tokens, bias, lse, entropy, *ctx.scalars,
                                 need_hidden, need_weight, need_bias)
        return (gh if need_hidden else None, gw if need_weight else None, None, gb if need_bias else None,
                None, None, None, None, None, None, None)

    forward_op.register_autograd(backward, setup_context=setup)
    return forward_op


linear_logprobs = define_linear_logprobs("linear_logprobs", _ops.gather_logprobs, _ops.gather_logprobs_backward_inplace,
                                         ("cpu", "cuda"), check_tokens=True)
