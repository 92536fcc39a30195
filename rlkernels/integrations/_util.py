"""Argument helpers shared by the adapters: errors name the trainer's function and argument."""

from __future__ import annotations

import numbers

import torch


def scalar(where: str, name: str, value) -> float:
    """A Python/NumPy real or a one-element tensor (read on the host: a device sync for a GPU tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{where}: {name} must be a scalar or a one-element tensor, got a tensor of shape "
                f"{tuple(value.shape)} (per-step values are not supported by this adapter)"
            )
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must be real, got a {value.dtype} tensor")
        return float(value.reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def tensor(where: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def same_shape(where: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and tuple(x.shape) != tuple(ref.shape):
            raise ValueError(
                f"{where}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
            )
