"""``--pipeline``: one LoPT block per rank; each micro-batch's boundary activations go forward, nothing comes back.

``torchrun --nproc-per-node K -m lopt train --pipeline --num-blocks K``: rank r trains block r (rank 0 also the
embeddings; a lower block's auxiliary decoder is its rank's; the last rank also the final norm and the head).
In each optimizer step every rank runs every micro-batch of the step through its own block, in order:

    rank 0:     embed -> block 0 -> reconstruction loss -> backward -> send the boundary to rank 1
    rank r:     receive from rank r-1 -> block r -> reconstruction loss -> backward -> send to rank r+1
    last rank:  receive -> last block -> norm -> head + cross-entropy -> backward

and then clips and steps its own block. A boundary is a stop-gradient, so no gradient ever goes back: block r's
gradients need only its input, block r-1's output under the weights from before the step (the stale boundary),
which is what the one-process interleaved step computes. So the update is the one-process update, for any
``--grad-accum``.

Streaming: each rank posts its sends without waiting for them and posts the next micro-batch's receive before
it computes the current one, so rank r works on micro-batch i while rank r+1 works on i-1. The ranks meet once
per step, to sum the step's losses (every rank checks them), so each step fills and drains the pipeline: with
M micro-batches and K stages a rank is idle (K-1)/(M+K-1) of the step.

Copies (data parallel x pipeline): with D x K ranks there are D pipelines of K stages; rank r is stage r % K of
copy r // K. Copy d runs micro-batches d, d + D, ... of each step, weighted by the whole step's token counts,
and before its clip each rank sums its block's gradients with the same block's ranks in the other copies (one
process group per block), so every copy steps alike. Rank 0 gathers the blocks from the first copy.

Clipping is per block (``--max-grad-norm`` applies to each block's gradients on its own), as
``--early-lower-step`` and ``--schedule sequential`` do in one process: the global norm would need every rank's
gradients before any rank could step. With clipping the run therefore equals one process with ``--schedule
sequential`` (stale boundary, the same per-block clipping); without it, the interleaved one-process run too.
``grad_norm`` in the metrics is the last block's, as in those runs.

Memory: every rank keeps the whole model object (it loads the whole model, or checkpoint, and takes rank 0's
weights at the start), but computes, holds gradients for and steps only its block; the other blocks' optimizer
state is never created (or, after a resume, dropped). Rank 0 alone evaluates and writes, so before a mid-run
evaluation, each checkpoint and the end, every other rank sends it its block's weights (and, for a checkpoint,
its optimizer state).
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
    """This rank's stage of the pipeline, run by ``Trainer.optimizer_step`` (``step``) and its checkpoints."""

    def __init__(self, trainer):
        self.trainer = trainer
        world = trainer.world
        # K stages, D = ranks / K copies of the pipeline: rank r is stage r % K of copy r // K, and trains block
        # r % K; copy d runs micro-batches d, d + D, ... of each step (data parallel across the copies).
        self.stages = trainer.model.num_blocks
        self.copies = world.size // self.stages
        self.rank, self.stage, self.copy = world.rank, world.rank % self.stages, world.rank // self.stages
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        assert self.stages * self.copies == world.size and trainer.block_params is not None  # TrainConfig.validate
        self._same_block = None  # with copies: the ranks that train this rank's block (made at the first step)

    # ----------------------------------------------------------------------------- one optimizer step

    def step(self, batches: list[dict], tokens: list[int], positions: list[int]) -> dict:
        """This rank's block over the step's micro-batches (on the device), its clip and its update; the step's
        losses summed over the ranks. Returns what ``Trainer.optimizer_step`` returns."""
        trainer, world, model = self.trainer, self.trainer.world, self.trainer.model
        cfg, step = trainer.config, trainer.step + 1
        total_tokens, total_positions = sum(tokens), sum(positions)
        optimizer, params = trainer.optimizers[self.stage], trainer.block_params[self.stage]
        for b, other in enumerate(trainer.optimizers):  # a resumed rank read every block's state: it keeps its own
            if b != self.stage:
                other.state.clear()

        mine = range(self.copy, len(batches), self.copies)  # this copy's micro-batches, weighted by the step's totals
        tokens, positions = [tokens[i] for i in mine], [positions[i] for i in mine]
        parts = [model.unpack(batches[i]) for i in mine]  # input ids, attention mask, shifted labels, documents
        receive = self._post_receive(parts, 0, step) if not self.first else None
        sends = deque()
        task_sum = aux_sum = torch.zeros((), device=trainer.device)
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

        # Block by block, as the one-process per-block steps do: the copies' sum, this block's norm, clip and update.
        if self.copies > 1:
            world.sum_grads(params, f"summing block {self.stage}'s gradients over the copies at step {step}",
                            group=self._copies_of_this_block())
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).float()
        else:
            grad_norm = torch.zeros((), device=trainer.device)
        grads_finite = grad_norm.isfinite()
        if grads_finite:  # a non-finite one stops the run below; its update would only spoil the weights
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The ranks' one meeting in the step: the whole model's losses, the last block's norm, what went wrong.
        upper_norm = grad_norm if self.last else torch.zeros_like(grad_norm)
        own = torch.stack([task_sum, aux_sum / (self.stages - 1), upper_norm, 1 - grads_finite.float(),
                           1 - trainer._all_finite()])
        summed = world.sum(own, f"summing the losses of step {step}")
        task, aux, norm, bad_grads, bad_updates = summed.tolist()
        return trainer.end_step(task, aux, norm / self.copies,  # each copy's last stage gave the same norm
                                grads_finite=bad_grads == 0, updated_finite=bad_updates == 0,
                                tokens=total_positions, label_tokens=total_tokens)

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
        model = self.trainer.model.model
        buffer = torch.empty((*input_ids.shape, model.config.hidden_size), device=input_ids.device,
                             dtype=model.model.embed_tokens.weight.dtype)
        what = f"receiving micro-batch {i + 1}'s boundary from rank {self.rank - 1} at step {step}"
        return self.trainer.world.irecv(buffer, self.rank - 1, i, what)

    # ----------------------------------------------------------------------------- rank 0's whole model

    def gather_weights(self):
        """Each block's weights, from the first copy's ranks (0 .. K-1), into rank 0's model (its copies of the
        other blocks have not moved since the start): before rank 0 evaluates or writes. Every rank calls it at
        the same point."""
        trainer, world = self.trainer, self.trainer.world
        what = f"gathering the blocks' weights on rank 0 after step {trainer.step}"
        with torch.no_grad():
            for b in range(1, self.stages):
                if self.rank == 0:
                    for p in trainer.block_params[b]:
                        world.recv(p.detach(), b, what)
                elif self.rank == b:
                    for p in trainer.block_params[b]:
                        world.send(p.detach(), 0, what)

    def gather_state(self) -> list[dict] | None:
        """For a checkpoint: each rank's block weights into rank 0's model, and every block's optimizer state dict
        (in block order) on rank 0; None elsewhere. Every rank calls it at the same point."""
        self.gather_weights()
        own = self.trainer.optimizers[self.stage].state_dict()
        if self.rank != 0:  # a pickled GPU tensor would come back on this rank's GPU, in rank 0's process
            own = _on_cpu(own)
        gathered = self.trainer.world.gather_object(own, f"gathering the blocks' optimizer state on rank 0 after "
                                                         f"step {self.trainer.step}")
        return gathered[: self.stages] if gathered is not None else None  # the first copy's (all copies agree)


def _on_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj
