"""The retention study, one command: ``python -m benchmarks.retention.run``.

For every method (``methods.py``): a learning-rate sweep on seed 0, the best rate picked by held-out
exact match (then by the lowest KL, then by held-out loss), then the other seeds at that rate. Every method gets the same
model, data (the embedded record task, written once into the results directory), steps, batch and
sequence length. Each run is its own process and leaves one JSON in ``--results-dir``; a run whose
JSON exists is skipped, so the study resumes where it stopped. ``python -m benchmarks.retention.report``
turns the directory into the committed table and plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lopt.config import REAL_DEFAULT

from .methods import METHODS

# The real default's run (`lopt train` with no arguments), for every method.
DEFAULTS = dict(model="smollm2-135m-instruct", steps=REAL_DEFAULT["max_steps"], batch_size=REAL_DEFAULT["batch_size"],
                seq_len=64, seeds=3, eval_max_examples=REAL_DEFAULT["eval_max_examples"])


def run_path(results_dir: Path, method: str, lr: float, seed: int) -> Path:
    return results_dir / f"{method.replace('/', '_')}-lr{lr:g}-seed{seed}.json"


def best_lr(results: list[dict]) -> float:
    """The sweep's pick: highest held-out exact match, then, among the rates that reach it, the lowest KL
    from the original (the study compares retention at equal task score), then the lowest held-out loss."""
    best = max(results, key=lambda r: (r["after"]["exact_match"], -r["after"]["kl"], -r["after"]["loss"]))
    return best["spec"]["lr"]


def _write_data(results_dir: Path) -> tuple[str, str]:
    from lopt.data.embedded import record_splits

    paths = []
    for name, rows in zip(("train", "held_out"), record_splits()):
        path = results_dir / f"data-{name}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths[0], paths[1]


def _run(spec: dict, in_process: bool) -> dict:
    if in_process:
        from .one import run

        return run(spec)
    subprocess.run([sys.executable, "-m", "benchmarks.retention.one", "--spec", json.dumps(spec)], check=True)
    return json.loads(Path(spec["output"]).read_text())


def study(results_dir: Path, methods: list[str], lrs: list[float] | None = None, in_process: bool = False,
          **settings) -> dict[str, list[dict]]:
    """Run (or find) every run of the study; returns each method's runs."""
    settings = {**DEFAULTS, **settings}
    results_dir.mkdir(parents=True, exist_ok=True)
    train_file, held_out_file = _write_data(results_dir)
    common = dict(model=settings["model"], steps=settings["steps"], batch_size=settings["batch_size"],
                  seq_len=settings["seq_len"], eval_max_examples=settings["eval_max_examples"],
                  train_file=train_file, held_out_file=held_out_file)
    done = {}
    for name in methods:
        method = METHODS[name]

        def get(lr, seed):
            path = run_path(results_dir, name, lr, seed)
            if path.exists():
                return json.loads(path.read_text())
            print(f"retention study: {name} lr {lr:g} seed {seed}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            result = _run(dict(common, method=name, lr=lr, seed=seed, output=str(path)), in_process)
            print(f"retention study: {name} lr {lr:g} seed {seed} done in {time.perf_counter() - started:.0f}s: "
                  f"exact match {result['after']['exact_match']:.1%}, KL {result['after']['kl']:.4f}",
                  file=sys.stderr, flush=True)
            return result

        sweep = [get(lr, 0) for lr in (lrs or method.lrs)]
        lr = best_lr(sweep)
        done[name] = [r for r in sweep if r["spec"]["lr"] == lr] + [get(lr, s) for s in range(1, settings["seeds"])]
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default="benchmarks/results/retention-runs")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--lrs", help="comma-separated learning rates for every method's sweep (default: each "
                        "method's own, see methods.py)")
    parser.add_argument("--in-process", action="store_true", help="run in this process (tests; tokens/s and "
                        "peak memory are then not each run's own)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    settings = {k: getattr(args, k) for k in DEFAULTS}
    study(Path(args.results_dir), methods, lrs, args.in_process, **settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
