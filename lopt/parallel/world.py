"""Data parallel over the processes ``torchrun`` starts: the ranks, their process group, the few collectives
(and the point-to-point sends of ``lopt.parallel.pipeline``).

Every rank builds the same model, data and step schedule; in each optimizer step rank r of N runs
micro-batches r, r+N, r+2N, ... of the step, and the ranks sum their gradients before the update, so all
ranks apply the same update to the same weights. Outside torchrun the ``World`` is one process and every
collective here returns at once.

Why not DDP: DDP sums gradients from hooks that fire during one backward per forward, and needs
``no_sync`` to accumulate. A LoPT step runs one backward per block and micro-batch, each over its own
parameters, and ``--early-lower-step`` steps a lower block's optimizer at its boundary, in the middle of
the step. Summing the finished ``.grad`` tensors explicitly (``sum_grads``: at the end of the step, or for
one block at its boundary) is exact, needs no hooks and no unused-parameter search, and costs one
all-reduce per bucket, as DDP's does. Failures: ``PeerLost``; usage: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from lopt.config import GRAD_BUCKET_BYTES as BUCKET_BYTES
from lopt.config import launch_env
from lopt.errors import UsageError
from lopt.parallel.sharding import is_sharded

# Gradients are summed in flat buckets of up to BUCKET_BYTES (one tensor may be more): few collectives.
# ``sum_grads`` sums one bucket at a time, so it holds one bucket's copy; ``start_sum_grads`` starts them all.


class PeerLost(UsageError):
    """A collective failed: another rank exited, or did not answer within ``--dist-timeout``.

    ``init_process_group`` gets a ``timeout`` (``--dist-timeout``), so no collective waits forever for a rank
    that hangs. A rank that exits closes its connections, and a gloo collective waiting on it fails at once;
    torchrun also stops the other ranks when one exits. Either way the failed collective raises this: one
    line that names this rank and says a peer is gone; the trainer adds the last complete checkpoint (rank 0
    writes each one whole, so whichever rank dies, the last one written is complete)."""

    silent = False  # every rank that sees it says so: which one is left to report it cannot be known


class ReportedByPeer(UsageError):
    """Another rank failed and reports why (``World.together``); this one stops without a message."""

    silent = True


class World:
    """This process's place among the ranks: ``rank`` of ``size``, on its node ``local_rank``."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.timeout_s: float | None = None
        self._owns_group = False

    @classmethod
    def from_env(cls) -> World:
        """The ranks ``torchrun --nproc-per-node N`` started, from the RANK, WORLD_SIZE and LOCAL_RANK it sets
        (``lopt.config.launch_env``); outside torchrun, one process."""
        rank, size, local_rank = launch_env()
        return cls(rank, size, local_rank) if size > 1 else cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes files."""
        return self.rank == 0

    # ----------------------------------------------------------------------------- the process group

    def connect(self, device: torch.device, timeout_s: float):
        """Join the other ranks (torchrun's rendezvous, ``env://``): nccl on CUDA, gloo on the CPU. A group
        that the caller set up already (``lopt.train`` inside one's own launcher) is used as it is."""
        if self.size == 1:
            return
        self.timeout_s = timeout_s
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist.is_initialized():
            return
        backend, bound = ("nccl", {"device_id": device}) if device.type == "cuda" else ("gloo", {})
        self._collective("joining the other ranks", dist.init_process_group, backend,
                         timeout=datetime.timedelta(seconds=timeout_s), **bound)
        self._owns_group = True

    def close(self, *, wait: bool = True):
        """Leave the group. ``wait``: after a barrier, so that no rank leaves while another still sums with it
        (skipped on the way out of an error, when a peer may be gone)."""
        if not self._owns_group:
            return
        self._owns_group = False
        try:
            if wait:
                self._collective("the ranks' last barrier", dist.barrier)
        finally:
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------- collectives

    def sum_grads(self, params: Iterable[torch.nn.Parameter], what: str, group=None):
        """Sum ``p.grad`` over the ranks, in place, for every trainable ``p``.

        A rank that ran no micro-batch (or none that reached ``p``) adds zeros. Rank 0 always runs the
        step's first micro-batch, which reaches every trainable parameter, so afterwards each has a
        gradient on every rank, as it has in one process. Sharded parameters (``--shard``) are skipped: their
        backward has summed their gradients already (``lopt.parallel.sharding``). One bucket at a time: the extra memory
        is one bucket's copy. ``group``: over those ranks only (``lopt.parallel.pipeline``'s copies of a block)."""
        if self.size == 1:
            return
        for bucket in _buckets(self._grads_to_sum(params)):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self._collective(what, dist.all_reduce, flat, group=group)
            _unflatten(flat, bucket)

    def start_sum_grads(self, params: Iterable[torch.nn.Parameter], what: str) -> Callable[[], None]:
        """``sum_grads`` started in the background: returns the wait that finishes it (the gradients are
        summed only after it). Nothing may change the gradients until then. Every rank starts the same sums in
        the same order, so the buckets pair up. Until the wait, a copy of all these gradients is in flight."""
        if self.size == 1:
            return lambda: None
        started = []
        for bucket in _buckets(self._grads_to_sum(params)):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            started.append((bucket, flat, self._collective(what, dist.all_reduce, flat, async_op=True)))

        def wait():
            while started:  # each copy is freed as soon as it is back
                bucket, flat, work = started.pop(0)
                _unflatten(self._wait(work, what, flat), bucket)

        return wait

    def _grads_to_sum(self, params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
        grads = []
        for p in params:
            if not p.requires_grad or is_sharded(p):
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        return grads

    def sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place)."""
        if self.size > 1:
            self._collective(what, dist.all_reduce, tensor)
        return tensor

    def any(self, flag: bool, device: torch.device, what: str) -> bool:
        """Whether ``flag`` is true on any rank."""
        if self.size == 1:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=device), what).item())

    def broadcast_parameters(self, module: torch.nn.Module):
        """Rank 0's parameters and buffers on every rank, as DDP does at the start: the ranks begin identical."""
        if self.size == 1:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                self._collective("sending rank 0's weights", dist.broadcast, tensor, 0)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (picklable) on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective("sending rank 0's choice", dist.broadcast_object_list, box, 0)
        return box[0]

    def gather_object(self, obj, what: str) -> list | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        if self.size == 1:
            return [obj]
        box = [None] * self.size if self.is_main else None
        self._collective(what, dist.gather_object, obj, box, dst=0)
        return box

    # ----------------------------------------------------------------------------- point to point (lopt.parallel.pipeline)

    def send(self, tensor: torch.Tensor, dst: int, what: str):
        self._collective(what, dist.send, tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int, what: str):
        self._collective(what, dist.recv, tensor, src)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, what: str) -> Callable[[], torch.Tensor]:
        """Start sending ``tensor`` to rank ``dst``; returns the wait for it. ``tensor`` must not change until then."""
        work = self._collective(what, dist.isend, tensor, dst, tag=tag)
        return lambda: self._wait(work, what, tensor)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int, what: str) -> Callable[[], torch.Tensor]:
        """Start receiving into ``tensor`` from rank ``src``; returns the wait, which returns ``tensor``."""
        work = self._collective(what, dist.irecv, tensor, src, tag=tag)
        return lambda: self._wait(work, what, tensor)

    def _wait(self, work, what: str, tensor: torch.Tensor) -> torch.Tensor:
        # An explicit bound: a peer that hangs without closing its connection fails the wait, as in a collective.
        self._collective(what, work.wait, datetime.timedelta(seconds=self.timeout_s))
        return tensor

    @contextlib.contextmanager
    def together(self, what: str):
        """Run the block on every rank, then agree on whether it worked.

        When a rank raised, the lowest such rank raises its error again (a ``UsageError`` named by its rank
        unless it is rank 0) and every other rank raises ``ReportedByPeer``: one message, not one per rank,
        and no rank goes on to wait for a peer that has stopped. No collective may run inside the block
        (a rank that raised would skip it and the ranks would pair the wrong collectives)."""
        if self.size == 1:
            yield
            return
        error = None
        try:
            yield
        except Exception as raised:
            error = raised
        failed = [False] * self.size
        self._collective(what, dist.all_gather_object, failed, error is not None)
        first = next((r for r, f in enumerate(failed) if f), None)
        if first is None:
            return
        if self.rank != first:
            raise ReportedByPeer(f"rank {first} failed while {what}") from error
        if isinstance(error, UsageError) and self.rank != 0:
            raise UsageError(f"rank {self.rank}: {error}") from None
        raise error

    def _collective(self, what: str, op: Callable, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except RuntimeError as error:  # gloo's and nccl's errors (DistError and its kind are RuntimeErrors)
            raise self._peer_lost(what, error) from None

    @contextlib.contextmanager
    def guard(self, what: str):
        """Collectives that others start (FSDP's, in the forward and backward of a sharded model): a transport
        failure among them becomes ``PeerLost``, as in ``_collective``; any other error stays what it is."""
        try:
            yield
        except RuntimeError as error:
            if self.size == 1 or not (isinstance(error, dist.DistError) or _TRANSPORT_FAILURE.search(str(error))):
                raise
            raise self._peer_lost(what, error) from None

    def _peer_lost(self, what: str, error: RuntimeError) -> PeerLost:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        # gloo's first line: "[.../pair.cc:534] Read error ...: Connection reset by peer. This is typically ..."
        detail = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0]
        return PeerLost(f"rank {self.rank}: {what} failed: another rank exited or did not answer within "
                        f"--dist-timeout {self.timeout_s:g}s ({detail})")


# What gloo and nccl say when a peer is gone or silent (their errors are not always DistErrors).
_TRANSPORT_FAILURE = re.compile(r"Connection (reset|closed)|Broken pipe|gloo/transport|pair\.cc|NCCL error|"
                                r"[Tt]imed out|Timeout waiting")


def _unflatten(flat: torch.Tensor, bucket: list[torch.Tensor]):
    for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
        g.copy_(summed.view_as(g))


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` in runs of one dtype and device of up to ``BUCKET_BYTES`` each (one tensor may be more)."""
    buckets, current, size, key = [], [], 0, None
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and ((t.dtype, t.device) != key or size + nbytes > BUCKET_BYTES):
            buckets.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
        key = (t.dtype, t.device)
    if current:
        buckets.append(current)
    return buckets
