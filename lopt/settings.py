"""The settings' allowed values and every rule of how they combine, written once.

``lopt train``'s checks (``TrainConfig.validate``), ``lopt plan``'s and the planner's search, the memory model
and the Python API (``LoPTModel``, ``BlockOffload``, sharding) all ask ``check_settings`` / ``refuse`` here; no
other file, help text or doc should restate one. A rule reads a dict of setting values: ``TrainConfig``'s field
names, plus what a caller knows about the run (``FACTS``). It is evaluated only when the settings it ``needs``
are given, so a caller passes what it has fixed (``lopt plan``: its flags; the planner: one candidate).
Its one line is rendered for its reader: flags for ``lopt train`` / ``lopt plan`` (``UsageError``), argument
names for the Python API (``ValueError``). Bounds of one value (``--lr`` > 0) stay in ``lopt.config``.
``help_note`` sums up a setting's rules for its flag's help text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from lopt.errors import UsageError

OPTIMIZERS = ("adamw", "adamw-bf16", "adamw-8bit")
RECOMPUTE = ("none", "full", "selective")
SCHEDULES = ("interleaved", "sequential")  # LoPTModel.train_step per micro-batch, or LoPTModel.sequential_step
OFFLOAD = ("none", "optimizer", "params")  # what waits in host memory between its block's turns (lopt.training.offload)
BOUNDARIES = ("stale", "fresh")  # see LoPTModel.train_step
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp32")
RECIPES = {"8gb": 8.0, "12gb": 12.0, "16gb": 16.0, "24gb": 24.0}  # card memory in GiB
METHODS = ("lopt", "zo")  # backpropagation with LoPT's local losses, or zeroth-order (forward passes only, lopt.zo)
ZO_KINDS = ("lowrank", "highrank", "fullrank")  # lopt.zo.directions
CHOICES = {"optimizer": OPTIMIZERS, "recompute": RECOMPUTE, "schedule": SCHEDULES, "offload": OFFLOAD,
           "boundary": BOUNDARIES, "device": DEVICES, "dtype": DTYPES, "recipe": tuple(RECIPES), "method": METHODS,
           "zo_kind": ZO_KINDS}
# The settings only one method reads: given with the other method, they are refused rather than ignored.
ZO_ONLY = ("zo_kind", "zo_eps", "zo_directions", "zo_rank", "zo_interval", "zo_first_layer",
           "zo_loss", "zo_candidates")  # the last two: lopt plan's (what a ZO step scores)
LOPT_ONLY = ("num_blocks", "lambda_aux", "boundary", "schedule", "offload", "stream_state", "recompute", "lr_lower",
             "optimizer", "early_lower_step", "max_grad_norm", "recipe", "gpu_mem", "pipeline", "shard", "pack",
             "replay")
OFFLOADING = ("optimizer", "params")

# Values that are no flag: what a caller knows about the run.
FACTS = {
    "ranks": "processes of the job (torchrun's, or lopt plan --nproc)",
    "rank_micro_batches": "the busiest rank's micro-batches per step (default: ceil(grad_accum / ranks))",
    "layers": "the model's decoder layers",
    "tied_head": "the model's head is its input embedding matrix",
    "bitsandbytes": "bitsandbytes is installed",
    "block_step": "the caller passes a callback that steps each lower block at its boundary",
    "given": "the settings given a value other than their default (lopt train: the flags on its command line)",
    "min_width": "the narrowest side of a linear layer ZO trains",
}
# What a setting a rule reads but does not need means when it is not given: off.
NEUTRAL = {"method": "lopt", "given": (), "pipeline": False, "shard": False, "ranks": 1, "grad_accum": 1, "schedule": "interleaved",
           "offload": "none", "stream_state": False, "early_lower_step": False, "boundary": "stale",
           "recipe": None, "gpu_mem": None}


class Values(dict):
    """Setting values by name; a setting not given reads as ``NEUTRAL``'s."""

    def __getattr__(self, key):
        if key in self:
            return self[key]
        if key in NEUTRAL:
            return NEUTRAL[key]
        raise AttributeError(key)

    @property
    def rank_micro_batches(self) -> int:
        if "rank_micro_batches" in self:
            return self["rank_micro_batches"]
        return math.ceil(self.grad_accum / max(1, self.ranks))


_NAME = object()


@dataclass(frozen=True)
class Say:
    """How a reader spells settings: ``flags`` (``--schedule sequential``) or arguments (``schedule='sequential'``);
    ``names`` renames some (``lopt plan`` calls the ranks ``--nproc``, ``plan()`` ``nproc``)."""

    reader: str  # "train" | "plan" (flags, UsageError) | "api" (arguments, ValueError)
    names: Mapping[str, str] = field(default_factory=dict)

    @property
    def flags(self) -> bool:
        return self.reader != "api"

    def name(self, key: str) -> str:
        if key in self.names:
            return self.names[key]
        return "--" + key.replace("_", "-") if self.flags else key

    def __call__(self, key: str, value=_NAME) -> str:
        """The setting's name, or the setting with ``value`` (a tuple: any of them)."""
        name = self.name(key)
        if value is _NAME or value is True:
            return name
        if self.flags:
            if value is False:
                return "--no-" + name.removeprefix("--")
            shown = " or ".join(map(str, value)) if isinstance(value, tuple) else value
            return f"{name} {shown}"
        return f"{name}=" + (" or ".join(map(repr, value)) if isinstance(value, tuple) else repr(value))

    def flag(self, key: str, value=_NAME) -> str:
        """Always as ``lopt train``'s flag (an API message naming what the trainer refuses)."""
        return TRAIN(key, value)

    def at_least(self, key: str, low: int) -> str:
        return f"{self.name(key)} N with N >= {low}" if self.flags else f"{self.name(key)} >= {low}"


TRAIN = Say("train", {"ranks": "torchrun --nproc-per-node"})
PLAN = Say("plan", {"ranks": "--nproc"})
API = Say("api")


@dataclass(frozen=True)
class Rule:
    """``refuses(values)`` -> True when the combination cannot run; ``says`` its one line; ``brief`` a summary
    for help texts. ``says_to``: a reader's own wording, kept where the tests pin a different text;
    ``readers``: whom the summary concerns."""

    name: str
    needs: tuple[str, ...]
    refuses: Callable[[Values], bool]
    says: Callable[[Values, Say], str]
    brief: Callable[[Say], str]
    says_to: Mapping[str, Callable[[Values, Say], str]] = field(default_factory=dict)
    readers: tuple[str, ...] = ("train", "plan", "api")

    def message(self, values: Values, say: Say) -> str:
        return self.says_to.get(say.reader, self.says)(values, say)


def _per_micro_batch(name: str, key: str, value, why: str) -> Rule:
    """``key=value`` steps each lower block at its boundary, once per micro-batch, in the interleaved schedule:
    one micro-batch per rank and step."""

    def says(v: Values, s: Say) -> str:
        if v.ranks == 1 or "grad_accum" not in v:  # one rank, or a count of its own micro-batches
            return f"{s(key, value)} {why}, so it needs {s('grad_accum', 1)} (raise {s.name('batch_size')} instead)"
        return (f"{s(key, value)} steps each lower block once per step at its boundary, so each of the {v.ranks} "
                f"ranks runs at most one micro-batch: {s.name('grad_accum')} must be at most {v.ranks}, got "
                f"{v.grad_accum} (raise {s.name('batch_size')} instead)")

    return Rule(
        name, (key,),
        lambda v: v[key] == value and v.schedule == "interleaved" and not v.pipeline and v.rank_micro_batches > 1,
        says, lambda s: f"{s(key, value)} with {s('schedule', 'interleaved')} needs {s.name('grad_accum')} at most "
                        "the ranks: one micro-batch per rank and step", readers=("train", "api"))


def _not_with_shard(key: str, refused: Callable[[Values], bool], value: Callable[[Values], object], shown,
                    why: str = "", instead: str = "drop one of them", readers=("train", "plan", "api")) -> Rule:
    """A setting the sharded trainer (FSDP2, lopt.parallel.sharding) does not run; ``shown``: its value in the
    listing. The API's message names the flags too: the memory model's callers plan ``lopt train --shard``."""
    return Rule(
        f"shard_{key}", ("shard", key), lambda v: v.shard and refused(v),
        lambda v, s: f"lopt train --shard does not run with {s.flag(key, value(v))}{why}: {instead}",
        lambda s: f"{s('shard')} not with {s(key, shown)}",
        says_to={"train": lambda v, s: f"{s('shard')} with {s(key, value(v))} is not supported"
                                       f"{why or ' yet'}: {instead}"}, readers=readers)


def _recipe_plans_one_process(key: str, what: str, instead: Callable[[Say], str]) -> Rule:
    """A recipe plans one process holding ``what``; ``key``'s ranks hold less."""
    return Rule(
        f"{key}_recipe", (key, "recipe", "gpu_mem"), lambda v: v[key] and (v.recipe is not None or v.gpu_mem is not None),
        lambda v, s: f"{s.name('recipe')} and {s.name('gpu_mem')} plan one process that holds {what}: {instead(s)}",
        lambda s: f"{s('recipe')} and {s('gpu_mem')} not with {s(key)}", readers=("train",))


def _other_method(v: Values) -> list[str]:
    """The given settings that ``v.method`` does not read."""
    return [key for key in (ZO_ONLY if v.method == "lopt" else LOPT_ONLY) if key in v.given]


RULES: tuple[Rule, ...] = (
    Rule("settings_of_the_other_method", ("method", "given"), lambda v: bool(_other_method(v)),
         lambda v, s: (f"{s.name(_other_method(v)[0])} is a setting of {s('method', 'zo')}: add {s('method', 'zo')} "
                       "or leave it out") if v.method == "lopt" else
                      (f"{s.name(_other_method(v)[0])} is a setting of {s('method', 'lopt')} (backpropagation); "
                       f"{s('method', 'zo')} trains with forward passes only: leave it out"),
         lambda s: f"each of {s.name('method')}'s settings only with its method", readers=("train", "plan")),
    Rule("zo_rank_within_width", ("zo_rank", "min_width"), lambda v: v.zo_rank is not None and v.zo_rank > v.min_width,
         lambda v, s: f"{s.name('zo_rank')} must be at most the narrowest trained layer's width, {v.min_width}, "
                      f"got {v.zo_rank}", lambda s: f"{s.name('zo_rank')} at most the trained layers' width"),
    Rule("zo_first_layer_within_layers", ("zo_first_layer", "layers"),
         lambda v: v.zo_first_layer is not None and not 0 <= v.zo_first_layer < v.layers,
         lambda v, s: f"{s.name('zo_first_layer')} must be a layer of the model, 0 to {v.layers - 1}, got "
                      f"{v.zo_first_layer}", lambda s: f"{s.name('zo_first_layer')} below the model's layers"),
    Rule("num_blocks_within_layers", ("num_blocks", "layers"), lambda v: not 1 <= v.num_blocks <= v.layers,
         lambda v, s: f"{s.name('num_blocks')} must be between 1 and the model's {v.layers} layers, got {v.num_blocks}",
         lambda s: f"{s.name('num_blocks')} from 1 to the model's layers"),
    Rule("resume_or_overwrite", ("resume", "overwrite"), lambda v: v.resume and v.overwrite,
         lambda v, s: f"{s('resume')} and {s('overwrite')} exclude each other: pick one",
         lambda s: f"{s('resume')} or {s('overwrite')}, not both", readers=("train",)),
    Rule("offload_needs_sequential", ("offload", "schedule"),  # --pipeline: refused below, in its own words
         lambda v: v.offload != "none" and v.schedule != "sequential" and not v.pipeline,
         lambda v, s: f"{s('offload', v.offload)} pages one block at a time: it needs {s('schedule', 'sequential')}",
         lambda s: f"{s('offload', OFFLOADING)} needs {s('schedule', 'sequential')}"),
    Rule("stream_state_needs_offload", ("stream_state", "offload"), lambda v: v.stream_state and v.offload == "none",
         lambda v, s: f"{s('stream_state')} streams offloaded state: it needs {s('offload', OFFLOADING)}",
         lambda s: f"{s('stream_state')} needs {s('offload', OFFLOADING)}"),
    Rule("shard_needs_ranks", ("shard", "ranks"), lambda v: v.shard and v.ranks < 2,
         lambda v, s: f"{s('shard')} splits the state over the ranks: it needs {s.at_least('ranks', 2)}, got "
                      f"{s('ranks', v.ranks)} (the ranks must be two or more)",
         lambda s: f"{s('shard')} needs {s.at_least('ranks', 2)}",
         says_to={"train": lambda v, s: f"{s('shard')} splits the model across torchrun's processes: start it with "
                                        "torchrun --nproc-per-node N (N >= 2), or leave it out"}),
    _not_with_shard("pipeline", lambda v: v.pipeline, lambda v: True, True, readers=("train",)),
    _not_with_shard("schedule", lambda v: v.schedule == "sequential", lambda v: "sequential", "sequential"),
    _not_with_shard("offload", lambda v: v.offload != "none", lambda v: v.offload, OFFLOADING),
    _not_with_shard("stream_state", lambda v: v.stream_state, lambda v: True, True),
    _not_with_shard("optimizer", lambda v: v.optimizer == "adamw-8bit", lambda v: "adamw-8bit", "adamw-8bit",
                    " (bitsandbytes steps whole tensors)", "use adamw or adamw-bf16"),
    _recipe_plans_one_process("shard", "the whole model", lambda s: (
        f"with {s('shard')} set {s.name('batch_size')}, {s.name('grad_accum')} and {s.name('recompute')} yourself "
        f"(lopt plan --nproc N --shard predicts a rank's memory)")),
    Rule("shard_tied_head", ("shard", "num_blocks", "tied_head"), lambda v: v.shard and v.num_blocks == 1 and v.tied_head,
         lambda v, s: f"{s('shard')} with {s('num_blocks', 1)} on a model whose head shares the embedding matrix is "
                      "not supported (a model whose head is its embedding matrix would shard the two as one unit, "
                      f"gathered for the whole step): use {s.name('num_blocks')} 2 or more, which gives the head its "
                      f"own weight, or drop {s('shard')}",
         lambda s: f"{s('shard')} not with {s('num_blocks', 1)} on a model whose head is its embedding matrix"),
    Rule("pipeline_one_block_per_rank", ("pipeline", "ranks", "num_blocks"),
         lambda v: v.pipeline and (v.ranks == 1 or v.num_blocks < 2),
         lambda v, s: f"{s('pipeline')} puts one block on each process: start it with torchrun --nproc-per-node K "
                      f"and {s.name('num_blocks')} K (K >= 2), or leave it out ({s('pipeline', False)})",
         lambda s: f"{s('pipeline')} needs torchrun --nproc-per-node K and {s.name('num_blocks')} K >= 2", readers=("train",)),
    Rule("pipeline_copies", ("pipeline", "ranks", "num_blocks"),
         lambda v: v.pipeline and v.num_blocks >= 1 and v.ranks % v.num_blocks != 0,
         lambda v, s: f"{s('pipeline')} runs one block per rank, in copies of {s.name('num_blocks')} ranks: the "
                      f"{v.ranks} ranks must be a multiple of {s.name('num_blocks')}, got {v.num_blocks}",
         lambda s: f"{s('pipeline')} needs the ranks a multiple of {s.name('num_blocks')}", readers=("train",)),
    Rule("pipeline_sequential", ("pipeline", "schedule"), lambda v: v.pipeline and v.schedule == "sequential",
         lambda v, s: f"{s('pipeline')} steps each block once per step on its own rank, as "
                      f"{s('schedule', 'sequential')} does in one process: drop {s('schedule', 'sequential')}",
         lambda s: f"{s('pipeline')} not with {s('schedule', 'sequential')}", readers=("train",)),
    Rule("pipeline_early_lower_step", ("pipeline", "early_lower_step"), lambda v: v.pipeline and v.early_lower_step,
         lambda v, s: f"{s('pipeline')} steps and clips each block on its own rank, and a rank holds only its "
                      f"block's gradients: drop {s('early_lower_step')}",
         lambda s: f"{s('pipeline')} not with {s('early_lower_step')}", readers=("train",)),
    # Honest fresh would have each rank wait for the previous block's update before using its output.
    Rule("pipeline_fresh", ("pipeline", "boundary"), lambda v: v.pipeline and v.boundary == "fresh",
         lambda v, s: f"{s('boundary', 'fresh')} would make each pipeline stage wait for the previous block's step, "
                      f"so the stages could not overlap: use {s('boundary', 'stale')} with {s('pipeline')}, or "
                      f"{s('schedule', 'sequential')} {s('boundary', 'fresh')} without it",
         lambda s: f"{s('pipeline')} not with {s('boundary', 'fresh')}", readers=("train",)),
    _recipe_plans_one_process("pipeline", "the whole step, not a pipeline rank", lambda s: (
        f"with {s('pipeline')} set {s.name('batch_size')}, {s.name('grad_accum')} and {s.name('recompute')} "
        "yourself")),
    # lopt.training.offload pages the blocks of one process; a pipeline steps its block itself.
    Rule("pipeline_offload", ("pipeline", "offload"), lambda v: v.pipeline and v.offload != "none",
         lambda v, s: f"{s('offload', v.offload)} with {s('pipeline')} is not supported yet: drop {s.name('offload')}",
         lambda s: f"{s('pipeline')} not with {s('offload', OFFLOADING)}", readers=("train",)),
    Rule("sequential_early_lower_step", ("schedule", "early_lower_step"),
         lambda v: v.schedule == "sequential" and v.early_lower_step,
         lambda v, s: f"{s('schedule', 'sequential')} steps each block as soon as it is done already: "
                      f"{s('early_lower_step')} is for the interleaved schedule, so drop {s('early_lower_step')}",
         lambda s: f"{s('early_lower_step')} not with {s('schedule', 'sequential')}", readers=("train", "api")),
    _per_micro_batch("early_lower_step_one_micro_batch_per_rank", "early_lower_step", True,
                     "steps each block once per micro-batch"),
    _per_micro_batch("fresh_one_micro_batch_per_rank", "boundary", "fresh",
                     "steps each lower block before the next block sees its output, once per micro-batch"),
    Rule("adamw_8bit_needs_bitsandbytes", ("optimizer", "bitsandbytes"),
         lambda v: v.optimizer == "adamw-8bit" and not v.bitsandbytes,
         lambda v, s: f"{s('optimizer', 'adamw-8bit')} needs bitsandbytes: pip install bitsandbytes",
         lambda s: f"{s('optimizer', 'adamw-8bit')} needs bitsandbytes installed", readers=("train",)),
    Rule("fresh_needs_block_step", ("boundary", "block_step", "num_blocks"),
         lambda v: v.boundary == "fresh" and not v.block_step and v.num_blocks > 1,
         lambda v, s: f"{s('boundary', 'fresh')} recomputes each lower block after its update: pass an "
                      f"{s.name('block_step')} that steps the block's optimizer",
         lambda s: f"{s('boundary', 'fresh')} needs each lower block stepped at its boundary", readers=("api",)),
)


class Violation(NamedTuple):
    rule: str  # a rule's name, or "choice" for a value outside its setting's CHOICES
    message: str


def _violations(values: Mapping, say: Say | None):
    """Each violation in order (choices first, then ``RULES``); ``say`` None: no message is rendered."""
    v = values if isinstance(values, Values) else Values(values)
    for key, allowed in CHOICES.items():
        if v.get(key) is not None and v[key] not in allowed:
            yield Violation("choice", say and f"{say.name(key)} must be one of {', '.join(allowed)}, got {v[key]!r}")
    for rule in RULES:
        if all(key in v for key in rule.needs) and rule.refuses(v):
            yield Violation(rule.name, say and rule.message(v, say))


def check_settings(values: Mapping, say: Say = API) -> list[Violation]:
    """Every violation of ``values`` (a value outside its choices, then each rule refusing them, in ``RULES``'s
    order), each with its one line for ``say``'s reader; empty when they can run."""
    return list(_violations(values, say))


def allowed(values: Mapping) -> bool:
    """Whether the rules let ``values`` run (the planner's filter: no message is rendered)."""
    return next(_violations(values, None), None) is None


def refuse(values: Mapping, say: Say = API) -> None:
    """Raise the first violation of ``values``: ``UsageError`` for the flags' readers, ``ValueError`` for the API."""
    first = next(_violations(values, say), None)
    if first is not None:
        raise (UsageError if say.flags else ValueError)(first.message)


def steps_each_block(values: Mapping) -> bool:
    """Whether each lower block has its own optimizer, stepped at its boundary: the early lower-block step, the
    fresh boundary, the sequential schedule and the pipeline do (with two or more blocks; ``values`` holds
    ``num_blocks``)."""
    v = Values(values)
    return v.num_blocks > 1 and (v.early_lower_step or v.boundary == "fresh" or v.schedule == "sequential"
                                 or v.pipeline)


def help_note(key: str, say: Say = TRAIN) -> str:
    """What the help text of ``key``'s flag says of its combinations: the summaries of the rules on it, as
    ``say``'s reader spells the settings ("" when none)."""
    notes = [rule.brief(say) for rule in RULES if key in rule.needs and say.reader in rule.readers]
    return f" (combinations: {'; '.join(notes)})" if notes else ""
