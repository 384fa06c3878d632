"""Paging one block at a time: optimizer state, and for the largest models the weights, live on the host.

Under the sequential schedule (``LoPTModel.sequential_step``) block b runs every micro-batch of the
optimizer step and is stepped before block b+1 starts, so only block b needs gradients and optimizer state
on the device; the rest can wait in (pinned) host memory. ``BlockOffload`` does the paging: a forward
pre-hook on each block's entry modules calls ``before_block(b)`` when block b starts, and the caller steps
each block with ``step_block(b)``. Modes (``lopt.settings.OFFLOAD``): ``"none"`` moves nothing,
``"optimizer"`` keeps every block's optimizer state on the host, ``"params"`` the weights too; with
``stream_state`` a block's state streams through its step one parameter at a time.

The numbers do not change: a paged tensor is copied whole and the optimizer steps the same tensors in the
same order (tested bitwise against the unpaged sequential schedule). How to drive it from Python, and
checkpoints: docs/plan.md; the order of the transfers and what is on the device when: ``BlockOffload``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn

from lopt.settings import refuse



class BlockOffload:
    """Optimizer state (``"optimizer"``) or weights and optimizer state (``"params"``) of the blocks that
    are not running, kept on the host; ``"none"`` only steps blocks.

    The transfers go on one copy stream beside the compute stream on CUDA (on the CPU: the same order,
    synchronous); ``before_block`` and ``step_block`` give their order within block b. What is on the
    device during block b: ``none``: all weights and state, block b's gradients; ``optimizer``: all weights,
    block b's state (``stream_state``: one parameter's, during the step) and gradients; ``params``: block b's
    weights, state (likewise) and gradients, plus block b+1's weights from block b's step until block b+1
    starts (block b's are dropped then, not at its step: a fresh boundary recomputes block b after its
    step). The last block's weights stay on the device between steps, until the next step's block 0
    starts. Host<->device bytes per step: the state of every block up and down (``optimizer``), plus every
    block's weights up and down (``params``). With ``stream_state`` a block's state is not uploaded when the
    block starts: the device holds one parameter's state instead of the block's, and the transfers are not
    hidden behind compute.

    Only parameters an optimizer holds are paged (frozen ones stay); 0-dim state (torch's ``step``
    counters) stays where the optimizer keeps it. Under ``params``, code that finds the device from
    ``next(model.parameters())`` sees the host for blocks that are not running: pass the device.

    Args:
        model: the ``LoPTModel`` (its blocks' entry modules get the hooks).
        optimizers: one per block, as ``model.block_param_groups`` splits the parameters.
        mode: one of ``lopt.settings.OFFLOAD``.
        device: where blocks run (default: where the parameters are now).
        stream_state: the state streams through each block's step one parameter at a time.
    """

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], mode: str = "optimizer",
                 device: torch.device | str | None = None, *, stream_state: bool = False):
        refuse(dict(offload=mode, stream_state=stream_state))  # lopt.settings: OFFLOAD and its rules
        if len(optimizers) != model.num_blocks:
            raise ValueError(f"one optimizer per block: {model.num_blocks} blocks, {len(optimizers)} optimizers")
        self.mode = mode
        self.stream_state = stream_state
        self.optimizers = list(optimizers)
        self.blocks = [[p for group in opt.param_groups for p in group["params"]] for opt in self.optimizers]
        first = next(p for params in self.blocks for p in params)
        self.device = torch.device(device) if device is not None else first.device
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and mode != "none" else None
        self.bytes_to_device = 0  # host -> device, since construction
        self.bytes_to_host = 0  # device -> host
        self._host_state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self._host_weights: dict[nn.Parameter, torch.Tensor] = {}
        self._state_block: int | None = None  # whose state is on the device
        self._state_ready = None  # CUDA event: its upload is done
        self._state_uploaded: list[torch.Tensor] = []
        self._resident: int | None = None  # params: whose weights the parameters point at on the device
        self._prefetched: tuple[int, list[torch.Tensor], object] | None = None  # params: (block, weights, event)
        self._hooks = []
        if mode == "none":
            return
        if mode == "params":
            for params in self.blocks:
                for p in params:
                    host = self._host_buffer(p.data)
                    host.copy_(p.data)
                    self._host_weights[p] = host
                    p.data = host
        self.page_out()
        for b, modules in enumerate(_entry_modules(model)):
            for module in modules:
                self._hooks.append(module.register_forward_pre_hook(self._hook(b)))

    # ------------------------------------------------------------------ what the schedule calls

    def before_block(self, b: int, *, state: bool = True) -> None:
        """Make block b ready to run: its weights on the device (``params``) and, with ``state``, its
        optimizer state on its way there. Idempotent; the hooks call it when block b starts.

        ``params``: the weights of the block that ran before are dropped from the device (their host copy
        was written at that block's step); block b's are uploaded unless the previous step already
        prefetched them, and the compute stream waits for them. Block b's state is uploaded on the copy
        stream, overlapping block b's forward and backward (the hooks pass ``state`` only with grad
        enabled: an evaluation pass moves weights only)."""
        if self.mode == "none":
            return
        if self.mode == "params" and self._resident != b:
            self._drop_weights()
            if self._prefetched is not None and self._prefetched[0] == b:
                _, uploaded, event = self._prefetched
            else:  # nothing prefetched, or another block's (freed with the reference)
                uploaded, event = self._upload_weights(b)
            self._prefetched = None
            self._wait(event, uploaded)
            for p, weight in zip(self.blocks[b], uploaded):
                p.data = weight
            self._resident = b
        if state and self._state_block != b and not self.stream_state:
            self._upload_state(b)

    def step_block(self, b: int, max_grad_norm: float | None = None):
        """Clip (when ``max_grad_norm`` is given), step and free the gradients of block b, then send its state
        (and, ``params``, its weights) back to the host. Returns the gradient norm before clipping, or None.

        The compute stream first waits for the state (``stream_state``: the step goes parameter by
        parameter, each one's state uploaded, stepped and written back before the next one's). ``params``:
        block b+1's weights are uploaded at once (they do not wait for the step, which they overlap), then,
        after the step, block b's weights and state are written back to the host and the state's device
        copies are dropped."""
        params = self.blocks[b]
        if self.mode == "params" and self._resident != b:
            raise RuntimeError(f"block {b}'s weights are not on the device: it has not run")
        if self.mode != "none" and not self.stream_state:
            if self._state_block != b:
                self._upload_state(b)
            self._wait(self._state_ready, self._state_uploaded)
        norm = None
        if max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        if self.stream_state:
            self._streamed_step(b)
        else:
            self.optimizers[b].step()
        self.optimizers[b].zero_grad(set_to_none=True)
        if self.mode == "params" and b + 1 < len(self.blocks):
            uploaded, event = self._upload_weights(b + 1)  # overlaps this block's step
            self._prefetched = (b + 1, uploaded, event)
        if self.mode == "params":
            with self._after_compute():
                for p in params:
                    self._to_host(self._host_weights[p], p.data)
        if self.mode != "none" and not self.stream_state:
            self._page_out_state(b)
        return norm

    # ------------------------------------------------------------------ checkpoints, inspection, teardown

    def page_out(self) -> None:
        """Every block's optimizer state onto its host buffers, wherever it is now; ``params``: the running
        block's weights written back too (they stay on the device). Call it after ``load_state_dict`` (or
        ``lopt.training.checkpoint.load_optimizer_state``, or ``model.load_state_dict``), which leave what they
        load wherever they put it. Between steps every block's state is on the host, and
        ``optimizer.state_dict()`` reads those tensors (after ``synchronize()``; ``state_dicts`` does both)."""
        if self.mode == "none":
            return
        if self.mode == "params" and self._resident is not None:
            with self._after_compute():
                for p in self.blocks[self._resident]:
                    self._to_host(self._host_weights[p], p.data)
        for b in range(len(self.blocks)):
            self._page_out_state(b)
        self.synchronize()

    def synchronize(self) -> None:
        """Wait for the copies in flight (before the host reads a paged tensor)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def state_dicts(self) -> list[dict]:
        """Each optimizer's ``state_dict()``, its paged tensors read from the host."""
        self.synchronize()
        return [opt.state_dict() for opt in self.optimizers]

    def host_tensors(self) -> list[torch.Tensor]:
        """The host buffers: every paged state tensor, and (``params``) every block's weights."""
        state = [t for per_param in self._host_state.values() for t in per_param.values()]
        return state + list(self._host_weights.values())

    def close(self) -> None:
        """Everything back on the device (weights and state), the hooks removed: a plain model again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.mode == "none":
            return
        self.page_out()
        self._prefetched = None
        for b, params in enumerate(self.blocks):
            for p in params:
                if self.mode == "params" and b != self._resident:
                    p.data = self._host_weights[p].to(self.device, copy=True)
                state = self.optimizers[b].state.get(p, {})
                for key, value in state.items():
                    if _paged(value):
                        state[key] = value.to(self.device, copy=True)
        self._host_state.clear()
        self._host_weights.clear()
        self._resident = self._state_block = None

    # ------------------------------------------------------------------ the transfers

    def _hook(self, b: int):
        def hook(module, args):
            self.before_block(b, state=torch.is_grad_enabled())

        return hook

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, device="cpu", pin_memory=self.cuda)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        device_copy = torch.empty_like(host, device=self.device)
        device_copy.copy_(host, non_blocking=self.cuda)
        self.bytes_to_device += host.numel() * host.element_size()
        return device_copy

    def _to_host(self, host: torch.Tensor, value: torch.Tensor) -> None:
        """Copy ``value`` into its host buffer (inside ``_after_compute``, on the copy stream)."""
        if value.data_ptr() == host.data_ptr():
            return
        host.copy_(value, non_blocking=self.cuda)
        self.bytes_to_host += host.numel() * host.element_size()
        if self.cuda and value.is_cuda:
            value.record_stream(self.copy_stream)  # its memory is not reused before the copy has read it

    @contextlib.contextmanager
    def _on_copy_stream(self):
        if self.copy_stream is None:
            yield None
            return
        with torch.cuda.stream(self.copy_stream):
            yield self.copy_stream

    @contextlib.contextmanager
    def _after_compute(self):
        """The copy stream, after the work the compute stream has been given so far (a step's result)."""
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_copy_stream():
            yield

    def _record(self):
        if self.copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def _wait(self, event, uploaded: list[torch.Tensor]) -> None:
        """The compute stream waits for an upload and marks its tensors as used there."""
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in uploaded:
            t.record_stream(compute)

    def _upload_weights(self, b: int):
        with self._on_copy_stream():
            uploaded = [self._upload(self._host_weights[p]) for p in self.blocks[b]]
            return uploaded, self._record()

    def _drop_weights(self) -> None:
        """The resident block's parameters point at their host copies again (written at its step)."""
        if self._resident is None:
            return
        for p in self.blocks[self._resident]:
            p.data = self._host_weights[p]
        self._resident = None

    def _upload_state(self, b: int, params: Sequence[nn.Parameter] | None = None) -> None:
        if self._state_block is not None:
            self._page_out_state(self._state_block)
        optimizer, uploaded = self.optimizers[b], []
        with self._on_copy_stream():
            for p in self.blocks[b] if params is None else params:
                for key, host in self._host_state.get(p, {}).items():
                    optimizer.state[p][key] = device_copy = self._upload(host)
                    uploaded.append(device_copy)
            self._state_ready = self._record()
        self._state_block, self._state_uploaded = b, uploaded

    def _streamed_step(self, b: int) -> None:
        """Block b's optimizer step one parameter at a time, in the optimizer's order (each parameter's update
        is its own, so the numbers are the whole step's), its state on the device only for its update."""
        optimizer = self.optimizers[b]
        groups = [group["params"] for group in optimizer.param_groups]
        try:
            for g, members in enumerate(groups):
                for p in members:
                    if p.grad is None:
                        continue
                    self._upload_state(b, [p])
                    self._wait(self._state_ready, self._state_uploaded)
                    for i, group in enumerate(optimizer.param_groups):
                        group["params"] = [p] if i == g else []
                    optimizer.step()
                    self._page_out_state(b, [p])
        finally:
            for group, members in zip(optimizer.param_groups, groups):
                group["params"] = members

    def _page_out_state(self, b: int, params: Sequence[nn.Parameter] | None = None) -> None:
        """Block b's state into its host buffers (made on first sight: state is created by the first step)."""
        optimizer = self.optimizers[b]
        with self._after_compute():
            for p in self.blocks[b] if params is None else params:
                state = optimizer.state.get(p)
                if not state:
                    continue
                buffers = self._host_state.setdefault(p, {})
                for key, value in list(state.items()):
                    if not _paged(value):
                        continue
                    host = buffers.get(key)
                    if host is None or host.shape != value.shape or host.dtype != value.dtype:
                        host = buffers[key] = self._host_buffer(value)
                    self._to_host(host, value)
                    state[key] = host
        if self._state_block == b:
            self._state_block, self._state_ready, self._state_uploaded = None, None, []


def _paged(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _entry_modules(model) -> list[list[nn.Module]]:
    """Per block, the modules whose forward starts it (or needs its weights outside its layers)."""
    decoder = model.model.model
    entries = [[decoder.layers[start]] for start, _ in model.block_ranges]
    entries[0].insert(0, decoder.embed_tokens)
    entries[-1] += [decoder.norm, model.model.lm_head]
    return entries
