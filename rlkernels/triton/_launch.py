"""``wrap_triton`` that behaves the same on every torch release this package builds against.

Under TRITON_INTERPRET=1, ``@triton.jit`` gives an ``InterpretedFunction``: torch 2.14's
``torch.library.wrap_triton`` hands such a kernel back unchanged (it launches eagerly), while torch 2.11's
raises "wrap_triton only works on functions annotated with triton.jit or triton.autotune" (seen with
torch 2.11.0 and triton 3.6.0, the versions of the GPU machines' image). Here an interpreted kernel is
returned as is on every release; a compiled one goes through torch's wrap_triton (torch.compile traces it).
"""

from __future__ import annotations

from torch.library import wrap_triton as _torch_wrap_triton


def wrap_triton(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return _torch_wrap_triton(kernel)
