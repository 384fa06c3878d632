"""``lopt eval``: a model's held-out task score and retention, and for a ``lopt train`` run, its own task.

``--model`` is a run directory (it holds the ``config.json`` that ``lopt train`` wrote, and ``final/``), a
run's ``final/``, or any model ``lopt train --model`` takes. For a run, the defaults are the run's: its
held-out rows (``_held_out``), its ``--seq-len``, ``--batch-size`` and ``--eval-max-examples``, and as the
KL reference the model it started from, when that loads offline (``_reference``). So ``lopt eval --model
RUN`` repeats the run's final evaluation (``eval.json``) on its ``final/`` weights. ``plan`` settles all of
that before any model loads; the reference is loaded, asked its answers and freed before the measured
model loads, so the two are never in memory together. Every phase that can take a while says on stderr
what it does and how long it took (``Phases``, ``counting``). For users: docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lopt.config import (
    EVAL_MAX_EXAMPLES,
    MAX_BATCH,
    MAX_COUNT,
    MAX_SEQ_LEN,
    TrainConfig,
    check_int,
    default_model,
)
from lopt.errors import UsageError
from lopt.models.loading import NAMES, TINY, ModelSource, resolve_model

# Without a run: the settings ``lopt eval`` has always had (8 is also lopt train's batch size for a real model).
SEQ_LEN, BATCH_SIZE = 128, 8
# What tells a run's config.json from a Hugging Face model's: these TrainConfig fields, and no model_type.
RUN_CONFIG_KEYS = ("num_blocks", "lambda_aux", "output_dir", "seq_len")
PREFIX = "lopt eval:"
BARS = None  # tqdm's ``disable``: None shows the progress bars on a terminal only (the tests set False)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="the model to measure: a lopt train run directory or its final/ (measured on the run's "
                        "own held-out task, with its settings), or any model lopt train --model takes")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--reference", metavar="PATH",
                           help="the model KL is measured from (same tokenizer), e.g. the checkpoint before training; "
                           "default: for a run, the model it started from (its --model) when that loads offline, "
                           "else no KL")
    reference.add_argument("--no-reference", action="store_true",
                           help="no KL, not even from a run's original model (saves a model load)")
    parser.add_argument("--data", metavar="FILE",
                        help="held-out data (lopt train --data formats); default: a run's own held-out rows (its "
                        "--eval-data, the rows --eval-split held out of its --data, or the embedded task's held-out "
                        "split), and for --model tiny the toy's SFT held-out split; any other model needs it")
    parser.add_argument("--seq-len", type=int, help="truncate examples, and chunk the general text, to this many "
                        f"tokens (default: the run's --seq-len, else {SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, help="examples per forward pass (default: the run's --batch-size, "
                        f"else {BATCH_SIZE})")
    parser.add_argument("--eval-max-examples", type=int, help="held-out examples whose answers are generated for "
                        f"exact match (default: the run's, else {EVAL_MAX_EXAMPLES})")
    parser.add_argument("--output", metavar="FILE", help="also write the measures (and what was measured) to this "
                        "JSON file")


# ================================================================================= what to measure


@dataclasses.dataclass
class Run:
    """A ``lopt train`` output directory: where it is, its settings, and whether its config names an
    ``eval_split`` at all (a run from before ``--eval-split`` existed trained on every row of its data)."""

    path: Path
    config: TrainConfig
    has_eval_split: bool

    @property
    def final(self) -> Path:
        return self.path / "final"


@dataclasses.dataclass
class Plan:
    """Everything ``lopt eval`` will do, settled before anything heavy loads."""

    model: ModelSource
    run: Run | None
    held_out: str  # what the held-out rows are, in words
    rows: Callable[[], list[dict]]  # reads the held-out rows
    seq_len: int
    batch_size: int
    eval_max_examples: int
    reference: ModelSource | None
    reference_seed: int  # the toy's init seed (its weights are built from it)
    reference_why: str  # in words: which reference, or why there is none
    reference_given: bool  # --reference (a vocabulary mismatch is an error) or the run's original (a note)


def plan(args: argparse.Namespace) -> Plan:
    """Check every flag and path, read a run's settings, and decide what is measured; loads no model."""
    # Every flag is checked before anything loads (the bounds are lopt train's).
    for flag, value, low, high in (("--seq-len", args.seq_len, 2, MAX_SEQ_LEN), ("--batch-size", args.batch_size, 1,
                                   MAX_BATCH), ("--eval-max-examples", args.eval_max_examples, 0, MAX_COUNT)):
        if value is not None:
            check_int(flag, value, low, high)
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir() or not output.parent.is_dir():
            raise UsageError(f"--output {args.output}: give a file in an existing directory")
    run = find_run(args.model)
    model = resolve_model(run.final if run else args.model)  # a bad path fails before anything loads
    if run is None:
        _refuse_training_checkpoint(model)
    held_out, rows = _held_out(args, run, model)
    cfg = run.config if run else None
    seq_len = _first(args.seq_len, cfg and cfg.seq_len, SEQ_LEN)
    batch_size = _first(args.batch_size, cfg and cfg.batch_size, BATCH_SIZE)
    eval_max_examples = _first(args.eval_max_examples, cfg and cfg.eval_max_examples, EVAL_MAX_EXAMPLES)
    reference, seed, why = _reference(args, run)
    return Plan(model, run, held_out, rows, seq_len, batch_size, eval_max_examples, reference, seed, why,
                args.reference is not None)


def _first(*values):
    return next(v for v in values if v is not None)


def find_run(spec: str) -> Run | None:
    """The run that ``spec`` is, or whose ``final/`` it is; None for anything else (a model)."""
    if spec == TINY or not Path(spec).expanduser().is_dir():
        return None
    path = Path(spec).expanduser()
    if _run_config(path) is not None:
        run = _read_run(path)
        if not (run.final / "config.json").is_file():
            raise UsageError(f"{spec} is a lopt run directory without final/: its run has not finished (lopt train "
                             f"--output-dir {spec} --resume finishes it)")
        return run
    final = path if path.name == "final" else path.resolve()  # ./ inside final/ too, and runs/lopt/final kept short
    if final.name == "final" and _run_config(final.parent) is not None:
        return _read_run(final.parent)
    return None


def _run_config(path: Path) -> dict | None:
    """``path/config.json`` as a dict when it is a ``lopt train`` run's (not a Hugging Face model's)."""
    try:
        fields = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(fields, dict) or "model_type" in fields or not all(k in fields for k in RUN_CONFIG_KEYS):
        return None
    return fields


def _read_run(path: Path) -> Run:
    try:
        config = TrainConfig.from_json(path / "config.json")
    except (ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"{path / 'config.json'} is damaged ({str(error).splitlines()[0]}): lopt eval cannot tell "
                         "which task the run trained on; pass --model its final/ with --data FILE") from None
    if config.model is None:  # lopt train saves its resolved settings; an older or hand-written config may not
        config = dataclasses.replace(config, model=default_model())
    if (base := _training_dir(path, config.output_dir)) is not None:
        config = dataclasses.replace(config, **{name: _from(base, getattr(config, name))
                                                for name in ("model", "data", "eval_data")})
    return Run(path, config, "eval_split" in _run_config(path))


def _training_dir(run: Path, output_dir: str) -> Path | None:
    """The directory ``lopt train`` ran in, when the run is still where its relative ``--output-dir`` put it
    (``/work/runs/lopt`` for ``runs/lopt``: ``/work``); None when that cannot be told."""
    given = Path(os.path.normpath(Path(output_dir).expanduser()))
    if given.is_absolute() or ".." in given.parts:
        return None
    run = run.resolve()
    if given.parts and run.parts[-len(given.parts):] != given.parts:
        return None  # the run was moved (or renamed) since
    return run.parents[len(given.parts) - 1] if given.parts else run


def _from(base: Path, spec: str | None) -> str | None:
    """A relative path of the run's config, as ``lopt train`` read it from its own directory (when it is there)."""
    if spec is None or spec in NAMES or Path(spec).expanduser().is_absolute() or not (base / spec).exists():
        return spec  # an absolute path, a name, a hub id, or gone
    return os.path.normpath(base / spec)


def _refuse_training_checkpoint(model: ModelSource):
    if model.kind == "directory" and (Path(model.location) / "state.pt").is_file():
        raise UsageError(f"{model.spec} is a training checkpoint (lopt train --resume reads it), not a model: give "
                         "lopt eval the run directory or its final/")


def _held_out(args, run: Run | None, model: ModelSource):
    """``(description, () -> rows)`` of the held-out rows, their source checked (not read) now: ``--data``;
    else, for a run, its ``--eval-data``; else, with its own ``--data``, the rows ``--eval-split`` held out of
    that data (none for a run that trained on every row: then ``--data`` is needed); else the held-out split
    of the embedded task it trained (``lopt.data.embedded.default_rows``). Without a run only ``tiny`` has a
    task of its own (its SFT held-out split, as for ``lopt train --model tiny``)."""
    from lopt.data.classification import looks_like_classification
    from lopt.data.sft import check_data_source, load_rows

    if args.data is not None:
        check_data_source(args.data)
        return args.data, lambda: load_rows(args.data)
    if run is None:
        if model.kind != "tiny":
            raise UsageError(f"--model {args.model} is not a lopt train run, so lopt eval cannot tell its task: give "
                             "--data FILE with held-out rows (lopt train --data formats), or the run directory")
        return ("the toy's SFT held-out split (what lopt train --model tiny trains on)",
                lambda: _default_rows(TrainConfig(model=TINY)))
    cfg, where = run.config, run.path
    if cfg.method == "zo" and (cfg.data is None or looks_like_classification(cfg.data)):
        raise UsageError(f"the run in {where} trained a classification task (lopt train --method zo), which lopt eval "
                         f"does not score yet: {where / 'eval.json'} holds its accuracy and retention before and after; "
                         "--data FILE with held-out rows in lopt train's SFT formats evaluates it on those")
    if cfg.eval_data is not None:
        _check_run_data(cfg.eval_data, "--eval-data", where)
        return f"{cfg.eval_data} (the run's --eval-data)", lambda: load_rows(cfg.eval_data)
    if cfg.data is None:
        task = "the embedded SFT set" if cfg.embedded_model else "the embedded record task"
        return f"{task}'s held-out split (the run's task)", lambda: _default_rows(cfg)
    share = getattr(cfg, "eval_split", 0) if run.has_eval_split else 0
    if not share:
        raise UsageError(f"the run in {where} trained on every row of {cfg.data} (no --eval-data), so it has no "
                         "held-out rows: give --data FILE with held-out rows of that task")
    _check_run_data(cfg.data, "--data", where)
    held = _split_held_out(cfg, where)  # read now: whether the run held any rows out is part of the plan
    return f"the rows of {cfg.data} the run held out (--eval-split {share:g})", lambda: held


def _check_run_data(source: str, flag: str, where: Path):
    from lopt.data.sft import check_data_source

    try:
        check_data_source(source)
    except UsageError:
        raise UsageError(f"the run's {flag} {source} (in {where / 'config.json'}) is not found from here: run lopt "
                         "eval from the directory lopt train ran in, or give --data FILE") from None


def _default_rows(cfg: TrainConfig) -> list[dict]:
    from lopt.data.embedded import default_rows  # what lopt train holds out when it has no --data

    return default_rows(cfg)[1]


def _split_held_out(cfg: TrainConfig, where: Path) -> list[dict]:
    from lopt.data.sft import load_rows, split_rows  # the split lopt train made: the same rows, the same seed

    _, held = split_rows(load_rows(cfg.data), cfg.eval_split, cfg.seed)
    if held is None:
        raise UsageError(f"the run in {where} trained on every row of {cfg.data} (too few rows to hold any out), so "
                         "it has no held-out rows: give --data FILE with held-out rows of that task")
    return held


def _reference(args, run: Run | None) -> tuple[ModelSource | None, int, str]:
    """``(source, seed, in words)`` of the KL reference, or ``(None, 0, why not)``.

    For a run, by default its original model (its ``--model``) when that loads offline: the toy, a local
    directory or GGUF, a hub id already in the local cache; else a note and no KL. It costs one more model
    load and 24 short generations (about as long as the measured model's own retention measures), and stays
    on by default because it is what makes the KL comparable with the run's ``eval.json``."""
    if args.reference is not None:
        return resolve_model(args.reference), 0, f"{args.reference} (--reference)"
    if args.no_reference:
        return None, 0, "none (--no-reference)"
    if run is None:
        return None, 0, "none (no --reference)"
    original, seed = run.config.model, run.config.seed
    try:
        source = resolve_model(original)
    except UsageError as error:
        return None, 0, f"none: the run's original model is not available here ({error}); --reference PATH gives one"
    if source.kind == "hub":
        cached = _cached_hub_model(original)
        if cached is None:
            return None, 0, (f"none: the run's original model {original} is not in the local Hugging Face cache "
                             "(lopt eval does not download it); --reference PATH gives one")
        source = ModelSource(original, "directory", cached)
    return source, seed, f"{original} (the run's original model; --reference PATH for another, --no-reference: none)"


def _cached_hub_model(repo_id: str) -> str | None:
    """The local snapshot directory of a cached hub model, or None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(config).parent) if isinstance(config, str) else None


# ================================================================================= measuring


class Phases:
    """Each phase's line on stderr before it starts, and again with its seconds after; the seconds are kept."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"{PREFIX} {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        self.seconds[name] = seconds = round(time.perf_counter() - started, 1)
        print(f"{PREFIX} {name} ... {seconds:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def counting(hf_model, total: int, unit: str, *, generations: bool = False):
    """A progress bar (on a terminal) of ``total`` rows: the rows of each forward pass of ``hf_model``, or of
    each ``generate`` call with ``generations``. The loops themselves are ``lopt.measures.evaluation``'s."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit=unit, leave=False, disable=BARS, file=sys.stderr, dynamic_ncols=True)

    def rows(args, kwargs) -> int:
        ids = kwargs.get("input_ids", args[0] if args else None)
        return len(ids) if ids is not None else 0

    if generations:
        generate = hf_model.generate

        def counted_generate(*args, **kwargs):
            out = generate(*args, **kwargs)
            bar.update(rows(args, kwargs))
            return out

        hf_model.generate = counted_generate
        undo = lambda: delattr(hf_model, "generate")  # noqa: E731 (the class's method is back)
    else:
        def counted_forward(_module, args, kwargs, _output):
            bar.update(rows(args, kwargs))  # and returns None: a hook's non-None result replaces the output

        undo = hf_model.register_forward_hook(counted_forward, with_kwargs=True).remove
    try:
        yield bar
    finally:
        undo()
        bar.close()


def run_eval(args: argparse.Namespace) -> int:
    """``lopt eval``: the measures on stdout (and in ``--output``); phases on stderr."""
    todo = plan(args)
    from transformers.utils import logging as hf_logging

    from lopt.data.sft import eval_examples, rows_to_conversations, tokenize_conversations
    from lopt.measures.evaluation import task_score
    from lopt.models.loading import load_tokenizer_and_config, load_weights
    from lopt.measures.retention import GENERAL_PROMPTS, RetentionProbe, general_text, text_nll

    hf_logging.disable_progress_bar()  # transformers' own loading bars: the phases are named here
    phase = Phases()
    seq_len, batch_size = todo.seq_len, todo.batch_size
    tokenizer, model_config = load_tokenizer_and_config(todo.model)  # quick (a GGUF says when it converts)
    with phase(f"reading the held-out rows: {todo.held_out}"):
        rows = todo.rows()
        conversations, skipped = rows_to_conversations(rows, todo.held_out)
        held_out = (tokenize_conversations(conversations, tokenizer, seq_len),
                    eval_examples(conversations, tokenizer, seq_len))
    if skipped:
        print(f"lopt: note: skipped {skipped} of {len(rows)} held-out rows without a text answer", file=sys.stderr)

    probe = None
    # The reference first, freed before the model loads: never two models in memory.
    reference_model = _load_reference(todo, tokenizer, phase) if todo.reference is not None else None
    if reference_model is not None:
        with phase(f"the reference's answers to {len(GENERAL_PROMPTS)} general prompts"):
            with counting(reference_model, len(GENERAL_PROMPTS), "answer", generations=True):
                probe = RetentionProbe(reference_model, tokenizer, seq_len, batch_size)
        del reference_model  # the probe keeps what KL needs: the reference's answers and log-probabilities
        gc.collect()

    with phase(f"loading the model {todo.model.spec}"):
        model = load_weights(todo.model, model_config)
    examples, prompts = held_out
    with phase(f"scoring {len(examples)} held-out examples"), counting(model, len(examples), "example"):
        result = task_score(model, tokenizer, (examples, []), batch_size, 0)
    generated = min(len(prompts), todo.eval_max_examples)
    if generated:
        with phase(f"generating {generated} answers"), counting(model, generated, "answer", generations=True):
            answers = task_score(model, tokenizer, ([], prompts), batch_size, todo.eval_max_examples)
        result.update({k: answers[k] for k in ("exact_match", "correct", "num_generated", "samples")})

    if probe is None:
        chunks = general_text(tokenizer, seq_len)
        with phase(f"general-text NLL on {chunks.numel()} tokens"), counting(model, len(chunks), "chunk"):
            result.update(general_nll=text_nll(model, chunks, batch_size), general_tokens=chunks.numel())
    else:
        with phase(f"KL from the reference and own answers on {len(GENERAL_PROMPTS)} general prompts, "
                   f"general-text NLL on {probe.chunks.numel()} tokens"):
            result.update(probe.measure(model))

    result.update(model=todo.model.spec, run=str(todo.run.path) if todo.run else None, held_out=todo.held_out,
                  reference=todo.reference.spec if todo.reference else None, seq_len=seq_len, batch_size=batch_size,
                  eval_max_examples=todo.eval_max_examples, phase_s=phase.seconds)
    print("\n".join(result_lines(todo, result)))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _load_reference(todo: Plan, tokenizer, phase: Phases):
    """The reference model, or None (and a note) when the run's original, which lopt eval chose itself, does
    not load or has another vocabulary; an explicit ``--reference`` that does not is an error."""
    from lopt.models.loading import load_tokenizer_and_config, load_weights

    try:
        reference_tokenizer, reference_config = load_tokenizer_and_config(todo.reference)
        if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"the reference {todo.reference.spec} has another vocabulary than --model "
                             f"{todo.model.spec}: KL needs the same tokenizer")
        with phase(f"loading the reference {todo.reference.spec}"):
            return load_weights(todo.reference, reference_config, seed=todo.reference_seed)
    except UsageError as error:
        if todo.reference_given:
            raise
        todo.reference, todo.reference_why = None, f"none: {error} (--reference PATH gives one)"
        print(f"lopt: note: no KL: {error}", file=sys.stderr)
        return None


def result_lines(todo: Plan, result: dict) -> list[str]:
    """What ``lopt eval`` prints on stdout: what was measured, then the measures."""
    from lopt.measures.retention import MEASURES

    settings = f"--seq-len {todo.seq_len}, --batch-size {todo.batch_size}"
    settings += " (the run's, unless given)" if todo.run else ""
    lines = [f"model: {todo.model.spec}" + (f" (the run in {todo.run.path})" if todo.run else ""),
             f"held-out: {result['num_examples']} examples of {todo.held_out}; {settings}",
             f"reference: {todo.reference_why}"]
    if result.get("num_generated"):
        lines.append(f"exact match: {result['exact_match']:.1%} ({result['correct']}/{result['num_generated']})")
    else:
        lines.append("exact match: not measured (--eval-max-examples 0)")
    lines += [f"task loss: {result['loss']:.4f}", f"general-text NLL: {result['general_nll']:.4f}"]
    if "kl" in result:
        lines.append(f"KL from the reference: {result['kl']:.4f} (NLL of its answers {result['answer_nll']:.4f})")
    shown = {"exact_match", "loss", "general_nll", "kl", "answer_nll"}
    lines += [f"{name}: {fmt.format(result[key])}" for name, key, fmt in MEASURES if key in result and key not in shown]
    return lines
