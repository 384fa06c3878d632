"""``--pipeline`` (``lopt.parallel.pipeline``): one block per rank, gloo on the CPU, forked ranks as in test_distributed.

The references are one-process runs in this process: the interleaved step without clipping, and, with
clipping, ``--schedule sequential`` (stale boundary), which clips each block on its own as the pipeline does.
Tiny model (4 layers), a few steps of 3 accumulated micro-batches each.
"""

import os
import signal
import time

import pytest
import torch

from lopt.training.checkpoint import read_latest
from lopt.cli import EXIT_USAGE
from lopt.config import TrainConfig
from lopt.errors import UsageError
from lopt.training.run_dir import checkpoints
from lopt.training.trainer import train
from ranks import Ranks, argv, assert_same_run, flags, metrics, run_ranks


def test_two_stages_give_the_one_process_run_and_only_rank_0_writes(tmp_path, tiny_model_dir, data):
    """No clipping: the interleaved one-process run's losses and weights. Rank 0 evaluates mid-run (the other
    block's weights sent to it first) and writes one checkpoint, one final/ and one metrics file."""
    fields = flags(tiny_model_dir, data, tmp_path / "pipeline", max_grad_norm=0, save_every=2, eval_data=data,
                   eval_every=2, eval_max_examples=2)
    ranks = run_ranks(dict(fields, pipeline=True), tmp_path)
    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"))))
    out = tmp_path / "pipeline"
    assert_same_run(out, tmp_path / "one", tiny_model_dir)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    one_rows = metrics(tmp_path / "one")
    assert [r.get("eval_loss") for r in metrics(out)] == pytest.approx([r.get("eval_loss") for r in one_rows])
    assert "2 ranks (pipeline: block r on rank r)" in ranks.output(0)
    assert "lopt: starting" not in ranks.output(1) and "final checkpoint" not in ranks.output(1)


def test_three_stages_clipped_per_block_give_the_sequential_schedule(tmp_path, tiny_model_dir, data):
    """Clipping on, 3 blocks on 3 ranks (a middle rank receives and sends): each block clipped on its own, as
    --schedule sequential does in one process. The norms are above the limit, so the clip acts."""
    fields = flags(tiny_model_dir, data, tmp_path / "pipeline", num_blocks=3, max_grad_norm=0.5)
    run_ranks(dict(fields, pipeline=True), tmp_path, n=3)
    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"), schedule="sequential")))
    assert_same_run(tmp_path / "pipeline", tmp_path / "one", tiny_model_dir)
    assert all(r["grad_norm"] > 0.5 for r in metrics(tmp_path / "one"))


def test_two_copies_of_a_two_stage_pipeline_give_the_one_process_run(tmp_path, tiny_model_dir, data):
    """4 ranks, --num-blocks 2: ranks 0-1 and 2-3 are two pipelines; each runs every other micro-batch of the
    step (--grad-accum 3: one copy runs one of them, and in each epoch's short last step none), and the ranks
    of one block sum its gradients before they clip and step it. Clipped per block: the one-process
    sequential schedule's run. Rank 0 writes, the blocks gathered from the first copy."""
    fields = flags(tiny_model_dir, data, tmp_path / "copies", max_grad_norm=0.05, save_every=2)
    ranks = run_ranks(dict(fields, pipeline=True), tmp_path, n=4)
    train(TrainConfig(**dict(fields, schedule="sequential", output_dir=str(tmp_path / "one"))))
    assert_same_run(tmp_path / "copies", tmp_path / "one", tiny_model_dir)
    assert "4 ranks (pipeline: block r % 2 on rank r, 2 copies)" in ranks.output(0)


def test_resume_with_and_without_pipeline(tmp_path, tiny_model_dir, data):
    """Rank 0 writes the whole state (every block's weights and optimizer state): a pipeline's step-3 checkpoint
    resumed by one process (one AdamW over the model), and one process's resumed as a pipeline, each give the
    straight 6 steps (a constant rate, no clipping)."""
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=0, grad_accum=2)
    straight = flags(tiny_model_dir, data, tmp_path / "straight", max_steps=6, **constant)
    train(TrainConfig(**straight))

    out = tmp_path / "pipeline-then-one"
    run_ranks(dict(straight, output_dir=str(out), max_steps=3, pipeline=True), tmp_path)
    train(TrainConfig(**dict(straight, output_dir=str(out), resume=True)))
    assert_same_run(out, tmp_path / "straight", tiny_model_dir)

    out = tmp_path / "one-then-pipeline"
    train(TrainConfig(**dict(straight, output_dir=str(out), max_steps=3)))
    run_ranks(dict(straight, output_dir=str(out), resume=True, pipeline=True), tmp_path)
    assert_same_run(out, tmp_path / "straight", tiny_model_dir)


@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_rank_ends_the_job_with_one_clear_line(tmp_path, tiny_model_dir, data, killed):
    """Either stage killed mid-run: the other one's next send, receive or sum fails at once, and it exits 2 with
    one line naming itself, the lost peer and the last complete checkpoint, which resumes in one process."""
    out = tmp_path / "run"
    fields = flags(tiny_model_dir, data, out, max_steps=10_000, save_every=1, dist_timeout=60, pipeline=True)
    ranks = Ranks(argv(fields), tmp_path)
    deadline = time.monotonic() + 60
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
        assert time.monotonic() < deadline and ranks.poll() == [None, None], ranks.output()
        time.sleep(0.05)
    os.kill(ranks.pids[killed], signal.SIGKILL)
    killed_at = time.monotonic()
    codes = ranks.wait(timeout=30)
    survivor = 1 - killed
    assert codes[killed] == -signal.SIGKILL and codes[survivor] == EXIT_USAGE, ranks.output()
    assert time.monotonic() - killed_at < 15  # gloo sees the closed connection; --dist-timeout is the backstop
    lines = [line for line in ranks.output(survivor).splitlines() if line.startswith("lopt: error:")]
    assert len(lines) == 1, ranks.output(survivor)
    assert f"rank {survivor}: " in lines[0] and "another rank exited" in lines[0], lines[0]
    path, state = read_latest(checkpoints(out), torch.device("cpu"))
    assert f"the last complete checkpoint is {checkpoints(out)[-1]}" in lines[0] and path == checkpoints(out)[-1]
    summary = train(TrainConfig(**dict(fields, pipeline=False, resume=True, max_steps=state["step"] + 1)))
    assert summary["status"] == "completed" and summary["steps"] == state["step"] + 1


def test_settings_a_pipeline_cannot_run_are_one_line_errors(monkeypatch):
    def refused(match, **fields):
        with pytest.raises(UsageError, match=match):
            TrainConfig(pipeline=True, **fields).validate()

    refused("--pipeline puts one block on each process: start it with torchrun", num_blocks=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused("--pipeline puts one block on each process", num_blocks=1)
    refused("the 2 ranks must be a multiple of --num-blocks, got 3", num_blocks=3)
    refused("drop --schedule sequential", num_blocks=2, schedule="sequential")
    refused("drop --early-lower-step", num_blocks=2, early_lower_step=True)
    refused("--boundary fresh would make each pipeline stage wait", num_blocks=2, boundary="fresh")
    refused("--recipe and --gpu-mem plan one process", num_blocks=2, recipe="8gb")
    refused("--offload optimizer with --pipeline is not supported yet", num_blocks=2, offload="optimizer")
    monkeypatch.setenv("WORLD_SIZE", "4")
    refused("the 4 ranks must be a multiple of --num-blocks, got 3", num_blocks=3)
    TrainConfig(pipeline=True, num_blocks=2).validate()  # two copies of a 2-stage pipeline
    TrainConfig(pipeline=True, num_blocks=4, grad_accum=16).validate()  # any accumulation
