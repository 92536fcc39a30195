"""Log-prob gathering: the log-probability of sampled tokens (and the entropy) from a policy's logits.

docs/design.md §4.3 is the definition. The wrapper checks arguments, flattens the leading dimensions to rows
([N, V], unit stride along V, no copy for contiguous logits; rlkernels/_layout.py) and runs the backend's op
(rlkernels/_dispatch.py); the ops' autograd is in rlkernels/_ops/logprobs.py.
"""

from __future__ import annotations

import torch

from . import _checks as checks
from . import _dispatch as dispatch
from ._layout import index_arg, logit_rows

__all__ = ["gather_logprobs"]
_OP = "gather_logprobs"


def gather_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, ignore_index=None,
                    inplace_backward=False, check_tokens=False, backend=None):
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
    """
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
    return_entropy, inplace_backward = bool(return_entropy), bool(inplace_backward)
    impl = dispatch.resolve(backend, logits.device, _OP)
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


def _check_tokens_on_host(tokens, V, ignore_index):
    t = tokens.detach().to("cpu", torch.int64).reshape(-1)
    if ignore_index is not None:
        t = t[t != ignore_index]
    bad = (t < 0) | (t >= V)
    if bool(bad.any()):
        raise ValueError(f"rlkernels.{_OP}: tokens must be in [0, {V}) (or ignore_index), got {int(t[bad][0])}")
