"""Data parallel under torchrun (``lopt.parallel.world``): 2 ranks on the CPU with gloo give the one-process run.

One test starts the real command, ``torchrun --standalone --nproc-per-node 2 -m lopt train`` (about 25 s
on a loaded 2-core machine, most of it two processes importing torch and transformers). The others fork
this process into 2 ranks that set what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and call ``lopt``'s ``main``: the same code from the command line on, without the imports.
References are one-process runs of the same schedule, in this process. Tiny model, a few steps each.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lopt.training.trainer  # noqa: F401  (imported before the forks, so the ranks start at once)
from lopt.training.checkpoint import read_latest
from lopt.cli import EXIT_USAGE
from lopt.config import TrainConfig
from lopt.errors import UsageError
from lopt.training.run_dir import checkpoints
from lopt.training.trainer import train
from ranks import argv, assert_same_run, flags, kill_rank_1_after, metrics, run_ranks

REPO = Path(__file__).resolve().parents[2]
# ------------------------------------------------------------------------------------- the tests


def test_torchrun_two_ranks_give_the_one_process_run_and_only_rank_0_writes(tmp_path, tiny_model_dir, data):
    """--grad-accum 3 over 2 ranks: rank 0 runs micro-batches 0 and 2, rank 1 micro-batch 1, and in each
    epoch's short last step rank 1 has none. Rank 0 alone evaluates (mid-run too) and writes."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", save_every=2, eval_data=data, eval_every=2,
                   eval_max_examples=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lopt", *argv(fields)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"))))
    out = tmp_path / "ranks"
    assert_same_run(out, tmp_path / "one", tiny_model_dir)
    # One writer: 4 rows (two would append 8), one final/, one eval.json, the last checkpoint only.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        ".lopt-run.json", ".lopt-run.lock", "checkpoint-000004", "config.json", "eval.json", "final", "loss.png",
        "metrics.jsonl"]
    assert [("eval_loss" in r) for r in metrics(out)] == [False, True, False, False]
    assert done.stderr.count("lopt: starting:") == 1 and done.stdout.count("final checkpoint:") == 1
    assert "2 ranks (data parallel)" in done.stderr


@pytest.mark.parametrize("schedule", [dict(early_lower_step=True), dict(boundary="fresh")],
                         ids=["early-lower-step", "boundary-fresh"])
def test_per_block_steps_sum_each_block_at_its_boundary(tmp_path, tiny_model_dir, data, schedule):
    """--early-lower-step and --boundary fresh step each lower block at its boundary: each rank runs one
    micro-batch of 3 (rank 1 none in the short step) and the ranks sum the block's gradients there. The same
    as one process with the whole step in one micro-batch of 6."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", batch_size=3, grad_accum=2, num_blocks=3, **schedule)
    run_ranks(fields, tmp_path)
    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"), batch_size=6, grad_accum=1)))
    assert_same_run(tmp_path / "ranks", tmp_path / "one", tiny_model_dir)


def test_sequential_schedule_with_accumulation_on_two_ranks(tmp_path, tiny_model_dir, data):
    """--schedule sequential, fresh boundary, 4 micro-batches a step over 2 ranks: each rank runs its two
    through a block, the ranks sum that block's gradients and step it; the same as one process."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", batch_size=2, grad_accum=4, num_blocks=3,
                   schedule="sequential", boundary="fresh")
    run_ranks(fields, tmp_path)
    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"))))
    assert_same_run(tmp_path / "ranks", tmp_path / "one", tiny_model_dir)


def test_resume_across_rank_counts(tmp_path, tiny_model_dir, data):
    """A checkpoint holds the full state: 2 ranks' step-3 checkpoint resumed by 1 process, and 1 process's
    resumed by 2 ranks, each give the straight 6 steps (a constant rate, so stopping at step 3 with
    --max-steps 3 leaves the schedule as it was)."""
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, grad_accum=2)
    straight = flags(tiny_model_dir, data, tmp_path / "straight", max_steps=6, **constant)
    train(TrainConfig(**straight))

    run_ranks(dict(straight, output_dir=str(tmp_path / "two-then-one"), max_steps=3), tmp_path)
    train(TrainConfig(**dict(straight, output_dir=str(tmp_path / "two-then-one"), resume=True)))
    assert_same_run(tmp_path / "two-then-one", tmp_path / "straight", tiny_model_dir)

    train(TrainConfig(**dict(straight, output_dir=str(tmp_path / "one-then-two"), max_steps=3)))
    run_ranks(dict(straight, output_dir=str(tmp_path / "one-then-two"), resume=True), tmp_path)
    assert_same_run(tmp_path / "one-then-two", tmp_path / "straight", tiny_model_dir)


def test_a_killed_rank_ends_the_job_with_one_clear_line_and_a_usable_checkpoint(tmp_path, tiny_model_dir, data):
    """Rank 1 killed mid-run (no torchrun here to stop the others): rank 0's next gradient sum fails at once,
    and it exits 2 naming itself, the lost peer and the last complete checkpoint, which resumes."""
    out = tmp_path / "run"
    fields = flags(tiny_model_dir, data, out, max_steps=10_000, save_every=1, dist_timeout=60)
    ranks = kill_rank_1_after(fields, tmp_path)
    killed = time.monotonic()
    codes = ranks.wait(timeout=30)
    assert codes == [EXIT_USAGE, -signal.SIGKILL], ranks.output()
    assert time.monotonic() - killed < 15  # gloo sees the closed connection; --dist-timeout is the backstop
    lines = [line for line in ranks.output(0).splitlines() if line.startswith("lopt: error:")]
    assert len(lines) == 1, ranks.output(0)
    # Whichever collective first meets the closed connection (a sum, the stop vote) names itself.
    assert lines[0].startswith("lopt: error: rank 0: ") and "failed: another rank exited" in lines[0], lines[0]
    newest = checkpoints(out)[-1]
    assert f"the last complete checkpoint is {newest}" in lines[0]
    path, state = read_latest(checkpoints(out), torch.device("cpu"))
    assert path == newest and state["step"] >= 2
    summary = train(TrainConfig(**dict(fields, resume=True, max_steps=state["step"] + 1)))
    assert summary["status"] == "completed" and summary["steps"] == state["step"] + 1


def test_settings_no_rank_count_can_run_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--early-lower-step .* each of the 2 ranks .* --grad-accum must be at "
                                         "most 2, got 3"):
        TrainConfig(early_lower_step=True, grad_accum=3).validate()
    with pytest.raises(UsageError, match="--boundary fresh .* at most 2"):
        TrainConfig(boundary="fresh", grad_accum=4).validate()
    TrainConfig(early_lower_step=True, grad_accum=2).validate()  # one micro-batch per rank
    with pytest.raises(UsageError, match="--dist-timeout must be an integer from 1"):
        TrainConfig(dist_timeout=0).validate()


def test_python_dash_m_lopt_is_the_command():
    done = subprocess.run([sys.executable, "-m", "lopt", "train", "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 0 and "--dist-timeout" in done.stdout
