"""What every Triton module of rlkernels shares: launching, the interpreter, accumulation types, flags.

The Triton ops are ``torch.library.triton_op``s named ``rlkernels::triton_<name>`` with the signature of the
C++ op ``rlkernels::<name>`` (csrc/ops.cpp); their fake kernels and autograd formulas are the ones in
rlkernels/_ops/, shared with the C++/CUDA ops. This module imports nothing of rlkernels but the compiled
library, so every Triton module sits below the public wrappers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton

from .. import _C  # noqa: F401  (the namespace and the C++ schemas exist before the Triton ops join them)
from .._ops._util import accumulate_dtype as acc_dtype  # noqa: F401  (for every Triton module)

Tensor = torch.Tensor


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when kernels run through Triton's interpreter (TRITON_INTERPRET=1 at import): @triton.jit then
    gives an InterpretedFunction."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


def wrap_triton(kernel):
    """``torch.library.wrap_triton`` that behaves the same on every torch release this package builds against.

    torch 2.14's wrap_triton hands an interpreted kernel back unchanged (it launches eagerly), while torch
    2.11's raises for it ("wrap_triton only works on functions annotated with triton.jit or triton.autotune").
    An interpreted kernel is returned as is on every release; a compiled one goes through torch's wrap_triton,
    so torch.compile traces it.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return _torch_wrap_triton(kernel)


def skip_launch(out: Tensor) -> bool:
    """Under the interpreter a fake (meta) run would execute the kernel on tensors without data."""
    return interpreting() and torch._subclasses.fake_tensor.is_fake(out)


def keep_whole_under_interpreter(op):
    """Under TRITON_INTERPRET=1 the kernels run through NumPy and cannot be recorded in a graph (wrap_triton
    hands back the raw interpreted function), so AOTDispatch (torch.compile, opcheck) keeps the op whole, as
    it does for torch.export, instead of decomposing it into kernel launches it would not see. On a GPU the
    triton_op decomposition stays, so Inductor sees the kernels."""
    if interpreting():
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        def keep_whole(mode, op_overload, types, args, kwargs):
            return mode.__torch_dispatch__(op_overload, types, args, kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, keep_whole)
    return op


def tl_acc(dtype: torch.dtype):
    """The Triton type of acc_dtype(dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def flag(x: Tensor | None) -> Tensor | None:
    """A flag tensor as the kernels read it: bool is one byte per element, read as uint8 (no copy)."""
    if x is None:
        return None
    x = x.contiguous()
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def pow2(n, lo: int, hi: int) -> int:
    """The smallest power of two >= n, clamped to [min(lo, hi), hi] (comparisons only: traces with a symbolic
    n). lo and hi are powers of two."""
    block = min(lo, hi)
    while block < hi and block < n:
        block *= 2
    return block
