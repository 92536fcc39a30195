"""TRL's ``selective_log_softmax`` and ``add_fused_lm_head`` (``trl.trainer.utils``) on
:func:`rlkernels.gather_logprobs` and :func:`rlkernels.linear_logprobs`.

Signature of trl 1.16: ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``: the log-softmax
of ``logits / temperature`` ([..., V]) gathered at ``index`` ([...], or [..., K] for K ids per position, e.g.
top-K), with the shape of ``index``; rows where ``row_mask`` is 0 give 0 (and no gradient). One fused pass over
the logits per gathered id, nothing of the logits' size allocated; float32 output (float64 for float64 logits;
TRL returns the logits' dtype).

``add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",))``: TRL 1.16's
patch of a causal LM, so that ``model(..., labels=labels, fused_lm_head=True)`` returns per-token log-probs of the
next-token labels (and their entropy with ``"entropy"`` in ``outputs``) instead of logits, computed by
:func:`rlkernels.linear_logprobs` (TRL's GRPO, RLOO, DPO, KTO and SFT trainers call it; its own kernel is
``trl.kernels.ChunkedLogProbFunction``). Same arguments, same ``FusedCausalLMOutput`` (TRL's class when TRL is
installed): ``loss`` = -sum(log_probs) / (number of labels not -100, or ``num_items_in_batch``), per-token fields
0 where the label is -100, ``label_mask``, and the MoE ``aux_loss``. Without ``fused_lm_head=True`` the model's
own forward runs. Not supported: the ``outputs`` fields ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``
(a ValueError), and DeepSpeed ZeRO-3 partitioned heads (TRL gathers them; here the head must be whole). This module
imports TRL only for its output class, when installed.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

import rlkernels

from .. import _checks as checks

__all__ = ["add_fused_lm_head", "selective_log_softmax"]

_FUSED_OUTPUTS = ("log_probs", "entropy")

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


def _output_class():
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # TRL is not installed: the same fields on a transformers ModelOutput
        return _local_output_class()
    return FusedCausalLMOutput


@functools.cache
def _local_output_class():
    import dataclasses

    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class FusedCausalLMOutput(ModelOutput):
        loss: torch.Tensor | None = None
        log_probs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        log_sum_sq_probs: torch.Tensor | None = None
        mean_logits: torch.Tensor | None = None
        is_top1: torch.Tensor | None = None
        label_mask: torch.Tensor | None = None
        aux_loss: torch.Tensor | None = None

    return FusedCausalLMOutput


def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """Patches ``model`` so that ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's
    ``FusedCausalLMOutput`` of per-token next-token log-probs, computed without the logits (see the module doc)."""
    from . import transformers as hf

    where = "rlkernels.integrations.trl.add_fused_lm_head"
    temperature = checks.positive("integrations.trl.add_fused_lm_head", "temperature", temperature)
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in _FUSED_OUTPUTS]
    if unknown:
        raise ValueError(f"{where}: outputs {unknown} are not supported; supported: {_FUSED_OUTPUTS}")
    original_forward = model.forward
    text_config = model.config.get_text_config()
    logit_scale, softcap = hf.head_transform(model)
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden = backbone_outputs.last_hidden_state[:, :-1]
            labels = labels[:, 1:]
        else:
            hidden = backbone_outputs.last_hidden_state
            labels = shift_labels
        weight, bias = hf.output_head(self)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        context = contextlib.nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            context = torch.autocast(hidden.device.type, enabled=False)
        elif torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with context:
            out = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                            return_entropy=want_entropy, ignore_index=-100, logit_scale=logit_scale,
                                            softcap=softcap)
        log_probs, entropy = out if want_entropy else (out, None)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux_loss = load_balancing_loss_func(backbone_outputs.router_logits, text_config.num_experts,
                                                text_config.num_experts_per_tok, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return _output_class()(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(_fused_forward, model)
