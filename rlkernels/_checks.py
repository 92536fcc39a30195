"""Argument checks shared by the public functions: every error names the argument and what was expected.

Nothing here reads tensor values, so the checks cost nothing on the device and trace under torch.compile.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._ops import _util

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _where(op: str) -> str:
    return f"rlkernels.{op}"


def tensor(op: str, name: str, x, *, optional: bool = False) -> torch.Tensor | None:
    if x is None:
        if optional:
            return None
        raise TypeError(f"{_where(op)}: {name} is required, got None")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_where(op)}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(op: str, name: str, x, *, optional: bool = False) -> torch.Tensor | None:
    x = tensor(op, name, x, optional=optional)
    if x is not None and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{_where(op)}: {name} must be a float tensor (float32, float64, bfloat16 or float16), got {x.dtype}"
        )
    return x


def flag_tensor(op: str, name: str, x) -> torch.Tensor | None:
    """bool, integer (uint8, ...) and float 0/1 flags are accepted; nonzero means set."""
    x = tensor(op, name, x, optional=True)
    if x is None:
        return None
    if x.dtype.is_complex:
        raise TypeError(f"{_where(op)}: {name} must be a bool, integer or float 0/1 tensor, got {x.dtype}")
    return x if x.dtype == torch.bool else x != 0


def same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != ref.device:
            raise ValueError(
                f"{_where(op)}: {name} is on {x.device} but {ref_name} is on {ref.device}; all tensors must be on one device"
            )


def same_shape(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(
                f"{_where(op)}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
            )


def unit_interval(op: str, name: str, value) -> float:
    value = real(op, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{_where(op)}: {name} must be in [0, 1], got {value}")
    return value


def real(op: str, name: str, value) -> float:
    if type(value) is float:  # the common case, without the slower numbers.Real ABC check below
        return value
    if isinstance(value, torch.Tensor):
        return host_tensor_real(op, name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_where(op)}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def scalar_tensor(op: str, name: str, value: torch.Tensor) -> torch.Tensor:
    """A one-element real (float or integer) tensor, as a 0-d tensor; its value is not read."""
    if value.numel() != 1:
        raise ValueError(f"{_where(op)}: {name} must be a number or a one-element tensor, got a tensor of shape "
                         f"{tuple(value.shape)}")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{_where(op)}: {name} must be a real number or a real tensor, got a {value.dtype} tensor")
    return value.reshape(())


def host_tensor_real(op: str, name: str, value: torch.Tensor) -> float:
    """A one-element CPU tensor read as a float (TorchRL passes gamma so); docs/design.md §3. A tensor on a GPU
    is refused: reading it here would synchronize the host with the device (§2)."""
    value = scalar_tensor(op, name, value)
    if value.device.type != "cpu":
        raise TypeError(f"{_where(op)}: {name} is a tensor on {value.device}; this op reads {name} on the host, "
                        "which would synchronize with the device: pass a Python float or a CPU tensor "
                        "(gae, discounted_returns and q_targets take it on the device, docs/design.md §3)")
    return float(value)


def positive(op: str, name: str, value) -> float:
    value = real(op, name, value)
    if not value > 0.0:
        raise ValueError(f"{_where(op)}: {name} must be > 0, got {value}")
    return value


# The smallest temperature: the kernels scale by 1 / temperature in float32, which must stay finite
# (1 / float32 max; docs/design.md §4.3, §4.5).
MIN_TEMPERATURE = 2.938735877055719e-39


def temperature(op: str, value) -> float:
    """A softmax temperature: finite and at least MIN_TEMPERATURE."""
    value = real(op, "temperature", value)
    if not MIN_TEMPERATURE <= value < math.inf:
        raise ValueError(f"{_where(op)}: temperature must be finite and >= {MIN_TEMPERATURE} (1 / temperature a "
                         f"finite float32), got {value}")
    return value


def dim_index(op: str, name: str, dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{_where(op)}: {name} must be an int, got {type(dim).__name__}")
    if ndim == 0 or not -ndim <= dim < ndim:
        raise ValueError(f"{_where(op)}: {name}={dim} is out of range for a tensor with {ndim} dims")
    return dim % ndim


def common_float_dtype(*tensors) -> torch.dtype:
    dtype = None
    for x in tensors:
        if x is not None:
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return dtype


accumulate_dtype = _util.accumulate_dtype
