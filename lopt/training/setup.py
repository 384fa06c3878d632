"""The pieces ``lopt train`` is set up from (``lopt.training.trainer.train`` calls them in order): the
config as run (a recipe, the device and dtype), the model, data and tokenizer, and ``build_trainer``, which
chooses, once, the parts that differ between runs: the optimizers (one, or one per block), where the state
lives (``choose_placement``) and the step kind (``lopt.training.steps``).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lopt.config import TrainConfig
from lopt.data.classification import (
    SST2_LABEL_WORDS,
    ClassificationExample,
    load_classification,
    looks_like_classification,
    parse_rows,
    tokenize_classification,
)
from lopt.data.embedded import default_rows
from lopt.data.sentiment import TRAIN_SIZE as SENTIMENT_TRAIN_ROWS
from lopt.data.sentiment import sentiment_rows
from lopt.data.sft import eval_examples, load_rows, rows_to_conversations, split_rows, tokenize_conversations
from lopt.engine.model import LoPTModel
from lopt.errors import UsageError
from lopt.settings import TRAIN, refuse
from lopt.models.loading import TINY, load_tokenizer_and_config, load_weights, resolve_model
from lopt.parallel.pipeline import Pipeline
from lopt.parallel.placement import Folded, Paged, Sharded, Staged, Whole
from lopt.parallel.world import World
from lopt.training.offload import BlockOffload
from lopt.training.optim import Optimizers, ZOUpdate, build_optimizers
from lopt.training.run_dir import RunDir, read_saved_config
from lopt.training.evaluator import ClassificationEvaluator
from lopt.training.steps import ClassificationCollator, Collator, StepParts, choose_step
from lopt.training.loop import Trainer

# Settings a resumed run may change without changing its trajectory (the step count sets the schedule).
RUN_CONTROL_FIELDS = {"resume", "overwrite", "output_dir", "log_every", "save_every", "eval_every",
                      "eval_max_examples", "device", "dist_timeout", "offload", "stream_state",
                      "shard"}  # offload, shard: the same numbers


# ================================================================================= the parts chosen once


def build_trainer(config: TrainConfig, model: LoPTModel, tokenizer, data: tuple, run_dir: RunDir, device,
                  world: World) -> Trainer:
    """The Trainer over ``data`` (training examples, held-out set), its parts chosen here, once."""
    if config.method == "zo":
        return _zo_trainer(config, model, tokenizer, data, run_dir, device, world)
    optimizers = build_optimizers(config, model)
    placement = choose_placement(config, model, optimizers, world, device)
    collate = Collator(_pad_id(tokenizer), config.seq_len if config.pack else None, device)
    parts = StepParts(model, world, placement, optimizers, collate, config.max_grad_norm, config.boundary)
    return Trainer(config, model, tokenizer, data, run_dir, world, optimizers, placement, choose_step(config, parts))


def _zo_trainer(config: TrainConfig, engine, tokenizer, data: tuple, run_dir: RunDir, device, world: World) -> Trainer:
    """``--method zo``: the engine (``zo_engine``) updates the weights itself; its runner is the Trainer's model."""
    model, updates = engine.runner, ZOUpdate(config, engine)
    placement = Folded(model, updates, world, device, engine)
    classification = isinstance(data[0][0], ClassificationExample)
    collate = (ClassificationCollator(_pad_id(tokenizer), device) if classification else
               Collator(_pad_id(tokenizer), None, device))
    parts = StepParts(model, world, placement, updates, collate, 0.0, config.boundary)
    return Trainer(config, model, tokenizer, data, run_dir, world, updates, placement,
                   choose_step(config, parts, engine), ClassificationEvaluator if classification else None)


def choose_placement(cfg: TrainConfig, model: LoPTModel, optimizers: Optimizers, world: World, device) -> Whole:
    """Where the state lives: a block per rank (--pipeline), a shard per rank (--shard), paged through the
    host (--offload), or whole on every rank."""
    if cfg.pipeline:
        return Staged(model, optimizers, world, device, Pipeline(model, world, optimizers, cfg.max_grad_norm, device))
    if cfg.shard:
        return Sharded(model, optimizers, world, device)
    if cfg.offload != "none":  # the blocks not running wait on the host (lopt.training.offload)
        offload = BlockOffload(model, optimizers.all, cfg.offload, device, stream_state=cfg.stream_state)
        return Paged(model, optimizers, world, device, offload)
    return Whole(model, optimizers, world, device)


# ================================================================================= loading


def apply_recipe(config: TrainConfig) -> TrainConfig:
    if config.recipe is None and config.gpu_mem is None:
        return config
    from lopt.planning.plan import apply_recipe  # the planner is only needed when a recipe is asked for

    return apply_recipe(config, config.recipe, config.gpu_mem)


def note_changed_settings(out: Path, cfg: TrainConfig):
    saved = read_saved_config(out)
    if saved is None:
        return
    saved = dataclasses.asdict(saved)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k not in RUN_CONTROL_FIELDS and k in saved and saved[k] != v]
    if changed:
        print(f"lopt: note: resuming with changed settings ({'; '.join(changed)}); the run will not match an "
              "uninterrupted one", file=sys.stderr)


def device_and_dtype(cfg: TrainConfig, world: World) -> tuple[torch.device, torch.dtype]:
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


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def tokenizer_and_config(cfg: TrainConfig):
    """The tokenizer and the model's config, checked (family, block count) before any weight is read.
    No ``--model``: the embedded default (``tiny``). A GGUF is converted here on first use."""
    tokenizer, model_config = load_tokenizer_and_config(_model_source(cfg))
    _check_num_blocks(cfg.num_blocks, model_config.num_hidden_layers)
    return tokenizer, model_config


def _model_source(cfg: TrainConfig):
    return resolve_model(cfg.model if cfg.model is not None else TINY)


def model_weights(cfg: TrainConfig, model_config, device, dtype):
    return load_weights(_model_source(cfg), model_config, dtype=dtype, seed=cfg.seed).to(device)


def _check_num_blocks(num_blocks: int, num_layers: int):
    refuse(dict(num_blocks=num_blocks, layers=num_layers), TRAIN)


def wrap_model(hf_model, cfg: TrainConfig):
    """The model as the run trains it: the LoPT engine (``LoPTModel``), or with ``--method zo`` the ZO engine."""
    if cfg.method == "zo":
        return zo_engine(hf_model, cfg)
    try:
        model = LoPTModel(hf_model, num_blocks=cfg.num_blocks, lambda_aux=cfg.lambda_aux, recompute=cfg.recompute,
                          kernels=cfg.kernels)
    except ValueError as error:  # the engine's own checks: architecture, block count
        raise UsageError(str(error)) from None
    model.train()
    return model


def zo_engine(hf_model, cfg: TrainConfig):
    """``--method zo``'s engine over the decoder layers from ``--zo-first-layer`` on (``lopt.zo``)."""
    from lopt.zo import ZOEngine, ZOSettings
    from lopt.zo.linears import trained_linears

    refuse(dict(zo_first_layer=cfg.zo_first_layer, layers=len(hf_model.model.layers)), TRAIN)
    if cfg.zo_kind != "fullrank":
        width = min(min(lin.module.weight.shape) for lin in trained_linears(hf_model, cfg.zo_first_layer))
        refuse(dict(zo_rank=cfg.zo_rank, min_width=width), TRAIN)
    settings = ZOSettings(kind=cfg.zo_kind, eps=cfg.zo_eps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          directions=cfg.zo_directions, rank=cfg.zo_rank, interval=cfg.zo_interval,
                          first_layer=cfg.zo_first_layer, seed=cfg.seed)
    try:
        return ZOEngine(hf_model, settings, kernels=cfg.kernels)
    except ValueError as error:  # the engine's own checks: architecture
        raise UsageError(str(error)) from None


def training_data(cfg: TrainConfig, tokenizer, notes: bool = True):
    """Tokenised training examples, and the held-out ``(examples, prompts)`` or None. ``notes``: print the
    notes on skipped rows (one rank of a torchrun job does)."""
    if cfg.method == "zo" and (cfg.data is None or looks_like_classification(cfg.data)):
        return classification_data(cfg, tokenizer, notes)
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


BYTE_LABEL_WORDS = ("-", "+")  # the embedded sentiment task's answers for the toy, whose tokens are bytes


def classification_data(cfg: TrainConfig, tokenizer, notes: bool = True):
    """``--method zo`` on classification rows: the embedded sentiment task (no ``--data``; its held-out words are
    never trained) or a file's rows with a held-out share; the held-out examples are a list."""
    if cfg.data is None:
        words = BYTE_LABEL_WORDS if cfg.embedded_model else SST2_LABEL_WORDS  # the toy's tokens are bytes
        train_rows = parse_rows(sentiment_rows("train", SENTIMENT_TRAIN_ROWS, seed=cfg.seed), label_words=words)
        held_rows = (parse_rows(sentiment_rows("eval", cfg.eval_max_examples, seed=cfg.seed), label_words=words)
                     if cfg.eval_max_examples else None)  # --eval-max-examples 0: no held-out evaluation
    else:
        train_rows, held_rows = split_rows(load_classification(cfg.data), cfg.eval_split, cfg.seed)
        if held_rows is not None and notes:
            print(f"lopt: note: held out {len(held_rows)} of {len(train_rows) + len(held_rows)} rows of {cfg.data} "
                  f"for the evaluation (--eval-split {cfg.eval_split:g})", file=sys.stderr)
    if cfg.eval_data is not None:
        held_rows = load_classification(cfg.eval_data)
    held_out = None if not held_rows or not cfg.eval_max_examples else tokenize_classification(held_rows[: cfg.eval_max_examples], tokenizer,
                                                                   cfg.seq_len)
    return tokenize_classification(train_rows, tokenizer, cfg.seq_len), held_out


def replay_examples(cfg: TrainConfig, hf_model, tokenizer, num_task_examples: int, notes: bool) -> list:
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
