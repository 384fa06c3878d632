"""Tokens/s of ``lopt train`` on this machine's CPU: one process, a 2-stage ``--pipeline``, 2-rank data parallel
(whole and ``--shard``-ed).

``python -m benchmarks.pipeline_cpu`` runs, for each model, the same fixed number of optimizer steps (same data,
batch, accumulation and schedule; ``--num-blocks 2``; no clipping, so all four train the same steps) as

- (a) one process, 1 thread: ``python -m lopt train ...``
- (b) a 2-stage pipeline, 2 processes of 1 thread: ``torchrun --nproc-per-node 2 -m lopt train --pipeline ...``
- (c) 2-rank data parallel, 2 processes of 1 thread: ``torchrun --nproc-per-node 2 -m lopt train ...``
- (d) the same, sharded (FSDP2, ``lopt.parallel.sharding``): ``torchrun --nproc-per-node 2 -m lopt train --shard ...``

each configuration ``--repeats`` times, interleaved (a, b, c, d, a, b, c, d, ...), so that a change in the machine's
load hits all four alike. Every example has the same length, so every step has the same tokens, and a run's
tokens/s is the harmonic mean of rank 0's per-step figures in ``metrics.jsonl`` after ``--warmup`` steps
(process start, loading and the final writes are outside it). The load average and the busiest other processes
are recorded beside each run: other jobs share these cores. Writes
``benchmarks/results/pipeline-cpu-<date>.{json,md}``.

Models: ``tiny`` (``--model tiny``: Llama, hidden 256, 4 layers, 2.9M parameters) and ``wide`` (Llama, hidden
512, 8 layers, 22.3M parameters, random init, the byte tokenizer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = {
    "a": "one process, 1 thread",
    "b": "2-stage pipeline, 2 processes x 1 thread",
    "c": "2-rank data parallel, 2 processes x 1 thread",
    "d": "2-rank sharded data parallel (--shard), 2 processes x 1 thread",
}
WIDE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)


def write_data(path: Path, n_rows: int, question_chars: int, answer_chars: int, seed: int = 0) -> str:
    """Rows of one length (different letters): with the byte tokenizer every example has the same tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"question": "".join(rng.choices(letters, k=question_chars)),
             "answer": "".join(rng.choices(letters, k=answer_chars))} for _ in range(n_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def example_lengths(model: str, data: str, seq_len: int) -> set[int]:
    from lopt.data.sft import load_rows, rows_to_conversations, tokenize_conversations
    from lopt.models.loading import load_tokenizer_and_config, resolve_model

    tokenizer, _ = load_tokenizer_and_config(resolve_model(model))
    conversations, _ = rows_to_conversations(load_rows(data), data)
    return {len(e.input_ids) for e in tokenize_conversations(conversations, tokenizer, seq_len)}


def save_wide_model(path: Path) -> str:
    from lopt.models.shapes import build_model, tiny_config
    from lopt.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=8 * -(-len(tokenizer) // 8), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **WIDE)
    model = build_model(config, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_snapshot() -> dict:
    """The load average and the busiest processes other than this benchmark's."""
    ps = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    busy = [line.strip()[:100] for line in ps.splitlines()[1:6] if "pipeline_cpu" not in line]
    return dict(loadavg=[round(x, 2) for x in os.getloadavg()], busiest=busy)


def run_one(config: str, model: str, data: str, out: Path, args) -> dict:
    train = ["-m", "lopt", "train", "--model", model, "--data", data, "--seq-len", str(args.seq_len),
             "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
             "--max-steps", str(args.steps), "--num-blocks", "2", "--max-grad-norm", "0", "--lr", "1e-3",
             "--no-retention", "--save-every", "0", "--log-every", "1", "--output-dir", str(out), "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = {"a": [sys.executable, *train], "b": [*torchrun, *train, "--pipeline"], "c": [*torchrun, *train],
               "d": [*torchrun, *train, "--shard"]}[config]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")
    before = load_snapshot()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"configuration {config} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows[args.warmup:]]
    return dict(config=config, tokens_per_s=round(statistics.harmonic_mean(timed), 1),
                per_step_tokens_per_s=[r["tokens_per_s"] for r in rows], final_loss=rows[-1]["loss"],
                rank0_peak_rss_gb=rows[-1]["peak_mem_gb"], wall_s=round(wall, 1), load_before=before,
                load_after=load_snapshot())


def ratio(x: float, y: float) -> float:
    return round(x / y, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,wide", help="comma-separated: tiny, wide (default: both)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the figure (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=16, help="micro-batches per step (default: 16)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one run may take")
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/pipeline-cpu-<date>")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    date = datetime.date.today().isoformat()
    output = args.output or RESULTS / f"pipeline-cpu-{date}"
    results = dict(date=date, machine=dict(cpus=os.cpu_count(), python=sys.version.split()[0]),
                   settings=dict(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                                 grad_accum=args.grad_accum, seq_len=args.seq_len, num_blocks=2, repeats=args.repeats,
                                 max_grad_norm=0),
                   configs=CONFIGS, models={})
    with tempfile.TemporaryDirectory(prefix="lopt-pipeline-bench-") as tmp:
        tmp = Path(tmp)
        # Answers of 1/4 of the row, and room for the chat template's tokens within --seq-len.
        data = write_data(tmp / "rows.jsonl", 4 * args.batch_size * args.grad_accum,
                          question_chars=(args.seq_len - 40) * 3 // 4, answer_chars=(args.seq_len - 40) // 4)
        for name in args.models.split(","):
            model = {"tiny": lambda: "tiny", "wide": lambda: save_wide_model(tmp / "wide")}[name]()
            lengths = example_lengths(model, data, args.seq_len)
            assert len(lengths) == 1, f"examples of unequal length {sorted(lengths)}: tokens/step would vary"
            example_tokens = lengths.pop()
            tokens_per_step = example_tokens * args.batch_size * args.grad_accum
            runs = []
            for repeat in range(args.repeats):
                for config in CONFIGS:
                    run = run_one(config, model, data, tmp / f"{name}-{config}-{repeat}", args)
                    run["repeat"] = repeat
                    runs.append(run)
                    print(f"{name} ({config}) repeat {repeat + 1}: {run['tokens_per_s']:,.0f} tokens/s, final loss "
                          f"{run['final_loss']:.6f}, load {run['load_before']['loadavg'][0]}", flush=True)
            by_config = {c: [r["tokens_per_s"] for r in runs if r["config"] == c] for c in CONFIGS}
            per_repeat = [dict(b_over_a=ratio(by_config["b"][i], by_config["a"][i]),
                               b_over_c=ratio(by_config["b"][i], by_config["c"][i]),
                               d_over_c=ratio(by_config["d"][i], by_config["c"][i])) for i in range(args.repeats)]
            means = {c: statistics.mean(v) for c, v in by_config.items()}
            results["models"][name] = dict(example_tokens=example_tokens, tokens_per_step=tokens_per_step,
                                           runs=runs, per_repeat=per_repeat,
                                           mean_tokens_per_s={c: round(v, 1) for c, v in means.items()},
                                           b_over_a=ratio(means["b"], means["a"]),
                                           b_over_c=ratio(means["b"], means["c"]),
                                           d_over_c=ratio(means["d"], means["c"]))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")
    return 0


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# `lopt train` on the CPU: one process, 2-stage pipeline, 2-rank data parallel, whole and sharded "
        f"({results['date']})",
        "",
        f"`python -m benchmarks.pipeline_cpu`: {s['steps']} steps of {s['grad_accum']} micro-batches of "
        f"{s['batch_size']} examples (all of one length), `--num-blocks 2`, no clipping; tokens/s over steps "
        f"{s['warmup'] + 1}-{s['steps']} (rank 0's metrics); {s['repeats']} runs of each configuration, interleaved; "
        f"{results['machine']['cpus']} CPU cores, 1 thread per process.",
        "",
        "| model | tokens/step | " + " | ".join(f"({c}) {d}" for c, d in results["configs"].items())
        + " | b/a | b/c | d/c |",
        "|---|---|" + "---|" * len(results["configs"]) + "---|---|---|",
    ]
    for name, m in results["models"].items():
        cells = []
        for c in results["configs"]:
            runs = [r["tokens_per_s"] for r in m["runs"] if r["config"] == c]
            cells.append(" / ".join(f"{x:,.0f}" for x in runs))
        ba = " / ".join(f"{r['b_over_a']:.2f}" for r in m["per_repeat"])
        bc = " / ".join(f"{r['b_over_c']:.2f}" for r in m["per_repeat"])
        dc = " / ".join(f"{r['d_over_c']:.2f}" for r in m["per_repeat"])
        lines.append(f"| {name} | {m['tokens_per_step']:,} | " + " | ".join(cells)
                     + f" | {ba} (means: {m['b_over_a']:.2f}) | {bc} (means: {m['b_over_c']:.2f}) "
                     f"| {dc} (means: {m['d_over_c']:.2f}) |")
    lines += ["", "Each cell: tokens/s of each run, in the order run. Final losses (all four train the same steps):"]
    for name, m in results["models"].items():
        losses = ", ".join(f"{r['config']}{r['repeat'] + 1} {r['final_loss']:.6f}" for r in m["runs"])
        lines.append(f"- {name}: {losses}")
    lines += ["", "Load average (1 min) before each run, in the order run:"]
    for name, m in results["models"].items():
        loads = ", ".join(f"{r['config']}{r['repeat'] + 1} {r['load_before']['loadavg'][0]}" for r in m["runs"])
        lines.append(f"- {name}: {loads}")
    first = next(iter(results["models"].values()))["runs"][0]["load_before"]["busiest"]
    lines += ["", "Busiest processes when the first run started (%CPU over each one's life):", "",
              *[f"    {p}" for p in first], ""]
    loads = [r["load_before"]["loadavg"][0] for m in results["models"].values() for r in m["runs"]]
    cpus = results["machine"]["cpus"]
    lines += [f"Load: the 1-minute load average before the runs (which still counts the previous run's own "
              f"processes) was {min(loads)} to {max(loads)} on {cpus} cores. Where another job takes a core, (b) and "
              "(c) share the rest while (a) needs only one core, so b/a comes out lower than a quiet machine would "
              "give; and the pipeline's stages wait on each other at every micro-batch, where data parallel waits "
              "once per step, so a descheduled process is expected to cost the pipeline more.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
