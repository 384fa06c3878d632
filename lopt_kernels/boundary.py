"""Memory at the LoPT boundary: when a lower block ends, no activation it saved for backward stays alive.

The engine runs each lower block as forward -> reconstruction loss -> backward -> detach::

    boundary = BoundaryMemory("auto")
    with boundary.block(keep=[hidden]):
        out = run_block(hidden)
        recon_loss(out, hidden).backward()
        hidden = out.detach()

A plain backward already frees the saved activations of every graph node it runs. What it leaves
alive is any part of the graph a reference still reaches and the backward did not consume: a graph
kept with ``retain_graph=True``, a branch of the block that does not feed the loss, a loss tensor
whose graph a caller keeps for later. On exit the block returns the memory of every such activation
at once, so the next block starts from the same memory as this one did.

How: while the block runs, ``torch.autograd.graph.saved_tensors_hooks`` hands each tensor saved for
backward to ``_SavedActivations``, which stores a private ``detach()`` of it (same storage, a
TensorImpl nothing else sees) and keeps only a weak reference. On exit, the storages of the saved
tensors the graph still holds are released (the DataPtr swapped for an empty one, as
``untyped_storage().resize_(0)`` does) under one rule, proven from reference counts:

    a storage is released only if nothing but those private tensors references it.

So nothing referenced outside the autograd graph is ever freed: parameters (a saved weight or
``weight.t()`` shares the parameter's storage), ``.grad``, optimizer state, the block input, the
detached boundary tensor (it shares the output's storage), a view or a ``untyped_storage()`` a user
kept all count as references. ``keep`` is checked as well, as a statement of intent. Memory that is
not the allocator's to resize (``from_blob``, CUDA IPC) and copy-on-write storages are left alone.
Streams: the caching allocator reuses a freed block in order on the stream that allocated it; the
streams current while the block saved tensors and at its exit are recorded on each released storage
(``record_stream``), so a block is not reused before work on those streams that might read it ends.
Nothing is released while a CUDA graph is being captured. A backward through a released activation
later raises a clear error instead of reading freed memory.

The two modes apply this same rule and differ only in who does the work: ``"extension"`` releases
in one C++ call (``lopt_kernels._C.release_saved``, csrc/boundary.cpp), ``"torch"`` does the same
checks and ``resize_(0)`` in Python. ``"auto"`` takes the extension when it is built, else torch.
Only CUDA tensors are tracked; on a CPU-only machine (``device`` not CUDA) the block is a no-op.

Why not an activation arena (a bump allocator over one slab under ``torch.cuda.MemPool``, reset at
each boundary): the caching allocator on top of a MemPool caches and reuses its blocks, and inside a
block scope it also allocates what must outlive the scope: the boundary tensor, parameter gradients
created by the backward, optimizer state created by a step at the boundary. A reset would free
those too, unless every allocation were routed by hand; the reference-count rule needs no routing.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import weakref
from collections.abc import Iterable, Iterator

import torch

from .extension import extension, has_extension

MODES = ("auto", "extension", "torch")


class _Saved:
    """What the autograd graph holds in place of a saved tensor: a private detach of it."""

    __slots__ = ("tensor", "released", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.released = False


def _refcount(saved: _Saved) -> int:
    return sys.getrefcount(saved.tensor)


# References to the private tensor when only its _Saved holds it (calibrated, not assumed: the
# count getrefcount reports differs between Python versions).
_SOLE_REFCOUNT = _refcount(_Saved(torch.empty(0)))


class _SavedActivations:
    """Saved-tensor hooks that keep, weakly, every ``device_type`` tensor saved for backward."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.on_device = operator.attrgetter(f"is_{device_type}")  # cheaper than tensor.device.type
        self.saved: list[weakref.ref] = []
        self.streams: set[tuple[int, int, int]] = set()  # (stream_id, device_index, device_type)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        # Runs once per saved tensor, so it stays cheap. Parameters and tensor subclasses pass through
        # untouched: their storages are never releasable anyway.
        if type(tensor) is not torch.Tensor or not self.on_device(tensor) or tensor.layout is not torch.strided:
            return tensor
        saved = _Saved(tensor.detach())
        self.saved.append(weakref.ref(saved))
        if self.device_type == "cuda":
            # The stream the saving op runs on; its backward runs there too.
            self.streams.add(torch._C._cuda_getCurrentStream(tensor.get_device()))
        return saved

    @staticmethod
    def _unpack(packed):
        if type(packed) is not _Saved:
            return packed
        if packed.released:
            raise RuntimeError(
                "backward reached an activation that was released at the LoPT boundary (the end of a "
                "BoundaryMemory.block); run this backward inside the block"
            )
        return packed.tensor

    def still_saved(self) -> tuple[list[_Saved], list[torch.Tensor]]:
        """The saved tensors a live graph still holds, and that no one else holds in Python."""
        holders, tensors = [], []
        for ref in self.saved:
            saved = ref()
            if saved is not None and not saved.released and _refcount(saved) == _SOLE_REFCOUNT:
                holders.append(saved)
                tensors.append(saved.tensor)
        return holders, tensors


# The address of a tensor's StorageImpl, read without creating a storage object (which would be one
# more reference). Older torch builds without these private helpers release nothing in "torch" mode.
_storage_key = getattr(torch._C, "_storage_address", None)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
_is_cow = getattr(torch._C, "_is_cow_tensor", lambda tensor: False)


def release_saved_torch(
    candidates: list[torch.Tensor], keep: list[torch.Tensor], streams: Iterable[tuple[int, int, int]] = ()
) -> tuple[list[bool], int]:
    """The release in Python: free each candidate storage that only the candidates reference.

    Returns, per candidate, whether its storage was released, and the bytes released. The candidates
    must be distinct tensor objects that no one else holds (``_SavedActivations.still_saved``);
    ``streams`` are ``(stream_id, device_index, device_type)`` of CUDA streams that used them.
    """
    if _storage_key is None or _storage_use_count is None:
        return [False] * len(candidates), 0
    kept = {_storage_key(t) for t in keep}
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(candidates):
        groups.setdefault(_storage_key(t), []).append(i)
    released, released_bytes = [False] * len(candidates), 0
    for key, members in groups.items():
        # Count before touching untyped_storage(): a storage object is one more reference.
        if key in kept or _storage_use_count(key) != len(members):
            continue
        tensor = candidates[members[0]]
        storage = tensor.untyped_storage()
        if not storage.resizable() or storage.nbytes() == 0 or _is_cow(tensor):
            continue
        if tensor.is_cuda:
            for stream_id, device_index, device_type in streams:
                if device_index == tensor.get_device():
                    tensor.record_stream(
                        torch.cuda.Stream(stream_id=stream_id, device_index=device_index, device_type=device_type)
                    )
        released_bytes += storage.nbytes()
        storage.resize_(0)
        for i in members:
            released[i] = True
    return released, released_bytes


def release_saved_extension(
    candidates: list[torch.Tensor], keep: list[torch.Tensor], streams: Iterable[tuple[int, int, int]] = ()
) -> tuple[list[bool], int]:
    """``release_saved_torch`` in one C++ call (csrc/boundary.cpp); needs the built extension."""
    return extension().release_saved(candidates, keep, list(streams))


_RELEASE = {"extension": release_saved_extension, "torch": release_saved_torch}


def resolve_mode(mode: str) -> str:
    """``"extension"`` or ``"torch"``: what ``mode`` means here; raises if the extension is asked for and absent."""
    if mode not in MODES:
        raise ValueError(f"boundary memory mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "extension" if has_extension() else "torch"
    if mode == "extension":
        extension()  # raises, saying how to build it
    return mode


class BoundaryMemory:
    """Releases, at the end of each lower block, every activation the block saved for backward.

    ``mode``: ``"auto" | "extension" | "torch"``; ``self.mode`` is the resolved one. ``device``: where
    the engine runs (default: CUDA when available); on a non-CUDA device ``block()`` does nothing.
    ``released_bytes`` is what the last block released beyond autograd's own freeing (0 when the
    backward consumed the whole graph, the usual case).
    """

    def __init__(self, mode: str = "auto", device: torch.device | str | None = None):
        self.mode = resolve_mode(mode)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device_type = torch.device(device).type
        self.released_bytes = 0

    def block(self, keep: Iterable[torch.Tensor | None] = ()):
        """Context of one lower block: on exit its saved activations are released; ``keep`` never is.

        The block runs where its ``keep`` tensors live (the block input), else on ``device``.
        """
        keep = list(keep)
        device_type = next((t.device.type for t in keep if isinstance(t, torch.Tensor)), self.device_type)
        if device_type != "cuda":
            return contextlib.nullcontext()
        return self._block(keep, "cuda")

    @contextlib.contextmanager
    def _block(self, keep: Iterable[torch.Tensor | None], device_type: str) -> Iterator[None]:
        # The tracking scope for any device type; tests drive it with CPU tensors.
        keep = [t for t in keep if isinstance(t, torch.Tensor) and t.layout == torch.strided]
        tracker = _SavedActivations(device_type)
        self.released_bytes = 0
        with tracker.hooks:
            yield
        if device_type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return
            tracker.streams.add(torch._C._cuda_getCurrentStream(torch.cuda.current_device()))
        holders, candidates = tracker.still_saved()
        if not candidates:
            return
        released, self.released_bytes = _RELEASE[self.mode](candidates, keep, tracker.streams)
        for saved, done in zip(holders, released):
            saved.released = done
