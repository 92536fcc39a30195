"""Log-prob gathering: the log-probability of sampled tokens (and the entropy) from a policy's logits, or from
its hidden states and LM head without the logits (linear_logprobs).

docs/design.md §4.3 and §4.7 are the definitions. The wrapper checks arguments, flattens the leading dimensions to
rows ([N, V], unit stride along V, no copy for contiguous logits; rlkernels/_layout.py) and runs the backend's op
(rlkernels/_dispatch.py); the ops' autograd is in rlkernels/_ops/logprobs.py.
"""

from __future__ import annotations

import math
import torch

from . import _checks as checks
from . import _dispatch as dispatch
from . import _distributed
from ._layout import index_arg, logit_rows

__all__ = ["gather_logprobs", "linear_logprobs"]
_OP = "gather_logprobs"
_LINEAR = "linear_logprobs"


def gather_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, ignore_index=None,
                    inplace_backward=False, check_tokens=False, process_group=None, backend=None):
    """Log-probability of ``tokens`` under softmax(logits / temperature), and optionally its entropy.

    z = logits / temperature (in float32; float64 for float64 logits);
    logp = z[token] - logsumexp(z);  entropy = logsumexp(z) - sum_v softmax(z)_v z_v.

    ``logits`` is [..., V] (float32, float64, bfloat16 or float16, read as they are), ``tokens`` is [...]
    (any integer dtype). Returns logp, or (logp, entropy) with ``return_entropy=True``, with the shape of
    ``tokens``, in float32 (float64 for float64 logits). One pass over the logits with an online max/sum; no
    tensor of the logits' size is allocated in the forward. Rows whose token equals ``ignore_index`` give 0
    and no gradient. Token ids outside [0, V) raise a ValueError on CPU; on GPU they give NaN for that row
    unless ``check_tokens=True``, which validates them on the host first (a device synchronization).

    Differentiable in ``logits``: d logits = (g_logp (onehot - p) - g_entropy p (z - lse + entropy)) / T, in
    the logits' dtype. With ``inplace_backward=True`` the backward writes that gradient over the logits'
    storage: the logits are destroyed by ``backward()`` (saves one logits-sized buffer, as Liger-Kernel does).

    Vocab-parallel (tensor parallelism over the LM head, docs/design.md §4.8): with ``process_group``, each
    rank passes its contiguous shard ``logits[..., V_r]`` of the vocabulary (shards in the group's rank order,
    any sizes) and the same global token ids; the shards combine with two all-reduces per call (no logits are
    exchanged) and every rank gets the full vocabulary's logp (and entropy), replicated. The backward writes
    each rank's shard gradient without communication, given the same output gradients on every rank. A call
    first exchanges a few integers per rank and reads them on the host (shard sizes, row counts, token range):
    arguments that differ across ranks, or tokens outside the shards, raise the same ValueError on every rank
    (tokens are checked on every backend then, whatever ``check_tokens`` says).
    """
    if process_group is not None:
        _distributed.check_group(_OP, process_group)
        try:
            temperature, ignore_index, impl = _checked(logits, tokens, temperature, ignore_index, backend)
            if impl == "reference":
                raise ValueError(f"rlkernels.{_OP}: process_group needs the cpu, cuda or triton backend (the "
                                 "reference backend computes no shard state)")
        except (TypeError, ValueError, RuntimeError) as error:
            _distributed.fail_together(_OP, process_group, error)  # the other ranks raise too, instead of hanging
        rows, tok = logit_rows(logits, tokens)
        logp, entropy = _distributed.gather_logprobs(
            _OP, rows, tok, temperature=temperature, return_entropy=bool(return_entropy), ignore_index=ignore_index,
            inplace_backward=bool(inplace_backward), impl=impl, group=process_group)
        logp = logp.reshape(tokens.shape)
        return (logp, entropy.reshape(tokens.shape)) if return_entropy else logp
    temperature, ignore_index, impl = _checked(logits, tokens, temperature, ignore_index, backend)
    return_entropy, inplace_backward = bool(return_entropy), bool(inplace_backward)
    if check_tokens and impl not in ("cpu", "reference"):  # those two check every token themselves
        _check_tokens_on_host(tokens, logits.shape[-1], ignore_index)
    if impl == "reference":
        out = dispatch.reference(_OP)(logits, tokens, temperature=temperature, return_entropy=return_entropy,
                                      ignore_index=ignore_index)
        if return_entropy:
            return tuple(dispatch.from_reference(o, logits.device, logits.dtype) for o in out)
        return dispatch.from_reference(out, logits.device, logits.dtype)
    rows, tok = logit_rows(logits, tokens)
    fn = dispatch.kernel(_OP, impl)
    logp, entropy, _ = fn(rows, tok, temperature, return_entropy, ignore_index, inplace_backward)
    logp = logp.reshape(tokens.shape)
    if return_entropy:
        return logp, entropy.reshape(tokens.shape)
    return logp


def _checked(logits, tokens, temperature, ignore_index, backend):
    """The checked scalar arguments and the backend: (temperature, ignore_index, impl)."""
    checks.float_tensor(_OP, "logits", logits)
    checks.tensor(_OP, "tokens", tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"rlkernels.{_OP}: tokens must be an integer tensor, got {tokens.dtype}")
    checks.same_device(_OP, "logits", logits, tokens=tokens)
    if logits.dim() == 0:
        raise ValueError(f"rlkernels.{_OP}: logits must have shape [..., V], got a 0-d tensor")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"rlkernels.{_OP}: tokens must have shape {tuple(logits.shape[:-1])} (logits' leading "
                         f"dims), got {tuple(tokens.shape)}")
    temperature = checks.temperature(_OP, temperature)
    ignore_index = index_arg(_OP, "ignore_index", ignore_index)
    return temperature, ignore_index, dispatch.resolve(backend, logits.device, _OP)


def _check_tokens_on_host(tokens, V, ignore_index):
    t = tokens.detach().to("cpu", torch.int64).reshape(-1)
    if ignore_index is not None:
        t = t[t != ignore_index]
    bad = (t < 0) | (t >= V)
    if bool(bad.any()):
        raise ValueError(f"rlkernels.{_OP}: tokens must be in [0, {V}) (or ignore_index), got {int(t[bad][0])}")


def linear_logprobs(hidden, weight, tokens, *, bias=None, temperature=1.0, return_entropy=False, ignore_index=None,
                    logit_scale=1.0, softcap=None, chunk_size=None, process_group=None, backend=None):
    """Log-probability of ``tokens`` under a linear LM head, without holding the [N, V] logits.

    z = logit_scale * (hidden @ weight.T + bias); with ``softcap``, z = softcap * tanh(z / softcap);
    then exactly ``gather_logprobs(z, tokens, temperature=temperature, return_entropy=..., ignore_index=...)``.

    ``hidden`` is [..., H], ``weight`` [V, H] (an ``nn.Linear``'s weight), ``bias`` [V] or None, ``tokens`` [...]
    (any integer dtype, hidden's leading shape); float inputs of different dtypes are promoted to a common one.
    Returns logp, or (logp, entropy) with ``return_entropy=True``, shaped like ``tokens``, float32 (float64 for
    float64 inputs). The logits are made ``chunk_size`` rows at a time (None: tiles of up to 2048 rows (8192 on
    GPUs) and part of the vocabulary within a budget of bytes, so memory is flat in N) and folded into the online
    log-sum-exp state (with ``backend="triton"`` the float32 and 16-bit forward is one GEMM kernel whose epilogue
    is that state: no tile of logits leaves the chip, and ``chunk_size`` shapes only the backward); rows whose
    token equals ``ignore_index`` give 0 and no gradient (on CPU they are not computed at all).

    Differentiable in ``hidden``, ``weight`` and ``bias``: the backward recomputes each chunk of logits, turns it
    into d logits in place and accumulates grad_weight over the chunks in float32. Token ids outside [0, V) raise
    a ValueError on CPU and give NaN on GPUs.

    Vocab-parallel (docs/design.md §4.8): with ``process_group``, ``weight`` (and ``bias``) are this rank's
    contiguous rows of the LM head (shards in the group's rank order), ``hidden`` and the global token ids the
    same on every rank; logp and entropy are the whole vocabulary's, on every rank, as for
    :func:`gather_logprobs`. grad_weight and grad_bias are the shard's; grad_hidden is this rank's part of the
    sum over the vocabulary: sum it over the group, as for a column-parallel layer's input (Megatron's
    copy_to_tensor_model_parallel_region before the head).
    """
    op = _LINEAR
    if process_group is not None:
        _distributed.check_group(op, process_group)
        try:
            temperature, logit_scale, softcap, ignore_index, impl = _linear_checked(
                hidden, weight, tokens, bias, temperature, logit_scale, softcap, chunk_size, ignore_index, backend)
            if impl == "reference":
                raise ValueError(f"rlkernels.{op}: process_group needs the cpu, cuda or triton backend (the "
                                 "reference backend computes no shard state)")
        except (TypeError, ValueError, RuntimeError) as error:
            _distributed.fail_together(op, process_group, error)  # the other ranks raise too, instead of hanging
        dtype = checks.common_float_dtype(hidden, weight, bias)
        H, V = hidden.shape[-1], weight.shape[0]
        rows = hidden.to(dtype).reshape(-1, H)
        if chunk_size is None:
            chunk_size, vocab_tile = dispatch.default_tiles(rows.shape[0], V, dtype, hidden.device.type)
        else:
            vocab_tile = max(V, 1)
        logp, entropy = _distributed.linear_logprobs(
            op, rows, weight.to(dtype), None if bias is None else bias.to(dtype), tokens.reshape(-1).to(torch.int64),
            temperature=temperature, return_entropy=bool(return_entropy), ignore_index=ignore_index,
            logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size, vocab_tile=vocab_tile, impl=impl,
            group=process_group)
        logp = logp.reshape(tokens.shape)
        return (logp, entropy.reshape(tokens.shape)) if return_entropy else logp
    temperature, logit_scale, softcap, ignore_index, impl = _linear_checked(
        hidden, weight, tokens, bias, temperature, logit_scale, softcap, chunk_size, ignore_index, backend)
    return_entropy = bool(return_entropy)
    H, V = hidden.shape[-1], weight.shape[0]
    if impl == "reference":
        out = dispatch.reference(op)(hidden, weight, tokens, bias=bias, temperature=temperature,
                                     return_entropy=return_entropy, ignore_index=ignore_index,
                                     logit_scale=logit_scale, softcap=softcap)
        dtype = checks.common_float_dtype(hidden, weight, bias)
        if return_entropy:
            return tuple(dispatch.from_reference(o, hidden.device, dtype) for o in out)
        return dispatch.from_reference(out, hidden.device, dtype)
    dtype = checks.common_float_dtype(hidden, weight, bias)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    rows = hidden.reshape(-1, H)
    tok = tokens.reshape(-1).to(torch.int64)
    if chunk_size is None:
        chunk_size, vocab_tile = dispatch.default_tiles(rows.shape[0], V, dtype, hidden.device.type)
    else:
        vocab_tile = V
    fn = dispatch.kernel(op, impl)
    logp, entropy, _ = fn(rows, weight, tok, bias, temperature, return_entropy, ignore_index, logit_scale, softcap,
                          chunk_size, vocab_tile)
    logp = logp.reshape(tokens.shape)
    if return_entropy:
        return logp, entropy.reshape(tokens.shape)
    return logp


def _linear_checked(hidden, weight, tokens, bias, temperature, logit_scale, softcap, chunk_size, ignore_index,
                    backend):
    """linear_logprobs' checked scalar arguments and backend: (temperature, logit_scale, softcap, ignore_index,
    impl)."""
    op = _LINEAR
    checks.float_tensor(op, "hidden", hidden)
    checks.float_tensor(op, "weight", weight)
    checks.float_tensor(op, "bias", bias, optional=True)
    checks.tensor(op, "tokens", tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"rlkernels.{op}: tokens must be an integer tensor, got {tokens.dtype}")
    checks.same_device(op, "hidden", hidden, weight=weight, tokens=tokens, bias=bias)
    if hidden.dim() == 0:
        raise ValueError(f"rlkernels.{op}: hidden must have shape [..., H], got a 0-d tensor")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"rlkernels.{op}: weight must have shape [V, {H}] (hidden's last dim H = {H}), got "
                         f"{tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"rlkernels.{op}: bias must have shape ({V},) (weight's rows), got {tuple(bias.shape)}")
    if tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"rlkernels.{op}: tokens must have shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dims), got {tuple(tokens.shape)}")
    temperature = checks.temperature(op, temperature)
    logit_scale = checks.real(op, "logit_scale", logit_scale)
    if not math.isfinite(logit_scale):
        raise ValueError(f"rlkernels.{op}: logit_scale must be finite, got {logit_scale}")
    if softcap is not None:
        softcap = checks.positive(op, "softcap", softcap)
        if not math.isfinite(softcap):
            raise ValueError(f"rlkernels.{op}: softcap must be finite or None, got {softcap}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"rlkernels.{op}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"rlkernels.{op}: chunk_size must be >= 1, got {chunk_size}")
    ignore_index = index_arg(op, "ignore_index", ignore_index)
    return temperature, logit_scale, softcap, ignore_index, dispatch.resolve(backend, hidden.device, op)
