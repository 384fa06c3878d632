"""The step kinds: how one optimizer step's micro-batches become gradients, updates and the step's figures.

The kind is chosen once, at setup (``choose_step``): ``Interleaved`` (each micro-batch through every block,
one optimizer), ``PerBlockInterleaved`` (the same, each lower block stepped at its boundary), ``Sequential``
(every micro-batch through one block before the next) or ``PipelineStage`` (``--pipeline``: this rank's block).
Each has ``run(batch, step) -> StepResult``: the step's losses, gradient norm and finite flags, summed over
the ranks, for the Trainer to judge (``Trainer.end_step``). Where the state lives is the placement's
(``lopt.parallel.placement``): a kind clips, steps and gathers the finite check's tensors through it.
A new kind (``--method zo``) is a new class with ``run`` here and one line in ``choose_step``.
"""

from __future__ import annotations

import dataclasses

import torch

from lopt.config import TrainConfig
from lopt.data.classification import collate_classification
from lopt.data.sft import collate
from lopt.training.health import all_finite


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch on ``device``. An all-ones attention mask is dropped here, on the host: the engine
    then takes SDPA's causal path without reading the mask back from the GPU (a sync per step)."""
    if "attention_mask" in batch and bool(batch["attention_mask"].all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Collator:
    """A micro-batch's examples as one padded (``pack_to``: packed) batch on the device."""

    pad_id: int
    pack_to: int | None
    device: torch.device

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        return to_device(collate(examples, self.pad_id, self.pack_to), self.device)


@dataclasses.dataclass(frozen=True)
class ClassificationCollator:
    """``--method zo`` on classification data: a micro-batch's examples as the ZO engine's scoring batch
    (``lopt.data.classification.collate_classification``) on the device."""

    pad_id: int
    device: torch.device

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        batch = collate_classification(examples, self.pad_id)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One optimizer step's micro-batches (lists of examples), with each one's label tokens and positions.

    Every rank counts them from the schedule, without talking: each micro-batch is weighted by its share of
    the whole step's totals, so the ranks' gradients and losses add up to the one-process step's exactly."""

    parts: list[list]
    tokens: list[int]
    positions: list[int]

    @classmethod
    def of(cls, examples: list, micro_batches: list[list[int]]) -> StepBatch:
        parts = [[examples[i] for i in indices] for indices in micro_batches]
        return cls(parts, [sum(e.num_label_tokens for e in part) for part in parts],
                   [sum(len(e.input_ids) for e in part) for part in parts])

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def total_positions(self) -> int:
        return sum(self.positions)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """A step's figures, summed over the ranks (every rank has the same)."""

    task: float  # the task loss, weighted by label tokens
    aux: float  # the reconstruction loss, weighted by positions
    grad_norm: float  # before the clip: the whole model's, or (per-block steps) the upper block's
    grads_finite: bool  # the lower blocks' gradients that were stepped at their boundaries
    updated_finite: bool  # the weights and optimizer state after the update


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What every step kind is built from."""

    model: object  # the LoPTModel
    world: object  # lopt.parallel.world.World
    placement: object  # lopt.parallel.placement.Whole or a subclass
    optimizers: object  # lopt.training.optim.Optimizers
    collate: Collator
    max_grad_norm: float
    boundary: str


class BlockSteps:
    """Per-block steps: ``on_boundary(b)`` for the engine. Under torchrun the ranks first sum lower block b's
    gradients, so every rank steps it alike; then it is clipped and stepped, and its gradients are freed
    before block b+1 runs. A non-finite norm skips the block's step and clears ``finite``."""

    def __init__(self, parts: StepParts, step: int):
        self.parts, self.step = parts, step
        self.finite = True

    def __call__(self, b: int):
        parts = self.parts
        params = parts.optimizers.block_params(b)
        parts.world.sum_grads(params, f"summing block {b}'s gradients at step {self.step}")
        if parts.max_grad_norm > 0:
            norm = parts.placement.clip(params, parts.max_grad_norm)
            if not torch.isfinite(norm):
                self.finite = False
                parts.placement.skip_block(b)
                return
        parts.placement.step_block(b)


class _Local:
    """What the one-process-shaped kinds share: the clip and step of what is left, and the step's one meeting."""

    def __init__(self, parts: StepParts):
        self.parts = parts
        self.device = parts.collate.device

    def finish(self, task_sum, aux_sum, step: int, *, summed=frozenset(), grads_finite: bool = True) -> StepResult:
        """Sum the gradients left to step over the ranks (all but ``summed``, ids of parameters summed already),
        clip and step them (everything, or the upper block), then read the device once: the losses summed over
        the ranks, the norm, and whether the update left every rank's tensors finite."""
        parts = self.parts
        params = parts.optimizers.last_params(parts.model)
        parts.world.sum_grads([p for p in params if id(p) not in summed],  # before the clip: its norm is global
                              f"summing the gradients of step {step}")
        if parts.max_grad_norm > 0:
            grad_norm = parts.placement.clip(params, parts.max_grad_norm).float()
        else:
            grad_norm = torch.zeros((), device=self.device)
        parts.placement.step_block(len(parts.optimizers) - 1)  # the only optimizer, or the upper block's
        not_finite = 1.0 - all_finite(parts.placement.state_tensors())
        losses = parts.world.sum(torch.stack([task_sum, aux_sum, not_finite]), f"summing the losses of step {step}")
        task, aux, not_finite, norm = torch.cat([losses, grad_norm.reshape(1)]).tolist()
        return StepResult(task, aux, norm, grads_finite, not_finite == 0)

    def train_micro_batches(self, batch: StepBatch, mine, on_boundary: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``train_step`` on each of this rank's micro-batches ``mine`` (an index past the step's count is a
        filler, run at weight 0), with ``on_boundary[j]`` for the j-th; returns its weighted task and aux losses."""
        parts, count = self.parts, len(batch.parts)
        task_sum = aux_sum = torch.zeros((), device=self.device)
        for i, hook in zip(mine, on_boundary):
            filler = i >= count
            i %= count
            out = parts.model.train_step(parts.collate(batch.parts[i]), loss_scale=0.0 if filler else 1.0,
                                         total_tokens=batch.total_tokens, total_positions=batch.total_positions,
                                         boundary=parts.boundary, on_boundary=hook)
            if filler:
                continue
            if batch.tokens[i]:  # a micro-batch without labels still trains the lower blocks, but has no task loss
                task_sum = task_sum + out.task_loss.float() * (batch.tokens[i] / batch.total_tokens)
            aux_sum = aux_sum + out.aux_loss.float() * (batch.positions[i] / batch.total_positions)
        return task_sum, aux_sum


class Interleaved(_Local):
    """Each micro-batch through every block in turn (``LoPTModel.train_step``), one optimizer stepped at the end.

    ``overlap`` (data parallel, whole state, several blocks): a lower block's gradients are final once this
    rank's last micro-batch has passed its boundary, so their sum over the ranks starts there and runs while
    the blocks above compute."""

    def __init__(self, parts: StepParts, overlap: bool):
        super().__init__(parts)
        lower = parts.model.block_param_groups(0.0)[:-1] if overlap else []
        self.early_sums = [[p for group in groups for p in group["params"]] for groups in lower]

    def run(self, batch: StepBatch, step: int) -> StepResult:
        world, started = self.parts.world, []  # the waits of the sums started

        def start_sum(b: int):
            started.append(world.start_sum_grads(self.early_sums[b], f"summing block {b}'s gradients at step {step}"))

        mine = self.parts.placement.micro_batches(len(batch.parts))
        hooks = [None] * len(mine)
        if self.early_sums and hooks:
            hooks[-1] = start_sum
        task_sum, aux_sum = self.train_micro_batches(batch, mine, hooks)
        if not mine:  # a rank left without a micro-batch (an epoch's short last step) still joins each sum
            for b in range(len(self.early_sums)):
                start_sum(b)
        while started:  # the copies go as each sum is back, before the clip and the step
            started.pop(0)()
        summed = frozenset(id(p) for params in self.early_sums for p in params)
        return self.finish(task_sum, aux_sum, step, summed=summed)


class PerBlockInterleaved(_Local):
    """Each micro-batch through every block in turn, each lower block clipped and stepped at its boundary
    (``--early-lower-step``, ``--boundary fresh``): its gradients are gone before the upper block's
    activations exist."""

    def run(self, batch: StepBatch, step: int) -> StepResult:
        blocks = BlockSteps(self.parts, step)
        mine = self.parts.placement.micro_batches(len(batch.parts))
        task_sum, aux_sum = self.train_micro_batches(batch, mine, [blocks] * len(mine))
        if not mine:  # a rank left without a micro-batch (an epoch's short last step) still joins each block's sum
            for b in range(self.parts.model.num_blocks - 1):
                blocks(b)
        return self.finish(task_sum, aux_sum, step, grads_finite=blocks.finite)


class Sequential(_Local):
    """``--schedule sequential``: every micro-batch through block 0, its step, then block 1, ... one block's
    gradients at a time, with any gradient accumulation (``LoPTModel.sequential_step``)."""

    def run(self, batch: StepBatch, step: int) -> StepResult:
        parts, blocks = self.parts, BlockSteps(self.parts, step)
        batches = [parts.collate(batch.parts[i]) for i in parts.placement.micro_batches(len(batch.parts))]
        out = parts.model.sequential_step(batches, on_block_done=blocks, boundary=parts.boundary,
                                          total_tokens=batch.total_tokens, total_positions=batch.total_positions)
        # weighted by the step's totals already
        return self.finish(out.task_loss.float(), out.aux_loss.float(), step, grads_finite=blocks.finite)


class PipelineStage:
    """``--pipeline``: every micro-batch through this rank's block and its own update
    (``lopt.parallel.pipeline.Pipeline``), then the ranks' one meeting: the step's figures and the finite check."""

    def __init__(self, parts: StepParts):
        self.parts, self.pipeline = parts, parts.placement.pipeline

    def run(self, batch: StepBatch, step: int) -> StepResult:
        parts = self.parts
        batches = [parts.collate(part) for part in batch.parts]
        own = self.pipeline.step(batches, batch.tokens, batch.positions, step)
        not_finite = 1 - all_finite(parts.placement.state_tensors())
        figures = parts.world.sum(torch.cat([own, not_finite.reshape(1)]), f"summing the losses of step {step}")
        task, aux, norm, bad_grads, bad_updates = figures.tolist()
        # each copy's last stage gave the same norm
        return StepResult(task, aux, norm / self.pipeline.copies, bad_grads == 0, bad_updates == 0)


class ZOStep:
    """``--method zo``: no gradients. Each rank scores its micro-batches under the step's 2P perturbations (one
    stacked forward each, ``lopt.zo.ZOEngine``), the ranks sum 2P + 1 numbers (the count-weighted losses and the
    count), and every rank applies the same update, its directions drawn from the shared seed: no weights or
    gradients cross between ranks. The engine's step numbers start at 0 (the trainer's at 1)."""

    def __init__(self, parts: StepParts, engine):
        self.parts, self.engine = parts, engine

    def run(self, batch: StepBatch, step: int) -> StepResult:
        parts, engine = self.parts, self.engine
        perturbation = engine.draw(step - 1)
        count = len(batch.parts)
        mine = [parts.collate(batch.parts[i]) for i in parts.placement.micro_batches(count) if i < count]
        if mine:
            loss_sums, _, scored = engine.score_sums(mine, perturbation)
        else:  # a rank left without a micro-batch (an epoch's short last step) adds zeros
            loss_sums = torch.zeros(2 * perturbation.directions, dtype=torch.float64, device=parts.collate.device)
            scored = 0.0
        sums = parts.world.sum(torch.cat([loss_sums, torch.as_tensor(scored, dtype=torch.float64,
                                                                     device=loss_sums.device).reshape(1)]),
                               f"summing the ZO losses of step {step}")
        g, loss_plus, loss_minus = engine.projected_gradients(sums[:-1], sums[-1])
        loss = torch.cat([loss_plus, loss_minus]).mean()
        if torch.isfinite(loss):  # else no update: the Trainer stops on the loss
            engine.update(perturbation, g, parts.optimizers.lr)
        engine.next_step = step
        finite = bool(all_finite(parts.placement.state_tensors()))
        return StepResult(float(loss), 0.0, float(g.abs().mean()), True, finite)


def choose_step(cfg: TrainConfig, parts: StepParts, engine=None):
    """The run's step kind, chosen once at setup. A new kind is a class above and one line here."""
    if cfg.method == "zo":
        return ZOStep(parts, engine)
    if cfg.pipeline:
        return PipelineStage(parts)
    if cfg.schedule == "sequential":
        return Sequential(parts)
    if parts.optimizers.per_block:
        return PerBlockInterleaved(parts)
    # Data parallel with the whole state: a lower block's sum overlaps the blocks above (sharded: FSDP sums).
    return Interleaved(parts, overlap=parts.world.size > 1 and parts.model.num_blocks > 1 and not cfg.shard)
