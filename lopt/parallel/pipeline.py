"""``--pipeline``: one LoPT block per rank; each micro-batch's boundary activations go forward, nothing comes back.

``torchrun --nproc-per-node K -m lopt train --pipeline --num-blocks K``: rank r trains block r (rank 0 also the
embeddings, the last rank also the final norm and the head). In each optimizer step every rank runs every
micro-batch of the step through its own block, in order, sending each boundary on to the next rank without
waiting; then it clips and steps its own block. A boundary is a stop-gradient, so block r's gradients need
only block r-1's output under the weights from before the step: the one-process stale-boundary step's.
With D x K ranks there are D copies of the pipeline, sharing each step's micro-batches and summing each
block's gradients over the copies. Clipping is per block, as ``--schedule sequential`` does in one process.

``Pipeline`` receives the model, the world and the optimizers and returns values: ``step`` this rank's share
of the step's figures (the step kind, ``lopt.training.steps.PipelineStage``, sums them), ``gather_weights`` and
``gather_state`` rank 0's whole model and optimizer state. What it computes, the streaming, the copies and
the memory are in docs/distributed.md (``--pipeline``).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

# The engine's weight of a micro-batch (part / total), the one train_step uses: the gradients must match it.
from lopt.engine.model import IGNORE_INDEX, share

# Sends a rank may have in flight: each holds its boundary tensor until the next rank has it. Two let a rank
# run a micro-batch ahead of the next without its memory growing with --grad-accum.
SENDS_IN_FLIGHT = 2


class Pipeline:
    """This rank's stage of the pipeline: its block's share of each step, and the gathers to rank 0.

    ``optimizers``: the run's per-block optimizers (``lopt.training.optim.BlockOptimizers``); this rank steps
    its own block's. ``max_grad_norm``: each block's clip (0: none)."""

    def __init__(self, model, world, optimizers, max_grad_norm: float, device: torch.device):
        self.model, self.world, self.optimizers = model, world, optimizers
        self.max_grad_norm, self.device = max_grad_norm, device
        # K stages, D = ranks / K copies of the pipeline: rank r is stage r % K of copy r // K, and trains block
        # r % K; copy d runs micro-batches d, d + D, ... of each step (data parallel across the copies).
        self.stages = model.num_blocks
        self.copies = world.size // self.stages
        self.rank, self.stage, self.copy = world.rank, world.rank % self.stages, world.rank // self.stages
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        assert self.stages * self.copies == world.size and len(optimizers) == self.stages  # TrainConfig.validate
        self._same_block = None  # with copies: the ranks that train this rank's block (made at the first step)

    # ----------------------------------------------------------------------------- one optimizer step

    def step(self, batches: list[dict], tokens: list[int], positions: list[int], step: int) -> torch.Tensor:
        """This rank's block over the step's micro-batches (on the device), its clip and its update (step number
        ``step``). Returns this rank's share of the step's figures, a device vector: the task loss, the aux loss,
        the last block's gradient norm and whether this block's gradients were not finite (1.0). Summed over
        the ranks they are the whole step's (the norm once per copy)."""
        task_sum, aux_sum = self._forward_backward(batches, tokens, positions, step)
        grad_norm = self._update(step)
        upper_norm = grad_norm if self.last else torch.zeros_like(grad_norm)
        return torch.stack([task_sum, aux_sum / (self.stages - 1), upper_norm, 1 - grad_norm.isfinite().float()])

    def _forward_backward(self, batches, tokens, positions, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This copy's micro-batches through this rank's block, streamed: the next micro-batch's receive is
        posted before the current one computes, and up to ``SENDS_IN_FLIGHT`` sends wait at once. Returns the
        task loss (last stage) and aux loss (the others) of this rank's share, weighted by the step's totals."""
        model, world = self.model, self.world
        total_tokens, total_positions = sum(tokens), sum(positions)
        mine = range(self.copy, len(batches), self.copies)  # this copy's micro-batches, weighted by the step's totals
        tokens, positions = [tokens[i] for i in mine], [positions[i] for i in mine]
        parts = [model.unpack(batches[i]) for i in mine]  # input ids, attention mask, shifted labels, documents
        receive = self._post_receive(parts, 0, step) if not self.first else None
        sends = deque()
        task_sum = aux_sum = torch.zeros((), device=self.device)
        for i, (input_ids, attention_mask, labels, document_ids) in enumerate(parts):
            layer_inputs = model.layer_inputs(input_ids.shape, input_ids.device, attention_mask, document_ids)
            if self.first:
                hidden = model.model.model.embed_tokens(input_ids)
            else:
                hidden = receive()
                receive = self._post_receive(parts, i + 1, step) if i + 1 < len(parts) else None
            if self.last:  # the task loss, weighted by the micro-batch's share of the step's label tokens
                block_output = model.run_block(self.stage, hidden, layer_inputs)
                task = model.task_loss(model.model.model.norm(block_output), labels)
                if task.requires_grad:
                    (task * share((labels != IGNORE_INDEX).sum(), total_tokens)).backward()
                if tokens[i]:  # a micro-batch without labels has no task loss
                    task_sum = task_sum + task.detach().float() * (tokens[i] / total_tokens)
                continue
            mask = attention_mask.bool() if attention_mask is not None else None
            count = mask.sum() if mask is not None else torch.tensor(input_ids.numel(), device=input_ids.device)
            output, aux = model.local_step(self.stage, hidden, layer_inputs, mask, share(count, total_positions))
            aux_sum = aux_sum + aux.float() * (positions[i] / total_positions)
            if len(sends) == SENDS_IN_FLIGHT:
                sends.popleft()()
            what = f"sending micro-batch {i + 1}'s boundary to rank {self.rank + 1} at step {step}"
            sends.append(world.isend(output.contiguous(), self.rank + 1, i, what))
            del hidden, output
        for wait in sends:
            wait()
        return task_sum, aux_sum

    def _update(self, step: int) -> torch.Tensor:
        """Block by block, as the one-process per-block steps do: the copies' sum, this block's norm, clip and
        update (skipped when the norm is not finite: the run stops, and the update would only spoil the
        weights). Returns the norm before the clip (zero without clipping)."""
        optimizer, params = self.optimizers.all[self.stage], self.optimizers.block_params(self.stage)
        if self.copies > 1:
            self.world.sum_grads(params, f"summing block {self.stage}'s gradients over the copies at step {step}",
                                 group=self._copies_of_this_block())
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm).float()
        else:
            grad_norm = torch.zeros((), device=self.device)
        if grad_norm.isfinite():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _copies_of_this_block(self):
        """The process group of the ranks that train this rank's block, one per copy. Every rank makes every
        group, in the same order (``new_group``'s rule), at the first step, when all of them are here."""
        if self._same_block is None:
            groups = [dist.new_group([s + d * self.stages for d in range(self.copies)]) for s in range(self.stages)]
            self._same_block = groups[self.stage]
        return self._same_block

    def _post_receive(self, parts, i: int, step: int):
        """Post the receive of micro-batch ``i``'s boundary from the previous rank; returns its wait."""
        input_ids = parts[i][0]
        hf_model = self.model.model
        buffer = torch.empty((*input_ids.shape, hf_model.config.hidden_size), device=input_ids.device,
                             dtype=hf_model.model.embed_tokens.weight.dtype)
        what = f"receiving micro-batch {i + 1}'s boundary from rank {self.rank - 1} at step {step}"
        return self.world.irecv(buffer, self.rank - 1, i, what)

    # ----------------------------------------------------------------------------- rank 0's whole model

    def gather_weights(self, step: int):
        """Each block's weights, from the first copy's ranks (0 .. K-1), into rank 0's model (its copies of the
        other blocks have not moved since the start): before rank 0 evaluates or writes, after step ``step``.
        Every rank calls it at the same point."""
        what = f"gathering the blocks' weights on rank 0 after step {step}"
        with torch.no_grad():
            for b in range(1, self.stages):
                if self.rank == 0:
                    for p in self.optimizers.block_params(b):
                        self.world.recv(p.detach(), b, what)
                elif self.rank == b:
                    for p in self.optimizers.block_params(b):
                        self.world.send(p.detach(), 0, what)

    def gather_state(self, step: int) -> list[dict] | None:
        """For a checkpoint: each rank's block weights into rank 0's model, and every block's optimizer state dict
        (in block order) on rank 0; None elsewhere. Every rank calls it at the same point."""
        self.gather_weights(step)
        own = self.optimizers.all[self.stage].state_dict()
        if self.rank != 0:  # a pickled GPU tensor would come back on this rank's GPU, in rank 0's process
            own = _on_cpu(own)
        gathered = self.world.gather_object(own, f"gathering the blocks' optimizer state on rank 0 after step {step}")
        return gathered[: self.stages] if gathered is not None else None  # the first copy's (all copies agree)


def _on_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj
