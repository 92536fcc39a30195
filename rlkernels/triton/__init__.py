"""Triton kernels, one module per op family. They run on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (how CI checks them)."""
