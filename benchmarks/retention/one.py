"""One run of the retention study: ``python -m benchmarks.retention.one --spec JSON`` writes the spec's
``output`` JSON (``run.py`` starts each run in its own process, so tokens/s and peak memory are its own).

The LoPT methods and end-to-end fine-tuning run through ``lopt.train``; LoRA and BAdam through the
plain loop below, with the trainer's data order, schedule, clipping and measures.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

from .methods import METHODS

MAX_GRAD_NORM = 1.0
WARMUP_FRACTION, MIN_LR_RATIO = 0.05, 0.1  # as lopt.train's defaults


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _pick(result: dict) -> dict:
    keys = ("exact_match", "correct", "num_generated", "loss", "token_accuracy", "general_nll", "kl", "answer_nll",
            "answer_agreement", "first_token_agreement", "answer_kept", "answer_samples")
    return {k: result[k] for k in keys if k in result}


def run_lopt(spec: dict, method) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lopt.config import TrainConfig
    from lopt.models.loading import load_config
    from lopt.engine.model import LoPTModel
    from lopt.training.trainer import train

    overrides = dict(method.lopt)
    lr = spec["lr"]
    lr_lower = lr * overrides.pop("lr_lower", 1.0)
    with tempfile.TemporaryDirectory(prefix="retention-run-") as out:
        config = TrainConfig(model=spec["model"], data=spec["train_file"], eval_data=spec["held_out_file"],
                             seq_len=spec["seq_len"], batch_size=spec["batch_size"], max_steps=spec["steps"],
                             lr=lr, lr_lower=lr_lower, seed=spec["seed"], save_every=0, output_dir=out,
                             eval_max_examples=spec["eval_max_examples"], **overrides)
        summary = train(config)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    with torch.device("meta"):  # counts only: no weights read
        counted = LoPTModel(AutoModelForCausalLM.from_config(load_config(spec["model"])),
                            num_blocks=overrides.get("num_blocks", 2), kernels=False)
    trainable = sum(p.numel() for g in counted.param_groups(lr, lr_lower) if g["lr"] > 0 for p in g["params"])
    return dict(after=_pick(summary["eval"]), before=_pick(summary["eval"]["before"]),
                tokens_per_s=_mean_rate(rows), peak_mem_gb=max(r["peak_mem_gb"] for r in rows),
                trainable_params=trainable, losses=[r["task_loss"] for r in rows])


def _mean_rate(rows: list[dict]) -> float:
    """Mean tokens/s over the logged steps, the first (warm-up) left out when there are others."""
    rates = [r["tokens_per_s"] for r in rows]
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates)


def run_peer(spec: dict, method) -> dict:
    """LoRA or BAdam in a plain loop: the trainer's data order, warm-up + cosine schedule, clipping."""
    import torch

    from lopt.data.sft import StepSchedule, collate, eval_examples, load_rows, rows_to_conversations, tokenize_conversations
    from lopt.measures.evaluation import pad_id, task_score
    from lopt.models.loading import load_model
    from lopt.measures.retention import RetentionProbe
    from lopt.training.trainer import lr_factor

    torch.manual_seed(spec["seed"])
    model, tokenizer, _ = load_model(spec["model"], seed=spec["seed"])
    seq_len, batch_size, steps = spec["seq_len"], spec["batch_size"], spec["steps"]
    train_conv, _ = rows_to_conversations(load_rows(spec["train_file"]))
    held_conv, _ = rows_to_conversations(load_rows(spec["held_out_file"]))
    examples = tokenize_conversations(train_conv, tokenizer, seq_len)
    held_out = (tokenize_conversations(held_conv, tokenizer, seq_len), eval_examples(held_conv, tokenizer, seq_len))
    probe = RetentionProbe(model, tokenizer, seq_len, batch_size)
    # Unchanged since the probe was built: its greedy answers are the reference's (as lopt.train's ``before``).
    before = dict(task_score(model, tokenizer, held_out, batch_size, spec["eval_max_examples"]),
                  **probe.measure(model, as_built=True))

    if method.peer == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **method.notes))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"],
                                      weight_decay=0.0)
    else:
        from badam import BlockOptimizer

        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
        optimizer = BlockOptimizer(base_optimizer=optimizer, named_parameters_list=list(model.named_parameters()),
                                   verbose=0, **method.notes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method.peer == "badam":  # one layer at a time: the count is the largest block's
        trainable = max(sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(f"{x}") or x in n
                                                                               for x in prefixes))
                        for prefixes in optimizer.block_prefix_list)

    model.train()
    schedule = StepSchedule(len(examples), batch_size, 1, spec["seed"])
    warmup = max(1, round(WARMUP_FRACTION * steps))
    device = next(model.parameters()).device
    losses, times, tokens = [], [], []
    epoch, step_in_epoch, order = 0, 0, schedule.order(0)
    for step in range(steps):
        if step_in_epoch == schedule.steps_per_epoch:
            epoch, step_in_epoch, order = epoch + 1, 0, schedule.order(epoch + 1)
        (indices,) = schedule.micro_batches(epoch, step_in_epoch, order)
        step_in_epoch += 1
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_id(tokenizer)).items()}
        for group in optimizer.param_groups:
            group["lr"] = spec["lr"] * lr_factor(step, warmup, steps, MIN_LR_RATIO)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
        tokens.append(batch["input_ids"].numel())
    peak = _peak_rss_gb()
    if method.peer == "lora":
        model = model.merge_and_unload()
    model.eval()
    after = dict(task_score(model, tokenizer, held_out, batch_size, spec["eval_max_examples"]), **probe.measure(model))
    rates = [n / t for n, t in zip(tokens, times)]
    rates = rates[1:] if len(rates) > 1 else rates
    return dict(after=_pick(after), before=_pick(before), tokens_per_s=sum(rates) / len(rates), peak_mem_gb=peak,
                trainable_params=trainable, losses=losses)


def run(spec: dict) -> dict:
    """Run ``spec`` (method, lr, seed, model, data files, steps, batch size, seq len) and write its JSON."""
    started = time.perf_counter()
    method = METHODS[spec["method"]]
    result = run_peer(spec, method) if method.peer else run_lopt(spec, method)
    if not all(math.isfinite(v) for v in result["losses"]):
        result["diverged"] = True
    result = dict(spec=spec, description=method.description, wall_s=round(time.perf_counter() - started, 1), **result)
    output = Path(spec["output"])
    tmp = output.with_name(f".tmp-{output.name}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(output)  # whole or absent: a killed run is simply run again
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the run, as JSON")
    run(json.loads(parser.parse_args(argv).spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
