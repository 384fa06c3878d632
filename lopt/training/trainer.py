"""``lopt train``: ``train(TrainConfig(...)) -> summary``, the run from the flags to the summary in one place.

``train`` resolves the config (a recipe, the device and dtype), joins the ranks and runs ``_train``: rank 0
checks the run directory and picks the checkpoint every rank resumes from, every rank loads the model and
data, and ``lopt.training.setup.build_trainer`` chooses, once, the parts that differ between runs (the
optimizers, where the state lives, the step kind); then ``Trainer.run`` (``lopt.training.loop``) runs the
steps. Each ``world.together`` block ends with the ranks agreeing that it worked, or stopping with one message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

from lopt.config import TrainConfig, default_model_note
from lopt.errors import UsageError
from lopt.parallel.world import PeerLost, World
from lopt.training import setup
from lopt.training.checkpoint import disk_full, read_checkpoint, read_latest
from lopt.training.loop import Trainer
from lopt.training.lr_schedule import lr_factor
from lopt.training.run_dir import RunDir, checkpoints

__all__ = ["Trainer", "lr_factor", "train"]  # Trainer, lr_factor: their homes are loop and lr_schedule


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
    config = setup.apply_recipe(config.resolved())
    config.validate()  # resolved() validated the flags; this checks what the recipe chose too
    run_dir = RunDir(Path(config.output_dir).expanduser())
    device, dtype = setup.device_and_dtype(config, world)
    world.connect(device, config.dist_timeout)
    try:
        return _train(config, world, run_dir, device, dtype)
    finally:
        world.close(wait=False)  # the run left the group after its last step; this is the way out of an error


def _train(config: TrainConfig, world: World, run_dir: RunDir, device, dtype) -> dict:
    resume_path, resume_state, tokenizer, model_config = _check_run(config, world, run_dir, device)
    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        with world.together("loading the model and data"):
            if not world.is_main:
                tokenizer, model_config = setup.tokenizer_and_config(config)
                if config.resume:  # every rank holds the full state: the same checkpoint, read whole
                    resume_state = read_checkpoint(resume_path, _state_device(config, device))
            trainer = _load(config, world, run_dir, device, dtype, tokenizer, model_config, started, held)
            if config.resume:
                trainer.load_checkpoint(resume_path, resume_state)
            if world.is_main:  # what was run, for the record and for `lopt train --resume` to start from
                run_dir.write_text("config.json",
                                   dataclasses.replace(config, resume=False, overwrite=False).to_json() + "\n")
        del resume_state
        world.broadcast_parameters(trainer.model)
        trainer.place()  # --shard: every rank holds rank 0's whole model now, and keeps a shard of it
        return _run(trainer)


def _check_run(config: TrainConfig, world: World, run_dir: RunDir, device) -> tuple:
    """Rank 0 owns the output directory: it checks it and picks the checkpoint every rank resumes from; then
    the cheap checks, the model's config and tokenizer (a GGUF is converted here, once for all ranks).
    Returns the checkpoint's path (every rank), its state, the tokenizer and the model config (rank 0)."""
    resume_path = resume_state = tokenizer = model_config = None
    with world.together("checking the run directory and the model"):
        if world.is_main:
            run_dir.check(config)  # refuses before anything is loaded or touched
            if config.resume:
                setup.note_changed_settings(run_dir.path, config)
                # a damaged one fails before the model loads
                resume_path, resume_state = read_latest(checkpoints(run_dir.path), _state_device(config, device))
            tokenizer, model_config = setup.tokenizer_and_config(config)
    if config.resume:
        resume_path = world.broadcast_object(resume_path)
    return resume_path, resume_state, tokenizer, model_config


def _state_device(config: TrainConfig, device) -> torch.device:
    """Where a checkpoint is read to: --shard reads it to the host, whole, and each rank moves only its shards."""
    return torch.device("cpu") if config.shard else device


def _load(config: TrainConfig, world: World, run_dir: RunDir, device, dtype, tokenizer, model_config,
          started: float, held: contextlib.ExitStack) -> Trainer:
    """The data, the weights (and with --replay the model's own answers), the run directory locked, and the
    Trainer, with the measures of the model as loaded. Inside the ranks' ``together`` block."""
    setup.seed_everything(config.seed)
    examples, held_out = setup.training_data(config, tokenizer, notes=world.is_main)
    hf_model = setup.model_weights(config, model_config, device, dtype)
    replay_started = time.perf_counter()
    if config.replay:  # the model as loaded answers the replay prompts, before anything trains it
        examples = examples + setup.replay_examples(config, hf_model, tokenizer, len(examples), world.is_main)
    replay_s = time.perf_counter() - replay_started
    model = setup.wrap_model(hf_model, config)
    if world.is_main:
        held.enter_context(run_dir.lock())  # held until the run ends: a second `lopt train` here is refused
        if config.overwrite:
            run_dir.clear()
    trainer = setup.build_trainer(config, model, tokenizer, (examples, held_out), run_dir, device, world)
    trainer.log.phase_s["loading"] = round(time.perf_counter() - started - replay_s, 1)
    if config.replay:
        trainer.log.phase_s["self-replay"] = round(replay_s, 1)
    trainer.evaluator.measure_before()  # on the ranks that evaluate (--shard: every rank needs the reference)
    return trainer


def _run(trainer: Trainer) -> dict:
    """The steps; a lost peer or a full disk ends them with one line that says where the run continues from."""
    try:
        with trainer.placement.guard():
            return trainer.run()
    except PeerLost as error:
        raise PeerLost(f"{error}; {trainer.keeper.note()}") from None
    except Exception as error:  # a partial write is already removed; the checkpoints on disk are whole
        if not disk_full(error):
            raise
        raise UsageError(trainer.keeper.disk_full_message()) from None
