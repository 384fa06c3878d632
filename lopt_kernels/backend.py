"""Which implementation of the fused ops runs on a given device.

Triton on CUDA. On the CPU, Triton through its interpreter when ``TRITON_INTERPRET=1`` is set
(slow, used by the tests), else the pure-PyTorch reference. ``LOPT_KERNELS_BACKEND=torch|triton``
forces one.
"""

from __future__ import annotations

import functools
import importlib.util
import os

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
