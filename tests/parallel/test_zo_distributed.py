"""``torchrun ... lopt train --method zo``: each rank scores its share of a step's micro-batches, the ranks sum
2P + 1 numbers (the losses and the count) and apply the same update from the shared seed. N ranks give one
process's run (losses and weights to float round-off), resume across rank counts, and send a few bytes a step."""

import pytest
import signal
import time

from ranks import argv, assert_same_run, kill_rank_1_after, metrics, run_ranks

import lopt.training.trainer  # noqa: F401  (imported before the forks, so the ranks start at once)
from lopt.cli import EXIT_USAGE, main
from lopt.models.shapes import build_model, tiny_config
from lopt.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("zo-tiny")
    tokenizer = byte_tokenizer()
    build_model(tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=None), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("zo-data") / "cls.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"item {i} " + "ab" * (i % 4) + " is", "candidates": ["-", "+"],
                                        "answer": i % 2}) + "\n" for i in range(40)))
    return str(path)


def zo_flags(model, data, out, **overrides) -> dict:
    fields = dict(method="zo", model=model, data=data, output_dir=str(out), batch_size=3, grad_accum=3, lr=1e-2,
                  max_steps=4, save_every=0, retention=False, keep_checkpoint=True, eval_split=0, zo_interval=2)
    fields.update(overrides)
    return fields


@pytest.mark.parametrize("ranks,kind", [(2, "lowrank"), (3, "fullrank")])
def test_ranks_give_the_one_process_run(tmp_path, model_dir, data, ranks, kind):
    reference = tmp_path / "one"
    assert main(argv(zo_flags(model_dir, data, reference, zo_kind=kind))) == 0
    out = tmp_path / "ranks"
    run_ranks(zo_flags(model_dir, data, out, zo_kind=kind), tmp_path, n=ranks)
    assert_same_run(out, reference, model_dir)
    assert metrics(out)[0]["task_loss"] != metrics(out)[-1]["task_loss"]


def test_resume_across_rank_counts(tmp_path, model_dir, data):
    """2 ranks' step-3 checkpoint (a lowrank basis period half done) resumed by one process: the straight 6
    steps (a constant rate, so stopping with --max-steps 3 leaves the schedule as it was)."""
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, zo_interval=4)
    reference = tmp_path / "one"
    assert main(argv(zo_flags(model_dir, data, reference, max_steps=6, **constant))) == 0
    out = tmp_path / "run"
    run_ranks(zo_flags(model_dir, data, out, max_steps=3, **constant), tmp_path, n=2)  # 3 steps on 2 ranks, kept
    assert main(argv(zo_flags(model_dir, data, out, max_steps=6, resume=True, **constant))) == 0
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))
    assert_same_run(out, reference, model_dir)


def test_a_killed_rank_ends_the_job_with_one_clear_line(tmp_path, model_dir, data):
    """Rank 1 killed mid-run: rank 0's next exchange of losses fails at once, and it exits 2 in one line that
    names the lost peer and the last complete checkpoint, as for LoPT."""
    out = tmp_path / "run"
    ranks = kill_rank_1_after(zo_flags(model_dir, data, out, max_steps=10_000, save_every=1, dist_timeout=60),
                              tmp_path)
    killed = time.monotonic()
    assert ranks.wait(timeout=30) == [EXIT_USAGE, -signal.SIGKILL], ranks.output()
    assert time.monotonic() - killed < 15
    lines = [line for line in ranks.output(0).splitlines() if line.startswith("lopt: error:")]
    assert len(lines) == 1 and "failed: another rank exited" in lines[0] and "checkpoint" in lines[0], lines
