"""Counting the bytes of live tensors on the CPU, where there is no ``torch.cuda.memory_allocated``.

``ByteCounter`` is a ``TorchDispatchMode``: every tensor an operator returns while it is active (the
autograd engine's backward included: the engine carries the mode into its CPU work) has its storage
registered once, with a finalizer that takes its bytes off when the storage dies. Storages that
existed before (parameters, optimizer state, gradients) are registered with ``track``. ``current`` is
then what a caching-free allocator would report as allocated, and ``peak`` its high-water mark, both
exact in bytes: no rounding to allocator blocks, no fragmentation. That makes it the oracle the
planner's arithmetic is checked against on the CPU and the memory source of the benchmark's CPU rows
(``memory_source: "cpu-bytes"``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["ByteCounter", "SavedActivationPeak", "saved_tensor_bytes", "tensors_of", "unique_bytes"]


class ByteCounter(TorchDispatchMode):
    """Live bytes of the storages created (or ``track``-ed) while the mode is active, and their peak."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count already existing tensors (each storage once) until they die."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def tensors_of(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None):
    """Parameters, their gradients and the optimizer's state tensors: what persists across steps."""
    out = []
    if model is not None:
        for p in model.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out += list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class saved_tensor_bytes:
    """Context manager: bytes of the distinct storages autograd saves for backward inside it.

    Storages listed in ``exclude`` (parameters, typically) are not counted; ``shared`` lists tensors
    counted separately (e.g. rotary cos/sin that every layer saves), reported in ``shared_bytes``.
    Checkpointed regions (``torch.utils.checkpoint``) install their own hooks, so what they save
    internally is not seen here; their kept inputs are not saved tensors either.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), shared: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._shared = {t.untyped_storage()._cdata for t in shared}
        self._seen: dict[int, int] = {}
        self.shared_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(n for k, n in self._seen.items() if k not in self._shared)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.shared_bytes = sum(n for k, n in self._seen.items() if k in self._shared)
        return self._hooks.__exit__(*exc)


class SavedActivationPeak:
    """Live bytes of what autograd saves for backward (parameters excluded), and their peak."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list] = {}
        self.current = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved[0])

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params or t.untyped_storage().nbytes() == 0:
            return (t,)
        entry = self.live.setdefault(ptr, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return (t, _Release(self, ptr))


class _Release:
    def __init__(self, meter, ptr):
        self.meter, self.ptr = meter, ptr

    def __del__(self):
        entry = self.meter.live[self.ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.meter.current -= entry[0]
            del self.meter.live[self.ptr]
