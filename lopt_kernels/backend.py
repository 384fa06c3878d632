"""Which implementation of the fused ops runs on a given device, and the scaffolding every op file shares.

Triton on CUDA. On the CPU, Triton through its interpreter when ``TRITON_INTERPRET=1`` is set
(slow, used by the tests), else the pure-PyTorch reference. ``LOPT_KERNELS_BACKEND=torch|triton``
forces one.

Shared by the op files: ``import_triton`` (the import guard), ``wrap_triton``, ``num_warps``,
``register_op`` (the registered op while torch.compile traces, the launcher in eager) and
``first_order_only`` / ``double_backward_error`` (backward kernels that cannot be differentiated again).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("triton", "torch")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def import_triton():
    """``(triton, triton.language)``, or stand-ins where Triton is not installed.

    The stand-ins let a module of kernels import without Triton: ``triton.jit`` returns the function
    unchanged and ``tl`` is None (``from __future__ import annotations`` keeps the ``tl.constexpr``
    annotations unevaluated). ``current_backend()`` never picks Triton then, so no kernel is launched.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(jit=lambda fn: fn, next_power_of_2=None, cdiv=None), None
    return triton, tl


# Launches a kernel so that torch.compile (through a torch.library.triton_op) sees into it; in eager, and in
# torch builds without it, the kernel itself.
wrap_triton = getattr(torch.library, "wrap_triton", lambda kernel: kernel)


def num_warps(tile_elements: int) -> int:
    """Warps for a program that holds ``tile_elements`` values at once: 4 up to 2048, 8 up to 8192, else 16."""
    return 4 if tile_elements <= 2048 else 8 if tile_elements <= 8192 else 16


def register_op(name: str, launcher: Callable) -> Callable:
    """``launcher`` (its kernels launched through ``wrap_triton``) registered as ``lopt_kernels::<name>``.

    Returns what the autograd Functions call: the registered op while torch.compile traces, which then sees
    each launch as one node (and Inductor sees into the kernels); the launcher itself in eager, where the
    op dispatcher would cost time per call. Without Triton (or ``torch.library.triton_op``), the launcher.
    """
    if not _TRITON_INSTALLED or not hasattr(torch.library, "triton_op"):
        return launcher
    op = torch.library.triton_op(f"lopt_kernels::{name}", mutates_args=())(launcher)

    @functools.wraps(launcher)
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else launcher(*args)

    return call


def double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"lopt_kernels.{op} does not support double backward (a second-order gradient, taken after "
        f"torch.autograd.grad(create_graph=True) through it); use lopt_kernels.{op}_reference for that"
    )


class _DoubleBackwardError(torch.autograd.Function):
    """Passes an op's first-order gradients through unchanged; differentiating them raises."""

    @staticmethod
    def forward(ctx, op, grads, *depends_on):
        ctx.op = op
        return grads

    @staticmethod
    def backward(ctx, *_):
        raise double_backward_error(ctx.op)


def first_order_only(op: str) -> Callable:
    """Decorator for the backward of an autograd Function whose backward kernels are not differentiable.

    The gradients are computed under no_grad. With create_graph=True (grad mode on in the backward) they
    come out of a node that depends on the incoming gradients and on the saved tensors that require grad
    (the op's inputs), and whose own backward raises ``double_backward_error(op)``: a second-order
    gradient through the op fails, naming it, instead of silently lacking the op's term. First-order
    gradients, with or without create_graph, are unchanged. ``torch.autograd.function.once_differentiable``
    does the same but names no op, and looks at the incoming gradients only (it misses the second-order
    term through the saved inputs when the incoming gradient is a constant).
    """

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            saved = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, torch.Tensor)]
            depends_on = [t for t in saved if t.requires_grad]
            if not depends_on:
                return grads
            single = not isinstance(grads, tuple)
            grads = [grads] if single else list(grads)
            slots = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            passed = _DoubleBackwardError.apply(op, tuple(grads[i].detach() for i in slots), *depends_on)
            for i, g in zip(slots, passed):
                grads[i] = g
            return grads[0] if single else tuple(grads)

        return wrapper

    return decorate


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current_backend(device: torch.device | str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"``: the implementation the ops use for tensors on ``device``."""
    forced = os.environ.get("LOPT_KERNELS_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LOPT_KERNELS_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "triton" and not triton_available():
            raise RuntimeError("LOPT_KERNELS_BACKEND=triton, but triton is not installed: pip install triton")
        return forced
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if not triton_available():
        return "torch"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and triton_interpreted():
        return "triton"
    return "torch"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, n_tiles: int, per_sm: int = 4) -> int:
    """Programs for a kernel that loops over ``n_tiles`` tiles: a few per SM, each owning one row of
    fp32 partial sums (so few enough that those partials stay small). The interpreter gets a few."""
    if device.type != "cuda":
        return max(1, min(n_tiles, per_sm))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(n_tiles, per_sm * _sm_count(index)))
