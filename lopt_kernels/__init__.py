"""lopt_kernels: fused Triton kernels for LoPT post-training.

Every op has a pure-PyTorch reference beside it (``*_reference``): the CPU path and the test oracle.
``current_backend(device)`` says which one runs.
"""

from .backend import current_backend

__all__ = ["current_backend"]
