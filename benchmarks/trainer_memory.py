"""Memory of one Hugging Face Trainer step with and without ``lopt.apply``, counted in bytes on the CPU.

``python -m benchmarks.trainer_memory`` runs one ``Trainer.training_step`` (forward and backward of one
micro-batch) per setting on random-init models built from configs: the toy (Llama, hidden 128, 8 layers)
and SmolLM2-135M's shape (Llama, hidden 576, 30 layers, vocab 49152). Two figures per run:

- saved activations: the peak of the bytes autograd holds for backward (parameters excluded), live;
- step peak: the peak of every live tensor created in the step (activations, logits, gradients), from
  ``benchmarks.e2e.bytecount.ByteCounter``, over the weights that exist before it.

Both are exact byte counts of tensors, not of an allocator: on a GPU add the allocator's rounding and
the CUDA context. Writes ``benchmarks/results/trainer-memory-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch

SHAPES = {
    "toy": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64),
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def one_step(shape: str, num_blocks: int, batch_size: int, seq_len: int) -> dict:
    from transformers import Trainer, TrainingArguments

    import lopt
    from benchmarks.e2e.bytecount import ByteCounter, SavedActivationPeak, tensors_of
    from lopt.models.shapes import build_model, tiny_config

    model = build_model(tiny_config("llama", **SHAPES[shape]))
    if num_blocks > 1:
        lopt.apply(model, num_blocks=num_blocks, kernels=False)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids.clone())
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True, per_device_train_batch_size=batch_size)
        trainer = Trainer(model=model, args=args)
        saved, counter = SavedActivationPeak(model), ByteCounter()
        with counter:
            counter.track(tensors_of(model))
            weights = counter.current
            with saved.hooks:
                trainer.training_step(model, batch, num_items_in_batch=(input_ids[:, 1:] >= 0).sum())
    return dict(shape=shape, num_blocks=num_blocks, batch_size=batch_size, seq_len=seq_len,
                saved_activation_peak_bytes=saved.peak, step_peak_bytes=counter.peak - weights)


def markdown(rows: list[dict]) -> str:
    lines = ["| model shape | k | batch x seq | saved-activation peak | vs k=1 | step peak (over weights) | vs k=1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["shape"]: r for r in rows if r["num_blocks"] == 1}
    for r in rows:
        b = base[r["shape"]]
        lines.append(f"| {r['shape']} | {r['num_blocks']} | {r['batch_size']} x {r['seq_len']} "
                     f"| {r['saved_activation_peak_bytes'] / 2**20:.1f} MiB "
                     f"| {r['saved_activation_peak_bytes'] / b['saved_activation_peak_bytes']:.3f} "
                     f"| {r['step_peak_bytes'] / 2**20:.1f} MiB | {r['step_peak_bytes'] / b['step_peak_bytes']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args(argv)
    settings = {"toy": (4, 64), "smollm2-135m-shape": (2, 256)}
    rows = []
    for shape in args.shapes.split(","):
        for k in (1, 2, 4):
            rows.append(one_step(shape, k, *settings[shape]))
            print(json.dumps(rows[-1]), flush=True)
    stem = Path(args.out) / f"trainer-memory-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=1) + "\n")
    stem.with_suffix(".md").write_text(
        "# One HF Trainer step, fp32, bytes counted on the CPU (`python -m benchmarks.trainer_memory`)\n\n"
        + markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
