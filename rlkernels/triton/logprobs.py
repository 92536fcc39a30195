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
from ._common import acc_dtype, interpreting, keep_whole_under_interpreter, pow2, wrap_triton

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

# linear_logprobs on the Triton backend: the row chunks of rlkernels/_ops/logprobs.py (torch's matmul) folded by
# the Triton kernels above; on CPU tensors under the interpreter, on CUDA tensors compiled.
linear_logprobs = _formulas.define_linear_logprobs(
    "triton_linear_logprobs", torch.ops.rlkernels.triton_gather_logprobs,
    torch.ops.rlkernels.triton_gather_logprobs_backward_inplace, ("cpu", "cuda"), check_tokens=False)
