"""The trainer behind ``lopt train``: ``train(TrainConfig(...)) -> summary``.

One optimizer step: count the label tokens and positions of its micro-batches, run ``train_step`` on
each (the engine weights every micro-batch by its share of those totals, so the accumulated
gradients are the large batch's exactly), clip, step AdamW at the cosine-scheduled rate. With
``early_lower_step`` each lower block is clipped and stepped inside ``train_step`` at its boundary,
so its gradients are gone before the upper block's activations exist. With ``schedule="sequential"``
``sequential_step`` runs every micro-batch through one block before the next, and steps each lower block
when it is done: one block's gradients at a time, with any gradient accumulation.

Under torchrun (``lopt.parallel.world``) each rank runs its share of every step's micro-batches and the
ranks sum their gradients before each clip and step: the same steps, schedule and data order as one
process. Rank 0 alone logs, evaluates and writes; every rank holds the full state. With ``--pipeline``
(``lopt.parallel.pipeline``) rank r instead runs block r of every micro-batch and steps only that block; rank 0
gathers the blocks before it evaluates or writes. With ``--shard`` (``lopt.parallel.sharding``) the ranks hold 1/N of
the weights, gradients and optimizer state each; they evaluate together and gather each tensor for rank 0 to
write.

Precision: fp32 on the CPU. On CUDA the parameters are bf16 and there is no autocast: the weights,
activations and gradients are half the size (the point of a memory-saving trainer), the fused
kernels see the dtype they are tuned for, and ``lopt.training.optim.AdamW`` keeps fp32 moments and an fp32
master copy so small updates are not lost to bf16 rounding.

Output directory: ``config.json``, ``metrics.jsonl`` (one row per logged step), ``checkpoint-NNNNNN/``
(the latest good one; ``lopt.training.checkpoint``), ``loss.png``, ``eval.json``, and ``final/`` (a plain Hugging
Face checkpoint with its tokenizer). What a run may write, delete and lock there is ``lopt.training.run_dir``'s.

Divergence: after every update one fused reduction checks that the weights and optimizer state are
finite, read with the step's losses (one host sync per step). A checkpoint replaces the previous one
only once the next step's loss has come out finite, so the update that wrecks the weights is never
what ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lopt_kernels

from lopt.training.checkpoint import (
    disk_full,
    load_optimizer_state,
    read_checkpoint,
    read_latest,
    regroup_optimizer_states,
    remove,
    remove_partial_writes,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from lopt.config import TrainConfig, default_model_note
from lopt.data.sft import (
    StepSchedule,
    collate,
    eval_examples,
    load_rows,
    rows_to_conversations,
    split_rows,
    tokenize_conversations,
)
from lopt.data.embedded import default_rows
from lopt.parallel.world import PeerLost, World
from lopt.training.offload import BlockOffload
from lopt.errors import NonFiniteLossError, UsageError
from lopt.models.loading import TINY, load_tokenizer_and_config, load_weights, resolve_model
from lopt.measures.evaluation import task_score
from lopt.engine.model import LoPTModel
from lopt.training.optim import build_optimizer
from lopt.parallel.pipeline import Pipeline
from lopt.measures.plotting import plot_losses
from lopt.parallel import sharding
from lopt.training.run_dir import TMP_PREFIX, RunDir, checkpoint_name, checkpoint_step, checkpoints, read_saved_config
from lopt.measures.retention import RetentionProbe

# Settings a resumed run may change without changing its trajectory (the step count sets the schedule).
RUN_CONTROL_FIELDS = {"resume", "overwrite", "output_dir", "log_every", "save_every", "eval_every",
                      "eval_max_examples", "device", "dist_timeout", "offload", "stream_state",
                      "shard"}  # offload, shard: the same numbers
# Under torchrun a signal this soon after the first is the same one, passed on by torchrun.
REPEAT_SIGNAL_S = 1.0


def train(config: TrainConfig) -> dict:
    """Train as ``config`` says; returns a summary (losses, eval, paths, ``status``, ``rank``).

    ``status`` is ``"completed"`` or ``"interrupted"`` (SIGINT or SIGTERM, named by ``signal``: a checkpoint
    was saved first); ``new_steps`` counts the steps this call trained. Raises ``UsageError`` for bad input,
    a damaged run directory or a full disk, ``NonFiniteLossError`` when training diverges, and (under
    torchrun, ``lopt.parallel.world``) ``PeerLost`` when another rank is gone.
    """
    world = World.from_env()  # one process, or this rank of a torchrun job
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' loading and saving bars: lopt names its phases itself
    if config.model is None and world.is_main and (note := default_model_note()):
        print(note, file=sys.stderr)
    config = _apply_recipe(config.resolved())
    config.validate()  # resolved() validated the flags; this checks what the recipe chose too
    run_dir = RunDir(Path(config.output_dir).expanduser())
    device, dtype = _device_and_dtype(config, world)
    world.connect(device, config.dist_timeout)
    try:
        return _train(config, world, run_dir, device, dtype)
    finally:
        world.close(wait=False)  # the run left the group after its last step; this is the way out of an error


def _train(config: TrainConfig, world: World, run_dir: RunDir, device, dtype) -> dict:
    # Rank 0 owns the output directory: it checks it, and picks the checkpoint every rank resumes from.
    # Each `together` block ends with the ranks agreeing that it worked, or stopping with one message.
    resume_path = resume_state = tokenizer = model_config = None
    # --shard: a checkpoint is read to the host, whole, and each rank moves only its shards to the device
    state_device = torch.device("cpu") if config.shard else device
    with world.together("checking the run directory and the model"):
        if world.is_main:
            run_dir.check(config)  # refuses before anything is loaded or touched
            if config.resume:
                _note_changed_settings(run_dir.path, config)
                # a damaged one fails before the model loads
                resume_path, resume_state = read_latest(checkpoints(run_dir.path), state_device)
            # Cheap checks first: the model's config and tokenizer (a GGUF is converted here, once for all
            # ranks), then the data, then the weights.
            tokenizer, model_config = _load_tokenizer_and_config(config)
    if config.resume:
        resume_path = world.broadcast_object(resume_path)
    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        with world.together("loading the model and data"):
            if not world.is_main:
                tokenizer, model_config = _load_tokenizer_and_config(config)
                if config.resume:  # every rank holds the full state: the same checkpoint, read whole
                    resume_state = read_checkpoint(resume_path, state_device)
            _seed_everything(config.seed)
            examples, held_out = _load_data(config, tokenizer, notes=world.is_main)
            hf_model = _load_weights(config, model_config, device, dtype)
            replay_started = time.perf_counter()
            if config.replay:  # the model as loaded answers the replay prompts, before anything trains it
                examples = examples + _replay_examples(config, hf_model, tokenizer, len(examples), world.is_main)
            replay_s = time.perf_counter() - replay_started
            model = _wrap(hf_model, config)
            if world.is_main:
                held.enter_context(run_dir.lock())  # held until the run ends: a second `lopt train` here is refused
                if config.overwrite:
                    run_dir.clear()
            trainer = Trainer(config, model, tokenizer, examples, held_out, run_dir, device, world)
            trainer.phase_s["loading"] = round(time.perf_counter() - started - replay_s, 1)
            if config.replay:
                trainer.phase_s["self-replay"] = round(replay_s, 1)
            if world.is_main or config.shard:  # sharded, the ranks evaluate together: each needs the reference
                trainer.measure_before()
            if config.resume:
                trainer.load_checkpoint(resume_path, resume_state)
            if world.is_main:  # what was run, for the record and for `lopt train --resume` to start from
                run_dir.write_text("config.json",
                                   dataclasses.replace(config, resume=False, overwrite=False).to_json() + "\n")
        del resume_state
        world.broadcast_parameters(model)
        if config.shard:  # every rank holds rank 0's whole model now: keep a shard of it
            trainer.shard()
        # --shard: FSDP's own all-gathers and reduce-scatters, in every forward and backward, may lose a peer too.
        sharded_collectives = world.guard("a sharded step's gathers and sums") if config.shard else contextlib.nullcontext()
        try:
            with sharded_collectives:
                return trainer.run()
        except PeerLost as error:
            raise PeerLost(f"{error}; {trainer.checkpoint_note()}") from None
        except Exception as error:  # a partial write is already removed; the checkpoints on disk are whole
            if not disk_full(error):
                raise
            raise UsageError(trainer.disk_full_message()) from None


# ================================================================================= the training loop


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch on ``device``. An all-ones attention mask is dropped here, on the host: the engine
    then takes SDPA's causal path without reading the mask back from the GPU (a sync per step)."""
    if "attention_mask" in batch and bool(batch["attention_mask"].all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(self, config: TrainConfig, model: LoPTModel, tokenizer, examples, held_out, run_dir: RunDir,
                 device, world: World | None = None):
        self.config, self.model, self.tokenizer, self.run_dir, self.device = config, model, tokenizer, run_dir, device
        self.world = world or World()  # rank 0 alone writes files, logs and evaluates
        self.out = run_dir.path
        self.examples, self.held_out = examples, held_out
        self.pad_id = _pad_id(tokenizer)
        self.schedule = StepSchedule(len(examples), config.batch_size, config.grad_accum, config.seed)
        limits = [config.max_steps] if config.max_steps else []
        if config.epochs:
            limits.append(config.epochs * self.schedule.steps_per_epoch)
        self.total_steps = min(limits)
        self.warmup_steps = (
            config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        )
        self.optimizers, self.block_params = self._build_optimizers()
        self.pipeline = Pipeline(self) if config.pipeline else None  # --pipeline: this rank's block (lopt.parallel.pipeline)
        # --offload: the blocks not running wait on the host (lopt.training.offload); it steps each block for us.
        self.offload = (BlockOffload(model, self.optimizers, config.offload, device, stream_state=config.stream_state)
                        if config.offload != "none" else None)
        # Position: optimizer steps done, and where the data order stands.
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.start_step = 0  # where this process started: the resumed checkpoint's step
        self.metrics: list[dict] = []
        self.last_checkpoint: Path | None = None  # the newest checkpoint known good
        self.unconfirmed_checkpoint: Path | None = None  # newer: good once the next step's loss is finite
        self.stop_requested = False
        self.stop_signal: int | None = None
        self._lower_grads_finite = True
        self.sharded = False  # --shard: set once the model is split (Trainer.shard)
        self.phase_s: dict[str, float] = {}  # seconds of each phase of the run, for the summary
        self._saved_optimizers: list[dict] | None = None  # --shard: a resumed run's, loaded as shards after the split
        self._pbar = None
        self.probe: RetentionProbe | None = None  # set with the before-training measures (measure_before)
        self.before: dict = {}

    # ----------------------------------------------------------------------------- optimizers

    def _build_optimizers(self):
        """One AdamW over all groups; with per-block steps (early_lower_step, a fresh boundary, the sequential
        schedule) one per lower block plus one for the upper.

        The groups come from ``LoPTModel.param_groups`` (upper/lower learning rates, no decay on
        vectors), split by owning block (``block_param_groups``) for per-block optimizers.
        """
        cfg, model = self.config, self.model
        per_block_steps = (cfg.early_lower_step or cfg.boundary == "fresh" or cfg.schedule == "sequential"
                           or cfg.pipeline)
        if not per_block_steps or model.num_blocks == 1:
            per_block = [model.param_groups(cfg.lr, cfg.lr_lower, cfg.weight_decay)]
        else:
            per_block = model.block_param_groups(cfg.lr, cfg.lr_lower, cfg.weight_decay)
        for group in (g for gs in per_block for g in gs):
            group["initial_lr"] = group["lr"]
        if len(per_block) == 1:
            return [build_optimizer(cfg.optimizer, per_block[0])], None
        block_params = [[p for g in gs for p in g["params"]] for gs in per_block]
        return [build_optimizer(cfg.optimizer, gs) for gs in per_block], block_params

    @functools.cached_property
    def _lower_block_params(self) -> list[list[torch.nn.Parameter]]:
        """Each lower block's trainable parameters (its layers, its decoder; block 0 the embeddings), for the data
        parallel sums that start at a block's boundary. Computed once, at the first step that needs it."""
        return [[p for group in groups for p in group["params"]] for groups in self.model.block_param_groups(0.0)[:-1]]

    def _set_lr(self):
        factor = lr_factor(self.step, self.warmup_steps, self.total_steps, self.config.min_lr_ratio)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def shard(self):
        """--shard: split the model across the ranks and build the optimizers over the shards; a resumed run's
        optimizer state (one-process shaped) is loaded as each rank's slice."""
        sharding.shard_model(self.model, self.world, self.device)
        self.optimizers, self.block_params = self._build_optimizers()
        for optimizer, saved in zip(self.optimizers, self._saved_optimizers or []):
            load_optimizer_state(optimizer, sharding.shard_optimizer_state(optimizer, saved))
        self._saved_optimizers = None
        self.sharded = True

    def _clip(self, params) -> torch.Tensor:
        """Scale ``params``' gradients to a norm of at most ``--max-grad-norm``; returns the norm before."""
        if self.sharded:
            return sharding.clip_grad_norm(params, self.config.max_grad_norm, self.world)
        return torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

    def _on_boundary(self, b: int):
        """Per-block steps: clip and step lower block b now; its gradients are freed before block b+1 runs.
        Under torchrun the ranks first sum this block's gradients, so every rank steps it alike."""
        params = self.block_params[b]
        self.world.sum_grads(params, f"summing block {b}'s gradients at step {self.step + 1}")
        if self.config.max_grad_norm > 0:
            norm = self._clip(params)
            if not torch.isfinite(norm):
                self._lower_grads_finite = False
                self.optimizers[b].zero_grad(set_to_none=True)
                if self.offload is not None:
                    self.offload.page_out()
                return
        self._step_block(b)

    def _step_block(self, b: int):
        """Step block b's optimizer and free its gradients (with offload, its state then goes back to the host)."""
        if self.offload is not None:
            self.offload.step_block(b)
        else:
            self.optimizers[b].step()
            self.optimizers[b].zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------- one optimizer step

    def optimizer_step(self, micro_batches: list[list[int]]) -> dict | None:
        """Forward, backward and update over one step's micro-batches; None if no label token is left.

        Under torchrun rank r runs micro-batches r, r+N, ... of the step. Each is weighted by its share of
        the whole step's label tokens and positions (every rank counts them from the schedule, without
        talking), so the ranks' gradients and losses add up to the one-process step's exactly."""
        cfg, world = self.config, self.world
        parts = [[self.examples[i] for i in indices] for indices in micro_batches]
        tokens = [sum(e.num_label_tokens for e in part) for part in parts]
        positions = [sum(len(e.input_ids) for e in part) for part in parts]
        total_tokens, total_positions = sum(tokens), sum(positions)
        if total_tokens == 0:
            return None
        self._set_lr()
        self._lower_grads_finite = True
        on_boundary = self._on_boundary if self.block_params is not None else None
        task_sum = aux_sum = torch.zeros((), device=self.device)
        pack_to = cfg.seq_len if cfg.pack else None
        if self.pipeline is not None:  # every micro-batch through this rank's block, then its own step
            batches = [_to_device(collate(part, self.pad_id, pack_to), self.device) for part in parts]
            return self.pipeline.step(batches, tokens, positions)
        mine = range(world.rank, len(parts), world.size)
        if self.sharded:  # every rank enters each unit's collectives as often: a rank one short repeats one at weight 0
            mine = range(world.rank, -(-len(parts) // world.size) * world.size, world.size)
        lower = []  # data parallel, one optimizer: each lower block's parameters, summed as soon as they are final
        if cfg.schedule == "sequential":  # every micro-batch through block 0, its step, then block 1, ...
            batches = [_to_device(collate(parts[i], self.pad_id, pack_to), self.device) for i in mine]
            out = self.model.sequential_step(batches, on_block_done=on_boundary, boundary=cfg.boundary,
                                             total_tokens=total_tokens, total_positions=total_positions)
            task_sum, aux_sum = out.task_loss.float(), out.aux_loss.float()  # weighted by the step's totals
        else:  # each micro-batch through every block in turn
            # Data parallel, one optimizer: a lower block's gradients are final once this rank's last micro-batch
            # has passed its boundary, so their sum starts there and runs while the blocks above compute.
            overlap = world.size > 1 and on_boundary is None and not self.sharded and self.model.num_blocks > 1
            lower = self._lower_block_params if overlap else []
            started = []  # the waits of the sums started

            def start_sum(b: int):
                started.append(world.start_sum_grads(lower[b], f"summing block {b}'s gradients at step {self.step + 1}"))

            for j, i in enumerate(mine):
                filler = i >= len(parts)
                i %= len(parts)
                batch = _to_device(collate(parts[i], self.pad_id, pack_to), self.device)
                last = j == len(mine) - 1
                out = self.model.train_step(batch, loss_scale=0.0 if filler else 1.0, total_tokens=total_tokens,
                                            total_positions=total_positions, boundary=cfg.boundary,
                                            on_boundary=start_sum if overlap and last else on_boundary)
                if filler:
                    continue
                if tokens[i]:  # a micro-batch without labels still trains the lower blocks, but has no task loss
                    task_sum = task_sum + out.task_loss.float() * (tokens[i] / total_tokens)
                aux_sum = aux_sum + out.aux_loss.float() * (positions[i] / total_positions)
            # A rank left without a micro-batch (in an epoch's short last step) still joins each block's sum.
            if not mine and (on_boundary is not None or overlap):
                for b in range(self.model.num_blocks - 1):
                    (start_sum if overlap else on_boundary)(b)
            while started:  # the copies go as each sum is back, before the clip and the step
                started.pop(0)()

        # Clip what is left to step: everything, or (per-block steps) the upper block alone.
        if self.block_params is not None:
            params = self.block_params[-1]
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
        summed = {id(p) for params in lower for p in params}
        world.sum_grads([p for p in params if id(p) not in summed],  # before the clip: its norm is global
                        f"summing the gradients of step {self.step + 1}")
        if cfg.max_grad_norm > 0:
            grad_norm = self._clip(params).float()
        else:
            grad_norm = torch.zeros((), device=self.device)
        self._step_block(len(self.optimizers) - 1)  # the only optimizer, or (per-block steps) the upper block's
        # Summed with the losses: whether the update left any rank's tensors non-finite (its shards, when sharded).
        not_finite = 1.0 - self._all_finite()
        summed = world.sum(torch.stack([task_sum, aux_sum, not_finite]), f"summing the losses of step {self.step + 1}")
        # The step's one read of the device: its losses, and whether the update left everything finite.
        task, aux, not_finite, norm = torch.cat([summed, grad_norm.reshape(1)]).tolist()
        return self.end_step(task, aux, norm, grads_finite=self._lower_grads_finite, updated_finite=not_finite == 0,
                             tokens=total_positions, label_tokens=total_tokens)

    def end_step(self, task: float, aux: float, norm: float, *, grads_finite: bool, updated_finite: bool,
                 tokens: int, label_tokens: int) -> dict:
        """The step's verdict from its summed figures (every rank has the same): stop on a non-finite loss or
        gradient (the checkpoint its weights came from goes) or on a non-finite update (the checkpoint stays);
        else confirm the newest checkpoint and return the step's metrics. ``lopt.parallel.pipeline`` ends its steps here."""
        step = self.step + 1
        loss = task + self.model.lambda_aux * aux
        if not (math.isfinite(loss) and math.isfinite(norm) and grads_finite):
            raise self._diverged(f"non-finite loss at step {step} (task {task:.4g}, aux {aux:.4g})",
                                 weights_were_bad=True)
        self._confirm_checkpoint()  # its weights have just given a finite loss
        if not updated_finite:
            raise self._diverged(f"non-finite weights or optimizer state after the update of step {step}",
                                 weights_were_bad=False)
        lr = self.optimizers[-1].param_groups[0]["lr"]  # the only one, or (per-block steps) the upper block's
        return dict(loss=loss, task_loss=task, aux_loss=aux, grad_norm=norm, lr=lr, tokens=tokens,
                    label_tokens=label_tokens)

    def _all_finite(self) -> torch.Tensor:
        """1.0 if every parameter and optimizer state tensor is finite, else 0.0: a device scalar, no sync.
        One fused norm per dtype (a non-finite element, or a norm that overflows, is not finite)."""
        tensors = [sharding.local(p) for p in self.model.parameters()]
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
        if self.offload is not None:  # what is on the device; reading the host copies each step would cost more
            self.offload.synchronize()
            tensors = [t for t in tensors if t.device == self.device]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        flags = [torch.stack(torch._foreach_norm(group)).isfinite().all() for group in groups.values()]
        return torch.stack(flags).all().float()

    def _diverged(self, what: str, weights_were_bad: bool) -> NonFiniteLossError:
        """The error to stop with. With ``weights_were_bad`` the step's weights (those of the unconfirmed
        checkpoint, if one was written after the last update) gave the non-finite loss: that checkpoint goes."""
        if weights_were_bad and self.unconfirmed_checkpoint is not None:
            self._remove_checkpoint(self.unconfirmed_checkpoint)
            self.unconfirmed_checkpoint = None
        elif self.unconfirmed_checkpoint is not None:
            self._confirm_checkpoint()
        if self.last_checkpoint is not None:
            kept = (f"{self.last_checkpoint} (the last checkpoint before the divergence) is kept; lower --lr (or "
                    "clip harder with a smaller --max-grad-norm), then --resume")
        else:
            kept = "no checkpoint from before it exists; start over (--overwrite) with a lower --lr"
        error = NonFiniteLossError(f"{what}; training stopped and {kept}")
        error.silent = not self.world.is_main  # every rank sees the same summed loss: rank 0 says it
        return error

    # ----------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        cfg = self.config
        self._announce()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start_time = time.perf_counter()
        window_start, window_tokens = time.perf_counter(), 0  # for tokens/s between logged steps
        order = self.schedule.order(self.epoch)
        interrupted = False
        self._pbar = tqdm(total=self.total_steps, initial=self.step, desc="lopt train", unit="step",
                          dynamic_ncols=True, file=sys.stderr, disable=not self.world.is_main)
        previous_handlers = self._catch_stop_signals()
        try:
            while self.step < self.total_steps:
                if self.step_in_epoch == self.schedule.steps_per_epoch:
                    if cfg.epochs and self.epoch + 1 >= cfg.epochs:
                        break  # skipped batches can leave the step count short of epochs x steps per epoch
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    order = self.schedule.order(self.epoch)
                micro_batches = self.schedule.micro_batches(self.epoch, self.step_in_epoch, order)
                self.step_in_epoch += 1
                result = self.optimizer_step(micro_batches)
                if result is None:
                    self._say(f"skipping a batch whose labels are all masked (epoch {self.epoch}, batch "
                              f"{self.step_in_epoch}): its prompts fill --seq-len {cfg.seq_len}")
                    continue
                self.step += 1
                window_tokens += result["tokens"]
                # Rank 0 logs, evaluates and saves; the others go on to the next step and wait in its first sum.
                eval_due = bool(cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps
                                and self.held_out is not None)
                if eval_due and self.pipeline is not None:  # rank 0 evaluates the whole model
                    self.pipeline.gather_weights()
                do_eval = eval_due and (self.world.is_main or self.sharded)  # sharded: the ranks evaluate together
                eval_row = self._eval_row() if do_eval else {}
                log = self.step % cfg.log_every == 0 or self.step == self.total_steps or do_eval
                if log and self.world.is_main:
                    elapsed = time.perf_counter() - window_start
                    row = self._log(result, window_tokens / max(elapsed, 1e-9))
                    row.update(eval_row)
                    self._write_metrics(row)
                    window_start, window_tokens = time.perf_counter(), 0
                self._pbar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                # Every rank stops after the same step (a signal reaches the ranks at different moments).
                if self.world.any(self.stop_requested, self.device, f"agreeing to stop after step {self.step}"):
                    interrupted = True
                    break
        finally:
            self._restore_signal_handlers(previous_handlers)
            self._pbar.close()
        checkpoint = self.save_checkpoint()  # with --pipeline every rank sends rank 0 its block here
        final_weights = result = None
        if self.sharded and not interrupted:  # the model is whole only across the ranks: they finish together
            final_weights = sharding.full_state(self.model.model, keep=self.world.is_main)
            result = self.final_evaluation()
        self.world.close()  # the steps are done; what follows is rank 0's alone
        self._confirm_checkpoint()  # no next step to try it on; the update check passed
        self.phase_s["training"] = round(time.perf_counter() - start_time, 1)
        summary = dict(
            status="interrupted" if interrupted else "completed",
            rank=self.world.rank,
            steps=self.step,
            new_steps=self.step - self.start_step,
            **self._loss_ends(),
            output_dir=str(self.out),
            checkpoint=str(checkpoint) if checkpoint else None,
            elapsed_s=round(time.perf_counter() - start_time, 2),
        )
        if interrupted:
            summary["signal"] = signal.Signals(self.stop_signal or signal.SIGINT).name
        if not self.world.is_main:
            return summary
        self._plot()
        if interrupted:
            return summary
        return self._finish(summary, final_weights, result)

    def _finish(self, summary: dict, final_weights: dict | None, result: dict | None) -> dict:
        """A completed run, rank 0: ``final/``, the evaluation after training (``result`` when the sharded
        ranks already ran it), the checkpoint dropped unless kept, the phases' seconds and the disk used."""
        with self._phase("saving final/"):
            summary["final_dir"] = str(self.save_final(final_weights))
        if not self.sharded:
            result = self.final_evaluation()
        if result is not None:
            summary["eval"] = result
            self.run_dir.write_text("eval.json", json.dumps(result, indent=2) + "\n")
        if not self.config.keep_checkpoint and self.last_checkpoint is not None:  # final/ holds what users need
            self._remove_checkpoint(self.last_checkpoint)
            self.last_checkpoint = summary["checkpoint"] = None
        summary.update(phase_s=dict(self.phase_s), disk_bytes=_disk_bytes(self.out))
        return summary

    def _loss_ends(self) -> dict:
        """The task and reconstruction losses of this call's first and last logged steps (not a resumed
        run's earlier ones); ``first_loss``/``last_loss`` are their weighted sum, what the step minimises."""
        rows = [row for row in self.metrics if row["step"] > self.start_step]
        ends = {}
        for key in ("loss", "task_loss", "aux_loss"):
            ends[f"first_{key}"] = rows[0][key] if rows else None
            ends[f"last_{key}"] = rows[-1][key] if rows else None
        return ends

    def _log(self, result: dict, tokens_per_s: float) -> dict:
        """The metrics row of the step just done (its own losses: a resumed run logs the same rows)."""
        row = dict(step=self.step, epoch=self.epoch, loss=result["loss"], task_loss=result["task_loss"],
                   aux_loss=result["aux_loss"], grad_norm=result["grad_norm"], lr=result["lr"],
                   tokens_per_s=round(tokens_per_s, 1), peak_mem_gb=round(_peak_memory_gb(self.device), 3))
        self._pbar.set_postfix(loss=f"{row['loss']:.3f}", aux=f"{row['aux_loss']:.3g}",
                               tok_s=f"{tokens_per_s:,.0f}", mem=f"{row['peak_mem_gb']:.2f}GB", refresh=False)
        return row

    def _write_metrics(self, row: dict):
        self.metrics.append(row)
        self.run_dir.record("metrics.jsonl")
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _plot(self):
        if self.metrics:
            self.run_dir.record("loss.png")
            plot_losses(self.metrics, self.out / "loss.png")

    def _say(self, message: str):
        if self.world.is_main:  # the ranks know the same things: one of them says them
            tqdm.write(f"lopt: {message}", file=sys.stderr)

    def _announce(self):
        cfg, model = self.config, self.model
        n_params = sum(p.numel() for p in model.model.parameters())
        source = "embedded default model" if cfg.model is None else cfg.model
        data = cfg.data or ("the embedded SFT set" if cfg.embedded_model else "the embedded record task")
        if cfg.replay:
            data += f" with {cfg.replay:.0%} self-replay"
        dtype = next(model.parameters()).dtype
        where = f"resuming at step {self.step}" if self.step else "starting"
        copies = self.world.size // model.num_blocks
        pipeline = f"pipeline: block r % {model.num_blocks} on rank r, {copies} copies" if copies > 1 else \
            "pipeline: block r on rank r"
        mode = pipeline if cfg.pipeline else "sharded data parallel" if cfg.shard else "data parallel"
        ranks = f" x {self.world.size} ranks ({mode})" if self.world.size > 1 else ""
        self._say(
            f"{where}: {source} ({n_params / 1e6:.1f}M parameters, blocks {model.block_ranges}) on "
            f"{self.device}{ranks} in {str(dtype).removeprefix('torch.')}; {data}: {len(self.examples)} examples, "
            f"{self.total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}; output: {self.out}"
        )
        self._say(_describe_fused_ops(model))
        epochs = self.total_steps / self.schedule.steps_per_epoch
        if not cfg.embedded_data and epochs > MANY_EPOCHS:
            self._say(f"note: {len(self.examples)} examples make {self.schedule.steps_per_epoch} steps an epoch, so "
                      f"{self.total_steps} steps pass over them {epochs:.1f} times: a small set trained many times is "
                      "learned by heart (more data, or fewer --max-steps / --epochs)")
        if cfg.grad_accum % self.world.size and not cfg.pipeline:
            self._say(f"note: --grad-accum {cfg.grad_accum} does not divide among {self.world.size} ranks: in each "
                      "step some ranks run one micro-batch fewer (and add zero gradients when they have none); a "
                      f"multiple of {self.world.size} keeps every rank busy")

    # ----------------------------------------------------------------------------- SIGINT (Ctrl-C), SIGTERM

    def _catch_stop_signals(self) -> dict:
        """The first SIGINT or SIGTERM: finish the step, save a checkpoint, stop (the CLI then exits 130 or
        143). A second one aborts at once, without a checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        first_at = 0.0

        def handler(signum, frame):
            nonlocal first_at
            if self.stop_requested:
                # torchrun passes the terminal's Ctrl-C on to each rank, which the terminal signalled too.
                if self.world.size > 1 and time.monotonic() - first_at < REPEAT_SIGNAL_S:
                    return
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
            self.stop_requested, self.stop_signal, first_at = True, signum, time.monotonic()
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self._say(f"{name}: saving a checkpoint after this step (send it again to abort without one)")

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous: dict):
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Model, decoders, optimizers, RNG states and data position, written whole (``lopt.training.checkpoint``).
        The older checkpoints stay until this one's weights have given a finite loss. Rank 0 alone writes
        (every rank holds the same full state, so a checkpoint resumes on any number of ranks): None elsewhere."""
        saved = next((c for c in (self.unconfirmed_checkpoint, self.last_checkpoint)
                      if c is not None and checkpoint_step(c) == self.step), None)
        if self.world.broadcast_object(saved is not None):  # this step is saved (a resume that stopped at once)
            return saved if self.world.is_main else None
        # --pipeline: rank 0 holds only its own block's state; every rank sends it its block first.
        # --shard: every rank gathers each tensor in turn, and rank 0 keeps it.
        gathered_optimizers = self.pipeline.gather_state() if self.pipeline is not None else None
        if self.sharded:
            gathered_model = sharding.full_state(self.model, keep=self.world.is_main)
            gathered_optimizers = [sharding.full_optimizer_state(o, keep=self.world.is_main) for o in self.optimizers]
        if not self.world.is_main:
            return None
        state = dict(
            model=gathered_model if self.sharded else self.model.state_dict(),
            optimizers=gathered_optimizers or self._optimizer_states(),
            step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            rng=rng_state(self.device),
            config=dataclasses.asdict(self.config),
        )
        self.run_dir.record(checkpoint_name(self.step))
        self.unconfirmed_checkpoint = write_checkpoint(self.out, self.step, state)
        return self.unconfirmed_checkpoint

    def _optimizer_states(self) -> list[dict]:
        if self.offload is not None:  # read from the host buffers once their copies are done
            return self.offload.state_dicts()
        return [o.state_dict() for o in self.optimizers]

    def _confirm_checkpoint(self):
        """The unconfirmed checkpoint is good: it replaces the older ones lopt wrote."""
        if self.unconfirmed_checkpoint is None:
            return
        self.last_checkpoint, self.unconfirmed_checkpoint = self.unconfirmed_checkpoint, None
        for old in checkpoints(self.out):
            if old != self.last_checkpoint and self.run_dir.recorded(old.name):
                self._remove_checkpoint(old)

    def _remove_checkpoint(self, path: Path):
        remove(path)
        self.run_dir.forget(path.name)

    def load_checkpoint(self, path: Path, state: dict):
        """Continue from ``state``, read from checkpoint ``path`` (``lopt.training.checkpoint.read_latest``)."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise UsageError(f"{path} does not fit this model: {str(error).splitlines()[0]}") from None
        saved_optimizers = state["optimizers"]
        if len(saved_optimizers) != len(self.optimizers):  # one AdamW <-> one per block (e.g. --pipeline <-> not)
            try:
                saved_optimizers = regroup_optimizer_states(saved_optimizers, self.model, self.optimizers)
            except UsageError as error:
                raise UsageError(f"{path}: {error}") from None
        if self.config.shard:  # loaded as shards once the model is split (Trainer.shard)
            self._saved_optimizers = saved_optimizers
        else:
            for optimizer, saved in zip(self.optimizers, saved_optimizers):
                load_optimizer_state(optimizer, saved)
        if self.offload is not None:  # the loaded state and weights go where the offload keeps them
            self.offload.page_out()
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.start_step = self.step
        set_rng_state(state["rng"], self.device)
        self.last_checkpoint = path
        if not self.world.is_main:
            return
        # Rows logged after the checkpoint are re-logged by the resumed run; a kill may have cut the last one.
        rows = []
        metrics_path = self.out / "metrics.jsonl"
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
            rows = [r for r in rows if isinstance(r, dict) and r.get("step", math.inf) <= self.step]
        self.run_dir.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self.metrics = rows
        remove_partial_writes(self.out)
        if self.step >= self.total_steps:
            self._say(f"{path.name} is already at step {self.step} of {self.total_steps}; raise --max-steps or "
                      "--epochs to train further")

    def save_final(self, weights: dict | None = None) -> Path:
        """The plain Hugging Face checkpoint (decoders dropped) with its tokenizer, swapped in atomically.
        ``weights``: the causal LM's state dict, gathered whole (``--shard``), instead of its own."""
        final = self.out / "final"
        self.run_dir.record("final")
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}final-", dir=self.out))
        try:
            self.model.save_pretrained(tmp, **({} if weights is None else dict(state_dict=weights)))
            self.tokenizer.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            stale = self.out / f"{TMP_PREFIX}stale-final"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        return final

    def checkpoint_note(self) -> str:
        """Where a stopped run continues from: the newest complete checkpoint (rank 0 wrote it whole)."""
        saved = checkpoints(self.out) if self.out.is_dir() else []
        if not saved:
            return f"no checkpoint was written in {self.out} yet"
        return f"the last complete checkpoint is {saved[-1]} (--resume continues from it, with any number of ranks)"

    def disk_full_message(self) -> str:
        newest = self.unconfirmed_checkpoint or self.last_checkpoint
        kept = f"the last complete checkpoint is {newest}" if newest else "no checkpoint was written yet"
        return f"no space left on device in {self.out}; {kept}: free some space, then --resume"

    # ----------------------------------------------------------------------------- evaluation

    def _eval_row(self) -> dict:
        result = self.evaluate()
        return {"eval_loss": result["loss"], "exact_match": result["exact_match"]}

    def evaluate(self) -> dict:
        """Held-out task loss (token-weighted), answer-token accuracy and exact match of greedy answers."""
        result = dict(step=self.step, **task_score(self.model.model, self.tokenizer, self.held_out,
                                                   self.config.batch_size, self.config.eval_max_examples,
                                                   synced=self.sharded))
        self._say(f"held-out at step {self.step}: loss {result['loss']:.4f}, answer-token accuracy "
                  f"{result['token_accuracy']:.1%}, exact match {result['correct']}/{result['num_generated']}")
        return result

    def measure_before(self):
        """The task score and retention of the model as loaded, and the reference that KL is measured
        against (its answers to the general prompts): before any checkpoint is loaded, so a resumed run
        compares with the same original model."""
        with self._phase("evaluation before training", self._evaluation_work()):
            if self.config.retention:
                self.probe = RetentionProbe(self.model.model, self.tokenizer, self.config.seq_len,
                                            self.config.batch_size)
            self.before = self._measure(as_built=True)

    def _measure(self, as_built: bool = False) -> dict:
        result = self.evaluate() if self.held_out is not None else {"step": self.step}
        if self.probe is not None:
            result.update(self.probe.measure(self.model.model, synced=self.sharded, as_built=as_built))
        return result

    def final_evaluation(self) -> dict | None:
        """``eval.json``: the trained model's task score and retention, and ``before`` (the model as loaded)."""
        if self.held_out is None and self.probe is None:
            return None
        with self._phase("evaluation after training", self._evaluation_work()):
            return dict(self._measure(), before=self.before)

    def _evaluation_work(self) -> str:
        """What an evaluation phase does, for the line that announces it."""
        work = []
        if self.held_out is not None:
            examples, prompts = self.held_out
            work.append(f"{len(examples)} held-out examples, {min(len(prompts), self.config.eval_max_examples)} "
                        "answers generated")
        if self.config.retention:
            work.append("retention on general text and prompts")
        return "; ".join(work)

    @contextlib.contextmanager
    def _phase(self, name: str, work: str = ""):
        """Say that phase ``name`` starts (and what it does), then how long it took; its seconds go to the summary."""
        self._say(f"{name}{f' ({work})' if work else ''} ...")
        started = time.perf_counter()
        yield
        self.phase_s[name] = seconds = round(time.perf_counter() - started, 1)
        self._say(f"{name}: done in {seconds:.1f} s")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ================================================================================= setting up


def _apply_recipe(config: TrainConfig) -> TrainConfig:
    if config.recipe is None and config.gpu_mem is None:
        return config
    from lopt.planning.plan import apply_recipe  # the planner is only needed when a recipe is asked for

    return apply_recipe(config, config.recipe, config.gpu_mem)


def _note_changed_settings(out: Path, cfg: TrainConfig):
    saved = read_saved_config(out)
    if saved is None:
        return
    saved = dataclasses.asdict(saved)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k not in RUN_CONTROL_FIELDS and k in saved and saved[k] != v]
    if changed:
        print(f"lopt: note: resuming with changed settings ({'; '.join(changed)}); the run will not match an "
              "uninterrupted one", file=sys.stderr)




def _device_and_dtype(cfg: TrainConfig, world: World) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible to PyTorch")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          cfg.device if cfg.device != "auto" else "cpu")
    if device.type == "cuda" and world.size > 1:  # torchrun: one GPU per process on each node
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"rank {world.rank} is process {world.local_rank} on its node, which has "
                             f"{torch.cuda.device_count()} GPUs: start at most one process per GPU")
        device = torch.device("cuda", world.local_rank)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
    return device, dtype


# A run over the user's data that passes over it more often than this is told so.
MANY_EPOCHS = 2


def _describe_fused_ops(model: LoPTModel) -> str:
    """The start line's word on lopt_kernels' fused ops: which run, and which a patched model left unfused."""
    if not model.kernels:
        return "fused ops: none (the model's own PyTorch code; --kernels turns them on)"
    counts = lopt_kernels.fused_ops(model.model)
    fused = [f"{op} ({n})" for op, n in counts.items() if n]
    unfused = [op for op, n in counts.items() if not n]
    return "fused ops: " + (", ".join(fused) or "none") + (f"; unfused: {', '.join(unfused)}" if unfused else "")


def _disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def _load_tokenizer_and_config(cfg: TrainConfig):
    """The tokenizer and the model's config, checked (family, block count) before any weight is read.
    No ``--model``: the embedded default (``tiny``). A GGUF is converted here on first use."""
    tokenizer, model_config = load_tokenizer_and_config(_model_source(cfg))
    _check_num_blocks(cfg.num_blocks, model_config.num_hidden_layers)
    return tokenizer, model_config


def _model_source(cfg: TrainConfig):
    return resolve_model(cfg.model if cfg.model is not None else TINY)


def _load_weights(cfg: TrainConfig, model_config, device, dtype):
    return load_weights(_model_source(cfg), model_config, dtype=dtype, seed=cfg.seed).to(device)


def _check_num_blocks(num_blocks: int, num_layers: int):
    if not 1 <= num_blocks <= num_layers:
        raise UsageError(f"--num-blocks must be between 1 and the model's {num_layers} layers, got {num_blocks}")


def _wrap(hf_model, cfg: TrainConfig) -> LoPTModel:
    try:
        model = LoPTModel(hf_model, num_blocks=cfg.num_blocks, lambda_aux=cfg.lambda_aux, recompute=cfg.recompute,
                          kernels=cfg.kernels)
    except ValueError as error:  # the engine's own checks: architecture, block count
        raise UsageError(str(error)) from None
    model.train()
    return model


def _load_data(cfg: TrainConfig, tokenizer, notes: bool = True):
    """Tokenised training examples, and the held-out ``(examples, prompts)`` or None. ``notes``: print the
    notes on skipped rows (one rank of a torchrun job does)."""
    if cfg.data is None:
        train_rows, held_out_rows = default_rows(cfg)
        train_name = "the embedded SFT set" if cfg.embedded_model else "the embedded record task"
        held_out_name = "its held-out split"
    else:
        train_rows, train_name = load_rows(cfg.data), cfg.data
        held_out_rows, held_out_name = None, None
        if cfg.eval_data is None:
            train_rows, held_out_rows = split_rows(train_rows, cfg.eval_split, cfg.seed)
            if held_out_rows is not None:
                held_out_name = f"the rows of {train_name} held out"
                if notes:
                    print(f"lopt: note: held out {len(held_out_rows)} of {len(train_rows) + len(held_out_rows)} rows "
                          f"of {train_name} for the evaluation (--eval-split {cfg.eval_split:g}; --eval-split 0 trains "
                          "on every row, --eval-data FILE evaluates on a file)", file=sys.stderr)
    if cfg.eval_data is not None:
        held_out_rows, held_out_name = load_rows(cfg.eval_data), cfg.eval_data

    conversations, skipped = rows_to_conversations(train_rows, train_name)
    if skipped and notes:
        print(f"lopt: note: skipped {skipped} of {len(train_rows)} rows of {train_name} without a text answer",
              file=sys.stderr)
    examples = tokenize_conversations(conversations, tokenizer, cfg.seq_len)
    no_labels = sum(e.num_label_tokens == 0 for e in examples)
    if no_labels == len(examples):
        raise UsageError(f"no example of {train_name} has an answer token within --seq-len {cfg.seq_len}")
    if no_labels and notes:
        print(f"lopt: note: {no_labels} examples have no answer token within --seq-len {cfg.seq_len}; "
              "they train only the lower blocks", file=sys.stderr)
    held_out = None
    if held_out_rows is not None:
        held_conversations, _ = rows_to_conversations(held_out_rows, held_out_name)
        held_out = (tokenize_conversations(held_conversations, tokenizer, cfg.seq_len),
                    eval_examples(held_conversations, tokenizer, cfg.seq_len))
    return examples, held_out


def _replay_examples(cfg: TrainConfig, hf_model, tokenizer, num_task_examples: int, notes: bool) -> list:
    """``--replay``: the model's own answers to general prompts, as many as make that share (lopt.training.replay)."""
    from lopt.training.replay import REPLAY_PROMPTS, repeated, replay_conversations, replay_count

    if notes:
        tqdm.write(f"lopt: self-replay: the model answers {len(REPLAY_PROMPTS)} general prompts ...", file=sys.stderr)
    conversations = replay_conversations(hf_model, tokenizer, cfg.batch_size)
    examples = repeated(tokenize_conversations(conversations, tokenizer, cfg.seq_len),
                        replay_count(num_task_examples, cfg.replay))
    if notes:
        tqdm.write(f"lopt: self-replay: {len(conversations)} of its answers ended within the limit; "
                   f"{len(examples)} replay examples ({cfg.replay:.0%} of the training set)", file=sys.stderr)
    return examples


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB





