"""The ZO study, one command: ``python -m benchmarks.zo_study.run`` (issue 23 item 4).

SmolLM2-135M-Instruct on the embedded sentiment task (``lopt.data.sentiment``: 1,000 training rows, 200
held-out rows from other word families), every method of ``methods.py`` given the same wall-clock budget of
training on this machine (``--budget-s``: the time of its steps, data collation included; the evaluations at
the checkpoints are not counted) and the same batches of 16 (the training rows in an order drawn from the
run's seed; a method gets through as many of them as its speed allows).

Plan: a learning-rate sweep on seed 0 (each method's ``lrs``), the best rate picked by held-out accuracy (then
the lowest KL), then seeds 1.. at that rate: end-to-end and the best ZO variant first, then the others. Each
run leaves one JSON in ``--results-dir``; a run whose JSON exists is skipped, so the study resumes where it
stopped. The runs share one process: the retention reference (the original model's answers and
log-probabilities on the general prompts) and the original's measures are computed once (``original.json``)
and the model is reloaded for every run. ``python -m benchmarks.zo_study.report`` makes the table and plot.

Measures per run: held-out accuracy and candidate loss (``lopt.measures.classification.accuracy``) at the
checkpoints and at the end; retention at the end (``lopt.measures.retention.RetentionProbe``: KL from the
original on general prompts, general-text NLL, own answers); peak memory as exact bytes of live tensors
(``benchmarks.e2e.bytecount.ByteCounter``) during the first step: weights, optimizer / ZO state, gradients,
activations; seconds per step (median, the first step left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.retention.run import run_path

from .methods import METHODS, ZO_METHODS, Trainer

DEFAULTS = dict(model="smollm2-135m-instruct", budget_s=120.0, batch_size=16, seeds=3, eval_rows=200,
                train_rows=1000, checkpoints=4, probe_batch=16)
PRIORITY = ("e2e",)  # seeds 1.. run first for these, then the best ZO variant, then the rest


def load_average() -> float:
    return os.getloadavg()[0]


class Task:
    """The data, the original model's measures and the retention probe, shared by every run."""

    def __init__(self, model: str, eval_rows: int, train_rows: int, batch_size: int, results_dir: Path,
                 probe_batch: int | None = None):
        from lopt.data.classification import SST2_LABEL_WORDS, parse_rows, tokenize_classification
        from lopt.data.sentiment import sentiment_rows
        from lopt.measures.classification import accuracy
        from lopt.measures.evaluation import pad_id
        from lopt.measures.retention import RetentionProbe
        from lopt.models.loading import load_model
        from lopt.training.setup import BYTE_LABEL_WORDS

        self.model_name, self.batch_size = model, batch_size
        words = BYTE_LABEL_WORDS if model == "tiny" else SST2_LABEL_WORDS  # the toy's tokens are bytes
        hf, tokenizer, _ = load_model(model)
        self.tokenizer, self.pad = tokenizer, pad_id(tokenizer)
        self.train = tokenize_classification(parse_rows(sentiment_rows("train", train_rows, seed=0), label_words=words),
                                             tokenizer)
        self.held_out = tokenize_classification(parse_rows(sentiment_rows("eval", eval_rows, seed=0),
                                                           label_words=words), tokenizer)
        hf.eval()
        self.probe = RetentionProbe(hf, tokenizer, 64, probe_batch or batch_size)
        path = results_dir / "original.json"
        if path.exists():
            self.original = json.loads(path.read_text())
        else:
            score = accuracy(hf, self.held_out, batch_size, self.pad)
            self.original = dict(accuracy=score.accuracy, loss=score.loss, **_retention(self.probe.measure(hf, as_built=True)))
            path.write_text(json.dumps(self.original, indent=2) + "\n")

    def batches(self, seed: int):
        """Batches of ``batch_size`` training rows, epoch after epoch, in an order drawn from ``seed``."""
        from lopt.data.classification import collate_classification

        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self.train), generator=g).tolist()
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield collate_classification([self.train[j] for j in order[i : i + self.batch_size]], self.pad)

    def score(self, model) -> dict:
        from lopt.measures.classification import accuracy

        s = accuracy(model, self.held_out, self.batch_size, self.pad)
        return dict(accuracy=s.accuracy, loss=s.loss)


def _retention(measured: dict) -> dict:
    keys = ("general_nll", "kl", "answer_nll", "answer_agreement", "first_token_agreement", "answer_kept")
    return {k: measured[k] for k in keys if k in measured}


def run_one(task: Task, name: str, lr: float, seed: int, budget_s: float, checkpoints: int) -> dict:
    """Train ``name`` at ``lr`` from the original weights for ``budget_s`` seconds of steps; measure it."""
    from benchmarks.e2e.bytecount import ByteCounter
    from lopt.models.loading import load_model

    method = METHODS[name]
    torch.manual_seed(seed)
    model = load_model(task.model_name).model
    trainer = Trainer(method, model, lr, seed, task.pad)
    load_before = load_average()
    marks = [budget_s * (i + 1) / checkpoints for i in range(checkpoints - 1)]
    curve = [dict(train_s=0.0, steps=0, **{k: task.original[k] for k in ("accuracy", "loss")})]
    losses, times, clock, diverged, peak = [], [], 0.0, False, None
    batches = task.batches(seed)
    started = time.perf_counter()
    while clock < budget_s:
        t = len(times)
        start = time.perf_counter()
        batch = next(batches)
        if t == 0:
            with ByteCounter() as counter:
                counter.track(trainer.persistent())
                base = counter.current
                counter.reset_peak()
                loss = trainer.step(batch, t)
                peak = dict(persistent=base, peak=counter.peak)
        else:
            loss = trainer.step(batch, t)
        times.append(time.perf_counter() - start)
        clock += times[-1]
        if loss is None:
            diverged = True
            break
        losses.append(loss)
        if marks and clock >= marks[0]:
            while marks and clock >= marks[0]:
                marks.pop(0)
            curve.append(dict(train_s=clock, steps=len(times), **task.score(trainer.scoring_model())))
    model = trainer.scoring_model()
    after = task.score(model)
    curve.append(dict(train_s=clock, steps=len(times), **after))
    after.update(_retention(task.probe.measure(model.eval())))
    steady = times[1:] or times
    return dict(spec=dict(method=name, lr=lr, seed=seed, model=task.model_name, budget_s=budget_s,
                          batch_size=task.batch_size, eval_rows=len(task.held_out)),
                description=method.description, objective=method.objective, zeroth_order=method.zeroth_order,
                before=task.original, after=after, steps=len(times), train_s=round(clock, 2),
                s_per_step=statistics.median(steady), first_step_s=times[0], peak_bytes=peak["peak"],
                persistent_bytes=peak["persistent"], trainable_params=trainer.trainable, diverged=diverged,
                curve=curve, losses=losses, wall_s=round(time.perf_counter() - started, 1),
                load_average=dict(before=load_before, after=load_average()), threads=torch.get_num_threads())


def best_lr(results: list[dict]) -> float:
    """Highest held-out accuracy, then the lowest KL; a diverged run only if every run diverged."""
    pool = [r for r in results if not r["diverged"]] or results
    return max(pool, key=lambda r: (r["after"]["accuracy"], -r["after"]["kl"]))["spec"]["lr"]


def study(results_dir: Path, methods: list[str], lrs: dict | None = None, **settings) -> dict[str, list[dict]]:
    """Run (or find) every run; returns each method's runs at its picked rate. ``lrs``: {method: rates}."""
    settings = {**DEFAULTS, **settings}
    results_dir.mkdir(parents=True, exist_ok=True)
    task = None

    def get(name, lr, seed):
        nonlocal task
        path = run_path(results_dir, name, lr, seed)
        if path.exists():
            return json.loads(path.read_text())
        if task is None:
            task = Task(settings["model"], settings["eval_rows"], settings["train_rows"], settings["batch_size"],
                        results_dir, settings["probe_batch"])
        print(f"zo study: {name} lr {lr:g} seed {seed} (load {load_average():.2f})", file=sys.stderr, flush=True)
        result = run_one(task, name, lr, seed, settings["budget_s"], settings["checkpoints"])
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)  # whole or absent: a killed run is simply run again
        print(f"zo study: {name} lr {lr:g} seed {seed}: {result['steps']} steps, {result['s_per_step']:.2f} s/step, "
              f"accuracy {result['after']['accuracy']:.3f}, KL {result['after']['kl']:.4f}, "
              f"load {load_average():.2f}", file=sys.stderr, flush=True)
        return result

    picked = {}
    for name in methods:
        sweep = [get(name, lr, 0) for lr in (lrs or {}).get(name, METHODS[name].lrs)]
        picked[name] = best_lr(sweep)
    done = {name: [get(name, picked[name], 0)] for name in methods}
    zo = [n for n in methods if n in ZO_METHODS]
    best_zo = max(zo, key=lambda n: done[n][0]["after"]["accuracy"]) if zo else None
    order = [n for n in PRIORITY if n in methods] + ([best_zo] if best_zo else [])
    order += [n for n in methods if n not in order]
    for name in order:
        done[name] += [get(name, picked[name], s) for s in range(1, settings["seeds"])]
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default="benchmarks/results/zo-study-runs")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--lrs", help="the sweep's rates where not each method's own (methods.py): "
                        "METHOD=LR[/LR...], comma-separated, e.g. mezo-loop=1e-4,lora=1e-3")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    lrs = {}
    for item in filter(None, (args.lrs or "").split(",")):
        name, _, values = item.partition("=")
        lrs[name] = [float(v) for v in values.split("/")]
    study(Path(args.results_dir), methods, lrs, **{k: getattr(args, k) for k in DEFAULTS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
