"""Triton kernels of gather_logprobs (docs/design.md §4.3): one program per row, a loop over V in blocks.

Forward: the online softmax state of the CPU kernel (csrc/cpu/logprobs.cpp), merged block by block:
m = running max of z = logits / T, s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m);
lse = m + log s0, logp = z[token] - lse, entropy = log s0 - s1 / s0 (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax", with the entropy term carried the same way). Nothing of the logits' size
is allocated. Backward: d z = g_logp (onehot - p) - g_entropy p (z - lse + entropy), d logits = d z / T, in the
logits' dtype, optionally written over the logits.

Token ids outside [0, V) give NaN for their row (no host synchronization; the wrapper's check_tokens=True
validates on the host). The ops are ``rlkernels::triton_gather_logprobs`` and its backwards, taking the
[N, V] rows (unit stride along V) and int64 [N] tokens of the C++ op.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._ops import logprobs as _formulas
from ._common import acc_dtype, interpreting, keep_whole_under_interpreter, pow2, skip_launch, wrap_triton

Tensor = torch.Tensor

BLOCK_V = 1024


@triton.jit
def _gather_logprobs_forward_kernel(X_ptr, X_row_stride, TOK_ptr, LOGP_ptr, ENT_ptr, LSE_ptr, V, temperature,
                                    ignore_index, HAS_IGNORE: tl.constexpr, ENTROPY: tl.constexpr,
                                    BLOCK_SIZE: tl.constexpr):
    ACC: tl.constexpr = LOGP_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # int64 before pointer arithmetic: N * V may exceed 2^31
    x_row = X_ptr + row * X_row_stride
    # tl.full keeps the 64 bits of the host float under the interpreter too; 1/T is rounded to ACC as the
    # CPU kernel does.
    inv_t = (1.0 / tl.full([], temperature, tl.float64)).to(ACC)
    tok = tl.load(TOK_ptr + row)
    if HAS_IGNORE:
        ignored = tok == ignore_index
    else:
        ignored = tok != tok
    # An ignored row walks no blocks.
    stop = tl.where(ignored, 0, V)
    neg_inf = tl.full([], float("-inf"), ACC)
    m = neg_inf
    s0 = tl.zeros([], ACC)
    s1 = tl.zeros([], ACC)
    for off in range(0, stop, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        # fp32 accumulation for 16-bit logits (fp64 for fp64)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        # While every z so far is -inf, shift by 0 (exp(-inf - -inf) would be NaN) and keep the sums at 0.
        shift_to = tl.where(m_new == neg_inf, 0.0, m_new).to(ACC)
        fresh = m == neg_inf
        shift = tl.where(fresh, 0.0, m - shift_to).to(ACC)
        scale = tl.where(fresh, 0.0, tl.exp(shift)).to(ACC)
        d = z - shift_to
        e = tl.exp(d)
        s1 = scale * (s1 + shift * s0)
        if ENTROPY:
            s1 += tl.sum(tl.where(e == 0, 0.0, e * d).to(ACC), 0)  # 0 * -inf counts as 0
        s0 = scale * s0 + tl.sum(e, 0)
        m = m_new
    in_range = (tok >= 0) & (tok < V)
    safe_tok = tl.where(in_range & ~ignored, tok, 0)
    z_t = tl.load(x_row + safe_tok, mask=V > 0, other=float("nan")).to(ACC) * inv_t
    log_s0 = tl.log(s0)
    lse = m + log_s0
    # A +inf logit: lse = +inf (exp(inf - inf) made the sums NaN), or NaN if the row also holds a NaN
    # (docs/design.md §4.3); such a row is rare, so it is read again, and only then.
    inf = float("inf")
    again = tl.where(m == inf, V, 0)
    nan_seen = tl.zeros([], tl.int32)
    for off in range(0, again, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(ACC)
        nan_seen = tl.maximum(nan_seen, tl.max((x != x).to(tl.int32), 0))  # noqa: PLR0124
    lse = tl.where(m == inf, tl.where(nan_seen > 0, float("nan"), inf), lse).to(ACC)
    logp = tl.where(in_range, z_t - lse, float("nan")).to(ACC)
    tl.store(LOGP_ptr + row, tl.where(ignored, 0.0, logp).to(ACC))
    tl.store(LSE_ptr + row, tl.where(ignored, 0.0, lse).to(ACC))
    if ENTROPY:
        ent = tl.where(in_range, log_s0 - s1 / s0, float("nan")).to(ACC)
        tl.store(ENT_ptr + row, tl.where(ignored, 0.0, ent).to(ACC))


@triton.jit
def _gather_logprobs_backward_kernel(X_ptr, X_row_stride, DX_ptr, DX_row_stride, TOK_ptr, GLOGP_ptr, GENT_ptr,
                                     LSE_ptr, ENT_ptr, V, temperature, ignore_index, HAS_IGNORE: tl.constexpr,
                                     HAS_GLOGP: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    ACC: tl.constexpr = LSE_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * X_row_stride
    dx_row = DX_ptr + row * DX_row_stride
    inv_t = (1.0 / tl.full([], temperature, tl.float64)).to(ACC)
    tok = tl.load(TOK_ptr + row)
    if HAS_IGNORE:
        ignored = tok == ignore_index
    else:
        ignored = tok != tok
    lse = tl.load(LSE_ptr + row)
    a = tl.zeros([], ACC)
    if HAS_GLOGP:
        a = tl.load(GLOGP_ptr + row).to(ACC) * inv_t
    b = tl.zeros([], ACC)
    c = tl.zeros([], ACC)
    if ENTROPY:
        b = tl.load(GENT_ptr + row).to(ACC) * inv_t
        c = tl.load(ENT_ptr + row) - lse
    a = tl.where(ignored, 0.0, a).to(ACC)
    b = tl.where(ignored, 0.0, b).to(ACC)
    # Each block is read before it is written, so DX may be X itself (inplace backward).
    for off in range(0, V, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        ok = cols < V
        z = tl.load(x_row + cols, mask=ok, other=0.0).to(ACC) * inv_t
        p = tl.where(ignored, 0.0, tl.exp(z - lse)).to(ACC)
        g = tl.where(cols == tok, a, 0.0).to(ACC) - a * p
        if ENTROPY:
            g -= b * tl.where(p == 0, 0.0, p * (z + c)).to(ACC)  # p = 0 where z = -inf
        tl.store(dx_row + cols, g.to(DX_ptr.dtype.element_ty), mask=ok)


def _launch_forward(logits, tokens, temperature, return_entropy, ignore_index):
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    logp = torch.empty((N,), dtype=acc, device=logits.device)
    entropy = torch.empty((N if return_entropy else 0,), dtype=acc, device=logits.device)
    lse = torch.empty((N,), dtype=acc, device=logits.device)
    if N == 0 or (interpreting() and torch._subclasses.fake_tensor.is_fake(logp)):
        return logp, entropy, lse
    wrap_triton(_gather_logprobs_forward_kernel)[(N,)](
        logits, logits.stride(0), tokens, logp, entropy if return_entropy else logp, lse, V, float(temperature),
        0 if ignore_index is None else ignore_index, HAS_IGNORE=ignore_index is not None, ENTROPY=return_entropy,
        BLOCK_SIZE=pow2(V, 16, BLOCK_V))
    return logp, entropy, lse


def _launch_backward(grad_logp, grad_entropy, logits, out, tokens, lse, entropy, temperature, ignore_index):
    N, V = logits.shape
    if N == 0 or V == 0 or (interpreting() and torch._subclasses.fake_tensor.is_fake(out)):
        return
    use_h = grad_entropy is not None and entropy.numel() == N
    glogp = None if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    gent = grad_entropy.to(lse.dtype).contiguous() if use_h else None
    wrap_triton(_gather_logprobs_backward_kernel)[(N,)](
        logits, logits.stride(0), out, out.stride(0), tokens, glogp if glogp is not None else lse,
        gent if use_h else lse, lse, entropy if use_h else lse, V, float(temperature),
        0 if ignore_index is None else ignore_index, HAS_IGNORE=ignore_index is not None,
        HAS_GLOGP=glogp is not None, ENTROPY=use_h, BLOCK_SIZE=pow2(V, 16, BLOCK_V))


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_gather_logprobs", mutates_args=())
def gather_logprobs(logits: Tensor, tokens: Tensor, temperature: float, return_entropy: bool,
                    ignore_index: int | None, inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy (empty without return_entropy), lse) of the [N, V] rows, in the accumulation dtype."""
    return _launch_forward(logits, tokens, temperature, return_entropy, ignore_index)


@keep_whole_under_interpreter
@triton_op("rlkernels::triton_gather_logprobs_backward", mutates_args=())
def gather_logprobs_backward(grad_logp: Tensor | None, grad_entropy: Tensor | None, logits: Tensor, tokens: Tensor,
                             lse: Tensor, entropy: Tensor, temperature: float,
                             ignore_index: int | None) -> Tensor:
    """d logits in the logits' dtype (a new contiguous [N, V] tensor)."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_backward(grad_logp, grad_entropy, logits, out, tokens, lse, entropy, temperature, ignore_index)
    return out


@triton_op("rlkernels::triton_gather_logprobs_backward_inplace", mutates_args=("logits",))
def gather_logprobs_backward_inplace(grad_logp: Tensor | None, grad_entropy: Tensor | None, logits: Tensor,
                                     tokens: Tensor, lse: Tensor, entropy: Tensor, temperature: float,
                                     ignore_index: int | None) -> None:
    """d logits written over the logits."""
    _launch_backward(grad_logp, grad_entropy, logits, logits, tokens, lse, entropy, temperature, ignore_index)


_formulas.register_fake_forward(gather_logprobs)
_formulas.register_gather_logprobs(gather_logprobs, torch.ops.rlkernels.triton_gather_logprobs_backward,
                                   torch.ops.rlkernels.triton_gather_logprobs_backward_inplace)

# ----------------------------------------------------------------------------------------------------
# linear_logprobs forward (docs/design.md §4.7): a GEMM whose epilogue is the online log-sum-exp above, so no
# tile of logits reaches global memory. Program (i, s) takes BLOCK_N rows and the s-th slice of the vocabulary;
# per vocabulary tile it forms y = logit_scale * (hidden @ weight.T + bias) in a float32 accumulator (tl.dot,
# IEEE float32 products for float32 inputs, as torch's matmul without TF32), rounds it to the inputs' dtype as
# the matmul's output would be, softcaps it, and folds z = y / T into the rows' (m, s0, s1) state, picking the
# target logit on the way. The slices' states are merged on the host side of the op (_merge_slices), the
# tiles-of-vocabulary merge of §4.3 in raw form.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _head_tile(H_ptr, stride_hn, stride_hk, W_ptr, stride_wv, stride_wk, B_ptr, rows, row_ok, cols, col_ok, K,
               logit_scale, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(y, t) of one [BLOCK_N, BLOCK_V] tile of the head, float32: y = logit_scale * (h @ w.T + b) rounded to the
    inputs' dtype, softcapped (and rounded) with HAS_SOFTCAP, t = tanh(y / softcap) before the softcap (float32;
    0 without HAS_SOFTCAP)."""
    IN: tl.constexpr = H_ptr.dtype.element_ty
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        h = tl.load(H_ptr + rows[:, None] * stride_hn + (k0 + ks)[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W_ptr + cols[None, :] * stride_wv + (k0 + ks)[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's dot takes no 16-bit floats; their products are exact in float32
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(B_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # the logits as torch's matmul hands them over: in the inputs' dtype
    y = (acc * logit_scale).to(IN).to(tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): +-1 where exp over/underflows
        t = 1.0 - 2.0 / (tl.exp(2.0 * (y / softcap)) + 1.0)
        y = (softcap * t).to(IN).to(tl.float32)
    return y, t


@triton.jit
def _linear_logprobs_forward_kernel(H_ptr, stride_hn, stride_hk, W_ptr, stride_wv, stride_wk, B_ptr, TOK_ptr,
                                    M_ptr, S0_ptr, S1_ptr, ZT_ptr, NAN_ptr, N, V, K, cols_per_slice,
                                    temperature, logit_scale, softcap, HAS_BIAS: tl.constexpr,
                                    HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, IEEE: tl.constexpr,
                                    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    block = pid % n_blocks  # one grid axis: row blocks fastest, vocabulary slices slowest
    part = pid // n_blocks
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tok = tl.load(TOK_ptr + rows, mask=row_ok, other=-1)
    v_lo = part.to(tl.int64) * cols_per_slice
    v_hi = tl.minimum(v_lo + cols_per_slice, V)
    inv_t = (1.0 / tl.full([], temperature, tl.float64)).to(tl.float32)
    neg_inf = float("-inf")
    m = tl.full([BLOCK_N], neg_inf, tl.float32)
    s0 = tl.zeros([BLOCK_N], tl.float32)
    s1 = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    nan_seen = tl.zeros([BLOCK_N], tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        y, _ = _head_tile(H_ptr, stride_hn, stride_hk, W_ptr, stride_wv, stride_wk, B_ptr, rows, row_ok, cols, col_ok,
                          K, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_ok[None, :], y * inv_t, neg_inf)
        nan_seen = tl.maximum(nan_seen, tl.max((z != z).to(tl.int32), 1))  # noqa: PLR0124
        zt += tl.sum(tl.where((cols[None, :] == tok[:, None]) & col_ok[None, :], z, 0.0), 1)  # (cols past the slice: -inf)
        m_new = tl.maximum(m, tl.max(z, 1))
        # While every z so far is -inf, shift by 0 (exp(-inf - -inf) would be NaN) and keep the sums at 0.
        shift_to = tl.where(m_new == neg_inf, 0.0, m_new)
        fresh = m == neg_inf
        shift = tl.where(fresh, 0.0, m - shift_to)
        scale = tl.where(fresh, 0.0, tl.exp(shift))
        d = z - shift_to[:, None]
        e = tl.exp(d)
        s1 = scale * (s1 + shift * s0)
        if ENTROPY:
            s1 += tl.sum(tl.where(e == 0, 0.0, e * d), 1)  # 0 * -inf counts as 0
        s0 = scale * s0 + tl.sum(e, 1)
        m = m_new
    out = part.to(tl.int64) * N + rows
    tl.store(M_ptr + out, m, mask=row_ok)
    tl.store(S0_ptr + out, s0, mask=row_ok)
    tl.store(S1_ptr + out, s1, mask=row_ok)
    tl.store(ZT_ptr + out, zt, mask=row_ok)
    tl.store(NAN_ptr + out, nan_seen, mask=row_ok)


@triton.jit
def _linear_logprobs_backward_kernel(H_ptr, stride_hn, stride_hk, W_ptr, stride_wv, stride_wk, B_ptr, TOK_ptr,
                                     GLOGP_ptr, GENT_ptr, LSE_ptr, ENT_ptr, DY_ptr, stride_dn, N, V, K, v0,
                                     temperature, logit_scale, softcap, ignore_index, HAS_BIAS: tl.constexpr,
                                     HAS_SOFTCAP: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_GLOGP: tl.constexpr,
                                     ENTROPY: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """d y of one [N, V] tile of the head (vocabulary columns v0.. of W_ptr's rows), written to DY: the tile's
    logits recomputed as the forward made them, then d z = (g_logp (onehot - p) - g_entropy p (z - lse + entropy))
    / T (docs/design.md §4.3) and d y = d z (1 - tanh^2) logit_scale, all in the epilogue."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    block = pid % n_blocks  # one grid axis: row blocks fastest
    tile = pid // n_blocks
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tile.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    y, t = _head_tile(H_ptr, stride_hn, stride_hk, W_ptr, stride_wv, stride_wk, B_ptr, rows, row_ok, cols, col_ok,
                      K, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    inv_t = (1.0 / tl.full([], temperature, tl.float64)).to(tl.float32)
    z = y * inv_t
    tok = tl.load(TOK_ptr + rows, mask=row_ok, other=0)
    if HAS_IGNORE:
        ignored = tok == ignore_index
    else:
        ignored = tok != tok
    lse = tl.load(LSE_ptr + rows, mask=row_ok, other=0.0)
    a = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GLOGP:
        a = tl.load(GLOGP_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * inv_t
    a = tl.where(ignored, 0.0, a)
    p = tl.where(ignored[:, None], 0.0, tl.exp(z - lse[:, None]))
    g = tl.where(cols[None, :] == (tok - v0)[:, None], a[:, None], 0.0) - a[:, None] * p
    if ENTROPY:
        b = tl.where(ignored, 0.0, tl.load(GENT_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * inv_t)
        c = tl.load(ENT_ptr + rows, mask=row_ok, other=0.0) - lse
        g -= b[:, None] * tl.where(p == 0, 0.0, p * (z + c[:, None]))  # p = 0 where z = -inf
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    g = g * logit_scale
    tl.store(DY_ptr + rows[:, None] * stride_dn + cols[None, :], g.to(DY_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Tile shapes of the fused forward: BLOCK_N rows x BLOCK_V vocabulary columns, BLOCK_K of H per dot; (N, V, K)
# of the GPU shapes, smaller under the interpreter (NumPy works on whole tiles, and tests use small shapes).
_LINEAR_BLOCKS = {torch.float32: (64, 64, 32), torch.bfloat16: (64, 128, 64), torch.float16: (64, 128, 64)}
_LINEAR_WARPS = 8
_LINEAR_STAGES = 3


def _vocab_slices(n_blocks: int, V: int, block_v: int, device: torch.device) -> int:
    """Slices of the vocabulary per row block: enough programs for two waves over the GPU's multiprocessors
    when the rows alone are too few, never a slice narrower than one tile."""
    if device.type != "cuda":
        return 1 if V <= block_v else 2  # (two under the interpreter, so tests merge slices)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, n_blocks))
    return max(1, min(want, -(-V // block_v)))


def _merge_slices(m, s0, s1, zt, nan_seen, tokens, V, return_entropy, ignore_index):
    """(logp, entropy, lse) from the [S, N] slice states: m = max z, s0 = sum exp(z - m),
    s1 = sum exp(z - m) (z - m), zt = the target logit (0 from slices without it)."""
    neg_inf = float("-inf")
    big = m.amax(0)
    ref = torch.where(big == neg_inf, torch.zeros_like(big), big)
    live = m != neg_inf
    shift = torch.where(live, m - ref, torch.zeros_like(m))
    w = torch.where(live, torch.exp(shift), torch.zeros_like(m))
    total0 = (w * s0).sum(0)
    total1 = (w * (s1 + shift * s0)).sum(0)
    log_s0 = torch.log(total0)
    lse = big + log_s0
    # A +inf logit: lse = +inf, or NaN if the row also holds a NaN (docs/design.md §4.3).
    inf = torch.full_like(lse, float("inf"))
    lse = torch.where(big == float("inf"), torch.where(nan_seen.amax(0) > 0, inf * 0, inf), lse)
    entropy = (log_s0 - total1 / total0) if return_entropy else lse.new_zeros((0,))
    return _formulas.finish_rows(zt.sum(0) - lse, entropy, lse, tokens, V, return_entropy, ignore_index)


def _linear_launch(hidden, weight, bias, tokens, state, nan_seen, per_slice, temperature, return_entropy,
                   logit_scale, softcap, interpret):
    """(positional arguments, keyword arguments) of one launch of the fused forward kernel."""
    N, K = hidden.shape
    V = weight.shape[0]
    block_n, block_v, block_k = _LINEAR_BLOCKS[hidden.dtype]
    if interpret:
        block_n, block_v, block_k = pow2(N, 16, 32), pow2(V, 16, 64), pow2(K, 16, 64)
    args = (hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else hidden, tokens, state[0], state[1], state[2], state[3], nan_seen, N, V, K,
            per_slice, float(temperature), float(logit_scale), float(softcap if softcap is not None else 1.0))
    kwargs = {"HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None, "ENTROPY": return_entropy,
              "IEEE": hidden.dtype == torch.float32, "UPCAST": interpret and hidden.dtype != torch.float32,
              "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_K": block_k, "num_warps": _LINEAR_WARPS,
              "num_stages": _LINEAR_STAGES}
    return args, kwargs


def _linear_forward(hidden, weight, tokens, bias, temperature, return_entropy, ignore_index, logit_scale, softcap):
    """(logp, entropy, lse) through the fused kernel, or None where the tiled path of rlkernels/_ops runs instead
    (float64, which tl.dot does not take on every GPU, and empty inputs)."""
    if hidden.dtype not in _LINEAR_BLOCKS or hidden.dtype != weight.dtype:
        return None
    N, K = hidden.shape
    V = weight.shape[0]
    if N == 0 or V == 0 or K == 0:
        return None
    _formulas.check_linear_args("linear_logprobs", hidden, weight, bias)
    interpret = interpreting()
    block_n, block_v, _ = _LINEAR_BLOCKS[hidden.dtype]
    if interpret:
        block_n, block_v = pow2(N, 16, 32), pow2(V, 16, 64)
    slices = _vocab_slices(-(-N // block_n), V, block_v, hidden.device)
    per_slice = -(-V // slices)
    if hidden.device.type == "cuda":
        per_slice = -(-per_slice // block_v) * block_v  # a whole number of tiles
    slices = -(-V // per_slice)
    state = torch.empty((4, slices, N), dtype=torch.float32, device=hidden.device)
    nan_seen = torch.empty((slices, N), dtype=torch.int32, device=hidden.device)
    tokens = tokens.contiguous()
    if not skip_launch(state):
        args, kwargs = _linear_launch(hidden, weight, bias, tokens, state, nan_seen, per_slice, temperature,
                                      return_entropy, logit_scale, softcap, interpret)
        wrap_triton(_linear_logprobs_forward_kernel)[(-(-N // kwargs["BLOCK_N"]) * slices,)](*args, **kwargs)
    return _merge_slices(state[0], state[1], state[2], state[3], nan_seen, tokens, V, return_entropy, ignore_index)


def gpu_only_launches():
    """Launches of the fused forward that tests under the interpreter cannot make (there 16-bit dots run in float32,
    UPCAST, on smaller tiles), for scripts/triton_aot.py to compile for GPUs: (kernel, positional arguments,
    keyword arguments), tensors on the meta device."""
    out = []
    for dtype in _LINEAR_BLOCKS:
        for extras in (False, True):
            h = torch.empty((4096, 4096), dtype=dtype, device="meta")
            w = torch.empty((151936, 4096), dtype=dtype, device="meta")
            b = w[:, 0] if extras else None
            tok = torch.empty((4096,), dtype=torch.int64, device="meta")
            state = torch.empty((4, 1, 4096), dtype=torch.float32, device="meta")
            seen = torch.empty((1, 4096), dtype=torch.int32, device="meta")
            args, kwargs = _linear_launch(h, w, b, tok, state, seen, 151936, 1.0, extras, 1.0,
                                          30.0 if extras else None, False)
            out.append((_linear_logprobs_forward_kernel, args, kwargs))
            g = torch.empty((4096,), dtype=torch.float32, device="meta")
            dy = torch.empty((4096, 151936), dtype=dtype, device="meta")
            args, kwargs = _linear_backward_launch(dy, h, w, b, tok, 0, g, g if extras else None, g, g, 1.0,
                                                   -100 if extras else None, 1.0, 30.0 if extras else None, False)
            out.append((_linear_logprobs_backward_kernel, args, kwargs))
    return out


def _linear_tile_backward(out, h, weight, bias, tokens, v0, grad_logp, grad_entropy, lse, entropy, temperature,
                          ignore_index, logit_scale, softcap):
    """d y of rows h and vocabulary rows weight (from column v0) into out, through the fused backward kernel."""
    N, K = h.shape
    V = weight.shape[0]
    if N == 0 or V == 0 or skip_launch(out):
        return
    # the kernel reads these per row at unit stride (an incoming gradient may be expanded: stride 0)
    grad_logp, grad_entropy, lse, entropy, tokens = (
        None if x is None else x.to(torch.float32 if x.is_floating_point() else x.dtype).contiguous()
        for x in (grad_logp, grad_entropy, lse, entropy, tokens))
    args, kwargs = _linear_backward_launch(out, h, weight, bias, tokens, v0, grad_logp, grad_entropy, lse, entropy,
                                           temperature, ignore_index, logit_scale, softcap, interpreting())
    grid = -(-N // kwargs["BLOCK_N"]) * -(-V // kwargs["BLOCK_V"])
    wrap_triton(_linear_logprobs_backward_kernel)[(grid,)](*args, **kwargs)


def _linear_backward_launch(out, h, weight, bias, tokens, v0, grad_logp, grad_entropy, lse, entropy, temperature,
                            ignore_index, logit_scale, softcap, interpret):
    """(positional arguments, keyword arguments) of one launch of the fused backward kernel."""
    N, K = h.shape
    V = weight.shape[0]
    block_n, block_v, block_k = _LINEAR_BLOCKS[h.dtype]
    if interpret:
        block_n, block_v, block_k = pow2(N, 16, 32), pow2(V, 16, 64), pow2(K, 16, 64)
    use_h = grad_entropy is not None and entropy.numel() == N
    args = (h, h.stride(0), h.stride(1), weight, weight.stride(0), weight.stride(1), bias if bias is not None else h,
            tokens, grad_logp if grad_logp is not None else lse, grad_entropy if use_h else lse, lse,
            entropy if use_h else lse, out, out.stride(0), N, V, K, v0, float(temperature), float(logit_scale),
            float(softcap if softcap is not None else 1.0), 0 if ignore_index is None else ignore_index)
    kwargs = {"HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None, "HAS_IGNORE": ignore_index is not None,
              "HAS_GLOGP": grad_logp is not None, "ENTROPY": use_h, "IEEE": h.dtype == torch.float32,
              "UPCAST": interpret and h.dtype != torch.float32, "BLOCK_N": block_n, "BLOCK_V": block_v,
              "BLOCK_K": block_k, "num_warps": _LINEAR_WARPS, "num_stages": _LINEAR_STAGES}
    return args, kwargs


def _linear_tile_backward_for(hidden, weight):
    """The fused backward of linear_backward's tiles where it applies (float32 and 16-bit heads), else None."""
    if hidden.dtype not in _LINEAR_BLOCKS or hidden.dtype != weight.dtype or hidden.shape[1] == 0:
        return None
    return _linear_tile_backward


# linear_logprobs on the Triton backend: the fused forward above and the backward's tiles of d y from the fused
# backward kernel (float16, bfloat16, float32; the tiles' GEMMs for the gradients through torch's matmul);
# float64 goes through the tiles of rlkernels/_ops/logprobs.py (torch's matmul) folded by the Triton
# gather_logprobs kernels. On CPU tensors under the interpreter, on CUDA tensors compiled.
linear_logprobs = _formulas.define_linear_logprobs(
    "triton_linear_logprobs", torch.ops.rlkernels.triton_gather_logprobs,
    torch.ops.rlkernels.triton_gather_logprobs_backward_inplace, ("cpu", "cuda"), check_tokens=False,
    fused_forward=_linear_forward, fused_tile_for=_linear_tile_backward_for)
