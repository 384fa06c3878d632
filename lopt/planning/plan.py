"""The memory planner: the fastest setting of a LoPT training step that fits a card.

``plan`` searches micro-batch, gradient accumulation, recomputation, optimizer, the early lower-block
step, the schedule and what is offloaded to the host, pricing each setting with
``lopt.planning.memory_model.estimate_memory``; ``lopt plan`` prints the result and ``lopt train --recipe``
applies it (``apply_recipe``). Offloading is priced in time too (``step_time``): the bytes it moves
over PCIe against the step's compute, at an assumed bandwidth and FLOP rate that the flags override;
so are the collectives of data parallel over ``nproc`` ranks (``torchrun``, sharded with ``shard``), at an
assumed link bandwidth. With ranks the step's sequences stay what is asked: its micro-batches are shared
out among the ranks, and the memory is one rank's.

In order: the model (``load_model_config``); the card and the speed (``usable_bytes``, ``relative_speed``,
``step_time``); the plan and its report (``Plan``); the search (``PlanInputs``, ``search_space``,
``candidate_settings``, ``price``, ``choose``, ``plan``); ``lopt plan``'s flags and ``apply_recipe``; last,
``lopt plan --method zo`` (``zo_plan``: a ZO run's micro-batch and directions, priced by
``lopt.planning.zo_memory.estimate_zo_memory``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from lopt.config import MAX_BATCH, MAX_COUNT, MAX_GPU_MEM_GB, MAX_SEQ_LEN, TrainConfig, check_int, check_number
from lopt.models.shapes import SHIPPED_CONFIGS_DIR, shipped_config, shipped_config_names
from lopt.errors import UsageError
from lopt.models.loading import TINY, load_config, resolve_model
from lopt.planning.memory_model import GiB, MemoryEstimate, ModelShape, dtype_bytes, estimate_memory, model_shape
from lopt.planning.zo_memory import LOSSES, ZOMemoryEstimate, estimate_zo_memory, layer_linears
from lopt.settings import (
    API,
    OFFLOAD,
    OPTIMIZERS,
    PLAN,
    RECIPES,
    METHODS,
    RECOMPUTE,
    SCHEDULES,
    ZO_KINDS,
    Say,
    allowed,
    check_settings,
    help_note,
    refuse,
)

# ``plan()``'s arguments: the ranks are its ``nproc``.
PLAN_API = Say("api", {"ranks": "nproc"})

# What the plan keeps free: a fraction for the caching allocator's rounding and fragmentation, and
# what the CUDA context and libraries take on a real card outside PyTorch's allocator.
SAFETY_FRACTION = 0.10
MAX_RATE = 1e6  # GB/s or TFLOP/s: past this a value is a typo
MAX_RANKS = 1 << 16  # torchrun processes: past this a value is a typo
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
# Relative speed the plan assumes, to rank the settings that fit (see ``plan``).
RECOMPUTE_SPEED = {"none": 1.0, "selective": 0.85, "full": 0.75}
OPTIMIZER_PREFERENCE = {"adamw": 1.0, "adamw-bf16": 0.97, "adamw-8bit": 0.95, "torch-adamw": 1.0}
EARLY_STEP_PREFERENCE = 0.99  # per-block clipping: a small change of the arithmetic, used when it helps
TOKENS_HALF_SPEED = 1024  # a micro-batch of this many tokens runs at about half the GPU's best rate
# Interleaved stays the default until a GPU measurement says otherwise: the sequential schedule is the same
# arithmetic (stale boundary) with one optimizer per block and a stash of boundary activations.
SCHEDULE_PREFERENCE = {"interleaved": 1.0, "sequential": 0.99}
# What the transfer-versus-compute estimate assumes (``lopt plan --pcie-bandwidth / --tflops``): a
# PCIe 4.0 x16 link's effective host<->device rate, and a dense bf16 rate a 24 GB card sustains on large
# matrix products; the step's compute is the usual 6 x parameters x tokens (forward 2, backward 4).
PCIE_GB_S = 25.0
TFLOPS = 150.0
# ... and for the collectives of data parallel (``lopt plan --link-bandwidth``): the bus bandwidth
# (nccl-tests' busbw) of GPUs within one NVLink node; PCIe-only cards reach about a tenth of it.
LINK_GB_S = 150.0


# ---------------------------------------------------------------------------------------------- the model


def load_model_config(spec: str):
    """A transformers config from a shipped config name (``llama-3.2-1b``), a ``config.json`` path, or
    anything ``lopt train --model`` takes (a checkpoint directory, a ``.gguf`` file, ``smollm2-135m-instruct``,
    ``tiny``, a hub id already in the local cache; see ``lopt.models.loading``)."""
    if (SHIPPED_CONFIGS_DIR / f"{spec}.json").is_file():
        config = shipped_config(spec)
        config.name_or_path = spec
        return config
    path = Path(spec)
    if path.is_file() and path.suffix != ".gguf":
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"{spec}: not a readable config.json ({error})") from None
        if "model_type" not in fields:
            raise UsageError(f"{spec}: a config.json needs a model_type")
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        config.name_or_path = path.stem
        return config
    source = resolve_model(spec)  # what `lopt train --model` takes, or a one-line error
    if source.kind != "hub":
        config = load_config(source)
        config.name_or_path = spec
        return config
    try:  # a hub id already in the local cache
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        pass
    known = ", ".join(shipped_config_names())
    raise UsageError(f"--model {spec}: not a checkpoint directory, a config.json or a shipped config ({known}), "
                     "nor a hub id in the local cache")


def trainable_model(spec: str) -> bool:
    """Whether ``lopt train --model spec`` can load weights from ``spec`` (a shipped shape or a config.json cannot)."""
    try:
        resolve_model(spec)
    except UsageError:
        return False
    return not Path(spec).is_file() or Path(spec).suffix == ".gguf"


# ---------------------------------------------------------------------------------------------- the card and the speed


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def usable_bytes(gpu_mem_gb: float, *, safety: float = SAFETY_FRACTION, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
    """What a plan may fill on a card of ``gpu_mem_gb`` GiB: minus the safety margin and the CUDA context."""
    return int(gpu_mem_gb * GiB * (1 - safety)) - context_bytes


def relative_speed(seq_len: int, batch_size: int, recompute: str, optimizer: str, early_lower_step: bool,
                   schedule: str = "interleaved", transfer_factor: float = 1.0, ranks_busy: float = 1.0) -> float:
    """The plan's ranking of settings: larger micro-batches fill the GPU better, recomputation costs a
    forward of what it recomputes, and the exact optimizer is preferred where the others would gain little;
    ``transfer_factor``: compute time over step time when offloading or talking to other ranks
    (``step_time``); ``ranks_busy``: the share of the ranks' time in which they have a micro-batch to run."""
    tokens = seq_len * batch_size
    speed = tokens / (tokens + TOKENS_HALF_SPEED) * RECOMPUTE_SPEED[recompute] * OPTIMIZER_PREFERENCE[optimizer]
    speed *= SCHEDULE_PREFERENCE[schedule] * transfer_factor * ranks_busy
    return speed * (EARLY_STEP_PREFERENCE if early_lower_step else 1.0)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step as the plan estimates them (a model, not a measurement)."""

    compute: float  # FLOPs / rate
    transfer: float  # host <-> device bytes / bandwidth, both directions
    step: float  # block by block, the longer of its compute and its transfers, plus what the compute waits for
    link: float = 0.0  # data parallel: this rank's collectives, its bytes sent / the link bandwidth

    @property
    def compute_fraction(self) -> float:
        return self.compute / self.step if self.step else 1.0


def step_flops(shape: ModelShape, num_blocks: int, recompute: str, tokens: int) -> list[float]:
    """FLOPs of each block in one optimizer step: 6 x its matrix parameters x tokens (the input embeddings
    are a lookup), plus the recomputed forward (2 x the layers', or the MLPs', parameters x tokens)."""
    from lopt.engine.model import split_layers

    ranges = split_layers(shape.layers, num_blocks)
    mlp = 3 * shape.hidden * shape.intermediate
    out = []
    for b, (start, end) in enumerate(ranges):
        layers = sum(shape.layer_params[start:end])
        params = layers + (shape.decoder_params if b < num_blocks - 1 else shape.head_params)
        again = {"none": 0, "selective": (end - start) * mlp, "full": layers}[recompute]
        out.append((6 * params + 2 * again) * tokens)
    return out


def step_time(shape: ModelShape, estimate: MemoryEstimate, tokens: int, *, pcie_gb_s: float = PCIE_GB_S,
              tflops: float = TFLOPS, link_gb_s: float = LINK_GB_S) -> StepTime:
    """The step's compute (``tokens``: this rank's) against its transfers. Offloading overlaps each block's
    transfers with its compute (``lopt.training.offload``), so a block takes the longer of the two; what the compute
    waits for is added: block 0's weights under ``params``, all the state with ``stream_state``. Under data
    parallel the gradient all-reduce is added (a bound: with one optimizer the lower blocks' sums overlap the
    blocks above); FSDP2 overlaps its all-gathers and reduce-scatters with the compute, so a sharded step takes
    the longer of the two. A lower bound in practice: kernels reach the FLOP rate only on large products."""
    settings = estimate.settings
    flops = step_flops(shape, settings["num_blocks"], settings["recompute"], tokens)
    rate, bandwidth = tflops * 1e12, pcie_gb_s * 1e9
    compute = sum(flops) / rate
    offload, streamed = settings.get("offload", "none"), settings.get("stream_state", False)
    several = len(estimate.per_block) > 1
    moved = []  # what each block moves behind its compute
    for block in estimate.per_block:
        moved.append(2 * block["optimizer_state"] * (offload != "none" and not streamed)
                     + 2 * block["parameters"] * (offload == "params" and several))
    if offload == "params":  # block 0's upload is waited for; with one block, its weights only go back
        moved[0] += -estimate.per_block[0]["parameters"] if several else estimate.per_block[0]["parameters"]
    step = sum(max(f / rate, m / bandwidth) for f, m in zip(flops, moved)) + estimate.transfer_exposed / bandwidth
    link = estimate.link / (link_gb_s * 1e9)
    step = max(step, link) if settings.get("shard") else step + link
    return StepTime(compute=compute, transfer=estimate.transfer / bandwidth, step=step, link=link)


# ---------------------------------------------------------------------------------------------- the plan and its report


@dataclass
class Plan:
    """A setting of the training step for a card, and its predicted memory."""

    model: str
    gpu_mem_gb: float
    seq_len: int
    num_blocks: int
    batch_size: int
    grad_accum: int
    recompute: str
    optimizer: str
    early_lower_step: bool
    kernels: bool
    dtype: str
    fits: bool
    budget: int
    estimate: MemoryEstimate
    num_params: int
    schedule: str = "interleaved"
    offload: str = "none"
    stream_state: bool = False
    time: StepTime | None = None
    pcie_gb_s: float = PCIE_GB_S
    tflops: float = TFLOPS
    nproc: int = 1  # data-parallel ranks (torchrun processes); the estimate is one rank's
    shard: bool = False  # FSDP2 over the ranks (``lopt train --shard``)
    link_gb_s: float = LINK_GB_S
    alternatives: list[dict] = field(default_factory=list)
    train_model: str | None = None  # what to give `lopt train --model`; None: the plan's model has no weights
    fitting_num_blocks: int | None = None  # nothing fits: the fewest blocks with which something does (``run_plan``)

    @property
    def tokens_per_step(self) -> int:
        """Of all ranks together: ``--grad-accum`` counts the step's micro-batches, which the ranks share."""
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def rank_micro_batches(self) -> int:
        """Micro-batches the busiest rank runs per step (rank r runs r, r+N, ... of them)."""
        return math.ceil(self.grad_accum / self.nproc)

    def command(self) -> str:
        """The suggested ``lopt train`` command line, under ``torchrun`` (one node) for more than one rank."""
        launcher = f"torchrun --nproc-per-node {self.nproc} -m lopt train" if self.nproc > 1 else "lopt train"
        model = self.train_model if self.train_model is not None else "CHECKPOINT"
        return f"{launcher} --model {model} {self.train_flags()}"

    def train_flags(self) -> str:
        flags = (f"--seq-len {self.seq_len} --num-blocks {self.num_blocks} --batch-size {self.batch_size} "
                 f"--grad-accum {self.grad_accum} --recompute {self.recompute} --optimizer {self.optimizer}")
        if self.schedule != "interleaved":
            flags += f" --schedule {self.schedule}"
        if self.offload != "none":
            flags += f" --offload {self.offload}"
        if self.stream_state:
            flags += " --stream-state"
        if self.early_lower_step:
            flags += " --early-lower-step"
        return flags + (" --shard" if self.shard else "")

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("estimate", "time")}
        out["estimate"] = self.estimate.as_dict()
        out["time"] = dataclasses.asdict(self.time) if self.time is not None else None
        out["tokens_per_step"] = self.tokens_per_step
        out["rank_micro_batches"] = self.rank_micro_batches
        out["command"] = self.command()
        return out

    def time_lines(self) -> list[str]:
        """The transfer-versus-compute estimate, with what it assumes."""
        t, est = self.time, self.estimate
        if t is None:
            return []
        link = f", {self.pcie_gb_s:g} GB/s host<->device" if self.offload != "none" else ""
        link += f", {self.link_gb_s:g} GB/s between ranks" if self.nproc > 1 else ""
        lines = [f"time of a step (estimate: {self.tflops:g} TFLOP/s{link}; --tflops / --pcie-bandwidth / "
                 "--link-bandwidth change them; 6 x parameters x tokens FLOPs):",
                 f"  compute {t.compute:.2f} s" + (" per rank" if self.nproc > 1 else "")]
        if self.offload != "none":
            lines[-1] += (f", transfers {t.transfer:.2f} s ({est.transfer / 1e9:.1f} GB moved), "
                          f"overlapped block by block: about {t.step:.2f} s per step "
                          f"({t.compute_fraction:.0%} of it compute)")
            lines.append(f"  host memory needed: {est.host / GiB:.2f} GiB pinned "
                         f"({'optimizer state' if self.offload == 'optimizer' else 'weights + optimizer state'})")
        if self.nproc > 1:
            what = ("all-gathers and reduce-scatters, overlapped with the compute" if self.shard else
                    "the gradient all-reduce, added to the compute")
            lines.append(f"  collectives {t.link:.2f} s ({est.link / 1e9:.1f} GB sent per rank: {what}): about "
                         f"{t.step:.2f} s per step ({t.compute_fraction:.0%} of it compute)")
        return lines + [""]

    def describe(self) -> str:
        est = self.estimate
        lines = [
            f"model      {self.model}: {self.num_params / 1e9:.2f}B parameters under LoPT "
            f"({self.num_blocks} blocks{'; lm_head untied' if self.num_blocks > 1 else ''}, "
            f"{self.num_blocks - 1} aux decoder(s)), {self.dtype}",
            f"card       {self.gpu_mem_gb:g} GiB -> {self.budget / GiB:.2f} GiB usable "
            f"({SAFETY_FRACTION:.0%} margin for the allocator, {CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context)",
            "",
        ]
        status = "fits" if self.fits else "DOES NOT FIT (the setting with the smallest peak is shown)"
        lines += [
            f"plan       {status}",
            f"  micro-batch {self.batch_size} x grad-accum {self.grad_accum} = {self.batch_size * self.grad_accum} "
            f"sequences of {self.seq_len} = {self.tokens_per_step:,} tokens per optimizer step",
            *self.ranks_lines(),
            f"  recompute {self.recompute}, optimizer {self.optimizer}, early lower-block step "
            f"{'on' if self.early_lower_step else 'off'}, kernels {'on' if self.kernels else 'off'}",
            f"  schedule {self.schedule}, offload {self.offload}"
            + (", optimizer state streamed through each block's step" if self.stream_state else ""),
            "",
            f"predicted memory of a step (peak of memory_allocated on {'each rank' if self.nproc > 1 else 'the device'}"
            "; the parts live at the peak):",
            est.table(),
            "",
        ]
        lines += self.time_lines()
        if self.fitting_num_blocks is not None:
            lines += [f"with --num-blocks {self.fitting_num_blocks} a setting fits (`lopt plan ... --num-blocks "
                      f"{self.fitting_num_blocks}` shows it); the number of blocks changes what LoPT trains, so "
                      "the plan does not choose it", ""]
        lines += self.alternatives_lines()
        lines.append(self.command())
        if self.train_model is None:
            lines.append(f"  (CHECKPOINT: a local Hugging Face directory or .gguf file of {self.model}; the plan "
                         "used its shape, which has no weights)")
        return "\n".join(lines)

    def alternatives_lines(self) -> list[str]:
        """The other settings that fit, as a table."""
        if not self.alternatives:
            return []
        lines = ["other settings that fit, fastest first (relative speed is the plan's model, not a measurement):",
                 f"  {'micro':>5} {'accum':>5}  {'recompute':<9}  {'optimizer':<10}  {'early':<5}  "
                 f"{'schedule':<11}  {'offload':<9}  {'peak GiB':>8}  {'speed':>5}"]
        for alt in self.alternatives:
            lines.append(f"  {alt['batch_size']:>5} {alt['grad_accum']:>5}  {alt['recompute']:<9}  "
                         f"{alt['optimizer']:<10}  {'on' if alt['early_lower_step'] else 'off':<5}  "
                         f"{alt['schedule']:<11}  {alt['offload']:<9}  "
                         f"{alt['peak'] / GiB:>8.2f}  {alt['speed']:>5.2f}")
        return lines + [""]

    def ranks_lines(self) -> list[str]:
        """How the step is shared out among the ranks, and what each holds."""
        if self.nproc == 1:
            return []
        share = (f"each runs {'' if self.shard else 'at most '}{self.rank_micro_batches} of the step's "
                 f"{self.grad_accum} micro-batches")
        if self.shard:
            held = (f"sharded (FSDP2): each holds 1/{self.nproc} of the parameters, gradients and optimizer state "
                    "(the aux decoders whole)\n  and gathers a unit's full weights while the unit runs")
        else:
            held = "plain data parallel: each holds all the parameters, gradients and optimizer state"
        lines = [f"  {self.nproc} ranks, {held}; {share}"]
        if self.grad_accum < self.nproc:
            idle = " (the others run a copy at weight 0)" if self.shard else ""
            lines.append(f"  only {self.grad_accum} of the {self.nproc} ranks get a micro-batch{idle}: a larger "
                         "--tokens-per-step (or a smaller --batch-size) uses them all")
        return lines


# ---------------------------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is given rather than chooses: the model, the sequence, the blocks, the kernels and dtype, the
    ranks, and the rates the step-time estimate assumes."""

    shape: ModelShape
    seq_len: int
    num_blocks: int
    kernels: bool
    dtype: object
    nproc: int
    shard: bool
    pcie_gb_s: float
    tflops: float
    link_gb_s: float


@dataclass(frozen=True)
class SearchSpace:
    """The choices a plan searches; ``layouts``: the (schedule, offload, stream_state) combinations."""

    examples_per_step: int
    optimizers: tuple[str, ...]
    recompute_modes: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    layouts: tuple[tuple[str, str, bool], ...]
    allow_early_lower_step: bool


def search_space(*, seq_len: int, tokens_per_step: int, examples_per_step: int | None, optimizers, recompute_modes,
                 batch_sizes, schedules, offloads, stream_states, allow_early_lower_step: bool,
                 shard: bool) -> SearchSpace:
    """``plan``'s arguments with their defaults filled in (see ``plan``), less what ``lopt.settings``' rules
    refuse (offload without the sequential schedule, ...; adamw-8bit by default only where bitsandbytes is
    installed). ``ValueError`` when nothing is left."""
    if examples_per_step is None:
        examples_per_step = max(1, round(tokens_per_step / seq_len))
    if optimizers is None:
        optimizers = tuple(o for o in OPTIMIZERS if allowed(dict(optimizer=o, bitsandbytes=bitsandbytes_available())))
    if batch_sizes is None:
        batch_sizes = tuple(b for b in range(examples_per_step, 0, -1) if examples_per_step % b == 0)
    stream_states = (False, True) if stream_states is None else stream_states
    layouts = [dict(schedule=schedule, offload=offload, stream_state=stream, shard=shard)
               for schedule in schedules or SCHEDULES for offload in offloads or OFFLOAD for stream in stream_states]
    choices = [dict(optimizer=o, shard=shard) for o in optimizers]
    kept_layouts, kept_optimizers = [lay for lay in layouts if allowed(lay)], [c for c in choices if allowed(c)]
    if not kept_layouts or not kept_optimizers:
        why = check_settings((layouts if not kept_layouts else choices)[0], API)[0].message
        raise ValueError(f"no setting to search: {why}")
    return SearchSpace(examples_per_step=examples_per_step,
                       optimizers=tuple(c["optimizer"] for c in kept_optimizers),
                       recompute_modes=tuple(recompute_modes or RECOMPUTE), batch_sizes=tuple(batch_sizes),
                       layouts=tuple((lay["schedule"], lay["offload"], lay["stream_state"]) for lay in kept_layouts),
                       allow_early_lower_step=allow_early_lower_step)


def candidate_settings(space: SearchSpace, fixed: PlanInputs):
    """Every setting of the space, in the order ties are broken: (optimizer, recompute, batch_size, grad_accum,
    the busiest rank's micro-batches, the ranks' busy share, schedule, offload, stream_state, early_lower_step).
    The step keeps its ``examples_per_step`` sequences, its micro-batches shared out among the ranks; the early
    lower-block step where ``lopt.settings`` allows it, and only with blocks (with one it changes nothing)."""
    for optimizer in space.optimizers:
        for recompute in space.recompute_modes:
            for batch_size in space.batch_sizes:
                grad_accum = max(1, math.ceil(space.examples_per_step / batch_size))
                rank_accum = math.ceil(grad_accum / fixed.nproc)  # the busiest rank's micro-batches
                busy = grad_accum / (fixed.nproc * rank_accum)
                for schedule, offload, stream in space.layouts:
                    early_choices = (False, True) if (
                        fixed.num_blocks > 1 and space.allow_early_lower_step
                        and allowed(dict(schedule=schedule, early_lower_step=True, rank_micro_batches=rank_accum))
                    ) else (False,)
                    for early in early_choices:
                        yield (optimizer, recompute, batch_size, grad_accum, rank_accum, busy, schedule, offload,
                               stream, early)


def price(fixed: PlanInputs, optimizer: str, recompute: str, batch_size: int, grad_accum: int, rank_accum: int,
          busy: float, schedule: str, offload: str, stream: bool, early: bool) -> dict:
    """A candidate (a setting from ``candidate_settings``) with its predicted memory, step time and speed."""
    est = estimate_memory(
        fixed.shape, seq_len=fixed.seq_len, batch_size=batch_size, num_blocks=fixed.num_blocks, recompute=recompute,
        optimizer=optimizer, kernels=fixed.kernels, early_lower_step=early, grad_accum=rank_accum, dtype=fixed.dtype,
        schedule=schedule, offload=offload, stream_state=stream, ranks=fixed.nproc, shard=fixed.shard,
    )
    time = step_time(fixed.shape, est, fixed.seq_len * batch_size * rank_accum, pcie_gb_s=fixed.pcie_gb_s,
                     tflops=fixed.tflops, link_gb_s=fixed.link_gb_s)
    return dict(
        batch_size=batch_size, grad_accum=grad_accum, recompute=recompute, optimizer=optimizer,
        early_lower_step=early, schedule=schedule, offload=offload, stream_state=stream, peak=est.peak,
        estimate=est, time=time, speed=relative_speed(fixed.seq_len, batch_size, recompute, optimizer, early,
                                                      schedule, time.compute_fraction, busy),
    )


def choose(candidates: list[dict], budget: int) -> tuple[dict, list[dict]]:
    """The best candidate and those that fit, best first: without offload before with, prefetched state before
    streamed, then the fastest, then the smallest peak. Nothing fits: the smallest peak, and no list."""
    fitting = sorted((c for c in candidates if c["peak"] <= budget),
                     key=lambda c: (c["offload"] != "none", c["stream_state"], -c["speed"], c["peak"]))
    return (fitting[0] if fitting else min(candidates, key=lambda c: c["peak"])), fitting


def plan(
    config,
    gpu_mem_gb: float,
    seq_len: int,
    *,
    num_blocks: int = 2,
    tokens_per_step: int = 16384,
    examples_per_step: int | None = None,
    kernels: bool = True,
    dtype=torch.bfloat16,
    optimizers: tuple[str, ...] | None = None,
    recompute_modes: tuple[str, ...] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    allow_early_lower_step: bool = True,
    schedules: tuple[str, ...] | None = None,
    offloads: tuple[str, ...] | None = None,
    stream_states: tuple[bool, ...] | None = None,
    pcie_gb_s: float = PCIE_GB_S,
    tflops: float = TFLOPS,
    nproc: int = 1,
    shard: bool = False,
    link_gb_s: float = LINK_GB_S,
    safety: float = SAFETY_FRACTION,
    context_bytes: int = CUDA_CONTEXT_BYTES,
    name: str | None = None,
) -> Plan:
    """The fastest setting (by ``relative_speed``) whose predicted peak fits the card.

    An optimizer step takes ``examples_per_step`` sequences (default: ``tokens_per_step / seq_len``,
    at least 1), split into ``grad_accum`` micro-batches of ``batch_size`` (``batch_size`` divides it,
    so every setting trains on the same batch). Searched: the micro-batch, recomputation
    (none / selective / full), the optimizer (adamw, adamw-bf16, and adamw-8bit where bitsandbytes is
    installed), without accumulation the lower blocks' early optimizer step (interleaved), the schedule
    (``schedules``, default both) and, for the sequential one, the offload (``offloads``, default all)
    and whether its state streams through the step (``stream_states``, default both). A setting that
    offloads is taken only when none without offload fits, one that streams only when none that
    prefetches fits, and its speed counts the transfers (``step_time`` at ``pcie_gb_s`` and ``tflops``).
    ``num_blocks``, ``kernels`` and ``dtype`` are given. Nothing fits: the setting with the smallest peak, ``fits=False``.

    ``nproc`` ranks (torchrun) share the step's ``grad_accum`` micro-batches (rank r runs r, r+N, ...), so the
    step keeps its sequences; the peak is the busiest rank's, which runs ``ceil(grad_accum / nproc)`` of them
    (the early lower-block step needs one), and a rank without a micro-batch counts against the speed.
    ``shard``: FSDP2 over the ranks, without the settings ``lopt.settings`` refuses with it; the speed counts the
    collectives at ``link_gb_s``.
    """
    refuse(dict(shard=shard, ranks=nproc), PLAN_API)
    fixed = PlanInputs(shape=model_shape(config), seq_len=seq_len, num_blocks=num_blocks, kernels=kernels,
                       dtype=dtype, nproc=nproc, shard=shard, pcie_gb_s=pcie_gb_s, tflops=tflops, link_gb_s=link_gb_s)
    space = search_space(
        seq_len=seq_len, tokens_per_step=tokens_per_step, examples_per_step=examples_per_step, optimizers=optimizers,
        recompute_modes=recompute_modes, batch_sizes=batch_sizes, schedules=schedules, offloads=offloads,
        stream_states=stream_states, allow_early_lower_step=allow_early_lower_step, shard=shard)
    budget = usable_bytes(gpu_mem_gb, safety=safety, context_bytes=context_bytes)
    best, fitting = choose([price(fixed, *setting) for setting in candidate_settings(space, fixed)], budget)
    chosen = ("batch_size", "grad_accum", "recompute", "optimizer", "early_lower_step", "schedule", "offload",
              "stream_state", "estimate", "time")
    return Plan(
        model=name or fixed.shape.name or "model", gpu_mem_gb=gpu_mem_gb, seq_len=seq_len, num_blocks=num_blocks,
        kernels=kernels, dtype="bf16" if dtype_bytes(dtype) == 2 else "fp32", fits=bool(fitting), budget=budget,
        num_params=fixed.shape.total_params(num_blocks), pcie_gb_s=pcie_gb_s, tflops=tflops, nproc=nproc,
        shard=shard, link_gb_s=link_gb_s,
        alternatives=[{k: v for k, v in c.items() if k not in ("estimate", "time")} for c in fitting[1:6]],
        **{key: best[key] for key in chosen},
    )


# ---------------------------------------------------------------------------------------------- CLI and recipe


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``lopt plan``."""
    parser.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                        help="what `lopt train --model` takes (a checkpoint directory, a .gguf file, "
                             "smollm2-135m-instruct, tiny), a config.json, or a shipped shape: "
                             + ", ".join(shipped_config_names()))
    card = parser.add_mutually_exclusive_group(required=True)
    card.add_argument("--gpu-mem", type=float, metavar="GB", help="memory of the card in GiB (e.g. 24)")
    card.add_argument("--recipe", choices=tuple(RECIPES),
                      help="a consumer card: 8gb, 12gb, 16gb or 24gb")
    seq_len = TrainConfig.__dataclass_fields__["seq_len"].default  # lopt train's: one default for both
    parser.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    parser.add_argument("--num-blocks", type=int, default=2,
                        help="LoPT blocks" + help_note("num_blocks", PLAN) + " (default 2)")
    parser.add_argument("--tokens-per-step", type=int, default=16384,
                        help="tokens per optimizer step, split into micro-batches (default 16384)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="parameter dtype (default bf16)")
    parser.add_argument("--no-kernels", action="store_true", help="plan for the pure-PyTorch path (no lopt_kernels)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS,
                        help="fix the optimizer instead of choosing one" + help_note("optimizer", PLAN))
    parser.add_argument("--recompute", choices=RECOMPUTE, help="fix the recomputation instead of choosing one")
    parser.add_argument("--batch-size", type=int, help="fix the micro-batch instead of choosing one")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="fix the schedule instead of choosing one: interleaved (each micro-batch through every "
                             "block) or sequential (every micro-batch through one block at a time)"
                             + help_note("schedule", PLAN))
    parser.add_argument("--offload", choices=OFFLOAD,
                        help="fix what the host keeps instead of choosing (only when nothing else fits): none, "
                             "optimizer (the optimizer state) or params (weights and optimizer state)"
                             + help_note("offload", PLAN))
    parser.add_argument("--stream-state", action="store_true",
                        help="stream the offloaded optimizer state through each block's step one parameter at a "
                             "time (the device holds one parameter's state; the transfers are not hidden)"
                             + help_note("stream_state", PLAN))
    parser.add_argument("--pcie-bandwidth", type=float, default=PCIE_GB_S, metavar="GB_S",
                        help=f"host<->device bandwidth the transfer estimate assumes, GB/s (default {PCIE_GB_S:g})")
    parser.add_argument("--tflops", type=float, default=TFLOPS,
                        help=f"compute rate the step-time estimate assumes, TFLOP/s (default {TFLOPS:g}, dense bf16)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="plan one rank of `torchrun --nproc-per-node N -m lopt train`: the ranks share the step's "
                             "micro-batches (default 1, one process)")
    parser.add_argument("--shard", action="store_true",
                        help="shard the parameters, gradients and optimizer state over the --nproc ranks (FSDP2, "
                             "`lopt train --shard`); the plan gives one rank's memory" + help_note("shard", PLAN))
    parser.add_argument("--link-bandwidth", type=float, default=LINK_GB_S, metavar="GB_S",
                        help="bus bandwidth of the collectives between ranks that the step-time estimate assumes, GB/s "
                             f"(default {LINK_GB_S:g}, NVLink within a node; PCIe-only cards reach about a tenth)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_zo_plan_arguments(parser)
    return parser


def add_zo_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``lopt plan --method zo``'s flags (``run_zo_plan``): what a ZO step is, the rest searched."""
    parser.add_argument("--method", choices=METHODS, default="lopt",
                        help="plan LoPT's backpropagation (lopt, the default) or zeroth-order training (zo: the "
                             "micro-batch and the directions per step that fit)" + help_note("method", PLAN))
    zo = parser.add_argument_group("zeroth-order (--method zo)")
    zo.add_argument("--zo-kind", choices=ZO_KINDS, help="the directions: lowrank (default), highrank or fullrank")
    zo.add_argument("--zo-rank", type=int, help="rank r of lowrank / highrank directions (default 2 / 128)"
                    + help_note("zo_rank", PLAN))
    zo.add_argument("--zo-first-layer", type=int, help="the first trained decoder layer (default 0)"
                    + help_note("zo_first_layer", PLAN))
    zo.add_argument("--zo-directions", type=int,
                    help="fix the directions per step instead of choosing them (the plan tries 1 to "
                         f"{ZO_MAX_DIRECTIONS})")
    zo.add_argument("--zo-loss", choices=LOSSES,
                    help="what a step scores: causal-lm (every label token; the default) or classification "
                         "(single-token answers at one position, lopt train's embedded sentiment task)")
    zo.add_argument("--zo-candidates", type=int, help="classification: the candidate answers per example (default 2)")


def check_plan_args(args: argparse.Namespace):
    """``UsageError`` (one line) for a ``lopt plan`` flag value no plan can use; ``lopt train``'s bounds."""
    if args.gpu_mem is not None:
        check_number("--gpu-mem", args.gpu_mem, 0, MAX_GPU_MEM_GB, low_open=True)
    check_int("--seq-len", args.seq_len, 2, MAX_SEQ_LEN)
    check_int("--num-blocks", args.num_blocks, 1)
    check_int("--tokens-per-step", args.tokens_per_step, 1, MAX_COUNT)
    if args.batch_size is not None:
        check_int("--batch-size", args.batch_size, 1, MAX_BATCH)
    check_number("--pcie-bandwidth", args.pcie_bandwidth, 0, MAX_RATE, low_open=True)
    check_number("--tflops", args.tflops, 0, MAX_RATE, low_open=True)
    check_number("--link-bandwidth", args.link_bandwidth, 0, MAX_RATE, low_open=True)
    check_int("--nproc", args.nproc, 1, MAX_RANKS)
    fixed = fixed_settings(args)
    refuse(fixed, PLAN)
    # The flags given may still leave no schedule and offload the rules allow together (--stream-state with
    # --schedule interleaved): name the first completion's reason.
    completions = [dict(fixed, schedule=schedule, offload=offload)
                   for schedule in ((args.schedule,) if args.schedule else SCHEDULES)
                   for offload in ((args.offload,) if args.offload else OFFLOAD)]
    if not any(allowed(c) for c in completions):
        refuse(completions[0], PLAN)


def fixed_settings(args: argparse.Namespace) -> dict:
    """The settings ``lopt plan``'s flags fix (what they leave out, the plan chooses)."""
    fixed = dict(shard=args.shard, ranks=args.nproc, stream_state=args.stream_state)
    for key in ("schedule", "offload", "optimizer", "recompute"):
        if getattr(args, key) is not None:
            fixed[key] = getattr(args, key)
    return fixed


def run_plan(args: argparse.Namespace) -> int:
    """``lopt plan``: print the plan; exit status 0 when it fits, 1 when nothing fits."""
    refuse(dict(method=args.method, given=zo_given(args)), PLAN)  # each method's flags only with it
    if args.method == "zo":
        return run_zo_plan(args)
    check_plan_args(args)
    config = load_model_config(args.model)
    shape = model_shape(config)
    refuse(dict(fixed_settings(args), num_blocks=args.num_blocks, layers=shape.layers, tied_head=shape.tied), PLAN)
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else RECIPES[args.recipe]
    search = dict(  # what a flag leaves out is searched, less what lopt.settings refuses with the flags given
        tokens_per_step=args.tokens_per_step, kernels=not args.no_kernels, dtype=args.dtype,
        optimizers=(args.optimizer,) if args.optimizer else None,
        recompute_modes=(args.recompute,) if args.recompute else None,
        batch_sizes=(args.batch_size,) if args.batch_size else None,
        schedules=(args.schedule,) if args.schedule else None, offloads=(args.offload,) if args.offload else None,
        stream_states=(True,) if args.stream_state else None,
        pcie_gb_s=args.pcie_bandwidth, tflops=args.tflops, nproc=args.nproc, shard=args.shard,
        link_gb_s=args.link_bandwidth, name=args.model,
    )
    result = plan(config, gpu_mem, args.seq_len, num_blocks=args.num_blocks, **search)
    if not result.fits:
        result.fitting_num_blocks = fewest_fitting_blocks(config, gpu_mem, args.seq_len, args.num_blocks, **search)
    result.train_model = args.model if trainable_model(args.model) else None
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        print(result.describe())
    return 0 if result.fits else 1


def fewest_fitting_blocks(config, gpu_mem_gb: float, seq_len: int, num_blocks: int, **search) -> int | None:
    """The fewest blocks above ``num_blocks`` with which some setting fits, or None."""
    shape = model_shape(config)
    for k in range(num_blocks + 1, shape.layers + 1):
        if plan(shape, gpu_mem_gb, seq_len, num_blocks=k, **search).fits:
            return k
    return None


def _train_model_config(train_config):
    """The transformers config of the model ``lopt train`` would train (the embedded default's when none)."""
    return load_model_config(train_config.model if train_config.model is not None else TINY)


def apply_recipe(config, recipe: str | None = None, gpu_mem: float | None = None):
    """A copy of the trainer's ``TrainConfig`` with the plan for the card applied.

    The card: ``gpu_mem`` GiB, else the ``recipe``'s (8gb | 12gb | 16gb | 24gb), else the config's own
    ``gpu_mem`` / ``recipe``. The optimizer step keeps the configured number of sequences
    (``batch_size * grad_accum``): the plan only splits it into micro-batches, so a recipe changes the
    memory and the speed, not what is learned. Sets ``batch_size``, ``grad_accum``, ``recompute``,
    ``optimizer``, ``early_lower_step``, ``schedule``, ``offload`` and ``stream_state``. Raises ``UsageError``
    when nothing fits.
    """
    if config.batch_size is None:  # the run's default, filled in as the trainer would
        config = dataclasses.replace(config, batch_size=config.resolved().batch_size)
    recipe = recipe if recipe is not None else getattr(config, "recipe", None)
    gpu_mem = gpu_mem if gpu_mem is not None else getattr(config, "gpu_mem", None)
    if gpu_mem is None:
        if recipe is None:
            raise UsageError("a recipe needs --recipe 8gb|12gb|16gb|24gb or --gpu-mem GB")
        if recipe not in RECIPES:
            raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        gpu_mem = RECIPES[recipe]
    model_config = _train_model_config(config)
    dtype = torch.float32 if getattr(config, "dtype", "auto") == "fp32" else torch.bfloat16
    kernels = True if getattr(config, "kernels", None) is None else bool(config.kernels)
    result = plan(
        model_config, gpu_mem, config.seq_len, num_blocks=config.num_blocks,
        examples_per_step=config.batch_size * config.grad_accum, kernels=kernels, dtype=dtype,
        name=config.model or "the embedded default model",
    )
    if not result.fits:
        raise UsageError(
            f"no setting fits {gpu_mem:g} GiB at --seq-len {config.seq_len} with {config.num_blocks} blocks "
            f"(smallest predicted peak {result.estimate.peak / GiB:.1f} GiB): try a shorter --seq-len or more "
            f"--num-blocks; `lopt plan --model ... --gpu-mem {gpu_mem:g}` shows the breakdown")
    chosen = dict(batch_size=result.batch_size, grad_accum=result.grad_accum, recompute=result.recompute,
                  optimizer=result.optimizer, early_lower_step=result.early_lower_step, schedule=result.schedule,
                  offload=result.offload, stream_state=result.stream_state)
    return dataclasses.replace(config, **chosen)



# ---------------------------------------------------------------------------------------------- ZO (--method zo)

ZO_MAX_DIRECTIONS = 16  # the directions `lopt plan --method zo` searches up to, unless --zo-directions fixes them
ZO_PLAN_FLAGS = ("zo_kind", "zo_rank", "zo_first_layer", "zo_directions", "zo_loss", "zo_candidates")


@dataclass
class ZOPlan:
    """A ZO run's micro-batch and directions for a card, and its predicted memory (``zo_plan``)."""

    model: str
    gpu_mem_gb: float
    seq_len: int
    kind: str
    rank: int
    first_layer: int
    directions: int
    batch_size: int
    grad_accum: int
    loss: str
    candidates: int
    dtype: str
    kernels: bool
    fits: bool
    budget: int
    estimate: ZOMemoryEstimate
    num_params: int
    trained_params: int
    alternatives: list[dict] = field(default_factory=list)
    train_model: str | None = None
    fitting_first_layer: int | None = None  # nothing fits: the lowest --zo-first-layer with which something does
    last_layer_peak: int | None = None  # nothing fits at any first layer: the smallest peak, the last layer trained

    def train_flags(self) -> str:
        flags = (f"--method zo --seq-len {self.seq_len} --batch-size {self.batch_size} --grad-accum {self.grad_accum} "
                 f"--zo-kind {self.kind} --zo-directions {self.directions}")
        if self.kind != "fullrank":
            flags += f" --zo-rank {self.rank}"
        return flags + (f" --zo-first-layer {self.first_layer}" if self.first_layer else "")

    def command(self) -> str:
        model = self.train_model if self.train_model is not None else "CHECKPOINT"
        return f"lopt train --model {model} {self.train_flags()}"

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "estimate"}
        out.update(method="zo", estimate=self.estimate.as_dict(), command=self.command(),
                   examples_per_step=self.batch_size * self.grad_accum)
        return out

    def describe(self) -> str:
        what = {"causal-lm": "causal-LM loss on every label token",
                "classification": f"classification: {self.candidates} candidates scored at one position"}[self.loss]
        status = "fits" if self.fits else "DOES NOT FIT (the setting with the smallest peak is shown)"
        rank = "" if self.kind == "fullrank" else f" rank {self.rank},"
        lines = [
            f"model      {self.model}: {self.num_params / 1e9:.2f}B parameters, {self.dtype}; ZO trains the linears of "
            f"layers {self.first_layer} and up ({self.trained_params / 1e9:.2f}B)",
            f"card       {self.gpu_mem_gb:g} GiB -> {self.budget / GiB:.2f} GiB usable "
            f"({SAFETY_FRACTION:.0%} margin for the allocator, {CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context)", "",
            f"plan       {status}",
            f"  micro-batch {self.batch_size} x grad-accum {self.grad_accum} = {self.batch_size * self.grad_accum} "
            f"sequences of {self.seq_len} per step, {self.directions} direction(s): each micro-batch scored under "
            f"{2 * self.directions} perturbations in one forward",
            f"  {self.kind},{rank} first layer {self.first_layer}; {what}; padded batches; kernels "
            f"{'on' if self.kernels else 'off'}", "",
            "predicted memory of a ZO step (peak of memory_allocated; the parts live at the peak):",
            self.estimate.table(), ""]
        if self.fitting_first_layer is not None:
            k = self.fitting_first_layer
            lines += [f"with --zo-first-layer {k} a setting fits (`lopt plan ... --zo-first-layer {k}` shows it); the "
                      "first trained layer changes what ZO trains, so the plan does not choose it", ""]
        if self.last_layer_peak is not None:
            lines += [f"no --zo-first-layer fits: training the last layer alone, one sequence per micro-batch and one "
                      f"direction, needs {self.last_layer_peak / GiB:.2f} GiB (the weights alone "
                      f"{self.estimate.weights / GiB:.2f} GiB)", ""]
        if self.alternatives:
            lines.append("other settings that fit (per micro-batch, the most directions):")
            lines += [f"  micro-batch {a['batch_size']:>4} x {a['grad_accum']:<4} up to {a['directions']:>2} "
                      f"direction(s)  {a['peak'] / GiB:8.2f} GiB" for a in self.alternatives]
            lines.append("")
        lines.append(self.command())
        if self.train_model is None:
            lines.append(f"  (CHECKPOINT: a local Hugging Face directory or .gguf file of {self.model}; the plan "
                         "used its shape, which has no weights)")
        return "\n".join(lines)


def zo_plan(
    config,
    gpu_mem_gb: float,
    seq_len: int,
    *,
    tokens_per_step: int = 16384,
    examples_per_step: int | None = None,
    kind: str = "lowrank",
    rank: int | None = None,
    first_layer: int = 0,
    directions: int | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    loss: str = "causal-lm",
    candidates: int = 2,
    padded: bool = True,
    dtype=torch.bfloat16,
    kernels: bool = True,
    safety: float = SAFETY_FRACTION,
    context_bytes: int = CUDA_CONTEXT_BYTES,
    name: str | None = None,
) -> ZOPlan:
    """The micro-batch and the number of directions of a ZO run (``lopt.zo``) that fit the card.

    The step scores ``examples_per_step`` sequences (default ``tokens_per_step / seq_len``, at least 1), split
    into ``grad_accum`` micro-batches of ``batch_size`` (a divisor, so every setting scores the same examples: the
    micro-batches share the step's directions and L± are weighted over all of them). The rule: the largest
    micro-batch that fits (the most examples per stacked forward: fewer, larger forwards), then with it the most
    directions that fit, up to ``ZO_MAX_DIRECTIONS`` (``directions`` fixes them). More directions cost a forward
    of the micro-batch per direction and sign, so they are taken only where the largest micro-batch leaves room.
    ``kind``, ``rank``, ``first_layer`` (they change what is trained), ``loss`` and ``padded`` are given; each
    setting is priced by ``estimate_zo_memory``. Nothing fits: the smallest peak, ``fits=False``."""
    shape = model_shape(config)
    if examples_per_step is None:
        examples_per_step = max(1, round(tokens_per_step / seq_len))
    if batch_sizes is None:
        batch_sizes = tuple(b for b in range(examples_per_step, 0, -1) if examples_per_step % b == 0)
    budget = usable_bytes(gpu_mem_gb, safety=safety, context_bytes=context_bytes)
    priced = []
    for batch_size in batch_sizes:
        grad_accum = max(1, math.ceil(examples_per_step / batch_size))
        for p in (directions,) if directions else range(1, ZO_MAX_DIRECTIONS + 1):
            est = estimate_zo_memory(shape, seq_len=seq_len, batch_size=batch_size, kind=kind, directions=p,
                                     rank=rank, first_layer=first_layer, micro_batches=grad_accum, loss=loss,
                                     candidates=candidates, padded=padded, dtype=dtype, kernels=kernels)
            priced.append(dict(batch_size=batch_size, grad_accum=grad_accum, directions=p, peak=est.peak, estimate=est))
    fitting = sorted((c for c in priced if c["peak"] <= budget),
                     key=lambda c: (-c["batch_size"], -c["directions"], c["peak"]))
    best = fitting[0] if fitting else min(priced, key=lambda c: c["peak"])
    most = {}  # per micro-batch, the most directions that fit
    for c in fitting:
        most.setdefault(c["batch_size"], c)
    est = best["estimate"]
    trained = (shape.layers - first_layer) * sum(lin.numel for lin in layer_linears(shape))
    return ZOPlan(
        model=name or shape.name or "model", gpu_mem_gb=gpu_mem_gb, seq_len=seq_len, kind=kind,
        rank=est.settings["rank"], first_layer=first_layer, directions=best["directions"],
        batch_size=best["batch_size"], grad_accum=best["grad_accum"], loss=loss, candidates=candidates,
        dtype="bf16" if dtype_bytes(dtype) == 2 else "fp32", kernels=kernels, fits=bool(fitting), budget=budget,
        estimate=est, num_params=shape.total_params(1), trained_params=trained,
        alternatives=[{k: v for k, v in c.items() if k != "estimate"} for c in list(most.values())[1:6]])


def lowest_fitting_first_layer(config, gpu_mem_gb: float, seq_len: int, first_layer: int, **search) -> int | None:
    """The lowest first trained layer above ``first_layer`` with which some setting fits, or None."""
    shape = model_shape(config)
    for k in range(first_layer + 1, shape.layers):
        if zo_plan(shape, gpu_mem_gb, seq_len, first_layer=k, **search).fits:
            return k
    return None


def zo_given(args: argparse.Namespace) -> tuple[str, ...]:
    """The settings of one method that ``lopt plan``'s flags give (``lopt.settings``' rule refuses the other's)."""
    zo = [key for key in ZO_PLAN_FLAGS if getattr(args, key) is not None]
    lopt = [key for key in ("optimizer", "recompute", "schedule", "offload") if getattr(args, key) is not None]
    lopt += [key for key in ("stream_state", "shard") if getattr(args, key)]
    return tuple(zo + lopt + (["num_blocks"] if args.num_blocks != 2 else []))


def run_zo_plan(args: argparse.Namespace) -> int:
    """``lopt plan --method zo``: print the ZO plan; exit status 0 when it fits, 1 when nothing fits."""
    if args.gpu_mem is not None:
        check_number("--gpu-mem", args.gpu_mem, 0, MAX_GPU_MEM_GB, low_open=True)
    check_int("--seq-len", args.seq_len, 2, MAX_SEQ_LEN)
    check_int("--tokens-per-step", args.tokens_per_step, 1, MAX_COUNT)
    for flag, value, low, high in (("--batch-size", args.batch_size, 1, MAX_BATCH),
                                   ("--zo-directions", args.zo_directions, 1, MAX_BATCH),
                                   ("--zo-rank", args.zo_rank, 1, None),
                                   ("--zo-first-layer", args.zo_first_layer, 0, None),
                                   ("--zo-candidates", args.zo_candidates, 1, MAX_BATCH)):
        if value is not None:
            check_int(flag, value, low, high)
    config = load_model_config(args.model)
    shape = model_shape(config)
    kind = args.zo_kind or "lowrank"
    rank = args.zo_rank if kind != "fullrank" else None
    first_layer = args.zo_first_layer or 0
    widths = [n for lin in layer_linears(shape) for n in (lin.out, lin.inp)]
    refuse(dict(zo_first_layer=first_layer, layers=shape.layers, zo_rank=rank, min_width=min(widths)), PLAN)
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else RECIPES[args.recipe]
    search = dict(tokens_per_step=args.tokens_per_step, kind=kind, rank=rank, directions=args.zo_directions,
                  batch_sizes=(args.batch_size,) if args.batch_size else None, loss=args.zo_loss or "causal-lm",
                  candidates=args.zo_candidates or 2, dtype=args.dtype, kernels=not args.no_kernels, name=args.model)
    result = zo_plan(config, gpu_mem, args.seq_len, first_layer=first_layer, **search)
    if not result.fits:
        result.fitting_first_layer = lowest_fitting_first_layer(config, gpu_mem, args.seq_len, first_layer, **search)
        if result.fitting_first_layer is None:
            last = zo_plan(config, gpu_mem, args.seq_len, first_layer=shape.layers - 1, **search)
            result.last_layer_peak = last.estimate.peak
    result.train_model = args.model if trainable_model(args.model) else None
    print(json.dumps(result.as_dict(), indent=2, default=str) if args.json else result.describe())
    return 0 if result.fits else 1
