"""TRL's ``selective_log_softmax`` (``trl.trainer.utils``) on :func:`rlkernels.gather_logprobs`.

Signature of trl 1.16: ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``: the log-softmax
of ``logits / temperature`` ([..., V]) gathered at ``index`` ([...], or [..., K] for K ids per position, e.g.
top-K), with the shape of ``index``; rows where ``row_mask`` is 0 give 0 (and no gradient). One fused pass over
the logits per gathered id, nothing of the logits' size allocated; float32 output (float64 for float64 logits;
TRL returns the logits' dtype). This module does not import TRL.
"""

from __future__ import annotations

import torch

import rlkernels

from .. import _checks as checks

__all__ = ["selective_log_softmax"]

_OP = "integrations.trl.selective_log_softmax"


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None, *, backend=None):
    """log_softmax(logits / temperature, -1) gathered at ``index``; 0 where ``row_mask`` is 0."""
    checks.float_tensor(_OP, "logits", logits)
    checks.tensor(_OP, "index", index)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"rlkernels.{_OP}: index must be an integer tensor, got {index.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"rlkernels.{_OP}: logits must have shape [..., V], got a 0-d tensor")
    lead = tuple(logits.shape[:-1])
    if tuple(index.shape) == lead:
        squeeze = True
    elif index.dim() == logits.dim() and tuple(index.shape[:-1]) == lead:
        squeeze = False
    else:
        raise ValueError(f"rlkernels.{_OP}: index must have shape {lead} or {lead + ('K',)} (logits' leading "
                         f"dims), got {tuple(index.shape)}")
    ignore = None
    if row_mask is not None:
        checks.tensor(_OP, "row_mask", row_mask)
        if tuple(row_mask.shape) != tuple(index.shape):
            raise ValueError(f"rlkernels.{_OP}: row_mask must have the shape of index {tuple(index.shape)}, got "
                             f"{tuple(row_mask.shape)}")
        checks.same_device(_OP, "index", index, row_mask=row_mask)
        ignore = -1  # masked rows: token -1 with ignore_index=-1 gives 0 and no gradient
        index = torch.where(row_mask == 0, torch.full((), ignore, dtype=torch.int64, device=index.device),
                            index.to(torch.int64))
    if squeeze:
        return rlkernels.gather_logprobs(logits, index, temperature=temperature, ignore_index=ignore,
                                         backend=backend)
    outs = [rlkernels.gather_logprobs(logits, index[..., k], temperature=temperature, ignore_index=ignore,
                                      backend=backend) for k in range(index.shape[-1])]
    if not outs:
        acc = checks.accumulate_dtype(logits.dtype)
        return torch.empty(index.shape, dtype=acc, device=logits.device)
    return torch.stack(outs, -1)
