"""Per-token log-probs of a Hugging Face causal LM through :func:`rlkernels.linear_logprobs`, without its logits.

``token_logprobs(model, input_ids, attention_mask=None, *, logits_to_keep=None, temperature=1.0,
return_entropy=False)`` is what TRL's GRPO and PPO trainers compute from full logits
(``model(input_ids, attention_mask, logits_to_keep=K + 1).logits[:, :-1] / temperature``, then
``selective_log_softmax`` at ``input_ids[:, -K:]``, and ``entropy_from_logits``): the log-probability of each
next token, for the last ``logits_to_keep`` tokens (all but the first with None). It runs the model's backbone
(``model.base_model``) and hands its last hidden states and the output embedding (``lm_head``) to the fused head,
so the [B, T, V] logits never exist. The model's own logit transforms are applied as its forward applies them:
``final_logit_softcapping`` (Gemma) and a logit multiplier (``logit_scale``, ``output_multiplier``,
``lm_head_multiplier``, or 1 / ``logits_scaling``), read from the text config as TRL's ``add_fused_lm_head`` reads
them. transformers is imported by the caller's model, not by this module.
"""

from __future__ import annotations

import torch

import rlkernels

from .. import _checks as checks

__all__ = ["head_transform", "output_head", "token_logprobs"]

_OP = "integrations.transformers.token_logprobs"


def head_transform(model) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a causal LM's head, from its text config (TRL 1.16's reading of it)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight [V, H] and bias (or None) of the model's output embedding; a DTensor (FSDP2) is gathered."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"rlkernels.{_OP}: the model has no output embedding (get_output_embeddings() is None)")
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):  # torch.distributed DTensor
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def token_logprobs(model, input_ids, attention_mask=None, *, logits_to_keep=None, temperature=1.0,
                   return_entropy=False, backend=None):
    """log p(input_ids[:, t] | input_ids[:, :t]) for the last ``logits_to_keep`` positions ([B, K]; [B, T - 1]
    with None), and the entropy of each of those next-token distributions with ``return_entropy=True``, in
    float32 (float64 for a float64 model). Differentiable in the model's parameters."""
    checks.tensor(_OP, "input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"rlkernels.{_OP}: input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if logits_to_keep is not None:
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"rlkernels.{_OP}: logits_to_keep must be an int or None, got "
                            f"{type(logits_to_keep).__name__}")
        if not 0 <= logits_to_keep < T:
            raise ValueError(f"rlkernels.{_OP}: logits_to_keep must be in [0, {T}) (input_ids has {T} positions), "
                             f"got {logits_to_keep}")
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    K = T - 1 if logits_to_keep is None else logits_to_keep
    hidden = hidden[:, T - 1 - K: T - 1]
    tokens = input_ids[:, T - K:]
    weight, bias = output_head(model)
    hidden = hidden.to(weight.device)
    if torch.is_autocast_enabled(hidden.device.type):  # the head runs in the autocast dtype, as nn.Linear would
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logit_scale, softcap = head_transform(model)
    return rlkernels.linear_logprobs(hidden, weight, tokens.to(weight.device), bias=bias, temperature=temperature,
                                     return_entropy=return_entropy, logit_scale=logit_scale, softcap=softcap,
                                     backend=backend)
